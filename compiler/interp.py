"""Reference numpy interpreter of the IR (the same op semantics that constant folding uses)."""

from __future__ import annotations

import numpy as np

from .ir import Graph
from .onnx_ops import evaluate

__all__ = ["run_graph"]


def run_graph(graph: Graph, feeds: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """Evaluate *graph* on *feeds* (every graph input by name); return its outputs by name."""
    missing = [n for n in graph.inputs if n not in feeds]
    if missing:
        raise KeyError(f"missing inputs: {missing}")
    env = {n: v.const for n, v in graph.values.items() if v.const is not None}
    env.update({n: np.asarray(feeds[n]) for n in graph.inputs})
    for node in graph.nodes:
        args = [env[i] if i else None for i in node.inputs]
        for o, r in zip(node.outputs, evaluate(node, graph.opset, args), strict=False):
            env[o] = r
    return {n: env[n] for n in graph.outputs}
