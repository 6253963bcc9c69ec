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

from .attention import AttentionEngine
from .kv_buffer import KvBuffer, kv_host_read_signature
from .ports import EREG_SHAPE, Fault

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
    cmd, busy
        The engine's command stream and busy flag.
    done, fault : Out(1), Out(Fault)
        The engine's ``done`` stream as loose signals (its constant ``ready`` cannot be a top-level port).
    cycles : Out(32)
        Busy cycles of the current or last instruction, counting the current cycle (at ``done``: all of them).
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
        abuf = eng["abuf_w"].signature.members
        super().__init__({
            "cmd": eng["cmd"],
            "busy": Out(1),
            "done": Out(1),
            "fault": Out(Fault),
            "cycles": Out(32),
            "host_abuf_waddr": In(abuf["addr"].shape),
            "host_abuf_wdata": In(abuf["data"].shape),
            "host_abuf_we": In(1),
            "host_abuf_raddr": In(abuf["addr"].shape),
            "host_abuf_rdata": Out(abuf["data"].shape),
            "host_ereg_addr": In(range(isa.NUM_EREGS)),
            "host_ereg_wdata": In(EREG_SHAPE),
            "host_ereg_we": In(1),
            "host_ereg_rdata": Out(EREG_SHAPE),
            "host_reg_addr": In(range(isa.NUM_REGS)),
            "host_reg_wdata": In(32),
            "host_reg_we": In(1),
            "host_acc_raddr": In(eng["acc_w"].signature.members["addr"].shape),
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
        wiring.connect(m, wiring.flipped(self.cmd), eng.cmd)
        m.d.comb += [self.busy.eq(eng.busy), self.done.eq(eng.done.valid), self.fault.eq(eng.done.payload)]
        busy_before = Signal(32)
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += busy_before.eq(0)
        with m.Elif(eng.busy):
            m.d.sync += busy_before.eq(busy_before + 1)
        m.d.comb += self.cycles.eq(busy_before + eng.busy)

        lanes = eng.abuf_lanes
        m.submodules.abuf = abuf = Memory(shape=unsigned(16 * lanes), depth=eng.abuf_depth, init=[])
        w_host = abuf.write_port(granularity=16)
        for port in (eng.abuf_r0, eng.abuf_r1):
            r = abuf.read_port()
            m.d.comb += [r.addr.eq(port.addr), r.en.eq(port.en), port.data.eq(r.data)]
        rh = abuf.read_port()
        w_eng = abuf.write_port(granularity=16)
        m.d.comb += [
            rh.addr.eq(self.host_abuf_raddr), self.host_abuf_rdata.eq(rh.data),
            w_eng.addr.eq(eng.abuf_w.addr), w_eng.data.eq(eng.abuf_w.data), w_eng.en.eq(eng.abuf_w.en),
            w_host.addr.eq(self.host_abuf_waddr), w_host.data.eq(self.host_abuf_wdata),
            w_host.en.eq(self.host_abuf_we.replicate(lanes)),
        ]

        m.submodules.accbuf = accbuf = Memory(shape=unsigned(64), depth=cfg.acc_buffer_words, init=[])
        aw, ar = accbuf.write_port(), accbuf.read_port()
        m.d.comb += [
            aw.addr.eq(eng.acc_w.addr), aw.data.eq(eng.acc_w.data), aw.en.eq(eng.acc_w.en),
            ar.addr.eq(self.host_acc_raddr), self.host_acc_rdata.eq(ar.data),
        ]

        eregs = Array(Signal(EREG_SHAPE, init=numerics.EXP_MIN, name=f"ereg{i}") for i in range(isa.NUM_EREGS))
        regs = Array(Signal(32, name=f"reg{i}") for i in range(isa.NUM_REGS))
        m.d.comb += [
            eng.ereg_r0.data.eq(eregs[eng.ereg_r0.addr]), eng.ereg_r1.data.eq(eregs[eng.ereg_r1.addr]),
            self.host_ereg_rdata.eq(eregs[self.host_ereg_addr]),
            eng.reg_r.data.eq(regs[eng.reg_r.addr]),
        ]
        with m.If(eng.ereg_w.en):
            m.d.sync += eregs[eng.ereg_w.addr].eq(eng.ereg_w.data)
        with m.Elif(self.host_ereg_we):
            m.d.sync += eregs[self.host_ereg_addr].eq(self.host_ereg_wdata)
        with m.If(self.host_reg_we):
            m.d.sync += regs[self.host_reg_addr].eq(self.host_reg_wdata)
        return m
