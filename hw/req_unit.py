"""REQ unit: renormalizes accumulator words into a bfp16 vector, bit-exact with :func:`kvoverlay.numerics.normalize`."""

from __future__ import annotations

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from .isa_layout import LAYOUTS
from .ports import Fault, abuf_write, acc_read, ereg_read, ereg_write, unit_signature
from .requantizer import Requantizer
from .unit import Sequencer, word_sizes

__all__ = ["ReqUnit"]


class ReqUnit(wiring.Component):
    """Executes REQ: the accumulator words, one per cycle, through a :class:`~hw.requantizer.Requantizer` at the
    exponent of ``acc_e``; the result's exponent goes to ``dst_e``. Faults: an unaligned destination, ranges past
    the buffers, an exponent above ``EXP_MAX`` (``OVERFLOW``).

    Parameters
    ----------
    config : OverlayConfig
        Sizes of the accumulator and activation buffers.

    Attributes
    ----------
    cmd, busy, done :
        :func:`hw.ports.unit_signature` of ``LAYOUTS["REQ"]``.
    acc_r : Out(acc_read(config))
    abuf_w : Out(abuf_write(config))
    ereg_r : Out(ereg_read())
    ereg_w : Out(ereg_write())
    """

    def __init__(self, config):
        self.config = config
        super().__init__(unit_signature(LAYOUTS["REQ"], acc_r=Out(acc_read(config)), abuf_w=Out(abuf_write(config)),
                                        ereg_r=Out(ereg_read()), ereg_w=Out(ereg_write())))

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        _, _, lanes, llanes = word_sizes(cfg)
        seq = Sequencer(m, self, "req")
        ins = seq.insn
        n = ins.len
        m.d.comb += self.ereg_r.addr.eq(ins.acc_e)

        m.submodules.requantizer = rq = Requantizer(cfg, len(self.acc_r.data))
        wiring.connect(m, rq.abuf_w, wiring.flipped(self.abuf_w))
        m.d.comb += [self.acc_r.addr.eq(ins.acc + rq.index), self.acc_r.en.eq(rq.read), rq.value.eq(self.acc_r.data),
                     rq.cmd.payload.len.eq(n), rq.cmd.payload.exp.eq(self.ereg_r.data),
                     rq.cmd.payload.dst.eq(ins.dst >> llanes)]

        with seq.fsm("CHECK"):
            with m.State("CHECK"), seq.check((ins.dst & (lanes - 1), Fault.UNALIGNED),
                           ((ins.dst + n > cfg.act_buffer_words) | (ins.acc + n > cfg.acc_buffer_words),
                            Fault.OUT_OF_RANGE)):
                m.d.comb += rq.cmd.valid.eq(1)
                m.next = "REQUANTIZE"
            with m.State("REQUANTIZE"), m.If(rq.done.valid):
                m.d.comb += [self.ereg_w.addr.eq(ins.dst_e), self.ereg_w.data.eq(rq.exp),
                             self.ereg_w.en.eq(rq.done.payload == Fault.NONE)]
                seq.complete(rq.done.payload)
        return m
