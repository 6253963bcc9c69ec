"""The overlay processor: front end, three command queues with dependency tokens, execution units, on-chip state.

Decoupled access/execute as in VTA: the front end dispatches each instruction to the load, compute or store
queue; each queue executes in order. A queue's head instruction starts only when the tokens its ``pop_*`` flags
ask for are available (token counters between load<->compute and compute<->store), and pushes the tokens of its
``push_*`` flags when it completes, exactly the order that ``sim/golden.py``'s ``_Timing`` replays. END waits
until every queue has drained, then pulses ``done``.
"""

from __future__ import annotations

from types import SimpleNamespace

from amaranth.hdl import Cat, DomainRenamer, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import In, Out

from kvoverlay import isa, timing

from .argmax_unit import ArgmaxUnit
from .arith import balanced_sum
from .attention import AttentionEngine
from .dram import DramArbiter, dram_port
from .frontend import Frontend
from .gemv_unit import GemvUnit
from .isa_layout import HEADER_LAYOUT, LAYOUTS
from .kv_buffer import KvBuffer
from .ldrow_unit import LdrowUnit
from .load_unit import LoadUnit
from .ports import (
    EREG_SHAPE,
    QUEUE_ENTRY,
    Fault,
    abuf_lanes,
)
from .req_unit import ReqUnit
from .state import OnChipState, host_signature, ports_of
from .store_unit import StoreUnit
from .vector_unit import VectorUnit

__all__ = ["COUNTERS", "DRAM_PRIORITY", "ERRORS", "QUEUE_DEPTH", "STALL_UNITS", "UNITS", "Overlay"]

#: ``error_code`` values of the overlay (index = code). ``error_info`` holds: for ``illegal`` the reason
#: (hw.frontend.ILLEGAL_REASONS), for ``unimplemented`` the opcode, for ``exec`` the unit's
#: :class:`~hw.ports.Fault`, for ``watchdog`` the stalled unit (STALL_UNITS).
ERRORS = ("none", "illegal", "unimplemented", "exec", "watchdog")
#: Units a watchdog error can name.
STALL_UNITS = (*isa.QUEUES, "frontend")
#: Host-readable counters, by ``ctr_addr``.
COUNTERS = ("cycles", "instructions", "bytes_read", "bytes_written", "insn_bytes_read",
            *(f"busy_{q}" for q in isa.QUEUES), *(f"stall_token_{q}" for q in isa.QUEUES),
            *(f"stall_port_{q}" for q in isa.QUEUES), *(f"stall_lock_{q}" for q in isa.QUEUES))
#: Execution units per queue and the opcodes they take. An opcode of a queue that no unit takes stops the run
#: with the ``unimplemented`` error naming the opcode (none is left in this build; the path stays for
#: reduced builds). Plugging a unit in: instantiate it in ``Overlay.elaborate`` and list its opcodes here; the
#: overlay wires it by its signature (:func:`hw.ports.unit_signature`): its ``cmd``/``done`` to the queue's
#: executor, each memory port to the queue's port of that kind (the i-th of a kind to the i-th), each register
#: port to the register file, a burst port to the memory arbiter and a ``port_wait`` to the stall counter.
UNITS = {
    "load": {"load": ("LOAD",), "ldrow": ("LDROW",)},
    "compute": {"gemv": ("GEMV",), "req": ("REQ",),
                "vector": ("VADD", "VMUL", "VSCALE", "ACT", "NORM", "ROPE", "ARGMAX")},
    "store": {"store": ("STORE", "STACC"), "argmax": ("ARGMAXACC",), "attention": ("KVAPPEND", "ATTN")},
}

#: Queues whose units the memory arbiter serves first, highest priority first.
DRAM_PRIORITY = timing.PORT_PRIORITY
#: Entries of each command queue.
QUEUE_DEPTH = timing.QUEUE_DEPTH
TOKEN_BITS = 8
#: Cycles a gated unit's clock keeps running after it was last busy or commanded (``gated_units``).
GATE_DRAIN = 8


def _check_flat_priority():
    """Raise ``ValueError`` unless the overlay's same-cycle port locks (each queue yields to an earlier queue of
    :data:`~kvoverlay.timing.PORT_PRIORITY` that could start a conflicting instruction) start what the golden replay
    starts (it yields only to one that does start): they differ only where a queue *o* yields to an earlier *p*,
    conflicts with a later *q*, and *p* does not conflict with *q*."""
    def variants(op):
        full = timing.PORT_LOCKS[op]
        return {full, tuple(k for k in full if (op, k) not in timing.LOCK_FIELDS)}
    held = {q: {h for op in timing.PORT_LOCKS if isa.BY_NAME[op].queue == q for h in variants(op)}
            for q in isa.QUEUES}
    order = timing.PORT_PRIORITY
    for a, p in enumerate(order):
        for b in range(a + 1, len(order)):
            for q in order[b + 1:]:
                o = order[b]
                for hp in held[p]:
                    for ho in held[o]:
                        for hq in held[q]:
                            if (timing.lock_conflicts(hp, ho) and timing.lock_conflicts(ho, hq)
                                    and not timing.lock_conflicts(hp, hq)):
                                raise ValueError(f"timing.PORT_LOCKS: {p} holding {hp!r} blocks {o} holding {ho!r}, "
                                                 f"which blocks {q} holding {hq!r}, which {p} does not: the overlay's "
                                                 "same-cycle port locks need that conflict")


class Overlay(wiring.Component):
    """The overlay top, generic over the :class:`OverlayConfig`.

    Parameters
    ----------
    config : OverlayConfig
        Every unit and buffer is sized from it; ``port_bits`` must be at least 64.
    gated_units : tuple of str
        Units (keys of :data:`UNITS`' entries) that run in a clock domain of their own, ``<name>_gated``, for a
        simulation that clocks it only while ``gate_<name>`` is high (the run-path harness: Verilator then skips
        an idle unit's evaluation). Empty (the default) for every build that is not that simulation.
    poison_collisions : bool
        Simulation builds only: a buffer read of lanes that are written in the same cycle reads them inverted, where
        the block RAM leaves them undefined (:class:`~hw.state.OnChipState`'s ``poison``).

    Attributes
    ----------
    start : In(1)
        Pulse to run the program at instruction index ``prog_base`` (byte address / 16).
    prog_base : In
    watchdog_cycles : In(32)
        A run that makes no progress (no dispatch into a queue, start, completion or port beat, and no unit
        without a memory port at work) for this many cycles stops with the ``watchdog`` error naming the stalled
        unit; 0 disables the watchdog.
    running, done : Out(1)
        ``done`` pulses when END has drained every queue or the run stopped on an error.
    error, error_code, error_info, error_pc : Out
        Sticky until the next ``start``; see :data:`ERRORS`.
    dram : Out(dram_port(config))
        The external-memory burst port.
    insn_addr, insn_data : Out, In(128)
        The instruction fetch port (instruction index, data one cycle later).
    host_reg_we, host_reg_addr, host_reg_data : In
        Host writes of the scalar registers (program arguments), while not running.
    dbg_abuf_addr / dbg_abuf_data, dbg_acc_addr / dbg_acc_data :
        Host read-back of the buffers (latency 1).
    dbg_ereg_addr / dbg_ereg_data, dbg_reg_addr / dbg_reg_data, ctr_addr / ctr_data :
        Host read-back of the registers and counters (combinational).
    gate_<name> : Out(1)
        For each of *gated_units*: its domain must see the next clock edge.
    """

    def __init__(self, config, *, gated_units=(), poison_collisions=False):
        if config.port_bits < 64:
            raise ValueError(f"port_bits={config.port_bits}: the overlay needs a port of at least 64 bits")
        known = [n for q in isa.QUEUES for n in UNITS[q]]
        if not set(gated_units) <= set(known):
            raise ValueError(f"gated_units={gated_units!r}: the units are {', '.join(known)}")
        self.config = config
        self.gated_units = tuple(gated_units)
        self.poison_collisions = poison_collisions
        self.lanes = abuf_lanes(config)
        self.abuf_depth = config.act_buffer_words // self.lanes
        iaw = (config.dram_bytes // isa.INSN_BYTES - 1).bit_length()
        super().__init__({
            "start": In(1), "prog_base": In(iaw), "watchdog_cycles": In(32),
            "running": Out(1), "done": Out(1),
            "error": Out(1), "error_code": Out(range(len(ERRORS))), "error_info": Out(8), "error_pc": Out(32),
            "dram": Out(dram_port(config)),
            "insn_addr": Out(iaw), "insn_data": In(isa.INSN_BITS),
            "host_reg_we": In(1), "host_reg_addr": In(range(isa.NUM_REGS)), "host_reg_data": In(32),
            "dbg_abuf_addr": In(range(self.abuf_depth)), "dbg_abuf_data": Out(16 * self.lanes),
            "dbg_acc_addr": In(range(config.acc_buffer_words)), "dbg_acc_data": Out(64),
            "dbg_ereg_addr": In(range(isa.NUM_EREGS)), "dbg_ereg_data": Out(EREG_SHAPE),
            "dbg_reg_addr": In(range(isa.NUM_REGS)), "dbg_reg_data": Out(32),
            "ctr_addr": In(range(len(COUNTERS))), "ctr_data": Out(64),
            **{f"gate_{n}": Out(1) for n in self.gated_units},
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        pb = cfg.port_bytes

        # ------------------------------------------------------------ units
        m.submodules.frontend = fe = Frontend(cfg)
        units = {"load": LoadUnit(cfg), "ldrow": LdrowUnit(cfg), "gemv": GemvUnit(cfg), "req": ReqUnit(cfg),
                 "store": StoreUnit(cfg), "argmax": ArgmaxUnit(cfg), "vector": VectorUnit(cfg), "attention": AttentionEngine(cfg)}
        for name, unit in units.items():
            if name in self.gated_units:
                m.submodules[f"{name}_unit"] = DomainRenamer({"sync": f"{name}_gated"})(unit)
                self._gate(m, name, unit)
            else:
                m.submodules[f"{name}_unit"] = unit
        # REQ's folded peak (timing.peak_record): the GEMV unit's record, current from a GEMV's completion until an
        # ATTN writes statistics into its range; kept here, in the top's domain, because the GEMV unit's clock may be
        # gated while ATTN runs
        peak_valid = Signal(name="peak_record_valid")
        stats_w, record = units["attention"].acc_w, units["gemv"].peak
        with m.If(stats_w.en & (stats_w.addr >= record.acc) & (stats_w.addr < record.acc + record.rows)):
            m.d.sync += peak_valid.eq(0)
        with m.Elif(units["gemv"].done.valid & (units["gemv"].done.payload == Fault.NONE)):
            m.d.sync += peak_valid.eq(1)
        wiring.connect(m, units["gemv"].peak, units["req"].peak)
        m.d.comb += units["req"].peak_valid.eq(peak_valid)
        # the KV buffer persists across runs: a decode session appends one token per run
        m.submodules.kv_buffer = kvbuf = KvBuffer(cfg)
        wiring.connect(m, units["attention"].kv, kvbuf.port)
        m.d.comb += [self.insn_addr.eq(fe.insn_addr), fe.insn_data.eq(self.insn_data), fe.prog_base.eq(self.prog_base)]

        # ------------------------------------------------------------ on-chip state
        # one read and one write port per buffer, shared: within a queue by the unit that runs, between the queues
        # by the one whose instruction holds the port (timing.PORT_LOCKS: its owner, set when it starts), and with
        # the host, which reads the buffers while not running; the host also writes the scalar registers (program
        # arguments) while not running
        state = OnChipState(m, cfg, poison=self.poison_collisions)
        unit_sel = {q: Signal(range(max(2, len(UNITS[q]))), name=f"{q}_unit") for q in isa.QUEUES}
        host = host_signature(cfg, "abuf_r", "acc_r", "ereg_r", "reg_r", "reg_w").create(path=("host",))
        # the buffer ports that instructions of several queues use, and each queue's opcodes that use them
        lock_ops = {q: {k: [isa.BY_NAME[op].code for op, ks in timing.PORT_LOCKS.items()
                            if k in ks and isa.BY_NAME[op].queue == q] for k in timing.BUFFER_PORTS}
                    for q in isa.QUEUES}
        shared_ports = [k for k in timing.BUFFER_PORTS if sum(bool(lock_ops[q][k]) for q in isa.QUEUES) > 1]
        owner_reg = {k: Signal(range(len(isa.QUEUES)), name=f"{k}_owner") for k in shared_ports}
        owner = {k: Signal(range(len(isa.QUEUES) + 1), name=f"{k}_owner_now") for k in timing.BUFFER_PORTS}
        for k in timing.BUFFER_PORTS:
            held = owner_reg[k] if k in shared_ports else isa.QUEUES.index(next(q for q in isa.QUEUES if lock_ops[q][k]))
            m.d.comb += owner[k].eq(held if k.endswith("_w") else Mux(self.running, held, len(isa.QUEUES)))
        kinds = host_signature(cfg, *timing.BUFFER_PORTS).members
        for q in isa.QUEUES:
            for n, ops in UNITS[q].items():
                declared = {k for k in timing.BUFFER_PORTS if ports_of(units[n], kinds[k].signature)}
                for op in ops:
                    if not set(timing.PORT_LOCKS[op]) <= declared:  # the owner of a port must be able to drive it
                        raise ValueError(f"timing.PORT_LOCKS[{op!r}] = {timing.PORT_LOCKS[op]!r}: unit {n} has "
                                         f"ports {sorted(declared)!r} only")
        state.attach_groups([*(([units[n] for n in UNITS[q]], unit_sel[q]) for q in isa.QUEUES), ([host], 0)], owner,
                            own=[p for q in isa.QUEUES for n, ops in UNITS[q].items() for op in ops
                                 for k in timing.OWN_PORTS.get(op, ()) for p in ports_of(units[n], kinds[k].signature)])
        m.d.comb += [
            host.abuf_r.addr.eq(self.dbg_abuf_addr), host.abuf_r.en.eq(1), self.dbg_abuf_data.eq(host.abuf_r.data),
            host.acc_r.addr.eq(self.dbg_acc_addr), host.acc_r.en.eq(1), self.dbg_acc_data.eq(host.acc_r.data),
            host.ereg_r.addr.eq(self.dbg_ereg_addr), self.dbg_ereg_data.eq(host.ereg_r.data),
            host.reg_r.addr.eq(self.dbg_reg_addr), self.dbg_reg_data.eq(host.reg_r.data),
            host.reg_w.addr.eq(self.host_reg_addr), host.reg_w.data.eq(self.host_reg_data),
            host.reg_w.en.eq(self.host_reg_we & ~self.running),
        ]
        # the burst ports, through the arbiter
        masters = {n: units[n] for q in DRAM_PRIORITY for n in UNITS[q] if ports_of(units[n], dram_port(cfg))}
        m.submodules.dram_arbiter = arb = DramArbiter(cfg, tuple(masters))
        wiring.connect(m, wiring.flipped(self.dram), arb.mem)
        for n, unit in masters.items():
            wiring.connect(m, getattr(arb, n), unit.dram)

        # ------------------------------------------------------------ queues, tokens, executors
        error = Signal(name="error_flag")
        m.d.comb += self.error.eq(error)
        halt = Signal(name="halt")
        m.d.comb += [halt.eq(error | ~self.running), fe.halt.eq(error)]
        tokens = {}
        for a, b in zip(isa.QUEUES, isa.QUEUES[1:]):
            tokens[(a, b)] = Signal(TOKEN_BITS, name=f"tokens_{a}_to_{b}")
            tokens[(b, a)] = Signal(TOKEN_BITS, name=f"tokens_{b}_to_{a}")
        token_inc = {k: Signal(name=f"push_{k[0]}_to_{k[1]}") for k in tokens}
        token_dec = {k: Signal(name=f"pop_{k[0]}_to_{k[1]}") for k in tokens}
        for k, cnt in tokens.items():
            m.d.sync += cnt.eq(cnt + token_inc[k] - token_dec[k])

        progress = Signal(name="progress")
        exec_start = Signal(name="exec_start")
        exec_idle = []
        busy_q, stall_token_q, stall_port_q, retire_q, computing_q = {}, {}, {}, {}, {}
        stall_lock_q, lock_ok_q = {}, {}
        taking = {q: Signal(name=f"{q}_taking") for q in isa.QUEUES}

        def holds(q, opcode, insn, k):
            """Whether the instruction *insn* of queue *q* (its opcode *opcode*) holds buffer port *k*
            (timing.held_ports)."""
            terms = []
            for op, ks in timing.PORT_LOCKS.items():
                if k in ks and isa.BY_NAME[op].queue == q:
                    term = opcode == isa.BY_NAME[op].code
                    if (field := timing.LOCK_FIELDS.get((op, k))) is not None:
                        term = term & (LAYOUTS[op](insn)[field[0]] != field[1])
                    terms.append(term)
            return Cat(*terms).any() if terms else 0
        head_holds = {q: {} for q in isa.QUEUES}  # the queue's head instruction's ports, and the running one's
        # the ports each queue's running instruction holds: set when it starts, cleared in its completion cycle (as
        # ``busy`` falls), so that a lock reads one flip-flop rather than the executor's state
        cur_holds = {q: {k: Signal(name=f"{q}_holds_{k}") for k in shared_ports} for q in isa.QUEUES}
        could_take, free_run = {}, {}
        head_pc, cur_pc, waiting_token = {}, {}, {}
        fault = []  # (condition, code, info, pc)
        for qi, q in enumerate(isa.QUEUES):
            names = list(UNITS[q])
            queue = self._queue_head(m, q, getattr(fe, q), taking[q], names, shared_ports, holds)
            entry = QUEUE_ENTRY(queue.payload)
            hdr = HEADER_LAYOUT(entry.insn[:HEADER_LAYOUT.size])
            prev = isa.QUEUES[qi - 1] if qi > 0 else None
            nxt = isa.QUEUES[qi + 1] if qi + 1 < len(isa.QUEUES) else None
            ok = 1
            if prev:
                ok = ok & (~hdr.pop_prev | (tokens[(prev, q)] != 0))
            if nxt:
                ok = ok & (~hdr.pop_next | (tokens[(nxt, q)] != 0))
            tok_ok = Signal(name=f"{q}_tokens_ready")
            m.d.comb += tok_ok.eq(ok)
            cur = Signal(HEADER_LAYOUT, name=f"{q}_current_header")
            lock_ok = lock_ok_q[q] = Signal(name=f"{q}_ports_free")  # driven below, once every queue's are declared
            head_holds[q] = queue.holds
            pc = Signal.like(entry.pc, name=f"{q}_current_pc")
            head_pc[q], cur_pc[q] = entry.pc, pc
            sel = unit_sel[q]
            for n in names:
                m.d.comb += units[n].cmd.payload.eq(entry.insn)
            # the one completion protocol: the running unit's done pulse and its fault
            done = Signal(name=f"{q}_unit_done")
            unit_fault = Signal(Fault, name=f"{q}_unit_fault")
            with m.Switch(sel):
                for i, n in enumerate(names):
                    with m.Case(i):
                        m.d.comb += [done.eq(units[n].done.valid), unit_fault.eq(units[n].done.payload)]
            completing = Signal(name=f"{q}_completing")
            unimpl = Signal(name=f"{q}_unimplemented")
            exec_fault = Signal(name=f"{q}_fault")
            busy = Signal(name=f"{q}_busy")
            port_wait = [units[n].port_wait for n in names if "port_wait" in units[n].signature.members]
            busy_q[q], retire_q[q] = busy, completing
            stall_port_q[q] = Signal(name=f"{q}_waiting_port")
            m.d.comb += stall_port_q[q].eq(Cat(*port_wait).any())
            stall_token_q[q] = Signal(name=f"{q}_waiting_token")
            waiting_token[q] = stall_token_q[q]
            stall_lock_q[q] = Signal(name=f"{q}_waiting_lock")

            def take(to, q=q, queue=queue, entry=entry, hdr=hdr, cur=cur, pc=pc, prev=prev, nxt=nxt):
                m.d.comb += [exec_start.eq(1), taking[q].eq(1)]
                m.d.sync += [cur.eq(hdr), pc.eq(entry.pc),
                             *(cur_holds[q][k].eq(head_holds[q][k] if to == "BUSY" else 0) for k in shared_ports)]
                if prev:
                    m.d.comb += token_dec[(prev, q)].eq(hdr.pop_prev)
                if nxt:
                    m.d.comb += token_dec[(nxt, q)].eq(hdr.pop_next)
                m.next = to

            with m.FSM(name=f"{q}_executor") as fsm:
                with m.State("IDLE"), m.If(queue.valid & ~halt):
                    with m.If(~tok_ok):
                        m.d.comb += stall_token_q[q].eq(1)
                    with m.Elif(~lock_ok):
                        m.d.comb += stall_lock_q[q].eq(1)
                    with m.Elif(queue.unit[0]):
                        take("NOP")
                    for i, n in enumerate(names):
                        with m.Elif(queue.unit[1 + i]):
                            m.d.comb += units[n].cmd.valid.eq(1)
                            with m.If(units[n].cmd.ready):
                                m.d.sync += sel.eq(i)
                                for k in shared_ports:
                                    with m.If(head_holds[q][k]):
                                        m.d.sync += owner_reg[k].eq(qi)
                                take("BUSY")
                    with m.Else():
                        m.d.comb += unimpl.eq(1)
                        take("IDLE")
                with m.State("NOP"):
                    m.d.comb += [busy.eq(1), completing.eq(1)]
                    m.next = "IDLE"
                with m.State("BUSY"):
                    m.d.comb += busy.eq(1)
                    with m.If(done):
                        failed = unit_fault != Fault.NONE
                        m.d.comb += [completing.eq(~failed), exec_fault.eq(failed)]
                        m.d.sync += [cur_holds[q][k].eq(0) for k in shared_ports]
                        m.next = "IDLE"
            # whether the head starts in this cycle unless a queue before it in PORT_PRIORITY starts a conflicting one
            # (the executor's IDLE conditions above, the same-cycle locks left out)
            free_run[q] = Signal(name=f"{q}_ports_not_held")
            could_take[q] = Signal(name=f"{q}_could_take")
            unit_ready = queue.unit[0] | ~queue.unit.any()
            for i, n in enumerate(names):
                unit_ready = unit_ready | (queue.unit[1 + i] & units[n].cmd.ready)
            m.d.comb += could_take[q].eq(fsm.ongoing("IDLE") & queue.valid & ~halt & tok_ok & free_run[q] & unit_ready)
            with m.If(completing):
                if prev:
                    m.d.comb += token_inc[(q, prev)].eq(cur.push_prev)
                if nxt:
                    m.d.comb += token_inc[(q, nxt)].eq(cur.push_next)
            exec_idle.append(~busy & ~queue.valid)
            # A unit without a memory port works from on-chip state alone and shows no port beat: on tiny an ATTN of
            # 4 heads of 64 over 64 tokens runs 5,063 cycles, a REQ of the whole accumulator buffer 4,101, longer
            # than the default watchdog with nothing else in flight. While it runs it is progress; the units with a
            # port show theirs in beats, so a memory that never answers stays a stall.
            on_chip = [i for i, n in enumerate(names) if n not in masters]
            computing_q[q] = Signal(name=f"{q}_computing")
            if on_chip:
                m.d.comb += computing_q[q].eq(busy & Cat(*(sel == i for i in on_chip)).any())
            fault.append((unimpl, ERRORS.index("unimplemented"), hdr.opcode, entry.pc))
            fault.append((exec_fault, ERRORS.index("exec"), unit_fault, pc))

        # port locks: a queue's head waits while another queue's instruction holds a buffer port it uses, or while a
        # queue before it in PORT_PRIORITY starts one that does in this cycle (the golden replay's order). That queue
        # is taken as starting when it could start but for its own same-cycle locks, so that no queue's lock waits
        # for another's: the same starts as the replay's wherever the conflicts between the queues are transitive
        # down PORT_PRIORITY (checked)
        _check_flat_priority()
        for q in isa.QUEUES:
            free = 1
            for k in shared_ports:
                for o in isa.QUEUES:
                    if o != q and lock_ops[o][k]:
                        free = free & ~(head_holds[q][k] & cur_holds[o][k])
            m.d.comb += free_run[q].eq(free)
            clash = 0
            for o in timing.PORT_PRIORITY[:timing.PORT_PRIORITY.index(q)]:
                clash = clash | (could_take[o] & Cat(*(head_holds[q][k] & head_holds[o][k] for k in shared_ports
                                                       if lock_ops[o][k])).any())
            m.d.comb += lock_ok_q[q].eq(free_run[q] & ~clash)

        # ------------------------------------------------------------ run control, errors, watchdog
        watchdog = Signal(32, name="watchdog_count")
        stalled_unit = Signal(range(len(STALL_UNITS)), name="stalled_unit")
        stalled_pc = Signal(32, name="stalled_pc")
        m.d.comb += [stalled_unit.eq(STALL_UNITS.index("frontend")), stalled_pc.eq(fe.pc)]
        for q in reversed(isa.QUEUES):
            with m.If(busy_q[q]):
                m.d.comb += [stalled_unit.eq(STALL_UNITS.index(q)), stalled_pc.eq(cur_pc[q])]
        for q in reversed(isa.QUEUES):
            with m.If(waiting_token[q]):
                m.d.comb += [stalled_unit.eq(STALL_UNITS.index(q)), stalled_pc.eq(head_pc[q])]
        beat = Signal(name="port_beat")
        wrote = Signal(name="port_write_beat")
        m.d.comb += [wrote.eq(self.dram.wr.valid & self.dram.wr.ready), beat.eq(self.dram.rd.valid | wrote)]
        # a dispatch is a transfer: a front end holding an instruction for a full queue (whose head may wait for a
        # token that never comes) is no progress
        dispatched = Cat(*(getattr(fe, q).valid & getattr(fe, q).ready for q in isa.QUEUES)).any()
        m.d.comb += progress.eq(exec_start | beat | dispatched | Cat(*retire_q.values()).any()
                                | Cat(*computing_q.values()).any())
        # the watchdog sees progress a cycle late: progress ORs the executors' starts (the queues' heads, the port
        # locks and the units' cmd.ready) and the front end's dispatch, paths that should end in a register of
        # their own rather than run on into the 32-bit count's carry chain
        progress_seen = Signal(name="progress_seen")
        m.d.sync += progress_seen.eq(progress)

        m.d.sync += self.done.eq(0)
        m.d.comb += fe.start.eq(self.start & ~self.running)
        all_idle = Signal(name="queues_drained")
        m.d.comb += all_idle.eq(exec_idle[0] & exec_idle[1] & exec_idle[2])
        ended = Signal(name="end_retired")
        m.d.comb += ended.eq(self.running & ~error & fe.end_seen & all_idle)
        with m.If(self.start & ~self.running):
            m.d.sync += [self.running.eq(1), error.eq(0), self.error_code.eq(0), self.error_info.eq(0),
                         self.error_pc.eq(0), watchdog.eq(0)]
            for cnt in tokens.values():
                m.d.sync += cnt.eq(0)
        with m.Elif(self.running):
            m.d.sync += watchdog.eq(Mux(progress_seen, 0, watchdog + 1))
            with m.If(ended):
                m.d.sync += [self.running.eq(0), self.done.eq(1)]
            with m.Elif(error):
                m.d.sync += [self.running.eq(0), self.done.eq(1)]
            with m.Elif(fe.error):
                m.d.sync += [error.eq(1), self.error_code.eq(ERRORS.index("illegal")), self.error_info.eq(fe.error_reason),
                             self.error_pc.eq(fe.pc)]
            with m.Elif((self.watchdog_cycles != 0) & (watchdog >= self.watchdog_cycles)):
                m.d.sync += [error.eq(1), self.error_code.eq(ERRORS.index("watchdog")), self.error_info.eq(stalled_unit),
                             self.error_pc.eq(stalled_pc)]
            for cond, code, info, epc in fault:
                with m.Elif(cond):
                    m.d.sync += [error.eq(1), self.error_code.eq(code), self.error_info.eq(info), self.error_pc.eq(epc)]

        # ------------------------------------------------------------ counters
        ctr = {name: Signal(64, name=f"counter_{name}") for name in COUNTERS}
        # a write beat's strobes are registered before their count: they come through the arbiter from the writer's
        # byte-mask logic (STORE's beat geometry). The count lands a cycle later, always before the run ends (the
        # writer's completion and the queues' drain come after its last beat)
        wrote_strb = Signal(pb, name="write_beat_strobes")
        m.d.sync += wrote_strb.eq(Mux(wrote, self.dram.wr.payload.strb, 0))
        # so are the completions before the instruction count: a unit's done pulse (LDROW's requantizer state) ran
        # on through the executor's completion into the count's 64-bit carry chain. A completion lands a cycle
        # later, counted also in the cycle after the run stops (the last one before END's comes at least a cycle
        # before it, so the count is whole when ``done`` rises)
        retired_seen = Signal(2, name="retired_seen")
        m.d.sync += retired_seen.eq(Mux(self.running, sum(retire_q[q] for q in isa.QUEUES), 0))
        with m.If(self.start & ~self.running):
            for c in ctr.values():
                m.d.sync += c.eq(0)
        with m.Else():
            m.d.sync += ctr["instructions"].eq(ctr["instructions"] + retired_seen + ended)
        with m.If(self.running):
            strb_bytes = balanced_sum(wrote_strb[i] for i in range(pb))
            m.d.sync += [
                ctr["cycles"].eq(ctr["cycles"] + 1),
                ctr["bytes_read"].eq(ctr["bytes_read"] + Mux(self.dram.rd.valid, pb, 0)),
                ctr["bytes_written"].eq(ctr["bytes_written"] + strb_bytes),
                ctr["insn_bytes_read"].eq(ctr["insn_bytes_read"] + Mux(fe.fetch, isa.INSN_BYTES, 0)),
            ]
            for q in isa.QUEUES:
                m.d.sync += [ctr[f"busy_{q}"].eq(ctr[f"busy_{q}"] + busy_q[q]),
                             ctr[f"stall_token_{q}"].eq(ctr[f"stall_token_{q}"] + stall_token_q[q]),
                             ctr[f"stall_port_{q}"].eq(ctr[f"stall_port_{q}"] + stall_port_q[q]),
                             ctr[f"stall_lock_{q}"].eq(ctr[f"stall_lock_{q}"] + stall_lock_q[q])]
        with m.Switch(self.ctr_addr):
            for i, name in enumerate(COUNTERS):
                with m.Case(i):
                    m.d.comb += self.ctr_data.eq(ctr[name])
        return m

    def _queue_head(self, m, q, dispatch, taking, names, shared_ports, holds):
        """Queue *q*: a FIFO behind a registered head, whose decode (the buffer ports it holds, the unit that takes
        it) is registered with it, so that the executors' starts and the port locks between the queues begin at
        flip-flops rather than at the FIFO's LUT-RAM read and an opcode compare.

        The head and the FIFO's ``QUEUE_DEPTH - 1`` entries hold ``QUEUE_DEPTH`` instructions, as one FIFO did. The
        head loads while it is empty or *taking*: the FIFO's oldest entry, or, with the FIFO empty, the front end's
        dispatch of the same cycle, so an instruction can start the cycle after its dispatch, as from the FIFO's
        own read port (no cycle changes).

        Returns
        -------
        SimpleNamespace
            ``valid``, ``payload`` (:data:`QUEUE_ENTRY`), ``holds`` (the shared port -> whether the head holds it)
            and ``unit`` (bit 0: a NOP, bit 1 + i: an opcode of unit ``names[i]``; none: unimplemented).
        """
        fifo = SyncFIFO(width=QUEUE_ENTRY.size, depth=QUEUE_DEPTH - 1)
        m.submodules[f"{q}_queue"] = fifo
        head = SimpleNamespace(valid=Signal(name=f"{q}_head_valid"), payload=Signal(QUEUE_ENTRY, name=f"{q}_head"),
                               holds={k: Signal(name=f"{q}_head_holds_{k}") for k in shared_ports},
                               unit=Signal(1 + len(names), name=f"{q}_head_unit"))
        load = Signal(name=f"{q}_head_load")
        bypass = Signal(name=f"{q}_head_bypass")  # the FIFO is empty while the head is
        incoming = Signal(QUEUE_ENTRY, name=f"{q}_head_next")
        m.d.comb += [
            load.eq(~head.valid | taking), bypass.eq(load & ~fifo.r_rdy),
            fifo.w_data.eq(dispatch.payload), fifo.w_en.eq(dispatch.valid & ~bypass), dispatch.ready.eq(fifo.w_rdy),
            fifo.r_en.eq(load),
            incoming.eq(Mux(fifo.r_rdy, fifo.r_data, dispatch.payload.as_value())),
        ]
        hdr = HEADER_LAYOUT(incoming.insn[:HEADER_LAYOUT.size])
        is_op = [hdr.opcode == isa.BY_NAME["NOP"].code,
                 *(Cat(*(hdr.opcode == isa.BY_NAME[o].code for o in UNITS[q][n])).any() for n in names)]
        with m.If(load):
            m.d.sync += [head.valid.eq(fifo.r_rdy | dispatch.valid), head.payload.eq(incoming),
                         *(head.holds[k].eq(holds(q, hdr.opcode, incoming.insn, k)) for k in shared_ports),
                         head.unit.eq(Cat(*is_op))]
        return head

    def _gate(self, m, name, unit):
        """``gate_<name>``: whether the unit's own clock domain (``<name>_gated``) must see the next edge: while it is
        commanded or busy and for :data:`GATE_DRAIN` cycles after (its ``done`` register and pipeline tails)."""
        drain = Signal(range(GATE_DRAIN + 1), name=f"{name}_gate_drain")
        active = Signal(name=f"{name}_gate_active")
        m.d.comb += [active.eq(unit.busy | unit.cmd.valid), getattr(self, f"gate_{name}").eq(active | (drain != 0))]
        m.d.sync += drain.eq(Mux(active, GATE_DRAIN, Mux(drain != 0, drain - 1, 0)))

