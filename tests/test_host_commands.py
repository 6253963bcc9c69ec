"""The compile / run / demo contract, run as subprocesses: JSON keys, npz dumps, determinism, one-line errors."""

import json

import numpy as np
import onnx
import pytest
from kvoverlay.models.demo import build_llama_onnx
from onnx import TensorProto, helper, numpy_helper
from test_cli import assert_one_line_error, kvo

RUN_KEYS = {"backend", "tokens", "prompt_tokens", "cycles", "cycles_per_token", "bytes_read_per_token",
            "roofline_cycles_per_token", "bandwidth_efficiency", "wall_s", "placement"}
COMPILE_KEYS = {"instructions", "program_bytes", "weight_bytes", "kv_capacity_tokens", "placement", "compile_s"}


@pytest.fixture(scope="module")
def demo(tmp_path_factory):
    d = tmp_path_factory.mktemp("demo")
    model = d / "demo.onnx"
    build_llama_onnx(model)
    res = kvo("compile", model, "-o", d / "demo.kvo", "--weights", "int8", "--max-seq", "24", "--json")
    assert res.returncode == 0, res.stderr
    return d, model, d / "demo.kvo", json.loads(res.stdout)


def test_compile_json(demo):
    _, _, prog, report = demo
    assert set(report) == COMPILE_KEYS
    assert report["program_bytes"] == prog.stat().st_size
    assert report["kv_capacity_tokens"] == 64
    assert "attn" in report["placement"]["overlay"]


def test_compile_is_deterministic(demo, tmp_path):
    _, model, prog, _ = demo
    again = tmp_path / "again.kvo"
    assert kvo("compile", model, "-o", again, "--weights", "int8", "--max-seq", "24").returncode == 0
    assert again.read_bytes() == prog.read_bytes()


def test_run_json_check_and_dump(demo, tmp_path):
    _, model, prog, _ = demo
    dump = tmp_path / "out.npz"
    res = kvo("run", prog, "--prompt", "5,17,42", "--max-new-tokens", "6", "--check", model, "--dump", dump, "--json")
    assert res.returncode == 0, res.stderr
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 1
    out = json.loads(lines[0])
    assert RUN_KEYS <= set(out)
    assert out["backend"] == "isa" and out["prompt_tokens"] == 3 and len(out["tokens"]) == 6
    assert 0 < out["bandwidth_efficiency"] <= 1
    assert out["roofline_cycles_per_token"] <= out["cycles_per_token"]
    ref = out["reference"]
    assert {"tokens", "token_match", "logits_cosine_min", "logits_max_abs_err"} <= set(ref)
    assert ref["logits_cosine_min"] >= 0.99
    with np.load(dump) as z:
        assert z["tokens"].dtype == np.int64 and z["tokens"].tolist() == out["tokens"]
        assert z["logits"].shape == (6, 64)
        assert [int(np.argmax(row)) for row in z["logits"]] == out["tokens"]


def test_prompt_beyond_max_seq(demo):
    _, _, prog, _ = demo
    assert_one_line_error(kvo("run", prog, "--prompt", ",".join(["1"] * 20), "--max-new-tokens", "8"), "max-seq 24")


@pytest.mark.parametrize("damage", ["truncate", "flip", "version"])
def test_damaged_program(demo, tmp_path, damage):
    _, _, prog, _ = demo
    blob = bytearray(prog.read_bytes())
    if damage == "truncate":
        blob = blob[: len(blob) // 2]
    elif damage == "flip":
        blob[-100] ^= 0xFF
    else:
        blob[8] = 99
    bad = tmp_path / "bad.kvo"
    bad.write_bytes(bytes(blob))
    assert_one_line_error(kvo("run", bad), {"truncate": "truncated", "flip": "checksum", "version": "version"}[damage])


def _graph(nodes, inits, extra_inputs=(), out_name="logits"):
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    out = helper.make_tensor_value_info(out_name, TensorProto.FLOAT, ["batch_size", "sequence_length", 16])
    g = helper.make_graph(nodes, "g", [ids, *extra_inputs], [out], initializer=inits)
    return helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)])


def test_unsupported_op_names_node_op_and_opset(tmp_path):
    emb = numpy_helper.from_array(np.ones((16, 16), np.float32), "emb")
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
             helper.make_node("Sin", ["h"], ["logits"], name="weird_sine")]
    path = tmp_path / "m.onnx"
    onnx.save(_graph(nodes, [emb]), path)
    res = kvo("compile", path, "-o", tmp_path / "m.kvo")
    assert_one_line_error(res, "weird_sine", "Sin", "opset 18")
    assert not (tmp_path / "m.kvo").exists()


def test_unpinnable_dim_names_input_and_dim(tmp_path):
    emb = numpy_helper.from_array(np.ones((16, 16), np.float32), "emb")
    extra = helper.make_tensor_value_info("extra", TensorProto.FLOAT, ["mystery", 16])
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
             helper.make_node("Identity", ["h"], ["logits"], name="id")]
    path = tmp_path / "m.onnx"
    onnx.save(_graph(nodes, [emb], [extra]), path)
    assert_one_line_error(kvo("compile", path, "-o", tmp_path / "m.kvo"), "'extra'", "mystery")


def test_external_data_outside_folder_refused(tmp_path):
    model = build_llama_onnx()
    sub = tmp_path / "model"
    sub.mkdir()
    for init in model.graph.initializer:
        if init.name == "model.embed_tokens.weight":
            init.data_location = TensorProto.EXTERNAL
            init.ClearField("raw_data")
            init.ClearField("float_data")
            init.external_data.add(key="location", value="../secret.bin")
    onnx.save(model, sub / "m.onnx")
    assert_one_line_error(kvo("compile", sub / "m.onnx", "-o", tmp_path / "m.kvo"), "escapes")


def test_weights_format_not_in_config(tmp_path, demo):
    _, model, _, _ = demo
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "tiny"\nweight_formats = ["int8"]\n')
    assert_one_line_error(kvo("compile", model, "-o", tmp_path / "m.kvo", "--config", cfg, "--weights", "w16"),
                          "w16", "int8")


def test_model_larger_than_kv_buffer(tmp_path, demo):
    _, model, _, _ = demo
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "tiny"\nmax_layers = 1\n')
    assert_one_line_error(kvo("compile", model, "-o", tmp_path / "m.kvo", "--config", cfg), "layer 1", "KV")


def demo_rows(stdout):
    """The demo's table rows (split on whitespace), up to the blank line before its legend."""
    table = stdout.split("\n\n")[0].splitlines()
    assert table[0].split() == ["weights", "tokens", "match", "cosine", "cycles/tok", "bw", "eff"]
    return [line.split() for line in table[1:]]


def test_demo_runs():
    res = kvo("demo", "--tokens", "8")
    assert res.returncode == 0, res.stderr
    rows = demo_rows(res.stdout)
    assert [r[0] for r in rows] == ["w16", "int8", "int4", "rtl-int8"]
    assert rows[0][2] == "8/8", res.stdout
    # the int8 program on the Verilated overlay: same tokens as its isa row, logits bit-exact
    assert rows[3][1] == rows[1][1] and rows[3][2:4] == ["8/8", "bit-exact"], res.stdout
    assert float(rows[3][4]) > 0


def test_demo_without_rtl():
    res = kvo("demo", "--tokens", "2", "--no-rtl")
    assert res.returncode == 0, res.stderr
    assert [r[0] for r in demo_rows(res.stdout)] == ["w16", "int8", "int4"]


def test_demo_explains_its_columns_and_keeps_its_files(tmp_path):
    """--keep writes what the README's other commands take; the match column is the agreeing prefix."""
    keep = tmp_path / "kept"
    res = kvo("demo", "--tokens", "8", "--no-rtl", "--keep", keep)
    assert res.returncode == 0, res.stderr
    legend = res.stdout.split("\n\n", 1)[1]
    for column in ("match", "cosine", "cycles/tok", "bw eff"):
        assert any(line.startswith(column + " ") for line in legend.splitlines()), column
    assert "onnxruntime" in legend and "roofline" in legend
    assert max(map(len, res.stdout.splitlines())) <= 100
    assert sorted(p.name for p in keep.iterdir()) == ["demo-int4.kvo", "demo-int8.kvo", "demo-w16.kvo", "demo.onnx"]
    assert f"kvoverlay run {keep / 'demo-int8.kvo'} --max-new-tokens 8 --check {keep / 'demo.onnx'}" in res.stderr
    for row in demo_rows(res.stdout):
        run = kvo("run", keep / f"demo-{row[0]}.kvo", "--max-new-tokens", "8", "--check", keep / "demo.onnx", "--json")
        assert run.returncode == 0, run.stderr
        out = json.loads(run.stdout)
        assert ",".join(map(str, out["tokens"])) == row[1]
        agree = next((i for i, (a, b) in enumerate(zip(out["tokens"], out["reference"]["tokens"])) if a != b), 8)
        assert row[2] == f"{agree}/8" == f"{out['reference']['matching_prefix']}/8"
    int4 = demo_rows(res.stdout)[2]
    if int4[2] != "8/8":  # the row that parts from onnxruntime says why
        assert "int4:" in legend and "random" in legend and "apart" in legend


def test_demo_keep_into_a_file_is_refused(tmp_path):
    (tmp_path / "f").write_text("")
    assert_one_line_error(kvo("demo", "--tokens", "2", "--no-rtl", "--keep", tmp_path / "f"), "not a directory")


def test_compile_into_a_missing_folder_names_the_folder(demo, tmp_path):
    _, model, _, _ = demo
    res = kvo("compile", model, "-o", tmp_path / "nope" / "m.kvo")
    assert_one_line_error(res, f"directory {tmp_path / 'nope'} does not exist")
    assert ".tmp" not in res.stderr and not (tmp_path / "nope").exists()


def test_waves_need_the_rtl_backend(demo, tmp_path):
    _, _, prog, _ = demo
    assert_one_line_error(kvo("run", prog, "--waves", tmp_path / "w.vcd", "--max-new-tokens", "2"), "--backend rtl")
