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

import dataclasses
from collections.abc import Callable

import numpy as np
import onnx
from onnx import numpy_helper

from kvoverlay import bundle as kvbundle
from kvoverlay import numerics as nx

from .backend import SessionError, Step, create_backend
from .offload import resolve_device

__all__ = ["TORCH_OPS", "HostSegment", "SegmentedBackend", "describe", "host_ops", "is_decoder", "run_segments"]


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


def is_decoder(program: kvbundle.Bundle) -> bool:
    """Whether partitioned *program* is a decoder: its graph gives ``logits`` from the token and position ids."""
    io = program.manifest.get("io", {})
    return "logits" in io.get("outputs", {}) and "input_ids" in io.get("inputs", {}) and "max_seq" in program.manifest


def _overlay_part(blob: bytes) -> kvbundle.Bundle:
    """An overlay segment as a program a backend steps: one without logits of its own gets its first output as
    the record the backend reads after each step (the host reads every output record anyway)."""
    sub = kvbundle.from_bytes(blob)
    if "logits" not in sub.manifest:
        spec = next(iter(sub.manifest["io"]["outputs"].values()))
        sub = kvbundle.Bundle(config=sub.config, instructions=sub.instructions, image=sub.image,
                              manifest={**sub.manifest, "logits": {"addr": spec["addr"], "len": spec["len"]}})
    return sub


def _sum_counters(parts: list):
    from kvoverlay.sim.golden import Counters

    if any(c.cycles is None for c in parts):  # the gpu backend counts instructions and wall time, not cycles
        return dataclasses.replace(parts[-1], instructions=sum(c.instructions for c in parts),
                                   wall_s=sum(c.wall_s for c in parts))
    total = Counters()
    for c in parts:
        total.cycles += c.cycles
        total.instructions += c.instructions
        for mine, theirs in ((total.bytes_read, c.bytes_read), (total.bytes_written, c.bytes_written),
                             (total.busy, c.busy)):
            for k, v in theirs.items():
                mine[k] = mine.get(k, 0) + v
    return total


def _gpu_segment(program: kvbundle.Bundle, **options):
    """An overlay segment on the ``gpu`` backend: its input records, which its lowering reads as constants of the
    image, are refilled before each step, and what its last step stored is kept for :meth:`read_vector`."""
    from .gpu import GpuBackend

    class GpuSegment(GpuBackend):
        def __init__(self, program, **options):
            # one step at a time, between host segments: no CUDA graph to replay a whole decode
            super().__init__(program, **{**options, "cuda_graph": False})
            addrs = {spec["addr"]: spec["len"] for spec in program.manifest["io"]["inputs"].values()}
            self.inputs = {}  # record address -> the LOAD ops that read it
            ops = self.machine.ops
            for op in ops:
                if op.op == "LOAD" and op.f["addr"] in addrs:
                    self.inputs.setdefault(op.f["addr"], []).append(op)
                    # a GEMV reads its input padded with zeros to whole columns (a broadcast scalar: 1 of 8), which
                    # the overlay's LOAD leaves in the buffer; the lowering's LOAD writes only the record's elements
                    width = max([g.x_len for g in ops if g.op in ("GEMV", "LINEAR") and g.f["x"] == op.f["dst"]],
                                default=0)
                    if width > op.w.shape[-1]:
                        op.w = self.t.nn.functional.pad(op.w, (0, width - op.w.shape[-1]))
            self.stores = {}
            forward = self.machine.forward

            def keep(regs):
                regs, self.stores = forward(regs)
                # a segment without logits has no ARGMAX: its next-token register stays 0, as on the overlay
                regs.setdefault(self.regs_map["next_token"], self.t.zeros_like(self.pos))
                return regs, self.stores
            self.machine.forward = keep

        def write_vector(self, addr, mantissas, exponent):
            x = self.t.as_tensor(nx.to_float(np.asarray(mantissas, np.int64), int(exponent)), dtype=self.dtype)
            for op in self.inputs.get(addr, []):
                op.w.copy_(x.to(self.device)[None, : op.w.shape[-1]])

        def read_vector(self, addr, length):
            if addr not in self.stores:
                return super().read_vector(addr, length)
            return nx.from_float(self.stores[addr][-1, :length].double().cpu().numpy())

    return GpuSegment(program, **options)


def _merge_kv(a: dict | None, b: dict | None) -> dict | None:
    """One step's KV placement over the overlay segments, each reporting the layers it holds."""
    if not a or not b:
        return a or b
    out = dict(b)
    for key in ("layers_offloaded", "layers_on_device"):
        if key in a or key in b:
            out[key] = sorted({*a.get(key, []), *b.get(key, [])})
    out["heads_offloaded"] = a.get("heads_offloaded", 0) + b.get("heads_offloaded", 0)
    return out


class SegmentedBackend:
    """A partitioned decoder on a backend: each overlay segment on a backend of its own, the host segments between.

    Each overlay segment is an ordinary program stepped by its own *backend* (``isa``, ``rtl``), so the KV cache
    of the layers it holds stays in that backend across steps, as in an unpartitioned session. A step writes the
    token and position registers of every overlay segment, runs the segments in order, and moves each tensor
    across once per segment boundary: an overlay segment's float inputs are written as vector records before it
    runs and its outputs read after; a host segment runs on the offload device (:class:`HostSegment`). The step's
    counters add the overlay segments' and report the host ops (``placement``).
    """

    def __init__(self, program: kvbundle.Bundle, backend: str = "isa", *, offload_device: str = "auto", **options):
        if offload_device == "none":
            raise SessionError(f"--offload-device none: {describe(program)}")
        self.program = program
        self.name = backend
        self.offload_device = offload_device
        self.device = resolve_device(offload_device)
        self.parts = []  # (segment entry, backend or HostSegment)
        try:
            for seg in program.manifest["segments"]:
                blob = _blob(program, seg)
                if seg["kind"] == "overlay" and backend == "gpu":
                    part = _gpu_segment(_overlay_part(blob), offload_device=offload_device, **options)
                elif seg["kind"] == "overlay":
                    part = create_backend(backend, _overlay_part(blob), offload_device=offload_device, **options)
                else:
                    part = HostSegment(blob, offload_device)
                self.parts.append((seg, part))
        except BaseException:
            self.close()
            raise
        self.overlays = [p for s, p in self.parts if s["kind"] == "overlay"]
        self.placement = None

    def reset(self) -> None:
        for b in self.overlays:
            b.reset()

    def close(self) -> None:
        for _, p in self.parts:
            close = getattr(p, "close", None)
            if close is not None:
                close()

    def check_fits(self, position: int):
        for b in self.overlays:
            check = getattr(b, "check_fits", None)
            if check is not None:
                check(position)

    def step(self, token: int, position: int, registers: dict | None = None) -> Step:
        env = {"input_ids": np.array([[token]], np.int64), "position_ids": np.array([[position]], np.int64)}
        last, counters, ran_on, kv = None, [], set(), None
        for seg, part in self.parts:
            if seg["kind"] == "host":
                missing = [i for i in seg["inputs"] if i not in env]
                if missing:
                    raise SessionError(f"a host segment reads {', '.join(missing)}, which a decode step does not give")
                out = part.run({i: env[i] for i in seg["inputs"]})
                ran_on.add(part.ran_on)
                env.update({o: out[o] for o in seg["outputs"]})
                continue
            io = part.program.manifest["io"]
            for name in seg["inputs"]:
                spec = io["inputs"].get(name)
                if spec is not None and "addr" in spec:  # a float vector; token and position go by register
                    part.write_vector(spec["addr"], *nx.from_float(np.asarray(env[name], np.float64).reshape(-1)))
            last = part.step(token, position, registers)
            counters.append(last.counters)
            kv = _merge_kv(kv, getattr(last.counters, "placement", None))
            for name in seg["outputs"]:
                spec = io["outputs"].get(name)
                if spec is None:  # a layer's present KV: it stays in the segment's backend
                    continue
                if spec["addr"] == part.program.manifest["logits"]["addr"]:  # the record the step read already
                    value = last.logits
                else:
                    value = nx.to_float(*part.read_vector(spec["addr"], spec["len"]))
                env[name] = np.asarray(value).reshape(spec.get("shape") or [-1])
        logits = np.asarray(env["logits"], np.float64).reshape(-1)
        produced_by_overlay = self.parts[-1][0]["kind"] == "overlay" and "logits" in self.parts[-1][1].program.manifest["io"]["outputs"]
        # the overlay's ARGMAX when the last segment gives the logits; the host's (first maximum, as ARGMAX) otherwise
        next_token = int(last.next_token) if produced_by_overlay else int(np.argmax(logits))
        total = _sum_counters(counters)
        from .offload import placement

        where = dict(kv or placement(self.program.manifest, position, None, "overlay"))
        where["ops_off_overlay"] = [op for op in where.get("ops_off_overlay", []) if not isinstance(op, list)] + [
            f"{n} ({op})" for n, op in host_ops(self.program)]
        where["host_device"] = ", ".join(sorted(ran_on))
        where["device"] = self.device if where.get("device", "overlay") == "overlay" else where["device"]
        where["segments"] = [s["kind"] for s, _ in self.parts]
        total.placement = self.placement = where
        return Step(next_token, logits, total)

    def read_vector(self, addr: int, length: int) -> tuple:
        raise SessionError("a partitioned program has no memory of its own: its segments each have theirs")

    write_vector = read_vector

    def read_register(self, index: int) -> int:
        return self.overlays[-1].read_register(index)
