"""Front end: fetches instructions, checks their legality against the ISA table and dispatches them to the queues."""

from __future__ import annotations

from amaranth.hdl import Module, Signal
from amaranth.lib import stream, wiring
from amaranth.lib.wiring import In, Out

from kvoverlay import isa

from .isa_layout import HEADER_LAYOUT, LAYOUTS
from .ports import QUEUE_ENTRY

__all__ = ["ILLEGAL_REASONS", "Frontend"]

#: ``error_reason`` codes of an illegal instruction (index = code).
ILLEGAL_REASONS = ("none", "reserved_opcode", "reserved_bits", "reserved_enum", "reserved_flag")


class Frontend(wiring.Component):
    """Fetch, decode and dispatch, one instruction every two cycles.

    The program starts at instruction index ``prog_base`` (byte address / 16) of external memory and is read
    through the instruction port (latency 1). The word and its decode are registered before the dispatch (the
    memory's read data ran through the decode into a queue's write enable), and the next word is fetched during
    the dispatch, so a run's first dispatch is in its third cycle and the rest follow every two cycles
    (:data:`kvoverlay.timing.FRONTEND_INTERVAL`, :data:`kvoverlay.timing.RUN_OVERHEAD`). Each word is checked
    exactly as :func:`kvoverlay.isa.decode` does:
    reserved opcode, reserved bits above the opcode's last field, reserved enum codes, and token flags naming a
    queue that does not exist (any flag on END). A legal instruction goes to its queue (NOP: the queue its
    field names) as soon as that queue has room; END stops fetching and raises ``end_seen``. An illegal one
    stops fetching and raises ``error`` with ``error_reason`` and ``pc``.

    Parameters
    ----------
    config : OverlayConfig
        Its ``dram_bytes`` sizes the instruction address.

    Attributes
    ----------
    start : In(1)
        Starts fetching at ``prog_base`` with pc 0.
    halt : In(1)
        Stops fetching (another unit faulted).
    prog_base : In
    insn_addr, insn_data : Out, In(128)
        Instruction port.
    load, compute, store : Out(stream.Signature(QUEUE_ENTRY))
        Dispatch to the command queues: the instruction and its pc.
    pc : Out(32)
        The instruction being fetched or dispatched.
    busy, end_seen, error : Out(1)
    fetch : Out(1)
        High once per instruction read, in the cycle its word arrives (for the byte counters).
    error_reason : Out
    """

    def __init__(self, config):
        self.config = config
        iaw = (config.dram_bytes // isa.INSN_BYTES - 1).bit_length()
        super().__init__({
            "start": In(1), "halt": In(1), "prog_base": In(iaw),
            "insn_addr": Out(iaw), "insn_data": In(isa.INSN_BITS),
            **{q: Out(stream.Signature(QUEUE_ENTRY)) for q in isa.QUEUES},
            "pc": Out(QUEUE_ENTRY.members["pc"]), "busy": Out(1), "fetch": Out(1), "end_seen": Out(1), "error": Out(1),
            "error_reason": Out(range(len(ILLEGAL_REASONS))),
        })

    def elaborate(self, platform):
        m = Module()
        word = self.insn_data
        hdr = HEADER_LAYOUT(word[:HEADER_LAYOUT.size])
        # while dispatching, the port already reads the next word: it is there in the cycle after the dispatch
        # (DECODE), and while the queue is full the address holds, so it stays there
        prefetch = Signal(name="prefetch")
        m.d.comb += self.insn_addr.eq(self.prog_base + self.pc + prefetch)

        reason = Signal(range(len(ILLEGAL_REASONS)), name="decode_reason")
        target = Signal(range(len(isa.QUEUES) + 1), name="decode_queue")  # len(QUEUES) = the front end (END)
        front = len(isa.QUEUES)
        with m.Switch(hdr.opcode):
            for op in isa.OPCODES:
                with m.Case(op.code):
                    view = LAYOUTS[op.name](word)
                    enum_bad = 0
                    for f in op.fields:
                        if f.enum is not None:
                            enum_bad = enum_bad | (getattr(view, f.name) >= len(f.enum))
                    queue = {"front": front, **{q: i for i, q in enumerate(isa.QUEUES)}}.get(op.queue)
                    m.d.comb += target.eq(view.queue if op.queue == "any" else queue)
                    bits_bad = (word >> op.used_bits).any() if op.used_bits < isa.INSN_BITS else 0
                    prev_flags = hdr.pop_prev | hdr.push_prev
                    next_flags = hdr.pop_next | hdr.push_next
                    if op.queue == "front":
                        flag_bad = prev_flags | next_flags
                    elif op.queue == "any":
                        flag_bad = ((target == 0) & prev_flags) | ((target == len(isa.QUEUES) - 1) & next_flags)
                    else:
                        flag_bad = {"load": prev_flags, "store": next_flags}.get(op.queue, 0)
                    with m.If(bits_bad):
                        m.d.comb += reason.eq(ILLEGAL_REASONS.index("reserved_bits"))
                    with m.Elif(enum_bad):
                        m.d.comb += reason.eq(ILLEGAL_REASONS.index("reserved_enum"))
                    with m.Elif(flag_bad):
                        m.d.comb += reason.eq(ILLEGAL_REASONS.index("reserved_flag"))
            with m.Default():
                m.d.comb += reason.eq(ILLEGAL_REASONS.index("reserved_opcode"))

        queues = [getattr(self, q) for q in isa.QUEUES]
        held = Signal(isa.INSN_BITS, name="decoded_word")
        held_reason = Signal.like(reason, name="decoded_reason")
        held_target = Signal.like(target, name="decoded_queue")
        for q in queues:
            m.d.comb += [q.payload.insn.eq(held), q.payload.pc.eq(self.pc)]
        with m.FSM(name="frontend_fsm"):
            with m.State("IDLE"), m.If(self.start):
                m.d.sync += [self.pc.eq(0), self.end_seen.eq(0), self.error.eq(0), self.error_reason.eq(0)]
                m.next = "FETCH"
            with m.State("FETCH"):
                m.d.comb += self.busy.eq(1)
                m.next = "DECODE"
                with m.If(self.halt):
                    m.next = "IDLE"
            with m.State("DECODE"):
                m.d.comb += [self.busy.eq(1), self.fetch.eq(~self.halt)]
                m.d.sync += [held.eq(word), held_reason.eq(reason), held_target.eq(target)]
                m.next = "DISPATCH"
                with m.If(self.halt):
                    m.next = "IDLE"
            with m.State("DISPATCH"):
                m.d.comb += [self.busy.eq(1), prefetch.eq(1)]
                with m.If(self.halt):
                    m.next = "IDLE"
                with m.Elif(held_reason != 0):
                    m.d.sync += [self.error.eq(1), self.error_reason.eq(held_reason)]
                    m.next = "IDLE"
                with m.Elif(held_target == front):
                    m.d.sync += self.end_seen.eq(1)
                    m.next = "IDLE"
                with m.Else(), m.Switch(held_target):
                    for i, q in enumerate(queues):
                        with m.Case(i):
                            m.d.comb += q.valid.eq(1)
                            with m.If(q.ready):
                                m.d.sync += self.pc.eq(self.pc + 1)
                                m.next = "DECODE"
        return m
