"""LDROW unit: gathers one row of a quantized matrix and dequantizes it into a bfp16 vector (load queue)."""

from __future__ import annotations

from amaranth.hdl import Module, Signal, signed, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import Out

from kvoverlay import isa, timing
from kvoverlay import numerics as nx

from .arith import select_word
from .dram import dram_port, request_burst
from .isa_layout import LAYOUTS
from .ports import Fault, abuf_write, ereg_write, reg_read, unit_signature
from .requantizer import add_requantizer, complete_requantization
from .unit import Sequencer, row_geometry, word_sizes
from .widths import log2_exact

__all__ = ["LdrowUnit"]


class LdrowUnit(wiring.Component):
    """Executes LDROW: one burst read of the row record into a row buffer, then two passes, one element a cycle.

    The row index is ``R[row_reg] + row_imm``; the record (numerics.pack_rows) is read into a local buffer of
    port words. Each element's weight and its group scale are read from the buffer (two read ports) and
    multiplied, and the products go through a :class:`~hw.requantizer.Requantizer` at exponent ``sexp`` (the
    REQ unit's, so both round exactly like numerics.normalize). The selected weight and scale, and the product,
    are registered (:data:`~kvoverlay.timing.LDROW_READ_LATENCY`), and the requantizer registers its round-shift,
    so that no cycle chains the block RAM's output, the multiplier and the rounding. Faults: format not built,
    ``cols`` not a positive multiple of the group, negative row, unaligned destination or address, ranges past the
    buffers or memory.

    Parameters
    ----------
    config : OverlayConfig
        The row buffer holds ``ldrow_buffer_bytes`` (a longer row record faults OUT_OF_RANGE); ``weight_formats``
        are built.

    Attributes
    ----------
    cmd, busy, done :
        :func:`hw.ports.unit_signature` of ``LAYOUTS["LDROW"]``.
    dram : Out(dram_port(config))
        Burst port: the row record.
    abuf_w, ereg_w : Out(abuf_write(config)), Out(ereg_write())
        The dequantized row and its exponent.
    reg_r : Out(reg_read())
        The row register.
    port_wait : Out(1)
        High while the request waits for the memory.
    """

    def __init__(self, config):
        self.config = config
        self.row_words = config.ldrow_buffer_bytes // config.port_bytes
        super().__init__(unit_signature(LAYOUTS["LDROW"], dram=Out(dram_port(config)), abuf_w=Out(abuf_write(config)),
                                        ereg_w=Out(ereg_write()), reg_r=Out(reg_read()), port_wait=Out(1)))

    def elaborate(self, platform):
        m = Module()
        seq = Sequencer(m, self, "ldrow")
        ins, cfg = seq.insn, self.config
        pb, lpb, lanes, llanes = word_sizes(cfg)
        m.d.comb += self.reg_r.addr.eq(ins.row_reg)

        n = ins.cols
        row_geo = row_geometry(m, ins, cfg, "ldrow")
        gl, ngroups, bits_log2, stride_words = row_geo.group_log2, row_geo.groups, row_geo.bits_log2, row_geo.words
        row = Signal(signed(len(self.reg_r.data) + 2), name="ldrow_row")
        m.d.comb += row.eq(self.reg_r.data.as_signed() + ins.row_imm)
        row_latched = Signal(len(row) - 1, name="ldrow_row_index")
        req_addr = Signal(len(row_latched) + len(stride_words), name="ldrow_word_addr")
        # the row geometry is latched with the row, so that ADDRESS's product, the request's length (through the
        # memory arbiter into the memory) and the last-beat compare start from registers
        stride_latched = Signal.like(stride_words, name="ldrow_row_words_latched")
        byte_addr = Signal(len(ins.addr) + log2_exact(isa.DRAM_UNIT), name="ldrow_byte_addr")
        m.d.comb += byte_addr.eq(ins.addr * isa.DRAM_UNIT)

        # ---- row buffer, written by the burst, read twice per element
        m.submodules.row_buffer = rowbuf = Memory(shape=unsigned(cfg.port_bits), depth=self.row_words, init=[])
        wp = rowbuf.write_port()
        rw = rowbuf.read_port()  # weight word
        rs = rowbuf.read_port()  # scale word
        beat = Signal(range(self.row_words + 1), name="ldrow_beat")
        m.d.comb += [wp.addr.eq(beat), wp.data.eq(self.dram.rd.payload)]

        k = Signal.like(n, name="ldrow_element")  # the element the requantizer reads
        bit_addr = len(n) + 4 + lpb  # bit addresses inside a row record
        wbit = Signal(bit_addr, name="ldrow_weight_bit")  # bit address of weight k in the record
        m.d.comb += wbit.eq((ngroups << 4) + (k << bits_log2))
        sbit = Signal(bit_addr, name="ldrow_scale_bit")
        m.d.comb += sbit.eq((k >> gl) << 4)
        m.d.comb += [rw.addr.eq(wbit >> (lpb + 3)), rs.addr.eq(sbit >> (lpb + 3))]
        wsel = Signal(lpb + 3, name="ldrow_weight_sel")
        ssel = Signal(lpb + 3, name="ldrow_scale_sel")
        m.d.sync += [wsel.eq(wbit[:lpb + 3]), ssel.eq(sbit[:lpb + 3])]
        # a weight of b bits starts at a multiple of b bits (the scales before it are whole halfwords), so it lies in
        # one halfword of the word: a 16-way select of halfwords, then the byte or nibble in it, instead of a 64-way
        # select of 16 bits at any nibble (which Yosys cannot know the weights never straddle)
        # (timing.LDROW_READ_LATENCY: the selected weight and scale are registered, then the product, so that the
        # block RAM's output, the multiplier and the requantizer each have a cycle of their own)
        half = select_word(m, rw.data, wsel[4:], 16, name="ldrow_weight_halfword")
        q = Signal(signed(16), name="ldrow_weight")
        with m.Switch(ins.fmt):
            for code, fmt in enumerate(isa.ENUMS["fmt"]):
                bits = nx.WEIGHT_FORMATS[fmt]
                with m.Case(code):
                    m.d.sync += q.eq(half.word_select(wsel[log2_exact(bits):4], bits).as_signed() if bits < 16
                                     else half.as_signed())
        scale = Signal(16, name="ldrow_scale")
        m.d.sync += scale.eq(rs.data.word_select(ssel[4:], 16))
        value = Signal(signed(len(q) + len(scale) + 1), name="ldrow_value")
        m.d.sync += value.eq(q * scale)
        rq = add_requantizer(m, self, len(value), length=n, exp=ins.sexp, dst=ins.dst >> llanes,
                             latency=timing.LDROW_READ_LATENCY, registered=True)
        m.d.comb += [k.eq(rq.index), rq.value.eq(value)]

        with seq.fsm("CHECK"):
            with m.State("CHECK"):
                m.d.sync += [row_latched.eq(row), stride_latched.eq(stride_words), beat.eq(0)]
                # uint4 has no zero-point datapath here: tables are never uint4 (the golden model refuses it too)
                with seq.check((~row_geo.built | (ins.fmt == isa.ENUMS["fmt"].index("uint4")), Fault.FORMAT),
                               ((n == 0) | (n & ((1 << gl) - 1)).any(), Fault.GROUP),
                               (row < 0, Fault.OUT_OF_RANGE),
                               ((ins.dst & (lanes - 1)).any() | (byte_addr & (pb - 1)).any(), Fault.UNALIGNED),
                               (ins.dst + n > cfg.act_buffer_words, Fault.OUT_OF_RANGE)):
                    m.next = "ADDRESS"
            with m.State("ADDRESS"):
                m.d.sync += req_addr.eq((byte_addr >> lpb) + row_latched * stride_latched)
                m.next = "RANGE"
            with m.State("RANGE"), seq.check(((req_addr + stride_latched) << lpb > cfg.dram_bytes, Fault.OUT_OF_RANGE),
                                             (stride_latched > self.row_words, Fault.OUT_OF_RANGE)):
                m.next = "REQUEST"
            with m.State("REQUEST"), m.If(request_burst(m, self.dram, req_addr, stride_latched, wait=self.port_wait)):
                m.next = "RECEIVE"
            with m.State("RECEIVE"):
                m.d.comb += wp.en.eq(self.dram.rd.valid)
                with m.If(self.dram.rd.valid):
                    m.d.sync += beat.eq(beat + 1)
                    with m.If(beat == stride_latched - 1):
                        m.d.comb += rq.cmd.valid.eq(1)
                        m.next = "REQUANTIZE"
            with m.State("REQUANTIZE"):
                complete_requantization(m, seq, rq, self.ereg_w, ins.dst_e)
        return m
