"""kvoverlay: an FPGA transformer-overlay flow (config, ISA, numerics, golden model, CLI)."""

__version__ = "0.1.0"
