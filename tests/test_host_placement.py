"""Host segments: a partitioned program runs through run_graph, its host ops on torch or ONNX's numpy reference."""

import math

import numpy as np
import pytest
from kvoverlay.compiler.driver import compile_model
from kvoverlay.host import placement
from kvoverlay.host.session import Session, SessionError, run_graph
from onnx import TensorProto, helper

RNG = np.random.default_rng(3)


def _erf_between():
    x = helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 8])
    z = helper.make_tensor_value_info("z", TensorProto.FLOAT, [2, 8])
    nodes = [helper.make_node("Mul", ["x", "x"], ["a"], name="sq"), helper.make_node("Erf", ["a"], ["b"], name="erf"),
             helper.make_node("Add", ["b", "x"], ["z"], name="res")]
    return helper.make_model(helper.make_graph(nodes, "g", [x], [z]), opset_imports=[helper.make_opsetid("", 17)])


def test_a_program_with_a_host_op_runs_on_the_golden_model_within_the_block_bound():
    b, _ = compile_model(_erf_between(), "tiny")
    x = RNG.standard_normal((2, 8)).astype(np.float32)
    want = np.vectorize(math.erf)(x.astype(np.float64) ** 2) + x
    got = run_graph(b, {"x": x})["z"]
    assert np.abs(got - want).max() <= 2.0 ** -10 * np.abs(want).max()


def test_offload_device_none_names_what_did_not_fit():
    b, _ = compile_model(_erf_between(), "tiny")
    with pytest.raises(SessionError, match=r"--offload-device none: .*1 op\(s\) on the host.*erf \(Erf\)"):
        run_graph(b, {"x": np.zeros((2, 8), np.float32)}, offload_device="none")


def test_torch_and_numpy_reference_agree_on_a_host_segment():
    pytest.importorskip("torch")
    b, _ = compile_model(_erf_between(), "tiny")
    seg = next(s for s in b.manifest["segments"] if s["kind"] == "host")
    blob = b.image[seg["blob"][0]:sum(seg["blob"])]
    a = RNG.standard_normal((2, 8)).astype(np.float32)
    on_torch = placement.HostSegment(blob, "cpu")
    got = on_torch.run({"a": a})["b"]
    assert on_torch.ran_on == "torch:cpu"
    ref = placement.HostSegment(blob, "cpu")
    ref._torch = None  # ONNX's numpy reference, as without torch
    want = ref.run({"a": a})["b"]
    assert ref.ran_on == "numpy"
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)


# ---------------------------------------------------------------------------------------------------------------
# A decoder with an op the overlay lacks: its Session runs the overlay segments on backends of their own (their KV
# kept across steps) and the host segment between them, token-exact with onnxruntime on the same graph.

PROMPT = [5, 17, 42]
NEW = 8


def _with_reduce_max(src, dst):
    """GPT-2's export with ``h - ReduceMax(h)`` on layer 0's MLP activations: ReduceMax, which the overlay lacks."""
    import onnx

    m = onnx.load(str(src))
    g = m.graph
    k, proj = next((k, n) for k, n in enumerate(g.node) if n.op_type in ("MatMul", "Gemm") and "h.0/mlp/c_proj" in n.name)
    h = proj.input[0]
    added = [helper.make_node("ReduceMax", [h], ["host_max"], name="host_reduce_max", keepdims=1,
                              axes=[-1]) if m.opset_import[0].version < 18 else
             helper.make_node("ReduceMax", [h, "host_axes"], ["host_max"], name="host_reduce_max", keepdims=1),
             helper.make_node("Sub", [h, "host_max"], ["host_shifted"], name="host_shift")]
    g.initializer.append(onnx.numpy_helper.from_array(np.array([-1], np.int64), "host_axes"))
    proj.input[0] = "host_shifted"
    for node in reversed(added):
        g.node.insert(k, node)
    onnx.save(m, str(dst))
    return dst


@pytest.fixture(scope="module")
def host_op_decoder(exported_models, tmp_path_factory):
    path = _with_reduce_max(exported_models["gpt2"], tmp_path_factory.mktemp("host_op") / "model.onnx")
    b, report = compile_model(str(path), "tiny", weights="w16", max_seq=len(PROMPT) + NEW)
    return path, b, report


def test_the_decoder_places_its_reduce_max_on_the_host(host_op_decoder):
    _, b, report = host_op_decoder
    assert ["host_reduce_max", "ReduceMax"] in report["placement"]["host"]
    kinds = [s["kind"] for s in b.manifest["segments"]]
    assert kinds[0] == "overlay" and "host" in kinds and kinds[-1] == "overlay"


def _check_against_ort(path, res):
    from kvoverlay.host.reference import compare, ort_decode

    ref = compare(str(path), PROMPT, res.tokens, res.logits)
    _, ort_logits = ort_decode(str(path), PROMPT, NEW, forced=res.tokens)
    margin = np.array([np.diff(np.sort(r)[-2:])[0] for r in ort_logits])
    err = np.array([np.max(np.abs(g - r)) for g, r in zip(res.logits, ort_logits, strict=True)])
    assert ref["logits_cosine_min"] >= 0.999
    assert ref["token_match"], (res.tokens, ref["tokens"])
    assert (margin > 2 * err).sum() >= NEW // 2, "too few steps where token equality means anything"
    assert len(set(res.tokens)) >= 4, "greedy decoding repeats itself: a broken KV path could pass"


def test_session_decodes_a_partitioned_decoder_token_exact_with_onnxruntime(host_op_decoder):
    path, b, _ = host_op_decoder
    with Session(b) as s:
        gen = s.generate(PROMPT, NEW)
        steps = list(gen)
        res = gen.result()
        assert s.position == len(PROMPT) + NEW - 1
    _check_against_ort(path, res)
    for st in steps:
        where = st.counters.placement
        assert "host_reduce_max (ReduceMax)" in where["ops_off_overlay"]
        assert where["device"] in ("cpu", "cuda") and where["host_device"]
        assert st.counters.cycles > 0


def test_gpu_backend_on_the_cpu_decodes_the_partitioned_decoder_token_exact(host_op_decoder):
    pytest.importorskip("torch")
    path, b, _ = host_op_decoder
    gen = Session(b, "gpu", offload_device="cpu").generate(PROMPT, NEW)
    _check_against_ort(path, gen.result())
    where = gen.steps[-1].counters.placement
    assert "host_reduce_max (ReduceMax)" in where["ops_off_overlay"] and where["layers_offloaded"] == [0, 1]


def test_partitioned_session_continues_and_resets(host_op_decoder):
    _, b, _ = host_op_decoder
    whole = Session(b).generate(PROMPT, 6)
    s = Session(b)
    s.prefill(PROMPT)
    first = s.generate(max_new_tokens=3).tokens
    rest = s.generate(max_new_tokens=3).tokens
    assert first + rest == whole.tokens
    s.reset()
    again = s.generate(PROMPT, 6)
    assert again.tokens == whole.tokens
    for a, w in zip(again.logits, whole.logits, strict=True):
        np.testing.assert_array_equal(a, w)


def test_offload_device_none_refuses_the_partitioned_decoder(host_op_decoder):
    _, b, _ = host_op_decoder
    with pytest.raises(SessionError, match=r"--offload-device none: .*host_reduce_max \(ReduceMax\)"):
        Session(b, offload_device="none")
    with pytest.raises(SessionError, match=r"host_reduce_max \(ReduceMax\); --backend board cannot run its segments"):
        Session(b, "board")


def test_each_tensor_crosses_once_per_segment_boundary(host_op_decoder):
    _, b, _ = host_op_decoder
    s = Session(b)
    moved = []

    def spy(name, method):
        def run(addr, *args):
            moved.append(name)
            return method(addr, *args)
        return run

    for part in s.backend.overlays:
        for name in ("read_vector", "write_vector"):
            setattr(part, name, spy(name, getattr(part, name)))
    s.step(PROMPT[0])
    segs = b.manifest["segments"]
    # the first overlay segment gives the residual stream and the MLP activations; the host segment reads the
    # activations and gives their maximum; the last overlay segment reads all three and gives the logits
    crossing_out = [o for o in segs[0]["outputs"] if not o.startswith("present.")]
    # and the logits; each segment's step reads one record itself (the logits, or the first output)
    assert moved.count("read_vector") == len(crossing_out) + 1 - len(s.backend.overlays)
    assert moved.count("write_vector") == len(segs[2]["inputs"]) - 2  # past_key_values.1.*: in the backend


def test_partitioned_decoder_on_rtl_is_bit_identical_to_the_golden_model(host_op_decoder):
    from kvoverlay.sim.rtl import build_model

    from kvoverlay.config import PRESETS

    build_model(PRESETS["tiny"])  # the tiny Verilated overlay, cached under .cache/rtl
    _, b, _ = host_op_decoder
    gold = Session(b).generate(PROMPT, 4)
    with Session(b, "rtl") as s:
        rtl = s.generate(PROMPT, 4).result()
        # one simulator process per overlay segment, kept for the session: every position ran once in each
        for part in s.backend.overlays:
            assert [st.position for st in part.steps] == list(range(len(PROMPT) + 3))
    assert rtl.tokens == gold.tokens
    for a, w in zip(rtl.logits, gold.logits, strict=True):
        np.testing.assert_array_equal(a, w)


def test_cli_compiles_and_runs_the_partitioned_decoder(host_op_decoder, tmp_path):
    import json

    from test_cli import assert_one_line_error, kvo

    path, _, _ = host_op_decoder
    prog = tmp_path / "m.kvo"
    res = kvo("compile", path, "-o", prog, "--config", "tiny", "--max-seq", len(PROMPT) + 3, "--json")
    assert res.returncode == 0, res.stderr
    assert ["host_reduce_max", "ReduceMax"] in json.loads(res.stdout)["placement"]["host"]
    res = kvo("run", prog, "--prompt", ",".join(map(str, PROMPT)), "--max-new-tokens", 3, "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["tokens"] == Session(str(prog)).generate(PROMPT, 3).tokens
    assert out["cycles_per_token"] > 0
    for where in out["step_placement"]:
        assert "host_reduce_max (ReduceMax)" in where["ops_off_overlay"] and where["device"] in ("cpu", "cuda")
    assert_one_line_error(kvo("run", prog, "--offload-device", "none"), "--offload-device none",
                          "host_reduce_max (ReduceMax)")
    assert_one_line_error(kvo("compile", path, "-o", tmp_path / "n.kvo", "--config", "tiny", "--offload-device",
                              "none"), "ReduceMax")


def test_logits_from_a_host_segment_choose_the_token_on_the_host():
    from onnx import numpy_helper

    emb = RNG.standard_normal((16, 16)).astype(np.float32) * 2
    ids = helper.make_tensor_value_info("input_ids", TensorProto.INT64, ["batch_size", "sequence_length"])
    out = helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch_size", "sequence_length", 16])
    nodes = [helper.make_node("Gather", ["emb", "input_ids"], ["h"], name="embed"),
             helper.make_node("Sin", ["h"], ["logits"], name="sine")]
    g = helper.make_graph(nodes, "g", [ids], [out], initializer=[numpy_helper.from_array(emb, "emb")])
    b, _ = compile_model(helper.make_model(g, opset_imports=[helper.make_opsetid("", 18)]), "tiny", max_seq=8)
    assert [s["kind"] for s in b.manifest["segments"]] == ["overlay", "host"]
    res = Session(b).generate([3], 5)
    token = 3
    for got, logits in zip(res.tokens, res.logits, strict=True):
        want = np.sin(emb[token].astype(np.float64))
        assert np.abs(logits - want).max() <= 2.0 ** -10 * 4
        assert got == int(np.argmax(logits))
        token = got
