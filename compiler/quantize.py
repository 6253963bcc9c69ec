"""Weights into the memory image: the ``calibrate`` and ``quantize`` passes.

``calibrate`` records the input vectors of every GEMV over a fixed token sequence (the int4 ``mse``
scale search weighs its error by them); ``quantize`` turns the fused graph's matrices, tables and
constant vectors into numerics' row records and vector records in an :class:`Image`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from kvoverlay import isa
from kvoverlay import numerics as nx
from kvoverlay.config import WEIGHT_FORMATS, OverlayConfig
from kvoverlay.timing import gemv_packs_rows

from .frontend import CompileError
from .fused.linear import Linear
from .overlay_graph import OverlayGraph
from .reference import run_float

__all__ = ["CALIBRATION_TOKENS", "METHODS", "SEARCHED", "Image", "PlacedMatrix", "calibrate", "quantize"]

#: Tokens of the calibration sequence whose GEMV inputs steer the int4 scale search.
CALIBRATION_TOKENS = 16
#: How int4 and uint4 scales are chosen (int8 and w16 always round to nearest).
METHODS = ("rtn", "mse")
#: The formats whose scales METHODS choose (the 4-bit ones), each with the method it takes by default: the one
#: of lower NLL on a trained model (docs/numerics.md; the clipping search helps int4 and hurts uint4 there).
SEARCHED = {"int4": "mse", "uint4": "rtn"}
#: Weights quantized per block of rows: bounds the compiler's float64 temporaries to a few tens of MB.
_BLOCK_WEIGHTS = 1 << 20


def calibrate(og: OverlayGraph, max_seq: int) -> dict:
    """The input vectors of every GEMV over a fixed pseudo-random token sequence, per matrix: [n, cols].

    The fused graph runs in float64 (``reference.run_float``); no data beyond the model itself is needed.
    """
    vocab = next(t.shape[0] for kind, t in og.tables.values() if kind == "token")
    tokens = np.random.default_rng(0).integers(0, vocab, size=min(CALIBRATION_TOKENS, max_seq))
    seen = {}

    def observe(op, ins):
        if isinstance(op, Linear):
            seen.setdefault(op.attrs["matrix"], []).append(ins[0])

    run_float(og, tokens, observe=observe)
    return {n: np.stack(xs) for n, xs in seen.items()}


@dataclass
class PlacedMatrix:
    """A matrix or table as rows of records in the image, and how its instructions must read it."""

    addr: int
    rows: int
    cols: int
    fmt: str
    group: int
    sexp: int
    #: GEMV only: rows packed in blocks (numerics.packed_block), not one padded record per row
    packed: bool = False

    def format_fields(self) -> dict:
        """The fields GEMV and LDROW share: weight format, log2 of the group over GROUP_BASE, scale exponent."""
        return {"fmt": isa.ENUMS["fmt"].index(self.fmt), "lg_group": int(math.log2(self.group // isa.GROUP_BASE)),
                "sexp": self.sexp}

    def gemv_fields(self) -> dict:
        """:meth:`format_fields` and, for packed rows, GEMV's ``packed``."""
        return {**self.format_fields(), **({"packed": 1} if self.packed else {})}

    def row_offset(self, row: int, port_bytes: int) -> int:
        """Bytes from the first row to row *row* (of packed rows: the first of a block, :meth:`row_align`)."""
        if row % self.row_align(port_bytes):
            raise CompileError(f"row {row} starts no GEMV tile of this matrix (a multiple of {self.row_align(port_bytes)})")
        return nx.matrix_bytes(row, self.cols, self.fmt, self.group, port_bytes, self.packed)

    def row_align(self, port_bytes: int) -> int:
        """The rows a GEMV tile of this matrix starts at a multiple of: a block of packed rows, or the rows after
        which a record starts on a multiple of ``isa.DRAM_UNIT`` (GEMV's address unit)."""
        if self.packed:
            return nx.packed_block(self.cols, self.fmt, self.group, port_bytes)[0]
        return isa.DRAM_UNIT // math.gcd(nx.row_stride(self.cols, self.fmt, self.group, port_bytes), isa.DRAM_UNIT)


@dataclass
class Image:
    """The external-memory image: bytes, named regions, and where each tensor of the fused graph went."""

    align: int
    data: bytearray = field(default_factory=bytearray)
    regions: list = field(default_factory=list)  # [name, start, end]
    records: dict = field(default_factory=dict)  # matrix/table name -> PlacedMatrix; constant name -> address
    table_fmt: str = ""

    def place(self, blob: bytes) -> int:
        addr = len(self.data)
        self.data += blob
        self.pad()
        return addr

    def pad(self):
        self.data += bytes(-len(self.data) % self.align)

    def region(self, name, start):
        self.regions.append([name, start, len(self.data)])


def group_for(cols: int, want: int) -> int:
    """The largest group of at most *want* weights, a power-of-two multiple of isa.GROUP_BASE, dividing *cols*."""
    g = want
    while g >= isa.GROUP_BASE:
        if cols % g == 0 and g & (g - 1) == 0:
            return g
        g //= 2
    raise CompileError(f"a row of {cols} weights does not split into groups of {isa.GROUP_BASE} or more")


def _place_matrix(image: Image, w, fmt: str, group_size: int, method: str, port_bytes: int, x=None,
                  cfg: OverlayConfig | None = None) -> PlacedMatrix:
    """Quantize and place matrix *w*; with *cfg* (a GEMV's matrix, not a table), as packed rows where
    :func:`kvoverlay.timing.gemv_packs_rows`."""
    rows, cols = w.shape
    group = group_for(cols, group_size)
    packed = cfg is not None and gemv_packs_rows(cfg, rows, cols, fmt, group)
    step = max(1, _BLOCK_WEIGHTS // cols)
    if packed:  # whole blocks per step
        block = nx.packed_block(cols, fmt, group, port_bytes)[0]
        step = -(-step // block) * block
    # max |w| without a temporary of |w|: two reductions, each in the array's memory order (w is often a transposed
    # view of the model's initializer)
    peak = max(float(np.max(w)), -float(np.min(w))) if w.size else 0.0
    sexp = nx.scale_exponent(peak, fmt)
    addr = len(image.data)
    for r in range(0, rows, step):
        q, sm, _ = nx.quantize_matrix(np.ascontiguousarray(w[r:r + step], np.float64), fmt, group,
                                      method=method if fmt in SEARCHED else "rtn", samples=x, sexp=sexp)
        image.data += nx.pack_matrix(q, sm, fmt, group, port_bytes, packed)
    image.pad()
    return PlacedMatrix(addr, rows, cols, fmt, group, sexp, packed)


def _place_prequantized(image: Image, name: str, pre, cfg: OverlayConfig) -> PlacedMatrix:
    """A matrix imported pre-quantized (``matmul_nbits.Prequantized``), placed with its codes unchanged: uint4 with
    its zero points, or int4 (q - 8) without; only the float scales are rounded, to the format's mantissa."""
    fmt = pre.fmt
    if fmt not in cfg.weight_formats:
        raise CompileError(f"matrix {name}: its {fmt} weights (as given) need an overlay built with {fmt}; "
                           f"{cfg.name} has {', '.join(cfg.weight_formats)}")
    rows, cols = pre.q.shape
    try:
        sm, sexp = nx.import_scales(pre.scales, pre.zero_points, fmt)
    except nx.NumericsError as e:
        raise CompileError(f"matrix {name}: {e}") from None
    q = pre.q.astype(np.int64) - (8 if fmt == "int4" else 0)
    addr = image.place(nx.pack_rows(q, sm, fmt, pre.block, cfg.port_bytes))
    return PlacedMatrix(addr, rows, cols, fmt, pre.block, sexp)


def quantize(og: OverlayGraph, cfg: OverlayConfig, *, weights: str, group_size: int, method: str,
             samples: dict | None = None) -> Image:
    """Place every matrix, table and constant of *og*, quantized, into a new image (regions weights, tables,
    constants). *samples* maps a matrix to calibration inputs [n, cols] for the int4 scale search (see
    :func:`kvoverlay.numerics.quantize_matrix`)."""
    if weights not in cfg.weight_formats:
        raise CompileError(f"--weights {weights}: this overlay ({cfg.name}) is built with {', '.join(cfg.weight_formats)}")
    if method not in METHODS:
        raise CompileError(f"unknown quantization method {method!r}; methods: {', '.join(METHODS)}")
    image = Image(max(isa.DRAM_UNIT, cfg.port_bytes))
    image.table_fmt = weights if WEIGHT_FORMATS[weights] >= 8 else "int8"
    samples = samples or {}
    start = len(image.data)
    for name, w in og.matrices.items():
        if name in og.prequantized:
            image.records[name] = _place_prequantized(image, name, og.prequantized[name], cfg)
        else:
            image.records[name] = _place_matrix(image, w, weights, group_size, method, cfg.port_bytes, samples.get(name),
                                                cfg)
    image.region("weights", start)
    start = len(image.data)
    for name, (kind, t) in og.tables.items():
        fmt = "w16" if kind == "position" else image.table_fmt
        stride = nx.row_stride(t.shape[1], fmt, group_for(t.shape[1], group_size), cfg.port_bytes)
        if stride > cfg.ldrow_buffer_bytes:
            raise CompileError(f"table {name}: a {fmt} row of {t.shape[1]} elements takes {stride} bytes, more than "
                               f"{cfg.name}'s LDROW row buffer of {cfg.ldrow_buffer_bytes} (ldrow_row_bytes)")
        image.records[name] = _place_matrix(image, t, fmt, group_size, "rtn", cfg.port_bytes)
    image.region("tables", start)
    start = len(image.data)
    for name, c in og.consts.items():
        m, e = nx.from_float(c)
        image.records[name] = image.place(nx.pack_vector_record(m, e))
    image.region("constants", start)
    return image
