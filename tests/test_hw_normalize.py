"""The normalizer pieces in Amaranth's simulator against numerics: Normalizer against numerics.normalize (vector and
wide widths), scalar_mantissa (REQ/LDROW's int64 lane) and round_shift_expr's int64 form (the attention engine's)
against numerics' int64 rounding, wraparound included."""

import numpy as np
import pytest
from amaranth.hdl import Module, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out
from amaranth.sim import Simulator
from kvoverlay.hw.normalize import MANT_SHAPE, Normalizer, round_shift_expr, round_shift_halving, scalar_mantissa

from kvoverlay import numerics as nx


def _run(width, lanes, vectors, lane_widths=None, bounded=False):
    """Normalize each (values, exponent) through the hardware; returns [(mantissas, exponent, overflow)]."""
    dut = Normalizer(width, lanes, lane_widths=lane_widths, bounded=bounded)
    results = []

    async def tb(ctx):
        for vals, e in vectors:
            ctx.set(dut.clear, 1)
            await ctx.tick()
            ctx.set(dut.clear, 0)
            ctx.set(dut.exp_in, e)
            chunks = [vals[i:i + lanes] for i in range(0, len(vals), lanes)]
            for ch in chunks:
                ctx.set(dut.wide, [int(v) for v in ch] + [0] * (lanes - len(ch)))
                ctx.set(dut.valid, (1 << len(ch)) - 1)
                ctx.set(dut.sample, 1)
                await ctx.tick()
            ctx.set(dut.sample, 0)
            out = []
            for ch in chunks:
                ctx.set(dut.wide, [int(v) for v in ch] + [0] * (lanes - len(ch)))
                out += [ctx.get(dut.mant[i]) for i in range(len(ch))]
            results.append((out, ctx.get(dut.exp_out), ctx.get(dut.overflow)))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    return results


def _cases(rng, width, n_random):
    hi = 1 << (width - 2)
    cases = [
        ([0, 0, 0], 3),                       # all zero: EXP_MIN
        ([5, 5, 5, 5, 5], -20),               # all equal, left shift
        ([-(1 << 20) - (1 << 5)] * 3, 0),     # negative ties round half up
        ([(1 << 20) + (1 << 5), 7], 0),       # positive tie
        ([(1 << 16) - 1, -1], 0),             # rounds up to 2**15, clipped to MANT_MAX
        ([-(1 << 16) + 1, 1], 0),
        ([12345, -3], nx.EXP_MIN - 3),        # underflow by 3
        ([1 << 14, -(1 << 14), 3], nx.EXP_MIN - 40),  # deep underflow
        ([123, -456], nx.EXP_MAX - 2),        # in range after the shift
        ([1 << 30, 1], nx.EXP_MAX),           # overflow
        ([-1], nx.EXP_MIN),
    ]
    for _ in range(n_random):
        n = int(rng.integers(1, 11))
        bits = int(rng.integers(1, width - 1))
        vals = rng.integers(-(1 << bits), 1 << bits, size=n)
        vals = np.clip(vals, -hi, hi)
        cases.append(([int(v) for v in vals], int(rng.integers(nx.EXP_MIN - 60, nx.EXP_MAX - 30))))
    return cases


@pytest.mark.parametrize("width,lanes,lane_widths,bounded", [(34, 4, None, False), (64, 1, None, False),
                                                               (49, 4, (49, 34, 34, 34), False),
                                                               (49, 4, (49, 34, 34, 34), True)],
                         ids=["vector-34x4", "wide-64x1", "narrow-lanes", "narrow-lanes-bounded"])
def test_normalizer_matches_numerics(width, lanes, lane_widths, bounded):
    rng = np.random.default_rng(width)
    cases = _cases(rng, min(lane_widths or [width]), 60)  # values every lane can carry
    got = _run(width, lanes, cases, lane_widths, bounded)  # the round phase sees the sampled values
    checked_overflow = 0
    for (vals, e), (mant, eo, ovf) in zip(cases, got):
        try:
            want_m, want_e = nx.normalize(np.array(vals, np.int64), e)
        except nx.NumericsError:
            assert ovf == 1, (vals, e)
            checked_overflow += 1
            continue
        assert ovf == 0, (vals, e)
        assert mant == [int(v) for v in want_m], (vals, e)
        assert eo == want_e, (vals, e)
    assert checked_overflow >= 1


def test_normalizer_rejects_narrow_width():
    with pytest.raises(ValueError, match="width"):
        Normalizer(8, 4)
    with pytest.raises(ValueError, match=r"\[49, 50\]"):
        Normalizer(49, 2, lane_widths=[49, 50])


def _evaluate(dut, cases, out):
    """Drive each case's inputs ({member: value}) into the combinational *dut* and read its member *out*."""
    got = []

    async def tb(ctx):
        for case in cases:
            for name, value in case.items():
                ctx.set(getattr(dut, name), value)
            got.append(ctx.get(getattr(dut, out)))

    sim = Simulator(dut)
    sim.add_testbench(tb)
    sim.run()
    return got


class _ScalarLane(wiring.Component):
    """scalar_mantissa as a component, with REQ's operand widths."""

    value: In(signed(64))
    shift: In(signed(9))
    under: In(signed(14))
    mant: Out(MANT_SHAPE)

    def __init__(self, bounded=False):
        self.bounded = bounded
        super().__init__()

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.mant.eq(scalar_mantissa(m, self.value, self.shift, self.under, "lane", bounded=self.bounded))
        return m


def _scalar_reference(value, shift, under):
    """numerics.normalize's lane on an int64: round, clip, round again on underflow (numpy wraps near 2**63)."""
    mant = np.clip(nx.round_shift(np.array([value], np.int64), shift), -nx.MANT_MAX, nx.MANT_MAX)
    return int((nx.round_shift(mant, under) if under > 0 else mant)[0])


def test_scalar_mantissa_matches_int64_numerics():
    rng = np.random.default_rng(11)
    top = (1 << 63) - 1
    cases = [(0, -15, 0), (12345, -2, 0), (-(1 << 40) - (1 << 24), 26, 0), ((1 << 40) + (1 << 25), 26, 3),
             (top, 49, 0), (top - 5, 48, 0), (-top - 1, 49, 0), (-(1 << 62), 48, 20), (32767, 0, 16), (-32767, 0, 17),
             (1 << 20, 6, -4)]
    for _ in range(60):
        bits = int(rng.integers(1, 64))
        value = int(rng.integers(-(1 << (bits - 1)), 1 << (bits - 1))) if bits > 1 else 0
        shift = max(-nx.MANT_BITS, bits - nx.MANT_BITS + int(rng.integers(-1, 2)))
        cases.append((value, shift, int(rng.integers(-3, 20))))
    got = _evaluate(_ScalarLane(), [{"value": v, "shift": s, "under": u} for v, s, u in cases], "mant")
    for (value, shift, under), mant in zip(cases, got):
        assert mant == _scalar_reference(value, shift, under), (value, shift, under)


def test_bounded_scalar_mantissa_matches_int64_numerics():
    """The bounded lane (REQ's and LDROW's) on values under their peak, shift = bitlen(peak) - MANT_BITS: the
    extremes of int64 (where numpy's rounding add wraps) and values far below the peak."""
    rng = np.random.default_rng(13)
    top = (1 << 63) - 1
    cases = []  # (value, peak bit length)
    for value in (top, top - 5, -top - 1, -top, (1 << 62), -(1 << 62) - 1, 32767, -32768, 0, 1, -1):
        cases.append((value, max(1, abs(value).bit_length())))
    cases += [(top - (1 << 46), 63), (-(1 << 20), 64), (12345, 63), (-7, 15), (7, 3)]
    for _ in range(80):
        bits = int(rng.integers(1, 65))
        value = int(rng.integers(-(1 << (bits - 1)), 1 << (bits - 1))) if bits > 1 else 0
        cases.append((value, max(bits, abs(value).bit_length())))
    inputs = [{"value": v, "shift": max(pb - nx.MANT_BITS, -nx.MANT_BITS), "under": int(rng.integers(-3, 20))}
              for v, pb in cases]
    got = _evaluate(_ScalarLane(bounded=True), inputs, "mant")
    for case, mant in zip(inputs, got):
        assert mant == _scalar_reference(case["value"], case["shift"], case["under"]), case


class _Int64RoundShift(wiring.Component):
    """round_shift_expr as numpy's int64 round_shift: shifts clamped to 63 right, 62 left, wrapping at 64 bits."""

    value: In(signed(64))
    shift: In(signed(16))
    out: Out(signed(64))

    def elaborate(self, platform):
        m = Module()
        m.d.comb += self.out.eq(round_shift_expr(m, self.value, self.shift, 63, 62, "x", wrap=64))
        return m


def test_round_shift_expr_wraps_as_int64():
    rng = np.random.default_rng(12)
    top = (1 << 63) - 1
    cases = [(top, 1), (top, 63), (top, 70), (-top - 1, 1), (-top - 1, -1), (1 << 62, -1), (3, -62), (-3, -62),
             (5, 0), (-5, 1), (-6, 2), (7, -70)]
    cases += [(int(rng.integers(-top - 1, top, dtype=np.int64)), int(rng.integers(-64, 72))) for _ in range(80)]
    got = _evaluate(_Int64RoundShift(), [{"value": v, "shift": s} for v, s in cases], "out")
    for (value, shift), out in zip(cases, got):
        want = int(nx.round_shift(np.array([value], np.int64), np.array([shift]))[0])
        assert out == want, (value, shift)


class _HalvingRoundShift(wiring.Component):
    """The write-back lanes' round-shift (value moved left, one arithmetic shift, +1 and a halving) on 7-bit values,
    clamped at 5 bits right and 3 left, in full width and cut to 5 result bits."""

    value: In(signed(7))
    shift: In(signed(6))
    out: Out(signed(10))
    cut: Out(signed(5))

    def elaborate(self, platform):
        m = Module()
        m.d.comb += [self.out.eq(round_shift_halving(m, self.value, self.shift, 5, 3, "x")),
                     self.cut.eq(round_shift_halving(m, self.value, self.shift, 5, 3, "y", out_bits=5))]
        return m


def testround_shift_halving_is_round_shift_exhaustively():
    """Every 7-bit value at every shift from -6 to 8: numerics.round_shift with the shift clamped to [-3, 5]
    (round_shift_expr's clamps), and its low 5 bits where the result is cut."""
    cases = [{"value": v, "shift": s} for v in range(-64, 64) for s in range(-6, 9)]
    got = _evaluate(_HalvingRoundShift(), cases, "out")
    cut = _evaluate(_HalvingRoundShift(), cases, "cut")
    for case, out, low in zip(cases, got, cut):
        want = int(nx.round_shift(np.array([case["value"]], np.int64), min(max(case["shift"], -3), 5))[0])
        assert out == want and low == (want + 16) % 32 - 16, (case, out, low, want)
