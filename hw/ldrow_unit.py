"""LDROW unit: gathers one row of a quantized matrix and dequantizes it into a bfp16 vector (load queue)."""

from __future__ import annotations

from amaranth.hdl import Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import Out

from kvoverlay import isa
from kvoverlay import numerics as nx

from .dram import dram_port
from .isa_layout import LAYOUTS
from .normalize import scalar_mantissa
from .ports import EREG_SHAPE, EXEC_ERRORS, abuf_lanes, abuf_write, command, ereg_write, reg_read

__all__ = ["LdrowUnit"]


def _log2(n):
    return n.bit_length() - 1


class LdrowUnit(wiring.Component):
    """Executes LDROW: one burst read of the row record into a row buffer, then two passes, one element a cycle.

    The row index is ``R[row_reg] + row_imm``; the record (numerics.pack_rows) is read into a local buffer of
    port words. Each element's weight and its group scale are read from the buffer (two read ports) and
    multiplied; pass 1 ORs the magnitudes (the peak's bit length), pass 2 rounds exactly like REQ
    (numerics.normalize with exponent ``sexp``). Faults: format not built, ``cols`` not a positive multiple of
    the group, negative row, unaligned destination or address, ranges past the buffers or memory.

    Parameters
    ----------
    config : OverlayConfig

    Attributes
    ----------
    insn, start, busy, done, error, error_code :
        The unit command interface.
    dram : Out(dram_port(config))
    abuf_w : Out(abuf_write(config))
    ereg_w : Out(ereg_write())
    reg_r : Out(reg_read())
    port_wait : Out(1)
    """

    def __init__(self, config):
        self.config = config
        pb = config.port_bytes
        # the longest row the activation buffer can take: w16 weights plus one scale per smallest group
        max_bytes = 2 * config.act_buffer_words + 2 * (config.act_buffer_words // isa.GROUP_BASE)
        self.row_words = -(-max_bytes // pb)
        super().__init__({**command(), "dram": Out(dram_port(config)), "abuf_w": Out(abuf_write(config)),
                          "ereg_w": Out(ereg_write()), "reg_r": Out(reg_read()), "port_wait": Out(1)})

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        pb, lpb = cfg.port_bytes, _log2(cfg.port_bytes)
        lanes = abuf_lanes(cfg)
        llanes = _log2(lanes)
        ins = Signal(LAYOUTS["LDROW"], name="ldrow_insn")
        with m.If(self.start & ~self.busy):
            m.d.sync += ins.eq(self.insn)
        m.d.comb += self.reg_r.addr.eq(ins.row_reg)

        gl = Signal(4, name="ldrow_group_log2")
        m.d.comb += gl.eq(ins.lg_group + _log2(isa.GROUP_BASE))
        n = Signal(17, name="ldrow_cols")
        m.d.comb += n.eq(ins.cols)
        ngroups = Signal(17, name="ldrow_groups")
        m.d.comb += ngroups.eq(n >> gl)
        bits_log2 = Signal(3, name="ldrow_weight_bits_log2")
        with m.Switch(ins.fmt):
            for code, fmt in enumerate(isa.ENUMS["fmt"]):
                with m.Case(code):
                    m.d.comb += bits_log2.eq(_log2(nx.WEIGHT_FORMATS[fmt]))
        wbytes = Signal(19, name="ldrow_weight_bytes")
        m.d.comb += wbytes.eq((n << bits_log2) >> 3)
        stride_words = Signal(19, name="ldrow_row_words")
        m.d.comb += stride_words.eq((ngroups * 2 + wbytes + pb - 1) >> lpb)
        row = Signal(signed(34), name="ldrow_row")
        m.d.comb += row.eq(self.reg_r.data.as_signed() + ins.row_imm)
        row_latched = Signal(33, name="ldrow_row_index")
        req_addr = Signal(40, name="ldrow_word_addr")
        built = Signal(4, name="ldrow_formats_built")
        m.d.comb += built.eq(sum(1 << isa.ENUMS["fmt"].index(f) for f in cfg.weight_formats))
        byte_addr = Signal(32, name="ldrow_byte_addr")
        m.d.comb += byte_addr.eq(ins.addr * isa.DRAM_UNIT)

        # ---- row buffer, written by the burst, read twice per element
        m.submodules.row_buffer = rowbuf = Memory(shape=unsigned(cfg.port_bits), depth=self.row_words, init=[])
        wp = rowbuf.write_port()
        rw = rowbuf.read_port()  # weight word
        rs = rowbuf.read_port()  # scale word
        beat = Signal(range(self.row_words + 1), name="ldrow_beat")
        m.d.comb += [wp.addr.eq(beat), wp.data.eq(self.dram.rd_data)]

        k = Signal(17, name="ldrow_element")
        wbit = Signal(24, name="ldrow_weight_bit")  # bit address of weight k in the record
        m.d.comb += wbit.eq((ngroups << 4) + (k << bits_log2))
        sbit = Signal(24, name="ldrow_scale_bit")
        m.d.comb += sbit.eq((k >> gl) << 4)
        m.d.comb += [rw.addr.eq(wbit >> (lpb + 3)), rs.addr.eq(sbit >> (lpb + 3))]
        wsel = Signal(lpb + 3, name="ldrow_weight_sel")
        ssel = Signal(lpb + 3, name="ldrow_scale_sel")
        m.d.sync += [wsel.eq(wbit[:lpb + 3]), ssel.eq(sbit[:lpb + 3])]
        raw = rw.data.bit_select(wsel, 16)
        q = Signal(signed(16), name="ldrow_weight")
        with m.Switch(ins.fmt):
            for code, fmt in enumerate(isa.ENUMS["fmt"]):
                with m.Case(code):
                    m.d.comb += q.eq(raw[:nx.WEIGHT_FORMATS[fmt]].as_signed())
        scale = Signal(16, name="ldrow_scale")
        m.d.comb += scale.eq(rs.data.bit_select(ssel, 16))
        value = Signal(signed(34), name="ldrow_value")
        m.d.comb += value.eq(q * scale)
        mag = Signal(33, name="ldrow_magnitude")
        m.d.comb += mag.eq(Mux(value < 0, -value, value))
        peak_or = Signal(33, name="ldrow_peak_or")
        bitlen = Signal(range(35), name="ldrow_peak_bits")
        for b in range(33):
            with m.If(peak_or[b]):
                m.d.comb += bitlen.eq(b + 1)

        # ---- pass 2: numerics.normalize(values, sexp), as in the REQ unit
        shift = Signal(signed(8), name="ldrow_shift")
        e_out = Signal(signed(EREG_SHAPE.width + 2), name="ldrow_exp_out")
        under = Signal(signed(EREG_SHAPE.width + 2), name="ldrow_underflow")
        zero = Signal(name="ldrow_all_zero")
        mant = scalar_mantissa(m, value, shift, under, "ldrow")

        rd_valid = Signal(name="ldrow_read_valid")
        rd_last = Signal(name="ldrow_read_last")
        out_lane = Signal(range(lanes), name="ldrow_lane")
        out_word = Signal(17, name="ldrow_word")
        out_buf = Signal(16 * lanes, name="ldrow_word_buffer")
        out_mask = Signal(lanes, name="ldrow_lane_mask")
        wr_pending = Signal(name="ldrow_write_pending")
        m.d.sync += wr_pending.eq(0)
        with m.If(wr_pending):
            m.d.sync += out_word.eq(out_word + 1)
        m.d.comb += [self.abuf_w.addr.eq((ins.dst >> llanes) + out_word), self.abuf_w.data.eq(out_buf),
                     self.abuf_w.en.eq(Mux(wr_pending, out_mask, 0))]
        m.d.comb += [self.dram.req_write.eq(0), self.dram.req_addr.eq(req_addr), self.dram.req_len.eq(stride_words)]
        err = Signal(range(len(EXEC_ERRORS)), name="ldrow_fault")
        m.d.comb += self.error_code.eq(err)

        def fail(code):
            m.d.sync += err.eq(EXEC_ERRORS.index(code))
            m.next = "FAIL"

        with m.FSM(name="ldrow_fsm"):
            with m.State("IDLE"), m.If(self.start):
                m.next = "CHECK"
            with m.State("CHECK"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [err.eq(0), row_latched.eq(row), beat.eq(0), k.eq(0), rd_valid.eq(0), peak_or.eq(0)]
                with m.If(~(built >> ins.fmt)[0]):
                    fail("format")
                with m.Elif((n == 0) | (n & ((1 << gl) - 1)).any()):
                    fail("group")
                with m.Elif(row < 0):
                    fail("out_of_range")
                with m.Elif((ins.dst & (lanes - 1)).any() | (byte_addr & (pb - 1)).any()):
                    fail("unaligned")
                with m.Elif(ins.dst + n > cfg.act_buffer_words):
                    fail("out_of_range")
                with m.Else():
                    m.next = "ADDRESS"
            with m.State("ADDRESS"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += req_addr.eq((byte_addr >> lpb) + row_latched * stride_words)
                m.next = "RANGE"
            with m.State("RANGE"):
                m.d.comb += self.busy.eq(1)
                with m.If((req_addr + stride_words) << lpb > cfg.dram_bytes):
                    fail("out_of_range")
                with m.Else():
                    m.next = "REQUEST"
            with m.State("REQUEST"):
                m.d.comb += [self.busy.eq(1), self.dram.req_valid.eq(1), self.port_wait.eq(~self.dram.req_ready)]
                with m.If(self.dram.req_ready):
                    m.next = "RECEIVE"
            with m.State("RECEIVE"):
                m.d.comb += [self.busy.eq(1), wp.en.eq(self.dram.rd_valid)]
                with m.If(self.dram.rd_valid):
                    m.d.sync += beat.eq(beat + 1)
                    with m.If(beat == stride_words - 1):
                        m.next = "PEAK"
            with m.State("PEAK"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [rd_valid.eq(k < n), k.eq(Mux(k < n, k + 1, k))]
                with m.If(rd_valid):
                    m.d.sync += peak_or.eq(peak_or | mag)
                with m.If((k == n) & rd_valid):
                    m.next = "SHIFT"
            with m.State("SHIFT"):
                m.d.comb += self.busy.eq(1)
                s = bitlen - nx.MANT_BITS
                e = ins.sexp + s
                m.d.sync += [shift.eq(s), zero.eq(bitlen == 0), e_out.eq(e), under.eq(nx.EXP_MIN - e),
                             k.eq(0), rd_valid.eq(0), rd_last.eq(0), out_lane.eq(0), out_word.eq(0)]
                with m.If((bitlen != 0) & (e > nx.EXP_MAX)):
                    fail("overflow")
                with m.Else():
                    m.next = "ROUND"
            with m.State("ROUND"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [rd_valid.eq(k < n), rd_last.eq(k == n - 1)]
                with m.If(k < n):
                    m.d.sync += k.eq(k + 1)
                with m.If(rd_valid):
                    m.d.sync += [out_buf.word_select(out_lane, 16).eq(Mux(zero, 0, mant)),
                                 out_mask.eq(Mux(out_lane == 0, 1, out_mask | (Const(1, lanes) << out_lane))),
                                 out_lane.eq(out_lane + 1)]
                    with m.If((out_lane == lanes - 1) | rd_last):
                        m.d.sync += wr_pending.eq(1)
                    with m.If(rd_last):
                        m.next = "WRITE_EXP"
            with m.State("WRITE_EXP"):
                m.d.comb += [self.busy.eq(1), self.done.eq(1), self.ereg_w.addr.eq(ins.dst_e), self.ereg_w.en.eq(1),
                             self.ereg_w.data.eq(Mux(zero | (under > 0), nx.EXP_MIN, e_out))]
                m.next = "IDLE"
            with m.State("FAIL"):
                m.d.comb += [self.busy.eq(1), self.done.eq(1), self.error.eq(1)]
                m.next = "IDLE"
        return m
