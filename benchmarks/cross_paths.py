"""The longest combinational paths of the overlay that cross its parts, read from Amaranth's own netlist.

Usage::

    python benchmarks/cross_paths.py --config ulx3s [--top 40] [--all]

Each part synthesized alone (``kvoverlay build``'s partitions, ``synth_units.py``) is placed and routed out of
context, where its ports start and end no timed path: a path from one unit's logic through the glue's
multiplexers into another unit (or into a block RAM of the glue) is invisible in every part's Fmax and shows only
when the whole board top is placed. This walks the overlay's netlist (``amaranth.hdl._ir.build_netlist``: the
cells Amaranth's combinational-loop check walks, bit by bit) from every flip-flop, block-RAM read register and
port to every flip-flop input, block-RAM port and output, and prints the deepest endpoints whose path crosses a
part boundary (``--all``: every path), with the modules it passes through.

The depth is a rough count of LUT levels, not a delay: an adder or comparison of w bits 1 + w/8, an equality of w
bits log4 w, a shift of w bits log2 w, a reduction log4 w, a multiplexer 1, a priority chain of k assignments
log4 k, a LUT-RAM read 2 and a block RAM's clock-to-out 3. Ranking the paths by it finds the ones to cut; their
delay is nextpnr's to measure.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import warnings

#: The overlay's parts: a path is "crossing" when it touches more than one of these (or one and the glue).
PARTS = ("ldrow_unit", "gemv_unit", "vector_unit", "attention_unit", "kv_buffer", "load_unit", "store_unit",
         "req_unit", "argmax_unit", "frontend", "dram_arbiter", "load_queue", "compute_queue", "store_queue")


def _levels(w, base):
    return max(1.0, math.log(max(w, 2), base))


def weight(cell) -> float:
    """Rough LUT levels of one netlist cell (see the module's docstring)."""
    from amaranth.hdl import _nir

    if isinstance(cell, _nir.Operator):
        op, w = cell.operator, len(cell.inputs[0])
        if op in ("+", "-", "u<", "s<", "u<=", "s<=", "u>", "s>", "u>=", "s>="):
            return 1 + w / 8
        if op in ("==", "!="):
            return _levels(w, 4)
        if op == "*":
            return 8
        if op in ("<<", "u>>", "s>>"):
            return _levels(w, 2)
        if op in ("r|", "r&", "r^", "b"):
            return _levels(w, 4)
        return {"~": 0, "m": 1}.get(op, 0.5)
    if isinstance(cell, _nir.Part):
        return _levels(len(cell.value), 2)
    if isinstance(cell, _nir.Matches):
        return 1
    if isinstance(cell, _nir.PriorityMatch):
        return 0.5
    if isinstance(cell, _nir.AssignmentList):
        return _levels(len(cell.assignments), 4)
    if isinstance(cell, _nir.AsyncReadPort):
        return 2
    return 0


def cross_paths(config, top: int = 40, every: bool = False) -> list[tuple[float, str, str, list]]:
    """The *top* deepest endpoints (one per distinct trail of modules and endpoint kind) of ``Overlay(config)``:
    (depth, endpoint kind, endpoint module, trail [(module, cell kind, cells, named signals on the way)])."""
    from amaranth.hdl import Fragment, _nir
    from amaranth.hdl._ir import build_netlist
    from kvoverlay.hw.export import top_ports
    from kvoverlay.hw.overlay import Overlay

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ov = Overlay(config)
        nl = build_netlist(Fragment.get(ov, None), ports=top_ports(ov))
    weights = [weight(c) for c in nl.cells]
    names = {}
    for signal, value in nl.signals.items():
        for bit, net in enumerate(value):
            names.setdefault(net, f"{signal.name}[{bit}]" if len(value) > 1 else signal.name)
    arr, pred = {}, {}

    def arrival(net):
        stack = [net]
        while stack:
            n = stack[-1]
            if n in arr:
                stack.pop()
                continue
            if n.is_const or n.cell == 0:
                arr[n], pred[n] = 0, None
                stack.pop()
                continue
            cell = nl.cells[n.cell]
            if isinstance(cell, (_nir.FlipFlop, _nir.SyncReadPort, _nir.Instance)):
                arr[n], pred[n] = (3 if isinstance(cell, _nir.SyncReadPort) else 0), None
                stack.pop()
                continue
            preds = [p for p, _ in cell.comb_edges_to(n.bit)]
            todo = [p for p in preds if p not in arr]
            if todo:
                stack.extend(todo)
                continue
            best = max(preds, key=lambda p: arr[p], default=None)
            arr[n], pred[n] = (arr[best] if best is not None else 0) + weights[n.cell], best
            stack.pop()
        return arr[net]

    def module(idx):
        name = nl.modules[nl.cells[idx].module_idx].name
        return ".".join(name[1:] if name and name[0] == "top" else name) or "<glue>"

    def part(name):
        head = name.split(".")[0]
        return head if head in PARTS else "<glue>"

    def trail(net):
        seq = []
        while net is not None and not net.is_const:
            name = "<port>" if net.cell == 0 else module(net.cell)
            kind = type(nl.cells[net.cell]).__name__ if net.cell else "Top"
            if seq and seq[-1][0] == name:
                seq[-1][2] += 1
            else:
                seq.append([name, kind, 1, []])
            if net in names:
                seq[-1][3].append(names[net])
            net = pred.get(net)
        return seq[::-1]

    ends = []
    for idx, cell in enumerate(nl.cells):
        if isinstance(cell, _nir.FlipFlop):
            ins, kind = list(cell.data), "ff"
        elif isinstance(cell, _nir.SyncWritePort):
            ins, kind = [*cell.addr, *cell.data, *cell.en], "ram-w"
        elif isinstance(cell, _nir.SyncReadPort):
            ins, kind = [*cell.addr, cell.en], "ram-r"
        elif idx == 0:
            ins, kind = [n for v in cell.ports_o.values() for n in v], "out"
        else:
            continue
        best = max(ins, key=arrival, default=None)
        if best is not None:
            ends.append((arr[best], idx, kind, best))
    ends.sort(key=lambda e: -e[0])
    found, seen = [], set()
    for depth, idx, kind, net in ends:
        tr = trail(net)
        end = module(idx) if idx else "<port>"
        parts = [part(n) for n, *_ in tr if n != "<port>"] + [part(end)]
        key = (tuple(n for n, *_ in tr), kind, end)
        if key in seen or not (every or len(set(parts)) > 1):
            continue
        seen.add(key)
        found.append((depth, kind, end, tr))
        if len(found) >= top:
            break
    return [(d, k, e, [(n, kind, c, sigs[::-1]) for n, kind, c, sigs in tr]) for d, k, e, tr in found]


def main(argv=None) -> int:
    from kvoverlay.config import load_config

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="ulx3s")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--all", action="store_true", help="every path, not only those that cross parts")
    ap.add_argument("--signals", action="store_true", help="name the signals on each path")
    args = ap.parse_args(argv)
    start = time.monotonic()
    for depth, kind, end, tr in cross_paths(load_config(args.config), args.top, args.all):
        print(f"{depth:6.1f} {kind:5} -> {end}: " + " -> ".join(
            f"{n} ({k} x{c}{': ' + ' '.join(sigs) if args.signals and sigs else ''})" for n, k, c, sigs in tr), flush=True)
    print(f"# {time.monotonic() - start:.0f} s", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
