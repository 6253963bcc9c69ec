"""The overlay ISA, declared once.

Every instruction is one 128-bit little-endian word. Bits [0:6) hold the
opcode and bits [6:10) the four dependency-token flags; each opcode then packs
its fields, in the order declared in :data:`OPCODES`, from bit 10 upwards.
All bits above the last field are reserved and must be zero.

The encoder, the decoder, the text assembler, the golden model, the Amaranth
decoder's layouts and ``docs/isa.md`` all derive from this table; nothing else
restates a field. This module imports nothing but the standard library.

Queues follow decoupled access/execute (VTA): the front end dispatches each
instruction to the *load*, *compute* or *store* queue (the store queue also
runs the attention engine's KVAPPEND and ATTN, so that attention works beside
the compute queue's weight stream). ``pop_prev`` / ``push_prev`` talk to the previous queue in the chain load → compute → store,
``pop_next`` / ``push_next`` to the next one. A flag that names a queue that
does not exist (``*_prev`` on a load, ``*_next`` on a store) is reserved.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from .config import GROUP_BASE, KV_BASE_BITS

__all__ = [
    "ATTN_NO_STATS",
    "BY_CODE",
    "BY_NAME",
    "DEP_FLAGS",
    "DRAM_UNIT",
    "ENUMS",
    "INSN_BITS",
    "INSN_BYTES",
    "NORM_MAX_HEADS",
    "NUM_EREGS",
    "NUM_REGS",
    "OPCODES",
    "QUEUES",
    "Field",
    "Instr",
    "IsaError",
    "OpFormat",
    "assemble",
    "decode",
    "decode_program",
    "disassemble",
    "encode",
    "encode_program",
    "render_markdown",
    "weight_layout",
]

INSN_BITS = 128
INSN_BYTES = INSN_BITS // 8
OPCODE_BITS = 6
#: Scalar registers R0..R15: program arguments written by the host, ARGMAX results.
NUM_REGS = 16
#: Exponent registers E0..E31: the shared exponent of each block-floating-point vector.
NUM_EREGS = 32
#: External-memory addresses are encoded in units of this many bytes.
DRAM_UNIT = 16
#: ATTN's ``stats`` value that asks for no statistics (an address whose range never fits the accumulators).
ATTN_NO_STATS = 0xFFFF
#: Heads of a NORM over each head: the vector unit keeps each head's scalars between its passes.
NORM_MAX_HEADS = 64
QUEUES = ("load", "compute", "store")
DEP_FLAGS = ("pop_prev", "pop_next", "push_prev", "push_next")

#: Enumerated field values, by enum name. Codes not listed are reserved.
ENUMS = {
    "fmt": ("int4", "int8", "w16", "uint4"),
    "func": ("silu", "gelu_erf", "gelu_tanh", "relu"),
    "norm": ("rms", "layer"),
    "rope": ("half", "interleaved"),
    "queue": QUEUES,
}


class IsaError(ValueError):
    """A malformed instruction; ``pc`` names its index in the stream, if known."""

    def __init__(self, message, pc=None, line=None):
        self.pc, self.line = pc, line
        where = f"line {line}: " if line is not None else (f"pc {pc}: " if pc is not None else "")
        super().__init__(where + message)


@dataclass(frozen=True)
class Field:
    """One instruction field.

    ``kind`` says what the value addresses (``abuf``: activation-buffer word,
    ``acc``: accumulator word, ``ereg``/``reg``: register index, ``dram``:
    byte address stored in :data:`DRAM_UNIT` units, ``enum:NAME``, ``int``).
    """

    name: str
    bits: int
    kind: str = "int"
    signed: bool = False
    doc: str = ""

    @property
    def scale(self) -> int:
        return DRAM_UNIT if self.kind == "dram" else 1

    @property
    def enum(self):
        return ENUMS[self.kind[5:]] if self.kind.startswith("enum:") else None

    @property
    def lo(self) -> int:
        return -(1 << (self.bits - 1)) if self.signed else 0

    @property
    def hi(self) -> int:
        if self.enum is not None:
            return len(self.enum) - 1
        return ((1 << (self.bits - 1)) - 1) if self.signed else (1 << self.bits) - 1


@dataclass(frozen=True)
class OpFormat:
    name: str
    code: int
    queue: str  # load / compute / store / front (END) / any (NOP picks with its field)
    fields: tuple
    doc: str
    offsets: dict = field(default_factory=dict, compare=False)

    def __post_init__(self):
        pos = OPCODE_BITS + len(DEP_FLAGS)
        for f in self.fields:
            self.offsets[f.name] = pos
            pos += f.bits
        if pos > INSN_BITS:
            raise AssertionError(f"{self.name} needs {pos} bits")

    @property
    def used_bits(self) -> int:
        return OPCODE_BITS + len(DEP_FLAGS) + sum(f.bits for f in self.fields)


def _v(prefix, doc):
    """An activation-buffer vector operand: word address plus exponent register."""
    return (Field(prefix, 16, "abuf", doc=f"{doc}: activation-buffer word address"),
            Field(prefix + "_e", 5, "ereg", doc=f"{doc}: exponent register"))


_ADDR = Field("addr", 28, "dram", doc="external-memory byte address (multiple of 16)")
_LEN = Field("len", 16, doc="vector length in elements")
_FMT = Field("fmt", 2, "enum:fmt", doc="weight format")
_GROUP = Field("lg_group", 3, doc=f"group size is {GROUP_BASE} << lg_group weights per scale")
_SEXP = Field("sexp", 7, signed=True, doc="exponent of the matrix's scale mantissas")
_KV_BASE = Field("kv_base", KV_BASE_BITS, doc="first KV-pool column of the layer's KV heads (head h starts at column "
                 "kv_base + h * ceil(head_dim / vector_lanes))")
_HDIM = Field("head_dim", 11, doc="elements per head")

OPCODES = (
    OpFormat("LOAD", 1, "load", (_ADDR, _LEN, *_v("dst", "destination")),
             "Copy a vector record (mantissas, then its int32 exponent) from external memory."),
    OpFormat("LDROW", 2, "load", (
        _ADDR, Field("row_reg", 4, "reg", doc="register holding the row index"),
        Field("row_imm", 16, signed=True, doc="added to the row register"),
        Field("cols", 16, doc="row length in weights"), _FMT, _GROUP, _SEXP, *_v("dst", "destination")),
             "Gather row R[row_reg]+row_imm of a quantized matrix and dequantize it into a vector (embeddings, RoPE tables)."),
    OpFormat("STORE", 3, "store", (*_v("src", "source"), _LEN, _ADDR),
             "Write a vector record (mantissas, then its int32 exponent) to external memory."),
    OpFormat("STACC", 4, "store", (Field("acc", 16, "acc", doc="accumulator word address"), _LEN, _ADDR),
             "Write accumulator words (int64) to external memory, e.g. attention statistics."),
    OpFormat("GEMV", 8, "compute", (
        _ADDR, Field("rows", 16, doc="output rows in this tile"), Field("cols", 16, doc="input elements in this tile"),
        _FMT, _GROUP, _SEXP, *_v("x", "input"),
        Field("acc", 16, "acc", doc="accumulator word address of the output"),
        Field("acc_e", 5, "ereg", doc="exponent register of the accumulators"),
        Field("accumulate", 1, doc="1: add to the accumulators (split-K); 0: overwrite"),
        Field("packed", 1, doc="1: the rows are packed in blocks (numerics.packed_block), for rows narrower than a "
                               "port beat; 0: one row record per row, padded to a beat")),
             "Stream a row-major tile of quantized weights from external memory and multiply it by an on-chip vector."),
    OpFormat("REQ", 9, "compute", (
        Field("acc", 16, "acc", doc="accumulator word address"), Field("acc_e", 5, "ereg", doc="accumulator exponent register"),
        _LEN, *_v("dst", "destination"),
        Field("fold", 1, doc="1: take the peak the last GEMV recorded as it wrote these accumulators (its acc and rows "
                             "are this REQ's acc and len, and no ATTN ran since) and run the round pass alone; else "
                             "a SHAPE fault. 0: a peak pass first")),
             "Requantize accumulators into a block-floating-point vector."),
    OpFormat("VADD", 10, "compute", (*_v("a", "first operand"), *_v("b", "second operand"), *_v("dst", "destination"), _LEN),
             "Elementwise a + b."),
    OpFormat("VMUL", 11, "compute", (*_v("a", "first operand"), *_v("b", "second operand"), *_v("dst", "destination"), _LEN),
             "Elementwise a * b."),
    OpFormat("VSCALE", 12, "compute", (
        *_v("a", "operand"), *_v("dst", "destination"), _LEN,
        Field("imm_m", 16, signed=True, doc="scale mantissa"), Field("imm_e", 7, signed=True, doc="scale exponent")),
             "Multiply by the constant imm_m * 2^imm_e."),
    OpFormat("NORM", 13, "compute", (
        *_v("x", "input"), *_v("g", "gain (gamma)"), *_v("dst", "destination"), _LEN,
        Field("eps_m", 16, doc="epsilon mantissa"), Field("eps_e", 7, signed=True, doc="epsilon exponent"),
        Field("kind", 1, "enum:norm", doc="rms: RMSNorm; layer: LayerNorm without bias"),
        Field("head_dim", 11, doc="0: one norm over len; else an RMSNorm over each head of head_dim elements (q/k "
              "norms; the last head takes what is left; at most NORM_MAX_HEADS heads), one output exponent")),
             "RMSNorm or LayerNorm (bias is a following VADD) with gain g and epsilon eps_m * 2^eps_e, over the whole "
             "vector or over each head."),
    OpFormat("ACT", 14, "compute", (*_v("x", "input"), *_v("dst", "destination"), _LEN,
                                     Field("func", 2, "enum:func", doc="activation")),
             "Elementwise x * gate(x): SiLU, GELU (erf), GELU (tanh) or ReLU's step."),
    OpFormat("ROPE", 15, "compute", (
        *_v("x", "input"), *_v("cos", "cosines (head_dim/2)"), *_v("sin", "sines (head_dim/2)"), *_v("dst", "destination"),
        Field("heads", 8, doc="heads in x"), _HDIM, Field("mode", 1, "enum:rope", doc="pairing of rotated elements")),
             "Rotary embedding of each head of x."),
    OpFormat("ARGMAX", 16, "compute", (Field("x", 16, "abuf", doc="input vector address"), _LEN,
                                        Field("rd", 4, "reg", doc="destination register")),
             "Index of the first largest element into a register."),
    OpFormat("ARGMAXACC", 24, "store", (
        Field("acc", 16, "acc", doc="accumulator word address"), _LEN,
        Field("base", 24, doc="index of the first word in the whole vector (its tile's first row)"),
        Field("rd", 4, "reg", doc="destination register"),
        Field("cont", 1, doc="1: continue the argmax of the previous ARGMAXACC (its best so far competes); "
                             "0: start a new one")),
             "Index (base + i) of the first largest accumulator word into a register, in the store queue (beside the "
             "next tile's GEMV): tiles of one vector (rows of one matrix at one exponent, in increasing base) chain "
             "with cont=1, only a strictly larger word replacing the best so far, so the argmax spans the tiles and "
             "ties go to the lowest index."),
    OpFormat("KVAPPEND", 17, "store", (
        *_v("k", "keys of all KV heads"), *_v("v", "values of all KV heads"), _KV_BASE,
        Field("heads", 8, doc="KV heads"), _HDIM, Field("pos_reg", 4, "reg", doc="register holding the position"),
        Field("pos_imm", 16, signed=True, doc="added to the position register")),
             "Append one token's keys and values to the on-chip KV buffer of a layer."),
    OpFormat("ATTN", 18, "store", (
        *_v("q", "queries of all heads (pre-scaled)"), *_v("dst", "output of all heads"), _KV_BASE,
        Field("q_heads", 8, doc="query heads"), Field("kv_heads", 8, doc="KV heads (divides q_heads)"), _HDIM,
        Field("len_reg", 4, "reg", doc="register holding the KV length"),
        Field("len_imm", 16, signed=True, doc="added to the length register"),
        Field("stats", 16, "acc", doc=f"accumulator address receiving (max, sum) per head; {0xFFFF}: none "
              "(ATTN_NO_STATS, a range that never fits): the accumulators are left alone, so the ATTN holds no "
              "accumulator port and runs beside any GEMV")),
             "Attention of each query head over KV positions [0, len) of its KV head, online softmax tile by tile; "
             "writes the normalized output and per-head (max, sum) partials. In the store queue, beside the compute "
             "queue's weight stream."),
    OpFormat("NOP", 30, "any", (Field("queue", 2, "enum:queue", doc="queue that carries the tokens"),),
             "Does nothing in the named queue except pass dependency tokens."),
    OpFormat("END", 31, "front", (), "End of program: waits until every queue has drained."),
)

BY_NAME = {op.name: op for op in OPCODES}
BY_CODE = {op.code: op for op in OPCODES}


@dataclass
class Instr:
    """One decoded instruction: an opcode name, its fields and its token flags."""

    op: str
    fields: dict = field(default_factory=dict)
    deps: frozenset = frozenset()

    def __getattr__(self, name):
        try:
            return self.__dict__["fields"][name]
        except KeyError:
            raise AttributeError(name) from None

    @property
    def fmt(self) -> OpFormat:
        return BY_NAME[self.op]

    @property
    def queue(self) -> str:
        q = self.fmt.queue
        return ENUMS["queue"][self.fields.get("queue", 0)] if q == "any" else q

    def __str__(self):
        return format_instr(self)


def weight_layout(ins: Instr) -> tuple:
    """(format name, group size) of a GEMV or LDROW instruction."""
    return ENUMS["fmt"][ins.fields["fmt"]], GROUP_BASE << ins.fields["lg_group"]


def _check_deps(op: OpFormat, deps, queue, pc=None, line=None):
    for d in deps:
        if d not in DEP_FLAGS:
            raise IsaError(f"unknown dependency flag {d!r}; flags: {', '.join(DEP_FLAGS)}", pc, line)
        if queue == "front" or (queue == "load" and d.endswith("_prev")) or (queue == "store" and d.endswith("_next")):
            raise IsaError(f"{op.name} in the {queue} queue cannot use {d} (reserved)", pc, line)


def encode(ins: Instr) -> int:
    """Encode *ins* into a 128-bit integer, validating every field."""
    op = BY_NAME.get(ins.op)
    if op is None:
        raise IsaError(f"unknown opcode {ins.op!r}")
    unknown = set(ins.fields) - {f.name for f in op.fields}
    if unknown:
        raise IsaError(f"{op.name} has no field {min(unknown)!r}")
    word = op.code
    for i, flag in enumerate(DEP_FLAGS):
        if flag in ins.deps:
            word |= 1 << (OPCODE_BITS + i)
    for f in op.fields:
        value = ins.fields.get(f.name, 0)
        if isinstance(value, bool) or not isinstance(value, int):
            raise IsaError(f"{op.name}.{f.name} must be an integer, got {value!r}")
        if value % f.scale:
            raise IsaError(f"{op.name}.{f.name}={value:#x} is not a multiple of {f.scale}")
        raw = value // f.scale
        if not f.lo <= raw <= f.hi:
            raise IsaError(f"{op.name}.{f.name}={value} is out of range [{f.lo * f.scale}, {f.hi * f.scale}]")
        word |= (raw & ((1 << f.bits) - 1)) << op.offsets[f.name]
    _check_deps(op, ins.deps, ins.queue)
    return word


def decode(word: int, pc: int | None = None) -> Instr:
    """Decode a 128-bit integer; reserved opcodes, enum codes or bits raise :class:`IsaError`."""
    code = word & ((1 << OPCODE_BITS) - 1)
    op = BY_CODE.get(code)
    if op is None:
        raise IsaError(f"reserved opcode {code}", pc)
    if word >> op.used_bits:
        raise IsaError(f"{op.name} has reserved bits set above bit {op.used_bits}", pc)
    deps = frozenset(flag for i, flag in enumerate(DEP_FLAGS) if word >> (OPCODE_BITS + i) & 1)
    fields = {}
    for f in op.fields:
        raw = (word >> op.offsets[f.name]) & ((1 << f.bits) - 1)
        if f.signed and raw >> (f.bits - 1):
            raw -= 1 << f.bits
        if f.enum is not None and raw >= len(f.enum):
            raise IsaError(f"{op.name}.{f.name} has reserved value {raw}", pc)
        fields[f.name] = raw * f.scale
    ins = Instr(op.name, fields, deps)
    _check_deps(op, deps, ins.queue, pc)
    return ins


def encode_program(instrs) -> bytes:
    return b"".join(encode(i).to_bytes(INSN_BYTES, "little") for i in instrs)


def decode_program(blob: bytes) -> list:
    if len(blob) % INSN_BYTES:
        raise IsaError(f"instruction stream of {len(blob)} bytes is not a multiple of {INSN_BYTES}")
    return [decode(int.from_bytes(blob[i:i + INSN_BYTES], "little"), pc=i // INSN_BYTES)
            for i in range(0, len(blob), INSN_BYTES)]


# ---------------------------------------------------------------- text assembly
def _format_value(f: Field, value: int) -> str:
    if f.enum is not None:
        return f.enum[value]
    if f.kind == "dram":
        return f"{value:#x}"
    if f.kind == "ereg":
        return f"E{value}"
    if f.kind == "reg":
        return f"R{value}"
    return str(value)


def format_instr(ins: Instr) -> str:
    op = BY_NAME[ins.op]
    parts = [op.name] + [f"{f.name}={_format_value(f, ins.fields.get(f.name, 0))}" for f in op.fields]
    parts += [f for f in DEP_FLAGS if f in ins.deps]
    return " ".join(parts)


def _parse_value(f: Field, text: str, line: int) -> int:
    if f.enum is not None:
        if text not in f.enum:
            raise IsaError(f"{f.name}={text!r}: expected one of {', '.join(f.enum)}", line=line)
        return f.enum.index(text)
    prefix = {"ereg": "E", "reg": "R"}.get(f.kind)
    if prefix and text[:1].upper() == prefix:
        text = text[1:]
    try:
        return int(text, 0)
    except ValueError:
        raise IsaError(f"{f.name}={text!r} is not an integer", line=line) from None


_TOKEN = re.compile(r"^([A-Za-z_][A-Za-z0-9_]*)(?:=(\S+))?$")


def assemble(text: str) -> list:
    """Parse assembly text into instructions. Errors name the line number and the reason.

    One instruction per line: ``OPCODE field=value ... [pop_prev] [push_next] ...``.
    ``#`` or ``;`` starts a comment. Omitted fields are zero.
    """
    out = []
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = re.split(r"[#;]", raw, maxsplit=1)[0].strip()
        if not line:
            continue
        name, *tokens = line.split()
        op = BY_NAME.get(name.upper())
        if op is None:
            raise IsaError(f"unknown opcode {name!r}", line=lineno)
        fields, deps = {}, set()
        byname = {f.name: f for f in op.fields}
        for tok in tokens:
            m = _TOKEN.match(tok)
            if not m:
                raise IsaError(f"cannot parse {tok!r}: expected field=value or a dependency flag", line=lineno)
            key, value = m.groups()
            if value is None:
                if key not in DEP_FLAGS:
                    raise IsaError(f"{key!r} is neither a field=value nor one of {', '.join(DEP_FLAGS)}", line=lineno)
                deps.add(key)
                continue
            f = byname.get(key)
            if f is None:
                raise IsaError(f"{op.name} has no field {key!r}; fields: {', '.join(byname) or 'none'}", line=lineno)
            if key in fields:
                raise IsaError(f"field {key!r} given twice", line=lineno)
            fields[key] = _parse_value(f, value, lineno)
        ins = Instr(op.name, {f.name: fields.get(f.name, 0) for f in op.fields}, frozenset(deps))
        try:
            encode(ins)
        except IsaError as exc:
            raise IsaError(str(exc), line=lineno) from None
        out.append(ins)
    return out


def disassemble(instrs) -> str:
    return "".join(f"{format_instr(i)}\n" for i in instrs)


# ---------------------------------------------------------------- reference page
def render_markdown() -> str:
    """The ISA reference page, ``docs/isa.md``."""
    lines = [
        "# kvoverlay ISA",
        "",
        "Generated from `kvoverlay/isa.py` by `kvoverlay isa-doc`; do not edit by hand.",
        "",
        f"Every instruction is one {INSN_BITS}-bit little-endian word. Bits [0:{OPCODE_BITS}) hold the opcode,",
        (f"bits [{OPCODE_BITS}:{OPCODE_BITS + len(DEP_FLAGS)}) the dependency-token flags "
         f"({', '.join(f'`{d}`' for d in DEP_FLAGS)}, in that bit order),"),
        "and the fields follow from there in the order listed. Bits above the last field are reserved and zero.",
        f"External-memory addresses are stored in units of {DRAM_UNIT} bytes. There are {NUM_REGS} scalar registers",
        f"(R0..R{NUM_REGS - 1}, written by the host before a run and by ARGMAX) and {NUM_EREGS} exponent registers",
        f"(E0..E{NUM_EREGS - 1}, one shared exponent per block-floating-point vector).",
        "",
        "Queues: " + " → ".join(QUEUES) + ". `*_prev` flags talk to the previous queue, `*_next` flags to the next;",
        "a flag naming a queue that does not exist is reserved. Reserved opcodes, enum codes and bits are illegal.",
        "",
        "| opcode | code | queue | bits used | summary |",
        "|---|---|---|---|---|",
    ]
    for op in OPCODES:
        lines.append(f"| `{op.name}` | {op.code} | {op.queue} | {op.used_bits} | {op.doc} |")
    lines.append("")
    lines.append("Enumerations: " + "; ".join(f"`{k}`: " + ", ".join(f"{i}={v}" for i, v in enumerate(vals))
                                             for k, vals in ENUMS.items()) + ".")
    for op in OPCODES:
        lines += ["", f"## {op.name} (opcode {op.code}, {op.queue} queue)", "", op.doc, ""]
        if not op.fields:
            lines.append("No fields.")
            continue
        lines += ["| field | bits | range | meaning |", "|---|---|---|---|"]
        for f in op.fields:
            lo, hi = op.offsets[f.name], op.offsets[f.name] + f.bits
            rng = ", ".join(f.enum) if f.enum else f"{f.lo * f.scale} .. {f.hi * f.scale}"
            lines.append(f"| `{f.name}` | [{lo}:{hi}) | {rng} | {f.doc} |")
    return "\n".join(lines) + "\n"
