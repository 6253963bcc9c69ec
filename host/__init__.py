"""The host runtime: :class:`~kvoverlay.host.session.Session` loads a program and runs prefill and decode on a
backend (``isa``: the golden model; ``rtl``: the Verilated overlay), ``reference`` checks it against
onnxruntime, and ``commands`` holds the ``compile``/``run``/``demo`` subcommands. Amaranth and cocotb are
imported only when the ``rtl`` backend starts."""
