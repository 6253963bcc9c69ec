"""Functional coverage of the programs run on the RTL: opcodes x formats x edge cases, hit and not hit.

:class:`Coverage` bins every instruction of every program the RTL backend runs (``sim/rtl.py`` records
them while a collector is active) and how each run ended. The cocotb regression suite activates one for
the whole pytest session and prints :meth:`Coverage.report` at the end, listing the bins nobody hit.
"""

from __future__ import annotations

import math
from collections import Counter

from kvoverlay import isa

__all__ = ["Coverage", "active", "collecting"]

#: Instructions whose vector length decides whether the last activation-buffer word is partial.
_VECTOR_LEN = {"LOAD": "len", "STORE": "len", "REQ": "len", "VADD": "len", "VMUL": "len", "VSCALE": "len",
               "NORM": "len", "ACT": "len", "ARGMAX": "len", "LDROW": "cols", "GEMV": "cols"}
#: Run outcomes worth covering: a substring of the error message, and the bin it counts in.
_OUTCOMES = {"KV": "fault: KV full or out of range", "illegal": "fault: illegal instruction",
             "reserved": "fault: illegal instruction", "watchdog": "fault: watchdog (stall)",
             "stall": "fault: watchdog (stall)"}

_active = None


def _variants(op: isa.OpFormat):
    for f in op.fields:
        if f.enum is not None and f.name != "queue":
            return f.name, f.enum
    return None, ("-",)


class Coverage:
    """Bins: ``(opcode, variant)`` for every enum variant of every opcode, and named edge cases."""

    def __init__(self, config=None):
        self.config = config
        self.hits = Counter()
        self.runs = 0

    def bins(self) -> list:
        out = []
        for op in isa.OPCODES:
            _, variants = _variants(op)
            out += [("opcode", f"{op.name} {v}") for v in variants]
        for name in sorted(_VECTOR_LEN):
            out.append(("partial last word", name))
        out += [("edge", e) for e in ("GEMV split-K (accumulate)", "GEMV one row", "vector at the top of the buffer",
                                      "back-to-back dependency (pop right after the push)", "ATTN GQA (q_heads > kv_heads)",
                                      "ATTN partial softmax tile", "ATTN several tiles", "KV at full capacity")]
        out += [("outcome", o) for o in ("ok", *sorted(set(_OUTCOMES.values())))]
        return out

    def record(self, program, config, outcome: str = "ok", kv_lengths=(), args=()) -> None:
        """Count one run of *program* (list of :class:`isa.Instr`); *outcome* is "ok" or the error message.

        *kv_lengths* are the attention lengths a session ran at; for a single run they follow from the register
        arguments *args* (ATTN attends over ``R[len_reg] + len_imm`` positions)."""
        self.runs += 1
        kv_lengths = list(kv_lengths)
        lanes = config.abuf_lanes
        prev = None
        for ins in program:
            if ins is None:  # a word that does not decode: the run's outcome says what the hardware did
                continue
            f = ins.fields
            fname, variants = _variants(ins.fmt)
            variant = variants[f[fname]] if fname else "-"
            self.hits[("opcode", f"{ins.op} {variant}")] += 1
            key = _VECTOR_LEN.get(ins.op)
            if key and f[key] % lanes:
                self.hits[("partial last word", ins.op)] += 1
            if ins.op == "GEMV" and f["accumulate"]:
                self.hits[("edge", "GEMV split-K (accumulate)")] += 1
            if ins.op == "GEMV" and f["rows"] == 1:
                self.hits[("edge", "GEMV one row")] += 1
            if key and "len" in f and f.get("dst", -1) + f["len"] >= config.act_buffer_words - lanes:
                self.hits[("edge", "vector at the top of the buffer")] += 1
            if ins.op == "ATTN" and f["q_heads"] > f["kv_heads"]:
                self.hits[("edge", "ATTN GQA (q_heads > kv_heads)")] += 1
            if ins.op == "ATTN" and not kv_lengths and f["len_reg"] < len(args):
                kv_lengths.append(int(args[f["len_reg"]]) + f["len_imm"])
            if prev is not None and any(d.startswith("pop") for d in ins.deps) and any(
                    d.startswith("push") for d in prev.deps):
                self.hits[("edge", "back-to-back dependency (pop right after the push)")] += 1
            prev = ins
        for n in kv_lengths:
            tiles = math.ceil(n / config.attn_tile)
            if n % config.attn_tile:
                self.hits[("edge", "ATTN partial softmax tile")] += 1
            if tiles > 1:
                self.hits[("edge", "ATTN several tiles")] += 1
            if n >= config.kv_capacity:
                self.hits[("edge", "KV at full capacity")] += 1
        hit = "ok"
        if outcome != "ok":
            hit = next((b for k, b in _OUTCOMES.items() if k.lower() in outcome.lower()), "fault: other")
        self.hits[("outcome", hit)] += 1

    def merge(self, other: Coverage) -> None:
        """Count *other*'s runs here too."""
        self.hits.update(other.hits)
        self.runs += other.runs

    def report(self) -> str:
        rows = self.bins()
        extra = sorted(set(self.hits) - set(rows))
        missed = [b for b in rows if not self.hits[b]]
        lines = [f"functional coverage of {self.runs} RTL runs: {len(rows) - len(missed)}/{len(rows)} bins hit",
                 "| kind | bin | hits |", "|---|---|---|"]
        lines += [f"| {k} | {b} | {self.hits[(k, b)]} |" for k, b in rows + extra]
        lines.append("not hit: " + ("; ".join(f"{k}: {b}" for k, b in missed) if missed else "none"))
        return "\n".join(lines) + "\n"


def active() -> Coverage | None:
    """The collector runs are recorded into, if any."""
    return _active


class collecting:
    """Context manager: record every RTL run into *coverage* while active. Nested in another, the runs count for
    the enclosing collector too (a test's own collector does not hide its runs from the session's report)."""

    def __init__(self, coverage: Coverage):
        self.coverage = coverage

    def __enter__(self):
        global _active
        self._prev, _active = _active, self.coverage
        return self.coverage

    def __exit__(self, *exc):
        global _active
        _active = self._prev
        if self._prev is not None:
            self._prev.merge(self.coverage)
