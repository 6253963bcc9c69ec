"""REQ unit: renormalizes accumulator words into a bfp16 vector, bit-exact with :func:`kvoverlay.numerics.normalize`,
and runs ARGMAXACC, the argmax over accumulator words that spans the tiles of an LM head."""

from __future__ import annotations

from amaranth.hdl import Module, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import Out

from kvoverlay import isa, timing
from kvoverlay import numerics as nx

from .isa_layout import HEADER_LAYOUT, LAYOUTS
from .ports import Fault, abuf_write, acc_read, ereg_read, ereg_write, reg_write, unit_signature
from .requantizer import add_requantizer, complete_requantization
from .unit import Sequencer, word_sizes

__all__ = ["CMD_LAYOUT", "OPS", "ReqUnit"]

#: Opcodes this unit executes.
OPS = timing.REQ_UNIT_OPS
#: The instruction the unit takes: REQ's and ARGMAXACC's fields over one word.
CMD_LAYOUT = data.UnionLayout({name: LAYOUTS[name] for name in OPS})


class ReqUnit(wiring.Component):
    """Executes REQ and ARGMAXACC, reading the accumulator words one per cycle.

    REQ streams them through a :class:`~hw.requantizer.Requantizer` at the exponent of ``acc_e``; the result's
    exponent goes to ``dst_e``. Faults: an unaligned destination, ranges past the buffers, an exponent above
    ``EXP_MAX`` (``OVERFLOW``).

    ARGMAXACC compares each word, as a signed int64, with the best so far, which the unit holds from one
    ARGMAXACC to the next (reset: :data:`~kvoverlay.numerics.ACC_MIN` at index 0): ``cont=0`` starts with the
    first word, and only a strictly larger word replaces the best, so chained tiles keep the lowest index of the
    largest word. Its index (``base`` plus the word's offset) goes to register ``rd``. Faults: an empty range
    (``SHAPE``), a range past the accumulator buffer (``OUT_OF_RANGE``); a fault leaves the best so far as it was.

    Parameters
    ----------
    config : OverlayConfig
        Sizes of the accumulator and activation buffers.

    Attributes
    ----------
    cmd, busy, done :
        :func:`hw.ports.unit_signature` of :data:`CMD_LAYOUT`.
    acc_r, ereg_r : Out(acc_read(config)), Out(ereg_read())
        The accumulator words and their exponent.
    abuf_w, ereg_w : Out(abuf_write(config)), Out(ereg_write())
        REQ's bfp16 result.
    reg_w : Out(reg_write())
        ARGMAXACC's index.
    """

    def __init__(self, config):
        self.config = config
        super().__init__(unit_signature(CMD_LAYOUT, acc_r=Out(acc_read(config)), abuf_w=Out(abuf_write(config)),
                                        ereg_r=Out(ereg_read()), ereg_w=Out(ereg_write()), reg_w=Out(reg_write())))

    def elaborate(self, platform):
        m = Module()
        seq = Sequencer(m, self, "req")
        cfg = self.config
        req, am = seq.insn.REQ, seq.insn.ARGMAXACC
        is_argmax = HEADER_LAYOUT(seq.insn.as_value()[:HEADER_LAYOUT.size]).opcode == isa.BY_NAME["ARGMAXACC"].code
        _, _, lanes, llanes = word_sizes(cfg)
        # the accumulator words stream from acc_r (latency 1) into the requantizer, at the exponent of acc_e
        rq = add_requantizer(m, self, len(self.acc_r.data), length=req.len, exp=self.ereg_r.data,
                             dst=req.dst >> llanes)
        m.d.comb += [self.ereg_r.addr.eq(req.acc_e), rq.value.eq(self.acc_r.data)]

        # ARGMAXACC: word idx is read in one cycle and compared in the next (at offset pos)
        idx = Signal.like(am.len, name="argmax_idx")
        pos = Signal.like(am.len, name="argmax_pos")
        rd_valid = Signal(name="argmax_read_valid")
        first = Signal(name="argmax_first")
        best = Signal(signed(64), init=nx.ACC_MIN, name="argmax_best")
        best_index = Signal(len(self.reg_w.data), name="argmax_best_index")
        value = self.acc_r.data.as_signed()
        with m.If(is_argmax):
            m.d.comb += [self.acc_r.addr.eq(am.acc + idx), self.acc_r.en.eq(1)]
        with m.Else():
            m.d.comb += [self.acc_r.addr.eq(req.acc + rq.index), self.acc_r.en.eq(rq.read)]
        with m.If(rd_valid & (first | (value > best))):
            m.d.sync += [best.eq(value), best_index.eq(am.base + pos), first.eq(0)]

        with seq.fsm("CHECK"):
            with m.State("CHECK"):
                with m.If(is_argmax), seq.check((am.len == 0, Fault.SHAPE),
                                                (am.acc + am.len > cfg.acc_buffer_words, Fault.OUT_OF_RANGE)):
                    m.d.sync += [idx.eq(0), rd_valid.eq(0), first.eq(~am.cont)]
                    m.next = "ARGMAX"
                with m.Else(), seq.check((req.dst & (lanes - 1), Fault.UNALIGNED),
                               ((req.dst + req.len > cfg.act_buffer_words) | (req.acc + req.len > cfg.acc_buffer_words),
                                Fault.OUT_OF_RANGE)):
                    m.d.comb += rq.cmd.valid.eq(1)
                    m.next = "REQUANTIZE"
            with m.State("REQUANTIZE"):
                complete_requantization(m, seq, rq, self.ereg_w, req.dst_e)
            with m.State("ARGMAX"):
                m.d.sync += [idx.eq(idx + 1), pos.eq(idx), rd_valid.eq(1)]
                with m.If(idx == am.len - 1):
                    m.next = "ARGMAX_LAST"
            with m.State("ARGMAX_LAST"):  # the last word's compare
                m.d.sync += rd_valid.eq(0)
                m.next = "ARGMAX_WRITE"
            with m.State("ARGMAX_WRITE"):
                m.d.comb += [self.reg_w.addr.eq(am.rd), self.reg_w.data.eq(best_index), self.reg_w.en.eq(1)]
                seq.complete()
        return m
