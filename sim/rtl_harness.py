"""The run path's Verilator harness: the overlay and its memory model driven by a C++ loop (``rtl_harness.cpp``).

A decode session (:class:`kvoverlay.sim.rtl.RtlProcess`) runs in this harness rather than under cocotb: with the
clock a plain C++ loop around ``eval()``, no VPI access and no ``--timing`` scheduler, Verilator optimises the
whole design, and Python sees one line per command, never a cycle. The cocotb regression (one-shot
:meth:`RtlModel.run`, the unit testbenches) stays cocotb.

The harness is built once per configuration beside the cocotb model (same cache key: configuration and hardware
sources), in ``<cache>/<key>/harness-<hash of the harness source, this module and the flags>/``, sharing its
Verilog export.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from kvoverlay.config import OverlayConfig
from kvoverlay.progress import Stages

__all__ = ["GATED_UNITS", "HARNESS_ARGS", "HARNESS_MAKEFLAGS", "HARNESS_SOURCE", "build_harness"]

HARNESS_SOURCE = Path(__file__).with_name("rtl_harness.cpp")
PREFIX = "Vkvo"
#: --x-assign/--x-initial fast: X is whatever evaluates fastest (the design resets every register it reads);
#: no assertions, no timing scheduler (the harness is the clock).
HARNESS_ARGS = ["--cc", "--exe", "-O3", "--x-assign", "fast", "--x-initial", "fast", "--noassert", "-Wno-fatal",
                "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "-Wno-lint", "-Wno-style", "--prefix", PREFIX]
#: -O3 -march=native for the model (a cache is built on the machine that runs it), PCH fix (TOOLCHAIN.md)
HARNESS_MAKEFLAGS = ["OPT_FAST=-O3 -march=native", "OPT_SLOW=-O1", "OPT_GLOBAL=-O2", "CFG_CXXFLAGS_PCH_I=-include"]
#: Units the harness clocks only while busy, commanded or draining (hw.overlay.Overlay's gated_units): Verilator
#: evaluates a clock domain's sequential logic only on its edges, and these units' datapaths are most of a cycle's
#: evaluation while they idle. The cocotb model keeps the ungated design.
GATED_UNITS = ("load", "ldrow", "gemv", "req", "vector", "attention", "store", "argmax")
#: Verilator configuration: only the memory model's array is public (the harness reads and writes it between runs).
VLT = '`verilator_config\npublic_flat_rd -module "kvo_dram_model" -var "mem"\n'


def _harness_dir(config: OverlayConfig, trace: bool) -> Path:
    from .rtl import _sources_hash, cache_root

    # this module too: what it finds in Verilator's output (kvo_mem.h) decides how the harness clocks the model
    h = hashlib.sha256(HARNESS_SOURCE.read_bytes() + Path(__file__).read_bytes()
                       + repr((HARNESS_ARGS, HARNESS_MAKEFLAGS, VLT)).encode())
    return cache_root() / _sources_hash(config) / f"harness-{h.hexdigest()[:12]}{'-trace' if trace else ''}"


def build_harness(config: OverlayConfig, *, trace: bool = False) -> Path:
    """Build (or reuse) the harness binary for *config* (with *trace*, one that writes waveforms); returns its path."""
    from .rtl import build_lock

    work = _harness_dir(config, trace)
    binary = work / PREFIX
    if binary.is_file():
        return binary
    # one lock per config's Verilog export, which the cocotb model shares
    with build_lock(work.parent):
        if not binary.is_file():  # another process may have built it while this one waited
            _build_harness(config, work, trace)
    return binary


def _build_harness(config: OverlayConfig, work: Path, trace: bool) -> None:
    from kvoverlay.hw.dram import DRAM_MODEL_SOURCE
    from kvoverlay.hw.sim_overlay import TOP_NAME

    from kvoverlay import toolchain

    from .rtl import _compile_progress, export_verilog, prune_build

    binary = work / PREFIX
    verilator = toolchain.ensure_verilator()
    for tool in ("make", "c++"):
        if shutil.which(tool) is None:
            raise toolchain.ToolchainError(f"the RTL harness needs {tool!r} on PATH to compile the Verilated overlay "
                                           "(a C++ toolchain: e.g. apt-get install build-essential)")
    stages = Stages(f"building the run-path harness for config {config.name} (first run only; cached in {work})")
    # its own export (the gated units' clock domains are ports of their own), in the harness's folder
    src = export_verilog(config, work, stages, gated_units=GATED_UNITS)
    work.mkdir(parents=True, exist_ok=True)
    (work / "public.vlt").write_text(VLT)
    log = open(work / "build.log", "w")  # noqa: SIM115 (closed below, after both tools)
    try:
        with stages.stage("verilate (Verilator lints the design and writes C++)"):
            subprocess.run([str(verilator), *HARNESS_ARGS, *(["--trace"] if trace else []), "--top-module", TOP_NAME, "-Mdir", str(work),
                            str(work / "public.vlt"), str(src), str(DRAM_MODEL_SOURCE), str(HARNESS_SOURCE)],
                           check=True, stdout=log, stderr=subprocess.STDOUT, cwd=work)
        _write_mem_header(work, trace)
        # make variables as arguments (one word each, spaces included), not in MAKEFLAGS, which splits on spaces
        env = {k: v for k, v in os.environ.items() if k != "MAKEFLAGS"}
        with ThreadPoolExecutor(max_workers=1) as pool:
            # the model's C++ files compile in parallel (Verilator splits them): one job per core
            job = pool.submit(subprocess.run, ["make", "-C", str(work), f"-j{os.cpu_count() or 1}", "-f", f"{PREFIX}.mk",
                                               *HARNESS_MAKEFLAGS, PREFIX],
                              check=True, stdout=log, stderr=subprocess.STDOUT, env=env)
            with stages.stage("C++ compile", count=lambda: _compile_progress(work, PREFIX, PREFIX)):
                job.result()
        if not binary.is_file():
            raise subprocess.CalledProcessError(0, "make")
        prune_build(work)
    except subprocess.CalledProcessError:
        log.close()
        tail = " ".join((work / "build.log").read_text(errors="replace")[-1500:].split())
        raise RuntimeError(f"building the RTL harness failed (log {work / 'build.log'}): {tail}") from None
    log.close()


def _write_mem_header(work: Path, trace: bool) -> None:
    """``kvo_mem.h``: the top class and the memory model's array, by the name Verilator gave it."""
    root = work / f"{PREFIX}___024root.h"
    names = [w.rstrip(";") for line in root.read_text().splitlines() if "__DOT__mem;" in line
             for w in line.split() if w.endswith("__DOT__mem;")]
    if len(names) != 1:
        raise RuntimeError(f"the memory model's array is not (uniquely) in {root}: {names}")
    text = (f'#include "{PREFIX}.h"\n#include "{PREFIX}___024root.h"\n'
            f"#define KVO_TOP {PREFIX}\n#define KVO_MEM(top) ((top)->rootp->{names[0]})\n")
    header = root.read_text()
    top_h = (work / f"{PREFIX}.h").read_text()
    clocks = [f"{n}_gated_clk" for n in GATED_UNITS]
    if not all(f"(&{c}," in top_h for c in clocks) or not all(f"(&gate_{n}," in top_h for n in GATED_UNITS):
        raise RuntimeError(f"the gated units' clocks or gates are not ports of {work / (PREFIX + '.h')}: {clocks}")

    def each(fmt):
        return "do { " + " ".join(fmt.format(n=n) for n in GATED_UNITS) + " } while (0)"

    text += (f"#define KVO_GATE_CLK(top, v) {each('(top)->{n}_gated_clk = (v);')}\n"
             f"#define KVO_GATE_EDGE(top) {each('(top)->{n}_gated_clk = (top)->gate_{n};')}\n"
             f"#define KVO_GATE_RST(top, v) {each('(top)->{n}_gated_rst = (v);')}\n")
    # the model's record of each clock's last value (its edge detector), if Verilator named them as expected
    prev = "__Vtrigprevexpr___TOP__clk__0"
    gate_prevs = [f"__Vtrigprevexpr___TOP__{c}__0" for c in clocks]
    if all(f"{p};" in header for p in [prev, *gate_prevs]) and not trace:
        text += f"#define KVO_CLK_PREV(top) ((top)->rootp->{prev})\n"
        text += "#define KVO_GATE_PREV0(top) do { " + " ".join(f"(top)->rootp->{p} = 0;" for p in gate_prevs) + " } while (0)\n"
        # the clock edge without the input region: the active and NBA phases of the model's _eval (see edge() in
        # the harness), if the generated code has them by the names and signatures Verilator 5.48 gives them; the
        # loop is _eval's without its convergence limit (each run's first cycle is a whole eval(), which has it)
        phases = [f"bool {PREFIX}___024root___eval_phase__{p}({PREFIX}___024root* vlSelf)" for p in ("act", "nba")]
        code = "".join(f.read_text() for f in sorted(work.glob(f"{PREFIX}___024root__*.cpp")) if "Slow" not in f.name)
        if all(f"\n{sig} {{" in code for sig in phases):
            text += "".join(f"{sig};\n" for sig in phases)
            text += (f"#define KVO_EDGE(top) do {{ while ({PREFIX}___024root___eval_phase__act((top)->rootp)) {{}} }} "
                     f"while ({PREFIX}___024root___eval_phase__nba((top)->rootp))\n")
    (work / "kvo_mem.h").write_text(text)
