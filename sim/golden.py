"""Golden model: executes instruction streams bit-exactly with :mod:`kvoverlay.numerics`.

Instructions execute in program order, which equals the hardware's result
whenever the dependency tokens order every hazard. Alongside, a timing model
replays the three queues (load, compute, store) with their token FIFOs and a
per-instruction cycle cost taken from the :class:`OverlayConfig`, so it predicts
cycles and finds token deadlocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from kvoverlay import isa
from kvoverlay import numerics as nx
from kvoverlay.access import accesses
from kvoverlay.config import OverlayConfig
from kvoverlay.timing import (
    FRONTEND_INTERVAL,
    PORT_PRIORITY,
    QUEUE_DEPTH,
    RUN_OVERHEAD,
    gemv_pack_refusal,
    held_ports,
    instr_cycles,
    lock_conflicts,
    peak_record,
    port_burst,
)

__all__ = ["Counters", "ExecError", "GoldenModel", "instr_cycles", "replay_cycles"]


class ExecError(RuntimeError):
    """A run-time fault; the message names the program counter and the instruction."""

    def __init__(self, pc, ins, reason):
        self.pc, self.ins, self.reason = pc, ins, reason
        super().__init__(f"pc {pc}: {ins.op if ins is not None else '?'}: {reason}")


@dataclass
class Counters:
    cycles: int = 0
    instructions: int = 0
    bytes_read: dict = field(default_factory=dict)
    bytes_written: dict = field(default_factory=dict)
    busy: dict = field(default_factory=lambda: {q: 0 for q in isa.QUEUES})
    #: cycles each queue's next instruction was ready but waited for a buffer port another queue held
    stall_lock: dict = field(default_factory=lambda: {q: 0 for q in isa.QUEUES})

    @property
    def total_read(self) -> int:
        return sum(self.bytes_read.values())

    def to_dict(self) -> dict:
        return {"cycles": self.cycles, "instructions": self.instructions, "bytes_read": dict(self.bytes_read),
                "bytes_written": dict(self.bytes_written), "busy": dict(self.busy)}


def _ceil(a, b):
    return -(-a // b)


class GoldenModel:
    """The machine state and an interpreter for it.

    Parameters
    ----------
    config : OverlayConfig
        The overlay instance being modelled.
    image : bytes
        Initial external-memory contents (the program's memory image).
    regions : list of (name, start, end), optional
        Named external-memory regions for the byte counters.
    """

    def __init__(self, config: OverlayConfig, image: bytes = b"", regions=None):
        self.config = config
        if len(image) > config.dram_bytes:
            raise ValueError(f"memory image of {len(image)} bytes exceeds dram_bytes={config.dram_bytes}")
        self.dram = np.zeros(config.dram_bytes, np.uint8)
        self.dram[: len(image)] = np.frombuffer(image, np.uint8)
        self.regions = list(regions or [("dram", 0, config.dram_bytes)])
        self.abuf = np.zeros(config.act_buffer_words, np.int64)
        self.acc = np.zeros(config.acc_buffer_words, np.int64)
        self.eregs = [nx.EXP_MIN] * isa.NUM_EREGS
        self.regs = [0] * isa.NUM_REGS
        # The KV pool, K and V alike: kv_columns * kv_capacity words of vector_lanes mantissas; a token's exponent
        # sits at the index of its first word.
        words = config.kv_columns * config.kv_capacity
        self.kv_k = np.zeros((words, config.vector_lanes), np.int64)
        self.kv_v = np.zeros((words, config.vector_lanes), np.int64)
        self.kv_ek = np.full(words, nx.EXP_MIN, np.int64)
        self.kv_ev = np.full(words, nx.EXP_MIN, np.int64)
        #: ARGMAXACC's best (accumulator word, index) so far, held in the ARGMAXACC unit from one ARGMAXACC to the next (its
        #: reset value: the least int64 at index 0, what ``cont=1`` meets before any ARGMAXACC ran)
        self.acc_best = (nx.ACC_MIN, 0)
        #: The GEMV unit's peak record, (acc, rows) of the last GEMV or None (timing.peak_record): a REQ with fold=1
        #: takes the peak of those words, which equals its own peak pass's while the record is the REQ's range
        self.peak_record = None
        self.counters = Counters()

    # ------------------------------------------------------------ helpers
    def _region(self, addr):
        for name, lo, hi in self.regions:
            if lo <= addr < hi:
                return name
        return "dram"

    def _count(self, table, addr, n):
        name = self._region(addr)
        table[name] = table.get(name, 0) + n

    def _dram(self, addr, n, write=False):
        if addr + n > self.config.dram_bytes:
            raise IndexError(f"external-memory access [{addr:#x}, {addr + n:#x}) beyond dram_bytes={self.config.dram_bytes:#x}")
        self._count(self.counters.bytes_written if write else self.counters.bytes_read, addr, n)
        return self.dram[addr: addr + n]

    def _span(self, buf, base, n, what):
        if n < 0 or base + n > buf.size:
            raise IndexError(f"{what} [{base}, {base + n}) beyond its size {buf.size}")
        return slice(base, base + n)

    def vec(self, base, ereg, n):
        return self.abuf[self._span(self.abuf, base, n, "activation buffer")], self.eregs[ereg]

    def put(self, base, ereg, m, e):
        self.abuf[self._span(self.abuf, base, len(m), "activation buffer")] = m
        self.eregs[ereg] = int(e)

    def read_vector_record(self, addr, n):
        return nx.unpack_vector_record(self._dram(addr, nx.vector_record_size(n)).tobytes(), n)

    def write_vector_record(self, addr, m, e):
        blob = nx.pack_vector_record(m, e)
        self._dram(addr, len(blob), write=True)[:] = np.frombuffer(blob, np.uint8)

    def kv_words(self, kv_base, head, positions, head_dim):
        """Word index of each position's first word of KV head *head* of the layer at column *kv_base*.

        Head h of a layer starts at column ``kv_base + h * c`` (``c = kv_head_columns(head_dim)``); its token
        at position p takes the c words from ``column * kv_capacity + p * c`` on.
        """
        c = self.config.kv_head_columns(head_dim)
        return (kv_base + head * c) * self.config.kv_capacity + np.asarray(positions, np.int64) * c

    def kv_read(self, kind, kv_base, head, positions, head_dim):
        """(mantissas [len(positions), head_dim], exponents) of K (*kind* "k") or V ("v") tokens of one head."""
        c = self.config.kv_head_columns(head_dim)
        first = self.kv_words(kv_base, head, positions, head_dim)
        mem, exps = (self.kv_k, self.kv_ek) if kind == "k" else (self.kv_v, self.kv_ev)
        rows = mem[first[:, None] + np.arange(c)].reshape(len(first), -1)[:, :head_dim]
        return rows, exps[first]

    def _kv_check(self, kv_base, heads, head_dim, pos):
        c = self.config
        if not c.holds_kv(kv_base, heads, head_dim):
            raise IndexError(f"{heads} heads of {head_dim} from KV column {kv_base} exceed the KV pool "
                             f"({c.kv_columns} columns, heads of at most {c.max_head_dim})")
        if not 0 <= pos < c.kv_capacity:
            raise IndexError(f"KV position {pos} outside capacity {c.kv_capacity} (KV full)")

    def _peak_range(self) -> str:
        if self.peak_record is None:
            return "stale (an ATTN wrote the accumulators since the last GEMV, or no GEMV ran)"
        lo, n = self.peak_record
        return f"[{lo}, {lo + n})"

    # ------------------------------------------------------------ execution
    def step(self, ins: isa.Instr):
        f, op = ins.fields, ins.op
        fmt, group = isa.weight_layout(ins) if "fmt" in f else (None, None)
        if fmt is not None and fmt not in self.config.weight_formats:
            raise ValueError(f"weight format {fmt} is not built into this overlay ({self.config.weight_formats})")
        if op == "LOAD":
            m, e = self.read_vector_record(f["addr"], f["len"])
            self.put(f["dst"], f["dst_e"], m, e)
        elif op == "STORE":
            m, e = self.vec(f["src"], f["src_e"], f["len"])
            self.write_vector_record(f["addr"], m, e)
        elif op == "STACC":
            words = self.acc[self._span(self.acc, f["acc"], f["len"], "accumulator buffer")]
            self._dram(f["addr"], 8 * f["len"], write=True)[:] = words.astype("<i8").view(np.uint8)
        elif op == "LDROW":
            if fmt == "uint4":  # tables need no zero points, and LDROW's datapath has none (a FORMAT fault)
                raise ValueError("LDROW does not take uint4 weights")
            if f["cols"] % group or f["cols"] == 0:
                raise ValueError(f"cols={f['cols']} is not a positive multiple of the group size {group}")
            stride = nx.row_stride(f["cols"], fmt, group, self.config.port_bytes)
            if stride > self.config.ldrow_buffer_bytes:
                raise IndexError(f"a row record of {stride} bytes exceeds LDROW's row buffer of "
                                 f"{self.config.ldrow_buffer_bytes} (ldrow_row_bytes)")
            row = self.regs[f["row_reg"]] + f["row_imm"]
            if row < 0:
                raise IndexError(f"row index {row} is negative")
            q, sm = nx.unpack_row(self._dram(f["addr"] + row * stride, stride).tobytes(), f["cols"], fmt, group)
            vals = (q.reshape(-1, group) * sm[:, None]).reshape(-1)
            self.put(f["dst"], f["dst_e"], *nx.normalize(vals, f["sexp"]))
        elif op == "GEMV":
            if f["cols"] % group or f["cols"] == 0 or f["rows"] == 0:
                raise ValueError(f"a {f['rows']}x{f['cols']} tile does not split into groups of {group}")
            if not self.config.builds_group(group):
                raise ValueError(f"groups of {group} weights: the GEMV engine is built for groups of at least "
                                 f"min_group={self.config.min_group}")
            packed, pb = f.get("packed", 0), self.config.port_bytes
            if packed and (why := gemv_pack_refusal(self.config, f["cols"], fmt, group)):
                raise ValueError(f"GEMV packed=1: {why} (a GROUP fault)")
            blob = self._dram(f["addr"], nx.matrix_bytes(f["rows"], f["cols"], fmt, group, pb, packed)).tobytes()
            q, sm = nx.unpack_matrix(blob, f["rows"], f["cols"], fmt, group, pb, packed)
            x, ex = self.vec(f["x"], f["x_e"], f["cols"])
            out = nx.gemv_acc(q, sm, x, group)
            span = self._span(self.acc, f["acc"], f["rows"], "accumulator buffer")
            e = ex + f["sexp"]
            if f["accumulate"]:
                if self.eregs[f["acc_e"]] != e:
                    raise ValueError(f"accumulate with exponent {e} onto accumulators of exponent {self.eregs[f['acc_e']]}")
                self.acc[span] += out
            else:
                self.acc[span] = out
            self.eregs[f["acc_e"]] = e
            self.peak_record = peak_record(self.peak_record, ins)
        elif op == "REQ":
            if f.get("fold") and self.peak_record != (f["acc"], f["len"]):
                raise ValueError(f"REQ fold=1 over accumulators [{f['acc']}, {f['acc'] + f['len']}) but the GEMV unit's "
                                 f"peak record is {self._peak_range()} (a SHAPE fault)")
            words = self.acc[self._span(self.acc, f["acc"], f["len"], "accumulator buffer")]
            self.put(f["dst"], f["dst_e"], *nx.normalize(words, self.eregs[f["acc_e"]]))
        elif op in ("VADD", "VMUL"):
            a, ea = self.vec(f["a"], f["a_e"], f["len"])
            b, eb = self.vec(f["b"], f["b_e"], f["len"])
            fn = nx.vadd if op == "VADD" else nx.vmul
            self.put(f["dst"], f["dst_e"], *fn(a, ea, b, eb))
        elif op == "VSCALE":
            a, ea = self.vec(f["a"], f["a_e"], f["len"])
            self.put(f["dst"], f["dst_e"], *nx.vscale(a, ea, f["imm_m"], f["imm_e"]))
        elif op == "NORM":
            x, ex = self.vec(f["x"], f["x_e"], f["len"])
            g, eg = self.vec(f["g"], f["g_e"], f["len"])
            if f["len"] == 0:
                raise ValueError("normalization of an empty vector")
            kind, hd = isa.ENUMS["norm"][f["kind"]], f["head_dim"]
            if hd and not self.config.norm_heads:
                raise ValueError("a NORM over each head: this overlay's vector unit is built without it (norm_heads)")
            if hd and (kind != "rms" or hd % self.config.vector_lanes or f["len"] > isa.NORM_MAX_HEADS * hd):
                raise ValueError(f"a NORM over each head is an RMSNorm over at most {isa.NORM_MAX_HEADS} heads of a "
                                 f"multiple of vector_lanes={self.config.vector_lanes}, got {kind} over {f['len']} "
                                 f"elements in heads of {hd}")
            self.put(f["dst"], f["dst_e"], *nx.norm(x, ex, g, eg, f["eps_m"], f["eps_e"], kind, hd))
        elif op == "ACT":
            x, ex = self.vec(f["x"], f["x_e"], f["len"])
            self.put(f["dst"], f["dst_e"], *nx.act(x, ex, isa.ENUMS["func"][f["func"]]))
        elif op == "ROPE":
            h, d = f["heads"], f["head_dim"]
            if d % 2 or d == 0 or h == 0:
                raise ValueError(f"ROPE needs heads >= 1 and an even head_dim, got {h} x {d}")
            x, ex = self.vec(f["x"], f["x_e"], h * d)
            c, ec = self.vec(f["cos"], f["cos_e"], d // 2)
            s, es = self.vec(f["sin"], f["sin_e"], d // 2)
            self.put(f["dst"], f["dst_e"], *nx.rope(x, ex, c, ec, s, es, h, d, isa.ENUMS["rope"][f["mode"]]))
        elif op == "ARGMAX":
            if f["len"] == 0:
                raise ValueError("argmax of an empty vector")
            x, _ = self.vec(f["x"], 0, f["len"])
            self.regs[f["rd"]] = nx.argmax(x)
        elif op == "ARGMAXACC":
            if f["len"] == 0:
                raise ValueError("argmax of an empty vector")
            words = self.acc[self._span(self.acc, f["acc"], f["len"], "accumulator buffer")]
            i = nx.argmax(words)
            if not f["cont"] or int(words[i]) > self.acc_best[0]:
                self.acc_best = (int(words[i]), f["base"] + i)
            self.regs[f["rd"]] = self.acc_best[1]
        elif op == "KVAPPEND":
            h, d, base = f["heads"], f["head_dim"], f["kv_base"]
            pos = self.regs[f["pos_reg"]] + f["pos_imm"]
            self._kv_check(base, h, d, pos)
            k, ek = self.vec(f["k"], f["k_e"], h * d)
            v, ev = self.vec(f["v"], f["v_e"], h * d)
            c = self.config.kv_head_columns(d)
            for head in range(h):
                w = int(self.kv_words(base, head, pos, d))
                for mem, exps, x, e in ((self.kv_k, self.kv_ek, k, ek), (self.kv_v, self.kv_ev, v, ev)):
                    flat = mem[w:w + c].reshape(-1)  # lanes beyond head_dim keep their contents
                    flat[:d] = x[head * d:(head + 1) * d]
                    mem[w:w + c] = flat.reshape(c, -1)
                    exps[w] = e
        elif op == "ATTN":
            qh, kvh, d, base = f["q_heads"], f["kv_heads"], f["head_dim"], f["kv_base"]
            L = self.regs[f["len_reg"]] + f["len_imm"]
            if qh == 0 or kvh == 0 or qh % kvh:
                raise ValueError(f"{qh} query heads do not map onto {kvh} KV heads")
            if not self.config.runs_attn(qh):
                raise ValueError(f"{qh} query heads exceed the attention engine's max_q_heads={self.config.max_q_heads}")
            self._kv_check(base, kvh, d, max(L - 1, 0))
            if L < 1:
                raise ValueError(f"attention over KV length {L}")
            q, eq = self.vec(f["q"], f["q_e"], qh * d)
            ks, vs = ([self.kv_read(kind, base, h, np.arange(L), d) for h in range(kvh)] for kind in "kv")
            m, e, stats = nx.attention(
                q, eq, np.stack([x for x, _ in ks]), np.stack([x for _, x in ks]),
                np.stack([x for x, _ in vs]), np.stack([x for _, x in vs]), qh, kvh, d, self.config.attn_tile)
            self.put(f["dst"], f["dst_e"], m, e)
            if f["stats"] != isa.ATTN_NO_STATS:
                self.acc[self._span(self.acc, f["stats"], 2 * qh, "accumulator buffer")] = stats
            self.peak_record = peak_record(self.peak_record, ins)
            return L
        return None

    def run(self, program, args=None, max_instructions=1_000_000, hook=None):
        """Execute *program* (a list of :class:`isa.Instr` or encoded bytes) until END.

        *args* sets scalar registers R0.. before the run. Returns the counters
        of this run; ``self.regs`` then holds ARGMAX results. *hook(pc, ins)*, if
        given, runs after each instruction: the host's hybrid attention uses it to
        merge offloaded partials into an ATTN's output before the program goes on.
        """
        if isinstance(program, (bytes, bytearray)):
            program = isa.decode_program(bytes(program))
        for i, value in enumerate(args or []):
            self.regs[i] = int(value)
        self.counters = Counters()
        timing = _Timing(self.config)
        for pc, ins in enumerate(program):
            if pc >= max_instructions:
                raise ExecError(pc, ins, f"more than {max_instructions} instructions")
            try:
                kv_len = self.step(ins)
                timing.issue(pc, ins, kv_len or 0)
                if hook is not None:
                    hook(pc, ins)
            except ExecError:
                raise
            except (ValueError, IndexError, ArithmeticError, KeyError) as exc:
                raise ExecError(pc, ins, str(exc)) from None
            self.counters.instructions += 1
            if ins.op == "END":
                break
        else:
            raise ExecError(len(program), None, "program ended without END")
        self.counters.cycles = timing.finish()
        self.counters.busy = timing.busy
        self.counters.stall_lock = timing.stall_lock
        return self.counters


class _Timing:
    """Replays the load, compute and store queues with their token FIFOs."""

    _LINKS: ClassVar[dict] = {("load", "next"): "compute", ("compute", "prev"): "load",
              ("compute", "next"): "store", ("store", "prev"): "compute"}

    def __init__(self, cfg):
        self.cfg = cfg
        self.free = {q: 0 for q in isa.QUEUES}
        self.busy = {q: 0 for q in isa.QUEUES}
        self.tokens = {}  # (from, to) -> list of ready times
        self.history = []  # on-chip accesses still in flight: (space, lo, hi, write, end, queue, pc, op)
        self.stall_lock = {q: 0 for q in isa.QUEUES}
        self.issued = []  # (queue, cycles, pops, pushes, burst, pc, held ports) in program order, for _port_replay

    def issue(self, pc, ins, kv_len):
        if ins.op == "END":
            return
        q = ins.queue
        start = self.free[q]
        for d in ("prev", "next"):
            if f"pop_{d}" in ins.deps:
                src = self._LINKS[(q, d)]
                fifo = self.tokens.get((src, q), [])
                if not fifo:
                    raise ExecError(pc, ins, f"pop_{d} waits for a token from the {src} queue that no earlier "
                                             "instruction pushed (deadlock)")
                start = max(start, fifo.pop(0))
        cycles = instr_cycles(ins, self.cfg, kv_len)
        end = start + cycles
        self._check_hazards(pc, ins, q, start, end)
        self.free[q] = end
        self.busy[q] += cycles
        for d in ("prev", "next"):
            if f"push_{d}" in ins.deps:
                self.tokens.setdefault((q, self._LINKS[(q, d)]), []).append(end)
        self.issued.append((q, cycles, tuple(self._LINKS[(q, d)] for d in ("prev", "next") if f"pop_{d}" in ins.deps),
                            tuple(self._LINKS[(q, d)] for d in ("prev", "next") if f"push_{d}" in ins.deps),
                            port_burst(self.cfg, ins), pc, held_ports(ins)))

    def _check_hazards(self, pc, ins, q, start, end):
        horizon = min(self.free.values())
        self.history = [h for h in self.history if h[4] > horizon]
        mine = accesses(ins)
        for space, lo, hi, write in mine:
            for (s2, lo2, hi2, write2, end2, q2, pc2, op2) in self.history:
                if s2 == space and q2 != q and lo < hi2 and lo2 < hi and (write or write2) and end2 > start:
                    kind = "writes" if write else "reads"
                    raise ExecError(pc, ins, f"{kind} {space}[{max(lo, lo2)}] while {op2} at pc {pc2} in the {q2} "
                                             "queue may still use it: no dependency token orders them (race)")
        self.history += [(space, lo, hi, write, end, q, pc, ins.op) for space, lo, hi, write in mine]

    def finish(self):
        """The run's cycles, as the overlay's ``cycles`` counter counts them (the front end's dispatch and the
        memory port shared); sets :attr:`busy` to the queues' busy cycles, port stalls included, as the overlay's
        ``busy_<queue>`` counters count them, and :attr:`stall_lock` to the cycles each queue's ready instruction
        waited for a buffer port, as its ``stall_lock_<queue>`` counter counts them."""
        cycles, self.busy, self.stall_lock = _port_replay(self.issued)
        return cycles


def _port_replay(issued):
    """Replays the front end and the queues in time order, with one memory port and the buffer ports between them:
    ``(cycles, busy per queue, lock stalls per queue)``.

    *issued* lists ``(queue, cycles, pop sources, push targets, burst, pc, buffer ports held)`` in program order (END left out);
    the tokens are :class:`_Timing`'s (the n-th pop of a link waits for its n-th push). The front end hands the
    instructions out in program order, one per :data:`~kvoverlay.timing.FRONTEND_INTERVAL` cycles, and waits at
    one whose queue holds :data:`~kvoverlay.timing.QUEUE_DEPTH` instructions not started. An instruction starts
    once its queue is free, it is dispatched and its tokens are pushed, and no instruction of another queue holds a
    buffer port it needs (:func:`~kvoverlay.timing.held_ports`; of conflicting instructions able to start in the
    same cycle, the queue first in :data:`~kvoverlay.timing.PORT_PRIORITY` starts; the wait is its lock stall).
    The memory port serves one burst at a time (:func:`kvoverlay.timing.port_burst`); when it frees, it takes the
    request of the highest-priority queue among those offered by then, and a request that waits stalls its unit as
    long. Events are settled earliest first (a grant before the starts of its cycle, which request later), so
    every start and grant sees all that happened before it.
    """
    order = {q: [i for i, r in enumerate(issued) if r[0] == q] for q in isa.QUEUES}
    rank = [0] * len(issued)  # place of each instruction in its queue
    for idx in order.values():
        for k, i in enumerate(idx):
            rank[i] = k
    starts = [None] * len(issued)
    avail = []  # the first cycle each instruction dispatched so far can start in
    head = dict.fromkeys(isa.QUEUES, 0)
    free = dict.fromkeys(isa.QUEUES, 0)  # None while the running instruction waits for the memory port
    busy = dict.fromkeys(isa.QUEUES, 0)
    stall_lock = dict.fromkeys(isa.QUEUES, 0)
    holding = dict.fromkeys(isa.QUEUES)  # the buffer ports of what each queue runs or ran last
    pushed, popped = {}, {}  # (from, to) -> end times of its pushes so far / pops taken so far
    requests = {}  # queue -> (request cycle, instruction) of a started burst not yet granted
    port_free = 0

    def dispatched(i):
        """Whether the front end has handed instruction *i* out (it has, once the instructions its queue waited
        for have started)."""
        while len(avail) <= i:
            j = len(avail)
            at = avail[-1] + FRONTEND_INTERVAL if j else 0
            if rank[j] >= QUEUE_DEPTH:
                before = starts[order[issued[j][0]][rank[j] - QUEUE_DEPTH]]
                if before is None:
                    return False
                at = max(at, before + FRONTEND_INTERVAL)
            avail.append(at)
        return True

    def ready(q):
        """``(first cycle, first cycle with the buffer ports free)`` of *q*'s next instruction, or None while it
        waits for the front end, a token, or an end not known yet."""
        if head[q] == len(order[q]) or free[q] is None:
            return None
        i = order[q][head[q]]
        if not dispatched(i):
            return None
        start = max(free[q], avail[i])
        for src in issued[i][2]:
            times, n = pushed.get((src, q), []), popped.get((src, q), 0)
            if len(times) <= n:
                return None
            start = max(start, times[n])
        unlocked = start
        for o in isa.QUEUES:
            if o != q and holding[o] and lock_conflicts(holding[o], issued[i][6]):
                if free[o] is None:
                    return None
                unlocked = max(unlocked, free[o])
        return start, unlocked

    def retire(q, i, end):
        for dst in issued[i][3]:
            pushed.setdefault((q, dst), []).append(end)
        free[q] = end
        busy[q] += end - starts[i]

    while True:
        candidates = {q: r for q in isa.QUEUES if (r := ready(q)) is not None}
        grant = max(port_free, min(r[0] for r in requests.values())) if requests else None
        first = min((r[1] for r in candidates.values()), default=None)
        if grant is not None and (first is None or grant <= first):
            q = min((q for q, r in requests.items() if r[0] <= grant), key=PORT_PRIORITY.index)
            at = requests[q][0]
            i = requests.pop(q)[1]
            port_free = grant + issued[i][4][1]
            retire(q, i, starts[i] + issued[i][1] + grant - at)
            continue
        if first is None:
            break
        q = min((q for q, r in candidates.items() if r[1] == first), key=PORT_PRIORITY.index)
        i = order[q][head[q]]
        starts[i], stall_lock[q] = first, stall_lock[q] + first - candidates[q][0]
        for src in issued[i][2]:
            popped[(src, q)] = popped.get((src, q), 0) + 1
        head[q], holding[q] = head[q] + 1, issued[i][6]
        if issued[i][4] is None:
            retire(q, i, first + issued[i][1])
        else:
            free[q] = None
            requests[q] = (first + issued[i][4][0], i)
    for q in isa.QUEUES:
        if head[q] < len(order[q]):
            waiting = order[q][head[q]]
            raise ExecError(issued[waiting][5], None, f"the {q} queue's instruction waits for a token or the front "
                                                        "end for ever (deadlock: the front end waits at a full queue "
                                                        "whose head waits for an instruction behind it)")
    end = avail[-1] + FRONTEND_INTERVAL if avail else 0  # the front end reaches END
    return max(end, *free.values()) + RUN_OVERHEAD, busy, stall_lock


def replay_cycles(config, program, kv_len: int = 0) -> tuple[int, dict]:
    """The timing model alone: ``(cycles, busy cycles per queue)`` of one run of *program*, not executed.

    Every ATTN attends over *kv_len* positions. The queue replay is :class:`GoldenModel`'s, token FIFOs included;
    on-chip hazards are not checked (a program built for its timing alone, as the projections build it, carries
    no buffer addresses).
    """
    timing = _Timing(config)
    timing._check_hazards = lambda *args: None
    for pc, ins in enumerate(program):
        if ins.op == "END":
            break
        timing.issue(pc, ins, kv_len if ins.op == "ATTN" else 0)
    return timing.finish(), dict(timing.busy)
