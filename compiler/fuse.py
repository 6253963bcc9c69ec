"""Fusion: the folded ONNX graph of one decode step becomes an :class:`~.overlay_graph.OverlayGraph`.

Every non-constant tensor of a batch-1 decode step is a flat vector. Starting from the graph outputs,
:class:`Fuser` walks backwards and, at each value, tries the fusion rules of ``fused.RULES`` in order
(the largest overlay operation first): a token/position table, attention over the KV cache, rotary
embedding, a norm, an activation, a GEMV, the remaining elementwise arithmetic. Each rule lives with
the fused-op kind it produces (``compiler/fused/``).

Anything else on a non-constant value raises :class:`CompileError` naming the node, its op type and
opset.
"""

from __future__ import annotations

import hashlib

import numpy as np

from .frontend import CompileError
from .fused import RULES
from .fused.refused import REASONS
from .fused.table import Table
from .graph_tools import PRESENT_KV, GraphIndex
from .ir import Graph
from .overlay_graph import OverlayGraph, VOp
from .reference import run_float

# OverlayGraph and run_float stay importable from here: fuse's product and its float64 evaluation
__all__ = ["Fuser", "OverlayGraph", "fuse", "run_float"]

#: What fusion turns into overlay instructions, for error messages.
SUPPORTED = ("embedding/position Gather and any function of position_ids (tables), MatMul/Gemm by a constant, Split or "
             "Slice of their outputs, LayerNormalization, RMSNormalization or RMSNorm spelled out, elementwise regions "
             "equal to SiLU/GELU/ReLU, rotary embedding (rotate_half, also on part of each head, or RotaryEmbedding), "
             "attention over past_key_values (or Attention, also without past KV), Add/Sub/Mul/Div/Neg of vectors and "
             "constants, Softmax/Sigmoid/Tanh (on the attention unit), and layout or linear ops of small tensors "
             "(Concat, Slice, Gather, Transpose, Expand, reductions, ... as 0/1 GEMVs)")


def _fingerprint(arr: np.ndarray) -> str:
    """A cheap content key of an array: its dtype and a strided sample of at most a few thousand elements (hashing
    every weight of a large model cost a fifth of its compile); equal keys are then compared whole (:func:`_same`)."""
    k = max(1, int(4096 ** (1 / max(1, arr.ndim))))
    sample = arr[tuple(slice(None, None, max(1, d // k)) for d in arr.shape)]
    return hashlib.sha1(str(arr.dtype).encode() + np.ascontiguousarray(sample).tobytes()).hexdigest()


def _same(a: np.ndarray, b: np.ndarray) -> bool:
    """Bit for bit equal (as a hash of their bytes would find: -0.0 is not 0.0, a NaN equals itself)."""
    if a.dtype != b.dtype or a.shape != b.shape:
        return False
    if a.dtype.itemsize in (1, 2, 4, 8) and a.dtype.kind != "O":
        bits = f"u{a.dtype.itemsize}"
        return bool(np.array_equal(a.view(bits), b.view(bits)))
    return a.tobytes() == b.tobytes()


class Fuser:
    """The walk, and what the fusion rules share: the graph index, the overlay graph being built, and the
    tensor tables (identical tensors stored once)."""

    def __init__(self, graph: Graph, *, max_seq: int, logits: str = "logits", lanes: int | None = None,
                 norm_heads: bool = True):
        self.g = graph
        self.lanes = lanes  # the overlay's vector_lanes, where a rule's choice depends on it (None: any)
        self.norm_heads = norm_heads  # the vector unit runs a NORM over each head (config.norm_heads)
        self.ix = GraphIndex(graph)
        self.max_seq = max_seq
        self.out = OverlayGraph()
        self.done: dict[str, str] = {}  # resolved ONNX value -> vector name
        self.logits_name = logits
        self.present_done: set = set()  # present.N.* outputs an attention satisfied
        self.memo: dict = {}  # the rules' own caches, by name
        self.checks: list = []  # what rules ask to verify of the finished graph: fn(fuser), raising CompileError
        self._dedupe: dict = {}

    def fail(self, name: str, why: str):
        node = self.ix.producer.get(name)
        if node is None:
            raise CompileError(f"value {name!r}: {why}")
        raise CompileError(f"node {node.name}: op {node.op} (opset {self.g.opset}) {why}", node=node.name)

    def add(self, kind: type[VOp], out_value: str, ins, source: str, /, **attrs) -> str:
        """Append an op of *kind* computing ONNX value *out_value*; return its vector's name."""
        name = f"v{len(self.out.ops)}_{kind.kind}"
        self.out.lengths[name] = self.ix.numel(out_value)
        self.out.ops.append(kind(name, list(ins), attrs, source))
        return name

    def store(self, table: dict, prefix: str, array) -> str:
        """Add *array* to a tensor table, sharing identical tensors (tied embeddings, repeated constants).

        Matrices keep their dtype (float32 from the model): a float64 copy of every weight would double the
        compiler's memory for nothing, since quantization works a block of rows at a time.
        """
        arr = np.asarray(array)
        name = self._shared((prefix, arr.shape, _fingerprint(arr)), arr, f"{prefix}{len(table)}")
        table.setdefault(name, arr)
        return name

    def store_table(self, kind: str, table) -> str:
        """Add a table indexed by *kind* ("token" or "position"), sharing identical ones."""
        arr = np.asarray(table)
        name = self._shared(("t", kind, arr.shape, _fingerprint(arr)), arr, f"t{len(self.out.tables)}")
        self.out.tables.setdefault(name, (kind, arr))
        return name

    def _shared(self, key, arr: np.ndarray, new: str) -> str:
        """The name of a stored array equal to *arr* under *key*, else *new*, now recorded for it."""
        for other, name in self._dedupe.setdefault(key, []):
            if _same(other, arr):
                return name
        self._dedupe[key].append((arr, new))
        return new

    def const_vector(self, name: str, length: int) -> str:
        """Constant *name* broadcast onto a vector of *length*, stored."""
        c = self.ix.const(name).astype(np.float64)
        try:
            flat = np.broadcast_to(c.reshape(c.shape[-1:] if c.ndim else ()), (length,)) if c.size <= length else None
        except ValueError:
            flat = None
        if flat is None or c.size not in (1, length):
            raise CompileError(f"constant {name!r} of shape {list(c.shape)} does not broadcast onto a vector of {length}")
        return self.store(self.out.consts, "c", flat)

    def over_positions(self, value) -> np.ndarray:
        """[max_seq, numel] table of a value of position_ids alone (or of a constant folded from the past
        length, which is the position in a batch-1 decode step), evaluated at every position."""
        if self.ix.past_derived(value):
            return np.stack([self.ix.at_past_length(value, p).reshape(-1) for p in range(self.max_seq)])
        shape = self.g.values["position_ids"].shape
        dtype = np.dtype(self.g.values["position_ids"].dtype)
        return np.stack([self.ix.evaluate(value, {"position_ids": np.full(shape, p, dtype)}).reshape(-1)
                         for p in range(self.max_seq)])

    def run(self) -> OverlayGraph:
        """Fuse every graph output: ``logits`` (a decoder), ``present.N.*`` (satisfied by the on-chip KV
        cache) and any other computed output (a small graph of supported ops)."""
        for o in self.g.outputs:
            if PRESENT_KV.match(o):
                continue
            vec = self.vector(o)
            self.out.outputs[o] = (vec, list(self.ix.shape(o)))
            if o == self.logits_name:
                self.out.logits = vec
        for o in self.g.outputs:
            if PRESENT_KV.match(o) and o not in self.present_done:
                raise CompileError(f"output {o!r} is not produced by an attention the compiler recognised "
                                   "(the KV cache must stay on chip)")
        for check in self.checks:
            check(self)
        return self.out

    def vector(self, name: str) -> str:
        """The overlay vector holding ONNX value *name*, adding the ops that produce it."""
        if self.ix.is_const(name):
            if self.position_const(name):
                return self._position_table(name)
            self.fail(name, "is a constant where the overlay needs a computed vector")
        r = self.ix.resolve(name)
        if r not in self.done:
            try:
                self.done[r] = self._match(r)
            except CompileError as exc:
                # a rule's error without a node (a constant that does not broadcast, ...) is the matched node's
                if exc.node is None and r in self.ix.producer:
                    exc.node = self.ix.producer[r].name
                raise
        return self.done[r]

    def position_const(self, name: str) -> bool:
        """Whether *name* is a float constant folded from the past length: a function of the position, which
        the overlay reads as a table row (positions of a graph without ``position_ids``)."""
        c = self.ix.const(name)
        return c is not None and c.dtype.kind == "f" and self.ix.past_derived(name)

    def _position_table(self, name: str) -> str:
        r = self.ix.resolve(name)
        if r not in self.done:
            table = self.store_table("position", self.over_positions(r))
            self.done[r] = self.add(Table, r, [], r, table=table)
        return self.done[r]

    def _match(self, v: str) -> str:
        node = self.ix.producer.get(v)
        for rule in RULES:
            got = rule(self, v, node)
            if got is not None:
                return got
        if node is not None and node.op in REASONS:
            self.fail(v, f"cannot run on the overlay: {REASONS[node.op]}")
        self.fail(v, f"is not supported on the overlay; supported: {SUPPORTED}")


def fuse(graph: Graph, *, max_seq: int, lanes: int | None = None, norm_heads: bool = True) -> OverlayGraph:
    """Fuse a folded decode-step graph into overlay operations (see the module docstring) for an overlay of *lanes*
    vector lanes (None: the ops for any), built with or without NORM over each head (*norm_heads*)."""
    return Fuser(graph, max_seq=max_seq, lanes=lanes, norm_heads=norm_heads).run()
