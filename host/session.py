"""``Session``: load a program bundle onto a backend, prefill a prompt and decode greedily.

A backend executes one decode step of the program: it sets the token and
position registers, runs to END, and returns the next token, the logits and
the counters of that step. The KV cache stays in the backend between steps; the
host never reads it back.

A backend may also offer ``run_steps(feed, generate, position)``: a whole token
sequence at once (the *feed* tokens, then *generate* greedy steps that feed back
the next-token register), as a list of ``(next_token, logits, counters)``. The
session uses it when present, so that the RTL backend runs a whole generation in
one simulator process.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np
from kvoverlay.sim.golden import GoldenModel

from kvoverlay import bundle as kvbundle
from kvoverlay import numerics as nx

from .gpu import GpuBackend
from .offload import HybridGoldenBackend

__all__ = ["BACKENDS", "GenerateResult", "GoldenBackend", "RtlBackend", "Session", "SessionError", "run_graph"]


class SessionError(ValueError):
    """A request the program cannot serve (too long a prompt, a token outside the vocabulary, ...)."""


class GoldenBackend:
    """The bit-exact golden model (``--backend isa``)."""

    name = "isa"

    def __init__(self, program: kvbundle.Bundle):
        self.program = program
        regions = [tuple(r) for r in program.manifest.get("regions", [])]
        self.model = GoldenModel(program.config, program.image, regions=regions)

    def step(self, token: int, position: int):
        regs = self.program.manifest["registers"]
        args = [0] * (max(regs.values()) + 1)
        args[regs["token"]], args[regs["position"]] = token, position
        counters = self.model.run(self.program.instructions, args=args)
        out = self.program.manifest["logits"]
        m, e = self.model.read_vector_record(out["addr"], out["len"])
        return self.model.regs[regs["next_token"]], nx.to_float(m, e), counters


class RtlBackend:
    """The Verilated overlay (``--backend rtl``), through :meth:`kvoverlay.sim.rtl.RtlModel.run_session`.

    A simulator process holds the KV buffer only while it runs, so every call runs the program over the whole
    token history of this backend in one process: :meth:`run_steps` (what :class:`Session` calls) replays the
    tokens fed before (none in a fresh session) and then runs the new ones; :meth:`step` does the same for one
    token (correct, but quadratic when called token by token). The counters are the hardware counters of each
    step.
    """

    name = "rtl"

    def __init__(self, program: kvbundle.Bundle, waves=None):
        from kvoverlay.sim.rtl import RtlModel

        self.program = program
        self.model = RtlModel(program.config, program.image, waves=waves)
        self.history = []  # tokens fed so far, at positions 0..
        self.steps = []  # RtlStep of every position, from the last run

    @property
    def sim_cycles_per_s(self) -> float:
        """Simulated cycles per second of wall time over the steps of the last run."""
        return self.model.last_run.sim_cycles_per_s

    def run_steps(self, feed, generate: int, position: int):
        if position != len(self.history):
            raise SessionError(f"position {position} does not follow the {len(self.history)} tokens fed to the RTL")
        m = self.program.manifest
        steps = self.model.run_session(self.program.instructions, m["registers"], m["logits"],
                                       self.history + [int(t) for t in feed], generate)
        new = steps[len(self.history):]
        self.history += [s.token for s in new]
        self.steps = steps
        return [(s.next_token, s.logits, s.counters) for s in new]

    def step(self, token: int, position: int):
        return self.run_steps([token], 0, position)[0]


BACKENDS = {"isa": HybridGoldenBackend, "rtl": RtlBackend, "gpu": GpuBackend}


@dataclass
class GenerateResult:
    prompt: list
    tokens: list
    logits: list  # one float64 vector per generated token: the last-position logits that chose it
    step_cycles: list = field(default_factory=list)
    step_bytes_read: list = field(default_factory=list)
    wall_s: float = 0.0


class Session:
    """A program on a backend.

    Parameters
    ----------
    program : Bundle or path
        A compiled program (``.kvo``).
    backend : str
        ``isa`` (golden model) or ``rtl`` (Verilated overlay); backends register in :data:`BACKENDS`.
    """

    def __init__(self, program, backend: str = "isa", *, waves=None):
        if isinstance(program, (str, os.PathLike)):
            program = kvbundle.load(program)
        if backend not in BACKENDS:
            raise SessionError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")
        for key in ("registers", "logits", "max_seq"):
            if key not in program.manifest:
                raise SessionError(f"program has no {key!r} in its manifest: not a compiled decoder "
                                   "(a graph without logits runs with kvoverlay.host.session.run_graph)")
        self.program = program
        self.backend_name = backend
        if waves is not None and backend != "rtl":
            raise SessionError("--waves needs --backend rtl (waveforms come from the Verilated overlay)")
        self.backend = BACKENDS[backend](program) if waves is None else BACKENDS[backend](program, waves=waves)
        self.position = 0

    @property
    def max_seq(self) -> int:
        return int(self.program.manifest["max_seq"])

    @property
    def vocab(self) -> int:
        return int(self.program.manifest["logits"]["len"])

    def _check_tokens(self, tokens):
        for token in tokens:
            if not 0 <= token < self.vocab:
                raise SessionError(f"token {token} is outside the vocabulary [0, {self.vocab})")

    def step(self, token: int):
        if not 0 <= token < self.vocab:
            raise SessionError(f"token {token} is outside the vocabulary [0, {self.vocab})")
        if self.position >= self.max_seq:
            raise SessionError(f"position {self.position} reaches max_seq={self.max_seq}")
        got = self.backend.step(int(token), self.position)
        self.position += 1
        return got

    def generate(self, prompt, max_new_tokens: int) -> GenerateResult:
        """Prefill *prompt* one token at a time, then decode *max_new_tokens* greedily."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise SessionError("the prompt is empty")
        if max_new_tokens < 1:
            raise SessionError(f"--max-new-tokens {max_new_tokens} must be at least 1")
        need = self.position + len(prompt) + max_new_tokens - 1
        if need > self.max_seq:
            raise SessionError(f"prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens needs {need} positions; "
                               f"the program was compiled with --max-seq {self.max_seq}")
        res = GenerateResult(prompt, [], [])
        t0 = time.perf_counter()
        if hasattr(self.backend, "run_steps"):
            self._check_tokens(prompt)
            steps = self.backend.run_steps(prompt, max_new_tokens - 1, self.position)
            self.position += len(steps)
            for i, (nxt, logits, counters) in enumerate(steps):
                res.step_cycles.append(counters.cycles)
                res.step_bytes_read.append(counters.total_read)
                if i >= len(prompt) - 1:
                    res.tokens.append(int(nxt))
                    res.logits.append(logits)
            res.wall_s = time.perf_counter() - t0
            return res
        feed = list(prompt)
        while len(res.tokens) < max_new_tokens:
            tok = feed.pop(0)
            nxt, logits, counters = self.step(tok)
            res.step_cycles.append(counters.cycles)
            res.step_bytes_read.append(counters.total_read)
            if not feed:
                res.tokens.append(int(nxt))
                res.logits.append(logits)
                feed.append(int(nxt))
        res.wall_s = time.perf_counter() - t0
        return res

    def teacher_forced(self, prompt, tokens) -> list:
        """Logits that would choose each of *tokens* when the sequence so far is fed regardless of the choices.

        Feeding two programs the same sequence (onnxruntime's own greedy tokens, say) compares their logits
        step for step even where their greedy choices differ.
        """
        feed = [int(t) for t in prompt] + [int(t) for t in tokens[:-1]]
        if self.position + len(feed) > self.max_seq:
            raise SessionError(f"{len(feed)} tokens exceed max_seq={self.max_seq}")
        if hasattr(self.backend, "run_steps"):
            self._check_tokens(feed)
            steps = self.backend.run_steps(feed, 0, self.position)
            self.position += len(steps)
            return [logits for _, logits, _ in steps[len(prompt) - 1:]]
        out = []
        for i, tok in enumerate(feed):
            _, logits, _ = self.step(tok)
            if i >= len(prompt) - 1:
                out.append(logits)
        return out


def run_graph(program, feeds: dict, backend: str = "isa") -> dict:
    """Run a compiled graph once: write each input as a vector record, run to END, read every output.

    *feeds* maps input names to float arrays of the compiled shapes; returns output name -> float64 array.
    Decoders (programs with logits and a KV cache) run through :class:`Session` instead.
    """
    if isinstance(program, (str, os.PathLike)):
        program = kvbundle.load(program)
    if backend != "isa":
        raise SessionError(f"run_graph supports the isa backend, not {backend!r}")
    io = program.manifest.get("io")
    if not io:
        raise SessionError("program has no I/O table in its manifest: not a compiled model")
    missing = sorted(set(io["inputs"]) - set(feeds))
    if missing:
        raise SessionError(f"missing inputs: {', '.join(missing)}")
    model = GoldenBackend(program).model
    for name, spec in io["inputs"].items():
        x = np.asarray(feeds[name], np.float64)
        if list(x.shape) != spec["shape"]:
            raise SessionError(f"input {name!r} has shape {list(x.shape)}; the program was compiled for {spec['shape']}")
        model.write_vector_record(spec["addr"], *nx.from_float(x.reshape(-1)))
    model.run(program.instructions)
    return {name: nx.to_float(*model.read_vector_record(spec["addr"], spec["len"])).reshape(spec["shape"])
            for name, spec in io["outputs"].items()}


def decode_stats(session: Session, res: GenerateResult) -> dict:
    """Cycles and bandwidth figures of the decode steps (the steps fed a generated token)."""
    n_prompt = len(res.prompt)
    cyc = res.step_cycles[n_prompt:] or res.step_cycles[-1:]
    rd = res.step_bytes_read[n_prompt:] or res.step_bytes_read[-1:]
    cycles_per_token = float(np.mean(cyc))
    bytes_per_token = float(np.mean(rd))
    roofline = bytes_per_token / session.program.config.port_bytes
    return {
        "cycles": int(sum(res.step_cycles)),
        "cycles_per_token": round(cycles_per_token, 1),
        "bytes_read_per_token": round(bytes_per_token, 1),
        "roofline_cycles_per_token": round(roofline, 1),
        "bandwidth_efficiency": round(roofline / cycles_per_token, 4),
    }
