# amaranth: UnusedElaboratable=no
"""KvBuffer in Amaranth's simulator: a pool carved into two layers of different head counts and widths, every
(base, head, position, chunk) its own word at the golden model's index, lanes masked, exponents starting at
EXP_MIN, and the engine and host read ports agreeing."""

import numpy as np
import pytest

pytest.importorskip("amaranth")

from amaranth.sim import Simulator
from kvoverlay.hw.kv_buffer import KvBuffer, kv_geometry
from kvoverlay.sim.golden import GoldenModel

from kvoverlay import numerics
from kvoverlay.config import PRESETS

#: A pool of 8 columns of 3 tokens (24 words); head_dim 5 over 4 lanes leaves a partial last chunk.
CFG = PRESETS["tiny"].replace(kv_capacity=3, max_layers=2, max_kv_heads=2, max_head_dim=6)
#: (kv_base, KV heads, head_dim): 3 heads of 5 (2 columns each) from column 0, 2 heads of 3 (1 column) from 6
LAYERS = ((0, 3, 5), (6, 2, 3))


def _lanes(word, lanes):
    return [((word >> (16 * i)) & 0xFFFF) for i in range(lanes)]


def test_geometry():
    g = kv_geometry(CFG)
    assert CFG.kv_columns == 8
    assert g == {"lanes": CFG.vector_lanes, "row_chunks": 2, "words": 8 * 3}
    assert 2 * g["words"] * g["lanes"] >= CFG.kv_buffer_words


def _coords():
    """(base, head, cols, pos, chunk) of every word of the carved pool."""
    out = []
    for base, heads, d in LAYERS:
        cols = CFG.kv_head_columns(d)
        out += [(base, h, cols, p, c) for h in range(heads) for p in range(CFG.kv_capacity) for c in range(cols)]
    return out


def test_word_index_is_the_golden_models():
    dut, golden = KvBuffer(CFG), GoldenModel(CFG)
    words = []
    for base, heads, d in LAYERS:
        cols = CFG.kv_head_columns(d)
        for h in range(heads):
            for p in range(CFG.kv_capacity):
                assert dut.word_index(base, h, cols, p) == int(golden.kv_words(base, h, p, d))
                words += [dut.word_index(base, h, cols, p) + c for c in range(cols)]
    assert sorted(words) == list(range(kv_geometry(CFG)["words"]))  # the two layers fill the pool exactly


def test_host_read_port_is_built_on_request():
    """The overlay reads the pool through the engine only, so the host's port (a copy of every memory in block
    RAM) is built only on request."""
    assert not hasattr(KvBuffer(CFG), "host") and "host" not in KvBuffer(CFG).signature.members
    assert "host" in KvBuffer(CFG, host_read=True).signature.members
    with pytest.raises(TypeError, match="host_read must be a bool, got 1"):
        KvBuffer(CFG, host_read=1)


def test_kv_buffer_words_and_masks():
    dut = KvBuffer(CFG, host_read=True)
    lanes = dut.geometry["lanes"]
    coords = _coords()
    rng = np.random.default_rng(5)
    k_words = {c: [int(x) for x in rng.integers(0, 1 << 16, lanes)] for c in coords}
    v_words = {c: [int(x) for x in rng.integers(0, 1 << 16, lanes)] for c in coords}
    exps = {c[:4]: (int(rng.integers(numerics.EXP_MIN, numerics.EXP_MAX + 1)),
                    int(rng.integers(numerics.EXP_MIN, numerics.EXP_MAX + 1))) for c in coords}
    masked = coords[5]  # written again with only lanes 1 and 3 enabled
    patch = [0xAAAA + i for i in range(lanes)]
    p, host = dut.port, dut.host
    seen = {}
    write_names = ("wr_base", "wr_head", "cols", "wr_pos", "wr_chunk")

    def pack(vals):
        return sum(v << (16 * i) for i, v in enumerate(vals))

    def other_of(c):  # a V position of the same head, read beside K's
        return (c[3] + 1) % CFG.kv_capacity, (c[4] + 1) % c[2]

    async def tb(ctx):
        # nothing written yet: exponents read EXP_MIN on both ports
        await ctx.tick()
        assert ctx.get(p.rd_ek) == ctx.get(host.ev) == numerics.EXP_MIN
        for c in coords:
            for name, v in zip(write_names, c):
                ctx.set(getattr(p, name), v)
            ctx.set(p.wr_mask, (1 << lanes) - 1)
            ctx.set(p.wr_data, pack(k_words[c]))
            ctx.set(p.wr_k_en, 1)
            ctx.set(p.wr_e_en, c[4] == 0)
            ctx.set(p.wr_ek, exps[c[:4]][0])
            ctx.set(p.wr_ev, exps[c[:4]][1])
            await ctx.tick()
            ctx.set(p.wr_k_en, 0)
            ctx.set(p.wr_e_en, 0)
            ctx.set(p.wr_data, pack(v_words[c]))
            ctx.set(p.wr_v_en, 1)
            await ctx.tick()
            ctx.set(p.wr_v_en, 0)
        for name, val in zip(write_names, masked):
            ctx.set(getattr(p, name), val)
        ctx.set(p.wr_mask, 0b1010)
        ctx.set(p.wr_data, pack(patch))
        ctx.set(p.wr_k_en, 1)
        await ctx.tick()
        ctx.set(p.wr_k_en, 0)
        for c in coords:
            # the engine port reads K and V of two different positions of one head at once
            for port, names, val in ((p, ("rd_base", "rd_head", "cols", "rd_k_pos", "rd_k_chunk"), c),
                                     (p, ("rd_v_pos", "rd_v_chunk"), other_of(c)),
                                     (host, ("base", "head", "cols", "pos", "chunk"), c)):
                for name, v in zip(names, val):
                    ctx.set(getattr(port, name), v)
            await ctx.tick()
            seen[c] = (ctx.get(p.rd_k_data), ctx.get(p.rd_v_data), ctx.get(p.rd_ek), ctx.get(p.rd_ev),
                       ctx.get(p.rd_k_ev), ctx.get(host.k_data), ctx.get(host.v_data), ctx.get(host.ek), ctx.get(host.ev))

    sim = Simulator(dut)
    sim.add_clock(1e-6)
    sim.add_testbench(tb)
    sim.run()
    for c in coords:
        k = list(k_words[c])
        if c == masked:
            k[1], k[3] = patch[1], patch[3]
        other = (*c[:3], *other_of(c))
        rk, rv, ek, ev, kev, hk, hv, hek, hev = seen[c]
        assert _lanes(hk, lanes) == k and _lanes(hv, lanes) == v_words[c], c
        assert (hek, hev) == exps[c[:4]], c
        assert rk == hk and ek == hek and kev == hev, c
        assert _lanes(rv, lanes) == v_words[other] and ev == exps[other[:4]][1], (c, other)
