"""Fusion: the folded ONNX graph of one decode step becomes a graph of overlay operations.

Every non-constant tensor of a batch-1 decode step is a flat vector. Starting
from the graph outputs, :class:`Fuser` walks backwards and recognises, at each
value, the largest overlay operation that produces it:

* ``table``: a value that depends on ``input_ids`` or ``position_ids`` alone
  (token embeddings, learned positions, rotary cos/sin) is tabulated over its
  whole index range at compile time and gathered by one ``LDROW`` per step;
* ``linear``: MatMul/Gemm by a constant matrix (GEMV);
* ``norm``: RMSNorm (spelled out, or ``RMSNormalization``) and
  ``LayerNormalization``, with their gain;
* ``act``: any elementwise region of one input that *evaluates* to SiLU,
  GELU (erf) or GELU (tanh) on a probe grid, however the exporter spelled it;
* ``rope``: ``x*cos + rotate_half(x)*sin`` or ``RotaryEmbedding``;
* ``attn``: the past/present KV concat, scores, softmax and P.V of a layer
  (or ONNX ``Attention``), checked by evaluating the matched region against a
  reference grouped-query attention; it becomes KVAPPEND + ATTN;
* ``add``/``mul``/``scale``/``addc``/``mulc``: the remaining elementwise arithmetic.

Anything else on a non-constant value raises :class:`CompileError` naming the
node, its op type and opset.
"""

from __future__ import annotations

import hashlib
import math
import re
from dataclasses import dataclass, field

import numpy as np

from .frontend import CompileError
from .graph_tools import GraphIndex
from .ir import Graph

__all__ = ["INDEX_INPUTS", "OverlayGraph", "VOp", "fuse"]

#: Scalar graph inputs a program receives in registers, and the register each lives in.
INDEX_INPUTS = {"input_ids": "token", "position_ids": "position"}
_PRESENT = re.compile(r"^present[._](\d+)[._](key|value)$")
_PAST = re.compile(r"^past_key_values[._](\d+)[._](key|value)$")
#: Activation gates the overlay's ACT instruction computes, as float references for probing.
_GATES = {
    "silu": lambda t: t / (1.0 + np.exp(-t)),
    "gelu_erf": lambda t: 0.5 * t * (1.0 + np.vectorize(math.erf)(t / math.sqrt(2.0))),
    "gelu_tanh": lambda t: 0.5 * t * (1.0 + np.tanh(math.sqrt(2.0 / math.pi) * (t + 0.044715 * t ** 3))),
}
_PROBE = np.linspace(-6.0, 6.0, 97)
#: What fusion turns into overlay instructions, for error messages.
SUPPORTED = ("embedding/position Gather and any function of position_ids (tables), MatMul/Gemm by a constant, Split of "
             "their outputs, LayerNormalization, RMSNormalization or RMSNorm spelled out, elementwise regions equal to "
             "SiLU/GELU, rotary embedding (rotate_half or RotaryEmbedding), attention over past_key_values (or "
             "Attention), Add/Sub/Mul/Div/Neg of vectors and constants")


def _digest(arr: np.ndarray) -> str:
    """Content hash of an array, by rows so that a transposed view is never copied whole."""
    h = hashlib.sha1(str(arr.dtype).encode())
    if arr.ndim < 2:
        h.update(np.ascontiguousarray(arr).tobytes())
    else:
        step = max(1, (1 << 22) // max(1, arr[0].nbytes))
        for i in range(0, arr.shape[0], step):
            h.update(np.ascontiguousarray(arr[i:i + step]).tobytes())
    return h.hexdigest()


@dataclass
class VOp:
    """One overlay-level operation: writes vector *out* from vectors *ins*."""

    kind: str
    out: str
    ins: list
    attrs: dict = field(default_factory=dict)
    source: str = ""  # ONNX node the op came from

    def describe(self) -> str:
        attrs = " ".join(f"{k}={_short(v)}" for k, v in sorted(self.attrs.items()))
        return f"{self.out} = {self.kind}({', '.join(self.ins)}) {attrs}  # {self.source}"


def _short(v):
    if isinstance(v, np.ndarray):
        return f"array{list(v.shape)}"
    if isinstance(v, float):
        return f"{v:.6g}"
    return repr(v)


@dataclass
class OverlayGraph:
    """The fused program: vector lengths, operations in execution order, and the tensors they need."""

    lengths: dict = field(default_factory=dict)  # vector name -> elements
    ops: list = field(default_factory=list)
    matrices: dict = field(default_factory=dict)  # name -> float [rows, cols] (GEMV weights, out x in)
    tables: dict = field(default_factory=dict)  # name -> (index kind, float [entries, cols])
    consts: dict = field(default_factory=dict)  # name -> float [n] (gains, biases)
    logits: str = ""
    kv: dict = field(default_factory=dict)  # layer -> {"kv_heads", "head_dim", "present": (key, value)}
    inputs: dict = field(default_factory=dict)  # ONNX input -> (vector, shape): vectors the host writes each run
    outputs: dict = field(default_factory=dict)  # ONNX output -> (vector, shape): vectors stored after each run

    def dump(self) -> str:
        lines = [(f"overlay graph: {len(self.ops)} ops, {len(self.matrices)} matrices, {len(self.tables)} tables, "
                  f"{len(self.consts)} constant vectors")]
        lines += [f"matrix {n}: {list(m.shape)}" for n, m in self.matrices.items()]
        lines += [f"table  {n}: {k} {list(t.shape)}" for n, (k, t) in self.tables.items()]
        lines += [f"const  {n}: [{c.size}]" for n, c in self.consts.items()]
        lines += [f"[{self.lengths[op.out]}] {op.describe()}" for op in self.ops]
        lines.append(f"logits {self.logits}; kv layers {sorted(self.kv)}")
        return "\n".join(lines) + "\n"


class Fuser:
    def __init__(self, graph: Graph, *, max_seq: int, logits: str = "logits"):
        self.g = graph
        self.ix = GraphIndex(graph)
        self.max_seq = max_seq
        self.out = OverlayGraph()
        self.done: dict[str, str] = {}  # resolved ONNX value -> vector name
        self.logits_name = logits
        self.present_done: set = set()
        self._dedupe: dict = {}
        self.table_vecs: dict = {}
        self._half_tables: dict = {}

    # ------------------------------------------------------------ helpers
    def fail(self, name: str, why: str):
        node = self.ix.producer.get(name)
        if node is None:
            raise CompileError(f"value {name!r}: {why}")
        raise CompileError(f"node {node.name}: op {node.op} (opset {self.g.opset}) {why}")

    def emit(self, op_kind, out_value, ins, source, **attrs) -> str:
        name = f"v{len(self.out.ops)}_{op_kind}"
        self.out.lengths[name] = self.ix.numel(out_value)
        self.out.ops.append(VOp(op_kind, name, list(ins), attrs, source))
        return name

    def _store(self, table: dict, prefix: str, array, key=None):
        """Add *array* to a tensor table, sharing identical tensors (tied embeddings, repeated constants).

        Matrices keep their dtype (float32 from the model): a float64 copy of every weight would double the
        compiler's memory for nothing, since quantization works a block of rows at a time.
        """
        arr = np.asarray(array)
        digest = (prefix, arr.shape, _digest(arr)) if key is None else key
        if digest in self._dedupe:
            return self._dedupe[digest]
        name = f"{prefix}{len(table)}"
        table[name] = arr
        self._dedupe[digest] = name
        return name

    def const_vector(self, name: str, length: int) -> str:
        c = self.ix.const(name).astype(np.float64)
        try:
            flat = np.broadcast_to(c.reshape(c.shape[-1:] if c.ndim else ()), (length,)) if c.size <= length else None
        except ValueError:
            flat = None
        if flat is None or c.size not in (1, length):
            raise CompileError(f"constant {name!r} of shape {list(c.shape)} does not broadcast onto a vector of {length}")
        return self._store(self.out.consts, "c", flat)

    # ------------------------------------------------------------ entry
    def run(self) -> OverlayGraph:
        """Fuse every graph output: ``logits`` (a decoder), ``present.N.*`` (satisfied by the on-chip KV
        cache) and any other computed output (a small graph of supported ops)."""
        for o in self.g.outputs:
            if _PRESENT.match(o):
                continue
            vec = self.vector(o)
            self.out.outputs[o] = (vec, list(self.ix.shape(o)))
            if o == self.logits_name:
                self.out.logits = vec
        for o in self.g.outputs:
            if _PRESENT.match(o) and o not in self.present_done:
                raise CompileError(f"output {o!r} is not produced by an attention the compiler recognised "
                                   "(the KV cache must stay on chip)")
        return self.out

    def vector(self, name: str) -> str:
        """The overlay vector holding ONNX value *name*, emitting the ops that produce it."""
        if self.ix.is_const(name):
            self.fail(name, "is a constant where the overlay needs a computed vector")
        r = self.ix.resolve(name)
        if r in self.done:
            return self.done[r]
        vec = self._match(r)
        self.done[r] = vec
        return vec

    # ------------------------------------------------------------ matching
    def _match(self, v: str) -> str:
        deps = self.ix.deps.get(v, frozenset())
        if v in self.g.inputs:
            return self._input(v)
        if len(deps) == 1 and next(iter(deps)) in INDEX_INPUTS:
            got = self._table(v, next(iter(deps)))
            if got is not None:
                return got
        node = self.ix.producer[v]
        for matcher in (self._attention, self._rope, self._norm, self._act):
            got = matcher(v, node)
            if got is not None:
                return got
        op = node.op
        if op in ("MatMul", "Gemm"):
            return self._linear(v, node)
        if op in ("Add", "Sub", "Mul", "Div"):
            return self._arith(v, node)
        if op == "Neg":
            return self.emit("scale", v, [self.vector(node.inputs[0])], node.name, factor=-1.0)
        if op == "Split":
            return self._split(v, node)
        self.fail(v, f"is not supported on the overlay; supported: {SUPPORTED}")

    def _input(self, v: str) -> str:
        """A float graph input (not a token, position or KV input): the host writes it as a vector record."""
        val = self.g.values[v]
        if v in INDEX_INPUTS or _PAST.match(v) or not val.dtype.startswith("float"):
            raise CompileError(f"graph input {v!r} ({val.describe()}) cannot be read by the overlay as a vector")
        name = self.emit("input", v, [], v, name=v)
        self.out.inputs[v] = (name, list(self.ix.shape(v)))
        return name

    def _plain_gather(self, v: str, index: str):
        """The constant table of ``Gather(table, index)`` if that is what *v* is."""
        pnode = self.ix.producer.get(self.ix.resolve(v))
        if (pnode is not None and pnode.op == "Gather" and pnode.attrs.get("axis", 0) == 0
                and self.ix.is_const(pnode.inputs[0]) and self.ix.resolve(pnode.inputs[1]) == index):
            data = self.ix.const(pnode.inputs[0])
            return data.reshape(data.shape[0], -1)
        return None

    def _table(self, v: str, index: str):
        """A value of the token or the position alone: a plain embedding Gather, or any cone of the position
        (tabulated over every position below max_seq). Other token-only values are computed normally."""
        node = self.ix.producer[v]
        n = self.ix.numel(v)
        table = self._plain_gather(v, index)
        if table is None:
            if index != "position_ids":
                return None
            table = self._over_positions(v)
        if table.shape[1] != n:
            self.fail(v, f"tabulates to rows of {table.shape[1]} where the vector has {n} elements")
        name = self._store_table(INDEX_INPUTS[index], table)
        return self.emit("table", v, [], node.name, table=name)

    def _over_positions(self, value) -> np.ndarray:
        """[max_seq, numel] table of a value of position_ids alone, evaluated at every position."""
        shape = self.g.values["position_ids"].shape
        dtype = np.dtype(self.g.values["position_ids"].dtype)
        return np.stack([self.ix.evaluate(value, {"position_ids": np.full(shape, p, dtype)}).reshape(-1)
                         for p in range(self.max_seq)])

    def _store_table(self, kind, table):
        arr = np.asarray(table)
        key = ("t", kind, arr.shape, _digest(arr))
        if key in self._dedupe:
            return self._dedupe[key]
        name = f"t{len(self.out.tables)}"
        self.out.tables[name] = (kind, arr)
        self._dedupe[key] = name
        return name

    def _linear(self, v, node) -> str:
        a, b = node.inputs[0], node.inputs[1]
        w = self.ix.const(b)
        if w is None or self.ix.is_const(a):
            self.fail(v, "multiplies two computed tensors outside a recognised attention")
        if w.ndim != 2:
            self.fail(v, f"has a weight of rank {w.ndim}; the overlay's GEMV takes 2-D weights")
        w, bias = self._weight(v, node)
        k, n = w.shape
        x = self.vector(a)
        if self.out.lengths[x] != k:
            self.fail(v, f"multiplies a vector of {self.out.lengths[x]} by a {k}x{n} matrix")
        mat = self._store(self.out.matrices, "w", w.T)
        y = self.emit("linear", v, [x], node.name, matrix=mat)
        if bias is not None:
            y = self.emit("addc", v, [y], node.name, const=self._store(self.out.consts, "c", bias.copy()))
        return y

    def _weight(self, v, node):
        """([K, N] weight, [N] bias or None) of a MatMul or Gemm by a constant matrix."""
        w, bias = self.ix.const(node.inputs[1]), None
        if node.op == "Gemm":
            if node.attrs.get("transA", 0):
                self.fail(v, "with transA=1 is not supported")
            w = w.T if node.attrs.get("transB", 0) else w
            if float(node.attrs.get("alpha", 1.0)) != 1.0:  # no copy of the weights for the common alpha = 1
                w = w * float(node.attrs.get("alpha", 1.0))
            if len(node.inputs) > 2 and node.inputs[2]:
                c = self.ix.const(node.inputs[2])
                if c is None:
                    self.fail(v, "has a computed bias")
                bias = np.broadcast_to(c.reshape(-1) * float(node.attrs.get("beta", 1.0)), (w.shape[1],))
        return w, bias

    def _split(self, v, node) -> str:
        """Split of a GEMV output along its features: the GEMV is split by rows instead."""
        src = node.inputs[0]
        shp = self.ix.shape(src)
        axis = node.attrs.get("axis", 0) % len(shp)
        if any(d != 1 for i, d in enumerate(shp) if i != axis):
            self.fail(v, "splits along a unit axis pattern the overlay does not support")
        sizes = [self.ix.numel(o) for o in node.outputs]
        k = node.outputs.index(v)
        lo = sum(sizes[:k])
        linear, bias = self._split_source(src)
        if linear is None:
            self.fail(v, "splits a vector that is not the output of a constant-matrix product")
        lnode = self.ix.producer[linear]
        w, gemm_bias = self._weight(v, lnode)
        bias = gemm_bias if gemm_bias is not None else bias
        x = self.vector(lnode.inputs[0])
        mat = self._store(self.out.matrices, "w", w.T[lo:lo + sizes[k]])
        y = self.emit("linear", v, [x], lnode.name, matrix=mat)
        if bias is not None:
            cname = self._store(self.out.consts, "c", np.asarray(bias, np.float64)[lo:lo + sizes[k]].copy())
            y = self.emit("addc", v, [y], node.name, const=cname)
        return y

    def _split_source(self, src):
        """(GEMV output value, bias array or None) behind a split vector."""
        r = self.ix.resolve(src)
        node = self.ix.producer.get(r)
        bias = None
        if node is not None and node.op == "Add" and len(node.inputs) == 2:
            for i, j in ((0, 1), (1, 0)):
                c = self.ix.const(node.inputs[j])
                if c is not None and not self.ix.is_const(node.inputs[i]):
                    bias, r = c.reshape(-1), self.ix.resolve(node.inputs[i])
                    node = self.ix.producer.get(r)
                    break
        if node is not None and node.op in ("MatMul", "Gemm") and self.ix.is_const(node.inputs[1]):
            if bias is not None:
                bias = np.broadcast_to(bias, (self.ix.numel(r),))
            return r, bias
        return None, None

    def _arith(self, v, node) -> str:
        op = node.op
        a, b = node.inputs
        ca, cb = self.ix.const(a), self.ix.const(b)
        n = self.ix.numel(v)
        if ca is not None and cb is not None:
            self.fail(v, "has only constant inputs (constant folding should have removed it)")
        if ca is None and cb is None:
            if self.ix.numel(a) != n or self.ix.numel(b) != n:
                self.fail(v, f"broadcasts vectors of {self.ix.numel(a)} and {self.ix.numel(b)} elements")
            if op == "Add":
                return self.emit("add", v, [self.vector(a), self.vector(b)], node.name)
            if op == "Mul":
                return self.emit("mul", v, [self.vector(a), self.vector(b)], node.name)
            if op == "Sub":
                nb = self.emit("scale", b, [self.vector(b)], node.name, factor=-1.0)
                return self.emit("add", v, [self.vector(a), nb], node.name)
            self.fail(v, "divides by a computed vector")
        var, c, c_first = (b, ca, True) if ca is not None else (a, cb, False)
        if self.ix.numel(var) != n:
            self.fail(v, f"broadcasts a vector of {self.ix.numel(var)} elements to {n}")
        if c.size == 1:
            s = float(c.reshape(-1)[0])
            if op == "Mul":
                return self.emit("scale", v, [self.vector(var)], node.name, factor=s)
            if op == "Div" and not c_first:
                return self.emit("scale", v, [self.vector(var)], node.name, factor=1.0 / s)
            if op == "Sub":
                x = self.vector(var)
                if c_first:
                    x = self.emit("scale", v, [x], node.name, factor=-1.0)
                    s = -s
                cname = self._store(self.out.consts, "c", np.full(n, -s))
                return self.emit("addc", v, [x], node.name, const=cname)
            if op == "Add":
                cname = self._store(self.out.consts, "c", np.full(n, s))
                return self.emit("addc", v, [self.vector(var)], node.name, const=cname)
            self.fail(v, "divides a constant by a vector")
        cname_src = a if c_first else b
        if op == "Mul":
            norm = self._norm_core(var)
            if norm is not None and len(self.ix.consumers.get(self.ix.resolve(var), [])) <= 1:
                x, eps, kind = norm
                g = self.const_vector(cname_src, n)
                return self.emit("norm", v, [self.vector(x)], node.name, gain=g, eps=eps, kind=kind)
            return self.emit("mulc", v, [self.vector(var)], node.name, const=self.const_vector(cname_src, n))
        if op == "Add":
            return self.emit("addc", v, [self.vector(var)], node.name, const=self.const_vector(cname_src, n))
        if op == "Sub" and not c_first:
            cname = self._store(self.out.consts, "c", -self.out.consts[self.const_vector(cname_src, n)])
            return self.emit("addc", v, [self.vector(var)], node.name, const=cname)
        if op == "Div" and not c_first:
            cv = self.ix.const(cname_src).astype(np.float64)
            cname = self._store(self.out.consts, "c", np.broadcast_to(1.0 / cv.reshape(-1), (n,)).copy())
            return self.emit("mulc", v, [self.vector(var)], node.name, const=cname)
        self.fail(v, "combines a constant and a vector in a way the overlay does not support")

    # ------------------------------------------------------------ activations
    def _act(self, v, node):
        if node.op not in ("Mul", "Gelu", "Div", "Add"):
            return None
        leaf = self.ix.unary_leaf(v)
        if leaf is None:
            return None
        got = self.ix.probe(v, leaf, _PROBE)
        # the closest gate, and close at float32 precision: GELU's erf and tanh forms differ by only ~3e-4
        err = {func: float(np.max(np.abs(got - ref(_PROBE)))) for func, ref in _GATES.items()}
        func = min(err, key=err.get)
        if err[func] <= 1e-5 * (1 + np.max(np.abs(_PROBE))):
            return self.emit("act", v, [self.vector(leaf)], node.name, func=func)
        return None

    # ------------------------------------------------------------ norms
    def _norm(self, v, node):
        if node.op == "LayerNormalization":
            x, scale = node.inputs[0], node.inputs[1]
            bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2] else None
            return self._norm_op(v, node, x, scale, bias, "layer", float(node.attrs.get("epsilon", 1e-5)))
        if node.op == "RMSNormalization":
            return self._norm_op(v, node, node.inputs[0], node.inputs[1], None, "rms",
                                 float(node.attrs.get("epsilon", 1e-5)))
        core = self._norm_core(v)
        if core is None:
            return None
        x, eps, kind = core
        n = self.ix.numel(v)
        g = self._store(self.out.consts, "c", np.ones(n))
        return self.emit("norm", v, [self.vector(x)], node.name, gain=g, eps=eps, kind=kind)

    def _norm_op(self, v, node, x, scale, bias, kind, eps):
        shp = self.ix.shape(x)
        axis = node.attrs.get("axis", -1) % len(shp)
        if any(d != 1 for d in shp[:axis]) or axis != len(shp) - 1:
            self.fail(v, "normalizes over more than the last axis")
        n = self.ix.numel(v)
        if not self.ix.is_const(scale):
            self.fail(v, "has a computed scale")
        g = self.const_vector(scale, n)
        y = self.emit("norm", v, [self.vector(x)], node.name, gain=g, eps=eps, kind=kind)
        if bias is not None:
            y = self.emit("addc", v, [y], node.name, const=self.const_vector(bias, n))
        return y

    def _norm_core(self, v):
        """RMSNorm without gain spelled out: x * rsqrt(mean(x^2) + eps) or x / sqrt(mean(x^2) + eps)."""
        node = self.ix.producer.get(self.ix.resolve(v))
        if node is None or node.op not in ("Mul", "Div") or len(node.inputs) != 2:
            return None
        pairs = [(0, 1), (1, 0)] if node.op == "Mul" else [(0, 1)]
        for i, j in pairs:
            x, r = node.inputs[i], node.inputs[j]
            if self.ix.is_const(x) or self.ix.is_const(r):
                continue
            mean = self.ix.unary_leaf(r)
            mnode = self.ix.producer.get(mean) if mean else None
            if mnode is None or mnode.op != "ReduceMean":
                continue
            sq = mnode.inputs[0]
            leaf = self.ix.unary_leaf(sq)
            if leaf is None or self.ix.resolve(leaf) != self.ix.resolve(x):
                continue
            if not np.allclose(self.ix.probe(sq, leaf, _PROBE), _PROBE ** 2, rtol=1e-5, atol=1e-6):
                continue
            if self.ix.numel(mean) != 1:
                continue
            ts = np.array([0.0, 0.01, 0.5, 2.0, 37.0])
            f = self.ix.probe(r, mean, ts)
            if node.op == "Mul":
                eps = 1.0 / f[0] ** 2 if f[0] > 0 else -1
                want = 1.0 / np.sqrt(ts + eps)
            else:
                eps = f[0] ** 2
                want = np.sqrt(ts + eps)
            if eps > 0 and np.allclose(f, want, rtol=1e-4):
                return x, float(np.float32(eps)), "rms"
        return None

    # ------------------------------------------------------------ rotary
    def _rope(self, v, node):
        if node.op == "RotaryEmbedding":
            return self._rope_op(v, node)
        if node.op != "Add" or len(node.inputs) != 2:
            return None
        for i, j in ((0, 1), (1, 0)):
            m1, m2 = self.ix.node_of(node.inputs[i]), self.ix.node_of(node.inputs[j])
            if m1 is None or m2 is None or m1.op != "Mul" or m2.op != "Mul":
                continue
            for xi in (0, 1):
                x, cos = m1.inputs[xi], m1.inputs[1 - xi]
                for ri in (0, 1):
                    rot, sin = m2.inputs[ri], m2.inputs[1 - ri]
                    got = self._rotate_half(rot, x)
                    if got is None:
                        continue
                    return self._rope_emit(v, node, x, cos, sin, got)
        return None

    def _rotate_half(self, rot, x):
        """Head dim if *rot* is Concat(-x[..., d/2:], x[..., :d/2]) along the last axis."""
        cat = self.ix.node_of(rot)
        if cat is None or cat.op != "Concat" or len(cat.inputs) != 2:
            return None
        shp = self.ix.shape(x)
        if cat.attrs.get("axis") % len(shp) != len(shp) - 1:
            return None
        d = shp[-1]
        neg = self.ix.node_of(cat.inputs[0])
        if neg is None or neg.op != "Neg":
            return None
        hi, lo = self.ix.node_of(neg.inputs[0]), self.ix.node_of(cat.inputs[1])
        for sl, want in ((hi, (d // 2, d)), (lo, (0, d // 2))):
            if sl is None or sl.op != "Slice" or self.ix.resolve(sl.inputs[0]) != self.ix.resolve(x):
                return None
            starts, ends = self.ix.const(sl.inputs[1]), self.ix.const(sl.inputs[2])
            axes = self.ix.const(sl.inputs[3]) if len(sl.inputs) > 3 and sl.inputs[3] else None
            if starts is None or ends is None or starts.size != 1:
                return None
            if axes is not None and int(axes.reshape(-1)[0]) % len(shp) != len(shp) - 1:
                return None
            s, e = int(starts.reshape(-1)[0]), min(int(ends.reshape(-1)[0]), d)
            if (s, e) != want:
                return None
        return d

    def _half_table(self, value, d):
        """The rotary table behind *value*: rows of d/2 (HF tables repeat the half: cat(freqs, freqs))."""
        key = (self.ix.resolve(value), d)
        if key not in self._half_tables:
            self._half_tables[key] = self._half_table_uncached(value, d)
        return self._half_tables[key]

    def _half_table_uncached(self, value, d):
        deps = self.ix.deps.get(value, frozenset())
        if self.ix.is_const(value):
            c = self.ix.const(value).reshape(-1)
            if c.size != d or not np.array_equal(c[: d // 2], c[d // 2:]):
                return None
            return self._store_table("position", np.tile(c[: d // 2], (self.max_seq, 1)))
        if deps != {"position_ids"}:
            return None
        rows = self._over_positions(value)
        if rows.shape[1] != d or not np.array_equal(rows[:, : d // 2], rows[:, d // 2:]):
            return None
        return self._store_table("position", rows[:, : d // 2])

    def _rope_emit(self, v, node, x, cos, sin, d):
        ct, st = self._half_table(cos, d), self._half_table(sin, d)
        if ct is None or st is None:
            self.fail(v, "looks like a rotary embedding, but its cos/sin are not tables of the position")
        n = self.ix.numel(v)
        xv = self.vector(x)
        c, s = self._table_vec(ct, node.name), self._table_vec(st, node.name)
        return self.emit("rope", v, [xv, c, s], node.name, heads=n // d, head_dim=d, mode="half")

    def _table_vec(self, table, source):
        """One LDROW per table and step, shared by every op that reads it (q and k of every layer)."""
        if table not in self.table_vecs:
            name = f"v{len(self.out.ops)}_table"
            self.out.lengths[name] = self.out.tables[table][1].shape[1]
            self.out.ops.append(VOp("table", name, [], {"table": table}, source))
            self.table_vecs[table] = name
        return self.table_vecs[table]

    def _rope_op(self, v, node):
        x, cos_cache, sin_cache = node.inputs[:3]
        pos = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3] else None
        if pos is None or self.ix.resolve(pos) != "position_ids":
            self.fail(v, "needs position_ids as its position input")
        if node.attrs.get("rotary_embedding_dim", 0):
            self.fail(v, "with partial rotation (rotary_embedding_dim) is not supported")
        cc, sc = self.ix.const(cos_cache), self.ix.const(sin_cache)
        if cc is None or sc is None:
            self.fail(v, "needs constant cos/sin caches")
        half = cc.shape[-1]
        d = 2 * half
        n = self.ix.numel(v)
        if cc.shape[0] < self.max_seq:
            self.fail(v, f"has a cos cache of {cc.shape[0]} positions, fewer than max_seq={self.max_seq}")
        ct = self._store_table("position", cc[: self.max_seq].reshape(self.max_seq, half))
        st = self._store_table("position", sc[: self.max_seq].reshape(self.max_seq, half))
        xv = self.vector(x)
        c, s = self._table_vec(ct, node.name), self._table_vec(st, node.name)
        mode = "interleaved" if node.attrs.get("interleaved", 0) else "half"
        return self.emit("rope", v, [xv, c, s], node.name, heads=n // d, head_dim=d, mode=mode)

    # ------------------------------------------------------------ attention
    def _kv_concat(self, value):
        """(layer, kind, past input, new value, present output) if *value* is Concat(past_key_values.N.*, new)."""
        node = self.ix.producer.get(value)
        if node is None or node.op != "Concat" or len(node.inputs) != 2:
            return None
        m = _PAST.match(node.inputs[0])
        if not m:
            return None
        return int(m.group(1)), m.group(2), node.inputs[0], node.inputs[1], node.outputs[0]

    def _find_concat(self, value, budget=12):
        """Walk back from *value* through single-input layout ops (repeat_kv, transposes, scalar scales) to a KV concat."""
        seen = 0
        while seen < budget:
            seen += 1
            got = self._kv_concat(value)
            if got is not None:
                return got
            node = self.ix.producer.get(value)
            if node is None:
                return None
            data = [i for i in node.inputs if i and not self.ix.is_const(i)]
            if len(data) != 1:
                return None
            value = data[0]
        return None

    def _attention(self, v, node):
        if node.op == "Attention":
            return self._attention_op(v, node)
        if node.op != "MatMul":
            return None
        p, vside = node.inputs
        soft = self.ix.node_of(p)
        if soft is None or soft.op != "Softmax":
            return None
        vcat = self._find_concat(vside)
        if vcat is None or vcat[1] != "value":
            return None
        scores, mask = self._split_mask(soft.inputs[0])
        sc, _ = self.ix.strip_scalar_muls(scores)
        mm = self.ix.producer.get(sc)
        if mm is None or mm.op != "MatMul":
            return None
        q, _ = self.ix.strip_scalar_muls(mm.inputs[0])
        kcat = self._find_concat(mm.inputs[1])
        if kcat is None or kcat[1] != "key" or kcat[0] != vcat[0]:
            return None
        layer = kcat[0]
        past_shape = self.g.values[kcat[2]].shape  # [1, kv_heads, past, head_dim]
        kvh, hd = past_shape[1], past_shape[3]
        nq = self.ix.numel(q)
        if nq % hd or (nq // hd) % kvh:
            self.fail(v, f"has {nq} query elements, not a multiple of {kvh} KV heads of {hd}")
        qh = nq // hd
        if mask is not None:
            self._check_mask(v, mask)
        scale = self._attention_scale(v, q, kcat, vcat, qh, kvh, hd, mask)
        return self._attention_emit(v, node.name, q, kcat, vcat, layer, qh, kvh, hd, scale)

    def _split_mask(self, scores):
        """(scores, additive mask or None): the mask is the Add operand that does not reach a score MatMul."""
        snode = self.ix.node_of(scores)
        if snode is None or snode.op != "Add":
            return scores, None
        for i, j in ((0, 1), (1, 0)):
            s = self.ix.producer.get(self.ix.strip_scalar_muls(snode.inputs[i])[0])
            if s is not None and s.op == "MatMul" and not self.ix.is_const(s.inputs[1]):
                return snode.inputs[i], snode.inputs[j]
        return scores, None

    def _check_mask(self, v, mask):
        c = self.ix.const(mask)
        if c is None:
            deps = self.ix.deps.get(mask, frozenset())
            if deps - {"position_ids"}:
                self.fail(v, f"adds a computed attention mask that depends on {sorted(deps)}")
            return
        if not np.all(c == c.reshape(-1)[0]):
            self.fail(v, "adds an attention mask that hides some positions of the cache (only full causal "
                         "attention over the cache is supported)")

    def _attention_scale(self, v, q, kcat, vcat, qh, kvh, hd, mask):
        """Numerically identify the matched region as softmax(scale * q.K^T) V; return scale."""
        rng = np.random.default_rng(0)
        past = self.g.values[kcat[2]].shape[2]
        feeds = {}
        for name in (q, kcat[3], vcat[3], kcat[2], vcat[2]):
            shp = self.ix.shape(name)
            feeds[name] = rng.standard_normal(shp).astype(np.float32)
        if mask is not None and not self.ix.is_const(mask):
            shape = self.g.values["position_ids"].shape
            feeds["position_ids"] = np.full(shape, past, np.dtype(self.g.values["position_ids"].dtype))
        got = np.asarray(self.ix.evaluate(v, feeds), np.float64).reshape(-1)
        K = np.concatenate([feeds[kcat[2]].reshape(kvh, past, hd),
                            feeds[kcat[3]].reshape(kvh, 1, hd)], axis=1).astype(np.float64)
        V = np.concatenate([feeds[vcat[2]].reshape(kvh, past, hd),
                            feeds[vcat[3]].reshape(kvh, 1, hd)], axis=1).astype(np.float64)
        Q = feeds[q].reshape(qh, hd).astype(np.float64)
        raw = np.stack([K[h // (qh // kvh)] @ Q[h] for h in range(qh)])

        def ref(s):
            z = raw * s
            p = np.exp(z - z.max(axis=1, keepdims=True))
            p /= p.sum(axis=1, keepdims=True)
            return np.stack([p[h] @ V[h // (qh // kvh)] for h in range(qh)]).reshape(-1)

        # the scale that reproduces the region's softmax: solve on the first head's probabilities
        for s in self._scale_candidates(v, hd):
            if np.allclose(got, ref(s), rtol=1e-3, atol=1e-4):
                return s
        self.fail(v, "looks like attention over the KV cache, but evaluating it does not match "
                     "softmax(scale * q.K^T) V with grouped-query heads")

    def _scale_candidates(self, v, hd):
        out = [1.0 / math.sqrt(hd), 1.0]
        node = self.ix.producer.get(v)
        soft = self.ix.node_of(node.inputs[0])
        scores, _ = self._split_mask(soft.inputs[0])
        sc, post = self.ix.strip_scalar_muls(scores)
        mm = self.ix.producer[sc]
        _, qf = self.ix.strip_scalar_muls(mm.inputs[0])
        kf = 1.0
        value = mm.inputs[1]
        for _ in range(12):
            value, f = self.ix.strip_scalar_muls(value)
            kf *= f
            n = self.ix.producer.get(value)
            if n is None or self._kv_concat(value) is not None:
                break
            data = [i for i in n.inputs if i and not self.ix.is_const(i)]
            if len(data) != 1:
                break
            value = data[0]
        return [post * qf * kf, *out]

    def _attention_emit(self, v, source, q, kcat, vcat, layer, qh, kvh, hd, scale):
        if layer in self.out.kv:
            self.fail(v, f"is a second attention over the KV cache of layer {layer}")
        qv = self.vector(q)
        kv_, vv = self.vector(kcat[3]), self.vector(vcat[3])
        if self.out.lengths[kv_] != kvh * hd or self.out.lengths[vv] != kvh * hd:
            self.fail(v, f"appends keys/values of {self.out.lengths[kv_]}/{self.out.lengths[vv]} elements; "
                         f"the cache holds {kvh} heads of {hd}")
        self.out.kv[layer] = {"kv_heads": kvh, "head_dim": hd, "present": [kcat[4], vcat[4]]}
        self.present_done.update(kcat[4:5] + vcat[4:5])
        out = self.emit("attn", v, [qv, kv_, vv], source, layer=layer, q_heads=qh, kv_heads=kvh, head_dim=hd,
                        scale=float(scale))
        self.out.lengths[out] = qh * hd
        return out

    def _attention_op(self, v, node):
        """ONNX Attention (opset 23+) with past_key/past_value inputs."""
        if v != node.outputs[0]:
            self.fail(v, "uses an Attention output other than Y")
        ins = list(node.inputs) + [""] * (6 - len(node.inputs))
        q, k, val, mask, pk, pv = ins[:6]
        if not pk or not pv:
            self.fail(v, "has no past_key/past_value: the overlay keeps the KV cache on chip")
        mk, mv = _PAST.match(pk), _PAST.match(pv)
        if not mk or not mv or mk.group(1) != mv.group(1):
            self.fail(v, "takes its past KV from somewhere other than the past_key_values.N inputs")
        if node.attrs.get("softcap", 0.0) or node.attrs.get("qk_matmul_output_mode", 0):
            self.fail(v, "uses softcap or qk_matmul_output_mode, which the overlay does not support")
        if mask:
            self._check_mask(v, mask)
        layer = int(mk.group(1))
        past_shape = self.g.values[pk].shape
        kvh, hd = past_shape[1], past_shape[3]
        qh = self.ix.numel(q) // hd
        scale = node.attrs.get("scale")
        scale = 1.0 / math.sqrt(hd) if scale is None else float(scale)
        outs = list(node.outputs) + ["", ""]
        kcat = (layer, "key", pk, k, outs[1])
        vcat = (layer, "value", pv, val, outs[2])
        return self._attention_emit(v, node.name, q, kcat, vcat, layer, qh, kvh, hd, scale)


def fuse(graph: Graph, *, max_seq: int) -> OverlayGraph:
    """Fuse a folded decode-step graph into overlay operations (see the module docstring)."""
    return Fuser(graph, max_seq=max_seq).run()



def run_float(og: OverlayGraph, tokens, *, observe=None, feeds=None) -> list:
    """Evaluate *og* in float64 on a token sequence (one step per token); return the logits of every step.

    This is the fused program before quantization: it separates fusion errors from numerics. *observe*,
    if given, is called as ``observe(op, inputs)`` before every op (calibration statistics).
    """
    kv = {layer: ([], []) for layer in og.kv}
    out = []
    for pos, tok in enumerate(tokens):
        env = {}
        for op in og.ops:
            ins = [env[v] for v in op.ins]
            if observe is not None:
                observe(op, ins)
            a = op.attrs
            if op.kind == "input":
                y = np.asarray(feeds[a["name"]], np.float64)
            elif op.kind == "table":
                kind, t = og.tables[a["table"]]
                y = t[tok if kind == "token" else pos]
            elif op.kind == "linear":
                y = og.matrices[a["matrix"]] @ ins[0]
            elif op.kind == "norm":
                x = ins[0]
                if a["kind"] == "layer":
                    x = x - x.mean()
                y = x / np.sqrt(np.mean(x * x) + a["eps"]) * og.consts[a["gain"]]
            elif op.kind == "act":
                y = _GATES[a["func"]](ins[0])
            elif op.kind in ("add", "mul"):
                y = ins[0] + ins[1] if op.kind == "add" else ins[0] * ins[1]
            elif op.kind in ("addc", "mulc"):
                c = og.consts[a["const"]]
                y = ins[0] + c if op.kind == "addc" else ins[0] * c
            elif op.kind == "scale":
                y = ins[0] * a["factor"]
            elif op.kind == "rope":
                h, d = a["heads"], a["head_dim"]
                x = ins[0].reshape(h, d)
                c, s = ins[1], ins[2]
                if a["mode"] == "half":
                    x1, x2 = x[:, : d // 2], x[:, d // 2:]
                    y = np.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=1).reshape(-1)
                else:
                    y = np.empty_like(x)
                    y[:, 0::2] = x[:, 0::2] * c - x[:, 1::2] * s
                    y[:, 1::2] = x[:, 1::2] * c + x[:, 0::2] * s
                    y = y.reshape(-1)
            elif op.kind == "attn":
                qh, kvh, d = a["q_heads"], a["kv_heads"], a["head_dim"]
                ks, vs = kv[a["layer"]]
                ks.append(ins[1].reshape(kvh, d))
                vs.append(ins[2].reshape(kvh, d))
                K, V = np.stack(ks, 1), np.stack(vs, 1)
                q = ins[0].reshape(qh, d) * a["scale"]
                heads = []
                for h in range(qh):
                    s = K[h // (qh // kvh)] @ q[h]
                    p = np.exp(s - s.max())
                    heads.append(p @ V[h // (qh // kvh)] / p.sum())
                y = np.concatenate(heads)
            else:
                raise CompileError(f"run_float: unknown overlay op {op.kind!r}")
            env[op.out] = np.asarray(y, np.float64).reshape(-1)
        out.append(env[og.logits] if og.logits else {o: env[v] for o, (v, _) in og.outputs.items()})
    return out
