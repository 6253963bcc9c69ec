"""``kvoverlay bench project``: the shape-built decode step is the compiler's, cycle for cycle; the projection's
figures follow from it."""

import json

import pytest
from kvoverlay.host.bench import BENCH_CONFIG, DecodeShape, compile_decoder
from kvoverlay.host.project import MODELS, ModelShape, decode_instructions, project
from kvoverlay.sim.golden import replay_cycles
from test_cli import assert_one_line_error, kvo

from kvoverlay.config import PRESETS

U280 = PRESETS["u280"]


@pytest.mark.parametrize("weights", ["int8", "int4", "w16"])
@pytest.mark.parametrize("shape", [DecodeShape(), DecodeShape(hidden=256, layers=2, heads=4, kv_heads=1, vocab=512)])
def test_shape_built_step_is_the_compilers_cycle_for_cycle(shape, weights):
    compiled = compile_decoder(shape, BENCH_CONFIG, weights, 64).instructions
    built = decode_instructions(ModelShape(shape.hidden, shape.layers, shape.heads, shape.kv_heads, shape.ffn, shape.vocab),
                                BENCH_CONFIG, weights)
    assert [i.op for i in built] == [i.op for i in compiled]
    assert [i.deps for i in built] == [i.deps for i in compiled]
    for kv_len in (1, 64):
        assert replay_cycles(BENCH_CONFIG, built, kv_len) == replay_cycles(BENCH_CONFIG, compiled, kv_len)


@pytest.mark.parametrize("weights", ["int8", "int4"])
def test_gpt2_step_is_the_compilers_for_an_optimum_export(weights):
    from kvoverlay.compiler.driver import compile_model
    from kvoverlay.models import exported

    # models/exported.py's GPT-2: n_embd 64, 2 layers, 4 heads, n_inner 128, vocab 256, 128 positions
    compiled = compile_model(str(exported.export_model("gpt2")), "tiny", weights=weights, max_seq=32)[0].instructions
    built = decode_instructions(ModelShape(64, 2, 4, 4, 128, 256, family="gpt2", positions=128), PRESETS["tiny"], weights)
    assert [(i.op, i.deps) for i in built] == [(i.op, i.deps) for i in compiled]
    assert replay_cycles(PRESETS["tiny"], built, 16) == replay_cycles(PRESETS["tiny"], compiled, 16)


def test_llama2_7b_on_one_u280():
    r = project("llama2-7b", U280, "int4", context=128)
    assert r["shape"]["parameters"] == 6_738_415_616  # LLaMA2-7B's published count
    assert r["tokens_per_s"] == round(U280.clock_mhz * 1e6 / r["cycles_per_token"], 2)
    assert r["bandwidth_limit_tokens_per_s"] == round(U280.clock_mhz * 1e6 / r["roofline_cycles_per_token"], 2)
    assert r["tokens_per_s"] < r["bandwidth_limit_tokens_per_s"]
    assert r["flightllm_tokens_per_s"] == 55.0
    # u280's KV pool holds 2 of the 32 layers (32 heads of 128 take 64 of its 128 columns each): the other 30 layers'
    # KV of 128 tokens is read from memory, 2 x 32 records of 128 elements per token and layer
    assert U280.kv_columns // (32 * U280.kv_head_columns(128)) == 2
    assert r["kv_offchip"] and r["kv_offchip_bytes_per_token"] == 30 * 2 * 32 * 128 * (2 * 128 + 4)
    weights = r["bytes_required_per_token"] - r["kv_offchip_bytes_per_token"]
    assert 0.5625 * r["shape"]["parameters"] * 0.98 < weights < 0.5625 * r["shape"]["parameters"]  # 4 bits + scales
    assert r["packed_weight_streaming_cycles"] < r["weight_streaming_cycles"]  # rows padded to 1024-byte beats
    # what the projection assumes beyond the overlay as built is said in the result
    assert any("groups per window" in a for a in r["assumptions"]) and any("KV" in a for a in r["assumptions"])


def test_kv_on_chip_and_tensor_parallel():
    # one card's KV pool holds 8 of llama3-8b's 32 layers (8 KV heads of 128: 16 of its 128 columns each); split
    # over four cards (2 KV heads each), every card holds all 32
    one = project("llama3-8b", U280, "int4", context=128)
    assert one["kv_offchip_bytes_per_token"] == 24 * 2 * 8 * 128 * (2 * 128 + 4) and one["lm_head_tiles"] == 4
    four = project("llama3-8b", U280, "int4", devices=4, context=128)
    assert not four["kv_offchip"]
    assert four["link_us_per_token"] > 0 and four["flightllm_tokens_per_s"] is None
    assert one["tokens_per_s"] < four["tokens_per_s"] < 4 * one["tokens_per_s"]
    fast = project("llama3-8b", U280, "int4", devices=4, context=128, link_gbps=400, link_latency_us=0.1)
    assert fast["cycles_per_token"] == four["cycles_per_token"] and fast["tokens_per_s"] > four["tokens_per_s"]


def test_every_model_and_the_cli():
    assert {k: m.parameters() for k, m in MODELS.items()} == {  # the model cards' counts
        "llama2-7b": 6_738_415_616, "llama3-8b": 8_030_261_248, "smollm-135m": 134_515_008, "gpt2-xl": 1_557_611_200}
    helped = kvo("bench", "project", "--help").stdout
    assert "{" + ",".join(MODELS) + "}" in helped  # the command offers every model, in order
    res = kvo("bench", "project", "--config", "u280", "--model", "gpt2-xl", "--weights", "int4", "--devices", "2", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert out["model"] == "gpt2-xl" and out["devices"] == 2 and out["backend"] == "projection"
    res = kvo("bench", "project", "--model", "llama2-7b")
    assert res.returncode == 0 and "PROJECTION" in res.stdout and "FlightLLM" in res.stdout
    assert_one_line_error(kvo("bench", "project", "--model", "llama3-8b", "--config", "tiny"), "14336", "8192")
    assert_one_line_error(kvo("bench", "project", "--devices", "0"), "--devices 0")
