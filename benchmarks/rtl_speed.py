"""Simulation speed of ``--backend rtl`` on ``tiny``: the run-path harness against cocotb, same design, same steps.

Usage: python benchmarks/rtl_speed.py [OUT.json]

For the demo decoder (int8) and two exported models (llama, gpt2; w16), compiled for ``tiny``: a decode session of
3 prompt tokens and 24 new ones in the harness (:mod:`kvoverlay.sim.rtl_harness`, what ``kvoverlay run --backend
rtl`` uses), and the first step of the same program as a one-shot cocotb run (:meth:`RtlModel.run`, the path
sessions took before). Simulated cycles per second of wall time and per second of the simulator's CPU time, from
``start`` to ``done``; the load average is recorded beside them, since wall-clock speed means little on busy cores.
"""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

PROMPT, NEW = [5, 17, 42], 24


def programs(tmp: Path) -> dict:
    from kvoverlay.compiler.driver import compile_model
    from kvoverlay.models import exported
    from kvoverlay.models.demo import build_llama_onnx

    build_llama_onnx(tmp / "demo.onnx")
    out = {"demo int8": compile_model(str(tmp / "demo.onnx"), "tiny", weights="int8", max_seq=32)[0]}
    for fam in ("llama", "gpt2"):
        out[f"{fam} w16"] = compile_model(str(exported.export_model(fam)), "tiny", weights="w16", max_seq=32)[0]
    return out


def measure(program) -> dict:
    from kvoverlay.host.backend import register_args
    from kvoverlay.host.session import Session
    from kvoverlay.sim.rtl import RtlModel

    with Session(program, "rtl") as s:
        s.generate(PROMPT, NEW).result()
        steps = s.backend.steps
    cycles = sum(x.hw_counters["cycles"] for x in steps)
    wall, cpu = sum(x.wall_s for x in steps), sum(x.cpu_s for x in steps)
    model = RtlModel(program.config, program.image)
    args = [0] * 16
    for i, v in register_args(program, PROMPT[0], 0).items():
        args[i] = v
    model.run(program.instructions, args=args, readback=False)
    one = model.last_run
    return {"steps": len(steps), "cycles": cycles, "harness_cycles_per_s": round(cycles / wall),
            "harness_cycles_per_cpu_s": round(cycles / cpu), "cocotb_step_cycles": one.hw_counters["cycles"],
            "cocotb_cycles_per_cpu_s": round(one.sim_cycles_per_cpu_s)}


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    res = {"load_average_before": os.getloadavg(), "cpus": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for name, program in programs(Path(tmp)).items():
            res[name] = measure(program)
            print(json.dumps({name: res[name]}), flush=True)
    res["load_average_after"] = os.getloadavg()
    if argv:
        Path(argv[0]).write_text(json.dumps(res, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
