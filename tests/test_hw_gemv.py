"""GemvEngine under Verilator via cocotb: bit-exact with numerics.gemv_acc, exact cycle count.

One Verilator build per configuration serves every shape and weight format: the weight memory holds one
matrix per shape and format back to back, and ``rows``, ``cols``, ``group_log2``, ``fmt`` and ``w_base`` are
run-time inputs. Groups narrower than the engine's window (one port word of weights) run on every configuration.
"""

import json
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("amaranth")
pytest.importorskip("cocotb_tools")

from amaranth.back import verilog
from amaranth.hdl import Fragment
from cocotb_tools.runner import get_results, get_runner
from kvoverlay.hw.gemv import FMT_CODES, GemvEngine
from kvoverlay.hw.sim_top import TOP_NAME, GemvSimTop
from kvoverlay.sim.rtl import prune_build

from kvoverlay import numerics, toolchain
from kvoverlay.config import PRESETS
from kvoverlay.isa import ENUMS
from kvoverlay.timing import (
    gemv_engine_cycles,
    gemv_late_window,
    gemv_narrow_scales,
    gemv_pack_refusal,
    gemv_packed_cycles,
)

TESTS = Path(__file__).parent
#: The configurations built, once each: tiny, ulx3s (a 256-bit port: int4 groups of 32 hold half a port word) and
#: tiny with a 512-bit port, whose window (one port word of weights) is wider than a group of 16 in every format.
CONFIGS = {"tiny": PRESETS["tiny"], "ulx3s": PRESETS["ulx3s"], "wide": PRESETS["tiny"].replace(port_bits=512)}
#: config -> {(rows, cols, group): formats}. tiny: the brief's 64x64 g32 tile (weights start mid-word), 256 cols g8
#: (8 scale words, weights word-aligned; int4 groups of 8 are half a window) and 96 cols g32 (3 scales, 6-byte
#: offset). ulx3s (built for groups of min_group=32 or more): groups of 32 (int4: 2 per window) and 64 (int4 one
#: window, int8 2, w16 4), 12 and 6 header bytes before the weights; rows that end in half a window (int4 cols
#: of an odd number of groups of 32): 32 and 96 cols, whose last half window lies in the row's last word past the
#: headers (taken late, timing.gemv_late_window), and 288 cols, whose last one spans two words. wide:
#: groups of 16 and 8, narrower than a window in every format, and rows of half a window (64 int4 columns) and one
#: and a half (48 w16 ones), both late.
SHAPES = {
    "tiny": {(64, 64, 32): ("int4", "int8", "w16", "uint4"), (16, 256, 8): ("int4", "int8", "w16", "uint4"),
             (8, 96, 32): ("int4", "int8", "w16", "uint4")},
    "ulx3s": {(6, 192, 32): ("int4", "uint4"), (4, 192, 64): ("int4", "int8", "w16", "uint4"),
              (4, 32, 32): ("int4", "uint4"), (3, 96, 32): ("int4", "uint4"), (2, 288, 32): ("int4", "uint4")},
    "wide": {(4, 256, 16): ("int4", "int8", "w16", "uint4"), (3, 512, 8): ("int4", "w16"),
             (3, 64, 16): ("int4", "uint4"), (2, 48, 16): ("w16",)},
}
CASES = [(name, shape, fmt) for name, shapes in SHAPES.items() for shape, fmts in shapes.items() for fmt in fmts]
#: Packed rows (GEMV packed=1), on the one config built for them: blocks of 8 int8 rows (the last one of 5), 8 int4
#: rows (one of 1), 4 w16 rows (one of 3), 16 uint4 rows (one of 1) and 2 int8 rows (one of 1), each block's drain
#: as long as its stream or shorter.
PACKED = {"wide": {(13, 32, 8): ("int8",), (9, 64, 16): ("int4",), (7, 48, 8): ("w16",), (17, 64, 8): ("uint4",),
                   (5, 96, 32): ("int8",)}}
PACKED_CASES = [(name, shape, fmt) for name, shapes in PACKED.items() for shape, fmts in shapes.items() for fmt in fmts]
QRANGE = {"int4": (-8, 8), "int8": (-128, 128), "w16": (-32768, 32768), "uint4": (0, 16)}


def test_fmt_codes_match_isa():
    assert tuple(sorted(FMT_CODES, key=FMT_CODES.get)) == tuple(ENUMS["fmt"])


def test_cases_cover_narrow_groups():
    """Every config runs a group narrower than the engine's window, in every format on the wide port."""
    for name, shapes in SHAPES.items():
        cfg = CONFIGS[name]
        narrow = {fmt for (_, _, group), fmts in shapes.items() for fmt in fmts if group < cfg.weights_per_cycle(fmt)}
        assert narrow, name
        assert all(cfg.builds_group(group) for _, _, group in shapes), name
    assert narrow == set(CONFIGS["wide"].weight_formats)


@pytest.fixture(scope="module")
def builds(tmp_path_factory):
    """Build (once per config) a sim top holding one matrix per shape and format; returns a getter."""
    cache = {}

    def get(name):
        if name in cache:
            return cache[name]
        toolchain.ensure_verilator()
        cfg = CONFIGS[name]
        rng = np.random.default_rng(1234)
        shapes = SHAPES[name]
        packed = PACKED.get(name, {})
        x = rng.integers(-32768, 32768, size=max(cols for _, cols, _ in [*shapes, *packed]), dtype=np.int64)
        x[:8] = -32768  # the extreme products, in the first groups
        blob = b""
        mats = {}
        for (rows, cols, group), fmts in shapes.items():
            for fmt in fmts:
                lo, hi = QRANGE[fmt]
                q = rng.integers(lo, hi, size=(rows, cols), dtype=np.int64)
                q[0] = lo if fmt != "uint4" else 0  # uint4: the largest |q - z| where the zero point is 15
                sm = rng.integers(1, 65536, size=(rows, cols // group), dtype=np.int64)  # uint4: 12-bit scale, zp
                sm[0] = 65535
                stride = numerics.row_stride(cols, fmt, group, cfg.port_bytes)
                mats[(rows, cols, group), fmt] = {"q": q, "sm": sm, "stride": stride,
                                                  "w_base": len(blob) // cfg.port_bytes}
                blob += numerics.pack_rows(q, sm, fmt, group, align=cfg.port_bytes)
        for (rows, cols, group), fmts in packed.items():
            for fmt in fmts:
                lo, hi = QRANGE[fmt]
                q = rng.integers(lo, hi, size=(rows, cols), dtype=np.int64)
                q[-1] = lo if fmt != "uint4" else 0  # the extremes in the last, partial block
                sm = rng.integers(1, 65536, size=(rows, cols // group), dtype=np.int64)
                sm[-1] = 65535
                mats[(rows, cols, group), fmt, "packed"] = {"q": q, "sm": sm, "w_base": len(blob) // cfg.port_bytes}
                blob += numerics.pack_matrix(q, sm, fmt, group, cfg.port_bytes, packed=True)
        top = GemvSimTop(cfg, blob, x, acc_depth=max(rows for rows, _, _ in [*shapes, *packed]))
        work = tmp_path_factory.mktemp(f"gemv_{name}")
        src = work / f"{TOP_NAME}.v"
        src.write_text(verilog.convert(top, name=TOP_NAME))
        runner = get_runner("verilator")
        runner.build(sources=[src], hdl_toplevel=TOP_NAME, build_dir=work / "build",
                     build_args=["-Wno-fatal", "-Wno-WIDTHEXPAND", "-Wno-WIDTHTRUNC"])
        prune_build(work / "build")
        cache[name] = {"cfg": cfg, "x": x, "mats": mats, "runner": runner, "work": work}
        return cache[name]

    return get


@pytest.mark.parametrize("name,shape,fmt", CASES, ids=[f"{n}-" + "x".join(map(str, s)) + f"-{f}" for n, s, f in CASES])
def test_gemv_bit_exact(builds, name, shape, fmt):
    c = builds(name)
    ROWS, COLS, GROUP = shape
    cfg = c["cfg"]
    mat = c["mats"][shape, fmt]
    words_per_row = mat["stride"] // cfg.port_bytes
    late = gemv_late_window(cfg, COLS, fmt, GROUP)
    assert late == (shape in ((4, 32, 32), (3, 96, 32), (3, 64, 16), (2, 48, 16)))
    result = _run(c, shape, fmt, mat, gemv_engine_cycles(cfg, ROWS, words_per_row, fmt, GROUP) + late)
    roofline = ROWS * mat["stride"] / cfg.port_bytes
    print(f"gemv {name} {ROWS}x{COLS} {fmt} g{GROUP}: {result['cycles']} cycles, roofline {roofline:.0f}, "
          f"efficiency {roofline / result['cycles']:.3f}")


def _run(c, shape, fmt, mat, cycles, packed=None):
    """Run one tile on build *c*; assert its accumulators (numerics.gemv_acc) and its *cycles*."""
    ROWS, COLS, GROUP = shape
    x = c["x"][:COLS]
    expected = numerics.gemv_acc(*numerics.effective_weights(mat["q"], mat["sm"], fmt, GROUP), x, GROUP)
    work = c["work"]
    tag = f"{ROWS}x{COLS}g{GROUP}_{fmt}" + ("_packed" if packed else "")
    case = {
        "rows": ROWS, "cols": COLS, "group_log2": GROUP.bit_length() - 1,
        "fmt": FMT_CODES[fmt], "w_base": mat["w_base"],
        "expected": [int(v) for v in expected],
        "cycles": cycles,
        "result": str(work / f"result_{tag}.json"),
        **({} if packed is None else {"packed": packed}),
    }
    case_file = work / f"case_{tag}.json"
    case_file.write_text(json.dumps(case))
    xml = c["runner"].test(hdl_toplevel=TOP_NAME, test_module="cocotb_gemv", test_dir=TESTS,
                           build_dir=work / "build", extra_env={"GEMV_CASE": str(case_file)},
                           results_xml=str(work / f"results_{tag}.xml"))
    _, failed = get_results(xml)
    result = json.loads(Path(case["result"]).read_text())
    assert failed == 0
    assert result["acc"] == case["expected"]
    assert result["cycles"] == case["cycles"]
    return result


@pytest.mark.parametrize("name,shape,fmt", PACKED_CASES,
                         ids=[f"{n}-" + "x".join(map(str, s)) + f"-{f}-packed" for n, s, f in PACKED_CASES])
def test_gemv_packed_bit_exact(builds, name, shape, fmt):
    """Rows narrower than a beat, packed in blocks (full and partial last blocks, blocks of 2 to 16 rows): bit-exact
    and at timing.gemv_packed_cycles; the words are reported beside the padded rows' (the compiler packs only where
    fewer)."""
    c = builds(name)
    rows, cols, group = shape
    cfg = c["cfg"]
    assert gemv_pack_refusal(cfg, cols, fmt, group) is None
    words = numerics.matrix_bytes(rows, cols, fmt, group, cfg.port_bytes, packed=True) // cfg.port_bytes
    padded = numerics.matrix_bytes(rows, cols, fmt, group, cfg.port_bytes) // cfg.port_bytes
    result = _run(c, shape, fmt, c["mats"][shape, fmt, "packed"], gemv_packed_cycles(cfg, rows, cols, fmt, group),
                  packed=1)
    print(f"gemv {name} {rows}x{cols} {fmt} g{group} packed: {result['cycles']} cycles, {words} words "
          f"(padded rows: {padded})")


@pytest.mark.parametrize("cfg", [PRESETS["ulx3s"].replace(group_size=64, min_group=64),
                                 PRESETS["tiny"].replace(port_bits=32)], ids=["ulx3s-min-group-64", "tiny-32-bit-port"])
def test_engine_without_narrow_groups_elaborates(cfg):
    """A config whose narrowest built group fills a window (one group scale per window) builds no narrow path."""
    assert gemv_narrow_scales(cfg) == 1
    Fragment.get(GemvEngine(cfg), None)
