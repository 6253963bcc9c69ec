"""Store unit: STORE writes a vector record to external memory, STACC writes accumulator words (int64 LE)."""

from __future__ import annotations

from amaranth.hdl import Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import Out

from kvoverlay import isa

from .arith import low_mask, select_word, shift_left
from .dram import dram_port, request_burst
from .isa_layout import LAYOUTS
from .ports import Fault, abuf_read, acc_read, ereg_read, unit_signature
from .unit import Sequencer, record_geometry, word_sizes
from .widths import log2_exact

__all__ = ["StoreUnit"]

#: The store unit's command: one instruction word seen as a STORE or as a STACC (same header).
STORE_INSN = data.UnionLayout({"store": LAYOUTS["STORE"], "stacc": LAYOUTS["STACC"]})


class StoreUnit(wiring.Component):
    """Executes STORE and STACC as one burst write each, with byte strobes so nothing past the record changes.

    STORE reads one activation-buffer word (four port beats of mantissas) at a time and sends its beats; the
    beat holding byte ``(2 * len + 3) & ~3`` of the record also carries the int32 exponent. STACC packs
    ``port_bytes / 8`` accumulator words into each beat. Faults: unaligned source or external address,
    ranges past the buffers or the memory.

    Parameters
    ----------
    config : OverlayConfig
        ``port_bits`` must be at least 64 (one accumulator word per beat or more).

    Attributes
    ----------
    cmd, busy, done :
        :func:`hw.ports.unit_signature` of :data:`STORE_INSN`.
    dram : Out(dram_port(config))
        Burst port (writes only).
    abuf_r, ereg_r : Out(abuf_read(config)), Out(ereg_read())
        A STORE's vector and exponent.
    acc_r : Out(acc_read(config))
        A STACC's accumulator words.
    port_wait : Out(1)
        High while waiting for the memory to take the request or a beat.
    """

    def __init__(self, config):
        if config.port_bits < 64:
            raise ValueError(f"port_bits={config.port_bits}: the store unit needs a port of at least 64 bits")
        self.config = config
        super().__init__(unit_signature(STORE_INSN, dram=Out(dram_port(config)), abuf_r=Out(abuf_read(config)),
                                        acc_r=Out(acc_read(config)), ereg_r=Out(ereg_read()), port_wait=Out(1)))

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        pb, lpb, lanes, llanes = word_sizes(cfg)
        wpb = pb // 8  # accumulator words per beat
        seq = Sequencer(m, self, "store")
        st, sa = seq.insn.store, seq.insn.stacc
        is_acc = Signal(name="store_is_stacc")
        m.d.comb += is_acc.eq(st.opcode == isa.BY_NAME["STACC"].code)

        n = Signal.like(st.len, name="store_len")
        m.d.comb += n.eq(Mux(is_acc, sa.len, st.len))
        byte_addr = Signal(len(st.addr) + log2_exact(isa.DRAM_UNIT), name="store_byte_addr")
        m.d.comb += byte_addr.eq(Mux(is_acc, sa.addr, st.addr) * isa.DRAM_UNIT)
        rec = record_geometry(m, n, pb, "store_record")
        size = Signal(len(n) + 4, name="store_bytes")
        m.d.comb += size.eq(Mux(is_acc, n << 3, rec.size))
        beats = Signal.like(size, name="store_beats")
        m.d.comb += beats.eq((size + pb - 1) >> lpb)
        # the record's geometry is latched in CHECK, so that the per-beat logic (the last-beat compare, the byte
        # strobes) starts from registers rather than from the length's adders
        size_latched = Signal.like(size, name="store_bytes_latched")
        beats_latched = Signal.like(beats, name="store_beats_latched")
        last_beat = Signal.like(beats, name="store_last_beat")
        exp_offset = Signal.like(rec.exp_offset, name="store_exponent_offset")

        exponent = Signal(32, name="store_exponent")
        m.d.comb += self.ereg_r.addr.eq(st.src_e)
        beat = Signal.like(beats, name="store_beat")
        word = Signal.like(n, name="store_acc_word")
        slot = Signal(range(max(2, wpb)), name="store_acc_slot")
        beat_buf = Signal(8 * pb, name="store_beat_buffer")

        # the beat being sent: bytes [beat * pb, beat * pb + pb) of the record
        base = Signal(signed(len(beat) + lpb + 1), name="store_beat_base")
        m.d.comb += base.eq(beat << lpb)

        def clamp_bytes(limit, name):
            left = Signal.like(base, name=name)
            m.d.comb += left.eq(limit - base)
            out = Signal(range(pb + 1), name=name + "_clamped")
            with m.If(left >= pb):
                m.d.comb += out.eq(pb)
            with m.Elif(left > 0):
                m.d.comb += out.eq(left)
            return out

        # the mantissas' byte count is latched in CHECK too: from the instruction's length multiplexer it was the
        # glue's critical path (the beat's mask into the arbiter's write register, 17.2 ns routed)
        mant_size = Signal(len(n) + 1, name="store_mantissa_bytes")
        mant_bytes = clamp_bytes(mant_size, "store_mantissa_bytes_left")
        strb_bytes = clamp_bytes(size_latched, "store_bytes_left")
        quarter = select_word(m, self.abuf_r.data, beat[:2], 8 * pb, name="store_quarter")
        mant = Signal(8 * pb, name="store_mantissas")
        m.d.comb += mant.eq(quarter & low_mask(m, mant_bytes, 8 * pb, unit=8, name="store_mantissa_mask"))
        exp_here = Signal(8 * pb, name="store_exponent_bits")
        exp_placed = shift_left(m, exponent, exp_offset[:lpb], 8 * pb, unit=8, name="store_exponent_shift")
        with m.If(beat == (exp_offset >> lpb)):
            m.d.comb += exp_here.eq(exp_placed)
        m.d.comb += [
            self.dram.wr.payload.data.eq(Mux(is_acc, beat_buf, mant | exp_here)),
            self.dram.wr.payload.strb.eq(low_mask(m, strb_bytes, pb, name="store_strobes")),
            self.abuf_r.addr.eq((st.src >> llanes) + (beat >> 2)),
            self.acc_r.addr.eq(sa.acc + word),
        ]

        def send(then):
            """Offer the beat; once taken, the next one, or done after the last."""
            m.d.comb += [self.dram.wr.valid.eq(1), self.port_wait.eq(~self.dram.wr.ready)]
            with m.If(self.dram.wr.ready):
                m.d.sync += beat.eq(beat + 1)
                with m.If(beat == last_beat):
                    m.next = "DONE"
                with m.Else():
                    then()

        with seq.fsm("CHECK"):
            with m.State("CHECK"):
                m.d.sync += [beat.eq(0), word.eq(0), slot.eq(0), beat_buf.eq(0), exponent.eq(self.ereg_r.data),
                             size_latched.eq(size), beats_latched.eq(beats), last_beat.eq(beats - 1), mant_size.eq(n << 1),
                             exp_offset.eq(rec.exp_offset)]
                unaligned = (byte_addr & (pb - 1)).any() | (~is_acc & (st.src & (lanes - 1)).any())
                beyond = Mux(is_acc, sa.acc + n > cfg.acc_buffer_words, st.src + n > cfg.act_buffer_words)
                with seq.check((unaligned, Fault.UNALIGNED),
                               (beyond | (byte_addr + size > cfg.dram_bytes) | (is_acc & (n == 0)),
                                Fault.OUT_OF_RANGE)):
                    m.next = "REQUEST"
            with m.State("REQUEST"), m.If(request_burst(m, self.dram, byte_addr >> lpb, beats_latched, write=True,
                                                             wait=self.port_wait)):
                with m.If(is_acc):
                    m.next = "ACC_READ"
                with m.Else():
                    m.next = "VEC_READ"
            # ---- STORE: one buffer read per four beats
            with m.State("VEC_READ"):
                m.d.comb += self.abuf_r.en.eq(1)
                m.next = "VEC_SEND"
            with m.State("VEC_SEND"):
                def next_word():
                    with m.If(beat[:2] == 3):
                        m.next = "VEC_READ"
                send(next_word)
            # ---- STACC: read accumulator words into the beat buffer, send it when full
            with m.State("ACC_READ"):
                m.d.comb += self.acc_r.en.eq(1)
                m.next = "ACC_CAPTURE"
            with m.State("ACC_CAPTURE"):
                m.d.sync += [beat_buf.word_select(slot, 64).eq(self.acc_r.data), word.eq(word + 1)]
                with m.If((slot == wpb - 1) | (word == n - 1)):
                    m.d.sync += slot.eq(0)
                    m.next = "ACC_SEND"
                with m.Else():
                    m.d.sync += slot.eq(slot + 1)
                    m.next = "ACC_READ"
            with m.State("ACC_SEND"):
                def next_beat():
                    m.d.sync += beat_buf.eq(0)
                    m.next = "ACC_READ"
                send(next_beat)
            with m.State("DONE"):
                seq.complete()
        return m
