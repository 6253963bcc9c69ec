"""Offload: what the overlay cannot hold goes to an offload device (CUDA when present, else the CPU).

* **Hybrid attention.** KV beyond the overlay's ``kv_capacity`` tokens stays on the offload device. The overlay
  attends over its resident KV and leaves per-head (max, sum) partials in the accumulators (ATTN's ``stats``); the
  offload device attends over the rest; :func:`lse_merge` combines the two exactly, by log-sum-exp. Which tokens
  stay resident is a :class:`Residency` policy: attention sinks plus the most recent window by default.
* **Placement** is decided per step by a small cost model and reported as a dict (:func:`placement`).
* **Phase split.** :func:`choose_prefill` picks where a prompt is prefilled; :func:`write_kv_program` builds the
  LOAD + KVAPPEND program that moves a prefilled KV cache into the overlay's buffer.

The golden model runs the decode program in one pass with a hook after each instruction
(:class:`HybridGoldenBackend`): after a KVAPPEND the host keeps that token's keys and values, after an ATTN whose
layer has offloaded tokens it merges the overlay's partial with the offload device's and writes the result back
into the ATTN's destination vector, so every later instruction sees the merged output.

Only numpy at import; torch is imported when an offload device is first used.
"""

from __future__ import annotations

import importlib.util
import math
from dataclasses import dataclass

import numpy as np

from kvoverlay import isa
from kvoverlay import numerics as nx
from kvoverlay.bundle import read_logits

from .backend import GoldenBackend, RtlBackend, Step, kv_layers, outside_kv_buffer, register_args

__all__ = ["DEVICES", "PREFILL_MODES", "HybridGoldenBackend", "OffloadError", "Residency", "add_arguments",
           "attend_partial", "choose_prefill", "kv_registers", "lse_merge", "placement", "prefill", "resolve_device",
           "write_kv_program"]

DEVICES = ("auto", "cuda", "cpu", "none")
PREFILL_MODES = ("auto", "gpu", "overlay")
#: Default attention sinks kept resident (StreamingLLM's four first tokens).
DEFAULT_SINKS = 4


class OffloadError(ValueError):
    """Something the overlay cannot hold and no offload device to put it on, or a bad offload option."""


# ---------------------------------------------------------------- log-sum-exp merge
def attend_partial(q, k, v):
    """Float64 attention of one head over a partition of its KV: ``(out, max, sum)``.

    *q* [d], *k* and *v* [n, d]. ``out`` is normalized by ``sum`` (as the overlay's ATTN writes it), ``max`` is the
    largest score and ``sum`` = Σ exp(score − max). An empty partition gives ``(0, -inf, 0)``, which
    :func:`lse_merge` ignores.
    """
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    if k.shape[0] == 0:
        return np.zeros(q.shape[-1]), -math.inf, 0.0
    s = k @ q
    m = float(np.max(s))
    p = np.exp(s - m)
    total = float(np.sum(p))
    return (p @ v) / total, m, total


def lse_merge(parts):
    """Merge attention partials ``(out, max, sum)`` of disjoint KV partitions into the full attention output.

    Each ``out`` is already normalized by its own ``sum``. The result is Σ wᵢ·outᵢ / Σ wᵢ with
    wᵢ = sumᵢ·exp(maxᵢ − M) and M the largest max, so no exponent overflows however large or negative the scores.
    Works on scalars per head or on arrays of heads (``out`` [..., d], ``max``/``sum`` [...]).
    Torch tensors merge on their own device (the offload device), numpy arrays in float64.
    """
    if not parts:
        raise OffloadError("nothing to merge")
    xp = _namespace(parts[0][0])
    if xp is np:
        parts = [(np.asarray(o, np.float64), np.asarray(m, np.float64), np.asarray(s, np.float64)) for o, m, s in parts]
    big = parts[0][1]
    for _, m, _ in parts[1:]:
        big = xp.maximum(big, m)
    # (on a device the check would cost a synchronization: there the overlay's own partial is never empty)
    if xp is np and np.any(np.isneginf(big)):
        raise OffloadError("every partition is empty: attention over zero KV positions")
    num = den = 0.0
    for o, m, s in parts:
        w = xp.where(s > 0, s * xp.exp(xp.where(s > 0, m - big, 0.0)), 0.0)
        num = num + w[..., None] * o
        den = den + w
    return num / den[..., None]


def _namespace(x):
    """torch for a torch tensor, else numpy: the merge is written once for both."""
    if type(x).__module__.startswith("torch"):
        import torch

        return torch
    return np


# ---------------------------------------------------------------- residency
@dataclass(frozen=True)
class Residency:
    """Which KV positions stay in the overlay's buffer once a layer holds more tokens than it has slots.

    Slots ``[0, sinks)`` keep the first tokens for good (attention sinks); the other slots form a ring buffer over
    the most recent ``capacity - sinks`` tokens. Below ``capacity`` tokens everything is resident, in order.
    """

    capacity: int
    sinks: int = DEFAULT_SINKS

    def __post_init__(self):
        if self.capacity < 1:
            raise OffloadError(f"KV capacity {self.capacity} must be at least 1")
        if not 0 <= self.sinks < self.capacity:
            raise OffloadError(f"--kv-sinks {self.sinks} must be in [0, {self.capacity - 1}] "
                               f"(the overlay holds {self.capacity} tokens and needs one recent slot)")

    @property
    def window(self) -> int:
        return self.capacity - self.sinks

    def slot(self, position: int) -> int:
        """The buffer slot the token at *position* is appended to."""
        if position < self.capacity:
            return position
        return self.sinks + (position - self.sinks) % self.window

    def resident_length(self, position: int) -> int:
        """Valid slots while the token at *position* is attended (the ATTN length)."""
        return min(position + 1, self.capacity)

    def offloaded(self, position: int) -> range:
        """Positions not in the buffer while the token at *position* is attended."""
        if position < self.capacity:
            return range(0)
        return range(self.sinks, position - self.window + 1)

    def resident(self, position: int) -> list:
        """Resident positions in slot order, for a cache holding positions ``[0, position]``."""
        slots = [0] * self.resident_length(position)
        off = self.offloaded(position)
        for p in range(position + 1):
            if p not in off:
                slots[self.slot(p)] = p
        return slots


def kv_registers(manifest: dict, position: int, residency: Residency | None) -> dict:
    """Register index -> value of the KV slot and length for the step at *position*, when the program takes them
    from registers (compiled with ``--max-seq`` above the KV capacity); empty otherwise. Without a *residency*
    (nothing offloaded) the slot is the position."""
    regs = manifest["registers"]
    if "kv_slot" not in regs:
        return {}
    slot, length = (residency.slot(position), residency.resident_length(position)) if residency else (position, position + 1)
    return {int(regs["kv_slot"]): slot, int(regs["kv_len"]): length}


def resolve_device(name: str = "auto") -> str:
    """``auto`` → ``cuda`` when torch sees a GPU, else ``cpu``; ``none`` stays ``none``."""
    if name not in DEVICES:
        raise OffloadError(f"--offload-device {name!r}: expected one of {', '.join(DEVICES)}")
    if name in ("cpu", "none"):
        return name
    try:
        import torch
    except ImportError:
        if name == "cuda":
            raise OffloadError("--offload-device cuda needs torch (pip install torch)") from None
        return "cpu"
    if torch.cuda.is_available():
        return "cuda"
    if name == "cuda":
        raise OffloadError("--offload-device cuda: torch sees no CUDA device")
    return "cpu"


# ---------------------------------------------------------------- placement and cost model
def placement(manifest: dict, position: int, residency: Residency | None, device: str, *, prefill: str | None = None,
              device_layers=()) -> dict:
    """What runs where for the step at *position* (the token being attended), as reported per step.

    ``kv_*_tokens`` count the tokens of a layer the overlay's buffer holds; *device_layers* are layers whose whole KV
    (and attention) is on the offload device because the buffer has no room for them.
    """
    layers = manifest.get("kv", {}).get("layers", {})
    total = position + 1
    off = len(residency.offloaded(position)) if residency else 0
    partial = sorted(int(k) for k in layers if int(k) not in device_layers) if off else []
    whole = sorted(device_layers)
    ops = (["attention partial", "log-sum-exp merge"] if partial else []) + (["attention"] if whole else [])
    out = {
        "kv_on_chip_tokens": total - off,
        "kv_offloaded_tokens": off,
        "layers_offloaded": sorted(partial + whole),
        "layers_on_device": whole,
        "heads_offloaded": sum(int(layers[str(k)]["kv_heads"]) for k in partial + whole if str(k) in layers),
        "ops_off_overlay": ops + list(manifest.get("placement", {}).get("host", [])),
        "device": device if ops or prefill == "gpu" else "overlay",
    }
    if prefill is not None:
        out["prefill"] = prefill
    return out


#: Cost-model constants: sustained dense FLOP/s and fixed per-pass overhead of a batched torch prefill.
_TORCH_FLOPS = {"cuda": 50e12, "cpu": 20e9}
_TORCH_OVERHEAD_S = {"cuda": 2e-3, "cpu": 5e-3}


def overlay_step_seconds(program) -> float:
    """Lower bound of one overlay decode step: every weight byte over the memory port once, at the config clock."""
    cfg = program.config
    return program.manifest.get("weight_bytes", 0) / cfg.port_bytes / (cfg.clock_mhz * 1e6)


def choose_prefill(program, prompt_len: int, mode: str = "auto", device: str = "auto") -> str:
    """``gpu`` or ``overlay``: where a prompt of *prompt_len* tokens is prefilled.

    ``auto`` asks the cost model: the overlay prefills token by token at its decode rate (weight streaming bound),
    the offload device in one batched pass (2 FLOP per weight per token at a sustained rate, plus a fixed overhead).
    """
    if mode not in PREFILL_MODES:
        raise OffloadError(f"--prefill {mode!r}: expected one of {', '.join(PREFILL_MODES)}")
    dev = resolve_device(device)
    if mode == "gpu" and dev == "none":
        raise OffloadError("--prefill gpu needs an offload device; --offload-device is none")
    if mode != "auto":
        return mode
    if dev == "none" or prompt_len < 2 or importlib.util.find_spec("torch") is None:
        return "overlay"
    fmt_bits = nx.WEIGHT_FORMATS[program.manifest.get("weights", {}).get("format", "w16")]
    params = program.manifest.get("weight_bytes", 0) * 8 / fmt_bits
    torch_s = 2 * params * prompt_len / _TORCH_FLOPS[dev] + _TORCH_OVERHEAD_S[dev]
    return "gpu" if torch_s < prompt_len * overlay_step_seconds(program) else "overlay"


# ---------------------------------------------------------------- KV into the overlay's buffer
def write_kv_program(program, entries, scratch: int):
    """The LOAD + KVAPPEND program that writes prefilled KV into the overlay's buffer.

    *entries* is a list of ``(kv_base, slot, k, v)`` with *k* and *v* float arrays [kv_heads, head_dim]. Returns
    ``(instructions, records)``: records are ``(address, mantissas, exponent)`` vector records to write into external
    memory from *scratch* upwards before the run. KVAPPEND takes its slot as an immediate over R0, which the run
    sets to zero.
    """
    from kvoverlay.compiler.codegen import insert_tokens

    cfg = program.config
    align = max(isa.DRAM_UNIT, cfg.port_bytes)
    code, records, addr = [], [], -(-scratch // align) * align
    for kv_base, slot, k, v in entries:
        k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
        heads, d = k.shape
        n = heads * d
        base = []
        for vec in (k, v):
            m, e = nx.from_float(vec.reshape(-1))
            records.append((addr, m, e))
            base.append(addr)
            addr += -(-nx.vector_record_size(n) // align) * align
        kv_words = -(-n // cfg.abuf_lanes) * cfg.abuf_lanes
        code.append(isa.Instr("LOAD", {"addr": base[0], "len": n, "dst": 0, "dst_e": 0}))
        code.append(isa.Instr("LOAD", {"addr": base[1], "len": n, "dst": kv_words, "dst_e": 1}))
        code.append(isa.Instr("KVAPPEND", {"k": 0, "k_e": 0, "v": kv_words, "v_e": 1, "kv_base": int(kv_base),
                                           "heads": heads, "head_dim": d, "pos_reg": 0, "pos_imm": int(slot)}))
    code.append(isa.Instr("END"))
    insert_tokens(code)
    if addr > cfg.dram_bytes:
        raise OffloadError(f"the prefilled KV needs external memory up to {addr} bytes; the overlay has {cfg.dram_bytes}")
    return code, records


# ---------------------------------------------------------------- the golden model with hybrid attention
class _KvStore:
    """Every token's keys and values per layer on the offload device (float), and the partial attention there."""

    def __init__(self, device: str, max_seq: int):
        try:
            import torch
        except ImportError:
            raise OffloadError("offloading KV needs torch (pip install torch, any CUDA or CPU build); "
                               "without it, --offload-device none keeps every token on the overlay") from None

        self.torch = torch
        self.device = device
        self.dtype = torch.float64 if device == "cpu" else torch.float32
        self.max_seq = max_seq
        self.k, self.v = {}, {}

    def put(self, layer, position, k, v):
        """*k*, *v* float arrays [kv_heads, head_dim] (or [T, kv_heads, head_dim] from *position* on)."""
        t = self.torch
        k = t.as_tensor(np.asarray(k), dtype=self.dtype, device=self.device)
        v = t.as_tensor(np.asarray(v), dtype=self.dtype, device=self.device)
        if k.dim() == 2:
            k, v = k[None], v[None]
        if layer not in self.k:
            shape = (k.shape[1], self.max_seq, k.shape[2])
            self.k[layer] = t.zeros(shape, dtype=self.dtype, device=self.device)
            self.v[layer] = t.zeros(shape, dtype=self.dtype, device=self.device)
        n = k.shape[0]
        self.k[layer][:, position:position + n] = k.transpose(0, 1)
        self.v[layer][:, position:position + n] = v.transpose(0, 1)

    def partial(self, layer, q, span: range):
        """Attention of *q* [q_heads, head_dim] (a tensor on the device) over positions *span*:
        (out [qh, d], max [qh], sum [qh]) as tensors on the device."""
        t = self.torch
        k, v = self.k[layer][:, span.start:span.stop], self.v[layer][:, span.start:span.stop]
        group = q.shape[0] // k.shape[0]
        q = q.unflatten(0, (k.shape[0], group))  # query heads grouped by their KV head
        s = t.matmul(q, k.transpose(1, 2))  # [kv heads, group, n]
        m = s.amax(dim=-1)
        p = t.exp(s - m[..., None])
        total = p.sum(dim=-1)
        out = t.matmul(p, v) / total[..., None]
        return out.flatten(0, 1), m.flatten(), total.flatten()

    def merge(self, layer, q, span: range, overlay_part):
        """The overlay's partial (numpy out [qh, d], max [qh], sum [qh]) merged with this store's over *span*, on the
        device: one transfer there (q and the partial together) and one back (the merged output, numpy float64)."""
        t = self.torch
        qh, d = q.shape
        packed = np.concatenate([q.reshape(-1), overlay_part[0].reshape(-1), overlay_part[1], overlay_part[2]])
        x = t.as_tensor(packed, dtype=self.dtype).to(self.device, non_blocking=True)
        q_t, o_r = x[: qh * d].view(qh, d), x[qh * d: 2 * qh * d].view(qh, d)
        m_r, l_r = x[2 * qh * d: 2 * qh * d + qh], x[2 * qh * d + qh:]
        # The overlay's partial enters as one more key: score m_r + log(l_r), value o_r. Its softmax weight is
        # l_r·exp(m_r − M) / Σ, the log-sum-exp merge's (lse_merge) in one softmax: 8 kernels per layer instead of
        # the ~34 of partial + lse_merge, whose launches were the whole cost on a GPU (docs/benchmarks.md).
        k, v = self.k[layer][:, span.start:span.stop], self.v[layer][:, span.start:span.stop]
        kvh = k.shape[0]
        qg = q_t.view(kvh, qh // kvh, d)
        s = t.cat([t.matmul(qg, k.transpose(1, 2)), (m_r + t.log(l_r)).view(kvh, -1, 1)], dim=-1)
        p = t.softmax(s, dim=-1)
        merged = t.baddbmm(p[..., -1:] * o_r.view(kvh, -1, d), p[..., :-1], v)
        return merged.view(qh, d).double().cpu().numpy()


def _device_attention(store, f: dict, q, position: int):
    """A layer wholly on the offload device: the ATTN (fields *f*) of float query *q* over positions
    ``[0, position]``. Returns the output (float64 [q_heads * head_dim]) and the (max, sum) partials in the
    overlay's units, as its ATTN leaves them in the accumulators (int64 [2 * q_heads])."""
    qh, d = f["q_heads"], f["head_dim"]
    q = store.torch.as_tensor(np.asarray(q).reshape(qh, d), dtype=store.dtype).to(store.device)
    out, m, total = store.partial(f["kv_base"], q, range(position + 1))
    stats = np.stack([np.rint(m.double().cpu().numpy() * (1 << nx.SCORE_FRAC)),
                      np.rint(total.double().cpu().numpy() * (1 << 15))], axis=1).reshape(-1)
    return out.double().cpu().numpy().reshape(-1), stats.astype(np.int64)


def _merged_attention(store, f: dict, q, out, stats, off: range):
    """The overlay's ATTN output *out* over its resident KV (float [q_heads * head_dim]; *stats* its (max, sum)
    accumulator words) merged with the offload device's partial over positions *off*: float64 [q_heads * head_dim]."""
    qh, d = f["q_heads"], f["head_dim"]
    stats = np.asarray(stats, np.float64)
    # the overlay's partial: max in Q.SCORE_FRAC natural-log units, sum in Q1.15 units of exp(s - max)
    m_r, l_r = stats[0::2] / (1 << nx.SCORE_FRAC), stats[1::2] / (1 << 15)
    merged = store.merge(f["kv_base"], np.asarray(q).reshape(qh, d), off, (np.asarray(out).reshape(qh, d), m_r, l_r))
    return merged.reshape(-1)


class _Offload:
    """What both hybrid backends (golden model, RTL) decide before they run: residency, device, layers on the device."""

    def _init_offload(self, program, offload_device: str, kv_sinks: int) -> None:
        self.requested_device = offload_device
        self.kv_sinks = kv_sinks
        regs = program.manifest["registers"]
        self.hybrid = "kv_slot" in regs
        cap = program.config.kv_capacity
        if not isinstance(kv_sinks, int) or kv_sinks < 0 or (kv_sinks != DEFAULT_SINKS and kv_sinks >= cap):
            raise OffloadError(f"--kv-sinks {kv_sinks} must be in [0, {cap - 1}] (the overlay holds {cap} tokens and "
                               "needs one recent slot)")
        # only the default shrinks to fit a buffer of fewer slots; a value asked for is kept or refused
        self.residency = Residency(cap, min(kv_sinks, cap - 1)) if self.hybrid else None
        self.device = resolve_device(offload_device) if self.hybrid else "none"
        cfg = program.config
        self.host_pcs = outside_kv_buffer(program)
        # the KV-pool bases of the layers on the offload device (the host's key of a layer's KV)
        self.device_layers = sorted({ins.fields["kv_base"] for ins in self.host_pcs.values()})
        if self.device_layers:
            self.device = resolve_device(offload_device)
            if self.device == "none":
                kv = program.manifest.get("kv", {}).get("layers", {})
                layers = kv_layers(program, self.device_layers)
                shapes = sorted({(kv[str(la)]["kv_heads"], kv[str(la)]["head_dim"]) for la in layers if str(la) in kv})
                raise OffloadError(f"the KV of layers {layers} ({', '.join(f'{h} heads of {d}' for h, d in shapes)}) "
                                   f"does not fit the overlay's KV pool of {cfg.kv_columns} columns of "
                                   f"{cfg.vector_lanes} ({len(layers)} layers over) and --offload-device is none")

    def _prefill_entries(self, kv: dict, length: int) -> list:
        """The (base, slot, k, v) entries of a prefilled KV cache the overlay's buffer holds; the whole cache goes to
        the offload store. *kv* maps a layer's KV-pool base to ``(k, v)`` float arrays [kv_heads, length, head_dim]
        (the GPU backend's prefill)."""
        last = length - 1
        if self.hybrid:
            self.check_fits(last)
            resident = self.residency.resident(last)
        else:
            if length > self.program.config.kv_capacity:
                raise OffloadError(f"a prompt of {length} tokens does not fit the overlay's "
                                   f"{self.program.config.kv_capacity}-token KV buffer")
            resident = list(range(length))
        entries = []
        for base, (k, v) in sorted(kv.items()):
            k, v = np.asarray(k, np.float64), np.asarray(v, np.float64)
            if (self.hybrid or self.device_layers) and self.device != "none":
                self._store().put(int(base), 0, k.transpose(1, 0, 2), v.transpose(1, 0, 2))
            if int(base) not in self.device_layers:
                entries += [(int(base), slot, k[:, p], v[:, p]) for slot, p in enumerate(resident)]
        return entries

    def _store(self):
        if self.store is None:
            self.store = _KvStore(self.device, int(self.program.manifest["max_seq"]))
        return self.store

    def check_fits(self, position: int) -> range:
        """The positions offloaded while the token at *position* is attended; OffloadError when there are some and
        no offload device."""
        off = self.residency.offloaded(position) if self.residency else range(0)
        if len(off) and self.device == "none":
            cap = self.program.config.kv_capacity
            raise OffloadError(f"KV of {position + 1} tokens per layer does not fit the overlay's {cap}-token buffer "
                               f"({position + 1 - cap} over, {len(off)} to offload) and --offload-device is none")
        return off

    def _step_registers(self, token: int, position: int, registers: dict | None) -> dict:
        return register_args(self.program, token, position, {**kv_registers(self.program.manifest, position,
                                                                             self.residency), **(registers or {})})


class HybridGoldenBackend(_Offload, GoldenBackend):
    """The golden model (``--backend isa``) with KV beyond the overlay's buffer attended on an offload device.

    When nothing is offloaded (a program that fits the KV buffer, or positions within it) it runs exactly as
    :class:`~kvoverlay.host.backend.GoldenBackend`, with no hook.

    Parameters
    ----------
    program : Bundle
        A compiled decoder. When its manifest's registers name ``kv_slot`` and ``kv_len`` (compiled with
        ``--max-seq`` above ``--kv-capacity``), tokens beyond the capacity are offloaded; otherwise this is the plain
        golden model.
    offload_device : str
        ``auto``, ``cuda``, ``cpu`` or ``none``; with ``none`` a step that needs offload fails, naming what did not
        fit and by how much.
    kv_sinks : int
        Attention sinks kept resident (see :class:`Residency`).
    """

    name = "isa"

    def __init__(self, program, *, offload_device: str = "auto", kv_sinks: int = DEFAULT_SINKS, **options):
        self._init_offload(program, offload_device, kv_sinks)
        # KVAPPEND and ATTN of layers the buffer cannot hold become NOPs (keeping their dependency tokens) on the
        # overlay; the hook runs them on the offload device instead.
        self.instructions = [isa.Instr("NOP", {"queue": isa.QUEUES.index(ins.queue)}, ins.deps)
                             if pc in self.host_pcs else ins for pc, ins in enumerate(program.instructions)]
        super().__init__(program, **options)

    def reset(self) -> None:
        super().reset()
        self.store = None
        self.placement = None

    def step(self, token: int, position: int, registers: dict | None = None) -> Step:
        off = self.check_fits(position)
        values = self._step_registers(token, position, registers)
        args = list(self.model.regs)
        for i, v in values.items():
            args[i] = v
        hook = self._hook(position, off) if self.hybrid or self.host_pcs else None
        counters = self.model.run(self.instructions, args=args, hook=hook)
        self.placement = placement(self.program.manifest, position, self.residency, self.device,
                                   device_layers=kv_layers(self.program, self.device_layers))
        counters.placement = self.placement
        logits = read_logits(self.program.manifest["logits"], self.model.read_vector_record)
        return Step(self.model.regs[self.program.manifest["registers"]["next_token"]], logits, counters)

    def _hook(self, position, off):
        model = self.model

        def vec(base, ereg, n):
            m, e = model.vec(base, ereg, n)
            return nx.to_float(m, e)

        def hook(pc, ins):
            if pc in self.host_pcs:
                ins = self.host_pcs[pc]
                if ins.op == "ATTN":  # a layer wholly on the offload device: its whole attention runs there
                    f = ins.fields
                    out, stats = _device_attention(self._store(), f, vec(f["q"], f["q_e"], f["q_heads"] * f["head_dim"]),
                                                   position)
                    model.put(f["dst"], f["dst_e"], *nx.from_float(out))
                    if f["stats"] != isa.ATTN_NO_STATS:  # as the overlay's ATTN would have left them
                        model.acc[f["stats"]: f["stats"] + len(stats)] = stats
                    return
            f = ins.fields
            if ins.op == "KVAPPEND" and self.device != "none":  # every token's KV, for when it is evicted
                h, d = f["heads"], f["head_dim"]
                k = vec(f["k"], f["k_e"], h * d).reshape(h, d)
                v = vec(f["v"], f["v_e"], h * d).reshape(h, d)
                self._store().put(f["kv_base"], position, k, v)
            elif ins.op == "ATTN" and len(off):
                n = f["q_heads"] * f["head_dim"]
                merged = _merged_attention(self._store(), f, vec(f["q"], f["q_e"], n), vec(f["dst"], f["dst_e"], n),
                                           model.acc[f["stats"]: f["stats"] + 2 * f["q_heads"]], off)
                model.put(f["dst"], f["dst_e"], *nx.from_float(merged))
        return hook

    # ------------------------------------------------------------ phase split
    def load_prefill(self, kv: dict, length: int):
        """Write a prefilled KV cache into the overlay's buffer (resident positions) and the offload store (all).

        *kv* maps a layer's KV-pool base to ``(k, v)`` float arrays [kv_heads, length, head_dim] (the GPU backend's
        prefill).
        Returns the counters of the LOAD + KVAPPEND program.
        """
        entries = self._prefill_entries(kv, length)
        code, records = write_kv_program(self.program, entries, len(self.program.image))
        for addr, m, e in records:
            self.model.write_vector_record(addr, m, e)
        return self.model.run(code, args=[0])


# ---------------------------------------------------------------- the RTL with hybrid attention
@dataclass
class Segmented:
    """A decode program cut where the host works mid-step (:func:`segment_program`).

    ``instructions`` holds every segment, each ending in END; segment *i* starts at ``starts[i]``. Between segments
    *i* and *i + 1* the host serves ``pauses[i]``: ``(kind, attn_fields, addresses)`` with kind ``merge`` (an ATTN
    over the resident KV whose output is merged with the offloaded part) or ``device`` (a layer's whole attention on
    the offload device); ``captures[i]`` lists the ``(layer, k_addr, v_addr, heads, head_dim)`` records of this
    step's keys and values that segment *i* stored (the offload store keeps every token's KV, as the golden hook
    does).
    """

    instructions: list
    starts: list
    pauses: list
    captures: list
    end: int  # one past the last scratch byte


def segment_program(program, scratch: int, *, split: bool, capture: bool, device_layers=()) -> Segmented:
    """The decode program as segments the RTL runs one at a time, the host merging attention between them.

    After each ATTN the host must see (with *split*: every ATTN; always: those of *device_layers*, which the
    overlay's buffer cannot hold), the segment stores the query, the ATTN's output and its (max, sum) partials
    (STORE, STORE, STACC) into scratch records from *scratch* upwards and ends; the next segment starts by LOADing
    the merged output the host wrote into the ATTN's destination. A layer of *device_layers* has no KVAPPEND and no
    ATTN on the overlay: its keys and values are stored for the host, and its output comes back the same way. With
    *capture*, every KVAPPEND's keys and values are stored too. Dependency tokens are recomputed per segment.
    """
    from kvoverlay.compiler.codegen import insert_tokens

    cfg = program.config
    align = max(isa.DRAM_UNIT, cfg.port_bytes)
    addr = -(-scratch // align) * align

    def record(n, words=False):
        nonlocal addr
        at = addr
        addr += -(-(8 * n if words else nx.vector_record_size(n)) // align) * align
        return at

    segments, pauses, captures = [[]], [], [[]]
    for ins in program.instructions:
        f, code = ins.fields, segments[-1]
        if ins.op in ("NOP", "END"):  # NOPs only carried tokens, which are recomputed
            continue
        if ins.op == "KVAPPEND":
            n = f["heads"] * f["head_dim"]
            if f["kv_base"] not in device_layers:
                code.append(isa.Instr(ins.op, f))
            if capture or f["kv_base"] in device_layers:
                k, v = record(n), record(n)
                code += [isa.Instr("STORE", {"src": f["k"], "src_e": f["k_e"], "len": n, "addr": k}),
                         isa.Instr("STORE", {"src": f["v"], "src_e": f["v_e"], "len": n, "addr": v})]
                captures[-1].append((f["kv_base"], k, v, f["heads"], f["head_dim"]))
            continue
        device = ins.op == "ATTN" and f["kv_base"] in device_layers
        if not (device or (split and ins.op == "ATTN")):
            code.append(isa.Instr(ins.op, f))
            continue
        n = f["q_heads"] * f["head_dim"]
        where = {"q": record(n), "out": record(n)}
        code.append(isa.Instr("STORE", {"src": f["q"], "src_e": f["q_e"], "len": n, "addr": where["q"]}))
        if not device:
            where.update(o=record(n), stats=record(2 * f["q_heads"], words=True))
            code += [isa.Instr(ins.op, f),
                     isa.Instr("STORE", {"src": f["dst"], "src_e": f["dst_e"], "len": n, "addr": where["o"]}),
                     isa.Instr("STACC", {"acc": f["stats"], "len": 2 * f["q_heads"], "addr": where["stats"]})]
        pauses.append(("device" if device else "merge", f, where))
        segments.append([isa.Instr("LOAD", {"addr": where["out"], "len": n, "dst": f["dst"], "dst_e": f["dst_e"]})])
        captures.append([])
    instructions, starts = [], []
    for code in segments:
        code.append(isa.Instr("END"))
        insert_tokens(code)
        starts.append(len(instructions))
        instructions += code
    return Segmented(instructions, starts, pauses, captures, addr)


class HybridRtlBackend(_Offload, RtlBackend):
    """The Verilated overlay (``--backend rtl``) with KV beyond its buffer attended on an offload device.

    Where the golden model's hook works after an instruction, the RTL pauses: the step runs as segments
    (:func:`segment_program`) in the one simulator process, and between two segments the host reads the ATTN's query,
    output and partials from external memory, merges them with the offload device's partial (the same
    :func:`lse_merge` in the same precision as ``--backend isa``) and writes the merged output back for the next
    segment to LOAD. So the logits stay bit-identical to the golden model's; the step's cycles are those of its
    segments (the STORE/LOAD round trips and each segment's pipeline drain included, which the golden model's hook
    does not cost). Steps that need nothing from the host run the program as compiled.

    Parameters are those of :class:`~kvoverlay.host.backend.RtlBackend` and of :class:`HybridGoldenBackend`.
    """

    name = "rtl"

    def __init__(self, program, *, offload_device: str = "auto", kv_sinks: int = DEFAULT_SINKS, **options):
        from kvoverlay.sim.rtl import _write_extent

        self._init_offload(program, offload_device, kv_sinks)
        self.store = None
        self.placement = None
        capture = self.device != "none"
        #: whether any step needs the host mid-step (otherwise this is the plain RtlBackend, the program as compiled)
        self.offloads = bool(self.device_layers) or (self.hybrid and capture)
        scratch = max(len(program.image), _write_extent(program.instructions))
        variants = [segment_program(program, scratch, split=False, capture=capture, device_layers=self.device_layers)]
        if self.hybrid:
            variants.append(segment_program(program, variants[0].end, split=True, capture=capture,
                                            device_layers=self.device_layers))
        # one program in external memory: as compiled, then each variant (a segment starts at its own index)
        self.variants, at = [], len(program.instructions)
        instructions = list(program.instructions)
        for seg in variants if self.offloads else []:
            seg.starts = [at + s for s in seg.starts]
            at += len(seg.instructions)
            instructions += seg.instructions
            self.variants.append(seg)
        super().__init__(program, **options)
        self.instructions = instructions

    def reset(self) -> None:
        super().reset()
        self.store = None
        self.placement = None

    def load_prefill(self, kv: dict, length: int):
        """Write a prefilled KV cache into the overlay's buffer (resident positions) and the offload store (all), as
        :meth:`HybridGoldenBackend.load_prefill` does: the same LOAD + KVAPPEND program, placed behind the session's
        program in a fresh simulator process (a prefill starts at position 0, so there is no state to keep), its
        records written through the memory model's host port. Returns the hardware counters of that program."""
        from kvoverlay.hw.overlay import COUNTERS
        from kvoverlay.sim.rtl import RtlProcessError, _counters, _error, _write_extent

        from .backend import SimulatorDied

        self.close()  # a fresh process below, with the KV program behind the session's
        self.steps, self.store, self.placement = [], None, None
        entries = self._prefill_entries(kv, length)
        # the records go past everything the session's program and its segments read or write
        base = max(len(self.program.image), _write_extent(self.instructions))
        base = -(-base // self.program.config.port_bytes) * self.program.config.port_bytes
        code, records = write_kv_program(self.program, entries, base)
        try:
            self.process = proc = self.model.open(list(self.instructions) + list(code))
            for addr, m, e in records:
                proc.write_vector(addr, m, e)
            status = proc.run({}, segment=len(self.instructions))
        except RtlProcessError as exc:
            raise SimulatorDied(f"{exc}; call reset() to start a new one") from None
        if status["error"]:
            raise _error(status, list(code), proc.watchdog)
        return _counters(dict(zip(COUNTERS, status["counters"])))

    def run_steps(self, feed, generate: int, position: int, registers: dict | None = None) -> list:
        if not self.offloads:
            return super().run_steps(feed, generate, position, registers)
        self.check_fits(position + len(feed) + generate - 1)
        out, tokens = [], [int(t) for t in feed]
        for k in range(len(feed) + generate):
            token = tokens[k] if k < len(tokens) else out[-1].next_token
            out.append(self.step(token, position + k, registers))
        return out

    def step(self, token: int, position: int, registers: dict | None = None) -> Step:
        from kvoverlay.sim.rtl import RtlProcessError, _error, _run_totals

        from .backend import SimulatorDied

        if not self.offloads:
            return super().step(token, position, registers)
        off = self.check_fits(position)
        proc, _ = self._live()
        m = self.program.manifest
        values = self._step_registers(token, position, registers)
        seg = self.variants[1] if len(off) else self.variants[0]
        try:
            statuses = [proc.run(values, segment=seg.starts[0])]
            for i, (kind, f, where) in enumerate(seg.pauses):
                self._check(proc, statuses[-1], position, _error)
                self._harvest(proc, seg.captures[i], position)
                n = f["q_heads"] * f["head_dim"]
                q = nx.to_float(*proc.read_vector(where["q"], n))
                if kind == "device":
                    result, _ = _device_attention(self._store(), f, q, position)
                else:
                    o = nx.to_float(*proc.read_vector(where["o"], n))
                    words = proc.read_words(where["stats"] // proc.model.config.port_bytes,
                                            -(-16 * f["q_heads"] // proc.model.config.port_bytes))
                    raw = b"".join(w.to_bytes(proc.model.config.port_bytes, "little") for w in words)
                    stats = np.frombuffer(raw[: 16 * f["q_heads"]], "<i8")
                    result = _merged_attention(self._store(), f, q, o, stats, off)
                proc.write_vector(where["out"], *nx.from_float(result))
                statuses.append(proc.run({}, segment=seg.starts[i + 1]))
            self._check(proc, statuses[-1], position, _error)
            proc._cover(proc.instrs, "ok", position, 1)
            self._harvest(proc, seg.captures[-1], position)
            total = {**statuses[-1], "wall_s": sum(s["wall_s"] for s in statuses),
                     "cpu_s": sum(s["cpu_s"] for s in statuses),
                     "counters": [sum(c) for c in zip(*(s["counters"] for s in statuses))]}
            step = proc.step_result(total, token, position, m["registers"], m["logits"])
        except RtlProcessError as exc:
            raise SimulatorDied(f"{exc}; call reset() to start a new one") from None
        self.steps.append(step)
        proc.model.last_run = _run_totals([step])
        self.placement = placement(m, position, self.residency, self.device,
                                   device_layers=kv_layers(self.program, self.device_layers))
        step.counters.placement = self.placement
        return Step(step.next_token, step.logits, step.counters)

    def _check(self, proc, status, position, error):
        if status["error"]:
            proc._fault = f"step at position {position} stopped on an error"
            err = error(status, proc.instrs, proc.watchdog)
            proc._cover(proc.instrs, str(err), position, 1)
            raise err

    def _harvest(self, proc, captures, position):
        """This step's keys and values, stored by the segment just run, into the offload store."""
        for layer, k, v, heads, d in captures:
            kf = nx.to_float(*proc.read_vector(k, heads * d)).reshape(heads, d)
            vf = nx.to_float(*proc.read_vector(v, heads * d)).reshape(heads, d)
            self._store().put(layer, position, kf, vf)


# ---------------------------------------------------------------- what the session and the CLI call
def add_arguments(parser) -> None:
    """``kvoverlay run``'s offload options: --offload-device, --prefill and --kv-sinks."""
    parser.add_argument("--offload-device", default="auto", choices=DEVICES,
                        help="where KV beyond the overlay's buffer (and a GPU prefill) goes: auto = cuda when torch sees "
                             "one, else cpu; none = fail when something does not fit")
    parser.add_argument("--prefill", default="overlay", choices=PREFILL_MODES,
                        help="prefill the prompt token by token on the backend (overlay, the default: bit-exact) or in "
                             "one batched torch pass on the offload device (gpu); auto asks the cost model")
    parser.add_argument("--kv-sinks", type=int, default=DEFAULT_SINKS, metavar="N",
                        help="first tokens kept in the overlay's KV buffer once it overflows (attention sinks)")


def prefill(backend, prompt, mode: str = "auto", offload_device: str = "auto") -> Step | None:
    """Phase split: prefill *prompt* (from position 0) in one batched torch pass when *mode* or the cost model says so.

    On the ``gpu`` backend that is its own batched prefill; on ``isa`` the KV then goes into the overlay's buffer (and
    the offload store) and decoding continues on the overlay from ``len(prompt)``. Returns the :class:`Step` of the
    prompt's last position (its counters: the KV-writing program's on ``isa``, with ``placement``), or ``None`` when
    the prompt is to be fed to the overlay token by token.
    """
    prompt = [int(t) for t in prompt]
    program = backend.program
    if backend.name == "gpu":
        from .gpu import GpuCounters

        nxt, logits, _ = backend.prefill(prompt)
        where = {**backend._placement(len(prompt) - 1), "prefill": "gpu"}
        return Step(nxt, logits, GpuCounters(instructions=backend.n_instructions, placement=where))
    where = choose_prefill(program, len(prompt), mode, offload_device)
    if where == "overlay":
        return None
    if not hasattr(backend, "load_prefill"):
        if mode == "auto":
            return None
        raise OffloadError(f"--prefill gpu: the {backend.name} backend cannot take a prefilled KV cache; use --backend isa")
    from .gpu import GpuBackend

    device = resolve_device(offload_device)
    gpu = GpuBackend(program, device=device, cuda_graph=False)
    nxt, logits, kv = gpu.prefill(prompt)
    counters = backend.load_prefill(kv, len(prompt))
    counters.placement = placement(program.manifest, len(prompt) - 1, getattr(backend, "residency", None), device,
                                   prefill="gpu")
    return Step(nxt, logits, counters)
