"""From a quantized :class:`~.overlay_graph.OverlayGraph` to instructions: the ``plan_memory``, ``emit``
and ``insert_tokens`` passes.

* :func:`check_fits` (run before quantization) checks the group size fits the overlay config (KV that does
  not fit the buffer is the host's to offload);
* :func:`plan_memory` lays out the I/O vector records in the image, checks it fits DRAM, and computes
  each vector's last use and the accumulator budget: the :class:`Codegen` state;
* :func:`emit` writes one decode step, each op through its own ``VOp.emit``, allocating the activation
  buffer and exponent registers in op order and freeing each vector after its last use;
* :func:`insert_tokens` adds the dependency tokens that order every cross-queue hazard, found with the
  golden model's own access table, so the decoupled queues overlap wherever nothing orders them.

Registers: R0 holds the token, R1 its position (the KV length before it);
ARGMAX leaves the greedy next token in R2. Logits are stored as a vector record; an LM head taller than the
accumulator buffer is tiled (a GEMV, a REQ, an ARGMAXACC chained over the tiles, and a STORE of the tile's record
each), so its argmax spans the tiles on chip and its logits leave as one record per tile.
A program compiled for more positions than the KV buffer holds takes the KV slot
from R3 and the attended KV length from R4, which the host sets (hybrid attention).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np

from kvoverlay import isa
from kvoverlay import numerics as nx
from kvoverlay.access import accesses
from kvoverlay.config import KV_BASE_BITS, OverlayConfig
from kvoverlay.timing import folds_peak, peak_record

from .frontend import CompileError
from .overlay_graph import OverlayGraph

if TYPE_CHECKING:  # quantize's calibration runs the fused kinds, whose code generation imports this module
    from .quantize import Image

__all__ = ["INDEX_REGISTERS", "REG_KV_LEN", "REG_KV_SLOT", "REG_NEXT", "REG_POSITION", "REG_TOKEN", "Codegen",
           "check_fits", "emit", "fold_peaks", "insert_tokens", "kv_layout", "kv_registers", "plan_memory", "scale_imm"]

REG_TOKEN, REG_POSITION, REG_NEXT = 0, 1, 2
#: With --max-seq above the KV capacity: the KV buffer slot KVAPPEND writes and the KV length ATTN reads.
REG_KV_SLOT, REG_KV_LEN = 3, 4
#: The register LDROW indexes a table of each index kind by.
INDEX_REGISTERS = {"token": REG_TOKEN, "position": REG_POSITION}


class Allocator:
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


class Registers:
    """Exponent registers, handed out least recently freed first."""

    def __init__(self, n, reserved=()):
        self.free = [r for r in range(n) if r not in reserved]

    def alloc(self, who):
        if not self.free:
            raise CompileError(f"{who}: more than {isa.NUM_EREGS} vectors live at once (exponent registers exhausted)")
        return self.free.pop(0)

    def release(self, r):
        # least recently used first: a register freed long ago is least likely to order two queues falsely
        self.free.append(r)


def scale_imm(factor: float, who: str) -> tuple[int, int]:
    """VSCALE's (imm_m, imm_e) for *factor*; a CompileError naming *who* if it does not encode."""
    m, e = nx.from_float(np.array([factor]))
    f = isa.BY_NAME["VSCALE"].fields
    lo_e = next(x for x in f if x.name == "imm_e")
    if not lo_e.lo <= e <= lo_e.hi:
        raise CompileError(f"{who}: scale {factor!r} is outside what VSCALE encodes")
    return int(m[0]), int(e)


class Codegen:
    """The state emission works on: the plan (image records, I/O records, liveness, accumulator budget),
    the activation-buffer and exponent-register allocators, and the code written so far."""

    def __init__(self, og: OverlayGraph, cfg: OverlayConfig, records: dict, io: dict, last_use: dict, acc_rows: int,
                 max_seq: int):
        self.og, self.cfg, self.records, self.io, self.last_use = og, cfg, records, io, last_use
        #: (KVAPPEND's slot register, ATTN's length register, ATTN's length immediate): see :func:`kv_registers`
        self.kv_slot_reg, self.kv_len_reg, self.kv_len_imm = ((REG_KV_SLOT, REG_KV_LEN, 0) if kv_registers(cfg, max_seq)
                                                               else (REG_POSITION, REG_POSITION, 1))
        #: Whether ATTN writes its softmax statistics: only a hybrid program's (:func:`kv_registers`) host merges
        #: them; elsewhere ATTN skips them (``isa.ATTN_NO_STATS``), holds no accumulator port and runs beside the GEMVs.
        self.attn_stats = kv_registers(cfg, max_seq)
        #: GEMV output rows the accumulator buffer holds; attention's softmax statistics live above them.
        self.acc_rows = self.stats_addr = acc_rows
        self.lengths = dict(og.lengths)  # plus this step's scratch vectors
        self.abuf = Allocator(cfg.act_buffer_words, cfg.abuf_lanes, "activation buffer")
        #: accumulator rows of the GEMVs whose REQ is still to come, and the placeholder vectors naming them
        #: (``(acc, acc_e)`` in :attr:`where`, their rows here): a Linear with ``defer`` and its Requant
        self.acc = Allocator(acc_rows, 1, "accumulator buffer")
        self.pending: dict = {}
        self.eregs = Registers(isa.NUM_EREGS)
        self.where: dict = {}  # live vector -> (abuf address, ereg)
        self.code: list = []
        self.who = ""  # the op being emitted, for error messages
        self.scratch_vectors: list = []  # the current op's temporaries, freed once it is emitted
        self.kv_bases = kv_layout(og, cfg)  # layer -> first KV-pool column
        #: a tiled LM head's (first row, rows, logits record address) per tile (:func:`_head_tiles`)
        self.head_tiles: list = []

    def instr(self, op: str, **fields) -> None:
        ins = isa.Instr(op, fields, frozenset())
        if op == "GEMV" and not self.cfg.builds_group(group := isa.weight_layout(ins)[1]):
            # a matrix whose columns split only into narrower groups (or imported with such blocks)
            raise CompileError(f"{self.who}: groups of {group} weights, below min_group={self.cfg.min_group} of "
                               f"{self.cfg.name}'s GEMV engine")
        if op == "ATTN" and not self.cfg.runs_attn(fields["q_heads"]):
            raise CompileError(f"{self.who}: {fields['q_heads']} query heads in one ATTN, above max_q_heads="
                               f"{self.cfg.max_q_heads} of {self.cfg.name}'s attention engine")
        self.code.append(ins)

    def vector(self, name: str, n: int | None = None) -> tuple[int, int]:
        """Allocate vector *name* (of *n* elements, or its length in the graph): its (abuf address, ereg)."""
        if n is not None:
            self.lengths[name] = n
        self.where[name] = (self.abuf.alloc(self.lengths[name], self.who), self.eregs.alloc(self.who))
        return self.where[name]

    def scratch(self, name: str, n: int) -> tuple[int, int]:
        """A vector the current op alone uses."""
        self.scratch_vectors.append(name)
        return self.vector(name, n)

    def load_const(self, cname: str, n: int) -> tuple[int, int]:
        """A scratch copy of constant vector *cname* (n elements), loaded from the image."""
        dst = self.scratch(f"const:{cname}:{len(self.code)}", n)
        self.instr("LOAD", addr=self.records[cname], len=n, dst=dst[0], dst_e=dst[1])
        return dst

    def pend(self, name: str, acc: int, acc_e: int, rows: int) -> None:
        """Name the accumulators [acc, acc + rows) of exponent register *acc_e*, written by a GEMV whose REQ comes
        later, as *name* until its last use."""
        self.where[name], self.pending[name] = (acc, acc_e), rows

    def drop(self, name: str) -> None:
        addr, e = self.where.pop(name)
        if name in self.pending:
            self.acc.release(addr, self.pending.pop(name))
        else:
            self.abuf.release(addr, self.lengths[name])
        self.eregs.release(e)


def kv_registers(cfg: OverlayConfig, max_seq: int | None) -> bool:
    """Whether a program for *max_seq* positions takes its KV slot and length from R3/R4.

    Beyond the KV capacity the host offloads KV (hybrid attention, host/offload.py): it then picks each token's
    buffer slot and the resident length, so KVAPPEND and ATTN cannot derive them from the position.
    """
    return max_seq is not None and max_seq > cfg.kv_capacity


def check_fits(og: OverlayGraph, cfg: OverlayConfig, group_size: int) -> None:
    """Raise CompileError unless the group size fits *cfg*.

    KV that does not fit is no error: a layer the buffer cannot hold (too many layers, heads or too wide a head)
    keeps its KVAPPEND and ATTN, which the host runs on the offload device, and tokens beyond ``kv_capacity``
    take the KV registers (:func:`kv_registers`).
    """
    if group_size < isa.GROUP_BASE or group_size & (group_size - 1) or group_size > isa.GROUP_BASE << 7:
        raise CompileError(f"--group-size {group_size}: must be a power of two in [{isa.GROUP_BASE}, {isa.GROUP_BASE << 7}]")
    if not cfg.builds_group(group_size):
        raise CompileError(f"--group-size {group_size}: {cfg.name}'s GEMV engine is built for groups of at least "
                           f"min_group={cfg.min_group}")


def kv_layout(og: OverlayGraph, cfg: OverlayConfig) -> dict:
    """The KV pool carved for this model: layer -> its first column (``kv_base``), the layers' heads packed in
    layer order, each head taking ``cfg.kv_head_columns(head_dim)`` columns.

    A layer the pool cannot hold (``cfg.holds_kv`` false: too few columns left, or heads wider than the attention
    engine's) gets a base past the pool's ``cfg.kv_columns`` instead, one per such layer, so that each still names
    its layer: the host runs its KVAPPEND and ATTN on the offload device. Only a model with more of those than the
    ``kv_base`` field addresses past the pool is an error.
    """
    bases, used, off = {}, 0, cfg.kv_columns
    for layer, kv in sorted(og.kv.items()):
        if cfg.holds_kv(used, kv["kv_heads"], kv["head_dim"]):
            bases[layer] = used
            used += kv["kv_heads"] * cfg.kv_head_columns(kv["head_dim"])
        else:
            bases[layer], off = off, off + 1
    if off > 1 << KV_BASE_BITS:
        raise CompileError(f"{off - cfg.kv_columns} layers of KV beyond the {cfg.name} KV pool of {cfg.kv_columns} "
                           f"columns: more than the kv_base field addresses past it ({(1 << KV_BASE_BITS) - cfg.kv_columns})")
    return bases


def _largest_layout(og: OverlayGraph) -> str | None:
    """The node whose layout GEMVs (``place``: matrices the compiler measured, not the model's weights) take the most
    of the image, or None: the one the partition pass places on the host when the image does not fit (a softmax over
    72 rows of a small tensor is 72 row selections and placements)."""
    size: dict[str, int] = {}
    for op in og.ops:
        if op.kind == "place":
            size[op.source] = size.get(op.source, 0) + og.matrices[op.attrs["matrix"]].size
    return max(size, key=size.get, default=None)


def plan_memory(og: OverlayGraph, cfg: OverlayConfig, image: Image, max_seq: int | None = None, *,
                logits: bool = True) -> Codegen:
    """Place the I/O vector records in *image* (region io; a tiled LM head's logits a record per tile), check it
    fits DRAM, and plan liveness and the accumulator budget for :func:`emit`.

    Without *logits* the program leaves none: its LM head is tiled whatever its height and keeps only the GEMVs
    and the ARGMAXACC chain (the next token), so the tiles stream at the port rate with no REQ or STORE.
    """
    io_start = len(image.data)
    io = {"inputs": {}, "outputs": {}}
    acc_rows = cfg.acc_buffer_words - _stats_words(og)
    head_tiles = _head_tiles(og, cfg, acc_rows, image.records, every=not logits)
    for kind, table in (("inputs", og.inputs), ("outputs", og.outputs)):
        for name, (vec, shape) in table.items():
            n = og.lengths[vec]
            if head_tiles and vec == og.logits:  # the logits leave as one vector record per tile, or not at all
                head_tiles = [(r0, rows, image.place(bytes(nx.vector_record_size(rows))) if logits else None)
                              for r0, rows in head_tiles]
                io[kind][name] = {"len": n, "shape": shape, "tiles": [[addr, rows] for _, rows, addr in head_tiles
                                                                      if addr is not None]}
                if logits:
                    io[kind][name] = {"addr": head_tiles[0][2], **io[kind][name]}
                continue
            io[kind][name] = {"addr": image.place(bytes(nx.vector_record_size(n))), "len": n, "shape": shape}
    image.region("io", io_start)
    if len(image.data) > cfg.dram_bytes:
        raise CompileError(f"the program image needs {len(image.data)} bytes; {cfg.name} has dram_bytes={cfg.dram_bytes}",
                           node=_largest_layout(og))
    last_use = {}
    for i, op in enumerate(og.ops):
        for v in op.ins:
            last_use[v] = i
    for vec, _ in og.outputs.values():
        last_use[vec] = len(og.ops)
    cg = Codegen(og, cfg, image.records, io, last_use, acc_rows, max_seq)
    cg.head_tiles = head_tiles
    return cg


def _stats_words(og: OverlayGraph) -> int:
    return max([2, *(op.stats_words for op in og.ops)])  # one head's worth even without attention


def _head_tiles(og: OverlayGraph, cfg: OverlayConfig, acc_rows: int, records: dict, every: bool = False) -> list:
    """``(first row, rows)`` of each tile of an LM head too tall for the accumulator buffer (with *every*, of any
    head), or [] for a head that fits (the one GEMV, REQ and ARGMAX of any other product) or a graph without one.

    A head is the GEMV that gives the logits, read by nothing else. Its tiles are GEMVs of the same input and
    matrix (one ``sexp``), so their accumulators share one exponent and ARGMAXACC chains over them exactly. Tiles
    alternate between the two halves of the buffer's ``acc_rows``, so that the store queue's ARGMAXACC of one tile
    runs beside the GEMV of the next; they are as even as that allows, each starting on a row whose record address
    GEMV encodes (a multiple of ``isa.DRAM_UNIT``).
    """
    head = next((op for op in og.ops if op.out == og.logits), None) if og.logits else None
    if head is None or head.kind != "linear" or any(og.logits in op.ins for op in og.ops):
        if every and og.logits:
            raise CompileError(f"--no-logits: the logits come from {head.kind if head else 'no'} op {og.logits} "
                               "(a GEMV of the last hidden state alone, read by nothing else, can skip them)")
        return []
    rows = og.lengths[og.logits]
    if rows <= acc_rows and not every:
        return []
    m = records[head.attrs["matrix"]]
    align = m.row_align(cfg.port_bytes)
    most = acc_rows // 2 // align * align
    n = -(-rows // most)
    even = -(-rows // n)
    size = -(-even // align) * align  # at most `most`: n tiles of `most` rows hold them all
    return [(r0, min(size, rows - r0)) for r0 in range(0, rows, size)]


def emit(cg: Codegen) -> list:
    """One decode step of ``cg.og`` as instructions, each in its queue, without dependency tokens."""
    og = cg.og
    for i, op in enumerate(og.ops):
        cg.who = f"op {op.out} ({op.kind} from {op.source})"
        cg.scratch_vectors = []
        op.emit(cg, [cg.where[v] for v in op.ins])
        for t in cg.scratch_vectors:
            cg.drop(t)
        for v in dict.fromkeys(op.ins):
            if cg.last_use.get(v) == i:
                cg.drop(v)
    if og.logits and not cg.head_tiles:  # a tiled head ends in its own ARGMAXACC and stores its own tiles
        cg.instr("ARGMAX", x=cg.where[og.logits][0], len=og.lengths[og.logits], rd=REG_NEXT)
    for name, (vec, _) in og.outputs.items():
        if cg.head_tiles and vec == og.logits:
            continue
        cg.instr("STORE", src=cg.where[vec][0], src_e=cg.where[vec][1], len=og.lengths[vec],
                 addr=cg.io["outputs"][name]["addr"])
    cg.instr("END")
    return cg.code


def fold_peaks(code: list) -> None:
    """Set ``fold`` on each REQ of *code* (in place) whose range the GEMV unit's peak record still holds: the
    accumulators the last GEMV wrote, with no ATTN since (:func:`kvoverlay.timing.peak_record`), as a GEMV and the
    REQ of its output always are. Such a REQ skips its peak pass (``len + timing.REQ_READ_LATENCY`` cycles)."""
    record = None
    for i, ins in enumerate(code):
        if folds_peak(record, ins) and not ins.fields.get("fold"):
            code[i] = isa.Instr(ins.op, {**ins.fields, "fold": 1}, ins.deps)
        record = peak_record(record, ins)


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
