"""External-memory burst port: its signature, the arbiter between the units that use it, the sim memory model.

A port is ``config.port_bits`` wide, one beat per cycle. A master raises ``req_valid`` with a word address
(``addr // port_bytes``), a burst length in beats and ``req_write``; the request is taken in a cycle where
``req_ready`` is high. A read then delivers ``len`` beats on ``rd_valid``/``rd_data`` (no back-pressure: a reader
must take one beat per cycle); a write hands over ``len`` beats on ``wr_valid``/``wr_data``/``wr_strb`` (byte
strobes), each taken in a cycle where ``wr_ready`` is high. The memory serves one burst at a time, so the
arbiter only has to remember which master owns the burst in flight.
"""

from __future__ import annotations

from pathlib import Path

from amaranth.hdl import ClockSignal, Instance, Module, ResetSignal, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

__all__ = ["DRAM_MODEL_SOURCE", "DRAM_READ_LATENCY", "DramArbiter", "DramModel", "dram_addr_bits", "dram_port"]

#: The hand-written, simulation-only memory model (Verilog), instantiated by :class:`DramModel`.
DRAM_MODEL_SOURCE = Path(__file__).with_name("dram_model.v")
#: Cycles between a read request's acceptance and the model's first data beat register (see dram_model.v).
DRAM_READ_LATENCY = 2


def dram_addr_bits(config) -> int:
    """Bits of a port-word address covering ``config.dram_bytes``."""
    return (config.dram_bytes // config.port_bytes - 1).bit_length()


def dram_port(config) -> wiring.Signature:
    """Signature of a burst port, as seen by a master (the unit that issues requests)."""
    aw = dram_addr_bits(config)
    return wiring.Signature({
        "req_valid": Out(1),
        "req_ready": In(1),
        "req_write": Out(1),
        "req_addr": Out(aw),
        "req_len": Out(aw + 1),
        "rd_valid": In(1),
        "rd_data": In(config.port_bits),
        "wr_valid": Out(1),
        "wr_ready": In(1),
        "wr_data": Out(config.port_bits),
        "wr_strb": Out(config.port_bytes),
    })


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
            with m.If(masters[i].req_valid):
                m.d.comb += granted.eq(i)
        with m.Switch(granted):
            for i, p in enumerate(masters):
                with m.Case(i):
                    m.d.comb += [mem.req_valid.eq(p.req_valid), mem.req_write.eq(p.req_write),
                                 mem.req_addr.eq(p.req_addr), mem.req_len.eq(p.req_len),
                                 p.req_ready.eq(mem.req_ready)]
        with m.If(mem.req_valid & mem.req_ready):
            m.d.sync += self.owner.eq(granted)
        with m.Switch(self.owner):
            for i, p in enumerate(masters):
                with m.Case(i):
                    m.d.comb += [mem.wr_valid.eq(p.wr_valid), mem.wr_data.eq(p.wr_data), mem.wr_strb.eq(p.wr_strb),
                                 p.wr_ready.eq(mem.wr_ready), p.rd_valid.eq(mem.rd_valid)]
        for p in masters:
            m.d.comb += p.rd_data.eq(mem.rd_data)
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
            i_req_valid=p.req_valid, o_req_ready=p.req_ready, i_req_write=p.req_write,
            i_req_addr=p.req_addr, i_req_len=p.req_len,
            o_rd_valid=p.rd_valid, o_rd_data=p.rd_data,
            i_wr_valid=p.wr_valid, o_wr_ready=p.wr_ready, i_wr_data=p.wr_data, i_wr_strb=p.wr_strb,
            i_insn_addr=self.insn_addr, o_insn_data=self.insn_data,
            i_dump=self.dump, i_dump_words=self.dump_words,
            i_host_rd_addr=self.host_rd_addr, o_host_rd_data=self.host_rd_data,
        )
        return m

