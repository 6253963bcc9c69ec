"""GemvEngine under Verilator via cocotb: bit-exact with numerics.gemv_acc, exact cycle count.

One Verilator build per shape serves every weight format: the weight memory holds one
matrix per format back to back, and ``fmt`` and ``w_base`` are run-time inputs.
"""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("amaranth")
pytest.importorskip("cocotb_tools")

from amaranth.back import verilog
from cocotb_tools.runner import get_results, get_runner
from kvoverlay.hw.gemv import FMT_CODES
from kvoverlay.hw.sim_top import TOP_NAME, GemvSimTop

from kvoverlay import numerics, toolchain
from kvoverlay.config import PRESETS
from kvoverlay.isa import ENUMS
from kvoverlay.timing import gemv_engine_cycles

TESTS = Path(__file__).parent
#: (rows, cols, group): the brief's 64x64 g32 tile (weights start mid-word), 256 cols g8
#: (8 scale words, weights word-aligned) and 96 cols g32 (3 scales, 6-byte offset).
SHAPES = [(64, 64, 32), (16, 256, 8), (8, 96, 32)]
#: Weight formats run on each shape; int4 needs a group of at least 2 * port_bytes (16).
FORMATS = {(64, 64, 32): ("int4", "int8", "w16", "uint4"), (16, 256, 8): ("int8", "w16"),
           (8, 96, 32): ("int4", "int8", "w16", "uint4")}
CASES = [(shape, fmt) for shape in SHAPES for fmt in FORMATS[shape]]
QRANGE = {"int4": (-8, 8), "int8": (-128, 128), "w16": (-32768, 32768), "uint4": (0, 16)}


def test_fmt_codes_match_isa():
    assert tuple(sorted(FMT_CODES, key=FMT_CODES.get)) == tuple(ENUMS["fmt"])


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Build (once per shape) a sim top holding one matrix per format; returns a getter."""
    cache = {}

    def get(shape):
        if shape in cache:
            return cache[shape]
        ROWS, COLS, GROUP = shape
        toolchain.ensure_verilator()
        cfg = PRESETS["tiny"]
        rng = np.random.default_rng(1234)
        x = rng.integers(-32768, 32768, size=COLS, dtype=np.int64)
        blob = b""
        mats = {}
        for fmt in FORMATS[shape]:
            lo, hi = QRANGE[fmt]
            q = rng.integers(lo, hi, size=(ROWS, COLS), dtype=np.int64)
            sm = rng.integers(1, 65536, size=(ROWS, COLS // GROUP), dtype=np.int64)  # uint4: 12-bit scale, zero point
            stride = numerics.row_stride(COLS, fmt, GROUP, cfg.port_bytes)
            mats[fmt] = {"q": q, "sm": sm, "stride": stride, "w_base": len(blob) // cfg.port_bytes}
            blob += numerics.pack_rows(q, sm, fmt, GROUP, align=cfg.port_bytes)
        top = GemvSimTop(cfg, blob, x, acc_depth=ROWS)
        work = tmp_path_factory.mktemp("gemv")
        src = work / f"{TOP_NAME}.v"
        src.write_text(verilog.convert(top, name=TOP_NAME))
        runner = get_runner("verilator")
        runner.build(sources=[src], hdl_toplevel=TOP_NAME, build_dir=work / "build",
                     build_args=["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC"])
        cache[shape] = {"cfg": cfg, "x": x, "mats": mats, "runner": runner, "work": work}
        return cache[shape]

    return get


@pytest.mark.parametrize("shape,fmt", CASES, ids=["x".join(map(str, s)) + f"-{f}" for s, f in CASES])
def test_gemv_bit_exact(builds, shape, fmt):
    c = builds(shape)
    ROWS, COLS, GROUP = shape
    cfg = c["cfg"]
    mat = c["mats"][fmt]
    words_per_row = mat["stride"] // cfg.port_bytes
    expected = numerics.gemv_acc(*numerics.effective_weights(mat["q"], mat["sm"], fmt, GROUP), c["x"], GROUP)
    work = c["work"]
    case = {
        "rows": ROWS, "cols": COLS, "group_log2": GROUP.bit_length() - 1,
        "fmt": FMT_CODES[fmt], "w_base": mat["w_base"],
        "expected": [int(v) for v in expected], "cycles": gemv_engine_cycles(cfg, ROWS, words_per_row),
        "result": str(work / f"result_{fmt}.json"),
    }
    case_file = work / f"case_{fmt}.json"
    case_file.write_text(json.dumps(case))
    xml = c["runner"].test(hdl_toplevel=TOP_NAME, test_module="cocotb_gemv", test_dir=TESTS,
                           build_dir=work / "build", extra_env={"GEMV_CASE": str(case_file)},
                           results_xml=str(work / f"results_{fmt}.xml"))
    _, failed = get_results(xml)
    result = json.loads(Path(case["result"]).read_text())
    roofline = ROWS * mat["stride"] / cfg.port_bytes
    print(f"gemv {ROWS}x{COLS} {fmt} g{GROUP}: {result['cycles']} cycles, roofline {roofline:.0f}, "
          f"efficiency {roofline / result['cycles']:.3f}")
    assert failed == 0
    assert result["acc"] == case["expected"]
    assert result["cycles"] == case["cycles"]
