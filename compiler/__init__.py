"""The compiler: an ONNX decoder in, an overlay program (:class:`kvoverlay.bundle.Bundle`) out.

One list of named passes (``passes.PIPELINE``), each of which can be dumped; ``driver.compile_model`` runs it.
It imports the core only (config, ISA, access table, numerics, bundle), never sim/, host/ or hw/, so it
runs where Amaranth and cocotb are absent. See ``docs/compiler.md``.
"""
