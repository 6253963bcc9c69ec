"""Vector unit: VADD, VMUL, VSCALE, ACT, NORM, ROPE and ARGMAX, bit-exact with :mod:`kvoverlay.numerics`.

Dataflow
--------
Elementwise ops (VADD, VMUL, VSCALE, ACT, and the last two passes of NORM) stream
``vector_lanes`` elements per cycle through a four-stage pipeline:

* S0 issues the activation-buffer word addresses of chunk ``i`` on read ports A and B;
* S1 selects the chunk's lanes from the returned words (and looks up ACT gates);
* S2 computes the wide, exact per-element results (sums aligned as
  :func:`~kvoverlay.numerics.align_sum` does, products, gated inputs, normalized inputs);
* S3 feeds them to the :class:`~hw.normalize.Normalizer`.

Every result needs the peak of the whole vector before any element can be rounded, so
each op runs two passes over its inputs: a *peak* pass (S3 ORs magnitudes) and a *write*
pass that **recomputes** the wide values from the inputs (no scratch memory; the inputs
are still in the buffer because the write pass only writes chunks it has already read)
and writes the rounded mantissas. The write pass is issued right behind the peak pass,
so the two passes cost ``2 * ceil(len / vector_lanes)`` cycles plus the pipeline.

NORM first runs a statistics pass (sum and sum of squares), then a scalar sequence
(restoring divider and digit-by-digit square root, as :func:`~kvoverlay.numerics.rsqrt`),
then the two passes above. LayerNorm's ``(c * r) // n`` with ``c = n * x - sum(x)`` equals
``x * r + floor(-sum(x) * r / n)`` exactly, so one scalar division replaces a per-element one.

ROPE pairs elements at arbitrary offsets (per-head slices, halves), so it runs one pair
per two cycles (x pair on ports A/B, then cos/sin) and emits one element per cycle into
S3, in both passes.

ARGMAX keeps the first largest element per chunk (ties go to the lower lane) and across
chunks (only a strictly larger value replaces the best).

Aliasing: the destination may equal a source (in place) or not overlap it; a destination
that overlaps a source at a different start is not supported (the write pass could
overwrite inputs it has yet to read).

Results: the destination exponent register (or ARGMAX's scalar register) is written in
the cycle ``done`` pulses. A fault (:class:`~hw.ports.Fault`) changes no state; set-up faults
end after one busy cycle and the ``done`` cycle, an exponent overflow after the full run (it is
known only once the peak pass is over, before the first write).

Where numerics computes in int64 and the hardware keeps the exact value
-----------------------------------------------------------------------
Bit-exact with :mod:`kvoverlay.numerics` wherever numerics' int64 arithmetic is exact.
Outside that range numerics wraps and the hardware does not:

* ACT: ``round_shift(x, -(ex + ACT_FRAC))`` shifts int64 left by up to 523 bits; it wraps for
  ``ex > 35``. The hardware saturates to the table ends (the mathematical result).
* NORM: eps is aligned with an int64 shift by ``eps_e - (2 * ex - 32)`` bits, which wraps from
  48 bits and gives 0 from 64, and :func:`~kvoverlay.numerics.scalar` fails on totals of 2**63
  and more. The hardware adds eps exactly (folding shifts above :data:`_EPS_SHIFT_CAP` into the
  exponent, which provably changes no bit that ``scalar`` keeps).
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, signed
from amaranth.lib import data, wiring
from amaranth.lib.wiring import Out

from kvoverlay import isa, timing
from kvoverlay import numerics as nx

from .divider import Divider
from .isa_layout import HEADER_LAYOUT, LAYOUTS
from .isqrt import Isqrt
from .lut import GateLut
from .normalize import EXP_WIDE, Normalizer, bit_length, round_shift_expr
from .ports import EREG_SHAPE, Fault, abuf_lanes, abuf_read, abuf_write, ereg_read, ereg_write, reg_write, unit_signature

__all__ = ["CMD_LAYOUT", "OPS", "VectorUnit", "abuf_lanes"]

#: Opcodes this unit executes (REQ runs on the REQ unit).
OPS = timing.VECTOR_OPS
#: The instruction the unit takes: every vector opcode's fields over one word.
CMD_LAYOUT = data.UnionLayout({name: LAYOUTS[name] for name in OPS})

PIPE_DEPTH = timing.VECTOR_PIPE_DEPTH
SCALAR_BITS_PER_CYCLE = timing.SCALAR_BITS_PER_CYCLE
NORM_Z_SHIFT, RSQRT_FRAC, RSQRT_NUM, NORM_MS_FRAC = nx.NORM_Z_SHIFT, nx.RSQRT_FRAC, nx.RSQRT_NUM, nx.NORM_MS_FRAC
#: Left shifts of eps beyond this are folded into the exponent: the mean square (< 2**63)
#: then only touches bits that numerics.scalar rounds away.
_EPS_SHIFT_CAP = 63 + nx.SCALAR_BITS
#: Bits of the alignment guard (numerics.align_sum).
_GUARD = nx.ALIGN_GUARD
_GATE_BITS = nx.GATE_ONE.bit_length() - 1


def _ceil(a, b):
    return -(-a // b)


def _code(name):
    return isa.BY_NAME[name].code


class VectorUnit(wiring.Component):
    """The vector unit of the overlay.

    Parameters
    ----------
    config : OverlayConfig
        Uses ``port_bytes`` (buffer word width), ``vector_lanes`` and ``act_buffer_words``.

    Attributes
    ----------
    cmd, busy, done :
        The unit protocol (:func:`hw.ports.unit_signature`) over :data:`CMD_LAYOUT`; ``done`` carries
        the :class:`~hw.ports.Fault` (no state is changed on a fault).
    abuf_r_a, abuf_r_b : Out(abuf_read(config))
        Two activation-buffer read ports (word address, latency 1).
    abuf_w : Out(abuf_write(config))
        Activation-buffer write port with a per-lane enable.
    ereg_ra, ereg_rb, ereg_rc : Out(ereg_read())
        Three combinational exponent-register read ports.
    ereg_w : Out(ereg_write())
        Exponent-register write port.
    reg_w : Out(reg_write())
        Scalar-register write port (ARGMAX).
    """

    def __init__(self, config):
        L = abuf_lanes(config)
        V = config.vector_lanes
        if V > L:
            self._MustUse__silence = True
            raise ValueError(f"vector_lanes={V} exceeds the {L} lanes of an activation-buffer word")
        self.config = config
        self.lanes = L
        self.vlanes = V
        self.depth = config.act_buffer_words // L
        # the widest wide value is ROPE's sum of two products aligned by up to GUARD bits; NORM's z * g stays
        # below 2**34 (|z| < 2**18: |x - mean| < 2**16 times r < 2**25, over 2**NORM_Z_SHIFT)
        self.wide_width = 2 * 16 + _GUARD + 1
        super().__init__(unit_signature(
            CMD_LAYOUT,
            abuf_r_a=Out(abuf_read(config)), abuf_r_b=Out(abuf_read(config)), abuf_w=Out(abuf_write(config)),
            ereg_ra=Out(ereg_read()), ereg_rb=Out(ereg_read()), ereg_rc=Out(ereg_read()), ereg_w=Out(ereg_write()),
            reg_w=Out(reg_write()),
        ))

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        L, V = self.lanes, self.vlanes
        G = L // V  # chunks per buffer word
        lg_l = L.bit_length() - 1
        lg_g = G.bit_length() - 1
        n_words = cfg.act_buffer_words
        addr_w = 17  # element address + length, before the bounds check
        W = self.wide_width
        nw = timing.norm_widths(cfg)

        m.submodules.normalizer = norm = Normalizer(W, V)
        m.submodules.gate_lut = lut = GateLut(V)
        m.submodules.divider = div = Divider(max(nw["ss_div"], nw["ms_div"], nw["recip_div"], nw["mean_div"]),
                                             max(nw["n"], nw["root"] + 1), SCALAR_BITS_PER_CYCLE)
        m.submodules.isqrt = sq = Isqrt(nw["root"], SCALAR_BITS_PER_CYCLE)

        # ------------------------------------------------------------ instruction
        insn = Signal(CMD_LAYOUT, name="insn_reg")
        f = {name: insn[name] for name in OPS}
        opcode = HEADER_LAYOUT(insn.as_value()[:HEADER_LAYOUT.size]).opcode
        is_op = {name: Signal(name=f"is_{name.lower()}") for name in OPS}
        for name in OPS:
            m.d.comb += is_op[name].eq(opcode == _code(name))
        chunk_op = Signal(name="chunk_op")
        m.d.comb += chunk_op.eq(is_op["VADD"] | is_op["VMUL"] | is_op["VSCALE"] | is_op["ACT"] | is_op["NORM"])

        # operand fields, by op (element addresses)
        src_a = Signal(16, name="src_a")
        src_b = Signal(16, name="src_b")
        dst = Signal(16, name="dst")
        dst_e = Signal(5, name="dst_e")
        length = Signal(16, name="vec_len")
        with m.Switch(opcode):
            for name in ("VADD", "VMUL"):
                with m.Case(_code(name)):
                    m.d.comb += [src_a.eq(f[name].a), src_b.eq(f[name].b), dst.eq(f[name].dst),
                                 dst_e.eq(f[name].dst_e), length.eq(f[name].len),
                                 self.ereg_ra.addr.eq(f[name].a_e), self.ereg_rb.addr.eq(f[name].b_e)]
            with m.Case(_code("VSCALE")):
                v = f["VSCALE"]
                m.d.comb += [src_a.eq(v.a), src_b.eq(v.a), dst.eq(v.dst), dst_e.eq(v.dst_e), length.eq(v.len),
                             self.ereg_ra.addr.eq(v.a_e)]
            with m.Case(_code("ACT")):
                v = f["ACT"]
                m.d.comb += [src_a.eq(v.x), src_b.eq(v.x), dst.eq(v.dst), dst_e.eq(v.dst_e), length.eq(v.len),
                             self.ereg_ra.addr.eq(v.x_e)]
            with m.Case(_code("NORM")):
                v = f["NORM"]
                m.d.comb += [src_a.eq(v.x), src_b.eq(v.g), dst.eq(v.dst), dst_e.eq(v.dst_e), length.eq(v.len),
                             self.ereg_ra.addr.eq(v.x_e), self.ereg_rb.addr.eq(v.g_e)]
            with m.Case(_code("ARGMAX")):
                v = f["ARGMAX"]
                m.d.comb += [src_a.eq(v.x), src_b.eq(v.x), length.eq(v.len)]
            with m.Case(_code("ROPE")):
                v = f["ROPE"]
                m.d.comb += [src_a.eq(v.x), dst.eq(v.dst), dst_e.eq(v.dst_e), length.eq(v.heads * v.head_dim),
                             self.ereg_ra.addr.eq(v.x_e), self.ereg_rb.addr.eq(v.cos_e),
                             self.ereg_rc.addr.eq(v.sin_e)]

        # ------------------------------------------------------------ latched operands
        ea = Signal(EREG_SHAPE, name="exp_a")
        eb = Signal(EREG_SHAPE, name="exp_b")
        a_word = Signal(range(self.depth), name="a_word")
        b_word = Signal(range(self.depth), name="b_word")
        d_word = Signal(range(self.depth), name="dst_word")
        nchunks = Signal(16, name="nchunks")
        norm_exp_in = Signal(EXP_WIDE, name="result_exp_in")  # exponent of the wide values

        # ------------------------------------------------------------ control state
        # busy runs to the done cycle inclusive; the unit takes a command only while idle
        busy = Signal()
        m.d.comb += [self.busy.eq(busy | self.done.valid), self.cmd.ready.eq(~self.busy),
                     self.abuf_r_a.en.eq(1), self.abuf_r_b.en.eq(1)]
        m.d.sync += [self.done.valid.eq(0), self.ereg_w.en.eq(0), self.reg_w.en.eq(0)]
        issue = Signal(name="issue")  # S0 valid
        issue_idx = Signal(16, name="issue_idx")
        issue_kind = Signal(2, name="issue_kind")
        KIND_STATS, KIND_ARGMAX, KIND_PEAK, KIND_WRITE = range(4)
        drain = Signal(range(PIPE_DEPTH + 2), name="drain_count")

        # ------------------------------------------------------------ S0: issue (chunk ops)
        m.d.comb += [
            self.abuf_r_a.addr.eq(a_word + (issue_idx >> lg_g)),
            self.abuf_r_b.addr.eq(b_word + (issue_idx >> lg_g)),
        ]

        # ------------------------------------------------------------ S1: lane select, gate lookup
        s1_valid = Signal(name="s1_valid")
        s1_kind = Signal(2, name="s1_kind")
        s1_idx = Signal(16, name="s1_idx")
        m.d.sync += [s1_valid.eq(issue & (chunk_op | is_op["ARGMAX"])), s1_kind.eq(issue_kind),
                     s1_idx.eq(issue_idx)]
        lane_layout = data.ArrayLayout(signed(16), V)
        s1_a = Signal(lane_layout, name="s1_a")
        s1_b = Signal(lane_layout, name="s1_b")
        sel = s1_idx[:lg_g] if lg_g else Const(0, 1)
        m.d.comb += [
            s1_a.eq(self.abuf_r_a.data.word_select(sel, 16 * V)),
            s1_b.eq(self.abuf_r_b.data.word_select(sel, 16 * V)),
        ]
        s1_mask = Signal(V, name="s1_mask")
        for j in range(V):
            m.d.comb += s1_mask[j].eq((s1_idx * V + j) < length)
        m.d.comb += [lut.x.eq(s1_a), lut.exp.eq(ea), lut.func.eq(f["ACT"].func)]

        # ------------------------------------------------------------ S2: wide results
        s2_valid = Signal(name="s2_valid")
        s2_kind = Signal(2, name="s2_kind")
        s2_idx = Signal(16, name="s2_idx")
        s2_mask = Signal(V, name="s2_mask")
        s2_a = Signal(lane_layout, name="s2_a")
        s2_b = Signal(lane_layout, name="s2_b")
        m.d.sync += [s2_valid.eq(s1_valid), s2_kind.eq(s1_kind), s2_idx.eq(s1_idx), s2_mask.eq(s1_mask),
                     s2_a.eq(s1_a), s2_b.eq(s1_b)]
        # VADD alignment (numerics.align_sum): each operand moves left by its exponent above top
        add_ka = Signal(EXP_WIDE, name="add_shift_a")
        add_kb = Signal(EXP_WIDE, name="add_shift_b")
        norm_r = Signal(26, name="norm_recip")  # rsqrt mantissa
        norm_d = Signal(signed(nw["mean_div"] + 2), name="norm_mean_term")  # floor(-sum(x) * r / n)
        wide_layout = data.ArrayLayout(signed(W), V)
        s2_wide = Signal(wide_layout, name="s2_wide")
        for j in range(V):
            a, b = s2_a[j], s2_b[j]
            al = round_shift_expr(m, a, -add_ka, 17, _GUARD, f"add_a{j}")
            bl = round_shift_expr(m, b, -add_kb, 17, _GUARD, f"add_b{j}")
            gated = Signal(signed(16 + 17), name=f"act_gated{j}")
            m.d.comb += gated.eq(a * lut.gate[j])
            zr = Signal(signed(len(norm_d) + 16 + 1), name=f"norm_xr{j}")
            m.d.comb += zr.eq(a * norm_r + norm_d)
            z = Signal(signed(len(zr) - NORM_Z_SHIFT + 1), name=f"norm_z{j}")
            m.d.comb += z.eq((zr + (1 << (NORM_Z_SHIFT - 1))) >> NORM_Z_SHIFT)
            with m.Switch(opcode):
                with m.Case(_code("VADD")):
                    m.d.comb += s2_wide[j].eq(al + bl)
                with m.Case(_code("VMUL")):
                    m.d.comb += s2_wide[j].eq(a * b)
                with m.Case(_code("VSCALE")):
                    m.d.comb += s2_wide[j].eq(a * f["VSCALE"].imm_m)
                with m.Case(_code("ACT")):
                    m.d.comb += s2_wide[j].eq(gated)
                with m.Case(_code("NORM")):
                    m.d.comb += s2_wide[j].eq(z * b)

        # NORM statistics: sum and sum of squares of the valid lanes
        stat_sum = Signal(signed(nw["sum"]), name="stat_sum")
        stat_sq = Signal(nw["sq"], name="stat_sumsq")
        chunk_sum = 0
        chunk_sq = 0
        for j in range(V):
            chunk_sum = chunk_sum + Mux(s2_mask[j], s2_a[j], 0)
            chunk_sq = chunk_sq + Mux(s2_mask[j], s2_a[j] * s2_a[j], 0)
        with m.If(s2_valid & (s2_kind == KIND_STATS)):
            m.d.sync += [stat_sum.eq(stat_sum + chunk_sum), stat_sq.eq(stat_sq + chunk_sq)]

        # ARGMAX: first largest of the chunk, then a strictly larger chunk replaces the best
        best_val = Signal(signed(16), name="argmax_val")
        best_idx = Signal(32, name="argmax_idx")
        best_any = Signal(name="argmax_any")
        # a balanced tree of named nodes: the left (lower-lane) candidate wins ties
        level = [(s2_a[j], Const(j, range(V)), s2_mask[j]) for j in range(V)]
        depth = 0
        while len(level) > 1:
            nxt = []
            for k in range(0, len(level), 2):
                if k + 1 == len(level):
                    nxt.append(level[k])
                    continue
                (lv, li, lo), (rv, ri, ro) = level[k], level[k + 1]
                take = Signal(name=f"argmax_t{depth}_{k // 2}_right")
                val = Signal(signed(16), name=f"argmax_t{depth}_{k // 2}_val")
                idx = Signal(range(V), name=f"argmax_t{depth}_{k // 2}_lane")
                ok = Signal(name=f"argmax_t{depth}_{k // 2}_ok")
                m.d.comb += [take.eq(ro & (~lo | (rv > lv))), val.eq(Mux(take, rv, lv)), idx.eq(Mux(take, ri, li)),
                             ok.eq(lo | ro)]
                nxt.append((val, idx, ok))
            level, depth = nxt, depth + 1
        cand_val, cand_lane, cand_ok = level[0]
        with m.If(s2_valid & (s2_kind == KIND_ARGMAX) & cand_ok & (~best_any | (cand_val > best_val))):
            m.d.sync += [best_val.eq(cand_val), best_idx.eq(s2_idx * V + cand_lane), best_any.eq(1)]

        # ------------------------------------------------------------ ROPE sequencing (its own S0..S2)
        rope = f["ROPE"]
        half = Signal(10, name="rope_half")
        m.d.comb += half.eq(rope.head_dim >> 1)
        interleaved = rope.mode == isa.ENUMS["rope"].index("interleaved")
        r_head = Signal(8, name="rope_head")
        r_pair = Signal(10, name="rope_pair")
        r_phase = Signal(name="rope_phase")  # 0: read the x pair, 1: read cos and sin
        r_xbase = Signal(addr_w + 3, name="rope_x_head")
        r_dbase = Signal(addr_w + 3, name="rope_dst_head")
        r_kind = Signal(2, name="rope_kind")
        r_issue = Signal(name="rope_issue")
        r_first = Signal(addr_w + 3, name="rope_first")  # element offsets in the head of the pair
        r_second = Signal(addr_w + 3, name="rope_second")
        m.d.comb += [
            r_first.eq(Mux(interleaved, r_pair << 1, r_pair)),
            r_second.eq(Mux(interleaved, (r_pair << 1) + 1, r_pair + half)),
        ]
        xa_addr = Signal(addr_w + 3, name="rope_xa_addr")
        xb_addr = Signal(addr_w + 3, name="rope_xb_addr")
        cs_c_addr = Signal(addr_w + 3, name="rope_cos_addr")
        cs_s_addr = Signal(addr_w + 3, name="rope_sin_addr")
        m.d.comb += [
            xa_addr.eq(r_xbase + r_first), xb_addr.eq(r_xbase + r_second),
            cs_c_addr.eq(rope.cos + r_pair), cs_s_addr.eq(rope.sin + r_pair),
        ]
        with m.If(is_op["ROPE"]):
            m.d.comb += [
                self.abuf_r_a.addr.eq(Mux(r_phase, cs_c_addr, xa_addr) >> lg_l),
                self.abuf_r_b.addr.eq(Mux(r_phase, cs_s_addr, xb_addr) >> lg_l),
            ]
        r1_valid = Signal(name="rope1_valid")
        r1_phase = Signal(name="rope1_phase")
        r1_kind = Signal(2, name="rope1_kind")
        r1_lane_a = Signal(lg_l or 1, name="rope1_lane_a")
        r1_lane_b = Signal(lg_l or 1, name="rope1_lane_b")
        r1_out_a = Signal(addr_w + 3, name="rope1_out_a")
        r1_out_b = Signal(addr_w + 3, name="rope1_out_b")
        m.d.sync += [
            r1_valid.eq(r_issue), r1_phase.eq(r_phase), r1_kind.eq(r_kind),
            r1_lane_a.eq(Mux(r_phase, cs_c_addr, xa_addr)[:lg_l] if lg_l else 0),
            r1_lane_b.eq(Mux(r_phase, cs_s_addr, xb_addr)[:lg_l] if lg_l else 0),
            r1_out_a.eq(r_dbase + r_first), r1_out_b.eq(r_dbase + r_second),
        ]
        r1_va = Signal(signed(16), name="rope1_va")
        r1_vb = Signal(signed(16), name="rope1_vb")
        m.d.comb += [
            r1_va.eq(self.abuf_r_a.data.word_select(r1_lane_a, 16)),
            r1_vb.eq(self.abuf_r_b.data.word_select(r1_lane_b, 16)),
        ]
        rx_a = Signal(signed(16), name="rope_xa")
        rx_b = Signal(signed(16), name="rope_xb")
        with m.If(r1_valid & ~r1_phase):
            m.d.sync += [rx_a.eq(r1_va), rx_b.eq(r1_vb)]
        r2_valid = Signal(name="rope2_valid")
        r2_kind = Signal(2, name="rope2_kind")
        r2_xa, r2_xb, r2_c, r2_s = (Signal(signed(16), name=f"rope2_{n}") for n in ("xa", "xb", "cos", "sin"))
        r2_out_a = Signal(addr_w + 3, name="rope2_out_a")
        r2_out_b = Signal(addr_w + 3, name="rope2_out_b")
        m.d.sync += r2_valid.eq(r1_valid & r1_phase)
        with m.If(r1_valid & r1_phase):
            m.d.sync += [r2_kind.eq(r1_kind), r2_xa.eq(rx_a), r2_xb.eq(rx_b), r2_c.eq(r1_va), r2_s.eq(r1_vb),
                         r2_out_a.eq(r1_out_a), r2_out_b.eq(r1_out_b)]
        rope_kc = Signal(EXP_WIDE, name="rope_shift_cos")
        rope_ks = Signal(EXP_WIDE, name="rope_shift_sin")
        ya = Signal(signed(W), name="rope_ya")
        yb = Signal(signed(W), name="rope_yb")
        t_ac = round_shift_expr(m, r2_xa * r2_c, -rope_kc, 32, _GUARD, "rope_ac")
        t_bs = round_shift_expr(m, -(r2_xb * r2_s), -rope_ks, 32, _GUARD, "rope_nbs")
        t_bc = round_shift_expr(m, r2_xb * r2_c, -rope_kc, 32, _GUARD, "rope_bc")
        t_as = round_shift_expr(m, r2_xa * r2_s, -rope_ks, 32, _GUARD, "rope_as")
        m.d.comb += [ya.eq(t_ac + t_bs), yb.eq(t_bc + t_as)]
        held_valid = Signal(name="rope_yb_pending")
        held_y = Signal(signed(W), name="rope_yb_held")
        held_out = Signal(addr_w + 3, name="rope_yb_addr")
        held_kind = Signal(2, name="rope_yb_kind")
        m.d.sync += held_valid.eq(r2_valid)
        with m.If(r2_valid):
            m.d.sync += [held_y.eq(yb), held_out.eq(r2_out_b), held_kind.eq(r2_kind)]

        # ------------------------------------------------------------ S3: normalize, write
        s3_valid = Signal(name="s3_valid")
        s3_kind = Signal(2, name="s3_kind")
        s3_wide = Signal(wide_layout, name="s3_wide")
        s3_mask = Signal(V, name="s3_mask")
        s3_word = Signal(range(self.depth), name="s3_word")
        s3_single = Signal(name="s3_single_lane")  # ROPE: lane 0 goes to buffer lane s3_lane
        s3_lane = Signal(lg_l or 1, name="s3_lane")
        with m.If(is_op["ROPE"]):
            with m.If(r2_valid):
                m.d.sync += [s3_valid.eq(1), s3_kind.eq(r2_kind), s3_wide[0].eq(ya), s3_mask.eq(1),
                             s3_word.eq(r2_out_a >> lg_l), s3_lane.eq(r2_out_a[:lg_l] if lg_l else 0), s3_single.eq(1)]
            with m.Elif(held_valid):
                m.d.sync += [s3_valid.eq(1), s3_kind.eq(held_kind), s3_wide[0].eq(held_y), s3_mask.eq(1),
                             s3_word.eq(held_out >> lg_l), s3_lane.eq(held_out[:lg_l] if lg_l else 0), s3_single.eq(1)]
            with m.Else():
                m.d.sync += s3_valid.eq(0)
        with m.Else():
            m.d.sync += [s3_valid.eq(s2_valid & s2_kind[1]), s3_kind.eq(s2_kind), s3_wide.eq(s2_wide),
                         s3_mask.eq(s2_mask), s3_word.eq(d_word + (s2_idx >> lg_g)), s3_single.eq(0),
                         s3_lane.eq(s2_idx[:lg_g] if lg_g else 0)]
        m.d.comb += [
            norm.wide.eq(s3_wide), norm.valid.eq(s3_mask), norm.exp_in.eq(norm_exp_in),
            norm.sample.eq(s3_valid & (s3_kind == KIND_PEAK)),
        ]
        lane_data = Cat(norm.mant[j] for j in range(V))
        m.d.comb += [
            self.abuf_w.addr.eq(s3_word),
            self.abuf_w.data.eq(Mux(s3_single, Cat(norm.mant[0] for _ in range(L)), Cat(lane_data for _ in range(G)))),
        ]
        with m.If(s3_valid & (s3_kind == KIND_WRITE) & ~norm.overflow):
            with m.If(s3_single):
                m.d.comb += self.abuf_w.en.eq(Const(1, L) << s3_lane)
            with m.Else():
                m.d.comb += self.abuf_w.en.eq(s3_mask << (s3_lane[:lg_g] * V) if lg_g else s3_mask)

        # ------------------------------------------------------------ NORM scalar sequence
        n_len = Signal(nw["n"], name="norm_n")
        m.d.comb += n_len.eq(length)
        ss = Signal(nw["sq"], name="norm_ss")
        ms = Signal(nw["ms_div"], name="norm_mean_sq")
        total = Signal(16 + _EPS_SHIFT_CAP + 1, name="norm_total")
        total_exp = Signal(EXP_WIDE, name="norm_total_exp")
        sc_m = Signal(nx.SCALAR_BITS + 2, name="norm_scalar_m")
        sc_e = Signal(EXP_WIDE, name="norm_scalar_e")
        layer = f["NORM"].kind == isa.ENUMS["norm"].index("layer")
        eps_m = f["NORM"].eps_m
        # eps aligned to the mean square's exponent base = 2 * ex - 32
        base = Signal(EXP_WIDE, name="norm_base")
        m.d.comb += base.eq((ea << 1) - NORM_MS_FRAC)
        eps_shift = Signal(EXP_WIDE, name="norm_eps_shift")  # left shift of eps_m
        m.d.comb += eps_shift.eq(f["NORM"].eps_e - base)
        eps_al = round_shift_expr(m, Cat(eps_m, Const(0, 1)).as_signed(), -eps_shift, 17, _EPS_SHIFT_CAP, "norm_eps")
        total_next = Signal.like(total, name="norm_total_next")
        total_exp_next = Signal(EXP_WIDE, name="norm_total_exp_next")
        with m.If((eps_m != 0) & (eps_shift > _EPS_SHIFT_CAP)):
            m.d.comb += [total_next.eq(eps_m << _EPS_SHIFT_CAP), total_exp_next.eq(base + eps_shift - _EPS_SHIFT_CAP)]
        with m.Else():
            m.d.comb += [total_next.eq(ms + Mux(eps_m != 0, eps_al, 0)), total_exp_next.eq(base)]
        tot_len = bit_length(m, total, "norm_total_bits")
        sc_shift = Signal(signed(len(tot_len) + 2), name="norm_scalar_shift")
        m.d.comb += sc_shift.eq(tot_len - nx.SCALAR_BITS)
        sc_round = round_shift_expr(m, Cat(total, Const(0, 1)).as_signed(), sc_shift,
                                    len(total), nx.SCALAR_BITS, "norm_scalar_round")
        sc_exp = Signal(EXP_WIDE, name="norm_scalar_exp")
        m.d.comb += sc_exp.eq(total_exp + sc_shift)
        sum_r = Signal(signed(nw["sum"] + 27), name="norm_sum_r")
        m.d.comb += sum_r.eq(stat_sum * norm_r)
        norm_er = Signal(EXP_WIDE, name="norm_recip_exp")

        # ------------------------------------------------------------ set-up checks
        def bad_bounds(start, n):
            return (start + n) > n_words

        def unaligned(addr):
            return addr[:lg_l] != 0 if lg_l else Const(0)

        err_code = Signal(Fault, name="setup_error")
        with m.If(~(is_op["VADD"] | is_op["VMUL"] | is_op["VSCALE"] | is_op["ACT"] | is_op["NORM"] | is_op["ROPE"]
                    | is_op["ARGMAX"])):
            m.d.comb += err_code.eq(Fault.OPCODE)
        with m.Elif(is_op["ROPE"]):
            with m.If((rope.head_dim == 0) | rope.head_dim[0] | (rope.heads == 0)):
                m.d.comb += err_code.eq(Fault.SHAPE)
            with m.Elif(bad_bounds(rope.x, length) | bad_bounds(rope.dst, length) | bad_bounds(rope.cos, half)
                        | bad_bounds(rope.sin, half)):
                m.d.comb += err_code.eq(Fault.OUT_OF_RANGE)
        with m.Else():
            with m.If(bad_bounds(src_a, length) | bad_bounds(src_b, length)
                      | (~is_op["ARGMAX"] & bad_bounds(dst, length))):
                m.d.comb += err_code.eq(Fault.OUT_OF_RANGE)
            with m.Elif((is_op["NORM"] | is_op["ARGMAX"]) & (length == 0)):
                m.d.comb += err_code.eq(Fault.SHAPE)
            with m.Elif(unaligned(src_a) | unaligned(src_b) | (~is_op["ARGMAX"] & unaligned(dst))):
                m.d.comb += err_code.eq(Fault.UNALIGNED)

        # ------------------------------------------------------------ FSM
        m.d.comb += [div.start.eq(0), sq.start.eq(0), norm.clear.eq(0)]
        with m.FSM(name="vec_state"):
            with m.State("IDLE"), m.If(self.cmd.valid & self.cmd.ready):
                m.d.sync += [insn.eq(self.cmd.payload), busy.eq(1)]
                m.next = "SETUP"
            with m.State("SETUP"):
                m.d.comb += norm.clear.eq(1)
                m.d.sync += [
                    ea.eq(self.ereg_ra.data), eb.eq(self.ereg_rb.data),
                    a_word.eq(src_a >> lg_l), b_word.eq(src_b >> lg_l), d_word.eq(dst >> lg_l),
                    nchunks.eq((length + V - 1) >> (V.bit_length() - 1)),
                    issue_idx.eq(0), stat_sum.eq(0), stat_sq.eq(0), best_any.eq(0),
                    r_head.eq(0), r_pair.eq(0), r_phase.eq(0), r_xbase.eq(rope.x), r_dbase.eq(rope.dst),
                    norm_r.eq(0), norm_d.eq(0),
                ]
                # exponent of the wide values, and per-op alignment shifts
                ra, rb, rc = self.ereg_ra.data, self.ereg_rb.data, self.ereg_rc.data
                top = Signal(EXP_WIDE, name="setup_top")
                m.d.comb += top.eq(Mux(ra > rb, ra, rb) - _GUARD)
                m.d.sync += [add_ka.eq(ra - top), add_kb.eq(rb - top)]
                rtop = Signal(EXP_WIDE, name="setup_rope_top")
                m.d.comb += rtop.eq(ra + Mux(rb > rc, rb, rc) - _GUARD)
                m.d.sync += [rope_kc.eq(ra + rb - rtop), rope_ks.eq(ra + rc - rtop)]
                with m.Switch(opcode):
                    with m.Case(_code("VADD")):
                        m.d.sync += norm_exp_in.eq(top)
                    with m.Case(_code("VMUL")):
                        m.d.sync += norm_exp_in.eq(ra + rb)
                    with m.Case(_code("VSCALE")):
                        m.d.sync += norm_exp_in.eq(ra + f["VSCALE"].imm_e)
                    with m.Case(_code("ACT")):
                        m.d.sync += norm_exp_in.eq(ra - _GATE_BITS)
                    with m.Case(_code("ROPE")):
                        m.d.sync += norm_exp_in.eq(rtop)
                with m.If(err_code != Fault.NONE):
                    m.d.sync += [self.done.payload.eq(err_code), self.done.valid.eq(1), busy.eq(0)]
                    m.next = "IDLE"
                with m.Elif(is_op["ROPE"]):
                    m.d.sync += [r_kind.eq(KIND_PEAK), r_issue.eq(1)]
                    m.next = "ROPE"
                with m.Elif(is_op["NORM"]):
                    m.d.sync += [issue_kind.eq(KIND_STATS), issue.eq(1)]
                    m.next = "STATS"
                with m.Elif(is_op["ARGMAX"]):
                    m.d.sync += [issue_kind.eq(KIND_ARGMAX), issue.eq(1)]
                    m.next = "ARGMAX"
                with m.Elif(length == 0):
                    m.d.sync += drain.eq(PIPE_DEPTH)
                    m.next = "DRAIN"
                with m.Else():
                    m.d.sync += [issue_kind.eq(KIND_PEAK), issue.eq(1)]
                    m.next = "PASSES"

            with m.State("PASSES"):  # peak pass then write pass, back to back
                with m.If(issue_idx == nchunks - 1):
                    m.d.sync += issue_idx.eq(0)
                    with m.If(issue_kind == KIND_PEAK):
                        m.d.sync += issue_kind.eq(KIND_WRITE)
                    with m.Else():
                        m.d.sync += [issue.eq(0), drain.eq(PIPE_DEPTH)]
                        m.next = "DRAIN"
                with m.Else():
                    m.d.sync += issue_idx.eq(issue_idx + 1)

            with m.State("DRAIN"):
                m.d.sync += drain.eq(drain - 1)
                with m.If(drain == 1):
                    m.next = "FINISH"

            with m.State("FINISH"):
                m.d.sync += [self.ereg_w.en.eq(~norm.overflow), self.ereg_w.addr.eq(dst_e),
                             self.ereg_w.data.eq(norm.exp_out),
                             self.done.payload.eq(Mux(norm.overflow, Fault.OVERFLOW, Fault.NONE)),
                             self.done.valid.eq(1), busy.eq(0)]
                m.next = "IDLE"

            with m.State("ARGMAX"):
                with m.If(issue_idx == nchunks - 1):
                    m.d.sync += [issue.eq(0), drain.eq(2)]
                    m.next = "ARGMAX_DRAIN"
                with m.Else():
                    m.d.sync += issue_idx.eq(issue_idx + 1)
            with m.State("ARGMAX_DRAIN"):
                m.d.sync += drain.eq(drain - 1)
                with m.If(drain == 1):
                    m.next = "ARGMAX_WRITE"
            with m.State("ARGMAX_WRITE"):
                m.d.sync += [self.reg_w.en.eq(1), self.reg_w.addr.eq(f["ARGMAX"].rd), self.reg_w.data.eq(best_idx),
                             self.done.payload.eq(Fault.NONE), self.done.valid.eq(1), busy.eq(0)]
                m.next = "IDLE"

            with m.State("ROPE"):  # one pair per two cycles, peak pass then write pass
                m.d.sync += r_phase.eq(~r_phase)
                with m.If(r_phase):
                    with m.If(r_pair == half - 1):
                        m.d.sync += [r_pair.eq(0), r_head.eq(r_head + 1), r_xbase.eq(r_xbase + rope.head_dim),
                                     r_dbase.eq(r_dbase + rope.head_dim)]
                        with m.If(r_head == rope.heads - 1):
                            m.d.sync += [r_head.eq(0), r_xbase.eq(rope.x), r_dbase.eq(rope.dst)]
                            with m.If(r_kind == KIND_PEAK):
                                m.d.sync += r_kind.eq(KIND_WRITE)
                            with m.Else():
                                m.d.sync += [r_issue.eq(0), drain.eq(PIPE_DEPTH + 1)]
                                m.next = "DRAIN"
                    with m.Else():
                        m.d.sync += r_pair.eq(r_pair + 1)

            with m.State("STATS"):
                with m.If(issue_idx == nchunks - 1):
                    m.d.sync += [issue.eq(0), issue_idx.eq(0), drain.eq(2)]
                    m.next = "STATS_DRAIN"
                with m.Else():
                    m.d.sync += issue_idx.eq(issue_idx + 1)
            with m.State("STATS_DRAIN"):
                m.d.sync += drain.eq(drain - 1)
                with m.If(drain == 1):
                    with m.If(layer):
                        m.next = "N_SS"
                    with m.Else():
                        m.next = "N_MS"
            with m.State("N_SS"):  # layer: ss = (n * Q - S * S) // n
                m.d.comb += [div.start.eq(1), div.numerator.eq(n_len * stat_sq - stat_sum * stat_sum),
                             div.denominator.eq(n_len), div.bits.eq(nw["ss_div"])]
                m.next = "N_SS_WAIT"
            with m.State("N_SS_WAIT"), m.If(div.done):
                m.d.sync += ss.eq(div.quotient)
                m.next = "N_MS"
            with m.State("N_MS"):  # ms = (ss << 32) // n; RMSNorm's ss is the sum of squares itself
                m.d.comb += [div.start.eq(1), div.numerator.eq(Mux(layer, ss, stat_sq) << NORM_MS_FRAC), div.denominator.eq(n_len),
                             div.bits.eq(nw["ms_div"])]
                m.next = "N_MS_WAIT"
            with m.State("N_MS_WAIT"), m.If(div.done):
                m.d.sync += ms.eq(div.quotient)
                m.next = "N_EPS"
            with m.State("N_EPS"):
                m.d.sync += [total.eq(Mux(total_next == 0, 1, total_next)), total_exp.eq(total_exp_next)]
                m.next = "N_SCALAR"
            with m.State("N_SCALAR"):  # numerics.scalar, then make the exponent even
                with m.If(sc_exp[0]):
                    m.d.sync += [sc_m.eq(sc_round << 1), sc_e.eq(sc_exp - 1)]
                with m.Else():
                    m.d.sync += [sc_m.eq(sc_round), sc_e.eq(sc_exp)]
                m.next = "N_SQRT"
            with m.State("N_SQRT"):
                m.d.comb += [sq.start.eq(1), sq.radicand.eq(sc_m << RSQRT_FRAC)]
                m.next = "N_SQRT_WAIT"
            with m.State("N_SQRT_WAIT"), m.If(sq.done):
                m.next = "N_RECIP"
            with m.State("N_RECIP"):
                m.d.comb += [div.start.eq(1), div.numerator.eq(1 << RSQRT_NUM), div.denominator.eq(sq.root),
                             div.bits.eq(nw["recip_div"])]
                m.next = "N_RECIP_WAIT"
            with m.State("N_RECIP_WAIT"), m.If(div.done):
                m.d.sync += [norm_r.eq(div.quotient),
                             norm_er.eq(-(sc_e >> 1) + RSQRT_FRAC // 2 - RSQRT_NUM)]
                with m.If(layer):
                    m.next = "N_MEAN"
                with m.Else():
                    m.next = "N_PASSES"
            with m.State("N_MEAN"):  # floor(-S * r / n) from |S * r| // n
                m.d.comb += [div.start.eq(1), div.numerator.eq(Mux(sum_r < 0, -sum_r, sum_r)),
                             div.denominator.eq(n_len), div.bits.eq(nw["mean_div"])]
                m.next = "N_MEAN_WAIT"
            with m.State("N_MEAN_WAIT"), m.If(div.done):
                with m.If(sum_r < 0):
                    m.d.sync += norm_d.eq(div.quotient)
                with m.Else():
                    m.d.sync += norm_d.eq(-(div.quotient + (div.remainder != 0)))
                m.next = "N_PASSES"
            with m.State("N_PASSES"):
                m.d.sync += [norm_exp_in.eq(ea + norm_er + NORM_Z_SHIFT + eb), issue_kind.eq(KIND_PEAK),
                             issue.eq(1), issue_idx.eq(0)]
                m.next = "PASSES"
        return m
