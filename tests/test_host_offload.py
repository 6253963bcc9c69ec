"""Offload: the log-sum-exp merge in float64, the residency policy, and hybrid attention decoding on the golden model.

The decode test compiles an exported model for 256 positions on a 64-token KV buffer, so a 100-token prompt plus 16
new tokens keeps at most 64 tokens per layer on the overlay and attends to the rest on the offload device (the CPU
here); in w16 the tokens must still be onnxruntime's and every step's logits cosine at least 0.999.
"""

import itertools
import math

import numpy as np
import pytest
from conftest import FAMILIES
from kvoverlay.compiler.driver import compile_model
from kvoverlay.host.backend import kv_layers
from kvoverlay.host.offload import (
    HybridGoldenBackend,
    OffloadError,
    Residency,
    attend_partial,
    choose_prefill,
    lse_merge,
    placement,
    prefill,
    resolve_device,
)
from kvoverlay.host.reference import compare
from kvoverlay.host.session import Session, SessionError

from kvoverlay.config import PRESETS

PROMPT = [int(t) for t in np.random.default_rng(1).integers(3, 256, size=100)]
NEW = 16


def _full(q, k, v):
    s = k @ q
    p = np.exp(s - s.max())
    return (p / p.sum()) @ v


def _split_merge(q, k, v, cuts):
    edges = [0, *cuts, len(k)]
    return lse_merge([attend_partial(q, k[a:b], v[a:b]) for a, b in itertools.pairwise(edges)])


@pytest.mark.parametrize("cuts", [[1], [0, 1], [5, 5], [39], [13, 20, 21], [0], [40]])
def test_merge_matches_full_attention(cuts):
    rng = np.random.default_rng(len(cuts) * 7 + cuts[0])
    q, k, v = rng.normal(size=8), rng.normal(size=(40, 8)) * 2, rng.normal(size=(40, 8))
    np.testing.assert_allclose(_split_merge(q, k, v, cuts), _full(q, k, v), rtol=1e-12, atol=1e-13)


@pytest.mark.parametrize("offset", [700.0, -700.0, 1e6, -1e6])
def test_merge_survives_extreme_scores(offset):
    """Scores near exp's overflow (or its underflow) in one partition and ordinary ones in the other."""
    rng = np.random.default_rng(3)
    q = np.zeros(4)
    q[0] = 1.0
    k, v = rng.normal(size=(10, 4)), rng.normal(size=(10, 4))
    k[:3, 0] += offset  # the first partition's scores sit far above (or below) the second's
    got = _split_merge(q, k, v, [3])
    s = k @ q
    want = (np.exp(s - s.max()) / np.exp(s - s.max()).sum()) @ v  # float64 reference, shifted by the true max
    assert np.all(np.isfinite(got))
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


def test_merge_of_single_tokens_is_a_softmax_of_their_values():
    s = np.array([2.0, -1.0, 0.5])
    v = np.eye(3)
    parts = [(v[i], s[i], 1.0) for i in range(3)]  # one token each: out = its value, max = its score, sum = 1
    np.testing.assert_allclose(lse_merge(parts), np.exp(s) / np.exp(s).sum(), rtol=1e-14)


def test_merge_of_heads_and_empty_partitions():
    rng = np.random.default_rng(5)
    q, k, v = rng.normal(size=(3, 8)), rng.normal(size=(3, 12, 8)), rng.normal(size=(3, 12, 8))
    parts = []
    for a, b in ((0, 0), (0, 7), (7, 12)):
        outs = [attend_partial(q[h], k[h, a:b], v[h, a:b]) for h in range(3)]
        parts.append((np.stack([o for o, _, _ in outs]), np.array([m for _, m, _ in outs]), np.array([s for _, _, s in outs])))
    want = np.stack([_full(q[h], k[h], v[h]) for h in range(3)])
    np.testing.assert_allclose(lse_merge(parts), want, rtol=1e-12, atol=1e-13)
    empty = attend_partial(q[0], k[0, :0], v[0, :0])
    assert empty[1] == -math.inf and empty[2] == 0.0
    with pytest.raises(OffloadError, match="zero KV positions"):
        lse_merge([empty])


def test_offload_store_merges_on_its_device_like_full_attention():
    """The offload store (torch, float64 on the CPU) attends a grouped-query layer and merges the overlay's partial."""
    pytest.importorskip("torch")
    from kvoverlay.host.offload import _KvStore

    rng = np.random.default_rng(9)
    kvh, group, d, n = 2, 3, 8, 30
    k, v, q = rng.normal(size=(n, kvh, d)), rng.normal(size=(n, kvh, d)), rng.normal(size=(kvh * group, d))
    store = _KvStore("cpu", n)
    store.put(0, 0, k, v)
    resident = list(range(20, n))  # the overlay holds the last 10 tokens, the store attends to the first 20
    outs = [attend_partial(q[h], k[resident, h // group], v[resident, h // group]) for h in range(kvh * group)]
    overlay = (np.stack([o for o, _, _ in outs]), np.array([m for _, m, _ in outs]), np.array([s for _, _, s in outs]))
    got = store.merge(0, q, range(20), overlay)
    want = np.stack([_full(q[h], k[:, h // group], v[:, h // group]) for h in range(kvh * group)])
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-13)


def test_residency_keeps_sinks_and_the_recent_window():
    r = Residency(8, sinks=2)
    assert [r.slot(p) for p in range(8)] == list(range(8))
    assert [r.slot(p) for p in range(8, 14)] == [2, 3, 4, 5, 6, 7]
    assert r.slot(14) == 2
    for p in range(30):
        res, off = r.resident(p), r.offloaded(p)
        assert sorted(res + list(off)) == list(range(p + 1)), p
        assert len(res) == r.resident_length(p) <= 8
        if p >= 8:
            assert res[:2] == [0, 1] and sorted(res[2:]) == list(range(p - 5, p + 1))
            assert all(res[r.slot(x)] == x for x in res)
    with pytest.raises(OffloadError, match="kv-sinks"):
        Residency(4, sinks=4)


def _offload_program(path, max_seq=256):
    return compile_model(path, "tiny", weights="w16", max_seq=max_seq, kv_capacity=64)[0]


@pytest.fixture(scope="module")
def hybrid_program(exported_models):
    path = str(exported_models["llama"])
    return path, _offload_program(path)


def test_offload_program_takes_slot_and_length_from_registers(hybrid_program):
    _, b = hybrid_program
    regs = b.manifest["registers"]
    assert regs["kv_slot"] not in (regs["token"], regs["position"]) and regs["kv_len"] != regs["kv_slot"]
    kv = [i for i in b.instructions if i.op in ("KVAPPEND", "ATTN")]
    assert kv and all(i.fields.get("pos_reg", regs["kv_slot"]) == regs["kv_slot"] for i in kv)
    assert all(i.fields["len_reg"] == regs["kv_len"] and i.fields["len_imm"] == 0 for i in kv if i.op == "ATTN")


@pytest.mark.parametrize("family", FAMILIES)
def test_hybrid_decode_matches_onnxruntime(family, exported_models):
    path = str(exported_models[family])
    # onnx_ops' RotaryEmbedding cache holds 128 positions: still twice the buffer, and enough for the 116 here
    s = Session(_offload_program(path, 128 if family == "onnx_ops" else 256), backend="isa")
    res = s.generate(PROMPT, NEW)
    ref = compare(path, PROMPT, res.tokens, res.logits)
    p = s.backend.placement
    print(f"hybrid {family} w16: cosine {ref['logits_cosine_min']}, tokens {ref['matching_prefix']}/{NEW}, placement {p}")
    assert p["kv_on_chip_tokens"] == 64 and p["kv_offloaded_tokens"] == len(PROMPT) + NEW - 1 - 64
    assert p["layers_offloaded"] == [0, 1] and p["device"] == resolve_device("auto")
    assert ref["logits_cosine_min"] >= 0.999
    assert ref["token_match"], (res.tokens, ref["tokens"])


def test_hybrid_decode_without_the_offloaded_partial_drifts(hybrid_program):
    """The control: the same run attending to the resident tokens only is far from onnxruntime."""

    class ResidentOnly(HybridGoldenBackend):
        def _hook(self, position, off):
            return super()._hook(position, range(0))

    path, b = hybrid_program
    s = Session(b, backend="isa")
    s.backend = ResidentOnly(b, offload_device="cpu")
    res = s.generate(PROMPT, NEW)
    assert compare(path, PROMPT, res.tokens, res.logits)["logits_cosine_min"] < 0.99


def test_offload_device_none_says_what_did_not_fit(hybrid_program):
    _, b = hybrid_program
    backend = HybridGoldenBackend(b, offload_device="none")
    for p in range(64):
        backend.step(PROMPT[p], p)
    with pytest.raises(OffloadError, match=r"65 tokens per layer does not fit the overlay's 64-token buffer \(1 over"):
        backend.step(PROMPT[64], 64)


def test_kv_sinks_asked_for_are_kept_or_refused(hybrid_program):
    """Only the default number of sinks shrinks to fit a small buffer: a value given is used or refused, never
    changed quietly (and a negative one is refused even where nothing is offloaded)."""
    _, b = hybrid_program
    assert HybridGoldenBackend(b, kv_sinks=63).residency.sinks == 63
    for bad in (64, 70, -1):
        with pytest.raises(OffloadError, match=rf"--kv-sinks {bad} must be in \[0, 63\]"):
            HybridGoldenBackend(b, kv_sinks=bad)
    small = compile_model(str(hybrid_program[0]), "tiny", weights="w16", max_seq=32)[0]
    with pytest.raises(OffloadError, match="--kv-sinks -1"):
        HybridGoldenBackend(small, kv_sinks=-1)


def test_phase_split_prefill_on_torch_then_decode_on_the_overlay(hybrid_program):
    """The prompt runs as one batched torch pass; its KV goes into the overlay's buffer (resident tokens, through a
    LOAD + KVAPPEND program) and to the offload store (the rest); decoding continues on the golden model."""
    path, b = hybrid_program
    overlay = HybridGoldenBackend(b, offload_device="cpu")
    first, logits, counters = prefill(overlay, PROMPT, "gpu", "cpu")
    where = counters.placement
    assert where["prefill"] == "gpu" and (where["kv_on_chip_tokens"], where["kv_offloaded_tokens"]) == (64, 36)
    resident = Residency(64, 4).resident(len(PROMPT) - 1)
    layer0 = b.manifest["kv"]["layers"]["0"]
    written = [overlay.model.kv_read("k", layer0["kv_base"], h, range(64), layer0["head_dim"])[0].any(axis=-1)
               for h in range(layer0["kv_heads"])]
    assert layer0["kv_heads"] == 2 and np.count_nonzero(written) == 2 * len(resident)  # 2 KV heads, every slot
    tokens, got = [first], [logits]
    for i in range(NEW - 1):
        nxt, lg, _ = overlay.step(tokens[-1], len(PROMPT) + i)
        tokens.append(nxt)
        got.append(lg)
    ref = compare(path, PROMPT, tokens, got)
    print(f"phase split llama w16: cosine {ref['logits_cosine_min']}, tokens {ref['matching_prefix']}/{NEW}")
    assert ref["logits_cosine_min"] >= 0.999
    assert ref["token_match"]


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_layers_beyond_the_buffer_run_on_the_offload_device(family, exported_models):
    """A KV pool of one layer's columns: layer 1's KV and attention go to the offload device, layer 0 stays on the
    overlay and, past 64 tokens, attends hybrid. Tokens and logits still follow onnxruntime."""
    path = str(exported_models[family])
    kv_heads = {"llama": 2, "gpt2": 4}[family]  # both with KV heads of 16
    cfg = PRESETS["tiny"].replace(max_layers=1, max_kv_heads=kv_heads, max_head_dim=16)
    b = compile_model(path, cfg, weights="w16", max_seq=256, kv_capacity=64)[0]
    s = Session(b, backend="isa")
    assert kv_layers(b, s.backend.device_layers) == [1]
    res = s.generate(PROMPT, NEW)
    ref = compare(path, PROMPT, res.tokens, res.logits)
    p = s.backend.placement
    print(f"{family} with 1 layer of KV buffer: cosine {ref['logits_cosine_min']}, tokens {ref['matching_prefix']}/{NEW}, {p}")
    assert p["layers_on_device"] == [1] and p["layers_offloaded"] == [0, 1] and "attention" in p["ops_off_overlay"]
    assert ref["logits_cosine_min"] >= 0.999
    assert ref["token_match"], (res.tokens, ref["tokens"])
    with pytest.raises(OffloadError, match=r"layers \[1\] .* does not fit the overlay's KV pool of .*1 layers over"):
        HybridGoldenBackend(b, offload_device="none")


def test_placement_and_prefill_choice(hybrid_program):
    _, b = hybrid_program
    r = Residency(64, 4)
    p = placement(b.manifest, 99, r, "cuda")
    assert (p["kv_on_chip_tokens"], p["kv_offloaded_tokens"], p["heads_offloaded"]) == (64, 36, 4)
    assert placement(b.manifest, 10, r, "cuda")["device"] == "overlay"
    assert choose_prefill(b, 100, "overlay", "cpu") == "overlay"
    assert choose_prefill(b, 100, "gpu", "cpu") == "gpu"
    assert choose_prefill(b, 100, "auto", "none") == "overlay"
    with pytest.raises(OffloadError, match="--prefill"):
        choose_prefill(b, 100, "fast", "cpu")
    with pytest.raises(OffloadError, match="offload-device is none"):
        choose_prefill(b, 100, "gpu", "none")


def test_hybrid_backend_is_the_plain_golden_model_when_nothing_is_offloaded(hybrid_program):
    """A program that fits the buffer runs as on GoldenBackend (same logits, tokens and cycles, no hook); the
    registers program (R3/R4) within the buffer gives the same logits and tokens as the program that fits."""
    from kvoverlay.host.backend import GoldenBackend

    path, hybrid = hybrid_program
    fits = _offload_program(path, 64)
    assert "kv_slot" not in fits.manifest["registers"]
    plain, wrapped, regs = GoldenBackend(fits), HybridGoldenBackend(fits, offload_device="none"), HybridGoldenBackend(hybrid)
    for p, token in enumerate(PROMPT[:6]):
        a, b, c = plain.step(token, p), wrapped.step(token, p), regs.step(token, p)
        assert a.next_token == b.next_token == c.next_token
        np.testing.assert_array_equal(a.logits, b.logits)
        np.testing.assert_array_equal(a.logits, c.logits)
        assert a.counters.cycles == b.counters.cycles
        assert b.counters.placement["kv_offloaded_tokens"] == 0 and b.counters.placement["device"] == "overlay"


def test_session_phase_split_prefill(hybrid_program):
    """Session(prefill="gpu"): the prompt is one batched torch pass (one step stands for it), decoding continues on
    the overlay from len(prompt) and follows onnxruntime; "overlay" feeds it token by token."""
    pytest.importorskip("torch")
    path, b = hybrid_program
    s = Session(b, backend="isa", prefill="gpu", offload_device="cpu")
    gen = s.generate(PROMPT, 4)
    res = gen.result()
    assert len(res.step_cycles) == 1 + 3 and s.position == len(PROMPT) + 3
    assert gen.steps[0].counters.placement["prefill"] == "gpu"
    assert gen.steps[-1].counters.placement["kv_offloaded_tokens"] == len(PROMPT) + 3 - 64
    assert compare(path, PROMPT, res.tokens, res.logits)["logits_cosine_min"] >= 0.999
    with pytest.raises(SessionError, match="--prefill 'fast'"):
        Session(b, backend="isa", prefill="fast")
