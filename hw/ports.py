"""Signatures of the on-chip state ports every execution unit uses, and the unit command interface.

The activation buffer (abuf), accumulator buffer (acc), exponent registers and scalar registers live in the
overlay top (:mod:`hw.overlay`); a unit reaches them through these ports, all seen from the unit's side.
"""

from __future__ import annotations

from amaranth.hdl import signed
from amaranth.lib import data, enum, stream, wiring
from amaranth.lib.wiring import In, Out

from kvoverlay import isa, timing
from kvoverlay import numerics as nx

__all__ = [
    "EREG_SHAPE",
    "QUEUE_ENTRY",
    "Fault",
    "abuf_lanes",
    "abuf_read",
    "abuf_write",
    "abuf_write_beat",
    "acc_read",
    "acc_write",
    "ereg_read",
    "ereg_write",
    "reg_read",
    "reg_write",
    "unit_signature",
]

#: Exponent registers hold more than [EXP_MIN, EXP_MAX]: a GEMV's accumulator exponent is x_e + sexp, which may
#: lie outside the bfp16 range until REQ renormalizes it; two extra bits cover every sum of a bfp16 exponent and sexp.
EREG_SHAPE = signed((nx.EXP_MAX - nx.EXP_MIN).bit_length() + 2)

def abuf_lanes(config) -> int:
    """int16 lanes per activation-buffer word (what the GEMV engine's x port reads)."""
    return 2 * config.port_bytes


def _abuf_depth(config) -> int:
    return config.act_buffer_words // abuf_lanes(config)


def abuf_read(config) -> wiring.Signature:
    """Activation-buffer read port: word address, enable, data one cycle later (lane 0 in the low bits)."""
    return wiring.Signature({"addr": Out(range(_abuf_depth(config))), "en": Out(1), "data": In(16 * abuf_lanes(config))})


def abuf_write(config) -> wiring.Signature:
    """Activation-buffer write port with one enable per int16 lane.

    A unit's write data repeats every :func:`abuf_write_beat` bits (its lanes replicated over the word; the enables
    pick the lanes written): the overlay's shared write port takes only a unit's first beat of data and replicates
    it (:meth:`hw.state.OnChipState.attach_groups`), so its multiplexer is a beat wide, not a word."""
    return wiring.Signature({"addr": Out(range(_abuf_depth(config))), "data": Out(16 * abuf_lanes(config)),
                             "en": Out(abuf_lanes(config))})


def abuf_write_beat(config) -> int:
    """Bits after which every unit's activation-buffer write data repeats: LOAD's memory-port beat (``port_bits``),
    the vector unit's ``vector_lanes``, the attention engine's :func:`~kvoverlay.timing.attn_output_lanes` lanes and
    REQ's ``acc_lanes`` (LDROW's word packer's one lane divides them all): the largest, as each is a power of two,
    within the word."""
    return min(16 * abuf_lanes(config), max(config.port_bits, 16 * config.vector_lanes,
                                            16 * timing.attn_output_lanes(config), 16 * config.acc_lanes))


def acc_read(config) -> wiring.Signature:
    """Accumulator-buffer read port: word address, enable, the word one cycle later; where a row holds several words
    (``config.acc_lanes``), ``row`` carries the whole row the word lies in (word ``addr & ~(acc_lanes - 1)`` in the
    low bits), which is what the REQ unit reads."""
    row = {"row": In(64 * config.acc_lanes)} if config.acc_lanes > 1 else {}
    return wiring.Signature({"addr": Out(range(config.acc_buffer_words)), "en": Out(1), "data": In(64), **row})


def acc_write(config) -> wiring.Signature:
    return wiring.Signature({"addr": Out(range(config.acc_buffer_words)), "data": Out(64), "en": Out(1)})


def ereg_read() -> wiring.Signature:
    """Combinational exponent-register read."""
    return wiring.Signature({"addr": Out(range(isa.NUM_EREGS)), "data": In(EREG_SHAPE)})


def ereg_write() -> wiring.Signature:
    return wiring.Signature({"addr": Out(range(isa.NUM_EREGS)), "data": Out(EREG_SHAPE), "en": Out(1)})


def reg_read() -> wiring.Signature:
    return wiring.Signature({"addr": Out(range(isa.NUM_REGS)), "data": In(32)})


def reg_write() -> wiring.Signature:
    return wiring.Signature({"addr": Out(range(isa.NUM_REGS)), "data": Out(32), "en": Out(1)})


class Fault(enum.Enum, shape=4):
    """Run-time fault of an execution unit, reported with its completion (``NONE``: the instruction retired).

    The one fault enum of the overlay: every unit reports these codes, the overlay forwards them in
    ``error_info`` and the RTL runner names them (``Fault(code).name``).
    """

    NONE = 0
    UNALIGNED = 1
    OUT_OF_RANGE = 2
    FORMAT = 3
    GROUP = 4
    EXPONENT = 5
    OVERFLOW = 6
    OPCODE = 7
    SHAPE = 8
    KV_RANGE = 9
    DIVIDE = 10


#: A command-queue entry: the instruction word and its program counter.
QUEUE_ENTRY = data.StructLayout({"insn": isa.INSN_BITS, "pc": 32})


def unit_signature(insn_layout, **members) -> wiring.Signature:
    """The signature of an execution unit, seen from the unit: the one command and completion protocol.

    ``cmd`` is a stream of instructions viewed through *insn_layout* (a ``StructLayout`` of one opcode from
    :data:`hw.isa_layout.LAYOUTS`, or a union of several); the unit holds ``cmd.ready`` high while idle and starts
    on the cycle a transfer happens. ``busy`` is high from the cycle after that transfer up to and including the
    cycle ``done.valid`` pulses; ``done`` carries the :class:`Fault` (``Fault.NONE`` on success) and is always
    ready. A faulting instruction changes no architectural state. *members* add the unit's memory and register
    ports.
    """
    return wiring.Signature({"cmd": In(stream.Signature(insn_layout)), "busy": Out(1),
                             "done": Out(stream.Signature(Fault, always_ready=True)), **members})
