"""Arithmetic pieces sized for the ECP5's multipliers (MULT18X18D: 18 x 18 signed)."""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Mux, Signal, Value

__all__ = ["balanced_sum", "low_mask", "narrow_times", "one_hot_select", "or_all", "select_bits", "select_value",
           "select_word", "shift_left"]


def narrow_times(a, b):
    """``a * b`` for an *a* of a few bits (signed or not), as shift-and-add, so that Yosys leaves it in logic: its
    ECP5 multiplier mapping takes any product of 2 x 2 bits or more, and a MULT18X18D spent on a narrow factor
    is a waste."""
    a = Value.cast(a)
    total = 0
    for k in range(len(a)):
        term = Mux(a[k], Value.cast(b) << k, 0)
        total = total - term if k == len(a) - 1 and a.shape().signed else total + term
    return total


def balanced_sum(terms, m=None, *, name="sum"):
    """The sum of *terms* as a balanced tree of adders: Python's ``sum`` nests one expression per term, which
    past about a thousand terms (a u280 port's byte strobes) overflows the recursion of Amaranth's checks.

    With module *m*, every partial sum but the last is a signal of *m* marked ``keep``, so that each adder is a carry
    chain (CCU2C) of its own: Yosys's ``alumacc`` merges a chain of adds whose partial sums have no other user into
    one ``$macc``, which ``maccmap`` builds as carry-save full adders in LUTs before one carry chain (for the GEMV
    tree's products about 5.6 LUT positions per bit of a four-term sum, against 3 for three CCU2C adders: a 16 x
    4-term, 24-bit probe, 1,920 LUT4 and 208 CCU2C against 624 CCU2C); ``keep`` is what ``alumacc`` respects. The
    last add stays an expression, for the caller's register."""
    terms = list(terms)
    level = 0
    while len(terms) > 1:
        nxt = []
        for k in range(0, len(terms), 2):
            if k + 1 == len(terms):
                nxt.append(terms[k])
                continue
            pair = terms[k] + terms[k + 1]
            if m is not None and len(terms) > 2:
                part = Signal(pair.shape(), name=f"{name}_c{level}_{k // 2}", attrs={"keep": 1})
                m.d.comb += part.eq(pair)
                pair = part
            nxt.append(pair)
        terms, level = nxt, level + 1
    return terms[0] if terms else 0


# Wide variable shifts, masks and selects, in forms whose size grows with width * log(width). Amaranth's
# combinational-cycle check (amaranth.hdl._nir.Netlist.check_comb_cycles) walks, for every output bit of a shift,
# a subtraction or a variable ``bit_select``/``word_select``, an edge to every input bit: width**2 steps, which at
# a u280 port (8192 bits) are hours of conversion for one ``(1 << n) - 1``. The forms below build the same function
# from 2:1 multiplexers and comparators against constants (three edges per bit), which is also what Yosys makes of
# a barrel shifter. Each stage goes through a signal of *m*: an expression used twice is emitted twice, so that an
# unnamed stage that feeds both inputs of the next would double the netlist at every stage.

def low_mask(m, count, width, *, unit=1, name="low_mask"):
    """``((1 << count * unit) - 1)[:width]``: the bits below ``count * unit`` set, one comparator per *unit* bits."""
    if width <= 0 or unit <= 0 or width % unit:
        raise ValueError(f"low_mask: width {width!r} must be a positive multiple of unit {unit!r}")
    count = _named(m, count, name + "_count")
    return Cat((count > i).replicate(unit) for i in range(width // unit))


def shift_left(m, value, amount, width, *, unit=1, name="shift"):
    """``(value << amount * unit)[:width]`` (*value* sign- or zero-extended by its shape first) as a logarithmic
    shifter: one stage of 2:1 multiplexers per bit of *amount*."""
    value, amount = Value.cast(value), Value.cast(amount)
    if width <= 0 or unit <= 0:
        raise ValueError(f"shift_left: width {width!r} and unit {unit!r} must be positive")
    if len(value) < width:
        fill = value[-1] if value.shape().signed else Const(0, 1)
        value = Cat(value, fill.replicate(width - len(value)))
    out = value[:width]
    for k, bit in enumerate(_named(m, amount, name + "_amount")):
        step = unit << k
        out = _named(m, Mux(bit, Cat(Const(0, step), out[:width - step]) if step < width else Const(0, width), out),
                     f"{name}_{k}")
    return out


def select_bits(m, value, offset, width, *, unit=1, name="select"):
    """``value.bit_select(offset * unit, width)`` (beyond *value*'s end: its sign, or zero) as a logarithmic
    shifter: one stage of 2:1 multiplexers per bit of *offset*, highest first, each as wide as the bits the later
    stages can still bring into the result."""
    value, offset = Value.cast(value), Value.cast(offset)
    if width <= 0 or unit <= 0:
        raise ValueError(f"select_bits: width {width!r} and unit {unit!r} must be positive")
    fill = value[-1] if value.shape().signed else Const(0, 1)

    def extend(v, n):
        return v if len(v) >= n else Cat(v, fill.replicate(n - len(v)))

    out = value.as_unsigned()
    bits = _named(m, offset, name + "_offset")
    for k in reversed(range(len(bits))):
        step, keep = unit << k, width + (unit << k) - unit
        out = _named(m, Mux(bits[k], extend(out[step:step + keep], keep), extend(out[:keep], keep)), f"{name}_{k}")
    return extend(out, width)[:width]


def select_word(m, value, index, width, *, name="select"):
    """``value.word_select(index, width)`` as a tree of 2:1 multiplexers (for an *index* that reaches no word
    beyond *value*)."""
    value, index = Value.cast(value), Value.cast(index)
    words = [value[k * width:(k + 1) * width] for k in range(len(value) // width)]
    if width <= 0 or len(words) < 1 << len(index):
        raise ValueError(f"select_word: {len(value)} bits hold {len(words)} words of {width}, fewer than "
                         f"index's {1 << len(index)} values")
    words = words[:1 << len(index)]
    for bit in _named(m, index, name + "_index"):
        words = [Mux(bit, words[k + 1], words[k]) for k in range(0, len(words), 2)]
    return _named(m, words[0], name)


def select_value(m, values, index, *, name="select"):
    """``values[index]`` as a tree of 2:1 multiplexers on *index*'s bits (:func:`select_word`): *values* is a list of
    values of one width, or ``{position: value}``; zero where *index* names none of them."""
    values = values if isinstance(values, dict) else dict(enumerate(values))
    index = Value.cast(index)
    width = len(Value.cast(next(iter(values.values()))))
    words = Cat(*(values.get(k, Const(0, width)) for k in range(1 << len(index))))
    return select_word(m, words, index, width, name=name)


def _named(m, value, name):
    """*value* through a signal of *m*, unless it is one already."""
    if isinstance(value, Signal):
        return value
    value = Value.cast(value)
    sig = Signal(value.shape(), name=name)
    m.d.comb += sig.eq(value)
    return sig


def or_all(values):
    """The OR of *values* (zero-extended to the widest), as a balanced tree."""
    values = list(values)
    while len(values) > 1:
        values = [values[i] | values[i + 1] if i + 1 < len(values) else values[i] for i in range(0, len(values), 2)]
    return values[0]


def one_hot_select(value, one_hot, width: int):
    """The *width*-bit field ``k`` of *value* where bit ``k`` of *one_hot* is the only one set, as an AND-OR tree:
    under ABC9 about half the LUT4 of ``value.word_select(binary_index, width)``, which maps for depth."""
    return or_all(value[width * k: width * (k + 1)] & one_hot[k].replicate(width) for k in range(len(one_hot)))
