"""Block-floating-point normalization, bit-exact with :func:`kvoverlay.numerics.normalize`: the one normalizer of hw/.

Every unit that renormalizes wide values into 15-bit mantissas with a shared exponent runs the
same two phases: a *peak* phase ORs the magnitudes together (the OR has the bit length of the
largest magnitude, so no comparator tree is needed), then a *round* phase round-shifts each
value by ``bitlen(peak) - MANT_BITS``, clips it, and rounds it again when the exponent fell below
``EXP_MIN``. The pieces, from small to whole:

* :func:`bit_length`, :func:`round_shift_expr`: a priority encoder and ``numerics.round_shift``
  for run-time shifts, exact or wrapping at a width as numpy's int64 does; :func:`round_shift_halving`, the exact
  one in one shifter and a narrow add;
* :func:`peak_exponent`: the peak's shift, underflow shift, result exponent and overflow;
* :func:`mantissa`: one lane of the round phase (:func:`scalar_mantissa` is its int64 form,
  for the one-element-per-cycle units REQ and LDROW);
* :class:`Normalizer`: the peak register and ``lanes`` mantissa lanes, as the vector unit uses them.
"""

from __future__ import annotations

from typing import NamedTuple

from amaranth.hdl import Cat, Const, Module, Mux, Shape, Signal, Value, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from kvoverlay import numerics as nx

from .arith import select_bits

__all__ = ["EXP_SHAPE", "EXP_WIDE", "MANT_SHAPE", "Normalizer", "PeakExponent", "bit_length", "mantissa",
           "peak_exponent", "round_shift_expr", "round_shift_halving", "scalar_mantissa"]

#: Shape of an exponent register value, [EXP_MIN, EXP_MAX].
EXP_SHAPE = Shape.cast(range(nx.EXP_MIN, nx.EXP_MAX + 1))
#: Exponents before normalization (sums of several register exponents and shifts).
EXP_WIDE = signed(16)
#: A rounded, clipped mantissa, +-MANT_MAX.
MANT_SHAPE = signed(16)
#: An underflow shift of this many bits already rounds every 15-bit mantissa to zero.
_UNDERFLOW_CAP = nx.MANT_BITS + 1
#: Bits of a value rounded under a peak it does not exceed: at most 2**MANT_BITS in magnitude, signed.
_BOUNDED_BITS = nx.MANT_BITS + 2


def bit_length(m: Module, value, name: str) -> Signal:
    """Signal holding ``int(value).bit_length()`` of an unsigned value (priority encoder)."""
    n = len(value)
    out = Signal(range(n + 1), name=name)
    for i in range(n):  # later assignments win: the highest set bit decides
        with m.If(value[i]):
            m.d.comb += out.eq(i + 1)
    return out


def round_shift_expr(m: Module, value, shift, rcap: int, lcap: int, name: str, *, wrap: int | None = None,
                     out_bits: int | None = None) -> Signal:
    """``numerics.round_shift(value, shift)`` for a signed *value* and a signed run-time *shift*.

    A positive shift rounds half up; right shifts above *rcap* and left shifts above *lcap*
    are clamped (the caller proves that the clamp changes nothing it keeps). Without *wrap*
    the result is exact, a signed signal wide enough for the largest left shift; with *wrap*
    the rounding add and the left shift wrap at ``wrap`` bits, as numpy's int64 does for ``wrap=64``.
    With *out_bits* the result has that many bits, for callers that prove it fits: the shifters then only build
    the bits that are kept.
    """
    value = Value.cast(value)
    vw = len(value)
    out = Signal(signed(out_bits or (vw + lcap if wrap is None else wrap)), name=name)
    rs = Signal(range(rcap + 1), name=f"{name}_rs")
    m.d.comb += rs.eq(Mux(shift > rcap, rcap, Mux(shift > 0, shift, 0)))
    ls = 0  # lcap == 0: no left shift, and no zero-width signal or always-false compare in the Verilog
    if lcap:
        ls = Signal(range(lcap + 1), name=f"{name}_ls")
        m.d.comb += ls.eq(Mux(shift < -lcap, lcap, Mux(shift < 0, -shift, 0)))
    biased = Signal(signed(max(vw, rcap) + 2 if wrap is None else wrap), name=f"{name}_biased")
    # 2**(rs-1) for rs >= 1, 0 for rs == 0, without a signed shift amount
    m.d.comb += biased.eq(value + ((Const(1, unsigned(rcap + 1)) << rs) >> 1))
    with m.If(shift > 0):
        m.d.comb += out.eq(biased >> rs)
    with m.Else():
        m.d.comb += out.eq((value if out_bits is None else value[:out_bits].as_signed()) << ls)
    return out


def round_shift_halving(m: Module, value, shift, rcap: int, lcap: int, name: str, *, out_bits: int | None = None):
    """:func:`round_shift_expr` without *wrap* (exact), as ``floor((floor(x * 2**(1 - s)) + 1) / 2)``: one arithmetic
    right shift of *value* moved left by ``lcap + 1`` bits (by ``lcap - s``, in ``[0, rcap + lcap]``), then an add
    of one and a halving at the result's width. Bit-exact with ``numerics.round_shift`` (round half up), clamps as
    :func:`round_shift_expr`; it decodes no rounding bias from the shift, adds nothing as wide as the value and has
    no left shifter of its own (the normalizer's lanes, NORM's scalar roundings)."""
    value = Value.cast(value)
    out = Signal(signed(out_bits or len(value) + lcap), name=name)
    amount = Signal(range(rcap + lcap + 1), name=f"{name}_amount")
    shift = Value.cast(shift)
    below = (shift < -lcap) if shift.shape().signed else 0  # an unsigned shift is never below -lcap (lcap >= 0)
    m.d.comb += amount.eq(Mux(shift > rcap, rcap + lcap, Mux(below, 0, shift + lcap)))
    # the low len(out) + 1 bits of the shifted value decide the low len(out) bits of the result
    half = Signal(signed(len(out) + 1), name=f"{name}_twice")
    moved = Cat(Const(0, lcap + 1), value)
    # stages from the largest shift down keep sum(width + 2**k - 1) bits, Yosys's from the smallest up about all of
    # them in each: the first wins where few result bits come out of a wide value (a lane of the normalizer)
    staged = sum(len(half) + (1 << k) - 1 for k in range(len(amount)))
    if staged < len(moved) * len(amount):
        m.d.comb += half.eq(select_bits(m, moved.as_signed(), amount, len(half), name=f"{name}_sr"))
    else:
        m.d.comb += half.eq(moved.as_signed() >> amount)
    m.d.comb += out.eq((half + 1) >> 1)
    return out


class PeakExponent(NamedTuple):
    """What :func:`peak_exponent` derives from a peak (all combinational signals)."""

    #: ``bitlen(peak) - MANT_BITS``: the right shift (left when negative) from wide values to mantissas.
    shift: Signal
    #: The further right shift of the mantissas when the exponent fell below ``EXP_MIN`` (0 otherwise), capped
    #: where every mantissa already rounds to zero.
    underflow: Signal
    #: The result exponent: ``EXP_MIN`` for an all-zero peak or an underflow.
    exp_out: Signal
    #: The result exponent exceeds ``EXP_MAX``; nothing may be written.
    overflow: Signal
    #: Every magnitude was zero.
    zero: Signal


def peak_exponent(m: Module, peak, exp_in, name: str, *, peak_len=None) -> PeakExponent:
    """The exponent half of ``numerics.normalize`` from *peak*, the OR (or maximum) of the magnitudes of values
    with exponent *exp_in*; *peak_len*, when given, is the peak's bit length, already computed."""
    if peak_len is None:
        peak_len = bit_length(m, peak, f"{name}_peak_bits")
    shift = Signal(signed(len(peak_len) + 2), name=f"{name}_shift")
    exp_raw = Signal(signed(max(len(Value.cast(exp_in)), len(shift)) + 2), name=f"{name}_exp_raw")
    zero = Signal(name=f"{name}_zero")
    underflow = Signal(range(_UNDERFLOW_CAP + 1), name=f"{name}_underflow")
    exp_out = Signal(EXP_SHAPE, name=f"{name}_exp")
    overflow = Signal(name=f"{name}_overflow")
    m.d.comb += [
        shift.eq(peak_len - nx.MANT_BITS),
        exp_raw.eq(exp_in + shift),
        zero.eq(peak == 0),
        underflow.eq(Mux(exp_raw < nx.EXP_MIN,
                         Mux(exp_raw < nx.EXP_MIN - _UNDERFLOW_CAP, _UNDERFLOW_CAP, nx.EXP_MIN - exp_raw), 0)),
        exp_out.eq(Mux(zero | (exp_raw < nx.EXP_MIN), nx.EXP_MIN, exp_raw)),
        overflow.eq(~zero & (exp_raw > nx.EXP_MAX)),
    ]
    return PeakExponent(shift, underflow, exp_out, overflow, zero)


def mantissa(m: Module, value, shift, underflow, name: str, *, wrap: int | None = None,
             bounded: bool = False, registered: bool = False) -> Signal:
    """One lane of the round phase of ``numerics.normalize``: *value* round-shifted by *shift*, clipped to
    +-``MANT_MAX``, then round-shifted by *underflow* where that is positive.

    *shift* and *underflow* are :func:`peak_exponent`'s (a shift is at least ``-MANT_BITS``). With *wrap* the first
    rounding wraps at that many bits (see :func:`round_shift_expr`). *bounded* promises ``|value| <= peak`` (the
    value was one of those the peak was taken over): then ``|value| < 2**(shift + MANT_BITS)``, the rounded value
    is at most ``2**MANT_BITS`` in magnitude, and the round-shift only builds :data:`_BOUNDED_BITS` result bits.
    *registered* puts a register between the round-shift and the clip (the result then comes one cycle after
    *value*; *underflow* must hold for that cycle too). Returns a :data:`MANT_SHAPE` signal.
    """
    rcap = len(Value.cast(value)) if wrap is None else wrap - 1
    out_bits = _BOUNDED_BITS if bounded else None
    if wrap is None:
        scaled = round_shift_halving(m, value, shift, rcap, nx.MANT_BITS, f"{name}_scaled", out_bits=out_bits)
    else:
        scaled = round_shift_expr(m, value, shift, rcap, nx.MANT_BITS, f"{name}_scaled", wrap=wrap, out_bits=out_bits)
    if registered:
        held = Signal.like(scaled, name=f"{name}_scaled_reg")
        m.d.sync += held.eq(scaled)
        scaled = held
    clipped = Signal(MANT_SHAPE, name=f"{name}_clipped")
    m.d.comb += clipped.eq(Mux(scaled > nx.MANT_MAX, nx.MANT_MAX, Mux(scaled < -nx.MANT_MAX, -nx.MANT_MAX, scaled)))
    return round_shift_expr(m, clipped, underflow, _UNDERFLOW_CAP, 0, name)


def scalar_mantissa(m: Module, value, shift, under, prefix: str, *, bounded: bool = False,
                    registered: bool = False) -> Signal:
    """:func:`mantissa` of one int64 value, wrapping as numpy's int64 does: the lane of the units that normalize
    one element per cycle (REQ, LDROW). *under* may be negative (no underflow); signal names start with *prefix*.
    *bounded* and *registered* as for :func:`mantissa`; *bounded* holds under the wrap too (a rounding add wraps
    only for a 63-bit peak, whose shift of 48 leaves at most 2**15).

    A value of at most 63 bits never wraps (its shift is at most ``63 - MANT_BITS``, so the rounding add stays below
    2**63, and a left shift only applies to values of at most ``MANT_BITS`` bits): it gets the exact, narrower
    round-shift."""
    wrap = 64 if len(Value.cast(value)) >= 64 else None
    return mantissa(m, value, shift, under, f"{prefix}_mantissa", wrap=wrap, bounded=bounded, registered=registered)


class Normalizer(wiring.Component):
    """Peak register and round-shifter for ``lanes`` wide signed values.

    Matches :func:`kvoverlay.numerics.normalize`: ``s = bitlen(max|x|) - MANT_BITS``,
    mantissas ``clip(round_shift(x, s), -MANT_MAX, MANT_MAX)``, exponent ``e + s``; if
    that is below ``EXP_MIN`` the mantissas are round-shifted again into range; an
    all-zero vector gives zero mantissas and ``EXP_MIN``; above ``EXP_MAX`` is an error.

    Parameters
    ----------
    width : int
        Bits of each signed wide lane.
    lanes : int
        Lanes sampled and rounded per cycle.
    lane_widths : sequence of int, optional
        Bits that each lane's values actually need (at most ``width``; the rest is sign extension), so that
        a lane that only ever carries narrow values gets a narrow datapath. Defaults to ``width`` for every lane.
    bounded : bool
        The caller rounds only values that were sampled (or masked lanes, whose mantissas it ignores): the
        round-shifters then build only the bits such a value can reach (:func:`mantissa`).
    registered : bool
        Two pipeline registers for a clock of its own: the exponent (``exp_out``, ``overflow`` and the shifts)
        is registered after the peak, so it is current two cycles after the last ``sample`` rather than one,
        and each mantissa is registered between its round-shift and its clip (:func:`mantissa`), so ``mant``
        comes a cycle after its ``wide``.

    Attributes
    ----------
    clear : In(1)
        Resets the peak (one cycle, before the first ``sample``).
    sample : In(1)
        ORs the magnitudes of the ``valid`` lanes of ``wide`` into the peak register.
    wide : In(ArrayLayout(signed(width), lanes))
        Wide values: sampled in the first phase, rounded in the second.
    valid : In(lanes)
        Lanes that take part in ``sample``.
    exp_in : In(EXP_WIDE)
        Exponent of the wide values.
    mant : Out(ArrayLayout(MANT_SHAPE, lanes))
        Rounded mantissas of ``wide`` under the current peak (combinational).
    exp_out : Out(EXP_SHAPE)
        Shared exponent of the result (``EXP_MIN`` for an all-zero vector).
    overflow : Out(1)
        The result exponent exceeds ``EXP_MAX``; the vector must not be written.
    """

    def __init__(self, width: int, lanes: int, *, lane_widths=None, bounded: bool = False, registered: bool = False):
        lane_widths = [width] * lanes if lane_widths is None else list(lane_widths)
        if (width < nx.MANT_BITS + 1 or lanes < 1 or len(lane_widths) != lanes
                or not all(nx.MANT_BITS + 1 <= w <= width for w in lane_widths)):
            self._MustUse__silence = True  # a rejected component is not an unused one
            raise ValueError(f"normalizer needs width >= {nx.MANT_BITS + 1}, lanes >= 1 and a lane width in "
                             f"[{nx.MANT_BITS + 1}, width] for each lane; got {width}, {lanes}, {lane_widths}")
        self.width = width
        self.lanes = lanes
        self.lane_widths = lane_widths
        self.bounded = bounded
        self.registered = registered
        super().__init__({
            "clear": In(1),
            "sample": In(1),
            "wide": In(data.ArrayLayout(signed(width), lanes)),
            "valid": In(lanes),
            "exp_in": In(EXP_WIDE),
            "mant": Out(data.ArrayLayout(MANT_SHAPE, lanes)),
            "exp_out": Out(EXP_SHAPE),
            "overflow": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        peak = Signal(self.width, name="peak_or")  # OR of magnitudes so far
        # the peak's bit length is registered with it, so that the round phase starts from a register rather than
        # from a priority encoder
        peak_len = Signal(range(self.width + 1), name="peak_bits")
        sampled = peak
        lanes = []
        for i, w in enumerate(self.lane_widths):
            x = Signal(signed(w), name=f"wide{i}")
            mag = Signal(w, name=f"mag{i}")
            m.d.comb += [x.eq(self.wide[i]), mag.eq(Mux(self.valid[i], Mux(x < 0, -x, x), 0))]
            lanes.append(x)
            sampled = sampled | mag
        with m.If(self.clear):
            m.d.sync += [peak.eq(0), peak_len.eq(0)]
        with m.Elif(self.sample):
            m.d.sync += [peak.eq(sampled), peak_len.eq(bit_length(m, sampled, "sampled_bits"))]
        result = peak_exponent(m, peak, self.exp_in, "result", peak_len=peak_len)
        if self.registered:
            held = PeakExponent(*(Signal.like(x, name=f"{x.name}_reg") for x in result))
            m.d.sync += [h.eq(x) for h, x in zip(held, result, strict=True)]
            result = held
        m.d.comb += [self.exp_out.eq(result.exp_out), self.overflow.eq(result.overflow)]
        for i, x in enumerate(lanes):
            m.d.comb += self.mant[i].eq(mantissa(m, x, result.shift, result.underflow, f"lane{i}",
                                                      bounded=self.bounded, registered=self.registered))
        return m
