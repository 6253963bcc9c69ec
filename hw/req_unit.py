"""REQ unit: renormalizes accumulator words into a bfp16 vector, bit-exact with :func:`kvoverlay.numerics.normalize`."""

from __future__ import annotations

from amaranth.hdl import Module
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from .isa_layout import LAYOUTS
from .ports import Fault, abuf_write, acc_read, ereg_read, ereg_write, unit_signature
from .requantizer import add_requantizer, complete_requantization
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
    acc_r, ereg_r : Out(acc_read(config)), Out(ereg_read())
        The accumulator words and their exponent.
    abuf_w, ereg_w : Out(abuf_write(config)), Out(ereg_write())
        The bfp16 result.
    """

    def __init__(self, config):
        self.config = config
        super().__init__(unit_signature(LAYOUTS["REQ"], acc_r=Out(acc_read(config)), abuf_w=Out(abuf_write(config)),
                                        ereg_r=Out(ereg_read()), ereg_w=Out(ereg_write())))

    def elaborate(self, platform):
        m = Module()
        seq = Sequencer(m, self, "req")
        ins, cfg = seq.insn, self.config
        _, _, lanes, llanes = word_sizes(cfg)
        # the accumulator words stream from acc_r (latency 1) into the requantizer, at the exponent of acc_e
        rq = add_requantizer(m, self, len(self.acc_r.data), length=ins.len, exp=self.ereg_r.data,
                             dst=ins.dst >> llanes)
        m.d.comb += self.ereg_r.addr.eq(ins.acc_e)
        m.d.comb += [self.acc_r.addr.eq(ins.acc + rq.index), self.acc_r.en.eq(rq.read), rq.value.eq(self.acc_r.data)]

        with seq.fsm("CHECK"):
            with m.State("CHECK"), seq.check((ins.dst & (lanes - 1), Fault.UNALIGNED),
                           ((ins.dst + ins.len > cfg.act_buffer_words) | (ins.acc + ins.len > cfg.acc_buffer_words),
                            Fault.OUT_OF_RANGE)):
                m.d.comb += rq.cmd.valid.eq(1)
                m.next = "REQUANTIZE"
            with m.State("REQUANTIZE"):
                complete_requantization(m, seq, rq, self.ereg_w, ins.dst_e)
        return m
