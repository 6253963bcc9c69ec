"""ARGMAXACC unit: the argmax over accumulator words that spans the tiles of an LM head, in the store queue, so
that it runs beside the compute queue's GEMV of the next tile."""

from __future__ import annotations

from amaranth.hdl import Module, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from kvoverlay import numerics as nx

from .isa_layout import LAYOUTS
from .ports import Fault, acc_read, reg_write, unit_signature
from .unit import Sequencer

__all__ = ["ArgmaxUnit"]


class ArgmaxUnit(wiring.Component):
    """Executes ARGMAXACC, reading the accumulator words one per cycle.

    Each word is compared, as a signed int64, with the best so far, which the unit holds from one ARGMAXACC to the
    next (reset: :data:`~kvoverlay.numerics.ACC_MIN` at index 0): ``cont=0`` starts with the first word, and only
    a strictly larger word replaces the best, so chained tiles keep the lowest index of the largest word. The
    best's index (``base`` plus the word's offset) goes to register ``rd``. Faults: an empty range (``SHAPE``), a
    range past the accumulator buffer (``OUT_OF_RANGE``); a fault leaves the best so far as it was. Busy for
    :func:`kvoverlay.timing.argmaxacc_cycles`.

    Parameters
    ----------
    config : OverlayConfig
        Size of the accumulator buffer.

    Attributes
    ----------
    cmd, busy, done :
        :func:`hw.ports.unit_signature` of ``LAYOUTS["ARGMAXACC"]``.
    acc_r : Out(acc_read(config))
        The accumulator words.
    reg_w : Out(reg_write())
        The index.
    """

    def __init__(self, config):
        self.config = config
        super().__init__(unit_signature(LAYOUTS["ARGMAXACC"], acc_r=Out(acc_read(config)), reg_w=Out(reg_write())))

    def elaborate(self, platform):
        m = Module()
        seq = Sequencer(m, self, "argmax")
        ins = seq.insn
        # word idx is read in one cycle (latency 1) and compared in the next, at offset pos
        idx = Signal.like(ins.len, name="idx")
        pos = Signal.like(ins.len, name="pos")
        rd_valid = Signal(name="read_valid")
        first = Signal(name="first")
        best = Signal(signed(64), init=nx.ACC_MIN, name="best")
        best_index = Signal(len(self.reg_w.data), name="best_index")
        value = self.acc_r.data.as_signed()
        m.d.comb += [self.acc_r.addr.eq(ins.acc + idx), self.acc_r.en.eq(1)]
        with m.If(rd_valid & (first | (value > best))):
            m.d.sync += [best.eq(value), best_index.eq(ins.base + pos), first.eq(0)]

        with seq.fsm("CHECK"):
            with m.State("CHECK"), seq.check((ins.len == 0, Fault.SHAPE),
                                             (ins.acc + ins.len > self.config.acc_buffer_words, Fault.OUT_OF_RANGE)):
                m.d.sync += [idx.eq(0), rd_valid.eq(0), first.eq(~ins.cont)]
                m.next = "SCAN"
            with m.State("SCAN"):
                m.d.sync += [idx.eq(idx + 1), pos.eq(idx), rd_valid.eq(1)]
                with m.If(idx == ins.len - 1):
                    m.next = "LAST"
            with m.State("LAST"):  # the last word's compare
                m.d.sync += rd_valid.eq(0)
                m.next = "WRITE"
            with m.State("WRITE"):
                m.d.comb += [self.reg_w.addr.eq(ins.rd), self.reg_w.data.eq(best_index), self.reg_w.en.eq(1)]
                seq.complete()
        return m
