"""The memory arbiter (hw/dram.py): the write beat reaches the memory through a register
(timing.PORT_WRITE_REGISTERS), with the writer's handshake unchanged while the memory takes every beat, and held
while the memory does not."""

import pytest

pytest.importorskip("amaranth")

from amaranth.sim import Simulator
from kvoverlay.hw.dram import DramArbiter

from kvoverlay import timing
from kvoverlay.config import PRESETS

CFG = PRESETS["tiny"]


def run(ready_pattern, beats):
    """Master ``b`` (the second) owns a write burst and offers *beats* (data values) one per cycle as its ready
    allows; the memory's ``wr.ready`` follows *ready_pattern* (a value per cycle). Returns, per cycle, whether the
    writer's beat was taken and what the memory took."""
    arb = DramArbiter(CFG, ("a", "b"))
    log = []

    async def tb(ctx):
        b = arb.b
        ctx.set(b.req.valid, 1)
        ctx.set(arb.mem.req.ready, 1)
        await ctx.tick()  # the request is granted: b owns the port
        ctx.set(b.req.valid, 0)
        sent = 0
        for ready in ready_pattern:
            ctx.set(arb.mem.wr.ready, ready)
            ctx.set(b.wr.valid, sent < len(beats))
            ctx.set(b.wr.payload.data, beats[sent] if sent < len(beats) else 0)
            ctx.set(b.wr.payload.strb, (1 << CFG.port_bytes) - 1)
            taken = ctx.get(b.wr.valid) and ctx.get(b.wr.ready)
            mem = ctx.get(arb.mem.wr.payload.data) if ctx.get(arb.mem.wr.valid) and ready else None
            log.append((bool(taken), mem))
            sent += bool(taken)
            await ctx.tick()

    sim = Simulator(arb)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    return log


def test_write_beats_reach_the_memory_a_register_later():
    assert timing.PORT_WRITE_REGISTERS == 1
    log = run([1] * 6, [11, 22, 33, 44])
    assert [t for t, _ in log] == [True] * 4 + [False] * 2  # the writer's pace, as without the register
    assert [m for _, m in log] == [None, 11, 22, 33, 44, None]  # each beat a cycle later


def test_a_memory_that_waits_holds_the_writer():
    log = run([1, 0, 0, 1, 1, 1, 1], [11, 22, 33])
    # beat 11 enters the register, waits two cycles there; 22 is held at the writer until the register frees
    assert [t for t, _ in log] == [True, False, False, True, True, False, False]
    assert [m for _, m in log] == [None, None, None, 11, 22, 33, None]
