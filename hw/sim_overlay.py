"""Simulation top: the :class:`~hw.overlay.Overlay` with the HDL memory model on its port (no per-cycle Python)."""

from __future__ import annotations

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .dram import DramModel, dram_addr_bits
from .overlay import Overlay

__all__ = ["CLOCK_HALF_PERIOD_NS", "TB_NAME", "TOP_NAME", "OverlaySimTop", "clocked_wrapper"]

#: Verilog module name of the top; differs from every port name.
TOP_NAME = "kvo_overlay_sim"
#: Verilog module name of the clocked wrapper that simulations run (clock generated in HDL).
TB_NAME = "kvo_overlay_tb"
CLOCK_HALF_PERIOD_NS = 5


class OverlaySimTop(wiring.Component):
    """Overlay plus ``kvo_dram_model`` (hw/dram_model.v), with the overlay's host ports brought out.

    The memory image comes from ``+DRAM_IMAGE=`` at time zero; a rising ``dram_dump`` writes words
    ``[0, dram_dump_words)`` to ``+DRAM_DUMP=``; ``dram_host_addr``/``dram_host_data`` read one memory word
    combinationally (between runs).

    Parameters
    ----------
    config : OverlayConfig
    gated_units : tuple of str
        :class:`~hw.overlay.Overlay`'s: those units' clock domains (``<name>_gated``) become ports of their own,
        ``<name>_gated_clk`` and ``<name>_gated_rst``, beside ``gate_<name>`` (the run-path harness's build).
    """

    def __init__(self, config, *, gated_units=()):
        self.config = config
        # a simulation: a read of a lane written in the same cycle reads garbage, as it may on the block RAM
        self.overlay = Overlay(config, gated_units=gated_units, poison_collisions=True)
        host = {name: member for name, member in self.overlay.signature.members.items()
                if name not in ("dram", "insn_addr", "insn_data")}
        super().__init__({**host, "dram_dump": In(1), "dram_dump_words": In(dram_addr_bits(config) + 1),
                          "dram_host_addr": In(dram_addr_bits(config)), "dram_host_data": Out(config.port_bits),
                          "port_busy": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.overlay = ov = self.overlay
        m.submodules.dram = mem = DramModel(self.config)
        wiring.connect(m, ov.dram, mem.port)
        m.d.comb += [mem.insn_addr.eq(ov.insn_addr), ov.insn_data.eq(mem.insn_data),
                     mem.dump.eq(self.dram_dump), mem.dump_words.eq(self.dram_dump_words),
                     mem.host_rd_addr.eq(self.dram_host_addr), self.dram_host_data.eq(mem.host_rd_data),
                     self.port_busy.eq(~mem.port.req.ready)]
        for name, member in self.signature.members.items():
            if name in ("dram_dump", "dram_dump_words", "dram_host_addr", "dram_host_data", "port_busy"):
                continue
            ours, theirs = getattr(self, name), getattr(ov, name)
            if member.flow == In:
                m.d.comb += theirs.eq(ours)
            else:
                m.d.comb += ours.eq(theirs)
        return m


def clocked_wrapper(top: OverlaySimTop) -> str:
    """Verilog of a wrapper that generates the clock in HDL and brings every other port of *top* out.

    With the clock inside the simulation (Verilator ``--timing``), the host touches the design only when it
    writes arguments, starts a run and reads results, never once per cycle. ``clk`` is an output so that a
    testbench can still count edges.
    """
    ports, conns = ["    output reg clk = 1'b0", "    input wire rst"], [".clk(clk)", ".rst(rst)"]
    for name, member in top.signature.members.items():
        width = member.shape.width if hasattr(member.shape, "width") else len(getattr(top, name))
        rng = f"[{width - 1}:0] " if width > 1 else ""
        ports.append(f"    {'input' if member.flow == In else 'output'} wire {rng}{name}")
        conns.append(f".{name}({name})")
    return "\n".join([
        "`timescale 1ns/1ps",
        f"module {TB_NAME} (",
        ",\n".join(ports),
        ");",
        f"    always #{CLOCK_HALF_PERIOD_NS} clk = ~clk;",
        f"    {TOP_NAME} sim_top (",
        ",\n".join(f"        {c}" for c in conns),
        "    );",
        "endmodule",
        "",
    ])
