"""A small graph IR: named values (with optional constant payloads), op nodes, a graph."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

__all__ = ["Dim", "Graph", "Node", "Value"]

Dim = int | str  # a concrete size or a symbol such as "P" or "P+1"


@dataclass
class Value:
    name: str
    shape: tuple[Dim, ...] | None
    dtype: str
    const: np.ndarray | None = None

    def describe(self) -> str:
        shp = "?" if self.shape is None else ",".join(str(d) for d in self.shape)
        return f"{self.dtype}[{shp}]"


@dataclass
class Node:
    op: str
    inputs: list[str]  # "" marks an omitted optional input
    outputs: list[str]
    attrs: dict = field(default_factory=dict)
    name: str = ""


@dataclass
class Graph:
    inputs: list[str]
    outputs: list[str]
    nodes: list[Node]
    values: dict[str, Value]
    opset: int = 0
    #: The folded nodes that read the past length (``Shape`` of a past KV input, the specialized
    #: ``attention_mask``), and what depends on them, in order, each with the constant arguments it had:
    #: enough to recompute those constants at another past length (``GraphIndex.at_past_length``).
    past_folds: list = field(default_factory=list)
    #: Constant weights imported pre-quantized (MatMulNBits), by value name: ``matmul_nbits.Prequantized``.
    prequantized: dict = field(default_factory=dict)

    def consts(self) -> dict[str, Value]:
        return {n: v for n, v in self.values.items() if v.const is not None}

    def dump(self) -> str:
        def fmt_attr(v):
            if isinstance(v, np.ndarray):
                return f"array{list(v.shape)}" if v.size > 8 else repr(v.tolist())
            return repr(v)

        used = {i for n in self.nodes for i in n.inputs} | set(self.outputs)
        lines = [f"graph opset={self.opset} nodes={len(self.nodes)}"]
        lines += [f"input  {n}: {self.values[n].describe()}" for n in self.inputs]
        lines += [f"const  {n}: {v.describe()}" for n, v in self.consts().items() if n in used]
        for n in self.nodes:
            attrs = " ".join(f"{k}={fmt_attr(v)}" for k, v in sorted(n.attrs.items()))
            outs = ", ".join(f"{o}: {self.values[o].describe()}" for o in n.outputs)
            lines.append(f"{outs} = {n.op}({', '.join(n.inputs)}){' ' + attrs if attrs else ''}  # {n.name}")
        lines += [f"output {n}: {self.values[n].describe()}" for n in self.outputs]
        return "\n".join(lines) + "\n"

    def verify(self) -> None:
        """Check SSA form and topological order; raise ValueError on the first problem."""
        defined = set(self.inputs) | set(self.consts())
        for n in self.inputs:
            if n not in self.values:
                raise ValueError(f"graph input {n!r} has no value")
        for node in self.nodes:
            for i in node.inputs:
                if i and i not in defined:
                    raise ValueError(f"node {node.name}: input {i!r} is not defined before use")
            for o in node.outputs:
                if not o:  # an optional output left out
                    continue
                if o in defined:
                    raise ValueError(f"node {node.name}: output {o!r} is defined twice")
                if o not in self.values:
                    raise ValueError(f"node {node.name}: output {o!r} has no value")
                defined.add(o)
        for o in self.outputs:
            if o not in defined:
                raise ValueError(f"graph output {o!r} is never produced")
