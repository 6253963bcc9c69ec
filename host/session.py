"""``Session``: a compiled program on a backend, driven like a generation API.

::

    with Session("model.kvo", backend="rtl") as s:
        s.prefill([5, 17, 42])
        for step in s.generate(max_new_tokens=16, temperature=0.8, top_p=0.95, seed=0, stop=[2]):
            print(step.token, step.counters.cycles)
        s.reset()
        for piece in s.generate(s.encode("Once upon a time"), 16).text_stream():  # the bundle's tokenizer
            print(piece, end="", flush=True)

A session holds one token sequence: every prompt and every generated token, in order, its KV cache in the
backend (the host never reads it back). :meth:`Session.generate` streams :class:`TokenStep` objects as it decodes
and runs to the end when its result is asked for (``.tokens``, ``.logits``); decoding is greedy (the overlay's
own ARGMAX) or sampled on the host (:class:`~kvoverlay.host.sampling.Sampler`), so the same seed gives the
same tokens on every backend that gives the same logits. :meth:`Session.reset` empties the cache. Every request
is checked before the first step runs; a step that fails leaves the session refusing further steps until
:meth:`Session.reset`.

Backends follow :class:`~kvoverlay.host.backend.Backend` and register in
:data:`~kvoverlay.host.backend.BACKENDS`.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field

import numpy as np

from kvoverlay import bundle as kvbundle
from kvoverlay import numerics as nx
from kvoverlay.roofline import Roofline, bandwidth_efficiency, roofline_cycles

from . import offload
from .backend import BACKENDS, GoldenBackend, RtlBackend, SessionError, SimulatorDied, Step, create_backend, register_args
from .sampling import Sampler
from .tokenizer import Tokenizer

__all__ = ["BACKENDS", "GenerateResult", "Generation", "GoldenBackend", "RtlBackend", "Session", "SessionError",
           "SimulatorDied", "Step", "TokenStep", "decode_stats", "run_graph"]


@dataclass
class TokenStep:
    """One generated token.

    ``position`` is where the token sits in the session's sequence; ``logits`` (float64, or None when the
    generation was asked not to keep them) and ``counters`` belong to the step that chose it, the step that
    fed the token before it. ``finish_reason`` is ``"stop"`` (a stop token) or ``"length"`` on the last token.
    """

    token: int
    position: int
    logits: np.ndarray | None
    counters: object
    finish_reason: str | None = None


@dataclass
class GenerateResult:
    prompt: list
    tokens: list
    logits: list  # one float64 vector per generated token: the last-position logits that chose it
    step_cycles: list = field(default_factory=list)  # every backend step, prompt tokens included
    step_bytes_read: list = field(default_factory=list)
    wall_s: float = 0.0
    finish_reason: str | None = None


class Generation:
    """What :meth:`Session.generate` returns: iterate it to stream :class:`TokenStep` objects as they decode;
    read ``tokens``, ``logits`` (or call :meth:`result`) to run it to the end."""

    def __init__(self, session: Session, feed: list, prompt: list, max_new_tokens: int, sampler: Sampler,
                 stop: frozenset, output_logits: bool):
        self.session = session
        self.steps = []
        self._result = GenerateResult(prompt, [], [])
        self._run = self._decode(feed, max_new_tokens, sampler, stop, output_logits)
        self._serial = session._serial

    def _decode(self, feed, max_new_tokens, sampler, stop, output_logits):
        s, res = self.session, self._result
        t0 = time.perf_counter()
        steps = s._feed(feed, phase_split=True) if feed else []
        last = steps[-1] if steps else s._last
        for i in range(max_new_tokens):
            if i:
                steps = s._feed([res.tokens[-1]])
                last = steps[0]
            for st in steps:
                res.step_cycles.append(st.counters.cycles)
                res.step_bytes_read.append(st.counters.total_read)
            token = int(last.next_token) if sampler.greedy else sampler(last.logits)
            s._pending = token
            res.tokens.append(token)
            if output_logits:
                res.logits.append(last.logits)
            finish = "stop" if token in stop else "length" if i == max_new_tokens - 1 else None
            res.finish_reason = finish
            res.wall_s = time.perf_counter() - t0
            yield TokenStep(token, s.position, last.logits if output_logits else None, last.counters, finish)
            if finish:
                return

    def __iter__(self):
        yield from self.steps
        while self._run is not None:
            if self._serial != self.session._serial:
                raise SessionError("this generation was superseded by a later call on its session")
            step = next(self._run, None)
            if step is None:
                self._run = None
                return
            self.steps.append(step)
            yield step

    def result(self) -> GenerateResult:
        """Decode to the end (max_new_tokens or a stop token) and return everything generated."""
        for _ in self:
            pass
        return self._result

    @property
    def tokens(self) -> list:
        return self.result().tokens

    @property
    def logits(self) -> list:
        return self.result().logits

    @property
    def text(self) -> str:
        """The generated tokens as text, through the program's tokenizer."""
        return self.session.decode(self.tokens)

    def text_stream(self):
        """Iterate the generation as text pieces, each as soon as its tokens form whole characters."""
        stream = self.session.tokenizer.stream()
        for step in self:
            piece = stream.push(step.token)
            if piece:
                yield piece
        rest = stream.flush()
        if rest:
            yield rest

    def __getattr__(self, name):  # prompt, step_cycles, step_bytes_read, wall_s, finish_reason
        if name.startswith("_") or name not in GenerateResult.__dataclass_fields__:
            raise AttributeError(name)
        return getattr(self.result(), name)


class Session:
    """A program on a backend: prefill, then decode greedily or by sampling, streamed or to N tokens.

    Parameters
    ----------
    program : Bundle or path
        A compiled program (``.kvo``).
    backend : str
        A key of :data:`~kvoverlay.host.backend.BACKENDS`: ``isa`` (golden model), ``rtl`` (Verilated overlay,
        one simulator process for the session) or ``gpu``.
    waves : path, optional
        ``rtl`` only: write the simulation's waveform there.
    prefill : str
        Where a prompt fed from position 0 is prefilled: ``overlay`` (token by token on the backend, the default),
        ``gpu`` (one batched torch pass, the KV then written into the backend's cache: the phase split of
        :func:`kvoverlay.host.offload.prefill`) or ``auto`` (its cost model decides).
    **options
        Passed to the backend (``offload_device``, ``kv_sinks``).
    """

    def __init__(self, program, backend: str = "isa", *, waves=None, prefill: str = "overlay", **options):
        if isinstance(program, (str, os.PathLike)):
            program = kvbundle.load(program)
        if backend not in BACKENDS:
            raise SessionError(f"unknown backend {backend!r}; backends: {', '.join(BACKENDS)}")
        segmented = bool(program.manifest.get("segments"))
        if segmented:
            from .placement import describe, is_decoder

            if not is_decoder(program):
                raise SessionError(f"{describe(program)} and gives no logits: a partitioned graph that is not a "
                                   "decoder runs with kvoverlay.host.session.run_graph")
            if backend not in ("isa", "rtl", "gpu"):
                raise SessionError(f"{describe(program)}; --backend {backend} cannot run its segments "
                                   "(isa, rtl and gpu can)")
            if options.get("offload_device") == "none":
                raise SessionError(f"--offload-device none: {describe(program)}")
        for key in () if segmented else ("registers", "logits", "max_seq"):
            if key not in program.manifest:
                raise SessionError(f"program has no {key!r} in its manifest: not a compiled decoder "
                                   "(a graph without logits runs with kvoverlay.host.session.run_graph)")
        if waves is not None:
            if backend != "rtl":
                raise SessionError("--waves needs --backend rtl (waveforms come from the Verilated overlay)")
            options["waves"] = waves
        if prefill not in offload.PREFILL_MODES:
            raise SessionError(f"--prefill {prefill!r}: expected one of {', '.join(offload.PREFILL_MODES)}")
        if segmented and prefill != "overlay":  # the batched torch prefill runs unpartitioned programs only
            if prefill == "gpu":
                raise SessionError("--prefill gpu: a program with ops placed on the host prefills on the overlay")
            prefill = "overlay"
        self.prefill_mode = prefill
        self.offload_device = options.get("offload_device", "auto")
        self.program = program
        self.backend_name = backend
        if segmented:  # ops placed on the host: each overlay segment on a backend of its own
            from .placement import SegmentedBackend

            self.backend = SegmentedBackend(program, backend, **options)
        else:
            self.backend = create_backend(backend, program, **options)
        #: register index -> value written before every step besides token and position (for runtime extensions)
        self.extra_registers = {}
        self._tokenizer = None
        self._clear()

    @property
    def tokenizer(self) -> Tokenizer:
        """The tokenizer the program carries, checked against its vocabulary (:class:`SessionError` without one)."""
        if self._tokenizer is None:
            if self.program.tokenizer is None:
                raise SessionError("the program has no tokenizer: compile it with a tokenizer.json beside the model"
                                   " or with --tokenizer PATH, or give token ids")
            self._tokenizer = Tokenizer(self.program.tokenizer, self.vocab)
        return self._tokenizer

    def encode(self, text: str) -> list:
        """The token ids of *text*, each checked against the program's vocabulary."""
        return self.tokenizer.encode(text)

    def decode(self, ids) -> str:
        return self.tokenizer.decode(ids)

    def _clear(self):
        self.position = 0  # tokens fed, the length of the KV cache
        self._fed = []  # every token fed
        self._pending = None  # the last generated token, chosen but not yet fed
        self._last = None  # the Step of the last token fed
        self._broken = None
        self._serial = 0

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self) -> None:
        """Release the backend (the RTL backend's simulator process)."""
        close = getattr(self.backend, "close", None)
        if close is not None:
            close()

    def reset(self) -> None:
        """Forget the sequence: empty KV cache, position 0. Recovers a session whose step failed."""
        self.backend.reset()
        self._clear()

    @property
    def tokens(self) -> list:
        """The sequence so far: every token fed, then the last generated one (chosen, fed by the next call)."""
        return self._fed + ([self._pending] if self._pending is not None else [])

    @property
    def max_seq(self) -> int:
        return int(self.program.manifest["max_seq"])

    @property
    def vocab(self) -> int:
        m = self.program.manifest
        return int(m["logits"]["len"] if "logits" in m else m["io"]["outputs"]["logits"]["shape"][-1])

    @property
    def has_logits(self) -> bool:
        """Whether the program leaves logits (one compiled with ``--no-logits`` leaves only the next token)."""
        m = self.program.manifest
        return "logits" not in m or bool(kvbundle.logits_records(m["logits"]))

    def _check_logits(self, what: str):
        if not self.has_logits:
            raise SessionError(f"{what} needs logits, and this program was compiled with --no-logits (greedy "
                               "decoding only)")

    # ------------------------------------------------------------ checks, run before any step
    def _check_tokens(self, tokens, what="token"):
        for token in tokens:
            if isinstance(token, bool) or not isinstance(token, (int, np.integer)) or not 0 <= token < self.vocab:
                raise SessionError(f"{what} {token!r} is outside the vocabulary [0, {self.vocab})")

    def _check_live(self):
        if self._broken is not None:
            raise SessionError(f"the session's last step failed ({self._broken}); call reset() before the next step")

    def _check_room(self, fed: int, what: str):
        if self.position + fed > self.max_seq:
            raise SessionError(f"{what} needs {self.position + fed} positions; the program was compiled with "
                               f"--max-seq {self.max_seq}")

    # ------------------------------------------------------------ running steps
    def _feed(self, tokens, phase_split: bool = False) -> list:
        """Run one step per token at the next positions; a failure (or an interrupt) marks the session for reset.

        With *phase_split*, a prompt fed from position 0 may be prefilled in one batched pass (see ``prefill`` of
        the constructor): then one step, the last token's, stands for them all.
        """
        self._pending = None
        # registers beyond token and position go only to backends that are given any (the argument is optional)
        extra = {"registers": self.extra_registers} if self.extra_registers else {}
        start, steps = self.position, []
        try:
            split = None
            if phase_split and self.prefill_mode != "overlay" and start == 0 and len(tokens) > 1:
                split = offload.prefill(self.backend, tokens, self.prefill_mode, self.offload_device)
            if split is not None:
                steps = [split]
            elif len(tokens) > 1 and hasattr(self.backend, "run_steps"):
                steps = self.backend.run_steps(tokens, 0, start, **extra)
            else:
                for k, token in enumerate(tokens):
                    steps.append(self.backend.step(int(token), start + k, **extra))
        except BaseException as exc:
            self._broken = f"at position {start + len(steps)}: {type(exc).__name__}: {exc}"
            raise
        self.position += len(tokens)
        self._fed += [int(t) for t in tokens]
        self._last = Step(*steps[-1])
        return [Step(*st) for st in steps]

    def prefill(self, ids) -> Step:
        """Feed *ids* after the sequence so far (a pending generated token first); returns the last token's step,
        whose logits choose the next token."""
        ids = [int(t) if isinstance(t, np.integer) else t for t in ids]
        self._check_live()
        if not ids:
            raise SessionError("the prompt is empty")
        self._check_tokens(ids)
        feed = ([self._pending] if self._pending is not None else []) + ids
        self._check_room(len(feed), f"a prompt of {len(ids)} tokens after {self.position} positions")
        self._serial += 1
        return self._feed(feed, phase_split=True)[-1]

    def generate(self, prompt=None, max_new_tokens: int = 16, *, temperature: float = 0.0, top_k: int = 0,
                 top_p: float = 1.0, seed: int | None = None, stop=(), output_logits: bool = True) -> Generation:
        """Decode *max_new_tokens* tokens after *prompt* (or after the sequence so far), stopping at a *stop* token.

        Returns a :class:`Generation`: iterate it to stream :class:`TokenStep` objects, or read its ``tokens``
        and ``logits`` to run it to the end. ``temperature=0`` is greedy; otherwise tokens are sampled with
        *top_k*, *top_p* and *seed* (see :class:`~kvoverlay.host.sampling.Sampler`). All arguments are checked
        here, before any step runs.
        """
        self._check_live()
        prompt = [] if prompt is None else [int(t) if isinstance(t, np.integer) else t for t in prompt]
        self._check_tokens(prompt)
        stop = list(stop)
        self._check_tokens(stop, "stop token")
        if isinstance(max_new_tokens, bool) or not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise SessionError(f"--max-new-tokens {max_new_tokens!r} must be at least 1")
        try:
            sampler = Sampler(temperature, top_k, top_p, seed)
        except ValueError as exc:
            raise SessionError(str(exc)) from None
        if not sampler.greedy:
            self._check_logits("sampling")
        output_logits = output_logits and self.has_logits
        feed = ([self._pending] if self._pending is not None else []) + prompt
        if not feed and self._last is None:
            raise SessionError("nothing to continue: give a prompt (or call prefill() first)")
        self._check_room(len(feed) + max_new_tokens - 1,
                         f"a prompt of {len(prompt)} tokens plus {max_new_tokens} new tokens" if prompt else
                         f"{max_new_tokens} new tokens after {self.position + len(feed)} positions")
        self._serial += 1
        return Generation(self, feed, prompt, max_new_tokens, sampler, frozenset(stop), output_logits)

    def step(self, token: int) -> Step:
        """Feed *token* at the next position (a pending generated token is dropped); returns its step."""
        self._check_live()
        self._check_tokens([token])
        self._pending = None
        self._check_room(1, f"position {self.position}")
        self._serial += 1
        return self._feed([int(token)])[0]

    def teacher_forced(self, prompt, tokens) -> list:
        """Logits that would choose each of *tokens* when the sequence so far is fed regardless of the choices.

        Feeding two programs the same sequence (onnxruntime's own greedy tokens, say) compares their logits
        step for step even where their greedy choices differ.
        """
        self._check_live()
        self._check_logits("teacher-forced logits (perplexity, --check)")
        feed = [int(t) for t in prompt] + [int(t) for t in tokens[:-1]]
        self._check_tokens(feed)
        self._pending = None
        self._check_room(len(feed), f"{len(feed)} tokens")
        self._serial += 1
        return [st.logits for st in self._feed(feed)[len(prompt) - 1:]]


def run_graph(program, feeds: dict, backend: str = "isa", offload_device: str = "auto") -> dict:
    """Run a compiled graph once: write each input as a vector record, run to END, read every output.

    *feeds* maps input names to float arrays of the compiled shapes; returns output name -> float64 array. *backend*
    is ``isa`` (the golden model) or ``rtl`` (the Verilated overlay: the records go into the memory image before the
    run and come out of its memory after it). A program with ops placed on the host runs them on *offload_device*
    (``host/placement.py``). Decoders (programs with logits and a KV
    cache) run through :class:`Session` instead.
    """
    if isinstance(program, (str, os.PathLike)):
        program = kvbundle.load(program)
    if backend not in ("isa", "rtl"):
        raise SessionError(f"run_graph supports the isa and rtl backends, not {backend!r}")
    if program.manifest.get("segments"):  # ops placed on the host: the same host code for every backend
        from .placement import run_segments

        try:
            return run_segments(program, feeds, lambda seg, f: run_graph(seg, f, backend), offload_device)
        except ValueError as exc:
            raise SessionError(str(exc)) from None
    io = program.manifest.get("io")
    if not io:
        raise SessionError("program has no I/O table in its manifest: not a compiled model")
    missing = sorted(set(io["inputs"]) - set(feeds))
    if missing:
        raise SessionError(f"missing inputs: {', '.join(missing)}")
    records = {}  # address -> (mantissas, exponent)
    for name, spec in io["inputs"].items():
        x = np.asarray(feeds[name], np.float64)
        if list(x.shape) != spec["shape"]:
            raise SessionError(f"input {name!r} has shape {list(x.shape)}; the program was compiled for {spec['shape']}")
        records[spec["addr"]] = nx.from_float(x.reshape(-1))
    if backend == "rtl":
        from kvoverlay.sim.rtl import RtlModel  # Verilator only when the RTL is asked for

        image = bytearray(program.image)
        for addr, record in records.items():
            blob = nx.pack_vector_record(*record)
            image[addr:addr + len(blob)] = blob
        rtl = RtlModel(program.config, bytes(image))
        rtl.run(program.instructions, readback=False)

        def read(addr, n):
            return nx.unpack_vector_record(rtl.dram[addr:addr + nx.vector_record_size(n)].tobytes(), n)
    else:
        model = GoldenBackend(program).model
        for addr, record in records.items():
            model.write_vector_record(addr, *record)
        model.run(program.instructions)
        read = model.read_vector_record
    return {name: nx.to_float(*read(spec["addr"], spec["len"])).reshape(spec["shape"])
            for name, spec in io["outputs"].items()}


def decode_stats(session: Session, res: GenerateResult) -> dict:
    """Cycles and bandwidth figures of the decode steps (the steps fed a generated token).

    ``bytes_read_per_token`` is what the port moved; ``roofline_cycles_per_token`` counts the bytes a token must
    read (:mod:`kvoverlay.roofline`, with the registers of the last step fed), so padding and re-reads lower
    ``bandwidth_efficiency``.
    """
    n_prompt = len(res.prompt)
    if any(c is None for c in res.step_cycles):  # a backend without cycle counters (gpu): nothing to divide by
        return dict.fromkeys(("cycles", "cycles_per_token", "bytes_read_per_token", "bytes_required_per_token",
                              "roofline_cycles_per_token", "bandwidth_efficiency"))
    cyc = res.step_cycles[n_prompt:] or res.step_cycles[-1:]
    rd = res.step_bytes_read[n_prompt:] or res.step_bytes_read[-1:]
    cycles_per_token = float(np.mean(cyc))
    program = session.program
    last = max(session.position - 1, 0)
    # a partitioned program: the overlay segments' programs, each with its registers (the host segments read none)
    parts = [b.program for b in session.backend.overlays] if program.manifest.get("segments") else [program]
    required = sum(Roofline(p.config, p.instructions).required_bytes(
        register_args(p, session._fed[last] if session._fed else 0, last)) for p in parts)
    # a board running from SDRAM: its roofline is the SDRAM's rate, not the port's
    roofline = roofline_cycles(program.config, required, getattr(session.backend, "memory", "port"))
    return {
        "cycles": int(sum(res.step_cycles)),
        "cycles_per_token": round(cycles_per_token, 1),
        "bytes_read_per_token": round(float(np.mean(rd)), 1),
        "bytes_required_per_token": required,
        "roofline_cycles_per_token": round(roofline, 1),
        "bandwidth_efficiency": round(bandwidth_efficiency(roofline, cycles_per_token), 4),
    }
