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

The boundaries are where pipeline registers can go; today p leaves the softmax stage and
enters the value stage's multipliers in the same cycle.

Where numerics wraps at int64
-----------------------------
:mod:`kvoverlay.numerics` computes in numpy int64, and the datapath keeps its values 64 bits
wide and wrapping (:func:`_wrap`) wherever numerics can wrap, so that scores shifted far left
and the 2^-x of the differences they make match bit for bit. Rounding shifts use
:func:`hw.normalize.round_shift_expr`, which adds the rounding half without wrapping:
numerics differs only for a value within ``2**(s-1)`` of ``2**63``, which needs an
accumulator, product or output that int64 has already wrapped.
"""

from __future__ import annotations

import functools
import operator

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from kvoverlay import isa, numerics, timing
from kvoverlay.config import KV_BASE_BITS

from .isa_layout import LAYOUTS
from .kv_buffer import EXP_SHAPE, kv_geometry, kv_port_signature
from .normalize import EXP_WIDE, Normalizer, bit_length, round_shift_expr
from .ports import Fault, abuf_lanes, abuf_read, abuf_write, acc_write, ereg_read, ereg_write, reg_read, unit_signature
from .widths import address_bits, ceil_div, log2_exact

__all__ = ["ATTN_COMMAND", "AttentionEngine", "AttnDecoder", "Exp2Neg", "HeadFinish", "OutputStage", "ScoreStage", "SoftmaxStage",
           "ValueStage", "scratch_write"]

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
#: Word of a 64-bit two's-complement value (numpy int64 arithmetic wraps at this width).
W = 64
#: Bit widths of the sequencer's counters: element addresses, positions, chunk and head indices.
ELEM_BITS, POS_BITS, CHUNK_BITS, HEAD_BITS = 20, 17, 12, 8
#: One lane of a head's output in the scratch memory: the value and its head's exponent.
SCRATCH_LANE = data.StructLayout({"value": signed(W), "exp": EXP_WIDE})


def _wrap(v):
    """Truncate to 64-bit two's complement, as numpy int64 arithmetic does."""
    return v[:W].as_signed()


def _round_shift(m, x, s, name, *, left=True):
    """numerics.round_shift of an int64: right shifts clamped at 63 and left shifts at 62 as numerics clips them,
    the result wrapped to 64 bits (the rounding add itself does not wrap; see the module docstring). *left* False:
    the caller proves ``s >= 0``."""
    return _wrap(round_shift_expr(m, x, s, W - 1, W - 2 if left else 0, name))


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


def scratch_write(config) -> wiring.Signature:
    """Write port of the output scratch memory: one word of ``vector_lanes`` :data:`SCRATCH_LANE` lanes."""
    V = config.vector_lanes
    return wiring.Signature({"addr": Out(range(ceil_div(config.act_buffer_words, V))),
                             "data": Out(data.ArrayLayout(SCRATCH_LANE, V)), "en": Out(V)})


class Exp2Neg(wiring.Component):
    """``numerics.exp2_neg_q15``: ``exp(d)`` in Q1.15 of a score difference ``d <= 0`` (combinational).

    ``-d * log2(e)`` splits into an integer part n and a fraction; the fraction interpolates
    ``numerics.EXP2_TABLE`` (a ROM) and the result is shifted right by n, 0 from n = 16 on.

    Attributes
    ----------
    d : In(signed(64))
    p : Out(signed(64))
    """

    def __init__(self):
        super().__init__({"d": In(signed(W)), "p": Out(signed(W))})

    def elaborate(self, platform):
        m = Module()
        table = [int(v) for v in numerics.EXP2_TABLE]
        m.submodules.rom = rom = Memory(shape=unsigned(16), depth=len(table), init=table)
        rom_lo, rom_hi = rom.read_port(domain="comb"), rom.read_port(domain="comb")
        neg_d = Signal(signed(W))
        t_fix = Signal(signed(W))
        m.d.comb += [neg_d.eq(_wrap(-self.d)), t_fix.eq(_wrap(neg_d * numerics.LOG2E_Q16) >> LOG2E_FRAC)]
        t_int = Signal(signed(W - numerics.SCORE_FRAC))
        t_frac = t_fix[:numerics.SCORE_FRAC]
        seg_shift = numerics._EXP2_SHIFT
        m.d.comb += [
            t_int.eq(t_fix >> numerics.SCORE_FRAC),
            rom_lo.addr.eq(t_frac[seg_shift:]), rom_hi.addr.eq(t_frac[seg_shift:] + 1),
        ]
        t_lo = Signal(signed(18))  # table entries are unsigned Q1.15 (up to 1 << 15)
        t_hi = Signal(signed(18))
        interp = Signal(signed(32))
        m.d.comb += [t_lo.eq(rom_lo.data), t_hi.eq(rom_hi.data),
                     interp.eq(((t_hi - t_lo) * t_frac[:seg_shift] + (1 << (seg_shift - 1))) >> seg_shift)]
        p_tab = Signal(signed(W))
        m.d.comb += p_tab.eq(t_lo + interp)
        shifted = _wrap(round_shift_expr(m, p_tab, t_int, EXP2_ZERO_SHIFT, W - 2, "shifted"))
        m.d.comb += self.p.eq(Mux(t_int >= EXP2_ZERO_SHIFT, 0, shifted))
        return m


class ScoreStage(wiring.Component):
    """q.K scores of a tile, rounded to ``Q.SCORE_FRAC``, with the tile's largest score and value exponent.

    In the cycle after a chunk is issued (when its q lanes and K lanes arrive) its ``vector_lanes``
    products are added to the position's dot product; the cycle after a position's last chunk
    rounds the dot product and stores the score in the register file bank of its tile (two banks:
    the value pass reads one tile while the next one is scored).

    Parameters
    ----------
    config : OverlayConfig
        Uses ``vector_lanes`` and ``attn_tile``.

    Attributes
    ----------
    chunk : In(stream.Signature(ScoreStage.chunk_layout(config), always_ready=True))
        One chunk of one position: ``first`` and ``last`` chunk of the position, its ``pos`` in the
        tile, the tile's ``bank`` and the lanes within the head (``mask``).
    q, k : In(ArrayLayout(signed(16), vector_lanes))
        The chunk's q and K lanes, the cycle after it is issued.
    ek, ev : In(EXP_SHAPE)
        The position's key and value exponents, the cycle after its chunks are issued.
    e_q : In(EXP_SHAPE)
        The q exponent.
    pending : Out(1)
        A chunk is in the dot-product stage.
    tile_max : Out(signed(64))
    tile_ev_max : Out(EXP_SHAPE)
    read_bank, read_pos : In
        Score register read (combinational) ...
    score : Out(signed(64))
        ... its score.
    """

    @staticmethod
    def chunk_layout(config):
        return data.StructLayout({"first": 1, "last": 1, "pos": range(config.attn_tile), "bank": 1,
                                  "mask": config.vector_lanes})

    def __init__(self, config):
        self.config = config
        T = config.attn_tile
        super().__init__({
            "chunk": In(stream.Signature(self.chunk_layout(config), always_ready=True)),
            "q": In(_lanes(config)), "k": In(_lanes(config)),
            "ek": In(EXP_SHAPE), "ev": In(EXP_SHAPE), "e_q": In(EXP_SHAPE),
            "pending": Out(1),
            "tile_max": Out(signed(W)), "tile_ev_max": Out(EXP_SHAPE),
            "read_bank": In(1), "read_pos": In(range(T)), "score": Out(signed(W)),
        })

    def elaborate(self, platform):
        m = Module()
        V, T = self.config.vector_lanes, self.config.attn_tile
        # stage 1: products and the running dot product
        valid1, c1 = _issued(m, self.chunk)
        m.d.comb += self.pending.eq(valid1)
        products = []
        for i in range(V):
            prod = Signal(signed(32), name=f"qk_prod{i}")
            m.d.comb += prod.eq(Mux(c1.mask[i], self.q[i] * self.k[i], 0))
            products.append(prod)
        dot_sum = Signal(signed(32 + log2_exact(V) + 1))
        m.d.comb += dot_sum.eq(sum(products))
        dot = Signal(signed(W))
        dot_next = Signal(signed(W))
        m.d.comb += dot_next.eq(Mux(c1.first, 0, dot) + dot_sum)
        # stage 2: rounding into the register file
        valid2 = Signal()
        dot2 = Signal(signed(W))
        ek2 = Signal(EXP_SHAPE)
        ev2 = Signal(EXP_SHAPE)
        pos2 = Signal(range(T))
        bank2 = Signal()
        m.d.sync += valid2.eq(valid1 & c1.last)
        with m.If(valid1):
            m.d.sync += [dot.eq(dot_next), dot2.eq(dot_next), ek2.eq(self.ek), ev2.eq(self.ev), pos2.eq(c1.pos),
                         bank2.eq(c1.bank)]
        score_shift = Signal(signed(16))
        m.d.comb += score_shift.eq(-(self.e_q + ek2 + numerics.SCORE_FRAC))
        score = _round_shift(m, dot2, score_shift, "score")
        scores = Array(Signal(signed(W), name=f"score{i // T}_{i % T}") for i in range(2 * T))
        with m.If(valid2):
            m.d.sync += [scores[bank2 * T + pos2].eq(score),
                         self.tile_max.eq(_first_or_max(pos2 == 0, score, self.tile_max)),
                         self.tile_ev_max.eq(_first_or_max(pos2 == 0, ev2, self.tile_ev_max))]
        m.d.comb += self.score.eq(scores[self.read_bank * T + self.read_pos])
        return m


class SoftmaxStage(wiring.Component):
    """The online softmax: running max ``m`` and sum ``l``, and p = 2^-x of every score.

    In the ``step`` between a tile's scores and its values, the new max gives alpha =
    ``exp(m_old - m_new)``, the sum is rescaled by it and the accumulator exponent moves to
    the largest value exponent so far. In the value pass ``p = exp(score - m)`` of the position
    whose values stream; ``add_p`` adds it to the sum once per position.

    Attributes
    ----------
    step, first_tile : In(1)
        The max/rescale step; it is the head's first tile (no old max, sum or accumulator).
    tile_max : In(signed(64))
    tile_ev_max : In(EXP_SHAPE)
        Of the tile the step is for.
    score : In(signed(64))
        Score of the position in the value pass.
    add_p : In(1)
        ``p`` joins the running sum.
    p : Out(signed(64))
        ``exp(score - m)`` in Q1.15 (combinational).
    alpha : Out(signed(64))
        ``exp(m_old - m_new)`` of the last step.
    m, l : Out(signed(64))
        Running max (Q.SCORE_FRAC) and sum (Q1.15).
    e_acc, rescale_shift : Out(EXP_WIDE)
        Exponent of the accumulator, and by how much it grew in the last step.
    """

    def __init__(self):
        super().__init__({
            "step": In(1), "first_tile": In(1), "tile_max": In(signed(W)), "tile_ev_max": In(EXP_SHAPE),
            "score": In(signed(W)), "add_p": In(1),
            "p": Out(signed(W)), "alpha": Out(signed(W)), "m": Out(signed(W)), "l": Out(signed(W)),
            "e_acc": Out(EXP_WIDE), "rescale_shift": Out(EXP_WIDE),
        })

    def elaborate(self, platform):
        m = Module()
        m_run, l_run, e_acc = self.m, self.l, self.e_acc
        e_acc_old = Signal(EXP_WIDE)
        m_new = Signal(signed(W))
        m.d.comb += [m_new.eq(_first_or_max(self.first_tile, self.tile_max, m_run)),
                     self.rescale_shift.eq(e_acc - e_acc_old)]
        m.submodules.exp2 = exp2 = Exp2Neg()
        m.d.comb += [exp2.d.eq(Mux(self.step, _wrap(m_run - m_new), _wrap(self.score - m_run))), self.p.eq(exp2.p)]
        l_rescaled = _round_shift(m, _wrap(l_run * exp2.p), ALPHA_FRAC, "l_rescaled", left=False)
        with m.If(self.step):
            m.d.sync += [self.alpha.eq(exp2.p), m_run.eq(m_new), e_acc_old.eq(e_acc),
                         e_acc.eq(_first_or_max(self.first_tile, self.tile_ev_max, e_acc)),
                         l_run.eq(Mux(self.first_tile, 0, l_rescaled))]
        with m.Elif(self.add_p):
            m.d.sync += l_run.eq(_wrap(l_run + exp2.p))
        return m


class ValueStage(wiring.Component):
    """The head accumulator: ``row_chunks`` words of ``vector_lanes`` int64 lanes in registers.

    In the cycle after a chunk is issued (when its V lanes arrive) ``round_shift(p * v, e_acc - e_v)``
    is added to the chunk's word; on the tile's first position the word is first rescaled by
    alpha and by the growth of the accumulator exponent (or zeroed on the head's first tile).

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
        The score the chunk in flight needs p of.
    add_p : Out(1)
        That p is new to the running sum (the position's first chunk).
    p : In(signed(64))
        Its p.
    v : In(ArrayLayout(signed(16), vector_lanes))
    ev : In(EXP_SHAPE)
        The chunk's V lanes and value exponent, the cycle after it is issued.
    alpha : In(signed(64))
    e_acc, rescale_shift : In(EXP_WIDE)
    first_tile : In(1)
        From the softmax stage.
    clear : In(1)
        Zeroes every word (lanes past head_dim then stay zero for the whole instruction).
    acc : Out(ArrayLayout(signed(64), row_chunks * vector_lanes))
        The accumulator.
    """

    @staticmethod
    def chunk_layout(config):
        return data.StructLayout({"first_pos": 1, "first": 1, "index": address_bits(kv_geometry(config)["row_chunks"]),
                                  "pos": range(config.attn_tile), "bank": 1, "mask": config.vector_lanes})

    def __init__(self, config):
        self.config = config
        chunks = kv_geometry(config)["row_chunks"]
        super().__init__({
            "chunk": In(stream.Signature(self.chunk_layout(config), always_ready=True)),
            "score_pos": Out(range(config.attn_tile)), "score_bank": Out(1), "add_p": Out(1),
            "p": In(signed(W)), "v": In(_lanes(config)), "ev": In(EXP_SHAPE),
            "alpha": In(signed(W)), "e_acc": In(EXP_WIDE), "rescale_shift": In(EXP_WIDE), "first_tile": In(1),
            "clear": In(1),
            "acc": Out(data.ArrayLayout(signed(W), chunks * config.vector_lanes)),
        })

    def elaborate(self, platform):
        m = Module()
        V = self.config.vector_lanes
        chunks = kv_geometry(self.config)["row_chunks"]
        valid1, c1 = _issued(m, self.chunk)
        m.d.comb += [self.score_pos.eq(c1.pos), self.score_bank.eq(c1.bank), self.add_p.eq(valid1 & c1.first)]
        words = Array(Signal(W * V, name=f"acc_word{i}") for i in range(chunks))
        m.d.comb += self.acc.eq(Cat(words))
        old_word = words[c1.index]
        v_shift = Signal(EXP_WIDE)
        m.d.comb += v_shift.eq(self.e_acc - self.ev)  # e_acc is the largest value exponent so far
        new_lanes = []
        for i in range(V):
            term = _round_shift(m, _wrap(self.p * self.v[i]), v_shift, f"pv_term{i}", left=False)
            old = old_word.word_select(i, W).as_signed()
            alpha_scaled = _round_shift(m, _wrap(old * self.alpha), ALPHA_FRAC, f"acc_alpha{i}", left=False)
            rescaled = _round_shift(m, alpha_scaled, self.rescale_shift, f"acc_rescaled{i}", left=False)
            base = Mux(c1.first_pos, Mux(self.first_tile, 0, rescaled), old)
            new = Signal(signed(W), name=f"acc_new{i}")
            m.d.comb += new.eq(_wrap(base + Mux(c1.mask[i], term, 0)))
            new_lanes.append(new)
        with m.If(self.clear):
            m.d.sync += [w.eq(0) for w in words]
        with m.Elif(valid1):
            m.d.sync += words[c1.index].eq(Cat(new_lanes))
        return m


class HeadFinish(wiring.Component):
    """The end of one head, while the sequencer streams the next head's first scores.

    The statistics (m, l) go to the accumulator buffer; a restoring divider computes
    ``(1 << RECIP_BITS) // l`` one quotient bit per cycle while the accumulator's peak gives the
    shift that keeps ``ACC_KEEP_BITS`` magnitude bits; then the head's output words (its
    accumulator rounded and multiplied by the reciprocal, lanes rotated to the head's first
    output element) go with the head exponent into the output scratch, one word per cycle.

    Parameters
    ----------
    config : OverlayConfig
        Uses ``vector_lanes``, ``acc_buffer_words``, ``act_buffer_words`` and the KV-buffer geometry.

    Attributes
    ----------
    start : In(1)
        The head's values are all in; ``acc``, ``m``, ``l`` and ``e_acc`` hold until ``busy`` falls.
    head : In(HEAD_BITS)
    out_first : In(ELEM_BITS)
        The head's index and first output element (``head * head_dim``), taken with ``start``.
    head_dim : In(11)
    stats : In(acc-buffer address)
        Geometry of the instruction: statistics of head h go to ``stats + 2h`` and ``stats + 2h + 1``.
    acc : In(ArrayLayout(signed(64), row_chunks * vector_lanes))
    m, l : In(signed(64))
    e_acc : In(EXP_WIDE)
        The head's accumulator, running max and sum, accumulator exponent.
    busy : Out(1)
    divide_fault : Out(1)
        Pulses when the sum is not positive (the head ends there).
    top_exp : Out(EXP_WIDE)
        The largest head exponent of the instruction so far.
    acc_w : Out(acc_write(config))
    scratch : Out(scratch_write(config))
    """

    def __init__(self, config):
        self.config = config
        chunks = kv_geometry(config)["row_chunks"]
        super().__init__({
            "start": In(1), "head": In(HEAD_BITS), "out_first": In(ELEM_BITS), "head_dim": In(11),
            "stats": In(range(config.acc_buffer_words)),
            "acc": In(data.ArrayLayout(signed(W), chunks * config.vector_lanes)),
            "m": In(signed(W)), "l": In(signed(W)), "e_acc": In(EXP_WIDE),
            "busy": Out(1), "divide_fault": Out(1), "top_exp": Out(EXP_WIDE),
            "acc_w": Out(acc_write(config)), "scratch": Out(scratch_write(config)),
        })

    def elaborate(self, platform):
        m = Module()
        V, lgV = self.config.vector_lanes, log2_exact(self.config.vector_lanes)
        chunks = kv_geometry(self.config)["row_chunks"]
        words = Array(self.acc.as_value().word_select(i, W * V) for i in range(chunks))
        acc_or = Signal(W)
        magnitudes = []
        for i in range(chunks * V):
            x = self.acc[i]
            magnitudes.append(Mux(x < 0, -x, x)[:W])
        m.d.comb += acc_or.eq(functools.reduce(operator.or_, magnitudes))
        acc_bits = bit_length(m, acc_or, "acc_bits")
        head_shift = Signal(range(W + 1))
        head_exp = Signal(EXP_WIDE)
        m.d.comb += head_exp.eq(self.e_acc + head_shift - RECIP_BITS)
        remainder = Signal(W + 1)
        quotient = Signal(RECIP_BITS + 1)
        div_cnt = Signal(range(DIVIDER_CYCLES))
        rem_shifted = Signal(W + 2)
        m.d.comb += rem_shifted.eq(Cat(div_cnt == RECIP_BITS, remainder))  # the numerator 1 << RECIP_BITS, bit by bit
        out_k = Signal(CHUNK_BITS)  # output word of this head
        head = Signal(HEAD_BITS)
        out_first = Signal(ELEM_BITS)
        out_off = out_first[:lgV] if lgV else Const(0, 1)
        out_last = Signal(CHUNK_BITS)
        m.d.comb += out_last.eq((out_off + self.head_dim - 1) >> lgV)
        # the head's lanes shifted up to its first output lane: word k of the output takes acc words k - 1 and k
        word_lo = words[(out_k - 1)[:len(out_k)]]
        word_hi = words[out_k]
        rot_lanes = Signal(range(V + 1))
        m.d.comb += rot_lanes.eq(V - out_off)
        rotated = Cat(word_lo, word_hi).bit_select(rot_lanes * W, W * V)
        for i in range(V):
            x = rotated.word_select(i, W).as_signed()
            lane = self.scratch.data[i]
            m.d.comb += [lane.value.eq(_wrap(_round_shift(m, x, head_shift, f"head_acc{i}", left=False) * quotient)),
                         lane.exp.eq(head_exp)]
        m.d.comb += self.scratch.addr.eq((out_first >> lgV) + out_k)
        out_en = Signal(V)
        m.d.comb += out_en.eq(Cat((((out_k << lgV) + i) >= out_off) & (((out_k << lgV) + i) < out_off + self.head_dim)
                                  for i in range(V)))

        def write_stat(offset, value):
            m.d.comb += [self.acc_w.addr.eq(self.stats + 2 * head + offset), self.acc_w.data.eq(value),
                         self.acc_w.en.eq(1)]

        with m.FSM(name="head_finish_fsm") as fsm:
            with m.State("IDLE"):  # noqa: SIM117 - Amaranth control blocks
                with m.If(self.start):
                    m.d.sync += [head.eq(self.head), out_first.eq(self.out_first)]
                    m.next = "STATS"
            with m.State("STATS"):
                m.d.sync += [head_shift.eq(Mux(acc_bits > ACC_KEEP_BITS, acc_bits - ACC_KEEP_BITS, 0)),
                             remainder.eq(0), quotient.eq(0), div_cnt.eq(RECIP_BITS)]
                write_stat(0, self.m)
                with m.If(self.l <= 0):
                    m.d.comb += self.divide_fault.eq(1)
                    m.next = "IDLE"
                with m.Else():
                    m.next = "DIVIDE"
            with m.State("DIVIDE"):
                with m.If(div_cnt == RECIP_BITS):
                    write_stat(1, self.l)
                with m.If(rem_shifted >= self.l.as_unsigned()):
                    m.d.sync += [remainder.eq(rem_shifted - self.l.as_unsigned()), quotient.eq(Cat(1, quotient))]
                with m.Else():
                    m.d.sync += [remainder.eq(rem_shifted), quotient.eq(Cat(0, quotient))]
                m.d.sync += div_cnt.eq(div_cnt - 1)
                with m.If(div_cnt == 0):
                    m.d.sync += [out_k.eq(0), self.top_exp.eq(_first_or_max(head == 0, head_exp, self.top_exp))]
                    m.next = "OUTPUT"
            with m.State("OUTPUT"):
                m.d.comb += self.scratch.en.eq(out_en)
                m.d.sync += out_k.eq(out_k + 1)
                with m.If(out_k == out_last):
                    m.next = "IDLE"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        return m


class OutputStage(wiring.Component):
    """All heads into one bfp16 vector: each scratch lane aligned to the largest head exponent, then
    the :class:`~hw.normalize.Normalizer`'s peak pass and write pass over the scratch words.

    Parameters
    ----------
    config : OverlayConfig
        Uses ``vector_lanes``, ``port_bytes`` and ``act_buffer_words``.

    Attributes
    ----------
    scratch : In(scratch_write(config))
        The heads' outputs, from :class:`HeadFinish`.
    read : In(stream.Signature(OutputStage.READ_LAYOUT, always_ready=True))
        One scratch ``word`` per cycle: in the peak pass (``write`` low) or the write pass.
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
    """

    READ_LAYOUT = data.StructLayout({"word": ELEM_BITS, "write": 1})

    def __init__(self, config):
        self.config = config
        super().__init__({
            "scratch": In(scratch_write(config)),
            "read": In(stream.Signature(self.READ_LAYOUT, always_ready=True)),
            "clear": In(1), "top_exp": In(EXP_WIDE), "n_out": In(ELEM_BITS), "dst": In(ELEM_BITS),
            "abuf_w": Out(abuf_write(config)), "exp": Out(EXP_SHAPE), "overflow": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        V, lgV = cfg.vector_lanes, log2_exact(cfg.vector_lanes)
        lgAL = log2_exact(abuf_lanes(cfg))
        lane_bits = SCRATCH_LANE.size
        m.submodules.scratch = scratch = Memory(shape=unsigned(lane_bits * V), depth=ceil_div(cfg.act_buffer_words, V),
                                                init=[])
        scr_w = scratch.write_port(granularity=lane_bits)
        scr_r = scratch.read_port()
        m.d.comb += [scr_w.addr.eq(self.scratch.addr), scr_w.data.eq(self.scratch.data), scr_w.en.eq(self.scratch.en),
                     scr_r.addr.eq(self.read.payload.word)]
        valid1, r1 = _issued(m, self.read)
        m.submodules.normalizer = norm = Normalizer(W, V)
        lanes = data.ArrayLayout(SCRATCH_LANE, V)(scr_r.data)
        for i in range(V):
            lane = lanes[i]
            m.d.comb += [norm.wide[i].eq(_round_shift(m, lane.value, self.top_exp - lane.exp, f"wide{i}", left=False)),
                         norm.valid[i].eq(((r1.word << lgV) + i) < self.n_out)]
        m.d.comb += [norm.exp_in.eq(self.top_exp), norm.clear.eq(self.clear), norm.sample.eq(valid1 & ~r1.write),
                     self.exp.eq(norm.exp_out), self.overflow.eq(norm.overflow)]
        out_elem = Signal(ELEM_BITS)
        m.d.comb += out_elem.eq(self.dst + (r1.word << lgV))
        out_lane = out_elem[:lgAL] if lgAL else Const(0, 1)
        m.d.comb += [
            self.abuf_w.addr.eq(out_elem >> lgAL),
            # every word slot carries the mantissas and the lane enables pick the slot: no shifter
            self.abuf_w.data.eq(norm.mant.as_value().replicate(abuf_lanes(cfg) // V)),
            self.abuf_w.en.eq(Mux(valid1 & r1.write, norm.valid << out_lane, 0)),
        ]
        return m


class AttnDecoder(wiring.Component):
    """The operand fields of the latched KVAPPEND or ATTN, and its set-up fault (combinational).

    Parameters
    ----------
    config : OverlayConfig
        Uses the KV-buffer geometry, ``kv_capacity``, ``act_buffer_words``, ``acc_buffer_words`` and ``port_bytes``.

    Attributes
    ----------
    insn : In(ATTN_COMMAND)
    reg : In(32)
        The value of the register ``reg_addr`` names.
    is_attn, is_kvappend : Out(1)
    kv_base, head_dim, kv_heads : Out
        Fields both instructions have (``kv_heads``: KVAPPEND's ``heads``).
    kv_cols : Out
        KV-pool columns per head, ``ceil(head_dim / vector_lanes)``.
    reg_addr : Out(range(isa.NUM_REGS))
        ATTN's length register or KVAPPEND's position register ...
    pos_or_len : Out(signed(34))
        ... plus the immediate.
    ereg_addr0, ereg_addr1 : Out(range(isa.NUM_EREGS))
        q (ATTN) or k (KVAPPEND) exponent, and v (KVAPPEND) exponent.
    fault : Out(Fault)
        Why the instruction cannot run (``NONE``: it runs); a fault here changes no state.
    """

    def __init__(self, config):
        self.config = config
        super().__init__({
            "insn": In(ATTN_COMMAND), "reg": In(32),
            "is_attn": Out(1), "is_kvappend": Out(1),
            "kv_base": Out(KV_BASE_BITS), "head_dim": Out(11), "kv_heads": Out(HEAD_BITS),
            "kv_cols": Out(CHUNK_BITS),
            "reg_addr": Out(range(isa.NUM_REGS)), "pos_or_len": Out(signed(34)),
            "ereg_addr0": Out(range(isa.NUM_EREGS)), "ereg_addr1": Out(range(isa.NUM_EREGS)),
            "fault": Out(Fault),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        lgAL = log2_exact(abuf_lanes(cfg))
        kva, att = self.insn.kvappend, self.insn.attn
        is_attn, kv_base, head_dim, kv_heads, pos_or_len = (self.is_attn, self.kv_base, self.head_dim, self.kv_heads,
                                                          self.pos_or_len)
        q_heads = att.q_heads
        m.d.comb += [
            is_attn.eq(att.opcode == isa.BY_NAME["ATTN"].code),
            self.is_kvappend.eq(att.opcode == isa.BY_NAME["KVAPPEND"].code),
            kv_base.eq(Mux(is_attn, att.kv_base, kva.kv_base)),
            head_dim.eq(Mux(is_attn, att.head_dim, kva.head_dim)),
            kv_heads.eq(Mux(is_attn, att.kv_heads, kva.heads)),
            self.reg_addr.eq(Mux(is_attn, att.len_reg, kva.pos_reg)),
            pos_or_len.eq(self.reg.as_signed() + Mux(is_attn, att.len_imm, kva.pos_imm)),
            self.ereg_addr0.eq(Mux(is_attn, att.q_e, kva.k_e)),
            self.ereg_addr1.eq(kva.v_e),
        ]
        span = Signal(ELEM_BITS)  # heads * head_dim
        m.d.comb += span.eq(Mux(is_attn, q_heads, kv_heads) * head_dim)
        # the KV pool's one fit predicate (OverlayConfig.holds_kv): the heads' columns end within the pool
        lgKV = log2_exact(cfg.vector_lanes)
        m.d.comb += self.kv_cols.eq((head_dim + cfg.vector_lanes - 1) >> lgKV)
        geometry_bad = ((kv_heads == 0) | (head_dim == 0) | (head_dim > cfg.max_head_dim)
                        | (kv_base + kv_heads * self.kv_cols > cfg.kv_columns))
        with m.If(self.is_kvappend):
            m.d.comb += self.fault.eq(Mux(geometry_bad, Fault.SHAPE,
                                      Mux((pos_or_len < 0) | (pos_or_len >= cfg.kv_capacity), Fault.KV_RANGE,
                                      Mux((kva.k + span > cfg.act_buffer_words) | (kva.v + span > cfg.act_buffer_words),
                                          Fault.OUT_OF_RANGE, Fault.NONE))))
        with m.Elif(is_attn):
            bad = geometry_bad | (q_heads == 0) | (head_dim == 0) | ((q_heads % kv_heads) != 0)
            m.d.comb += self.fault.eq(Mux(bad, Fault.SHAPE,
                                      Mux((pos_or_len < 1) | (pos_or_len > cfg.kv_capacity), Fault.KV_RANGE,
                                      Mux((att.q + span > cfg.act_buffer_words) | (att.dst + span > cfg.act_buffer_words)
                                          | (att.stats + 2 * q_heads > cfg.acc_buffer_words), Fault.OUT_OF_RANGE,
                                      Mux(att.dst[:lgAL] != 0 if lgAL else 0, Fault.UNALIGNED, Fault.NONE)))))
        with m.Else():
            m.d.comb += self.fault.eq(Fault.OPCODE)
        return m


class _Cursor:
    """Tile, position and chunk counters of one pass (scores, or values one tile behind)."""

    def __init__(self, m, name, config, kv_len, n_chunks, head_dim):
        V, T = config.vector_lanes, config.attn_tile
        self.tile_start = Signal(POS_BITS, name=f"{name}_tile_start")
        self.pos_in_tile = Signal(range(T), name=f"{name}_pos_in_tile")
        self.chunk = Signal(CHUNK_BITS, name=f"{name}_chunk")
        self.bank = Signal(name=f"{name}_bank")  # tile parity: scores are double-buffered
        self.tile_end = Signal(POS_BITS, name=f"{name}_tile_end")
        self.pos = Signal(POS_BITS, name=f"{name}_pos")
        self.last_chunk = Signal(name=f"{name}_last_chunk")
        self.mask = Signal(V, name=f"{name}_lane_mask")
        lgV = log2_exact(V)
        m.d.comb += [
            self.tile_end.eq(Mux(self.tile_start + T < kv_len, self.tile_start + T, kv_len)),
            self.pos.eq(self.tile_start + self.pos_in_tile),
            self.last_chunk.eq(self.chunk == Mux(n_chunks == 0, 0, n_chunks - 1)),
            self.mask.eq(Cat(((self.chunk << lgV) + i < head_dim) for i in range(V))),
        ]

    def reset(self):
        return [self.tile_start.eq(0), self.pos_in_tile.eq(0), self.chunk.eq(0), self.bank.eq(0)]


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
    abuf_w : Out(abuf_write(config))
        The output vector, one word per cycle with a per-lane enable.
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
        super().__init__(unit_signature(
            ATTN_COMMAND,
            abuf_r0=Out(abuf_read(config)), abuf_r1=Out(abuf_read(config)), abuf_w=Out(abuf_write(config)),
            acc_w=Out(acc_write(config)), ereg_r0=Out(ereg_read()), ereg_r1=Out(ereg_read()), ereg_w=Out(ereg_write()),
            reg_r=Out(reg_read()), kv=Out(kv_port_signature(config))))

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        V, lgV = self.lanes, log2_exact(self.lanes)
        lgAL = log2_exact(self.abuf_lanes)
        kv = self.kv
        m.submodules.score = score = ScoreStage(cfg)
        m.submodules.softmax = softmax = SoftmaxStage()
        m.submodules.value = value = ValueStage(cfg)
        m.submodules.head_finish = fin = HeadFinish(cfg)
        m.submodules.output = out = OutputStage(cfg)
        wiring.connect(m, fin.scratch, out.scratch)
        wiring.connect(m, fin.acc_w, wiring.flipped(self.acc_w))
        wiring.connect(m, out.abuf_w, wiring.flipped(self.abuf_w))

        # ---------------------------------------------------------------- instruction
        insn = Signal(ATTN_COMMAND)
        kva, att = insn.kvappend, insn.attn
        m.submodules.decoder = dec = AttnDecoder(cfg)
        m.d.comb += [dec.insn.eq(insn), dec.reg.eq(self.reg_r.data), self.reg_r.addr.eq(dec.reg_addr),
                     self.ereg_r0.addr.eq(dec.ereg_addr0), self.ereg_r1.addr.eq(dec.ereg_addr1)]
        kv_base, head_dim, kv_heads, q_heads = dec.kv_base, dec.head_dim, dec.kv_heads, att.q_heads
        n_chunks = Signal(CHUNK_BITS)  # chunks of V lanes per head
        m.d.comb += n_chunks.eq((head_dim + V - 1) >> lgV)
        pos_or_len = Signal(signed(34))  # KVAPPEND position / ATTN length
        e_a = Signal(EXP_SHAPE)  # q exponent (ATTN) or k exponent (KVAPPEND)
        e_b = Signal(EXP_SHAPE)  # v exponent (KVAPPEND)
        group = Signal(HEAD_BITS)  # query heads per KV head

        # loop state
        head = Signal(HEAD_BITS)  # query head (ATTN) or KV head (KVAPPEND)
        kv_head = Signal(HEAD_BITS)  # KV head of the current query head
        group_cnt = Signal(HEAD_BITS)
        elem = Signal(ELEM_BITS)  # activation-buffer element read this cycle
        elem_head = Signal(ELEM_BITS)  # first element of the current head's slice
        out_head = Signal(ELEM_BITS)  # first output element of the current head (head * head_dim)
        v_pass = Signal()
        first_tile = Signal()
        score_active = Signal()
        kv_len = pos_or_len
        sc = _Cursor(m, "score", cfg, kv_len, n_chunks, head_dim)  # KVAPPEND uses its chunk counter and mask
        pv = _Cursor(m, "value", cfg, kv_len, n_chunks, head_dim)  # one tile behind

        # activation-buffer reads: the word holding `elem` and the next one; the operand rotated out of them
        # in the next cycle
        operand_off = Signal(lgAL or 1)
        m.d.comb += [self.abuf_r0.addr.eq(elem >> lgAL), self.abuf_r1.addr.eq((elem >> lgAL) + 1),
                     self.abuf_r0.en.eq(1), self.abuf_r1.en.eq(1)]
        operand = Cat(self.abuf_r0.data, self.abuf_r1.data).bit_select(operand_off * 16, 16 * V)

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
            fin.acc.eq(value.acc), fin.m.eq(softmax.m), fin.l.eq(softmax.l), fin.e_acc.eq(softmax.e_acc),
            out.top_exp.eq(fin.top_exp), out.n_out.eq(q_heads * head_dim), out.dst.eq(att.dst),
        ]
        fin_fault = Signal()  # a head's sum was not positive
        with m.If(fin.divide_fault):
            m.d.sync += fin_fault.eq(1)
        word = Signal(ELEM_BITS)  # scratch word of the output passes
        n_words = Signal(ELEM_BITS)
        m.d.comb += [n_words.eq((q_heads * head_dim + V - 1) >> lgV), out.read.payload.word.eq(word)]

        # ---------------------------------------------------------------- control
        fault = Signal(Fault)

        def finish(code=Fault.NONE):
            m.d.sync += fault.eq(code)
            m.next = "DONE"

        def next_head_setup():
            m.d.sync += [elem.eq(elem_head), first_tile.eq(1), *sc.reset(), *pv.reset()]

        def issue_score():
            """One chunk of the score pass; at the tile's end, move the score counters to the next tile."""
            m.d.comb += [score.chunk.valid.eq(1), score.chunk.payload.first.eq(sc.chunk == 0),
                         score.chunk.payload.last.eq(sc.last_chunk), score.chunk.payload.pos.eq(sc.pos_in_tile),
                         score.chunk.payload.bank.eq(sc.bank), score.chunk.payload.mask.eq(sc.mask)]
            fetch_operand()
            tile_done = sc.last_chunk & (sc.pos == sc.tile_end - 1)
            with m.If(sc.last_chunk):
                m.d.sync += [sc.chunk.eq(0), elem.eq(elem_head), sc.pos_in_tile.eq(sc.pos_in_tile + 1)]
                with m.If(tile_done):
                    m.d.sync += [sc.pos_in_tile.eq(0), sc.tile_start.eq(sc.tile_end), sc.bank.eq(~sc.bank)]
            with m.Else():
                m.d.sync += [sc.chunk.eq(sc.chunk + 1), elem.eq(elem + V)]
            return tile_done

        def output_pass(write, then):
            """One scratch word of the peak pass or the write pass per cycle."""
            m.d.comb += [out.read.valid.eq(1), out.read.payload.write.eq(write)]
            m.d.sync += word.eq(word + 1)
            with m.If(word == n_words - 1):
                m.next = then

        with m.FSM(name="attn_fsm") as fsm:
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += [insn.eq(self.cmd.payload), fin_fault.eq(0)]
                    m.next = "DECODE"

            with m.State("DECODE"):
                m.d.sync += [pos_or_len.eq(dec.pos_or_len), e_a.eq(self.ereg_r0.data), e_b.eq(self.ereg_r1.data),
                             head.eq(0), kv_head.eq(0), group_cnt.eq(0), sc.chunk.eq(0), v_pass.eq(0),
                             sc.pos_in_tile.eq(0), sc.tile_start.eq(0), first_tile.eq(1), out_head.eq(0)]
                with m.If(dec.is_kvappend):
                    m.d.sync += [elem.eq(kva.k), elem_head.eq(kva.k)]
                with m.Elif(dec.is_attn):
                    m.d.sync += [elem.eq(att.q), elem_head.eq(att.q), group.eq(q_heads // kv_heads),
                                 *pv.reset(), sc.bank.eq(0)]
                    m.d.comb += value.clear.eq(1)
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
                with m.Elif(~score.pending & ~fin.busy):
                    m.next = "A_MSTEP"
            with m.State("A_MSTEP"):
                m.d.comb += softmax.step.eq(1)
                m.d.sync += score_active.eq(sc.tile_start < kv_len)
                m.next = "A_RUN"
            with m.State("A_RUN"):  # values of this tile and scores of the next one, side by side
                with m.If(score_active):  # noqa: SIM117 - Amaranth control blocks
                    with m.If(issue_score()):
                        m.d.sync += score_active.eq(0)
                m.d.comb += [value.chunk.valid.eq(1), value.chunk.payload.first_pos.eq(pv.pos_in_tile == 0),
                             value.chunk.payload.first.eq(pv.chunk == 0), value.chunk.payload.index.eq(pv.chunk),
                             value.chunk.payload.pos.eq(pv.pos_in_tile), value.chunk.payload.bank.eq(pv.bank),
                             value.chunk.payload.mask.eq(pv.mask)]
                with m.If(pv.last_chunk):
                    m.d.sync += [pv.chunk.eq(0), pv.pos_in_tile.eq(pv.pos_in_tile + 1)]
                    with m.If(pv.pos == pv.tile_end - 1):
                        m.d.sync += pv.pos_in_tile.eq(0)
                        m.next = "A_RDRAIN"
                with m.Else():
                    m.d.sync += pv.chunk.eq(pv.chunk + 1)
            with m.State("A_RDRAIN"):  # noqa: SIM117 - Amaranth control blocks
                with m.If(~score.pending):
                    with m.If(pv.tile_end == kv_len):  # hand the head to the finish, start the next one
                        m.d.comb += fin.start.eq(1)
                        m.d.sync += [head.eq(head + 1), elem_head.eq(elem_head + head_dim),
                                     out_head.eq(out_head + head_dim)]
                        with m.If(group_cnt == group - 1):
                            m.d.sync += [group_cnt.eq(0), kv_head.eq(kv_head + 1)]
                        with m.Else():
                            m.d.sync += group_cnt.eq(group_cnt + 1)
                        with m.If(head == q_heads - 1):
                            m.next = "A_WAITFIN"
                        with m.Else():
                            next_head_setup()
                            m.d.sync += elem.eq(elem_head + head_dim)
                            m.next = "A_SCORE"
                    with m.Else():
                        m.d.sync += [pv.tile_start.eq(pv.tile_end), pv.bank.eq(~pv.bank), first_tile.eq(0)]
                        m.next = "A_MSTEP"
            with m.State("A_WAITFIN"):
                with m.If(fin_fault):
                    finish(Fault.DIVIDE)
                with m.Elif(~fin.busy):
                    m.d.sync += word.eq(0)
                    m.d.comb += out.clear.eq(1)
                    m.next = "A_NPEAK"
            with m.State("A_NPEAK"):
                output_pass(0, "A_NPDRAIN")
            with m.State("A_NPDRAIN"):
                m.next = "A_NSTEP"
            with m.State("A_NSTEP"):
                m.d.sync += word.eq(0)
                with m.If(out.overflow):
                    finish(Fault.OVERFLOW)
                with m.Else():
                    m.d.comb += [self.ereg_w.addr.eq(att.dst_e), self.ereg_w.en.eq(1), self.ereg_w.data.eq(out.exp)]
                    m.next = "A_NWRITE"
            with m.State("A_NWRITE"):
                output_pass(1, "A_NWDRAIN")
            with m.State("A_NWDRAIN"):
                finish()

            with m.State("DONE"):
                m.d.comb += [self.done.valid.eq(1), self.done.payload.eq(fault)]
                m.next = "IDLE"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))
        return m
