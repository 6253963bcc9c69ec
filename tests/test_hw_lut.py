"""The activation gate table in Amaranth's simulator: bit-exact with numerics.act's gate for every exponent whose
left shift numerics computes exactly, at the inputs around the table's ends (where the lanes' saturation thresholds
decide) and at random ones; saturated at the table's ends for the exponents beyond."""

import numpy as np
import pytest

pytest.importorskip("amaranth")

from amaranth.sim import Simulator
from kvoverlay.hw.lut import LATENCY, GateLut

from kvoverlay import isa
from kvoverlay import numerics as nx

LANES = 4
_SEG = nx._ACT_SHIFT
_LIMIT = nx.ACT_RANGE << nx.ACT_FRAC


def _gate(x, ex, func):
    """numerics.act's gate of each element (its first three steps)."""
    table = nx.GATE_TABLES[func]
    xf = nx.round_shift(np.asarray(x, np.int64), -(ex + nx.ACT_FRAC))
    pos = np.clip(xf + _LIMIT, 0, 2 * _LIMIT - 1)
    gate = nx.lut_interp(table, pos >> _SEG, pos & ((1 << _SEG) - 1), _SEG)
    return np.where(xf >= _LIMIT, nx.GATE_ONE, gate)


def _inputs(ex, rng):
    """The inputs on both sides of where x << -(ex + ACT_FRAC) leaves the table, the extremes and random ones."""
    ls = -(ex + nx.ACT_FRAC)
    edges = {0, 1, -1, 2, -2, nx.MANT_MAX, -nx.MANT_MAX, -(1 << 15), (1 << 15) - 1}
    if 0 < ls <= 16:
        t = _LIMIT >> ls
        edges |= {t - 1, t, t + 1, -t - 1, -t, -t + 1}
    xs = sorted(v for v in edges if -(1 << 15) <= v < (1 << 15))
    xs += [int(v) for v in rng.integers(-(1 << 15), 1 << 15, 12)]
    return xs + [0] * (-len(xs) % LANES)


def test_gate_table_matches_numerics():
    rng = np.random.default_rng(10)
    dut = GateLut(LANES)
    # exponents from right shifts of up to 18 bits to left shifts of 23 (numerics wraps from ex > 35 only)
    exps = list(range(-30, 12))
    cases = [(ex, func, _inputs(ex, rng)) for ex in exps for func in range(len(isa.ENUMS["func"]))]
    got = []

    async def tb(ctx):
        # a new group of inputs (and a new exponent and table) every cycle; each group's gates LATENCY cycles later
        groups = [(ex, func, xs[k:k + LANES]) for ex, func, xs in cases for k in range(0, len(xs), LANES)]
        out = []
        for i in range(len(groups) + LATENCY - 1):
            if i < len(groups):
                ex, func, xs = groups[i]
                ctx.set(dut.exp, ex)
                ctx.set(dut.func, func)
                for j in range(LANES):
                    ctx.set(dut.x[j], xs[j])
            await ctx.tick()
            if i >= LATENCY - 1:
                out += [ctx.get(dut.gate[j]) for j in range(LANES)]
        pos = 0
        for ex, func, xs in cases:
            got.append(out[pos:pos + len(xs)])
            pos += len(xs)

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    for (ex, func, xs), out in zip(cases, got):
        want = [int(v) for v in _gate(xs, ex, isa.ENUMS["func"][func])]
        assert out == want, (ex, isa.ENUMS["func"][func])


def test_saturates_beyond_int64_shifts():
    """ex > 35: numerics' int64 shift wraps; the table saturates at its ends (the mathematical gate)."""
    dut = GateLut(LANES)
    xs = [1, -1, 0, nx.MANT_MAX]
    got = {}

    async def tb(ctx):
        for ex in (36, 60, nx.EXP_MAX):
            ctx.set(dut.exp, ex)
            ctx.set(dut.func, isa.ENUMS["func"].index("silu"))
            for j in range(LANES):
                ctx.set(dut.x[j], xs[j])
            await ctx.tick().repeat(LATENCY)
            got[ex] = [ctx.get(dut.gate[j]) for j in range(LANES)]

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    table = nx.GATE_TABLES["silu"]
    for ex, out in got.items():
        assert out == [nx.GATE_ONE, int(table[0]), int(table[nx.ACT_SEGMENTS // 2]), nx.GATE_ONE], ex
