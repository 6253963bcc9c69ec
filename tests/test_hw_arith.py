"""hw.arith's wide-shift forms in Amaranth's simulator: each equals the Amaranth expression it stands for
(``(1 << n) - 1``, ``<<`` by a variable, ``word_select``) on every input of small widths, signed and unsigned;
and their netlists stay small where the plain expression's comb-cycle check grows with the width squared."""

import itertools

import pytest

pytest.importorskip("amaranth")

from amaranth.hdl import Const, Fragment, Module, Signal, signed
from amaranth.hdl._ir import build_netlist
from amaranth.sim import Simulator
from kvoverlay.hw.arith import low_mask, one_hot_select, or_all, select_bits, select_word, shift_left


def _equal_on_all_inputs(inputs, pairs_of):
    """Drive every combination of *inputs*' values; each (helper, reference) pair of ``pairs_of(m)`` must agree."""
    m = Module()
    pairs = pairs_of(m)
    outs = []
    for k, (got, want) in enumerate(pairs):
        g, w = Signal(len(got), name=f"got{k}"), Signal(len(got), name=f"want{k}")
        m.d.comb += [g.eq(got), w.eq(want)]
        outs.append((g, w))
    bad = []

    async def tb(ctx):
        for values in itertools.product(*(range(1 << len(s)) for s in inputs)):
            for s, v in zip(inputs, values, strict=True):
                ctx.set(s, v if not s.shape().signed or v < 1 << (len(s) - 1) else v - (1 << len(s)))
            for g, w in outs:
                if ctx.get(g) != ctx.get(w):
                    bad.append((values, g.name, ctx.get(g), ctx.get(w)))

    sim = Simulator(m)
    sim.add_testbench(tb)
    sim.run()
    assert not bad, bad[:5]


def test_low_mask_is_shift_minus_one():
    n = Signal(5)
    _equal_on_all_inputs([n], lambda m: [(low_mask(m, n, 24), (Const(1, 25) << n) - 1),
                                         (low_mask(m, n, 24, unit=8), (Const(1, 25) << (n * 8)) - 1),
                                         (low_mask(m, n[1:], 7), (1 << n[1:]) - 1)])


@pytest.mark.parametrize("shape", [4, signed(4)])
def test_shift_left_is_shift(shape):
    v, s = Signal(shape), Signal(4)
    _equal_on_all_inputs([v, s], lambda m: [(shift_left(m, v, s, 20), v << s), (shift_left(m, v, s, 3), v << s),
                                            (shift_left(m, v, s, 24, unit=4), v << (s * 4))])


@pytest.mark.parametrize("shape", [12, signed(12)])
def test_select_bits_is_bit_select(shape):
    v, o = Signal(shape), Signal(3)
    _equal_on_all_inputs([v, o], lambda m: [(select_bits(m, v, o, 5), v.bit_select(o, 5)),
                                            (select_bits(m, v, o, 4, unit=2), v.bit_select(o * 2, 4)),
                                            (select_bits(m, v[:6], o, 4), v[:6].bit_select(o, 4))])


def test_select_word_is_word_select():
    v, i = Signal(12), Signal(2)
    _equal_on_all_inputs([v, i], lambda m: [(select_word(m, v, i, 3), v.word_select(i, 3))])
    with pytest.raises(ValueError, match="fewer than"):
        select_word(None, v, Signal(3), 3)  # refused before anything is added to a module


def test_one_hot_select_is_word_select_and_or_all_is_or():
    v, i = Signal(12), Signal(2)
    a, b, c = Signal(2), Signal(3), Signal(1)
    _equal_on_all_inputs([v, i], lambda m: [(one_hot_select(v, Const(1, 4) << i, 3), v.word_select(i, 3))])
    _equal_on_all_inputs([a, b, c], lambda m: [(or_all([a, b, c]), a | b | c), (or_all([b]), b)])


def _edges(value_of, inputs):
    """Comb edges from the inputs to the output bits that Amaranth's cycle check walks."""
    m = Module()
    value = value_of(m)
    out = Signal(len(value))
    m.d.comb += out.eq(value)
    netlist = build_netlist(Fragment.get(m, None), ports=[*inputs, out])
    return sum(len(list(cell.comb_edges_to(net.bit))) for idx, cell in enumerate(netlist.cells) if idx
               for net in cell.output_nets(idx))


def test_edges_grow_as_width_log_width():
    """At 1024 bits the plain mask walks millions of edges; the helpers a few per output bit and bit of the amount."""
    n = Signal(11)
    assert _edges(lambda m: (Const(1, 1025) << n) - 1, [n]) > 1_000_000
    assert _edges(lambda m: low_mask(m, n, 1024), [n]) <= 4 * 1024 * len(n)
    v = Signal(32)
    assert _edges(lambda m: shift_left(m, v, n, 1024), [v, n]) <= 4 * 1024 * len(n)
