"""Simulation top of one execution unit: the unit, the on-chip state it works on, and host access to that state.

A testbench loads a case's operands through the host ports, starts one instruction and waits for ``done``; the
unit then runs with no Python on the per-cycle path. Any unit of :func:`hw.ports.unit_signature` fits: its ports
reach the state by signature (:class:`hw.state.OnChipState`).
"""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .ports import Fault
from .state import OnChipState, host_signature

__all__ = ["UnitSimTop", "execute", "write_acc"]


class UnitSimTop(wiring.Component):
    """*unit* with an :class:`~hw.state.OnChipState` and flat command ports for a testbench.

    Parameters
    ----------
    config : OverlayConfig
    unit : wiring.Component
        A unit of :func:`hw.ports.unit_signature`; its ``cmd`` payload is the instruction word.
    members : dict
        More members of the top, for a subclass's own hardware (a KV buffer's host port, say).

    Attributes
    ----------
    cmd, busy :
        The unit's command stream and busy flag, passed through.
    done, fault : Out(1), Out(Fault)
        The unit's ``done`` stream as plain signals (a top-level port cannot be an always-ready stream, whose
        ``ready`` is a constant).
    cycles : Out(32)
        Busy cycles of the current or last instruction, the current cycle included: in the ``done`` cycle,
        the instruction's whole busy window.
    host : In(host_signature(config))
        Every kind of port on the buffers and registers (``host__abuf_w__addr``, ... in Verilog).
    """

    def __init__(self, config, unit, **members):
        self.config, self.unit = config, unit
        super().__init__({"cmd": unit.signature.members["cmd"], "busy": Out(1), "done": Out(1), "fault": Out(Fault),
                          "cycles": Out(32), "host": In(host_signature(config)), **members})

    def elaborate(self, platform):
        m = Module()
        m.submodules.unit = unit = self.unit
        state = OnChipState(m, self.config, poison=True)  # a simulation (hw.state._read_port)
        state.attach([unit])
        state.attach([wiring.flipped(self.host)], beat_writes=False)  # a testbench writes whole words
        wiring.connect(m, wiring.flipped(self.cmd), unit.cmd)
        m.d.comb += [self.busy.eq(unit.busy), self.done.eq(unit.done.valid), self.fault.eq(unit.done.payload)]
        before = Signal(32, name="busy_cycles_before")
        with m.If(unit.cmd.valid & unit.cmd.ready):
            m.d.sync += before.eq(0)
        with m.Elif(unit.busy):
            m.d.sync += before.eq(before + 1)
        m.d.comb += self.cycles.eq(before + unit.busy)
        return m


async def write_acc(ctx, top: UnitSimTop, base: int, words) -> None:
    """Testbench step: write int64 *words* into the accumulator buffer from word *base*, one per cycle."""
    host = top.host
    for i, w in enumerate(words):
        ctx.set(host.acc_w.addr, base + i)
        ctx.set(host.acc_w.data, int(w) & ((1 << 64) - 1))
        ctx.set(host.acc_w.en, 1)
        await ctx.tick()
    ctx.set(host.acc_w.en, 0)


async def execute(ctx, top: UnitSimTop, word: int) -> tuple:
    """Testbench step: issue instruction *word* and wait for ``done``; returns ``(fault, busy cycles)``."""
    ctx.set(top.cmd.payload.as_value(), word)
    ctx.set(top.cmd.valid, 1)
    await ctx.tick()
    ctx.set(top.cmd.valid, 0)
    while not ctx.get(top.done):
        await ctx.tick()
    return Fault(ctx.get(top.fault)), ctx.get(top.cycles)
