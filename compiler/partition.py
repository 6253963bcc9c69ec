"""Partition: the nodes the overlay cannot run go to the host, the graph into overlay and host segments.

The fuser is the judge of what the overlay runs: the pass fuses the graph, and a node it refuses (a
:class:`~.frontend.CompileError` that names the node) is placed on the host; the graph is cut around the
host nodes and fused again, until every overlay segment fuses. Ops the op library has no numpy semantics for
(``onnx_ops``) are host nodes from the start, and so are the nodes that read or write inf or nan (a mask of -inf
and what a probe finds computed from it), which the overlay's block floating point cannot hold.

Segments alternate in phases, so that tensors cross once per boundary, not once per op: a node's phase is the
first phase of its kind (overlay phases even, host phases odd) at or after the phases of its inputs'
producers. All nodes of one phase form one segment; a segment's inputs are the graph inputs and earlier
segments' outputs it reads, its outputs what later segments or the graph's outputs read.

A host segment is a self-contained ONNX model (its constants as initializers): ``host/placement.py`` runs it
on the offload device. An overlay segment is compiled by the rest of the pipeline into a program of its own.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .frontend import CompileError
from .ir import Graph, Node, Value
from .onnx_ops import evaluate, lookup

__all__ = ["Segment", "host_model", "partition", "segment_graph"]


@dataclass
class Segment:
    """One phase of a partitioned graph: its nodes run on ``overlay`` or on the ``host``."""

    kind: str  # overlay | host
    nodes: list
    inputs: list = field(default_factory=list)  # values it reads from the graph inputs or earlier segments
    outputs: list = field(default_factory=list)  # values later segments or the graph outputs read


def _phases(graph: Graph, host: set) -> list[Segment]:
    phase_of: dict[str, int] = {}  # value -> phase of its producer
    segs: dict[int, list] = {}
    for node in graph.nodes:
        p = max((phase_of.get(i, 0) for i in node.inputs if i), default=0)
        want = 1 if node.name in host else 0
        if p % 2 != want:
            p += 1
        for o in node.outputs:
            if o:
                phase_of[o] = p
        segs.setdefault(p, []).append(node)
    order = sorted(segs)
    out = [Segment("host" if p % 2 else "overlay", segs[p]) for p in order]
    made: dict[str, int] = {}
    for k, s in enumerate(out):
        for node in s.nodes:
            for o in node.outputs:
                if o:
                    made[o] = k
    consts = set(graph.consts())
    for k, s in enumerate(out):
        read = dict.fromkeys(i for n in s.nodes for i in n.inputs if i and i not in consts and made.get(i) != k)
        s.inputs = list(read)
    needed = {o: len(out) for o in graph.outputs}
    for k, s in enumerate(out):
        for i in s.inputs:
            needed[i] = max(needed.get(i, -1), k)
    for k, s in enumerate(out):
        s.outputs = [o for n in s.nodes for o in n.outputs if o and needed.get(o, -1) > k]
    return out


def segment_graph(graph: Graph, seg: Segment) -> Graph:
    """The IR graph of one segment: its nodes, reading its inputs, giving its outputs."""
    used = {*seg.inputs, *seg.outputs} | {x for n in seg.nodes for x in (*n.inputs, *n.outputs) if x}
    values = {n: v for n, v in graph.values.items() if n in used}
    g = Graph(list(seg.inputs), list(seg.outputs), list(seg.nodes), values, graph.opset)
    g.verify()
    return g


def _attribute(name: str, value) -> onnx.AttributeProto:
    if isinstance(value, np.ndarray):
        return helper.make_attribute(name, numpy_helper.from_array(value, name))
    return helper.make_attribute(name, value)


def host_model(graph: Graph, seg: Segment) -> onnx.ModelProto:
    """A host segment as a self-contained ONNX model (constants as initializers, at the graph's opset)."""
    def info(name):
        v = graph.values[name]
        shape = None if v.shape is None else [d if isinstance(d, int) else None for d in v.shape]
        return helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(np.dtype(v.dtype)), shape)

    consts = graph.consts()
    inits = {i: consts[i] for n in seg.nodes for i in n.inputs if i in consts}
    nodes = []
    for n in seg.nodes:
        node = helper.make_node(n.op, n.inputs, n.outputs, name=n.name)
        node.attribute.extend(_attribute(k, v) for k, v in n.attrs.items())
        nodes.append(node)
    g = helper.make_graph(nodes, "host_segment", [info(i) for i in seg.inputs], [info(o) for o in seg.outputs],
                          [numpy_helper.from_array(np.asarray(v.const), k) for k, v in inits.items()])
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", graph.opset)], ir_version=onnx.IR_VERSION)


#: Ops whose output is finite where their input holds -inf (a masked score): where a graph cannot be probed, the
#: end of a non-finite region.
FINITE_OUT = frozenset({"Softmax", "Exp", "Sigmoid", "Tanh", "Erf", "IsInf", "IsNaN"})


def _probe(graph: Graph, flag: bool) -> dict | None:
    """Every value of *graph* evaluated with its inputs at finite stand-ins (seeded normal floats, zero integers,
    booleans at *flag*), None for a value that neither the op library nor ONNX's reference evaluator gives; None when
    an input's shape is unknown."""
    rng = np.random.default_rng(0)
    env = {n: v.const for n, v in graph.consts().items()}
    for name in graph.inputs:
        v = graph.values[name]
        if v.shape is None or not all(isinstance(d, int) for d in v.shape):
            return None
        dt = np.dtype(v.dtype)
        env[name] = (rng.standard_normal(v.shape).astype(dt) if dt.kind == "f"
                     else np.full(v.shape, flag, dt) if dt.kind == "b" else np.zeros(v.shape, dt))
    with np.errstate(all="ignore"):
        for node in graph.nodes:
            args = [env.get(i) if i else None for i in node.inputs]
            outs = [None] * len(node.outputs)
            if all(a is not None for i, a in zip(node.inputs, args, strict=True) if i):
                try:
                    outs = (evaluate(node, graph.opset, args) if lookup(node.op, graph.opset) is not None
                            else _reference(node, graph.opset, args))
                except Exception:  # noqa: BLE001 - a node neither can evaluate here is judged unknown
                    outs = [None] * len(node.outputs)
            env.update(zip(node.outputs, outs, strict=False))
    return env


def _reference(node: Node, opset: int, args: list) -> list:
    """*node* evaluated by ONNX's own reference evaluator (an op the op library has no numpy semantics for, which
    the host will run: ``Pad`` of a mask with -inf)."""
    from onnx.reference import ReferenceEvaluator

    ins = [f"in{k}" if i else "" for k, i in enumerate(node.inputs)]
    proto = helper.make_node(node.op, ins, [f"out{k}" for k in range(len(node.outputs))])
    proto.attribute.extend(_attribute(k, v) for k, v in node.attrs.items())
    g = helper.make_graph([proto], "probe", [helper.make_tensor_value_info(i, helper.np_dtype_to_tensor_dtype(
        a.dtype), a.shape) for i, a in zip(ins, args, strict=True) if i], [helper.make_value_info(o, onnx.TypeProto())
                                                                           for o in proto.output])
    model = helper.make_model(g, opset_imports=[helper.make_opsetid("", opset)], ir_version=onnx.IR_VERSION)
    feeds = {i: a for i, a in zip(ins, args, strict=True) if i}
    return [np.asarray(r) for r in ReferenceEvaluator(model).run(None, feeds)]


def _non_finite(x) -> bool:
    return x.dtype.kind == "f" and not np.isfinite(x).all()


def _non_finite_readers(graph: Graph) -> set:
    """Nodes that read or write a value that can hold inf or nan: the overlay's block floating point holds neither.

    The sources are constants that hold inf or nan (an additive mask of -inf). What is computed from them is judged
    by a probe (:func:`_probe`; twice where a boolean input can select the mask or not), since finiteness depends on the
    values: a softmax over a row that is partly -inf is finite, over one that is all -inf it is nan, and a ``Where``
    that replaces those rows (ONNX's Attention body) makes it finite again. Only values computed from the sources
    are judged, so that the probe's stand-ins (a square root of a negative) decide nothing elsewhere.
    """
    bad = {n for n, v in graph.consts().items() if _non_finite(v.const)}
    if not bad:
        return set()
    flags = (False, True) if any(graph.values[i].dtype == "bool" for i in graph.inputs) else (False,)
    probes = [p for p in (_probe(graph, f) for f in flags) if p is not None]
    tainted, readers = set(bad), set()
    for n in graph.nodes:
        if not any(i in tainted for i in n.inputs):
            continue
        tainted.update(o for o in n.outputs if o)
        reads_bad = any(i in bad for i in n.inputs)
        if reads_bad:
            readers.add(n.name)
        for o in n.outputs:
            seen = [p.get(o) for p in probes] if o else []
            if not probes:  # a graph with symbolic input shapes: judged by op, up to an op that makes -inf finite
                non_finite = reads_bad and n.op not in FINITE_OUT
            else:  # a value computed from inf or nan that the probe could not evaluate is taken to hold them
                non_finite = any(x is None or _non_finite(x) for x in seen)
            if o and non_finite:
                bad.add(o)
                readers.add(n.name)
    return readers


def _constant_outputs(graph: Graph) -> set:
    """Graph outputs that folded to constants (a present KV of bound inputs) become host Identity nodes of the
    constant: the overlay computes vectors, a host segment can give a constant."""
    made = set()
    for k, o in enumerate(graph.outputs):
        v = graph.values[o]
        if v.const is None or o in graph.inputs:
            continue
        c = f"{o}:folded"
        graph.values[c] = Value(c, v.shape, v.dtype, v.const)
        graph.values[o] = Value(o, v.shape, v.dtype)
        node = Node("Identity", [c], [o], name=f"Identity_{o}")
        graph.nodes.append(node)
        made.add(node.name)
    return made


def partition(graph: Graph, trial, *, host_ops: bool = True, host=frozenset()) -> tuple[list, list]:
    """Segments of *graph* (one overlay segment when the overlay runs it all), and what *trial* made of each overlay
    segment (None for a host segment).

    *trial(segment_graph[, whole])* compiles one overlay segment (*whole*: the graph itself) and raises
    :class:`CompileError` (with ``node``, the refused node's name, when known). With *host_ops* false, the first
    refusal is the error. *host* names nodes placed on the host from the start.
    """
    host = set(host) | {n.name for n in graph.nodes if lookup(n.op, graph.opset) is None}
    if host_ops:
        host |= _non_finite_readers(graph) | _constant_outputs(graph)
    if host and not host_ops:
        n = next(n for n in graph.nodes if n.name in host)
        raise CompileError(f"node {n.name}: op {n.op} (opset {graph.opset}) is not supported")
    while True:
        if not host:  # the whole graph, as it is: the program of a graph the overlay runs whole is unchanged
            segs = [Segment("overlay", list(graph.nodes), list(graph.inputs), list(graph.outputs))]
        else:
            segs = _phases(graph, host)
        try:
            made = [trial(segment_graph(graph, s) if host else graph, *(() if host else (True,)))
                    if s.kind == "overlay" else None for s in segs]
            return segs, made
        except CompileError as exc:
            node = getattr(exc, "node", None)
            if not host_ops or node is None or node in host:
                raise
            host.add(node)
