"""Host segments: the ops a partitioned program places off the overlay, run on the offload device.

A program whose compile placed nodes on the host (``placement.host`` in its manifest) holds its segments in
order (``segments``): overlay segments are programs of their own, host segments ONNX models. :func:`run_segments`
runs them in turn, whatever the backend: an overlay segment through the backend's *run_overlay*, a host segment
here. Each tensor crosses between the two once per segment boundary.

A host segment runs in PyTorch when torch is installed and has a kernel for each of its ops (:data:`TORCH_OPS`), on
CUDA when present, and otherwise (or where torch refuses the case) through ONNX's own numpy reference
(``onnx.reference``), which defines every standard op.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from kvoverlay import bundle as kvbundle

from .offload import resolve_device

__all__ = ["TORCH_OPS", "HostSegment", "describe", "host_ops", "run_segments"]


def host_ops(program: kvbundle.Bundle) -> list:
    """``[node, op]`` of every node *program* places on the host (empty for a program the overlay runs whole)."""
    return list(program.manifest.get("placement", {}).get("host", []))


def describe(program: kvbundle.Bundle) -> str:
    """One line naming what *program* places on the host."""
    ops = host_ops(program)
    return (f"the program places {len(ops)} op(s) on the host, which the overlay cannot run: "
            f"{', '.join(f'{n} ({op})' for n, op in ops[:6])}{' ...' if len(ops) > 6 else ''}")


def _blob(program: kvbundle.Bundle, seg: dict) -> bytes:
    off, n = seg["blob"]
    return program.image[off:off + n]


def _axes(node_attrs: dict, axes, x):
    if axes is None:
        axes = node_attrs.get("axes")
    if axes is None:
        return None
    return [int(a) % x.ndim for a in np.asarray(axes.cpu() if hasattr(axes, "cpu") else axes).reshape(-1)]


def _reduce(fn):
    def run(t, a, x, axes=None):
        ax = _axes(a, axes, x)
        if ax is None:
            if a.get("noop_with_empty_axes", 0):
                return x
            ax = list(range(x.ndim))
        if not ax:
            return x
        return fn(t, x, ax, bool(a.get("keepdims", 1)))
    return run


def _layer_norm(t, a, x, scale, bias=None):
    axis = a.get("axis", -1) % x.ndim
    dims = list(range(axis, x.ndim))
    xf = x.to(t.float64)
    mean = xf.mean(dim=dims, keepdim=True)
    var = ((xf - mean) ** 2).mean(dim=dims, keepdim=True)
    inv = 1.0 / t.sqrt(var + a.get("epsilon", 1e-5))
    y = (xf - mean) * inv * scale
    if bias is not None:
        y = y + bias
    return y.to(x.dtype), mean.to(x.dtype), inv.to(x.dtype)


def _float(fn):
    """A binary op in torch only on floats: ONNX's integer Div floors and its integer Pow stays integral."""
    def run(t, a, x, y):
        if not (x.is_floating_point() and y.is_floating_point()) and fn is not _pow:
            raise TypeError("integer arithmetic runs on ONNX's reference")
        return fn(t, a, x, y)
    return run


def _pow(t, a, x, y):
    if not x.is_floating_point():
        raise TypeError("integer Pow runs on ONNX's reference")
    return t.pow(x, y).to(x.dtype)


#: op -> fn(torch, attrs, *inputs) -> tensor or tuple: the ops a host segment runs in torch.
TORCH_OPS: dict[str, Callable] = {
    "Erf": lambda t, a, x: t.erf(x),
    "Sqrt": lambda t, a, x: t.sqrt(x),
    "Reciprocal": lambda t, a, x: t.reciprocal(x),
    "Exp": lambda t, a, x: t.exp(x),
    "Log": lambda t, a, x: t.log(x),
    "Tanh": lambda t, a, x: t.tanh(x),
    "Sigmoid": lambda t, a, x: t.sigmoid(x),
    "Neg": lambda t, a, x: -x,
    "Abs": lambda t, a, x: t.abs(x),
    "Identity": lambda t, a, x: x,
    "Add": _float(lambda t, a, x, y: x + y),
    "Sub": _float(lambda t, a, x, y: x - y),
    "Mul": _float(lambda t, a, x, y: x * y),
    "Div": _float(lambda t, a, x, y: x / y),
    "Pow": _float(_pow),
    "ReduceMax": _reduce(lambda t, x, ax, k: t.amax(x, dim=ax, keepdim=k)),
    "ReduceMin": _reduce(lambda t, x, ax, k: t.amin(x, dim=ax, keepdim=k)),
    "ReduceSum": _reduce(lambda t, x, ax, k: t.sum(x, dim=ax, keepdim=k)),
    "ReduceMean": _reduce(lambda t, x, ax, k: t.mean(x, dim=ax, keepdim=k)),
    "Softmax": lambda t, a, x: t.softmax(x, dim=a.get("axis", -1)),
    "LayerNormalization": _layer_norm,
}


class HostSegment:
    """One host segment: an ONNX model, run on *device* (``cpu``, ``cuda``; ``auto`` picks)."""

    def __init__(self, model: bytes | onnx.ModelProto, device: str = "auto"):
        self.model = model if isinstance(model, onnx.ModelProto) else onnx.load_from_string(model)
        self.device = resolve_device(device)
        g = self.model.graph
        self.dtypes = {vi.name: onnx.helper.tensor_dtype_to_np_dtype(vi.type.tensor_type.elem_type) for vi in g.input}
        self.consts = {t.name: numpy_helper.to_array(t) for t in g.initializer}
        self.outputs = [o.name for o in g.output]
        self.attrs = [{a.name: onnx.helper.get_attribute_value(a) for a in n.attribute} for n in g.node]
        self._torch = None
        if self.device != "none" and all(n.op_type in TORCH_OPS for n in g.node):
            try:
                import torch
            except ImportError:
                pass
            else:
                self._torch = torch
        #: where the last run ran: "torch:<device>" or "numpy"
        self.ran_on = ""

    def run(self, feeds: dict) -> dict:
        """Output name -> numpy array, from input name -> array (cast to the segment's declared input types)."""
        feeds = {n: np.asarray(feeds[n]).astype(dt, copy=False) for n, dt in self.dtypes.items()}
        if self._torch is not None:
            try:
                out = self._run_torch(feeds)
            except (RuntimeError, TypeError, ValueError, IndexError):
                pass  # a case torch refuses (an empty reduction, a dtype it lacks): ONNX's reference defines it
            else:
                self.ran_on = f"torch:{self.device}"
                return out
        from onnx.reference import ReferenceEvaluator

        with np.errstate(all="ignore"):  # ONNX semantics: inf and nan where IEEE arithmetic gives them
            outs = ReferenceEvaluator(self.model).run(None, feeds)
        self.ran_on = "numpy"
        return dict(zip(self.outputs, (np.asarray(o) for o in outs), strict=True))

    def _run_torch(self, feeds: dict) -> dict:
        t = self._torch
        dev = "cuda" if self.device == "cuda" else "cpu"
        # a copy: torch warns of (and would alias) read-only arrays such as the initializers' views
        env = {n: t.as_tensor(np.array(a), device=dev) for n, a in {**self.consts, **feeds}.items()}
        for node, attrs in zip(self.model.graph.node, self.attrs, strict=True):
            args = [env[i] if i else None for i in node.input]
            while args and args[-1] is None:
                args.pop()
            res = TORCH_OPS[node.op_type](t, attrs, *args)
            for o, r in zip(node.output, res if isinstance(res, tuple) else (res,), strict=False):
                if o:
                    env[o] = r
        return {o: env[o].cpu().numpy() for o in self.outputs}


def run_segments(program: kvbundle.Bundle, feeds: dict, run_overlay: Callable, device: str = "auto") -> dict:
    """Run a partitioned *program* once: output name -> array.

    *run_overlay(bundle, feeds) -> dict* runs one overlay segment on the backend; host segments run here on
    *device* (``--offload-device``; ``none`` refuses a program that needs the host, naming what did not fit).
    """
    if device == "none":
        raise ValueError(f"--offload-device none: {describe(program)}")
    io = program.manifest["io"]["inputs"]
    missing = sorted(set(io) - set(feeds))
    if missing:
        raise ValueError(f"missing inputs: {', '.join(missing)}")
    for name, spec in io.items():
        shape = list(np.shape(feeds[name]))
        if shape != spec["shape"]:
            raise ValueError(f"input {name!r} has shape {shape}; the program was compiled for {spec['shape']}")
    env = dict(feeds)
    for seg in program.manifest["segments"]:
        ins = {i: env[i] for i in seg["inputs"]}
        if seg["kind"] == "overlay":
            out = run_overlay(kvbundle.from_bytes(_blob(program, seg)), ins)
        else:
            out = HostSegment(_blob(program, seg), device).run(ins)
        env.update({o: out[o] for o in seg["outputs"]})
    return {o: env[o] for o in program.manifest["io"]["outputs"]}
