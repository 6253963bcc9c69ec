"""Layout and linear ops of small tensors as GEMVs by constant 0/1 (or coefficient) matrices.

A value that is an affine function of its node's computed inputs -- Concat, Split, Slice, Gather of
constant indices, Transpose (row moves), Expand, Tile, Pad, ReduceSum/ReduceMean, MatMul of a
multi-row tensor by a constant, an elementwise op with a constant that broadcasts onto rows -- is
``sum_i A_i x_i + c``. The matrices are *measured*: the node is evaluated at every unit vector of every
input, and the result is then checked on random inputs. A diagonal matrix becomes a ``mulc`` (or an
alias, or a ``scale``), anything else one GEMV per input, summed with ``add``; ``c`` becomes an ``addc``.

The rule runs only where no earlier rule took the value and the specific rules (a 2-D GEMV, a Split of
a GEMV, elementwise ops with a scalar or last-axis constant) would refuse it, so that the decoders
compile to the same program. Its matrices are ``out x in``: :data:`MAX_WEIGHTS` bounds them.
"""

from __future__ import annotations

import numpy as np

from kvoverlay import isa

from .elementwise import Add, AddC, MulC, Scale
from .linear import Linear, _split_source
from .rope import constant_positions

__all__ = ["MAX_WEIGHTS", "Place", "affine", "assemble", "place_add", "select"]

#: Ops whose output can be affine in their computed inputs (the rest are never measured).
AFFINE_OPS = frozenset({"Concat", "Split", "Slice", "Gather", "Transpose", "Expand", "Tile", "Pad", "ReduceSum",
                        "ReduceMean", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Neg", "Where", "Identity",
                        "Reshape", "Squeeze", "Unsqueeze", "Flatten", "Cast", "CastLike", "Einsum", "Sum", "Mean",
                        "DepthToSpace", "SpaceToDepth", "GatherElements", "Compress", "RotaryEmbedding"})
#: Largest measured matrix (outputs x inputs), so that a big tensor is an error, not a slow compile.
MAX_WEIGHTS = 1 << 20


class Place(Linear):
    """A GEMV by a measured matrix whose columns are zero-padded to a multiple of ``isa.GROUP_BASE`` (a GEMV
    reads whole weight groups): the extra columns read the padding lanes of the input's last activation-buffer
    word (vectors start on a word of ``config.abuf_lanes`` >= 8 lanes), which meet zero weights."""

    kind = "place"

    @staticmethod
    def match(fz, v, node):
        return affine(fz, v, node)

    def reference(self, ins, step):
        m = step.og.matrices[self.attrs["matrix"]]
        return m[:, :ins[0].size] @ ins[0]


def affine(fz, v, node):
    """The fusion rule: see the module docstring."""
    if node is None or node.op not in AFFINE_OPS or not _refused_by_specific_rules(fz, v, node):
        return None
    ins = [i for i in dict.fromkeys(node.inputs) if i and not fz.ix.is_const(i)]
    if not ins or any(not fz.g.values[i].dtype.startswith("float") for i in ins):
        return None
    n = fz.ix.numel(v)
    empty_in = all(fz.ix.numel(i) == 0 for i in ins)  # empty pieces of a Concat add nothing
    if n == 0 and not any(fz.ix.numel(i) == 0 for i in ins):
        fz.fail(v, "has an empty result: an overlay vector computed from data holds at least one element")
    if n and empty_in:
        fz.fail(v, "reads an empty tensor: its result is a constant, and no overlay instruction writes a constant "
                   "vector as a result")
    if n * sum(fz.ix.numel(i) for i in ins) > MAX_WEIGHTS:
        fz.fail(v, f"would be a {n} x {sum(fz.ix.numel(i) for i in ins)} layout GEMV, more than the "
                   f"{MAX_WEIGHTS} weights the compiler measures")
    mats, offset = _measure(fz, v, ins)
    if mats is None:
        return None
    if len(ins) == 1 and fz.ix.numel(ins[0]) == n and _is_diagonal(mats[0]):
        y = _diagonal(fz, v, node, fz.vector(ins[0]), np.diag(mats[0]).copy())
    else:
        y = assemble(fz, v, node, [(m, fz.vector(i)) for m, i in zip(mats, ins, strict=True) if m.any()])
        if y is None:
            return None
    if offset.any():
        y = fz.add(AddC, v, [y], node.name, const=fz.store(fz.out.consts, "c", offset))
    return y


def select(fz, v, node, x: str, rows, weight: float = 1.0) -> str:
    """A new vector of the elements *rows* (indices into vector *x*; -1 gives a zero) times *weight*, by a GEMV."""
    rows = np.asarray(rows)
    m = np.zeros((len(rows), fz.out.lengths[x]))
    m[np.flatnonzero(rows >= 0), rows[rows >= 0]] = weight
    return _gemv(fz, v, node, m, x)


def assemble(fz, v, node, parts) -> str | None:
    """Vector of ONNX value *v* as ``sum(matrix @ vector for matrix, vector in parts)`` (GEMVs and ``add``)."""
    y = None
    for m, x in parts:
        y = place_add(fz, v, node, y, m, x)
    return y


def place_add(fz, v, node, acc: str | None, m, x) -> str:
    """``acc + m @ x`` (or ``m @ x`` for no *acc*): put a part in place as soon as it is made, so that the parts of
    a value never all live at once (the exponent registers are few)."""
    p = _gemv(fz, v, node, m, x)
    return p if acc is None else fz.add(Add, v, [acc, p], node.name)


def _gemv(fz, v, node, m, x) -> str:
    m = np.pad(np.asarray(m, np.float32), ((0, 0), (0, -m.shape[1] % isa.GROUP_BASE)))
    y = fz.add(Place, v, [x], node.name, matrix=fz.store(fz.out.matrices, "w", m))
    fz.out.lengths[y] = m.shape[0]
    return y


def _refused_by_specific_rules(fz, v, node) -> bool:
    """Whether linear or elementwise would refuse *node*: only then is it measured here."""
    op, ins = node.op, node.inputs
    if op in ("MatMul", "Gemm"):
        w = fz.ix.const(ins[1]) if len(ins) > 1 else None
        if w is None or fz.ix.is_const(ins[0]):
            return fz.ix.is_const(ins[0]) and w is None  # a constant times a computed tensor
        return (w.ndim != 2 or bool(node.attrs.get("transA", 0))
                or fz.ix.numel(ins[0]) != (w.shape[1] if node.attrs.get("transB", 0) else w.shape[0]))
    if op in ("Split", "Slice"):  # a part of a GEMV output is that GEMV's rows (Linear)
        return _split_source(fz, ins[0])[0] is None
    if op == "RotaryEmbedding":  # at constant positions (or none: the sequence's), x*cos + rotate(x)*sin is linear
        return constant_positions(fz, node)
    if op in ("Add", "Sub", "Mul", "Div") and len(ins) == 2:
        consts = [fz.ix.const(i) for i in ins]
        if (consts[0] is None) == (consts[1] is None):
            return consts[0] is None and (fz.ix.numel(ins[0]) != fz.ix.numel(ins[1]))
        c = consts[0] if consts[0] is not None else consts[1]
        var = ins[1] if consts[0] is not None else ins[0]
        n = fz.ix.numel(v)
        return not (fz.ix.numel(var) == n and (c.size == 1 or c.size == n == c.shape[-1]))
    return op != "Neg"  # Neg is a scale


def _measure(fz, v, ins):
    """([A_i], c) with ``v = sum A_i x_i + c`` for the computed inputs *ins*, or (None, None) if not affine."""
    shapes = {i: fz.ix.shape(i) for i in ins}
    dtypes = {i: np.dtype(fz.g.values[i].dtype) for i in ins}

    def at(feeds):
        full = {i: feeds.get(i, np.zeros(shapes[i])).reshape(shapes[i]).astype(dtypes[i]) for i in ins}
        return np.asarray(fz.ix.evaluate(v, full), np.float64).reshape(-1)

    with np.errstate(all="ignore"):
        return _fit(at, ins, fz)


def _fit(at, ins, fz):
    try:
        offset = at({})
        mats = []
        for i in ins:
            k = fz.ix.numel(i)
            cols = [at({i: np.eye(1, k, j)}) - offset for j in range(k)]
            mats.append(np.stack(cols, axis=1) if cols else np.zeros((offset.size, 0)))
        rng = np.random.default_rng(0)
        for _ in range(2):
            xs = {i: rng.standard_normal(fz.ix.numel(i)) for i in ins}
            want = offset + sum(m @ xs[i] for m, i in zip(mats, ins, strict=True))
            got = at(xs)
            tol = 1e-5 * (1 + np.max(np.abs(want), initial=0))
            if not np.all(np.isfinite(got)) or not np.allclose(got, want, rtol=1e-4, atol=tol):
                return None, None
    except (ValueError, TypeError, IndexError, KeyError, FloatingPointError):
        return None, None
    return mats, offset


def _is_diagonal(m) -> bool:
    return m.shape[0] == m.shape[1] and not np.any(m - np.diag(np.diag(m)))


def _diagonal(fz, v, node, x, d) -> str:
    if np.all(d == 1.0):
        return x
    if np.all(d == d[0]):
        return fz.add(Scale, v, [x], node.name, factor=float(d[0]))
    return fz.add(MulC, v, [x], node.name, const=fz.store(fz.out.consts, "c", d))
