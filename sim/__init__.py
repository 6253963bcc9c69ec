"""Two models of the overlay: the golden model (``golden``, bit-exact and core-only) and the Verilated RTL
(``rtl``, which needs Amaranth, cocotb and Verilator)."""
