"""External-memory burst port: its signature, the arbiter between the units that use it, the sim memory model.

A port is ``config.port_bits`` wide, one beat per cycle, and made of three :mod:`amaranth.lib.stream` streams. A
master sends a :data:`burst request <dram_request>` on ``req`` (a word address ``addr // port_bytes``, a length
in beats and the direction). A read then delivers ``len`` beats on ``rd`` (always ready: a reader takes one beat
per cycle); a write hands over ``len`` beats of data and byte strobes on ``wr``. The memory serves one burst at a
time, so the arbiter only has to remember which master owns the burst in flight.
"""

from __future__ import annotations

from pathlib import Path

from amaranth.hdl import ClockSignal, Instance, Module, ResetSignal, Signal
from amaranth.lib import data, stream, wiring
from amaranth.lib.wiring import In, Out

from kvoverlay import timing

from .arith import select_value

__all__ = ["DRAM_MODEL_SOURCE", "DRAM_READ_LATENCY", "DramArbiter", "DramModel", "dram_addr_bits", "dram_port",
           "dram_request", "request_burst"]

#: The hand-written, simulation-only memory model (Verilog), instantiated by :class:`DramModel`.
DRAM_MODEL_SOURCE = Path(__file__).with_name("dram_model.v")
#: Cycles between a read request's acceptance and the model's first data beat register (see dram_model.v).
DRAM_READ_LATENCY = timing.PORT_READ_LATENCY


def dram_addr_bits(config) -> int:
    """Bits of a port-word address covering ``config.dram_bytes``."""
    return (config.dram_bytes // config.port_bytes - 1).bit_length()


def dram_request(config) -> data.StructLayout:
    """A burst request: first port word, length in beats, direction."""
    aw = dram_addr_bits(config)
    return data.StructLayout({"addr": aw, "len": aw + 1, "write": 1})


def dram_port(config) -> wiring.Signature:
    """Signature of a burst port, as seen by a master (the unit that issues requests)."""
    return wiring.Signature({
        "req": Out(stream.Signature(dram_request(config))),
        "rd": In(stream.Signature(config.port_bits, always_ready=True)),
        "wr": Out(stream.Signature(data.StructLayout({"data": config.port_bits, "strb": config.port_bytes}))),
    })


def request_burst(m, port, word_addr, beats, *, write=False, wait=None):
    """Offer a burst request on *port* (in the FSM state or condition the caller is in); returns whether the
    memory takes it this cycle.

    *wait*, where given, is driven high while the request waits for the memory (the queue's port-stall counter).
    """
    m.d.comb += [port.req.valid.eq(1), port.req.payload.write.eq(write), port.req.payload.len.eq(beats),
                 port.req.payload.addr.eq(word_addr)]
    if wait is not None:
        m.d.comb += wait.eq(~port.req.ready)
    return port.req.ready


class DramArbiter(wiring.Component):
    """Fixed-priority arbiter of several burst masters onto one port, one whole burst at a time.

    Parameters
    ----------
    config : OverlayConfig
        Gives the port width and the address range.
    names : tuple of str
        The masters, highest priority first; each becomes a flipped port member ``<name>``.

    Attributes
    ----------
    mem : Out(dram_port(config))
        Toward the memory.
    owner : Out
        Index in *names* of the master whose burst is in flight.
    """

    def __init__(self, config, names):
        self.config = config
        self.names = tuple(names)
        port = dram_port(config)
        super().__init__({"mem": Out(port), "owner": Out(range(len(self.names))),
                          **{n: In(port) for n in self.names}})

    def elaborate(self, platform):
        m = Module()
        masters = [getattr(self, n) for n in self.names]
        mem = self.mem
        # The memory accepts a request only while idle, so choosing among masters combinationally is enough.
        granted = Signal(range(len(masters)), name="grant_index")
        for i in reversed(range(len(masters))):
            with m.If(masters[i].req.valid):
                m.d.comb += granted.eq(i)
        # the request and the write beat through trees of 2:1 multiplexers, smaller on the ECP5 than a Switch's $pmux
        def pick(index, field, name):
            return select_value(m, [field(p) for p in masters], index, name=name)

        m.d.comb += [mem.req.valid.eq(pick(granted, lambda p: p.req.valid, "req_valid")),
                     mem.req.payload.eq(pick(granted, lambda p: p.req.payload.as_value(), "req_payload"))]
        for i, p in enumerate(masters):
            m.d.comb += p.req.ready.eq(mem.req.ready & (granted == i))
        with m.If(mem.req.valid & mem.req.ready):
            m.d.sync += self.owner.eq(granted)
        # the write beat goes to the memory through a register (timing.PORT_WRITE_REGISTERS): a writer's beat comes
        # from its buffer read and byte masks (STORE), and the memory's write register sits elsewhere on the board
        # (the SDRAM side at the pins), so the path across ends here. The register takes a beat whenever it is empty
        # or the memory takes the one it holds; a memory takes every beat of a write burst as it comes, so the
        # writer's handshake is the same, and the burst ends at the memory a cycle later
        wr_full = Signal(name="wr_full")
        wr_beat = Signal(len(mem.wr.payload.as_value()), name="wr_beat")
        wr_take = Signal(name="wr_take")
        m.d.comb += [wr_take.eq(~wr_full | mem.wr.ready), mem.wr.valid.eq(wr_full), mem.wr.payload.eq(wr_beat)]
        with m.If(wr_take):
            m.d.sync += [wr_full.eq(pick(self.owner, lambda p: p.wr.valid, "wr_valid")),
                         wr_beat.eq(pick(self.owner, lambda p: p.wr.payload.as_value(), "wr_payload"))]
        for i, p in enumerate(masters):
            m.d.comb += [p.wr.ready.eq(wr_take & (self.owner == i)), p.rd.valid.eq(mem.rd.valid & (self.owner == i))]
        for p in masters:
            m.d.comb += p.rd.payload.eq(mem.rd.payload)
        return m


class DramModel(wiring.Component):
    """The simulation memory model (``dram_model.v``) as an Amaranth component.

    Parameters
    ----------
    config : OverlayConfig
        Port width and memory size.

    Attributes
    ----------
    port : In(dram_port(config))
        The burst port (driven by the arbiter).
    insn_addr, insn_data : In, Out(128)
        Instruction fetch port: instruction index (byte address / 16), data one cycle later.
    dump, dump_words : In
        A rising ``dump`` writes words ``[0, dump_words)`` to the file named by ``+DRAM_DUMP=``.
    host_rd_addr, host_rd_data : In, Out
        Combinational read of one memory word, for the host between runs.
    """

    def __init__(self, config):
        self.config = config
        aw = dram_addr_bits(config)
        super().__init__({
            "port": In(dram_port(config)),
            "insn_addr": In((config.dram_bytes // 16 - 1).bit_length()),
            "insn_data": Out(128),
            "dump": In(1),
            "dump_words": In(aw + 1),
            "host_rd_addr": In(aw),
            "host_rd_data": Out(config.port_bits),
        })

    def elaborate(self, platform):
        m = Module()
        cfg, p = self.config, self.port
        aw = dram_addr_bits(cfg)
        m.submodules.dram_model = Instance(
            "kvo_dram_model",
            p_WORD_BITS=cfg.port_bits, p_ADDR_BITS=aw, p_LEN_BITS=aw + 1,
            p_INSN_ADDR_BITS=len(self.insn_addr), p_READ_LATENCY=DRAM_READ_LATENCY,
            i_clk=ClockSignal("sync"), i_rst=ResetSignal("sync"),
            i_req_valid=p.req.valid, o_req_ready=p.req.ready, i_req_write=p.req.payload.write,
            i_req_addr=p.req.payload.addr, i_req_len=p.req.payload.len,
            o_rd_valid=p.rd.valid, o_rd_data=p.rd.payload,
            i_wr_valid=p.wr.valid, o_wr_ready=p.wr.ready, i_wr_data=p.wr.payload.data, i_wr_strb=p.wr.payload.strb,
            i_insn_addr=self.insn_addr, o_insn_data=self.insn_data,
            i_dump=self.dump, i_dump_words=self.dump_words,
            i_host_rd_addr=self.host_rd_addr, o_host_rd_data=self.host_rd_data,
        )
        return m

