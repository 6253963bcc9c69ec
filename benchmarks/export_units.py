"""Where Amaranth's conversion of each overlay unit spends its time, and how that grows with the port width.

Usage::

    python benchmarks/export_units.py --config u280 --units gemv store [--port-bits 1024 2048 4096 8192] [--edges]

For each unit and config (the preset with ``port_bits`` replaced, when given), one JSON line with the seconds of
each stage of ``amaranth.back.verilog.convert``: ``elaborate`` (``Fragment.get``), ``netlist`` (``build_netlist``,
with its combinational-cycle check), ``rtlil`` (text) and ``yosys`` (``write_verilog``), the netlist's cells and the
Verilog's bytes. ``--edges`` instead counts the edges that the cycle check walks (``check_comb_cycles`` visits,
for every output bit of a cell, each input bit it depends on), per source line, without running the check: a
shift, subtraction or variable ``bit_select`` of width W costs W**2 of them, the quadratic that kept
``export-verilog --config u280`` converting for hours (docs/boards.md, "The u280 preset's Verilog").

A unit whose ports exceed Amaranth's 2**16 bits of top-level ports (the attention engine's and the vector unit's
two activation-buffer words at u280) is converted inside a wrapper that drives its inputs from registers.
"""

from __future__ import annotations

import argparse
import collections
import importlib
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from synth_units import UNITS

UNITS = {**UNITS, "overlay": ("kvoverlay.hw.overlay", "Overlay")}


def build(config, unit: str):
    """The unit's component and its top-level ports (or a wrapper without ports, see the module's docstring)."""
    from amaranth.hdl import Module, Signal
    from amaranth.hdl._ir import PortDirection
    from kvoverlay.hw.export import top_ports

    module, cls = UNITS[unit]
    comp = getattr(importlib.import_module(module), cls)(config)
    ports = top_ports(comp)
    if sum(len(v) for v, _ in ports.values()) < 1 << 16:
        return comp, ports
    m = Module()
    m.submodules.unit = comp
    for name, (value, flow) in ports.items():
        if flow == PortDirection.Input:
            reg = Signal(len(value), name=f"in_{name}")
            m.d.sync += reg.eq(~reg)
            m.d.comb += value.eq(reg)
    return m, {}


def cell_edges(cell) -> int:
    """The edges ``check_comb_cycles`` walks into *cell*'s outputs (amaranth.hdl._nir's ``comb_edges_to``),
    counted without enumerating them."""
    from amaranth.hdl import _nir

    if isinstance(cell, _nir.Operator):
        w, ins = cell.width, cell.inputs
        if len(ins) == 1:
            return w if cell.operator == "~" else w * len(ins[0])
        if len(ins) == 2:
            return 2 * w if cell.operator in ("&", "|", "^") else w * (len(ins[0]) + len(ins[1]))
        return 3 * w
    if isinstance(cell, _nir.Part):
        return cell.width * (len(cell.value) + len(cell.offset))
    if isinstance(cell, _nir.PriorityMatch):
        n = len(cell.inputs)
        return n * (n + 1) // 2 + n
    if isinstance(cell, _nir.AssignmentList):
        return len(cell.default) + 2 * sum(len(a.value) for a in cell.assignments)
    if isinstance(cell, _nir.AsyncReadPort):
        return cell.width * len(cell.addr)
    if isinstance(cell, _nir.Matches):
        return len(cell.value)
    return 0


def edges(config, unit: str, top: int) -> dict:
    from amaranth.hdl import Fragment, _ir, _nir

    comp, ports = build(config, unit)
    check = _nir.Netlist.check_comb_cycles
    _nir.Netlist.check_comb_cycles = lambda self: None  # counted here instead
    try:
        t = time.monotonic()
        netlist = _ir.build_netlist(Fragment.get(comp, None), ports=ports, name="top")
        wall = time.monotonic() - t
    finally:
        _nir.Netlist.check_comb_cycles = check
    per_line = collections.Counter()
    for cell in netlist.cells:
        loc = cell.assignments[0].src_loc if isinstance(cell, _nir.AssignmentList) and cell.assignments else cell.src_loc
        kind = type(cell).__name__ + (f"({cell.operator})" if isinstance(cell, _nir.Operator) else "")
        per_line[f"{Path(loc[0]).name}:{loc[1]} {kind}" if loc else kind] += cell_edges(cell)
    return {"unit": unit, "config": config.name, "port_bits": config.port_bits, "cells": len(netlist.cells),
            "comb_edges": sum(per_line.values()), "netlist_s_without_check": round(wall, 1),
            "top": dict(per_line.most_common(top))}


def stages(config, unit: str) -> dict:
    from amaranth.back import rtlil, verilog
    from amaranth.hdl import Fragment

    row = {"unit": unit, "config": config.name, "port_bits": config.port_bits}
    t = time.monotonic()

    def lap(name):
        nonlocal t
        now = time.monotonic()
        row[f"{name}_s"] = round(now - t, 2)
        t = now

    comp, ports = build(config, unit)
    fragment = Fragment.get(comp, None)
    lap("elaborate")
    text, _ = rtlil.convert_fragment(fragment, ports, "top")
    lap("netlist_rtlil")
    row["rtlil_bytes"] = len(text)
    out = verilog._convert_rtlil_text(text)  # the Yosys half of verilog.convert_fragment
    lap("yosys")
    row["verilog_bytes"] = len(out)
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="u280")
    ap.add_argument("--units", nargs="*", default=list(UNITS))
    ap.add_argument("--port-bits", nargs="*", type=int, default=[])
    ap.add_argument("--edges", action="store_true", help="count the cycle check's edges per source line instead")
    ap.add_argument("--top", type=int, default=8, help="source lines listed with --edges")
    args = ap.parse_args(argv)

    from kvoverlay.config import load_config

    base = load_config(args.config)
    configs = [base.replace(name=f"{base.name}-port{p}", port_bits=p) for p in args.port_bits] or [base]
    for config in configs:
        for unit in args.units:
            row = edges(config, unit, args.top) if args.edges else stages(config, unit)
            print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
