"""OverlayConfig: presets, TOML round trip, error messages."""

import pytest

from kvoverlay.config import PRESETS, ConfigError, OverlayConfig, load_config


@pytest.mark.parametrize("name", sorted(PRESETS))
def test_preset_valid_and_round_trips(name):
    cfg = PRESETS[name]
    assert cfg.name == name
    assert load_config(name) is cfg
    again = OverlayConfig.from_toml(cfg.to_toml())
    assert again == cfg
    assert again.to_toml() == cfg.to_toml()


def test_default_is_tiny():
    assert load_config(None) is PRESETS["tiny"]


def test_ulx3s_has_32_macs():
    assert PRESETS["ulx3s"].macs_per_cycle >= 32


def test_mac_lanes_follow_the_port():
    """The GEMV engine multiplies one port word per cycle: a legacy mac_lanes key must say just that."""
    cfg = OverlayConfig.from_toml('preset = "ulx3s"\nmac_lanes = 32\n')
    assert cfg == PRESETS["ulx3s"] and cfg.macs_per_cycle == cfg.port_bytes
    assert cfg.weights_per_cycle("int4") == 2 * cfg.weights_per_cycle("int8") == 4 * cfg.weights_per_cycle("w16")
    with pytest.raises(ConfigError, match=r"mac_lanes=16 is not a parameter.*port_bits // 8 = 32"):
        OverlayConfig.from_toml('preset = "ulx3s"\nmac_lanes = 16\n')


def test_built_options_are_checked_and_default_for_older_bundles():
    """min_group: a power of two in [8, 1024], at most group_size; norm_heads: a bool. A config without the keys
    (every bundle written before them) takes 8, every group the ISA expresses, and NORM over heads built, and writes
    no key at those values, so its bytes are unchanged."""
    tiny, ulx3s = PRESETS["tiny"], PRESETS["ulx3s"]
    assert tiny.min_group == 8 and "min_group" not in tiny.to_dict()
    assert tiny.norm_heads and "norm_heads" not in tiny.to_dict()  # the keys every bundle had before, no more
    assert ulx3s.to_dict()["norm_heads"] is False and "norm_heads = false" in ulx3s.to_toml()
    assert ulx3s.min_group == 32 and ulx3s.to_dict()["min_group"] == 32
    older = {k: v for k, v in ulx3s.to_dict().items() if k not in ("min_group", "norm_heads")}
    assert OverlayConfig.from_dict(older) == ulx3s.replace(min_group=8, norm_heads=True)
    with pytest.raises(ConfigError, match="norm_heads must be true or false, got 1"):
        tiny.replace(norm_heads=1)
    assert [g for g in (8, 16, 32, 64) if ulx3s.builds_group(g)] == [32, 64]
    with pytest.raises(ConfigError, match=r"min_group=64 exceeds group_size=32"):
        tiny.replace(min_group=64)
    with pytest.raises(ConfigError, match=r"min_group=24 must be a power of two"):
        tiny.replace(min_group=24)
    with pytest.raises(ConfigError, match=r"min_group=4 is out of range: allowed \[8, 1024\]"):
        tiny.replace(min_group=4)


def test_unknown_key_names_key():
    with pytest.raises(ConfigError, match="unknown config key 'mac_lane'"):
        OverlayConfig.from_toml('preset = "tiny"\nmac_lane = 8\n')


def test_out_of_range_names_key_and_range():
    with pytest.raises(ConfigError) as ei:
        PRESETS["tiny"].replace(max_layers=65)
    assert "max_layers" in str(ei.value) and "[1, 64]" in str(ei.value)
    with pytest.raises(ConfigError, match=r"vector_lanes.*power of two"):
        PRESETS["tiny"].replace(vector_lanes=12)
    with pytest.raises(ConfigError, match="weight_formats"):
        PRESETS["tiny"].replace(weight_formats=["int3"])


def test_preset_override(tmp_path):
    path = tmp_path / "my.toml"
    path.write_text('preset = "tiny"\nname = "mine"\nvector_lanes = 16\nclock_mhz = 125\n')
    cfg = load_config(path)
    assert cfg.name == "mine" and cfg.vector_lanes == 16 and cfg.clock_mhz == 125.0
    assert cfg.replace(vector_lanes=4, name="tiny") == PRESETS["tiny"].replace(clock_mhz=125.0)


def test_unknown_preset_and_missing_file(tmp_path):
    with pytest.raises(ConfigError, match="unknown preset 'huge'"):
        OverlayConfig.from_toml('preset = "huge"\n')
    with pytest.raises(ConfigError, match="cannot read config"):
        load_config(tmp_path / "missing.toml")
    with pytest.raises(ConfigError, match="invalid TOML"):
        OverlayConfig.from_toml("this is = = not toml")


def test_ldrow_row_bytes():
    """LDROW's row buffer: by default the longest row the activation buffer takes (w16 and a scale per group of 8,
    in port words), left out of a config's dict there; ulx3s bounds it to 16 KiB; not a port multiple is refused."""
    tiny, ulx3s = PRESETS["tiny"], PRESETS["ulx3s"]
    assert tiny.ldrow_buffer_bytes == 2 * 8192 + 2 * 8192 // 8 and "ldrow_row_bytes" not in tiny.to_dict()
    assert ulx3s.ldrow_buffer_bytes == 16384 and "ldrow_row_bytes = 16384" in ulx3s.to_toml()
    assert OverlayConfig.from_toml(ulx3s.to_toml()) == ulx3s
    assert ulx3s.replace(ldrow_row_bytes=0).ldrow_buffer_bytes == 2 * 16384 + 2 * 16384 // 8
    with pytest.raises(ConfigError, match="ldrow_row_bytes=100 must be a multiple of the port's 32 bytes"):
        ulx3s.replace(ldrow_row_bytes=100)


#: The demo decoder at the micro preset's shape: two layers, hidden 32, two query heads of 16 sharing one KV head.
MICRO_DEMO = {"hidden": 32, "heads": 2, "kv_heads": 1, "head_dim": 16, "ffn": 64, "layers": 2, "vocab": 64}


@pytest.fixture(scope="module")
def micro_demo():
    from kvoverlay.models.demo import build_llama_onnx

    return build_llama_onnx(**MICRO_DEMO)


@pytest.mark.parametrize("weights", ["w16", "int8", "int4"])
def test_micro_runs_the_demo_on_every_unit(micro_demo, weights):
    """The micro preset (the CI bitstream's) compiles the small demo decoder with nothing placed on the host, into a
    program that uses every unit, and the golden model decodes it as onnxruntime does."""
    from kvoverlay.compiler.driver import compile_model
    from kvoverlay.host.backend import outside_kv_buffer
    from kvoverlay.host.reference import ort_decode
    from kvoverlay.host.session import Session

    cfg = PRESETS["micro"]
    program, _ = compile_model(micro_demo, "micro", weights=weights, max_seq=8, host_ops=False)
    assert len(program.image) <= cfg.dram_bytes and not outside_kv_buffer(program)
    ops = {i.op for i in program.instructions}
    assert ops >= {"LOAD", "LDROW", "STORE", "GEMV", "REQ", "VADD", "VMUL", "VSCALE", "NORM", "ACT", "ROPE", "ARGMAX",
                   "KVAPPEND", "ATTN"}
    tokens, _ = ort_decode(micro_demo, [5, 17, 42], 5)
    res = Session(program, "isa").generate([5, 17, 42], 5)
    # int4's scales move the last of five tokens (the demo's random weights leave close logits)
    assert res.tokens[:4] == tokens[:4] and (weights == "int4" or res.tokens == tokens)


@pytest.mark.parametrize("change, refused", [
    ({"act_buffer_words": 128}, "act_buffer_words=128 is out of range"),
    ({"dram_bytes": 1 << 15}, "dram_bytes=32768 is out of range"),
    ({"acc_buffer_words": 64}, "exceed the accumulator buffer"),
    ({"max_layers": 1}, [1]),
    ({"max_head_dim": 8}, [0, 1]),
])
def test_micro_is_the_least_for_its_demo(micro_demo, change, refused):
    """Each of micro's sizes one step smaller is refused, by the config's range or by the compiler for its demo, or
    leaves layers of the demo outside the KV pool (*refused*: those layers), for the host's offload device."""
    from kvoverlay.compiler.driver import compile_model
    from kvoverlay.compiler.frontend import CompileError
    from kvoverlay.host.backend import kv_layers, outside_kv_buffer

    def compile_smaller():
        return compile_model(micro_demo, PRESETS["micro"].replace(**change), weights="int8", max_seq=8,
                             host_ops=False)[0]
    if isinstance(refused, str):
        with pytest.raises((ConfigError, CompileError), match=refused):
            compile_smaller()
    else:
        program = compile_smaller()
        assert kv_layers(program, {i.fields["kv_base"] for i in outside_kv_buffer(program).values()}) == refused
