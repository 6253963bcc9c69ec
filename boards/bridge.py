"""The host bridge: requests in from the UART, checked, executed against the overlay and its memory, replies out.

The protocol (SLIP framing, sequence numbers, CRC-16, the commands) is declared in :mod:`kvoverlay.link`; this is
its board side. A request is buffered whole in a small block RAM and runs only once its CRC has checked, so a
corrupted address can never steer a write. A frame that fails its CRC, or overflows the buffer, is dropped and
counted (INFO reports the count); the host notices the missing reply and sends the request again.
"""

from __future__ import annotations

from amaranth.hdl import Cat, Const, Module, Mux, Signal, Value, signed, unsigned
from amaranth.lib import data, stream, wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out
from kvoverlay.hw.arith import one_hot_select, or_all

from kvoverlay import isa, link

from .memory import host_memory_port

__all__ = ["ARG_BYTES", "HostBridge", "SlipFramer", "crc16_update", "overlay_host_signature"]

#: Argument bytes of each command (WRITE_MEM: the first word; whole memory words follow).
ARG_BYTES = {link.Cmd.INFO: 0, link.Cmd.WRITE_MEM: 4, link.Cmd.READ_MEM: 6, link.Cmd.WRITE_REG: 5,
             link.Cmd.READ: 5, link.Cmd.START: 8, link.Cmd.STATUS: 0, link.Cmd.RESET: 0}
#: Request bytes kept in registers as they arrive: sequence number, command, the longest arguments.
HEADER_BYTES = 2 + max(ARG_BYTES.values())


def _crc16_terms() -> list:
    """For each bit of the next CRC, the set of the inputs it is the XOR of (0-15: the CRC, 16-23: the byte): the
    bitwise loop of :func:`kvoverlay.link.crc16` run on sets of inputs instead of bits, so the circuit is one
    level of XOR per bit rather than eight chained rounds."""
    crc = [{i} for i in range(16)]
    for i in range(8):
        crc[8 + i] = crc[8 + i] ^ {16 + i}
    for _ in range(8):
        top = crc[15]
        crc = [set()] + crc[:15]
        for i in range(16):
            if 0x1021 >> i & 1:
                crc[i] = crc[i] ^ top
    return crc


def crc16_update(crc, byte):
    """CRC-16/CCITT-FALSE of one more *byte* (as :func:`kvoverlay.link.crc16`), as a value of 16 XORs."""
    inputs = Cat(crc, byte)
    return Cat(*(Cat(*(inputs[i] for i in sorted(terms))).xor() for terms in _crc16_terms()))


def overlay_host_signature(config, n_counters: int) -> wiring.Signature:
    """The overlay's host ports as the bridge drives them (the overlay's own names and shapes, seen from the host)."""
    from kvoverlay.hw.overlay import ERRORS
    from kvoverlay.hw.ports import EREG_SHAPE

    if EREG_SHAPE.width > 8 * link.space_bytes(config, link.Space.EREGS):
        raise ValueError(f"exponent registers of {EREG_SHAPE.width} bits do not fit the protocol's "
                         f"{link.space_bytes(config, link.Space.EREGS)} bytes")
    lanes = 2 * config.port_bytes
    iaw = (config.dram_bytes // isa.INSN_BYTES - 1).bit_length()
    return wiring.Signature({
        "start": Out(1), "prog_base": Out(iaw), "watchdog_cycles": Out(32),
        "running": In(1), "done": In(1),
        "error": In(1), "error_code": In(range(len(ERRORS))), "error_info": In(8), "error_pc": In(32),
        "host_reg_we": Out(1), "host_reg_addr": Out(range(isa.NUM_REGS)), "host_reg_data": Out(32),
        "dbg_abuf_addr": Out(range(config.act_buffer_words // lanes)), "dbg_abuf_data": In(16 * lanes),
        "dbg_acc_addr": Out(range(config.acc_buffer_words)), "dbg_acc_data": In(64),
        "dbg_ereg_addr": Out(range(isa.NUM_EREGS)), "dbg_ereg_data": In(EREG_SHAPE),
        "dbg_reg_addr": Out(range(isa.NUM_REGS)), "dbg_reg_data": In(32),
        "ctr_addr": Out(range(n_counters)), "ctr_data": In(64),
    })


class SlipFramer(wiring.Component):
    """Reply framing: payload bytes in (``last`` marks the final one), SLIP-escaped bytes out between END bytes,
    with the CRC-16 of the payload appended.

    Attributes
    ----------
    payload : In(stream.Signature(data.StructLayout({"data": 8, "last": 1})))
    wire : Out(stream.Signature(8))
    """

    def __init__(self):
        super().__init__({"payload": In(stream.Signature(data.StructLayout({"data": 8, "last": 1}))),
                          "wire": Out(stream.Signature(8))})

    def elaborate(self, platform):
        m = Module()
        crc = Signal(16, init=0xFFFF)
        byte = Signal(8)  # the byte being escaped
        is_last = Signal()
        tail = Signal(2)  # CRC bytes still to send after the payload

        def emit(value, then):
            m.d.comb += [self.wire.valid.eq(1), self.wire.payload.eq(value)]
            with m.If(self.wire.ready):
                m.next = then

        def escape(value, then_plain, then_escaped):
            """Send *value*, or ESC where it needs escaping (the second byte's state sends the rest)."""
            special = (value == link.END) | (value == link.ESC)
            m.d.comb += [self.wire.valid.eq(1), self.wire.payload.eq(Mux(special, link.ESC, value))]
            with m.If(self.wire.ready):
                m.next = then_plain
                with m.If(special):
                    m.next = then_escaped

        with m.FSM():
            with m.State("IDLE"), m.If(self.payload.valid):
                m.d.sync += crc.eq(0xFFFF)
                emit(link.END, "BYTE")
            with m.State("BYTE"), m.If(self.payload.valid):
                value = self.payload.payload.data
                m.d.comb += self.payload.ready.eq(self.wire.ready)
                escape(value, "BYTE", "BYTE_ESC")
                with m.If(self.wire.ready):
                    m.d.sync += [crc.eq(crc16_update(crc, value)), byte.eq(value),
                                 is_last.eq(self.payload.payload.last)]
                    with m.If(self.payload.payload.last & (value != link.END) & (value != link.ESC)):
                        m.d.sync += tail.eq(2)
                        m.next = "CRC"
            with m.State("BYTE_ESC"):
                emit(Mux(byte == link.END, link.ESC_END, link.ESC_ESC), "BYTE")
                with m.If(self.wire.ready & is_last):
                    m.d.sync += tail.eq(2)
                    m.next = "CRC"
            with m.State("CRC"):
                value = Mux(tail == 2, crc[8:], crc[:8])
                m.d.sync += byte.eq(value)
                escape(value, "CRC_NEXT", "CRC_ESC")
            with m.State("CRC_ESC"):
                emit(Mux(byte == link.END, link.ESC_END, link.ESC_ESC), "CRC_NEXT")
            with m.State("CRC_NEXT"):
                m.d.sync += tail.eq(tail - 1)
                m.next = "CRC"
                with m.If(tail == 1):
                    m.next = "CLOSE"
            with m.State("CLOSE"):
                emit(link.END, "IDLE")
        return m


class HostBridge(wiring.Component):
    """Board side of :mod:`kvoverlay.link`.

    Parameters
    ----------
    config : OverlayConfig
        Port width, buffer sizes and the instruction address width.
    mem_depth : int
        Port words of the board memory.
    n_counters : int
        Counters the overlay exposes (``len(hw.overlay.COUNTERS)``).
    fingerprint : int
        :func:`kvoverlay.link.config_fingerprint` of the configuration, reported by INFO (0 for a link-only build).
    sdram : bool
        The memory is the board's SDRAM (INFO's flag bit 1): the program must lie in its instruction window.

    Attributes
    ----------
    rx : In(stream.Signature(8, always_ready=True))
        Bytes from the UART receiver.
    tx : Out(stream.Signature(8))
        Bytes to the UART transmitter.
    ov : Out(overlay_host_signature(...))
        The overlay's host ports.
    mem : Out(host_memory_port(config, mem_depth)), mem_sel : Out(1)
        The memory's host port, and whether the host owns it (the overlay is not running).
    ov_reset : Out(1)
        Held for two cycles by RESET: the overlay's (and its memory controller's) reset.
    """

    def __init__(self, config, mem_depth: int, n_counters: int, fingerprint: int, *, sdram: bool = False):
        self.config = config
        self.sdram = sdram
        self.mem_depth = mem_depth
        self.n_counters = n_counters
        self.fingerprint = fingerprint
        super().__init__({"rx": In(stream.Signature(8, always_ready=True)), "tx": Out(stream.Signature(8)),
                          "ov": Out(overlay_host_signature(config, n_counters)),
                          "mem": Out(host_memory_port(config, mem_depth)), "mem_sel": Out(1), "ov_reset": Out(1)})

    def elaborate(self, platform):
        m = Module()
        cfg, ov = self.config, self.ov
        pb = cfg.port_bytes
        m.submodules.framer = framer = SlipFramer()
        wiring.connect(m, framer.wire, wiring.flipped(self.tx))
        m.d.comb += self.mem_sel.eq(~ov.running)

        # ------------------------------------------------------------ receive: unescape, buffer, check
        buf = Memory(shape=unsigned(8), depth=1 << (link.MAX_REQUEST - 1).bit_length(), init=[])
        m.submodules.buf = buf
        bw, br = buf.write_port(), buf.read_port()
        length = Signal(range(buf.depth + 1))
        flen = Signal.like(length)  # the length of the frame being executed
        crc = Signal(16, init=0xFFFF)
        esc, bad = Signal(), Signal()
        hdr = Signal(8 * HEADER_BYTES)
        dropped = Signal(16)

        seq, cmd = hdr[:8], hdr[8:16]
        arg = hdr[16:]

        def arg_u(offset, nbytes):
            return arg[8 * offset: 8 * (offset + nbytes)]

        last_seq = Signal(8)
        seen = Signal()  # last_seq is valid
        status = Signal(8)
        runs = Signal(32)
        done_seen = Signal()
        with m.If(ov.done):
            m.d.sync += done_seen.eq(1)

        spaces = {
            link.Space.REGS: (ov.dbg_reg_addr, ov.dbg_reg_data, isa.NUM_REGS),
            link.Space.EREGS: (ov.dbg_ereg_addr, ov.dbg_ereg_data, isa.NUM_EREGS),
            link.Space.COUNTERS: (ov.ctr_addr, ov.ctr_data, self.n_counters),
            link.Space.ABUF: (ov.dbg_abuf_addr, ov.dbg_abuf_data, cfg.act_buffer_words // (2 * pb)),
            link.Space.ACC: (ov.dbg_acc_addr, ov.dbg_acc_data, cfg.acc_buffer_words),
        }
        # next word or value to read (the checks bound it by the memory or the space)
        index = Signal(range(max(self.mem_depth, *(size for _, _, size in spaces.values())) + 1))
        count = Signal(17)  # words or values still to read
        wword = Signal(cfg.port_bits)  # WRITE_MEM: the word assembled, a byte shifted in at a time
        nbytes = Signal(range(pb))  # WRITE_MEM: its bytes assembled
        boff = Signal(range(buf.depth))  # WRITE_MEM: the next data byte in the buffer
        for addr_sig, _, _ in spaces.values():
            m.d.comb += addr_sig.eq(index)
        m.d.comb += [ov.host_reg_addr.eq(arg_u(0, 1)), ov.host_reg_data.eq(arg_u(1, 4))]  # WRITE_REG's, with its we
        m.d.comb += [self.mem.addr.eq(index), self.mem.wdata.eq(wword)]

        # The reply's bytes, least significant first, picked from where the value is: the memory word and the
        # activation-buffer word in place (their address, index, is held while their bytes go out, and neither
        # changes while the overlay is stopped), a register, exponent register, counter or accumulator captured
        # in `small` (a counter moves while the overlay runs), INFO's and STATUS's fields from constants and
        # registers. Each source's byte position is a one-hot ring that rotates with each byte sent (the
        # memory's and the buffer's wrap round with each whole word): an AND-OR of one-hot terms costs about 0.7
        # LUT4 per input bit under ABC9, where a binary word_select or a loaded shift register costs 1.2-1.4.
        src_mem, src_abuf, src_small, src_hdr = Signal(), Signal(), Signal(), Signal()  # one-hot: the source
        is_info = Signal()  # src_hdr: INFO (else STATUS)
        small_bytes = {link.Space.REGS: 4, link.Space.EREGS: 2, link.Space.COUNTERS: 8, link.Space.ACC: 8}
        assert all(link.space_bytes(cfg, sp) == n for sp, n in small_bytes.items())
        sp_small = {sp: Signal(name=f"sp_{sp.name.lower()}") for sp in small_bytes}  # one-hot: the small space
        small = Signal(64)
        ereg = Signal(signed(16))
        m.d.comb += ereg.eq(ov.dbg_ereg_data)
        small_value = {link.Space.REGS: ov.dbg_reg_data, link.Space.EREGS: ereg,
                       link.Space.COUNTERS: ov.ctr_data, link.Space.ACC: ov.dbg_acc_data}
        ring_mem = Signal(pb, init=1)
        ring_abuf = Signal(len(ov.dbg_abuf_data) // 8, init=1)
        ring_small = Signal(8, init=1)
        hdr_bytes = 14  # INFO's payload (STATUS's is 11)
        ring_hdr = Signal(hdr_bytes, init=1)
        stat = Signal(3 + 8 + 8 + 32)  # STATUS's flags, error code, info and pc, as the reply began
        error_code = Signal(8)
        m.d.comb += error_code.eq(ov.error_code)
        info_v = Cat(Const(link.LINK_VERSION, 8), Const(int(self.fingerprint != 0), 1), Const(int(self.sdram), 1),
                     Const(0, 6), Const(cfg.port_bits, 16), Const(self.mem_depth, 32), Const(self.fingerprint, 32),
                     dropped)
        status_v = Cat(stat[:3], Const(0, 5), stat[3:], runs, Const(0, 8 * (hdr_bytes - 11)))
        hdr_v = Mux(is_info, info_v, status_v)
        out_byte = ((one_hot_select(self.mem.rdata, ring_mem, 8) & src_mem.replicate(8)) |
                    (one_hot_select(ov.dbg_abuf_data, ring_abuf, 8) & src_abuf.replicate(8)) |
                    (one_hot_select(small, ring_small, 8) & src_small.replicate(8)) |
                    (one_hot_select(hdr_v, ring_hdr, 8) & src_hdr.replicate(8)))
        last_byte = ((src_mem & ring_mem[-1]) | (src_abuf & ring_abuf[-1]) |
                     (src_small & Cat(*(sel & ring_small[small_bytes[sp] - 1] for sp, sel in sp_small.items())).any()) |
                     (src_hdr & Mux(is_info, ring_hdr[hdr_bytes - 1], ring_hdr[11 - 1])))

        payload = framer.payload
        got = self.rx.valid
        byte = self.rx.payload

        def reply(code):
            # whether a payload follows is decided by the status and the source flags that EXEC sets
            m.d.sync += status.eq(code)
            m.next = "SEND_SEQ"

        with m.FSM():
            with m.State("RECV"), m.If(got):
                with m.If(byte == link.END):
                    with m.If((length >= 4) & (crc == 0) & ~bad & ~esc):
                        m.d.sync += flen.eq(length)
                        m.next = "EXEC"
                    with m.Elif(length != 0):
                        m.d.sync += dropped.eq(dropped + (dropped != 0xFFFF))
                    m.d.sync += [length.eq(0), crc.eq(0xFFFF), esc.eq(0), bad.eq(0)]
                with m.Elif(byte == link.ESC):
                    m.d.sync += [esc.eq(1), bad.eq(bad | esc)]
                with m.Else():
                    value = Signal(8)
                    m.d.comb += value.eq(byte)
                    with m.If(esc):
                        with m.If(byte == link.ESC_END):
                            m.d.comb += value.eq(link.END)
                        with m.Elif(byte == link.ESC_ESC):
                            m.d.comb += value.eq(link.ESC)
                        with m.Else():
                            m.d.sync += bad.eq(1)
                    with m.If(length == buf.depth):
                        m.d.sync += bad.eq(1)
                    with m.Else():
                        m.d.comb += [bw.addr.eq(length), bw.data.eq(value), bw.en.eq(1)]
                        m.d.sync += length.eq(length + 1)
                    with m.If(length < HEADER_BYTES):
                        m.d.sync += hdr.word_select(length[:(HEADER_BYTES - 1).bit_length()], 8).eq(value)
                    m.d.sync += [crc.eq(crc16_update(crc, value)), esc.eq(0)]

            with m.State("EXEC"):
                nargs = flen - 4  # less seq, command and CRC
                words = (nargs - 4) >> (pb.bit_length() - 1)  # WRITE_MEM's
                sp, first, n = arg_u(0, 1), arg_u(1, 2), arg_u(3, 2)  # READ's
                is_read = cmd == link.Cmd.READ
                # the first value and the count, loaded whatever the checks say (a refused request sends no
                # payload and writes nothing), so that their multiplexers select on the command alone
                m.d.sync += [last_seq.eq(seq), seen.eq(1),
                             index.eq(Mux(is_read, first, arg_u(0, 4))),
                             count.eq(Mux(is_read, n, Mux(cmd == link.Cmd.WRITE_MEM, words, arg_u(4, 2)))),
                             src_mem.eq(cmd == link.Cmd.READ_MEM), src_abuf.eq(is_read & (sp == link.Space.ABUF)),
                             src_small.eq(is_read & (sp != link.Space.ABUF)),
                             *(sel.eq(sp == code) for code, sel in sp_small.items()),
                             src_hdr.eq((cmd == link.Cmd.INFO) | (cmd == link.Cmd.STATUS)),
                             is_info.eq(cmd == link.Cmd.INFO)]
                with m.Switch(cmd):
                    with m.Case(link.Cmd.INFO):
                        with m.If(nargs != 0):
                            reply(link.Status.BAD_REQUEST)
                        with m.Else():
                            reply(link.Status.OK)
                    with m.Case(link.Cmd.WRITE_MEM):
                        ok = (nargs >= 4 + pb) & (((nargs - 4) & (pb - 1)) == 0) & \
                            (arg_u(0, 4) + words <= self.mem_depth)
                        with m.If(~ok):
                            reply(link.Status.BAD_REQUEST)
                        with m.Elif(ov.running):
                            reply(link.Status.BUSY)
                        with m.Else():
                            m.d.sync += [nbytes.eq(0), boff.eq(2 + ARG_BYTES[link.Cmd.WRITE_MEM])]
                            m.next = "WR_FETCH"
                    with m.Case(link.Cmd.READ_MEM):
                        ok = (nargs == 6) & (arg_u(0, 4) + arg_u(4, 2) <= self.mem_depth)
                        with m.If(~ok):
                            reply(link.Status.BAD_REQUEST)
                        with m.Elif(ov.running):
                            reply(link.Status.BUSY)
                        with m.Else():
                            reply(link.Status.OK)
                    with m.Case(link.Cmd.WRITE_REG):
                        with m.If((nargs != 5) | (arg_u(0, 1) >= isa.NUM_REGS)):
                            reply(link.Status.BAD_REQUEST)
                        with m.Elif(ov.running):
                            reply(link.Status.BUSY)
                        with m.Else():
                            m.d.comb += ov.host_reg_we.eq(1)
                            reply(link.Status.OK)
                    with m.Case(link.Cmd.READ):
                        ok = Signal()
                        with m.Switch(sp):
                            for code, (_, _, size) in spaces.items():
                                with m.Case(code):
                                    m.d.comb += ok.eq(first + n <= size)
                        with m.If((nargs != 5) | ~ok):
                            reply(link.Status.BAD_REQUEST)
                        with m.Else():
                            reply(link.Status.OK)
                    with m.Case(link.Cmd.START):
                        with m.If(nargs != 8):
                            reply(link.Status.BAD_REQUEST)
                        with m.Elif(seen & (seq == last_seq)):
                            reply(link.Status.OK)  # a retry whose first copy started the program
                        with m.Elif(ov.running):
                            reply(link.Status.BUSY)
                        with m.Else():
                            m.d.sync += [ov.prog_base.eq(arg_u(0, 4)), ov.watchdog_cycles.eq(arg_u(4, 4)),
                                         done_seen.eq(0), runs.eq(runs + 1)]
                            m.next = "START"
                    with m.Case(link.Cmd.STATUS):
                        with m.If(nargs != 0):
                            reply(link.Status.BAD_REQUEST)
                        with m.Else():
                            reply(link.Status.OK)
                    with m.Case(link.Cmd.RESET):
                        with m.If(nargs != 0):
                            reply(link.Status.BAD_REQUEST)
                        with m.Else():
                            m.d.sync += done_seen.eq(0)
                            m.next = "RESET"
                    with m.Default():
                        reply(link.Status.BAD_REQUEST)

            with m.State("START"):
                m.d.comb += ov.start.eq(1)
                reply(link.Status.OK)
            with m.State("RESET"):
                m.d.comb += self.ov_reset.eq(1)
                m.next = "RESET2"
            with m.State("RESET2"):
                m.d.comb += self.ov_reset.eq(1)
                reply(link.Status.OK)

            # WRITE_MEM: gather each word from the buffer, byte by byte, then write it
            with m.State("WR_FETCH"):
                m.d.comb += [br.addr.eq(boff), br.en.eq(1)]
                m.d.sync += boff.eq(boff + 1)
                m.next = "WR_TAKE"
            with m.State("WR_TAKE"):
                m.d.sync += [wword.eq(Cat(wword[8:], br.data)), nbytes.eq(nbytes + 1)]
                m.next = "WR_FETCH"
                with m.If(nbytes == pb - 1):
                    m.next = "WR_WORD"
            with m.State("WR_WORD"):
                m.d.comb += self.mem.we.eq(1)
                with m.If(~self.mem.stall):  # an SDRAM memory is still writing it
                    m.d.sync += [index.eq(index + 1), count.eq(count - 1), nbytes.eq(0)]
                    m.next = "WR_FETCH"
                    with m.If(count == 1):
                        reply(link.Status.OK)

            # the reply: sequence number, status, then the payload of the command
            with m.State("SEND_SEQ"):
                m.d.comb += [payload.valid.eq(1), payload.payload.data.eq(seq)]
                with m.If(payload.ready):
                    m.next = "SEND_STATUS"
            with m.State("SEND_STATUS"):
                has_payload = (status == link.Status.OK) & (src_hdr | ((src_mem | src_abuf | src_small) & (count != 0)))
                m.d.comb += [payload.valid.eq(1), payload.payload.data.eq(status), payload.payload.last.eq(~has_payload)]
                m.d.sync += [stat.eq(Cat(ov.running, done_seen, ov.error, error_code, ov.error_info, ov.error_pc)),
                             ring_hdr.eq(1)]
                with m.If(payload.ready):
                    m.next = "RECV"
                    with m.If(has_payload):
                        m.next = "FETCH"
                    with m.If(has_payload & src_hdr):
                        m.next = "SEND"
            with m.State("FETCH"):  # the address (index) is on the ports: data next cycle (block RAM, registers)
                m.d.comb += self.mem.re.eq(src_mem)
                with m.If(~self.mem.stall):
                    m.next = "CAPTURE"
            with m.State("CAPTURE"), m.If(~self.mem.stall):  # an SDRAM read: until its word is on rdata
                m.d.sync += [small.eq(or_all(Mux(sel, Value.cast(small_value[sp]).as_unsigned(), 0)
                                             for sp, sel in sp_small.items())),
                             ring_small.eq(1), count.eq(count - 1)]
                m.next = "SEND"
            with m.State("SEND"):
                m.d.comb += [payload.valid.eq(1), payload.payload.data.eq(out_byte),
                             payload.payload.last.eq(last_byte & (src_hdr | (count == 0)))]
                with m.If(payload.ready):
                    m.d.sync += [ring_small.eq(ring_small.rotate_left(1)), ring_hdr.eq(ring_hdr.rotate_left(1))]
                    with m.If(src_mem):
                        m.d.sync += ring_mem.eq(ring_mem.rotate_left(1))
                    with m.If(src_abuf):
                        m.d.sync += ring_abuf.eq(ring_abuf.rotate_left(1))
                    with m.If(last_byte):
                        m.d.sync += index.eq(index + 1)
                        m.next = "FETCH"
                        with m.If(src_hdr | (count == 0)):
                            m.next = "RECV"
        return m
