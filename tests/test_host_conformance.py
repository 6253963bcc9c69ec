"""The conformance run over ONNX's node cases: outcomes classified honestly, and docs/conformance.md kept fresh."""

from pathlib import Path

import numpy as np
from kvoverlay.host import conformance

DOC = Path(__file__).resolve().parent.parent / "docs" / "conformance.md"


def test_block_bound_scales_with_the_peak():
    ref = np.array([1000.0, 1.0, -0.001])
    bound = conformance.block_bound(ref)
    np.testing.assert_allclose(bound, 2.0 ** -10 * 1000.0 + 1e-3 * np.abs(ref))


def test_every_case_of_the_op_set_runs_and_the_table_is_fresh():
    results = conformance.run()
    ops = {r.op for r in results}
    assert ops == set(conformance.OPS)  # every op of the set has node cases
    for r in results:
        assert r.outcome in ("overlay", "host", "failed", "n/a"), r
        assert not r.reason.startswith("crash"), (r.name, r.reason)  # no case dies with an exception we did not expect
        if r.outcome == "failed":
            assert r.reason
    summary = conformance.summarize(results)
    # a case counted as passing passed at one of the two bounds
    t = summary["total"]
    assert t["onnx_tolerance"] + t["block_bound_only"] == t["overlay"] + t["host"]
    assert DOC.read_text() == conformance.markdown(summary), "docs/conformance.md is stale: kvoverlay conformance --markdown"
