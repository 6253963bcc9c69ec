"""Amaranth hardware of the overlay.

The overlay top (``overlay``) with its front end, command queues and memory arbiter; the execution units, each a
component of the one unit protocol (``ports.unit_signature``): LOAD, LDROW, GEMV, REQ, STORE/STACC (``*_unit``,
built from the shared pieces in ``unit``, ``requantizer`` and ``dram``), the vector unit and the attention engine;
the on-chip state they share (``state``); simulation tops (``sim_*``) and the Verilog export (``export``).
"""
