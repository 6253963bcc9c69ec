"""KV buffer: on-chip K and V mantissas plus per-token exponents, per layer and KV head.

The layout (which memory word holds which element) is owned here; the attention engine
and the host address the buffer by coordinates (layer, head, position, chunk), never by
raw memory address.
"""

from __future__ import annotations

from amaranth.hdl import Module, Shape, Signal, unsigned
from amaranth.lib import wiring
from amaranth.lib.memory import Memory
from amaranth.lib.wiring import In, Out

from kvoverlay import numerics

from .widths import address_bits, ceil_div

__all__ = ["EXP_SHAPE", "KvBuffer", "kv_geometry", "kv_host_read_signature", "kv_port_signature"]

#: Shape of one stored exponent: the bfp16 exponent range of :mod:`kvoverlay.numerics`.
EXP_SHAPE = Shape.cast(range(numerics.EXP_MIN, numerics.EXP_MAX + 1))


def kv_geometry(config) -> dict:
    """Derived sizes of the KV buffer for *config*.

    ``lanes`` mantissas per memory word (``config.vector_lanes``), ``row_chunks`` words per
    (layer, head, position) row (``ceil(max_head_dim / lanes)``), ``rows`` rows in all.
    """
    lanes = config.vector_lanes
    row_chunks = ceil_div(config.max_head_dim, lanes)
    rows = config.max_layers * config.max_kv_heads * config.kv_capacity
    return {"lanes": lanes, "row_chunks": row_chunks, "rows": rows}


def _coords(config) -> dict:
    g = kv_geometry(config)
    return {
        "layer": unsigned(address_bits(config.max_layers)),
        "head": unsigned(address_bits(config.max_kv_heads)),
        "pos": unsigned(address_bits(config.kv_capacity)),
        "chunk": unsigned(address_bits(g["row_chunks"])),
    }


def kv_port_signature(config) -> wiring.Signature:
    """The engine's port to the KV buffer (directions as seen by the engine).

    One write port (K or V mantissas of one chunk with a per-lane mask, and the token's
    two exponents) and one read port of latency 1 for a layer and head, with its own position
    and chunk for K (``rd_k_data``, ``rd_ek``) and for V (``rd_v_data``, ``rd_ev``), so that
    the scores of one tile and the values of another stream at the same time.
    """
    g = kv_geometry(config)
    c = _coords(config)
    members = {f"wr_{name}": Out(shape) for name, shape in c.items()}
    members.update({"rd_layer": Out(c["layer"]), "rd_head": Out(c["head"])})
    for side in ("k", "v"):
        members.update({f"rd_{side}_pos": Out(c["pos"]), f"rd_{side}_chunk": Out(c["chunk"])})
    members.update({
        "wr_data": Out(16 * g["lanes"]),
        "wr_mask": Out(g["lanes"]),
        "wr_k_en": Out(1),
        "wr_v_en": Out(1),
        "wr_ek": Out(EXP_SHAPE),
        "wr_ev": Out(EXP_SHAPE),
        "wr_e_en": Out(1),
        "rd_k_data": In(16 * g["lanes"]),
        "rd_v_data": In(16 * g["lanes"]),
        "rd_ek": In(EXP_SHAPE),
        "rd_ev": In(EXP_SHAPE),
        # the value exponent of the K-side position: the score pass tracks the tile's largest value exponent
        # while the value pass reads another tile
        "rd_k_ev": In(EXP_SHAPE),
    })
    return wiring.Signature(members)


def kv_host_read_signature(config) -> wiring.Signature:
    """A second read port, for the host (KV spill, offload, tests); latency 1."""
    g = kv_geometry(config)
    members = {name: Out(shape) for name, shape in _coords(config).items()}
    members.update({"k_data": In(16 * g["lanes"]), "v_data": In(16 * g["lanes"]),
                    "ek": In(EXP_SHAPE), "ev": In(EXP_SHAPE)})
    return wiring.Signature(members)


class KvBuffer(wiring.Component):
    """K and V mantissas (int16) and per-token exponents for every layer, KV head and position.

    Row ``r = (layer * max_kv_heads + head) * kv_capacity + pos`` holds one token of one head:
    ``row_chunks`` words of ``vector_lanes`` mantissas (lane 0 in the low bits) in each of the
    K and V memories, and one word ``{ev, ek}`` in the exponent memory. Lanes beyond the
    head dimension of a write are masked, so they keep their old contents (as the golden
    model's ``kv_k[layer, :h, pos, :d] = ...`` does).

    Parameters
    ----------
    config : OverlayConfig
        Uses ``vector_lanes``, ``max_layers``, ``max_kv_heads``, ``kv_capacity``, ``max_head_dim``.

    Attributes
    ----------
    port : In(kv_port_signature(config))
        The attention engine's write and read port.
    host : In(kv_host_read_signature(config))
        Read port for the host.
    """

    def __init__(self, config):
        self.config = config
        self.geometry = kv_geometry(config)
        super().__init__({"port": In(kv_port_signature(config)), "host": In(kv_host_read_signature(config))})

    def row_index(self, layer, head, pos):
        """Row of (layer, head, pos); works on ints and on Amaranth values."""
        c = self.config
        return (layer * c.max_kv_heads + head) * c.kv_capacity + pos

    def elaborate(self, platform):
        m = Module()
        g = self.geometry
        lanes, rows, chunks = g["lanes"], g["rows"], g["row_chunks"]
        ew = EXP_SHAPE.width
        m.submodules.k_mem = k_mem = Memory(shape=unsigned(16 * lanes), depth=rows * chunks, init=[])
        m.submodules.v_mem = v_mem = Memory(shape=unsigned(16 * lanes), depth=rows * chunks, init=[])
        m.submodules.exp_mem = exp_mem = Memory(shape=unsigned(2 * ew), depth=rows,
                                                init=[(numerics.EXP_MIN & ((1 << ew) - 1)) * ((1 << ew) + 1)] * rows)
        p, h = self.port, self.host

        wr_row = self.row_index(p.wr_layer, p.wr_head, p.wr_pos)
        for mem, en in ((k_mem, p.wr_k_en), (v_mem, p.wr_v_en)):
            w = mem.write_port(granularity=16)
            m.d.comb += [w.addr.eq(wr_row * chunks + p.wr_chunk), w.data.eq(p.wr_data),
                         w.en.eq(p.wr_mask & en.replicate(lanes))]
        ew_port = exp_mem.write_port()
        m.d.comb += [ew_port.addr.eq(wr_row), ew_port.data.eq(p.wr_ev.as_unsigned() << ew | p.wr_ek.as_unsigned()),
                     ew_port.en.eq(p.wr_e_en)]

        def read(mem, row, chunk, data):
            port = mem.read_port()
            m.d.comb += [port.addr.eq(row * chunks + chunk), data.eq(port.data)]

        def read_exp(row, ek, ev):
            port = exp_mem.read_port()
            m.d.comb += [port.addr.eq(row), ek.eq(port.data[:ew].as_signed()), ev.eq(port.data[ew:].as_signed())]

        k_row = self.row_index(p.rd_layer, p.rd_head, p.rd_k_pos)
        v_row = self.row_index(p.rd_layer, p.rd_head, p.rd_v_pos)
        read(k_mem, k_row, p.rd_k_chunk, p.rd_k_data)
        read(v_mem, v_row, p.rd_v_chunk, p.rd_v_data)
        read_exp(k_row, p.rd_ek, p.rd_k_ev)
        read_exp(v_row, Signal(EXP_SHAPE), p.rd_ev)
        host_row = self.row_index(h.layer, h.head, h.pos)
        read(k_mem, host_row, h.chunk, h.k_data)
        read(v_mem, host_row, h.chunk, h.v_data)
        read_exp(host_row, h.ek, h.ev)
        return m

