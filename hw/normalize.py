"""Block-floating-point normalizer: bit-exact with :func:`kvoverlay.numerics.normalize`.

Two phases, as in every vector op: ``sample`` ORs the magnitudes of wide lanes into a
peak register (the OR of magnitudes has the same bit length as their maximum, so no
comparator tree is needed), then the combinational ``mant`` outputs round-shift the
same or recomputed wide lanes into 15-bit mantissas with the shared exponent.
With ``lanes=1, width=64`` it serves accumulator requantization (REQ).
"""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Shape, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.wiring import In, Out

from kvoverlay import numerics as nx

__all__ = ["EXP_SHAPE", "EXP_WIDE", "Normalizer", "bit_length", "round_shift_expr"]

#: Shape of an exponent register value, [EXP_MIN, EXP_MAX].
EXP_SHAPE = Shape.cast(range(nx.EXP_MIN, nx.EXP_MAX + 1))
#: Exponents before normalization (sums of several register exponents and shifts).
EXP_WIDE = signed(16)
#: An underflow shift of this many bits already rounds every 15-bit mantissa to zero.
_UNDERFLOW_CAP = nx.MANT_BITS + 1


def bit_length(m: Module, value, name: str) -> Signal:
    """Signal holding ``int(value).bit_length()`` of an unsigned value (priority encoder)."""
    n = len(value)
    out = Signal(range(n + 1), name=name)
    for i in range(n):  # later assignments win: the highest set bit decides
        with m.If(value[i]):
            m.d.comb += out.eq(i + 1)
    return out


def round_shift_expr(m: Module, value, shift, rcap: int, lcap: int, name: str) -> Signal:
    """``numerics.round_shift(value, shift)`` for a signed *value* and a signed run-time *shift*.

    A positive shift rounds half up; right shifts above *rcap* and left shifts above *lcap*
    are clamped (the caller proves that the clamp changes nothing it keeps). Returns a signed
    signal wide enough for the largest left shift.
    """
    vw = len(value)
    out = Signal(signed(vw + lcap), name=name)
    rs = Signal(range(rcap + 1), name=f"{name}_rs")
    ls = Signal(range(lcap + 1), name=f"{name}_ls")
    m.d.comb += [
        rs.eq(Mux(shift > rcap, rcap, Mux(shift > 0, shift, 0))),
        ls.eq(Mux(shift < -lcap, lcap, Mux(shift < 0, -shift, 0))),
    ]
    biased = Signal(signed(max(vw, rcap) + 2), name=f"{name}_biased")
    # 2**(rs-1) for rs >= 1, 0 for rs == 0, without a signed shift amount
    m.d.comb += biased.eq(value + ((Const(1, unsigned(rcap + 1)) << rs) >> 1))
    with m.If(shift > 0):
        m.d.comb += out.eq(biased >> rs)
    with m.Else():
        m.d.comb += out.eq(value << ls)
    return out


class Normalizer(wiring.Component):
    """Peak finder and round-shifter for ``lanes`` wide signed values.

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
    mant : Out(ArrayLayout(signed(16), lanes))
        Rounded mantissas of ``wide`` under the current peak (combinational).
    exp_out : Out(EXP_SHAPE)
        Shared exponent of the result (``EXP_MIN`` for an all-zero vector).
    overflow : Out(1)
        The result exponent exceeds ``EXP_MAX``; the vector must not be written.
    """

    def __init__(self, width: int, lanes: int):
        if width < nx.MANT_BITS + 1 or lanes < 1:
            self._MustUse__silence = True  # a rejected component is not an unused one
            raise ValueError(f"normalizer needs width >= {nx.MANT_BITS + 1} and lanes >= 1, got {width}, {lanes}")
        self.width = width
        self.lanes = lanes
        super().__init__({
            "clear": In(1),
            "sample": In(1),
            "wide": In(data.ArrayLayout(signed(width), lanes)),
            "valid": In(lanes),
            "exp_in": In(EXP_WIDE),
            "mant": Out(data.ArrayLayout(signed(16), lanes)),
            "exp_out": Out(EXP_SHAPE),
            "overflow": Out(1),
        })

    def elaborate(self, platform):
        m = Module()
        w = self.width
        peak_bits = Signal(w, name="peak_bits")  # OR of magnitudes so far
        mags = []
        for i in range(self.lanes):
            x = self.wide[i]
            mag = Signal(w, name=f"mag{i}")
            m.d.comb += mag.eq(Mux(self.valid[i], Mux(x < 0, -x, x), 0))
            mags.append(mag)
        sampled = peak_bits
        for mag in mags:
            sampled = sampled | mag
        with m.If(self.clear):
            m.d.sync += peak_bits.eq(0)
        with m.Elif(self.sample):
            m.d.sync += peak_bits.eq(sampled)

        peak_len = bit_length(m, peak_bits, "peak_len")
        shift = Signal(signed(len(peak_len) + 2), name="norm_shift")
        m.d.comb += shift.eq(peak_len - nx.MANT_BITS)
        exp_raw = Signal(signed(len(self.exp_in) + 1), name="exp_raw")
        m.d.comb += exp_raw.eq(self.exp_in + shift)
        is_zero = Signal(name="peak_zero")
        m.d.comb += is_zero.eq(peak_bits == 0)
        underflow = Signal(range(_UNDERFLOW_CAP + 1), name="underflow_shift")
        m.d.comb += underflow.eq(Mux(exp_raw < nx.EXP_MIN,
                                     Mux(exp_raw < nx.EXP_MIN - _UNDERFLOW_CAP, _UNDERFLOW_CAP, nx.EXP_MIN - exp_raw), 0))
        m.d.comb += [
            self.exp_out.eq(Mux(is_zero | (exp_raw < nx.EXP_MIN), nx.EXP_MIN, exp_raw)),
            self.overflow.eq(~is_zero & (exp_raw > nx.EXP_MAX)),
        ]
        for i in range(self.lanes):
            r = round_shift_expr(m, self.wide[i], shift, w, nx.MANT_BITS, f"rounded{i}")
            clipped = Signal(signed(16), name=f"clipped{i}")
            m.d.comb += clipped.eq(Mux(r > nx.MANT_MAX, nx.MANT_MAX, Mux(r < -nx.MANT_MAX, -nx.MANT_MAX, r)))
            under = Signal(signed(17), name=f"under{i}")
            m.d.comb += under.eq((clipped + ((Const(1, 18) << underflow) >> 1)) >> underflow)
            m.d.comb += self.mant[i].eq(Mux(is_zero, 0, Mux(underflow > 0, under, clipped)))
        return m


def scalar_mantissa(m: Module, value, shift, under, prefix: str) -> Signal:
    """One lane of ``numerics.normalize`` for units that normalize one element per cycle (REQ, LDROW).

    *value* is round-shifted by *shift* (half up; a non-positive shift is exact, left), wrapping at 64 bits as
    numpy's int64 does, clipped to +-``MANT_MAX``, then round-shifted again by *under* when the exponent
    underflowed. A shift of 17 or more rounds every 16-bit mantissa to 0, so 17 stands for all of them.
    Returns the signed 17-bit mantissa; signal names start with *prefix*.
    """
    rs = Signal(range(64), name=f"{prefix}_right_shift")
    m.d.comb += rs.eq(Mux(shift > 0, shift, 1))
    biased = Signal(signed(64), name=f"{prefix}_biased")
    m.d.comb += biased.eq(value + ((Const(1, 65) << rs) >> 1))
    scaled = Signal(signed(64), name=f"{prefix}_scaled")
    m.d.comb += scaled.eq(Mux(shift > 0, biased >> rs, value << (-shift)[:5]))
    clipped = Signal(signed(17), name=f"{prefix}_clipped")
    with m.If(scaled > nx.MANT_MAX):
        m.d.comb += clipped.eq(nx.MANT_MAX)
    with m.Elif(scaled < -nx.MANT_MAX):
        m.d.comb += clipped.eq(-nx.MANT_MAX)
    with m.Else():
        m.d.comb += clipped.eq(scaled)
    us = Signal(range(18), name=f"{prefix}_underflow_shift")
    m.d.comb += us.eq(Mux(under > 17, 17, under[:5]))
    under_biased = Signal(signed(19), name=f"{prefix}_underflow_biased")
    mant = Signal(signed(17), name=f"{prefix}_mantissa")
    m.d.comb += [under_biased.eq(clipped + ((Const(1, 18) << us) >> 1)),
                 mant.eq(Mux(under > 0, under_biased >> us, clipped))]
    return mant
