"""The ``gpu`` backend: a compiled program run as PyTorch operations, on CUDA when present, else on the CPU.

The program bundle is the deployable artefact, so this backend is built from it alone: the instruction stream is
lowered once (:func:`lower`) into a list of torch operations on float tensors, with every weight matrix and table
dequantized from the memory image (``kvoverlay.numerics`` decodes the row and vector records). Vectors live by
activation-buffer address in a small map (:class:`_Words`), so a read of a sub-range is a view and nothing is copied
into a flat buffer. GEMV row tiles and split-K tiles of one matrix fuse into one matmul, and a bias added right
after a GEMV folds into it.

Every value carries a leading token dimension T: a decode step is T = 1, a batched prefill runs the same lowered
program over T prompt tokens at once (KVAPPEND writes T slots, ATTN masks causally by each row's KV length).

Decoding keeps everything on the device: the token fed to a step is either the prompt token of that position or
the previous step's ARGMAX, chosen on the device, and logits and next tokens go to per-position history tensors; the
host synchronizes once per :meth:`GpuBackend.run_steps` call. On CUDA one step is captured as a CUDA graph. The KV
cache is a static tensor per layer of ``max_seq`` positions.

Only torch and numpy are needed, and torch is imported when a backend is built.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

import numpy as np

from kvoverlay import isa
from kvoverlay import numerics as nx
from kvoverlay.access import accesses

from .backend import SessionError, Step, kv_layers

__all__ = ["GpuBackend", "GpuCounters", "lower"]


@dataclass
class GpuCounters:
    """What one step on the gpu backend reports: no cycles (None), the instructions lowered and the wall time."""

    cycles: int | None = None
    instructions: int = 0
    wall_s: float = 0.0
    bytes_read: dict = field(default_factory=dict)
    bytes_written: dict = field(default_factory=dict)
    placement: dict = field(default_factory=dict)

    @property
    def total_read(self) -> int:
        return sum(self.bytes_read.values())

    def to_dict(self) -> dict:
        return {"cycles": self.cycles, "instructions": self.instructions, "wall_s": self.wall_s}


def _torch():
    try:
        import torch
    except ImportError:
        raise ImportError("--backend gpu needs torch (pip install torch; any CUDA or CPU build)") from None
    return torch


class _Words:
    """Values by word address (activation buffer or accumulators): reads of a written range or sub-range are views."""

    def __init__(self, torch, what):
        self.t, self.what = torch, what
        self.spans = []  # (lo, hi, tensor [T, hi - lo]), disjoint

    def write(self, lo, x):
        hi = lo + x.shape[-1]
        keep = []
        for a, b, v in self.spans:
            if b <= lo or a >= hi:
                keep.append((a, b, v))
                continue
            if a < lo:
                keep.append((a, lo, v[..., : lo - a]))
            if b > hi:
                keep.append((hi, b, v[..., hi - a:]))
        keep.append((lo, hi, x))
        self.spans = keep

    def read(self, lo, n):
        hi = lo + n
        parts = sorted((a, b, v) for a, b, v in self.spans if a < hi and b > lo)
        pos, out = lo, []
        for a, b, v in parts:
            if a > pos:
                break
            out.append(v[..., pos - a: min(b, hi) - a])
            pos = min(b, hi)
        if pos < hi:
            raise ValueError(f"{self.what} [{pos}, {hi}) is read before anything wrote it")
        return out[0] if len(out) == 1 else self.t.cat(out, dim=-1)


def _dequantize(image, addr, rows, cols, fmt, group, sexp, align, packed=0):
    size = nx.matrix_bytes(rows, cols, fmt, group, align, packed)
    q, sm = nx.unpack_matrix(bytes(image[addr: addr + size]), rows, cols, fmt, group, align, packed)
    return nx.dequantize_matrix(q, sm, sexp, group)


@dataclass
class _Op:
    """One lowered operation: the (possibly fused) instruction and the constant tensors it needs."""

    op: str
    f: dict
    w: object = None  # weight matrix [rows, cols] (GEMV, LDROW table) or constant vector (LOAD)
    x_len: int = 0  # GEMV: input elements (all split-K tiles)
    bias: object = None  # LINEAR: the constant vector added to the product

    def accesses(self):
        """(space, lo, hi, is_write) of on-chip state, as the ISA's access table gives them for one instruction."""
        f = self.f
        if self.op == "GEMV":
            return [("abuf", f["x"], f["x"] + self.x_len, False), ("acc", f["acc"], f["acc"] + self.w.shape[0], True)]
        if self.op == "LINEAR":
            return [("abuf", f["x"], f["x"] + self.x_len, False), ("abuf", f["dst"], f["dst"] + self.w.shape[0], True)]
        return [a for a in accesses(isa.Instr(self.op, f)) if a[0] in ("abuf", "acc")]


def _dead(ops, start, space, lo, hi):
    """Whether no op from *start* on reads words [lo, hi) of *space* before they are all overwritten."""
    live = [(lo, hi)]
    for op in ops[start:]:
        acc = op.accesses()
        if any(s == space and not w and any(a < h2 and l2 < b for l2, h2 in live) for s, a, b, w in acc):
            return False
        for s, a, b, w in acc:
            if s == space and w:
                live = [piece for l2, h2 in live for piece in ((l2, min(h2, a)), (max(l2, b), h2)) if piece[0] < piece[1]]
        if not live:
            return True
    return True


def _fold_biases(ops):
    """A constant added right after a GEMV (GEMV, REQ, LOAD, VADD) or a LayerNorm (NORM, LOAD, VADD) becomes that
    kernel's bias (one kernel, not two), when nothing reads the intermediate vector, the loaded constant or the
    accumulators afterwards."""
    stored = {op.f["addr"] for op in ops if op.op in ("STORE", "STACC")}

    def bias_add(c, v, src, n, end):
        return (c.op == "LOAD" and v.op == "VADD" and c.f["len"] == v.f["len"] == n and c.f["addr"] not in stored
                and {v.f["a"], v.f["b"]} == {src, c.f["dst"]} and src != c.f["dst"]
                and all(_dead(ops, end, "abuf", a, a + n) for a in (src, c.f["dst"]) if a != v.f["dst"]))

    out, i = [], 0
    while i < len(ops):
        g = ops[i]
        if g.op == "GEMV" and len(ops) > i + 3 and ops[i + 1].op == "REQ":
            r, c, v = ops[i + 1: i + 4]
            n = g.w.shape[0]
            if (r.f["acc"] == g.f["acc"] and r.f["len"] == n and bias_add(c, v, r.f["dst"], n, i + 4)
                    and _dead(ops, i + 4, "acc", g.f["acc"], g.f["acc"] + n)):
                out.append(_Op("LINEAR", {"x": g.f["x"], "dst": v.f["dst"]}, g.w, g.x_len, c.w[0]))
                i += 4
                continue
        if (g.op == "NORM" and isa.ENUMS["norm"][g.f["kind"]] == "layer" and len(ops) > i + 2
                and bias_add(*ops[i + 1: i + 3], g.f["dst"], g.f["len"], i + 3)):
            c, v = ops[i + 1: i + 3]
            out.append(_Op("NORM", {**g.f, "dst": v.f["dst"]}, bias=c.w[0]))
            i += 3
            continue
        out.append(g)
        i += 1
    return out


def _fuse_gemvs(code, align):
    """Group GEMVs that are tiles of one matrix product: split-K tiles (accumulate onto the same rows from the next
    input elements) and then row tiles (same input, the next accumulator rows). Returns a list of instructions and
    tile lists ``("GEMV*", [tiles])``."""
    out = []
    for ins in code:
        f = ins.fields
        if ins.op == "GEMV" and out and isinstance(out[-1], tuple):
            tiles = out[-1][1]
            last = tiles[-1].fields
            ktile = (f["accumulate"] and f["acc"] == last["acc"] and f["rows"] == last["rows"]
                     and f["x"] == last["x"] + last["cols"] and f["acc_e"] == last["acc_e"])
            if ktile:
                tiles.append(ins)
                continue
        if ins.op == "GEMV" and not f["accumulate"]:
            out.append(("GEMV*", [ins]))
            continue
        if ins.op == "GEMV":
            raise ValueError(f"GEMV accumulating onto accumulators {f['acc']} that no preceding tile wrote")
        if ins.op in ("NOP", "END"):
            continue
        out.append(ins)
    return out


def lower(program, torch, device, dtype):
    """Lower *program*'s instruction stream once into :class:`_Op` records with their weights on *device*."""
    cfg, image = program.config, program.image
    align = cfg.port_bytes
    code = program.instructions
    # Table row counts are not in LDROW: a table ends where the next placed matrix, table or region begins.
    bounds = sorted({i.fields["addr"] for i in code if i.op in ("GEMV", "LDROW", "LOAD")}
                    | {r[1] for r in program.manifest.get("regions", [])} | {r[2] for r in program.manifest.get("regions", [])}
                    | {len(image)})
    cache = {}

    def tensor(a):
        return torch.as_tensor(np.asarray(a), dtype=dtype).to(device)

    ops = []
    for item in _fuse_gemvs(code, align):
        if isinstance(item, tuple):
            tiles = item[1]
            blocks = []
            for t in tiles:
                f = t.fields
                fmt, group = isa.weight_layout(t)
                blocks.append(_dequantize(image, f["addr"], f["rows"], f["cols"], fmt, group, f["sexp"], align,
                                          f.get("packed", 0)))
            w = np.concatenate(blocks, axis=1)
            f0 = dict(tiles[0].fields)
            prev = ops[-1] if ops else None
            # row tiles of one product: same input, the next accumulator rows
            if (prev is not None and prev.op == "GEMV" and prev.f["x"] == f0["x"] and prev.x_len == w.shape[1]
                    and f0["acc"] == prev.f["acc"] + prev.w.shape[0] and f0["acc_e"] == prev.f["acc_e"]):
                prev.w = torch.cat([prev.w, tensor(w)], dim=0)
                continue
            ops.append(_Op("GEMV", f0, tensor(w), w.shape[1]))
            continue
        f = item.fields
        if item.op == "LDROW":
            fmt, group = isa.weight_layout(item)
            key = (f["addr"], f["cols"], fmt, group, f["sexp"])
            if key not in cache:
                stride = nx.row_stride(f["cols"], fmt, group, align)
                end = next(b for b in bounds if b > f["addr"])
                rows = (end - f["addr"]) // stride
                cache[key] = tensor(_dequantize(image, f["addr"], rows, f["cols"], fmt, group, f["sexp"], align))
            ops.append(_Op("LDROW", f, cache[key]))
        elif item.op == "LOAD":
            m, e = nx.unpack_vector_record(bytes(image[f["addr"]: f["addr"] + nx.vector_record_size(f["len"])]), f["len"])
            ops.append(_Op("LOAD", f, tensor(nx.to_float(m, e))[None]))
        else:
            ops.append(_Op(item.op, f))
    return _fold_biases(ops)


class _Machine:
    """Runs lowered ops over T tokens. State between steps: the KV cache tensors (one per layer)."""

    def __init__(self, torch, ops, device, dtype, max_seq):
        self.t, self.ops, self.device, self.dtype, self.max_seq = torch, ops, device, dtype, max_seq
        self.kv = {}
        for op in ops:
            if op.op == "KVAPPEND":
                shape = (op.f["heads"], max_seq, op.f["head_dim"])
                self.kv.setdefault(op.f["kv_base"], (torch.zeros(shape, dtype=dtype, device=device),
                                                   torch.zeros(shape, dtype=dtype, device=device)))
        self.slots = torch.arange(max_seq, device=device)

    def forward(self, regs: dict):
        """Run the ops once; *regs* maps register index to an int64 tensor [T]. Returns (regs, stores)."""
        t, F = self.t, self.t.nn.functional
        abuf, acc, dram = _Words(t, "activation buffer"), _Words(t, "accumulators"), {}

        def rd(name, f, n):
            return abuf.read(f[name], n)

        for op in self.ops:
            f = op.f
            k = op.op
            if k == "GEMV":
                acc.write(f["acc"], F.linear(abuf.read(f["x"], op.x_len), op.w))
            elif k == "LINEAR":
                abuf.write(f["dst"], F.linear(abuf.read(f["x"], op.x_len), op.w, op.bias))
            elif k == "REQ":
                abuf.write(f["dst"], acc.read(f["acc"], f["len"]))
            elif k == "LOAD":
                abuf.write(f["dst"], dram.get(f["addr"], op.w))
            elif k == "LDROW":
                abuf.write(f["dst"], op.w.index_select(0, regs[f["row_reg"]] + f["row_imm"]))
            elif k == "VADD":
                abuf.write(f["dst"], rd("a", f, f["len"]) + rd("b", f, f["len"]))
            elif k == "VMUL":
                abuf.write(f["dst"], rd("a", f, f["len"]) * rd("b", f, f["len"]))
            elif k == "VSCALE":
                abuf.write(f["dst"], rd("a", f, f["len"]) * (f["imm_m"] * 2.0 ** f["imm_e"]))
            elif k == "NORM":
                n = f["len"]
                x, g = rd("x", f, n), rd("g", f, n)
                eps = f["eps_m"] * 2.0 ** f["eps_e"]
                norm = F.layer_norm if isa.ENUMS["norm"][f["kind"]] == "layer" else F.rms_norm
                # a gain shared by every token (a LOADed constant) and a folded bias fuse into the norm kernel
                if g.shape[0] == 1:
                    y = norm(x, (n,), g[0], op.bias, eps=eps) if op.bias is not None else norm(x, (n,), g[0], eps=eps)
                else:
                    y = norm(x, (n,), eps=eps) * g + (0.0 if op.bias is None else op.bias)
                abuf.write(f["dst"], y)
            elif k == "ACT":
                x = rd("x", f, f["len"])
                func = isa.ENUMS["func"][f["func"]]
                y = F.silu(x) if func == "silu" else F.gelu(x, approximate="tanh" if func == "gelu_tanh" else "none")
                abuf.write(f["dst"], y)
            elif k == "ROPE":
                h, d = f["heads"], f["head_dim"]
                x = rd("x", f, h * d).unflatten(-1, (h, d))
                c, s = rd("cos", f, d // 2)[:, None], rd("sin", f, d // 2)[:, None]
                if isa.ENUMS["rope"][f["mode"]] == "half":
                    a, b = x[..., : d // 2], x[..., d // 2:]
                    y = t.cat([a * c - b * s, b * c + a * s], dim=-1)
                else:
                    a, b = x[..., 0::2], x[..., 1::2]
                    y = t.stack([a * c - b * s, b * c + a * s], dim=-1)
                abuf.write(f["dst"], y.flatten(-2))
            elif k == "ARGMAX":
                regs[f["rd"]] = t.argmax(abuf.read(f["x"], f["len"]), dim=-1)
            elif k == "KVAPPEND":
                h, d = f["heads"], f["head_dim"]
                kc, vc = self.kv[f["kv_base"]]
                slot = regs[f["pos_reg"]] + f["pos_imm"]
                kc.index_copy_(1, slot, rd("k", f, h * d).unflatten(-1, (h, d)).transpose(0, 1))
                vc.index_copy_(1, slot, rd("v", f, h * d).unflatten(-1, (h, d)).transpose(0, 1))
            elif k == "ATTN":
                qh, kvh, d = f["q_heads"], f["kv_heads"], f["head_dim"]
                kc, vc = self.kv[f["kv_base"]]
                q = rd("q", f, qh * d).unflatten(-1, (qh, d)).transpose(0, 1)  # [qh, T, d]
                length = regs[f["len_reg"]] + f["len_imm"]
                mask = self.slots[None, :] < length[:, None]  # [T, S]
                o = F.scaled_dot_product_attention(q[None], kc[None, :kvh], vc[None, :kvh], attn_mask=mask,
                                                   scale=1.0, enable_gqa=qh != kvh)
                abuf.write(f["dst"], o[0].transpose(0, 1).flatten(-2))
            elif k == "STORE":
                dram[f["addr"]] = rd("src", f, f["len"])
            elif k == "STACC":
                dram[f["addr"]] = acc.read(f["acc"], f["len"])
            else:
                raise ValueError(f"the gpu backend has no lowering for {k}")
        return regs, dram


class GpuBackend:
    """A compiled program as PyTorch operations (``--backend gpu``).

    Parameters
    ----------
    program : Bundle
        The compiled decoder (``.kvo``).
    device : str
        ``auto`` (CUDA when torch sees one, else the CPU), ``cuda`` or ``cpu``.
    dtype : str
        Weights and activations: ``float32`` (default) or ``float16`` / ``bfloat16``.
    cuda_graph : bool
        Capture one decode step as a CUDA graph (CUDA only).
    compile : bool
        Run the decode step through ``torch.compile`` first, which fuses the elementwise operations between
        matmuls (the graph then replays the fused kernels).
    """

    name = "gpu"

    def __init__(self, program, *, device: str = "auto", dtype: str = "float32", cuda_graph: bool = True,
                 compile: bool = False, offload_device: str | None = None, **_):
        from .offload import resolve_device

        torch = _torch()
        self.t = torch
        self.program = program
        if device in ("auto", None) and offload_device not in (None, "none"):
            device = offload_device  # the session's --offload-device names where the whole model runs
        dev = resolve_device("auto" if device in ("auto", None) else device)
        if dev == "none":
            raise ValueError("--backend gpu needs a device: cuda or cpu")
        self.device = torch.device(dev)
        if dtype not in ("float32", "float16", "bfloat16"):
            raise ValueError(f"dtype {dtype!r}: expected float32, float16 or bfloat16")
        self.dtype = getattr(torch, dtype)
        m = program.manifest
        self.regs_map = m["registers"]
        self.max_seq = int(m["max_seq"])
        if "tiles" in m["logits"]:  # the lowering below reads one logits record and has no ARGMAXACC
            raise ValueError("--backend gpu does not run an LM head tiled over the accumulator buffer (ARGMAXACC); "
                             "compile for a config whose accumulator buffer holds the vocabulary")
        self.logits_addr, self.vocab = m["logits"]["addr"], m["logits"]["len"]
        t0 = time.perf_counter()
        ops = lower(program, torch, self.device, self.dtype)
        self.lower_s = time.perf_counter() - t0
        self.n_instructions = len(program.instructions)
        self.machine = _Machine(torch, ops, self.device, self.dtype, self.max_seq)
        dev_i = {"device": self.device, "dtype": torch.int64}
        self.feed = torch.zeros(self.max_seq, **dev_i)
        self.feed_end = torch.zeros(1, **dev_i)
        self.pos = torch.zeros(1, **dev_i)
        self.last_next = torch.zeros(1, **dev_i)
        self.next_hist = torch.zeros(self.max_seq, **dev_i)
        self.logits_hist = torch.zeros(self.max_seq, self.vocab, dtype=torch.float32, device=self.device)
        self.graph = None
        self.use_graph = cuda_graph and self.device.type == "cuda"
        self.last_position = None  # the last step run, for read_vector / read_register
        self._body = torch.compile(self._step_body, dynamic=False) if compile else self._step_body

    # ------------------------------------------------------------ one step, all on the device
    def _regs(self, token, position):
        regs = {self.regs_map["token"]: token, self.regs_map["position"]: position}
        if "kv_slot" in self.regs_map:  # the whole KV cache is on the device: the slot is the position
            regs[self.regs_map["kv_slot"]], regs[self.regs_map["kv_len"]] = position, position + 1
        return regs

    def _step_body(self):
        t = self.t
        tok = t.where(self.pos < self.feed_end, self.feed.index_select(0, self.pos), self.last_next)
        regs, dram = self.machine.forward(self._regs(tok, self.pos))
        nxt = regs[self.regs_map["next_token"]]
        self.logits_hist.index_copy_(0, self.pos, dram[self.logits_addr].float())
        self.next_hist.index_copy_(0, self.pos, nxt)
        self.last_next.copy_(nxt)
        self.pos.add_(1)

    def _capture(self):
        t = self.t
        saved = [x.clone() for x in (self.pos, self.last_next, self.logits_hist, self.next_hist)]
        kv = {k: (a.clone(), b.clone()) for k, (a, b) in self.machine.kv.items()}
        stream = t.cuda.Stream()
        stream.wait_stream(t.cuda.current_stream())
        with t.cuda.stream(stream):
            for _ in range(2):  # warm up (cuBLAS handles, SDPA kernel choice) outside the graph
                self.pos.zero_()
                self._body()
        t.cuda.current_stream().wait_stream(stream)
        self.graph = t.cuda.CUDAGraph()
        self.pos.zero_()
        with t.cuda.graph(self.graph):
            self._body()
        for x, y in zip((self.pos, self.last_next, self.logits_hist, self.next_hist), saved, strict=True):
            x.copy_(y)
        for k, (a, b) in kv.items():
            self.machine.kv[k][0].copy_(a)
            self.machine.kv[k][1].copy_(b)

    def _advance(self, n: int):
        if self.use_graph and self.graph is None:
            self._capture()
        for _ in range(n):
            if self.graph is not None:
                self.graph.replay()
            else:
                self._body()

    def run_steps(self, feed, generate: int, position: int, registers: dict | None = None) -> list:
        """Feed *feed* from *position* on, then *generate* greedy steps; one host synchronization in all."""
        self._no_registers(registers)
        feed = [int(x) for x in feed]
        n = len(feed) + generate
        if position + n > self.max_seq:
            raise ValueError(f"{position + n} positions exceed max_seq={self.max_seq}")
        t = self.t
        t0 = time.perf_counter()
        if feed:
            self.feed[position: position + len(feed)] = t.as_tensor(feed, dtype=t.int64).to(self.device)
        self.feed_end.fill_(position + len(feed))
        self.pos.fill_(position)
        if position and not feed:
            self.last_next.fill_(int(self.next_hist[position - 1]))
        self._advance(n)
        self.last_position = position + n - 1
        nxt = self.next_hist[position: position + n].cpu().numpy()
        logits = self.logits_hist[position: position + n].double().cpu().numpy()
        wall = (time.perf_counter() - t0) / max(n, 1)
        return [Step(int(nxt[i]), logits[i], GpuCounters(instructions=self.n_instructions, wall_s=wall,
                                                     placement=self._placement(position + i))) for i in range(n)]

    def _placement(self, position):
        """The whole step runs here: no KV on the overlay, every op off it."""
        return {"kv_on_chip_tokens": 0, "kv_offloaded_tokens": position + 1,
                "layers_offloaded": kv_layers(self.program, self.machine.kv),
                "heads_offloaded": sum(k.shape[0] for k, _ in self.machine.kv.values()),
                "ops_off_overlay": ["all"], "device": self.device.type}

    def step(self, token: int, position: int, registers: dict | None = None) -> Step:
        return self.run_steps([token], 0, position, registers)[0]

    def reset(self) -> None:
        # positions at or beyond the next write are masked out of attention, so stale KV needs no clearing
        self.pos.zero_()
        self.feed_end.zero_()
        self.last_position = None

    @staticmethod
    def _no_registers(registers):
        if registers:
            raise SessionError(f"the gpu backend sets only the token and position registers, not {sorted(registers)}: "
                               "its lowering has no general register file")

    # ------------------------------------------------------------ the contract's memory and register access
    # The lowering keeps only the logits and the next token of each step; other records and registers live in
    # tensors that are not addressable as external memory.
    def read_vector(self, addr: int, length: int) -> tuple:
        if addr != self.logits_addr or length != self.vocab or self.last_position is None:
            raise SessionError(f"the gpu backend reads back only the last step's logits (address {self.logits_addr}, "
                               f"{self.vocab} elements), not {length} elements at {addr}")
        return nx.from_float(self.logits_hist[self.last_position].double().cpu().numpy())

    def write_vector(self, addr: int, mantissas, exponent: int) -> None:
        raise NotImplementedError("the gpu backend cannot write external memory: the program's records are lowered "
                                  "to tensors, not kept as a memory image")

    def read_register(self, index: int) -> int:
        if index != self.regs_map["next_token"] or self.last_position is None:
            raise SessionError(f"the gpu backend reads back only the next-token register "
                               f"R{self.regs_map['next_token']} after a step, not R{index}")
        return int(self.next_hist[self.last_position])

    # ------------------------------------------------------------ batched prefill (phase split)
    def prefill(self, tokens):
        """Run the whole prompt as one batched pass (T = len(tokens)) from position 0.

        Returns ``(next_token, logits, kv)``: the last position's greedy token and logits (float64) and the KV cache
        per KVAPPEND's KV-pool base (a layer's, or a part's of a split attention: compiler.split_attention; as the
        hybrid backend keys it) as float64 arrays ``(k, v)`` of shape [heads, len(tokens), head_dim].
        """
        t = self.t
        n = len(tokens)
        if not 1 <= n <= self.max_seq:
            raise ValueError(f"a prompt of {n} tokens: the program holds 1 to {self.max_seq}")
        tok = t.as_tensor([int(x) for x in tokens], dtype=t.int64).to(self.device)
        pos = t.arange(n, device=self.device)
        with t.inference_mode():
            regs, dram = self.machine.forward(self._regs(tok, pos))
        nxt = regs[self.regs_map["next_token"]]
        logits = dram[self.logits_addr].float()
        self.logits_hist[:n] = logits
        self.next_hist[:n] = nxt
        self.last_next.copy_(nxt[-1:])
        self.pos.fill_(n)
        self.last_position = n - 1
        kv = {layer: (k[:, :n].double().cpu().numpy(), v[:, :n].double().cpu().numpy())
              for layer, (k, v) in self.machine.kv.items()}
        return int(nxt[-1]), logits[-1].double().cpu().numpy(), kv
