"""Every fused-op kind, one class each: the fusion rule that produces it (``match``), its float64
reference (``reference``, what ``run_float`` evaluates) and its code generation (``emit``).

A new fused op is one class in this package and one entry in :data:`KINDS`.
"""

from __future__ import annotations

from .act import Act
from .attention import Attention
from .elementwise import Add, AddC, Elementwise, Mul, MulC, Scale
from .linear import Linear
from .norm import Norm
from .rope import Rope
from .table import Input, Table

__all__ = ["KINDS", "RULES"]

#: The fused-op kinds by name.
KINDS = {k.kind: k for k in (Input, Table, Linear, Norm, Act, Rope, Attention, Add, Mul, AddC, MulC, Scale)}

#: The fusion rules, tried in this order at every value: each returns the vector holding the value, having
#: added the ops that compute it, or None if the value is not its pattern. The largest patterns go first.
RULES = (Input.match, Table.match, Attention.match, Rope.match, Norm.match, Act.match, Linear.match,
         Elementwise.match)
