"""The ULX3S's SDRAM: a controller, the width adapter to the overlay's burst port, and a checking simulation model.

The ULX3S carries one 16-bit SDR SDRAM (32 MB: IS42S16160-class, 4 banks x 8192 rows x 512 columns; amaranth-boards'
``sdram`` resource: 13 address bits, 2 bank bits, 16 ``dq``, 2 ``dqm``, ``cke``/``cs_n``/``ras_n``/``cas_n``/
``we_n``/``clk``). Three components:

- :class:`SdramController`: init (wait, PRECHARGE ALL, two AUTO REFRESH, MODE REGISTER SET with burst length 1),
  periodic auto refresh that interrupts a burst, and bursts of 16-bit words of any length. The mode's burst length
  is 1 and a READ or WRITE is issued every cycle, so a burst streams one word per cycle within a row; rows stay open
  (one per bank) until a miss in that bank or the next refresh, and sequential addresses run through the 4 banks'
  rows in turn (the word address is ``row, bank, column``).
- :class:`SdramMemory`: the overlay's memory behind :func:`hw.dram.dram_port` from the SDRAM: each port word is
  ``port_bits // 16`` SDRAM words, so a read beat arrives on ``rd`` when its last word does (the overlay takes
  beats whenever ``rd.valid`` is high; it never assumed a fixed latency); an instruction window in block RAM (the top
  :data:`INSN_WINDOW_BYTES` of the memory, written through by the host) serves the front end's latency-1 fetch.
- :class:`SdramModel`: a cycle-accurate model of the part for simulation. It stores what is written, returns it
  CAS latency cycles after a READ, and records the first violation of the part's rules in ``error``
  (:class:`SdramError`): a command during the power-up wait, ACT to an open bank, tRP/tRC/tRRD/tRFC/tMRD before
  ACT, READ/WRITE to a closed bank or before tRCD, PRECHARGE before tRAS or tWR, REFRESH with a bank open, a
  refresh interval over tREFI, a mode register other than burst length 1 and the model's CAS latency, the
  controller driving ``dq`` while the part does.

Timing comes from :data:`PART` (the slowest of the ULX3S's SDRAM fits, in ns) and the clock, rounded up to
cycles: :func:`sdram_timing`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

from amaranth.hdl import Cat, Module, Mux, Signal, unsigned
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from kvoverlay.hw.arith import one_hot_select
from kvoverlay.hw.dram import dram_port

from kvoverlay import isa, link

from .memory import host_memory_port

__all__ = ["INSN_WINDOW_BYTES", "PART", "SdramCmd", "SdramController", "SdramError", "SdramMemory", "SdramModel",
           "SdramTiming", "sdram_pins", "sdram_timing"]

#: Bytes at the top of an SDRAM board memory that an instruction block RAM mirrors (the program goes there).
INSN_WINDOW_BYTES = link.SDRAM_INSN_WINDOW_BYTES

#: The ULX3S SDRAM's datasheet figures, ns (IS42S16160 -7 / AS4C16M16SA -7 class, the slower of each): row to
#: column delay, precharge, row cycle, row active (min), write recovery, refresh cycle, ACT to ACT of another bank,
#: the average refresh interval (64 ms / 8192 rows), the power-up wait; mode-register cycles and the highest clock
#: for CAS latency 2.
PART = {"t_rcd": 20.0, "t_rp": 20.0, "t_rc": 66.0, "t_ras": 44.0, "t_wr": 15.0, "t_rfc": 66.0, "t_rrd": 15.0,
        "t_refi": 64e6 / 8192, "t_init": 200e3, "t_mrd_cycles": 2, "cl2_max_mhz": 100.0}


@dataclass(frozen=True)
class SdramTiming:
    """The part's geometry and timing in clock cycles.

    ``init`` is the power-up wait, ``refi`` the longest interval between two AUTO REFRESH commands.
    """

    cl: int
    t_rcd: int
    t_rp: int
    t_rc: int
    t_ras: int
    t_wr: int
    t_rfc: int
    t_rrd: int
    t_mrd: int
    refi: int
    init: int
    col_bits: int = 9
    row_bits: int = 13
    bank_bits: int = 2

    @property
    def addr_bits(self) -> int:
        """Bits of a 16-bit word address (``row, bank, column``)."""
        return self.row_bits + self.bank_bits + self.col_bits

    @property
    def refresh_period(self) -> int:
        """Cycles between the controller's refresh requests: tREFI less the longest wait before it can refresh."""
        return self.refi - (self.t_ras + self.t_wr + self.t_rp + self.cl + 8)

    def replace(self, **changes) -> SdramTiming:
        return replace(self, **changes)


def sdram_timing(clock_mhz: float, **overrides) -> SdramTiming:
    """:data:`PART`'s figures at *clock_mhz*, each rounded up to whole cycles; *overrides* replace fields
    (a simulation shortens ``init`` and ``refi``: the model checks the controller against the same figures)."""
    if not clock_mhz > 0:
        raise ValueError(f"clock_mhz must be positive, got {clock_mhz!r}")
    ns = 1e3 / clock_mhz

    def cyc(t):
        return max(1, math.ceil(t / ns - 1e-9))

    t = SdramTiming(cl=2 if clock_mhz <= PART["cl2_max_mhz"] else 3,
                    t_rcd=cyc(PART["t_rcd"]), t_rp=cyc(PART["t_rp"]), t_rc=cyc(PART["t_rc"]),
                    t_ras=cyc(PART["t_ras"]), t_wr=max(2, cyc(PART["t_wr"])), t_rfc=cyc(PART["t_rfc"]),
                    t_rrd=cyc(PART["t_rrd"]), t_mrd=PART["t_mrd_cycles"], refi=int(PART["t_refi"] / ns),
                    init=cyc(PART["t_init"]))
    return t.replace(**overrides)


class SdramCmd(enum.Enum, shape=3):
    """A command as ``ras_n, cas_n, we_n`` (most significant first), with ``cs_n`` low."""

    MRS = 0b000
    REF = 0b001
    PRE = 0b010
    ACT = 0b011
    WRITE = 0b100
    READ = 0b101
    NOP = 0b111


class SdramError(enum.Enum, shape=4):
    """The first rule the controller broke, as :class:`SdramModel` saw it (``NONE``: none)."""

    NONE = 0
    INIT = 1       # a command before the power-up wait ended
    MODE = 2       # ACT/READ/WRITE before a mode register set, or a mode other than BL 1 and the model's CL
    ACT_OPEN = 3   # ACT to a bank whose row is open
    T_RP = 4       # ACT or REF too soon after a precharge
    T_RC = 5       # ACT too soon after the bank's last ACT, or after a REF (tRFC)
    T_RRD = 6      # ACT too soon after another bank's ACT
    CLOSED = 7     # READ/WRITE to a bank with no open row
    T_RCD = 8      # READ/WRITE too soon after the ACT
    T_RAS = 9      # PRE too soon after the ACT
    T_WR = 10      # PRE too soon after a WRITE
    REF_OPEN = 11  # REF with a bank open
    REFRESH = 12   # more than tREFI cycles between two REFs
    BUS = 13       # the controller drives dq while the part drives read data
    T_MRD = 14     # a command too soon after MRS


def sdram_pins(timing: SdramTiming) -> wiring.Signature:
    """The SDRAM's pins, seen from the controller (``dq`` split into out, output enable and in)."""
    return wiring.Signature({
        "a": Out(13), "ba": Out(timing.bank_bits), "cs_n": Out(1, init=1), "ras_n": Out(1, init=1),
        "cas_n": Out(1, init=1), "we_n": Out(1, init=1), "cke": Out(1), "dqm": Out(2, init=3),
        "dq_o": Out(16), "dq_oe": Out(1), "dq_i": In(16),
    })


def _mode_word(cl: int) -> int:
    # burst length 1 (A2:0 = 0), sequential (A3 = 0), CAS latency in A6:4, standard operation, programmed write burst
    return cl << 4


def _burst_request(timing: SdramTiming, len_bits: int) -> data.StructLayout:
    return data.StructLayout({"addr": timing.addr_bits, "len": len_bits, "write": 1})


class _Countdown:
    """A down-counter that says when a timing rule allows a command: ``arm(m, n)`` at the event, ``ok`` n cycles later."""

    def __init__(self, m, limit: int, name: str):
        self.sig = Signal(range(max(limit, 1) + 1), name=name)
        self.ok = self.sig == 0
        with m.If(~self.ok):
            m.d.sync += self.sig.eq(self.sig - 1)

    def arm(self, m, cycles: int):
        # never shortens a longer wait already running (tRC after ACT outlasts tRP after PRE)
        if cycles > 1:
            m.d.sync += self.sig.eq(Mux(self.sig > cycles - 1, self.sig, cycles - 1))


class SdramController(wiring.Component):
    """SDR SDRAM controller: init, auto refresh, bursts of 16-bit words with one open row per bank.

    Parameters
    ----------
    timing : SdramTiming
    len_bits : int
        Bits of a burst's length in words.

    Attributes
    ----------
    cmd : In(stream.Signature(addr, len, write))
        A burst: first word address (``row, bank, column``), length in words (at least 1), direction.
    wdata : In(stream.Signature(data, mask))
        Write words, taken one per WRITE issued (``mask``: a byte *not* written, as the part's ``dqm``).
    rdata : Out(stream.Signature(16, always_ready=True))
        Read words, in order, ``timing.cl + 2`` cycles after their READ.
    pins : Out(sdram_pins(timing))
    ready : Out(1)
        Initialisation is over.
    """

    def __init__(self, timing: SdramTiming, len_bits: int):
        if not isinstance(timing, SdramTiming):
            raise TypeError(f"timing must be an SdramTiming, got {timing!r}")
        if timing.refresh_period < 16:
            raise ValueError(f"refi={timing.refi} cycles leaves no time between refreshes at these timings")
        self.timing = timing
        self.len_bits = len_bits
        super().__init__({
            "cmd": In(stream.Signature(_burst_request(timing, len_bits))),
            "wdata": In(stream.Signature(data.StructLayout({"data": 16, "mask": 2}))),
            "rdata": Out(stream.Signature(16, always_ready=True)),
            "pins": Out(sdram_pins(timing)), "ready": Out(1),
        })

    @property
    def read_delay(self) -> int:
        """Cycles from a READ decided to its word on ``rdata``: the pins' register, the CAS latency (counted
        from our edge: the part runs on the inverted clock, :class:`SdramModel`), the dq input register."""
        return self.timing.cl + 1

    def elaborate(self, platform):
        m = Module()
        t, p = self.timing, self.pins
        nb = 1 << t.bank_bits

        # the command of this cycle, registered onto the pins
        issue = Signal(SdramCmd, init=SdramCmd.NOP)
        a, ba = Signal(13), Signal(t.bank_bits)
        wr_now = Signal()
        m.d.sync += [p.cs_n.eq(0), Cat(p.we_n, p.cas_n, p.ras_n).eq(issue), p.a.eq(a), p.ba.eq(ba),
                     p.cke.eq(1), p.dq_o.eq(self.wdata.payload.data), p.dq_oe.eq(wr_now),
                     p.dqm.eq(Mux(wr_now, self.wdata.payload.mask, 0))]
        m.d.comb += self.wdata.ready.eq(wr_now)

        # read words come back read_delay cycles after their READ
        inflight = Signal(self.read_delay)
        dq_in = Signal(16)
        m.d.sync += [dq_in.eq(p.dq_i), inflight.eq(Cat(issue == SdramCmd.READ, inflight))]
        m.d.comb += [self.rdata.valid.eq(inflight[-1]), self.rdata.payload.eq(dq_in)]

        # timing rules as countdowns: per bank (ACT allowed, READ/WRITE allowed, PRE allowed), all banks
        act_ok = [_Countdown(m, max(t.t_rc, t.t_rp), f"act_wait{b}") for b in range(nb)]
        rw_ok = [_Countdown(m, t.t_rcd, f"rw_wait{b}") for b in range(nb)]
        pre_ok = [_Countdown(m, max(t.t_ras, t.t_wr), f"pre_wait{b}") for b in range(nb)]
        rrd = _Countdown(m, t.t_rrd, "rrd_wait")
        cmd_ok = _Countdown(m, max(t.t_rfc, t.t_rp, t.t_mrd), "cmd_wait")  # after REF, PRE ALL, MRS
        turn = _Countdown(m, t.cl + 2, "turn_wait")  # a WRITE after a READ: the read word has left dq
        open_, row = Signal(nb), [Signal(t.row_bits, name=f"open_row{b}") for b in range(nb)]

        # refresh: requested every refresh_period cycles once initialised; a burst pauses for it
        ref_timer = Signal(range(t.refresh_period + 1), init=t.refresh_period)
        ref_due = Signal()
        with m.If(self.ready & (ref_timer == 0)):
            m.d.sync += ref_due.eq(1)
        m.d.sync += ref_timer.eq(Mux(self.ready, ref_timer - (ref_timer != 0), t.refresh_period))

        # the burst being served
        addr = Signal(t.addr_bits)
        left = Signal(self.len_bits)
        write = Signal()
        col, bank, rrow = addr[:t.col_bits], addr[t.col_bits:t.col_bits + t.bank_bits], addr[t.col_bits + t.bank_bits:]

        def refresh_issued():
            m.d.comb += issue.eq(SdramCmd.REF)
            cmd_ok.arm(m, t.t_rfc)
            for b in range(nb):
                act_ok[b].arm(m, t.t_rfc)
            m.d.sync += [ref_timer.eq(t.refresh_period), ref_due.eq(0)]

        def precharge_all():
            m.d.comb += [issue.eq(SdramCmd.PRE), a.eq(1 << 10)]
            m.d.sync += open_.eq(0)
            for b in range(nb):
                act_ok[b].arm(m, t.t_rp)
            cmd_ok.arm(m, t.t_rp)

        init_wait = Signal(range(t.init + 1), init=t.init)
        all_pre_ok = Cat(*(c.ok for c in pre_ok)).all()
        all_act_ok = Cat(*(c.ok for c in act_ok)).all()

        with m.FSM():
            with m.State("POWERUP"):
                m.d.sync += init_wait.eq(init_wait - 1)
                with m.If(init_wait == 0):
                    precharge_all()
                    m.next = "INIT_REF1"
            with m.State("INIT_REF1"), m.If(cmd_ok.ok & all_act_ok):
                refresh_issued()
                m.next = "INIT_REF2"
            with m.State("INIT_REF2"), m.If(cmd_ok.ok & all_act_ok):
                refresh_issued()
                m.next = "INIT_MRS"
            with m.State("INIT_MRS"), m.If(cmd_ok.ok):
                m.d.comb += [issue.eq(SdramCmd.MRS), a.eq(_mode_word(t.cl))]
                cmd_ok.arm(m, t.t_mrd)
                m.d.sync += self.ready.eq(1)
                m.next = "IDLE"

            with m.State("IDLE"):
                with m.If(ref_due):
                    m.next = "REFRESH"
                with m.Elif(left != 0):
                    m.next = "ACCESS"
                with m.Else():
                    m.d.comb += self.cmd.ready.eq(1)
                    with m.If(self.cmd.valid):
                        m.d.sync += [addr.eq(self.cmd.payload.addr), left.eq(self.cmd.payload.len),
                                     write.eq(self.cmd.payload.write)]
                        m.next = "ACCESS"

            with m.State("ACCESS"):
                hit, bank_open, can_rw, can_pre, can_act = Signal(), Signal(), Signal(), Signal(), Signal()
                for b in range(nb):
                    with m.If(bank == b):
                        m.d.comb += [bank_open.eq(open_[b]), hit.eq(open_[b] & (row[b] == rrow)),
                                     can_rw.eq(rw_ok[b].ok), can_pre.eq(pre_ok[b].ok), can_act.eq(act_ok[b].ok)]
                with m.If(ref_due | (left == 0)):
                    m.next = "IDLE"
                with m.Elif(~cmd_ok.ok):
                    pass
                with m.Elif(hit), m.If(can_rw & (~write | (turn.ok & self.wdata.valid))):
                    m.d.comb += [issue.eq(Mux(write, SdramCmd.WRITE, SdramCmd.READ)), a.eq(col), ba.eq(bank),
                                 wr_now.eq(write)]
                    m.d.sync += [addr.eq(addr + 1), left.eq(left - 1)]
                    with m.If(~write):
                        turn.arm(m, t.cl + 2)
                    for b in range(nb):
                        with m.If(write & (bank == b)):
                            pre_ok[b].arm(m, t.t_wr)
                with m.Elif(bank_open), m.If(can_pre):
                    m.d.comb += [issue.eq(SdramCmd.PRE), ba.eq(bank)]
                    for b in range(nb):
                        with m.If(bank == b):
                            m.d.sync += open_[b].eq(0)
                            act_ok[b].arm(m, t.t_rp)
                with m.Elif(can_act & rrd.ok):
                    m.d.comb += [issue.eq(SdramCmd.ACT), a.eq(rrow), ba.eq(bank)]
                    rrd.arm(m, t.t_rrd)
                    for b in range(nb):
                        with m.If(bank == b):
                            m.d.sync += [open_[b].eq(1), row[b].eq(rrow)]
                            act_ok[b].arm(m, t.t_rc)
                            rw_ok[b].arm(m, t.t_rcd)
                            pre_ok[b].arm(m, t.t_ras)

            with m.State("REFRESH"):
                with m.If(open_ != 0), m.If(all_pre_ok & cmd_ok.ok):
                    precharge_all()
                with m.Elif(cmd_ok.ok & all_act_ok):
                    refresh_issued()
                    m.next = "IDLE"
        return m


class SdramModel(wiring.Component):
    """Cycle-accurate simulation model of the SDRAM: stores words, returns them CAS latency cycles after a READ,
    and checks every command against the part's timing.

    Parameters
    ----------
    timing : SdramTiming
        The figures it holds the controller to (its own CAS latency is ``timing.cl``).
    words : int
        16-bit words stored (a power of two); word ``row, bank, column`` (as the controller maps addresses) lives at
        that index modulo *words*.

    Attributes
    ----------
    pins : In(sdram_pins(timing))
    error : Out(SdramError)
        The first violation (sticky).
    error_cycle : Out(32)
        The cycle (since reset) of that violation.
    reads, writes, acts, refs : Out(32)
        Commands seen, for the measurements (the model counts them, so that the controller carries no counter
        into a bitstream).
    """

    def __init__(self, timing: SdramTiming, words: int):
        if not isinstance(words, int) or words < 2 or words & (words - 1):
            raise ValueError(f"words must be a power of two, got {words!r}")
        self.timing = timing
        self.words = words
        super().__init__({"pins": In(sdram_pins(timing)), "error": Out(SdramError), "error_cycle": Out(32),
                          "reads": Out(32), "writes": Out(32), "acts": Out(32), "refs": Out(32)})

    def elaborate(self, platform):
        m = Module()
        t, p = self.timing, self.pins
        nb = 1 << t.bank_bits
        aw = (self.words - 1).bit_length()
        m.submodules.mem = mem = Memory(shape=unsigned(16), depth=self.words, init=[])
        rd, wr = mem.read_port(), mem.write_port(granularity=8)

        sat = max(t.refi, t.init, t.t_rc, t.t_rfc) + 2  # counters saturate above every rule

        def since(name, init=sat):
            s = Signal(range(sat + 1), init=init, name=name)
            with m.If(s != sat):
                m.d.sync += s.eq(s + 1)
            return s

        cycle = Signal(32)
        m.d.sync += cycle.eq(cycle + 1)
        powered = since("since_reset", init=0)
        last_act = [since(f"since_act{b}") for b in range(nb)]
        last_pre = [since(f"since_pre{b}") for b in range(nb)]
        last_wr = [since(f"since_write{b}") for b in range(nb)]
        any_act, last_ref, last_mrs = since("since_any_act"), since("since_ref"), since("since_mrs")
        refreshed = Signal()  # a REF has been seen: from then on, tREFI is checked
        mode_set = Signal()
        open_ = Signal(nb)
        row = [Signal(t.row_bits, name=f"row{b}") for b in range(nb)]

        cmd = Signal(SdramCmd)
        m.d.comb += cmd.eq(Mux(p.cs_n, SdramCmd.NOP, Cat(p.we_n, p.cas_n, p.ras_n)))
        bank = p.ba
        sel_open, sel_row, sel_act, sel_pre, sel_wr = Signal(), Signal(t.row_bits), Signal.like(powered), \
            Signal.like(powered), Signal.like(powered)
        for b in range(nb):
            with m.If(bank == b):
                m.d.comb += [sel_open.eq(open_[b]), sel_row.eq(row[b]), sel_act.eq(last_act[b]),
                             sel_pre.eq(last_pre[b]), sel_wr.eq(last_wr[b])]

        # each kind of check on its own signal (no signal depends on itself), the first in this order reported
        early, rule, late = Signal(SdramError), Signal(SdramError), Signal(SdramError)
        pre_all = p.a[10]
        min_act = Cat(*(s >= t.t_ras for s in last_act)).all()
        min_wr = Cat(*(s >= t.t_wr for s in last_wr)).all()
        min_pre = Cat(*(s >= t.t_rp for s in last_pre)).all()
        with m.If(cmd != SdramCmd.NOP):
            with m.If(powered < t.init):
                m.d.comb += early.eq(SdramError.INIT)
            with m.Elif(last_mrs < t.t_mrd):
                m.d.comb += early.eq(SdramError.T_MRD)
        with m.Switch(cmd):
            with m.Case(SdramCmd.ACT):
                with m.If(~mode_set):
                    m.d.comb += rule.eq(SdramError.MODE)
                with m.Elif(sel_open):
                    m.d.comb += rule.eq(SdramError.ACT_OPEN)
                with m.Elif(sel_pre < t.t_rp):
                    m.d.comb += rule.eq(SdramError.T_RP)
                with m.Elif((sel_act < t.t_rc) | (last_ref < t.t_rfc)):
                    m.d.comb += rule.eq(SdramError.T_RC)
                with m.Elif(any_act < t.t_rrd):
                    m.d.comb += rule.eq(SdramError.T_RRD)
            with m.Case(SdramCmd.READ, SdramCmd.WRITE):
                with m.If(~mode_set):
                    m.d.comb += rule.eq(SdramError.MODE)
                with m.Elif(~sel_open):
                    m.d.comb += rule.eq(SdramError.CLOSED)
                with m.Elif(sel_act < t.t_rcd):
                    m.d.comb += rule.eq(SdramError.T_RCD)
            with m.Case(SdramCmd.PRE):
                with m.If(pre_all):
                    with m.If(~min_act):
                        m.d.comb += rule.eq(SdramError.T_RAS)
                    with m.Elif(~min_wr):
                        m.d.comb += rule.eq(SdramError.T_WR)
                with m.Elif(sel_open & (sel_act < t.t_ras)):
                    m.d.comb += rule.eq(SdramError.T_RAS)
                with m.Elif(sel_wr < t.t_wr):
                    m.d.comb += rule.eq(SdramError.T_WR)
            with m.Case(SdramCmd.REF):
                with m.If(open_ != 0):
                    m.d.comb += rule.eq(SdramError.REF_OPEN)
                with m.Elif(~min_pre):
                    m.d.comb += rule.eq(SdramError.T_RP)
                with m.Elif(last_ref < t.t_rfc):
                    m.d.comb += rule.eq(SdramError.T_RC)
            with m.Case(SdramCmd.MRS), m.If((open_ != 0) | (p.a != _mode_word(t.cl)) | (p.ba != 0)):
                m.d.comb += rule.eq(SdramError.MODE)
        with m.If(refreshed & (last_ref > t.refi)):
            m.d.comb += late.eq(SdramError.REFRESH)

        # read data. The board clocks the part with the inverse of our clock, so it takes a command half a cycle
        # after our edge and its word is valid from tAC after its edge CL - 1 periods later to tOH after the next:
        # at our edge CL cycles after the command's. Here: on dq during the cycle before that edge.
        drive = Signal(t.cl - 1)
        stage = [Signal(16, name=f"dq_stage{k}") for k in range(t.cl - 1)]
        m.d.sync += [drive.eq(Cat(cmd == SdramCmd.READ, drive))]
        for k in range(1, t.cl - 1):
            m.d.sync += stage[k].eq(stage[k - 1])
        m.d.comb += [stage[0].eq(rd.data), p.dq_i.eq(Mux(drive[-1], stage[-1], 0))]
        with m.If(drive[-1] & p.dq_oe):
            m.d.comb += late.eq(SdramError.BUS)
        err = Signal(SdramError)
        none = SdramError.NONE
        m.d.comb += err.eq(Mux(early != none, early, Mux(rule != none, rule, late)))

        index = Signal(aw)
        m.d.comb += index.eq(Cat(p.a[:t.col_bits], p.ba, sel_row)[:aw])
        m.d.comb += [rd.addr.eq(index), rd.en.eq(cmd == SdramCmd.READ), wr.addr.eq(index), wr.data.eq(p.dq_o),
                     wr.en.eq(Mux((cmd == SdramCmd.WRITE) & sel_open, ~p.dqm, 0))]

        # the state the commands change
        with m.Switch(cmd):
            with m.Case(SdramCmd.ACT):
                m.d.sync += [any_act.eq(1), self.acts.eq(self.acts + 1)]
                for b in range(nb):
                    with m.If(bank == b):
                        m.d.sync += [open_[b].eq(1), row[b].eq(p.a[:t.row_bits]), last_act[b].eq(1)]
            with m.Case(SdramCmd.PRE):
                for b in range(nb):
                    with m.If(pre_all | (bank == b)):
                        m.d.sync += [open_[b].eq(0), last_pre[b].eq(1)]
            with m.Case(SdramCmd.READ):
                m.d.sync += self.reads.eq(self.reads + 1)
            with m.Case(SdramCmd.WRITE):
                m.d.sync += self.writes.eq(self.writes + 1)
                for b in range(nb):
                    with m.If(bank == b):
                        m.d.sync += last_wr[b].eq(1)
            with m.Case(SdramCmd.REF):
                m.d.sync += [last_ref.eq(1), refreshed.eq(1), self.refs.eq(self.refs + 1)]
            with m.Case(SdramCmd.MRS):
                m.d.sync += [last_mrs.eq(1), mode_set.eq(1)]
        with m.If((self.error == SdramError.NONE) & (err != SdramError.NONE)):
            m.d.sync += [self.error.eq(err), self.error_cycle.eq(cycle)]
        return m


class SdramMemory(wiring.Component):
    """The overlay's memory in SDRAM: :class:`SdramController` behind the overlay's burst port and the host's port,
    with the top :data:`INSN_WINDOW_BYTES` mirrored in block RAM for the instruction fetch.

    The members are :class:`~kvoverlay.boards.memory.BramMemory`'s, plus the SDRAM's pins. A burst of ``len`` port
    words is one controller burst of ``len * port_bits // 16`` words; a read beat goes out on ``rd`` the cycle after
    its last SDRAM word arrives, so beats come at the SDRAM's rate, with gaps at row changes and refreshes (the
    overlay takes a beat whenever ``rd.valid`` is high). A write beat is taken while the previous one's last word
    is written. The host's reads and writes are one-word bursts (``host.stall`` high until a write's last 16 bits
    are written, the host holding ``we`` and ``wdata`` until then, and from a read's request until its data is on
    ``host.rdata``); its writes into the instruction window also go to the block RAM (128-bit instructions written
    16 bits at a time beside the SDRAM), which serves ``insn_addr`` modulo the window (the host places the program
    there).

    Parameters
    ----------
    config : OverlayConfig
    depth : int
        Port words (a power of two; at most the SDRAM's 16-bit words divided by ``port_bits // 16``).
    timing : SdramTiming

    Attributes
    ----------
    abort : In(1)
        The overlay's reset: the burst in flight is finished without the overlay (its remaining write words masked,
        its read beats dropped), since the SDRAM cannot be reset without a new 200 us initialisation.
    pins : Out(sdram_pins(timing))
    ready : Out(1)
        The SDRAM is initialised (requests wait until then).
    """

    def __init__(self, config, depth: int, timing: SdramTiming):
        self.config = config
        self.depth = depth
        self.timing = timing
        self.per = config.port_bits // 16  # SDRAM words per port word
        if not isinstance(depth, int) or depth < 2 or depth & (depth - 1):
            raise ValueError(f"depth must be a power of two of at least 2 words, got {depth!r}")
        if depth * self.per > 1 << timing.addr_bits:
            raise ValueError(f"depth={depth} port words of {config.port_bits} bits exceed the SDRAM's "
                             f"{1 << timing.addr_bits} 16-bit words")
        self.window = min(depth, INSN_WINDOW_BYTES // config.port_bytes)
        iaw = (config.dram_bytes // isa.INSN_BYTES - 1).bit_length()
        port = dram_port(config)
        super().__init__({"port": In(port), "insn_addr": In(iaw),
                          "insn_data": Out(isa.INSN_BITS), "host": In(host_memory_port(config, depth)),
                          "host_sel": In(1), "abort": In(1), "pins": Out(sdram_pins(timing)), "ready": Out(1)})

    def elaborate(self, platform):
        m = Module()
        cfg, p, h, per = self.config, self.port, self.host, self.per
        shift = per.bit_length() - 1
        len_bits = len(p.req.payload.len) + shift
        m.submodules.ctl = ctl = SdramController(self.timing, len_bits)
        wiring.connect(m, ctl.pins, wiring.flipped(self.pins))
        m.d.comb += self.ready.eq(ctl.ready)

        # one burst at a time, from the overlay or (while it is stopped) the host
        busy, write, from_host = Signal(), Signal(), Signal()
        left = Signal.like(p.req.payload.len)
        host_take = Signal()
        read_pending = Signal()
        with m.If(self.host_sel):
            m.d.comb += [ctl.cmd.valid.eq(~busy & (h.we | h.re)), ctl.cmd.payload.addr.eq(h.addr << shift),
                         ctl.cmd.payload.len.eq(per), ctl.cmd.payload.write.eq(h.we),
                         host_take.eq(ctl.cmd.valid & ctl.cmd.ready)]
        with m.Else():
            m.d.comb += [ctl.cmd.valid.eq(~busy & p.req.valid), ctl.cmd.payload.addr.eq(p.req.payload.addr << shift),
                         ctl.cmd.payload.len.eq(p.req.payload.len << shift), ctl.cmd.payload.write.eq(p.req.payload.write),
                         p.req.ready.eq(~busy & ctl.cmd.ready)]
        with m.If(ctl.cmd.valid & ctl.cmd.ready):
            m.d.sync += [busy.eq(1), write.eq(ctl.cmd.payload.write), from_host.eq(self.host_sel),
                         left.eq(Mux(self.host_sel, 1, p.req.payload.len)), read_pending.eq(self.host_sel & h.re)]

        # reads: SDRAM words gathered into a port word, lowest first (a host read's word stays there: nothing
        # else reads while the host owns the memory)
        gather = Signal(cfg.port_bits)
        got = Signal(range(per))
        word = Cat(gather[16:], ctl.rdata.payload)
        flush = Signal()
        with m.If(self.abort & busy):
            m.d.sync += flush.eq(1)
        with m.Elif(~busy):
            m.d.sync += flush.eq(0)
        m.d.sync += p.rd.valid.eq(0)
        with m.If(ctl.rdata.valid):
            m.d.sync += [gather.eq(word), got.eq(got + 1)]
            with m.If(got == per - 1):
                m.d.sync += [got.eq(0), left.eq(left - 1)]
                with m.If(left == 1):
                    m.d.sync += busy.eq(0)
                with m.If(from_host):
                    m.d.sync += read_pending.eq(0)
                with m.Elif(~flush & ~self.abort):
                    m.d.sync += p.rd.valid.eq(1)
        m.d.comb += [p.rd.payload.eq(gather), h.rdata.eq(gather)]

        # writes: a port word and its strobes, sent 16 bits at a time, selected by a one-hot ring of the lane being
        # sent (an AND-OR of one-hot terms maps to about half the LUT4 of a binary word_select under ABC9, and a
        # loaded shift register needs a multiplexer per bit). The host's word is not copied: the host holds it
        # (host.stall) until its last 16 bits are written.
        sdata = Signal(cfg.port_bits)
        sstrb = Signal(cfg.port_bytes)
        blank = Signal()  # an aborted burst's word: every byte masked
        sent = Signal(range(per))
        ring = Signal(per, init=1)  # one-hot: bit k while lane k is sent
        full = Signal()

        def lane(value, width):
            return one_hot_select(value, ring, width)

        last_out = full & ctl.wdata.ready & (sent == per - 1)
        m.d.comb += [ctl.wdata.valid.eq(full),
                     ctl.wdata.payload.data.eq(Mux(from_host, lane(h.wdata, 16), lane(sdata, 16))),
                     ctl.wdata.payload.mask.eq(Mux(from_host, 0, Mux(blank, 3, ~lane(sstrb, 2)))),
                     h.stall.eq((h.we & ~(from_host & last_out)) | (h.re & ~host_take) | read_pending)]
        with m.If(ctl.wdata.ready):
            m.d.sync += [sent.eq(sent + 1), ring.eq(ring.rotate_left(1))]
            with m.If(sent == per - 1):
                m.d.sync += [sent.eq(0), full.eq(0), left.eq(left - 1)]
                with m.If(left == 1):
                    m.d.sync += busy.eq(0)
        # the overlay's write beat is taken only into an empty word register: its ready is a function of registers,
        # not of the controller's wdata.ready (the open row's compare) through the overlay's arbiter into the
        # writer's state, a path across the board top. The cost: the next word is not taken in the cycle the last
        # 16 bits of a word go, so a write burst idles the SDRAM one cycle per port word
        m.d.comb += p.wr.ready.eq(busy & write & ~from_host & ~full & (left != 0) & ~flush)
        with m.If(host_take & h.we):
            m.d.sync += full.eq(1)
        with m.Elif(p.wr.valid & p.wr.ready):
            m.d.sync += [sdata.eq(p.wr.payload.data), sstrb.eq(p.wr.payload.strb), blank.eq(0), full.eq(1)]
        with m.Elif((flush | self.abort) & busy & write & ~from_host & (~full | last_out) & (left > full)):
            m.d.sync += [blank.eq(1), full.eq(1)]  # an aborted burst's remaining words, written with dqm high

        # the instruction window: block RAM of instructions, written 16 bits at a time beside the SDRAM by the
        # host's writes into the top of the memory; it serves insn_addr modulo the window. One memory per 16-bit
        # lane of an instruction, so that each is one DP16KD column 18 bits wide (a 128-bit memory with 16-bit
        # write enables maps to 36-bit-wide blocks two deep, and a multiplexer per bit after them)
        lanes = isa.INSN_BITS // 16
        depth = max(1, self.window * cfg.port_bits // isa.INSN_BITS)
        in_window = Signal()
        with m.If(host_take):
            m.d.sync += in_window.eq(h.addr >= self.depth - self.window)
        half = Cat(sent, h.addr) if per > 1 else h.addr  # the 16-bit word's index
        lane_bits = (lanes - 1).bit_length()
        write_half = full & ctl.wdata.ready & from_host & in_window
        # one address for the write and the fetch (the overlay does not fetch while the host writes), so that each
        # lane is one block RAM port that reads before it writes, as the part does, not two ports whose same-cycle
        # collision Yosys would emulate with a register and a multiplexer per bit
        addr = Signal(range(depth))
        m.d.comb += addr.eq(Mux(write_half, half[lane_bits:], self.insn_addr))
        fetched = []
        for k in range(lanes):
            win = Memory(shape=unsigned(16), depth=depth, init=[])
            m.submodules[f"window{k}"] = win
            wp, fetch = win.write_port(), win.read_port()
            m.d.comb += [wp.addr.eq(addr), wp.data.eq(lane(h.wdata, 16)), fetch.addr.eq(addr),
                         wp.en.eq(write_half & (half[:lane_bits] == k))]
            fetched.append(fetch.data)
        m.d.comb += self.insn_data.eq(Cat(*fetched))
        return m
