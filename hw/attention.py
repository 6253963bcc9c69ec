"""Attention engine: the KVAPPEND and ATTN instructions, bit-exact with :mod:`kvoverlay.numerics`.

KVAPPEND copies one token's K and V (all KV heads) from the activation buffer into the
:class:`~hw.kv_buffer.KvBuffer`. ATTN runs :func:`kvoverlay.numerics.attention`: per query
head, exact q.K dot products rounded to ``Q.SCORE_FRAC``, an online softmax tile by tile
(running max, running sum, accumulator rescaled by ``exp(m_old - m_new)``), the reciprocal of
the sum by a restoring divider, then all heads aligned to the largest head exponent and
normalized into one bfp16 vector; the per-head (max, sum) go to the accumulator buffer.
"""

from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import Out

from kvoverlay import isa, numerics, timing

from .isa_layout import LAYOUTS
from .kv_buffer import EXP_SHAPE, kv_geometry, kv_port_signature
from .normalize import Normalizer, bit_length, round_shift_expr
from .ports import Fault, abuf_lanes, abuf_read, abuf_write, acc_write, ereg_read, ereg_write, reg_read, unit_signature
from .widths import ceil_div, log2_exact

__all__ = ["ATTN_COMMAND", "AttentionEngine"]

#: The engine's instruction word, read through the layout of KVAPPEND or of ATTN (both begin with the header).
ATTN_COMMAND = data.UnionLayout({"kvappend": LAYOUTS["KVAPPEND"], "attn": LAYOUTS["ATTN"]})

# Constants that numerics.attention_head / exp2_neg_q15 write as bare literals; named here once.
RECIP_BITS = numerics.ATTN_RECIP_BITS
ACC_KEEP_BITS = numerics.ATTN_ACC_BITS
#: Fraction bits of numerics.LOG2E_Q16 (the product ``-d * LOG2E_Q16`` is shifted right by this).
LOG2E_FRAC = 16
#: exp2_neg_q15 returns 0 once the integer part of the exponent reaches this.
EXP2_ZERO_SHIFT = 16
#: Q1.15 rescale of the running sum and accumulator by alpha.
ALPHA_FRAC = 15
DIVIDER_CYCLES = timing.ATTN_DIVIDER_CYCLES
#: Word of a 64-bit two's-complement value (numpy int64 arithmetic wraps at this width).
W = 64


def _wrap(v):
    """Truncate to 64-bit two's complement, as numpy int64 arithmetic does."""
    return v[:W].as_signed()


def _or_all(values):
    out = values[0]
    for v in values[1:]:
        out = out | v
    return out


def _round_shift(m, x, s, name, *, left=True):
    """numerics.round_shift of an int64: right shifts clamped at 63 and left shifts at 62 as numerics clips them,
    the result wrapped to 64 bits. *left* False: the caller proves ``s >= 0``."""
    return _wrap(round_shift_expr(m, x, s, W - 1, W - 2 if left else 0, name))


class AttentionEngine(wiring.Component):
    """Executes KVAPPEND and ATTN against the activation buffer, registers, accumulator buffer and KV buffer.

    Datapath: ``vector_lanes`` (V) elements per cycle in each of two passes. Operand slices may
    start at any element: two activation-buffer read ports fetch the word holding the first
    element and the next one, and a rotator picks V lanes. ATTN, per query head and per tile of
    ``attn_tile`` positions: a score pass (V products of q and K per cycle, dot product per
    position, rounding shift to Q.SCORE_FRAC, scores kept in a double-buffered register file),
    one step that updates the running max and sum and computes alpha through the shared 2^-x
    unit (the EXP2_TABLE ROM, interpolated), and a value pass (p per position from the same
    unit, ``round_shift(p * v, e_max - e_v)`` added to a register-file accumulator, rescaled by
    alpha on the tile's first position). The value pass of tile i and the score pass of tile
    i+1 run side by side (the KV buffer reads K and V at different positions). A second control
    finishes each head (restoring divider for ``(1 << 40) // l``, statistics, scaled outputs
    with their exponent into a scratch memory) while the main control streams the next head's
    first scores. After the last head a peak pass and a write pass normalize all heads into the
    destination vector. Faults found before any state changes cost the decode cycle; an OVERFLOW
    or DIVIDE fault is found late and leaves the statistics words written.

    Parameters
    ----------
    config : OverlayConfig
        Uses ``vector_lanes``, ``port_bytes`` (activation-buffer word = ``2 * port_bytes`` lanes),
        ``act_buffer_words``, ``acc_buffer_words``, ``attn_tile`` and the KV-buffer geometry.

    Attributes
    ----------
    cmd, busy, done
        The unit protocol of :func:`hw.ports.unit_signature`; ``cmd`` carries :data:`ATTN_COMMAND`.
    abuf_r0, abuf_r1 : Out(abuf_read(config))
        The activation-buffer word holding the operand's element and the word after it.
    abuf_w : Out(abuf_write(config))
        The output vector, one word per cycle with a per-lane enable.
    acc_w : Out(acc_write(config))
        The per-head statistics.
    ereg_r0, ereg_r1, ereg_w : Out(ereg_read()), Out(ereg_read()), Out(ereg_write())
        Exponent registers: q (ATTN) or k (KVAPPEND), v (KVAPPEND), and the output exponent.
    reg_r : Out(reg_read())
        The length (ATTN) or position (KVAPPEND) register.
    kv : Out(kv_port_signature(config))
        Port to the :class:`~hw.kv_buffer.KvBuffer`.
    """

    def __init__(self, config):
        self.config = config
        self.lanes = config.vector_lanes
        self.abuf_lanes = abuf_lanes(config)
        if self.lanes > self.abuf_lanes:
            raise ValueError(f"vector_lanes={self.lanes} exceeds the activation-buffer word of {self.abuf_lanes} lanes")
        if config.act_buffer_words < self.abuf_lanes:
            raise ValueError(f"act_buffer_words={config.act_buffer_words} is smaller than one word of {self.abuf_lanes} lanes")
        self.abuf_depth = config.act_buffer_words // self.abuf_lanes
        self.scratch_depth = ceil_div(config.act_buffer_words, self.lanes)
        self.geometry = kv_geometry(config)
        super().__init__(unit_signature(
            ATTN_COMMAND,
            abuf_r0=Out(abuf_read(config)), abuf_r1=Out(abuf_read(config)), abuf_w=Out(abuf_write(config)),
            acc_w=Out(acc_write(config)), ereg_r0=Out(ereg_read()), ereg_r1=Out(ereg_read()), ereg_w=Out(ereg_write()),
            reg_r=Out(reg_read()), kv=Out(kv_port_signature(config))))

    def elaborate(self, platform):
        m = Module()
        cfg = self.config
        V, lgV = self.lanes, log2_exact(self.lanes)
        lgAL = log2_exact(self.abuf_lanes)
        T = cfg.attn_tile
        chunks_max = self.geometry["row_chunks"]
        kv = self.kv

        # ---------------------------------------------------------------- instruction
        insn = Signal(ATTN_COMMAND)
        kva, att = insn.kvappend, insn.attn
        is_attn = Signal()
        is_kva = Signal()
        m.d.comb += [is_attn.eq(att.opcode == isa.BY_NAME["ATTN"].code), is_kva.eq(att.opcode == isa.BY_NAME["KVAPPEND"].code)]

        # operand fields, whichever instruction is latched
        layer = Signal(6)
        head_dim = Signal(11)
        kv_heads = Signal(8)
        m.d.comb += [
            layer.eq(Mux(is_attn, att.layer, kva.layer)),
            head_dim.eq(Mux(is_attn, att.head_dim, kva.head_dim)),
            kv_heads.eq(Mux(is_attn, att.kv_heads, kva.heads)),
            self.reg_r.addr.eq(Mux(is_attn, att.len_reg, kva.pos_reg)),
            self.ereg_r0.addr.eq(Mux(is_attn, att.q_e, kva.k_e)),
            self.ereg_r1.addr.eq(kva.v_e),
        ]
        q_heads = att.q_heads
        n_chunks = Signal(12)  # chunks of V lanes per head
        m.d.comb += n_chunks.eq((head_dim + V - 1) >> lgV)

        # decode-time values
        reg_plus_imm = Signal(signed(34))  # KVAPPEND position / ATTN length
        m.d.comb += reg_plus_imm.eq(self.reg_r.data.as_signed() + Mux(is_attn, att.len_imm, kva.pos_imm))
        pos_or_len = Signal(signed(34))
        e_a = Signal(EXP_SHAPE)  # q exponent (ATTN) or k exponent (KVAPPEND)
        e_b = Signal(EXP_SHAPE)  # v exponent (KVAPPEND)
        group = Signal(8)  # query heads per KV head
        span = Signal(20)  # heads * head_dim
        m.d.comb += span.eq(Mux(is_attn, q_heads, kv_heads) * head_dim)

        # loop state
        head = Signal(8)  # query head (ATTN) or KV head (KVAPPEND)
        kv_head = Signal(8)  # KV head of the current query head
        group_cnt = Signal(8)
        chunk = Signal(12)
        pos_in_tile = Signal(range(T))
        tile_start = Signal(17)
        elem = Signal(20)  # activation-buffer element read this cycle
        elem_head = Signal(20)  # first element of the current head's slice
        out_head = Signal(20)  # first output element of the current head (head * head_dim)
        v_pass = Signal()
        first_tile = Signal()

        kv_len = pos_or_len
        tile_end = Signal(17)
        m.d.comb += tile_end.eq(Mux(tile_start + T < kv_len, tile_start + T, kv_len))
        cur_pos = Signal(17)
        m.d.comb += cur_pos.eq(tile_start + pos_in_tile)
        last_chunk = Signal()
        m.d.comb += last_chunk.eq(chunk == Mux(n_chunks == 0, 0, n_chunks - 1))
        lane_mask = Signal(V)
        m.d.comb += lane_mask.eq(Cat(((chunk << lgV) + i < head_dim) for i in range(V)))
        # the value pass runs one tile behind the score pass, with its own counters
        pv_tile_start = Signal(17)
        pv_pos_in_tile = Signal(range(T))
        pv_chunk = Signal(12)
        pv_tile_end = Signal(17)
        m.d.comb += pv_tile_end.eq(Mux(pv_tile_start + T < kv_len, pv_tile_start + T, kv_len))
        pv_cur_pos = Signal(17)
        m.d.comb += pv_cur_pos.eq(pv_tile_start + pv_pos_in_tile)
        pv_last_chunk = Signal()
        m.d.comb += pv_last_chunk.eq(pv_chunk == n_chunks - 1)
        pv_lane_mask = Signal(V)
        m.d.comb += pv_lane_mask.eq(Cat(((pv_chunk << lgV) + i < head_dim) for i in range(V)))
        score_bank = Signal()  # tile parity of the score pass: scores are double-buffered
        pv_bank = Signal()
        score_active = Signal()

        # activation-buffer reads: the word holding `elem` and the next one
        m.d.comb += [self.abuf_r0.addr.eq(elem >> lgAL), self.abuf_r1.addr.eq((elem >> lgAL) + 1),
                     self.abuf_r0.en.eq(1), self.abuf_r1.en.eq(1)]

        def rotate_abuf(offset):
            return Cat(self.abuf_r0.data, self.abuf_r1.data).bit_select(offset * 16, 16 * V)

        # ---------------------------------------------------------------- KVAPPEND datapath (1 stage)
        ka_valid = Signal()
        ka_off = Signal(lgAL or 1)
        ka_mask = Signal(V)
        ka_head = Signal(8)
        ka_chunk = Signal(12)
        ka_v = Signal()
        ka_first = Signal()
        m.d.sync += ka_valid.eq(0)
        m.d.comb += [
            kv.wr_layer.eq(layer), kv.wr_head.eq(ka_head), kv.wr_pos.eq(pos_or_len), kv.wr_chunk.eq(ka_chunk),
            kv.wr_data.eq(rotate_abuf(ka_off)), kv.wr_mask.eq(ka_mask),
            kv.wr_k_en.eq(ka_valid & ~ka_v), kv.wr_v_en.eq(ka_valid & ka_v),
            kv.wr_ek.eq(e_a), kv.wr_ev.eq(e_b), kv.wr_e_en.eq(ka_valid & ~ka_v & ka_first),
        ]

        # ---------------------------------------------------------------- ATTN: KV read address
        m.d.comb += [kv.rd_layer.eq(layer), kv.rd_head.eq(kv_head), kv.rd_k_pos.eq(cur_pos), kv.rd_k_chunk.eq(chunk),
                     kv.rd_v_pos.eq(pv_cur_pos), kv.rd_v_chunk.eq(pv_chunk)]

        # score pipeline: stage 1 multiplies and accumulates the dot product, stage 2 rounds and stores
        sc1_valid, sc1_first, sc1_last = Signal(), Signal(), Signal()
        sc1_pos = Signal(range(T))
        sc1_bank = Signal()
        sc1_off = Signal(lgAL or 1)
        sc1_mask = Signal(V)
        m.d.sync += sc1_valid.eq(0)
        q_lanes = rotate_abuf(sc1_off)
        products = []
        for i in range(V):
            prod = Signal(signed(32), name=f"qk_prod{i}")
            m.d.comb += prod.eq(Mux(sc1_mask[i], q_lanes.word_select(i, 16).as_signed()
                                    * kv.rd_k_data.word_select(i, 16).as_signed(), 0))
            products.append(prod)
        dot_sum = Signal(signed(32 + lgV + 1))
        m.d.comb += dot_sum.eq(sum(products))
        dot = Signal(signed(W))
        dot_next = Signal(signed(W))
        m.d.comb += dot_next.eq(Mux(sc1_first, 0, dot) + dot_sum)
        sc2_valid = Signal()
        sc2_dot = Signal(signed(W))
        sc2_ek = Signal(EXP_SHAPE)
        sc2_ev = Signal(EXP_SHAPE)
        sc2_pos = Signal(range(T))
        sc2_bank = Signal()
        m.d.sync += sc2_valid.eq(sc1_valid & sc1_last)
        with m.If(sc1_valid):
            m.d.sync += [dot.eq(dot_next), sc2_dot.eq(dot_next), sc2_ek.eq(kv.rd_ek), sc2_ev.eq(kv.rd_k_ev), sc2_pos.eq(sc1_pos),
                         sc2_bank.eq(sc1_bank)]
        score_shift = Signal(signed(16))
        m.d.comb += score_shift.eq(-(e_a + sc2_ek + numerics.SCORE_FRAC))
        score = _round_shift(m, sc2_dot, score_shift, "score")
        scores = Array(Signal(signed(W), name=f"score{i // T}_{i % T}") for i in range(2 * T))
        tile_max = Signal(signed(W))
        tile_ev_max = Signal(EXP_SHAPE)
        with m.If(sc2_valid):
            m.d.sync += scores[sc2_bank * T + sc2_pos].eq(score)
            with m.If((sc2_pos == 0) | (score > tile_max)):
                m.d.sync += tile_max.eq(score)
            with m.If((sc2_pos == 0) | (sc2_ev > tile_ev_max)):
                m.d.sync += tile_ev_max.eq(sc2_ev)

        # running softmax state
        m_run = Signal(signed(W))
        l_run = Signal(signed(W))
        e_acc = Signal(signed(16))  # exponent of the accumulator
        e_acc_old = Signal(signed(16))
        alpha = Signal(signed(W))
        m_new = Signal(signed(W))
        m.d.comb += m_new.eq(Mux(first_tile | (tile_max > m_run), tile_max, m_run))
        in_mstep = Signal()

        # shared 2^-x unit (numerics.exp2_neg_q15); its ROM is numerics.EXP2_TABLE
        pv1_pos = Signal(range(T))
        pv1_bank = Signal()
        exp_in = Signal(signed(W))
        m.d.comb += exp_in.eq(Mux(in_mstep, _wrap(m_run - m_new), _wrap(scores[pv1_bank * T + pv1_pos] - m_run)))
        table = [int(v) for v in numerics.EXP2_TABLE]
        m.submodules.exp2_rom = rom = Memory(shape=unsigned(16), depth=len(table), init=table)
        rom_lo, rom_hi = rom.read_port(domain="comb"), rom.read_port(domain="comb")
        neg_d = Signal(signed(W))
        t_fix = Signal(signed(W))
        m.d.comb += [neg_d.eq(_wrap(-exp_in)), t_fix.eq(_wrap(neg_d * numerics.LOG2E_Q16) >> LOG2E_FRAC)]
        t_int = Signal(signed(W - numerics.SCORE_FRAC))
        t_frac = t_fix[:numerics.SCORE_FRAC]
        exp2_shift = numerics._EXP2_SHIFT
        m.d.comb += [
            t_int.eq(t_fix >> numerics.SCORE_FRAC),
            rom_lo.addr.eq(t_frac[exp2_shift:]), rom_hi.addr.eq(t_frac[exp2_shift:] + 1),
        ]
        t_lo = Signal(signed(18))  # table entries are unsigned Q1.15 (up to 1 << 15)
        t_hi = Signal(signed(18))
        interp = Signal(signed(32))
        m.d.comb += [t_lo.eq(rom_lo.data), t_hi.eq(rom_hi.data),
                     interp.eq(((t_hi - t_lo) * t_frac[:exp2_shift] + (1 << (exp2_shift - 1))) >> exp2_shift)]
        p_tab = Signal(signed(W))
        m.d.comb += p_tab.eq(t_lo + interp)
        p_shifted = _wrap(round_shift_expr(m, p_tab, t_int, EXP2_ZERO_SHIFT, W - 2, "exp2_shifted"))
        exp_out = Signal(signed(W))
        m.d.comb += exp_out.eq(Mux(t_int >= EXP2_ZERO_SHIFT, 0, p_shifted))

        # value pipeline (1 stage): accumulator register file of chunks_max words of V int64 lanes
        acc_words = Array(Signal(W * V, name=f"acc_word{i}") for i in range(chunks_max))
        pv1_valid, pv1_first_pos, pv1_chunk0 = Signal(), Signal(), Signal()
        pv1_chunk = Signal(12)
        pv1_mask = Signal(V)
        m.d.sync += pv1_valid.eq(0)
        acc_old = acc_words[pv1_chunk]
        v_shift = Signal(signed(16))
        resc_shift = Signal(signed(16))
        m.d.comb += [v_shift.eq(e_acc - kv.rd_ev), resc_shift.eq(e_acc - e_acc_old)]
        acc_new_lanes = []
        for i in range(V):
            vv = kv.rd_v_data.word_select(i, 16).as_signed()
            term = _round_shift(m, _wrap(exp_out * vv), v_shift, f"pv_term{i}", left=False)
            old = acc_old.word_select(i, W).as_signed()
            resc = _round_shift(m, _round_shift(m, _wrap(old * alpha), ALPHA_FRAC, f"acc_alpha{i}", left=False),
                                resc_shift, f"acc_rescaled{i}", left=False)
            base = Mux(pv1_first_pos, Mux(first_tile, 0, resc), old)
            new = Signal(signed(W), name=f"acc_new{i}")
            m.d.comb += new.eq(_wrap(base + Mux(pv1_mask[i], term, 0)))
            acc_new_lanes.append(new)
        with m.If(pv1_valid):
            m.d.sync += acc_words[pv1_chunk].eq(Cat(acc_new_lanes))
            with m.If(pv1_chunk0):
                m.d.sync += l_run.eq(_wrap(l_run + exp_out))
        l_rescaled = _round_shift(m, _wrap(l_run * exp_out), ALPHA_FRAC, "l_rescaled", left=False)

        # head finish: peak of |acc|, reciprocal, scaled outputs into the scratch memory
        acc_or = Signal(W)
        magnitudes = []
        for word in acc_words:
            for i in range(V):
                x = word.word_select(i, W).as_signed()
                magnitudes.append(Mux(x < 0, -x, x)[:W])
        m.d.comb += acc_or.eq(_or_all(magnitudes))
        acc_bits = bit_length(m, acc_or, "acc_bits")
        head_shift = Signal(range(W + 1))
        head_exp = Signal(signed(16))
        top_exp = Signal(signed(16))
        m.d.comb += head_exp.eq(e_acc + head_shift - RECIP_BITS)
        remainder = Signal(W + 1)
        quotient = Signal(RECIP_BITS + 1)
        div_cnt = Signal(range(DIVIDER_CYCLES))
        rem_shifted = Signal(W + 2)
        m.d.comb += rem_shifted.eq(Cat(div_cnt == RECIP_BITS, remainder))
        out_k = Signal(12)  # output word of this head
        fin_head = Signal(8)  # the head being finished (the main control may be on the next one)
        fin_out_head = Signal(20)  # its first output element
        out_off = fin_out_head[:lgV] if lgV else Const(0, 1)
        out_last = Signal(12)
        m.d.comb += out_last.eq((out_off + head_dim - 1) >> lgV)
        word_lo = acc_words[(out_k - 1)[:len(out_k)]]
        word_hi = acc_words[out_k]
        rot_lanes = Signal(range(V + 1))
        m.d.comb += rot_lanes.eq(V - out_off)
        rotated = Cat(word_lo, word_hi).bit_select(rot_lanes * W, W * V)
        lane_bits = W + 16
        m.submodules.scratch = scratch = Memory(shape=unsigned(lane_bits * V), depth=self.scratch_depth, init=[])
        scr_w = scratch.write_port(granularity=lane_bits)
        scr_r = scratch.read_port()
        scr_lanes = []
        for i in range(V):
            x = rotated.word_select(i, W).as_signed()
            o = Signal(signed(W), name=f"head_out{i}")
            m.d.comb += o.eq(_wrap(_round_shift(m, x, head_shift, f"head_acc{i}", left=False) * quotient))
            scr_lanes.append(Cat(o, head_exp))
        m.d.comb += [
            scr_w.addr.eq((fin_out_head >> lgV) + out_k),
            scr_w.data.eq(Cat(scr_lanes)),
        ]
        out_en = Signal(V)
        m.d.comb += out_en.eq(Cat((((out_k << lgV) + i) >= out_off) & (((out_k << lgV) + i) < out_off + head_dim)
                                  for i in range(V)))

        # normalization of all heads: a peak pass and a write pass over the scratch words
        n_out = Signal(20)
        m.d.comb += n_out.eq(q_heads * head_dim)
        n_words = Signal(20)
        m.d.comb += n_words.eq((n_out + V - 1) >> lgV)
        word = Signal(20)
        m.d.comb += scr_r.addr.eq(word)
        nr_valid = Signal()
        nr_write = Signal()
        nr_word = Signal(20)
        m.d.sync += nr_valid.eq(0)
        m.submodules.normalizer = norm = Normalizer(W, V)
        for i in range(V):
            lane = scr_r.data.word_select(i, lane_bits)
            m.d.comb += [norm.wide[i].eq(_round_shift(m, lane[:W].as_signed(), top_exp - lane[W:].as_signed(),
                                                      f"wide{i}", left=False)),
                         norm.valid[i].eq(((nr_word << lgV) + i) < n_out)]
        m.d.comb += [norm.exp_in.eq(top_exp), norm.sample.eq(nr_valid & ~nr_write)]
        out_elem = Signal(20)
        m.d.comb += out_elem.eq(att.dst + (nr_word << lgV))
        out_lane = out_elem[:lgAL] if lgAL else Const(0, 1)
        m.d.comb += [
            self.abuf_w.addr.eq(out_elem >> lgAL),
            self.abuf_w.data.eq(norm.mant.as_value() << (out_lane * 16)),
        ]

        # ---------------------------------------------------------------- control
        err = Signal(Fault)

        fault = Signal(Fault)

        def finish(code=Fault.NONE):
            m.d.sync += fault.eq(code)
            m.next = "DONE"

        def next_head_setup():
            m.d.sync += [elem.eq(elem_head), chunk.eq(0), pos_in_tile.eq(0), tile_start.eq(0), first_tile.eq(1),
                         pv_tile_start.eq(0), pv_pos_in_tile.eq(0), pv_chunk.eq(0), score_bank.eq(0), pv_bank.eq(0)]

        def issue_score():
            """One chunk of the score pass; at the tile's end, move the score counters to the next tile."""
            m.d.sync += [sc1_valid.eq(1), sc1_first.eq(chunk == 0), sc1_last.eq(last_chunk), sc1_pos.eq(pos_in_tile),
                         sc1_bank.eq(score_bank), sc1_off.eq(elem[:lgAL] if lgAL else 0), sc1_mask.eq(lane_mask)]
            tile_done = last_chunk & (cur_pos == tile_end - 1)
            with m.If(last_chunk):
                m.d.sync += [chunk.eq(0), elem.eq(elem_head), pos_in_tile.eq(pos_in_tile + 1)]
                with m.If(tile_done):
                    m.d.sync += [pos_in_tile.eq(0), tile_start.eq(tile_end), score_bank.eq(~score_bank)]
            with m.Else():
                m.d.sync += [chunk.eq(chunk + 1), elem.eq(elem + V)]
            return tile_done

        # finish control: reciprocal and scaled outputs of one head, while the main control streams the next
        fin_start = Signal()
        fin_fault = Signal()
        with m.FSM(name="attn_finish_fsm") as fin_fsm:
            with m.State("F_IDLE"):  # noqa: SIM117 - Amaranth control blocks
                with m.If(fin_start):
                    m.d.sync += [fin_head.eq(head), fin_out_head.eq(out_head)]
                    m.next = "F_FIN"
            with m.State("F_FIN"):
                m.d.sync += [head_shift.eq(Mux(acc_bits > ACC_KEEP_BITS, acc_bits - ACC_KEEP_BITS, 0)),
                             remainder.eq(0), quotient.eq(0), div_cnt.eq(RECIP_BITS)]
                m.d.comb += [self.acc_w.addr.eq(att.stats + 2 * fin_head), self.acc_w.data.eq(m_run), self.acc_w.en.eq(1)]
                with m.If(l_run <= 0):
                    m.d.sync += fin_fault.eq(1)
                    m.next = "F_IDLE"
                with m.Else():
                    m.next = "F_DIV"
            with m.State("F_DIV"):
                with m.If(div_cnt == RECIP_BITS):
                    m.d.comb += [self.acc_w.addr.eq(att.stats + 2 * fin_head + 1), self.acc_w.data.eq(l_run), self.acc_w.en.eq(1)]
                with m.If(rem_shifted >= l_run.as_unsigned()):
                    m.d.sync += [remainder.eq(rem_shifted - l_run.as_unsigned()), quotient.eq(Cat(1, quotient))]
                with m.Else():
                    m.d.sync += [remainder.eq(rem_shifted), quotient.eq(Cat(0, quotient))]
                m.d.sync += div_cnt.eq(div_cnt - 1)
                with m.If(div_cnt == 0):
                    m.d.sync += [out_k.eq(0), top_exp.eq(Mux((fin_head == 0) | (head_exp > top_exp), head_exp, top_exp))]
                    m.next = "F_OUT"
            with m.State("F_OUT"):
                m.d.comb += scr_w.en.eq(out_en)
                m.d.sync += out_k.eq(out_k + 1)
                with m.If(out_k == out_last):
                    m.next = "F_IDLE"
        fin_idle = Signal()
        m.d.comb += fin_idle.eq(fin_fsm.ongoing("F_IDLE"))

        with m.FSM(name="attn_fsm") as fsm:
            with m.State("IDLE"):
                m.d.comb += self.cmd.ready.eq(1)
                with m.If(self.cmd.valid):
                    m.d.sync += [insn.eq(self.cmd.payload), fin_fault.eq(0)]
                    m.next = "DECODE"

            with m.State("DECODE"):
                m.d.sync += [pos_or_len.eq(reg_plus_imm), e_a.eq(self.ereg_r0.data), e_b.eq(self.ereg_r1.data),
                             head.eq(0), kv_head.eq(0), group_cnt.eq(0), chunk.eq(0), v_pass.eq(0),
                             pos_in_tile.eq(0), tile_start.eq(0), first_tile.eq(1), out_head.eq(0)]
                geometry_bad = ((layer >= cfg.max_layers) | (kv_heads == 0) | (kv_heads > cfg.max_kv_heads)
                                | (head_dim > cfg.max_head_dim))
                with m.If(is_kva):
                    m.d.sync += [elem.eq(kva.k), elem_head.eq(kva.k)]
                    m.d.comb += err.eq(Mux(geometry_bad, Fault.SHAPE,
                                       Mux((reg_plus_imm < 0) | (reg_plus_imm >= cfg.kv_capacity), Fault.KV_RANGE,
                                       Mux((kva.k + span > cfg.act_buffer_words) | (kva.v + span > cfg.act_buffer_words),
                                           Fault.OUT_OF_RANGE, Fault.NONE))))
                    with m.If(err != Fault.NONE):
                        finish(err)
                    with m.Else():
                        m.next = "KVA_RUN"
                with m.Elif(is_attn):
                    m.d.sync += [elem.eq(att.q), elem_head.eq(att.q), group.eq(q_heads // kv_heads)]
                    bad = geometry_bad | (q_heads == 0) | (head_dim == 0) | ((q_heads % kv_heads) != 0)
                    m.d.comb += err.eq(Mux(bad, Fault.SHAPE,
                                       Mux((reg_plus_imm < 1) | (reg_plus_imm > cfg.kv_capacity), Fault.KV_RANGE,
                                       Mux((att.q + span > cfg.act_buffer_words) | (att.dst + span > cfg.act_buffer_words)
                                           | (att.stats + 2 * q_heads > cfg.acc_buffer_words), Fault.OUT_OF_RANGE,
                                       Mux(att.dst[:lgAL] != 0 if lgAL else 0, Fault.UNALIGNED, Fault.NONE)))))
                    # lanes past head_dim stay zero for the whole instruction (the head peak ORs every lane)
                    m.d.sync += [w.eq(0) for w in acc_words]
                    m.d.sync += [pv_tile_start.eq(0), pv_pos_in_tile.eq(0), pv_chunk.eq(0), score_bank.eq(0), pv_bank.eq(0)]
                    with m.If(err != Fault.NONE):
                        finish(err)
                    with m.Else():
                        m.next = "A_SCORE"
                with m.Else():
                    finish(Fault.OPCODE)

            # ---- KVAPPEND: K pass then V pass, one chunk of V lanes per cycle
            with m.State("KVA_RUN"):
                m.d.sync += [ka_valid.eq(1), ka_off.eq(elem[:lgAL] if lgAL else 0), ka_mask.eq(lane_mask),
                             ka_head.eq(head), ka_chunk.eq(chunk), ka_v.eq(v_pass), ka_first.eq(chunk == 0)]
                with m.If(last_chunk):
                    m.d.sync += [chunk.eq(0), head.eq(head + 1), elem.eq(elem_head + head_dim), elem_head.eq(elem_head + head_dim)]
                    with m.If(head == kv_heads - 1):
                        with m.If(v_pass):
                            m.next = "KVA_DRAIN"
                        with m.Else():
                            m.d.sync += [v_pass.eq(1), head.eq(0), elem.eq(kva.v), elem_head.eq(kva.v)]
                with m.Else():
                    m.d.sync += [chunk.eq(chunk + 1), elem.eq(elem + V)]
            with m.State("KVA_DRAIN"):
                finish()

            # ---- ATTN, per query head
            with m.State("A_SCORE"):  # noqa: SIM117 - the first tile's scores, alone
                with m.If(issue_score()):
                    m.next = "A_SDRAIN"
            with m.State("A_SDRAIN"):  # the step after it needs the previous head's finish to be over
                with m.If(fin_fault):
                    finish(Fault.DIVIDE)
                with m.Elif(~sc1_valid & fin_idle):
                    m.next = "A_MSTEP"
            with m.State("A_MSTEP"):
                m.d.comb += in_mstep.eq(1)
                m.d.sync += [alpha.eq(exp_out), m_run.eq(m_new), e_acc_old.eq(e_acc),
                             e_acc.eq(Mux(first_tile | (tile_ev_max > e_acc), tile_ev_max, e_acc)),
                             l_run.eq(Mux(first_tile, 0, l_rescaled)), score_active.eq(tile_start < kv_len)]
                m.next = "A_RUN"
            with m.State("A_RUN"):  # values of this tile and scores of the next one, side by side
                with m.If(score_active):  # noqa: SIM117 - Amaranth control blocks
                    with m.If(issue_score()):
                        m.d.sync += score_active.eq(0)
                m.d.sync += [pv1_valid.eq(1), pv1_first_pos.eq(pv_pos_in_tile == 0), pv1_chunk0.eq(pv_chunk == 0),
                             pv1_chunk.eq(pv_chunk), pv1_pos.eq(pv_pos_in_tile), pv1_bank.eq(pv_bank),
                             pv1_mask.eq(pv_lane_mask)]
                with m.If(pv_last_chunk):
                    m.d.sync += [pv_chunk.eq(0), pv_pos_in_tile.eq(pv_pos_in_tile + 1)]
                    with m.If(pv_cur_pos == pv_tile_end - 1):
                        m.d.sync += pv_pos_in_tile.eq(0)
                        m.next = "A_RDRAIN"
                with m.Else():
                    m.d.sync += pv_chunk.eq(pv_chunk + 1)
            with m.State("A_RDRAIN"):  # noqa: SIM117 - Amaranth control blocks
                with m.If(~sc1_valid):
                    with m.If(pv_tile_end == kv_len):  # hand the head to the finish control, start the next one
                        m.d.comb += fin_start.eq(1)
                        m.d.sync += [head.eq(head + 1), elem_head.eq(elem_head + head_dim), out_head.eq(out_head + head_dim)]
                        with m.If(group_cnt == group - 1):
                            m.d.sync += [group_cnt.eq(0), kv_head.eq(kv_head + 1)]
                        with m.Else():
                            m.d.sync += group_cnt.eq(group_cnt + 1)
                        with m.If(head == q_heads - 1):
                            m.next = "A_WAITFIN"
                        with m.Else():
                            next_head_setup()
                            m.d.sync += elem.eq(elem_head + head_dim)
                            m.next = "A_SCORE"
                    with m.Else():
                        m.d.sync += [pv_tile_start.eq(pv_tile_end), pv_bank.eq(~pv_bank), first_tile.eq(0)]
                        m.next = "A_MSTEP"
            with m.State("A_WAITFIN"):
                with m.If(fin_fault):
                    finish(Fault.DIVIDE)
                with m.Elif(fin_idle):
                    m.d.sync += word.eq(0)
                    m.d.comb += norm.clear.eq(1)
                    m.next = "A_NPEAK"
            with m.State("A_NPEAK"):
                m.d.sync += [nr_valid.eq(1), nr_write.eq(0), nr_word.eq(word), word.eq(word + 1)]
                with m.If(word == n_words - 1):
                    m.next = "A_NPDRAIN"
            with m.State("A_NPDRAIN"):
                m.next = "A_NSTEP"
            with m.State("A_NSTEP"):
                m.d.sync += word.eq(0)
                with m.If(norm.overflow):
                    finish(Fault.OVERFLOW)
                with m.Else():
                    m.d.comb += [self.ereg_w.addr.eq(att.dst_e), self.ereg_w.en.eq(1), self.ereg_w.data.eq(norm.exp_out)]
                    m.next = "A_NWRITE"
            with m.State("A_NWRITE"):
                m.d.sync += [nr_valid.eq(1), nr_write.eq(1), nr_word.eq(word), word.eq(word + 1)]
                with m.If(word == n_words - 1):
                    m.next = "A_NWDRAIN"
            with m.State("A_NWDRAIN"):
                finish()

            with m.State("DONE"):
                m.d.comb += [self.done.valid.eq(1), self.done.payload.eq(fault)]
                m.next = "IDLE"
        m.d.comb += self.busy.eq(~fsm.ongoing("IDLE"))

        # normalization read stage: the peak pass samples magnitudes, the write pass stores mantissas
        m.d.comb += self.abuf_w.en.eq(Mux(nr_valid & nr_write, norm.valid << out_lane, 0))
        return m
