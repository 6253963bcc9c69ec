"""The conformance run over ONNX's node cases: outcomes classified honestly, and docs/conformance.md kept fresh."""

from pathlib import Path

import numpy as np
import pytest
from kvoverlay.host import conformance

DOC = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"


def test_block_bound_scales_with_the_peak():
    ref = np.array([1000.0, 1.0, -0.001])
    bound = conformance.block_bound(ref)
    np.testing.assert_allclose(bound, 2.0 ** -10 * 1000.0 + 1e-3 * np.abs(ref))


def test_nan_is_right_only_where_the_reference_has_nan_too():
    ref = np.array([np.nan, 1.0, np.inf, 2.0, np.nan])
    out = np.array([np.nan, np.nan, np.inf, 2.5, 0.0])
    err, same = conformance.errors(out, ref)
    assert same.tolist() == [True, False, True, False, False]
    assert err.tolist() == [0.0, np.inf, 0.0, 0.5, np.inf]
    # the bound is over the finite reference: an inf or nan there neither widens nor poisons it
    np.testing.assert_allclose(conformance.block_bound(ref), 2.0 ** -10 * 2.0 + 1e-3 * np.array([0, 1, 0, 2, 0]))


@pytest.mark.parametrize("op", conformance.OPS)
def test_every_case_of_the_op_runs_and_its_row_is_fresh(op):
    """One op's cases (one test per op, so that pytest-xdist spreads them): its row of docs/conformance.md."""
    results = conformance.run((op,))
    assert results, f"{op} has no node cases"
    for r in results:
        assert r.outcome in ("overlay", "host", "failed", "n/a"), r
        assert not r.reason.startswith("crash"), (r.name, r.reason)  # no case dies with an exception we did not expect
        if r.outcome == "failed":
            assert r.reason
        if r.outcome == "host":
            assert r.host_nodes, r  # a host pass names what ran there
    summary = conformance.summarize(results)
    d = summary["ops"][op]
    assert d["onnx_tolerance"] + d["block_bound_only"] == d["overlay"] + d["host"]  # a pass passed one of the bounds
    doc = DOC.read_text().splitlines()
    assert conformance.row(summary, op) in doc, f"docs/conformance.md is stale for {op}: kvoverlay conformance --markdown"
    if op == "Attention":
        # every Attention case within the op's declared scope runs on the overlay, not the host
        scope = summary["attention_scope"]
        assert scope["cases"] > 40 and not scope["not_on_overlay"], scope
        assert conformance.scope_line(scope) in doc


def test_the_table_totals_are_its_rows_and_meet_the_target():
    doc = DOC.read_text().splitlines()
    rows = [ln.split(" | ") for ln in doc if ln.startswith("| ") and not ln.startswith("| op ")]
    keys = ("cases", "overlay", "host", "onnx_tolerance", "block_bound_only", "failed", "n/a")
    t = {k: sum(int(r[1 + i]) for r in rows) for i, k in enumerate(keys)}
    assert {r[0][2:] for r in rows} == set(conformance.OPS)
    t["pass_rate"] = round((t["overlay"] + t["host"]) / (t["cases"] - t["n/a"]), 4)
    assert conformance.total_line(t) in doc
    assert t["pass_rate"] >= 0.95  # issue 13's target at the block-relative bound


def test_cli_prints_the_table_json_and_markdown(capsys):
    import json

    from kvoverlay.cli import main

    assert main(["conformance", "--ops", "Neg,Concat"]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[0].split()[:3] == ["op", "cases", "overlay"] and "applicable cases pass" in out
    assert main(["conformance", "--ops", "Concat", "--json"]) == 0
    summary = json.loads(capsys.readouterr().out)
    assert set(summary["ops"]) == {"Concat"} and summary["total"]["cases"] == len(summary["cases"]) > 0
    assert main(["conformance", "--ops", "Neg", "--markdown"]) == 0
    assert capsys.readouterr().out.startswith("# ONNX backend conformance")


def test_cli_refuses_an_op_outside_the_set(capsys):
    from kvoverlay.cli import main

    assert main(["conformance", "--ops", "Neg,NoSuchOp"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("kvoverlay: error: --ops: NoSuchOp")
