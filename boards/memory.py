"""The board's program memory in block RAM, behind the overlay's burst port, cycle for cycle like the simulation model.

:class:`BramMemory` serves :func:`hw.dram.dram_port` with exactly the timing of ``hw/dram_model.v`` (a request
accepted while idle, read beats :data:`hw.dram.DRAM_READ_LATENCY` + 1 cycles later, one per cycle; write beats one
per cycle), so the hardware counters of a board run equal the Verilated overlay's and the golden model's timing.
It also serves the front end's 128-bit instruction fetch (latency 1) and, while the overlay is not running, the
host bridge (one word per cycle, read latency 1).

Block RAM holds words of ``max(port_bits, 128)`` bits, so one instruction is always one read: a 64-bit port reads
half a physical word. The memory is ``depth`` port words; the overlay's addresses wrap modulo that depth (the
program is placed within it by the host).
"""

from __future__ import annotations

from amaranth.hdl import Const, Module, Signal, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from kvoverlay.hw.dram import DRAM_READ_LATENCY, dram_port

from kvoverlay import isa

__all__ = ["BramMemory", "host_memory_port"]


def host_memory_port(config, depth: int) -> wiring.Signature:
    """The host's port on the memory, seen from the host: word address, write enable and data, read enable, read
    data, stall.

    Block RAM never stalls: a write is done in its cycle and a word's data is on ``rdata`` the cycle after its
    address. A memory with wait states (:class:`~kvoverlay.boards.sdram.SdramMemory`) holds ``stall`` high while
    ``re`` waits to be taken, from a taken ``re`` until the word is on ``rdata`` (where it stays until the next
    access), and while ``we`` is high until the write is done (``addr`` and ``wdata`` held until then).
    """
    return wiring.Signature({"addr": Out(range(depth)), "we": Out(1), "wdata": Out(config.port_bits),
                             "re": Out(1), "rdata": In(config.port_bits), "stall": In(1)})


class BramMemory(wiring.Component):
    """Block-RAM memory with the simulation model's burst timing.

    Parameters
    ----------
    config : OverlayConfig
        Port width and the instruction address width.
    depth : int
        Port words; a power of two.

    Attributes
    ----------
    port : In(dram_port(config))
        The overlay's burst port.
    insn_addr, insn_data : In, Out(128)
        Instruction fetch (instruction index, data one cycle later).
    host : In(host_memory_port(config, depth))
        The bridge's port, used while ``host_sel`` is high (the overlay is not running).
    host_sel : In(1)
    """

    def __init__(self, config, depth: int):
        if not isinstance(depth, int) or depth < 2 or depth & (depth - 1):
            raise ValueError(f"depth must be a power of two of at least 2 words, got {depth!r}")
        self.config = config
        self.depth = depth
        self.phys_bits = max(config.port_bits, isa.INSN_BITS)
        self.per_phys = self.phys_bits // config.port_bits  # port words per physical word
        if depth < self.per_phys:
            raise ValueError(f"depth={depth} words of {config.port_bits} bits is less than one {self.phys_bits}-bit word")
        iaw = (config.dram_bytes // isa.INSN_BYTES - 1).bit_length()
        super().__init__({"port": In(dram_port(config)), "insn_addr": In(iaw), "insn_data": Out(isa.INSN_BITS),
                          "host": In(host_memory_port(config, depth)), "host_sel": In(1)})

    def elaborate(self, platform):
        m = Module()
        cfg, p = self.config, self.port
        pb = cfg.port_bytes
        per = self.per_phys
        shift = per.bit_length() - 1  # log2 of port words per physical word
        mem = Memory(shape=unsigned(self.phys_bits), depth=self.depth // per, init=[])
        m.submodules.mem = mem
        rd = mem.read_port()
        wr = mem.write_port(granularity=8)
        fetch = mem.read_port()

        aw = (self.depth - 1).bit_length()
        busy, write = Signal(name="burst_busy"), Signal(name="burst_write")
        addr = Signal(aw, name="burst_addr")
        left = Signal.like(p.req.payload.len, name="burst_left")
        wait = Signal(range(DRAM_READ_LATENCY + 1), name="burst_wait")
        m.d.comb += [p.req.ready.eq(~busy), p.wr.ready.eq(busy & write)]

        # the burst state machine of hw/dram_model.v, line for line
        reading = Signal()
        m.d.sync += p.rd.valid.eq(0)
        with m.If(~busy), m.If(p.req.valid):
            m.d.sync += [busy.eq(1), write.eq(p.req.payload.write), addr.eq(p.req.payload.addr),
                         left.eq(p.req.payload.len), wait.eq(DRAM_READ_LATENCY)]
        with m.Elif(~write):
            with m.If(wait != 0):
                m.d.sync += wait.eq(wait - 1)
            with m.Else():
                m.d.comb += reading.eq(1)
                m.d.sync += [p.rd.valid.eq(1), addr.eq(addr + 1), left.eq(left - 1)]
                with m.If(left == 1):
                    m.d.sync += busy.eq(0)
        with m.Elif(p.wr.valid):
            m.d.sync += [addr.eq(addr + 1), left.eq(left - 1)]
            with m.If(left == 1):
                m.d.sync += busy.eq(0)

        # one read port and one write port, shared by the bursts and (while the overlay is stopped) the host
        word = Signal(aw, name="mem_word")
        wdata = Signal(cfg.port_bits)
        wstrb = Signal(pb)
        wen = Signal()
        with m.If(self.host_sel):
            m.d.comb += [word.eq(self.host.addr), wdata.eq(self.host.wdata), wstrb.eq(Const(-1, pb)),
                         wen.eq(self.host.we)]
        with m.Else():
            m.d.comb += [word.eq(addr), wdata.eq(p.wr.payload.data), wstrb.eq(p.wr.payload.strb),
                         wen.eq(busy & write & p.wr.valid)]
        lane = Signal(max(shift, 1))
        lane_q = Signal.like(lane)
        if shift:
            m.d.comb += lane.eq(word[:shift])
        m.d.sync += lane_q.eq(lane)
        m.d.comb += [rd.addr.eq(word[shift:]), wr.addr.eq(word[shift:]), rd.en.eq(reading | self.host_sel),
                     wr.data.eq(wdata.replicate(per))]
        for k in range(per):
            with m.If(lane == k):
                m.d.comb += wr.en.eq(wen.replicate(pb) & wstrb) if per == 1 else \
                    wr.en.word_select(k, pb).eq(wen.replicate(pb) & wstrb)
        data = rd.data.word_select(lane_q, cfg.port_bits) if per > 1 else rd.data
        m.d.comb += [p.rd.payload.eq(data), self.host.rdata.eq(data)]

        # instruction fetch on its own read port
        ipp = self.phys_bits // isa.INSN_BITS  # instructions per physical word
        ishift = ipp.bit_length() - 1
        ilane = Signal(max(ishift, 1))
        m.d.sync += ilane.eq(self.insn_addr[:ishift] if ishift else 0)
        m.d.comb += [fetch.addr.eq(self.insn_addr[ishift:]),
                     self.insn_data.eq(fetch.data.word_select(ilane, isa.INSN_BITS) if ipp > 1 else fetch.data)]
        return m
