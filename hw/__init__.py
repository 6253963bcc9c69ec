"""The overlay in Amaranth: the top (``overlay``), its front end with the dependency-token queues, the memory
port, the load/store/LDROW/GEMV/REQ units, the vector unit, the attention engine with its KV buffer, and the
simulation tops. Instruction fields come from the ISA's layouts (``isa_layout``); each unit's cycle count is
the formula in :mod:`kvoverlay.timing`."""
