"""ONNX -> IR lowering: ModelProto nodes become IR nodes, initializers become constant values.

An op is accepted if the op library (``onnx_ops.py``) has numpy semantics for it at the model's
opset. ``lower`` does not fold; ``passes.fold_constants`` does.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .frontend import CompileError
from .ir import Graph, Node, Value
from .onnx_ops import lookup, np_dtype, supported_ops

__all__ = ["check_op", "lower", "opset_of"]


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
    dtype = str(np_dtype(tt.elem_type)) if tt.elem_type else "?"
    return Value(vi.name, shape, dtype)


def opset_of(model: onnx.ModelProto) -> int:
    for o in model.opset_import:
        if o.domain in ("", "ai.onnx"):
            return o.version
    raise CompileError("model imports no default-domain opset")


def _cast_like_as_cast(n: onnx.NodeProto, like: Value) -> onnx.NodeProto:
    """CastLike(x, like) as Cast(x, to=like's type): the type is static, and a Cast of a constant folds."""
    to = helper.np_dtype_to_tensor_dtype(np.dtype(like.dtype))
    return helper.make_node("Cast", [n.input[0]], list(n.output), name=n.name, to=to)


def check_op(n: onnx.NodeProto, name: str, opset: int, *, host_ops: bool = False) -> None:
    """Raise the one-line CompileError of a node whose op the compiler does not know (with *host_ops*: one outside
    the default domain, which no host runs either)."""
    default = n.domain in ("", "ai.onnx")
    if not default or (lookup(n.op_type, opset) is None and not host_ops):
        dom = "" if default else f"{n.domain}."
        raise CompileError(f"node {name}: op {dom}{n.op_type} (opset {opset}) is not supported;"
                           f" supported: {', '.join(supported_ops(opset))}", node=name)


def lower(model, weights=None, *, host_ops: bool = False) -> Graph:
    """Lower a (pinned, shape-inferred) ModelProto, or a :class:`~.frontend.Loaded` one, into the IR.

    *weights* (or the ``Loaded``'s) are initializers kept outside the proto, as arrays.
    Raises CompileError on unsupported ops; with *host_ops*, a default-domain op the op library lacks is kept
    (the partition pass places it on the host, which runs it through ONNX's own semantics)."""
    prequantized = {}
    if hasattr(model, "weights"):
        model, weights, prequantized = model.model, model.weights, model.prequantized
    opset = opset_of(model)
    g = model.graph
    values: dict[str, Value] = {}
    for t in g.initializer:
        arr = numpy_helper.to_array(t)
        values[t.name] = Value(t.name, tuple(arr.shape), str(arr.dtype), arr)
    for name, arr in (weights or {}).items():
        values[name] = Value(name, tuple(arr.shape), str(arr.dtype), arr)
    for vi in [*g.input, *g.value_info, *g.output]:
        if vi.name not in values:
            values[vi.name] = _value_from_info(vi)
    nodes = []
    for i, n in enumerate(g.node):
        name = n.name or f"{n.op_type}_{i}"
        if n.op_type == "CastLike" and n.domain in ("", "ai.onnx") and values.get(n.input[1]) is not None:
            n = _cast_like_as_cast(n, values[n.input[1]])
        check_op(n, name, opset, host_ops=host_ops)
        for o in n.output:
            values.setdefault(o, Value(o, None, "?"))
        nodes.append(Node(n.op_type, list(n.input), list(n.output), {a.name: _attr(a) for a in n.attribute}, name))
    inputs = [vi.name for vi in g.input if values[vi.name].const is None]
    graph = Graph(inputs, [vi.name for vi in g.output], nodes, values, opset, prequantized=prequantized)
    graph.verify()
    return graph
