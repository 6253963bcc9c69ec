"""Simulation top: :class:`~hw.gemv.GemvEngine` with its weight, activation and accumulator memories.

The memories are initialised at elaboration time from Python data, so a simulator runs
the whole GEMV in HDL with no per-cycle Python.
"""

from __future__ import annotations

import numpy as np
from amaranth.hdl import Module, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from .gemv import GemvEngine, gemv_tile

__all__ = ["TOP_NAME", "GemvSimTop", "pack_words"]

#: Verilog module name of the top; differs from every port name.
TOP_NAME = "gemv_sim_top"


def pack_words(values, width_bits: int, lanes: int) -> list[int]:
    """Pack integers (two's complement, *width_bits* each) into words of *lanes* lanes, lane 0 lowest."""
    mask = (1 << width_bits) - 1
    vals = [int(v) & mask for v in values]
    vals += [0] * (-len(vals) % lanes)
    out = []
    for i in range(0, len(vals), lanes):
        word = 0
        for k, v in enumerate(vals[i:i + lanes]):
            word |= v << (k * width_bits)
        out.append(word)
    return out


class GemvSimTop(wiring.Component):
    """Engine plus memories for simulation.

    Parameters
    ----------
    config : OverlayConfig
        Overlay parameters.
    weights : bytes
        Packed row records (:func:`kvoverlay.numerics.pack_rows` with ``align=config.port_bytes``);
        may hold several matrices (e.g. one per weight format) at word offsets chosen by ``w_base``.
    x : array of int
        Input vector (int16 values).
    acc_depth : int
        Words of the accumulator memory.

    Attributes
    ----------
    start, rows, cols, group_log2, fmt, w_base : In
        The engine's command (:func:`hw.gemv.gemv_tile`), flat for the testbench.
    busy, done, cycles : Out
        From the engine.
    rd_addr, rd_data : In, Out
        Read port of the accumulator memory (latency 1), for read-back after ``done``.
    """

    def __init__(self, config, weights: bytes, x, acc_depth: int = 64):
        self.config = config
        self.weights = bytes(weights)
        self.x = np.asarray(x, dtype=np.int64)
        self.acc_depth = acc_depth
        self.engine = GemvEngine(config)
        tile = gemv_tile(config)
        super().__init__({
            "start": In(1),
            **{name: In(tile.members[name]) for name in ("rows", "cols", "group_log2", "fmt", "w_base", "packed")
               if name in tile.members},
            "busy": Out(1),
            "done": Out(1),
            "cycles": Out(32),
            "rd_addr": In(range(acc_depth)),
            "rd_data": Out(64),
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        pb = cfg.port_bytes
        m.submodules.engine = eng = self.engine
        wwords = [int.from_bytes(self.weights[i:i + pb], "little") for i in range(0, len(self.weights), pb)] or [0]
        m.submodules.wmem = wmem = Memory(shape=unsigned(cfg.port_bits), depth=len(wwords), init=wwords)
        xwords = pack_words(self.x, 16, 2 * pb) or [0]
        m.submodules.xmem = xmem = Memory(shape=unsigned(32 * pb), depth=len(xwords), init=xwords)
        m.submodules.accmem = accmem = Memory(shape=unsigned(64), depth=self.acc_depth, init=[])
        wr = wmem.read_port()
        xr = xmem.read_port()
        aw = accmem.write_port()
        ar = accmem.read_port()
        m.d.comb += [
            eng.cmd.valid.eq(self.start), eng.cmd.payload.rows.eq(self.rows), eng.cmd.payload.cols.eq(self.cols),
            eng.cmd.payload.group_log2.eq(self.group_log2), eng.cmd.payload.fmt.eq(self.fmt),
            eng.cmd.payload.w_base.eq(self.w_base),
            self.busy.eq(eng.busy), self.done.eq(eng.done), self.cycles.eq(eng.cycles),
            wr.addr.eq(eng.w_addr), eng.w_data.eq(wr.data),
            xr.addr.eq(eng.x_addr), eng.x_data.eq(xr.data),
            aw.addr.eq(eng.acc_addr), aw.data.eq(eng.acc_data), aw.en.eq(eng.acc_en),
            ar.addr.eq(self.rd_addr), self.rd_data.eq(ar.data),
        ]
        if eng.packs:  # packed rows: a second word per cycle, at the next address
            aw1 = accmem.write_port()
            m.d.comb += [eng.cmd.payload.packed.eq(self.packed), aw1.addr.eq(eng.acc_addr + 1),
                         aw1.data.eq(eng.acc_data1), aw1.en.eq(eng.acc_en1)]
        return m
