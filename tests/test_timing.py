"""The timing declaration: every opcode of the ISA has a busy-cycle formula, and nothing else has one."""

import pytest

from kvoverlay import isa, timing
from kvoverlay.config import load_config


def test_every_opcode_has_a_formula_and_no_other():
    assert set(timing._UNIT_CYCLES) == {op.name for op in isa.OPCODES}


def test_an_opcode_without_a_unit_is_refused_by_name():
    ins = isa.Instr("BOGUS")
    with pytest.raises(ValueError, match="'BOGUS' has no execution unit"):
        timing.unit_cycles(load_config("tiny"), ins)


def test_narrow_scales_follow_min_group():
    """The GEMV engine scales a window's groups of min_group apart: ulx3s (int4 windows of 64, min_group 32) two
    groups, one tree stage; at min_group 8 eight groups, two stages."""
    cfg = load_config("ulx3s")
    assert timing.gemv_narrow_scales(cfg) == 2 and timing.gemv_narrow_stages(cfg, "int4", 32) == 1
    every = cfg.replace(min_group=8)
    assert timing.gemv_narrow_scales(every) == 8 and timing.gemv_narrow_stages(every, "int4", 32) == 2


@pytest.mark.parametrize("name", ["tiny", "ulx3s", "u280"])
def test_only_groups_narrower_than_a_window_take_the_narrow_stages(name):
    """A GEMV's groups narrower than one port word of its weights add the tree over the scaled group sums (as many
    stages on every format, as one tree serves them); window-sized and wider groups keep the window path's cycles."""
    cfg = load_config(name)
    stages = {timing.gemv_narrow_stages(cfg, fmt, cfg.min_group << lg)
              for fmt in cfg.weight_formats for lg in range(8)
              if cfg.min_group << lg < cfg.weights_per_cycle(fmt)}
    assert len(stages) == 1 and min(stages) > 0, stages
    assert all(timing.gemv_narrow_stages(cfg, fmt, cfg.weights_per_cycle(fmt) << k) == 0
               for fmt in cfg.weight_formats for k in range(3))
    # the widest window that the largest group still covers: its groups of min_group are narrow, of 1024 not
    fmt = max((f for f in cfg.weight_formats if cfg.weights_per_cycle(f) <= isa.GROUP_BASE << 7),
              key=cfg.weights_per_cycle)
    ins = isa.Instr("GEMV", {"fmt": isa.ENUMS["fmt"].index(fmt), "rows": 4, "cols": 1024,
                             "lg_group": (cfg.min_group // isa.GROUP_BASE).bit_length() - 1})
    wide = isa.Instr("GEMV", {**ins.fields, "lg_group": 7})
    assert timing.gemv_cycles(cfg, ins) - timing.gemv_cycles(cfg, wide) == (
        timing._row_words(cfg, ins) - timing._row_words(cfg, wide)) * 4 + stages.pop()


def test_port_locks_cover_every_buffer_access():
    """Each opcode's port locks name exactly the buffer ports its accesses (kvoverlay.access) can use, less those
    its unit has of its own (timing.OWN_PORTS): an instruction that reads or writes a buffer range through a shared
    port holds that port, and holds no other."""
    from kvoverlay.access import accesses

    assert set(timing.PORT_LOCKS) == {op.name for op in isa.OPCODES}
    assert all(set(ports) <= set(timing.BUFFER_PORTS) for ports in timing.PORT_LOCKS.values())
    seen = {}
    for op in isa.OPCODES:
        if op.name in ("NOP", "END"):
            continue
        for variant in (0, 1):
            fields = {f.name: 1 for f in op.fields}
            if op.name == "GEMV":
                fields["accumulate"] = variant
            if op.name == "ATTN" and variant:
                fields["stats"] = isa.ATTN_NO_STATS
            ins = isa.Instr(op.name, fields)
            used = {f"{a.space}_{'w' if a.write else 'r'}" for a in accesses(ins) if a.space in ("abuf", "acc")}
            used -= set(timing.OWN_PORTS.get(op.name, ()))
            # each instruction holds exactly the ports it uses (a GEMV that overwrites its accumulators reads none,
            # an ATTN without statistics writes none)
            assert set(timing.held_ports(ins)) == used, ins
            seen.setdefault(op.name, set()).update(used)
    assert seen == {op: set(ports) for op, ports in timing.PORT_LOCKS.items() if ports}


def test_packed_rows_where_built_and_drained():
    """Packed rows need the engine built for them (a window of >= GEMV_PACK_MIN_GROUPS min_groups), a group under
    a window, and a block that streams at least as many words as its accumulators take to drain."""
    from kvoverlay.config import PRESETS

    assert [n for n, c in PRESETS.items() if timing.gemv_packs(c)] == ["u280"]
    u280 = PRESETS["u280"]
    assert timing.gemv_pack_refusal(u280, 576, "int8", 32) is None  # 32 rows in 2 + 18 words, drained in 16
    assert "drain" in timing.gemv_pack_refusal(u280, 576, "int4", 32)  # 64 rows in 3 + 18 words: 32 to drain
    assert "fill a window" in timing.gemv_pack_refusal(u280, 4096, "int8", 1024)
    assert "not built" in timing.gemv_pack_refusal(PRESETS["tiny"], 64, "int8", 8)
    assert timing.gemv_packs_rows(u280, 576, 576, "int8", 32)  # 612-byte rows: 360 words, not 576
    assert not timing.gemv_packs_rows(u280, 576, 1536, "int8", 32)  # 1,632-byte rows stay row records
    assert not timing.gemv_packs_rows(u280, 3, 576, "int8", 32)  # 3 rows: a block of 32 streams more
    ins = isa.Instr("GEMV", {"rows": 576, "cols": 576, "fmt": 1, "lg_group": 2, "packed": 1})
    words = timing.gemv_tile_words(u280, ins)
    assert words == 18 * 20
    assert timing.gemv_cycles(u280, ins) == timing.gemv_packed_cycles(u280, 576, 576, "int8", 32) + \
        timing.GEMV_OVERHEAD == words + timing.GEMV_PIPELINE_STAGES + timing.gemv_tree_stages(u280) + 16 + \
        timing.GEMV_OVERHEAD
    assert timing.port_burst(u280, ins)[1] == words + timing.PORT_READ_LATENCY + 1
