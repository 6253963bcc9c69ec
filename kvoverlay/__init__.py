"""kvoverlay: an FPGA transformer-overlay flow.

This package is the core (config, ISA, access table, timing, numerics, bundle), which imports only the
standard library and numpy, and the command line; ``kvoverlay.compiler``, ``.sim``, ``.hw``, ``.host``,
``.models`` and ``.boards`` are mapped from the checkout's top-level folders (see the layout table in the README).
"""

__version__ = "0.1.0"
