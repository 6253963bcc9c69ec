"""Simulation top of the attention engine: the engine and its :class:`~hw.kv_buffer.KvBuffer` on a
:class:`~hw.sim_unit.UnitSimTop`.

The host ports load the activation buffer and registers in bulk before a command and read results back after
``done``; a whole instruction runs in HDL with no per-cycle Python.
"""

from __future__ import annotations

from amaranth.lib import wiring
from amaranth.lib.wiring import In

from .attention import AttentionEngine
from .kv_buffer import KvBuffer, kv_host_read_signature
from .sim_unit import UnitSimTop

__all__ = ["TOP_NAME", "AttentionSimTop"]

#: Verilog module name of the top; differs from every port name.
TOP_NAME = "attention_sim_top"


class AttentionSimTop(UnitSimTop):
    """:class:`~hw.attention.AttentionEngine` with the on-chip state, host ports and the KV buffer.

    Parameters
    ----------
    config : OverlayConfig

    Attributes
    ----------
    host_kv : In(kv_host_read_signature(config))
        KV-buffer read port (latency 1), besides :class:`~hw.sim_unit.UnitSimTop`'s.
    """

    def __init__(self, config):
        self.kv_buffer = KvBuffer(config, host_read=True)
        super().__init__(config, AttentionEngine(config), host_kv=In(kv_host_read_signature(config)))

    def elaborate(self, platform):
        m = super().elaborate(platform)
        m.submodules.kv_buffer = kvb = self.kv_buffer
        wiring.connect(m, self.unit.kv, kvb.port)
        wiring.connect(m, wiring.flipped(self.host_kv), kvb.host)
        return m
