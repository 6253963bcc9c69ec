"""Simulation speed of ``--backend rtl``: simulated cycles per second of the run-path harness, on several models.

Usage: python benchmarks/rtl_speed.py [--repeat N] [--cocotb] [--json OUT.json]
       python benchmarks/rtl_speed.py --record DIR
       python benchmarks/rtl_speed.py --replay DIR BINARY [BINARY ...] [--repeat N]

For each model a decode session in the harness (:mod:`kvoverlay.sim.rtl_harness`, what ``kvoverlay run --backend
rtl`` uses) of 3 prompt tokens and 24 new ones, *N* times: the demo decoder (int8, int4, w16) and two exported
models (llama, gpt2; w16), compiled for ``tiny``; and a ``kvoverlay bench decode`` point (its default shape and
config, int8, 2 steps at a 256-token context after the KV fill). The speed is measured from ``start`` to ``done``
of each step, per second of the simulator's CPU time (what the build and the harness decide) and per second of
wall time (what a user sees; it depends on what else runs, so the load average is printed beside it). The best
of the *N* sessions is reported, and the median. With ``--cocotb``, also the first step of each tiny program as a
one-shot cocotb run (:meth:`RtlModel.run`, the cocotb regression's path), for comparison.

To compare harness builds (flags, compilers, harness loops) on the same work: ``--record DIR`` keeps each tiny
session's memory image and the command lines the host sent (``DIR/<model>/image.hex``, ``commands.txt``);
``--replay DIR BINARY ...`` feeds them to each harness binary in turn, *N* rounds, with no Python between the
binary and its pipe, and prints the best cycles per CPU-second of each binary's runs, and whether every reply
(counters, registers, memory words) is the same across the binaries (timings aside).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

PROMPT, NEW = [5, 17, 42], 24


def programs(tmp: Path) -> dict:
    from kvoverlay.compiler.driver import compile_model
    from kvoverlay.models import exported
    from kvoverlay.models.demo import build_llama_onnx

    build_llama_onnx(tmp / "demo.onnx")
    out = {f"demo {w}": compile_model(str(tmp / "demo.onnx"), "tiny", weights=w, max_seq=32)[0]
           for w in ("int8", "int4", "w16")}
    for fam in ("llama", "gpt2"):
        out[f"{fam} w16"] = compile_model(str(exported.export_model(fam)), "tiny", weights="w16", max_seq=32)[0]
    return out


def session(program) -> tuple[int, float, float]:
    """(cycles, wall seconds, CPU seconds) of one decode session, start to done of each step."""
    from kvoverlay.host.session import Session

    with Session(program, "rtl") as s:
        s.generate(PROMPT, NEW).result()
        steps = s.backend.steps
    return (sum(x.hw_counters["cycles"] for x in steps), sum(x.wall_s for x in steps), sum(x.cpu_s for x in steps))


def bench_point(steps: int = 2, context: int = 256) -> tuple[int, float, float]:
    """(cycles, wall seconds, CPU seconds) of the timed steps of a ``bench decode`` point (default shape, int8)."""
    from kvoverlay.host.bench import BENCH_CONFIG, DecodeShape, compile_decoder, kv_fill
    from kvoverlay.sim.rtl import RtlModel

    shape = DecodeShape()
    program = compile_decoder(shape, BENCH_CONFIG, "int8", context)
    fill, image = kv_fill(program, shape, context - steps)
    regs, logits = program.manifest["registers"], program.manifest["logits"]
    with RtlModel(BENCH_CONFIG, image).open(list(program.instructions) + list(fill)) as proc:
        proc.run_steps(regs, logits, [0], 0, 0, entry=len(program.instructions))
        timed = proc.run_steps(regs, logits, [1], steps - 1, context - steps)
    return (sum(x.hw_counters["cycles"] for x in timed), sum(x.wall_s for x in timed), sum(x.cpu_s for x in timed))


def record(out: Path) -> None:
    """Run each tiny session once, keeping its memory image and the harness commands in ``out/<model>/``."""
    from kvoverlay.sim import rtl

    sent, argv, write = [], [], rtl._Pipe.write

    def tee(pipe, data: bytes) -> None:  # the host's side of the pipe, copied as it goes
        argv[:] = pipe.proc.args
        sent.append(data)
        write(pipe, data)

    os.environ["KVOVERLAY_RTL_KEEP"] = "1"  # keep the process's folder: its image.hex
    rtl._Pipe.write = tee
    with tempfile.TemporaryDirectory() as tmp:
        for name, program in programs(Path(tmp)).items():
            sent.clear()
            cycles, _, cpu = session(program)
            folder = out / name.replace(" ", "-")
            folder.mkdir(parents=True, exist_ok=True)
            image = next(a for a in argv if a.startswith("+DRAM_IMAGE=")).split("=", 1)[1]
            os.replace(image, folder / "image.hex")
            shutil.rmtree(Path(image).parent, ignore_errors=True)  # the rest of the kept folder: its log
            (folder / "commands.txt").write_bytes(b"".join(sent))  # closing the session sent its quit
            print(json.dumps({name: {"cycles": cycles, "cycles_per_cpu_s": round(cycles / cpu)}}), flush=True)


def replay(folder: Path, binary: str) -> tuple[int, float, float, list]:
    """(cycles, wall s, CPU s, replies without their timings) of *binary* fed a recorded session."""
    commands = (folder / "commands.txt").read_text().splitlines()
    commands = commands[: commands.index("quit") + 1]  # the harness stops reading there
    with open(folder / "commands.txt", "rb") as stdin:
        out = subprocess.run([binary, f"+DRAM_IMAGE={folder / 'image.hex'}"], stdin=stdin, capture_output=True,
                             check=True).stdout.decode().splitlines()
    cycles, wall, cpu, replies = 0, 0.0, 0.0, []
    for command, reply in zip(["(ready)", *commands], out, strict=True):
        words = reply.split()
        if command.startswith("run "):  # RUNS TIMEOUT ERROR CODE INFO PC WALL_S CPU_S CYCLES ...
            wall, cpu, cycles = wall + float(words[6]), cpu + float(words[7]), cycles + int(words[8])
            words[6:8] = ["-", "-"]
        replies.append(" ".join(words))
    return cycles, wall, cpu, replies


def compare_binaries(rec: Path, binaries: list, rounds: int) -> dict:
    """Replay every recorded session on every binary, alternating, *rounds* times."""
    res = {}
    for folder in sorted(p for p in rec.iterdir() if (p / "commands.txt").is_file()):
        runs, replies = {b: [] for b in binaries}, {}
        for _ in range(rounds):
            for b in binaries:
                cycles, wall, cpu, replies[b] = replay(folder, b)
                runs[b].append((cycles, wall, cpu))
        same = all(r == replies[binaries[0]] for r in replies.values())
        res[folder.name] = {"bit_identical_replies": same, "load_average": round(os.getloadavg()[0], 2),
                            **{b: summarize(r) for b, r in runs.items()}}
        print(json.dumps({folder.name: res[folder.name]}), flush=True)
    return res


def summarize(runs: list) -> dict:
    per_cpu = [c / cpu for c, _, cpu in runs]
    per_wall = [c / wall for c, wall, _ in runs]
    return {"runs": len(runs), "cycles": runs[0][0],
            "cycles_per_cpu_s": round(max(per_cpu)), "cycles_per_cpu_s_median": round(statistics.median(per_cpu)),
            "cycles_per_s": round(max(per_wall)), "cycles_per_s_median": round(statistics.median(per_wall))}


def cocotb_step(program) -> dict:
    """The first step of *program* as a one-shot cocotb run."""
    from kvoverlay.host.backend import register_args
    from kvoverlay.sim.rtl import RtlModel

    model = RtlModel(program.config, program.image)
    args = [0] * 16
    for i, v in register_args(program, PROMPT[0], 0).items():
        args[i] = v
    model.run(program.instructions, args=args, readback=False)
    return {"cocotb_step_cycles": model.last_run.hw_counters["cycles"],
            "cocotb_cycles_per_cpu_s": round(model.last_run.sim_cycles_per_cpu_s)}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeat", type=int, default=3, help="sessions per model (default: 3); the best is reported")
    p.add_argument("--cocotb", action="store_true", help="also time one step of each tiny program under cocotb")
    p.add_argument("--json", metavar="OUT", help="write the results to this file")
    p.add_argument("--record", metavar="DIR", type=Path, help="record the tiny sessions for --replay")
    p.add_argument("--replay", nargs="+", metavar=("DIR", "BINARY"), help="replay recorded sessions on harness binaries")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    if args.record:
        record(args.record)
        return 0
    res = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
    if args.replay:
        if len(args.replay) < 2:
            p.error("--replay takes a recording folder and at least one harness binary")
        res["replay"] = compare_binaries(Path(args.replay[0]), args.replay[1:], args.repeat)
        if args.json:
            Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = {name: (lambda prog=prog: session(prog), prog) for name, prog in programs(Path(tmp)).items()}
        work["bench decode int8 (tiny-kv256, context 256)"] = (bench_point, None)
        for name, (run, prog) in work.items():
            res[name] = summarize([run() for _ in range(args.repeat)])
            res[name]["load_average"] = round(os.getloadavg()[0], 2)
            if args.cocotb and prog is not None:
                res[name].update(cocotb_step(prog))
            print(json.dumps({name: res[name]}), flush=True)
    res["load_average_after"] = os.getloadavg()
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
