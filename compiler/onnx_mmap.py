"""Load an ONNX file with its large initializers memory-mapped instead of parsed.

``onnx.load`` holds the file's bytes and the parsed protobuf at the same time, and converting the
initializers to arrays copies them once more: three times the model in memory. Here the file is
memory-mapped, the protobuf wire format is scanned just deep enough (ModelProto.graph ->
GraphProto.initializer -> TensorProto.raw_data) to find every large initializer's bytes, and only the
rest of the model is parsed by protobuf. The large initializers become read-only numpy arrays over the
mapping, so the model's weights are in memory once, and only the pages the compiler reads.
"""

from __future__ import annotations

import mmap
import os

import numpy as np
import onnx
from onnx import helper

__all__ = ["load_mapped"]

# field numbers of onnx.proto3
_MODEL_GRAPH = 7
_GRAPH_INITIALIZER = 5
_TENSOR_DIMS, _TENSOR_TYPE, _TENSOR_NAME, _TENSOR_RAW = 1, 2, 8, 9


def _varint(buf, pos):
    value = shift = 0
    while True:
        b = buf[pos]
        pos += 1
        value |= (b & 0x7F) << shift
        if b < 0x80:
            return value, pos
        shift += 7
        if shift > 63:
            raise ValueError("malformed varint")


def _encode_varint(value: int) -> bytes:
    out = bytearray()
    while True:
        b = value & 0x7F
        value >>= 7
        out.append(b | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _fields(buf, start, end):
    """Yield (field number, wire type, field start, value start, value end) over [start, end)."""
    pos = start
    while pos < end:
        first = pos
        key, pos = _varint(buf, pos)
        num, wt = key >> 3, key & 7
        if wt == 0:
            _, vend = _varint(buf, pos)
            yield num, wt, first, pos, vend
            pos = vend
        elif wt == 1:
            yield num, wt, first, pos, pos + 8
            pos += 8
        elif wt == 2:
            n, vstart = _varint(buf, pos)
            yield num, wt, first, vstart, vstart + n
            pos = vstart + n
        elif wt == 5:
            yield num, wt, first, pos, pos + 4
            pos += 4
        else:
            raise ValueError(f"unsupported protobuf wire type {wt}")
        if pos > end:
            raise ValueError("truncated protobuf field")


def _tensor(buf, start, end):
    """(name, data type, dims, raw start, raw end) of a TensorProto, raw bounds None without raw_data."""
    name, dtype, dims, raw = "", 0, [], (None, None)
    for num, wt, _, vs, ve in _fields(buf, start, end):
        if num == _TENSOR_NAME:
            name = bytes(buf[vs:ve]).decode()
        elif num == _TENSOR_TYPE:
            dtype = _varint(buf, vs)[0]
        elif num == _TENSOR_DIMS and wt == 0:
            dims.append(_varint(buf, vs)[0])
        elif num == _TENSOR_DIMS and wt == 2:
            pos = vs
            while pos < ve:
                d, pos = _varint(buf, pos)
                dims.append(d)
        elif num == _TENSOR_RAW:
            raw = (vs, ve)
    return name, dtype, dims, *raw


def load_mapped(path: str | os.PathLike, min_bytes: int):
    """Return ``(ModelProto without the large initializers, {name: read-only array})``.

    Initializers whose ``raw_data`` holds at least *min_bytes* are mapped; the proto keeps every other
    field (small initializers, external-data references, nodes, metadata) as the file has it.
    """
    with open(path, "rb") as fh:
        size = os.fstat(fh.fileno()).st_size
        if size == 0:
            raise ValueError("empty file")
        mm = mmap.mmap(fh.fileno(), 0, access=mmap.ACCESS_READ)
    buf = memoryview(mm)
    weights, model_parts = {}, []
    for num, wt, first, vs, ve in _fields(buf, 0, size):
        if num != _MODEL_GRAPH or wt != 2:
            model_parts.append(buf[first:ve])
            continue
        graph_parts = []
        for gnum, gwt, gfirst, gvs, gve in _fields(buf, vs, ve):
            if gnum == _GRAPH_INITIALIZER and gwt == 2:
                name, dtype, dims, rs, re_ = _tensor(buf, gvs, gve)
                if rs is not None and re_ - rs >= min_bytes and dtype:
                    np_dtype = np.dtype(helper.tensor_dtype_to_np_dtype(dtype)).newbyteorder("<")
                    count = int(np.prod(dims, dtype=np.int64)) if dims else 1
                    if count * np_dtype.itemsize == re_ - rs:
                        weights[name] = np.frombuffer(mm, np_dtype, count, rs).reshape(dims)
                        continue
            graph_parts.append(buf[gfirst:gve])
        graph = b"".join(graph_parts)
        model_parts.append(_encode_varint((_MODEL_GRAPH << 3) | 2) + _encode_varint(len(graph)) + graph)
    model = onnx.load_model_from_string(b"".join(bytes(p) for p in model_parts))
    return model, weights
