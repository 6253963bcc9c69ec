"""The ONNX op library: numpy semantics of every supported op, keyed by (op type, first opset).

Constant folding (``passes.fold_constants``), the IR interpreter (``interp.py``) and fusion's region
probes (``graph_tools``) evaluate nodes through :func:`evaluate`; ``lower`` accepts exactly the ops
registered here.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable

import numpy as np
from onnx import helper

from .frontend import CompileError
from .ir import Node

__all__ = ["attention_bias", "evaluate", "lookup", "np_dtype", "register", "supported_ops"]

# op type -> list of (since, fn), sorted by since
_REGISTRY: dict[str, list[tuple[int, Callable]]] = {}


def register(op: str, since: int = 1, *, n_outputs: bool = False):
    """Register *fn(attrs, *inputs) -> array | tuple of arrays* for *op* from opset *since* on.

    With *n_outputs*, *fn* also gets ``n_outputs=`` (how many outputs the node declares),
    for ops such as Split whose result count is not implied by their inputs.
    """
    def deco(fn):
        fn.wants_n_outputs = n_outputs
        _REGISTRY.setdefault(op, []).append((since, fn))
        _REGISTRY[op].sort(key=lambda e: e[0])
        return fn
    return deco


def lookup(op: str, opset: int) -> Callable | None:
    best = None
    for since, fn in _REGISTRY.get(op, []):
        if since <= opset:
            best = fn
    return best


def supported_ops(opset: int) -> list[str]:
    return sorted(op for op in _REGISTRY if lookup(op, opset) is not None)


def evaluate(node: Node, opset: int, args: list[np.ndarray | None]) -> list[np.ndarray]:
    fn = lookup(node.op, opset)
    if fn is None:
        raise CompileError(f"node {node.name}: op {node.op} (opset {opset}) is not supported")
    res = fn(node.attrs, *args, **({"n_outputs": len(node.outputs)} if fn.wants_n_outputs else {}))
    res = res if isinstance(res, tuple) else (res,)
    return [np.asarray(r) for r in res]


# ---------------------------------------------------------------- op semantics
def np_dtype(onnx_type: int) -> np.dtype:
    """The numpy dtype of an ONNX ``TensorProto`` element type."""
    return np.dtype(helper.tensor_dtype_to_np_dtype(onnx_type))


def _axes(a):
    return None if a is None else tuple(int(x) for x in np.asarray(a).reshape(-1))


def _binary(f):
    return lambda attrs, a, b: np.asarray(f(a, b))


for _op, _f in {"Add": np.add, "Sub": np.subtract, "Mul": np.multiply, "Equal": np.equal, "Less": np.less,
                "Greater": np.greater, "LessOrEqual": np.less_equal, "GreaterOrEqual": np.greater_equal,
                "And": np.logical_and, "Or": np.logical_or, "MatMul": np.matmul}.items():
    register(_op, since=1)(_binary(_f))


@register("Div", since=1)
def _div(attrs, a, b):
    if np.issubdtype(a.dtype, np.integer):
        return np.trunc(a / b).astype(a.dtype)
    return np.asarray(a / b, dtype=np.result_type(a, b))


@register("Pow", since=1)
def _pow(attrs, a, b):
    return np.power(a, b).astype(a.dtype)


for _op, _f in {"Neg": np.negative, "Sqrt": np.sqrt, "Not": np.logical_not, "Exp": np.exp, "Tanh": np.tanh,
                "Reciprocal": np.reciprocal, "Abs": np.abs, "Cos": np.cos, "Sin": np.sin, "IsNaN": np.isnan,
                "Log": np.log, "Floor": np.floor, "Ceil": np.ceil}.items():
    register(_op, since=1)(lambda attrs, x, _f=_f: _f(x))


@register("Relu", since=6)
def _relu(attrs, x):
    return np.maximum(x, np.zeros((), x.dtype))


@register("Identity", since=1)
def _identity(attrs, x):
    return x


@register("Sigmoid", since=1)
def _sigmoid(attrs, x):
    return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)


@register("Softmax", since=13)
def _softmax(attrs, x):
    ax = attrs.get("axis", -1)
    e = np.exp(x - np.max(x, axis=ax, keepdims=True))
    return (e / np.sum(e, axis=ax, keepdims=True)).astype(x.dtype)


def _reduce_mean(x, axes, attrs):
    if not axes:  # absent or empty: every axis, unless noop_with_empty_axes
        if attrs.get("noop_with_empty_axes", 0):
            return x
        axes = None
    return np.mean(x, axis=axes, keepdims=bool(attrs.get("keepdims", 1))).astype(x.dtype)


@register("ReduceMean", since=1)
def _reduce_mean_attr(attrs, x):
    return _reduce_mean(x, _axes(attrs.get("axes")), attrs)


@register("ReduceMean", since=18)
def _reduce_mean_input(attrs, x, axes=None):
    return _reduce_mean(x, _axes(axes), attrs)


@register("Constant", since=1)
def _constant(attrs):
    if "value" in attrs:
        return attrs["value"]
    for key, dt in (("value_float", np.float32), ("value_floats", np.float32), ("value_int", np.int64),
                    ("value_ints", np.int64)):
        if key in attrs:
            return np.asarray(attrs[key], dt)
    raise CompileError(f"Constant with attributes {sorted(attrs)} is not supported")


@register("Shape", since=1)
def _shape(attrs, x):
    shp = np.asarray(x.shape, np.int64)
    return shp[attrs.get("start", 0):attrs.get("end", len(shp))]


@register("Gather", since=1)
def _gather(attrs, data, idx):
    return np.take(data, idx.astype(np.int64), axis=attrs.get("axis", 0))


def _unsqueeze(x, axes):
    out_rank = x.ndim + len(axes)
    for a in sorted(a % out_rank for a in axes):
        x = np.expand_dims(x, a)
    return x


@register("Unsqueeze", since=1)
def _unsqueeze_attr(attrs, x):
    return _unsqueeze(x, _axes(attrs["axes"]))


@register("Unsqueeze", since=13)
def _unsqueeze_input(attrs, x, axes):
    return _unsqueeze(x, _axes(axes))


@register("Squeeze", since=1)
def _squeeze_attr(attrs, x):
    return np.squeeze(x, axis=_axes(attrs.get("axes")))


@register("Squeeze", since=13)
def _squeeze_input(attrs, x, axes=None):
    return np.squeeze(x, axis=_axes(axes))


@register("Concat", since=1)
def _concat(attrs, *xs):
    return np.concatenate(xs, axis=attrs["axis"])


@register("Slice", since=10)
def _slice(attrs, x, starts, ends, axes=None, steps=None):
    starts, ends = _axes(starts), _axes(ends)
    axes = range(len(starts)) if axes is None else _axes(axes)
    steps = [1] * len(starts) if steps is None else _axes(steps)
    idx = [slice(None)] * x.ndim
    for s, e, a, st in zip(starts, ends, axes, steps, strict=True):
        idx[a] = slice(s, e, st)
    return x[tuple(idx)]


@register("Range", since=11)
def _range(attrs, start, limit, delta):
    return np.arange(start, limit, delta, dtype=start.dtype)


@register("Where", since=9)
def _where(attrs, c, a, b):
    return np.where(c, a, b)


@register("Expand", since=8)
def _expand(attrs, x, shape):
    return np.array(np.broadcast_to(x, np.broadcast_shapes(x.shape, tuple(int(d) for d in shape))))


@register("ConstantOfShape", since=9)
def _constant_of_shape(attrs, shape):
    v = attrs.get("value", np.zeros(1, np.float32))
    return np.full(tuple(int(d) for d in shape), v.reshape(-1)[0], dtype=v.dtype)


@register("Cast", since=6)
def _cast(attrs, x):
    return x.astype(np_dtype(attrs["to"]))


@register("Reshape", since=5)
def _reshape(attrs, x, shape):
    shape = [int(d) for d in shape]
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


@register("Transpose", since=1)
def _transpose(attrs, x):
    return np.transpose(x, attrs.get("perm"))


for _op, _f in {"Max": np.maximum, "Min": np.minimum, "Sum": np.add}.items():
    register(_op, since=8)(lambda attrs, *xs, _f=_f: functools.reduce(_f, xs))


@register("Erf", since=9)
def _erf(attrs, x):
    return np.vectorize(math.erf, otypes=[x.dtype])(x)


@register("Gelu", since=20)
def _gelu(attrs, x):
    if attrs.get("approximate", "none") == "tanh":
        return (0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x ** 3)))).astype(x.dtype)
    return (0.5 * x * (1 + _erf({}, x / np.sqrt(2)))).astype(x.dtype)


@register("Mod", since=10)
def _mod(attrs, a, b):
    return (np.fmod if attrs.get("fmod", 0) else np.mod)(a, b)


@register("Clip", since=11)
def _clip(attrs, x, lo=None, hi=None):
    if lo is not None:
        x = np.maximum(x, lo)
    return x if hi is None else np.minimum(x, hi)


@register("Flatten", since=1)
def _flatten(attrs, x):
    ax = attrs.get("axis", 1)
    ax = ax + x.ndim if ax < 0 else ax
    return x.reshape(int(np.prod(x.shape[:ax])), int(np.prod(x.shape[ax:])))


@register("Tile", since=6)
def _tile(attrs, x, repeats):
    return np.tile(x, _axes(repeats))


@register("Trilu", since=14)
def _trilu(attrs, x, k=None):
    k = 0 if k is None else int(k)
    return np.triu(x, k) if attrs.get("upper", 1) else np.tril(x, k)


@register("ScatterND", since=11)
def _scatter_nd(attrs, data, indices, updates):
    combine = {"none": None, "add": np.add, "mul": np.multiply, "max": np.maximum, "min": np.minimum}
    red = attrs.get("reduction", "none")
    if red not in combine:
        raise CompileError(f"ScatterND reduction={red!r} is not supported")
    out = data.copy()
    idx = indices.reshape(-1, indices.shape[-1])
    upd = updates.reshape(idx.shape[0], *updates.shape[indices.ndim - 1:])
    for i, u in zip(idx, upd, strict=True):
        key = tuple(int(j) for j in i)
        out[key] = u if combine[red] is None else combine[red](out[key], u)
    return out


@register("Gemm", since=11)
def _gemm(attrs, a, b, c=None):
    a = a.T if attrs.get("transA", 0) else a
    b = b.T if attrs.get("transB", 0) else b
    y = attrs.get("alpha", 1.0) * (a @ b)
    if c is not None:
        y = y + attrs.get("beta", 1.0) * c
    return y.astype(a.dtype)


def _reduce_with(f):
    def run(x, axes, attrs):
        if not axes:  # absent or empty: every axis, unless noop_with_empty_axes
            if attrs.get("noop_with_empty_axes", 0):
                return x
            axes = None
        return np.asarray(f(x, axis=axes, keepdims=bool(attrs.get("keepdims", 1)))).astype(x.dtype)
    return run


# Reductions take axes as an attribute up to the opset given here, as an input from it on.
for _op, _f, _since in (("ReduceSum", np.sum, 13), ("ReduceMax", np.max, 18), ("ReduceMin", np.min, 18)):
    _r = _reduce_with(_f)
    register(_op, since=1)(lambda attrs, x, _r=_r: _r(x, _axes(attrs.get("axes")), attrs))
    register(_op, since=_since)(lambda attrs, x, axes=None, _r=_r: _r(x, _axes(axes), attrs))


def _norm_axes(x, attrs):
    return tuple(range(attrs.get("axis", -1) % x.ndim, x.ndim))


@register("LayerNormalization", since=17)
def _layer_norm(attrs, x, scale, bias=None):
    axes = _norm_axes(x, attrs)
    xf = x.astype(np.float32)  # stash_type 1: statistics in fp32
    mean = xf.mean(axis=axes, keepdims=True)
    inv_std = 1.0 / np.sqrt(((xf - mean) ** 2).mean(axis=axes, keepdims=True) + attrs.get("epsilon", 1e-5))
    y = (xf - mean) * inv_std * scale
    if bias is not None:
        y = y + bias
    return y.astype(x.dtype), mean, inv_std


@register("RMSNormalization", since=23)
def _rms_norm(attrs, x, scale):
    xf = x.astype(np.float32)
    ms = (xf * xf).mean(axis=_norm_axes(x, attrs), keepdims=True)
    return (xf / np.sqrt(ms + attrs.get("epsilon", 1e-5)) * scale).astype(x.dtype)


def _split_points(dim, split, n):
    if split is not None:
        sizes = [int(s) for s in np.asarray(split).reshape(-1)]
    else:
        chunk = -(-dim // n)  # the last chunk is smaller when dim does not divide (opset 18 num_outputs)
        sizes = [min(chunk, dim - i * chunk) for i in range(n)]
    if sum(sizes) != dim:
        raise CompileError(f"Split sizes {sizes} do not add up to dimension {dim}")
    return np.cumsum(sizes)[:-1]


@register("Split", since=2, n_outputs=True)
def _split_attr(attrs, x, n_outputs):
    ax = attrs.get("axis", 0)
    return tuple(np.split(x, _split_points(x.shape[ax], attrs.get("split"), n_outputs), axis=ax))


@register("Split", since=13, n_outputs=True)
def _split_input(attrs, x, split=None, n_outputs=1):
    ax = attrs.get("axis", 0)
    n = attrs.get("num_outputs", n_outputs)
    return tuple(np.split(x, _split_points(x.shape[ax], split, n), axis=ax))


@register("RotaryEmbedding", since=23)
def _rotary(attrs, x, cos, sin, position_ids=None):
    shape = x.shape
    if x.ndim == 4:  # [B, heads, S, D] -> [B, S, heads, D]
        x = x.transpose(0, 2, 1, 3)
    else:
        x = x.reshape(shape[0], shape[1], attrs["num_heads"], -1)
    dim = attrs.get("rotary_embedding_dim", 0) or x.shape[-1]
    if position_ids is not None:
        cos, sin = cos[position_ids], sin[position_ids]
    cos, sin = cos[:, :, None, :], sin[:, :, None, :]
    rot, keep = x[..., :dim], x[..., dim:]
    if attrs.get("interleaved", 0):
        x1, x2 = rot[..., 0::2], rot[..., 1::2]
    else:
        x1, x2 = np.split(rot, 2, axis=-1)
    real, imag = cos * x1 - sin * x2, sin * x1 + cos * x2
    if attrs.get("interleaved", 0):
        rot = np.stack([real, imag], axis=-1).reshape(rot.shape)
    else:
        rot = np.concatenate([real, imag], axis=-1)
    y = np.concatenate([rot, keep], axis=-1).astype(x.dtype)
    return y.transpose(0, 2, 1, 3) if len(shape) == 4 else y.reshape(shape)


def attention_bias(attrs, mask, n_s: int, n_t: int, past_len: int) -> np.ndarray:
    """Attention's additive score bias (0, a float mask's value, or -inf for a masked key), broadcastable to
    [batch, q_heads, n_s, n_t]: the mask (a short one padded with "masked"), then ``is_causal``."""
    bias = np.zeros((n_s, n_t), np.float32)
    if mask is not None:
        if mask.shape[-1] < n_t:  # a short mask is padded with "masked"
            pad = [(0, 0)] * (mask.ndim - 1) + [(0, n_t - mask.shape[-1])]
            mask = np.pad(mask, pad, constant_values=False if mask.dtype == np.bool_ else -np.inf)
        bias = bias + (np.where(mask, 0.0, -np.inf).astype(np.float32) if mask.dtype == np.bool_ else mask)
    if attrs.get("is_causal", 0):  # bottom-right aligned: query i sees keys j <= past_len + i
        allowed = np.arange(n_t)[None, :] <= np.arange(n_s)[:, None] + past_len
        bias = bias + np.where(allowed, 0.0, -np.inf).astype(np.float32)
    return bias


@register("Attention", since=23, n_outputs=True)
def _attention(attrs, q, k, v, mask=None, past_k=None, past_v=None, nonpad_kv_seqlen=None, n_outputs=1):
    if n_outputs > 3:
        raise CompileError("Attention: the qk_matmul_output output is not supported")
    if nonpad_kv_seqlen is not None:
        raise CompileError("Attention: the nonpad_kv_seqlen input is not supported")
    if attrs.get("softmax_precision") not in (None, 1):
        raise CompileError(f"Attention softmax_precision={attrs['softmax_precision']} is not supported")
    rank3 = q.ndim == 3
    if rank3:  # [B, S, heads*D] -> [B, heads, S, D]
        b, s = q.shape[:2]
        q = q.reshape(b, s, attrs["q_num_heads"], -1).transpose(0, 2, 1, 3)
        k = k.reshape(b, k.shape[1], attrs["kv_num_heads"], -1).transpose(0, 2, 1, 3)
        v = v.reshape(b, v.shape[1], attrs["kv_num_heads"], -1).transpose(0, 2, 1, 3)
    past_len = 0 if past_k is None else past_k.shape[2]
    if past_k is not None:
        k, v = np.concatenate([past_k, k], axis=2), np.concatenate([past_v, v], axis=2)
    present_k, present_v = k, v
    n_q, n_kv, n_s, n_t = q.shape[1], k.shape[1], q.shape[2], k.shape[2]
    bias = attention_bias(attrs, mask, n_s, n_t, past_len)
    k = np.repeat(k, n_q // n_kv, axis=1)  # GQA: query head h reads KV head h // (n_q / n_kv)
    v = np.repeat(v, n_q // n_kv, axis=1)
    scale = attrs.get("scale", 1.0 / np.sqrt(q.shape[-1]))
    scores = (q @ k.transpose(0, 1, 3, 2)) * np.float32(scale)
    if attrs.get("softcap", 0.0) > 0:
        scores = attrs["softcap"] * np.tanh(scores / attrs["softcap"])
    scores = scores + bias
    dead = np.isneginf(np.max(bias, axis=-1, keepdims=True))  # a fully masked row attends to nothing: output 0
    m = np.where(dead, 0.0, np.max(scores, axis=-1, keepdims=True))
    e = np.where(dead, 0.0, np.exp(scores - m))
    p = (e / np.where(dead, 1.0, e.sum(axis=-1, keepdims=True))).astype(q.dtype)
    y = p @ v
    if rank3:
        y = y.transpose(0, 2, 1, 3).reshape(y.shape[0], n_s, -1)
    return y.astype(q.dtype), present_k, present_v


@register("Size", since=1)
def _size(attrs, x):
    return np.asarray(np.asarray(x).size, np.int64)
