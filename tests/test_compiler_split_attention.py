"""split_attention: a layer's attention by KV group, its parts' GEMVs between the attentions, the same function in
float64, and a decode step shorter by the attention the weight streams hide."""

import re

import numpy as np
from kvoverlay.compiler import split_attention as split
from kvoverlay.compiler.fuse import fuse
from kvoverlay.compiler.passes import run_passes
from kvoverlay.compiler.reference import run_float
from kvoverlay.host.bench import DecodeShape, bench_decode
from kvoverlay.models.demo import build_llama_onnx

from kvoverlay.config import PRESETS

TINY = PRESETS["tiny"]


def _fused(**shape):
    return fuse(run_passes(build_llama_onnx(**shape), kv_len=3), max_seq=8, lanes=TINY.vector_lanes)


def test_split_is_the_same_function_in_float64():
    """Each layer of 4 query / 2 KV heads becomes two attentions of 2/1 heads at KV groups 0 and 1, whose q/k/v
    rows and O columns are the whole GEMVs' slices: the float64 logits are the unsplit graph's."""
    whole, parted = _fused(), _fused()
    assert split.split_attention(parted, TINY) == 2
    attns = [op for op in parted.ops if op.kind == "attn"]
    assert [(a.attrs["q_heads"], a.attrs["kv_heads"], a.attrs["kv_group"]) for a in attns] == [(2, 1, 0), (2, 1, 1)] * 2
    tokens = [3, 17, 42, 5, 9]
    for a, b in zip(run_float(whole, tokens), run_float(parted, tokens), strict=True):
        np.testing.assert_allclose(b, a, rtol=1e-9, atol=1e-9)
    # part 1's GEMVs come before part 0's attention's reader: the O projection of part 0 follows part 1's attention
    kinds = [(op.kind, m.group(1) if (m := re.search(r":(p\d+)", op.out)) else None) for op in parted.ops]
    first = kinds.index(("attn", "p0"))
    assert kinds[first + 1:first + 4] == [("linear", "p1")] * 3
    o_proj = [i for i, k in enumerate(kinds) if k == ("linear", "p0")][-1]
    assert o_proj > kinds.index(("attn", "p1"))


def test_a_layer_with_one_kv_head_stays_whole():
    og = _fused(kv_heads=1)
    assert split.split_attention(og, TINY) == 0
    assert [op.attrs["q_heads"] for op in og.ops if op.kind == "attn"] == [4, 4]


def test_split_hides_attention_under_the_weight_stream(monkeypatch):
    """The bench's decoder with and without the split (golden model): the split step is shorter, by less than the
    attention's cycles (what the weight streams hide) and more than what the split adds in vector work."""
    shape = DecodeShape(hidden=256, layers=2, heads=4, kv_heads=2, vocab=256)
    parted = bench_decode(shape, TINY, "int8", context=64, steps=1)
    monkeypatch.setattr(split, "MAX_PARTS", 1)
    whole = bench_decode(shape, TINY, "int8", context=64, steps=1)
    saved = whole["cycles_per_token"] - parted["cycles_per_token"]
    extra = parted["breakdown"]["vector"] - whole["breakdown"]["vector"]
    assert extra > 0 and saved > 2 * extra
    assert saved < parted["breakdown"]["attention"]
    assert parted["bandwidth_efficiency"] > whole["bandwidth_efficiency"]
