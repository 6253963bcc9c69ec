"""Simulation top: :class:`~hw.attention.AttentionEngine` with the activation buffer, registers,
accumulator buffer and :class:`~hw.kv_buffer.KvBuffer`.

The host ports load the activation buffer and registers in bulk before ``start`` and read
results back after ``done``; a whole instruction runs in HDL with no per-cycle Python.
"""

from __future__ import annotations

from amaranth.hdl import Array, Module, Signal, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from kvoverlay import isa, numerics

from .attention import AttentionEngine, AttnError
from .kv_buffer import EXP_SHAPE, KvBuffer, kv_host_read_signature

__all__ = ["TOP_NAME", "AttentionSimTop"]

#: Verilog module name of the top; differs from every port name.
TOP_NAME = "attention_sim_top"


class AttentionSimTop(wiring.Component):
    """Engine, KV buffer, activation buffer, accumulator buffer and register files.

    Parameters
    ----------
    config : OverlayConfig
        Overlay parameters.

    Attributes
    ----------
    insn, start, busy, done, error, error_code, cycles
        The engine's command interface.
    host_abuf_waddr, host_abuf_wdata, host_abuf_we : In
        Whole-word write port of the activation buffer.
    host_abuf_raddr, host_abuf_rdata : In, Out
        Activation-buffer read port (latency 1).
    host_ereg_addr, host_ereg_wdata, host_ereg_we, host_ereg_rdata
        Exponent register access (combinational read).
    host_reg_addr, host_reg_wdata, host_reg_we
        Scalar register write.
    host_acc_raddr, host_acc_rdata
        Accumulator-buffer read port (latency 1).
    host_kv : In(kv_host_read_signature(config))
        KV-buffer read port (latency 1).
    """

    def __init__(self, config):
        self.config = config
        self.engine = AttentionEngine(config)
        self.kv_buffer = KvBuffer(config)
        eng = self.engine.signature.members
        super().__init__({
            "insn": In(isa.INSN_BITS),
            "start": In(1),
            "busy": Out(1),
            "done": Out(1),
            "error": Out(1),
            "error_code": Out(AttnError),
            "cycles": Out(32),
            "host_abuf_waddr": In(eng["abuf_waddr"].shape),
            "host_abuf_wdata": In(eng["abuf_wdata"].shape),
            "host_abuf_we": In(1),
            "host_abuf_raddr": In(eng["abuf_raddr0"].shape),
            "host_abuf_rdata": Out(eng["abuf_rdata0"].shape),
            "host_ereg_addr": In(range(isa.NUM_EREGS)),
            "host_ereg_wdata": In(EXP_SHAPE),
            "host_ereg_we": In(1),
            "host_ereg_rdata": Out(EXP_SHAPE),
            "host_reg_addr": In(range(isa.NUM_REGS)),
            "host_reg_wdata": In(32),
            "host_reg_we": In(1),
            "host_acc_raddr": In(eng["acc_waddr"].shape),
            "host_acc_rdata": Out(64),
            "host_kv": In(kv_host_read_signature(config)),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        eng = self.engine
        m.submodules.engine = eng
        m.submodules.kv_buffer = kvb = self.kv_buffer
        wiring.connect(m, eng.kv, kvb.port)
        wiring.connect(m, wiring.flipped(self.host_kv), kvb.host)
        m.d.comb += [
            eng.insn.eq(self.insn), eng.start.eq(self.start),
            self.busy.eq(eng.busy), self.done.eq(eng.done), self.error.eq(eng.error),
            self.error_code.eq(eng.error_code), self.cycles.eq(eng.cycles),
        ]

        lanes = eng.abuf_lanes
        m.submodules.abuf = abuf = Memory(shape=unsigned(16 * lanes), depth=eng.abuf_depth, init=[])
        r0, r1, rh = abuf.read_port(), abuf.read_port(), abuf.read_port()
        w_eng = abuf.write_port(granularity=16)
        w_host = abuf.write_port(granularity=16)
        m.d.comb += [
            r0.addr.eq(eng.abuf_raddr0), eng.abuf_rdata0.eq(r0.data),
            r1.addr.eq(eng.abuf_raddr1), eng.abuf_rdata1.eq(r1.data),
            rh.addr.eq(self.host_abuf_raddr), self.host_abuf_rdata.eq(rh.data),
            w_eng.addr.eq(eng.abuf_waddr), w_eng.data.eq(eng.abuf_wdata), w_eng.en.eq(eng.abuf_wmask),
            w_host.addr.eq(self.host_abuf_waddr), w_host.data.eq(self.host_abuf_wdata),
            w_host.en.eq(self.host_abuf_we.replicate(lanes)),
        ]

        m.submodules.accbuf = accbuf = Memory(shape=unsigned(64), depth=cfg.acc_buffer_words, init=[])
        aw, ar = accbuf.write_port(), accbuf.read_port()
        m.d.comb += [
            aw.addr.eq(eng.acc_waddr), aw.data.eq(eng.acc_wdata), aw.en.eq(eng.acc_we),
            ar.addr.eq(self.host_acc_raddr), self.host_acc_rdata.eq(ar.data),
        ]

        eregs = Array(Signal(EXP_SHAPE, init=numerics.EXP_MIN, name=f"ereg{i}") for i in range(isa.NUM_EREGS))
        regs = Array(Signal(32, name=f"reg{i}") for i in range(isa.NUM_REGS))
        m.d.comb += [
            eng.ereg_rdata0.eq(eregs[eng.ereg_raddr0]), eng.ereg_rdata1.eq(eregs[eng.ereg_raddr1]),
            self.host_ereg_rdata.eq(eregs[self.host_ereg_addr]),
            eng.reg_rdata.eq(regs[eng.reg_raddr]),
        ]
        with m.If(eng.ereg_we):
            m.d.sync += eregs[eng.ereg_waddr].eq(eng.ereg_wdata)
        with m.Elif(self.host_ereg_we):
            m.d.sync += eregs[self.host_ereg_addr].eq(self.host_ereg_wdata)
        with m.If(self.host_reg_we):
            m.d.sync += regs[self.host_reg_addr].eq(self.host_reg_wdata)
        return m
