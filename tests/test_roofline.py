"""The roofline counts the bytes a token must read: no padding, each byte once, LDROW's row from the registers."""

import numpy as np
import pytest

from kvoverlay import isa
from kvoverlay import numerics as nx
from kvoverlay.config import PRESETS
from kvoverlay.roofline import Roofline, bandwidth_efficiency, gemv_words, read_spans, roofline_cycles, row_payload, union_bytes

U280 = PRESETS["u280"]
TINY = PRESETS["tiny"]


def _gemv(addr, rows, cols, fmt="int8", lg_group=2):
    return isa.Instr("GEMV", {"addr": addr, "rows": rows, "cols": cols, "fmt": isa.ENUMS["fmt"].index(fmt),
                              "lg_group": lg_group, "sexp": 0, "x": 0, "x_e": 0, "acc": 0, "acc_e": 0, "accumulate": 0})


def test_padding_to_the_port_beat_is_not_required():
    # the u280 int8 case: a 576-wide row is 18 scales + 576 weights = 612 bytes in a 1024-byte beat
    assert row_payload(576, "int8", 32) == 612
    assert nx.row_stride(576, "int8", 32, U280.port_bytes) == 1024
    r = Roofline(U280, [_gemv(0, 10, 576)])
    assert r.required_bytes() == 10 * 612
    assert r.cycles() == roofline_cycles(U280, 6120) == 6120 / 1024
    # the GEMV streams one beat per row as laid out; packed back to back, 6120 bytes would take 6 beats
    assert gemv_words(U280, _gemv(0, 10, 576)) == 10
    assert gemv_words(U280, _gemv(0, 10, 576), packed=True) == 6


def test_int4_and_w16_rows_count_their_format_and_scales():
    assert row_payload(256, "int4", 32) == 8 * 2 + 128
    assert row_payload(256, "w16", 64) == 4 * 2 + 512
    r = Roofline(TINY, [_gemv(0, 3, 256, "int4"), _gemv(4096, 2, 256, "w16", lg_group=3)])
    assert r.required_bytes() == 3 * 144 + 2 * 520


def test_bytes_read_twice_count_once():
    a = _gemv(0, 8, 64)  # 8 rows of 4 + 64 bytes, stride 72 on tiny
    assert Roofline(TINY, [a, a]).required_bytes() == 8 * 68
    half = _gemv(4 * 72, 8, 64)  # its first 4 rows are a's last 4
    assert Roofline(TINY, [a, half]).required_bytes() == 12 * 68


def test_ldrow_reads_the_row_its_registers_select():
    ldrow = isa.Instr("LDROW", {"addr": 1000, "row_reg": 1, "row_imm": 2, "cols": 64, "fmt": 1, "lg_group": 2,
                                "sexp": 0, "dst": 0, "dst_e": 0})
    starts, ends = read_spans(TINY, ldrow, {1: 5})
    stride = nx.row_stride(64, "int8", 32, TINY.port_bytes)
    assert starts.tolist() == [1000 + 7 * stride] and ends.tolist() == [1000 + 7 * stride + 68]
    # a row inside a matrix a GEMV streams (a tied embedding) is no extra byte
    r = Roofline(TINY, [ldrow, _gemv(1000, 16, 64)])
    assert r.required_bytes({1: 5}) == 16 * 68
    assert r.required_bytes({1: 20}) == 17 * 68


def test_load_reads_mantissas_and_exponent_and_kv_adds():
    load = isa.Instr("LOAD", {"addr": 64, "len": 5, "dst": 0, "dst_e": 0})
    assert nx.vector_record_size(5) == 16  # 10 bytes of mantissas, 2 of padding, 4 of exponent
    assert Roofline(TINY, [load]).required_bytes() == 14
    assert Roofline(TINY, [load]).required_bytes(kv_offchip_bytes=1000) == 1014
    assert Roofline(TINY, [isa.Instr("VADD", {"a": 0, "a_e": 0, "b": 0, "b_e": 0, "dst": 0, "dst_e": 0, "len": 8}),
                           isa.Instr("END")]).required_bytes() == 0


def test_union_bytes_and_efficiency():
    s, e = np.array([10, 0, 5, 40]), np.array([20, 8, 12, 41])
    assert union_bytes(s, e) == 20 + 1
    assert union_bytes(np.zeros(0, np.int64), np.zeros(0, np.int64)) == 0
    assert bandwidth_efficiency(90, 100) == 0.9
    with pytest.raises(ValueError, match="cycles=0"):
        bandwidth_efficiency(90, 0)
