"""The layers of ARCHITECTURE.md, held: imports point down, and the compiler, the golden model and the host
run with Amaranth and cocotb absent."""

import ast
import subprocess
import sys
import textwrap
import tomllib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PACKAGE_DIRS = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
FOLDER = {package: ROOT / folder for package, folder in PACKAGE_DIRS.items()}
HDL = ("amaranth", "cocotb", "cocotb_tools")
CORE = ("kvoverlay.access", "kvoverlay.bundle", "kvoverlay.config", "kvoverlay.fileio", "kvoverlay.isa",
        "kvoverlay.numerics", "kvoverlay.timing")


def module_name(path: Path) -> str:
    package = next(p for p, folder in FOLDER.items() if path.parent == folder)
    return package if path.stem == "__init__" else f"{package}.{path.stem}"


def imports(path: Path):
    """(imported module, at module level) for every import statement of *path*, relative ones made absolute."""
    package = module_name(path).rpartition(".")[0] if path.stem != "__init__" else module_name(path)
    tree = ast.parse(path.read_text(), str(path))
    in_function = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            in_function.update(id(n) for n in ast.walk(node) if n is not node)
    for node in ast.walk(tree):
        top = id(node) not in in_function
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield alias.name, top
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([node.module] if node.module else []))
            yield base, top
            for alias in node.names:  # ``from kvoverlay import hw`` imports the package kvoverlay.hw
                yield f"{base}.{alias.name}", top


def is_under(module: str, roots) -> bool:
    return any(module == r or module.startswith(r + ".") for r in roots)


def offences(paths, forbidden, module_level_only):
    return sorted(f"{p.relative_to(ROOT)} imports {m}" for p in paths for m, top in imports(p)
                  if is_under(m, forbidden) and (top or not module_level_only))


def sources(package):
    return sorted(FOLDER[package].glob("*.py"))


def test_compiler_imports_only_the_core():
    forbidden = ("kvoverlay.sim", "kvoverlay.host", "kvoverlay.hw", "kvoverlay.boards", "kvoverlay.models", *HDL)
    assert offences(sources("kvoverlay.compiler"), forbidden, module_level_only=False) == []


def test_golden_model_never_imports_hw():
    assert offences([FOLDER["kvoverlay.sim"] / "golden.py"], ("kvoverlay.hw", *HDL), module_level_only=False) == []


def test_host_imports_no_hdl_at_module_level():
    assert offences(sources("kvoverlay.host"), ("kvoverlay.hw", *HDL), module_level_only=True) == []


def test_core_imports_only_the_standard_library_numpy_and_itself():
    core = [p for p in sources("kvoverlay") if module_name(p) in CORE]
    assert {module_name(p) for p in core} >= set(CORE) - {"kvoverlay.timing"}
    allowed = set(sys.stdlib_module_names) | {"numpy"}
    bad = sorted(f"{p.name} imports {m}" for p in core for m, _ in imports(p)
                 if m.split(".")[0] not in allowed and m not in ("kvoverlay", *CORE)
                 and not (m.startswith("kvoverlay.") and m.rpartition(".")[0] in CORE))
    assert bad == []


def test_the_checker_sees_a_violation(tmp_path):
    """The checker itself: a lazy and a relative import of hw are both found."""
    folder = FOLDER["kvoverlay.compiler"]
    probe = folder / "_layering_probe.py"
    probe.write_text("from ..hw import gemv\n\ndef f():\n    import amaranth\n")
    try:
        found = offences([probe], ("kvoverlay.hw", *HDL), module_level_only=False)
        top = offences([probe], ("kvoverlay.hw", *HDL), module_level_only=True)
    finally:
        probe.unlink()
    assert found == ["compiler/_layering_probe.py imports amaranth", "compiler/_layering_probe.py imports kvoverlay.hw",
                     "compiler/_layering_probe.py imports kvoverlay.hw.gemv"]
    assert top == ["compiler/_layering_probe.py imports kvoverlay.hw", "compiler/_layering_probe.py imports kvoverlay.hw.gemv"]


BLOCKED_RUN = textwrap.dedent("""\
    import importlib.abc
    import sys

    BLOCKED = ("amaranth", "cocotb", "cocotb_tools")

    class Absent(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in BLOCKED:
                raise ImportError(f"{name} is blocked: this process stands for a machine without it")

    sys.meta_path.insert(0, Absent())
    from kvoverlay.cli import main

    model, program = sys.argv[1:3]
    assert main(["compile", model, "-o", program, "--weights", "int8", "--max-seq", "12"]) == 0
    assert main(["run", program, "--backend", "isa", "--prompt", "5,17,42", "--max-new-tokens", "4", "--json"]) == 0
    loaded = sorted(m for m in sys.modules if m.split(".")[0] in BLOCKED or m.startswith("kvoverlay.hw"))
    assert not loaded, loaded
    # a command that needs the HDL says so in one line
    assert main(["export-verilog", "-o", "verilog"]) == 2
""")


def test_compile_and_decode_without_amaranth_and_cocotb(tmp_path):
    exported = pytest.importorskip("kvoverlay.models.exported")
    model = exported.export_model("llama")
    script = tmp_path / "blocked.py"
    script.write_text(BLOCKED_RUN)
    res = subprocess.run([sys.executable, str(script), str(model), str(tmp_path / "model.kvo")],
                         check=False, capture_output=True, text=True, cwd=tmp_path)
    assert res.returncode == 0, res.stderr
    assert '"tokens"' in res.stdout and (tmp_path / "model.kvo").stat().st_size > 0
    assert res.stderr.strip().splitlines()[-1] == ("kvoverlay: error: export-verilog is not available: amaranth is "
                                                   "blocked: this process stands for a machine without it")
