"""The README's examples run as written, from an empty folder."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def sh_blocks():
    return re.findall(r"```sh\n(.*?)```", (ROOT / "README.md").read_text(), re.DOTALL)


def test_asm_example_is_self_contained(tmp_path):
    block = next(b for b in sh_blocks() if "cat > prog.s" in b)
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    res = subprocess.run(["bash", "-euo", "pipefail", "-c", block], cwd=tmp_path, env=env, capture_output=True,
                         text=True, check=False)
    assert res.returncode == 0, res.stderr
    expected = re.search(r"^expect R1 = (\d+)$", res.stdout, re.MULTILINE).group(1)
    registers = re.search(r"^registers: (.*)$", res.stdout, re.MULTILINE).group(1).split()
    assert registers[1] == f"R1={expected}", res.stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["image.bin", "prog.bin", "prog.s"]
