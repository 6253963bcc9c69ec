"""The ARGMAXACC unit (hw/argmax_unit.py) on the one-unit simulation top, in Amaranth's simulator: an argmax chained
over tiles of int64 accumulator words gives the golden model's register after every tile (ties to the lowest index,
int64 extremes), in the busy cycles of timing.argmaxacc_cycles; an empty range faults and keeps the register."""

import numpy as np
import pytest

pytest.importorskip("amaranth")

from amaranth.sim import Simulator
from kvoverlay.hw.argmax_unit import ArgmaxUnit
from kvoverlay.hw.ports import Fault
from kvoverlay.hw.sim_unit import UnitSimTop, execute, write_acc
from kvoverlay.sim.golden import GoldenModel

from kvoverlay import isa, timing
from kvoverlay.config import PRESETS

CFG = PRESETS["tiny"]



def run_argmaxacc(tiles, rd=6):
    """ARGMAXACC over each tile of *tiles* (lists of int64 words, loaded at accumulator 9 in turn), the first with
    cont=0, the rest chained (cont=1) at base = the rows before it; returns per tile (register rd, fault, busy
    cycles)."""
    top = UnitSimTop(CFG, ArgmaxUnit(CFG))
    host = top.host
    out = []

    async def tb(ctx):
        base = 0
        for t, words in enumerate(tiles):
            await write_acc(ctx, top, 9, words)
            ins = isa.Instr("ARGMAXACC", {"acc": 9, "len": len(words), "base": base, "rd": rd, "cont": int(t > 0)})
            fault, cycles = await execute(ctx, top, isa.encode(ins))
            await ctx.tick()
            ctx.set(host.reg_r.addr, rd)
            out.append((ctx.get(host.reg_r.data), fault, cycles))
            base += len(words)

    sim = Simulator(top)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    return out


def golden_argmaxacc(tiles, rd=6):
    """The same chain on the golden model: the register after each tile."""
    gold, base, regs = GoldenModel(CFG), 0, []
    for t, words in enumerate(tiles):
        gold.acc[9:9 + len(words)] = words
        gold.step(isa.Instr("ARGMAXACC", {"acc": 9, "len": len(words), "base": base, "rd": rd, "cont": int(t > 0)}))
        regs.append(gold.regs[rd])
        base += len(words)
    return regs


def test_argmaxacc_spans_tiles_bit_exact():
    rng = np.random.default_rng(5)
    # signed int64 extremes, ties inside a tile and across tiles (the lowest index must win), a later larger word
    tiles = [rng.integers(-(1 << 62), 1 << 40, n) for n in (37, 1, 50, 23)]
    tiles[0][[4, 30]] = 1 << 41  # a tie inside the first tile: index 4
    tiles[2][7] = 1 << 41  # a tie in a later tile: still 4
    tiles[1][0] = -(1 << 63)
    got = run_argmaxacc(tiles)
    want = golden_argmaxacc(tiles)
    assert [r for r, _, _ in got] == want and want[:3] == [4, 4, 4]
    tiles[3][22] = (1 << 63) - 1  # the last word of the last tile, the largest int64
    got = run_argmaxacc(tiles)
    assert [r for r, _, _ in got] == golden_argmaxacc(tiles) and got[-1][0] == 37 + 1 + 50 + 22
    assert all(f == Fault.NONE for _, f, _ in got)
    assert [c for _, _, c in got] == [timing.argmaxacc_cycles(CFG, len(t)) for t in tiles]


def test_argmaxacc_faults_keep_the_register():
    got = run_argmaxacc([[5, 9, 2], []])
    assert got[0][:2] == (1, Fault.NONE)
    assert got[1][1] == Fault.SHAPE and got[1][0] == 1 and got[1][2] == 2
