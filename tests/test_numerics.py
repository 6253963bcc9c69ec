"""Numerics against float64: each bound here is the one stated in docs/numerics.md."""

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from kvoverlay import numerics as nx

RNG = np.random.default_rng(1234)


def vec(n=256, scale=1.0):
    return nx.from_float(RNG.normal(0, scale, n))


def rel(got, ref):
    return float(np.max(np.abs(got - ref)) / np.max(np.abs(ref)))


def test_round_shift_is_round_half_up():
    assert nx.round_shift(np.array([3, 5, -3, -5, 4]), 1).tolist() == [2, 3, -1, -2, 2]
    assert nx.round_shift(np.array([3]), -2).tolist() == [12]


def test_normalize_uses_fifteen_bits():
    m, e = nx.normalize(np.array([1 << 40, -(1 << 39), 7]), 0)
    assert int(np.max(np.abs(m))) == nx.MANT_MAX or int(np.max(np.abs(m))) == 1 << 14
    assert nx.to_float(m, e)[0] == 2.0 ** 40
    z, ez = nx.normalize(np.zeros(4, np.int64), 3)
    assert not z.any() and ez == nx.EXP_MIN


def test_from_float_bound():
    x = RNG.normal(0, 3.0, 1000)
    m, e = nx.from_float(x)
    assert rel(nx.to_float(m, e), x) <= 2.0 ** -15


@pytest.mark.parametrize("op", ["vadd", "vmul"])
def test_binary_ops_bound(op):
    (a, ea), (b, eb) = vec(scale=2.0), vec(scale=0.01)
    fa, fb = nx.to_float(a, ea), nx.to_float(b, eb)
    got = nx.to_float(*getattr(nx, op)(a, ea, b, eb))
    ref = fa + fb if op == "vadd" else fa * fb
    assert rel(got, ref) <= 2.0 ** -14


def test_vscale_bound():
    a, ea = vec()
    got = nx.to_float(*nx.vscale(a, ea, 23170, -15))
    assert rel(got, nx.to_float(a, ea) * 23170 * 2.0 ** -15) <= 2.0 ** -14


def test_rsqrt_bound():
    for v in [1, 2, 3, 12345, 1 << 40, 987654321987]:
        for e in [-40, -3, 0, 7]:
            r, er = nx.rsqrt(v, e)
            assert abs(r * 2.0 ** er * math.sqrt(v * 2.0 ** e) - 1) <= 2.0 ** -22


@pytest.mark.parametrize("kind", ["rms", "layer"])
def test_norm_bound(kind):
    (x, ex), (g, eg) = vec(768, 5.0), nx.from_float(1 + 0.1 * RNG.normal(size=768))
    fx, fg = nx.to_float(x, ex), nx.to_float(g, eg)
    eps = 41943 * 2.0 ** -32
    if kind == "rms":
        ref = fx / np.sqrt(np.mean(fx * fx) + eps) * fg
    else:
        ref = (fx - fx.mean()) / np.sqrt(np.var(fx) + eps) * fg
    got = nx.to_float(*nx.norm(x, ex, g, eg, 41943, -32, kind))
    assert rel(got, ref) <= 2.0 ** -13


@pytest.mark.parametrize("func", ["silu", "gelu_erf", "gelu_tanh"])
def test_activation_bound(func):
    x, ex = nx.from_float(np.linspace(-20, 20, 4001))
    fx = nx.to_float(x, ex)
    gate = {"silu": lambda v: 1 / (1 + np.exp(-v)),
            "gelu_erf": lambda v: 0.5 * (1 + np.vectorize(math.erf)(v / math.sqrt(2))),
            "gelu_tanh": lambda v: 0.5 * (1 + np.tanh(math.sqrt(2 / math.pi) * (v + 0.044715 * v ** 3)))}[func]
    ref = fx * gate(fx)
    got = nx.to_float(*nx.act(x, ex, func))
    # absolute error relative to the input's peak: table interpolation plus 15-bit gate quantization
    assert float(np.max(np.abs(got - ref))) / 20 <= 2.0 ** -14


def test_norm_over_each_head():
    """head_dim splits an RMSNorm: each head normalized alone, one output exponent for all. Heads 3000x apart in
    scale each keep the precision of their own mantissas (they are shifted to full scale first), a zero head stays
    zero and does not set the shared exponent, and the last head may be shorter."""
    rng = np.random.default_rng(12)  # its own stream: the module's RNG feeds later tests as it did
    heads, hd = 4, 16
    scales = np.repeat([0.01, 1, 30, 0.5], hd)
    x, ex = nx.from_float(rng.normal(size=heads * hd) * scales)
    g, eg = nx.from_float(1 + 0.1 * rng.normal(size=heads * hd))
    eps = 41943 * 2.0 ** -32

    def ref(x, ex, hd):
        fx = nx.to_float(x, ex)
        out = [h / np.sqrt(np.mean(h * h) + eps) for h in np.split(fx, range(hd, fx.size, hd))]
        return np.concatenate(out) * nx.to_float(g, eg)[:fx.size]

    got = nx.to_float(*nx.norm(x, ex, g, eg, 41943, -32, "rms", hd))
    want = ref(x, ex, hd)
    assert np.max(np.abs(got - want)) <= 2.0 ** -13 * np.max(np.abs(want))
    # the smallest head (mantissas of a few bits) is normalized as well as the others, relative to its own values
    small = slice(0, hd)
    assert np.max(np.abs(got[small] - want[small])) <= 2.0 ** -13 * np.max(np.abs(want))
    # a zero head
    x0 = x.copy()
    x0[hd:2 * hd] = 0
    m0, e0 = nx.norm(x0, ex, g, eg, 41943, -32, "rms", hd)
    assert not np.any(m0[hd:2 * hd])
    assert np.max(np.abs(nx.to_float(m0, e0) - ref(x0, ex, hd))) <= 2.0 ** -13 * np.max(np.abs(want))
    # a last head of 8
    got = nx.to_float(*nx.norm(x[:56], ex, g[:56], eg, 41943, -32, "rms", hd))
    assert np.max(np.abs(got - ref(x[:56], ex, hd))) <= 2.0 ** -13 * np.max(np.abs(got))
    # all zero
    m, e = nx.norm(np.zeros(32, np.int64), ex, g[:32], eg, 41943, -32, "rms", hd)
    assert not np.any(m) and e == nx.EXP_MIN
    with pytest.raises(ValueError, match="RMSNorm"):
        nx.norm(x, ex, g, eg, 41943, -32, "layer", hd)


def test_relu_gate_is_exact_from_one_segment_on():
    """ReLU's step table is exact for inputs of at least one table segment (2**-5) in magnitude, and zero;
    the compiler scales ACT's input up (fused/act.py) so that every nonzero input is that large."""
    segment = 2 * nx.ACT_RANGE / nx.ACT_SEGMENTS
    for e in (-5, -2, 3, 10):  # the vector's exponent: its smallest nonzero magnitude is 2**e
        x = RNG.integers(-nx.MANT_MAX, nx.MANT_MAX + 1, 512)
        x[:3] = (0, 1, -1)
        assert 2.0 ** e >= segment
        assert np.array_equal(nx.to_float(*nx.act(x, e, "relu")), np.maximum(nx.to_float(x, e), 0))
    # below a segment the interpolation ramps: the reason for the compiler's scaling
    assert nx.to_float(*nx.act(np.array([1 << 14]), -21, "relu"))[0] < 2.0 ** -7


def test_exp_bound():
    d = -np.arange(0, 20 << 16, 997, dtype=np.int64)
    got = nx.exp2_neg_q15(d) / 32768
    assert float(np.max(np.abs(got - np.exp(d / 65536.0)))) <= 2.0 ** -14


def test_rope_bound():
    heads, hd = 4, 32
    x, ex = vec(heads * hd)
    ang = RNG.uniform(0, 6.28, hd // 2)
    (c, ec), (s, es) = nx.from_float(np.cos(ang)), nx.from_float(np.sin(ang))
    fx = nx.to_float(x, ex).reshape(heads, hd)
    fc, fs = nx.to_float(c, ec), nx.to_float(s, es)
    a, b = fx[:, : hd // 2], fx[:, hd // 2:]
    ref = np.concatenate([a * fc - b * fs, b * fc + a * fs], 1).reshape(-1)
    assert rel(nx.to_float(*nx.rope(x, ex, c, ec, s, es, heads, hd, "half")), ref) <= 2.0 ** -14


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(-(1 << 41), 1 << 41), st.integers(-80, 80)), min_size=1, max_size=20))
def test_attention_scores_are_exact_then_saturated(pairs):
    """Scores: the exact dot * 2**-s rounded half up (Python ints, no wrap), clipped to +-ATTN_SCORE_MAX; equal to
    round_shift wherever that neither wraps nor passes the clip."""
    dot = np.array([d for d, _ in pairs], np.int64)
    s = np.array([x for _, x in pairs], np.int64)
    top = nx.ATTN_SCORE_MAX
    exact = [d << -x if x <= 0 else (d + (1 << (x - 1))) >> x for d, x in pairs]
    assert nx.attention_scores(dot, s).tolist() == [max(-top, min(top, v)) for v in exact]


@pytest.mark.parametrize("length,tile", [(1, 8), (37, 8), (64, 64), (200, 16)])
def test_attention_bound(length, tile):
    hd = 32
    q, eq = vec(hd, 0.5)
    k = [nx.from_float(RNG.normal(0, 1.0, hd)) for _ in range(length)]
    v = [nx.from_float(RNG.normal(0, 1.0 + (j % 3), hd)) for j in range(length)]
    K, EK = np.stack([m for m, _ in k]), np.array([e for _, e in k])
    V, EV = np.stack([m for m, _ in v]), np.array([e for _, e in v])
    o, eo, m, l = nx.attention_head(q, eq, K, EK, V, EV, tile)
    fq = nx.to_float(q, eq)
    fk = K * 2.0 ** EK[:, None]
    fv = V * 2.0 ** EV[:, None]
    s = fk @ fq
    p = np.exp(s - s.max())
    ref = p @ fv / p.sum()
    got = o * 2.0 ** eo
    assert float(np.max(np.abs(got - ref)) / np.max(np.abs(fv))) <= 2.0 ** -12
    assert abs(m / 65536.0 - s.max()) <= 2.0 ** -15
    assert abs(l / 32768.0 - p.sum()) / p.sum() <= 2.0 ** -11


@pytest.mark.parametrize("fmt,bound", [("int8", 0.01), ("int4", 0.16), ("w16", 5e-5), ("uint4", 0.16)])
def test_weight_quantization_and_gemv_exact(fmt, bound):
    w = RNG.normal(0, 0.05, (64, 128))
    q, sm, sexp = nx.quantize_matrix(w, fmt, 32)
    deq = nx.dequantize_matrix(q, sm, sexp, 32, fmt)
    assert rel(deq, w) <= bound
    blob = nx.pack_rows(q, sm, fmt, 32, 32)
    q, sm = nx.effective_weights(q, sm, fmt, 32)
    q2, sm2 = nx.unpack_rows(blob, 64, 128, fmt, 32)
    assert (q2 == q).all() and (sm2 == sm).all()
    x, ex = vec(128)
    acc = nx.gemv_acc(q, sm, x, 32)
    # the accumulators are exact: equal to the float64 product of the quantized operands
    assert np.array_equal(acc * 2.0 ** (ex + sexp), deq @ nx.to_float(x, ex))


def test_mse_scales_beat_round_to_nearest_int4():
    w = RNG.standard_t(4, (128, 256)) * 0.02
    errs = {}
    for method in ("rtn", "mse"):
        q, sm, sexp = nx.quantize_matrix(w, "int4", 32, method)
        errs[method] = float(np.sum((nx.dequantize_matrix(q, sm, sexp, 32) - w) ** 2))
    assert errs["mse"] < errs["rtn"]


@pytest.mark.parametrize("method", ["rtn", "mse"])
def test_uint4_layout_and_error_bound(method):
    """uint4: nibbles in [0, 15], the zero point (8 below a negative peak, 7 below a positive one) in each header's
    top 4 bits, each group's peak exact to a scale ulp (round to nearest), every weight within a step plus 8
    scale ulps; a step of peak / 8 beats symmetric int4's peak / 7."""
    w = RNG.normal(0.03, 0.05, (64, 256)) + np.linspace(-0.04, 0.04, 64)[:, None]
    q, hdr, sexp = nx.quantize_matrix(w, "uint4", 32, method)
    assert q.min() >= 0 and q.max() <= 15 and hdr.max() < 1 << 16
    z, s = hdr >> nx.UINT4_SCALE_BITS, hdr & ((1 << nx.UINT4_SCALE_BITS) - 1)
    wg = w.reshape(64, -1, 32)
    assert set(np.unique(z)) == {7, 8} and np.array_equal(z == 7, wg.max(-1) >= -wg.min(-1))
    assert s.max() >= 1 << (nx.UINT4_SCALE_BITS - 1)
    deq = nx.dequantize_matrix(q, hdr, sexp, 32, "uint4")
    err = np.abs(deq - w).reshape(64, -1, 32)
    if method == "rtn":
        assert np.all(err.max(axis=-1) <= (s + 8) * 2.0 ** sexp)
        peak_at = np.abs(wg).argmax(axis=-1)[..., None]
        assert np.all(np.take_along_axis(err, peak_at, -1)[..., 0] <= 8 * 2.0 ** sexp)
    q4, sm4, sexp4 = nx.quantize_matrix(w, "int4", 32, method)
    assert rel(deq, w) < rel(nx.dequantize_matrix(q4, sm4, sexp4, 32), w)


def test_import_scales_round_given_scales():
    rng = np.random.default_rng(1)
    scales = rng.uniform(1e-3, 2e-2, (8, 4)).astype(np.float32)
    zp = rng.integers(0, 16, (8, 4))
    hdr, sexp = nx.import_scales(scales, zp, "uint4")
    assert np.array_equal(hdr >> nx.UINT4_SCALE_BITS, zp)
    s = (hdr & ((1 << nx.UINT4_SCALE_BITS) - 1)) * 2.0 ** sexp
    assert np.all(np.abs(s - scales) <= 2.0 ** (sexp - 1)) and s.max() * 2.0 ** -sexp >= 1 << (nx.UINT4_SCALE_BITS - 1)
    sm, sexp16 = nx.import_scales(scales, None, "int4")
    assert sexp16 == sexp - 4 and np.all(np.abs(sm * 2.0 ** sexp16 - scales) <= 2.0 ** (sexp16 - 1))
    with pytest.raises(nx.NumericsError, match="non-negative"):
        nx.import_scales(-scales, None, "int4")


@pytest.mark.parametrize("fmt,lo,hi", [("int8", -128, 128), ("int4", -8, 8), ("w16", -32768, 32768),
                                       ("uint4", 0, 16)])
@pytest.mark.parametrize("rows,cols,group,pb", [(37, 576, 32, 1024), (5, 64, 8, 64), (16, 256, 16, 64)])
def test_packed_rows_round_trip(fmt, lo, hi, rows, cols, group, pb):
    """pack_matrix(packed=True) holds exactly the codes and scales of the row records, in blocks of
    window // group rows: word j of a block holds group j of each of its rows, after its headers (window-major)."""
    rng = np.random.default_rng(7)
    q, sm = rng.integers(lo, hi, (rows, cols)), rng.integers(1, 1 << 16, (rows, cols // group))
    block, sb, ng = nx.packed_block(cols, fmt, group, pb)
    assert block == pb * 8 // nx.WEIGHT_FORMATS[fmt] // group and ng == cols // group
    blob = nx.pack_matrix(q, sm, fmt, group, pb, packed=True)
    assert len(blob) == nx.matrix_bytes(rows, cols, fmt, group, pb, packed=True) == -(-rows // block) * (sb + ng) * pb
    got = nx.unpack_matrix(blob, rows, cols, fmt, group, pb, packed=True)
    want = nx.unpack_rows(nx.pack_rows(q, sm, fmt, group, pb), rows, cols, fmt, group)
    assert all(np.array_equal(a, b) for a, b in zip(got, want, strict=True))
    raw = np.frombuffer(blob, np.uint8)
    # row 1's header of group 1, and row 1's group 1 in the block's word 1 (its second segment)
    assert int.from_bytes(raw[2 * (block + 1): 2 * (block + 2)].tobytes(), "little") == sm[1, 1]
    gbytes = pb // block
    seg = raw[(sb + 1) * pb + gbytes: (sb + 1) * pb + 2 * gbytes].tobytes()
    record = nx.pack_rows(q[1:2], sm[1:2], fmt, group, 1)
    assert seg == record[2 * ng + gbytes: 2 * ng + 2 * gbytes]


def test_groups_that_fill_a_window_do_not_pack():
    assert nx.packed_block(256, "int8", 64, 64) == (0, 0, 0)
    with pytest.raises(nx.NumericsError):
        nx.pack_matrix(np.zeros((2, 256)), np.ones((2, 4)), "int8", 64, 64, packed=True)
