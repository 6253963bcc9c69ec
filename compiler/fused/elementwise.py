"""The remaining elementwise arithmetic: ``add``/``mul`` of two vectors, ``addc``/``mulc`` of a vector and
a constant vector, ``scale`` by an immediate: what Add/Sub/Mul/Div/Neg become when no larger op
(a norm's gain, an activation, a rotary embedding) took them."""

from __future__ import annotations

from typing import ClassVar

import numpy as np

from ..codegen import scale_imm
from ..overlay_graph import VOp

__all__ = ["Add", "AddC", "Elementwise", "Mul", "MulC", "Scale"]


class Elementwise(VOp):
    """VADD or VMUL of two vectors, the second loaded from a constant record for the ``*c`` kinds."""

    instruction: ClassVar[str]

    @staticmethod
    def match(fz, v, node):
        if node.op == "Neg":
            return fz.add(Scale, v, [fz.vector(node.inputs[0])], node.name, factor=-1.0)
        if node.op not in ("Add", "Sub", "Mul", "Div"):
            return None
        op = node.op
        a, b = node.inputs
        ca, cb = fz.ix.const(a), fz.ix.const(b)
        n = fz.ix.numel(v)
        if ca is not None and cb is not None:
            fz.fail(v, "has only constant inputs (constant folding should have removed it)")
        if ca is None and cb is None:
            if fz.ix.numel(a) != n or fz.ix.numel(b) != n:
                fz.fail(v, f"broadcasts vectors of {fz.ix.numel(a)} and {fz.ix.numel(b)} elements")
            if op == "Add":
                return fz.add(Add, v, [fz.vector(a), fz.vector(b)], node.name)
            if op == "Mul":
                return fz.add(Mul, v, [fz.vector(a), fz.vector(b)], node.name)
            if op == "Sub":
                nb = fz.add(Scale, b, [fz.vector(b)], node.name, factor=-1.0)
                return fz.add(Add, v, [fz.vector(a), nb], node.name)
            fz.fail(v, "divides by a computed vector")
        var, c, c_first = (b, ca, True) if ca is not None else (a, cb, False)
        if fz.ix.numel(var) != n:
            fz.fail(v, f"broadcasts a vector of {fz.ix.numel(var)} elements to {n}")
        if c.size == 1:
            s = float(c.reshape(-1)[0])
            if op == "Mul":
                return fz.add(Scale, v, [fz.vector(var)], node.name, factor=s)
            if op == "Div" and not c_first:
                return fz.add(Scale, v, [fz.vector(var)], node.name, factor=1.0 / s)
            if op == "Sub":
                x = fz.vector(var)
                if c_first:
                    x = fz.add(Scale, v, [x], node.name, factor=-1.0)
                    s = -s
                cname = fz.store(fz.out.consts, "c", np.full(n, -s))
                return fz.add(AddC, v, [x], node.name, const=cname)
            if op == "Add":
                cname = fz.store(fz.out.consts, "c", np.full(n, s))
                return fz.add(AddC, v, [fz.vector(var)], node.name, const=cname)
            fz.fail(v, "divides a constant by a vector")
        cname_src = a if c_first else b
        if op == "Mul":
            return fz.add(MulC, v, [fz.vector(var)], node.name, const=fz.const_vector(cname_src, n))
        if op == "Add":
            return fz.add(AddC, v, [fz.vector(var)], node.name, const=fz.const_vector(cname_src, n))
        if op == "Sub" and not c_first:
            cname = fz.store(fz.out.consts, "c", -fz.out.consts[fz.const_vector(cname_src, n)])
            return fz.add(AddC, v, [fz.vector(var)], node.name, const=cname)
        if op == "Div" and not c_first:
            cv = fz.ix.const(cname_src).astype(np.float64)
            cname = fz.store(fz.out.consts, "c", np.broadcast_to(1.0 / cv.reshape(-1), (n,)).copy())
            return fz.add(MulC, v, [fz.vector(var)], node.name, const=cname)
        fz.fail(v, "combines a constant and a vector in a way the overlay does not support")

    def emit(self, cg, src):
        b = src[1] if len(src) > 1 else cg.load_const(self.attrs["const"], cg.lengths[self.out])
        dst = cg.vector(self.out)
        cg.instr(self.instruction, a=src[0][0], a_e=src[0][1], b=b[0], b_e=b[1], dst=dst[0], dst_e=dst[1],
                 len=cg.lengths[self.out])


class Add(Elementwise):
    kind, instruction = "add", "VADD"

    def reference(self, ins, step):
        return ins[0] + ins[1]


class Mul(Elementwise):
    kind, instruction = "mul", "VMUL"

    def reference(self, ins, step):
        return ins[0] * ins[1]


class AddC(Elementwise):
    kind, instruction = "addc", "VADD"

    def reference(self, ins, step):
        return ins[0] + step.og.consts[self.attrs["const"]]


class MulC(Elementwise):
    kind, instruction = "mulc", "VMUL"

    def reference(self, ins, step):
        return ins[0] * step.og.consts[self.attrs["const"]]


class Scale(VOp):
    """Multiplication by a constant scalar, an immediate of VSCALE."""

    kind = "scale"

    def reference(self, ins, step):
        return ins[0] * self.attrs["factor"]

    def emit(self, cg, src):
        imm_m, imm_e = scale_imm(self.attrs["factor"], cg.who)
        dst = cg.vector(self.out)
        cg.instr("VSCALE", a=src[0][0], a_e=src[0][1], dst=dst[0], dst_e=dst[1], len=cg.lengths[self.out],
                 imm_m=imm_m, imm_e=imm_e)
