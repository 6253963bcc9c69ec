"""The compile / run / demo contract, run as subprocesses: JSON keys, npz dumps, determinism, one-line errors."""

import json
import os
import subprocess
import sys

import numpy as np
import onnx
import pytest
from kvoverlay.models.demo import build_llama_onnx
from onnx import TensorProto, helper, numpy_helper
from test_cli import assert_one_line_error, kvo

RUN_KEYS = {"backend", "tokens", "prompt_tokens", "cycles", "cycles_per_token", "bytes_read_per_token",
            "bytes_required_per_token", "roofline_cycles_per_token", "bandwidth_efficiency", "wall_s", "placement"}
COMPILE_KEYS = {"instructions", "program_bytes", "weight_bytes", "kv_capacity_tokens", "placement", "compile_s",
                "tokenizer"}


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
    # the roofline's bytes (no padding, each byte once) never exceed what the port moved
    assert 0 < out["bytes_required_per_token"] <= out["bytes_read_per_token"]
    assert out["roofline_cycles_per_token"] == round(out["bytes_required_per_token"] / 8, 1)
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
    res = kvo("compile", path, "-o", tmp_path / "m.kvo", "--offload-device", "none")
    assert_one_line_error(res, "weird_sine", "Sin", "opset 18")
    assert not (tmp_path / "m.kvo").exists()
    # with an offload device (the default) the op is placed on the host, and the manifest says so
    res = kvo("compile", path, "-o", tmp_path / "m.kvo", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["placement"]["host"] == [["weird_sine", "Sin"]]
    # a decoder session takes programs the overlay runs whole: one line naming what did not fit
    assert_one_line_error(kvo("run", tmp_path / "m.kvo", "--offload-device", "none"), "weird_sine (Sin)")


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
    """More layers than the KV buffer holds is no compile error: the runtime runs layer 1's attention on the
    offload device (tests/test_host_offload.py holds its numbers against onnxruntime)."""
    _, model, _, _ = demo
    cfg = tmp_path / "c.toml"
    cfg.write_text('preset = "tiny"\nmax_layers = 1\n')
    res = kvo("compile", model, "-o", tmp_path / "m.kvo", "--config", cfg, "--max-seq", "8")
    assert res.returncode == 0, res.stderr
    res = kvo("run", tmp_path / "m.kvo", "--prompt", "5,17,42", "--max-new-tokens", "2", "--check", model, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["reference"]["logits_cosine_min"] >= 0.99


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


def test_run_sampled_with_stop_tokens(demo):
    _, _, prog, _ = demo
    args = ("run", prog, "--max-new-tokens", "10", "--temperature", "1.3", "--top-k", "20", "--top-p", "0.9",
            "--seed", "5", "--json")
    first = json.loads(kvo(*args).stdout)
    again = json.loads(kvo(*args).stdout)
    assert first["tokens"] == again["tokens"] and first["finish_reason"] == "length"
    assert first["sampling"] == {"temperature": 1.3, "top_k": 20, "top_p": 0.9, "seed": 5}
    stop = first["tokens"][3]
    cut = first["tokens"].index(stop)
    res = kvo(*args, "--stop", f"{stop}")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["tokens"] == first["tokens"][: cut + 1] and out["finish_reason"] == "stop"


@pytest.mark.parametrize("option,needle", [
    (("--temperature", "-0.5"), "temperature -0.5"), (("--top-p", "0"), "top-p 0.0"),
    (("--top-p", "1.5"), "top-p 1.5"), (("--top-k", "-1"), "top-k -1"), (("--prompt", "5,64"), "token 64"),
    (("--stop", "3,100"), "stop token 100"), (("--prompt", "5,x"), "--prompt"),
    (("--config", "nonsense"), "--config"), (("--args", "1"), "--args"),
])
def test_run_bad_request_is_one_line(demo, tmp_path, option, needle):
    _, _, prog, _ = demo
    dump = tmp_path / "out.npz"
    assert_one_line_error(kvo("run", prog, *option, "--dump", dump), needle)
    assert not dump.exists()


def test_run_check_model_refused_before_decoding(demo, tmp_path):
    _, _, prog, _ = demo
    dump = tmp_path / "out.npz"
    assert_one_line_error(kvo("run", prog, "--check", tmp_path / "missing.onnx", "--dump", dump), "no such file")
    assert_one_line_error(kvo("run", prog, "--check", prog, "--dump", dump), "not an ONNX model")
    other = tmp_path / "vocab80.onnx"
    build_llama_onnx(other, vocab=80)
    assert_one_line_error(kvo("run", prog, "--check", other, "--dump", dump), "80 tokens", "64")
    assert not dump.exists()


def test_run_backend_without_its_dependency(demo, tmp_path):
    """A backend whose package is missing names what to install (torch hidden from the subprocess)."""
    _, _, prog, _ = demo
    shadow = tmp_path / "shadow"
    shadow.mkdir()
    (shadow / "sitecustomize.py").write_text(
        "import importlib.util, sys\n"
        "_find = importlib.util.find_spec\n"
        "importlib.util.find_spec = lambda name, *a, **k: None if name.split('.')[0] in ('torch', 'cocotb_tools') "
        "else _find(name, *a, **k)\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(shadow), os.environ.get("PYTHONPATH", "")])}
    for backend, needle in (("gpu", "kvoverlay[torch]"), ("rtl", "cocotb_tools")):
        res = subprocess.run([sys.executable, "-m", "kvoverlay.cli", "run", str(prog), "--backend", backend],
                             capture_output=True, text=True, env=env, check=False)
        assert_one_line_error(res, f"--backend {backend} needs", needle)


def test_run_gpu_backend_json(demo):
    """--backend gpu: the same JSON object, its cycle and bandwidth figures null (no cycle counters), every step's
    placement off the overlay, and logits that follow onnxruntime."""
    pytest.importorskip("torch")
    _, model, prog, _ = demo
    runs = {}
    for backend in ("isa", "gpu"):
        res = kvo("run", prog, "--prompt", "5,17,42", "--max-new-tokens", "4", "--backend", backend,
                  "--offload-device", "cpu", "--check", model, "--json")
        assert res.returncode == 0, res.stderr
        runs[backend] = json.loads(res.stdout)
    out = runs["gpu"]
    assert RUN_KEYS <= set(out) and out["backend"] == "gpu"
    for key in ("cycles", "cycles_per_token", "roofline_cycles_per_token", "bandwidth_efficiency"):
        assert out[key] is None, key
    assert len(out["step_placement"]) == 4
    for i, p in enumerate(out["step_placement"]):
        assert p["device"] == "cpu" and p["kv_on_chip_tokens"] == 0 and p["kv_offloaded_tokens"] == 3 + i
        assert p["layers_offloaded"] == [0, 1] and p["ops_off_overlay"] == ["all"]
    assert all(p["device"] == "overlay" and p["kv_offloaded_tokens"] == 0 for p in runs["isa"]["step_placement"])
    assert out["reference"]["logits_cosine_min"] >= 0.99


def test_run_offload_device_none_refuses_what_needs_offload(demo, tmp_path):
    """A program compiled beyond the KV buffer runs with an offload device; with none it is refused in one line
    before any step, naming what did not fit."""
    _, model, _, _ = demo
    prog = tmp_path / "long.kvo"
    assert kvo("compile", model, "-o", prog, "--max-seq", "80", "--kv-capacity", "8").returncode == 0
    args = ("run", prog, "--prompt", "5,17,42,7,9", "--max-new-tokens", "6", "--json")
    dump = tmp_path / "out.npz"
    assert_one_line_error(kvo(*args, "--offload-device", "none", "--dump", dump), "10 tokens per layer", "8-token",
                          "--offload-device is none")
    assert not dump.exists()
    assert kvo(*args[:-3], "--max-new-tokens", "4", "--offload-device", "none").returncode == 0  # 8 positions fit
    pytest.importorskip("torch")
    res = kvo(*args, "--offload-device", "cpu")
    assert res.returncode == 0, res.stderr
    p = json.loads(res.stdout)["step_placement"]
    assert [s["kv_offloaded_tokens"] for s in p] == [0, 0, 0, 0, 1, 2]  # chose tokens at positions 5..10
    assert p[-1]["kv_on_chip_tokens"] == 8 and p[-1]["device"] == "cpu" and p[-1]["layers_offloaded"] == [0, 1]
    # the run's placement: the compile's op placement and where its last step ran
    placed = json.loads(res.stdout)["placement"]
    assert placed["host"] == [] and placed["kv_offloaded_tokens"] == 2 and placed["heads_offloaded"] > 0


@pytest.mark.parametrize("name", ["int4", "int4-sym", "int4-asym"])
def test_compile_int4_flavours(demo, tmp_path, name):
    """``--weights int4-sym`` compiles to the int4 format, ``int4-asym`` to uint4, plain int4 to the measured default."""
    from kvoverlay import bundle as kvbundle
    from kvoverlay import isa
    from kvoverlay.config import WEIGHT_CHOICES

    _, model, _, _ = demo
    out = tmp_path / f"{name}.kvo"
    res = kvo("compile", model, "-o", out, "--weights", name, "--quant", "rtn", "--max-seq", "8")
    assert res.returncode == 0, res.stderr
    b = kvbundle.load(out)
    fmt = {"int4": WEIGHT_CHOICES["int4"], "int4-sym": "int4", "int4-asym": "uint4"}[name]
    assert {isa.weight_layout(i)[0] for i in b.instructions if i.op == "GEMV"} == {fmt}
    assert b.manifest["weights"]["format"] == fmt
