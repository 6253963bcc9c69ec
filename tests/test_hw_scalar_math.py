"""Divider, Multiplier and Isqrt in Amaranth's simulator against Python's // and math.isqrt, with exact cycle counts."""

import math

import numpy as np
import pytest
from amaranth.sim import Simulator
from kvoverlay.hw.divider import Divider, Multiplier
from kvoverlay.hw.isqrt import Isqrt

from kvoverlay.timing import divider_cycles, isqrt_cycles, multiplier_cycles


def _run(dut, inputs, outputs):
    """Start *dut* once per dict of *inputs* ({port name: value}); returns, per run, the *outputs* read when ``done``
    pulses, and the busy cycles from ``start`` to ``done``."""
    seen = []

    async def tb(ctx):
        for case in inputs:
            for name, value in case.items():
                ctx.set(getattr(dut, name), value)
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            cycles = 0
            while not ctx.get(dut.done):
                await ctx.tick()
                cycles += 1
            seen.append((*(ctx.get(getattr(dut, name)) for name in outputs), cycles))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    return seen


@pytest.mark.parametrize("per_cycle", [1, 2, 4])
def test_divider_matches_floor_division(per_cycle):
    dut = Divider(76, 14, per_cycle)
    rng = np.random.default_rng(5)
    cases = [(0, 1, 8), (1, 1, 1), ((1 << 76) - 1, 8191, 76), ((1 << 75) + 12345, 3, 76), (1000, 7, 10), (99, 100, 7)]
    cases += [(int(rng.integers(0, 1 << 62)) << 10 | int(rng.integers(0, 1024)), int(rng.integers(1, 1 << 14)), 76)
              for _ in range(20)]
    seen = _run(dut, [{"numerator": n, "denominator": d, "bits": b} for n, d, b in cases], ("quotient", "remainder"))
    for (num, den, bits), (q, r, cycles) in zip(cases, seen):
        assert (q, r) == divmod(num, den), (num, den)
        assert cycles == divider_cycles(bits, per_cycle)


@pytest.mark.parametrize("per_cycle", [1, 2])
def test_divider_with_fixed_bit_counts(per_cycle):
    """Built for a few ``bits`` (NORM's divisions), the divider aligns by a multiplexer: the same quotients and
    cycles for those, a quotient of 0 for any other."""
    counts = (61, 78, 49, 57)
    dut = Divider(78, 26, per_cycle, bit_counts=counts)
    rng = np.random.default_rng(8)
    cases = [((1 << b) - 1, (1 << 26) - 1, b) for b in counts] + [(1 << (b - 1), 1, b) for b in counts]
    cases += [(int(rng.integers(0, 1 << 62)) >> (62 - b + 1) if b < 63 else int(rng.integers(0, 1 << 62)) << (b - 62),
               int(rng.integers(1, 1 << 26)), b) for b in counts for _ in range(5)]
    seen = _run(dut, [{"numerator": n, "denominator": d, "bits": b} for n, d, b in cases + [(1000, 7, 10)]],
                ("quotient", "remainder"))
    for (num, den, bits), (q, r, cycles) in zip(cases, seen):
        assert (q, r) == divmod(num, den), (num, den, bits)
        assert cycles == divider_cycles(bits, per_cycle)
    assert seen[-1][0] == 0 and seen[-1][2] == divider_cycles(10, per_cycle)
    with pytest.raises(ValueError, match="bit_counts=\\(79,\\)"):
        Divider(78, 26, per_cycle, bit_counts=(79,))


def test_divider_rejects_odd_radix():
    with pytest.raises(ValueError, match="bits_per_cycle=3"):
        Divider(8, 8, 3)


@pytest.mark.parametrize("per_cycle", [1, 2, 3])
def test_isqrt_matches_math_isqrt(per_cycle):
    dut = Isqrt(25, per_cycle)
    rng = np.random.default_rng(6)
    cases = [0, 1, 2, 3, 4, (1 << 50) - 1, 1 << 48, (1 << 47) + 1, 24 ** 2, 24 ** 2 - 1]
    cases += [int(rng.integers(1 << 47, 1 << 50)) for _ in range(20)]
    seen = _run(dut, [{"radicand": v} for v in cases], ("root",))
    for v, (root, cycles) in zip(cases, seen):
        assert root == math.isqrt(v), v
        assert cycles == isqrt_cycles(25, per_cycle)


@pytest.mark.parametrize("per_cycle", [1, 2, 3])
def test_multiplier_matches_product(per_cycle):
    dut = Multiplier(46, 31, per_cycle)
    rng = np.random.default_rng(7)
    cases = [(0, 0), (1, 1), ((1 << 46) - 1, (1 << 31) - 1), ((1 << 46) - 1, 1), (1, (1 << 31) - 1), (12345, 0)]
    cases += [(int(rng.integers(0, 1 << 46)), int(rng.integers(0, 1 << 31))) for _ in range(20)]
    seen = _run(dut, [{"a": a, "b": b} for a, b in cases], ("product",))
    for (a, b), (product, cycles) in zip(cases, seen):
        assert product == a * b, (a, b)
        assert cycles == multiplier_cycles(31, per_cycle)


def test_multiplier_rejects_zero_radix():
    with pytest.raises(ValueError, match="bits_per_cycle=0"):
        Multiplier(8, 8, 0)
