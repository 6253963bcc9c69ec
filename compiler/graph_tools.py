"""Queries over a folded IR graph that the fusion passes share.

Everything here treats a batch-1, one-token decode step: every non-constant
tensor is a *flat vector* (its elements in row-major order), so ops that keep
the row-major order (Reshape, Squeeze, Transpose of unit dims, ...) are
aliases, and a region of the graph can be identified by *evaluating* it with
the same numpy semantics that constant folding uses.
"""

from __future__ import annotations

import re

import numpy as np

from .ir import Graph, Node
from .onnx_ops import evaluate

__all__ = ["PAST_KV", "PRESENT_KV", "GraphIndex"]

#: The KV cache's graph inputs and outputs, as exporters name them: (layer, "key" | "value").
PAST_KV = re.compile(r"^past_key_values[._](\d+)[._](key|value)$")
PRESENT_KV = re.compile(r"^present[._](\d+)[._](key|value)$")

#: Elementwise ops of one data input whose other inputs are scalar constants: the ops an activation region is made of.
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Tanh", "Sigmoid", "Erf", "Neg", "Exp", "Reciprocal",
               "Gelu", "Relu", "Softplus", "Cast", "Identity", "Abs"}
#: Ops that only relabel the shape of their first input.
_RESHAPING = {"Reshape", "Squeeze", "Unsqueeze", "Flatten", "Identity"}


class GraphIndex:
    """Producers, consumers, dependency sets and region evaluation for one graph."""

    def __init__(self, graph: Graph):
        self.graph = graph
        self.producer: dict[str, Node] = {}
        self.consumers: dict[str, list[Node]] = {}
        for node in graph.nodes:
            for o in node.outputs:
                self.producer[o] = node
            for i in node.inputs:
                if i:
                    self.consumers.setdefault(i, []).append(node)
        self.deps: dict[str, frozenset] = {n: frozenset([n]) for n in graph.inputs}
        for node in graph.nodes:
            d = frozenset().union(*(self.deps.get(i, frozenset()) for i in node.inputs if i))
            for o in node.outputs:
                self.deps[o] = d

    # ---------------------------------------------------------------- values
    def const(self, name: str):
        v = self.graph.values.get(name)
        return None if v is None else v.const

    def is_const(self, name: str) -> bool:
        return self.const(name) is not None

    def shape(self, name: str):
        v = self.graph.values[name]
        if v.const is not None:
            return tuple(v.const.shape)
        return v.shape

    def numel(self, name: str) -> int:
        shp = self.shape(name)
        if shp is None or not all(isinstance(d, int) for d in shp):
            raise ValueError(f"value {name!r} has no concrete shape ({shp})")
        return int(np.prod(shp, dtype=np.int64))

    def scalar(self, name: str) -> float | None:
        c = self.const(name)
        if c is None or c.size != 1:
            return None
        return float(c.reshape(-1)[0])

    # ---------------------------------------------------------------- aliases
    def alias_source(self, name: str) -> str | None:
        """The value *name* merely renames (same elements, same row-major order), or None."""
        node = self.producer.get(name)
        if node is None:
            return None
        op, ins = node.op, node.inputs
        if op in _RESHAPING:
            return ins[0]
        if op == "Cast":
            src = self.graph.values.get(ins[0])
            if src is not None and src.dtype.startswith("float") and self.graph.values[name].dtype.startswith("float"):
                return ins[0]
            return None
        if op == "Transpose":
            shp = self.shape(ins[0])
            perm = node.attrs.get("perm") or list(reversed(range(len(shp))))
            kept = [p for p in perm if shp[p] != 1]
            return ins[0] if kept == sorted(kept) else None
        if op == "Expand" and self.numel(name) == self.numel(ins[0]):
            return ins[0]
        if op == "Where":
            # sdpa exports guard softmax with Where(IsNaN(p), 0, p); the overlay's softmax is never NaN
            guard = self.producer.get(ins[0])
            if guard is not None and guard.op == "IsNaN" and guard.inputs[0] == ins[2]:
                return ins[2]
            c = self.const(ins[0])
            if c is not None and c.all() and self.numel(name) == self.numel(ins[1]):
                return ins[1]
            if c is not None and not c.any() and self.numel(name) == self.numel(ins[2]):
                return ins[2]
        if op in ("Add", "Sub") and len(ins) == 2:
            c = self.const(ins[1])
            if c is not None and not c.any() and self.numel(name) == self.numel(ins[0]):
                return ins[0]
            c = self.const(ins[0])
            if op == "Add" and c is not None and not c.any() and self.numel(name) == self.numel(ins[1]):
                return ins[1]
        if op in ("Mul", "Div") and len(ins) == 2:
            if self.scalar(ins[1]) == 1.0:
                return ins[0]
            if op == "Mul" and self.scalar(ins[0]) == 1.0:
                return ins[1]
        return None

    def resolve(self, name: str) -> str:
        """Follow aliases back to the value that actually holds the data."""
        while True:
            src = self.alias_source(name)
            if src is None or self.is_const(src):
                return name
            name = src

    def node_of(self, name: str) -> Node | None:
        """The producer of *name* after following aliases."""
        return self.producer.get(self.resolve(name))

    def strip_scalar_muls(self, name: str) -> tuple[str, float]:
        """Follow aliases and multiplications/divisions by scalar constants; return (value, product of the factors)."""
        factor = 1.0
        while True:
            name = self.resolve(name)
            node = self.producer.get(name)
            if node is None or node.op not in ("Mul", "Div") or len(node.inputs) != 2:
                return name, factor
            a, b = node.inputs
            if self.scalar(b) is not None and not self.is_const(a):
                factor *= self.scalar(b) if node.op == "Mul" else 1.0 / self.scalar(b)
                name = a
            elif node.op == "Mul" and self.scalar(a) is not None and not self.is_const(b):
                factor *= self.scalar(a)
                name = b
            else:
                return name, factor

    # ---------------------------------------------------------------- evaluation
    def evaluate(self, target: str, feeds: dict[str, np.ndarray]) -> np.ndarray:
        """Value of *target* given *feeds* for some values (constants come from the graph).

        Only the ancestors of *target* up to the fed values are evaluated.
        """
        env = dict(feeds)
        stack = [target]
        while stack:
            name = stack[-1]
            if name in env:
                stack.pop()
                continue
            c = self.const(name)
            if c is not None:
                env[name] = c
                stack.pop()
                continue
            node = self.producer.get(name)
            if node is None:
                raise KeyError(f"value {name!r} is neither fed nor produced")
            missing = [i for i in node.inputs if i and i not in env and not self.is_const(i)]
            if missing:
                stack.extend(missing)
                continue
            args = [(env[i] if i in env else self.const(i)) if i else None for i in node.inputs]
            for o, r in zip(node.outputs, evaluate(node, self.graph.opset, args), strict=False):
                env[o] = r
            stack.pop()
        return env[target]

    def _elementwise_data(self, name: str):
        """Data inputs of the producer of *name* if it is an :data:`ELEMENTWISE` op whose other inputs are
        scalar constants, else None."""
        node = self.producer.get(name)
        if node is None or node.op not in ELEMENTWISE:
            return None
        data = [i for i in node.inputs if i and self.scalar(i) is None]
        if not data or any(self.is_const(i) for i in data):
            return None
        return data

    def _closes(self, name: str, leaf: str) -> bool:
        seen, stack = set(), [name]
        while stack:
            v = stack.pop()
            if v == leaf or v in seen:
                continue
            seen.add(v)
            data = self._elementwise_data(v)
            if data is None:
                return False
            stack.extend(data)
        return True

    def unary_leaf(self, name: str) -> str | None:
        """If *name* is an elementwise function of exactly one non-constant value, return the farthest such value.

        The region grows backwards through :data:`ELEMENTWISE` ops whose other inputs are scalar constants; a
        candidate counts only if every path back from *name* ends at it, so a residual Add behind the input
        does not swallow it.
        """
        first = self._elementwise_data(name)
        if first is None:
            return None
        order, seen = [], set()
        frontier = list(first)
        while frontier:
            nxt = []
            for v in frontier:
                if v in seen:
                    continue
                seen.add(v)
                order.append(v)
                nxt.extend(self._elementwise_data(v) or [])
            frontier = nxt
        for cand in reversed(order):
            if self._closes(name, cand) and self.numel(cand) == self.numel(name):
                return cand
        return None

    def probe(self, name: str, leaf: str, xs: np.ndarray) -> np.ndarray:
        """Evaluate the elementwise function leaf -> name at the points *xs* (one evaluation, broadcast)."""
        shape = self.shape(leaf)
        n = int(np.prod(shape))
        reps = -(-xs.size // n)
        out = []
        dtype = np.dtype(self.graph.values[leaf].dtype)
        padded = np.concatenate([xs, np.zeros(reps * n - xs.size)])
        for r in range(reps):
            feed = padded[r * n:(r + 1) * n].reshape(shape).astype(dtype)
            out.append(np.asarray(self.evaluate(name, {leaf: feed}), np.float64).reshape(-1))
        return np.concatenate(out)[: xs.size]
