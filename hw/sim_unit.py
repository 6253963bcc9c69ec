"""Simulation top of one execution unit: the unit, the on-chip state it works on, and host access to that state.

A testbench loads a case's operands through the host ports, starts one instruction and waits for ``done``; the
unit then runs with no Python on the per-cycle path. Any unit of :func:`hw.ports.unit_signature` fits: its ports
reach the state by signature (:class:`hw.state.OnChipState`).
"""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from kvoverlay import isa

from .ports import Fault
from .state import OnChipState, host_signature

__all__ = ["UnitSimTop"]


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
    insn, start : In
        The instruction, taken on ``start`` while the unit is idle.
    busy, done : Out(1)
        The unit's; ``done`` pulses in its last busy cycle.
    error, error_code : Out
        With ``done``: whether it faulted, and the :class:`~hw.ports.Fault`.
    cycles : Out(32)
        Cycles ``busy`` was high during the current or last instruction.
    host : In(host_signature(config))
        Every kind of port on the buffers and registers (``host__abuf_w__addr``, ... in Verilog).
    """

    def __init__(self, config, unit, **members):
        self.config, self.unit = config, unit
        super().__init__({"insn": In(isa.INSN_BITS), "start": In(1), "busy": Out(1), "done": Out(1),
                          "error": Out(1), "error_code": Out(Fault), "cycles": Out(32),
                          "host": In(host_signature(config)), **members})

    def elaborate(self, platform):
        m = Module()
        m.submodules.unit = unit = self.unit
        state = OnChipState(m, self.config)
        state.attach([unit])
        state.attach([wiring.flipped(self.host)])
        m.d.comb += [unit.cmd.payload.eq(self.insn), unit.cmd.valid.eq(self.start), self.busy.eq(unit.busy),
                     self.done.eq(unit.done.valid), self.error_code.eq(unit.done.payload),
                     self.error.eq(unit.done.valid & (unit.done.payload != Fault.NONE))]
        cycles = Signal(32, name="busy_cycles")
        m.d.comb += self.cycles.eq(cycles)
        with m.If(unit.cmd.valid & unit.cmd.ready):
            m.d.sync += cycles.eq(0)
        with m.Elif(unit.busy):
            m.d.sync += cycles.eq(cycles + 1)
        return m
