"""Frontend: load and check an ONNX decoder, pin its dynamic dims for one decode step.

Dims are pinned by name: batch -> 1, sequence -> 1 (a decode step). The past length
stays the symbol ``P`` (and ``past + sequence`` becomes ``P+1``) unless ``kv_len`` is
given, in which case it is pinned to ``kv_len`` (and the total to ``kv_len + 1``).
This first stage compiles for a concrete KV length so that the shape subgraphs
exporters emit fold away completely; a symbolic-P build keeps those nodes.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import onnx
from onnx import external_data_helper, helper, numpy_helper

from .onnx_mmap import load_mapped

__all__ = ["BATCH_DIMS", "PAST_DIMS", "SEQ_DIMS", "TOTAL_DIMS", "CompileError", "Loaded", "load_model", "load_split"]

BATCH_DIMS = {"batch_size", "batch"}
SEQ_DIMS = {"sequence_length", "seq_len", "seq_length"}
PAST_DIMS = {"past_sequence_length", "past_seq_len", "past_length"}
TOTAL_DIMS = {"past_sequence_length + sequence_length", "total_sequence_length", "past_seq_len + seq_len"}


class CompileError(ValueError):
    """A model the compiler cannot handle; the message is one line.

    *node* names the node the overlay refused, when known (the partition pass places it on the host).
    """

    def __init__(self, msg: str, *, node: str | None = None):
        super().__init__(" ".join(str(msg).split()))
        self.node = node


def _tensors_with_external_data(model: onnx.ModelProto):
    yield from model.graph.initializer
    for node in model.graph.node:
        for attr in node.attribute:
            if attr.type == onnx.AttributeProto.TENSOR:
                yield attr.t
    for t in model.graph.sparse_initializer:
        yield t.values


def _check_external_data(model: onnx.ModelProto, base_dir: str | None) -> None:
    for t in _tensors_with_external_data(model):
        if not external_data_helper.uses_external_data(t):
            continue
        loc = {e.key: e.value for e in t.external_data}.get("location", "")
        if base_dir is None:
            raise CompileError(f"initializer {t.name!r}: external data {loc!r} needs the model loaded from a path")
        root = os.path.realpath(base_dir)
        target = os.path.realpath(os.path.join(root, loc))
        if os.path.isabs(loc) or os.path.commonpath([root, target]) != root:
            raise CompileError(f"initializer {t.name!r}: external data location {loc!r} escapes the model folder")


def _pin_inputs(model: onnx.ModelProto, kv_len: int | None, skip=frozenset()) -> None:
    """Pin the graph inputs' dims (an unknown name is an error) and the outputs' (unknown names stay)."""
    inits = {t.name for t in model.graph.initializer} | set(skip)
    for vi in [*model.graph.input, *model.graph.output]:
        is_output = vi not in model.graph.input
        if vi.name in inits or not vi.type.HasField("tensor_type"):
            continue
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value"):
                continue
            name = d.dim_param
            if name in BATCH_DIMS or name in SEQ_DIMS:
                d.dim_value = 1
            elif name in PAST_DIMS:
                if kv_len is None:
                    d.dim_param = "P"
                else:
                    d.dim_value = kv_len
            elif name in TOTAL_DIMS:
                if kv_len is None:
                    d.dim_param = "P+1"
                else:
                    d.dim_value = kv_len + 1
            elif not is_output:
                raise CompileError(f"input {vi.name!r}: dimension {i} ({name or 'unnamed'!r}) cannot be pinned;"
                                   " known dims are batch, sequence and past length")


#: Initializers at least this large are taken out of the proto before checking and shape inference, which
#: serialize the whole model (a GPT-2-small export would otherwise be held three times over).
SPLIT_BYTES = 1 << 16


@dataclass
class Loaded:
    """A checked, pinned, shape-inferred model whose large initializers live in *weights* as arrays."""

    model: onnx.ModelProto
    weights: dict = field(default_factory=dict)
    #: Weights imported from com.microsoft.MatMulNBits, by initializer name (``matmul_nbits.Prequantized``).
    prequantized: dict = field(default_factory=dict)

    @property
    def graph(self):
        return self.model.graph


def load_split(src: str | os.PathLike | onnx.ModelProto, *, max_seq: int | None = None,
               kv_len: int | None = None) -> Loaded:
    """Load, check, pin and shape-infer *src* (a path or a ModelProto; a proto is copied).

    *max_seq* bounds the total length (``kv_len + 1``) when both are given. Large initializers are
    converted to arrays once and removed from the proto; checking and shape inference see them as
    typed graph inputs, which is all they need.
    """
    if kv_len is not None:
        if kv_len < 0:
            raise CompileError(f"kv_len={kv_len} must be >= 0")
        if max_seq is not None and kv_len + 1 > max_seq:
            raise CompileError(f"kv_len={kv_len} + 1 exceeds max_seq={max_seq}")
    weights = {}
    if isinstance(src, onnx.ModelProto):
        model = onnx.ModelProto()
        model.CopyFrom(src)
        _check_external_data(model, None)
    else:
        path = os.fspath(src)
        try:
            model, mapped = load_mapped(path, SPLIT_BYTES)
        except OSError as e:
            raise CompileError(f"cannot load {path!r}: {e.strerror or e}") from None
        except Exception as e:  # noqa: BLE001 - a malformed wire format, protobuf's DecodeError
            raise CompileError(f"cannot load {path!r}: not an ONNX model ({type(e).__name__})") from None
        base = os.path.dirname(os.path.abspath(path))
        _check_external_data(model, base)
        try:
            external_data_helper.load_external_data_for_model(model, base)
        except OSError as e:
            raise CompileError(f"cannot load the external data of {path!r}: {e.strerror or e}") from None
        weights = dict(mapped)
    from .matmul_nbits import import_matmul_nbits  # it raises this module's CompileError

    prequantized = import_matmul_nbits(model, weights)
    for name, arr in weights.items():
        model.graph.input.append(helper.make_tensor_value_info(name, helper.np_dtype_to_tensor_dtype(arr.dtype),
                                                               list(arr.shape)))
    inits = model.graph.initializer
    for i in reversed(range(len(inits))):
        t = inits[i]
        if t.ByteSize() >= SPLIT_BYTES:
            weights[t.name] = numpy_helper.to_array(t)
            model.graph.input.append(helper.make_tensor_value_info(t.name, t.data_type, list(t.dims)))
            del inits[i]
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as e:
        raise CompileError(f"invalid model: {str(e).splitlines()[0]}") from None
    _pin_inputs(model, kv_len, skip=set(weights))
    try:
        model = onnx.shape_inference.infer_shapes(model, strict_mode=True, data_prop=True)
    except Exception as e:  # noqa: BLE001 - onnx raises several types here
        raise CompileError(f"shape inference failed: {str(e).splitlines()[0]}") from None
    inputs = [vi for vi in model.graph.input if vi.name not in weights]
    del model.graph.input[:]
    model.graph.input.extend(inputs)
    return Loaded(model, weights, prequantized)


def load_model(src: str | os.PathLike | onnx.ModelProto, *, max_seq: int | None = None,
               kv_len: int | None = None) -> onnx.ModelProto:
    """:func:`load_split`, with the large initializers put back: a self-contained ModelProto."""
    loaded = load_split(src, max_seq=max_seq, kv_len=kv_len)
    for name, arr in loaded.weights.items():
        loaded.model.graph.initializer.append(numpy_helper.from_array(arr, name))
    return loaded.model
