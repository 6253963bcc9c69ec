"""Graph simplification passes over the IR, for one batch-1 decode step at a concrete past length.

* :func:`specialize_mask`: batch=1 decode has no padding, so ``attention_mask`` becomes all ones
  (needs a concrete ``kv_len``);
* :func:`fold_constants`: numpy-evaluate nodes whose inputs are all constant, and ``Shape`` of
  concretely shaped values; the nodes that stay get concrete shapes;
* :func:`dead_code`: drop what no output needs.
"""

from __future__ import annotations

import numpy as np

from .graph_tools import MASK, PAST_KV
from .ir import Graph, Value
from .onnx_ops import evaluate, lookup

__all__ = ["dead_code", "fold_constants", "specialize_mask"]


def specialize_mask(graph: Graph, name: str = MASK) -> Graph:
    v = graph.values.get(name)
    if name in graph.inputs and v is not None and v.shape is not None and all(isinstance(d, int) for d in v.shape):
        v.const = np.ones(v.shape, np.dtype(v.dtype))
        graph.inputs.remove(name)
    return graph


def _concrete(v: Value | None) -> bool:
    return v is None or v.const is not None or (
        v.shape is not None and all(isinstance(d, int) for d in v.shape) and v.dtype != "?")


#: Input positions whose values (not just shapes) determine the output shape, for every registered
#: op that has such inputs. Placeholders cannot stand in for them.
SHAPE_OPERANDS = {"Reshape": {1}, "Expand": {1}, "Slice": {1, 2, 3, 4}, "Unsqueeze": {1}, "Squeeze": {1},
                  "Tile": {1}, "Split": {1}, "ReduceMean": {1}, "ReduceSum": {1}, "ReduceMax": {1},
                  "ReduceMin": {1}, "Range": {0, 1, 2}, "ConstantOfShape": {0}}


def _propagate_shapes(graph: Graph, node) -> None:
    """Give *node*'s outputs concrete shapes by running it on zeros of its inputs' shapes.

    ONNX shape inference loses dims through the Reshape/Expand chains that exporters emit
    (``unk__N``), which would keep their ``Shape`` consumers from folding. Once every input
    has a concrete shape and every shape operand (``SHAPE_OPERANDS``) is a constant, running
    the op on placeholders gives exact output shapes.
    """
    ins = [graph.values[i] if i else None for i in node.inputs]
    outs = [graph.values[o] for o in node.outputs if o]
    if all(_concrete(v) for v in outs) or not all(_concrete(v) for v in ins) or lookup(node.op, graph.opset) is None:
        return
    if any(ins[k] is not None and ins[k].const is None for k in SHAPE_OPERANDS.get(node.op, ()) if k < len(ins)):
        return
    args = [None if v is None else v.const if v.const is not None else np.zeros(v.shape, v.dtype) for v in ins]
    with np.errstate(all="ignore"):  # placeholders may divide by zero; only shapes are kept
        res = evaluate(node, graph.opset, args)
    for o, r in zip(node.outputs, res, strict=False):
        if o:
            graph.values[o].shape, graph.values[o].dtype = tuple(r.shape), str(r.dtype)


def fold_constants(graph: Graph) -> Graph:
    kept = []
    past = {MASK} | {i for i in graph.values if PAST_KV.match(i)}  # values that carry the past length
    for node in graph.nodes:
        args = [graph.values[i].const if i else None for i in node.inputs]
        foldable = all(a is not None for i, a in zip(node.inputs, args, strict=True) if i)
        if node.op == "Shape" and not foldable:
            shp = graph.values[node.inputs[0]].shape
            if shp is not None and all(isinstance(d, int) for d in shp):
                args, foldable = [np.zeros(shp, np.int8)], True
        if not foldable or lookup(node.op, graph.opset) is None:  # an op for the host alone keeps its node
            kept.append(node)
            _propagate_shapes(graph, node)
            continue
        if any(i in past for i in node.inputs):
            graph.past_folds.append((node, [None if i in past and i != MASK else a
                                            for i, a in zip(node.inputs, args, strict=True)]))
            past.update(o for o in node.outputs if o)
        for o, r in zip(node.outputs, evaluate(node, graph.opset, args), strict=False):
            graph.values[o] = Value(o, tuple(r.shape), str(r.dtype), r)
    graph.nodes = kept
    return graph


def dead_code(graph: Graph) -> Graph:
    live = set(graph.outputs)
    kept = []
    for node in reversed(graph.nodes):
        if any(o in live for o in node.outputs):
            kept.append(node)
            live.update(i for i in node.inputs if i)
    graph.nodes = kept[::-1]
    produced = {o for nd in graph.nodes for o in nd.outputs}  # one set: a walk over the nodes per value was quadratic
    graph.values = {n: v for n, v in graph.values.items() if n in live or n in graph.inputs or n in produced}
    return graph
