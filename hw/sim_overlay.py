"""Simulation top: the :class:`~hw.overlay.Overlay` with the HDL memory model on its port (no per-cycle Python)."""

from __future__ import annotations

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from .dram import DramModel, dram_addr_bits
from .overlay import Overlay

__all__ = ["TOP_NAME", "OverlaySimTop"]

#: Verilog module name of the top; differs from every port name.
TOP_NAME = "kvo_overlay_sim"


class OverlaySimTop(wiring.Component):
    """Overlay plus ``kvo_dram_model`` (hw/dram_model.v), with the overlay's host ports brought out.

    The memory image comes from ``+DRAM_IMAGE=`` at time zero; a rising ``dram_dump`` writes words
    ``[0, dram_dump_words)`` to ``+DRAM_DUMP=``.

    Parameters
    ----------
    config : OverlayConfig
    """

    def __init__(self, config):
        self.config = config
        self.overlay = Overlay(config)
        host = {name: member for name, member in self.overlay.signature.members.items()
                if name not in ("dram", "insn_addr", "insn_data")}
        super().__init__({**host, "dram_dump": In(1), "dram_dump_words": In(dram_addr_bits(config) + 1),
                          "port_busy": Out(1)})

    def elaborate(self, platform):
        m = Module()
        m.submodules.overlay = ov = self.overlay
        m.submodules.dram = mem = DramModel(self.config)
        wiring.connect(m, ov.dram, mem.port)
        m.d.comb += [mem.insn_addr.eq(ov.insn_addr), ov.insn_data.eq(mem.insn_data),
                     mem.dump.eq(self.dram_dump), mem.dump_words.eq(self.dram_dump_words),
                     self.port_busy.eq(~mem.port.req_ready)]
        for name, member in self.signature.members.items():
            if name in ("dram_dump", "dram_dump_words", "port_busy"):
                continue
            ours, theirs = getattr(self, name), getattr(ov, name)
            if member.flow == In:
                m.d.comb += theirs.eq(ours)
            else:
                m.d.comb += ours.eq(theirs)
        return m
