"""Bit-exact reference arithmetic of the overlay.

Formats
-------
* **Activations (bfp16)**: a vector is int16 mantissas sharing one exponent,
  value = m * 2**e. Every result is renormalized so that its largest mantissa
  uses 15 magnitude bits (:func:`normalize`). Exponents live in [EXP_MIN, EXP_MAX];
  an all-zero vector carries EXP_MIN.
* **Weights**: int4, int8 or int16 integers; each group of ``group`` weights
  of a row shares an unsigned 16-bit scale mantissa, and a whole matrix shares
  one scale exponent ``sexp``: w = q * s_g * 2**sexp.
  ``uint4`` (asymmetric int4, as onnxruntime's MatMulNBits and GGUF's Q4_1
  store it) holds unsigned q in [0, 15] and a zero point z_g in [0, 15] per
  group: w = (q - z_g) * s_g * 2**sexp. Its group header is still one 16-bit
  word, the scale mantissa in bits [0, 12) and z_g in bits [12, 16)
  (:data:`UINT4_SCALE_BITS`), so a uint4 row record has the int4 geometry.
* **Accumulators**: int64, exact products and sums (GEMV never rounds).
* **Lookup tables**: activation gates and 2**-x are piecewise-linear tables
  over fixed-point inputs, with integer interpolation.

Rounding everywhere is *round half up* on two's complement (add half, then an
arithmetic shift right), which is one adder in hardware.

Everything here works on numpy int64 arrays and Python ints; floats appear
only where the host converts to and from the overlay's formats, and when the
lookup tables are built.
"""

from __future__ import annotations

import math

import numpy as np

from .config import WEIGHT_FORMATS

__all__ = [
    "ACC_MIN",
    "EXP_MAX",
    "EXP_MIN",
    "GATE_TABLES",
    "MANT_BITS",
    "MANT_MAX",
    "UINT4_SCALE_BITS",
    "NumericsError",
    "act",
    "align_sum",
    "argmax",
    "attention_scores",
    "dequantize_matrix",
    "effective_weights",
    "exp2_neg_q15",
    "from_float",
    "gemv_acc",
    "import_scales",
    "matrix_bytes",
    "norm",
    "normalize",
    "pack_matrix",
    "pack_rows",
    "packed_block",
    "quantize_matrix",
    "rope",
    "round_shift",
    "row_stride",
    "to_float",
    "unpack_matrix",
    "unpack_row",
    "vadd",
    "vmul",
    "vscale",
]

#: Mantissa magnitude bits of a bfp16 vector (plus sign).
MANT_BITS = 15
MANT_MAX = (1 << MANT_BITS) - 1
EXP_MIN, EXP_MAX = -512, 511
#: Guard bits kept when operands with different exponents are aligned.
ALIGN_GUARD = 16
#: Fixed-point fraction bits of activation-table inputs, and table geometry.
ACT_FRAC = 12
ACT_RANGE = 16  # tables cover [-ACT_RANGE, ACT_RANGE)
ACT_SEGMENTS = 1024
GATE_ONE = 1 << 15  # gate and probability values are Q1.15
#: Fraction bits of attention scores, and the 2**-x table size.
SCORE_FRAC = 16
EXP2_SEGMENTS = 256
LOG2E_Q16 = round(math.log2(math.e) * (1 << 16))
#: Bits of the scalar mantissa used for norm and softmax reciprocals.
SCALAR_BITS = 24


class NumericsError(ArithmeticError):
    """A value outside what the formats can represent."""


def _i64(x) -> np.ndarray:
    return np.asarray(x, dtype=np.int64)


def round_shift(x, s):
    """x * 2**-s, rounded half up; a negative *s* shifts left exactly.

    *s* may be an array (per element) or a scalar.
    """
    x = _i64(x)
    s = np.asarray(s, dtype=np.int64)
    if not s.shape and int(s) <= 0:
        return x << -int(s)
    sr = np.clip(s, 1, 63)
    right = (x + (np.int64(1) << (sr - 1))) >> sr
    if s.shape:
        left = x << np.clip(-s, 0, 62)
        return np.where(s > 0, right, left)
    return right


def bitlen(v: int) -> int:
    return int(v).bit_length()


def normalize(acc, e: int):
    """Renormalize wide integers with exponent *e* into (int16 mantissas, exponent)."""
    acc = _i64(acc)
    peak = int(np.max(np.abs(acc))) if acc.size else 0
    if peak == 0:
        return np.zeros(acc.shape, np.int64), EXP_MIN
    s = bitlen(peak) - MANT_BITS
    m = np.clip(round_shift(acc, s), -MANT_MAX, MANT_MAX)
    e = int(e) + s
    if e > EXP_MAX:
        raise NumericsError(f"exponent {e} overflows the bfp16 range [{EXP_MIN}, {EXP_MAX}]")
    if e < EXP_MIN:  # underflow: shift the mantissas down into range
        m, e = round_shift(m, EXP_MIN - e), EXP_MIN
    return m, e


def to_float(m, e) -> np.ndarray:
    return _i64(m).astype(np.float64) * (2.0 ** int(e))


def from_float(x):
    """Quantize a float vector to bfp16 (host side: round half to even)."""
    x = np.asarray(x, dtype=np.float64)
    peak = float(np.max(np.abs(x))) if x.size else 0.0
    if peak == 0.0 or not np.isfinite(peak):
        if not np.isfinite(peak):
            raise NumericsError("cannot quantize a vector holding inf or nan")
        return np.zeros(x.shape, np.int64), EXP_MIN
    e = math.frexp(peak)[1] - MANT_BITS
    m = np.rint(x * 2.0 ** -e)
    if np.max(np.abs(m)) > MANT_MAX:
        e += 1
        m = np.rint(x * 2.0 ** -e)
    if not EXP_MIN <= e <= EXP_MAX:
        raise NumericsError(f"exponent {e} outside [{EXP_MIN}, {EXP_MAX}]")
    return m.astype(np.int64), e


def vector_record_size(n: int) -> int:
    """Bytes of a vector record in external memory: n int16 LE mantissas, padding to 4, int32 LE exponent."""
    return ((2 * n + 3) & ~3) + 4


def pack_vector_record(m, e: int) -> bytes:
    """The external-memory form of a bfp16 vector, read by LOAD and written by STORE."""
    body = np.asarray(m, "<i2").tobytes()
    return body + b"\0" * (vector_record_size(len(m)) - 4 - len(body)) + np.array([e], "<i4").tobytes()


def unpack_vector_record(blob, n: int):
    m = np.frombuffer(blob, "<i2", count=n).astype(np.int64)
    e = int(np.frombuffer(blob, "<i4", count=1, offset=vector_record_size(n) - 4)[0])
    return m, e


def align_sum(terms):
    """Sum of (int array, exponent) terms, aligned to the largest exponent less
    ALIGN_GUARD bits; returns (wide int array, exponent) before normalization."""
    top = max(e for _, e in terms) - ALIGN_GUARD
    total = 0
    for v, e in terms:
        total = total + round_shift(v, top - e)
    return _i64(total), top


# ---------------------------------------------------------------- vector ops
def vadd(a, ea, b, eb):
    return normalize(*align_sum([(a, ea), (b, eb)]))


def vmul(a, ea, b, eb):
    return normalize(_i64(a) * _i64(b), ea + eb)


def vscale(a, ea, imm_m, imm_e):
    return normalize(_i64(a) * int(imm_m), ea + imm_e)


def scalar(v: int, e: int):
    """Round a non-negative integer v * 2**e to a SCALAR_BITS-bit mantissa."""
    v = int(v)
    if v <= 0:
        raise NumericsError(f"expected a positive scalar, got {v}")
    s = bitlen(v) - SCALAR_BITS
    return _round_shift_int(v, s), e + s


def _round_shift_int(v: int, s: int) -> int:
    """:func:`round_shift` on an unbounded Python int: the scalar path's sums may exceed 64 bits."""
    return (v + (1 << (s - 1))) >> s if s > 0 else v << -s


#: rsqrt takes ``isqrt(m << RSQRT_FRAC)`` and divides ``2**RSQRT_NUM`` by the root.
RSQRT_FRAC = 24
RSQRT_NUM = 48
#: norm aligns the mean square to exponent ``2 * ex - NORM_MS_FRAC`` and rounds ``c * r`` by NORM_Z_SHIFT bits.
NORM_MS_FRAC = 32
NORM_Z_SHIFT = 24


def rsqrt(v: int, e: int):
    """1/sqrt(v * 2**e) for v > 0 as (mantissa, exponent), by integer square root and division.

    The hardware runs the same digit-by-digit square root and restoring divider.
    """
    m, e = scalar(v, e)
    if e % 2:
        m, e = m << 1, e - 1
    root = math.isqrt(m << RSQRT_FRAC)  # sqrt(m) * 2**12, 24..25 bits
    r = (1 << RSQRT_NUM) // root
    return r, -e // 2 + RSQRT_FRAC // 2 - RSQRT_NUM


def norm(x, ex, g, eg, eps_m, eps_e, kind="rms", head_dim=0):
    """RMSNorm or LayerNorm (no bias) with gain g: x * rsqrt(mean(x^2) + eps) * g, over the whole vector (*head_dim*
    0), or an RMSNorm over each head of *head_dim* elements (:func:`norm_heads`)."""
    if head_dim:
        return norm_heads(x, ex, g, eg, eps_m, eps_e, kind, head_dim)
    x = _i64(x)
    n = x.size
    if kind == "rms":
        c, ec, scale_n = x, ex, 1
        ss = int(np.sum(x * x))  # value * 2**-2ex
    elif kind == "layer":
        c = x * n - int(np.sum(x))  # n * (x - mean)
        ec, scale_n = ex, n
        ss = int(np.sum(c * c)) // (n * n)  # sum of squared deviations, truncated
    else:
        raise ValueError(f"unknown norm kind {kind!r}")
    r, er = _norm_recip(ss, n, ex, eps_m, eps_e)  # 1/sqrt(var + eps)
    # c * r; for LayerNorm c carries a factor n, removed by a floor division
    z = round_shift((c * r) // scale_n, NORM_Z_SHIFT)
    ez = ec + er + NORM_Z_SHIFT
    return normalize(z * _i64(g), ez + eg)


def _norm_recip(ss: int, n: int, ex: int, eps_m: int, eps_e: int):
    """``rsqrt(mean square + eps)`` of *n* values with sum of squares *ss* (mantissas of exponent *ex*)."""
    # mean square as an integer with exponent 2*ex - 32, eps aligned to the same exponent
    base = 2 * ex - NORM_MS_FRAC
    ms = (ss << NORM_MS_FRAC) // n
    eps = _round_shift_int(int(eps_m), base - eps_e) if eps_m else 0  # exact: the hardware adds eps exactly
    total = ms + eps
    return rsqrt(total if total > 0 else 1, base)


def norm_heads(x, ex, g, eg, eps_m, eps_e, kind, head_dim):
    """An RMSNorm over each head of *head_dim* elements of x (the last head takes what is left), one output exponent.

    The vector's shared exponent leaves a head far below its peak only a few mantissa bits, so each head is first
    shifted left (exactly) by ``t >= 0`` bits until its peak takes at least MANT_BITS bits; its ``r = rsqrt(...)`` of exponent
    ``er`` then scales the shifted mantissas, whose exponent is ``ex - t``. The heads' products share the exponent
    ``ex + F``, F the largest ``er - t`` of a nonzero head: every other head's ``r`` is rounded right by
    ``F - (er - t)`` bits, a scalar shift per head (the products stay below 2**40 as over a whole vector).
    """
    if kind != "rms":
        raise ValueError(f"a norm over each head is an RMSNorm, got kind {kind!r}")
    if head_dim < 1:
        raise ValueError(f"head_dim={head_dim} must be positive")
    x = _i64(x)
    heads = []  # (shifted mantissas, r, er - t), r None for a zero head
    for lo in range(0, x.size, head_dim):
        h = x[lo:lo + head_dim]
        peak = int(np.max(np.abs(h)))
        if peak == 0:
            heads.append((h, None, 0))
            continue
        t = max(0, MANT_BITS - bitlen(peak))  # -2**15 already takes 16 bits
        h = h << t
        r, er = _norm_recip(int(np.sum(h * h)), h.size, ex - t, eps_m, eps_e)
        heads.append((h, r, er - t))
    f_max = max((f for _, r, f in heads if r is not None), default=0)
    z = np.concatenate([np.zeros(h.size, np.int64) if r is None else
                        round_shift(h * _round_shift_int(r, f_max - f), NORM_Z_SHIFT) for h, r, f in heads])
    return normalize(z * _i64(g), ex + f_max + NORM_Z_SHIFT + eg)


def _table(fn, lo, hi, segments, scale):
    xs = [lo + (hi - lo) * i / segments for i in range(segments + 1)]
    return np.array([round(fn(v) * scale) for v in xs], dtype=np.int64)


def _gelu_tanh_gate(v):
    return 0.5 * (1.0 + math.tanh(math.sqrt(2.0 / math.pi) * (v + 0.044715 * v ** 3)))


#: Gate tables g(x) in Q1.15 over [-ACT_RANGE, ACT_RANGE]; the activation is x * g(x).
GATE_TABLES = {
    "silu": _table(lambda v: 1.0 / (1.0 + math.exp(-v)), -ACT_RANGE, ACT_RANGE, ACT_SEGMENTS, GATE_ONE),
    "gelu_erf": _table(lambda v: 0.5 * (1.0 + math.erf(v / math.sqrt(2.0))), -ACT_RANGE, ACT_RANGE, ACT_SEGMENTS, GATE_ONE),
    "gelu_tanh": _table(_gelu_tanh_gate, -ACT_RANGE, ACT_RANGE, ACT_SEGMENTS, GATE_ONE),
    # ReLU's step: 0 up to x = 0, 1 from the next table point on. Exact for x <= 0 and x >= one segment
    # (2 * ACT_RANGE / ACT_SEGMENTS); between 0 and one segment the interpolation ramps.
    "relu": _table(lambda v: float(v > 0), -ACT_RANGE, ACT_RANGE, ACT_SEGMENTS, GATE_ONE),
}
_ACT_SHIFT = ACT_FRAC - int(math.log2(ACT_SEGMENTS // (2 * ACT_RANGE)))  # fraction bits below a segment


def lut_interp(table, idx, frac, frac_bits):
    t0 = table[idx]
    t1 = table[idx + 1]
    return t0 + round_shift((t1 - t0) * frac, frac_bits)


def act(x, ex, func):
    """x * gate(x), the gate read from a piecewise-linear Q1.15 table."""
    table = GATE_TABLES[func]
    x = _i64(x)
    xf = round_shift(x, -(ex + ACT_FRAC))  # x in Q.ACT_FRAC
    pos = np.clip(xf + (ACT_RANGE << ACT_FRAC), 0, (2 * ACT_RANGE << ACT_FRAC) - 1)
    gate = lut_interp(table, pos >> _ACT_SHIFT, pos & ((1 << _ACT_SHIFT) - 1), _ACT_SHIFT)
    gate = np.where(xf >= ACT_RANGE << ACT_FRAC, GATE_ONE, gate)
    return normalize(x * gate, ex - 15)


#: 2**-f for f in [0, 1] in Q1.15.
EXP2_TABLE = _table(lambda v: 2.0 ** -v, 0.0, 1.0, EXP2_SEGMENTS, GATE_ONE)
_EXP2_SHIFT = SCORE_FRAC - int(math.log2(EXP2_SEGMENTS))


def exp2_neg_q15(d):
    """exp(d) in Q1.15 for scores d <= 0 in Q.SCORE_FRAC (natural-log units)."""
    t = (-_i64(d) * LOG2E_Q16) >> 16  # -d * log2(e) in Q.16, truncated
    n = t >> SCORE_FRAC
    f = t & ((1 << SCORE_FRAC) - 1)
    p = lut_interp(EXP2_TABLE, f >> _EXP2_SHIFT, f & ((1 << _EXP2_SHIFT) - 1), _EXP2_SHIFT)
    return np.where(n >= 16, 0, round_shift(p, np.minimum(n, 16)))


def rope(x, ex, c, ec, s, es, heads, head_dim, mode):
    """Rotate each head's pairs: (a, b) -> (a*cos - b*sin, b*cos + a*sin)."""
    x = _i64(x).reshape(heads, head_dim)
    c, s = _i64(c), _i64(s)
    half = head_dim // 2
    if mode == "half":
        a, b = x[:, :half], x[:, half:]
    else:
        a, b = x[:, 0::2], x[:, 1::2]
    ya, ey = align_sum([(a * c, ex + ec), (-(b * s), ex + es)])
    yb, _ = align_sum([(b * c, ex + ec), (a * s, ex + es)])
    out = np.empty_like(x)
    if mode == "half":
        out[:, :half], out[:, half:] = ya, yb
    else:
        out[:, 0::2], out[:, 1::2] = ya, yb
    return normalize(out.reshape(-1), ey)


#: The least accumulator word (int64): where ARGMAXACC's running best starts (the ARGMAXACC unit's reset value).
ACC_MIN = -(1 << 63)


def argmax(x) -> int:
    """Index of the first largest element (ties go to the lowest index): ARGMAX over mantissas, ARGMAXACC over
    accumulator words."""
    return int(np.argmax(_i64(x)))


# ---------------------------------------------------------------- weights
#: Scale-mantissa bits of a uint4 group header; the zero point takes the 4 bits above.
UINT4_SCALE_BITS = 12
_UINT4_SCALE_MAX = (1 << UINT4_SCALE_BITS) - 1


def _qrange(fmt):
    if fmt == "uint4":
        return 0, 15
    bits = WEIGHT_FORMATS[fmt]
    return -(1 << (bits - 1)), (1 << (bits - 1)) - 1


def effective_weights(q, sm, fmt, group):
    """The signed weights and scale mantissas that the GEMV engine multiplies: ``(q, sm)`` unchanged, except
    uint4, whose stored nibbles and group headers become ``(q - z_g, s_g)``."""
    q, sm = _i64(q), _i64(sm)
    if fmt != "uint4":
        return q, sm
    z = sm >> UINT4_SCALE_BITS
    rows = q.shape[0]
    return (q.reshape(rows, -1, group) - z[..., None]).reshape(q.shape), sm & _UINT4_SCALE_MAX


#: Clipping ratios the ``mse`` scale search tries (1.0 is round-to-nearest, always a candidate).
CLIP_RATIOS = np.linspace(0.5, 0.98, 13, dtype=np.float32)


def scale_exponent(peak: float, fmt) -> int:
    """The matrix-wide scale exponent for weights whose largest magnitude is *peak*.

    uint4 puts each group's peak on level 8 (:func:`_quantize_uint4`), in a UINT4_SCALE_BITS-bit mantissa.
    """
    if fmt == "uint4":
        top, bits = peak / 8, UINT4_SCALE_BITS
    else:
        top, bits = peak / _qrange(fmt)[1], 16
    sexp = (math.frexp(top)[1] - bits) if top > 0 else -64
    return max(-64, min(63, sexp))


def import_scales(scales, zero_points, fmt):
    """Group headers and the scale exponent for given float *scales* [rows, groups] (a pre-quantized model's) and,
    for uint4, integer *zero_points*: the exponent gives the largest scale a full mantissa, every scale is
    rounded to nearest at it, and uint4 puts the zero point in the top 4 bits. Returns (headers, sexp)."""
    scales = np.asarray(scales, np.float64)
    bits = UINT4_SCALE_BITS if fmt == "uint4" else 16
    top = float(np.max(scales)) if scales.size else 0.0
    sexp = max(-64, min(63, (math.frexp(top)[1] - bits) if top > 0 else -64))
    sm = np.rint(scales * 2.0 ** -sexp).astype(np.int64)
    if np.any(sm < 0) or np.any(sm >= 1 << bits):
        raise NumericsError(f"{fmt} scales must be non-negative and below 2**{bits + sexp}")
    if fmt == "uint4":
        sm |= _i64(zero_points) << UINT4_SCALE_BITS
    return sm, sexp


def _quantize_uint4(wg, sexp, method, h):
    """uint4 (q, headers) of groups *wg* [rows, groups, group] on the signed grid: each group's largest magnitude
    on level 8 of its own side (zero point 8 for a negative peak, 7 for a positive one) with the scale peak / 8,
    as onnxruntime's symmetric MatMulNBits quantizer (whose negative scales the zero point replaces): a step
    of 1/8 of the peak where int4 takes 1/7. ``mse`` also tries the peak shrunk by each of CLIP_RATIOS and keeps,
    per group, the one of least *h*-weighted squared error.

    The range grid of onnxruntime's asymmetric quantizer (min to max in 15 steps) and a per-group choice between
    the two grids gave smaller weight errors but larger NLL on a trained model (docs/numerics.md), so neither is
    a candidate.
    """
    hi = np.max(wg, axis=-1)
    lo = np.min(wg, axis=-1)
    peak_pos = hi >= -lo
    peak = np.where(peak_pos, hi, -lo)
    z = np.where(peak_pos, 7, 8)
    unit = 2.0 ** -sexp

    def quant(ratio):
        sm = np.clip(np.rint(peak * ratio / 8 * unit), 1, _UINT4_SCALE_MAX)
        s = sm / unit
        q = np.clip(np.rint(wg / s[..., None]) + z[..., None], 0, 15)
        # the error only ranks the mse search's candidates: rtn skips a pass over every weight
        err = np.sum(h * ((q - z[..., None]) * s[..., None] - wg) ** 2, axis=-1) if method == "mse" else None
        return q, sm.astype(np.int64) | (z.astype(np.int64) << UINT4_SCALE_BITS), err

    q, hdr, err = quant(1.0)
    if method == "mse":
        for ratio in CLIP_RATIOS:
            q2, hdr2, err2 = quant(float(ratio))
            better = err2 < err
            q[better], hdr[better], err[better] = q2[better], hdr2[better], err2[better]
    return q, hdr


def quantize_matrix(w, fmt, group, method="rtn", samples=None, sexp=None):
    """Quantize a float matrix [rows, cols] to (q, scale mantissas [rows, groups], sexp).

    ``rtn`` takes each group's scale from its largest magnitude. ``mse`` searches
    clipping ratios per group and keeps the one with the least squared error
    after quantization with the rounded scale. With *samples* (input vectors
    [n, cols] the matrix will multiply, from calibration), the error of each
    weight is weighted by the mean square of its input, and each row then keeps
    whichever of the searched and the round-to-nearest scales gives the smaller
    output error on the samples, so ``mse`` never does worse than ``rtn`` there.
    *sexp* fixes the scale exponent (:func:`scale_exponent` of the whole matrix), so that a large matrix
    can be quantized a block of rows at a time with the same result.
    """
    if method not in ("rtn", "mse"):
        raise ValueError(f"unknown quantization method {method!r}")
    w = np.asarray(w, dtype=np.float64)
    rows, cols = w.shape
    if cols % group:
        raise NumericsError(f"{cols} columns are not a multiple of the group size {group}")
    lo, hi = _qrange(fmt)
    wg = w.reshape(rows, cols // group, group)
    peak = np.max(np.abs(wg), axis=-1)
    ideal = peak / hi
    if sexp is None:
        sexp = scale_exponent(float(np.max(peak)) if peak.size else 0.0, fmt)

    def quant(scale_f):
        sm = np.clip(np.rint(scale_f * 2.0 ** -sexp), 1, 65535)
        s = sm * 2.0 ** sexp
        q = np.clip(np.rint(wg / s[..., None]), lo, hi)
        return q, sm, s

    if samples is None:
        h = np.ones((cols // group, group))
    else:
        samples = np.asarray(samples, dtype=np.float64).reshape(-1, cols)
        h = (np.mean(samples ** 2, axis=0) + 1e-30).reshape(cols // group, group)
    if fmt == "uint4":
        q, sm = _quantize_uint4(wg, sexp, method, h)
        if samples is not None and method == "mse":
            rq, rsm = _quantize_uint4(wg, sexp, "rtn", h)
            worse = _output_error(q, sm, fmt, sexp, w, samples) > _output_error(rq, rsm, fmt, sexp, w, samples)
            q[worse], sm[worse] = rq[worse], rsm[worse]
        return q.reshape(rows, cols).astype(np.int64), sm, sexp
    q, sm, _ = quant(ideal)
    rtn = (q.copy(), sm.copy())
    if method == "mse":
        # The search only picks scale mantissas. For int4, whose rounding errors dwarf float32's, float32
        # halves its memory traffic; the weights are then rounded once more in float64 with the chosen scales.
        ft = np.float32 if fmt == "int4" else np.float64
        unit = 2.0 ** -sexp
        wgs, hs = (wg * unit).astype(ft), h.astype(ft)
        ideal_s = (ideal * unit).astype(ft)
        best_sm = sm.astype(ft)
        best_err = np.sum(hs * (np.clip(np.rint(wgs / best_sm[..., None]), lo, hi) * best_sm[..., None] - wgs) ** 2, axis=-1)
        for ratio in CLIP_RATIOS.astype(ft):
            sm2 = np.clip(np.rint(ideal_s * ratio), 1, 65535)
            err = np.sum(hs * (np.clip(np.rint(wgs / sm2[..., None]), lo, hi) * sm2[..., None] - wgs) ** 2, axis=-1)
            better = err < best_err
            best_sm[better], best_err[better] = sm2[better], err[better]
        sm = best_sm.astype(np.float64)
        q = np.clip(np.rint(wg / (sm * 2.0 ** sexp)[..., None]), lo, hi)
        if samples is not None:
            worse = _output_error(q, sm, fmt, sexp, w, samples) > _output_error(*rtn, fmt, sexp, w, samples)
            q[worse], sm[worse] = rtn[0][worse], rtn[1][worse]
    return q.reshape(rows, cols).astype(np.int64), sm.astype(np.int64), sexp


def _output_error(q, sm, fmt, sexp, w, samples):
    """Per row: the squared error, on the calibration *samples*, of quantized groups (q [rows, groups, group] and
    scales, or uint4 nibbles and headers) against the float matrix *w*."""
    rows, ng, group = q.shape
    qe, se = effective_weights(q.reshape(rows, -1), sm, fmt, group)
    deq = (qe.reshape(rows, ng, group) * se[..., None]).reshape(rows, -1) * 2.0 ** sexp
    return np.sum(((deq - w) @ samples.T) ** 2, axis=1)


def dequantize_matrix(q, sm, sexp, group, fmt="int4"):
    """Float weights of a quantized matrix (*fmt* matters only for uint4, whose q and sm are nibbles and headers)."""
    q, sm = effective_weights(q, sm, fmt, group)
    return (q.reshape(q.shape[0], -1, group) * sm[..., None]).reshape(q.shape).astype(np.float64) * 2.0 ** sexp


def row_stride(cols, fmt, group, align):
    """Bytes per row record: group scales (uint16) then packed weights, padded to *align*."""
    raw = (cols // group) * 2 + cols * WEIGHT_FORMATS[fmt] // 8
    return -(-raw // align) * align


def pack_rows(q, sm, fmt, group, align) -> bytes:
    """Lay a quantized matrix out as row records (see :func:`row_stride`)."""
    q = _i64(q)
    rows, cols = q.shape
    stride = row_stride(cols, fmt, group, align)
    out = np.zeros((rows, stride), np.uint8)
    scales = np.ascontiguousarray(sm, dtype="<u2").view(np.uint8).reshape(rows, -1)
    out[:, : scales.shape[1]] = scales
    off = scales.shape[1]
    packed = _weight_bytes(q, fmt)
    out[:, off: off + packed.shape[1]] = packed
    return out.tobytes()


def packed_block(cols, fmt, group, port_bytes) -> tuple[int, int, int]:
    """``(rows, scale_beats, weight_beats)`` of one block of packed rows, or ``(0, 0, 0)`` where a group of
    *group* weights fills a window (one port word of *fmt* weights) and rows cannot pack.

    Packed rows (GEMV ``packed=1``) come in blocks of ``rows = window // group`` rows (one group per row in
    each beat). A block's group scales come first, window-major: the header of row ``s`` of the block and group
    ``j`` at byte ``2 * (j * rows + s)``, padded to ``scale_beats`` port words. Then ``weight_beats`` (one per
    group) words: word ``j`` holds group ``j`` of each row of the block in turn, each packed as in a row
    record. Rows past the matrix's last in its last block are zero. So a beat never holds padding but at the end
    of the scales and in a last block that is not full, and the engine scales each group of a window by the
    window's next header, as it does for groups narrower than a window (hw/gemv.py).
    """
    window = port_bytes * 8 // WEIGHT_FORMATS[fmt]
    if group >= window:
        return 0, 0, 0
    rows, groups = window // group, cols // group
    return rows, -(-groups * rows * 2 // port_bytes), groups


def matrix_bytes(rows, cols, fmt, group, port_bytes, packed=False) -> int:
    """Bytes that *rows* rows of a matrix take from its first row on: row records (:func:`row_stride`), or with
    *packed* whole blocks (:func:`packed_block`)."""
    if not packed:
        return rows * row_stride(cols, fmt, group, port_bytes)
    block, sb, wb = packed_block(cols, fmt, group, port_bytes)
    return -(-rows // block) * (sb + wb) * port_bytes


def _weight_bytes(q, fmt) -> np.ndarray:
    """[rows, weight bytes] of *q* as a row record lays its weights out."""
    if WEIGHT_FORMATS[fmt] == 4:
        nib = (q & 0xF).astype(np.uint8)
        return nib[:, 0::2] | (nib[:, 1::2] << 4)
    if fmt == "int8":
        return q.astype(np.int8).view(np.uint8)
    return q.astype("<i2").view(np.uint8).reshape(q.shape[0], -1)


def pack_matrix(q, sm, fmt, group, port_bytes, packed=False) -> bytes:
    """Lay a quantized matrix out as row records (:func:`pack_rows` at ``align=port_bytes``) or, with *packed*, as
    blocks of packed rows (:func:`packed_block`)."""
    if not packed:
        return pack_rows(q, sm, fmt, group, port_bytes)
    q = _i64(q)
    rows, cols = q.shape
    block, sb, ng = packed_block(cols, fmt, group, port_bytes)
    if not block:
        raise NumericsError(f"rows of {fmt} groups of {group} do not pack on a {port_bytes}-byte port")
    nb = -(-rows // block)
    w = np.zeros((nb * block, ng * port_bytes // block), np.uint8)
    w[:rows] = _weight_bytes(q, fmt)
    s = np.zeros((nb * block, ng), "<u2")
    s[:rows] = sm
    out = np.zeros((nb, sb + ng, port_bytes), np.uint8)
    heads = s.reshape(nb, block, ng).transpose(0, 2, 1).reshape(nb, -1).view(np.uint8)
    out.reshape(nb, -1)[:, :heads.shape[1]] = heads
    out[:, sb:] = w.reshape(nb, block, ng, -1).transpose(0, 2, 1, 3).reshape(nb, ng, port_bytes)
    return out.tobytes()


def unpack_matrix(blob, rows, cols, fmt, group, port_bytes, packed=False):
    """Inverse of :func:`pack_matrix`: ``(q, sm)`` as the engine multiplies them (see :func:`unpack_rows`)."""
    if not packed:
        return unpack_rows(blob[:matrix_bytes(rows, cols, fmt, group, port_bytes)], rows, cols, fmt, group)
    block, sb, ng = packed_block(cols, fmt, group, port_bytes)
    if not block:
        raise NumericsError(f"rows of {fmt} groups of {group} do not pack on a {port_bytes}-byte port")
    nb = -(-rows // block)
    raw = np.frombuffer(blob, np.uint8)[:nb * (sb + ng) * port_bytes].reshape(nb, sb + ng, port_bytes)
    heads = raw.reshape(nb, -1)[:, :2 * ng * block].copy().view("<u2").reshape(nb, ng, block)
    sm = heads.transpose(0, 2, 1).reshape(nb * block, ng)[:rows]
    w = raw[:, sb:].reshape(nb, ng, block, -1).transpose(0, 2, 1, 3).reshape(nb * block, -1)[:rows]
    records = np.concatenate([np.ascontiguousarray(sm, "<u2").view(np.uint8).reshape(rows, -1), w], axis=1)
    return unpack_rows(np.ascontiguousarray(records).tobytes(), rows, cols, fmt, group)


def unpack_rows(blob, rows, cols, fmt, group):
    """Inverse of :func:`pack_rows` for *rows* consecutive records: (q, sm) as the engine multiplies them
    (:func:`effective_weights`: for uint4, q - z and the scale mantissas)."""
    ng = cols // group
    wbytes = cols * WEIGHT_FORMATS[fmt] // 8
    stride = len(blob) // rows
    raw = np.frombuffer(blob, np.uint8).reshape(rows, stride)
    sm = raw[:, : 2 * ng].copy().view("<u2").astype(np.int64)
    data = raw[:, 2 * ng: 2 * ng + wbytes]
    if WEIGHT_FORMATS[fmt] == 4:
        lo = (data & 0xF).astype(np.int64)
        hi = (data >> 4).astype(np.int64)
        q = np.empty((rows, cols), np.int64)
        q[:, 0::2], q[:, 1::2] = lo, hi
        if fmt == "uint4":
            return effective_weights(q, sm, fmt, group)
        q = np.where(q >= 8, q - 16, q)
    elif fmt == "int8":
        q = data.copy().view(np.int8).astype(np.int64)
    else:
        q = data.copy().view("<i2").astype(np.int64)
    return q, sm


def unpack_row(blob, cols, fmt, group):
    q, sm = unpack_rows(blob, 1, cols, fmt, group)
    return q[0], sm[0]


def gemv_acc(q, sm, x, group):
    """Exact int64 accumulators sum_g s_g * sum_{k in g} q[r, k] x[k].

    Group partial sums stay below 2**53, so a float64 matrix product computes
    them exactly; the scale products are taken in int64.
    """
    rows, cols = q.shape
    ng = cols // group
    qf = q.reshape(rows, ng, group).astype(np.float64)
    xf = _i64(x).reshape(ng, group).astype(np.float64)
    partial = np.einsum("rgk,gk->rg", qf, xf).astype(np.int64)
    return np.sum(partial * sm, axis=1)


# ---------------------------------------------------------------- attention
#: The head accumulator is rounded to at most ATTN_ACC_BITS magnitude bits before it is multiplied by the softmax
#: reciprocal ``(1 << ATTN_RECIP_BITS) // l``.
ATTN_ACC_BITS = 31
ATTN_RECIP_BITS = 40
#: Scores saturate at +-(2**ATTN_SCORE_BITS - 1) in Q.SCORE_FRAC, i.e. +-2**24 natural-log units, far beyond any
#: logit a float16 model can carry (65504). Left-shifted scores (q and k exponents summing above -SCORE_FRAC) could
#: otherwise wrap int64, and everything after them (the differences to the max, 2**-x of those, the sum and the
#: accumulator) would wrap with them; saturated, every later quantity has a bound that follows from the config
#: alone (hw/attention.py derives its datapath widths from it).
ATTN_SCORE_BITS = 40
ATTN_SCORE_MAX = (1 << ATTN_SCORE_BITS) - 1


def attention_scores(dot, s):
    """Scores ``dot * 2**-s`` rounded half up (as :func:`round_shift`), computed without wrapping and saturated at
    +-ATTN_SCORE_MAX. *dot* is the exact int64 dot product, *s* the per-position shift."""
    dot = _i64(dot)
    s = np.asarray(s, dtype=np.int64)
    ls = np.clip(-s, 0, ATTN_SCORE_BITS + 1)
    limit = np.int64(ATTN_SCORE_MAX) >> ls  # |dot| beyond this saturates once shifted left by ls
    left = np.clip(dot, -limit, limit) << ls
    left = np.where(dot > limit, ATTN_SCORE_MAX, np.where(dot < -limit, -ATTN_SCORE_MAX, left))
    right = np.clip(round_shift(dot, np.maximum(s, 1)), -ATTN_SCORE_MAX, ATTN_SCORE_MAX)
    return np.where(s > 0, right, left)


def attention_head(q, eq, k, ek, v, ev, tile):
    """One query head over keys k [L, d] and values v [L, d] with per-token exponents.

    Scores are exact dot products rounded to Q.SCORE_FRAC and saturated (:func:`attention_scores`). Softmax runs online,
    *tile* positions at a time: a running max m (Q.SCORE_FRAC), a running sum l
    (Q1.15 units) and a running accumulator rescaled by exp(m_old - m_new)
    whenever the max grows. Returns (wide output, exponent, m, l).
    """
    q, k, v = _i64(q), _i64(k), _i64(v)
    ek, ev = _i64(ek), _i64(ev)
    L = k.shape[0]
    if L < 1:
        raise NumericsError("attention over zero KV positions")
    scores = attention_scores(k @ q, -(eq + ek + SCORE_FRAC))
    m = l = None
    acc, ea = np.zeros(q.shape, np.int64), None
    for lo in range(0, L, tile):
        s, vt, evt = scores[lo: lo + tile], v[lo: lo + tile], ev[lo: lo + tile]
        m_new = int(s.max()) if m is None else max(m, int(s.max()))
        p = exp2_neg_q15(s - m_new)
        e_new = int(evt.max()) if ea is None else max(ea, int(evt.max()))
        if m is None:
            l = 0
        else:
            alpha = int(exp2_neg_q15(np.int64(m - m_new)))
            l = int(round_shift(l * alpha, 15))
            acc = round_shift(round_shift(acc * alpha, 15), e_new - ea)
        l += int(p.sum())
        acc = acc + np.sum(round_shift(p[:, None] * vt, (e_new - evt)[:, None]), axis=0)
        m, ea = m_new, e_new
    s = max(0, bitlen(int(np.max(np.abs(acc)))) - ATTN_ACC_BITS)
    acc = round_shift(acc, s)
    recip = (1 << ATTN_RECIP_BITS) // l
    return acc * recip, ea + s - ATTN_RECIP_BITS, m, l


def attention(q, eq, kv_k, kv_ek, kv_v, kv_ev, q_heads, kv_heads, head_dim, tile):
    """All query heads (grouped-query mapping) into one bfp16 vector, plus (m, l) per head."""
    if q_heads % kv_heads:
        raise NumericsError(f"{q_heads} query heads do not divide into {kv_heads} KV heads")
    group = q_heads // kv_heads
    q = _i64(q).reshape(q_heads, head_dim)
    outs, stats = [], []
    for h in range(q_heads):
        kvh = h // group
        o, eo, m, l = attention_head(q[h], eq, kv_k[kvh], kv_ek[kvh], kv_v[kvh], kv_ev[kvh], tile)
        outs.append((o, eo))
        stats += [m, l]
    top = max(e for _, e in outs)
    wide = np.concatenate([round_shift(o, top - e) for o, e in outs])
    mm, e = normalize(wide, top)
    return mm, e, stats
