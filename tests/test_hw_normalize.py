"""Normalizer in Amaranth's simulator against numerics.normalize, including wide (REQ) mode."""

import numpy as np
import pytest
from amaranth.sim import Simulator
from kvoverlay.hw.normalize import Normalizer

from kvoverlay import numerics as nx


def _run(width, lanes, vectors):
    """Normalize each (values, exponent) through the hardware; returns [(mantissas, exponent, overflow)]."""
    dut = Normalizer(width, lanes)
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


@pytest.mark.parametrize("width,lanes", [(34, 4), (64, 1)], ids=["vector-34x4", "wide-64x1"])
def test_normalizer_matches_numerics(width, lanes):
    rng = np.random.default_rng(width)
    cases = _cases(rng, width, 60)
    got = _run(width, lanes, cases)
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
