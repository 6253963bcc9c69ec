"""Cycles of each instruction on its execution unit: every unit's busy-cycle formula, as plain integer arithmetic.

This is the timing half of the ISA declaration. The RTL is built to these formulas (each unit imports the
constants it is built around from here) and the overlay tests assert them exactly against the hardware's busy
counters; the golden model's timing replay (:func:`instr_cycles`) is these formulas plus a dispatch cycle, so its
cycle predictions follow the RTL without importing it.
"""

from __future__ import annotations

from kvoverlay import isa
from kvoverlay import numerics as nx

__all__ = ["BUFFER_PORTS", "DISPATCH_CYCLES", "FRONTEND_INTERVAL", "LOCK_FIELDS", "OWN_PORTS", "PORT_LOCKS", "PORT_PRIORITY", "QUEUE_DEPTH", "RUN_OVERHEAD",
           "folds_peak", "held_ports", "instr_cycles", "lock_conflicts", "peak_record", "port_burst",
           "unit_cycles"]

#: Cycles a queue spends per instruction besides the unit's busy cycles: the executor's dispatch cycle (it starts
#: the unit in its idle state; the unit is busy from the next cycle).
DISPATCH_CYCLES = 1

# ---------------------------------------------------------------- front end
#: Cycles between the front end's dispatches of consecutive instructions (the word's decode registered, then the
#: dispatch cycle, in which the next word is fetched: hw/frontend.py); instruction i can start no earlier than ``FRONTEND_INTERVAL * i`` cycles after the first.
FRONTEND_INTERVAL = 2
#: Entries of each command queue (hw/overlay.py): the front end waits at an instruction whose queue is full, so it
#: dispatches the k-th instruction of a queue only once the (k - QUEUE_DEPTH)-th has started, and
#: FRONTEND_INTERVAL cycles after that start at the earliest (the FIFO's level falls a cycle after the read).
QUEUE_DEPTH = 4
#: Cycles a run counts besides its queues' work: the first instruction's fetch, decode and dispatch (hw/frontend.py
#: registers the word and its decode before the dispatch, so it reaches its queue's executor in the fourth cycle) and
#: the cycle in which the drained queues end the run.
RUN_OVERHEAD = 4

# ---------------------------------------------------------------- memory units
#: LOAD: busy cycles besides one per beat: check, request, memory latency (hw/dram_model.v), final write.
LOAD_OVERHEAD = 6
#: LDROW: cycles from the requantizer's read of an element to its product: the row buffer's read, the selected
#: weight and scale registered, the product registered (hw/ldrow_unit.py).
LDROW_READ_LATENCY = 3
#: The requantizer that REQ and LDROW share (hw/requantizer.py): cycles besides two per element and its read
#: latency: the command, the peak's bit length, the shift computation, the done cycle and the last value's.
REQUANT_OVERHEAD = 5
#: LDROW: besides the row's beats and two per element: check, address, request, latency, passes, exponent; each
#: pass waits ``LDROW_READ_LATENCY - 1`` cycles more for the last product, and the round pass one more for the
#: register between its round-shift and its clip (12 with neither).
LDROW_OVERHEAD = 7 + REQUANT_OVERHEAD + 2 * (LDROW_READ_LATENCY - 1) + 1
#: STORE: besides the beats: check, request, one buffer read per four beats, done.
STORE_OVERHEAD = 3
#: STACC: besides two per accumulator word: check, request, one per beat sent, done.
STACC_OVERHEAD = 3
#: REQ: cycles from the requantizer's read of an accumulator word to the word: the buffer's read, the word
#: registered (hw/req_unit.py).
REQ_READ_LATENCY = 2
#: REQ: registers in the requantizer's round pass: between its round-shift and its clip, and before the packer.
REQ_ROUND_REGISTERS = 2
#: REQ: besides two per element: check and the requantizer's; each pass waits ``REQ_READ_LATENCY - 1`` cycles more
#: for the last word, and the round pass one more per register (6 with neither).
REQ_OVERHEAD = 1 + REQUANT_OVERHEAD + 2 * (REQ_READ_LATENCY - 1) + REQ_ROUND_REGISTERS
#: ARGMAXACC: besides one per accumulator word: check, the last word's compare, the register write with done.
ARGMAXACC_OVERHEAD = 3
#: GEMV engine: products summed per adder-tree stage (one register stage per level of the tree).
GEMV_TREE_FANIN = 4
#: GEMV engine: pipeline stages besides the adder tree's (port word, window and operands, products, products
#: registered, scale limbs, scaled sum), each one cycle beyond one per streamed port word.
GEMV_PIPELINE_STAGES = 6
#: GEMV unit: besides one per weight word and the engine pipeline: check, start, memory latency, accumulate, done.
GEMV_OVERHEAD = 9

# ---------------------------------------------------------------- the memory port
#: Queues whose units the memory port's arbiter serves first when several request it in the same cycle, highest
#: priority first (hw/overlay.py builds its arbiter in this order).
PORT_PRIORITY = ("store", "load", "compute")

# ---------------------------------------------------------------- the buffer ports (port locks)
#: The on-chip buffers' ports: one write and one read port on the activation buffer, one of each on the accumulator
#: buffer (hw/state.py), shared by the three queues so that each buffer maps to one copy of block RAM.
BUFFER_PORTS = ("abuf_r", "abuf_w", "acc_r", "acc_w")
#: The buffer ports each opcode's unit uses while the instruction runs (kvoverlay.access lists its ranges). An
#: instruction holds these ports from its dispatch to its completion: it does not start while an instruction of
#: another queue holds one of them, and of queues that could start conflicting instructions in the same cycle the
#: first of :data:`PORT_PRIORITY` does. Within a queue one instruction runs at a time, so only the ports that two
#: queues share ever wait (abuf_w: load, compute and store's ATTN; abuf_r, acc_r and acc_w: compute and store).
#: A port of :data:`OWN_PORTS` is its unit's alone and never locks.
PORT_LOCKS = {
    "LOAD": ("abuf_w",), "LDROW": ("abuf_w",),
    "STORE": ("abuf_r",), "STACC": ("acc_r",), "ARGMAXACC": ("acc_r",),
    "GEMV": ("acc_r", "acc_w"), "REQ": ("acc_r", "abuf_w"),
    **dict.fromkeys(("VADD", "VMUL", "VSCALE", "NORM", "ACT", "ROPE"), ("abuf_r", "abuf_w")),
    "ARGMAX": ("abuf_r",), "KVAPPEND": ("abuf_r",), "ATTN": ("abuf_r", "abuf_w", "acc_w"),
    "NOP": (), "END": (),
}


#: Buffer ports an opcode's unit has of its own, shared with no other queue's unit: GEMV reads its input vector through
#: the compute queue's second activation-buffer read port, which only the compute queue's units use (hw/state.py;
#: the attention engine reads its next word from a copy of a few lanes), so that the store queue's attention engine
#: reads the buffer while the weights stream.
OWN_PORTS = {"GEMV": ("abuf_r",)}
#: A port of :data:`PORT_LOCKS` that its opcode does not hold while a field of the instruction has a value,
#: ``(field, value)``: a GEMV that overwrites its accumulators (``accumulate=0``) never reads them, so the store
#: queue's ARGMAXACC or STACC of the LM head's previous tile runs beside the next tile's GEMV; an ATTN without
#: statistics (``stats=ATTN_NO_STATS``) never writes them, so it runs beside any GEMV.
LOCK_FIELDS = {("GEMV", "acc_r"): ("accumulate", 0), ("ATTN", "acc_w"): ("stats", isa.ATTN_NO_STATS)}


def held_ports(ins: isa.Instr) -> tuple[str, ...]:
    """The buffer ports instruction *ins* holds while it runs (:data:`PORT_LOCKS`, less those of
    :data:`LOCK_FIELDS` whose field has its value)."""
    return tuple(k for k in PORT_LOCKS[ins.op]
                 if (f := LOCK_FIELDS.get((ins.op, k))) is None or ins.fields.get(f[0], 0) != f[1])


def lock_conflicts(a: tuple[str, ...], b: tuple[str, ...]) -> bool:
    """Whether instructions of different queues that hold buffer ports *a* and *b* (:func:`held_ports`) cannot run
    at once."""
    return not set(a).isdisjoint(b)

#: Cycles between the memory's acceptance of a read burst and its first data beat's register (hw/dram_model.v).
PORT_READ_LATENCY = 2
#: Registers between a writer's beat and the memory (hw/dram.py's arbiter): a write burst's last beat reaches the
#: memory, and frees it for the next burst, this many cycles after the writer hands it over.
PORT_WRITE_REGISTERS = 1
#: Cycles from an instruction's dispatch to the first cycle its unit offers its burst request: the dispatch, then
#: the unit's states before REQUEST (LOAD, STORE and STACC: CHECK; LDROW: CHECK, ADDRESS, RANGE; GEMV: CHECK,
#: RANGE, then the request beside the engine's start).
PORT_REQUEST_OFFSET = {"LOAD": 2, "STORE": 2, "STACC": 2, "LDROW": 4, "GEMV": 3}


def port_burst(config, ins: isa.Instr) -> tuple[int, int] | None:
    """The one burst *ins* makes on the memory port, as ``(offset, hold)``, or ``None`` for an instruction without.

    *offset* counts cycles from the instruction's dispatch to its request (:data:`PORT_REQUEST_OFFSET`); *hold*
    from the cycle the memory accepts it to the first cycle the memory accepts the next: a read's beats, its
    latency and the cycle its last beat frees the memory in; a write's beats at the unit's pace (STORE: a buffer read
    per four beats; STACC: two cycles per accumulator word and one per beat), :data:`PORT_WRITE_REGISTERS` and that
    cycle. The memory serves one
    burst at a time, so a request offered while another holds the port waits, and the whole unit with it: its
    instruction ends that many cycles later than :func:`unit_cycles` says.
    """
    op = ins.op
    if op not in PORT_REQUEST_OFFSET:
        return None
    if op == "LOAD":
        words = _ceil(nx.vector_record_size(ins.fields["len"]), config.port_bytes)
    elif op == "LDROW":
        words = _row_words(config, ins)
    elif op == "GEMV":
        words = gemv_tile_words(config, ins)
    elif op == "STORE":
        beats = _ceil(nx.vector_record_size(ins.fields["len"]), config.port_bytes)
        return PORT_REQUEST_OFFSET[op], beats + _ceil(beats, 4) + 1 + PORT_WRITE_REGISTERS
    else:
        n = ins.fields["len"]
        return PORT_REQUEST_OFFSET[op], 2 * n + _ceil(8 * n, config.port_bytes) + 1 + PORT_WRITE_REGISTERS
    return PORT_REQUEST_OFFSET[op], words + PORT_READ_LATENCY + 1


# ---------------------------------------------------------------- vector unit
#: Pipeline stages between issuing a chunk's reads and its result leaving the last stage (issue, lane select, the
#: chunk held three cycles while its gates are looked up from its registered lanes (hw/lut.py: the table's address,
#: its read and the product, then the rounding and add), two elementwise stages, write-back).
VECTOR_PIPE_DEPTH = 7
#: Cycles from taking an instruction to its first issue: the decoder's registered element count (DECODE; ROPE's is
#: a product in logic) and the set-up (SETUP, where a set-up fault ends the instruction).
VECTOR_SETUP_CYCLES = 2
#: NORM's statistics pass: cycles from its last issue until the sums take the last chunk (its sums over the lanes
#: registered a cycle after the elementwise stage S2a, where its squares come from the lane multipliers), the scalar
#: sequence starting in the last of them.
NORM_STATS_DRAIN = 5
#: The same for ROPE's own issue and product stages (its products registered before their alignment and sum).
ROPE_PIPE_DEPTH = 4
#: Quotient (and root) bits per cycle of NORM's divider and square root.
SCALAR_BITS_PER_CYCLE = 2
#: NORM: left shifts of eps beyond this are folded into the exponent (the mean square, below 2**63, then only touches
#: bits that numerics.scalar rounds away), so the mean square plus eps has at most NORM_TOTAL_BITS bits.
NORM_EPS_SHIFT_CAP = 63 + nx.SCALAR_BITS
NORM_TOTAL_BITS = 16 + NORM_EPS_SHIFT_CAP + 1
#: NORM's rounding of that total to SCALAR_BITS bits is staged: NORM_SCALAR_STEPS cycles, each moving the total
#: right by NORM_SCALAR_STEP bits while it is wider than SCALAR_BITS + NORM_SCALAR_STEP (bits that only the round
#: half up's carry could reach stay), then one round-shift of at most NORM_SCALAR_STEP bits.
NORM_SCALAR_STEP = 16
NORM_SCALAR_STEPS = -(-(NORM_TOTAL_BITS - nx.SCALAR_BITS - NORM_SCALAR_STEP) // NORM_SCALAR_STEP)
#: NORM's scalar sequence: states that only register (hw/vector_unit.py, NormScalar): the head shift, the scaled sum of
#: squares and log2(n) before the first step (PREP); eps aligned before its add (EPS_ALIGN); the total's bit length
#: before its round-shift (SCALAR_BITS).
NORM_SCALAR_REGISTERS = 3


def argmax_tree_levels(config) -> int:
    """Levels of ARGMAX's first-largest tree over a chunk's ``vector_lanes`` lanes, each ending in a register."""
    return (config.vector_lanes - 1).bit_length()


def argmax_drain(config) -> int:
    """ARGMAX: cycles from its last issue until the running best takes the last chunk (the lane select, S2, and
    :func:`argmax_tree_levels`)."""
    return 2 + argmax_tree_levels(config)


# ---------------------------------------------------------------- attention engine
#: Cycles of a KVAPPEND's or ATTN's decode, a rejected one's included (hw/attention.py AttnDecoder: the fields; the
#: products and compares; the buffer ranges; ``q_heads % kv_heads`` two quotient bits a cycle beside them; the fault).
ATTN_DECODE_CYCLES = 5
#: Cycles of the softmax reciprocal's restoring divider (one quotient bit per cycle): the sum l is at least
#: GATE_ONE (the running max's own p), so ``(1 << ATTN_RECIP_BITS) // l`` has only this many bits and the
#: divider skips the leading zeros (hw/attention.py, attention_widths).
ATTN_DIVIDER_CYCLES = nx.ATTN_RECIP_BITS - (nx.GATE_ONE.bit_length() - 1) + 1
#: The stage of ATTN's score pipeline that stores a score, counted from its chunk's issue (hw/attention.py
#: ScoreStage: operands and products, the dot product, the rounding shift, the saturation and store).
ATTN_SCORE_LATENCY = 4
#: Register stages of ATTN's 2^-x (hw/attention.py Exp2Neg: the product by log2(e), the table's registered read,
#: the block RAM's word registered, the interpolation, the shift).
ATTN_EXP2_LATENCY = 5
#: Cycles from a value chunk's issue to its p (the score difference's register, then 2^-x).
ATTN_P_LATENCY = 1 + ATTN_EXP2_LATENCY
#: Drain cycles after a head's last value chunk: its p, then the value stage's product, term round-shift, two
#: rescale stages (used by a tile's first position only, but in every chunk's path) and the add.
ATTN_VALUE_DRAIN = ATTN_P_LATENCY + 5
#: Least drain cycles between an ATTN tile's last value chunk and the next tile's step: the next tile's first
#: position reads, for its rescale, the accumulator words this tile's last chunks write (hw/attention.py ValueStage:
#: the old word read at p, added four stages later).
ATTN_TILE_DRAIN = 3
#: Chunks per position from which a tile's step follows its last value chunk at once (the rescale reads a word
#: ATTN_TILE_DRAIN + 2 cycles after the issue of the chunk that last wrote it), and the score pass starts the tile
#: after next in a tile's last ATTN_AHEAD_WINDOW value chunks (so that its first store follows the next step).
ATTN_AHEAD_CHUNKS = 4
ATTN_AHEAD_WINDOW = ATTN_SCORE_LATENCY - 1
#: Drain cycles of ATTN's output passes after their last slot (hw/attention.py OutputStage: the scratch read, the
#: slot's lanes, the alignment into the normalizer, its registered exponent; the write pass's clip after the
#: normalizer's mantissa register and the registered write, one more).
ATTN_OUTPUT_PEAK_DRAIN = 4
ATTN_OUTPUT_WRITE_DRAIN = ATTN_OUTPUT_PEAK_DRAIN + 1
#: Cycles a head's finish spends after issuing its last output element (one element per cycle through a select and
#: round stage and a multiply stage, then the scratch write).
ATTN_FINISH_PIPELINE = 2


def attn_output_lanes(config) -> int:
    """Elements per cycle of ATTN's output passes (peak and write): half the vector lanes, which halves the
    normalizer and alignment shifters for a pass of ``q_heads * head_dim / lanes`` cycles, twice per ATTN."""
    return max(1, config.vector_lanes // 2)


def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def load_cycles(config, length: int) -> int:
    """One uncontended LOAD of *length* elements (``vector_record_size`` bytes, in port beats)."""
    return _ceil(nx.vector_record_size(length), config.port_bytes) + LOAD_OVERHEAD


def _row_words(config, ins: isa.Instr) -> int:
    fmt, group = isa.weight_layout(ins)
    return nx.row_stride(ins.fields["cols"], fmt, group, config.port_bytes) // config.port_bytes


def ldrow_cycles(config, ins: isa.Instr) -> int:
    """One uncontended LDROW."""
    return _row_words(config, ins) + 2 * ins.fields["cols"] + LDROW_OVERHEAD


def store_cycles(config, length: int) -> int:
    """One uncontended STORE of *length* elements."""
    beats = _ceil(nx.vector_record_size(length), config.port_bytes)
    return beats + _ceil(beats, 4) + STORE_OVERHEAD


def stacc_cycles(config, length: int) -> int:
    """One uncontended STACC of *length* accumulator words."""
    return 2 * length + _ceil(8 * length, config.port_bytes) + STACC_OVERHEAD


def req_cycles(config, length: int, fold: int = 0, acc: int = 0) -> int:
    """One REQ of *length* accumulator words from word *acc*: a pass for the peak, a pass to round; with *fold* the
    round pass alone (the peak is the GEMV unit's record, :func:`peak_record`), its read latency waited for once.

    A pass reads an accumulator-buffer row of ``config.acc_lanes`` words per cycle when *acc* starts a row, and one
    word per cycle otherwise (hw/req_unit.py)."""
    lanes = config.acc_lanes
    steps = -(-length // lanes) if acc % lanes == 0 else length
    if fold:
        return steps + REQ_OVERHEAD - REQ_READ_LATENCY
    return 2 * steps + REQ_OVERHEAD if length else 3


def peak_record(record: tuple[int, int] | None, ins: isa.Instr) -> tuple[int, int] | None:
    """The GEMV unit's peak record after *ins*, given the one before (*record*; ``None`` at reset).

    A GEMV records ``(acc, rows)`` and, in hardware, the OR of the magnitudes of the words it writes there (what
    REQ's peak pass would find; hw/gemv_unit.py); an ATTN that writes its statistics into the recorded range makes
    the record stale (``None``); nothing else writes accumulators. A REQ with ``fold=1`` takes that peak instead
    of its peak pass, and is legal only while the record is ``(acc, len)`` of the REQ (else a SHAPE fault). The
    golden model and the compiler's ``fold_peaks`` pass both follow this rule; the overlay builds it. Only a write
    into the range counts because the ATTN runs in the store queue, beside the GEMVs: there program order and time
    order agree where the ranges meet (a token orders the two writers), and nowhere else matters.
    """
    if ins.op == "GEMV":
        return ins.fields["acc"], ins.fields["rows"]
    if ins.op == "ATTN" and record is not None and ins.fields["stats"] != isa.ATTN_NO_STATS:
        lo, n = ins.fields["stats"], 2 * ins.fields["q_heads"]
        if lo < record[0] + record[1] and record[0] < lo + n:
            return None
    return record


def folds_peak(record: tuple[int, int] | None, ins: isa.Instr) -> bool:
    """Whether REQ *ins* may take the peak of *record* (:func:`peak_record`): the REQ's range is the record's."""
    return ins.op == "REQ" and record == (ins.fields["acc"], ins.fields["len"])


def argmaxacc_cycles(config, length: int) -> int:
    """One ARGMAXACC of *length* (at least 1) accumulator words: one word per cycle."""
    return length + ARGMAXACC_OVERHEAD


def _tree_stages(terms: int) -> int:
    stages = 0
    while terms > 1:
        terms, stages = _ceil(terms, GEMV_TREE_FANIN), stages + 1
    return stages


def gemv_tree_stages(config) -> int:
    """Register stages of the GEMV engine's adder tree over its ``2 * port_bytes`` products."""
    return _tree_stages(2 * config.port_bytes)


def gemv_narrow_scales(config) -> int:
    """Group scales the GEMV engine applies inside one window: as many groups of ``config.min_group`` weights (the
    narrowest it is built for) as the widest window of the built formats holds (one port word of weights), or 1 if
    no group can be narrower than it."""
    widest = max(config.weights_per_cycle(fmt) for fmt in config.weight_formats)
    return max(1, widest // config.min_group)


def gemv_narrow_stages(config, fmt: str, group: int) -> int:
    """Extra pipeline stages of a GEMV tile whose groups are narrower than one window of *fmt* weights: the
    adder tree over the :func:`gemv_narrow_scales` scaled group sums; 0 for window-sized groups."""
    if group >= config.weights_per_cycle(fmt):
        return 0
    return _tree_stages(gemv_narrow_scales(config))


#: Accumulator words the GEMV engine writes per cycle as it drains a block of packed rows (hw/gemv.py): a block of
#: ``b`` rows finishes its ``b`` rows at once, then writes them two by two (two write ports of the accumulator
#: buffer) in ``b / 2`` cycles while the next block streams. Rows narrower than a beat finish more than one row
#: per beat, so one write per cycle would cap the GEMV at a row per cycle, where a padded row already is.
GEMV_PACKED_WRITES = 2
#: The GEMV engine builds packed rows (GEMV ``packed=1``) where one window (a port word of weights) holds at
#: least this many groups of ``config.min_group``: the blocks' accumulators, the second accumulator write port and
#: x's replication per group are not spent on the small ports (tiny, micro and ulx3s hold two at most, where a
#: block of two rows saves at most a beat in three).
GEMV_PACK_MIN_GROUPS = 4


def gemv_scale_words(config) -> int:
    """Port words of the GEMV engine's scale memory: a row's headers (at most ``act_buffer_words / GROUP_BASE``),
    or a block of packed rows' (which must fit: :func:`gemv_pack_refusal`)."""
    return max(1, (config.act_buffer_words // isa.GROUP_BASE) * 2 // config.port_bytes)


def gemv_packs(config) -> bool:
    """Whether the GEMV engine is built for packed rows (:data:`GEMV_PACK_MIN_GROUPS`)."""
    return gemv_narrow_scales(config) >= GEMV_PACK_MIN_GROUPS


def gemv_pack_refusal(config, cols: int, fmt: str, group: int) -> str | None:
    """Why a GEMV tile of *cols* weights of *fmt* in groups of *group* cannot stream packed rows on *config*
    (a GROUP fault), or ``None`` where it can."""
    if not gemv_packs(config):
        return f"{config.name}'s GEMV engine is not built for packed rows (fewer than {GEMV_PACK_MIN_GROUPS} groups " \
               "of min_group per window)"
    block, sb, wb = nx.packed_block(cols, fmt, group, config.port_bytes)
    if not block:
        return f"groups of {group} {fmt} weights fill a window: rows do not pack"
    if sb > gemv_scale_words(config):
        return f"a block's {sb} scale words exceed the engine's {gemv_scale_words(config)}"
    if gemv_drain_cycles(block) > sb + wb:
        return f"a block of {block} rows streams in {sb + wb} words, fewer than the {gemv_drain_cycles(block)} " \
               "cycles its accumulators take to drain"
    return None


def gemv_packs_rows(config, rows: int, cols: int, fmt: str, group: int) -> bool:
    """Whether a GEMV's *rows* x *cols* matrix goes as packed rows (the compiler's placement, the projection): its
    rows are narrower than a port beat (wider ones stay row records), the engine streams them packed
    (:func:`gemv_pack_refusal`), and in fewer words."""
    pb = config.port_bytes
    if nx.row_stride(cols, fmt, group, 1) >= pb or gemv_pack_refusal(config, cols, fmt, group):
        return False
    return nx.matrix_bytes(rows, cols, fmt, group, pb, True) < nx.matrix_bytes(rows, cols, fmt, group, pb)


def gemv_drain_cycles(block: int) -> int:
    """Cycles the GEMV engine writes one block of *block* packed rows' accumulators in."""
    return _ceil(block, GEMV_PACKED_WRITES)


def gemv_tile_words(config, ins: isa.Instr) -> int:
    """Port words a GEMV streams: its rows' records, or its blocks of packed rows (``packed=1``)."""
    fmt, group = isa.weight_layout(ins)
    packed = ins.fields.get("packed", 0)
    return nx.matrix_bytes(ins.fields["rows"], ins.fields["cols"], fmt, group, config.port_bytes, packed) \
        // config.port_bytes


def gemv_packed_cycles(config, rows: int, cols: int, fmt: str, group: int) -> int:
    """Cycles the GEMV engine's ``busy`` stays high for packed rows: a word per cycle, the pipeline to the group
    scales' products (the narrow groups' adder tree is not passed: each group's product is its row's), then the
    last block's drain."""
    block, sb, wb = nx.packed_block(cols, fmt, group, config.port_bytes)
    return _ceil(rows, block) * (sb + wb) + GEMV_PIPELINE_STAGES + gemv_tree_stages(config) + gemv_drain_cycles(block)


def gemv_engine_cycles(config, rows: int, words_per_row: int, fmt: str = "int8", group: int | None = None) -> int:
    """Cycles the GEMV engine's ``busy`` stays high: one per port word plus the pipeline.

    Exact for every weight format: *words_per_row* is ``numerics.row_stride(cols, fmt, group, port_bytes) //
    port_bytes``, so the format enters through the row-record length, and through :func:`gemv_narrow_stages` when
    its *group* is narrower than one window (``None``: window-sized).
    """
    narrow = 0 if group is None else gemv_narrow_stages(config, fmt, group)
    return rows * words_per_row + GEMV_PIPELINE_STAGES + gemv_tree_stages(config) + narrow


def gemv_late_window(config, cols: int, fmt: str, group: int) -> bool:
    """Whether a row record's weights end in a partial window (*cols* not a multiple of a window) that lies in the
    record's last word past a header offset: the GEMV engine takes it in the next row's first slot, the last
    row's in one slot more at the tile's end (hw/gemv.py's ``late_window``)."""
    pb = config.port_bytes
    off, tail = (cols // group) * 2 % pb, cols * nx.WEIGHT_FORMATS[fmt] // 8 % pb
    return off != 0 and tail != 0 and off + tail <= pb


def gemv_cycles(config, ins: isa.Instr) -> int:
    """One uncontended GEMV instruction on the GEMV unit."""
    fmt, group = isa.weight_layout(ins)
    if ins.fields.get("packed", 0):
        return gemv_packed_cycles(config, ins.fields["rows"], ins.fields["cols"], fmt, group) + GEMV_OVERHEAD
    late = gemv_late_window(config, ins.fields["cols"], fmt, group)
    return gemv_engine_cycles(config, ins.fields["rows"], _row_words(config, ins), fmt, group) + late + GEMV_OVERHEAD


def divider_cycles(bits: int, bits_per_cycle: int) -> int:
    """One restoring division of a *bits*-bit numerator."""
    return _ceil(bits, bits_per_cycle)


def isqrt_cycles(root_width: int, bits_per_cycle: int) -> int:
    """One digit-by-digit square root yielding *root_width* bits."""
    return _ceil(root_width, bits_per_cycle)


def multiplier_cycles(b_width: int, bits_per_cycle: int) -> int:
    """One shift-and-add product over a *b_width*-bit multiplier."""
    return _ceil(b_width, bits_per_cycle)


#: Bits of NORM's ``r = 2**RSQRT_NUM // isqrt(m << RSQRT_FRAC)``: m >= 2**(SCALAR_BITS - 1), so the root is at
#: least 2**23 and r at most 2**25.
NORM_RECIP_BITS = nx.RSQRT_NUM - (nx.RSQRT_FRAC + nx.SCALAR_BITS - 1) // 2 + 1


def norm_widths(config) -> dict:
    """Operand widths of NORM's scalar sequence (they size the divider and square root, hence its cycles)."""
    nb = config.act_buffer_words.bit_length()
    sum_w = 16 + nb  # |sum x| <= n * 2**15
    sq_w = 31 + nb  # sum x*x <= n * 2**30
    return {
        "n": nb, "sum": sum_w, "sq": sq_w,
        "ss_div": nb + sq_w,  # n * Q - S * S
        "ms_div": sq_w + nx.NORM_MS_FRAC,  # ss << NORM_MS_FRAC
        "recip_div": nx.RSQRT_NUM + 1,  # 2**RSQRT_NUM
        "mean_div": sum_w + 26,  # |S * r|
        "root": (nx.RSQRT_FRAC + nx.SCALAR_BITS + 2) // 2,  # isqrt of (m << RSQRT_FRAC), m < 2**25
        # LayerNorm's products n * Q, |S| * |S| and |S| * r on the shift-and-add multiplier
        "mul_a": max(sq_w, sum_w), "mul_b": max(nb, sum_w, NORM_RECIP_BITS),
    }


#: Opcodes of the vector unit.
VECTOR_OPS = ("VADD", "VMUL", "VSCALE", "ACT", "NORM", "ROPE", "ARGMAX")


def vector_cycles(op: str, fields: dict, config) -> int:
    """Cycles the vector unit's ``busy`` stays high for one instruction (error-free run), its ``done`` cycle included.

    Chunk ops: :data:`VECTOR_SETUP_CYCLES`, ``2 * ceil(len / V)`` issue cycles (peak and write passes back to back),
    :data:`VECTOR_PIPE_DEPTH` drain cycles, one finishing cycle and the ``done`` cycle. NORM adds a statistics pass
    (``ceil(len / V) + NORM_STATS_DRAIN + 1``) and the scalar sequence (LayerNorm's three products on a shift-and-add multiplier; the
    rounding of the mean square plus eps in :data:`NORM_SCALAR_STEPS` steps); over each head (``head_dim``), three
    rounds over the heads (statistics and scalars, peak passes, write passes).
    ROPE issues one pair per two cycles per pass
    and drains :data:`ROPE_PIPE_DEPTH` + 1. ARGMAX is one pass, drained in :func:`argmax_drain`.
    """
    V = config.vector_lanes
    done = 1
    if op in ("VADD", "VMUL", "VSCALE", "ACT"):
        return VECTOR_SETUP_CYCLES + 2 * _ceil(fields["len"], V) + VECTOR_PIPE_DEPTH + 1 + done
    if op == "ARGMAX":
        return VECTOR_SETUP_CYCLES + _ceil(fields["len"], V) + argmax_drain(config) + 1 + done
    if op == "ROPE":
        return VECTOR_SETUP_CYCLES + 2 * fields["heads"] * fields["head_dim"] + ROPE_PIPE_DEPTH + 1 + 1 + done
    if op == "NORM":
        w = norm_widths(config)
        layer = isa.ENUMS["norm"][fields["kind"]] == "layer"
        nch = _ceil(fields["len"], V)
        # each divider/isqrt step: a start cycle, its iterations, a cycle that sees done
        k = SCALAR_BITS_PER_CYCLE
        steps = [isqrt_cycles(w["root"], k)] + [divider_cycles(w[name], k) for name in
                                                 ["ms_div", "recip_div"] + (["ss_div", "mean_div"] if layer else [])]
        if layer:  # n * Q, S * S and S * r
            steps += [multiplier_cycles(w["mul_b"], k)] * 3
        # + eps alignment, the staged scalar rounding, pass set-up
        scalar = sum(c + 2 for c in steps) + 1 + NORM_SCALAR_STEPS + 1 + 1 + NORM_SCALAR_REGISTERS
        if fields.get("head_dim"):
            # over each head, three rounds: per head a statistics pass, the scalar sequence and its ALIGN state;
            # then per head its scalars loaded and a peak pass, drained; then the same with a write pass
            # a head of 2**k elements takes its mean square by a shift (one state) instead of the division
            hd, n = fields["head_dim"], fields["len"]
            shift = divider_cycles(w["ms_div"], k) + 2 - 1
            heads = [min(hd, n - lo) for lo in range(0, n, hd)]
            return sum(_ceil(h, V) + scalar - (shift if h & (h - 1) == 0 else 0) + NORM_STATS_DRAIN + 1
                       + 2 * (_ceil(h, V) + VECTOR_PIPE_DEPTH + 4) for h in heads) + VECTOR_SETUP_CYCLES + done
        return VECTOR_SETUP_CYCLES + nch + NORM_STATS_DRAIN + 1 + scalar + 2 * nch + VECTOR_PIPE_DEPTH + 1 + done
    raise ValueError(f"{op!r} is not a vector-unit opcode; expected one of {', '.join(VECTOR_OPS)}")


def kvappend_cycles(config, heads: int, head_dim: int) -> int:
    """Busy cycles of a legal KVAPPEND: decode (ATTN_DECODE_CYCLES), a K pass and a V pass of ``ceil(head_dim /
    lanes)`` chunks per head (at least one, which writes the exponents), one drain cycle, the done cycle."""
    return ATTN_DECODE_CYCLES + 2 * heads * max(1, _ceil(head_dim, config.vector_lanes)) + 1 + 1


def _attn_head(nch: int, sizes: list) -> int:
    """Cycles of one ATTN head from its first tile's step to the end of its drain (hw/attention.py's sequencer).

    Tile i's step s_i is followed by its ``N_i = n_i * nch`` value chunks (the last at t_i = s_i + N_i). Tile i's
    scores, started at S_i, are stored by R_i = S_i + N_i + ATTN_SCORE_LATENCY, and its step needs them. Tile
    i+1's scores start at the step of tile i, unless already started: with positions of at least ATTN_AHEAD_CHUNKS chunks (and
    tiles of at least 2 positions) the score pass starts tile i+2 in tile i's last ATTN_AHEAD_WINDOW value chunks when it is free,
    and tile i+1's step follows t_i at once (``s_(i+1) = max(t_i + 1, R_(i+1))``); otherwise it follows
    ATTN_TILE_DRAIN cycles later. The head's last tile drains ATTN_VALUE_DRAIN."""
    fast = nch >= ATTN_AHEAD_CHUNKS and sizes[0] >= 2
    n = [k * nch for k in sizes]
    start = [None] * len(sizes)  # S_i relative to the first step
    s = t = 0
    for i in range(len(sizes)):
        if i:
            ready = start[i] + n[i] + ATTN_SCORE_LATENCY
            s = max(t + 1 if fast else t + 1 + ATTN_TILE_DRAIN, ready)
        if i + 1 < len(sizes) and start[i + 1] is None:
            start[i + 1] = s
        t = s + n[i]
        early = max(t - (ATTN_AHEAD_WINDOW - 1), start[i + 1] + n[i + 1]) if i + 2 < len(sizes) else t + 1
        if fast and early <= t:
            start[i + 2] = early
    return t + 1 + ATTN_VALUE_DRAIN


def attn_cycles(config, q_heads: int, head_dim: int, kv_len: int, *, overflow: bool = False) -> int:
    """Busy cycles of a legal ATTN.

    Per head, with tiles of n_0, n_1, ... positions and ``c = ceil(head_dim / lanes)`` chunks: the first tile's
    score pass ``n_0 * c`` + ATTN_SCORE_LATENCY drain; then the tiles' steps and value passes with the later tiles'
    scores beside them (:func:`_attn_head`). A head's finish (1 + ATTN_DIVIDER_CYCLES + head_dim output elements,
    one per cycle, + ATTN_FINISH_PIPELINE) runs beside the next head's first score pass, whose max step waits for
    it: that phase takes ``max(n_0 * c + ATTN_SCORE_LATENCY, finish + 1)``. After the last head: its finish + 1, a
    peak pass and a write pass over the ``ceil(q_heads * head_dim / attn_output_lanes)`` output slots
    (ATTN_OUTPUT_PEAK_DRAIN and ATTN_OUTPUT_WRITE_DRAIN after them) and a normalization step; plus the decode
    (ATTN_DECODE_CYCLES) and done cycles. With *overflow* (output exponent above EXP_MAX, an OVERFLOW fault found at the normalization
    step) the write pass is skipped.
    """
    V, T = config.vector_lanes, config.attn_tile
    nch = _ceil(head_dim, V)
    sizes = [min(T, kv_len - lo) for lo in range(0, kv_len, T)]
    head = _attn_head(nch, sizes)
    total, finish = ATTN_DECODE_CYCLES, 0
    for h in range(q_heads):
        first_scores = sizes[0] * nch + ATTN_SCORE_LATENCY
        total += (max(first_scores, finish + 1) if h else first_scores) + head
        finish = 1 + ATTN_DIVIDER_CYCLES + head_dim + ATTN_FINISH_PIPELINE
    nw = _ceil(q_heads * head_dim, attn_output_lanes(config))
    return (total + finish + 1 + (nw + ATTN_OUTPUT_PEAK_DRAIN) + 1
            + (0 if overflow else nw + ATTN_OUTPUT_WRITE_DRAIN) + 1)


#: Each opcode's busy-cycle formula, as ``(config, instruction, kv_len) -> cycles``.
_UNIT_CYCLES = {
    "LOAD": lambda c, ins, kv: load_cycles(c, ins.fields["len"]),
    "LDROW": lambda c, ins, kv: ldrow_cycles(c, ins),
    "STORE": lambda c, ins, kv: store_cycles(c, ins.fields["len"]),
    "STACC": lambda c, ins, kv: stacc_cycles(c, ins.fields["len"]),
    "GEMV": lambda c, ins, kv: gemv_cycles(c, ins),
    "REQ": lambda c, ins, kv: req_cycles(c, ins.fields["len"], ins.fields.get("fold", 0),
                                        ins.fields.get("acc", 0)),
    "ARGMAXACC": lambda c, ins, kv: argmaxacc_cycles(c, ins.fields["len"]),
    "KVAPPEND": lambda c, ins, kv: kvappend_cycles(c, ins.fields["heads"], ins.fields["head_dim"]),
    "ATTN": lambda c, ins, kv: attn_cycles(c, ins.fields["q_heads"], ins.fields["head_dim"], kv),
    **{op: (lambda c, ins, kv: vector_cycles(ins.op, ins.fields, c)) for op in VECTOR_OPS},
    "NOP": lambda c, ins, kv: 1,
    "END": lambda c, ins, kv: 0,
}


def unit_cycles(config, ins: isa.Instr, kv_len: int = 0) -> int:
    """Cycles the queue is busy with *ins* on its unit, uncontended (no port or token stalls): what the overlay's
    ``busy_<queue>`` counter adds. ATTN needs the KV length."""
    formula = _UNIT_CYCLES.get(ins.op)
    if formula is None:
        raise ValueError(f"{ins.op!r} has no execution unit")
    return formula(config, ins, kv_len)


def instr_cycles(ins: isa.Instr, config, kv_len: int = 0) -> int:
    """Cycles one instruction occupies its queue in the golden model's timing replay: the unit's busy cycles plus
    the queue's dispatch cycle; END takes one cycle."""
    if ins.op == "END":
        return 1
    return unit_cycles(config, ins, kv_len) + DISPATCH_CYCLES
