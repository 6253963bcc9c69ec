"""The overlay processor: front end, three command queues with dependency tokens, execution units, on-chip state.

Decoupled access/execute as in VTA: the front end dispatches each instruction to the load, compute or store
queue; each queue executes in order. A queue's head instruction starts only when the tokens its ``pop_*`` flags
ask for are available (token counters between load<->compute and compute<->store), and pushes the tokens of its
``push_*`` flags when it completes, exactly the order that ``sim/golden.py``'s ``_Timing`` replays. END waits
until every queue has drained, then pulses ``done``.
"""

from __future__ import annotations

from amaranth.hdl import Array, Module, Mux, Signal, unsigned
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from kvoverlay import isa
from kvoverlay import numerics as nx

from .attention import AttentionEngine, AttnError
from .dram import DramArbiter, dram_port
from .frontend import QUEUE_ENTRY_BITS, Frontend
from .gemv_unit import GemvUnit
from .isa_layout import HEADER_LAYOUT
from .kv_buffer import KvBuffer
from .ldrow_unit import LdrowUnit
from .load_unit import LoadUnit
from .ports import EREG_SHAPE, EXEC_ERRORS, abuf_lanes
from .req_unit import ReqUnit
from .store_unit import StoreUnit
from .vector_unit import VecError, VectorUnit

__all__ = ["COUNTERS", "ERRORS", "QUEUE_DEPTH", "STALL_UNITS", "UNITS", "Overlay"]

#: ``error_code`` values of the overlay (index = code). ``error_info`` holds: for ``illegal`` the reason
#: (hw.frontend.ILLEGAL_REASONS), for ``unimplemented`` the opcode, for ``exec`` the unit's fault
#: (hw.ports.EXEC_ERRORS), for ``watchdog`` the stalled unit (STALL_UNITS).
ERRORS = ("none", "illegal", "unimplemented", "exec", "watchdog")
#: Units a watchdog error can name.
STALL_UNITS = (*isa.QUEUES, "frontend")
#: Host-readable counters, by ``ctr_addr``.
COUNTERS = ("cycles", "instructions", "bytes_read", "bytes_written", "insn_bytes_read",
            *(f"busy_{q}" for q in isa.QUEUES), *(f"stall_token_{q}" for q in isa.QUEUES),
            *(f"stall_port_{q}" for q in isa.QUEUES))
#: Execution units per queue and the opcodes they take. An opcode of a queue that no unit takes stops the run
#: with the ``unimplemented`` error naming the opcode (none is left in this build; the path stays for
#: reduced builds). REQ runs on the dedicated REQ unit, not on the vector unit's copy of it.
#: Plugging a unit in: instantiate it in ``Overlay.elaborate`` (``units``), list its opcodes here and its memory
#: ports in PORT_MAP; register ports named ``ereg_r*``, ``ereg_w*``, ``reg_r*``, ``reg_w*`` connect by name.
UNITS = {
    "load": {"load": ("LOAD",), "ldrow": ("LDROW",)},
    "compute": {"gemv": ("GEMV",), "req": ("REQ",),
                "vector": ("VADD", "VMUL", "VSCALE", "ACT", "NORM", "ROPE", "ARGMAX"),
                "attention": ("KVAPPEND", "ATTN")},
    "store": {"store": ("STORE", "STACC")},
}
#: The memory ports each queue's units share, and the unit ports that drive them; a unit not listed for a port
#: leaves it idle while it runs. The compute queue has two activation-buffer read ports (the vector unit's
#: two operands, the attention engine's word pair).
PORT_MAP = {
    "load": {"abuf_w": [("load", "abuf_w"), ("ldrow", "abuf_w")]},
    "compute": {"abuf_r": [("gemv", "abuf_r"), ("vector", "abuf_r_a"), ("attention", "abuf_r_0")],
                "abuf_r2": [("vector", "abuf_r_b"), ("attention", "abuf_r_1")],
                "abuf_w": [("req", "abuf_w"), ("vector", "abuf_w"), ("attention", "abuf_w")],
                "acc_r": [("gemv", "acc_r"), ("req", "acc_r")],
                "acc_w": [("gemv", "acc_w"), ("attention", "acc_w")]},
    "store": {"abuf_r": [("store", "abuf_r")], "acc_r": [("store", "acc_r")]},
}
#: Where the vector unit's and the attention engine's own fault codes land in :data:`hw.ports.EXEC_ERRORS`.
FAULT_MAP = {
    "vector": {VecError.OPCODE: "opcode", VecError.ALIGN: "unaligned", VecError.BOUNDS: "out_of_range",
               VecError.SHAPE: "shape", VecError.EXP_OVERFLOW: "overflow"},
    "attention": {AttnError.OPCODE: "opcode", AttnError.GEOMETRY: "shape", AttnError.KV_RANGE: "kv_range",
                  AttnError.SPAN: "out_of_range", AttnError.ALIGN: "unaligned", AttnError.OVERFLOW: "overflow",
                  AttnError.DIVIDE: "divide"},
}
#: Entries of each command queue.
QUEUE_DEPTH = 4
TOKEN_BITS = 8


class _PortView:
    """A unit's memory or register port given as loose signals, for units whose ports are flat members.

    Quacks like a port of :mod:`hw.ports` for :func:`_share` and the by-name register wiring: attributes per
    member and a ``members`` dict of flows (Out: driven by the unit, In: driven by the top).
    """

    def __init__(self, **members):
        self.members = {}
        for name, (signal, flow) in members.items():
            setattr(self, name, signal)
            self.members[name] = flow


def _members(port):
    if isinstance(port, _PortView):
        return port.members
    return {name: member.flow for name, member in port.signature.members.items()}


def _share(m, sel, target, sources):
    """Drive memory port *target* from the unit port that *sel* picks among *sources* [(unit index, port)].

    The unit port's Out members (address, enables, write data) are multiplexed; its In members (read data)
    fan out to every source. A member only some sources have (a read enable) keeps the target's default
    (enabled) for the others.
    """
    names = {}
    for _, port in sources:
        for name, flow in _members(port).items():
            names.setdefault(name, flow)
    for name, flow in names.items():
        value = getattr(target, name)
        have = [(index, port) for index, port in sources if name in _members(port)]
        if flow == Out:
            with m.Switch(sel):
                for index, port in have:
                    with m.Case(index):
                        m.d.comb += value.eq(getattr(port, name))
        else:
            for _, port in have:
                m.d.comb += getattr(port, name).eq(value)


def _vector_ports(v):
    """The vector unit's flat members as ports (its acc read is REQ's, which the REQ unit runs instead)."""
    return {
        "abuf_r_a": _PortView(addr=(v.abuf_rd_a_addr, Out), data=(v.abuf_rd_a_data, In)),
        "abuf_r_b": _PortView(addr=(v.abuf_rd_b_addr, Out), data=(v.abuf_rd_b_data, In)),
        "abuf_w": _PortView(addr=(v.abuf_wr_addr, Out), data=(v.abuf_wr_data, Out), en=(v.abuf_wr_en, Out)),
        "ereg_ra": _PortView(addr=(v.ereg_rd_a_addr, Out), data=(v.ereg_rd_a_data, In)),
        "ereg_rb": _PortView(addr=(v.ereg_rd_b_addr, Out), data=(v.ereg_rd_b_data, In)),
        "ereg_rc": _PortView(addr=(v.ereg_rd_c_addr, Out), data=(v.ereg_rd_c_data, In)),
        "ereg_w": _PortView(addr=(v.ereg_wr_addr, Out), data=(v.ereg_wr_data, Out), en=(v.ereg_wr_en, Out)),
        "reg_w": _PortView(addr=(v.reg_wr_addr, Out), data=(v.reg_wr_data, Out), en=(v.reg_wr_en, Out)),
    }


def _attention_ports(a):
    """The attention engine's flat members as ports."""
    return {
        "abuf_r_0": _PortView(addr=(a.abuf_raddr0, Out), data=(a.abuf_rdata0, In)),
        "abuf_r_1": _PortView(addr=(a.abuf_raddr1, Out), data=(a.abuf_rdata1, In)),
        "abuf_w": _PortView(addr=(a.abuf_waddr, Out), data=(a.abuf_wdata, Out), en=(a.abuf_wmask, Out)),
        "acc_w": _PortView(addr=(a.acc_waddr, Out), data=(a.acc_wdata, Out), en=(a.acc_we, Out)),
        "ereg_r0": _PortView(addr=(a.ereg_raddr0, Out), data=(a.ereg_rdata0, In)),
        "ereg_r1": _PortView(addr=(a.ereg_raddr1, Out), data=(a.ereg_rdata1, In)),
        "ereg_w": _PortView(addr=(a.ereg_waddr, Out), data=(a.ereg_wdata, Out), en=(a.ereg_we, Out)),
        "reg_r": _PortView(addr=(a.reg_raddr, Out), data=(a.reg_rdata, In)),
    }


class Overlay(wiring.Component):
    """The overlay top, generic over the :class:`OverlayConfig`.

    Parameters
    ----------
    config : OverlayConfig

    Attributes
    ----------
    start : In(1)
        Pulse to run the program at instruction index ``prog_base`` (byte address / 16).
    prog_base : In
    watchdog_cycles : In(32)
        A run that makes no progress (no dispatch, start, completion or port beat) for this many cycles stops
        with the ``watchdog`` error naming the stalled unit; 0 disables the watchdog.
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
    """

    def __init__(self, config):
        if config.port_bits < 64:
            raise ValueError(f"port_bits={config.port_bits}: the overlay needs a port of at least 64 bits")
        self.config = config
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
        })

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        pb = cfg.port_bytes
        lanes = self.lanes

        # ------------------------------------------------------------ on-chip state
        m.submodules.abuf = abuf = Memory(shape=unsigned(16 * lanes), depth=self.abuf_depth, init=[])
        m.submodules.accbuf = accbuf = Memory(shape=unsigned(64), depth=cfg.acc_buffer_words, init=[])
        abuf_w_load = abuf.write_port(granularity=16)
        abuf_w_compute = abuf.write_port(granularity=16)
        abuf_r_compute = abuf.read_port()
        abuf_r2_compute = abuf.read_port()
        abuf_r_store = abuf.read_port()
        abuf_r_dbg = abuf.read_port()
        acc_w_compute = accbuf.write_port()
        acc_r_compute = accbuf.read_port()
        acc_r_store = accbuf.read_port()
        acc_r_dbg = accbuf.read_port()
        eregs = Array(Signal(EREG_SHAPE, init=nx.EXP_MIN, name=f"ereg{i}") for i in range(isa.NUM_EREGS))
        regs = Array(Signal(32, name=f"reg{i}") for i in range(isa.NUM_REGS))
        m.d.comb += [
            abuf_r_dbg.addr.eq(self.dbg_abuf_addr), self.dbg_abuf_data.eq(abuf_r_dbg.data),
            acc_r_dbg.addr.eq(self.dbg_acc_addr), self.dbg_acc_data.eq(acc_r_dbg.data),
            self.dbg_ereg_data.eq(eregs[self.dbg_ereg_addr]), self.dbg_reg_data.eq(regs[self.dbg_reg_addr]),
        ]
        with m.If(self.host_reg_we & ~self.running):
            m.d.sync += regs[self.host_reg_addr].eq(self.host_reg_data)

        # ------------------------------------------------------------ units
        m.submodules.frontend = fe = Frontend(cfg)
        m.submodules.load_unit = load = LoadUnit(cfg)
        m.submodules.ldrow_unit = ldrow = LdrowUnit(cfg)
        m.submodules.gemv_unit = gemv = GemvUnit(cfg)
        m.submodules.req_unit = req = ReqUnit(cfg)
        m.submodules.store_unit = store = StoreUnit(cfg)
        m.submodules.vector_unit = vec = VectorUnit(cfg)
        m.submodules.attention_engine = attn = AttentionEngine(cfg)
        # the KV buffer persists across runs: a decode session appends one token per run
        m.submodules.kv_buffer = kvbuf = KvBuffer(cfg)
        wiring.connect(m, attn.kv, kvbuf.port)
        units = {"load": load, "ldrow": ldrow, "gemv": gemv, "req": req, "store": store, "vector": vec,
                 "attention": attn}
        # every unit's ports by name: component members, or the flat members of the vector and attention units
        unit_ports = {n: {name: getattr(u, name) for name in u.signature.members} for n, u in units.items()}
        unit_ports["vector"] = _vector_ports(vec)
        unit_ports["attention"] = _attention_ports(attn)
        m.submodules.dram_arbiter = arb = DramArbiter(cfg, ("store", "load", "ldrow", "gemv"))
        wiring.connect(m, wiring.flipped(self.dram), arb.mem)
        wiring.connect(m, arb.store, store.dram)
        wiring.connect(m, arb.load, load.dram)
        wiring.connect(m, arb.ldrow, ldrow.dram)
        wiring.connect(m, arb.gemv, gemv.dram)
        m.d.comb += [self.insn_addr.eq(fe.insn_addr), fe.insn_data.eq(self.insn_data), fe.prog_base.eq(self.prog_base)]

        # each queue's memory ports are shared by its units, driven by the unit that runs (see PORT_MAP)
        queue_ports = {
            "load": {"abuf_w": abuf_w_load},
            "compute": {"abuf_r": abuf_r_compute, "abuf_r2": abuf_r2_compute, "abuf_w": abuf_w_compute,
                        "acc_r": acc_r_compute, "acc_w": acc_w_compute},
            "store": {"abuf_r": abuf_r_store, "acc_r": acc_r_store},
        }
        unit_sel = {q: Signal(range(max(2, len(UNITS[q]))), name=f"{q}_unit") for q in isa.QUEUES}
        for q, ports in PORT_MAP.items():
            names = list(UNITS[q])
            for target, sources in ports.items():
                _share(m, unit_sel[q], queue_ports[q][target],
                       [(names.index(unit), unit_ports[unit][port]) for unit, port in sources])
        # register ports by name: ereg_r* / reg_r* read combinationally, ereg_w* / reg_w* write at the clock edge
        # (two queues never write one register at once: that is a race the golden model reports)
        ereg_writers, reg_writers = [], []
        for ports in unit_ports.values():
            for name, port in ports.items():
                if name.startswith("ereg_r"):
                    m.d.comb += port.data.eq(eregs[port.addr])
                elif name.startswith("reg_r"):
                    m.d.comb += port.data.eq(regs[port.addr])
                elif name.startswith("ereg_w"):
                    ereg_writers.append(port)
                elif name.startswith("reg_w"):
                    reg_writers.append(port)
        for w in ereg_writers:
            with m.If(w.en):
                m.d.sync += eregs[w.addr].eq(w.data)
        for w in reg_writers:
            with m.If(w.en):
                m.d.sync += regs[w.addr].eq(w.data)

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
        busy_q, stall_token_q, stall_port_q, retire_q = {}, {}, {}, {}
        head_pc, cur_pc, waiting_token = {}, {}, {}
        fault = []  # (condition, code, info, pc)
        port_wait = {"load": load.port_wait | ldrow.port_wait, "compute": gemv.port_wait, "store": store.port_wait}
        for qi, q in enumerate(isa.QUEUES):
            fifo = SyncFIFO(width=QUEUE_ENTRY_BITS, depth=QUEUE_DEPTH)
            m.submodules[f"{q}_queue"] = fifo
            fq = getattr(fe, q)
            m.d.comb += [fifo.w_en.eq(fq.w_en), fifo.w_data.eq(fq.w_data), fq.w_rdy.eq(fifo.w_rdy)]
            head = fifo.r_data[:isa.INSN_BITS]
            hdr = HEADER_LAYOUT(head[:HEADER_LAYOUT.size])
            prev = isa.QUEUES[qi - 1] if qi > 0 else None
            nxt = isa.QUEUES[qi + 1] if qi + 1 < len(isa.QUEUES) else None
            ok = 1
            if prev:
                ok = ok & (~hdr.pop_prev | (tokens[(prev, q)] != 0))
            if nxt:
                ok = ok & (~hdr.pop_next | (tokens[(nxt, q)] != 0))
            tok_ok = Signal(name=f"{q}_tokens_ready")
            m.d.comb += tok_ok.eq(ok)
            cur = Signal(isa.INSN_BITS, name=f"{q}_current_insn")
            cur_hdr = HEADER_LAYOUT(cur[:HEADER_LAYOUT.size])
            pc = Signal(32, name=f"{q}_current_pc")
            head_pc[q], cur_pc[q] = fifo.r_data[isa.INSN_BITS:], pc
            names = list(UNITS[q])
            sel = unit_sel[q]
            starts = {n: Signal(name=f"{q}_start_{n}") for n in names}
            for n in names:
                m.d.comb += [units[n].insn.eq(head), units[n].start.eq(starts[n])]
            unit_done = Signal(name=f"{q}_unit_done")
            unit_error = Signal(name=f"{q}_unit_error")
            unit_code = Signal(range(len(EXEC_ERRORS)), name=f"{q}_unit_fault")
            with m.Switch(sel):
                for i, n in enumerate(names):
                    with m.Case(i):
                        m.d.comb += [unit_done.eq(units[n].done), unit_error.eq(units[n].error)]
                        if n in FAULT_MAP:
                            with m.Switch(units[n].error_code):
                                for own, common in FAULT_MAP[n].items():
                                    with m.Case(own):
                                        m.d.comb += unit_code.eq(EXEC_ERRORS.index(common))
                        else:
                            m.d.comb += unit_code.eq(units[n].error_code)
            completing = Signal(name=f"{q}_completing")
            unimpl = Signal(name=f"{q}_unimplemented")
            exec_fault = Signal(name=f"{q}_fault")
            busy = Signal(name=f"{q}_busy")
            busy_q[q], stall_port_q[q], retire_q[q] = busy, port_wait[q], completing
            stall_token_q[q] = Signal(name=f"{q}_waiting_token")
            waiting_token[q] = stall_token_q[q]
            with m.FSM(name=f"{q}_executor"):
                with m.State("IDLE"), m.If(fifo.r_rdy & ~halt):
                    with m.If(tok_ok):
                        m.d.comb += [fifo.r_en.eq(1), exec_start.eq(1)]
                        m.d.sync += [cur.eq(head), pc.eq(head_pc[q])]
                        if prev:
                            m.d.comb += token_dec[(prev, q)].eq(hdr.pop_prev)
                        if nxt:
                            m.d.comb += token_dec[(nxt, q)].eq(hdr.pop_next)
                        with m.Switch(hdr.opcode):
                            with m.Case(isa.BY_NAME["NOP"].code):
                                m.next = "NOP"
                            for i, n in enumerate(names):
                                codes = [isa.BY_NAME[o].code for o in UNITS[q][n]]
                                with m.Case(*codes):
                                    m.d.comb += starts[n].eq(1)
                                    m.d.sync += sel.eq(i)
                                    m.next = "BUSY"
                            with m.Default():
                                m.d.comb += unimpl.eq(1)
                    with m.Else():
                        m.d.comb += stall_token_q[q].eq(1)
                with m.State("NOP"):
                    m.d.comb += [busy.eq(1), completing.eq(1)]
                    m.next = "IDLE"
                with m.State("BUSY"):
                    m.d.comb += busy.eq(1)
                    with m.If(unit_done):
                        m.d.comb += [completing.eq(~unit_error), exec_fault.eq(unit_error)]
                        m.next = "IDLE"
            with m.If(completing):
                if prev:
                    m.d.comb += token_inc[(q, prev)].eq(cur_hdr.push_prev)
                if nxt:
                    m.d.comb += token_inc[(q, nxt)].eq(cur_hdr.push_next)
            exec_idle.append(~busy & ~fifo.r_rdy)
            fault.append((unimpl, ERRORS.index("unimplemented"), hdr.opcode, head_pc[q]))
            fault.append((exec_fault, ERRORS.index("exec"), unit_code, pc))

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
        m.d.comb += beat.eq(self.dram.rd_valid | (self.dram.wr_valid & self.dram.wr_ready))
        m.d.comb += progress.eq(exec_start | beat | retire_q["load"] | retire_q["compute"] | retire_q["store"]
                                | fe.load.w_en | fe.compute.w_en | fe.store.w_en)

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
            m.d.sync += watchdog.eq(Mux(progress, 0, watchdog + 1))
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
        with m.If(self.start & ~self.running):
            for c in ctr.values():
                m.d.sync += c.eq(0)
        with m.Elif(self.running):
            strb_bytes = sum(self.dram.wr_strb[i] for i in range(pb))
            retired = sum(retire_q[q] for q in isa.QUEUES)
            m.d.sync += [
                ctr["cycles"].eq(ctr["cycles"] + 1),
                ctr["instructions"].eq(ctr["instructions"] + retired + ended),
                ctr["bytes_read"].eq(ctr["bytes_read"] + Mux(self.dram.rd_valid, pb, 0)),
                ctr["bytes_written"].eq(ctr["bytes_written"] + Mux(self.dram.wr_valid & self.dram.wr_ready, strb_bytes, 0)),
                ctr["insn_bytes_read"].eq(ctr["insn_bytes_read"] + Mux(fe.fetch, isa.INSN_BYTES, 0)),
            ]
            for q in isa.QUEUES:
                m.d.sync += [ctr[f"busy_{q}"].eq(ctr[f"busy_{q}"] + busy_q[q]),
                             ctr[f"stall_token_{q}"].eq(ctr[f"stall_token_{q}"] + stall_token_q[q]),
                             ctr[f"stall_port_{q}"].eq(ctr[f"stall_port_{q}"] + stall_port_q[q])]
        with m.Switch(self.ctr_addr):
            for i, name in enumerate(COUNTERS):
                with m.Case(i):
                    m.d.comb += self.ctr_data.eq(ctr[name])
        return m

