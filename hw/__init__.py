"""The overlay in Amaranth: the top (``overlay``), its front end with the dependency-token queues, the memory
port (``dram``), the execution units on the one unit protocol (``ports.unit_signature``): LOAD, LDROW, GEMV, REQ,
STORE/STACC (``*_unit``, built from the shared pieces in ``unit`` and ``requantizer``), the vector unit and the
attention engine with its KV buffer; the on-chip state they share (``state``), the simulation tops (``sim_*``).
Instruction fields come from the ISA's layouts (``isa_layout``); each unit's cycle count is the formula in
:mod:`kvoverlay.timing`."""
