"""The board top: the overlay, its block-RAM memory and the UART host bridge, with two pins to the outside.

:class:`BoardTop` is the same design on a board (:mod:`kvoverlay.boards.build` adds the clock, the PLL and the
pins) and in its simulated twin (:mod:`kvoverlay.boards.sim`, a UART model on the pins). ``overlay=False``
builds the link alone (bridge and memory, INFO reports no overlay): a bitstream that brings up the UART and the
memory on a board before the overlay fits the part.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Module, ResetInserter, Signal
from amaranth.lib import wiring
from amaranth.lib.wiring import In, Out

from kvoverlay import isa, link

from .bridge import HostBridge
from .memory import BramMemory
from .uart import UartRx, UartTx, check_divisor

__all__ = ["MEMORIES", "TOP_NAME", "BoardTop", "memory_words"]

#: Verilog module name of the board top (differs from every port name).
TOP_NAME = "kvo_board"
#: The board memories: block RAM in the bitstream, or the board's SDRAM behind a controller.
MEMORIES = ("bram", "sdram")


def memory_words(config, mem_bytes: int) -> int:
    """Port words of a board memory of *mem_bytes*; refuses a size the overlay could not address."""
    if not isinstance(mem_bytes, int) or mem_bytes & (mem_bytes - 1) or mem_bytes < max(config.port_bytes, isa.INSN_BYTES) * 2:
        raise ValueError(f"mem_bytes must be a power of two of at least two words, got {mem_bytes!r}")
    if mem_bytes > config.dram_bytes:
        raise ValueError(f"mem_bytes={mem_bytes} exceeds the config's dram_bytes={config.dram_bytes}")
    return mem_bytes // config.port_bytes


class BoardTop(wiring.Component):
    """Overlay + block-RAM memory + UART host bridge.

    Parameters
    ----------
    config : OverlayConfig
    mem_bytes : int
        Block RAM for the program image and the program (a power of two, at most ``config.dram_bytes``).
    divisor : int
        UART clock cycles per bit.
    overlay : bool
        Build the overlay in (False: the link alone).
    memory : str
        ``bram`` (block RAM of *mem_bytes*) or ``sdram`` (*mem_bytes* of the board's SDRAM behind
        :class:`~kvoverlay.boards.sdram.SdramMemory`).
    sdram_timing : SdramTiming, optional
        The SDRAM's timing (default: :func:`~kvoverlay.boards.sdram.sdram_timing` at the config's clock).
    sdram_model : bool
        Put :class:`~kvoverlay.boards.sdram.SdramModel` on the SDRAM's pins (the simulated board); its first
        violation is ``sdram_error``.

    Attributes
    ----------
    rx : In(1)
        UART line from the host (idle high).
    tx : Out(1)
        UART line to the host.
    leds : Out(4)
        Running, done since the last start, error, a byte received (toggles).
    sdram : Out(sdram_pins(...))
        ``memory="sdram"`` without the model: the SDRAM's pins.
    sdram_error : Out(SdramError)
        ``sdram_model=True``: the model's first violation.
    """

    def __init__(self, config, *, mem_bytes: int, divisor: int, overlay: bool = True, memory: str = "bram",
                 sdram_timing=None, sdram_model: bool = False):
        from .sdram import SdramError, sdram_pins
        from .sdram import sdram_timing as default_timing

        if memory not in MEMORIES:
            raise ValueError(f"memory must be one of {', '.join(MEMORIES)}, got {memory!r}")
        self.config = config
        self.mem_words = memory_words(config, mem_bytes)
        check_divisor(divisor)
        self.divisor = divisor
        self.with_overlay = overlay
        self.memory = memory
        self.sdram_timing = (sdram_timing or default_timing(config.clock_mhz)) if memory == "sdram" else None
        self.sdram_model = sdram_model and memory == "sdram"
        members = {"rx": In(1, init=1), "tx": Out(1, init=1), "leds": Out(4)}
        if self.sdram_model:
            members["sdram_error"] = Out(SdramError)
        elif memory == "sdram":
            members["sdram"] = Out(sdram_pins(self.sdram_timing))
        super().__init__(members)

    def elaborate(self, platform):
        from kvoverlay.hw.overlay import COUNTERS, Overlay

        m = Module()
        cfg = self.config
        m.submodules.uart_rx = urx = UartRx(self.divisor)
        m.submodules.uart_tx = utx = UartTx(self.divisor)
        fingerprint = link.config_fingerprint(cfg) if self.with_overlay else 0
        m.submodules.bridge = br = HostBridge(cfg, self.mem_words, len(COUNTERS), fingerprint,
                                                  sdram=self.memory == "sdram")
        m.d.comb += [urx.rx.eq(self.rx), self.tx.eq(utx.tx)]
        wiring.connect(m, urx.data, br.rx)
        wiring.connect(m, br.tx, utx.data)

        if self.memory == "sdram":
            from .sdram import SdramMemory, SdramModel

            mem = SdramMemory(cfg, self.mem_words, self.sdram_timing)
            m.d.comb += mem.abort.eq(br.ov_reset)
            if self.sdram_model:
                per = cfg.port_bits // 16
                m.submodules.sdram_model = model = SdramModel(self.sdram_timing, self.mem_words * per)
                wiring.connect(m, mem.pins, model.pins)
                m.d.comb += self.sdram_error.eq(model.error)
            else:
                wiring.connect(m, mem.pins, wiring.flipped(self.sdram))
        else:
            mem = BramMemory(cfg, self.mem_words)
        wiring.connect(m, br.mem, mem.host)
        m.d.comb += mem.host_sel.eq(br.mem_sel)
        if self.with_overlay:
            ov = Overlay(cfg)
            # RESET empties the overlay's state (KV buffer, registers) and the memory's burst state, not the bridge
            # (an SDRAM memory finishes its burst without the overlay: the part keeps its init and refresh)
            m.submodules.overlay = ResetInserter(br.ov_reset)(ov)
            m.submodules.memory = mem if self.memory == "sdram" else ResetInserter(br.ov_reset)(mem)
            wiring.connect(m, ov.dram, mem.port)
            m.d.comb += [mem.insn_addr.eq(ov.insn_addr), ov.insn_data.eq(mem.insn_data)]
            for name, member in br.ov.signature.members.items():
                ours, theirs = getattr(br.ov, name), getattr(ov, name)
                m.d.comb += theirs.eq(ours) if member.flow == Out else ours.eq(theirs)
        else:
            m.submodules.memory = mem
        toggle = Signal()
        with m.If(urx.data.valid):
            m.d.sync += toggle.eq(~toggle)
        done_seen = Signal()
        with m.If(br.ov.start):
            m.d.sync += done_seen.eq(0)
        with m.Elif(br.ov.done):
            m.d.sync += done_seen.eq(1)
        m.d.comb += self.leds.eq(Cat(br.ov.running, done_seen, br.ov.error, toggle))
        return m

