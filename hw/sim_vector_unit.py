"""Simulation top of the vector unit: activation and accumulator buffers, registers, host access ports.

A test loads a case's operands through the host ports (a few dozen words), starts one
instruction and waits for ``done``; the unit then runs with no Python on the per-cycle path.
"""

from __future__ import annotations

from amaranth.hdl import Array, Module, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from kvoverlay import isa

from .normalize import EXP_SHAPE
from .vector_unit import VecError, VectorUnit, abuf_lanes

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
    insn, start, busy, done, error, error_code : In/Out
        The unit's command interface.
    cycles : Out(32)
        Cycles ``busy`` was high during the current or last instruction.
    host_wr_addr, host_wr_data, host_wr_en : In
        Activation-buffer word writes (whole words) while the unit is idle.
    host_acc_addr, host_acc_data, host_acc_we : In
        Accumulator-buffer writes.
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
            "insn": In(isa.INSN_BITS),
            "start": In(1),
            "busy": Out(1),
            "done": Out(1),
            "error": Out(1),
            "error_code": Out(VecError),
            "cycles": Out(32),
            "host_wr_addr": In(range(self.depth)),
            "host_wr_data": In(16 * self.lanes),
            "host_wr_en": In(1),
            "host_acc_addr": In(range(config.acc_buffer_words)),
            "host_acc_data": In(64),
            "host_acc_we": In(1),
            "host_rd_addr": In(range(self.depth)),
            "host_rd_data": Out(16 * self.lanes),
            "host_ereg_addr": In(range(isa.NUM_EREGS)),
            "host_ereg_wdata": In(EXP_SHAPE),
            "host_ereg_we": In(1),
            "host_ereg_rdata": Out(EXP_SHAPE),
            "host_reg_addr": In(range(isa.NUM_REGS)),
            "host_reg_wdata": In(32),
            "host_reg_we": In(1),
            "host_reg_rdata": Out(32),
        })

    def elaborate(self, platform):
        m = Module()
        L = self.lanes
        m.submodules.vector_unit = vu = VectorUnit(self.config)
        m.submodules.abuf = abuf = Memory(shape=unsigned(16 * L), depth=self.depth, init=[])
        rd_a, rd_b, rd_host = abuf.read_port(), abuf.read_port(), abuf.read_port()
        wr_unit = abuf.write_port(granularity=16)
        wr_host = abuf.write_port()
        m.submodules.accbuf = accbuf = Memory(shape=signed(64), depth=self.config.acc_buffer_words, init=[])
        acc_rd, acc_wr = accbuf.read_port(), accbuf.write_port()
        m.d.comb += [
            acc_rd.addr.eq(vu.acc_rd_addr), vu.acc_rd_data.eq(acc_rd.data),
            acc_wr.addr.eq(self.host_acc_addr), acc_wr.data.eq(self.host_acc_data), acc_wr.en.eq(self.host_acc_we),
        ]
        eregs = Array(Signal(EXP_SHAPE, name=f"ereg{i}") for i in range(isa.NUM_EREGS))
        regs = Array(Signal(32, name=f"reg{i}") for i in range(isa.NUM_REGS))
        m.d.comb += [
            vu.insn.eq(self.insn), vu.start.eq(self.start),
            self.busy.eq(vu.busy), self.done.eq(vu.done), self.error.eq(vu.error), self.error_code.eq(vu.error_code),
            rd_a.addr.eq(vu.abuf_rd_a_addr), vu.abuf_rd_a_data.eq(rd_a.data),
            rd_b.addr.eq(vu.abuf_rd_b_addr), vu.abuf_rd_b_data.eq(rd_b.data),
            wr_unit.addr.eq(vu.abuf_wr_addr), wr_unit.data.eq(vu.abuf_wr_data), wr_unit.en.eq(vu.abuf_wr_en),
            wr_host.addr.eq(self.host_wr_addr), wr_host.data.eq(self.host_wr_data), wr_host.en.eq(self.host_wr_en),
            rd_host.addr.eq(self.host_rd_addr), self.host_rd_data.eq(rd_host.data),
            vu.ereg_rd_a_data.eq(eregs[vu.ereg_rd_a_addr]),
            vu.ereg_rd_b_data.eq(eregs[vu.ereg_rd_b_addr]),
            vu.ereg_rd_c_data.eq(eregs[vu.ereg_rd_c_addr]),
            self.host_ereg_rdata.eq(eregs[self.host_ereg_addr]),
            self.host_reg_rdata.eq(regs[self.host_reg_addr]),
        ]
        with m.If(vu.ereg_wr_en):
            m.d.sync += eregs[vu.ereg_wr_addr].eq(vu.ereg_wr_data)
        with m.Elif(self.host_ereg_we):
            m.d.sync += eregs[self.host_ereg_addr].eq(self.host_ereg_wdata)
        with m.If(vu.reg_wr_en):
            m.d.sync += regs[vu.reg_wr_addr].eq(vu.reg_wr_data)
        with m.Elif(self.host_reg_we):
            m.d.sync += regs[self.host_reg_addr].eq(self.host_reg_wdata)
        cycles = Signal(32, name="busy_cycles")
        m.d.comb += self.cycles.eq(cycles)
        with m.If(self.start & ~vu.busy):
            m.d.sync += cycles.eq(0)
        with m.Elif(vu.busy):
            m.d.sync += cycles.eq(cycles + 1)
        return m
