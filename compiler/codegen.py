"""From an :class:`~.fuse.OverlayGraph` to instructions and a memory image.

Four passes, each small:

* :func:`quantize` turns matrices, tables and constant vectors into their
  external-memory records (numerics' row records and vector records);
* :func:`plan_memory` lays out the image and allocates the activation buffer,
  exponent registers and the accumulator buffer by liveness;
* :func:`emit` writes one decode step as instructions, each in its queue;
* :func:`insert_tokens` adds the dependency tokens that order every
  cross-queue hazard, found with the golden model's own access table, so the
  decoupled queues overlap wherever nothing orders them.

Registers: R0 holds the token, R1 its position (the KV length before it);
ARGMAX leaves the greedy next token in R2. Logits are stored as a vector record.
A program compiled for more positions than the KV buffer holds takes the KV slot
from R3 and the attended KV length from R4, which the host sets (hybrid attention).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
from kvoverlay.sim.golden import accesses

from kvoverlay import isa
from kvoverlay import numerics as nx
from kvoverlay.config import WEIGHT_FORMATS, OverlayConfig

from .frontend import CompileError
from .fuse import OverlayGraph

__all__ = ["REG_KV_LEN", "REG_KV_SLOT", "REG_NEXT", "REG_POSITION", "REG_TOKEN", "Program", "generate"]

REG_TOKEN, REG_POSITION, REG_NEXT = 0, 1, 2
#: With --max-seq above the KV capacity: the KV buffer slot KVAPPEND writes and the KV length ATTN reads.
REG_KV_SLOT, REG_KV_LEN = 3, 4
_INDEX_REG = {"token": REG_TOKEN, "position": REG_POSITION}
_WEIGHT_METHODS = ("rtn", "mse")
#: Weights quantized per block of rows: bounds the compiler's float64 temporaries to a few tens of MB.
_BLOCK_WEIGHTS = 1 << 20


@dataclass
class Program:
    """One decode step: instructions, memory image and what the host needs to drive it."""

    instructions: list
    image: bytes
    meta: dict = field(default_factory=dict)


@dataclass
class _Matrix:
    addr: int
    rows: int
    cols: int
    fmt: str
    group: int
    sexp: int


def _group_for(cols: int, want: int) -> int:
    """The largest group of at most *want* weights, a power-of-two multiple of isa.GROUP_BASE, dividing *cols*."""
    g = want
    while g >= isa.GROUP_BASE:
        if cols % g == 0 and g & (g - 1) == 0:
            return g
        g //= 2
    raise CompileError(f"a row of {cols} weights does not split into groups of {isa.GROUP_BASE} or more")


class _Image:
    def __init__(self, align: int):
        self.data = bytearray()
        self.align = align
        self.regions = []

    def place(self, blob: bytes) -> int:
        addr = len(self.data)
        self.data += blob
        self.pad()
        return addr

    def pad(self):
        self.data += bytes(-len(self.data) % self.align)

    def region(self, name, start):
        self.regions.append([name, start, len(self.data)])


def quantize(og: OverlayGraph, cfg: OverlayConfig, weights: str, group_size: int, method: str, image: _Image,
             samples=None):
    """Place every matrix, table and constant of *og* into *image*; returns their descriptors."""
    if weights not in cfg.weight_formats:
        raise CompileError(f"--weights {weights}: this overlay ({cfg.name}) is built with {', '.join(cfg.weight_formats)}")
    if method not in _WEIGHT_METHODS:
        raise CompileError(f"unknown quantization method {method!r}; methods: {', '.join(_WEIGHT_METHODS)}")
    table_fmt = weights if WEIGHT_FORMATS[weights] >= 8 else "int8"
    placed = {}

    samples = samples or {}

    def matrix(w, fmt, m, x=None):
        rows, cols = w.shape
        group = _group_for(cols, group_size)
        step = max(1, _BLOCK_WEIGHTS // cols)
        peak = max(float(np.max(np.abs(w[r:r + step]))) for r in range(0, rows, step))
        sexp = nx.scale_exponent(peak, fmt)
        addr = len(image.data)
        for r in range(0, rows, step):
            q, sm, _ = nx.quantize_matrix(np.ascontiguousarray(w[r:r + step], np.float64), fmt, group,
                                          method=m if fmt == "int4" else "rtn", samples=x, sexp=sexp)
            image.data += nx.pack_rows(q, sm, fmt, group, cfg.port_bytes)
        image.pad()
        return _Matrix(addr, rows, cols, fmt, group, sexp)

    start = len(image.data)
    for name, w in og.matrices.items():
        placed[name] = matrix(w, weights, method, samples.get(name))
    image.region("weights", start)
    start = len(image.data)
    for name, (kind, t) in og.tables.items():
        placed[name] = matrix(t, "w16" if kind == "position" else table_fmt, "rtn")
    image.region("tables", start)
    start = len(image.data)
    for name, c in og.consts.items():
        m, e = nx.from_float(c)
        placed[name] = image.place(nx.pack_vector_record(m, e))
    image.region("constants", start)
    return placed, table_fmt


class _Allocator:
    """First-fit allocation of word ranges, aligned, with frees."""

    def __init__(self, size: int, align: int, what: str):
        self.size, self.align, self.what = size, align, what
        self.free = [(0, size)]
        self.peak = 0

    def alloc(self, n: int, who: str) -> int:
        n = -(-max(n, 1) // self.align) * self.align
        for i, (lo, hi) in enumerate(self.free):
            if hi - lo >= n:
                self.free[i] = (lo + n, hi)
                if self.free[i][0] == hi:
                    del self.free[i]
                self.peak = max(self.peak, lo + n)
                return lo
        raise CompileError(f"{who}: the {self.what} of {self.size} words cannot hold another {n} words "
                           f"(config too small for this model)")

    def release(self, lo: int, n: int):
        n = -(-max(n, 1) // self.align) * self.align
        self.free.append((lo, lo + n))
        self.free.sort()
        merged = []
        for a, b in self.free:
            if merged and merged[-1][1] == a:
                merged[-1] = (merged[-1][0], b)
            else:
                merged.append((a, b))
        self.free = merged


class _Regs:
    def __init__(self, n, reserved=()):
        self.free = [r for r in range(n) if r not in reserved]

    def alloc(self, who):
        if not self.free:
            raise CompileError(f"{who}: more than {isa.NUM_EREGS} vectors live at once (exponent registers exhausted)")
        return self.free.pop(0)

    def release(self, r):
        # least recently used first: a register freed long ago is least likely to order two queues falsely
        self.free.append(r)


def _scale_imm(factor: float, who: str):
    m, e = nx.from_float(np.array([factor]))
    f = isa.BY_NAME["VSCALE"].fields
    lo_e = next(x for x in f if x.name == "imm_e")
    if not lo_e.lo <= e <= lo_e.hi:
        raise CompileError(f"{who}: scale {factor!r} is outside what VSCALE encodes")
    return int(m[0]), int(e)


def _eps_imm(eps: float):
    e = math.frexp(eps)[1] - 16
    return round(eps * 2.0 ** -e), e


def generate(og: OverlayGraph, cfg: OverlayConfig, *, weights: str = "w16", group_size: int | None = None,
             method: str = "mse", max_seq: int, samples=None) -> Program:
    """Quantize, plan memory and emit one decode step of *og* for *cfg*.

    *samples* maps a matrix name to calibration inputs [n, cols] for the int4 scale search (see
    :func:`kvoverlay.numerics.quantize_matrix`)."""
    group_size = group_size or cfg.group_size
    if group_size < isa.GROUP_BASE or group_size & (group_size - 1) or group_size > isa.GROUP_BASE << 7:
        raise CompileError(f"--group-size {group_size}: must be a power of two in [{isa.GROUP_BASE}, {isa.GROUP_BASE << 7}]")
    # A layer whose KV the buffer cannot hold (too many layers, heads or too wide a head) still gets its KVAPPEND and
    # ATTN: the host runs them on the offload device (host/offload.py), as it does with tokens beyond kv_capacity.
    # Beyond the KV capacity the host offloads KV (hybrid attention): it then picks each token's buffer slot and
    # the resident length, so KVAPPEND and ATTN take them from registers of their own instead of the position.
    offload = max_seq > cfg.kv_capacity
    kv_slot, kv_len, len_imm = (REG_KV_SLOT, REG_KV_LEN, 0) if offload else (REG_POSITION, REG_POSITION, 1)
    image = _Image(max(isa.DRAM_UNIT, cfg.port_bytes))
    placed, table_fmt = quantize(og, cfg, weights, group_size, method, image, samples)
    io_start = len(image.data)
    io = {"inputs": {}, "outputs": {}}
    for kind, table in (("inputs", og.inputs), ("outputs", og.outputs)):
        for name, (vec, shape) in table.items():
            n = og.lengths[vec]
            io[kind][name] = {"addr": image.place(bytes(nx.vector_record_size(n))), "len": n, "shape": shape}
    image.region("io", io_start)
    if len(image.data) > cfg.dram_bytes:
        raise CompileError(f"the program image needs {len(image.data)} bytes; {cfg.name} has dram_bytes={cfg.dram_bytes}")

    # ---- liveness over the op list
    last_use = {}
    for i, op in enumerate(og.ops):
        for v in op.ins:
            last_use[v] = i
    for vec, _ in og.outputs.values():
        last_use[vec] = len(og.ops)
    stats_words = 2 * max([op.attrs["q_heads"] for op in og.ops if op.kind == "attn"] or [1])
    acc_rows = cfg.acc_buffer_words - stats_words
    abuf = _Allocator(cfg.act_buffer_words, cfg.abuf_lanes, "activation buffer")
    eregs = _Regs(isa.NUM_EREGS)
    where: dict = {}  # vector -> (abuf address, ereg)
    code: list = []

    def ins(op, deps=(), **fields):
        code.append(isa.Instr(op, fields, frozenset(deps)))

    def new_vec(name, who):
        n = og.lengths[name]
        where[name] = (abuf.alloc(n, who), eregs.alloc(who))
        return where[name]

    def drop(name):
        addr, e = where.pop(name)
        abuf.release(addr, og.lengths[name])
        eregs.release(e)

    def load_const(cname, n, who):
        tmp = f"const:{cname}:{len(code)}"
        og.lengths[tmp] = n
        addr, e = new_vec(tmp, who)
        ins("LOAD", addr=placed[cname], len=n, dst=addr, dst_e=e)
        return tmp

    def gather(table, who, dst):
        m = placed[table]
        kind = og.tables[table][0]
        ins("LDROW", addr=m.addr, row_reg=_INDEX_REG[kind], row_imm=0, cols=m.cols, fmt=isa.ENUMS["fmt"].index(m.fmt),
            lg_group=int(math.log2(m.group // isa.GROUP_BASE)), sexp=m.sexp, dst=dst[0], dst_e=dst[1])

    stats_addr = acc_rows
    for i, op in enumerate(og.ops):
        who = f"op {op.out} ({op.kind} from {op.source})"
        src = [where[v] for v in op.ins]
        temps = []
        if op.kind == "input":
            dst = new_vec(op.out, who)
            ins("LOAD", addr=io["inputs"][op.attrs["name"]]["addr"], len=og.lengths[op.out], dst=dst[0], dst_e=dst[1])
        elif op.kind == "table":
            dst = new_vec(op.out, who)
            gather(op.attrs["table"], who, dst)
        elif op.kind == "linear":
            m = placed[op.attrs["matrix"]]
            if m.rows > acc_rows:
                raise CompileError(f"{who}: {m.rows} output rows exceed the accumulator buffer "
                                   f"({acc_rows} words free on {cfg.name})")
            acc_e = eregs.alloc(who)
            ins("GEMV", addr=m.addr, rows=m.rows, cols=m.cols, fmt=isa.ENUMS["fmt"].index(m.fmt),
                lg_group=int(math.log2(m.group // isa.GROUP_BASE)), sexp=m.sexp, x=src[0][0], x_e=src[0][1],
                acc=0, acc_e=acc_e, accumulate=0)
            dst = new_vec(op.out, who)
            ins("REQ", acc=0, acc_e=acc_e, len=m.rows, dst=dst[0], dst_e=dst[1])
            eregs.release(acc_e)
        elif op.kind in ("norm",):
            n = og.lengths[op.out]
            g = load_const(op.attrs["gain"], n, who)
            temps.append(g)
            eps_m, eps_e = _eps_imm(op.attrs["eps"])
            dst = new_vec(op.out, who)
            ins("NORM", x=src[0][0], x_e=src[0][1], g=where[g][0], g_e=where[g][1], dst=dst[0], dst_e=dst[1], len=n,
                eps_m=eps_m, eps_e=eps_e, kind=isa.ENUMS["norm"].index(op.attrs["kind"]))
        elif op.kind == "act":
            dst = new_vec(op.out, who)
            ins("ACT", x=src[0][0], x_e=src[0][1], dst=dst[0], dst_e=dst[1], len=og.lengths[op.out],
                func=isa.ENUMS["func"].index(op.attrs["func"]))
        elif op.kind in ("add", "mul", "addc", "mulc"):
            b = src[1] if len(src) > 1 else None
            if b is None:
                c = load_const(op.attrs["const"], og.lengths[op.out], who)
                temps.append(c)
                b = where[c]
            dst = new_vec(op.out, who)
            ins("VADD" if op.kind in ("add", "addc") else "VMUL", a=src[0][0], a_e=src[0][1], b=b[0], b_e=b[1],
                dst=dst[0], dst_e=dst[1], len=og.lengths[op.out])
        elif op.kind == "scale":
            imm_m, imm_e = _scale_imm(op.attrs["factor"], who)
            dst = new_vec(op.out, who)
            ins("VSCALE", a=src[0][0], a_e=src[0][1], dst=dst[0], dst_e=dst[1], len=og.lengths[op.out],
                imm_m=imm_m, imm_e=imm_e)
        elif op.kind == "rope":
            dst = new_vec(op.out, who)
            ins("ROPE", x=src[0][0], x_e=src[0][1], cos=src[1][0], cos_e=src[1][1], sin=src[2][0], sin_e=src[2][1],
                dst=dst[0], dst_e=dst[1], heads=op.attrs["heads"], head_dim=op.attrs["head_dim"],
                mode=isa.ENUMS["rope"].index(op.attrs["mode"]))
        elif op.kind == "attn":
            a = op.attrs
            n = a["q_heads"] * a["head_dim"]
            qs = f"qscaled:{op.out}"
            og.lengths[qs] = n
            temps.append(qs)
            q = new_vec(qs, who)
            imm_m, imm_e = _scale_imm(a["scale"], who)
            ins("VSCALE", a=src[0][0], a_e=src[0][1], dst=q[0], dst_e=q[1], len=n, imm_m=imm_m, imm_e=imm_e)
            ins("KVAPPEND", k=src[1][0], k_e=src[1][1], v=src[2][0], v_e=src[2][1], layer=a["layer"],
                heads=a["kv_heads"], head_dim=a["head_dim"], pos_reg=kv_slot, pos_imm=0)
            dst = new_vec(op.out, who)
            ins("ATTN", q=q[0], q_e=q[1], dst=dst[0], dst_e=dst[1], layer=a["layer"], q_heads=a["q_heads"],
                kv_heads=a["kv_heads"], head_dim=a["head_dim"], len_reg=kv_len, len_imm=len_imm, stats=stats_addr)
        else:
            raise CompileError(f"{who}: no code generator for overlay op {op.kind!r}")
        for t in temps:
            drop(t)
        for v in dict.fromkeys(op.ins):
            if last_use.get(v) == i:
                drop(v)
    if og.logits:
        ins("ARGMAX", x=where[og.logits][0], len=og.lengths[og.logits], rd=REG_NEXT)
    for name, (vec, _) in og.outputs.items():
        ins("STORE", src=where[vec][0], src_e=where[vec][1], len=og.lengths[vec], addr=io["outputs"][name]["addr"])
    ins("END")
    insert_tokens(code)
    meta = {
        "registers": {"token": REG_TOKEN, "position": REG_POSITION, "next_token": REG_NEXT,
                      **({"kv_slot": REG_KV_SLOT, "kv_len": REG_KV_LEN} if offload else {})},
        "io": io,
        "regions": image.regions,
        "abuf_peak_words": abuf.peak,
        "weights": {"format": weights, "group_size": group_size, "method": method if weights == "int4" else "rtn",
                    "table_format": table_fmt},
        "weight_bytes": image.regions[0][2] - image.regions[0][1],
    }
    if og.logits:
        meta["logits"] = {"addr": io["outputs"]["logits"]["addr"], "len": io["outputs"]["logits"]["len"]}
    return Program(code, image.data, meta)


def insert_tokens(code: list) -> None:
    """Add the fewest dependency tokens that order every cross-queue hazard of *code*, in place.

    An instruction that touches on-chip state another queue used earlier (read after write, write after
    read or write) must start after that use ends. Each queue keeps a vector clock of the latest instruction
    of every other queue it is already ordered after, directly or through the third queue; only a hazard the
    clock does not cover costs a token, pushed by the conflicting instruction and popped by this one. Pushes
    of one queue to another are added in program order, so the token FIFOs pair them with the right pops.
    Only adjacent queues exchange tokens (load <-> compute <-> store); a load/store hazard the compute queue
    does not already cover goes through a NOP in the compute queue.
    """
    order = {q: i for i, q in enumerate(isa.QUEUES)}
    out: list = []
    clocks: list = []  # per emitted instruction: its queue's clock when it issued
    history = []  # (index, queue, accesses)
    known = {q: {} for q in isa.QUEUES}  # queue -> {other queue: latest index it is ordered after}

    def wait(q, q2, idx, deps):
        """Make the instruction queue q is issuing (flags in *deps*) wait for instruction idx of adjacent queue q2."""
        pop = "pop_prev" if order[q2] < order[q] else "pop_next"
        if pop in deps:
            raise CompileError(f"internal: an instruction of the {q} queue needs two tokens from the {q2} queue")
        old = out[idx]
        out[idx] = isa.Instr(old.op, old.fields, old.deps | {"push_next" if order[q] > order[q2] else "push_prev"})
        deps.add(pop)
        for k, v in clocks[idx].items():
            known[q][k] = max(known[q].get(k, -1), v)

    def issue(ins, q, mine, deps):
        out.append(isa.Instr(ins.op, ins.fields, frozenset(deps)))
        clocks.append({**known[q], q: len(out) - 1})
        history.append((len(out) - 1, q, mine))

    for ins in code:
        if ins.op == "END":
            out.append(ins)
            clocks.append({})
            continue
        q = ins.queue
        mine = accesses(ins)
        need = {}
        for idx, q2, acc2 in history:
            if q2 == q or known[q].get(q2, -1) >= idx:
                continue
            for s1, lo1, hi1, w1 in mine:
                if any(s1 == s2 and lo1 < hi2 and lo2 < hi1 and (w1 or w2) for s2, lo2, hi2, w2 in acc2):
                    need[q2] = max(need.get(q2, -1), idx)
                    break
        deps = set(ins.deps)
        # the far queue first: waiting for the relay also covers a hazard with the compute queue itself
        for q2, idx in sorted(need.items(), key=lambda kv: -abs(order[kv[0]] - order[q])):
            if known[q].get(q2, -1) >= idx:
                continue
            if abs(order[q2] - order[q]) == 1:
                wait(q, q2, idx, deps)
                continue
            mid = "compute"
            if known[mid].get(q2, -1) < idx:
                relay_deps = set()
                wait(mid, q2, idx, relay_deps)
                issue(isa.Instr("NOP", {"queue": isa.QUEUES.index(mid)}), mid, [], relay_deps)
            wait(q, mid, max(i for i, qq, _ in history if qq == mid), deps)
        issue(ins, q, mine, deps)
    code[:] = out
