"""KvBuffer in Amaranth's simulator: every (layer, head, position, chunk) is its own word, lanes are masked,
exponents start at EXP_MIN, and the engine and host read ports agree."""

import numpy as np
import pytest

pytest.importorskip("amaranth")

from amaranth.sim import Simulator
from kvoverlay.hw.kv_buffer import KvBuffer, kv_geometry

from kvoverlay import numerics
from kvoverlay.config import PRESETS

#: Small enough to visit every word; head_dim 6 over 4 lanes leaves a partial last chunk.
CFG = PRESETS["tiny"].replace(kv_capacity=3, max_layers=2, max_kv_heads=2, max_head_dim=6)


def _lanes(word, lanes):
    return [((word >> (16 * i)) & 0xFFFF) for i in range(lanes)]


def test_geometry():
    g = kv_geometry(CFG)
    assert g == {"lanes": CFG.vector_lanes, "row_chunks": 2, "rows": 2 * 2 * 3}
    assert 2 * g["rows"] * g["row_chunks"] * g["lanes"] >= CFG.kv_buffer_words


def test_kv_buffer_words_and_masks():
    dut = KvBuffer(CFG)
    g = dut.geometry
    lanes = g["lanes"]
    coords = [(la, h, p, c) for la in range(CFG.max_layers) for h in range(CFG.max_kv_heads)
              for p in range(CFG.kv_capacity) for c in range(g["row_chunks"])]
    rng = np.random.default_rng(5)
    k_words = {c: [int(x) for x in rng.integers(0, 1 << 16, lanes)] for c in coords}
    v_words = {c: [int(x) for x in rng.integers(0, 1 << 16, lanes)] for c in coords}
    exps = {c[:3]: (int(rng.integers(numerics.EXP_MIN, numerics.EXP_MAX + 1)),
                    int(rng.integers(numerics.EXP_MIN, numerics.EXP_MAX + 1))) for c in coords}
    masked = coords[5]  # written again with only lanes 1 and 3 enabled
    patch = [0xAAAA + i for i in range(lanes)]
    p, host = dut.port, dut.host
    seen = {}

    def pack(vals):
        return sum(v << (16 * i) for i, v in enumerate(vals))

    async def tb(ctx):
        # nothing written yet: exponents read EXP_MIN on both ports
        await ctx.tick()
        assert ctx.get(p.rd_ek) == ctx.get(host.ev) == numerics.EXP_MIN
        for c in coords:
            ctx.set(p.wr_layer, c[0])
            ctx.set(p.wr_head, c[1])
            ctx.set(p.wr_pos, c[2])
            ctx.set(p.wr_chunk, c[3])
            ctx.set(p.wr_mask, (1 << lanes) - 1)
            ctx.set(p.wr_data, pack(k_words[c]))
            ctx.set(p.wr_k_en, 1)
            ctx.set(p.wr_e_en, c[3] == 0)
            ctx.set(p.wr_ek, exps[c[:3]][0])
            ctx.set(p.wr_ev, exps[c[:3]][1])
            await ctx.tick()
            ctx.set(p.wr_k_en, 0)
            ctx.set(p.wr_e_en, 0)
            ctx.set(p.wr_data, pack(v_words[c]))
            ctx.set(p.wr_v_en, 1)
            await ctx.tick()
            ctx.set(p.wr_v_en, 0)
        for name, val in zip(("wr_layer", "wr_head", "wr_pos", "wr_chunk"), masked):
            ctx.set(getattr(p, name), val)
        ctx.set(p.wr_mask, 0b1010)
        ctx.set(p.wr_data, pack(patch))
        ctx.set(p.wr_k_en, 1)
        await ctx.tick()
        ctx.set(p.wr_k_en, 0)
        for c in coords:
            # the engine port reads K and V of two different positions at once
            other = coords[(coords.index(c) + 7) % len(coords)]
            for port, names, val in ((p, ("rd_layer", "rd_head", "rd_k_pos", "rd_k_chunk"), c),
                                     (p, ("rd_v_pos", "rd_v_chunk"), other[2:]),
                                     (host, ("layer", "head", "pos", "chunk"), c)):
                for name, v in zip(names, val):
                    ctx.set(getattr(port, name), v)
            await ctx.tick()
            seen[c] = (ctx.get(p.rd_k_data), ctx.get(p.rd_v_data), ctx.get(p.rd_ek), ctx.get(p.rd_ev),
                       ctx.get(host.k_data), ctx.get(host.v_data), ctx.get(host.ek), ctx.get(host.ev))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    for c in coords:
        k = list(k_words[c])
        if c == masked:
            k[1], k[3] = patch[1], patch[3]
        other = (*c[:2], *coords[(coords.index(c) + 7) % len(coords)][2:])
        rk, rv, ek, ev, hk, hv, hek, hev = seen[c]
        assert _lanes(hk, lanes) == k and _lanes(hv, lanes) == v_words[c], c
        assert (hek, hev) == exps[c[:3]], c
        assert rk == hk and ek == hek, c
        assert _lanes(rv, lanes) == v_words[other] and ev == exps[other[:3]][1], (c, other)
