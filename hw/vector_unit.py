"""Vector unit: VADD, VMUL, VSCALE, ACT, NORM, ROPE and ARGMAX, bit-exact with :mod:`kvoverlay.numerics`.

Dataflow
--------
Elementwise ops (VADD, VMUL, VSCALE, ACT, and the last two passes of NORM) stream
``vector_lanes`` elements per cycle through a six-stage pipeline (S2 three cycles long):

* S0 issues the activation-buffer word addresses of chunk ``i`` on read ports A and B;
* S1 selects the chunk's lanes from the returned words;
* S2 holds the chunk three cycles while the gates are looked up and interpolated (the gate table's address, its
  read and the interpolation's product, then its rounding and add, each ending in a register; none in the lane
  multiplier);
* S2a and S2b compute the wide, exact per-element results (sums aligned as
  :func:`~kvoverlay.numerics.align_sum` does, products, gated inputs, normalized inputs; NORM's
  ``z * g`` in S2b, so that no stage chains two multipliers);
* S3 feeds them to the :class:`~hw.normalize.Normalizer`.

Each stage is a component with its own signature, and stages hand each other registered,
never-stalled streams (the places where the bitstream build can add pipeline registers):
:class:`ChunkIssue` (S0, S1), :class:`Elementwise`, :class:`NormScalar` and :class:`Argmax` (S2),
:class:`Rope` (its own S0 to S2b) and :class:`WriteBack` (S3). :class:`VectorDecoder` reads the
operand fields and checks them; :class:`VectorUnit` only sequences the passes.

Every result needs the peak of the whole vector before any element can be rounded, so
each op runs two passes over its inputs: a *peak* pass (S3 ORs magnitudes) and a *write*
pass that **recomputes** the wide values from the inputs (no scratch memory; the inputs
are still in the buffer because the write pass only writes chunks it has already read)
and writes the rounded mantissas. The write pass is issued right behind the peak pass,
so the two passes cost ``2 * ceil(len / vector_lanes)`` cycles plus the pipeline.

NORM first runs a statistics pass (sum and sum of squares), then a scalar sequence
(restoring divider and digit-by-digit square root, as :func:`~kvoverlay.numerics.rsqrt`),
then the two passes above. LayerNorm's ``(c * r) // n`` with ``c = n * x - sum(x)`` equals
``x * r + floor(-sum(x) * r / n)`` exactly, so one scalar division replaces a per-element one.

ROPE pairs elements at arbitrary offsets (per-head slices, halves), so it runs one pair
per two cycles (x pair on ports A/B, then cos/sin) and emits one element per cycle into
S3, in both passes.

ARGMAX keeps the first largest element per chunk (ties go to the lower lane) and across
chunks (only a strictly larger value replaces the best).

Aliasing: the destination may equal a source (in place) or not overlap it; a destination
that overlaps a source at a different start is not supported (the write pass could
overwrite inputs it has yet to read).

Results: the destination exponent register (or ARGMAX's scalar register) is written in
the cycle ``done`` pulses. A fault (:class:`~hw.ports.Fault`) changes no state; set-up faults
end after two busy cycles (decode, set-up) and the ``done`` cycle, an exponent overflow after the full run (it is
known only once the peak pass is over, before the first write).

Where numerics computes in int64 and the hardware keeps the exact value
-----------------------------------------------------------------------
Bit-exact with :mod:`kvoverlay.numerics` wherever numerics' int64 arithmetic is exact.
Outside that range numerics wraps and the hardware does not:

* ACT: ``round_shift(x, -(ex + ACT_FRAC))`` shifts int64 left by up to 523 bits; it wraps for
  ``ex > 35``. The hardware saturates to the table ends (the mathematical result).
* NORM: eps is aligned with an int64 shift by ``eps_e - (2 * ex - 32)`` bits, which wraps from
  48 bits and gives 0 from 64, and :func:`~kvoverlay.numerics.scalar` fails on totals of 2**63
  and more. The hardware adds eps exactly (folding shifts above :data:`_EPS_SHIFT_CAP` into the
  exponent, which provably changes no bit that ``scalar`` keeps).
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from kvoverlay import isa, timing
from kvoverlay import numerics as nx

from .arith import narrow_times, select_word
from .divider import Divider, Multiplier
from .isa_layout import HEADER_LAYOUT, LAYOUTS
from .isqrt import Isqrt
from .lut import GATE_SHAPE, GateLut
from .lut import LATENCY as GATE_LATENCY
from .normalize import EXP_SHAPE, EXP_WIDE, Normalizer, bit_length, round_shift_expr, round_shift_halving
from .ports import EREG_SHAPE, Fault, abuf_lanes, abuf_read, abuf_write, ereg_read, ereg_write, reg_write, unit_signature
from .widths import log2_exact

__all__ = ["CHUNK_WIDE_BITS", "CMD_LAYOUT", "OPS", "WIDE_BITS", "Argmax", "ChunkIssue", "Elementwise", "NormScalar",
           "Pass", "Rope", "VectorDecoder", "VectorUnit", "WriteBack", "abuf_lanes", "chunk_layout", "wide_layout"]

#: Opcodes this unit executes (REQ runs on the REQ unit).
OPS = timing.VECTOR_OPS
#: The instruction the unit takes: every vector opcode's fields over one word.
CMD_LAYOUT = data.UnionLayout({name: LAYOUTS[name] for name in OPS})

PIPE_DEPTH = timing.VECTOR_PIPE_DEPTH
#: Left shifts of eps beyond this are folded into the exponent: the mean square (< 2**63)
#: then only touches bits that numerics.scalar rounds away.
_EPS_SHIFT_CAP = timing.NORM_EPS_SHIFT_CAP
#: Bits of the alignment guard (numerics.align_sum).
_GUARD = nx.ALIGN_GUARD
_GATE_BITS = nx.GATE_ONE.bit_length() - 1
_RECIP_BITS = timing.NORM_RECIP_BITS
#: NORM's x * r splits r here: the low bits (unsigned, so they fit the lane multiplier's 17-bit signed factor) and
#: the rest.
_RECIP_SPLIT = 16
#: Bits of NORM's x * r + d (signed): |x - mean| < 2**16 and r < 2**25 bound |x * r + d| by 2**41 + 1, d being
#: floor(-S * r / n) = floor(-mean * r); RMSNorm's d is 0 and |x * r| <= 2**40.
_NORM_XR_BITS = 16 + _RECIP_BITS + 1
#: Bits of NORM's z = round(x * r + d, NORM_Z_SHIFT): |z| <= 2**17 + 1.
_NORM_Z_BITS = _NORM_XR_BITS - nx.NORM_Z_SHIFT + 1
#: Bits of a wide value: ROPE's sum of two products aligned by up to GUARD bits (2**47 at most).
WIDE_BITS = 2 * 16 + _GUARD + 1
#: Bits of the chunk ops' wide values, which never reach lanes beyond the first in ROPE: VADD's aligned sum is below
#: 2**32 + 1 (two int16 moved left by at most GUARD bits); NORM's z * g below 2**33 (|z| <= 2**17 + 1: |x - mean| <
#: 2**16 times r < 2**25, over 2**NORM_Z_SHIFT); the products below 2**31.
CHUNK_WIDE_BITS = 34
LANE = signed(16)
#: A square of a lane: at most 2**30.
SQUARE = unsigned(31)

#: Operand fields by opcode: (first source, second source, and the exponent registers read: operands' or ROPE's
#: x, cos, sin). One-operand ops read their source on both ports.
_OPERANDS = {
    "VADD": ("a", "b", ("a_e", "b_e")),
    "VMUL": ("a", "b", ("a_e", "b_e")),
    "VSCALE": ("a", "a", ("a_e",)),
    "ACT": ("x", "x", ("x_e",)),
    "NORM": ("x", "g", ("x_e", "g_e")),
    "ROPE": ("x", "x", ("x_e", "cos_e", "sin_e")),
    "ARGMAX": ("x", "x", ()),
}


def _code(name):
    return isa.BY_NAME[name].code


def norm_heads_unsupported(f, config):
    """A NORM over each head the unit does not run: any without ``config.norm_heads``; a LayerNorm, heads that are
    not whole chunks (it walks each head's chunks, and a chunk's lanes share the head's scalars), or more than
    NORM_MAX_HEADS heads (it keeps their scalars)."""
    if not config.norm_heads:  # not built (config.norm_heads): every NORM over heads
        return f.head_dim != 0
    lg_v = log2_exact(config.vector_lanes)
    partial = f.head_dim[:lg_v].any() if lg_v else 0
    too_many = f.len > (f.head_dim << log2_exact(isa.NORM_MAX_HEADS))
    return (f.head_dim != 0) & ((f.kind == isa.ENUMS["norm"].index("layer")) | partial | too_many)


def _opcode(insn):
    return HEADER_LAYOUT(insn.as_value()[:HEADER_LAYOUT.size]).opcode


class Pass(enum.Enum, shape=2):
    """What a pass over the operands does with each chunk."""

    STATS = 0  # NORM: sum and sum of squares
    ARGMAX = 1
    PEAK = 2  # wide values into the normalizer's peak
    WRITE = 3  # wide values rounded and written


def chunk_layout(config) -> data.StructLayout:
    """``vector_lanes`` operand pairs, chunk ``idx`` of a pass, as the issue stage hands them to the datapaths."""
    V = config.vector_lanes
    return data.StructLayout({"kind": Pass, "idx": 16, "mask": V, "a": data.ArrayLayout(LANE, V),
                              "b": data.ArrayLayout(LANE, V)})


def wide_layout(config) -> data.StructLayout:
    """Wide values for the write-back: the ``mask`` lanes at element address ``addr`` (``single``: lane 0 alone, at
    any element address)."""
    V = config.vector_lanes
    return data.StructLayout({"kind": Pass, "wide": data.ArrayLayout(signed(WIDE_BITS), V), "mask": V,
                              "addr": range(config.act_buffer_words), "single": 1})


def _chunk_select(config):
    """Shape of a chunk's index within an activation-buffer word (one bit when a word holds a single chunk)."""
    return unsigned(max(1, log2_exact(abuf_lanes(config) // config.vector_lanes)))


def _pipe(layout) -> stream.Signature:
    """The output of a pipeline stage: valid and payload, never stalled."""
    return stream.Signature(layout, always_ready=True)


class VectorDecoder(wiring.Component):
    """Operand fields and set-up checks of a vector instruction.

    ``length`` and ``fault`` are current a cycle after ``insn`` (which holds): ROPE's element count is a product
    in logic, registered before the checks and the passes take it; the other fields are combinational.

    Attributes
    ----------
    insn : In(CMD_LAYOUT)
    src_a, src_b, dst, length : Out(16)
        Element addresses of the operands and the destination, and the element count (registered).
    dst_e, ereg_a, ereg_b, ereg_c : Out(range(NUM_EREGS))
        The destination exponent register and the exponent registers to read (:data:`_OPERANDS`).
    fault : Out(Fault)
        The set-up fault; ``Fault.NONE`` for an instruction the unit runs.
    """

    def __init__(self, config):
        self.config = config
        reg = range(isa.NUM_EREGS)
        super().__init__({"insn": In(CMD_LAYOUT), "src_a": Out(16), "src_b": Out(16), "dst": Out(16),
                          "length": Out(16), "dst_e": Out(reg), "ereg_a": Out(reg), "ereg_b": Out(reg),
                          "ereg_c": Out(reg), "fault": Out(Fault)})

    def elaborate(self, platform):
        m = Module()
        opcode = _opcode(self.insn)
        is_op = {name: opcode == _code(name) for name in OPS}
        length = Signal(16, name="length_next")
        with m.Switch(opcode):
            for name, (a, b, eregs) in _OPERANDS.items():
                with m.Case(_code(name)):
                    v = self.insn[name]
                    m.d.comb += [self.src_a.eq(v[a]), self.src_b.eq(v[b])]
                    m.d.comb += [port.eq(v[field]) for port, field in zip((self.ereg_a, self.ereg_b, self.ereg_c),
                                                                          eregs)]
                    if name != "ARGMAX":
                        m.d.comb += [self.dst.eq(v.dst), self.dst_e.eq(v.dst_e)]
                    m.d.comb += length.eq(narrow_times(v.heads, v.head_dim) if name == "ROPE" else v.len)
        # ROPE's heads * head_dim (an adder per bit of heads) and the count's uses (the checks' sums and compares, the
        # issue stage's chunk count) in one cycle were the unit's critical path (docs/boards.md, vecfmax)
        m.d.sync += self.length.eq(length)

        n_words = self.config.act_buffer_words
        lg_l = log2_exact(abuf_lanes(self.config))

        def beyond(start, n):
            return (start + n) > n_words

        def unaligned(addr):
            return addr[:lg_l] != 0 if lg_l else Const(0)

        rope = self.insn.ROPE
        half = rope.head_dim >> 1
        writes = ~is_op["ARGMAX"]
        with m.If(~Cat(*is_op.values()).any()):
            m.d.comb += self.fault.eq(Fault.OPCODE)
        with m.Elif(is_op["ROPE"]):
            with m.If((rope.head_dim == 0) | rope.head_dim[0] | (rope.heads == 0)):
                m.d.comb += self.fault.eq(Fault.SHAPE)
            with m.Elif(beyond(rope.x, self.length) | beyond(rope.dst, self.length) | beyond(rope.cos, half)
                        | beyond(rope.sin, half)):
                m.d.comb += self.fault.eq(Fault.OUT_OF_RANGE)
        with m.Elif(beyond(self.src_a, self.length) | beyond(self.src_b, self.length)
                    | (writes & beyond(self.dst, self.length))):
            m.d.comb += self.fault.eq(Fault.OUT_OF_RANGE)
        with m.Elif((is_op["NORM"] | is_op["ARGMAX"]) & (self.length == 0)):
            m.d.comb += self.fault.eq(Fault.SHAPE)
        with m.Elif(is_op["NORM"] & norm_heads_unsupported(self.insn.NORM, self.config)):
            m.d.comb += self.fault.eq(Fault.SHAPE)
        with m.Elif(unaligned(self.src_a) | unaligned(self.src_b) | (writes & unaligned(self.dst))):
            m.d.comb += self.fault.eq(Fault.UNALIGNED)
        return m


class ChunkIssue(wiring.Component):
    """Stages S0 and S1 of the chunk pipeline: one pass, or a peak pass and a write pass back to back, over
    ``ceil(length / vector_lanes)`` chunks of the two source vectors.

    S0 issues chunk ``i``'s buffer word addresses, S1 selects its lanes from the returned words; the chunk
    leaves registered, at S2.

    Attributes
    ----------
    start : In(1)
        Starts a pass of ``kind`` (a ``PEAK`` pass is followed by a ``WRITE`` pass unless ``single``).
    kind : In(Pass)
    single : In(1)
        A ``PEAK`` pass alone (NORM over each head: the peak of every head before any write).
    src_a, src_b, length : In(16)
        Element addresses of the sources (buffer-word aligned) and the element count (at least 1; ``length`` is
        taken with ``start``).
    first : In(16)
        The chunk a pass starts from (NORM's heads): the pass covers chunks ``first`` to the one holding element
        ``length - 1``.
    rd_a, rd_b : Out(abuf_read(config))
    early_a, early_b : Out(ArrayLayout(signed(16), vector_lanes))
        The ports' lanes at S1, a cycle ahead of ``chunk``, for :class:`Rope`, which picks its elements from them.
    ext_select : In(1)
        S1 selects chunks ``ext_chunk_a`` and ``ext_chunk_b`` of the returned words instead of its own (ROPE's
        reads), so that the unit has one word-to-chunk select per port.
    ext_chunk_a, ext_chunk_b : In(range(chunks per buffer word))
    chunk : Out(stream.Signature(chunk_layout(config)))
        The chunks, at S2.
    last : Out(1)
        The last chunk of the last pass issues in this cycle.
    """

    def __init__(self, config):
        self.config = config
        V = config.vector_lanes
        sel = _chunk_select(config)
        super().__init__({"start": In(1), "kind": In(Pass), "single": In(1), "src_a": In(16), "src_b": In(16),
                          "length": In(16), "first": In(16),
                          "rd_a": Out(abuf_read(config)), "rd_b": Out(abuf_read(config)),
                          "early_a": Out(data.ArrayLayout(LANE, V)), "early_b": Out(data.ArrayLayout(LANE, V)),
                          "ext_select": In(1), "ext_chunk_a": In(sel), "ext_chunk_b": In(sel),
                          "chunk": Out(_pipe(chunk_layout(config))), "last": Out(1)})

    def elaborate(self, platform):
        m = Module()
        V = self.config.vector_lanes
        lg_v = log2_exact(V)
        lg_l = log2_exact(abuf_lanes(self.config))
        lg_g = lg_l - lg_v  # chunks per buffer word: 2**lg_g

        # S0; the count is latched at the start, so that the end compare and the lane masks start from a register
        issue = Signal(name="issue")
        idx = Signal(16, name="issue_idx")
        kind = Signal(Pass, name="issue_kind")
        end = Signal(name="pass_end")
        length = Signal(16, name="pass_length")
        with m.If(self.start):
            m.d.sync += length.eq(self.length)
        m.d.comb += [
            end.eq(idx == ((length + V - 1) >> lg_v) - 1),
            self.last.eq(issue & end & ((kind != Pass.PEAK) | self.single)),
            self.rd_a.addr.eq((self.src_a >> lg_l) + (idx >> lg_g)), self.rd_a.en.eq(1),
            self.rd_b.addr.eq((self.src_b >> lg_l) + (idx >> lg_g)), self.rd_b.en.eq(1),
        ]
        with m.If(self.start):
            m.d.sync += [issue.eq(1), idx.eq(self.first), kind.eq(self.kind)]
        with m.Elif(issue & end):
            m.d.sync += [idx.eq(self.first), kind.eq(Pass.WRITE), issue.eq((kind == Pass.PEAK) & ~self.single)]
        with m.Elif(issue):
            m.d.sync += idx.eq(idx + 1)

        # S1
        s1 = Signal(chunk_layout(self.config), name="s1")
        s1_valid = Signal(name="s1_valid")
        sel = s1.idx[:lg_g] if lg_g else Const(0, 1)
        m.d.sync += [s1_valid.eq(issue), s1.kind.eq(kind), s1.idx.eq(idx)]

        def chunk_of(word, ext, name):
            index = Mux(self.ext_select, ext, sel)
            return select_word(m, word, index, 16 * V, name=name) if lg_g else word.word_select(index, 16 * V)
        m.d.comb += [self.early_a.eq(chunk_of(self.rd_a.data, self.ext_chunk_a, "s1_chunk_a")),
                     self.early_b.eq(chunk_of(self.rd_b.data, self.ext_chunk_b, "s1_chunk_b")),
                     s1.a.eq(self.early_a), s1.b.eq(self.early_b)]
        for j in range(V):
            m.d.comb += s1.mask[j].eq((s1.idx * V + j) < length)

        # S2
        m.d.sync += [self.chunk.valid.eq(s1_valid), self.chunk.payload.eq(s1)]
        return m


class Elementwise(wiring.Component):
    """Stages S2 to S2b of VADD, VMUL, VSCALE, ACT and NORM's passes: exact wide results of a chunk.

    VADD aligns as :func:`~kvoverlay.numerics.align_sum`; ACT multiplies by the gate of
    :class:`~hw.lut.GateLut`, read from the chunk's registered lanes and ready beside it at S2a; NORM computes ``z * g`` with
    ``z = round_shift(x * r + d, NORM_Z_SHIFT)`` from :class:`NormScalar`'s ``r`` and ``d``.

    Attributes
    ----------
    insn : In(CMD_LAYOUT)
    exp_a, exp_b : In(EREG_SHAPE)
        The operands' exponents.
    dst : In(16)
        Element address of the destination.
    recip, mean, recip_exp : In
        NORM's ``r``, ``d`` and the exponent of ``r``.
    xshift : In(range(16))
        NORM over each head: the head's left shift to full scale (0 otherwise).
    chunk : In(stream.Signature(chunk_layout(config)))
    staged : Out(stream.Signature(chunk_layout(config)))
        The chunk at S2a, ``GATE_LATENCY`` cycles after ``chunk`` (when its gates and lane products are ready).
    wide : Out(stream.Signature(wide_layout(config)))
        The chunk's wide values, for peak and write passes, two cycles after ``staged`` (stages S2a and S2b).
    exp : Out(EXP_WIDE)
        Exponent of the wide values.
    square : Out(ArrayLayout(SQUARE, vector_lanes))
        NORM: the squares of the ``staged`` chunk's ``a`` lanes, from the lane multipliers, for
        :class:`NormScalar`'s statistics pass (combinational).
    """

    def __init__(self, config):
        self.config = config
        V = config.vector_lanes
        mean_bits = timing.norm_widths(config)["mean_div"] + 2
        super().__init__({"insn": In(CMD_LAYOUT), "exp_a": In(EREG_SHAPE), "exp_b": In(EREG_SHAPE), "dst": In(16),
                          "recip": In(_RECIP_BITS), "mean": In(signed(mean_bits)), "recip_exp": In(EXP_WIDE),
                          "xshift": In(range(nx.MANT_BITS + 1)),
                          "chunk": In(_pipe(chunk_layout(config))), "staged": Out(_pipe(chunk_layout(config))),
                          "wide": Out(_pipe(wide_layout(config))), "exp": Out(EXP_WIDE),
                          "square": Out(data.ArrayLayout(SQUARE, V))})

    def elaborate(self, platform):
        m = Module()
        V = self.config.vector_lanes
        f, ea, eb = self.insn, self.exp_a, self.exp_b
        opcode = _opcode(f)
        m.submodules.gate_lut = lut = GateLut(V)
        # the table reads the chunk's registered lanes, not the S1 lanes: those come from the activation buffer's block
        # RAM through the word's chunk select, which with the gate's round-shift and the table position ahead of the
        # ROM's address would be one path (docs/boards.md, vecfmax)
        m.d.comb += [lut.x.eq(self.chunk.payload.a), lut.exp.eq(ea), lut.func.eq(f.ACT.func)]

        # VADD: each operand moves left by its exponent above top = max(ea, eb) - GUARD (numerics.align_sum), so the
        # operand with the larger exponent always moves left by GUARD bits, a plain wiring, and only the other one
        # moves: by t = GUARD - |ea - eb|, to the right (rounding) when that is negative. It moves on the lane
        # multiplier, which VADD leaves idle: times 2**(t mod GUARD), then t in [0, GUARD) is that product, t == GUARD
        # the product of 2**(GUARD - 1) moved left by one, t in [-GUARD, 0) the product rounded by GUARD bits (round
        # half up reads bit GUARD - 1), and t < -GUARD rounds any int16 to 0
        # the exponents and the instruction hold from the set-up on, and the first chunk reaches S2 three cycles later:
        # what they decode to is registered (no cycle), so that no path runs from the instruction or exponent registers
        # through the decodes into the lane multipliers and the sums after them (in the whole unit, 45.6 MHz:
        # docs/boards.md, vecfmax2)
        top = Signal(EXP_WIDE, name="add_top")
        b_big = Signal(name="add_b_big")
        shift_small = Signal(EXP_WIDE, name="add_shift_small")
        m.d.comb += [top.eq(Mux(ea > eb, ea, eb) - _GUARD), shift_small.eq(Mux(eb > ea, ea, eb) - top)]
        m.d.sync += b_big.eq(eb > ea)
        add_factor = Signal(_GUARD, name="add_factor")
        add_equal = Signal(name="add_equal_exps")  # t == GUARD
        add_right = Signal(name="add_right")  # t in [-GUARD, 0)
        add_zero = Signal(name="add_zero")  # t < -GUARD
        m.d.sync += [add_equal.eq(shift_small == _GUARD), add_right.eq((shift_small < 0) & (shift_small >= -_GUARD)),
                     add_zero.eq(shift_small < -_GUARD),
                     add_factor.eq(Mux(shift_small == _GUARD, 1 << (_GUARD - 1),
                                       Const(1, _GUARD) << shift_small[:log2_exact(_GUARD)]))]
        is_op = {name: Signal(name=f"is_{name.lower()}") for name in ("VADD", "VMUL", "VSCALE", "ACT", "NORM")}
        m.d.sync += [flag.eq(opcode == _code(name)) for name, flag in is_op.items()]
        is_vadd = is_op["VADD"]
        with m.Switch(opcode):
            for name, exp in (("VADD", top), ("VMUL", ea + eb), ("VSCALE", ea + f.VSCALE.imm_e),
                              ("ACT", ea - _GATE_BITS), ("NORM", ea + self.recip_exp + nx.NORM_Z_SHIFT + eb)):
                with m.Case(_code(name)):
                    m.d.comb += self.exp.eq(exp)

        # S2 holds the chunk beside its gates (the gate table's ROM, its interpolation's product, then its rounding
        # and add: GateLut, LATENCY cycles from S2), GATE_LATENCY cycles; S2a computes each lane's value (NORM: z)
        # and registers it; S2b multiplies NORM's z by g, so that neither half chains two multipliers
        s2_valid, s2 = self.chunk.valid, self.chunk.payload
        for k in range(GATE_LATENCY - 1):
            held_valid = Signal(name=f"s2_held_valid{k}")
            held = Signal(chunk_layout(self.config), name=f"s2_held{k}")
            m.d.sync += [held_valid.eq(s2_valid), held.eq(s2)]
            s2_valid, s2 = held_valid, held
        c = self.staged.payload
        m.d.sync += [self.staged.valid.eq(s2_valid), c.eq(s2)]
        out = self.wide.payload
        is_norm = is_op["NORM"]
        m.d.sync += [self.wide.valid.eq(self.staged.valid & ((c.kind == Pass.PEAK) | (c.kind == Pass.WRITE))),
                     out.kind.eq(c.kind), out.mask.eq(c.mask), out.addr.eq(self.dst + c.idx * V)]
        is_act = is_op["ACT"]
        for j in range(V):
            a, b = s2.a[j], s2.b[j]
            # the lane multiplier's operands are chosen at S2 and registered (but for ACT's gate, GateLut's own
            # register), so that S2a starts from registers: the operand selects and the multiplier never share a cycle
            # the multipliers' a: for a NORM over each head, the head's mantissas at full scale (exact: they stay in
            # 16 bits); the shift is 0 for every other op and pass. VADD's is its smaller operand
            am = Signal(LANE, name=f"s2_mul_a{j}")
            m.d.comb += am.eq((a << self.xshift)[:16] if self.config.norm_heads else a)
            mul_a = Signal(LANE, name=f"mul_a{j}")
            big = Signal(LANE, name=f"add_big{j}")
            m.d.sync += [mul_a.eq(Mux(is_vadd, Mux(b_big, a, b), am)), big.eq(Mux(b_big, b, a))]
            # VMUL, VSCALE and ACT multiply a by b, the immediate or the gate, VADD its smaller operand by a power of
            # two: one lane multiplier (16 x 17 bits, one MULT18X18D) serves all four
            factor_reg = Signal(signed(GATE_SHAPE.width + 1), name=f"s2a_factor{j}")
            with m.If(is_op["VADD"]):
                m.d.sync += factor_reg.eq(add_factor)
            with m.Elif(is_op["VSCALE"]):
                m.d.sync += factor_reg.eq(f.VSCALE.imm_m)
            with m.Elif(is_op["NORM"]):  # the statistics pass's squares, then the low bits of x * r
                m.d.sync += factor_reg.eq(Mux(s2.kind == Pass.STATS, a, self.recip[:_RECIP_SPLIT]))
            with m.Else():
                m.d.sync += factor_reg.eq(b)
            factor = Signal(signed(GATE_SHAPE.width + 1), name=f"factor{j}")
            m.d.comb += factor.eq(Mux(is_act, lut.gate[j], factor_reg))
            b = c.b[j]
            product = Signal(signed(16 + GATE_SHAPE.width + 1), name=f"product{j}")
            m.d.comb += [product.eq(mul_a * factor), self.square[j].eq(product)]
            aligned = Signal(signed(16 + _GUARD), name=f"add_aligned{j}")
            with m.If(add_equal):
                m.d.comb += aligned.eq(product << 1)
            with m.Elif(add_right):
                m.d.comb += aligned.eq((product >> _GUARD) + product[_GUARD - 1])
            with m.Elif(~add_zero):
                m.d.comb += aligned.eq(product)
            # NORM: x * r in two parts (the lane multiplier takes r's low bits), then z * g with z's top bits in
            # logic: one more MULT18X18D each
            xr_hi = Signal(signed(16 + _RECIP_BITS - _RECIP_SPLIT + 1), name=f"norm_xr_hi{j}")
            m.d.comb += xr_hi.eq(mul_a * self.recip[_RECIP_SPLIT:])  # NORM's mul_a is its am
            zr = Signal(signed(_NORM_XR_BITS), name=f"norm_xr{j}")
            m.d.comb += zr.eq(product + (xr_hi << _RECIP_SPLIT) + self.mean)
            z = Signal(signed(_NORM_Z_BITS), name=f"norm_z{j}")
            m.d.comb += z.eq((zr + (1 << (nx.NORM_Z_SHIFT - 1))) >> nx.NORM_Z_SHIFT)
            pre = Signal(signed(CHUNK_WIDE_BITS), name=f"s2b_value{j}")  # S2b: NORM's z, the others' result
            g = Signal(LANE, name=f"s2b_g{j}")
            m.d.sync += g.eq(b)
            for name, value in (("VADD", (big << _GUARD) + aligned), ("VMUL", product), ("VSCALE", product),
                                ("ACT", product), ("NORM", z)):
                with m.If(is_op[name]):
                    m.d.sync += pre.eq(value)
            zg = Signal(signed(_NORM_Z_BITS + 16), name=f"norm_zg{j}")
            m.d.comb += [zg.eq(pre[:17] * g + (narrow_times(pre[17:_NORM_Z_BITS].as_signed(), g) << 17)),
                         out.wide[j].eq(Mux(is_norm, zg, pre))]
        return m


class NormScalar(wiring.Component):
    """NORM's statistics pass and scalar sequence: ``r = rsqrt(mean square + eps)`` and LayerNorm's mean term.

    The statistics pass sums the valid lanes and their squares; the sequence then runs as
    :func:`~kvoverlay.numerics.norm` and :func:`~kvoverlay.numerics.rsqrt` on a restoring
    :class:`~hw.divider.Divider` and an :class:`~hw.isqrt.Isqrt`: LayerNorm's
    ``ss = (n * Q - S * S) // n``, the mean square ``(ss << NORM_MS_FRAC) // n``, eps added, rounded
    to ``SCALAR_BITS`` (in :data:`~kvoverlay.timing.NORM_SCALAR_STEPS` coarse steps and one narrow round-shift;
    exponent made even), the root, ``r = 2**RSQRT_NUM // root``, and for LayerNorm ``d = floor(-S * r / n)``.

    Over each head (:func:`~kvoverlay.numerics.norm_heads`) the sequence runs once per head: the statistics pass also
    takes the head's peak, whose shift ``t`` to full scale scales the sum of squares by ``4**t`` and the exponent by
    ``2**-t``; a last state (``ALIGN``) keeps the largest ``f = er - t`` of a nonzero head and stores the head's
    ``(r, f, t)``. Before each of the head's passes, ``load`` rounds its ``r`` right to the largest ``f`` and hands
    ``t`` to the lanes.

    Attributes
    ----------
    insn : In(LAYOUTS["NORM"])
    exp_x : In(EREG_SHAPE)
    count : In(16)
        The elements normalized together: the vector's, or the head's.
    heads, reset_max, load : In(1)
        A NORM over each head; resets the largest exponent; loads head ``head``'s aligned scalars.
    head : In(range(NORM_MAX_HEADS))
    clear : In(1)
        Zeroes the sums (before the statistics pass).
    chunk : In(stream.Signature(chunk_layout(config)))
        ``STATS`` chunks are summed.
    square : In(ArrayLayout(SQUARE, vector_lanes))
        The squares of the chunk's ``a`` lanes (:class:`Elementwise`'s lane multipliers): the chunk is
        :class:`Elementwise`'s ``staged`` one.
    start : In(1)
        Starts the sequence (ignored while it runs).
    done : Out(1)
        The sequence's last cycle; ``recip``, ``mean`` and ``recip_exp`` hold from the next.
    recip, mean, recip_exp : Out
    xshift : Out(range(16))
        The head's shift to full scale, from its ``ALIGN`` state until the next ``clear`` (0 otherwise).
    """

    def __init__(self, config):
        self.config = config
        V = config.vector_lanes
        self.widths = timing.norm_widths(config)
        super().__init__({"insn": In(LAYOUTS["NORM"]), "exp_x": In(EREG_SHAPE), "count": In(16), "heads": In(1),
                          "reset_max": In(1), "load": In(1), "head": In(range(isa.NORM_MAX_HEADS)),
                          "xshift": Out(range(nx.MANT_BITS + 1)), "clear": In(1),
                          "chunk": In(_pipe(chunk_layout(config))), "square": In(data.ArrayLayout(SQUARE, V)),
                          "start": In(1), "done": Out(1),
                          "recip": Out(_RECIP_BITS), "mean": Out(signed(self.widths["mean_div"] + 2)),
                          "recip_exp": Out(EXP_WIDE)})

    def elaborate(self, platform):
        m = Module()
        nw = self.widths
        k = timing.SCALAR_BITS_PER_CYCLE
        V = self.config.vector_lanes
        divisions = (nw["ss_div"], nw["ms_div"], nw["recip_div"], nw["mean_div"])  # the bits of divide()'s calls
        m.submodules.divider = div = Divider(max(divisions), max(nw["n"], nw["root"] + 1), k, bit_counts=divisions)
        m.submodules.isqrt = sq = Isqrt(nw["root"], k)
        m.submodules.multiplier = mul = Multiplier(nw["mul_a"], nw["mul_b"], k)

        # statistics: sum and sum of squares of the valid lanes
        stat_sum = Signal(signed(nw["sum"]), name="stat_sum")
        stat_sq = Signal(nw["sq"], name="stat_sumsq")
        c = self.chunk.payload
        chunk_sum = sum(Mux(c.mask[j], c.a[j], 0) for j in range(V))
        chunk_sq = sum(Mux(c.mask[j], self.square[j], 0) for j in range(V))
        # over each head: the OR of the magnitudes has the peak's bit length
        stat_peak = Signal(16, name="stat_peak")
        chunk_peak = 0
        built = self.config.norm_heads  # NORM over each head: its peak, shift t, scalar store and ALIGN state
        for j in range(V if built else 0):
            chunk_peak = chunk_peak | Mux(c.mask[j], Mux(c.a[j] < 0, -c.a[j], c.a[j])[:16], 0)
        # the chunk's sums are registered before they accumulate: the squares come straight from the lane
        # multipliers (Elementwise), and the multiplier, the sum over the lanes and the accumulation in one cycle
        # were the unit's critical path once the decoder's was gone (docs/boards.md, vecfmax)
        held_valid = Signal(name="stat_chunk_valid")
        held_sum = Signal(Value.cast(chunk_sum).shape(), name="stat_chunk_sum")
        held_sq = Signal(Value.cast(chunk_sq).shape(), name="stat_chunk_sumsq")
        held_peak = Signal(16, name="stat_chunk_peak")
        m.d.sync += [held_valid.eq(self.chunk.valid & (c.kind == Pass.STATS)), held_sum.eq(chunk_sum),
                     held_sq.eq(chunk_sq), held_peak.eq(chunk_peak)]
        with m.If(self.clear):
            m.d.sync += [stat_sum.eq(0), stat_sq.eq(0), stat_peak.eq(0), self.recip.eq(0), self.mean.eq(0),
                         self.xshift.eq(0)]
        with m.Elif(held_valid):
            m.d.sync += [stat_sum.eq(stat_sum + held_sum), stat_sq.eq(stat_sq + held_sq),
                         stat_peak.eq(stat_peak | held_peak)]

        f = self.insn
        n = Signal(nw["n"], name="norm_n")
        m.d.comb += n.eq(self.count)
        # the head's shift to full scale t = max(0, MANT_BITS - bitlen(peak)) (0 for a zero head, or whole vectors)
        peak_bits = bit_length(m, stat_peak, "norm_peak_bits")
        t = Signal(range(nx.MANT_BITS + 1), name="norm_head_shift")
        if built:
            with m.If(self.heads & (peak_bits != 0) & (peak_bits < nx.MANT_BITS)):
                m.d.comb += t.eq(nx.MANT_BITS - peak_bits)
        sum_sq = Signal(nw["sq"], name="norm_sum_sq")  # of the shifted mantissas: at most count * 2**30
        m.d.comb += sum_sq.eq(stat_sq << (t << 1))
        n_pow2 = Signal(name="norm_n_pow2")
        lg_n = Signal(range(nw["n"]), name="norm_lg_n")
        m.d.comb += [n_pow2.eq((n != 0) & ((n & (n - 1)) == 0)), lg_n.eq(bit_length(m, n, "norm_n_bits") - 1)]
        # the sequence's first state (PREP) registers the head shift, the scaled sum of squares and log2(n), so that
        # neither the peak's priority encoder nor the shifts chain into the mean square or the eps alignment
        t_reg = Signal.like(t, name="norm_head_shift_reg")
        sum_sq_reg = Signal.like(sum_sq, name="norm_sum_sq_reg")
        lg_n_reg = Signal.like(lg_n, name="norm_lg_n_reg")
        layer = f.kind == isa.ENUMS["norm"].index("layer")
        ss = Signal(nw["sq"], name="norm_ss")
        ms = Signal(nw["ms_div"], name="norm_mean_sq")
        total = Signal(timing.NORM_TOTAL_BITS, name="norm_total")
        total_exp = Signal(EXP_WIDE, name="norm_total_exp")
        sc_m = Signal(nx.SCALAR_BITS + 2, name="norm_scalar_m")
        sc_e = Signal(EXP_WIDE, name="norm_scalar_e")
        # eps aligned to the mean square's exponent base = 2 * ex - NORM_MS_FRAC
        # registered from t_reg in every cycle: EPS_ALIGN comes two cycles after PREP or later
        base = Signal(EXP_WIDE, name="norm_base")
        eps_shift = Signal(EXP_WIDE, name="norm_eps_shift")  # left shift of eps_m
        base_next = Signal(EXP_WIDE, name="norm_base_next")
        m.d.comb += base_next.eq(((self.exp_x - t_reg) << 1) - nx.NORM_MS_FRAC)
        m.d.sync += [base.eq(base_next), eps_shift.eq(f.eps_e - base_next)]
        eps_al = round_shift_halving(m, Cat(f.eps_m, Const(0, 1)).as_signed(), -eps_shift, 17, _EPS_SHIFT_CAP,
                                     "norm_eps")
        # eps aligned in a state of its own (EPS_ALIGN), then added to the mean square (EPS)
        eps_al_reg = Signal.like(eps_al, name="norm_eps_aligned_reg")
        eps_big = Signal(name="norm_eps_big")
        eps_big_exp = Signal(EXP_WIDE, name="norm_eps_big_exp")
        base_reg = Signal(EXP_WIDE, name="norm_base_reg")
        total_next = Signal.like(total, name="norm_total_next")
        total_exp_next = Signal(EXP_WIDE, name="norm_total_exp_next")
        with m.If(eps_big):
            m.d.comb += [total_next.eq(f.eps_m << _EPS_SHIFT_CAP), total_exp_next.eq(eps_big_exp)]
        with m.Else():
            m.d.comb += [total_next.eq(ms + eps_al_reg), total_exp_next.eq(base_reg)]
        # numerics.scalar, staged (timing.NORM_SCALAR_STEPS): while the total is wider than the window, it moves
        # right by a step. The steps never pass bit s - 1 of the round-shift by s = bitlen - SCALAR_BITS (each is
        # taken at a bit length of window + 1 or more, and leaves SCALAR_BITS + 1 or more), and a round half up only
        # reads the bits from s - 1 up: round_shift(t >> a, s - a) == round_shift(t, s). The last round-shift then
        # moves a window-wide value by at most one step
        step = timing.NORM_SCALAR_STEP
        window = nx.SCALAR_BITS + step
        steps = Signal(range(timing.NORM_SCALAR_STEPS + 1), name="norm_scalar_steps")
        tot_len = Signal(range(window + 1), name="norm_total_bits_reg")  # registered in SCALAR_BITS
        sc_shift = Signal(signed(len(tot_len) + 2), name="norm_scalar_shift")
        m.d.comb += sc_shift.eq(tot_len - nx.SCALAR_BITS)
        sc_round = round_shift_halving(m, Cat(total[:window], Const(0, 1)).as_signed(), sc_shift,
                                       step, nx.SCALAR_BITS, "norm_scalar_round", out_bits=len(sc_m))
        sc_exp = Signal(EXP_WIDE, name="norm_scalar_exp")
        m.d.comb += sc_exp.eq(total_exp + sc_shift)
        sum_mag = Signal(nw["sum"], name="norm_sum_mag")
        m.d.comb += sum_mag.eq(Mux(stat_sum < 0, -stat_sum, stat_sum))
        nq = Signal(nw["n"] + nw["sq"], name="norm_nq")

        # over each head: the largest f = er - t of a nonzero head (0 if none); each head's (r, f, t) kept for its
        # passes, r then rounded right to the largest f (a zero head's f may exceed it: its r then stays, and its
        # products are 0)
        exp_max = Signal(EXP_WIDE, name="norm_exp_max")
        found = Signal(name="norm_exp_found")
        head_exp = Signal(EXP_WIDE, name="norm_head_exp")
        m.d.comb += head_exp.eq(self.recip_exp - t)
        if built:
            with m.If(self.reset_max):
                m.d.sync += [exp_max.eq(0), found.eq(0)]
            kept = data.StructLayout({"r": _RECIP_BITS, "f": EXP_WIDE, "t": range(nx.MANT_BITS + 1)})
            m.submodules.head_scalars = store = Memory(shape=kept, depth=isa.NORM_MAX_HEADS, init=[])
            wr = store.write_port()
            rd = store.read_port(domain="comb")
            m.d.comb += [wr.addr.eq(self.head), rd.addr.eq(self.head), wr.data.r.eq(self.recip),
                         wr.data.f.eq(head_exp), wr.data.t.eq(t)]
            recip_al = round_shift_halving(m, Cat(rd.data.r, Const(0, 1)).as_signed(), exp_max - rd.data.f,
                                           _RECIP_BITS + 1, 0, "norm_recip_aligned")
            with m.If(self.load):
                m.d.sync += [self.recip.eq(recip_al), self.recip_exp.eq(exp_max), self.xshift.eq(rd.data.t)]

        def divide(state, numerator, denominator, bits, after):
            """A state that starts a division and one that waits for it, then runs *after* in its last cycle."""
            with m.State(state):
                m.d.comb += [div.start.eq(1), div.numerator.eq(numerator), div.denominator.eq(denominator),
                             div.bits.eq(bits)]
                m.next = f"{state}_WAIT"
            with m.State(f"{state}_WAIT"), m.If(div.done):
                after()

        def multiply(state, a, b, after):
            """A state that starts a product on the multiplier and one that waits for it, then runs *after*."""
            with m.State(state):
                m.d.comb += [mul.start.eq(1), mul.a.eq(a), mul.b.eq(b)]
                m.next = f"{state}_WAIT"
            with m.State(f"{state}_WAIT"), m.If(mul.done):
                after()

        def then(state, *statements):
            def after():
                m.d.sync += list(statements)
                m.next = state
            return after

        def finish_recip():
            m.d.sync += [self.recip.eq(div.quotient),
                         self.recip_exp.eq(-(sc_e >> 1) + nx.RSQRT_FRAC // 2 - nx.RSQRT_NUM)]
            with m.If(layer):
                m.next = "SUM_R"
            if built:
                with m.Elif(self.heads):
                    m.next = "ALIGN"
            with m.Else():
                m.d.comb += self.done.eq(1)
                m.next = "IDLE"

        def finish_mean():  # floor(-S * r / n) from |S * r| // n (r > 0)
            with m.If(stat_sum < 0):
                m.d.sync += self.mean.eq(div.quotient)
            with m.Else():
                m.d.sync += self.mean.eq(-(div.quotient + (div.remainder != 0)))
            m.d.comb += self.done.eq(1)
            m.next = "IDLE"

        with m.FSM(name="norm_state"):
            with m.State("IDLE"), m.If(self.start):
                m.next = "PREP"
            with m.State("PREP"):
                m.d.sync += [t_reg.eq(t), sum_sq_reg.eq(sum_sq), lg_n_reg.eq(lg_n)]
                with m.If(layer):
                    m.next = "NQ"
                if built:
                    with m.Elif(self.heads & n_pow2):
                        m.next = "MS_SHIFT"
                with m.Else():
                    m.next = "MS"
            if built:
                with m.State("MS_SHIFT"):  # a head of 2**k elements (q/k norms): the mean square is a shift
                    m.d.sync += ms.eq((sum_sq_reg << nx.NORM_MS_FRAC) >> lg_n_reg)
                    m.next = "EPS_ALIGN"
            # LayerNorm: ss = (n * Q - S * S) // n
            multiply("NQ", stat_sq, n, then("SQUARE", nq.eq(mul.product)))
            multiply("SQUARE", sum_mag, sum_mag, then("SS"))
            divide("SS", nq - mul.product, n, nw["ss_div"], then("MS", ss.eq(div.quotient)))
            # ms = (ss << NORM_MS_FRAC) // n; RMSNorm's ss is the sum of squares itself
            divide("MS", Mux(layer, ss, sum_sq_reg) << nx.NORM_MS_FRAC, n, nw["ms_div"],
                   then("EPS_ALIGN", ms.eq(div.quotient)))
            with m.State("EPS_ALIGN"):
                m.d.sync += [eps_al_reg.eq(Mux(f.eps_m != 0, eps_al, 0)),
                             eps_big.eq((f.eps_m != 0) & (eps_shift > _EPS_SHIFT_CAP)),
                             eps_big_exp.eq(base + eps_shift - _EPS_SHIFT_CAP), base_reg.eq(base)]
                m.next = "EPS"
            with m.State("EPS"):
                m.d.sync += [total.eq(Mux(total_next == 0, 1, total_next)), total_exp.eq(total_exp_next),
                             steps.eq(0)]
                m.next = "SCALAR_STEPS"
            with m.State("SCALAR_STEPS"):
                with m.If(total[window:].any()):
                    m.d.sync += [total.eq(total >> step), total_exp.eq(total_exp + step)]
                m.d.sync += steps.eq(steps + 1)
                with m.If(steps == timing.NORM_SCALAR_STEPS - 1):
                    m.next = "SCALAR_BITS"
            with m.State("SCALAR_BITS"):  # the total's bit length (a priority encoder) ahead of its round-shift
                m.d.sync += tot_len.eq(bit_length(m, total[:window], "norm_total_bits"))
                m.next = "SCALAR"
            with m.State("SCALAR"):  # the last round-shift of numerics.scalar, then make the exponent even
                with m.If(sc_exp[0]):
                    m.d.sync += [sc_m.eq(sc_round << 1), sc_e.eq(sc_exp - 1)]
                with m.Else():
                    m.d.sync += [sc_m.eq(sc_round), sc_e.eq(sc_exp)]
                m.next = "SQRT"
            with m.State("SQRT"):
                m.d.comb += [sq.start.eq(1), sq.radicand.eq(sc_m << nx.RSQRT_FRAC)]
                m.next = "SQRT_WAIT"
            with m.State("SQRT_WAIT"), m.If(sq.done):
                m.next = "RECIP"
            divide("RECIP", 1 << nx.RSQRT_NUM, sq.root, nw["recip_div"], finish_recip)
            if built:
                with m.State("ALIGN"):  # over each head: the head's scalars kept, the largest f of a nonzero head
                    m.d.comb += wr.en.eq(1)
                    with m.If((stat_peak != 0) & (~found | (head_exp > exp_max))):
                        m.d.sync += [exp_max.eq(head_exp), found.eq(1)]
                    m.d.comb += self.done.eq(1)
                    m.next = "IDLE"
            multiply("SUM_R", sum_mag, self.recip, then("MEAN"))
            divide("MEAN", mul.product, n, nw["mean_div"], finish_mean)
        return m


class Argmax(wiring.Component):
    """ARGMAX over the chunks of one pass: the first largest element.

    Within a chunk a balanced tree keeps the lower lane on ties, each of its levels ending in a register
    (:func:`kvoverlay.timing.argmax_tree_levels` cycles); across chunks only a strictly larger value replaces the best.
    In the whole unit the tree's input is the S2 chunk register that the elementwise stage, NORM's sums and the gate
    table also read, placed far from here: with the tree and the running compare in one cycle that route was the
    unit's critical path.

    Attributes
    ----------
    clear : In(1)
    chunk : In(stream.Signature(chunk_layout(config)))
        ``ARGMAX`` chunks take part.
    index : Out(32)
        Element index of the best so far.
    """

    def __init__(self, config):
        self.config = config
        super().__init__({"clear": In(1), "chunk": In(_pipe(chunk_layout(config))), "index": Out(32)})

    def elaborate(self, platform):
        m = Module()
        V = self.config.vector_lanes
        c = self.chunk.payload
        best = Signal(LANE, name="best_value")
        found = Signal(name="best_found")
        level = [(c.a[j], Const(j, range(V)), c.mask[j]) for j in range(V)]
        # the chunk's index and whether it takes part travel beside the tree's levels
        take_part, chunk_idx = self.chunk.valid & (c.kind == Pass.ARGMAX), c.idx
        depth = 0
        while len(level) > 1:
            nxt = []
            for k in range(0, len(level), 2):
                node = f"tree{depth}_{k // 2}"
                val = Signal(LANE, name=f"{node}_value")
                idx = Signal(range(V), name=f"{node}_lane")
                ok = Signal(name=f"{node}_ok")
                if k + 1 == len(level):
                    lv, li, lo = level[k]
                    m.d.sync += [val.eq(lv), idx.eq(li), ok.eq(lo)]
                else:
                    (lv, li, lo), (rv, ri, ro) = level[k], level[k + 1]
                    take = Signal(name=f"{node}_right")
                    m.d.comb += take.eq(ro & (~lo | (rv > lv)))
                    m.d.sync += [val.eq(Mux(take, rv, lv)), idx.eq(Mux(take, ri, li)), ok.eq(lo | ro)]
                nxt.append((val, idx, ok))
            part, cidx = Signal(name=f"tree{depth}_valid"), Signal(16, name=f"tree{depth}_chunk")
            m.d.sync += [part.eq(take_part), cidx.eq(chunk_idx)]
            level, take_part, chunk_idx, depth = nxt, part, cidx, depth + 1
        assert depth == timing.argmax_tree_levels(self.config)
        value, lane, ok = level[0]
        with m.If(self.clear):
            m.d.sync += found.eq(0)
        with m.Elif(take_part & ok & (~found | (value > best))):
            m.d.sync += [best.eq(value), self.index.eq(chunk_idx * V + lane), found.eq(1)]
        return m


class Rope(wiring.Component):
    """ROPE's stages S0 to S2b: one pair per two cycles (the x pair on ports A and B, then cos and sin), a peak
    pass then a write pass, one wide element per cycle out.

    Attributes
    ----------
    insn : In(LAYOUTS["ROPE"])
    exp_x, exp_cos, exp_sin : In(EREG_SHAPE)
    start : In(1)
    rd_a, rd_b : Out(abuf_read(config))
        The word addresses (their data is not read here: :class:`ChunkIssue` selects the chunks).
    chunk_a, chunk_b : Out(range(chunks per buffer word))
        The chunks of the returned words that hold the elements read (at S1).
    lanes_a, lanes_b : In(ArrayLayout(signed(16), vector_lanes))
        Those chunks (:class:`ChunkIssue`'s ``early_a`` and ``early_b``).
    wide : Out(stream.Signature(wide_layout(config)))
        Rotated elements (``single``), each at its destination address.
    exp : Out(EXP_WIDE)
        Exponent of the wide values (:func:`~kvoverlay.numerics.align_sum` of the two products).
    last : Out(1)
        The last pair of the write pass issues in this cycle.
    """

    def __init__(self, config):
        self.config = config
        V = config.vector_lanes
        sel = _chunk_select(config)
        super().__init__({"insn": In(LAYOUTS["ROPE"]), "exp_x": In(EREG_SHAPE), "exp_cos": In(EREG_SHAPE),
                          "exp_sin": In(EREG_SHAPE), "start": In(1), "rd_a": Out(abuf_read(config)),
                          "rd_b": Out(abuf_read(config)), "chunk_a": Out(sel), "chunk_b": Out(sel),
                          "lanes_a": In(data.ArrayLayout(LANE, V)), "lanes_b": In(data.ArrayLayout(LANE, V)),
                          "wide": Out(_pipe(wide_layout(config))), "exp": Out(EXP_WIDE), "last": Out(1)})

    def elaborate(self, platform):
        m = Module()
        f = self.insn
        lg_l = log2_exact(abuf_lanes(self.config))
        addr = 16 + 4  # element addresses, before the bounds check
        half = Signal(len(f.head_dim) - 1, name="half")
        interleaved = f.mode == isa.ENUMS["rope"].index("interleaved")
        m.d.comb += half.eq(f.head_dim >> 1)

        # S0: walk the pairs of every head, twice
        issue = Signal(name="issue")
        kind = Signal(Pass, name="issue_kind")
        head = Signal(len(f.heads), name="head")
        pair = Signal(len(half), name="pair")
        phase = Signal(name="phase")  # 0: read the x pair, 1: read cos and sin
        x_head = Signal(addr, name="x_head")
        dst_head = Signal(addr, name="dst_head")
        first = Signal(addr, name="first")  # element offsets in the head of the pair
        second = Signal(addr, name="second")
        m.d.comb += [
            first.eq(Mux(interleaved, pair << 1, pair)),
            second.eq(Mux(interleaved, (pair << 1) + 1, pair + half)),
        ]
        pair_end = phase & (pair == half - 1)
        m.d.comb += self.last.eq(issue & pair_end & (head == f.heads - 1) & (kind == Pass.WRITE))
        with m.If(self.start):
            m.d.sync += [issue.eq(1), kind.eq(Pass.PEAK), head.eq(0), pair.eq(0), phase.eq(0), x_head.eq(f.x),
                         dst_head.eq(f.dst)]
        with m.Elif(issue):
            m.d.sync += phase.eq(~phase)
            with m.If(pair_end):
                m.d.sync += [pair.eq(0), head.eq(head + 1), x_head.eq(x_head + f.head_dim),
                             dst_head.eq(dst_head + f.head_dim)]
                with m.If(head == f.heads - 1):
                    m.d.sync += [head.eq(0), x_head.eq(f.x), dst_head.eq(f.dst), kind.eq(Pass.WRITE),
                                 issue.eq(kind == Pass.PEAK)]
            with m.Elif(phase):
                m.d.sync += pair.eq(pair + 1)
        read_a = Signal(addr, name="read_a")
        read_b = Signal(addr, name="read_b")
        m.d.comb += [
            read_a.eq(Mux(phase, f.cos + pair, x_head + first)),
            read_b.eq(Mux(phase, f.sin + pair, x_head + second)),
            self.rd_a.addr.eq(read_a >> lg_l), self.rd_a.en.eq(1),
            self.rd_b.addr.eq(read_b >> lg_l), self.rd_b.en.eq(1),
        ]

        # S1: the x pair is held while cos and sin arrive
        s1_valid = Signal(name="s1_valid")
        s1_phase = Signal(name="s1_phase")
        s1_kind = Signal(Pass, name="s1_kind")
        s1_lane_a = Signal(max(1, lg_l), name="s1_lane_a")
        s1_lane_b = Signal(max(1, lg_l), name="s1_lane_b")
        s1_out_a = Signal(addr, name="s1_out_a")
        s1_out_b = Signal(addr, name="s1_out_b")
        m.d.sync += [
            s1_valid.eq(issue), s1_phase.eq(phase), s1_kind.eq(kind),
            s1_lane_a.eq(read_a[:lg_l] if lg_l else 0), s1_lane_b.eq(read_b[:lg_l] if lg_l else 0),
            s1_out_a.eq(dst_head + first), s1_out_b.eq(dst_head + second),
        ]
        s1_va = Signal(LANE, name="s1_va")
        s1_vb = Signal(LANE, name="s1_vb")
        lg_v = log2_exact(self.config.vector_lanes)
        m.d.comb += [self.chunk_a.eq(s1_lane_a[lg_v:]), self.chunk_b.eq(s1_lane_b[lg_v:]),
                     s1_va.eq(self.lanes_a.as_value().word_select(s1_lane_a[:lg_v], 16) if lg_v else self.lanes_a[0]),
                     s1_vb.eq(self.lanes_b.as_value().word_select(s1_lane_b[:lg_v], 16) if lg_v else self.lanes_b[0])]
        x_a = Signal(LANE, name="x_a")
        x_b = Signal(LANE, name="x_b")
        with m.If(s1_valid & ~s1_phase):
            m.d.sync += [x_a.eq(s1_va), x_b.eq(s1_vb)]

        # S2: the pair with its cos and sin, then two products aligned (numerics.align_sum) per cycle
        s2_valid = Signal(name="s2_valid")
        s2_kind = Signal(Pass, name="s2_kind")
        s2_xa, s2_xb, s2_c, s2_s = (Signal(LANE, name=f"s2_{n}") for n in ("xa", "xb", "cos", "sin"))
        s2_out_a = Signal(addr, name="s2_out_a")
        s2_out_b = Signal(addr, name="s2_out_b")
        m.d.sync += s2_valid.eq(s1_valid & s1_phase)
        with m.If(s1_valid & s1_phase):
            m.d.sync += [s2_kind.eq(s1_kind), s2_xa.eq(x_a), s2_xb.eq(x_b), s2_c.eq(s1_va), s2_s.eq(s1_vb),
                         s2_out_a.eq(s1_out_a), s2_out_b.eq(s1_out_b)]
        ex, ec, es = self.exp_x, self.exp_cos, self.exp_sin
        # as VADD's alignment: the product with the larger exponent moves left by GUARD bits (wiring), the other one
        # by GUARD - |ec - es| (right when that is negative), so one shifter serves both terms
        cos_big = Signal(name="cos_big")
        shift_small = Signal(EXP_WIDE, name="shift_small")
        m.d.comb += self.exp.eq(ex + Mux(ec > es, ec, es) - _GUARD)
        # registered (the exponents hold from the set-up on; the first products come four cycles after the start): the
        # exponents' difference and compare chained into the round-shift, the sum and the write-back's S3 register were
        # the unit's critical path at 43.38 MHz (docs/boards.md, vecfmax)
        m.d.sync += [cos_big.eq(ec >= es), shift_small.eq(Mux(ec >= es, ec - es, es - ec) - _GUARD)]
        # a pair arrives every other cycle, so one pair of multipliers and shifters serves both results: y_a =
        # xa * cos - xb * sin in the pair's first cycle, y_b = xb * cos + xa * sin in the next (the S2 registers
        # still hold the pair then)
        second = Signal(name="second")
        m.d.sync += second.eq(s2_valid)
        p = Signal(LANE, name="rope_p")
        q = Signal(LANE, name="rope_q")
        m.d.comb += [p.eq(Mux(second, s2_xb, s2_xa)), q.eq(Mux(second, s2_xa, s2_xb))]
        # S2b: the products are registered (with what goes along with them) before their alignment and sum: the
        # multipliers, the round-shift and the sum into the write-back's register were the whole unit's critical path
        # (docs/boards.md, vecfmax; timing.ROPE_PIPE_DEPTH)
        q_sin = Signal(signed(32), name="rope_q_sin")
        p_cos = Signal(signed(32), name="rope_p_cos")
        prod_valid = Signal(name="rope_prod_valid")
        prod_second = Signal(name="rope_prod_second")
        prod_kind = Signal(Pass, name="rope_prod_kind")
        prod_addr = Signal(addr, name="rope_prod_addr")
        m.d.sync += [q_sin.eq(q * s2_s), p_cos.eq(p * s2_c), prod_valid.eq(s2_valid | second),
                     prod_second.eq(second), prod_kind.eq(s2_kind), prod_addr.eq(Mux(second, s2_out_b, s2_out_a))]
        t_sin = Signal(signed(33), name="rope_t_sin")
        m.d.comb += t_sin.eq(Mux(prod_second, q_sin, -q_sin))
        big = Signal(signed(33), name="rope_big")
        small = Signal(signed(33), name="rope_small")
        m.d.comb += [big.eq(Mux(cos_big, p_cos, t_sin)), small.eq(Mux(cos_big, t_sin, p_cos))]
        aligned = round_shift_expr(m, small, shift_small, 32, _GUARD, "rope_aligned")
        y = Signal(signed(WIDE_BITS), name="rope_y")
        m.d.comb += y.eq((big << _GUARD) + aligned)
        out = self.wide.payload
        m.d.comb += self.wide.valid.eq(prod_valid)
        # (constant members are set under a condition: Verilator never runs an always block that reads nothing)
        with m.If(prod_valid):
            m.d.comb += [out.kind.eq(prod_kind), out.wide[0].eq(y), out.addr.eq(prod_addr),
                         out.mask.eq(1), out.single.eq(1)]
        return m


class WriteBack(wiring.Component):
    """Stage S3, the write-back every op but ARGMAX shares: peak, shift and round in a
    :class:`~hw.normalize.Normalizer`, mantissas written into the activation buffer.

    Attributes
    ----------
    clear : In(1)
        Resets the peak (before the peak pass).
    exp_in : In(EXP_WIDE)
        Exponent of the wide values.
    wide : In(stream.Signature(wide_layout(config)))
        ``PEAK`` values feed the peak, ``WRITE`` values are rounded and written.
    abuf_w : Out(abuf_write(config))
        Writes nothing once the result exponent overflows.
    exp_out : Out(EXP_SHAPE)
    overflow : Out(1)
    """

    def __init__(self, config):
        self.config = config
        super().__init__({"clear": In(1), "exp_in": In(EXP_WIDE), "wide": In(_pipe(wide_layout(config))),
                          "abuf_w": Out(abuf_write(config)), "exp_out": Out(EXP_SHAPE), "overflow": Out(1)})

    def elaborate(self, platform):
        m = Module()
        V = self.config.vector_lanes
        L = abuf_lanes(self.config)
        lg_l = log2_exact(L)
        m.submodules.normalizer = norm = Normalizer(WIDE_BITS, V, lane_widths=[WIDE_BITS] + [CHUNK_WIDE_BITS] * (V - 1),
                                                    bounded=True)  # the write pass recomputes the peak pass's values
        s3 = Signal(wide_layout(self.config), name="s3")
        s3_valid = Signal(name="s3_valid")
        m.d.sync += [s3_valid.eq(self.wide.valid), s3.eq(self.wide.payload)]
        m.d.comb += [
            norm.clear.eq(self.clear), norm.sample.eq(s3_valid & (s3.kind == Pass.PEAK)),
            norm.wide.eq(s3.wide), norm.valid.eq(s3.mask), norm.exp_in.eq(self.exp_in),
            self.exp_out.eq(norm.exp_out), self.overflow.eq(norm.overflow),
        ]
        chunk = Cat(norm.mant[j] for j in range(V))
        m.d.comb += [
            self.abuf_w.addr.eq(s3.addr >> lg_l),
            self.abuf_w.data.eq(Mux(s3.single, Cat(norm.mant[0] for _ in range(L)), Cat(chunk for _ in range(L // V)))),
        ]
        with m.If(s3_valid & (s3.kind == Pass.WRITE) & ~norm.overflow):
            m.d.comb += self.abuf_w.en.eq(s3.mask << (s3.addr[:lg_l] if lg_l else 0))
        return m


class VectorUnit(wiring.Component):
    """The vector unit of the overlay: a sequencer over the stages above.

    Parameters
    ----------
    config : OverlayConfig
        Uses ``port_bytes`` (buffer word width), ``vector_lanes`` and ``act_buffer_words``.

    Attributes
    ----------
    cmd, busy, done :
        The unit protocol (:func:`hw.ports.unit_signature`) over :data:`CMD_LAYOUT`; ``done`` carries
        the :class:`~hw.ports.Fault` (no state is changed on a fault).
    abuf_r_a, abuf_r_b : Out(abuf_read(config))
        Two activation-buffer read ports (word address, latency 1).
    abuf_w : Out(abuf_write(config))
        Activation-buffer write port with a per-lane enable.
    ereg_ra, ereg_rb, ereg_rc : Out(ereg_read())
        Three combinational exponent-register read ports.
    ereg_w : Out(ereg_write())
        Exponent-register write port.
    reg_w : Out(reg_write())
        Scalar-register write port (ARGMAX).
    """

    def __init__(self, config):
        L = abuf_lanes(config)
        V = config.vector_lanes
        if V > L:
            self._MustUse__silence = True
            raise ValueError(f"vector_lanes={V} exceeds the {L} lanes of an activation-buffer word")
        self.config = config
        super().__init__(unit_signature(
            CMD_LAYOUT,
            abuf_r_a=Out(abuf_read(config)), abuf_r_b=Out(abuf_read(config)), abuf_w=Out(abuf_write(config)),
            ereg_ra=Out(ereg_read()), ereg_rb=Out(ereg_read()), ereg_rc=Out(ereg_read()), ereg_w=Out(ereg_write()),
            reg_w=Out(reg_write()),
        ))

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        insn = Signal(CMD_LAYOUT, name="insn")
        opcode = _opcode(insn)
        is_rope = opcode == _code("ROPE")
        exps = [Signal(EREG_SHAPE, name=f"exp_{n}") for n in "abc"]  # latched at set-up

        m.submodules.decoder = dec = VectorDecoder(cfg)
        m.submodules.issue = issue = ChunkIssue(cfg)
        m.submodules.elementwise = elem = Elementwise(cfg)
        m.submodules.norm_scalar = scalar = NormScalar(cfg)
        m.submodules.argmax = argmax = Argmax(cfg)
        m.submodules.rope = rope = Rope(cfg)
        m.submodules.write_back = wb = WriteBack(cfg)
        # NORM over each head: three rounds over the heads: each head's statistics pass and scalar sequence (the largest
        # exponent), then each head's peak pass, then its write pass
        heads = Signal(name="norm_heads")
        head_lo = Signal(16, name="head_lo")  # the head's first element
        head_end = Signal(17, name="head_end")
        head_stop = Signal(16, name="head_stop")  # one past its last: the last head takes what is left
        head_round = Signal(2, name="head_round")  # 0: statistics and scalars, 1: peak, 2: write
        head_idx = Signal(range(isa.NORM_MAX_HEADS), name="head_idx")
        hd = insn.NORM.head_dim
        # NORM's element count, registered: the scalar sequence reads it (its power-of-two test, log2, the divisor)
        # long after head_lo last moved, and the head's clamp and difference then never chain into those
        count = Signal(16, name="norm_count")
        m.d.comb += [heads.eq((opcode == _code("NORM")) & (hd != 0) & cfg.norm_heads), head_end.eq(head_lo + hd),
                     head_stop.eq(Mux(head_end > dec.length, dec.length, head_end))]
        m.d.sync += count.eq(Mux(heads, head_stop - head_lo, dec.length))
        m.d.comb += [
            dec.insn.eq(insn),
            self.ereg_ra.addr.eq(dec.ereg_a), self.ereg_rb.addr.eq(dec.ereg_b), self.ereg_rc.addr.eq(dec.ereg_c),
            issue.src_a.eq(dec.src_a), issue.src_b.eq(dec.src_b), issue.single.eq(heads),
            issue.length.eq(Mux(heads, head_stop, dec.length)),
            issue.first.eq(Mux(heads, head_lo >> log2_exact(cfg.vector_lanes), 0)),
            elem.insn.eq(insn), elem.exp_a.eq(exps[0]), elem.exp_b.eq(exps[1]), elem.dst.eq(dec.dst),
            elem.xshift.eq(scalar.xshift),
            issue.ext_select.eq(is_rope), issue.ext_chunk_a.eq(rope.chunk_a), issue.ext_chunk_b.eq(rope.chunk_b),
            rope.lanes_a.eq(issue.early_a), rope.lanes_b.eq(issue.early_b),
            elem.recip.eq(scalar.recip), elem.mean.eq(scalar.mean), elem.recip_exp.eq(scalar.recip_exp),
            scalar.insn.eq(insn.NORM), scalar.exp_x.eq(exps[0]), scalar.square.eq(elem.square),
            scalar.count.eq(count), scalar.heads.eq(heads),
            scalar.head.eq(head_idx),
            rope.insn.eq(insn.ROPE), rope.exp_x.eq(exps[0]), rope.exp_cos.eq(exps[1]), rope.exp_sin.eq(exps[2]),
        ]
        # the wide values' exponent (up to three register exponents and NORM's recip_exp added) is registered before
        # the normalizer adds its shift and compares: it holds from the set-up (NORM's from its scalar sequence, a
        # head's from its load) on, and the write-back reads it only once a peak pass is over (no cycle)
        wb_exp = Signal(EXP_WIDE, name="wb_exp_in")
        m.d.sync += wb_exp.eq(Mux(is_rope, rope.exp, elem.exp))
        m.d.comb += wb.exp_in.eq(wb_exp)
        for sink in (elem, argmax):
            wiring.connect(m, issue.chunk, sink.chunk)
        wiring.connect(m, elem.staged, scalar.chunk)  # the chunk beside its squares
        wiring.connect(m, wb.abuf_w, wiring.flipped(self.abuf_w))
        # ROPE reads single elements of its own (through the issue stage's chunk select); the chunk ops read chunks
        for port, chunks, pairs in ((self.abuf_r_a, issue.rd_a, rope.rd_a), (self.abuf_r_b, issue.rd_b, rope.rd_b)):
            m.d.comb += [port.addr.eq(Mux(is_rope, pairs.addr, chunks.addr)), port.en.eq(1), chunks.data.eq(port.data)]
        with m.If(is_rope):
            m.d.comb += [wb.wide.valid.eq(rope.wide.valid), wb.wide.payload.eq(rope.wide.payload)]
        with m.Else():
            m.d.comb += [wb.wide.valid.eq(elem.wide.valid), wb.wide.payload.eq(elem.wide.payload)]

        # busy runs to the done cycle inclusive; the unit takes a command only while idle
        busy = Signal()
        m.d.comb += [self.busy.eq(busy | self.done.valid), self.cmd.ready.eq(~self.busy)]
        m.d.sync += [self.done.valid.eq(0), self.ereg_w.en.eq(0), self.reg_w.en.eq(0)]

        def finish(fault):
            m.d.sync += [self.done.valid.eq(1), self.done.payload.eq(fault), busy.eq(0)]
            m.next = "IDLE"

        def start_chunks(kind, state):
            m.d.comb += [issue.start.eq(1), issue.kind.eq(kind)]
            m.next = state

        drain = Signal(range(max(PIPE_DEPTH, timing.ROPE_PIPE_DEPTH + 1, timing.argmax_drain(cfg)) + 1), name="drain")
        with m.FSM(name="vec_state"):
            with m.State("IDLE"), m.If(self.cmd.valid & self.cmd.ready):
                m.d.sync += [insn.eq(self.cmd.payload), busy.eq(1), head_lo.eq(0), head_idx.eq(0), head_round.eq(0)]
                m.next = "DECODE"
            with m.State("DECODE"):  # the decoder registers the element count
                m.next = "SETUP"
            with m.State("SETUP"):
                m.d.comb += [wb.clear.eq(1), scalar.clear.eq(1), argmax.clear.eq(1), scalar.reset_max.eq(1)]
                m.d.sync += [e.eq(port.data) for e, port in zip(exps, (self.ereg_ra, self.ereg_rb, self.ereg_rc))]
                with m.If(dec.fault != Fault.NONE):
                    finish(dec.fault)
                with m.Elif(is_rope):
                    m.d.comb += rope.start.eq(1)
                    m.next = "ROPE"
                with m.Elif(opcode == _code("NORM")):
                    start_chunks(Pass.STATS, "STATS")
                with m.Elif(opcode == _code("ARGMAX")):
                    start_chunks(Pass.ARGMAX, "ARGMAX")
                with m.Elif(dec.length == 0):
                    m.d.sync += drain.eq(PIPE_DEPTH)
                    m.next = "PASSES_DRAIN"
                with m.Else():
                    start_chunks(Pass.PEAK, "PASSES")
            # each issuing state waits for its last issue, then drains: the write-back takes PIPE_DEPTH cycles (ROPE
            # ROPE_PIPE_DEPTH and one more, for its held element); the argmax takes the last chunk argmax_drain cycles
            # after its issue (two, and one per level of its tree), the sums six (the chunk's sums registered a cycle
            # after S2a, beside the squares: NORM_STATS_DRAIN), and the scalar sequence starts in the last of them
            # (SCALAR) and reads the sums in the cycle after
            for state, last, depth, then in (("PASSES", issue.last, PIPE_DEPTH, "FINISH"),
                                             ("HEAD_PASS", issue.last, PIPE_DEPTH, "HEAD_NEXT"),
                                             ("ROPE", rope.last, timing.ROPE_PIPE_DEPTH + 1, "FINISH"),
                                             ("STATS", issue.last, timing.NORM_STATS_DRAIN, "SCALAR"),
                                             ("ARGMAX", issue.last, timing.argmax_drain(cfg), "ARGMAX_WRITE")):
                with m.State(state), m.If(last):
                    m.d.sync += drain.eq(depth)
                    m.next = f"{state}_DRAIN"
                with m.State(f"{state}_DRAIN"):
                    m.d.sync += drain.eq(drain - 1)
                    with m.If(drain == 1):
                        m.next = then
            with m.State("SCALAR"):
                m.d.comb += scalar.start.eq(1)
                with m.If(scalar.done & heads):
                    m.next = "HEAD_NEXT"
                with m.Elif(scalar.done):
                    m.next = "NORM_PASSES"
            with m.State("NORM_PASSES"):
                start_chunks(Pass.PEAK, "PASSES")
            with m.State("HEAD_PASSES"):  # the head's scalars, then its peak or write pass
                m.d.comb += scalar.load.eq(1)
                m.next = "HEAD_PASS_START"
            with m.State("HEAD_PASS_START"):
                start_chunks(Mux(head_round == 1, Pass.PEAK, Pass.WRITE), "HEAD_PASS")
            with m.State("HEAD_NEXT"):
                with m.If(head_end < dec.length):
                    m.d.sync += [head_lo.eq(head_end), head_idx.eq(head_idx + 1)]
                with m.Elif(head_round == 2):
                    m.next = "FINISH"
                with m.Else():
                    m.d.sync += [head_lo.eq(0), head_idx.eq(0), head_round.eq(head_round + 1)]
                with m.If((head_end < dec.length) & (head_round == 0)):
                    m.next = "HEAD_STATS"
                with m.Elif((head_end < dec.length) | (head_round != 2)):
                    m.next = "HEAD_PASSES"
            with m.State("HEAD_STATS"):
                m.d.comb += scalar.clear.eq(1)
                start_chunks(Pass.STATS, "STATS")
            with m.State("FINISH"):
                m.d.sync += [self.ereg_w.en.eq(~wb.overflow), self.ereg_w.addr.eq(dec.dst_e),
                             self.ereg_w.data.eq(wb.exp_out)]
                finish(Mux(wb.overflow, Fault.OVERFLOW, Fault.NONE))
            with m.State("ARGMAX_WRITE"):
                m.d.sync += [self.reg_w.en.eq(1), self.reg_w.addr.eq(insn.ARGMAX.rd), self.reg_w.data.eq(argmax.index)]
                finish(Fault.NONE)
        return m
