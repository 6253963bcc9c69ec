"""The run-path harness's build (``kvoverlay.sim.rtl_harness``): its clock takes the fast path it was built for,
and clocks the gated units by their gates.

Bit-exactness of the harness against the golden model is ``tests/test_host_rtl.py``'s; here, what the build found
in Verilator's output. A Verilator that renamed the model's edge detector or its eval phases would still give a
working harness (the plain ``eval()`` per cycle), silently ~1.2x slower: this test makes that visible.
"""

import pytest

pytest.importorskip("cocotb_tools")

from kvoverlay.sim.rtl_harness import GATED_UNITS, PREFIX, build_harness

from kvoverlay.config import PRESETS


def test_tiny_harness_clocks_the_edge_phases_alone():
    header = (build_harness(PRESETS["tiny"]).parent / "kvo_mem.h").read_text()
    assert "#define KVO_CLK_PREV(top)" in header
    assert "#define KVO_EDGE(top)" in header
    for phase in ("act", "nba"):
        assert f"bool {PREFIX}___024root___eval_phase__{phase}({PREFIX}___024root* vlSelf);" in header
    # each gated unit's clock follows its gate at a run's edges, and its edge detector is reset with the main one's
    assert GATED_UNITS
    for unit in GATED_UNITS:
        assert f"(top)->{unit}_gated_clk = (top)->gate_{unit};" in header
        assert f"(top)->rootp->__Vtrigprevexpr___TOP__{unit}_gated_clk__0 = 0;" in header
