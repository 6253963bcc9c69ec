"""``kvoverlay bench decode``: the KV fill, the figures' definitions, the breakdown, the plot, and the cycle model
held to the RTL exactly (issue 11 asks within 1%) across a bench set (GEMV shapes, attention lengths, decode steps
at several sizes and formats) on the cached ``tiny`` Verilator model; the tiled LM head's steps are held to it in
tests/test_host_rtl.py."""

import json

import numpy as np
import pytest
from kvoverlay.host.bench import DecodeShape, bench_decode, compile_decoder, kv_fill
from kvoverlay.sim.golden import GoldenModel
from test_cli import assert_one_line_error, kvo

from kvoverlay import numerics as nx
from kvoverlay.config import PRESETS

TINY = PRESETS["tiny"]
SMALL = DecodeShape(hidden=128, layers=2, heads=4, kv_heads=2, vocab=256)


def test_kv_fill_writes_every_layer_up_to_the_context():
    program = compile_decoder(SMALL, TINY, "int8", 32)
    code, image = kv_fill(program, SMALL, 20)
    assert [i.op for i in code].count("KVAPPEND") == SMALL.layers * 20
    gold = GoldenModel(TINY, image)
    gold.run(code, args=[0])
    cap, d = TINY.kv_capacity, SMALL.head_dim
    for layer in program.manifest["kv"]["layers"].values():
        for h in range(SMALL.kv_heads):
            k, ek = gold.kv_read("k", layer["kv_base"], h, range(cap), d)
            written = ek > nx.EXP_MIN
            assert written[:20].all() and not written[20:].any()
            assert np.abs(k[:20]).max() > 0


def test_bench_decode_figures_follow_their_definitions():
    short = bench_decode(SMALL, TINY, "int8", context=8, steps=2)
    r = bench_decode(SMALL, TINY, "int8", context=32, steps=2)
    assert r["backend"] == "isa" and r["model_error"] == 0 and r["model_cycles_per_token"] == r["cycles_per_token"]
    assert r["bandwidth_efficiency"] == round(r["roofline_cycles_per_token"] / r["cycles_per_token"], 4)
    assert r["roofline_cycles_per_token"] == round(r["bytes_required_per_token"] / TINY.port_bytes, 1)
    assert r["bytes_required_per_token"] <= r["bytes_read_per_token"]
    b = r["breakdown"]
    # the compute queue runs one instruction at a time: its parts add up to its busy cycles; the attention runs in
    # the store queue, beside it (its busy cycles hold the attention's and the stores')
    parts = b["weight_streaming"] + b["gemv_overhead"] + b["vector"] + b["dispatch"]
    assert parts == r["busy"]["compute"]
    assert b["attention"] < r["busy"]["store"]
    # what the GEMVs hid: the step is shorter than its compute and attention work one after the other
    assert r["cycles_per_token"] < r["busy"]["compute"] + b["attention"]
    # a longer context costs attention cycles only: the weights and the vector work stay
    assert short["breakdown"]["weight_streaming"] == b["weight_streaming"]
    assert short["breakdown"]["vector"] == b["vector"]
    assert short["breakdown"]["attention"] < b["attention"]
    # which the GEMVs beside it hide: at this size the longer attention costs the step no cycle
    assert short["cycles_per_token"] == r["cycles_per_token"]


def test_bench_decode_cli_json_and_plot(tmp_path):
    png = tmp_path / "roofline.png"
    res = kvo("bench", "decode", "--hidden", "128", "--layers", "2", "--heads", "4", "--kv-heads", "2", "--vocab", "256",
              "--context", "16", "--weights", "int8,int4", "--config", "tiny", "--plot", png, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert [r["weights"] for r in out] == ["int8", "int4"]
    assert out[1]["bytes_required_per_token"] < out[0]["bytes_required_per_token"]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_decode_table_is_explained():
    res = kvo("bench", "decode", "--hidden", "128", "--layers", "1", "--heads", "4", "--kv-heads", "2", "--vocab", "256",
              "--context", "8", "--config", "tiny")
    assert res.returncode == 0, res.stderr
    for word in ("cycles/tok", "roofline", "bw eff", "model err", "weight streaming", "outside compute"):
        assert res.stdout.count(word) >= 2, word  # in the table and in its legend


@pytest.mark.parametrize(("args", "needle"), [
    (["--hidden", "100", "--heads", "3"], "--hidden 100"),
    (["--heads", "8", "--kv-heads", "3"], "--kv-heads 3"),
    (["--config", "tiny"], "--context 256"),
    (["--weights", "int3"], "int3"),
])
def test_bench_decode_bad_input_is_one_line(args, needle):
    assert_one_line_error(kvo("bench", "decode", *args), needle)


# ---------------------------------------------------------------- the cycle model against the RTL
@pytest.mark.parametrize(("shape", "weights", "context"), [
    (SMALL, "int8", 40),
    (SMALL, "int4", 9),
    (SMALL, "w16", 2),  # attention over one and two positions
    (DecodeShape(hidden=256, layers=1, heads=4, kv_heads=1, vocab=256), "w16", 64),
])
def test_golden_model_predicts_rtl_decode_steps_exactly(shape, weights, context):
    r = bench_decode(shape, TINY, weights, context=context, steps=2, backend="rtl")
    assert r["bit_exact"]
    assert r["model_error"] == 0 and r["model_cycles_per_token"] == r["cycles_per_token"], r
    assert r["fill_cycles"] > 0 and r["cycles_per_token"] > r["roofline_cycles_per_token"]


@pytest.mark.parametrize(("rows", "cols", "weights"), [(256, 256, "int4"), (96, 512, "w16")])
def test_golden_model_predicts_rtl_gemv_exactly(rows, cols, weights):
    from kvoverlay.sim.bench import bench_gemv

    r = bench_gemv(TINY, rows, cols, weights, "rtl")
    assert r["bit_exact"]
    assert r["golden_cycles"] == r["cycles"], r


def test_plot_without_matplotlib_names_the_extra(tmp_path):
    import subprocess
    import sys

    png = tmp_path / "p.png"
    code = "import sys; sys.modules['matplotlib'] = None; from kvoverlay.cli import main; sys.exit(main(sys.argv[1:]))"
    res = subprocess.run([sys.executable, "-c", code, "bench", "project", "--plot", str(png)], capture_output=True,
                         text=True, check=False)
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and 'pip install "kvoverlay[plot]"' in res.stderr
    assert not png.exists()
