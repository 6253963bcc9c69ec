"""Load unit: LOAD copies a vector record from external memory into the activation buffer and an exponent register."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from kvoverlay import isa

from .dram import dram_port
from .isa_layout import LAYOUTS
from .ports import EREG_SHAPE, EXEC_ERRORS, abuf_lanes, abuf_write, command, ereg_write

__all__ = ["LoadUnit"]


def _log2(n):
    return n.bit_length() - 1


class LoadUnit(wiring.Component):
    """Executes LOAD: one burst read of the record, mantissas written a buffer word at a time, then the exponent.

    The record (numerics.pack_vector_record) is ``len`` int16 mantissas, zero padding to 4 bytes, and an int32
    exponent. Four port beats fill one activation-buffer word (``2 * port_bytes`` lanes); the last word is
    written with a lane mask. Faults: a destination not aligned to a buffer word, a vector past the end of the
    buffer or a record past the end of memory (``out_of_range``), an external address not aligned to the port
    (``unaligned``), an exponent outside the exponent registers (``exponent``).

    Parameters
    ----------
    config : OverlayConfig

    Attributes
    ----------
    insn, start, busy, done, error, error_code :
        The unit command interface (:func:`hw.ports.command`).
    dram : Out(dram_port(config))
        Burst port (reads only).
    abuf_w : Out(abuf_write(config))
    ereg_w : Out(ereg_write())
    port_wait : Out(1)
        High while the unit waits for the memory to take its request.
    """

    def __init__(self, config):
        self.config = config
        super().__init__({**command(), "dram": Out(dram_port(config)), "abuf_w": Out(abuf_write(config)),
                          "ereg_w": Out(ereg_write()), "port_wait": Out(1)})

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        pb, lpb = cfg.port_bytes, _log2(cfg.port_bytes)
        lanes = abuf_lanes(cfg)
        llanes = _log2(lanes)
        ins = Signal(LAYOUTS["LOAD"], name="load_insn")
        with m.If(self.start & ~self.busy):
            m.d.sync += ins.eq(self.insn)

        n = Signal(17, name="load_len")
        m.d.comb += n.eq(ins.len)
        exp_off = Signal(19, name="load_exp_offset")  # byte offset of the exponent in the record
        m.d.comb += exp_off.eq(((n << 1) + 3) & ~3)
        size = Signal(19, name="load_record_bytes")
        m.d.comb += size.eq(exp_off + 4)
        beats = Signal(19, name="load_beats")
        m.d.comb += beats.eq((size + pb - 1) >> lpb)
        mant_beats = Signal(19, name="load_mantissa_beats")
        m.d.comb += mant_beats.eq(((n << 1) + pb - 1) >> lpb)
        byte_addr = Signal(isa.BY_NAME["LOAD"].fields[0].bits + 4, name="load_byte_addr")
        m.d.comb += byte_addr.eq(ins.addr * isa.DRAM_UNIT)

        beat = Signal(19, name="load_beat")
        wbuf = Signal(16 * lanes, name="load_word_buffer")
        wr_pending = Signal(name="load_write_pending")
        wr_word = Signal(17, name="load_write_word")
        exp_value = Signal(32, name="load_exponent")
        exp_bad = Signal(name="load_exponent_bad")
        err = Signal(range(len(EXEC_ERRORS)), name="load_fault")

        # pending buffer-word write (one cycle after its last beat)
        remaining = Signal(signed(19), name="load_lanes_left")
        m.d.comb += remaining.eq(n - (wr_word << llanes))
        mask = Signal(lanes, name="load_lane_mask")
        with m.If(remaining >= lanes):
            m.d.comb += mask.eq((1 << lanes) - 1)
        with m.Else():
            m.d.comb += mask.eq((1 << remaining[:llanes + 1]) - 1)
        m.d.comb += [self.abuf_w.addr.eq((ins.dst >> llanes) + wr_word), self.abuf_w.data.eq(wbuf),
                     self.abuf_w.en.eq(Mux(wr_pending, mask, 0))]
        m.d.sync += wr_pending.eq(0)

        lo_ext = EREG_SHAPE.width - 1
        m.d.comb += [self.dram.req_write.eq(0), self.dram.req_addr.eq(byte_addr >> lpb), self.dram.req_len.eq(beats),
                     self.error_code.eq(err)]

        with m.FSM(name="load_fsm"):
            with m.State("IDLE"), m.If(self.start):
                m.next = "CHECK"
            with m.State("CHECK"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [beat.eq(0), exp_bad.eq(0), err.eq(0)]
                with m.If(ins.dst & (lanes - 1)):
                    m.d.sync += err.eq(EXEC_ERRORS.index("unaligned"))
                    m.next = "FAIL"
                with m.Elif(byte_addr & (pb - 1)):
                    m.d.sync += err.eq(EXEC_ERRORS.index("unaligned"))
                    m.next = "FAIL"
                with m.Elif((ins.dst + n > cfg.act_buffer_words) | (byte_addr + size > cfg.dram_bytes)):
                    m.d.sync += err.eq(EXEC_ERRORS.index("out_of_range"))
                    m.next = "FAIL"
                with m.Else():
                    m.next = "REQUEST"
            with m.State("REQUEST"):
                m.d.comb += [self.busy.eq(1), self.dram.req_valid.eq(1), self.port_wait.eq(~self.dram.req_ready)]
                with m.If(self.dram.req_ready):
                    m.next = "RECEIVE"
            with m.State("RECEIVE"):
                m.d.comb += self.busy.eq(1)
                with m.If(self.dram.rd_valid):
                    m.d.sync += [beat.eq(beat + 1), wbuf.word_select(beat[:2], 8 * pb).eq(self.dram.rd_data)]
                    with m.If((beat < mant_beats) & ((beat[:2] == 3) | (beat == mant_beats - 1))):
                        m.d.sync += [wr_pending.eq(1), wr_word.eq(beat >> 2)]
                    with m.If(beat == (exp_off >> lpb)):
                        value = self.dram.rd_data.bit_select(exp_off[:lpb] * 8, 32)
                        m.d.sync += exp_value.eq(value)
                        # the exponent must sign-extend from the register width
                        top = value[lo_ext:]
                        m.d.sync += exp_bad.eq((top != 0) & (top != (1 << (32 - lo_ext)) - 1))
                    with m.If(beat == beats - 1):
                        m.next = "FINISH"
            with m.State("FINISH"):
                m.d.comb += [self.busy.eq(1), self.done.eq(1), self.error.eq(exp_bad),
                             self.ereg_w.addr.eq(ins.dst_e), self.ereg_w.data.eq(exp_value[:EREG_SHAPE.width]),
                             self.ereg_w.en.eq(~exp_bad)]
                with m.If(exp_bad):
                    m.d.comb += self.error_code.eq(EXEC_ERRORS.index("exponent"))
                m.next = "IDLE"
            with m.State("FAIL"):
                m.d.comb += [self.busy.eq(1), self.done.eq(1), self.error.eq(1)]
                m.next = "IDLE"
        return m
