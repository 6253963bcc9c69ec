"""Store unit: STORE writes a vector record to external memory, STACC writes accumulator words (int64 LE)."""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed
from amaranth.lib import wiring
from amaranth.lib.wiring import Out

from kvoverlay import isa

from .dram import dram_port
from .isa_layout import LAYOUTS
from .ports import EXEC_ERRORS, abuf_lanes, abuf_read, acc_read, command, ereg_read

__all__ = ["StoreUnit"]


def _log2(n):
    return n.bit_length() - 1


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
    insn, start, busy, done, error, error_code :
        The unit command interface.
    dram : Out(dram_port(config))
    abuf_r : Out(abuf_read(config))
    acc_r : Out(acc_read(config))
    ereg_r : Out(ereg_read())
    port_wait : Out(1)
        High while waiting for the memory to take the request or a beat.
    """

    def __init__(self, config):
        if config.port_bits < 64:
            raise ValueError(f"port_bits={config.port_bits}: the store unit needs a port of at least 64 bits")
        self.config = config
        super().__init__({**command(), "dram": Out(dram_port(config)), "abuf_r": Out(abuf_read(config)),
                          "acc_r": Out(acc_read(config)), "ereg_r": Out(ereg_read()), "port_wait": Out(1)})

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        pb, lpb = cfg.port_bytes, _log2(cfg.port_bytes)
        lanes = abuf_lanes(cfg)
        llanes = _log2(lanes)
        wpb = pb // 8  # accumulator words per beat
        raw = Signal(isa.INSN_BITS, name="store_insn")
        with m.If(self.start & ~self.busy):
            m.d.sync += raw.eq(self.insn)
        st = LAYOUTS["STORE"](raw)
        sa = LAYOUTS["STACC"](raw)
        is_acc = Signal(name="store_is_stacc")
        m.d.comb += is_acc.eq(st.opcode == isa.BY_NAME["STACC"].code)

        n = Signal(17, name="store_len")
        addr16 = Signal(28, name="store_addr_units")
        m.d.comb += [n.eq(Mux(is_acc, sa.len, st.len)), addr16.eq(Mux(is_acc, sa.addr, st.addr))]
        byte_addr = Signal(32, name="store_byte_addr")
        m.d.comb += byte_addr.eq(addr16 * isa.DRAM_UNIT)
        exp_off = Signal(19, name="store_exp_offset")
        m.d.comb += exp_off.eq(((n << 1) + 3) & ~3)
        size = Signal(20, name="store_bytes")
        m.d.comb += size.eq(Mux(is_acc, n << 3, exp_off + 4))
        beats = Signal(20, name="store_beats")
        m.d.comb += beats.eq((size + pb - 1) >> lpb)

        exponent = Signal(32, name="store_exponent")
        m.d.comb += self.ereg_r.addr.eq(st.src_e)
        beat = Signal(20, name="store_beat")
        word = Signal(17, name="store_acc_word")
        slot = Signal(range(max(2, wpb)), name="store_acc_slot")
        beat_buf = Signal(8 * pb, name="store_beat_buffer")
        err = Signal(range(len(EXEC_ERRORS)), name="store_fault")
        m.d.comb += self.error_code.eq(err)

        # the beat being sent: bytes [beat * pb, beat * pb + pb) of the record
        base = Signal(signed(22), name="store_beat_base")
        m.d.comb += base.eq(beat << lpb)

        def clamp_bytes(limit, name):
            left = Signal(signed(22), name=name)
            m.d.comb += left.eq(limit - base)
            out = Signal(range(pb + 1), name=name + "_clamped")
            with m.If(left >= pb):
                m.d.comb += out.eq(pb)
            with m.Elif(left > 0):
                m.d.comb += out.eq(left)
            return out

        mant_bytes = clamp_bytes(n << 1, "store_mantissa_bytes_left")
        strb_bytes = clamp_bytes(size, "store_bytes_left")
        quarter = self.abuf_r.data.word_select(beat[:2], 8 * pb)
        mant = Signal(8 * pb, name="store_mantissas")
        m.d.comb += mant.eq(quarter & ((Const(1, 8 * pb + 1) << (mant_bytes * 8)) - 1))
        exp_here = Signal(8 * pb, name="store_exponent_bits")
        with m.If(beat == (exp_off >> lpb)):
            m.d.comb += exp_here.eq(exponent << (exp_off[:lpb] * 8))
        m.d.comb += [
            self.dram.req_write.eq(1), self.dram.req_addr.eq(byte_addr >> lpb), self.dram.req_len.eq(beats),
            self.dram.wr_data.eq(Mux(is_acc, beat_buf, mant | exp_here)),
            self.dram.wr_strb.eq((Const(1, pb + 1) << strb_bytes) - 1),
            self.abuf_r.addr.eq((st.src >> llanes) + (beat >> 2)),
            self.acc_r.addr.eq(sa.acc + word),
        ]

        with m.FSM(name="store_fsm"):
            with m.State("IDLE"), m.If(self.start):
                m.next = "CHECK"
            with m.State("CHECK"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [beat.eq(0), word.eq(0), slot.eq(0), err.eq(0), beat_buf.eq(0),
                             exponent.eq(self.ereg_r.data)]
                unaligned = (byte_addr & (pb - 1)) | (~is_acc & (st.src & (lanes - 1)).any())
                beyond = Mux(is_acc, sa.acc + n > cfg.acc_buffer_words, st.src + n > cfg.act_buffer_words)
                with m.If(unaligned):
                    m.d.sync += err.eq(EXEC_ERRORS.index("unaligned"))
                    m.next = "FAIL"
                with m.Elif(beyond | (byte_addr + size > cfg.dram_bytes) | (is_acc & (n == 0))):
                    m.d.sync += err.eq(EXEC_ERRORS.index("out_of_range"))
                    m.next = "FAIL"
                with m.Else():
                    m.next = "REQUEST"
            with m.State("REQUEST"):
                m.d.comb += [self.busy.eq(1), self.dram.req_valid.eq(1), self.port_wait.eq(~self.dram.req_ready)]
                with m.If(self.dram.req_ready):
                    with m.If(is_acc):
                        m.next = "ACC_READ"
                    with m.Else():
                        m.next = "VEC_READ"
            # ---- STORE: one buffer read per four beats
            with m.State("VEC_READ"):
                m.d.comb += [self.busy.eq(1), self.abuf_r.en.eq(1)]
                m.next = "VEC_SEND"
            with m.State("VEC_SEND"):
                m.d.comb += [self.busy.eq(1), self.dram.wr_valid.eq(1), self.port_wait.eq(~self.dram.wr_ready)]
                with m.If(self.dram.wr_ready):
                    m.d.sync += beat.eq(beat + 1)
                    with m.If(beat == beats - 1):
                        m.next = "DONE"
                    with m.Elif(beat[:2] == 3):
                        m.next = "VEC_READ"
            # ---- STACC: read accumulator words into the beat buffer, send it when full
            with m.State("ACC_READ"):
                m.d.comb += [self.busy.eq(1), self.acc_r.en.eq(1)]
                m.next = "ACC_CAPTURE"
            with m.State("ACC_CAPTURE"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [beat_buf.word_select(slot, 64).eq(self.acc_r.data), word.eq(word + 1)]
                with m.If((slot == wpb - 1) | (word == n - 1)):
                    m.d.sync += slot.eq(0)
                    m.next = "ACC_SEND"
                with m.Else():
                    m.d.sync += slot.eq(slot + 1)
                    m.next = "ACC_READ"
            with m.State("ACC_SEND"):
                m.d.comb += [self.busy.eq(1), self.dram.wr_valid.eq(1), self.port_wait.eq(~self.dram.wr_ready)]
                with m.If(self.dram.wr_ready):
                    m.d.sync += [beat.eq(beat + 1), beat_buf.eq(0)]
                    with m.If(beat == beats - 1):
                        m.next = "DONE"
                    with m.Else():
                        m.next = "ACC_READ"
            with m.State("DONE"):
                m.d.comb += [self.busy.eq(1), self.done.eq(1)]
                m.next = "IDLE"
            with m.State("FAIL"):
                m.d.comb += [self.busy.eq(1), self.done.eq(1), self.error.eq(1)]
                m.next = "IDLE"
        return m
