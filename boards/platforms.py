"""The boards ``kvoverlay build`` knows: an amaranth-boards platform, its device's resources, its UART and clock.

A board here is what the build flow needs beyond the amaranth-boards platform: the device's totals (for a fit
estimate before place and route, and for the utilization the summary reports) and the resources that carry the
host link. Adding a board is one entry.
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["BOARDS", "DEVICES", "Board", "board"]

#: Resources of the ECP5 parts (Lattice's ECP5 family data sheet, table 1.1): LUT4s, MULT18X18D, DP16KD.
DEVICES = {
    "LFE5U-12F": {"luts": 12288, "dsps": 28, "brams": 56},
    "LFE5U-25F": {"luts": 24288, "dsps": 28, "brams": 56},
    "LFE5U-45F": {"luts": 43848, "dsps": 72, "brams": 108},
    "LFE5U-85F": {"luts": 83640, "dsps": 156, "brams": 208},
    "LFE5UM5G-45F": {"luts": 43848, "dsps": 72, "brams": 108},
    "LFE5UM5G-85F": {"luts": 83640, "dsps": 156, "brams": 208},
}


@dataclass(frozen=True)
class Board:
    """One board: ``platform`` is ``module:Class`` in amaranth_boards, ``clock`` its oscillator resource."""

    name: str
    platform: str
    clock: str
    description: str

    def create_platform(self):
        import importlib

        module, cls = self.platform.split(":")
        return getattr(importlib.import_module(module), cls)()

    @property
    def device(self) -> str:
        return self.create_platform().device

    @property
    def resources(self) -> dict:
        return DEVICES[self.device]


BOARDS = {
    "ulx3s-85f": Board("ulx3s-85f", "amaranth_boards.ulx3s:ULX3S_85F_Platform", "clk25",
                       "Radiona ULX3S, ECP5-85F, 25 MHz oscillator, FT231X UART"),
    "ulx3s-12f": Board("ulx3s-12f", "amaranth_boards.ulx3s:ULX3S_12F_Platform", "clk25",
                       "Radiona ULX3S, ECP5-12F (the smallest part of the family)"),
    "ecpix5-45f": Board("ecpix5-45f", "amaranth_boards.ecpix5:ECPIX545Platform", "clk100",
                        "LambdaConcept ECPIX-5, ECP5-5G-45F, 100 MHz oscillator, FT2232 UART"),
}


def board(name: str) -> Board:
    try:
        return BOARDS[name]
    except KeyError:
        raise ValueError(f"unknown board {name!r}; boards: {', '.join(BOARDS)}") from None
