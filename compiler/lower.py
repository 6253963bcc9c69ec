"""ONNX -> IR lowering. Ops are registered by (op type, first opset) with numpy semantics.

The numpy implementation of each op serves constant folding and the reference
interpreter (``interp.py``). ``lower`` does not fold; ``passes.fold_constants`` does.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .frontend import CompileError
from .ir import Graph, Node, Value

__all__ = ["evaluate", "lookup", "lower", "register", "supported_ops"]

# op type -> list of (since, fn), sorted by since
_REGISTRY: dict[str, list[tuple[int, Callable]]] = {}


def register(op: str, since: int = 1):
    """Register *fn(attrs, *inputs) -> array | tuple of arrays* for *op* from opset *since* on."""
    def deco(fn):
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
    res = fn(node.attrs, *args)
    res = res if isinstance(res, tuple) else (res,)
    return [np.asarray(r) for r in res]


# ---------------------------------------------------------------- op semantics
def _np_dtype(onnx_type: int) -> np.dtype:
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
                "Reciprocal": np.reciprocal, "Abs": np.abs}.items():
    register(_op, since=1)(lambda attrs, x, _f=_f: _f(x))


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
    if axes is None and attrs.get("noop_with_empty_axes", 0):
        return x
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
    return x.astype(_np_dtype(attrs["to"]))


@register("Reshape", since=5)
def _reshape(attrs, x, shape):
    shape = [int(d) for d in shape]
    if not attrs.get("allowzero", 0):
        shape = [x.shape[i] if d == 0 else d for i, d in enumerate(shape)]
    return x.reshape(shape)


@register("Transpose", since=1)
def _transpose(attrs, x):
    return np.transpose(x, attrs.get("perm"))


# ---------------------------------------------------------------- lowering
def _attr(a: onnx.AttributeProto):
    v = helper.get_attribute_value(a)
    if isinstance(v, onnx.TensorProto):
        return numpy_helper.to_array(v)
    if isinstance(v, bytes):
        return v.decode()
    if isinstance(v, list):
        return [x.decode() if isinstance(x, bytes) else x for x in v]
    return v


def _value_from_info(vi: onnx.ValueInfoProto) -> Value:
    tt = vi.type.tensor_type
    shape = None
    if tt.HasField("shape"):
        shape = tuple(d.dim_value if d.HasField("dim_value") else (d.dim_param or "?") for d in tt.shape.dim)
    dtype = str(_np_dtype(tt.elem_type)) if tt.elem_type else "?"
    return Value(vi.name, shape, dtype)


def _opset(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise CompileError("model imports no default-domain opset")


def lower(model: onnx.ModelProto) -> Graph:
    """Lower a (pinned, shape-inferred) ModelProto into the IR; raise CompileError on unsupported ops."""
    opset = _opset(model)
    g = model.graph
    values: dict[str, Value] = {}
    for t in g.initializer:
        arr = numpy_helper.to_array(t)
        values[t.name] = Value(t.name, tuple(arr.shape), str(arr.dtype), arr)
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.name not in values:
            values[vi.name] = _value_from_info(vi)
    nodes = []
    for i, n in enumerate(g.node):
        name = n.name or f"{n.op_type}_{i}"
        if n.domain not in ("", "ai.onnx") or lookup(n.op_type, opset) is None:
            dom = f"{n.domain}." if n.domain not in ("", "ai.onnx") else ""
            raise CompileError(f"node {name}: op {dom}{n.op_type} (opset {opset}) is not supported;"
                               f" supported: {', '.join(supported_ops(opset))}")
        for o in n.output:
            values.setdefault(o, Value(o, None, "?"))
        nodes.append(Node(n.op_type, list(n.input), list(n.output), {a.name: _attr(a) for a in n.attribute}, name))
    inputs = [vi.name for vi in g.input if values[vi.name].const is None]
    graph = Graph(inputs, [vi.name for vi in g.output], nodes, values, opset)
    graph.verify()
    return graph
