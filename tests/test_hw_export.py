"""Conversion at the u280 preset (an 8192-bit port): the store and load units go through Amaranth's netlist, its
combinational-cycle check included, and the edges that check walks stay within a few per output bit and shift
stage. Their byte masks, strobes and exponent placement are built from hw.arith's comparators and multiplexer
stages; the ``(1 << 8 * n) - 1`` of the port's width they replace made the check walk 5.6 billion edges in the
store unit alone (hours; docs/boards.md, "The u280 preset's Verilog")."""

import pytest

pytest.importorskip("amaranth")

from amaranth.hdl import Fragment
from amaranth.hdl._ir import build_netlist
from kvoverlay.hw.export import top_ports
from kvoverlay.hw.load_unit import LoadUnit
from kvoverlay.hw.store_unit import StoreUnit

from kvoverlay.config import PRESETS


@pytest.mark.parametrize("unit", [StoreUnit, LoadUnit])
def test_u280_unit_netlist_is_near_linear(unit):
    comp = unit(PRESETS["u280"])
    netlist = build_netlist(Fragment.get(comp, None), ports=top_ports(comp), name="top")
    edges = sum(len(list(cell.comb_edges_to(net.bit))) for idx, cell in enumerate(netlist.cells) if idx
                for net in cell.output_nets(idx))
    # measured 0.7M (store) and 1.0M (load); the port is 8192 bits, so a single quadratic form is 67M
    assert edges < 4_000_000
