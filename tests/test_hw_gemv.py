"""GemvEngine under Verilator via cocotb: bit-exact with numerics.gemv_acc, exact cycle count."""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("amaranth")
pytest.importorskip("cocotb_tools")

from amaranth.back import verilog
from cocotb_tools.runner import get_results, get_runner

from hw.gemv import gemv_cycles
from hw.sim_top import TOP_NAME, GemvSimTop
from kvoverlay import numerics, toolchain
from kvoverlay.config import PRESETS

TESTS = Path(__file__).parent
#: (rows, cols, group): the brief's 64x64 g32 tile (weights start mid-word), 256 cols g8
#: (8 scale words, weights word-aligned) and 96 cols g32 (3 scales, 6-byte offset).
SHAPES = [(64, 64, 32), (16, 256, 8), (8, 96, 32)]


@pytest.fixture(scope="module", params=SHAPES, ids=lambda s: "x".join(map(str, s)))
def gemv_case(request, tmp_path_factory):
    ROWS, COLS, GROUP = request.param
    toolchain.ensure_verilator()
    cfg = PRESETS["tiny"]
    rng = np.random.default_rng(1234)
    q = rng.integers(-128, 128, size=(ROWS, COLS), dtype=np.int64)
    sm = rng.integers(1, 65536, size=(ROWS, COLS // GROUP), dtype=np.int64)
    x = rng.integers(-32768, 32768, size=COLS, dtype=np.int64)
    blob = numerics.pack_rows(q, sm, "int8", GROUP, align=cfg.port_bytes)
    stride = numerics.row_stride(COLS, "int8", GROUP, cfg.port_bytes)
    top = GemvSimTop(cfg, blob, x, acc_depth=ROWS)
    work = tmp_path_factory.mktemp("gemv")
    src = work / f"{TOP_NAME}.v"
    src.write_text(verilog.convert(top, name=TOP_NAME))
    runner = get_runner("verilator")
    runner.build(sources=[src], hdl_toplevel=TOP_NAME, build_dir=work / "build",
                 build_args=["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC"])
    return {"cfg": cfg, "q": q, "sm": sm, "x": x, "stride": stride, "runner": runner, "work": work,
            "shape": request.param}


def test_gemv_int8_bit_exact(gemv_case):
    c = gemv_case
    ROWS, COLS, GROUP = c["shape"]
    cfg = c["cfg"]
    words_per_row = c["stride"] // cfg.port_bytes
    expected = numerics.gemv_acc(c["q"], c["sm"], c["x"], GROUP)
    case = {
        "rows": ROWS, "cols": COLS, "group_log2": GROUP.bit_length() - 1,
        "expected": [int(v) for v in expected], "cycles": gemv_cycles(ROWS, words_per_row),
        "result": str(c["work"] / "result.json"),
    }
    case_file = c["work"] / "case.json"
    case_file.write_text(json.dumps(case))
    xml = c["runner"].test(hdl_toplevel=TOP_NAME, test_module="cocotb_gemv", test_dir=TESTS,
                           build_dir=c["work"] / "build", extra_env={"GEMV_CASE": str(case_file)},
                           results_xml=str(c["work"] / "results.xml"))
    _, failed = get_results(xml)
    result = json.loads((c["work"] / "result.json").read_text())
    roofline = ROWS * c["stride"] / cfg.port_bytes
    print(f"gemv {ROWS}x{COLS} int8 g{GROUP}: {result['cycles']} cycles, roofline {roofline:.0f}, "
          f"efficiency {roofline / result['cycles']:.3f}")
    assert failed == 0
    assert result["acc"] == case["expected"]
    assert result["cycles"] == case["cycles"]
