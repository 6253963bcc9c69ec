"""Simulation top of the vector unit: the unit on a :class:`~hw.sim_unit.UnitSimTop`.

A test loads a case's operands through the host ports (a few dozen words), starts one instruction and waits for
``done``; the unit then runs with no Python on the per-cycle path.
"""

from __future__ import annotations

from .sim_unit import UnitSimTop
from .vector_unit import VectorUnit

__all__ = ["TOP_NAME", "VectorUnitSimTop"]

#: Verilog module name of the top; differs from every port name.
TOP_NAME = "vector_unit_sim_top"


class VectorUnitSimTop(UnitSimTop):
    """:class:`~hw.vector_unit.VectorUnit` with the on-chip state and host ports (:class:`~hw.sim_unit.UnitSimTop`).

    Parameters
    ----------
    config : OverlayConfig
    """

    def __init__(self, config):
        super().__init__(config, VectorUnit(config))
