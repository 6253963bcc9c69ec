"""kvoverlay as an ``onnx.backend``: ONNX graphs compiled for the overlay and run on the golden model or the RTL.

``prepare(model, device)`` checks the model and returns a :class:`OverlayRep`; ``rep.run(inputs)`` compiles the graph
for the overlay with the inputs it was given and runs it once. The overlay's program takes its float inputs as vector
records that the host writes each run; an input the overlay needs as a constant (a MatMul's weight operand, an index,
a shape) is bound into the graph at run time instead, and the rep says which ones it bound (:attr:`OverlayRep.bound`).
A node the overlay cannot run is placed on the host (``host/placement.py``; :attr:`OverlayRep.host` lists them),
unless ``prepare(..., offload_device="none")``.

The devices are ``"CPU"`` (ONNX's default name, the golden model), ``"ISA"`` (the same) and ``"RTL"`` (the Verilated
overlay). Works with :class:`onnx.backend.test.BackendTest` unchanged.
"""

from __future__ import annotations

import numpy as np
import onnx
from kvoverlay.compiler.driver import compile_model
from kvoverlay.compiler.frontend import CompileError
from kvoverlay.compiler.lower import check_op, opset_of
from onnx import numpy_helper
from onnx.backend.base import Backend, BackendRep

from .placement import host_ops as host_ops_of
from .session import run_graph

__all__ = ["DEVICES", "OverlayBackend", "OverlayRep", "prepare", "run_model", "supports_device"]

#: ONNX device names and the backend each runs on.
DEVICES = {"CPU": "isa", "ISA": "isa", "RTL": "rtl"}
#: The configuration the backend compiles for: the smallest preset, whose buffers hold every node case of the op set.
CONFIG = "tiny"


def _device(device) -> str:
    name = str(device).upper().split(":")[0]
    if name not in DEVICES:
        raise ValueError(f"device {device!r} is not one of {', '.join(DEVICES)}")
    return DEVICES[name]


def _bind(model: onnx.ModelProto, values: dict) -> onnx.ModelProto:
    """A copy of *model* whose inputs named in *values* are initializers holding those values."""
    bound = onnx.ModelProto()
    bound.CopyFrom(model)
    graph = bound.graph
    keep = [vi for vi in graph.input if vi.name not in values]
    del graph.input[:]
    graph.input.extend(keep)
    for name, value in values.items():
        graph.initializer.append(numpy_helper.from_array(np.asarray(value), name))
    return bound


class OverlayRep(BackendRep):
    """A prepared model: compiled at each :meth:`run` for the shapes and constant operands it is given.

    Attributes
    ----------
    bound : list of str
        Inputs of the last run that were bound into the graph as constants (empty when every float input ran as a
        vector record the host wrote).
    program : kvoverlay.bundle.Bundle
        The program of the last run.
    host : list of [node, op]
        The nodes the last run placed on the host (``placement.host``; empty when the overlay ran it all).
    """

    def __init__(self, model: onnx.ModelProto, backend: str, offload_device: str = "auto"):
        self.model = model
        self.backend = backend
        self.offload_device = offload_device
        self.bound: list[str] = []
        self.host: list = []
        self.program = None
        self._initializers = {i.name for i in model.graph.initializer}

    def _inputs(self):
        return [vi for vi in self.model.graph.input if vi.name not in self._initializers]

    def _compile(self, values: dict):
        """Compile with every float input as a runtime vector, then with attention masks bound as constants, then with
        all but the first float input bound (the rest are weights, gains, masks); with nothing placed on the host,
        else with the fewest nodes placed there."""
        inputs = self._inputs()
        # a float input holding inf or nan (a mask of -inf) is no vector the overlay can hold: it is bound, always
        floats = [vi.name for vi in inputs if np.asarray(values[vi.name]).dtype == np.float32
                  and np.isfinite(values[vi.name]).all()]
        others = {vi.name: values[vi.name] for vi in inputs if vi.name not in floats}
        masks = {n.input[3] for n in self.model.graph.node if n.op_type == "Attention" and len(n.input) > 3} & set(floats)
        tries = [others, {**others, **{n: values[n] for n in floats[1:]}}] if floats else [others]
        if masks:  # an attention mask is program structure (which keys a row attends): bound, Q/K/V stay vectors
            tries.insert(1, {**others, **{n: values[n] for n in masks}})
        error, best = None, None
        for host_ops in (False, True) if self.offload_device != "none" else (False,):
            for bind in tries:
                try:
                    program, _ = compile_model(_bind(self.model, bind), CONFIG, weights="w16", host_ops=host_ops)
                except CompileError as exc:
                    error = error or exc  # the overlay's own refusal is the one to report
                    continue
                n_host = len(host_ops_of(program))
                if best is None or n_host < best[0]:
                    best = (n_host, program, sorted(bind))
            if best is not None:
                return best[1], best[2]
        raise error

    def run(self, inputs, **kwargs):
        names = [vi.name for vi in self._inputs()]
        if isinstance(inputs, dict):
            values = dict(inputs)
        else:
            values = dict(zip(names, inputs))
        missing = [n for n in names if n not in values]
        if missing:
            raise ValueError(f"missing inputs: {', '.join(missing)}")
        program, self.bound = self._compile(values)
        self.program = program
        self.host = host_ops_of(program)
        feeds = {n: values[n] for n in program.manifest["io"]["inputs"]}
        out = run_graph(program, feeds, backend=self.backend, offload_device=self.offload_device)
        return tuple(np.asarray(out[o.name], np.float32) for o in self.model.graph.output)


class OverlayBackend(Backend):
    """The :class:`onnx.backend.base.Backend` of kvoverlay."""

    @classmethod
    def supports_device(cls, device: str) -> bool:
        try:
            _device(device)
        except ValueError:
            return False
        return True

    @classmethod
    def prepare(cls, model, device: str = "CPU", offload_device: str = "auto", **kwargs) -> OverlayRep:
        """Check *model* and its ops: one the compiler does not know fails here, with ``kvoverlay compile``'s error
        (with ``offload_device="none"`` also one the host would run)."""
        super().prepare(model, device, **kwargs)
        onnx.checker.check_model(model)
        opset = opset_of(model)
        for i, n in enumerate(model.graph.node):
            check_op(n, n.name or f"{n.op_type}_{i}", opset, host_ops=offload_device != "none")
        return OverlayRep(model, _device(device), offload_device)

    @classmethod
    def run_model(cls, model, inputs, device: str = "CPU", **kwargs):
        return cls.prepare(model, device, **kwargs).run(inputs)

    @classmethod
    def run_node(cls, node, inputs, device: str = "CPU", outputs_info=None, **kwargs):
        raise NotImplementedError("kvoverlay compiles whole graphs; run_node is not offered (use run_model)")


prepare = OverlayBackend.prepare
run_model = OverlayBackend.run_model
supports_device = OverlayBackend.supports_device
