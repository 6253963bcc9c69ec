"""ONNX's own node cases (``onnx.backend.test``) for the transformer op set, run through :mod:`.onnx_backend`.

Each case is one of:

- ``overlay``: passed, with the work on the overlay;
- ``host``: passed, with some of the work (``host_nodes``) placed on the host (``host/placement.py``);
- ``failed``: ran and missed the bound (the largest error is reported), or the compiler refused it (the message is
  reported);
- ``n/a``: outside the overlay's formats (an output that is not float32: integer or boolean arithmetic).

The bound. The overlay's activations are 16-bit block floating point (``docs/numerics.md``): a vector shares one
exponent, so an element's error scales with its vector's peak, not with itself. A case passes at ONNX's own tolerance
(``|out - ref| <= atol + rtol * |ref|``, the case's rtol and atol, 1e-3 and 1e-7 for most) or at the block-relative
bound :func:`block_bound` ``|out - ref| <= 2**-10 * max|ref| + 1e-3 * |ref|``: a few units in the last place of a
15-bit mantissa at the vector's peak (the numerics error table puts one vector op at under 2**-14 of the peak; a
chain of ops, an exp or a reciprocal costs more), plus ONNX's relative term. The table reports both columns.
"""

from __future__ import annotations

import time
import warnings
from dataclasses import asdict, dataclass, field

import numpy as np

__all__ = ["ATTENTION_OUTSIDE", "OPS", "CaseResult", "attention_outside", "block_bound", "collect", "conformance_main",
           "errors", "markdown", "row", "run", "scope_line", "summarize", "table", "total_line"]

#: The transformer op set: the ops whose node cases are run (issue 13), in the table's order.
OPS = ("Attention", "RMSNormalization", "RotaryEmbedding", "LayerNormalization", "Gelu", "Softmax", "Sigmoid", "Tanh",
       "Erf", "MatMul", "Gemm", "Add", "Sub", "Mul", "Div", "Pow", "Sqrt", "Reciprocal", "Neg", "ReduceMean",
       "ReduceSum", "ReduceMax", "Reshape", "Transpose", "Concat", "Split", "Slice", "Gather", "Squeeze", "Unsqueeze",
       "Expand", "Where", "Cast")
#: Attention's declared scope on the overlay is GQA, past/present KV, causal and boolean/float masks and scale, on
#: the op's own cases (not its ``_expanded`` function body); outside it (these features) the op runs on the host.
ATTENTION_OUTSIDE = {"softcap": "softcap (ATTN has no tanh on the scores)", "window": "a sliding window",
                     "nonpad": "nonpad_kv_seqlen (per-batch KV lengths)",
                     "qk_matmul": "the qk_matmul output (the scores stay on chip)"}


def attention_outside(case) -> list:
    """The :data:`ATTENTION_OUTSIDE` features an Attention case uses, read off its node; None for a case that is
    not the op's own (an ``_expanded`` body)."""
    from onnx import helper

    nodes = case.model.graph.node
    if len(nodes) != 1 or nodes[0].op_type != "Attention":
        return None
    node = nodes[0]
    attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
    used = []
    if attrs.get("softcap", 0.0):
        used.append("softcap")
    if any(attrs.get(w, -1) >= 0 for w in ("left_window_size", "right_window_size")):
        used.append("window")
    if len(node.input) > 6 and node.input[6]:
        used.append("nonpad")
    if len(node.output) > 3 and node.output[3]:
        used.append("qk_matmul")
    return used


#: The block-relative bound's terms: a fraction of the output's peak, and ONNX's own relative term.
PEAK_FRACTION = 2.0 ** -10
RELATIVE = 1e-3


def block_bound(ref: np.ndarray) -> np.ndarray:
    """The per-element bound of a block-floating-point result: ``2**-10 * max|ref| + 1e-3 * |ref|``, over the finite
    elements of *ref* (an inf or nan in the reference is matched exactly or not at all: :func:`errors`)."""
    ref = _finite(ref)
    return PEAK_FRACTION * float(ref.max(initial=0.0)) + RELATIVE * ref


def _finite(ref) -> np.ndarray:
    """``|ref|`` with its non-finite elements as 0."""
    ref = np.abs(np.asarray(ref, np.float64))
    return np.where(np.isfinite(ref), ref, 0.0)


def errors(out: np.ndarray, ref: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``|out - ref|`` per element, and where the two are the same value: as ONNX's own runner (``assert_allclose``),
    equal infinities and nan against nan are equal (error 0). A nan or inf on one side only is an infinite error, which
    no bound admits: nan counts as right only where the reference has nan too."""
    out, ref = np.atleast_1d(np.asarray(out, np.float64)), np.atleast_1d(np.asarray(ref, np.float64))
    same = (out == ref) | (np.isnan(out) & np.isnan(ref))
    with np.errstate(invalid="ignore"):
        err = np.abs(out - ref)
    err[same] = 0.0
    err[~same & ~np.isfinite(err)] = np.inf
    return err, same


@dataclass
class CaseResult:
    """The outcome of one node case."""

    name: str
    op: str
    outcome: str  # overlay | host | failed | n/a
    onnx_tolerance: bool = False  # passed at ONNX's own rtol/atol
    max_error: float | None = None  # largest |out - ref| over the outputs, relative to the output's peak
    reason: str = ""
    bound_inputs: list = field(default_factory=list)
    host_nodes: list = field(default_factory=list)  # ops of the nodes placed on the host
    in_scope: bool | None = None  # an Attention case within the op's declared scope on the overlay
    seconds: float = 0.0


def collect(ops=OPS) -> list:
    """``(op, TestCase)`` for every node case of *ops*; an ``_expanded`` case counts for the op it expands."""
    from onnx.backend.test.case import node

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the case generators' own numpy overflow notices
        cases = node.collect_testcases(None)
    op_of = {c.name: c.model.graph.node[0].op_type for c in cases if len(c.model.graph.node) == 1}
    out = []
    for c in cases:
        op = op_of.get(c.name.removesuffix("_expanded"))
        if op in ops:
            out.append((op, c))
    order = {op: i for i, op in enumerate(ops)}
    return sorted(out, key=lambda oc: (order[oc[0]], oc[1].name))


def _not_applicable(case) -> str:
    for inputs, outputs in case.data_sets:
        for o in outputs:
            dt = np.asarray(o).dtype
            if dt != np.float32:
                return f"output dtype {dt} is outside the overlay's formats"
    return ""


def run_case(op: str, case, device: str = "CPU") -> CaseResult:
    """Run one case on *device*; never raises."""
    from kvoverlay.compiler.frontend import CompileError

    from .onnx_backend import prepare
    from .session import SessionError

    t0 = time.perf_counter()
    res = CaseResult(case.name, op, "n/a")
    if op == "Attention":
        outside = attention_outside(case)
        res.in_scope = outside == []
    why = _not_applicable(case)
    if why:
        res.reason = why
        return res
    try:
        rep = prepare(case.model, device)
        onnx_ok, block_ok, worst = True, True, 0.0
        for inputs, refs in case.data_sets:
            outs = rep.run(list(inputs))
            for out, ref in zip(outs, refs, strict=True):
                ref = np.asarray(ref, np.float64)
                out = np.asarray(out, np.float64)
                if out.shape != ref.shape:
                    raise ValueError(f"output shape {out.shape}, expected {ref.shape}")
                err, same = errors(out, ref)
                onnx_ok &= bool(np.all(same | (err <= case.atol + case.rtol * np.atleast_1d(_finite(ref)))))
                block_ok &= bool(np.all(same | (err <= np.atleast_1d(block_bound(ref)))))
                peak = float(_finite(ref).max(initial=0.0))
                worst = max(worst, float(err.max(initial=0.0)) / (peak or 1.0))
        res.onnx_tolerance, res.max_error, res.bound_inputs = onnx_ok, worst, list(rep.bound)
        res.host_nodes = [op for _, op in rep.host]
        if onnx_ok or block_ok:
            res.outcome = "host" if rep.host else "overlay"
        else:
            res.outcome, res.reason = "failed", f"largest error {worst:.3g} of the output's peak"
    except (CompileError, SessionError, ValueError, NotImplementedError, ArithmeticError) as exc:
        res.outcome, res.reason = "failed", f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]}"
    except Exception as exc:  # noqa: BLE001 - a conformance run reports every failure and goes on
        res.outcome, res.reason = "failed", f"crash: {type(exc).__name__}: {str(exc).splitlines()[0][:160] if str(exc) else ''}"
    res.seconds = round(time.perf_counter() - t0, 3)
    return res


def run(ops=OPS, device: str = "CPU", progress=None) -> list:
    """Run every case of *ops*; *progress* (optional) is called with each result."""
    results = []
    for op, case in collect(ops):
        r = run_case(op, case, device)
        results.append(r)
        if progress:
            progress(r)
    return results


def summarize(results) -> dict:
    """Counts per op and in total, and the case names of each outcome (the ``--json`` object)."""
    per_op = {}
    for r in results:
        d = per_op.setdefault(r.op, {"cases": 0, "overlay": 0, "host": 0, "failed": 0, "n/a": 0,
                                     "onnx_tolerance": 0, "block_bound_only": 0})
        d["cases"] += 1
        d[r.outcome] += 1
        if r.outcome in ("overlay", "host"):
            d["onnx_tolerance" if r.onnx_tolerance else "block_bound_only"] += 1
    total = {k: sum(d[k] for d in per_op.values()) for k in
             ("cases", "overlay", "host", "failed", "n/a", "onnx_tolerance", "block_bound_only")}
    applicable = total["cases"] - total["n/a"]
    total["pass_rate"] = round((total["overlay"] + total["host"]) / applicable, 4) if applicable else None
    scoped = [r for r in results if r.in_scope and r.outcome != "n/a"]
    scope = {"cases": len(scoped), "overlay": sum(r.outcome == "overlay" for r in scoped),
             "not_on_overlay": [r.name for r in scoped if r.outcome != "overlay"]}
    return {"ops": per_op, "total": total, "attention_scope": scope, "cases": [asdict(r) for r in results]}


def markdown(summary: dict, device: str = "CPU") -> str:
    """The conformance table (``docs/conformance.md``), from a :func:`summarize` object."""
    lines = [
        "# ONNX backend conformance",
        "",
        "Generated by `kvoverlay conformance --markdown` (a test fails when this page is stale). ONNX's own node cases",
        "(`onnx.backend.test.case.node`) for the transformer op set, each compiled for the `tiny` preset in w16 and run",
        (f"on the {'golden model' if device.upper() in ('CPU', 'ISA') else 'Verilated overlay'} through "
        "`kvoverlay.onnx_backend`. An `_expanded` case (the op's function body) counts for its op."),
        "",
        "- **overlay**: passed with the work on the overlay; **host**: passed with the op placed on the host;",
        "- **ONNX tol.**: of those, passed at the case's own `rtol`/`atol`; **block bound only**: passed only at",
        "  `|out - ref| <= 2**-10 * max|ref| + 1e-3 * |ref|` (16-bit block floating point: error scales with the",
        "  vector's peak; see `kvoverlay/host/conformance.py` and `docs/numerics.md`); a nan or an infinity counts as",
        "  equal only where the reference holds the same at the same place (nan for nan, as ONNX's own runner); anywhere",
        "  else it is an error that no bound admits (a fully masked attention row is 0 or nan as the op's spec says);",
        "- **failed**: missed both bounds or was refused by the compiler (first reason shown);",
        "- **n/a**: an output outside the overlay's formats (integer or boolean results).",
        "",
        total_line(summary["total"]),
        "",
        scope_line(summary["attention_scope"]),
        "",
        "| op | cases | overlay | host | ONNX tol. | block bound only | failed | n/a | first failure |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    lines += [row(summary, op) for op in summary["ops"]]
    return "\n".join(lines) + "\n"


def total_line(t: dict) -> str:
    """The totals sentence of :func:`markdown`, from ``summary["total"]``."""
    return (f"Total: {t['cases']} cases, {t['n/a']} n/a; of the {t['cases'] - t['n/a']} applicable, "
            f"{t['overlay'] + t['host']} pass ({100 * (t['pass_rate'] or 0):.1f}%): {t['onnx_tolerance']} at ONNX's "
            f"tolerance, {t['block_bound_only']} at the block bound only; {t['failed']} fail.")


def scope_line(scope: dict) -> str:
    """The sentence of :func:`markdown` on Attention's declared scope, from ``summary["attention_scope"]``."""
    return (f"Attention within its declared scope on the overlay (GQA, past/present KV, causal and boolean/float masks, "
            f"scale; the op's own cases): {scope['overlay']} of {scope['cases']} pass on the overlay. Outside it ("
            + ", ".join(ATTENTION_OUTSIDE.values()) + ") the op runs on the host.")


def row(summary: dict, op: str) -> str:
    """The table line of *op* in :func:`markdown` (with its first failure: the case and the reason)."""
    d = summary["ops"][op]
    first = next((f"`{c['name']}`: {c['reason']}".replace("|", "\\|") for c in summary["cases"]
                  if c["op"] == op and c["outcome"] == "failed"), "")
    return (f"| {op} | {d['cases']} | {d['overlay']} | {d['host']} | {d['onnx_tolerance']} | {d['block_bound_only']} "
            f"| {d['failed']} | {d['n/a']} | {first} |")


def table(summary: dict) -> str:
    """The per-op table for a terminal, with the legend of its columns."""
    cols = ("cases", "overlay", "host", "onnx_tolerance", "block_bound_only", "failed", "n/a")
    heads = ("op", "cases", "overlay", "host", "onnx-tol", "block-only", "failed", "n/a")
    rows = [(op, *(str(d[k]) for k in cols)) for op, d in summary["ops"].items()]
    t = summary["total"]
    rows.append(("total", *(str(t[k]) for k in cols)))
    widths = [max(len(r[i]) for r in [heads, *rows]) for i in range(len(heads))]
    fmt = "  ".join(f"{{:{'<' if i == 0 else '>'}{w}}}" for i, w in enumerate(widths))
    lines = [fmt.format(*heads), *(fmt.format(*r) for r in rows), ""]
    applicable = t["cases"] - t["n/a"]
    lines.append(f"{t['overlay'] + t['host']} of {applicable} applicable cases pass "
                 f"({100 * (t['pass_rate'] or 0):.1f}%).")
    lines.append("overlay/host: passed with the work there; onnx-tol: of those, within the case's own rtol/atol; "
                 "block-only: only within the block-floating-point bound 2**-10*max|ref| + 1e-3*|ref|; "
                 "n/a: outputs outside the overlay's formats. Failure reasons: --json or --markdown.")
    return "\n".join(lines)


def conformance_main(args) -> int:
    """``kvoverlay conformance``: run the cases of ``--ops`` on ``--device`` and print the table, JSON or markdown."""
    import json

    ops = OPS
    if args.ops:
        ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
        unknown = [o for o in ops if o not in OPS]
        if unknown or not ops:
            raise ValueError(f"--ops: {', '.join(unknown) or repr(args.ops)} not in the op set ({', '.join(OPS)})")
    device = {"isa": "CPU", "rtl": "RTL"}[args.device]
    summary = summarize(run(ops, device))
    if args.json:
        print(json.dumps(summary, indent=1))
    elif args.markdown:
        print(markdown(summary, device), end="")
    else:
        print(table(summary))
    return 0
