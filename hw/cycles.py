"""Busy cycles of one instruction on its execution unit: each unit's own formula, in one dispatch.

The golden model's timing (:func:`kvoverlay.sim.golden.instr_cycles`) is fitted to these, so that its cycle
predictions follow the RTL; the overlay tests assert them exactly against the hardware's busy counters.
"""

from __future__ import annotations

from kvoverlay import isa

__all__ = ["DISPATCH_CYCLES", "DONE_LATENCY", "unit_cycles"]

#: Cycles a queue spends per instruction besides the unit's busy cycles: the executor's dispatch cycle (it starts
#: the unit in its idle state; the unit is busy from the next cycle).
DISPATCH_CYCLES = 1
#: The vector unit and the attention engine pulse ``done`` in the cycle after their last busy cycle (their
#: formulas count ``busy``); the queue stays busy until it sees ``done``.
DONE_LATENCY = 1


def unit_cycles(config, ins: isa.Instr, kv_len: int = 0) -> int:
    """Cycles the queue is busy with *ins* on its unit, uncontended (no port or token stalls): what the overlay's
    ``busy_<queue>`` counter adds; ATTN needs the KV length."""
    from .attention import attn_cycles, kvappend_cycles
    from .gemv_unit import gemv_unit_cycles
    from .ldrow_unit import ldrow_cycles
    from .load_unit import load_cycles
    from .req_unit import req_cycles
    from .store_unit import stacc_cycles, store_cycles
    from .vector_unit import OPS as VECTOR_OPS
    from .vector_unit import vector_cycles

    f, op = ins.fields, ins.op
    if op == "LOAD":
        return load_cycles(config, f["len"])
    if op == "LDROW":
        return ldrow_cycles(config, ins)
    if op == "STORE":
        return store_cycles(config, f["len"])
    if op == "STACC":
        return stacc_cycles(config, f["len"])
    if op == "GEMV":
        return gemv_unit_cycles(config, ins)
    if op == "REQ":  # the dedicated REQ unit, not the vector unit's
        return req_cycles(config, f["len"])
    if op == "KVAPPEND":
        return kvappend_cycles(config, f["heads"], f["head_dim"]) + DONE_LATENCY
    if op == "ATTN":
        return attn_cycles(config, f["q_heads"], f["head_dim"], kv_len) + DONE_LATENCY
    if op in VECTOR_OPS:
        return vector_cycles(op, f, config) + DONE_LATENCY
    if op == "NOP":
        return 1
    if op == "END":
        return 0
    raise ValueError(f"{op!r} has no execution unit")
