"""The gpu backend (PyTorch, here on the CPU) against onnxruntime, and its batched prefill against its own steps."""

import subprocess
import sys

import numpy as np
import pytest
from conftest import FAMILIES
from kvoverlay.compiler.driver import compile_model
from kvoverlay.host.reference import compare
from kvoverlay.host.session import Session

PROMPT = [5, 17, 42]
NEW = 16

pytest.importorskip("torch", reason="the gpu backend needs torch (the export extra installs it)")


@pytest.fixture(scope="module", params=FAMILIES)
def program(request, exported_models):
    path = str(exported_models[request.param])
    b, _ = compile_model(path, "tiny", weights="w16", max_seq=32)
    return request.param, path, b


def test_w16_matches_onnxruntime(program):
    name, path, b = program
    s = Session(b, backend="gpu")
    res = s.generate(PROMPT, NEW)
    ref = compare(path, PROMPT, res.tokens, res.logits)
    print(f"{name} gpu/cpu w16: cosine {ref['logits_cosine_min']}, tokens {ref['matching_prefix']}/{NEW}")
    assert ref["logits_cosine_min"] >= 0.999
    assert ref["token_match"], (res.tokens, ref["tokens"])
    assert len(set(res.tokens)) >= 8
    _, _, counters = s.backend.step(res.tokens[-1], s.position)
    p = counters.placement
    assert (p["kv_on_chip_tokens"], p["kv_offloaded_tokens"], p["device"]) == (0, s.position + 1, "cpu")


def test_batched_prefill_equals_step_by_step(program):
    from kvoverlay.host.gpu import GpuBackend

    _, _, b = program
    prompt = [int(t) for t in np.random.default_rng(0).integers(3, 200, size=20)]
    steps = GpuBackend(b, device="cpu").run_steps(prompt, 0, 0)
    nxt, logits, kv = GpuBackend(b, device="cpu").prefill(prompt)
    assert nxt == steps[-1][0]
    np.testing.assert_allclose(logits, steps[-1][1], rtol=1e-4, atol=1e-4)
    # the KV is keyed by its pool base: a layer's, and where its attention is split (compiler.split_attention) each
    # part's, whose heads follow at their columns
    layers = {v["kv_base"]: v for v in b.manifest["kv"]["layers"].values()}
    owner = {base: max(a for a in layers if a <= base) for base in kv}
    assert set(owner.values()) == set(layers)
    for first, layer in layers.items():
        parts = sorted(base for base in kv if owner[base] == first)
        assert parts[0] == first
        assert sum(kv[base][0].shape[0] for base in parts) == layer["kv_heads"]
        for base in parts:
            k, v = kv[base]
            heads = k.shape[0]
            assert k.shape == v.shape == (heads, len(prompt), layer["head_dim"])
            assert base == first + sum(kv[a][0].shape[0] for a in parts if a < base) * b.config.kv_head_columns(layer["head_dim"])


def test_step_by_step_equals_one_run(program):
    """Session.step (one host round trip per token) and run_steps (one sync for the whole run) agree."""
    from kvoverlay.host.gpu import GpuBackend

    _, _, b = program
    one = GpuBackend(b, device="cpu").run_steps(PROMPT, 5, 0)
    g = GpuBackend(b, device="cpu")
    tok = PROMPT[0]
    for i, (want_next, want_logits, _) in enumerate(one):
        got_next, got_logits, _ = g.step(tok, i)
        assert got_next == want_next
        np.testing.assert_array_equal(got_logits, want_logits)
        tok = PROMPT[i + 1] if i + 1 < len(PROMPT) else got_next


def test_importing_the_gpu_backend_imports_no_torch():
    code = "import sys, kvoverlay.host.gpu, kvoverlay.host.offload; sys.exit('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], check=False).returncode == 0


@pytest.mark.parametrize("reread, folds", [("", True), ("VADD a=16 b=16 dst=48 len=4", False)])
def test_bias_folds_into_the_matmul_only_when_nothing_rereads_the_product(reread, folds):
    from kvoverlay.host.gpu import _fold_biases, _Op

    from kvoverlay import isa

    code = isa.assemble(f"""
        GEMV addr=0 rows=4 cols=4 x=0 acc=0 acc_e=E1
        REQ acc=0 acc_e=E1 len=4 dst=16 dst_e=E2
        LOAD addr=0x100 len=4 dst=32 dst_e=E3
        VADD a=16 a_e=E2 b=32 b_e=E3 dst=0 dst_e=E4 len=4
        {reread}
    """)
    w = {"GEMV": np.ones((4, 4)), "LOAD": np.ones((1, 4))}
    ops = [_Op(i.op, i.fields, w.get(i.op), 4 if i.op == "GEMV" else 0) for i in code]
    got = [op.op for op in _fold_biases(ops)]
    assert (got[0] == "LINEAR") == folds, got


def test_packed_rows_dequantize_as_row_records(monkeypatch):
    """GEMVs of packed rows (a 1,024-bit port) lower to the same float weights as row records: same tokens and
    logits on the gpu backend."""
    from kvoverlay.compiler import quantize
    from kvoverlay.models.demo import build_llama_onnx

    from kvoverlay.config import PRESETS

    cfg = PRESETS["tiny"].replace(name="tiny1024", port_bits=1024)
    model = build_llama_onnx()
    packed, _ = compile_model(model, cfg, weights="int8", max_seq=16)
    assert any(i.fields.get("packed") for i in packed.instructions if i.op == "GEMV")
    monkeypatch.setattr(quantize, "gemv_packs_rows", lambda *a: False)
    padded, _ = compile_model(model, cfg, weights="int8", max_seq=16)
    a = Session(packed, backend="gpu").generate(PROMPT, 4)
    b = Session(padded, backend="gpu").generate(PROMPT, 4)
    assert a.tokens == b.tokens
    assert all(np.array_equal(x, y) for x, y in zip(a.logits, b.logits, strict=True))
