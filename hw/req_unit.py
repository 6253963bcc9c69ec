"""REQ unit: renormalizes accumulator words into a bfp16 vector, bit-exact with :func:`kvoverlay.numerics.normalize`."""

from __future__ import annotations

from amaranth.hdl import Cat, Module, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from kvoverlay import timing

from .gemv_unit import peak_signature
from .isa_layout import LAYOUTS
from .ports import Fault, abuf_write, acc_read, ereg_read, ereg_write, unit_signature
from .requantizer import add_requantizer, complete_requantization
from .unit import Sequencer, word_sizes

__all__ = ["ReqUnit"]


class ReqUnit(wiring.Component):
    """Executes REQ: the accumulator words, a row of ``config.acc_lanes`` per cycle when ``acc`` starts a row of
    the accumulator buffer (else one per cycle), through a :class:`~hw.requantizer.Requantizer` of as many lanes at
    the exponent of ``acc_e``; the result's exponent goes to ``dst_e``. With ``fold`` the peak comes from the GEMV
    unit's record and only the round pass reads the words (:func:`kvoverlay.timing.req_cycles`). Faults: an
    unaligned destination, ranges past the buffers, ``fold`` while the record is stale or of another range
    (``SHAPE``), an exponent above ``EXP_MAX`` (``OVERFLOW``).

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
    peak, peak_valid : In(peak_signature(config)), In(1)
        The GEMV unit's peak record, and whether it is current (:func:`kvoverlay.timing.peak_record`).
    """

    def __init__(self, config):
        self.config = config
        super().__init__(unit_signature(LAYOUTS["REQ"], acc_r=Out(acc_read(config)), abuf_w=Out(abuf_write(config)),
                                        ereg_r=Out(ereg_read()), ereg_w=Out(ereg_write()),
                                        peak=In(peak_signature(config)), peak_valid=In(1)))

    def elaborate(self, platform):
        m = Module()
        seq = Sequencer(m, self, "req")
        ins, cfg = seq.insn, self.config
        _, _, lanes, llanes = word_sizes(cfg)
        # the accumulator words stream from acc_r into the requantizer, at the exponent of acc_e; each word is
        # registered after the buffer's read port (timing.REQ_READ_LATENCY), and the round pass registers its
        # round-shift and its mantissa (timing.REQ_ROUND_REGISTERS), so that the block RAM's output, the 64-bit
        # round, the clip with the underflow round, and the packer each have a cycle of their own
        rows = cfg.acc_lanes
        rq = add_requantizer(m, self, len(self.acc_r.data), length=ins.len, exp=self.ereg_r.data,
                             dst=ins.dst >> llanes, latency=timing.REQ_READ_LATENCY,
                             registered=timing.REQ_ROUND_REGISTERS, lanes=rows)
        # a REQ from the start of an accumulator-buffer row reads a row per cycle (wide), any other one word per
        # cycle, on lane 0: the port's word is the row's first word when the address starts a row, so lane 0 always
        # takes the word and only the other lanes take the row
        words = Signal.like(rq.value, name="req_words")
        m.d.sync += words.eq(Cat(self.acc_r.data, self.acc_r.row[64:]) if rows > 1 else self.acc_r.data)
        m.d.comb += self.ereg_r.addr.eq(ins.acc_e)
        m.d.comb += [self.acc_r.addr.eq(ins.acc + rq.index), self.acc_r.en.eq(rq.read), rq.value.eq(words),
                     rq.cmd.payload.fold.eq(ins.fold), rq.peak.eq(self.peak.peak)]
        if rows > 1:
            m.d.comb += rq.cmd.payload.wide.eq((ins.acc & (rows - 1)) == 0)
        folded = Signal(name="req_peak_current")
        m.d.comb += folded.eq(self.peak_valid & (self.peak.acc == ins.acc) & (self.peak.rows == ins.len))

        with seq.fsm("CHECK"):
            with m.State("CHECK"), seq.check((ins.dst & (lanes - 1), Fault.UNALIGNED),
                           ((ins.dst + ins.len > cfg.act_buffer_words) | (ins.acc + ins.len > cfg.acc_buffer_words),
                            Fault.OUT_OF_RANGE), (ins.fold & ~folded, Fault.SHAPE)):
                m.d.comb += rq.cmd.valid.eq(1)
                m.next = "REQUANTIZE"
            with m.State("REQUANTIZE"):
                complete_requantization(m, seq, rq, self.ereg_w, ins.dst_e)
        return m
