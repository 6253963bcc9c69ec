"""Attention engine: the KVAPPEND and ATTN instructions, bit-exact with :mod:`kvoverlay.numerics`.

KVAPPEND copies one token's K and V (all KV heads) from the activation buffer into the
:class:`~hw.kv_buffer.KvBuffer`. ATTN runs :func:`kvoverlay.numerics.attention`: per query
head, exact q.K dot products rounded to ``Q.SCORE_FRAC``, an online softmax tile by tile
(running max, running sum, accumulator rescaled by ``exp(m_old - m_new)``), the reciprocal of
the sum by a restoring divider, then all heads aligned to the largest head exponent and
normalized into one bfp16 vector; the per-head (max, sum) go to the accumulator buffer.

Stages
------
:class:`AttentionEngine` is the sequencer: it counts heads, tiles, positions and chunks and
issues chunks to the stages, each a component of its own:

* :class:`AttnDecoder`: the instruction's fields and its set-up fault;
* :class:`ScoreStage`: q.K dot products, rounded scores in a double-buffered register file,
  the tile's largest score and value exponent;
* :class:`SoftmaxStage`: running max and sum, alpha, and p = 2^-x of each score
  (:class:`Exp2Neg`);
* :class:`ValueStage`: the accumulator register file, ``p * v`` added per chunk, rescaled by alpha;
* :class:`HeadFinish`: a head's statistics, the reciprocal of its sum and its scaled outputs;
* :class:`OutputStage`: all heads aligned and normalized into the destination vector.

The boundaries are where pipeline registers can go; p = 2^-x is computed in the cycle a value
chunk is issued and registered before it enters the value stage's multipliers.

Widths from the numerics' ranges
--------------------------------
:mod:`kvoverlay.numerics` computes in numpy int64, but with scores saturated at
``ATTN_SCORE_MAX`` no later quantity comes near int64: :func:`attention_widths` derives the
bound of each one from the config (``max_head_dim``, ``kv_capacity``) and the numerics'
constants, and the datapath is exactly that wide. Nothing wraps, so rounding shifts are exact
(:func:`hw.normalize.round_shift_halving`).
"""

from __future__ import annotations

import functools
import itertools
import operator
from typing import NamedTuple

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from kvoverlay import isa, numerics, timing
from kvoverlay.config import KV_BASE_BITS

from .arith import select_bits, shift_left
from .isa_layout import LAYOUTS
from .kv_buffer import EXP_SHAPE, kv_geometry, kv_port_signature
from .normalize import EXP_WIDE, Normalizer, bit_length, round_shift_expr, round_shift_halving
from .ports import Fault, abuf_lanes, abuf_read, abuf_write, acc_write, ereg_read, ereg_write, reg_read, unit_signature
from .widths import address_bits, ceil_div, log2_exact

__all__ = ["ATTN_COMMAND", "AttentionEngine", "AttnDecoder", "AttnWidths", "Exp2Neg", "HeadFinish", "OutputStage",
           "ScoreStage", "SoftmaxStage", "ValueStage", "attention_widths", "scratch_lane", "scratch_write"]

#: The engine's instruction word, read through the layout of KVAPPEND or of ATTN (both begin with the header).
ATTN_COMMAND = data.UnionLayout({"kvappend": LAYOUTS["KVAPPEND"], "attn": LAYOUTS["ATTN"]})

# Constants that numerics.attention_head / exp2_neg_q15 write as bare literals; named here once.
RECIP_BITS = numerics.ATTN_RECIP_BITS
ACC_KEEP_BITS = numerics.ATTN_ACC_BITS
#: Fraction bits of numerics.LOG2E_Q16 (the product ``-d * LOG2E_Q16`` is shifted right by this).
LOG2E_FRAC = 16
#: exp2_neg_q15 returns 0 once the integer part of the exponent reaches this.
EXP2_ZERO_SHIFT = 16
#: Q1.15 rescale of the running sum and accumulator by alpha.
ALPHA_FRAC = 15
DIVIDER_CYCLES = timing.ATTN_DIVIDER_CYCLES
#: Bit widths of the sequencer's counters: element addresses, positions, chunk and head indices.
ELEM_BITS, POS_BITS, CHUNK_BITS, HEAD_BITS = 20, 17, 12, 8
#: p = 2^-x in Q1.15 lies in [0, GATE_ONE] (the table's largest entry is 2^-0 = GATE_ONE).
P_SHAPE = unsigned(numerics.GATE_ONE.bit_length())


def _signed_bits(bound: int) -> int:
    """Bits of a signed value whose magnitude is at most *bound*."""
    return bound.bit_length() + 1


def _exp2_cut() -> int:
    """The smallest power of two C with 2^-x of ``-C`` already 0: ``(C * LOG2E_Q16) >> 16`` reaches
    ``EXP2_ZERO_SHIFT << SCORE_FRAC``, and exp2_neg_q15 is monotone, so every ``-d >= C`` gives 0 too."""
    c = 1
    while (c * numerics.LOG2E_Q16) >> LOG2E_FRAC < EXP2_ZERO_SHIFT << numerics.SCORE_FRAC:
        c <<= 1
    return c


class AttnWidths(NamedTuple):
    """Bits of each quantity of :func:`kvoverlay.numerics.attention_head` on a config (see :func:`attention_widths`)."""

    dot: int  #: signed q.K dot product
    score: int  #: signed score and running max
    diff: int  #: signed score minus running max
    sum: int  #: unsigned running sum l
    acc: int  #: signed accumulator lane
    head: int  #: signed accumulator lane rounded to ACC_KEEP_BITS magnitude bits
    recip: int  #: unsigned reciprocal ``(1 << RECIP_BITS) // l``
    out: int  #: signed output lane (rounded accumulator times reciprocal)


@functools.cache
def attention_widths(config) -> AttnWidths:
    """Datapath widths of the attention engine, from the ranges numerics.attention_head's values take on *config*.

    With D = ``max_head_dim`` and L = ``kv_capacity`` (every ATTN has head_dim <= D and length <= L):

    * mantissas are int16, so a product q_i k_i or p v_i has magnitude <= 2**15 * 2**15 = 2**30, and a dot
      product <= D * 2**30; it is exact (no rounding);
    * a score is saturated at ``ATTN_SCORE_MAX``; a right-shifted score is no larger than its dot product;
      the running max is a score; score - max lies in [-2 * ATTN_SCORE_MAX, 0], so ``-d * LOG2E_Q16`` stays
      below 2**63 and 2^-x never wraps;
    * p lies in [0, GATE_ONE = 2**15]; the rescale ``round_shift(l * alpha, 15)`` with alpha <= 2**15 never
      grows l, so l <= L * 2**15 (at most one p per position);
    * likewise a term ``round_shift(p * v, e_acc - e_v)`` (shift >= 0) has magnitude <= 2**30, the alpha and
      exponent rescales of the accumulator never grow it, so |acc| <= L * 2**30;
    * the position of the running max has p = 2^-0 = GATE_ONE in the tile that set it, and a tile that does not
      raise the max has alpha = GATE_ONE (l unchanged), so l >= 2**15 at every step: the reciprocal is at most
      ``2**(RECIP_BITS - 15)`` and the divide never faults;
    * the accumulator rounded to ACC_KEEP_BITS has magnitude <= 2**ACC_KEEP_BITS (rounding up can reach it),
      so an output lane has magnitude <= 2**(ACC_KEEP_BITS + RECIP_BITS - 15); aligning heads only shifts right.

    tests/test_hw_attention.py checks the bounds at their extremes against numerics.
    """
    D, L = config.max_head_dim, config.kv_capacity
    prod = 1 << 30
    one = numerics.GATE_ONE
    dot = D * prod
    recip = (1 << RECIP_BITS) // one
    head = 1 << ACC_KEEP_BITS
    return AttnWidths(dot=_signed_bits(dot), score=_signed_bits(numerics.ATTN_SCORE_MAX),
                      diff=_signed_bits(2 * numerics.ATTN_SCORE_MAX), sum=(L * one).bit_length(),
                      acc=_signed_bits(L * prod), head=_signed_bits(head), recip=recip.bit_length(),
                      out=_signed_bits(head * recip))


def _round_shift(m, x, s, name, *, rcap=None, lcap=0, halving=True):
    """numerics.round_shift of a value that never wraps int64, exact: right shifts of at least the value's width
    give what numerics gives (0), so they are clamped there; *lcap* bounds a left shift. *halving*: the form that
    decodes no rounding bias from the shift and adds nothing as wide as the value (smaller where the shift spans
    the value's width; HeadFinish's few shift bits map smaller to :func:`hw.normalize.round_shift_expr`)."""
    x = Value.cast(x)
    rcap = len(x) if rcap is None else rcap
    if halving and not x.shape().signed:
        # round_shift_halving reads its value's top bit as the sign (as hw.vector_unit's callers do, a zero bit
        # above an unsigned value): Exp2Neg's table value reaches GATE_ONE, the top bit of its unsigned 16
        x = Cat(x, Const(0, 1)).as_signed()
    return (round_shift_halving if halving else round_shift_expr)(m, x, s, rcap, lcap, name)


def _round_fixed(x, s):
    """numerics.round_shift by a constant ``s > 0``: add half, shift right."""
    return (x + (1 << (s - 1))) >> s


def _halving_round_shift(x, rs):
    """numerics.round_shift of *x* by an unsigned *rs* (at most ``len(x) + 1``, where every value gives 0) as
    ``((2x >> rs) + 1) >> 1``: no rounding bias decoded from the shift, only a shifter and an increment."""
    return (Cat(Const(0, 1), x).as_signed() >> rs) + 1 >> 1


def _first_or_max(first, new, old):
    """The running maximum: *new* on the first sample or when larger, else *old*."""
    return Mux(first | (new > old), new, old)


def _issued(m, chunk):
    """The first register stage of a stage: whether *chunk* (an always-ready stream) transferred in the last cycle,
    and its payload, held until the next transfer."""
    valid = Signal(name="issued")
    payload = Signal(chunk.payload.shape(), name="issued_payload")
    m.d.sync += valid.eq(chunk.valid)
    with m.If(chunk.valid):
        m.d.sync += payload.eq(chunk.payload)
    return valid, payload


def _lanes(config):
    return data.ArrayLayout(signed(16), config.vector_lanes)


def scratch_lane(config) -> data.StructLayout:
    """One lane of a head's output in the output scratch memory: the value and its head's exponent."""
    wd = attention_widths(config)
    exp = range(numerics.EXP_MIN - RECIP_BITS, numerics.EXP_MAX + max(wd.acc - ACC_KEEP_BITS, 0) - RECIP_BITS + 1)
    return data.StructLayout({"value": signed(wd.out), "exp": exp})


def scratch_write(config) -> wiring.Signature:
    """Write port of the output scratch memory: one word of R = ``timing.attn_output_lanes(config)``
    :func:`scratch_lane` lanes (what an output pass reads per cycle), ``config.attn_out_words / R`` words."""
    R = timing.attn_output_lanes(config)
    return wiring.Signature({"addr": Out(range(ceil_div(config.attn_out_words, R))),
                             "data": Out(data.ArrayLayout(scratch_lane(config), R)), "en": Out(R)})


class Exp2Neg(wiring.Component):
    """``numerics.exp2_neg_q15``: ``exp(d)`` in Q1.15 of a score difference ``d <= 0``, pipelined.

    ``-d * log2(e)`` splits into an integer part n and a fraction; the fraction interpolates
    ``numerics.EXP2_TABLE`` (a ROM) and the result is shifted right by n, 0 from n = 16 on. Differences
    at or beyond ``-C`` (:func:`_exp2_cut`) all give 0, so only ``-d`` capped at C is multiplied.
    Five register stages (``timing.ATTN_EXP2_LATENCY``), one long operation each: the capped product by
    log2(e); the table look-up (a registered read of the segment's first entry and step); the block RAM's word
    registered; the interpolation; the shift by n. A new ``d`` every cycle.

    Parameters
    ----------
    width : int
        Bits of the signed difference (``d >= -2**(width - 1)``; :func:`attention_widths`' ``diff``).

    Attributes
    ----------
    d : In(signed(width))
    p : Out(P_SHAPE)
        ``exp(d)`` of the ``d`` of ``timing.ATTN_EXP2_LATENCY`` cycles earlier.
    """

    def __init__(self, width: int):
        self.width = width
        super().__init__({"d": In(signed(width)), "p": Out(P_SHAPE)})

    def elaborate(self, platform):
        m = Module()
        table = [int(v) for v in numerics.EXP2_TABLE]
        # one ROM word per segment: its first entry and the step to the next (one read port, one block RAM)
        steps = [hi - lo for lo, hi in itertools.pairwise(table)]
        step_shape = signed(max(abs(v) for v in steps).bit_length() + 1)
        seg_layout = data.StructLayout({"lo": unsigned(16), "step": step_shape})
        m.submodules.rom = rom = Memory(shape=seg_layout, depth=len(steps),
                                        init=[{"lo": lo, "step": st} for lo, st in zip(table, steps)])
        rom_rd = rom.read_port()
        cut = _exp2_cut()
        k = log2_exact(cut)
        neg_d = Signal(range(cut + 1))
        if len(self.d) > k + 1:
            # -d capped at C = 2**k without a negate or a compare as wide as d: -C < d <= 0 is d = 0 or d's bits
            # from k up all ones and its low bits not all zero, and then -d < 2**k is the negated low bits
            d = self.d
            below_cut = (d == 0) | (d[k:].all() & d[:k].any())
            m.d.comb += neg_d.eq(Mux(below_cut, (-d[:k])[:k], cut))
        else:  # -d <= 2**(width - 1) <= C: never capped
            m.d.comb += neg_d.eq(-self.d)
        # stage 1: the product by log2(e)
        t_fix = Signal(((cut * numerics.LOG2E_Q16) >> LOG2E_FRAC).bit_length())
        m.d.sync += t_fix.eq((neg_d * numerics.LOG2E_Q16) >> LOG2E_FRAC)
        t_frac = t_fix[:numerics.SCORE_FRAC]
        seg_shift = numerics._EXP2_SHIFT
        m.d.comb += rom_rd.addr.eq(t_frac[seg_shift:])
        # stage 2: the segment's word (a registered read), with the fraction and the integer part beside it
        frac = Signal(seg_shift)
        t_int_at = Signal(len(t_fix) - numerics.SCORE_FRAC)
        m.d.sync += [frac.eq(t_frac[:seg_shift]), t_int_at.eq(t_fix >> numerics.SCORE_FRAC)]
        # stage 3: the word registered out of the block RAM (its clock-to-out is a third of a 50 MHz cycle)
        seg = Signal(seg_layout)
        frac3 = Signal(seg_shift)
        t_int3 = Signal(len(t_int_at))
        m.d.sync += [seg.eq(rom_rd.data), frac3.eq(frac), t_int3.eq(t_int_at)]
        interp = Signal(signed(32))
        m.d.comb += interp.eq((seg.step * frac3 + (1 << (seg_shift - 1))) >> seg_shift)
        # stage 4: the interpolation
        p_tab = Signal(P_SHAPE)  # the table decreases: interpolation stays within [0, GATE_ONE]
        t_int = Signal(len(t_int_at))
        m.d.sync += [p_tab.eq(seg.lo + interp), t_int.eq(t_int3)]
        # stage 5: the shift by the integer part
        shifted = _round_shift(m, p_tab, t_int, "shifted", rcap=EXP2_ZERO_SHIFT)
        m.d.sync += self.p.eq(Mux(t_int >= EXP2_ZERO_SHIFT, 0, shifted))
        return m


class ScoreStage(wiring.Component):
    """q.K scores of a tile, rounded to ``Q.SCORE_FRAC``, with the tile's largest score and value exponent.

    A pipeline, one chunk per cycle, relative to the chunk's issue at cycle t: at t+1 its q lanes and K lanes
    arrive and are multiplied; at t+2 the ``vector_lanes`` products are added to the position's dot product
    (and the score's shift is formed from the exponents); at t+3 the dot product of a position's last chunk is
    round-shifted; at t+4 it is saturated and stored in the register file bank of its tile (two banks: the
    value pass reads one tile while the next one is scored) and the tile's maxima take it.
    ``timing.ATTN_SCORE_LATENCY`` is that last stage.

    Parameters
    ----------
    config : OverlayConfig
        Uses ``vector_lanes`` and ``attn_tile``.

    Attributes
    ----------
    chunk : In(stream.Signature(ScoreStage.chunk_layout(config), always_ready=True))
        One chunk of one position: ``first`` and ``last`` chunk of the position, its ``pos`` in the
        tile, whether it is the tile's last position (``tile_last``), the tile's ``bank`` and the lanes within
        the head (``mask``).
    q, k : In(ArrayLayout(signed(16), vector_lanes))
        The chunk's q and K lanes, the cycle after it is issued.
    ek, ev : In(EXP_SHAPE)
        The position's key and value exponents, the cycle after its chunks are issued.
    e_q : In(EXP_SHAPE)
        The q exponent.
    pending : Out(1)
        A chunk's score is not yet stored (the register file and the tile's maxima are current the cycle
        ``pending`` falls).
    tile_stored : Out(1)
        A tile's last score is stored in this cycle (its maxima are current from the next).
    tile_max : Out(signed(attention_widths(config).score))
    tile_ev_max : Out(EXP_SHAPE)
    read_bank, read_pos : In
        Score register read (combinational) ...
    score : Out(signed(attention_widths(config).score))
        ... its score.
    """

    LATENCY = timing.ATTN_SCORE_LATENCY

    @staticmethod
    def chunk_layout(config):
        return data.StructLayout({"first": 1, "last": 1, "pos": range(config.attn_tile), "tile_last": 1, "bank": 1,
                                  "mask": config.vector_lanes})

    def __init__(self, config):
        self.config = config
        T = config.attn_tile
        wd = attention_widths(config)
        super().__init__({
            "chunk": In(stream.Signature(self.chunk_layout(config), always_ready=True)),
            "q": In(_lanes(config)), "k": In(_lanes(config)),
            "ek": In(EXP_SHAPE), "ev": In(EXP_SHAPE), "e_q": In(EXP_SHAPE),
            "pending": Out(1), "tile_stored": Out(1),
            "tile_max": Out(signed(wd.score)), "tile_ev_max": Out(EXP_SHAPE),
            "read_bank": In(1), "read_pos": In(range(T)), "score": Out(signed(wd.score)),
        })

    def elaborate(self, platform):
        m = Module()
        V, T = self.config.vector_lanes, self.config.attn_tile
        wd = attention_widths(self.config)
        flow = data.StructLayout({"chunk": self.chunk_layout(self.config), "shift": signed(16),
                                  "ev": EXP_SHAPE})
        # t+1: the products
        valid1, c1 = _issued(m, self.chunk)
        valid2, at2 = Signal(), Signal(flow)
        m.d.sync += [valid2.eq(valid1), at2.chunk.eq(c1), at2.ev.eq(self.ev),
                     at2.shift.eq(-(self.e_q + self.ek + numerics.SCORE_FRAC))]
        products = []
        for i in range(V):
            prod = Signal(signed(32), name=f"qk_prod{i}")
            m.d.sync += prod.eq(Mux(c1.mask[i], self.q[i] * self.k[i], 0))
            products.append(prod)
        # t+2: the dot product
        dot_sum = Signal(signed(32 + log2_exact(V) + 1))
        m.d.comb += dot_sum.eq(sum(products))
        dot = Signal(signed(wd.dot))
        dot_next = Signal(signed(wd.dot))
        m.d.comb += dot_next.eq(Mux(at2.chunk.first, 0, dot) + dot_sum)
        valid3, at3, dot3 = Signal(), Signal(flow), Signal(signed(wd.dot))
        m.d.sync += [valid3.eq(valid2 & at2.chunk.last), at3.eq(at2)]
        with m.If(valid2):
            m.d.sync += [dot.eq(dot_next), dot3.eq(dot_next)]
        # t+3: the rounding. numerics.attention_scores: exact, then saturated; a left shift past
        # ATTN_SCORE_BITS saturates any nonzero dot product, so the shift is clamped one beyond it
        exact = _round_shift(m, dot3, at3.shift, "score_exact", lcap=numerics.ATTN_SCORE_BITS + 1)
        valid4, at4, exact4 = Signal(), Signal(flow), Signal.like(exact, name="score_exact4")
        m.d.sync += [valid4.eq(valid3), at4.eq(at3), exact4.eq(exact)]
        m.d.comb += [self.pending.eq(valid1 | valid2 | valid3), self.tile_stored.eq(valid4 & at4.chunk.tile_last)]
        # t+4: saturation into the register file and the tile's maxima
        score = Signal(signed(wd.score))
        top = numerics.ATTN_SCORE_MAX
        m.d.comb += score.eq(Mux(exact4 > top, top, Mux(exact4 < -top, -top, exact4)))
        # the two banks of scores in LUT RAM: written once per position, read combinationally by the value pass
        m.submodules.scores = scores = Memory(shape=signed(wd.score), depth=2 * T, init=[])
        wr = scores.write_port()
        rd = scores.read_port(domain="comb")
        pos4 = at4.chunk.pos
        m.d.comb += [wr.addr.eq(Cat(pos4, at4.chunk.bank)), wr.data.eq(score), wr.en.eq(valid4),
                     rd.addr.eq(Cat(self.read_pos, self.read_bank)), self.score.eq(rd.data)]
        with m.If(valid4):
            m.d.sync += [self.tile_max.eq(_first_or_max(pos4 == 0, score, self.tile_max)),
                         self.tile_ev_max.eq(_first_or_max(pos4 == 0, at4.ev, self.tile_ev_max))]
        return m


class SoftmaxStage(wiring.Component):
    """The online softmax: running max ``m`` and sum ``l``, and p = 2^-x of every score.

    In the ``step`` between a tile's scores and its values, the new max gives alpha =
    ``exp(m_old - m_new)`` and the accumulator exponent moves to the largest value exponent so far;
    alpha comes out of the 2^-x pipeline ``P_LATENCY`` = ``timing.ATTN_P_LATENCY`` cycles later, and
    the sum is rescaled by it then. In the value pass ``p = exp(score - m)`` of the position whose
    value chunk is issued comes out ``P_LATENCY`` cycles after the issue (the difference is registered,
    then :class:`Exp2Neg`'s four stages); ``add_p`` adds it to the sum once per position.

    Parameters
    ----------
    config : OverlayConfig
        Sizes the datapath (:func:`attention_widths`).

    Attributes
    ----------
    step, first_tile : In(1)
        The max/rescale step; it is the head's first tile (no old max, sum or accumulator).
    tile_max : In(signed(score bits))
    tile_ev_max : In(EXP_SHAPE)
        Of the tile the step is for.
    score : In(signed(score bits))
        Score of the position whose value chunk is issued.
    add_p : In(1)
        ``p`` joins the running sum.
    p : Out(P_SHAPE)
        ``exp(score - m)`` in Q1.15 of the score of ``P_LATENCY`` cycles earlier.
    alpha : Out(P_SHAPE)
        ``exp(m_old - m_new)`` of the last step, from ``P_LATENCY + 1`` cycles after it.
    m : Out(signed(score bits))
    l : Out(unsigned(sum bits))
        Running max (Q.SCORE_FRAC) and sum (Q1.15).
    e_acc, rescale_shift : Out(EXP_WIDE)
        Exponent of the accumulator, and by how much it grew in the last step.
    """

    P_LATENCY = timing.ATTN_P_LATENCY

    def __init__(self, config):
        self.config = config
        wd = attention_widths(config)
        super().__init__({
            "step": In(1), "first_tile": In(1), "tile_max": In(signed(wd.score)), "tile_ev_max": In(EXP_SHAPE),
            "score": In(signed(wd.score)), "add_p": In(1),
            "p": Out(P_SHAPE), "alpha": Out(P_SHAPE), "m": Out(signed(wd.score)), "l": Out(unsigned(wd.sum)),
            "e_acc": Out(EXP_WIDE), "rescale_shift": Out(EXP_WIDE),
        })

    def elaborate(self, platform):
        m = Module()
        wd = attention_widths(self.config)
        m_run, l_run, e_acc = self.m, self.l, self.e_acc
        e_acc_old = Signal(EXP_WIDE)
        m_new = Signal(signed(wd.score))
        m.d.comb += [m_new.eq(_first_or_max(self.first_tile, self.tile_max, m_run)),
                     self.rescale_shift.eq(e_acc - e_acc_old)]
        m.submodules.exp2 = exp2 = Exp2Neg(wd.diff)
        # the score memory's read and the subtraction get a cycle of their own, before the 2^-x pipeline
        diff = Signal(signed(wd.diff))
        m.d.sync += diff.eq(Mux(self.step, m_run - m_new, self.score - m_run))
        m.d.comb += [exp2.d.eq(diff), self.p.eq(exp2.p)]
        # the step's (is it, head's first tile) travel beside its difference to meet alpha
        step_at = [Signal(2, name=f"step_{i}") for i in range(self.P_LATENCY)]
        m.d.sync += [step_at[0].eq(Cat(self.step, self.first_tile)),
                     *(b.eq(a) for a, b in itertools.pairwise(step_at))]
        alpha_step, alpha_first = step_at[-1][0], step_at[-1][1]
        l_rescaled = _round_fixed(l_run * exp2.p, ALPHA_FRAC)  # alpha <= 1: never above l
        with m.If(self.step):
            m.d.sync += [m_run.eq(m_new), e_acc_old.eq(e_acc),
                         e_acc.eq(_first_or_max(self.first_tile, self.tile_ev_max, e_acc))]
        with m.If(alpha_step):
            m.d.sync += [self.alpha.eq(exp2.p), l_run.eq(Mux(alpha_first, 0, l_rescaled))]
        with m.Elif(self.add_p):
            m.d.sync += l_run.eq(l_run + self.p)
        return m


class ValueStage(wiring.Component):
    """The head accumulator: ``row_chunks`` words of ``vector_lanes`` lanes in LUT RAM.

    ``round_shift(p * v, e_acc - e_v)`` of each chunk is added to the chunk's word; on the tile's first
    position the word is first rescaled by alpha and by the growth of the accumulator exponent (or zeroed
    on the head's first tile). A pipeline, one chunk per cycle, relative to the chunk's issue at cycle t:

    * t+1: V lanes and value exponent arrive; with the tile's ``e_acc``, ``rescale_shift`` and ``first_tile``
      they wait for p (a delay line of ``P_LATENCY - 1`` registers);
    * t+P (``P_LATENCY``): ``p * v`` per lane; ``add_p``; the word's old value is read for the rescale;
    * t+P+1: the term's round-shift; ``old * alpha``;
    * t+P+2: its rounding;
    * t+P+3: its exponent round-shift;
    * t+P+4: the word updated (read, add, write in one cycle: consecutive chunks of one word need no bypass);
    * t+P+5: ``peak``.

    The old value read at t+P is the word's value at the tile's start because the sequencer leaves at
    least ``timing.ATTN_TILE_DRAIN`` + 1 cycles between a tile's last issue and the next one's first (the drain
    and the step): a word's last write at t+P+4 is read by a position at least that much later, which for
    one-chunk positions is the next one. Alpha, set ``P_LATENCY + 1`` cycles after the step, is read at t+P+1.

    Parameters
    ----------
    config : OverlayConfig
        Uses ``vector_lanes``, ``attn_tile`` and the KV-buffer geometry.

    Attributes
    ----------
    chunk : In(stream.Signature(ValueStage.chunk_layout(config), always_ready=True))
        One chunk of one position: the tile's ``first_pos``, the position's ``first`` chunk, the
        chunk ``index``, the position's ``pos`` and ``bank`` (which score p comes from), ``mask``.
    score_pos, score_bank : Out
        The score the issued chunk needs p of (its p arrives ``P_LATENCY`` cycles later).
    add_p : Out(1)
        The p that arrives is new to the running sum (the position's first chunk).
    p : In(P_SHAPE)
        Its p.
    v : In(ArrayLayout(signed(16), vector_lanes))
    ev : In(EXP_SHAPE)
        The chunk's V lanes and value exponent, the cycle after it is issued.
    alpha : In(P_SHAPE)
    e_acc, rescale_shift : In(EXP_WIDE)
    first_tile : In(1)
        From the softmax stage.
    issued : Out(1)
        A chunk was issued in the last ``timing.ATTN_TILE_DRAIN - 1`` cycles.
    busy : Out(1)
        A chunk has not yet been added to its word (``peak`` follows a cycle after the last add).
    read_index : In(range(row_chunks))
    word : Out(ArrayLayout(signed(acc bits), vector_lanes))
        An accumulator word, read the cycle after its index (:class:`HeadFinish`'s read, while no chunk is in flight).
    peak : Out(acc bits)
        The OR of the magnitudes the last position wrote: every position writes every word once, so after a
        head's last position it is the OR of all its accumulator lanes (V magnitudes a cycle, not all lanes at once).
    """

    P_LATENCY = timing.ATTN_P_LATENCY

    @staticmethod
    def chunk_layout(config):
        return data.StructLayout({"first_pos": 1, "first": 1, "index": address_bits(kv_geometry(config)["row_chunks"]),
                                  "pos": range(config.attn_tile), "bank": 1, "mask": config.vector_lanes})

    def __init__(self, config):
        self.config = config
        chunks = kv_geometry(config)["row_chunks"]
        wd = attention_widths(config)
        super().__init__({
            "chunk": In(stream.Signature(self.chunk_layout(config), always_ready=True)),
            "score_pos": Out(range(config.attn_tile)), "score_bank": Out(1), "add_p": Out(1),
            "p": In(P_SHAPE), "v": In(_lanes(config)), "ev": In(EXP_SHAPE),
            "alpha": In(P_SHAPE), "e_acc": In(EXP_WIDE), "rescale_shift": In(EXP_WIDE), "first_tile": In(1),
            "issued": Out(1), "busy": Out(1),
            "read_index": In(range(chunks)), "word": Out(data.ArrayLayout(signed(wd.acc), config.vector_lanes)),
            "peak": Out(wd.acc),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        V = cfg.vector_lanes
        W = attention_widths(cfg).acc
        chunks = kv_geometry(cfg)["row_chunks"]
        valid1, c1 = _issued(m, self.chunk)
        m.d.comb += [self.score_pos.eq(self.chunk.payload.pos), self.score_bank.eq(self.chunk.payload.bank)]
        # the chunk and what it needs of the tile, captured while they are the tile's, carried to the end
        flow = data.StructLayout({"chunk": self.chunk_layout(cfg), "v": _lanes(cfg), "v_shift": EXP_WIDE,
                                  "rescale_rs": range(W + 2), "first_tile": 1})
        at1 = Signal(flow)
        # e_acc is the largest value exponent so far
        m.d.comb += [at1.chunk.eq(c1), at1.v.eq(self.v), at1.v_shift.eq(self.e_acc - self.ev),
                     # the exponent's growth (never negative), clamped where the round-shift gives 0 already
                     at1.rescale_rs.eq(Mux(self.rescale_shift > W + 1, W + 1, self.rescale_shift)),
                     at1.first_tile.eq(self.first_tile)]
        valids, flows = [valid1], [at1]
        for i in range(self.P_LATENCY + 3):  # to the add (the word's update) at t+P+4
            vld, f = Signal(name=f"v_valid{i + 2}"), Signal(flow, name=f"v_flow{i + 2}")
            m.d.sync += [vld.eq(valids[-1]), f.eq(flows[-1])]
            valids.append(vld)
            flows.append(f)
        m.d.comb += [self.busy.eq(functools.reduce(operator.or_, valids)),
                     self.issued.eq(functools.reduce(operator.or_, valids[:timing.ATTN_TILE_DRAIN - 1]))]
        at_p, at_term, at_round, at_add = (flows[self.P_LATENCY - 1 + k] for k in (0, 1, 3, 4))
        valid_p, valid_add = valids[self.P_LATENCY - 1], valids[self.P_LATENCY + 3]
        m.d.comb += self.add_p.eq(valid_p & at_p.chunk.first)

        # the words in LUT RAM (no multiplexers or flip-flops of their own), two read ports. No clear: a head's first
        # position writes every word the head reads (its rescale gives 0 on the first tile, masked lanes add 0)
        m.submodules.words = words = Memory(shape=unsigned(W * V), depth=chunks, init=[])
        cur_rd, old_rd, wr = words.read_port(domain="comb"), words.read_port(domain="comb"), words.write_port()
        cur_word = cur_rd.data
        # the word at the tile's start, for its first position's rescale; between heads (no chunk in flight) the
        # word HeadFinish reads, through the same port
        old_word = Signal(W * V)
        m.d.comb += [cur_rd.addr.eq(at_add.chunk.index), old_rd.addr.eq(Mux(valid_p, at_p.chunk.index, self.read_index)),
                     self.word.eq(old_word)]
        m.d.sync += old_word.eq(old_rd.data)
        new_lanes = []
        for i in range(V):
            prod = Signal(signed(32), name=f"pv_prod{i}")
            m.d.sync += prod.eq(self.p * at_p.v[i])
            term = Signal(signed(W), name=f"pv_term{i}")  # |p * v| <= 2**30, shifted right
            m.d.sync += term.eq(_round_shift(m, prod, at_term.v_shift, f"pv_round{i}"))
            term_r = Signal(signed(W), name=f"pv_term_r{i}")
            term_a = Signal(signed(W), name=f"pv_term_a{i}")
            m.d.sync += [term_r.eq(term), term_a.eq(term_r)]
            alpha_prod = Signal(signed(W + P_SHAPE.width + 1), name=f"acc_alpha_prod{i}")
            m.d.sync += alpha_prod.eq(old_word.word_select(i, W).as_signed() * self.alpha)
            alpha_scaled = Signal(signed(W), name=f"acc_alpha{i}")  # alpha <= 1: never above |old|
            m.d.sync += alpha_scaled.eq(_round_fixed(alpha_prod, ALPHA_FRAC))
            rescaled = Signal(signed(W), name=f"acc_rescaled{i}")
            m.d.sync += rescaled.eq(Mux(at_round.first_tile, 0,
                                        _halving_round_shift(alpha_scaled, at_round.rescale_rs)))
            old = cur_word.word_select(i, W).as_signed()
            new = Signal(signed(W), name=f"acc_new{i}")
            m.d.comb += new.eq(Mux(at_add.chunk.first_pos, rescaled, old) + Mux(at_add.chunk.mask[i], term_a, 0))
            new_lanes.append(new)
        # the peak a cycle after the add, from the lanes as written
        written = Signal(W * V)
        peak_first, peak_valid = Signal(), Signal()
        m.d.sync += [written.eq(Cat(new_lanes)), peak_first.eq(at_add.chunk.first), peak_valid.eq(valid_add)]
        new_or = functools.reduce(operator.or_, (Mux(x < 0, -x, x)[:W] for x in
                                                 (written.word_select(i, W).as_signed() for i in range(V))))
        with m.If(peak_valid):
            m.d.sync += self.peak.eq(Mux(peak_first, 0, self.peak) | new_or)
        m.d.comb += [wr.addr.eq(at_add.chunk.index), wr.data.eq(Cat(new_lanes)), wr.en.eq(valid_add)]
        return m


class HeadFinish(wiring.Component):
    """The end of one head, while the sequencer streams the next head's first scores.

    The statistics (m, l) go to the accumulator buffer; a restoring divider computes
    ``(1 << RECIP_BITS) // l`` one quotient bit per cycle (only the ``recip`` bits of
    :func:`attention_widths`: l >= GATE_ONE, the leading ones are zero) while the accumulator's peak gives the
    shift that keeps ``ACC_KEEP_BITS`` magnitude bits; then the head's outputs (its accumulator
    lanes rounded and multiplied by the reciprocal) go with the head exponent into the output
    scratch, one element per cycle through one multiplier (a lane select and rounding stage, a
    multiply stage, the write): ``timing.ATTN_FINISH_PIPELINE`` cycles after the last element.

    Parameters
    ----------
    config : OverlayConfig
        Uses ``vector_lanes``, ``acc_buffer_words``, ``act_buffer_words`` and the KV-buffer geometry.

    Attributes
    ----------
    start : In(1)
        The head's values are all in; the accumulator, ``m``, ``l`` and ``e_acc`` hold until ``busy`` falls.
    head : In(HEAD_BITS)
    out_first : In(ELEM_BITS)
        The head's index and first output element (``head * head_dim``), taken with ``start``.
    head_dim : In(11)
    stats : In(acc-buffer address)
        Geometry of the instruction: statistics of head h go to ``stats + 2h`` and ``stats + 2h + 1``.
    word_index : Out(range(row_chunks))
    word : In(ArrayLayout(signed(acc bits), vector_lanes))
        The accumulator word of the element issued in the next cycle, and that word (:class:`ValueStage`'s
        registered read: one word multiplexer for the rescale and the finish).
    peak : In(acc bits)
        The OR of the accumulator lanes' magnitudes (:class:`ValueStage`'s).
    m : In(signed(score bits))
    l : In(unsigned(sum bits))
    e_acc : In(EXP_WIDE)
        The head's accumulator, running max and sum, accumulator exponent.
    busy : Out(1)
    divide_fault : Out(1)
        Pulses when the sum is not positive (the head ends there; :func:`attention_widths` shows it cannot be).
    top_exp : Out(EXP_WIDE)
        The largest head exponent of the instruction so far.
    acc_w : Out(acc_write(config))
    scratch : Out(scratch_write(config))
    """

    def __init__(self, config):
        self.config = config
        chunks = kv_geometry(config)["row_chunks"]
        wd = attention_widths(config)
        super().__init__({
            "start": In(1), "head": In(HEAD_BITS), "out_first": In(ELEM_BITS), "head_dim": In(11),
            "stats": In(range(config.acc_buffer_words)),
            "word_index": Out(range(chunks)), "word": In(data.ArrayLayout(signed(wd.acc), config.vector_lanes)),
            "peak": In(wd.acc),
            "m": In(signed(wd.score)), "l": In(unsigned(wd.sum)), "e_acc": In(EXP_WIDE),
            "busy": Out(1), "divide_fault": Out(1), "top_exp": Out(EXP_WIDE),
            "acc_w": Out(acc_write(config)), "scratch": Out(scratch_write(config)),
        })

    def elaborate(self, platform):
        m = Module()
        V = self.config.vector_lanes
        wd = attention_widths(self.config)
        lanes = kv_geometry(self.config)["row_chunks"] * V
        acc_bits = bit_length(m, self.peak, "acc_bits")
        head_shift = Signal(range(max(wd.acc - ACC_KEEP_BITS, 0) + 1))
        head_exp = Signal(EXP_WIDE)
        m.d.comb += head_exp.eq(self.e_acc + head_shift - RECIP_BITS)
        assert DIVIDER_CYCLES == wd.recip
        remainder = Signal(wd.sum)  # below l
        quotient = Signal(wd.recip)
        div_cnt = Signal(range(DIVIDER_CYCLES))
        rem_shifted = Signal(wd.sum + 1)
        m.d.comb += rem_shifted.eq(remainder << 1)  # the numerator's bits below the quotient's are all zero
        head = Signal(HEAD_BITS)
        out_first = Signal(ELEM_BITS)

        # one element per cycle: select and round (stage 1), multiply (stage 2), write
        elem = Signal(range(lanes + 1))
        issue = Signal()
        rounded = Signal(signed(wd.head))
        at1 = Signal(ELEM_BITS)
        valid1 = Signal()
        product = Signal(signed(wd.out))
        at2 = Signal(ELEM_BITS)
        valid2 = Signal()
        # the word of the element issued in the next cycle is read now (ValueStage's registered read): the first in
        # DIVIDE's last cycle, then one ahead of the issue
        lgV = log2_exact(V)
        lane = Array(self.word[i] for i in range(V))[elem[:lgV]] if lgV else self.word[0]
        m.d.sync += [valid1.eq(issue), valid2.eq(valid1), product.eq(rounded * quotient), at2.eq(at1)]
        with m.If(issue):
            m.d.sync += [rounded.eq(_round_shift(m, lane, head_shift, "head_acc", halving=False)), at1.eq(out_first + elem)]
        lgR = log2_exact(timing.attn_output_lanes(self.config))
        for i in range(1 << lgR):
            m.d.comb += [self.scratch.data[i].value.eq(product), self.scratch.data[i].exp.eq(head_exp)]
        m.d.comb += [self.scratch.addr.eq(at2 >> lgR),
                     self.scratch.en.eq(Mux(valid2, 1 << (at2[:lgR] if lgR else 0), 0))]

        def write_stat(offset, value):
            m.d.comb += [self.acc_w.addr.eq(self.stats + 2 * head + offset), self.acc_w.data.eq(value),
                         self.acc_w.en.eq(1)]

        with m.FSM(name="head_finish_fsm") as fsm:
            with m.State("IDLE"):  # noqa: SIM117 - Amaranth control blocks
                with m.If(self.start):
                    m.d.sync += [head.eq(self.head), out_first.eq(self.out_first)]
                    m.next = "STATS"
            with m.State("STATS"):
                # the remainder after the numerator's leading bits, whose quotient bits are zero: 2**14 < l
                m.d.sync += [head_shift.eq(Mux(acc_bits > ACC_KEEP_BITS, acc_bits - ACC_KEEP_BITS, 0)),
                             remainder.eq((1 << RECIP_BITS) >> wd.recip), quotient.eq(0),
                             div_cnt.eq(DIVIDER_CYCLES - 1)]
                write_stat(0, self.m)
                with m.If(self.l == 0):
                    m.d.comb += self.divide_fault.eq(1)
                    m.next = "IDLE"
                with m.Else():
                    m.next = "DIVIDE"
            with m.State("DIVIDE"):
                with m.If(div_cnt == DIVIDER_CYCLES - 1):
                    write_stat(1, self.l)
                with m.If(rem_shifted >= self.l):
                    m.d.sync += [remainder.eq(rem_shifted - self.l), quotient.eq(Cat(1, quotient))]
                with m.Else():
                    m.d.sync += [remainder.eq(rem_shifted), quotient.eq(Cat(0, quotient))]
                m.d.sync += div_cnt.eq(div_cnt - 1)
                with m.If(div_cnt == 0):
                    m.d.sync += [elem.eq(0), self.top_exp.eq(_first_or_max(head == 0, head_exp, self.top_exp))]
                    m.next = "OUTPUT"
            with m.State("OUTPUT"):
                m.d.comb += [issue.eq(1), self.word_index.eq((elem + 1) >> lgV)]
                m.d.sync += elem.eq(elem + 1)
                with m.If(elem == self.head_dim - 1):
                    m.next = "MULTIPLY"
            with m.State("MULTIPLY"):
                m.next = "WRITE"
            with m.State("WRITE"):
                m.next = "IDLE"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        return m


class OutputStage(wiring.Component):
    """All heads into one bfp16 vector: each scratch lane aligned to the largest head exponent, then
    the :class:`~hw.normalize.Normalizer`'s peak pass and write pass over the scratch, R =
    ``timing.attn_output_lanes(config)`` elements (a slot, a part of a scratch word) per cycle.

    A pipeline, relative to a slot's read at cycle t: the scratch word at t+1, the slot's lanes at t+2 (where
    they are aligned), the normalizer's sample or round-shift at t+3, its clip at t+4, the write to the
    activation buffer at t+5. The normalizer is ``registered``: its exponent is current two cycles after the
    last sample.

    Parameters
    ----------
    config : OverlayConfig
        Uses ``vector_lanes``, ``port_bytes`` and ``act_buffer_words``.

    Attributes
    ----------
    scratch : In(scratch_write(config))
        The heads' outputs, from :class:`HeadFinish`.
    read : In(stream.Signature(OutputStage.READ_LAYOUT, always_ready=True))
        One ``slot`` (elements ``R * slot ...``) per cycle: in the peak pass (``write`` low) or the write pass.
    clear : In(1)
        Before the peak pass.
    top_exp : In(EXP_WIDE)
    n_out : In(ELEM_BITS)
        Elements of the vector (``q_heads * head_dim``).
    dst : In(ELEM_BITS)
        Its first element (aligned to an activation-buffer word).
    abuf_w : Out(abuf_write(config))
    exp : Out(EXP_SHAPE)
    overflow : Out(1)
        The vector's exponent after the peak pass (valid until the next ``clear``).
    pending : Out(1)
        A slot has not reached the normalizer: the peak is final the cycle ``pending`` falls
        (``timing.ATTN_OUTPUT_PEAK_DRAIN`` cycles after the pass's last slot) ...
    writing : Out(1)
        ... and the write pass's last write is done the cycle after ``pending`` and ``writing`` are both low
        (``timing.ATTN_OUTPUT_WRITE_DRAIN``).
    """

    READ_LAYOUT = data.StructLayout({"slot": ELEM_BITS, "write": 1})

    def __init__(self, config):
        self.config = config
        super().__init__({
            "scratch": In(scratch_write(config)),
            "read": In(stream.Signature(self.READ_LAYOUT, always_ready=True)),
            "clear": In(1), "top_exp": In(EXP_WIDE), "n_out": In(ELEM_BITS), "dst": In(ELEM_BITS),
            "abuf_w": Out(abuf_write(config)), "exp": Out(EXP_SHAPE), "overflow": Out(1),
            "pending": Out(1), "writing": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        R = timing.attn_output_lanes(cfg)
        lgR = log2_exact(R)
        lgAL = log2_exact(abuf_lanes(cfg))
        lane_layout = scratch_lane(cfg)
        lane_bits = lane_layout.size
        # a word is a slot: sized by what one ATTN writes (config.attn_out_words), not by the activation buffer
        m.submodules.scratch = scratch = Memory(shape=unsigned(lane_bits * R), depth=ceil_div(cfg.attn_out_words, R),
                                                init=[])
        scr_w = scratch.write_port(granularity=lane_bits)
        scr_r = scratch.read_port()
        m.d.comb += [scr_w.addr.eq(self.scratch.addr), scr_w.data.eq(self.scratch.data), scr_w.en.eq(self.scratch.en),
                     scr_r.addr.eq(self.read.payload.slot)]
        # t+1: the slot's word out of the scratch
        valid1, r1 = _issued(m, self.read)
        valid2, r2 = Signal(), Signal(self.READ_LAYOUT)
        lanes2 = Signal(data.ArrayLayout(lane_layout, R))
        m.d.sync += [valid2.eq(valid1), r2.eq(r1), lanes2.eq(scr_r.data)]
        # t+2: each lane aligned to the largest head exponent
        # bounded: the write pass rounds the values the peak pass sampled (lanes past the vector are not written)
        m.submodules.normalizer = norm = Normalizer(attention_widths(cfg).out, R, bounded=True, registered=True)
        valid3, r3 = Signal(), Signal(self.READ_LAYOUT)
        wide3 = Signal(data.ArrayLayout(signed(attention_widths(cfg).out), R), name="wide3")
        in_vector = Signal(R)
        m.d.sync += [valid3.eq(valid2), r3.eq(r2)]
        for i in range(R):
            lane = lanes2[i]
            m.d.sync += [wide3[i].eq(_round_shift(m, lane.value, self.top_exp - lane.exp, f"wide{i}")),
                         in_vector[i].eq(((r2.slot << lgR) + i) < self.n_out)]
        m.d.comb += self.pending.eq(valid1 | valid2 | valid3)  # the last sample's exponent is registered after it
        # t+3: the normalizer samples (peak pass) or round-shifts (write pass)
        m.d.comb += [norm.wide.eq(wide3), norm.valid.eq(in_vector),
                     norm.exp_in.eq(self.top_exp), norm.clear.eq(self.clear), norm.sample.eq(valid3 & ~r3.write),
                     self.exp.eq(norm.exp_out), self.overflow.eq(norm.overflow)]
        # t+4: the mantissas clipped (the normalizer's register between round-shift and clip)
        valid4, r4, in_vector4 = Signal(), Signal(self.READ_LAYOUT), Signal(R)
        m.d.sync += [valid4.eq(valid3 & r3.write), r4.eq(r3), in_vector4.eq(in_vector)]
        out_elem = Signal(ELEM_BITS)
        m.d.comb += out_elem.eq(self.dst + (r4.slot << lgR))
        out_lane = out_elem[:lgAL] if lgAL else Const(0, 1)
        # t+5: the write, from registers
        m.d.sync += [
            self.abuf_w.addr.eq(out_elem >> lgAL),
            # every slot of the word carries the mantissas and the lane enables pick the slot: no shifter
            self.abuf_w.data.eq(norm.mant.as_value().replicate(abuf_lanes(cfg) // R)),
            self.abuf_w.en.eq(Mux(valid4, shift_left(m, in_vector4, out_lane, abuf_lanes(cfg), name="out_enables"), 0)),
        ]
        m.d.comb += self.writing.eq(valid4)
        return m


class AttnDecoder(wiring.Component):
    """The operand fields of the latched KVAPPEND or ATTN, and its set-up fault, in a short pipeline.

    The fields are registered the cycle after ``start`` and ``fault`` is valid, from registers, in the cycle
    ``done`` is high, ``timing.ATTN_DECODE_CYCLES - 1`` cycles after ``start`` (``insn`` and ``reg`` hold still
    from ``start`` on). One long operation per stage, where one combinational decode ran at 32 MHz on the 85F:

    * c0 (``start``): the fields (each a multiplexer between the two layouts) and ``pos_or_len`` registered;
    * c1: the products (``span`` and the heads' last column) and the compares on the fields;
    * c2: the buffer-range compares on the products;
    * c0-c3: ``q_heads % kv_heads`` by a restoring remainder, :data:`DIV_STEPS` quotient bits per cycle;
    * c4 (``done``): the fault, by priority, from the registered predicates.

    Parameters
    ----------
    config : OverlayConfig
        Uses the KV-buffer geometry, ``kv_capacity``, ``act_buffer_words``, ``acc_buffer_words`` and ``port_bytes``.

    Attributes
    ----------
    insn : In(ATTN_COMMAND)
    reg : In(32)
        The value of the register ``reg_addr`` names.
    start : In(1)
        The decode's first cycle.
    is_attn, is_kvappend : Out(1)
        Of ``insn``, combinational.
    kv_base, head_dim, kv_heads : Out
        Fields both instructions have (``kv_heads``: KVAPPEND's ``heads``), registered.
    kv_cols : Out
        KV-pool columns per head, ``ceil(head_dim / vector_lanes)``: the chunks of a head, registered ...
    chunk_last, tail_mask : Out
        ... the last chunk's index and its lanes within the head, from c2 on.
    reg_addr : Out(range(isa.NUM_REGS))
        ATTN's length register or KVAPPEND's position register (combinational) ...
    pos_or_len : Out(signed(34))
        ... plus the immediate, registered.
    ereg_addr0, ereg_addr1 : Out(range(isa.NUM_EREGS))
        q (ATTN) or k (KVAPPEND) exponent, and v (KVAPPEND) exponent (combinational).
    span : Out(ELEM_BITS)
        Elements of all heads: ``q_heads * head_dim`` (ATTN) or ``heads * head_dim`` (KVAPPEND), from c2 on.
    done : Out(1)
    fault : Out(Fault)
        Why the instruction cannot run (``NONE``: it runs), valid with ``done``; a fault here changes no state.
    """

    #: Quotient bits of ``q_heads % kv_heads`` per cycle (a compare and subtract of 9 bits each).
    DIV_STEPS = ceil_div(HEAD_BITS, timing.ATTN_DECODE_CYCLES - 1)

    def __init__(self, config):
        self.config = config
        super().__init__({
            "insn": In(ATTN_COMMAND), "reg": In(32), "start": In(1),
            "is_attn": Out(1), "is_kvappend": Out(1),
            "kv_base": Out(KV_BASE_BITS), "head_dim": Out(11), "kv_heads": Out(HEAD_BITS),
            "kv_cols": Out(CHUNK_BITS), "chunk_last": Out(CHUNK_BITS), "tail_mask": Out(config.vector_lanes),
            "reg_addr": Out(range(isa.NUM_REGS)), "pos_or_len": Out(signed(34)),
            "ereg_addr0": Out(range(isa.NUM_EREGS)), "ereg_addr1": Out(range(isa.NUM_EREGS)),
            "span": Out(ELEM_BITS), "done": Out(1), "fault": Out(Fault),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        lgAL = log2_exact(abuf_lanes(cfg))
        lgV = log2_exact(cfg.vector_lanes)
        kva, att = self.insn.kvappend, self.insn.attn
        is_attn, kv_base, head_dim, kv_heads, pos_or_len = (self.is_attn, self.kv_base, self.head_dim, self.kv_heads,
                                                          self.pos_or_len)
        q_heads = att.q_heads
        D = timing.ATTN_DECODE_CYCLES
        stage = [self.start, *(Signal(name=f"dec_c{i}") for i in range(1, D))]
        m.d.sync += [b.eq(a) for a, b in itertools.pairwise(stage)]
        m.d.comb += [
            is_attn.eq(att.opcode == isa.BY_NAME["ATTN"].code),
            self.is_kvappend.eq(att.opcode == isa.BY_NAME["KVAPPEND"].code),
            self.reg_addr.eq(Mux(is_attn, att.len_reg, kva.pos_reg)),
            self.ereg_addr0.eq(Mux(is_attn, att.q_e, kva.k_e)),
            self.ereg_addr1.eq(kva.v_e),
            self.done.eq(stage[-1]),
        ]
        # c0: the fields
        head_dim_in = Mux(is_attn, att.head_dim, kva.head_dim)
        kv_heads_in = Mux(is_attn, att.kv_heads, kva.heads)
        with m.If(stage[0]):
            m.d.sync += [
                kv_base.eq(Mux(is_attn, att.kv_base, kva.kv_base)), head_dim.eq(head_dim_in), kv_heads.eq(kv_heads_in),
                pos_or_len.eq(self.reg.as_signed() + Mux(is_attn, att.len_imm, kva.pos_imm)),
                # the KV pool's one fit predicate (OverlayConfig.holds_kv) uses the heads' columns
                self.kv_cols.eq((head_dim_in + cfg.vector_lanes - 1) >> lgV),
            ]
        # c0-c3: q_heads % kv_heads, DIV_STEPS bits of q_heads per cycle, highest first
        rem = Signal(HEAD_BITS)  # below kv_heads
        dividend = Signal(HEAD_BITS)  # q_heads, the bits still to bring down at the top
        r, dvd = Mux(stage[0], 0, rem), Mux(stage[0], q_heads, dividend)
        divisor = Mux(stage[0], kv_heads_in, kv_heads)
        assert self.DIV_STEPS * (D - 1) == HEAD_BITS, "the remainder brings down every bit of q_heads, no more"
        for _ in range(self.DIV_STEPS):
            r2 = Cat(dvd[-1], r)
            r, dvd = Mux(r2 >= divisor, r2 - divisor, r2)[:HEAD_BITS], (dvd << 1)[:HEAD_BITS]
        with m.If(~stage[-1]):
            m.d.sync += [rem.eq(r), dividend.eq(dvd)]
        # c1: products and compares on the fields
        kv_end = Signal(KV_BASE_BITS + HEAD_BITS + CHUNK_BITS + 1)  # the heads' columns end here
        geometry_simple = Signal()
        kv_range = Signal()  # of the instruction's kind
        attn_shape = Signal()
        unaligned = Signal()
        with m.If(stage[1]):
            # the field's own range is the bound where max_q_heads is its largest value (no constant compare)
            above = (q_heads > cfg.max_q_heads) if cfg.max_q_heads < (1 << len(q_heads)) - 1 else 0
            tail = head_dim[:lgV] if lgV else Const(0, 1)  # lanes of the last chunk, 0 for all
            m.d.sync += [
                self.chunk_last.eq(Mux(self.kv_cols == 0, 0, self.kv_cols - 1)),
                # the last lane is in only when every lane is (its compare with the tail would be constant)
                self.tail_mask.eq(Cat((tail == 0) | (tail > i) if i < cfg.vector_lanes - 1 else tail == 0
                                      for i in range(cfg.vector_lanes))),
                self.span.eq(Mux(is_attn, q_heads, kv_heads) * head_dim),
                kv_end.eq(kv_base + kv_heads * self.kv_cols),
                geometry_simple.eq((kv_heads == 0) | (head_dim == 0) | (head_dim > cfg.max_head_dim)),
                kv_range.eq(Mux(is_attn, (pos_or_len < 1) | (pos_or_len > cfg.kv_capacity),
                                (pos_or_len < 0) | (pos_or_len >= cfg.kv_capacity))),
                attn_shape.eq((q_heads == 0) | above),
                unaligned.eq(att.dst[:lgAL] != 0 if lgAL else 0),
            ]
        # c2: the buffer ranges
        out_of_range = Signal()
        kv_past = Signal()
        with m.If(stage[2]):
            span = self.span
            m.d.sync += [
                kv_past.eq(kv_end > cfg.kv_columns),
                out_of_range.eq(Mux(is_attn,
                                    (att.q + span > cfg.act_buffer_words) | (att.dst + span > cfg.act_buffer_words)
                                    | ((att.stats + 2 * q_heads > cfg.acc_buffer_words)
                                          & (att.stats != isa.ATTN_NO_STATS)),
                                    (kva.k + span > cfg.act_buffer_words) | (kva.v + span > cfg.act_buffer_words))),
            ]
        # c4: the fault, by priority
        geometry_bad = geometry_simple | kv_past
        with m.If(self.is_kvappend):
            m.d.comb += self.fault.eq(Mux(geometry_bad, Fault.SHAPE, Mux(kv_range, Fault.KV_RANGE,
                                      Mux(out_of_range, Fault.OUT_OF_RANGE, Fault.NONE))))
        with m.Elif(is_attn):
            bad = geometry_bad | attn_shape | (rem != 0)
            m.d.comb += self.fault.eq(Mux(bad, Fault.SHAPE, Mux(kv_range, Fault.KV_RANGE,
                                      Mux(out_of_range, Fault.OUT_OF_RANGE,
                                      Mux(unaligned, Fault.UNALIGNED, Fault.NONE)))))
        with m.Else():
            m.d.comb += self.fault.eq(Fault.OPCODE)
        return m


class _Cursor:
    """Tile, position and chunk counters of one pass (scores, or values one tile behind).

    Tiles start at multiples of ``attn_tile`` (a power of two), so a position is its tile's start with the position
    in the tile as its low bits; the tile's last position in it and whether it is the head's last tile are registers,
    set when the pass starts or moves to a tile, so that the per-chunk decisions compare registers (no adder in
    front of them)."""

    def __init__(self, m, name, config, kv_len, dec):
        T = config.attn_tile
        lgT = log2_exact(T)
        self.T, self.kv_len = T, kv_len
        self.tile_start = Signal(POS_BITS, name=f"{name}_tile_start")
        self.pos_in_tile = Signal(range(T), name=f"{name}_pos_in_tile")
        self.chunk = Signal(CHUNK_BITS, name=f"{name}_chunk")
        self.bank = Signal(name=f"{name}_bank")  # tile parity: scores are double-buffered
        self.tile_len_m1 = Signal(range(T), name=f"{name}_tile_len_m1")  # positions of the tile, minus one
        self.last_tile = Signal(name=f"{name}_last_tile")  # the tile ends at kv_len
        self.pos = Signal(POS_BITS, name=f"{name}_pos")
        self.last_chunk = Signal(name=f"{name}_last_chunk")
        self.last_pos = Signal(name=f"{name}_last_pos")  # the tile's last position
        self.mask = Signal(config.vector_lanes, name=f"{name}_lane_mask")
        m.d.comb += [
            self.pos.eq(Cat(self.pos_in_tile, self.tile_start[lgT:]) if lgT else self.tile_start),
            self.last_chunk.eq(self.chunk == dec.chunk_last),
            self.last_pos.eq(self.pos_in_tile == self.tile_len_m1),
            self.mask.eq(Mux(self.last_chunk, dec.tail_mask, -1)),
        ]

    def _tile(self, start):
        """The tile from *start* on: ``min(T, kv_len - start)`` positions."""
        rest = self.kv_len - start
        last = rest <= self.T
        return [self.tile_start.eq(start), self.pos_in_tile.eq(0), self.last_tile.eq(last),
                self.tile_len_m1.eq(Mux(last, rest - 1, self.T - 1))]

    def reset(self):
        return [*self._tile(0), self.chunk.eq(0), self.bank.eq(0)]

    def next_tile(self):
        return [*self._tile(self.tile_start + self.T), self.bank.eq(~self.bank)]

    def next_pos(self):
        return [self.pos_in_tile.eq(self.pos_in_tile + 1)]


class AttentionEngine(wiring.Component):
    """Executes KVAPPEND and ATTN against the activation buffer, registers, accumulator buffer and KV buffer.

    Datapath: ``vector_lanes`` (V) elements per cycle in each of two passes. Operand slices may
    start at any element: two activation-buffer read ports fetch the word holding the first
    element and the next one, and a rotator picks V lanes. ATTN, per query head and per tile of
    ``attn_tile`` positions: a score pass (:class:`ScoreStage`), one step of the
    :class:`SoftmaxStage`, and a value pass (:class:`ValueStage`, p from the softmax stage). The
    value pass of tile i and the score pass of tile i+1 run side by side (the KV buffer reads K
    and V at different positions). :class:`HeadFinish` ends each head while the sequencer
    streams the next head's first scores; after the last head the :class:`OutputStage`
    normalizes all heads into the destination vector. Faults found before any state changes
    cost the decode cycle; an OVERFLOW or DIVIDE fault is found late and leaves the statistics
    words written.

    Parameters
    ----------
    config : OverlayConfig
        Uses ``vector_lanes``, ``port_bytes`` (activation-buffer word = ``2 * port_bytes`` lanes),
        ``act_buffer_words``, ``acc_buffer_words``, ``attn_tile`` and the KV-buffer geometry.

    Attributes
    ----------
    cmd, busy, done
        The unit protocol of :func:`hw.ports.unit_signature`; ``cmd`` carries :data:`ATTN_COMMAND`.
    abuf_r0, abuf_r1 : Out(abuf_read(config))
        The activation-buffer word holding the operand's element and the word after it.
    narrow_reads : dict
        ``{"abuf_r1": vector_lanes - 1}``: of the word after it, the operand takes at most its first
        ``vector_lanes - 1`` lanes (the operand starts inside ``abuf_r0``'s word), so the state reads only those
        (:meth:`hw.state.OnChipState.attach_groups`): a copy of a few lanes, not a second word-wide one.
    abuf_w : Out(abuf_write(config))
        The output vector, ``timing.attn_output_lanes(config)`` elements per cycle with per-lane enables.
    acc_w : Out(acc_write(config))
        The per-head statistics.
    ereg_r0, ereg_r1, ereg_w : Out(ereg_read()), Out(ereg_read()), Out(ereg_write())
        Exponent registers: q (ATTN) or k (KVAPPEND), v (KVAPPEND), and the output exponent.
    reg_r : Out(reg_read())
        The length (ATTN) or position (KVAPPEND) register.
    kv : Out(kv_port_signature(config))
        Port to the :class:`~hw.kv_buffer.KvBuffer`.
    """

    def __init__(self, config):
        self.config = config
        self.lanes = config.vector_lanes
        self.abuf_lanes = abuf_lanes(config)
        if self.lanes > self.abuf_lanes:
            raise ValueError(f"vector_lanes={self.lanes} exceeds the activation-buffer word of {self.abuf_lanes} lanes")
        if config.act_buffer_words < self.abuf_lanes:
            raise ValueError(f"act_buffer_words={config.act_buffer_words} is smaller than one word of {self.abuf_lanes} lanes")
        self.abuf_depth = config.act_buffer_words // self.abuf_lanes
        self.narrow_reads = {"abuf_r1": self.lanes - 1}
        super().__init__(unit_signature(
            ATTN_COMMAND,
            abuf_r0=Out(abuf_read(config)), abuf_r1=Out(abuf_read(config)), abuf_w=Out(abuf_write(config)),
            acc_w=Out(acc_write(config)), ereg_r0=Out(ereg_read()), ereg_r1=Out(ereg_read()), ereg_w=Out(ereg_write()),
            reg_r=Out(reg_read()), kv=Out(kv_port_signature(config))))

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        V = self.lanes
        lgAL = log2_exact(self.abuf_lanes)
        kv = self.kv
        m.submodules.score = score = ScoreStage(cfg)
        m.submodules.softmax = softmax = SoftmaxStage(cfg)
        m.submodules.value = value = ValueStage(cfg)
        m.submodules.head_finish = fin = HeadFinish(cfg)
        m.submodules.output = out = OutputStage(cfg)
        wiring.connect(m, fin.scratch, out.scratch)
        wiring.connect(m, out.abuf_w, wiring.flipped(self.abuf_w))

        # ---------------------------------------------------------------- instruction
        insn = Signal(ATTN_COMMAND)
        kva, att = insn.kvappend, insn.attn
        # an ATTN without statistics leaves the accumulators alone (it then runs beside a GEMV: timing.LOCK_FIELDS)
        m.d.comb += [self.acc_w.addr.eq(fin.acc_w.addr), self.acc_w.data.eq(fin.acc_w.data),
                     self.acc_w.en.eq(fin.acc_w.en & (att.stats != isa.ATTN_NO_STATS))]
        m.submodules.decoder = dec = AttnDecoder(cfg)
        m.d.comb += [dec.insn.eq(insn), dec.reg.eq(self.reg_r.data), self.reg_r.addr.eq(dec.reg_addr),
                     self.ereg_r0.addr.eq(dec.ereg_addr0), self.ereg_r1.addr.eq(dec.ereg_addr1)]
        # the decoder's registered fields, steady from the decode's end to the instruction's
        kv_base, head_dim, kv_heads, q_heads = dec.kv_base, dec.head_dim, dec.kv_heads, att.q_heads
        n_chunks = dec.kv_cols  # chunks of V lanes per head
        pos_or_len = dec.pos_or_len  # KVAPPEND position / ATTN length
        n_out = dec.span  # ATTN's output elements (one multiplier for both instructions)
        e_a = Signal(EXP_SHAPE)  # q exponent (ATTN) or k exponent (KVAPPEND)
        e_b = Signal(EXP_SHAPE)  # v exponent (KVAPPEND)

        # loop state
        head = Signal(HEAD_BITS)  # query head (ATTN) or KV head (KVAPPEND)
        kv_head = Signal(HEAD_BITS)  # KV head of the current query head
        # (head * kv_heads) mod q_heads: the head's KV head is the next one once it reaches q_heads (q_heads is a multiple
        # of kv_heads), an adder and a compare where head // (q_heads // kv_heads) took a divider in DECODE
        group_cnt = Signal(HEAD_BITS)  # at most q_heads - kv_heads
        elem = Signal(ELEM_BITS)  # activation-buffer element read this cycle
        elem_head = Signal(ELEM_BITS)  # first element of the current head's slice
        out_head = Signal(ELEM_BITS)  # first output element of the current head (head * head_dim)
        v_pass = Signal()
        first_tile = Signal()
        score_active = Signal()  # the score pass is inside a tile
        scored = Signal()  # the next step's tile has all its scores stored
        # tiles the score pass has started beyond the value pass's (1: the next one not yet)
        lead = Signal(range(4))
        # positions of at least timing.ATTN_AHEAD_CHUNKS chunks (in tiles of at least 2 positions): the next tile's
        # step can follow a tile's last value chunk at once (ValueStage writes a word 4 stages after reading it for the
        # rescale, and the next tile's first position, 2 cycles after this tile's last chunk, reads the words its
        # last position wrote at least that many chunks earlier), and the score pass starts the tile
        # after next during this tile's last ATTN_AHEAD_WINDOW value chunks, so that its scores are stored by the
        # step that needs them and its first store follows the step before
        fast = Signal()
        m.d.comb += fast.eq((n_chunks >= timing.ATTN_AHEAD_CHUNKS) if cfg.attn_tile >= 2 else 0)
        kv_len = pos_or_len
        sc = _Cursor(m, "score", cfg, kv_len, dec)  # KVAPPEND uses its chunk counter and mask
        pv = _Cursor(m, "value", cfg, kv_len, dec)  # one tile behind

        # activation-buffer reads: the word holding `elem` and the next one; the operand rotated out of them
        # in the next cycle
        operand_off = Signal(lgAL or 1)
        m.d.comb += [self.abuf_r0.addr.eq(elem >> lgAL), self.abuf_r1.addr.eq((elem >> lgAL) + 1),
                     self.abuf_r0.en.eq(1), self.abuf_r1.en.eq(1)]
        operand = select_bits(m, Cat(self.abuf_r0.data, self.abuf_r1.data), operand_off, 16 * V, unit=16, name="operand")

        def fetch_operand():
            m.d.sync += operand_off.eq(elem[:lgAL] if lgAL else 0)

        # ---------------------------------------------------------------- KVAPPEND datapath (1 stage)
        ka_valid = Signal()
        ka = Signal(data.StructLayout({"mask": V, "head": HEAD_BITS, "chunk": CHUNK_BITS, "v": 1, "first": 1}))
        m.d.sync += ka_valid.eq(0)
        m.d.comb += [
            kv.wr_base.eq(kv_base), kv.cols.eq(dec.kv_cols), kv.wr_head.eq(ka.head), kv.wr_pos.eq(pos_or_len), kv.wr_chunk.eq(ka.chunk),
            kv.wr_data.eq(operand), kv.wr_mask.eq(ka.mask),
            kv.wr_k_en.eq(ka_valid & ~ka.v), kv.wr_v_en.eq(ka_valid & ka.v),
            kv.wr_ek.eq(e_a), kv.wr_ev.eq(e_b), kv.wr_e_en.eq(ka_valid & ~ka.v & ka.first),
        ]

        # ---------------------------------------------------------------- ATTN: stages
        m.d.comb += [kv.rd_base.eq(kv_base), kv.rd_head.eq(kv_head), kv.rd_k_pos.eq(sc.pos), kv.rd_k_chunk.eq(sc.chunk),
                     kv.rd_v_pos.eq(pv.pos), kv.rd_v_chunk.eq(pv.chunk)]
        m.d.comb += [
            score.q.eq(operand), score.k.eq(kv.rd_k_data), score.ek.eq(kv.rd_ek), score.ev.eq(kv.rd_k_ev),
            score.e_q.eq(e_a), score.read_bank.eq(value.score_bank), score.read_pos.eq(value.score_pos),
            softmax.first_tile.eq(first_tile), softmax.tile_max.eq(score.tile_max),
            softmax.tile_ev_max.eq(score.tile_ev_max), softmax.score.eq(score.score), softmax.add_p.eq(value.add_p),
            value.p.eq(softmax.p), value.v.eq(kv.rd_v_data), value.ev.eq(kv.rd_ev), value.alpha.eq(softmax.alpha),
            value.e_acc.eq(softmax.e_acc), value.rescale_shift.eq(softmax.rescale_shift),
            value.first_tile.eq(first_tile),
            fin.head.eq(head), fin.out_first.eq(out_head), fin.head_dim.eq(head_dim), fin.stats.eq(att.stats),
            fin.word.eq(value.word), value.read_index.eq(fin.word_index), fin.peak.eq(value.peak), fin.m.eq(softmax.m), fin.l.eq(softmax.l), fin.e_acc.eq(softmax.e_acc),
            out.top_exp.eq(fin.top_exp), out.n_out.eq(n_out), out.dst.eq(att.dst),
        ]
        fin_fault = Signal()  # a head's sum was not positive
        with m.If(fin.divide_fault):
            m.d.sync += fin_fault.eq(1)
        slot = Signal(ELEM_BITS)  # scratch slot of the output passes
        n_slots = Signal(ELEM_BITS)
        lgR = log2_exact(timing.attn_output_lanes(cfg))
        m.d.comb += [n_slots.eq((n_out + (1 << lgR) - 1) >> lgR), out.read.payload.slot.eq(slot)]

        # ---------------------------------------------------------------- control
        fault = Signal(Fault)
        with m.If(score.tile_stored):  # a tile completes only after the step before it (see score_pass)
            m.d.sync += scored.eq(1)
        with m.Elif(softmax.step):
            m.d.sync += scored.eq(0)

        def finish(code=Fault.NONE):
            m.d.sync += fault.eq(code)
            m.next = "DONE"

        def next_head_setup():
            m.d.sync += [elem.eq(elem_head), first_tile.eq(1), lead.eq(1), *sc.reset(), *pv.reset()]

        def score_pass(start_ok, advance=0):
            """The score pass beside the value pass: on inside a tile, or when *start_ok* lets it start the next
            one; *advance*: the value pass moves to its next tile in this cycle."""
            starting = ~score_active & start_ok & (sc.tile_start < kv_len)
            with m.If(score_active | starting):
                m.d.sync += score_active.eq(~issue_score())
            m.d.sync += lead.eq(lead + starting - advance)

        def tile_scores_stored():
            return scored | score.tile_stored

        def issue_score():
            """One chunk of the score pass; at the tile's end, move the score counters to the next tile."""
            tile_done = sc.last_chunk & sc.last_pos
            m.d.comb += [score.chunk.valid.eq(1), score.chunk.payload.first.eq(sc.chunk == 0),
                         score.chunk.payload.last.eq(sc.last_chunk), score.chunk.payload.pos.eq(sc.pos_in_tile),
                         score.chunk.payload.tile_last.eq(sc.last_pos),
                         score.chunk.payload.bank.eq(sc.bank), score.chunk.payload.mask.eq(sc.mask)]
            fetch_operand()
            with m.If(sc.last_chunk):
                m.d.sync += [sc.chunk.eq(0), elem.eq(elem_head), *sc.next_pos()]
                with m.If(tile_done):
                    m.d.sync += sc.next_tile()
            with m.Else():
                m.d.sync += [sc.chunk.eq(sc.chunk + 1), elem.eq(elem + V)]
            return tile_done

        def output_pass(write, then):
            """One scratch slot of the peak pass or the write pass per cycle."""
            m.d.comb += [out.read.valid.eq(1), out.read.payload.write.eq(write)]
            m.d.sync += slot.eq(slot + 1)
            with m.If(slot == n_slots - 1):
                m.next = then

        with m.FSM(name="attn_fsm") as fsm:
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += [insn.eq(self.cmd.payload), fin_fault.eq(0)]
                    m.next = "DECODE"

            with m.State("DECODE"):  # the decoder's first cycle: what the instruction's operands and registers give
                m.d.comb += dec.start.eq(1)
                m.d.sync += [e_a.eq(self.ereg_r0.data), e_b.eq(self.ereg_r1.data),
                             head.eq(0), kv_head.eq(0), group_cnt.eq(0), v_pass.eq(0),
                             first_tile.eq(1), out_head.eq(0), lead.eq(1), scored.eq(0), score_active.eq(0)]
                with m.If(dec.is_kvappend):
                    m.d.sync += [elem.eq(kva.k), elem_head.eq(kva.k)]
                with m.Elif(dec.is_attn):
                    m.d.sync += [elem.eq(att.q), elem_head.eq(att.q)]
                m.next = "CHECK"
            with m.State("CHECK"):  # the decoder's later stages, to its fault
                m.d.sync += [*sc.reset(), *pv.reset()]  # the length is the decoder's from its second cycle
                with m.If(dec.done):
                    with m.If(dec.fault != Fault.NONE):
                        finish(dec.fault)
                    with m.Elif(dec.is_kvappend):
                        m.next = "KVA_RUN"
                    with m.Else():
                        m.next = "A_SCORE"

            # ---- KVAPPEND: K pass then V pass, one chunk of V lanes per cycle
            with m.State("KVA_RUN"):
                fetch_operand()
                m.d.sync += [ka_valid.eq(1), ka.mask.eq(sc.mask), ka.head.eq(head), ka.chunk.eq(sc.chunk),
                             ka.v.eq(v_pass), ka.first.eq(sc.chunk == 0)]
                with m.If(sc.last_chunk):
                    m.d.sync += [sc.chunk.eq(0), head.eq(head + 1), elem.eq(elem_head + head_dim),
                                 elem_head.eq(elem_head + head_dim)]
                    with m.If(head == kv_heads - 1):
                        with m.If(v_pass):
                            m.next = "KVA_DRAIN"
                        with m.Else():
                            m.d.sync += [v_pass.eq(1), head.eq(0), elem.eq(kva.v), elem_head.eq(kva.v)]
                with m.Else():
                    m.d.sync += [sc.chunk.eq(sc.chunk + 1), elem.eq(elem + V)]
            with m.State("KVA_DRAIN"):
                finish()

            # ---- ATTN, per query head
            with m.State("A_SCORE"):  # noqa: SIM117 - the first tile's scores, alone
                with m.If(issue_score()):
                    m.next = "A_SDRAIN"
            with m.State("A_SDRAIN"):  # the step after it needs the previous head's finish to be over
                with m.If(fin_fault):
                    finish(Fault.DIVIDE)
                with m.Elif(tile_scores_stored() & ~fin.busy):
                    m.next = "A_MSTEP"
            with m.State("A_MSTEP"):  # the step, once the tile's scores are stored; the next tile's scores may start
                with m.If(scored):
                    m.d.comb += softmax.step.eq(1)
                    m.next = "A_RUN"
                score_pass(scored & (lead == 1))
            with m.State("A_RUN"):  # values of this tile and scores of the next one(s), side by side
                last_issue = pv.last_chunk & pv.last_pos
                more_tiles = ~pv.last_tile
                window = fast & pv.last_pos & (pv.chunk + timing.ATTN_AHEAD_WINDOW >= n_chunks)
                score_pass((lead == 1) | ((lead == 2) & window), advance=last_issue & fast & more_tiles)
                m.d.comb += [value.chunk.valid.eq(1), value.chunk.payload.first_pos.eq(pv.pos_in_tile == 0),
                             value.chunk.payload.first.eq(pv.chunk == 0), value.chunk.payload.index.eq(pv.chunk),
                             value.chunk.payload.pos.eq(pv.pos_in_tile), value.chunk.payload.bank.eq(pv.bank),
                             value.chunk.payload.mask.eq(pv.mask)]
                with m.If(pv.last_chunk):
                    m.d.sync += [pv.chunk.eq(0), *pv.next_pos()]
                    with m.If(pv.last_pos):
                        m.d.sync += pv.pos_in_tile.eq(0)
                        with m.If(fast & more_tiles):  # the next tile's step follows at once
                            m.d.sync += [*pv.next_tile(), first_tile.eq(0)]
                            m.next = "A_MSTEP"
                        with m.Else():
                            m.next = "A_RDRAIN"
                with m.Else():
                    m.d.sync += pv.chunk.eq(pv.chunk + 1)
            with m.State("A_RDRAIN"):
                # the head's last tile: its accumulator and peak complete before the finish takes them; another
                # tile: timing.ATTN_TILE_DRAIN cycles after the last issue, so that its first position's rescale
                # (ValueStage) reads each word after this tile's last write to it
                head_done = pv.last_tile
                score_pass(0, advance=~head_done & tile_scores_stored() & ~value.issued)
                with m.If(Mux(head_done, ~score.pending & ~value.busy, tile_scores_stored() & ~value.issued)):
                    with m.If(head_done):  # hand the head to the finish, start the next one
                        m.d.comb += fin.start.eq(1)
                        m.d.sync += [head.eq(head + 1), elem_head.eq(elem_head + head_dim),
                                     out_head.eq(out_head + head_dim)]
                        with m.If(group_cnt + kv_heads == q_heads):
                            m.d.sync += [group_cnt.eq(0), kv_head.eq(kv_head + 1)]
                        with m.Else():
                            m.d.sync += group_cnt.eq(group_cnt + kv_heads)
                        with m.If(head == q_heads - 1):
                            m.next = "A_WAITFIN"
                        with m.Else():
                            next_head_setup()
                            m.d.sync += elem.eq(elem_head + head_dim)
                            m.next = "A_SCORE"
                    with m.Else():
                        m.d.sync += [*pv.next_tile(), first_tile.eq(0)]
                        m.next = "A_MSTEP"
            with m.State("A_WAITFIN"):
                with m.If(fin_fault):
                    finish(Fault.DIVIDE)
                with m.Elif(~fin.busy):
                    m.d.sync += slot.eq(0)
                    m.d.comb += out.clear.eq(1)
                    m.next = "A_NPEAK"
            with m.State("A_NPEAK"):
                output_pass(0, "A_NPDRAIN")
            with m.State("A_NPDRAIN"):  # noqa: SIM117 - Amaranth control blocks
                with m.If(~out.pending):
                    m.next = "A_NSTEP"
            with m.State("A_NSTEP"):
                m.d.sync += slot.eq(0)
                with m.If(out.overflow):
                    finish(Fault.OVERFLOW)
                with m.Else():
                    m.d.comb += [self.ereg_w.addr.eq(att.dst_e), self.ereg_w.en.eq(1), self.ereg_w.data.eq(out.exp)]
                    m.next = "A_NWRITE"
            with m.State("A_NWRITE"):
                output_pass(1, "A_NWDRAIN")
            with m.State("A_NWDRAIN"):  # noqa: SIM117 - Amaranth control blocks
                with m.If(~out.pending & ~out.writing):
                    finish()

            with m.State("DONE"):
                m.d.comb += [self.done.valid.eq(1), self.done.payload.eq(fault)]
                m.next = "IDLE"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        return m
