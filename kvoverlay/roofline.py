"""The memory roofline of a decode step: the bytes a token must read, over the port's bytes per cycle.

Decode is bound by memory bandwidth, so a token can take no fewer cycles than the bytes it *must* read divided by
the memory port's bytes per cycle. Those bytes are, each counted once per step:

- every weight row at its format with its group scales (a row record without the padding to a port beat);
- the table rows LDROW reads (embeddings, rotary tables) and the vector records LOAD reads (norm gains, constants),
  without their padding;
- KV that the step attends over from off-chip memory (none on the overlay as built: its KV is on chip, and KV
  beyond it goes to the offload device; :mod:`kvoverlay` projections pass it in).

``roofline_cycles = required_bytes / port_bytes`` and ``bandwidth_efficiency = roofline_cycles / cycles``. What the
port moves besides (padding to beats, bytes read twice, wasted beats) is in the byte counters (``bytes_read``),
never in the roofline: it counts against the efficiency. This module is the one definition; the golden model,
the host's decode figures, ``kvoverlay bench`` and the projections all call it.
"""

from __future__ import annotations

import numpy as np

from kvoverlay import isa
from kvoverlay import numerics as nx
from kvoverlay.config import WEIGHT_FORMATS

__all__ = ["Roofline", "bandwidth_efficiency", "gemv_words", "read_spans", "roofline_cycles", "row_payload",
           "union_bytes"]


def row_payload(cols: int, fmt: str, group: int) -> int:
    """Bytes a weight row must read: its group scales (uint16) and its weights at *fmt*, no padding."""
    return (cols // group) * 2 + cols * WEIGHT_FORMATS[fmt] // 8


def gemv_words(config, ins: isa.Instr, *, packed: bool = False) -> int:
    """Port words a GEMV streams: its rows' records, each padded to a port beat (as laid out and built); with
    *packed*, the rows' payloads back to back (what packing rows narrower than a beat would stream)."""
    fmt, group = isa.weight_layout(ins)
    rows, cols, pb = ins.fields["rows"], ins.fields["cols"], config.port_bytes
    if packed:
        return -(-rows * row_payload(cols, fmt, group) // pb)
    return nx.matrix_bytes(rows, cols, fmt, group, pb, ins.fields.get("packed", 0)) // pb


def read_spans(config, ins: isa.Instr, regs=None) -> tuple[np.ndarray, np.ndarray]:
    """``(starts, ends)`` of the external-memory bytes *ins* must read; *regs* (index -> value) place LDROW's row.

    A GEMV gives one span per row (the row record's payload, its padding left out), LDROW the payload of the row
    its registers select, LOAD the mantissas and the exponent of its record; other instructions read nothing.
    """
    f = ins.fields
    empty = (np.zeros(0, np.int64), np.zeros(0, np.int64))
    if ins.op == "LOAD":
        n = f["len"]
        starts = np.array([f["addr"], f["addr"] + nx.vector_record_size(n) - 4], np.int64)
        return starts, starts + np.array([2 * n, 4], np.int64)
    if ins.op not in ("GEMV", "LDROW"):
        return empty
    fmt, group = isa.weight_layout(ins)
    stride = nx.row_stride(f["cols"], fmt, group, config.port_bytes)
    payload = row_payload(f["cols"], fmt, group)
    if ins.op == "GEMV" and f.get("packed", 0):
        # blocks of packed rows (numerics.packed_block): per block and group, its rows' headers and their weights
        pb = config.port_bytes
        block, sb, ng = nx.packed_block(f["cols"], fmt, group, pb)
        b, j = np.meshgrid(np.arange(-(-f["rows"] // block), dtype=np.int64), np.arange(ng, dtype=np.int64),
                           indexing="ij")
        n = np.minimum(f["rows"] - b * block, block)  # rows of block b
        base = f["addr"] + b * (sb + ng) * pb
        starts = np.concatenate([(base + 2 * j * block).ravel(), (base + (sb + j) * pb).ravel()])
        return starts, starts + np.concatenate([2 * n.ravel(), (n * (pb // block)).ravel()])
    if ins.op == "GEMV":
        starts = f["addr"] + stride * np.arange(f["rows"], dtype=np.int64)
    else:
        row = (regs or {}).get(f["row_reg"], 0) + f["row_imm"]
        starts = np.array([f["addr"] + row * stride], np.int64)
    return starts, starts + payload


def union_bytes(starts: np.ndarray, ends: np.ndarray) -> int:
    """Size of the union of the byte spans ``[starts[i], ends[i])``: a byte read twice counts once."""
    if not len(starts):
        return 0
    order = np.argsort(starts, kind="stable")
    s, e = starts[order], ends[order]
    reach = np.maximum.accumulate(e)  # the furthest byte covered by the spans up to i
    before = np.concatenate(([s[0]], reach[:-1]))
    return int(np.clip(e - np.maximum(s, before), 0, None).sum())


class Roofline:
    """The roofline of one program's step: the register-independent spans gathered once, LDROW's added per step.

    Parameters
    ----------
    config : OverlayConfig
    instructions : list of isa.Instr
        One step's program (a decode step: it runs once per token).
    """

    def __init__(self, config, instructions):
        self.config = config
        static = [read_spans(config, ins) for ins in instructions if ins.op != "LDROW"]
        self._starts = np.concatenate([s for s, _ in static] or [np.zeros(0, np.int64)])
        self._ends = np.concatenate([e for _, e in static] or [np.zeros(0, np.int64)])
        self._dynamic = [ins for ins in instructions if ins.op == "LDROW"]

    def required_bytes(self, regs=None, kv_offchip_bytes: int = 0) -> int:
        """Bytes one step must read with registers *regs* (index -> value), plus *kv_offchip_bytes*."""
        spans = [read_spans(self.config, ins, regs) for ins in self._dynamic]
        starts = np.concatenate([self._starts] + [s for s, _ in spans])
        ends = np.concatenate([self._ends] + [e for _, e in spans])
        return union_bytes(starts, ends) + int(kv_offchip_bytes)

    def cycles(self, regs=None, kv_offchip_bytes: int = 0) -> float:
        """Roofline cycles of one step: :meth:`required_bytes` over the port's bytes per cycle."""
        return roofline_cycles(self.config, self.required_bytes(regs, kv_offchip_bytes))


#: Bytes per cycle the ULX3S's 16-bit SDRAM sustains behind :mod:`kvoverlay.boards.sdram`'s controller on a long
#: sequential read (a GEMV's weight stream): the bus's 2 B/cycle less refreshes and row changes, measured in
#: simulation at the ulx3s preset's 50 MHz, the slower of the presets' clocks (docs/boards.md;
#: tests/test_boards_sdram.py holds the controller to it).
SDRAM_STREAM_BYTES_PER_CYCLE = 1.95
#: The memories a program can run from: the overlay's port (block RAM on a board: one port word per cycle) and a
#: board's SDRAM.
MEMORIES = ("port", "bram", "sdram")


def memory_bytes_per_cycle(config, memory: str = "port") -> float:
    """Bytes per cycle *memory* delivers: ``port``/``bram`` the port's ``port_bytes``, ``sdram`` the SDRAM's
    :data:`SDRAM_STREAM_BYTES_PER_CYCLE` (never more than the port)."""
    if memory not in MEMORIES:
        raise ValueError(f"memory must be one of {', '.join(MEMORIES)}, got {memory!r}")
    return min(config.port_bytes, SDRAM_STREAM_BYTES_PER_CYCLE) if memory == "sdram" else config.port_bytes


def roofline_cycles(config, required_bytes: float, memory: str = "port") -> float:
    """Cycles *memory* needs for *required_bytes* (the port: one beat of ``port_bytes`` per cycle)."""
    return required_bytes / memory_bytes_per_cycle(config, memory)


def bandwidth_efficiency(roofline: float, cycles: float) -> float:
    """The figure of merit: roofline cycles over the cycles taken (1.0 streams every required byte back to back)."""
    if cycles <= 0:
        raise ValueError(f"cycles={cycles!r}: a step takes at least one cycle")
    return roofline / cycles
