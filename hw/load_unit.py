"""Load unit: LOAD copies a vector record from external memory into the activation buffer and an exponent register."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from kvoverlay import isa

from .arith import low_mask
from .dram import dram_port, request_burst
from .isa_layout import LAYOUTS
from .ports import EREG_SHAPE, Fault, abuf_write, ereg_write, unit_signature
from .unit import Sequencer, record_geometry, word_sizes
from .widths import log2_exact

__all__ = ["LoadUnit"]


class LoadUnit(wiring.Component):
    """Executes LOAD: one burst read of the record, mantissas written a buffer word at a time, then the exponent.

    The record (numerics.pack_vector_record) is ``len`` int16 mantissas, zero padding to 4 bytes, and an int32
    exponent. Four port beats fill one activation-buffer word (``2 * port_bytes`` lanes); the last word is
    written with a lane mask. Faults: a destination not aligned to a buffer word, a vector past the end of the
    buffer or a record past the end of memory (``OUT_OF_RANGE``), an external address not aligned to the port
    (``UNALIGNED``), an exponent outside the exponent registers (``EXPONENT``).

    Parameters
    ----------
    config : OverlayConfig
        The port width and the sizes of the activation buffer and the memory, which bound a record.

    Attributes
    ----------
    cmd, busy, done :
        :func:`hw.ports.unit_signature` of ``LAYOUTS["LOAD"]``.
    dram : Out(dram_port(config))
        Burst port (reads only).
    abuf_w : Out(abuf_write(config))
        The mantissas, a buffer word per four beats.
    ereg_w : Out(ereg_write())
        The record's exponent, written last.
    port_wait : Out(1)
        High while the unit waits for the memory to take its request.
    """

    def __init__(self, config):
        self.config = config
        super().__init__(unit_signature(LAYOUTS["LOAD"], dram=Out(dram_port(config)), abuf_w=Out(abuf_write(config)),
                                        ereg_w=Out(ereg_write()), port_wait=Out(1)))

    def elaborate(self, platform):
        m = Module()
        seq = Sequencer(m, self, "load")
        ins, cfg = seq.insn, self.config
        pb, lpb, lanes, llanes = word_sizes(cfg)
        n = ins.len
        rec = record_geometry(m, n, pb, "load_record")
        mant_beats = Signal.like(rec.beats, name="load_mantissa_beats")
        m.d.comb += mant_beats.eq(((n << 1) + pb - 1) >> lpb)
        byte_addr = Signal(len(ins.addr) + log2_exact(isa.DRAM_UNIT), name="load_byte_addr")
        m.d.comb += byte_addr.eq(ins.addr * isa.DRAM_UNIT)

        beat = Signal.like(rec.beats, name="load_beat")
        # the request's length is latched in CHECK: it goes through the memory arbiter into the memory's burst
        # registers, a path across parts that should not start at the record's adders
        beats_latched = Signal.like(rec.beats, name="load_beats_latched")
        # each beat is written in the cycle after it arrives, alone (its quarter of the word's lane enables, the beat
        # on every quarter): the buffer's shared write port then has pb * 8 distinct data bits from LOAD, not a
        # word buffer's 4 * pb * 8 (docs/boards.md, "The activation buffer's write port")
        wbeat = Signal(8 * pb, name="load_write_beat")
        wr_pending = Signal(name="load_write_pending")
        wr_word = Signal.like(n, name="load_write_word")
        wr_quarter = Signal(2, name="load_write_quarter")
        exp_value = Signal(32, name="load_exponent")
        exp_bad = Signal(name="load_exponent_bad")

        # pending buffer-word write (one cycle after its last beat)
        remaining = Signal(signed(len(n) + 2), name="load_lanes_left")
        m.d.comb += remaining.eq(n - (wr_word << llanes))
        mask = Signal(lanes, name="load_lane_mask")
        partial = low_mask(m, remaining[:llanes + 1], lanes, name="load_partial_mask")
        with m.If(remaining >= lanes):
            m.d.comb += mask.eq((1 << lanes) - 1)
        with m.Else():
            m.d.comb += mask.eq(partial)
        quarter = Signal(lanes, name="load_quarter_mask")
        for q in range(4):
            with m.If(wr_quarter == q):
                m.d.comb += quarter.eq(((1 << lanes // 4) - 1) << q * lanes // 4)
        m.d.comb += [self.abuf_w.addr.eq((ins.dst >> llanes) + wr_word), self.abuf_w.data.eq(wbeat.replicate(4)),
                     self.abuf_w.en.eq(Mux(wr_pending, mask & quarter, 0))]
        m.d.sync += wr_pending.eq(0)

        lo_ext = EREG_SHAPE.width - 1
        with seq.fsm("CHECK"):
            with m.State("CHECK"):
                m.d.sync += [beat.eq(0), exp_bad.eq(0), beats_latched.eq(rec.beats)]
                with seq.check((ins.dst & (lanes - 1), Fault.UNALIGNED),
                               (byte_addr & (pb - 1), Fault.UNALIGNED),
                               ((ins.dst + n > cfg.act_buffer_words) | (byte_addr + rec.size > cfg.dram_bytes),
                                Fault.OUT_OF_RANGE)):
                    m.next = "REQUEST"
            with m.State("REQUEST"), m.If(request_burst(m, self.dram, byte_addr >> lpb, beats_latched,
                                                             wait=self.port_wait)):
                m.next = "RECEIVE"
            with m.State("RECEIVE"), m.If(self.dram.rd.valid):
                data = self.dram.rd.payload
                m.d.sync += [beat.eq(beat + 1), wbeat.eq(data)]
                with m.If(beat < mant_beats):
                    m.d.sync += [wr_pending.eq(1), wr_word.eq(beat >> 2), wr_quarter.eq(beat[:2])]
                with m.If(beat == (rec.exp_offset >> lpb)):
                    value = data.bit_select(rec.exp_offset[:lpb] * 8, 32)
                    m.d.sync += exp_value.eq(value)
                    # the exponent must sign-extend from the register width
                    top = value[lo_ext:]
                    m.d.sync += exp_bad.eq((top != 0) & (top != (1 << (32 - lo_ext)) - 1))
                with m.If(beat == rec.beats - 1):
                    m.next = "FINISH"
            with m.State("FINISH"):
                m.d.comb += [self.ereg_w.addr.eq(ins.dst_e), self.ereg_w.data.eq(exp_value[:EREG_SHAPE.width]),
                             self.ereg_w.en.eq(~exp_bad)]
                seq.complete(Mux(exp_bad, Fault.EXPONENT, Fault.NONE))
        return m
