"""Simulation top of the vector unit: activation buffer, registers, host access ports.

A test loads a case's operands through the host ports (a few dozen words), sends one
instruction on ``cmd`` and waits for ``done``; the unit then runs with no Python on the per-cycle path.
"""

from __future__ import annotations

from amaranth.hdl import Array, Module, Signal, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from kvoverlay import isa

from .ports import EREG_SHAPE, Fault, abuf_lanes, unit_signature
from .vector_unit import CMD_LAYOUT, VectorUnit

__all__ = ["TOP_NAME", "VectorUnitSimTop"]

#: Verilog module name of the top; differs from every port name.
TOP_NAME = "vector_unit_sim_top"


class VectorUnitSimTop(wiring.Component):
    """:class:`~hw.vector_unit.VectorUnit` with its memories and a host port to each.

    Parameters
    ----------
    config : OverlayConfig

    Attributes
    ----------
    cmd, busy :
        The unit's command stream and busy flag (:func:`hw.ports.unit_signature`), passed through.
    done, fault : Out(1), Out(Fault)
        The unit's ``done`` stream as plain signals (a top-level port cannot be an always-ready stream, whose
        ``ready`` is a constant).
    cycles : Out(32)
        Busy cycles of the current or last instruction; the ``done`` cycle counts from the cycle after it.
    host_wr_addr, host_wr_data, host_wr_en : In
        Activation-buffer word writes (whole words) while the unit is idle.
    host_rd_addr, host_rd_data : In, Out
        Activation-buffer read port (latency 1).
    host_ereg_addr, host_ereg_wdata, host_ereg_we, host_ereg_rdata : In/Out
        Exponent-register access (combinational read).
    host_reg_addr, host_reg_wdata, host_reg_we, host_reg_rdata : In/Out
        Scalar-register access (combinational read).
    """

    def __init__(self, config):
        self.config = config
        self.lanes = abuf_lanes(config)
        self.depth = config.act_buffer_words // self.lanes
        super().__init__({
            "cmd": unit_signature(CMD_LAYOUT).members["cmd"],
            "busy": Out(1),
            "done": Out(1),
            "fault": Out(Fault),
            "cycles": Out(32),
            "host_wr_addr": In(range(self.depth)),
            "host_wr_data": In(16 * self.lanes),
            "host_wr_en": In(1),
            "host_rd_addr": In(range(self.depth)),
            "host_rd_data": Out(16 * self.lanes),
            "host_ereg_addr": In(range(isa.NUM_EREGS)),
            "host_ereg_wdata": In(EREG_SHAPE),
            "host_ereg_we": In(1),
            "host_ereg_rdata": Out(EREG_SHAPE),
            "host_reg_addr": In(range(isa.NUM_REGS)),
            "host_reg_wdata": In(32),
            "host_reg_we": In(1),
            "host_reg_rdata": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        L = self.lanes
        m.submodules.vector_unit = vu = VectorUnit(self.config)
        wiring.connect(m, wiring.flipped(self.cmd), vu.cmd)
        m.d.comb += [self.busy.eq(vu.busy), self.done.eq(vu.done.valid), self.fault.eq(vu.done.payload)]
        m.submodules.abuf = abuf = Memory(shape=unsigned(16 * L), depth=self.depth, init=[])
        rd_a, rd_b, rd_host = abuf.read_port(), abuf.read_port(), abuf.read_port()
        wr_unit = abuf.write_port(granularity=16)
        wr_host = abuf.write_port()
        eregs = Array(Signal(EREG_SHAPE, name=f"ereg{i}") for i in range(isa.NUM_EREGS))
        regs = Array(Signal(32, name=f"reg{i}") for i in range(isa.NUM_REGS))
        for port, unit_port in ((rd_a, vu.abuf_r_a), (rd_b, vu.abuf_r_b)):
            m.d.comb += [port.addr.eq(unit_port.addr), port.en.eq(unit_port.en), unit_port.data.eq(port.data)]
        for unit_port in (vu.ereg_ra, vu.ereg_rb, vu.ereg_rc):
            m.d.comb += unit_port.data.eq(eregs[unit_port.addr])
        m.d.comb += [
            wr_unit.addr.eq(vu.abuf_w.addr), wr_unit.data.eq(vu.abuf_w.data), wr_unit.en.eq(vu.abuf_w.en),
            wr_host.addr.eq(self.host_wr_addr), wr_host.data.eq(self.host_wr_data), wr_host.en.eq(self.host_wr_en),
            rd_host.addr.eq(self.host_rd_addr), self.host_rd_data.eq(rd_host.data),
            self.host_ereg_rdata.eq(eregs[self.host_ereg_addr]),
            self.host_reg_rdata.eq(regs[self.host_reg_addr]),
        ]
        with m.If(vu.ereg_w.en):
            m.d.sync += eregs[vu.ereg_w.addr].eq(vu.ereg_w.data)
        with m.Elif(self.host_ereg_we):
            m.d.sync += eregs[self.host_ereg_addr].eq(self.host_ereg_wdata)
        with m.If(vu.reg_w.en):
            m.d.sync += regs[vu.reg_w.addr].eq(vu.reg_w.data)
        with m.Elif(self.host_reg_we):
            m.d.sync += regs[self.host_reg_addr].eq(self.host_reg_wdata)
        cycles = Signal(32, name="busy_cycles")
        m.d.comb += self.cycles.eq(cycles)
        with m.If(vu.cmd.valid & vu.cmd.ready):
            m.d.sync += cycles.eq(0)
        with m.Elif(vu.busy):
            m.d.sync += cycles.eq(cycles + 1)
        return m
