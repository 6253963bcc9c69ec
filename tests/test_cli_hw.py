"""``kvoverlay export-verilog`` and ``kvoverlay bench gemv``, run as subprocesses on small sizes."""

import json

import pytest

pytest.importorskip("amaranth")
pytest.importorskip("cocotb_tools")

from test_cli import assert_one_line_error, kvo

from kvoverlay import numerics as nx
from kvoverlay.config import PRESETS


def test_export_verilog_writes_lint_clean_overlay(tmp_path):
    res = kvo("export-verilog", "--config", "tiny", "-o", tmp_path / "v")
    assert res.returncode == 0, res.stderr
    text = (tmp_path / "v" / "kvo_overlay.v").read_text()
    assert "module kvo_overlay(" in text
    for name in ("frontend", "gemv_unit", "load_unit", "store_unit", "req_unit", "dram_arbiter", "compute_queue"):
        assert name in text, name
    assert "verilator lint: clean" in res.stdout


def test_export_verilog_bad_config(tmp_path):
    assert_one_line_error(kvo("export-verilog", "--config", "nosuch", "-o", tmp_path), "nosuch")


def test_bench_gemv_isa_json():
    res = kvo("bench", "gemv", "--rows", "64", "--cols", "256", "--weights", "int4", "--backend", "isa", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    cfg = PRESETS["tiny"]
    # 64 rows of 8 scales and 128 bytes of weights, and the x record's 256 mantissas and exponent
    assert nx.row_stride(256, "int4", cfg.group_size, cfg.port_bytes) == 144
    roofline = (64 * 144 + 2 * 256 + 4) / cfg.port_bytes
    assert out["bytes_required"] == 64 * 144 + 516
    assert out["roofline_cycles"] == roofline
    assert out["cycles"] == out["golden_cycles"]
    assert out["bandwidth_efficiency"] == round(roofline / out["cycles"], 4)
    assert {"rows", "cols", "weights", "cycles", "roofline_cycles", "bandwidth_efficiency"} <= set(out)


def test_bench_gemv_rtl_tiles_rows_and_meets_roofline():
    # 2176 rows on tiny: two tiles of the 2048-word accumulator buffer
    res = kvo("bench", "gemv", "--rows", "2176", "--cols", "128", "--weights", "int8", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["bit_exact"] is True
    assert out["backend"] == "rtl"
    assert out["bandwidth_efficiency"] >= 0.9
    assert out["cycles"] >= out["roofline_cycles"]
    assert out["sim_cycles_per_s"] > 0


def test_bench_gemv_bad_shape_is_one_line_error():
    assert_one_line_error(kvo("bench", "gemv", "--rows", "8", "--cols", "100", "--backend", "isa"), "cols=100")
