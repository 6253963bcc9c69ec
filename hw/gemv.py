"""GEMV engine: streams packed weight rows at the port rate, bit-exact with :func:`kvoverlay.numerics.gemv_acc`.

Weight formats ``int4``, ``int8``, ``w16`` and ``uint4`` are selected at run time by the tile's ``fmt``
(codes of ``kvoverlay.isa.ENUMS["fmt"]``). The multiplier array is as wide as one port word of
weights (``config.macs_per_cycle`` int8 lanes), so the engine keeps up with the port. ``uint4`` streams
exactly as ``int4``; only a nibble lane's decode (``q - z`` of its group) and the scale's 12 bits differ.
"""

from __future__ import annotations

from amaranth.hdl import Array, Cat, Const, Module, Mux, Signal, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from kvoverlay import isa
from kvoverlay import numerics as nx
from kvoverlay.timing import (
    GEMV_PACKED_WRITES,
    GEMV_TREE_FANIN,
    gemv_narrow_scales,
    gemv_narrow_stages,
    gemv_packs,
    gemv_scale_words,
    gemv_tree_stages,
)

from .arith import balanced_sum, narrow_times, select_bits
from .widths import log2_exact

__all__ = ["FMT_CODES", "INT4_DSP_LANES", "GemvEngine", "gemv_tile"]

#: The fraction of the ``port_bytes`` int4-only lanes (the nibble lanes past the int8 ones) whose products take a
#: MULT18X18D: one such lane as shift-and-add in logic (5 x 16 bits, with uint4's zero point) measured about 134
#: LUT4 and 10 CCU2C on the ECP5 (docs/boards.md, "The GEMV unit's LUT4 without cycles"), so the ulx3s preset
#: spends 20 of the 85F's spare multipliers here (115 of 156 in its board top) rather than about 3,000 LUT
#: positions.
INT4_DSP_LANES = (5, 8)

#: ``fmt`` codes, as in ``kvoverlay.isa.ENUMS["fmt"]``; the engine relies on ``code = log2(bits) - 2`` for the
#: formats it streams by width (uint4 streams as int4).
FMT_CODES = {fmt: code for code, fmt in enumerate(isa.ENUMS["fmt"])}
assert all(nx.WEIGHT_FORMATS[f] == 4 << c for f, c in FMT_CODES.items() if f != "uint4"), FMT_CODES


def gemv_tile(config) -> data.StructLayout:
    """The engine's command: one tile's shape, format, first weight word and (where the engine is built for them,
    :func:`~kvoverlay.timing.gemv_packs`) whether its rows are packed."""
    return data.StructLayout({
        "rows": config.acc_buffer_words.bit_length(), "cols": config.act_buffer_words.bit_length(),
        "group_log2": 4, "fmt": 2, "w_base": range(config.dram_bytes // config.port_bytes),
        **({"packed": 1} if gemv_packs(config) else {}),
    })


class GemvEngine(wiring.Component):
    """One GEMV tile over int4, int8 or w16 row records, one port word per cycle.

    Computes ``acc[r] = sum_g scale[r, g] * sum_{k in g} q[r, k] * x[k]`` in 64-bit
    two's complement, exactly as :func:`kvoverlay.numerics.gemv_acc`. Weights are the
    row records of :func:`kvoverlay.numerics.pack_rows` with ``align=config.port_bytes``
    (group scales as uint16 LE, then the weights, padded to the port width), read
    from a weight memory one port word per address with a read latency of one cycle.

    Pipeline (one port word per cycle, busy :func:`kvoverlay.timing.gemv_engine_cycles` cycles): S0 issues the
    weight address and the matching activation-bank address; S1 registers the port word and the x word (nothing
    else hangs on the FIFO or the BRAM) and stores scale words; S2 re-aligns the weight bytes (the weights start
    ``2 * groups`` bytes into a row, which need not be a port boundary) into one window of ``port_bytes`` weight
    bytes and registers each lane's operands; S3 multiplies ``2 * port_bytes`` lanes (int4: all nibbles; int8:
    ``port_bytes`` bytes; w16: ``port_bytes / 2`` halfwords): the first ``port_bytes`` lanes are 16 x 16
    products, one MULT18X18D each, of the other (int4-only) lanes :data:`INT4_DSP_LANES` take a MULT18X18D and
    the rest shift-and-add in logic; the adder tree sums :data:`~kvoverlay.timing.GEMV_TREE_FANIN` products per
    registered stage, as two-input carry chains; M1 multiplies the window's sum by its
    group scale in 17-bit limbs and M2 adds the limbs; the last stage adds into the row accumulator and writes it
    out at the row end.

    Groups narrower than a window (``W`` weights: a window holds ``W / G`` groups of ``G``): each group's sum is a
    node of the adder tree (``G = 4**l`` lanes) or the sum of two (``2 * 4**l``), taken at the tree's last stage;
    M1/M2 scale each by its own header (the first group's through the window's multiplier, one more multiplier per
    further group up to :func:`~kvoverlay.timing.gemv_narrow_scales`, for groups down to ``config.min_group``), and a
    fan-in-4 tree sums the scaled groups
    (:func:`~kvoverlay.timing.gemv_narrow_stages` more stages). uint4 lanes subtract their own group's zero point.
    Every product, group sum and scaled sum is exact, so the row accumulates ``numerics.gemv_acc``'s terms
    modulo 2**64 in another order, with the same result.

    A row whose weights end inside a window (``cols`` not a multiple of a window's weights) ends in a partial window,
    its lanes past the row's weights zeroed. Where it lies in the row record's last word past a header offset it is
    taken in the next row's first slot, the last row's in one slot more that takes no word
    (:func:`~kvoverlay.timing.gemv_late_window`).

    Packed rows (``packed``, built where :func:`~kvoverlay.timing.gemv_packs`): a block of ``b`` rows
    (:func:`kvoverlay.numerics.packed_block`, ``b`` = the window's groups) streams as one record: its ``b``
    headers per window first (read as a narrow window's), then one word per group, the group of each of its rows
    side by side. So the window's group ``t`` is row ``t``'s: x is that group's slice replicated over the lanes
    (registered in S1), and each group's scaled sum (M2) adds into an accumulator of its own instead of the fan-in
    tree. At the block's last window the ``b`` sums move to a drain register bank that writes them
    :data:`~kvoverlay.timing.GEMV_PACKED_WRITES` at a time (``acc_data``/``acc_en`` at ``acc_addr``,
    ``acc_data1``/``acc_en1`` at ``acc_addr + 1``) while the next block streams.

    Parameters
    ----------
    config : OverlayConfig
        Overlay parameters; uses ``port_bits``, ``act_buffer_words``,
        ``acc_buffer_words``, ``dram_bytes`` and ``min_group``.

    Attributes
    ----------
    cmd : In(stream.Signature(gemv_tile(config)))
        The tile, taken while idle: ``rows``, ``cols`` (a multiple of the group size),
        ``group_log2`` (log2 of the weights per group, at least ``log2(config.min_group)``; a window is int4
        ``2 * port_bytes``, int8 ``port_bytes``, w16 ``port_bytes / 2`` weights), ``fmt``
        (:data:`FMT_CODES`; uint4 as int4, less its group's zero point) and ``w_base`` (word address of the first row record).
    busy, done : Out(1)
        ``busy`` from the cycle after the command until the last write; ``done`` pulses once.
    cycles : Out(32)
        Cycles ``busy`` was high in the current or last run.
    w_addr, w_data : Out, In
        Weight memory read port (latency 1).
    w_take : Out(1)
        High in the cycles that consume ``w_data`` (the word addressed one cycle earlier); a streaming
        source that cannot always deliver stalls the whole engine (an ``EnableInserter``) while
        ``w_take`` is high and no word is ready.
    x_addr, x_data : Out, In
        Activation memory read port, ``2 * port_bytes`` int16 lanes per word (latency 1).
    acc_addr, acc_data, acc_en : Out
        Accumulator memory write port (64-bit words).
    acc_data1, acc_en1 : Out
        Packed rows only: the second word written, at ``acc_addr + 1``.
    """

    def __init__(self, config):
        self.config = config
        self.pb = config.port_bytes
        self.pbits = config.port_bits
        self.max_cols = config.act_buffer_words
        self.max_rows = config.acc_buffer_words
        self.w_depth = config.dram_bytes // self.pb
        self.x_depth = max(1, self.max_cols // (2 * self.pb))
        # scale words of one row: at most max_cols / 8 groups of 2 bytes
        self.scale_words = gemv_scale_words(config)
        self.packs = gemv_packs(config)
        # int4-only lanes that multiply in a MULT18X18D (the first of them; the rest shift-and-add in logic)
        self.int4_dsp_lanes = self.pb * INT4_DSP_LANES[0] // INT4_DSP_LANES[1]
        super().__init__({
            "cmd": In(stream.Signature(gemv_tile(config))),
            "busy": Out(1),
            "done": Out(1),
            "cycles": Out(32),
            "w_take": Out(1),
            "w_addr": Out(range(self.w_depth)),
            "w_data": In(self.pbits),
            "x_addr": Out(range(self.x_depth)),
            "x_data": In(32 * self.pb),
            "acc_addr": Out(range(self.max_rows)),
            "acc_data": Out(64),
            "acc_en": Out(1),
            **({"acc_data1": Out(64), "acc_en1": Out(1)} if self.packs else {}),
        })

    def elaborate(self, platform):
        m = Module()
        pb, lpb = self.pb, log2_exact(self.pb)
        cols_w = self.max_cols.bit_length()
        rows_w = self.max_rows.bit_length()

        # ---- the tile, latched from the command
        latched = Signal.like(self.cmd.payload, name="tile")
        rows, cols, gl = latched.rows, latched.cols, latched.group_log2
        # fmt below is the width code: uint4 streams as int4 (asym: its lanes subtract the group's zero point)
        fmt, asym = Signal(2, name="width_fmt"), Signal(name="asym")
        m.d.comb += [asym.eq(latched.fmt == FMT_CODES["uint4"]),
                     fmt.eq(Mux(asym, FMT_CODES["int4"], latched.fmt))]
        # derived (combinational from the latched values)
        ngroups = Signal(cols_w)
        m.d.comb += ngroups.eq(cols >> gl)
        wbytes = Signal(cols_w + 1)  # weight bytes per row
        with m.Switch(fmt):
            with m.Case(FMT_CODES["int4"]):
                m.d.comb += wbytes.eq(cols >> 1)
            with m.Case(FMT_CODES["w16"]):
                m.d.comb += wbytes.eq(cols << 1)
            with m.Default():
                m.d.comb += wbytes.eq(cols)
        row_bytes = Signal(cols_w + 2)
        m.d.comb += row_bytes.eq(ngroups * 2 + wbytes)
        packed = latched.packed if self.packs else None
        wpr = Signal(cols_w + 2)  # words per row record (per block)
        off = Signal(lpb)  # byte offset of weight 0 inside its word
        nsw = Signal(cols_w + 2)  # scale words
        fww = Signal(cols_w + 2)  # first word that completes a weight window
        nwin = Signal(cols_w + 1)  # windows (of pb weight bytes) per row, the last one partial where `tail`
        # A row whose weights end inside a window (cols not a multiple of one, e.g. 32 int4 columns on a 256-bit
        # port) ends in a partial window of `tail` bytes, its lanes past them zeroed in S2. Where that window lies
        # in the row's last word past a header offset (`late`), it would complete with the next word, the next
        # row's: it is taken in the next row's first slot (which completes no window of its own, as the headers
        # end past a word boundary) and the last row's in one slot more at the tile's end, which takes no word
        # (timing.gemv_late_window).
        tail = Signal(lpb, name="tail_bytes")
        late = Signal(name="late_window")
        m.d.comb += tail.eq(wbytes[:lpb])
        normal = [wpr.eq((row_bytes + pb - 1) >> lpb), off.eq((ngroups * 2)[:lpb]),
                  nsw.eq((ngroups * 2 + pb - 1) >> lpb), fww.eq(((ngroups * 2) >> lpb) + (off != 0)),
                  nwin.eq((wbytes + pb - 1) >> lpb), late.eq((off != 0) & (tail != 0) & (off + tail <= pb))]
        if not self.packs:
            m.d.comb += normal
        gwl = Signal(4)  # log2 of windows per group (weights per window: 2pb, pb, pb/2)
        m.d.comb += gwl.eq(gl + fmt - (lpb + 1))
        shift = Signal(range(pb + 1))  # byte shift into Cat(prev, cur)
        # groups narrower than a window: 2**nkl groups per window, each summed in its subtree and scaled apart
        nscales = gemv_narrow_scales(self.config)
        narrow = Signal(name="narrow")
        nkl = Signal(range(lpb + 2), name="narrow_groups_log2")
        m.d.comb += [narrow.eq((nscales > 1) & (gl + fmt < lpb + 1)), nkl.eq(lpb + 1 - fmt - gl)]
        m.d.comb += shift.eq(Mux(off == 0, pb, off))
        # packed rows: the engine's "rows" are blocks of 2**nkl rows, a block's record its headers then its groups
        units = rows
        if self.packs:
            units = Signal(rows_w, name="row_units")
            with m.If(packed):
                block_sw = Signal(cols_w + 2, name="block_scale_words")
                m.d.comb += [block_sw.eq(((ngroups << nkl << 1) + pb - 1) >> lpb),
                             units.eq((rows + (1 << nkl) - 1) >> nkl), wpr.eq(block_sw + ngroups), off.eq(0),
                             nsw.eq(block_sw), fww.eq(block_sw), nwin.eq(ngroups), late.eq(0), tail.eq(0)]
            with m.Else():
                m.d.comb += [units.eq(rows), *normal]

        running = Signal()
        r_cnt = Signal(rows_w)
        w_cnt = Signal(cols_w + 2)
        addr = Signal(range(self.w_depth))
        cycles = Signal(32)
        m.d.comb += self.cycles.eq(cycles)
        busy = Signal()
        m.d.comb += self.busy.eq(busy)
        with m.If(busy):
            m.d.sync += cycles.eq(cycles + 1)

        # ---- S0: issue
        s0_valid = Signal()
        s0_last = Signal()
        j = Signal(signed(cols_w + 4))
        tail_slot = Signal(name="s0_tail_slot")  # the previous row's late window
        extra = Signal(name="s0_extra_slot")  # the last row's late window: no word
        m.d.comb += [tail_slot.eq(late & (w_cnt == 0) & (r_cnt != 0)), extra.eq(late & (r_cnt == units)),
                     j.eq(Mux(tail_slot, nwin - 1, w_cnt - fww))]
        s0_win = Signal()
        m.d.comb += s0_win.eq((j >= 0) & (j < nwin))
        m.d.comb += [
            s0_valid.eq(running),
            s0_last.eq(Mux(late, extra, (r_cnt == units - 1) & (w_cnt == wpr - 1))),
            self.w_addr.eq(addr),
        ]
        # x word of window j: 2pb x values per word, so int4 uses one word per window,
        # int8 half a word, w16 a quarter; the low bits of j pick the part (in S1)
        with m.Switch(fmt):
            with m.Case(FMT_CODES["int4"]):
                m.d.comb += self.x_addr.eq(j[:len(self.x_addr)])
            with m.Case(FMT_CODES["w16"]):
                m.d.comb += self.x_addr.eq(j[2:2 + len(self.x_addr)])
            with m.Default():
                m.d.comb += self.x_addr.eq(j[1:1 + len(self.x_addr)])
        if self.packs:  # packed rows: window j is group j of every row of the block, x values j << gl onwards
            xfirst = Signal(cols_w + 1, name="packed_x_first")
            m.d.comb += xfirst.eq(j[:cols_w + 1] << gl)
            with m.If(packed):
                m.d.comb += self.x_addr.eq(xfirst[lpb + 1:])
        m.d.sync += self.done.eq(0)
        tile = self.cmd.payload
        m.d.comb += self.cmd.ready.eq(~busy)
        with m.If(self.cmd.valid & self.cmd.ready):
            m.d.sync += [
                latched.eq(tile), addr.eq(tile.w_base), r_cnt.eq(0), w_cnt.eq(0), cycles.eq(0),
                busy.eq(1), running.eq(tile.rows != 0),
            ]
            with m.If(tile.rows == 0):
                m.d.sync += [busy.eq(0), self.done.eq(1)]
        with m.If(running):
            m.d.sync += addr.eq(addr + 1)
            with m.If(extra):
                m.d.sync += running.eq(0)
            with m.Elif(w_cnt == wpr - 1):
                m.d.sync += [w_cnt.eq(0), r_cnt.eq(r_cnt + 1)]
                with m.If((r_cnt == units - 1) & ~late):
                    m.d.sync += running.eq(0)
            with m.Else():
                m.d.sync += w_cnt.eq(w_cnt + 1)

        # ---- S1: take the port word and the x word into registers (the FIFO and the activation BRAM drive nothing
        # else), store scale words, read the window's group scale
        tags = {"valid": s0_valid, "last": s0_valid & s0_last, "win": s0_valid & s0_win, "rend": j == nwin - 1,
                "xsel": Mux(packed, 0, j[:2]) if self.packs else j[:2], "g": Mux(narrow, j << nkl, j >> gwl)[:cols_w],
                "w": w_cnt, "row": Mux(tail_slot, r_cnt - 1, r_cnt), "extra": extra,
                "partial": (tail != 0) & (j == nwin - 1), **({"xoff": xfirst[:lpb + 1]} if self.packs else {})}
        s1 = _stage(m, tags, "s1")
        m.d.comb += self.w_take.eq(s1["valid"] & ~s1["extra"])
        wq, pq = Signal(self.pbits, name="w_word"), Signal(self.pbits, name="w_prev")
        xq = Signal(32 * self.pb, name="x_word")
        with m.If(s1["valid"]):
            m.d.sync += [wq.eq(self.w_data), pq.eq(wq)]
        if self.packs:
            m.d.sync += xq.eq(Mux(packed, self._replicated_x(m, s1["xoff"], gl), self.x_data))
        else:
            m.d.sync += xq.eq(self.x_data)
        m.submodules.scales = scales = Memory(shape=unsigned(self.pbits), depth=self.scale_words, init=[])
        sw = scales.write_port()
        sr = scales.read_port()
        m.d.comb += [
            sw.addr.eq(s1["w"]), sw.data.eq(self.w_data), sw.en.eq(s1["valid"] & ~s1["extra"] & (s1["w"] < nsw)),
            sr.addr.eq(s1["g"] >> (lpb - 1)),
        ]

        # ---- S2: realign the weight bytes into one window, pick each lane's operands
        s2 = _stage(m, {k: s1[k] for k in ("valid", "last", "win", "rend", "xsel", "g", "row", "partial")}, "s2")
        zp = self._zero_points(m, s1["valid"] & ~s1["extra"] & (s1["w"] < nsw), s1["w"], s2["g"], gl, nscales)
        # a partial window's weights: (tail bytes * 8) >> log2(bits) lanes; the lanes past them hold padding or the
        # next row's bytes, zeroed (uint4 padding would decode as -z)
        tail_lanes = Signal(lpb + 2, name="tail_lanes")
        m.d.comb += tail_lanes.eq((tail << 1) >> fmt)
        window = Signal(self.pbits)
        m.d.comb += window.eq(select_bits(m, Cat(pq, wq), shift, self.pbits, unit=8, name="window_select"))
        scale = Signal(16, name="s3_scale")
        header = sr.data.word_select(s2["g"][:lpb - 1], 16)
        m.d.sync += scale.eq(Mux(asym, header[:nx.UINT4_SCALE_BITS], header))
        # narrow groups: the window's groups are consecutive headers from the first one's (in one scale word, as
        # their count divides the headers per word); the first one's is `scale`
        nheaders = select_bits(m, sr.data, s2["g"][:lpb - 1], 16 * nscales, unit=16, name="s2_headers")
        nscale = []
        for g in range(1, nscales):
            h, ns = nheaders.word_select(g, 16), Signal(16, name=f"s3_scale{g}")
            m.d.sync += ns.eq(Mux(asym, h[:nx.UINT4_SCALE_BITS], h))
            nscale.append(ns)
        nl = 2 * pb  # int4 lanes; int8 uses the first pb, w16 the first pb / 2
        ops = []  # (weight, x) registered per lane
        for i in range(nl):
            dsp = i < pb  # lanes that see int8 or w16 weights; the others only ever see int4 weights
            # uint4: nibble - zero point, in [-15, 15]: one more bit in the int4-only lanes
            wv = Signal(signed(16 if dsp else 4 if zp is None else 5), name=f"wv{i}")
            xv = Signal(signed(16), name=f"xv{i}")
            nib = window.word_select(i, 4)
            w4 = nib.as_signed() if zp is None else Mux(
                asym, Cat(nib, Const(0, 1)).as_signed() - Cat(zp(i), Const(0, 1)).as_signed(), nib.as_signed())
            with m.Switch(fmt):
                with m.Case(FMT_CODES["int4"]):
                    m.d.sync += [wv.eq(w4), xv.eq(xq.word_select(i, 16).as_signed())]
                if dsp:
                    with m.Case(FMT_CODES["w16"]):
                        if i < pb // 2:
                            lanes = [xq.word_select(q * (pb // 2) + i, 16).as_signed() for q in range(4)]
                            m.d.sync += [wv.eq(window.word_select(i, 16).as_signed()),
                                         xv.eq(Array(lanes)[s2["xsel"]])]
                        else:
                            m.d.sync += wv.eq(0)
                    with m.Default():
                        m.d.sync += [wv.eq(window.word_select(i, 8).as_signed()),
                                     xv.eq(Mux(s2["xsel"][0], xq.word_select(pb + i, 16).as_signed(),
                                               xq.word_select(i, 16).as_signed()))]
                else:
                    with m.Default():
                        m.d.sync += wv.eq(0)
            # a partial window holds at most nl - 2 lanes (tail < pb bytes), so the last lane is always past it
            # (and a compare with it would be constant: Verilator's CMPCONST)
            with m.If(s2["partial"] & ((tail_lanes <= i) if i < nl - 1 else 1)):
                m.d.sync += wv.eq(0)
            ops.append((wv, xv))

        # ---- S3: products; int8 and w16 weights (and half the int4 ones) in the DSP lanes, INT4_DSP_LANES of the
        # other int4 lanes on multipliers too, the rest as shift-and-add in logic
        s3 = _stage(m, {k: s2[k] for k in ("valid", "last", "win", "rend", "row")}, "s3")
        prods = []
        for i, (wv, xv) in enumerate(ops):
            # exact widths: w16 x int16 needs 32 bits (-2**15 * -2**15 = 2**30), int8 lanes 24, int4 lanes 20
            p = Signal(signed(32 if i < pb // 2 else 24 if i < pb else 20), name=f"prod{i}")
            m.d.sync += p.eq(wv * xv if i < pb + self.int4_dsp_lanes else narrow_times(wv, xv))
            prods.append(p)
        tree_tags = _stage(m, s3, "s4")
        scale_d = _delay(m, scale, "s4_scale")  # the scale rides along with the products
        nscale_d = [_delay(m, ns, f"s4_scale{g + 1}") for g, ns in enumerate(nscale)]

        # ---- T1..: the adder tree, GEMV_TREE_FANIN terms per stage. |psum| <= (pb / 2) * 2**30 (w16; int8 and
        # int4 stay below), so 31 + lpb bits hold it; narrower partial sums are exact modulo 2**psum_w.
        psum_w = 31 + lpb
        level = 0
        # narrow groups of 2**gbits weights (lanes) are the level-l nodes (gbits = 2l) or pairs of them: their sums,
        # delayed to the tree's last stage, feed the group scales; group_sums[gbits][g] for the window's group g
        group_sums = {}
        widest = nscales * self.config.min_group
        while len(prods) > 1:
            level += 1
            fresh = set()
            for gbits in (2 * level - 2, 2 * level - 1):
                if not self.config.min_group <= 1 << gbits < widest:
                    continue
                if gbits % 2 == 0:  # this level's nodes
                    group_sums[gbits] = prods[:widest >> gbits]
                    continue
                sums = []
                for g in range(widest >> gbits):
                    pair = prods[2 * g] + prods[2 * g + 1]
                    r = Signal(signed(min(len(pair), psum_w)), name=f"t{level}_g{gbits}_{g}")
                    m.d.sync += r.eq(pair)
                    sums.append(r)
                group_sums[gbits] = sums
                fresh.add(gbits)
            for gbits, sums in group_sums.items():
                if gbits not in fresh:
                    group_sums[gbits] = [_delay(m, v, f"t{level}_g{gbits}_{g}") for g, v in enumerate(sums)]
            nxt = []
            for k in range(0, len(prods), GEMV_TREE_FANIN):
                name = f"t{level}_{k // GEMV_TREE_FANIN}"
                total = balanced_sum(prods[k:k + GEMV_TREE_FANIN], m, name=name)
                r = Signal(signed(min(len(total), psum_w)), name=name)
                m.d.sync += r.eq(total)
                nxt.append(r)
            prods = nxt
            tree_tags = _stage(m, tree_tags, f"t{level}")
            scale_d = _delay(m, scale_d, f"t{level}_scale")
            nscale_d = [_delay(m, ns, f"t{level}_scale{g + 1}") for g, ns in enumerate(nscale_d)]
        assert level == gemv_tree_stages(self.config), (level, gemv_tree_stages(self.config))
        psum = prods[0]

        # ---- M1, M2: scale the window's partial sum (split into 17-bit limbs, one MULT18X18D each), then sum
        # the limbs. Scaling each window rather than each group sum is exact: the row accumulator is taken
        # modulo 2**64, and (sum psum) * s == sum(psum * s) there. Narrow groups: the same for each group's sum
        # and scale (the first group's through the window's multiplier), then a tree over the scaled sums.
        nsums = self._narrow_inputs(m, group_sums, gl, nscales) if nscales > 1 else None
        m1 = _stage(m, tree_tags, "m1")
        first = psum if nscales == 1 else Mux(narrow, nsums[0], psum)
        # |sum| * scale < 2**(len(sum) - 1 + 16): the scaled sums need no 64 bits
        wprod = _limb_sum(m, _scale_limbs(m, first, scale_d, "m1_pp"), "m2_prod", min(64, len(first) + 16))
        m2 = _stage(m, m1, "m2")
        fin, fprod = m2, wprod
        if nscales > 1:
            nprods = [wprod] + [_limb_sum(m, _scale_limbs(m, v, ns, f"m1_g{g + 1}_pp"), f"m2_g{g + 1}_prod",
                                          min(64, len(v) + 16)) for g, (v, ns) in enumerate(zip(nsums[1:], nscale_d))]
            group_prods = list(nprods)  # each group's scaled sum: a packed row's
            ntags, nlevel = m2, 0
            while len(nprods) > 1:
                nlevel += 1
                nxt = []
                for k in range(0, len(nprods), GEMV_TREE_FANIN):
                    total = sum(nprods[k:k + GEMV_TREE_FANIN])
                    r = Signal(signed(min(len(total), 64)), name=f"n{nlevel}_{k // GEMV_TREE_FANIN}")
                    m.d.sync += r.eq(total)
                    nxt.append(r)
                nprods = nxt
                ntags = _stage(m, ntags, f"n{nlevel}")
            widest_fmt = max(self.config.weight_formats, key=self.config.weights_per_cycle)
            assert nlevel == gemv_narrow_stages(self.config, widest_fmt, self.config.min_group), nlevel
            fin = {k: Mux(narrow, ntags[k], m2[k]) for k in m2}
            fprod = Signal(signed(64), name="window_prod")
            m.d.comb += fprod.eq(Mux(narrow, nprods[0], wprod))

        # ---- A: row accumulate (64-bit, wrapping as numerics.gemv_acc's int64), write out at the row end
        acc = Signal(signed(64))
        accn = Signal(signed(64))
        m.d.comb += [accn.eq(acc + fprod), self.acc_addr.eq(fin["row"]), self.acc_data.eq(accn)]
        def unpacked(v):
            return v & ~packed if self.packs else v
        with m.If(unpacked(fin["win"])):
            with m.If(fin["rend"]):
                m.d.comb += self.acc_en.eq(1)
                m.d.sync += acc.eq(0)
            with m.Else():
                m.d.sync += acc.eq(accn)
        with m.If(unpacked(fin["last"])):
            m.d.sync += [busy.eq(0), self.done.eq(1)]
        if self.packs:
            self._drain_packed(m, m2, group_prods, rows, nkl, packed, busy)
        return m

    def _drain_packed(self, m, tags, prods, rows, nkl, packed, busy):
        """Packed rows: each group's scaled sum (*prods*, at the stage of *tags*) into its row's accumulator; at a
        block's last window the block's sums into the drain bank, written GEMV_PACKED_WRITES a cycle."""
        assert GEMV_PACKED_WRITES == 2, GEMV_PACKED_WRITES  # acc_data / acc_data1
        n = len(prods)
        accs = [Signal(signed(64), name=f"packed_acc{t}") for t in range(n)]
        bank = [Signal(signed(64), name=f"packed_drain{t}") for t in range(n)]
        sums = [Signal(signed(64), name=f"packed_sum{t}") for t in range(n)]
        m.d.comb += [s.eq(a + p) for s, a, p in zip(sums, accs, prods)]
        left = Signal(range(n // 2 + 1), name="packed_drain_left")  # pairs left to write
        addr = Signal.like(self.acc_addr, name="packed_drain_addr")
        last = Signal(name="packed_drain_last")
        with m.If(left != 0):
            m.d.comb += [self.acc_addr.eq(addr), self.acc_data.eq(bank[0]), self.acc_data1.eq(bank[1]),
                         self.acc_en.eq(addr < rows), self.acc_en1.eq(addr + 1 < rows)]
            m.d.sync += [left.eq(left - 1), addr.eq(addr + 2)]
            m.d.sync += [bank[t].eq(bank[t + 2]) for t in range(n - 2)]
            with m.If((left == 1) & last):
                m.d.sync += [busy.eq(0), self.done.eq(1)]
        with m.If(tags["win"] & packed):
            with m.If(tags["rend"]):
                # a drain still running writes its last pair from the bank in this cycle (the block streamed
                # at least as many words as it drains: timing.gemv_pack_refusal)
                m.d.sync += [a.eq(0) for a in accs]
                m.d.sync += [b.eq(s) for b, s in zip(bank, sums)]
                m.d.sync += [left.eq((Const(1, 1) << nkl) >> 1), addr.eq(tags["row"] << nkl), last.eq(tags["last"])]
            with m.Else():
                m.d.sync += [a.eq(s) for a, s in zip(accs, sums)]

    def _replicated_x(self, m, first, gl):
        """Packed rows: the x values of a window's group (from lane *first* of the x word; groups of ``2**gl``)
        repeated over the x word, so that each row's lanes see their group's x as a window's lanes see theirs."""
        xbits = 32 * self.pb
        widest = self.pb  # a group is at most half of int4's window of 2 * pb lanes
        part = select_bits(m, self.x_data, first, 16 * widest, unit=16, name="packed_x_select")
        out = Signal(xbits, name="packed_x")
        with m.Switch(gl):
            g = self.config.min_group
            while g <= widest:
                with m.Case(log2_exact(g)):
                    m.d.comb += out.eq(part[:16 * g].replicate(xbits // (16 * g)))
                g *= 2
        return out

    @staticmethod
    def _narrow_inputs(m, group_sums, gl, nscales):
        """The sum of the window's group *g* for each of the *nscales* group scales, picked by the tile's group
        (``gl``, log2 of its weights) among the narrow group sizes; zero past the window's groups."""
        out = []
        for g in range(nscales):
            cands = {gbits: sums[g] for gbits, sums in group_sums.items() if g < len(sums)}
            v = Signal(signed(max(len(c) for c in cands.values())), name=f"narrow_sum{g}")
            with m.Switch(gl):
                for gbits, c in cands.items():
                    with m.Case(gbits):
                        m.d.comb += v.eq(c)
            out.append(v)
        return out

    def _zero_points(self, m, we, w_word, group, gl, nscales):
        """uint4: a function of the lane giving the zero point of its group, the top nibble of the group's header,
        for the lanes in S1 (None without uint4). *group* is the window's (first) group; a lane of a narrow group
        (``gl``: log2 of the group's weights, below that of ``nscales`` base groups) is ``lane >> gl`` groups on.

        The header words of a row are written as they stream past (*we*, word *w_word*, in S1) a cycle later into
        a memory read without latency: every window of a row starts at or after the first word past its headers,
        and a late window (taken in the next row's first slot) reads its row's as the next row's first header word
        is written. (Registering the read data instead maps the memory to block RAM: +2 DP16KD on ulx3s.)
        """
        if "uint4" not in self.config.weight_formats:
            return None
        per_word = self.pb // 2  # 16-bit headers per port word
        lpw = log2_exact(per_word)
        m.submodules.zero_points = zps = Memory(shape=unsigned(4 * per_word), depth=self.scale_words, init=[])
        zw = zps.write_port()
        zr = zps.read_port(domain="comb")
        m.d.sync += [zw.addr.eq(w_word), zw.en.eq(we),
                     zw.data.eq(Cat(self.w_data.word_select(h, 16)[nx.UINT4_SCALE_BITS:] for h in range(per_word)))]
        m.d.comb += zr.addr.eq(group >> lpw)
        zp = Signal(4, name="zero_point")
        m.d.comb += zp.eq(zr.data.word_select(group[:lpw], 4))
        # the window's narrow groups, from its first
        following = select_bits(m, zr.data, group[:lpw], len(zr.data), unit=4, name="zero_points_following")
        narrow_bits = range(log2_exact(self.config.min_group), log2_exact(nscales * self.config.min_group))

        def lane(i):
            cands = {gbits: i >> gbits for gbits in narrow_bits if i >> gbits}
            if not cands:
                return zp
            zpi = Signal(4, name=f"zero_point{i}")
            m.d.comb += zpi.eq(zp)
            with m.Switch(gl):
                for gbits, g in cands.items():
                    with m.Case(gbits):
                        m.d.comb += zpi.eq(following.word_select(g, 4))
            return zpi
        return lane


def _scale_limbs(m, value, scale, prefix: str) -> list:
    """Registered products of *value*'s 17-bit limbs (the top one signed) with the 16-bit *scale*: one MULT18X18D
    each, a limb of at most 4 bits in logic. Returns ``(shift, product)`` pairs."""
    limbs = []
    for lo in range(0, len(value), 17):
        top = lo + 17 >= len(value)
        chunk = value[lo:lo + 17]
        chunk = chunk.as_signed() if top else chunk
        pp = Signal(signed(len(chunk) + 17), name=f"{prefix}{lo}")
        m.d.sync += pp.eq(narrow_times(chunk, scale) if len(chunk) <= 4 else chunk * scale)
        limbs.append((lo, pp))
    return limbs


def _limb_sum(m, limbs: list, name: str, width: int = 64):
    """The registered sum of :func:`_scale_limbs`' products, *width* bits."""
    prod = Signal(signed(width), name=name)
    m.d.sync += prod.eq(balanced_sum([pp << lo for lo, pp in limbs], m, name=name))
    return prod


def _stage(m, tags: dict, prefix: str) -> dict:
    """Registered copies of the pipeline tags *tags* for the next stage."""
    out = {}
    for name, value in tags.items():
        out[name] = _delay(m, value, f"{prefix}_{name}")
    return out


def _delay(m, value, name: str):
    reg = Signal.like(value, name=name) if isinstance(value, Signal) else Signal(len(value), name=name)
    m.d.sync += reg.eq(value)
    return reg

