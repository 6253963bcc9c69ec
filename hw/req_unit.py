"""REQ unit: renormalizes accumulator words into a bfp16 vector, bit-exact with :func:`kvoverlay.numerics.normalize`."""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from kvoverlay import numerics as nx

from .isa_layout import LAYOUTS
from .normalize import scalar_mantissa
from .ports import EREG_SHAPE, EXEC_ERRORS, abuf_lanes, abuf_write, acc_read, command, ereg_read, ereg_write

__all__ = ["ReqUnit"]


def _log2(n):
    return n.bit_length() - 1


class ReqUnit(wiring.Component):
    """Executes REQ in two passes over the accumulators, one word per cycle.

    Pass 1 ORs the magnitudes together: the bit length of the OR is the bit length of the peak, which fixes the
    shift ``s = bitlen(peak) - MANT_BITS``. Pass 2 rounds each word half up by ``s`` (or shifts it left), clips to
    ``MANT_MAX``, and, when ``e + s`` falls below ``EXP_MIN``, rounds again by the underflow; lanes are packed into
    activation-buffer words written with a lane mask. ``e + s > EXP_MAX`` faults with ``overflow``.

    Parameters
    ----------
    config : OverlayConfig

    Attributes
    ----------
    insn, start, busy, done, error, error_code :
        The unit command interface.
    acc_r : Out(acc_read(config))
    abuf_w : Out(abuf_write(config))
    ereg_r : Out(ereg_read())
    ereg_w : Out(ereg_write())
    """

    def __init__(self, config):
        self.config = config
        super().__init__({**command(), "acc_r": Out(acc_read(config)), "abuf_w": Out(abuf_write(config)),
                          "ereg_r": Out(ereg_read()), "ereg_w": Out(ereg_write())})

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        lanes = abuf_lanes(cfg)
        llanes = _log2(lanes)
        ins = Signal(LAYOUTS["REQ"], name="req_insn")
        with m.If(self.start & ~self.busy):
            m.d.sync += ins.eq(self.insn)
        n = Signal(17, name="req_len")
        m.d.comb += [n.eq(ins.len), self.ereg_r.addr.eq(ins.acc_e)]

        idx = Signal(17, name="req_index")  # word being read
        m.d.comb += self.acc_r.addr.eq(ins.acc + idx)
        rd_valid = Signal(name="req_read_valid")  # acc_r.data holds word idx - 1
        rd_last = Signal(name="req_read_last")
        peak_or = Signal(64, name="req_peak_or")
        word = self.acc_r.data.as_signed()
        mag = Signal(64, name="req_magnitude")
        m.d.comb += mag.eq(Mux(word < 0, -word, word))

        bitlen = Signal(range(66), name="req_peak_bits")
        for b in range(64):
            with m.If(peak_or[b]):
                m.d.comb += bitlen.eq(b + 1)
        shift = Signal(signed(9), name="req_shift")  # s
        e_in = Signal(EREG_SHAPE, name="req_exp_in")
        e_out = Signal(signed(EREG_SHAPE.width + 2), name="req_exp_out")
        under = Signal(signed(EREG_SHAPE.width + 2), name="req_underflow")
        zero = Signal(name="req_all_zero")
        err = Signal(range(len(EXEC_ERRORS)), name="req_fault")
        m.d.comb += self.error_code.eq(err)

        # pass 2 datapath, on the word read last cycle
        mant = scalar_mantissa(m, word, shift, under, "req")

        out_lane = Signal(range(lanes), name="req_lane")
        out_word = Signal(17, name="req_word")
        out_buf = Signal(16 * lanes, name="req_word_buffer")
        out_mask = Signal(lanes, name="req_lane_mask")
        wr_pending = Signal(name="req_write_pending")
        m.d.sync += wr_pending.eq(0)
        m.d.comb += [self.abuf_w.addr.eq((ins.dst >> llanes) + out_word), self.abuf_w.data.eq(out_buf),
                     self.abuf_w.en.eq(Mux(wr_pending, out_mask, 0))]

        with m.FSM(name="req_fsm"):
            with m.State("IDLE"), m.If(self.start):
                m.next = "CHECK"
            with m.State("CHECK"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [idx.eq(0), rd_valid.eq(0), peak_or.eq(0), err.eq(0), e_in.eq(self.ereg_r.data)]
                with m.If(ins.dst & (lanes - 1)):
                    m.d.sync += err.eq(EXEC_ERRORS.index("unaligned"))
                    m.next = "FAIL"
                with m.Elif((ins.dst + n > cfg.act_buffer_words) | (ins.acc + n > cfg.acc_buffer_words)):
                    m.d.sync += err.eq(EXEC_ERRORS.index("out_of_range"))
                    m.next = "FAIL"
                with m.Elif(n == 0):
                    m.next = "SHIFT"
                with m.Else():
                    m.next = "PEAK"
            with m.State("PEAK"):
                m.d.comb += [self.busy.eq(1), self.acc_r.en.eq(1)]
                m.d.sync += [rd_valid.eq(1), idx.eq(idx + 1)]
                with m.If(rd_valid):
                    m.d.sync += peak_or.eq(peak_or | mag)
                with m.If(idx == n - 1):
                    m.next = "PEAK_LAST"
            with m.State("PEAK_LAST"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += peak_or.eq(peak_or | mag)
                m.next = "SHIFT"
            with m.State("SHIFT"):
                m.d.comb += self.busy.eq(1)
                s = bitlen - nx.MANT_BITS
                m.d.sync += [shift.eq(s), zero.eq(bitlen == 0), e_out.eq(e_in + s), under.eq(nx.EXP_MIN - (e_in + s)),
                             idx.eq(0), rd_valid.eq(0), rd_last.eq(0), out_lane.eq(0), out_word.eq(0), out_mask.eq(0)]
                with m.If(n == 0):
                    m.d.sync += zero.eq(1)
                    m.next = "WRITE_EXP"
                with m.Elif((bitlen != 0) & (e_in + s > nx.EXP_MAX)):
                    m.d.sync += err.eq(EXEC_ERRORS.index("overflow"))
                    m.next = "FAIL"
                with m.Else():
                    m.next = "ROUND"
            with m.State("ROUND"):
                m.d.comb += [self.busy.eq(1), self.acc_r.en.eq(idx < n)]
                m.d.sync += [rd_valid.eq(idx < n), rd_last.eq(idx == n - 1)]
                with m.If(idx < n):
                    m.d.sync += idx.eq(idx + 1)
                with m.If(rd_valid):
                    m.d.sync += [out_buf.word_select(out_lane, 16).eq(Mux(zero, 0, mant)),
                                 out_mask.eq(Mux(out_lane == 0, 1, out_mask | (Const(1, lanes) << out_lane))),
                                 out_lane.eq(out_lane + 1)]
                    with m.If((out_lane == lanes - 1) | rd_last):
                        m.d.sync += wr_pending.eq(1)
                    with m.If(rd_last):
                        m.next = "WRITE_EXP"
            with m.State("WRITE_EXP"):
                m.d.comb += [self.busy.eq(1), self.done.eq(1), self.ereg_w.addr.eq(ins.dst_e),
                             self.ereg_w.data.eq(Mux(zero, nx.EXP_MIN, Mux(under > 0, nx.EXP_MIN, e_out))),
                             self.ereg_w.en.eq(1)]
                m.next = "IDLE"
            with m.State("FAIL"):
                m.d.comb += [self.busy.eq(1), self.done.eq(1), self.error.eq(1)]
                m.next = "IDLE"
        # the word counter of the pending write advances once the write has gone out
        with m.If(wr_pending):
            m.d.sync += out_word.eq(out_word + 1)
        return m
