"""Vectors the host or a register index provides: ``input`` (a float graph input the host writes) and
``table`` (a value of the token or the position alone, tabulated at compile time, one LDROW per step)."""

from __future__ import annotations

import numpy as np

from ..codegen import INDEX_REGISTERS
from ..frontend import CompileError
from ..graph_tools import PAST_KV
from ..overlay_graph import INDEX_INPUTS, VOp

__all__ = ["Input", "Table", "table_row"]


class Input(VOp):
    """A float graph input (not a token, position or KV input): the host writes it as a vector record."""

    kind = "input"

    @staticmethod
    def match(fz, v, node):
        if v not in fz.g.inputs:
            return None
        val = fz.g.values[v]
        if v in INDEX_INPUTS or PAST_KV.match(v) or not val.dtype.startswith("float"):
            raise CompileError(f"graph input {v!r} ({val.describe()}) cannot be read by the overlay as a vector")
        name = fz.add(Input, v, [], v, name=v)
        fz.out.inputs[v] = (name, list(fz.ix.shape(v)))
        return name

    def reference(self, ins, step):
        return np.asarray(step.feeds[self.attrs["name"]], np.float64)

    def emit(self, cg, src):
        dst = cg.vector(self.out)
        cg.instr("LOAD", addr=cg.io["inputs"][self.attrs["name"]]["addr"], len=cg.lengths[self.out], dst=dst[0],
                 dst_e=dst[1])


class Table(VOp):
    """A value of the token or the position alone: a plain embedding Gather, or any cone of the position
    (tabulated over every position below max_seq). Other token-only values are computed normally."""

    kind = "table"

    @staticmethod
    def match(fz, v, node):
        deps = fz.ix.deps.get(v, frozenset())
        if len(deps) != 1 or next(iter(deps)) not in INDEX_INPUTS:
            return None
        index = next(iter(deps))
        n = fz.ix.numel(v)
        table = _plain_gather(fz, v, index)
        if table is None:
            if index != "position_ids":
                return None
            table = fz.over_positions(v)
        if table.shape[1] != n:
            fz.fail(v, f"tabulates to rows of {table.shape[1]} where the vector has {n} elements")
        name = fz.store_table(INDEX_INPUTS[index], table)
        return fz.add(Table, v, [], node.name, table=name)

    def reference(self, ins, step):
        kind, t = step.og.tables[self.attrs["table"]]
        return t[step.token if kind == "token" else step.position]

    def emit(self, cg, src):
        dst = cg.vector(self.out)
        m = cg.records[self.attrs["table"]]
        kind = cg.og.tables[self.attrs["table"]][0]
        cg.instr("LDROW", addr=m.addr, row_reg=INDEX_REGISTERS[kind], row_imm=0, cols=m.cols, **m.format_fields(),
                 dst=dst[0], dst_e=dst[1])


def table_row(fz, table, source):
    """One LDROW per table and step, shared by every op that reads it (q and k of every layer)."""
    rows = fz.memo.setdefault("table_rows", {})
    if table not in rows:
        name = f"v{len(fz.out.ops)}_table"
        fz.out.lengths[name] = fz.out.tables[table][1].shape[1]
        fz.out.ops.append(Table(name, [], {"table": table}, source))
        rows[table] = name
    return rows[table]


def _plain_gather(fz, v: str, index: str):
    """The constant table of ``Gather(table, index)`` if that is what *v* is."""
    pnode = fz.ix.producer.get(fz.ix.resolve(v))
    if (pnode is not None and pnode.op == "Gather" and pnode.attrs.get("axis", 0) == 0
            and fz.ix.is_const(pnode.inputs[0]) and fz.ix.resolve(pnode.inputs[1]) == index):
        data = fz.ix.const(pnode.inputs[0])
        return data.reshape(data.shape[0], -1)
    return None
