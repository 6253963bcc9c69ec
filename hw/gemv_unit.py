"""GEMV unit: the GEMV engine fed from the external-memory port, with split-K accumulation and the exponent."""

from __future__ import annotations

from amaranth.hdl import EnableInserter, Module, Mux, Signal
from amaranth.lib import wiring
from amaranth.lib.fifo import SyncFIFO
from amaranth.lib.wiring import Out

from kvoverlay import isa
from kvoverlay import numerics as nx

from .dram import dram_port
from .gemv import GemvEngine
from .isa_layout import LAYOUTS
from .ports import EREG_SHAPE, EXEC_ERRORS, abuf_lanes, abuf_read, acc_read, acc_write, command, ereg_read, ereg_write

__all__ = ["GemvUnit"]

#: Depth of the weight FIFO between the port and the engine.
WEIGHT_FIFO_DEPTH = 4


def _log2(n):
    return n.bit_length() - 1


class GemvUnit(wiring.Component):
    """Executes GEMV: one burst read of the whole tile streams through a small FIFO into :class:`GemvEngine`.

    The engine runs under an enable that stalls it whenever it would consume a weight word that has not arrived,
    so weights stream at the port rate when the port delivers one beat per cycle. Each finished row goes through
    one more stage that adds the old accumulator (``accumulate=1``, split-K) or overwrites it. At the end the
    accumulator exponent register gets ``x_e + sexp``. Faults: weight format not built (``format``); group too
    small for one window of the engine, ``cols`` not a positive multiple of the group or ``rows == 0``
    (``group``); unaligned ``x`` or weight address (``unaligned``); ranges past the buffers or the memory
    (``out_of_range``); accumulating onto a different exponent (``exponent``).

    Parameters
    ----------
    config : OverlayConfig

    Attributes
    ----------
    insn, start, busy, done, error, error_code :
        The unit command interface.
    dram : Out(dram_port(config))
    abuf_r : Out(abuf_read(config))
    acc_r : Out(acc_read(config))
    acc_w : Out(acc_write(config))
    ereg_rx, ereg_ra : Out(ereg_read())
        Exponents of x and of the accumulators.
    ereg_w : Out(ereg_write())
    port_wait : Out(1)
        High while the request waits for the memory, or the engine waits for a weight word.
    """

    def __init__(self, config):
        self.config = config
        super().__init__({**command(), "dram": Out(dram_port(config)), "abuf_r": Out(abuf_read(config)),
                          "acc_r": Out(acc_read(config)), "acc_w": Out(acc_write(config)),
                          "ereg_rx": Out(ereg_read()), "ereg_ra": Out(ereg_read()), "ereg_w": Out(ereg_write()),
                          "port_wait": Out(1)})

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        pb, lpb = cfg.port_bytes, _log2(cfg.port_bytes)
        lanes = abuf_lanes(cfg)
        llanes = _log2(lanes)
        ins = Signal(LAYOUTS["GEMV"], name="gemv_insn")
        with m.If(self.start & ~self.busy):
            m.d.sync += ins.eq(self.insn)
        m.d.comb += [self.ereg_rx.addr.eq(ins.x_e), self.ereg_ra.addr.eq(ins.acc_e)]

        # ---- tile geometry, as numerics.row_stride
        gl = Signal(4, name="gemv_group_log2")
        m.d.comb += gl.eq(ins.lg_group + _log2(isa.GROUP_BASE))
        cols, rows = ins.cols, ins.rows
        ngroups = Signal(17, name="gemv_groups")
        m.d.comb += ngroups.eq(cols >> gl)
        wbytes = Signal(18, name="gemv_weight_bytes")
        with m.Switch(ins.fmt):
            for code, fmt in enumerate(isa.ENUMS["fmt"]):
                with m.Case(code):
                    bits = nx.WEIGHT_FORMATS[fmt]
                    m.d.comb += wbytes.eq((cols * bits) >> 3)
        words_per_row = Signal(18, name="gemv_words_per_row")
        m.d.comb += words_per_row.eq((ngroups * 2 + wbytes + pb - 1) >> lpb)
        tile_words = Signal(34, name="gemv_tile_words")
        m.d.sync += tile_words.eq(rows * words_per_row)
        byte_addr = Signal(32, name="gemv_byte_addr")
        m.d.comb += byte_addr.eq(ins.addr * isa.DRAM_UNIT)
        exp_out = Signal(EREG_SHAPE, name="gemv_exp_out")
        m.d.comb += exp_out.eq(self.ereg_rx.data + ins.sexp)
        built = Signal(4, name="gemv_formats_built")
        m.d.comb += built.eq(sum(1 << isa.ENUMS["fmt"].index(f) for f in cfg.weight_formats))
        # engine window: int4 2pb weights, int8 pb, w16 pb/2; the group must hold a whole number of windows
        fmt_log2_bits = Signal(3, name="gemv_weight_bits_log2")
        with m.Switch(ins.fmt):
            for code, fmt in enumerate(isa.ENUMS["fmt"]):
                with m.Case(code):
                    m.d.comb += fmt_log2_bits.eq(_log2(nx.WEIGHT_FORMATS[fmt]))

        # ---- engine and weight stream
        fifo = m.submodules.weight_fifo = SyncFIFO(width=cfg.port_bits, depth=WEIGHT_FIFO_DEPTH)
        engine = GemvEngine(cfg)
        enable = Signal(name="gemv_engine_enable")
        m.submodules.engine = EnableInserter(enable)(engine)
        m.d.comb += [
            enable.eq(~engine.w_take | fifo.r_rdy),
            fifo.r_en.eq(engine.w_take & fifo.r_rdy),
            engine.w_data.eq(fifo.r_data),
            fifo.w_en.eq(self.dram.rd_valid), fifo.w_data.eq(self.dram.rd_data),
            engine.rows.eq(rows), engine.cols.eq(cols), engine.group_log2.eq(gl), engine.fmt.eq(ins.fmt),
            engine.w_base.eq(0),
            self.abuf_r.addr.eq((ins.x >> llanes) + engine.x_addr), self.abuf_r.en.eq(enable),
            engine.x_data.eq(self.abuf_r.data),
            self.dram.req_write.eq(0), self.dram.req_addr.eq(byte_addr >> lpb), self.dram.req_len.eq(tile_words),
        ]

        # ---- row write-back: old + new (split-K) or new
        row_valid = Signal(name="gemv_row_valid")
        row_addr = Signal(range(cfg.acc_buffer_words), name="gemv_row_addr")
        row_value = Signal(64, name="gemv_row_value")
        m.d.sync += [row_valid.eq(engine.acc_en & enable), row_addr.eq(ins.acc + engine.acc_addr),
                     row_value.eq(engine.acc_data)]
        m.d.comb += [self.acc_r.addr.eq(ins.acc + engine.acc_addr), self.acc_r.en.eq(engine.acc_en & enable),
                     self.acc_w.addr.eq(row_addr), self.acc_w.en.eq(row_valid),
                     self.acc_w.data.eq(row_value + Mux(ins.accumulate, self.acc_r.data, 0))]

        err = Signal(range(len(EXEC_ERRORS)), name="gemv_fault")
        m.d.comb += self.error_code.eq(err)
        requested = Signal(name="gemv_requested")

        with m.FSM(name="gemv_fsm"):
            with m.State("IDLE"), m.If(self.start):
                m.next = "CHECK"
            with m.State("CHECK"):
                m.d.comb += self.busy.eq(1)
                m.d.sync += [err.eq(0), requested.eq(0)]
                with m.If(~(built >> ins.fmt)[0]):
                    m.d.sync += err.eq(EXEC_ERRORS.index("format"))
                    m.next = "FAIL"
                with m.Elif((gl + fmt_log2_bits < lpb + 3) | (cols == 0) | (rows == 0) | (cols & ((1 << gl) - 1)).any()):
                    m.d.sync += err.eq(EXEC_ERRORS.index("group"))
                    m.next = "FAIL"
                with m.Elif((ins.x & (lanes - 1)).any() | (byte_addr & (pb - 1)).any()):
                    m.d.sync += err.eq(EXEC_ERRORS.index("unaligned"))
                    m.next = "FAIL"
                with m.Elif((ins.x + cols > cfg.act_buffer_words) | (ins.acc + rows > cfg.acc_buffer_words)):
                    m.d.sync += err.eq(EXEC_ERRORS.index("out_of_range"))
                    m.next = "FAIL"
                with m.Elif(ins.accumulate & (self.ereg_ra.data != exp_out)):
                    m.d.sync += err.eq(EXEC_ERRORS.index("exponent"))
                    m.next = "FAIL"
                with m.Else():
                    m.next = "RANGE"
            with m.State("RANGE"):
                m.d.comb += self.busy.eq(1)
                with m.If(byte_addr + (tile_words << lpb) > cfg.dram_bytes):
                    m.d.sync += err.eq(EXEC_ERRORS.index("out_of_range"))
                    m.next = "FAIL"
                with m.Else():
                    m.d.comb += engine.start.eq(1)
                    m.next = "STREAM"
            with m.State("STREAM"):
                m.d.comb += [self.busy.eq(1), self.dram.req_valid.eq(~requested),
                             self.port_wait.eq((~requested & ~self.dram.req_ready) | (engine.w_take & ~fifo.r_rdy))]
                with m.If(self.dram.req_ready):
                    m.d.sync += requested.eq(1)
                with m.If(engine.done):
                    m.next = "WRITEBACK"
            with m.State("WRITEBACK"):
                m.d.comb += self.busy.eq(1)
                m.next = "FINISH"
            with m.State("FINISH"):
                m.d.comb += [self.busy.eq(1), self.done.eq(1), self.ereg_w.addr.eq(ins.acc_e),
                             self.ereg_w.data.eq(exp_out), self.ereg_w.en.eq(1)]
                m.next = "IDLE"
            with m.State("FAIL"):
                m.d.comb += [self.busy.eq(1), self.done.eq(1), self.error.eq(1)]
                m.next = "IDLE"
        return m
