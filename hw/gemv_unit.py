"""GEMV unit: the GEMV engine fed from the external-memory port, with split-K accumulation and the exponent."""

from __future__ import annotations

from amaranth.hdl import EnableInserter, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import Out

from kvoverlay import isa
from kvoverlay.timing import gemv_packs, gemv_scale_words

from .dram import dram_port, request_burst
from .gemv import GemvEngine
from .isa_layout import LAYOUTS
from .ports import EREG_SHAPE, Fault, abuf_read, acc_read, acc_write, ereg_read, ereg_write, unit_signature
from .unit import Sequencer, row_geometry, word_sizes
from .widths import log2_exact

__all__ = ["GemvUnit", "peak_signature"]

#: Depth of the weight FIFO between the port and the engine.
WEIGHT_FIFO_DEPTH = 4


def peak_signature(config) -> wiring.Signature:
    """The GEMV unit's peak record, seen from the unit (kvoverlay.timing.peak_record): the accumulator range of the
    last tile it streamed (``acc``, ``rows``) and the OR of the magnitudes of the words it wrote there (``peak``),
    whose bit length is the peak's, as the requantizer's peak pass finds it."""
    return wiring.Signature({"acc": Out(range(config.acc_buffer_words)), "rows": Out(16), "peak": Out(64)})


class GemvUnit(wiring.Component):
    """Executes GEMV: one burst read of the whole tile streams through a small FIFO into :class:`GemvEngine`.

    The engine runs under an enable that stalls it whenever it would consume a weight word that has not arrived,
    so weights stream at the port rate when the port delivers one beat per cycle. Each finished row goes through
    one more stage that adds the old accumulator (``accumulate=1``, split-K) or overwrites it. At the end the
    accumulator exponent register gets ``x_e + sexp``. Faults: weight format not built (``FORMAT``); a group
    narrower than ``config.min_group``, ``cols`` not a positive multiple of the group or ``rows == 0``, or
    ``packed=1`` where the engine cannot stream the tile packed (``timing.gemv_pack_refusal``; every ``packed=1``
    on an engine built without packed rows) (``GROUP``); unaligned ``x`` or weight address (``UNALIGNED``); ranges past the buffers or the memory
    (``OUT_OF_RANGE``); accumulating onto a different exponent (``EXPONENT``).

    Parameters
    ----------
    config : OverlayConfig
        The engine is one port word wide; ``weight_formats`` are built.

    Attributes
    ----------
    cmd, busy, done :
        :func:`hw.ports.unit_signature` of ``LAYOUTS["GEMV"]``.
    dram : Out(dram_port(config))
        Burst port: the weight tile.
    abuf_r : Out(abuf_read(config))
        The input vector x.
    acc_r, acc_w : Out(acc_read(config)), Out(acc_write(config))
        The accumulators (read for split-K).
    acc_r1, acc_w1 : Out(acc_read(config)), Out(acc_write(config))
        Where the engine is built for packed rows (``timing.gemv_packs``): a second accumulator word per cycle, at
        the next address.
    ereg_rx, ereg_ra, ereg_w : Out(ereg_read()), Out(ereg_read()), Out(ereg_write())
        Exponents of x and of the accumulators; the accumulators' new exponent.
    port_wait : Out(1)
        High while the request waits for the memory, or the engine waits for a weight word.
    peak : Out(peak_signature(config))
        The last streamed tile's peak record, for a REQ with ``fold=1``; complete from the cycle after ``done``.
    """

    def __init__(self, config):
        self.config = config
        self.packs = gemv_packs(config)
        second = {"acc_r1": Out(acc_read(config)), "acc_w1": Out(acc_write(config))} if self.packs else {}
        super().__init__(unit_signature(LAYOUTS["GEMV"], dram=Out(dram_port(config)), abuf_r=Out(abuf_read(config)),
                                        acc_r=Out(acc_read(config)), acc_w=Out(acc_write(config)), **second,
                                        ereg_rx=Out(ereg_read()), ereg_ra=Out(ereg_read()), ereg_w=Out(ereg_write()),
                                        port_wait=Out(1), peak=Out(peak_signature(config))))

    def elaborate(self, platform):
        m = Module()
        seq = Sequencer(m, self, "gemv")
        ins, cfg = seq.insn, self.config
        pb, lpb, lanes, llanes = word_sizes(cfg)
        m.d.comb += [self.ereg_rx.addr.eq(ins.x_e), self.ereg_ra.addr.eq(ins.acc_e)]

        # ---- tile geometry, as numerics.row_stride
        cols, rows = ins.cols, ins.rows
        row_geo = row_geometry(m, ins, cfg, "gemv")
        gl = row_geo.group_log2
        tile_words = Signal(len(rows) + len(row_geo.words), name="gemv_tile_words")
        if self.packs:
            pack_fault = self._packed_tile(m, ins, row_geo, tile_words)
        else:
            m.d.sync += tile_words.eq(rows * row_geo.words)
            pack_fault = ins.packed
        byte_addr = Signal(len(ins.addr) + log2_exact(isa.DRAM_UNIT), name="gemv_byte_addr")
        m.d.comb += byte_addr.eq(ins.addr * isa.DRAM_UNIT)
        exp_out = Signal(EREG_SHAPE, name="gemv_exp_out")
        m.d.comb += exp_out.eq(self.ereg_rx.data + ins.sexp)

        # ---- engine and weight stream
        fifo = m.submodules.weight_fifo = SyncFIFO(width=cfg.port_bits, depth=WEIGHT_FIFO_DEPTH)
        engine = GemvEngine(cfg)
        enable = Signal(name="gemv_engine_enable")
        m.submodules.engine = EnableInserter(enable)(engine)
        m.d.comb += [
            enable.eq(~engine.w_take | fifo.r_rdy),
            fifo.r_en.eq(engine.w_take & fifo.r_rdy),
            engine.w_data.eq(fifo.r_data),
            fifo.w_en.eq(self.dram.rd.valid), fifo.w_data.eq(self.dram.rd.payload),
            engine.cmd.payload.rows.eq(rows), engine.cmd.payload.cols.eq(cols),
            engine.cmd.payload.group_log2.eq(gl), engine.cmd.payload.fmt.eq(ins.fmt), engine.cmd.payload.w_base.eq(0),
            *([engine.cmd.payload.packed.eq(ins.packed)] if self.packs else []),
            self.abuf_r.addr.eq((ins.x >> llanes) + engine.x_addr), self.abuf_r.en.eq(enable),
            engine.x_data.eq(self.abuf_r.data),
        ]

        # ---- row write-back: old + new (split-K) or new
        row_valid = Signal(name="gemv_row_valid")
        row_addr = Signal.like(self.acc_w.addr, name="gemv_row_addr")
        row_value = Signal.like(self.acc_w.data, name="gemv_row_value")
        m.d.sync += [row_valid.eq(engine.acc_en & enable), row_addr.eq(ins.acc + engine.acc_addr),
                     row_value.eq(engine.acc_data)]
        m.d.comb += [self.acc_r.addr.eq(ins.acc + engine.acc_addr), self.acc_r.en.eq(engine.acc_en & enable),
                     self.acc_w.addr.eq(row_addr), self.acc_w.en.eq(row_valid),
                     self.acc_w.data.eq(row_value + Mux(ins.accumulate, self.acc_r.data, 0))]

        # ---- the peak record: each written word's magnitude ORed in a cycle after its write, so that the magnitude's
        # carry chain does not follow the split-K adder's in one cycle; a 64-bit register pair, no block RAM
        written = Signal.like(self.acc_w.data, name="gemv_written")
        wrote = Signal(name="gemv_wrote")
        m.d.sync += [written.eq(self.acc_w.data), wrote.eq(self.acc_w.en)]
        value = written.as_signed()
        if self.packs:
            self._second_word(m, engine, enable, ins)
            written1 = Signal.like(self.acc_w1.data, name="gemv_written1")
            wrote1 = Signal(name="gemv_wrote1")
            m.d.sync += [written1.eq(self.acc_w1.data), wrote1.eq(self.acc_w1.en)]
            value1 = written1.as_signed()
            m.d.sync += self.peak.peak.eq(self.peak.peak | Mux(wrote, Mux(value < 0, -value, value), 0)
                                          | Mux(wrote1, Mux(value1 < 0, -value1, value1), 0))
        else:
            with m.If(wrote):
                m.d.sync += self.peak.peak.eq(self.peak.peak | Mux(value < 0, -value, value))

        requested = Signal(name="gemv_requested")
        weight_wait = Signal(name="gemv_weight_wait")
        m.d.comb += weight_wait.eq(engine.w_take & ~fifo.r_rdy)
        with seq.fsm("CHECK"):
            with m.State("CHECK"):
                m.d.sync += requested.eq(0)
                # a group narrower than the engine's window (one port word of weights) is scaled in its subtree,
                # down to the narrowest it is built for (config.builds_group)
                with seq.check((~row_geo.built, Fault.FORMAT),
                               ((cols == 0) | (rows == 0) | (cols & ((1 << gl) - 1)).any()
                                | (gl < log2_exact(cfg.min_group)) | pack_fault, Fault.GROUP),
                               ((ins.x & (lanes - 1)).any() | (byte_addr & (pb - 1)).any(),
                                Fault.UNALIGNED),
                               ((ins.x + cols > cfg.act_buffer_words) | (ins.acc + rows > cfg.acc_buffer_words),
                                Fault.OUT_OF_RANGE),
                               (ins.accumulate & (self.ereg_ra.data != exp_out), Fault.EXPONENT)):
                    m.next = "RANGE"
            with m.State("RANGE"), seq.check((byte_addr + (tile_words << lpb) > cfg.dram_bytes, Fault.OUT_OF_RANGE)):
                m.d.comb += engine.cmd.valid.eq(1)
                # a tile that streams replaces the record (one that faults leaves it)
                m.d.sync += [self.peak.acc.eq(ins.acc), self.peak.rows.eq(rows), self.peak.peak.eq(0)]
                m.next = "STREAM"
            with m.State("STREAM"):
                # the request goes out while the engine fills its pipeline
                m.d.comb += self.port_wait.eq(weight_wait)
                with m.If(~requested):
                    request_wait = Signal(name="gemv_request_wait")
                    m.d.comb += self.port_wait.eq(request_wait | weight_wait)
                    with m.If(request_burst(m, self.dram, byte_addr >> lpb, tile_words, wait=request_wait)):
                        m.d.sync += requested.eq(1)
                with m.If(engine.done):
                    m.next = "WRITEBACK"
            with m.State("WRITEBACK"):
                m.next = "FINISH"
            with m.State("FINISH"):
                m.d.comb += [self.ereg_w.addr.eq(ins.acc_e), self.ereg_w.data.eq(exp_out), self.ereg_w.en.eq(1)]
                seq.complete()
        return m

    def _packed_tile(self, m, ins, row_geo, tile_words):
        """The words of a tile of packed rows or row records (*tile_words*, registered), and the GROUP fault of a
        packed tile the engine cannot stream (timing.gemv_pack_refusal)."""
        cfg = self.config
        pb, lpb = cfg.port_bytes, log2_exact(cfg.port_bytes)
        rows, gl = ins.rows, row_geo.group_log2
        win = Signal(range(lpb + 4), name="gemv_window_log2")  # log2 of a window's weights
        m.d.comb += win.eq(lpb + 3 - row_geo.bits_log2)
        block = Signal(range(lpb + 4), name="gemv_block_log2")  # log2 of a block's rows
        m.d.comb += block.eq(win - gl)
        scale_words = Signal(len(row_geo.words) + lpb, name="gemv_block_scale_words")
        m.d.comb += scale_words.eq(((row_geo.groups << block << 1) + pb - 1) >> lpb)
        block_words = Signal(len(row_geo.words) + lpb, name="gemv_block_words")
        m.d.comb += block_words.eq(scale_words + row_geo.groups)
        with m.If(ins.packed):
            m.d.sync += tile_words.eq(((rows + (1 << block) - 1) >> block) * block_words)
        with m.Else():
            m.d.sync += tile_words.eq(rows * row_geo.words)
        fault = Signal(name="gemv_pack_fault")
        m.d.comb += fault.eq(ins.packed & ((gl >= win) | (scale_words > gemv_scale_words(cfg))
                                           | (((1 << block) >> 1) > block_words)))
        return fault

    def _second_word(self, m, engine, enable, ins):
        """Packed rows: the engine's second accumulator word per cycle, written back as the first."""
        valid = Signal(name="gemv_row1_valid")
        addr = Signal.like(self.acc_w1.addr, name="gemv_row1_addr")
        value = Signal.like(self.acc_w1.data, name="gemv_row1_value")
        m.d.sync += [valid.eq(engine.acc_en1 & enable), addr.eq(ins.acc + engine.acc_addr + 1),
                     value.eq(engine.acc_data1)]
        m.d.comb += [self.acc_r1.addr.eq(ins.acc + engine.acc_addr + 1), self.acc_r1.en.eq(engine.acc_en1 & enable),
                     self.acc_w1.addr.eq(addr), self.acc_w1.en.eq(valid),
                     self.acc_w1.data.eq(value + Mux(ins.accumulate, self.acc_r1.data, 0))]
