"""The one-unit simulation top (hw/sim_unit.py) in Amaranth's simulator, with the REQ unit in it: the host ports
load the accumulators and the exponent, one REQ runs, and the result matches numerics.normalize with the busy
window of timing.req_cycles; a misaligned REQ completes with the UNALIGNED fault and writes nothing."""

import numpy as np
import pytest

pytest.importorskip("amaranth")

from amaranth.sim import Simulator
from kvoverlay.hw.ports import Fault
from kvoverlay.hw.req_unit import ReqUnit
from kvoverlay.hw.sim_unit import UnitSimTop, execute, write_acc

from kvoverlay import isa, timing
from kvoverlay import numerics as nx
from kvoverlay.config import PRESETS

CFG = PRESETS["tiny"]
LANES = CFG.abuf_lanes


def run_req(acc_words, exp, dst, acc=5):
    """One REQ of *acc_words* (at accumulator *acc*, exponent register 3) to *dst*; returns the mantissas read back,
    the result exponent (E4), the fault and the busy cycles."""
    top = UnitSimTop(CFG, ReqUnit(CFG))
    host = top.host
    n = len(acc_words)
    out = {}

    async def tb(ctx):
        # the words around the vector too, which a REQ that reads whole rows must leave out
        await write_acc(ctx, top, acc - 4, [-(1 << 62)] * 4 + list(acc_words) + [(1 << 62) - 1] * 4)
        ctx.set(host.ereg_w.addr, 3)
        ctx.set(host.ereg_w.data, exp)
        ctx.set(host.ereg_w.en, 1)
        await ctx.tick()
        ctx.set(host.ereg_w.en, 0)
        ins = isa.Instr("REQ", {"acc": acc, "acc_e": 3, "len": n, "dst": dst, "dst_e": 4})
        out["fault"], out["cycles"] = await execute(ctx, top, isa.encode(ins))
        # the unit's last write leaves it in its done cycle and lands through the state's write register: a read
        # of that word in the next cycle would collide with it (hw/state.py), so the host reads a cycle later
        await ctx.tick()
        await ctx.tick()
        ctx.set(host.ereg_r.addr, 4)
        out["exp"] = ctx.get(host.ereg_r.data)
        mants = []
        ctx.set(host.abuf_r.en, 1)
        for word in range(dst // LANES, dst // LANES + -(-n // LANES)):
            ctx.set(host.abuf_r.addr, word)
            await ctx.tick()
            data = ctx.get(host.abuf_r.data)
            mants += [np.int16(np.uint16((data >> (16 * i)) & 0xFFFF)) for i in range(LANES)]
        out["mants"] = [int(v) for v in mants[:n]]

    sim = Simulator(top)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    return out


@pytest.mark.parametrize("acc, n", [(5, 21), (8, 21), (8, 16), (12, 3), (6, 4)],
                         ids=["word-per-cycle", "rows-partial", "rows", "one-row-partial", "unaligned-row-length"])
def test_req_on_the_sim_top(acc, n):
    """From the start of an accumulator row (acc_lanes words) a row per cycle, from any other word one per cycle;
    lengths that are not a multiple of a row leave the rest of the last row out."""
    rng = np.random.default_rng(acc + n)
    words = rng.integers(-(1 << 45), 1 << 45, n)
    want_m, want_e = nx.normalize(words, -40)
    got = run_req(words, -40, dst=2 * LANES, acc=acc)
    assert got["fault"] == Fault.NONE and got["exp"] == want_e
    assert got["mants"] == [int(v) for v in want_m]
    assert got["cycles"] == timing.req_cycles(CFG, n, acc=acc)
    per_row = acc % CFG.acc_lanes == 0 and CFG.acc_lanes > 1
    assert got["cycles"] == 2 * (-(-n // CFG.acc_lanes) if per_row else n) + timing.REQ_OVERHEAD


def test_misaligned_req_faults():
    got = run_req([1, 2, 3], 0, dst=LANES + 1)
    assert got["fault"] == Fault.UNALIGNED and got["exp"] == nx.EXP_MIN and got["mants"] == [0, 0, 0]
    assert got["cycles"] == 2  # the check, then the completion
