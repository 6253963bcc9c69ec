"""The ``kvoverlay`` command line.

Subcommands live in a registry: decorate a ``configure(parser)`` function with
:func:`command` (or call :func:`register`) and give the parser a handler via
``parser.set_defaults(func=handler)``; a handler takes the parsed namespace and
returns an exit code. Expected errors (:class:`ConfigError`, :class:`IsaError`,
:class:`OSError`, :class:`ValueError`, :class:`CliError`) print one line
``kvoverlay: error: <msg>`` to stderr and exit with code 2.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from kvoverlay import isa
from kvoverlay.config import WEIGHT_CHOICES, ConfigError, load_config
from kvoverlay.fileio import write_atomic
from kvoverlay.isa import IsaError

__all__ = ["COMMANDS", "CliError", "build_parser", "command", "main", "register"]

PROG = "kvoverlay"
EXIT_ERROR = 2


class CliError(Exception):
    """An expected, user-facing error."""


#: name -> (help, configure(parser)); order is the order of ``kvoverlay --help``.
COMMANDS: dict = {}


def register(name: str, help: str, configure) -> None:
    """Add subcommand *name*; ``configure(parser)`` adds arguments and ``set_defaults(func=...)``."""
    COMMANDS[name] = (help, configure)


def command(name: str, help: str):
    def deco(configure):
        register(name, help, configure)
        return configure
    return deco


def _with_context(exc: ValueError, where: str) -> IsaError:
    return IsaError(f"{where}: {exc}")


# --------------------------------------------------------------------------- asm / disasm
@command("asm", "assemble a .s file into a binary instruction stream")
def _configure_asm(p):
    p.add_argument("source", type=Path, help="assembly text (.s)")
    p.add_argument("-o", "--output", type=Path, help="binary output (default: SOURCE with .bin suffix)")
    p.set_defaults(func=_cmd_asm)


def _cmd_asm(args) -> int:
    text = args.source.read_text()
    try:
        program = isa.assemble(text)
    except IsaError as exc:
        raise _with_context(exc, str(args.source)) from None
    out = args.output or args.source.with_suffix(".bin")
    write_atomic(out, isa.encode_program(program))
    print(f"{out}: {len(program)} instructions", file=sys.stderr)
    return 0


@command("disasm", "print the assembly text of a binary instruction stream")
def _configure_disasm(p):
    p.add_argument("binary", type=Path, help="instruction stream (.bin) or program bundle (.kvo)")
    p.set_defaults(func=_cmd_disasm)


def _cmd_disasm(args) -> int:
    from kvoverlay import bundle

    blob = args.binary.read_bytes()
    try:
        if blob.startswith(bundle.MAGIC):
            program = bundle.from_bytes(blob).instructions
        else:
            program = isa.decode_program(blob)
    except (IsaError, bundle.BundleError) as exc:
        raise _with_context(exc, str(args.binary)) from None
    sys.stdout.write(isa.disassemble(program))
    return 0


# --------------------------------------------------------------------------- doctor
@command("doctor", "report the versions and locations of the tools the flow uses")
def _configure_doctor(p):
    p.set_defaults(func=_cmd_doctor)


def _cmd_doctor(args) -> int:
    from kvoverlay.toolchain import doctor_report, format_report

    rows = doctor_report()
    sys.stdout.write(format_report(rows))
    missing = [r[0] for r in rows if r[1] == "missing"]
    if missing:
        print(f"required tools missing: {', '.join(missing)}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- config
@command("config", "inspect overlay configurations")
def _configure_config(p):
    sub = p.add_subparsers(dest="config_cmd", metavar="ACTION", required=True)
    show = sub.add_parser("show", help="print a configuration as TOML")
    show.add_argument("--config", default="tiny", metavar="PRESET|FILE", help="preset name or TOML file (default: tiny)")
    show.set_defaults(func=_cmd_config_show)


def _cmd_config_show(args) -> int:
    sys.stdout.write(load_config(args.config).to_toml())
    return 0


# --------------------------------------------------------------------------- isa-doc
@command("isa-doc", "write the ISA reference page (docs/isa.md)")
def _configure_isa_doc(p):
    p.add_argument("-o", "--output", default="docs/isa.md", help="output path, or - for stdout (default: docs/isa.md)")
    p.set_defaults(func=_cmd_isa_doc)


def _cmd_isa_doc(args) -> int:
    text = isa.render_markdown()
    if args.output == "-":
        sys.stdout.write(text)
    else:
        write_atomic(args.output, text.encode())
        print(f"wrote {args.output}", file=sys.stderr)
    return 0


# --------------------------------------------------------------------------- demo / run (golden model)
# Handlers import their module when the subcommand runs, so that ``kvoverlay --help`` and the core commands
# start without ONNX, Amaranth or cocotb.
def _cmd_compile(args) -> int:
    from kvoverlay.host.commands import compile_main

    return compile_main(args)


def _cmd_run(args) -> int:
    from kvoverlay.host.commands import run_main

    return run_main(args)


def _cmd_demo(args) -> int:
    from kvoverlay.host.commands import demo_main

    return demo_main(args)


@command("compile", "compile an ONNX decoder into an overlay program (.kvo)")
def _configure_compile(p):
    p.add_argument("model", type=Path, help="ONNX decoder with past/present KV I/O (optimum-style export)")
    p.add_argument("-o", "--output", type=Path, required=True, help="program bundle to write (.kvo)")
    p.add_argument("--config", default="tiny", metavar="PRESET|FILE", help="overlay configuration (default: tiny)")
    p.add_argument("--weights", default="w16", choices=list(WEIGHT_CHOICES),
                   help="weight format (default: w16); int4-sym: int4, one scale per group; int4-asym: uint4, a scale "
                        f"and a zero point per group; int4: int4-{'asym' if WEIGHT_CHOICES['int4'] == 'uint4' else 'sym'}")
    p.add_argument("--group-size", type=int, default=None, metavar="N", help="weights per scale (default: the config's)")
    p.add_argument("--quant", default=None, choices=["rtn", "mse"],
                   help="4-bit scales: round-to-nearest or a calibrated clipping search (default: mse for int4-sym, "
                        "rtn for int4-asym, the better on trained weights)")
    p.add_argument("--max-seq", type=int, default=None, metavar="N", help="longest prompt + generation (default: KV capacity)")
    p.add_argument("--kv-capacity", type=int, default=None, metavar="TOKENS", help="override the config's KV capacity")
    p.add_argument("--tokenizer", type=Path, default=None, metavar="PATH", help="tokenizer.json to store in the "
                   "program, for --text and perplexity (default: the tokenizer.json beside the model, if any)")
    p.add_argument("--dump-dir", type=Path, default=None, metavar="DIR", help="write each pass's output into DIR")
    p.add_argument("--no-logits", action="store_true", help="leave no logits, only the next token of the on-chip "
                   "argmax: the LM head keeps its GEMVs and ARGMAXACC, no REQ or STORE (greedy decoding only)")
    p.add_argument("--offload-device", default="auto", choices=["auto", "none"],
                   help="auto (default): ops the overlay cannot run are placed on the host's offload device; "
                        "none: they are an error")
    p.add_argument("--json", action="store_true", help="print one JSON object with the compile report")
    p.set_defaults(func=_cmd_compile)


@command("run", "run a program: a .kvo bundle (prefill, then greedy or sampled decoding) or a raw instruction stream")
def _configure_run(p):
    from kvoverlay.host import offload
    from kvoverlay.host.backend import BACKENDS

    p.add_argument("program", type=Path, help="program bundle (.kvo) or instruction stream (.bin from kvoverlay asm)")
    p.add_argument("--backend", default="isa", choices=list(BACKENDS),
                   help="; ".join(f"{name}: {spec.help}" for name, spec in BACKENDS.items()) + " (default: isa)")
    offload.add_arguments(p)
    p.add_argument("--prompt", default=None, help="comma-separated prompt token ids (default: 5,17,42)")
    p.add_argument("--text", default=None, help="prompt text, through the tokenizer the program carries; the "
                   "continuation is printed as text as it decodes")
    p.add_argument("--max-new-tokens", type=int, default=16, metavar="N", help="tokens to generate (default: 16)")
    p.add_argument("--temperature", type=float, default=0.0, metavar="T", help="0: greedy (default); >0: sample")
    p.add_argument("--top-k", type=int, default=0, metavar="K", help="sample from the K most likely tokens (0: all)")
    p.add_argument("--top-p", type=float, default=1.0, metavar="P", help="sample from the smallest set of "
                   "tokens whose probability reaches P, in (0, 1] (default: 1)")
    p.add_argument("--seed", type=int, default=None, metavar="S", help="sampling seed: the same tokens on every backend")
    p.add_argument("--stop", default="", metavar="IDS", help="comma-separated token ids that end the generation")
    p.add_argument("--check", type=Path, default=None, metavar="MODEL.onnx", help="compare with onnxruntime on this model")
    p.add_argument("--dump", type=Path, default=None, metavar="OUT.npz", help="write tokens and logits to an npz file")
    p.add_argument("--waves", type=Path, default=None, metavar="FILE.vcd",
                   help="--backend rtl: write the simulation's waveforms (a separate, traced Verilator build)")
    p.add_argument("--port", default=None, metavar="DEVICE|sim", help="--backend board: the board's serial port "
                   "(e.g. /dev/ttyUSB0), or sim for the board top simulated in Verilator")
    p.add_argument("--mem", choices=("bram", "sdram"), default=None, help="--backend board --port sim: the simulated "
                   "board's memory (default: block RAM where the program fits 128 KiB, else SDRAM)")
    p.add_argument("--baud", type=int, default=None, metavar="RATE", help="--backend board: the bitstream's UART rate "
                   "(default: kvoverlay build's, 1000000)")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--config", default=None, metavar="PRESET|FILE", help="raw streams only: overlay configuration "
                   "(default: tiny)")
    p.add_argument("--image", type=Path, help="raw streams only: external-memory image loaded at address 0")
    p.add_argument("--args", default=None, metavar="R0,R1,...", help="raw streams only: scalar registers set before the run")
    p.set_defaults(func=_cmd_run)


def _cmd_perplexity(args) -> int:
    from kvoverlay.host.commands import perplexity_main

    return perplexity_main(args)


@command("perplexity", "teacher-forced mean NLL and perplexity of a text file under a program (llama.cpp's perplexity)")
def _configure_perplexity(p):
    from kvoverlay.host.backend import BACKENDS

    p.add_argument("program", type=Path, help="program bundle (.kvo) that carries a tokenizer")
    p.add_argument("--text-file", type=Path, required=True, metavar="F", help="UTF-8 text to score")
    p.add_argument("--backend", default="isa", choices=list(BACKENDS), help="where the program runs (default: isa)")
    p.add_argument("--chunk", type=int, default=None, metavar="N",
                   help="tokens per chunk, each from an empty KV cache (default and most: the program's --max-seq)")
    p.add_argument("--max-tokens", type=int, default=None, metavar="N", help="score only the first N tokens of the file")
    p.add_argument("--check", type=Path, default=None, metavar="MODEL.onnx",
                   help="also report fp32 onnxruntime's figure on the same tokens")
    p.add_argument("--json", action="store_true", help="print one JSON object (keys nll, perplexity, tokens, ...)")
    p.set_defaults(func=_cmd_perplexity)


@command("demo", "build a small Llama-style ONNX decoder, compile it, run it and check it against onnxruntime")
def _configure_demo(p):
    p.add_argument("--config", default="tiny", metavar="PRESET|FILE", help="overlay configuration (default: tiny)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the demo weights")
    p.add_argument("--tokens", type=int, default=16, help="tokens to generate (default: 16)")
    p.add_argument("--no-rtl", action="store_true",
                   help="skip the int8 run on the Verilated overlay (its first run builds the model, ~2 min)")
    p.add_argument("--keep", type=Path, default=None, metavar="DIR",
                   help="write the demo's ONNX file and its programs (demo-w16/int8/int4.kvo) into DIR")
    p.set_defaults(func=_cmd_demo)


# --------------------------------------------------------------------------- conformance
@command("conformance", "run ONNX's node cases of the transformer op set on the overlay and print the per-op table")
def _configure_conformance(p):
    p.add_argument("--ops", default=None, metavar="OP,...", help="only these op types (default: the whole op set)")
    p.add_argument("--device", default="isa", choices=["isa", "rtl"],
                   help="isa: the bit-exact golden model (default); rtl: the Verilated overlay")
    out = p.add_mutually_exclusive_group()
    out.add_argument("--json", action="store_true", help="print one JSON object (counts per op, every case)")
    out.add_argument("--markdown", action="store_true", help="print the table as docs/conformance.md holds it")
    p.set_defaults(func=_cmd_conformance)


def _cmd_conformance(args) -> int:
    from kvoverlay.host.conformance import conformance_main

    return conformance_main(args)


# --------------------------------------------------------------------------- hardware: export, bench
@command("export-verilog", "write the overlay's Verilog for a configuration and lint it with Verilator")
def _configure_export_verilog(p):
    p.add_argument("--config", default="tiny", metavar="PRESET|FILE", help="overlay configuration (default: tiny)")
    p.add_argument("-o", "--output", required=True, metavar="DIR", help="output directory")
    p.set_defaults(func=_cmd_export_verilog)


def _cmd_export_verilog(args) -> int:
    from kvoverlay.hw.export import export_verilog_main

    return export_verilog_main(args)


@command("build", "build a bitstream of the board top (overlay, block RAM, UART bridge) with the PyPI FPGA tools")
def _configure_build(p):
    p.add_argument("--board", default="ulx3s-85f", help="ulx3s-85f (default), ulx3s-12f or ecpix5-45f")
    p.add_argument("--config", default=None, metavar="PRESET|FILE", help="overlay configuration (default: ulx3s on "
                   "the ULX3S, tiny elsewhere)")
    p.add_argument("-o", "--output", default="build", metavar="DIR", help="build folder (default: build)")
    p.add_argument("--mem", choices=("bram", "sdram"), default="bram", help="the program's memory: block RAM in the "
                   "bitstream (default; the full port rate) or the board's SDRAM behind a controller (programs "
                   "larger than block RAM, at the SDRAM's rate; docs/boards.md)")
    p.add_argument("--mem-bytes", type=int, default=None, metavar="N", help="the memory's size (a power of two; "
                   "default: block RAM 128 KiB, SDRAM 32 MB, at most the config's dram_bytes)")
    p.add_argument("--baud", type=int, default=1_000_000, metavar="RATE", help="UART rate (default: 1000000)")
    p.add_argument("--link-only", action="store_true", help="the UART bridge and block RAM without the overlay "
                   "(brings the link up on a board the overlay does not fit yet)")
    p.add_argument("--program", action="store_true", help="flash the board through openFPGALoader afterwards")
    p.add_argument("--json", action="store_true", help="print one JSON object with the build report")
    p.set_defaults(func=_cmd_build)


def _cmd_build(args) -> int:
    from kvoverlay.boards.build import build_main

    return build_main(args)


@command("bench", "measure the overlay against the memory-port roofline")
def _configure_bench(p):
    sub = p.add_subparsers(dest="bench_cmd", metavar="KERNEL", required=True)
    g = sub.add_parser("gemv", help="a tiled GEMV: cycles, roofline cycles and bandwidth efficiency")
    g.add_argument("--rows", type=int, required=True, help="output rows")
    g.add_argument("--cols", type=int, required=True, help="input elements")
    g.add_argument("--weights", choices=["int8", "int4", "w16"], default="int8", help="weight format (default: int8)")
    g.add_argument("--backend", choices=["rtl", "isa"], default="rtl", help="rtl: Verilated overlay; isa: golden model")
    g.add_argument("--config", default="tiny", metavar="PRESET|FILE", help="overlay configuration (default: tiny)")
    g.add_argument("--seed", type=int, default=0, help="random seed of the weights")
    g.add_argument("--json", action="store_true", help="print one JSON object")
    g.set_defaults(func=_cmd_bench_gemv)


    d = sub.add_parser("decode", help="decode steps of a synthetic Llama-style decoder: cycles per token against the "
                       "roofline, the golden model's prediction and where the cycles go")
    d.add_argument("--hidden", type=int, default=512, help="model width (default: 512)")
    d.add_argument("--layers", type=int, default=4, help="decoder layers (default: 4)")
    d.add_argument("--heads", type=int, default=8, help="query heads (default: 8)")
    d.add_argument("--kv-heads", type=int, default=2, help="KV heads (default: 2)")
    d.add_argument("--ffn", type=int, default=None, help="FFN width (default: 2 x hidden)")
    d.add_argument("--vocab", type=int, default=1024, help="vocabulary (default: 1024)")
    d.add_argument("--context", type=int, default=256, help="KV length the last timed step attends over (default: 256)")
    d.add_argument("--steps", type=int, default=2, help="decode steps timed (default: 2)")
    d.add_argument("--weights", default="int8", metavar="FMT[,FMT...]",
                   help="weight formats, comma-separated: int8, int4, w16 (default: int8)")
    d.add_argument("--backend", choices=["rtl", "isa"], default="isa",
                   help="rtl: Verilated overlay, with the golden model beside it; isa: golden model (default)")
    d.add_argument("--config", default=None, metavar="PRESET|FILE",
                   help="overlay configuration (default: tiny with a 256-token KV buffer and 32 MiB of memory)")
    d.add_argument("--seed", type=int, default=0, help="random seed of the weights and the KV")
    d.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="write a roofline plot of the points")
    d.add_argument("--json", action="store_true", help="print one JSON object (a list for several formats)")
    d.set_defaults(func=_cmd_bench_decode)


    j = sub.add_parser("project", help="PROJECTED tokens/s at batch 1 of a full-size model, from the validated cycle "
                       "model (no RTL, no weights), tensor-parallel over --devices cards")
    j.add_argument("--model", default="llama2-7b", choices=["llama2-7b", "llama3-8b", "smollm-135m", "gpt2-xl"],
                   help="model shape (default: llama2-7b)")
    j.add_argument("--config", default="u280", metavar="PRESET|FILE", help="overlay configuration (default: u280)")
    j.add_argument("--weights", choices=["int4", "int8", "w16"], default="int4", help="weight format (default: int4)")
    j.add_argument("--devices", type=int, default=1, help="cards, tensor-parallel (default: 1)")
    j.add_argument("--context", type=int, default=128, help="KV length attended over (default: 128)")
    j.add_argument("--link-gbps", type=float, default=100.0, help="inter-card link, Gb/s per direction (default: 100)")
    j.add_argument("--link-latency-us", type=float, default=1.0, help="inter-card latency per hop in us (default: 1)")
    j.add_argument("--plot", type=Path, default=None, metavar="FILE.png", help="write a roofline plot of the point")
    j.add_argument("--json", action="store_true", help="print one JSON object")
    j.set_defaults(func=_cmd_bench_project)


def _cmd_bench_project(args) -> int:
    from kvoverlay.host.project import project_main

    return project_main(args)


def _cmd_bench_decode(args) -> int:
    from kvoverlay.host.bench import bench_decode_main

    return bench_decode_main(args)


def _cmd_bench_gemv(args) -> int:
    from kvoverlay.sim.bench import bench_gemv_main

    return bench_gemv_main(args)


# --------------------------------------------------------------------------- entry point
def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="FPGA transformer-overlay flow")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for name, (help_text, configure) in COMMANDS.items():
        configure(sub.add_parser(name, help=help_text, description=help_text))
    return parser


def _one_line(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        msg = f"{exc.filename}: {exc.strerror}" if exc.filename else exc.strerror
    else:
        msg = str(exc) or type(exc).__name__
    return " ".join(msg.split())


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except (ConfigError, IsaError, CliError, OSError, ValueError, ArithmeticError, RuntimeError) as exc:
        print(f"{PROG}: error: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except ImportError as exc:  # an optional dependency of this subcommand is not installed
        print(f"{PROG}: error: {args.command} is not available: {_one_line(exc)}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
