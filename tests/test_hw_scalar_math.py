"""Divider, Multiplier and Isqrt in Amaranth's simulator against Python's // and math.isqrt, with exact cycle counts."""

import math

import numpy as np
import pytest
from amaranth.sim import Simulator
from kvoverlay.hw.divider import Divider, Multiplier
from kvoverlay.hw.isqrt import Isqrt

from kvoverlay.timing import divider_cycles, isqrt_cycles, multiplier_cycles


@pytest.mark.parametrize("per_cycle", [1, 2, 4])
def test_divider_matches_floor_division(per_cycle):
    dut = Divider(76, 14, per_cycle)
    rng = np.random.default_rng(5)
    cases = [(0, 1, 8), (1, 1, 1), ((1 << 76) - 1, 8191, 76), ((1 << 75) + 12345, 3, 76), (1000, 7, 10), (99, 100, 7)]
    cases += [(int(rng.integers(0, 1 << 62)) << 10 | int(rng.integers(0, 1024)), int(rng.integers(1, 1 << 14)), 76)
              for _ in range(20)]
    seen = []

    async def tb(ctx):
        for num, den, bits in cases:
            ctx.set(dut.numerator, num)
            ctx.set(dut.denominator, den)
            ctx.set(dut.bits, bits)
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            cycles = 0
            while not ctx.get(dut.done):
                await ctx.tick()
                cycles += 1
            seen.append((ctx.get(dut.quotient), ctx.get(dut.remainder), cycles))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    for (num, den, bits), (q, r, cycles) in zip(cases, seen):
        assert (q, r) == divmod(num, den), (num, den)
        assert cycles == divider_cycles(bits, per_cycle)


def test_divider_rejects_odd_radix():
    with pytest.raises(ValueError, match="bits_per_cycle=3"):
        Divider(8, 8, 3)


@pytest.mark.parametrize("per_cycle", [1, 2, 3])
def test_isqrt_matches_math_isqrt(per_cycle):
    dut = Isqrt(25, per_cycle)
    rng = np.random.default_rng(6)
    cases = [0, 1, 2, 3, 4, (1 << 50) - 1, 1 << 48, (1 << 47) + 1, 24 ** 2, 24 ** 2 - 1]
    cases += [int(rng.integers(1 << 47, 1 << 50)) for _ in range(20)]
    seen = []

    async def tb(ctx):
        for v in cases:
            ctx.set(dut.radicand, v)
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            cycles = 0
            while not ctx.get(dut.done):
                await ctx.tick()
                cycles += 1
            seen.append((ctx.get(dut.root), cycles))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    for v, (root, cycles) in zip(cases, seen):
        assert root == math.isqrt(v), v
        assert cycles == isqrt_cycles(25, per_cycle)


@pytest.mark.parametrize("per_cycle", [1, 2, 3])
def test_multiplier_matches_product(per_cycle):
    dut = Multiplier(46, 31, per_cycle)
    rng = np.random.default_rng(7)
    cases = [(0, 0), (1, 1), ((1 << 46) - 1, (1 << 31) - 1), ((1 << 46) - 1, 1), (1, (1 << 31) - 1), (12345, 0)]
    cases += [(int(rng.integers(0, 1 << 46)), int(rng.integers(0, 1 << 31))) for _ in range(20)]
    seen = []

    async def tb(ctx):
        for a, b in cases:
            ctx.set(dut.a, a)
            ctx.set(dut.b, b)
            ctx.set(dut.start, 1)
            await ctx.tick()
            ctx.set(dut.start, 0)
            cycles = 0
            while not ctx.get(dut.done):
                await ctx.tick()
                cycles += 1
            seen.append((ctx.get(dut.product), cycles))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    for (a, b), (product, cycles) in zip(cases, seen):
        assert product == a * b, (a, b)
        assert cycles == multiplier_cycles(31, per_cycle)


def test_multiplier_rejects_zero_radix():
    with pytest.raises(ValueError, match="bits_per_cycle=0"):
        Multiplier(8, 8, 0)
