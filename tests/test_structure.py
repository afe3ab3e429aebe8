"""The package structure (docs/architecture.md): every module imports on its own, no import cycles, no project
import hidden inside a function except the documented start-up-time ones, layers point downwards."""

from __future__ import annotations

import ast
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PROJECT_PACKAGES = ("core", "ui")
# Lazy imports of project modules allowed inside functions, and why (also listed in docs/architecture.md):
# the CLI's command modules import their work only when the command runs, so `python -m core --help` and
# `info` start in well under a second instead of importing torch, transformers and scikit-learn.
LAZY_IMPORT_ALLOWED = ("core/cli/",)
# Lower layers never import upper ones (docs/architecture.md): module prefix -> prefixes it may not import.
FORBIDDEN = {
    "core.io": ("core.features", "core.pipeline", "core.live", "core.batch", "core.cluster", "core.protocol",
                "core.refine", "core.experiments", "core.cli", "ui"),
    "core.features": ("core.pipeline", "core.live", "core.batch", "core.cluster", "core.protocol", "core.refine",
                      "core.experiments", "core.cli", "ui"),
    "core.pipeline": ("core.live", "core.batch", "core.cluster", "core.protocol", "core.refine", "core.experiments",
                      "core.cli", "ui"),
    "core.window": ("core.batch", "core.cluster", "core.protocol", "core.refine", "core.experiments", "core.cli", "ui"),
    "core.live": ("core.batch", "core.cluster", "core.protocol", "core.refine", "core.experiments", "core.cli", "ui"),
    "core.batch": ("core.cluster", "core.protocol", "core.refine", "core.experiments", "core.cli", "ui"),
    "core.cluster": ("core.protocol", "core.refine", "core.experiments", "core.cli", "ui"),
    "core.protocol": ("core.cluster", "core.refine", "core.experiments", "core.cli", "ui"),
    "core": ("ui",),
}


def project_modules() -> dict[str, Path]:
    modules = {}
    for package in PROJECT_PACKAGES:
        for path in sorted((ROOT / package).rglob("*.py")):
            name = ".".join(path.relative_to(ROOT).with_suffix("").parts)
            modules[name.removesuffix(".__init__")] = path
    return modules


def resolve(name: str, modules: dict[str, Path]) -> str | None:
    """The project module an imported name belongs to (its longest known prefix), or None."""
    while name and name not in modules:
        name = name.rpartition(".")[0]
    return name or None


def imports_of(module: str, path: Path, modules: dict[str, Path]) -> list[tuple[str, bool]]:
    """(imported project module, imported inside a function) for every import in the file."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    inside: set[int] = set()
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            inside |= {id(child) for child in ast.walk(node) if child is not node}
    found = []
    for node in ast.walk(tree):
        names: list[str] = []
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(parts + ([base] if base else []))
            names = [f"{base}.{alias.name}" for alias in node.names] + [base]
        for name in names:
            target = resolve(name, modules)
            if target is not None and target != module and not (target == package and module.startswith(target + ".")):
                found.append((target, id(node) in inside))
    return found


def test_every_module_imports_on_its_own():
    modules = [m for m in project_modules() if not m.endswith("__main__")]
    assert "core.io.base" in modules and "ui.layout" in modules

    def run(module: str) -> tuple[str, int, str]:
        done = subprocess.run([sys.executable, "-c", f"import {module}"], cwd=ROOT, capture_output=True, text=True,
                              timeout=300)
        return module, done.returncode, done.stderr.strip().splitlines()[-1:] and done.stderr.strip().splitlines()[-1]

    with ThreadPoolExecutor(max_workers=2) as pool:
        failures = [(m, err) for m, code, err in pool.map(run, modules) if code != 0]
    assert failures == []


def test_no_project_import_inside_functions_outside_the_documented_list():
    modules = project_modules()
    offenders = []
    for module, path in modules.items():
        relative = path.relative_to(ROOT).as_posix()
        if relative.startswith(LAZY_IMPORT_ALLOWED):
            continue
        offenders += [f"{relative} imports {target} inside a function"
                      for target, lazy in imports_of(module, path, modules) if lazy]
    assert offenders == []


def test_no_import_cycles_counting_lazy_imports():
    modules = project_modules()
    graph = {m: {t for t, _ in imports_of(m, p, modules)} for m, p in modules.items()}
    cycles, state, stack = [], {}, []

    def visit(module: str) -> None:
        state[module] = 1
        stack.append(module)
        for target in sorted(graph[module]):
            if target.startswith(module + ".") or module.startswith(target + "."):
                continue  # a package and its own modules
            if state.get(target) == 1:
                cycles.append(" -> ".join(stack[stack.index(target):] + [target]))
            elif not state.get(target):
                visit(target)
        stack.pop()
        state[module] = 2

    for module in sorted(graph):
        if not state.get(module):
            visit(module)
    assert cycles == []


def test_lower_layers_do_not_import_upper_ones():
    modules = project_modules()
    offenders = []
    for module, path in modules.items():
        rule = next((prefix for prefix in sorted(FORBIDDEN, key=len, reverse=True)
                     if module == prefix or module.startswith(prefix + ".")), None)
        if rule is None:
            continue
        for target, _ in imports_of(module, path, modules):
            if any(target == bad or target.startswith(bad + ".") for bad in FORBIDDEN[rule]):
                offenders.append(f"{module} imports {target}")
    assert offenders == []


def test_the_cycle_finder_sees_a_lazy_cycle(tmp_path):
    """The checks above must be able to fail: a two-module cycle through a function-level import is found."""
    a = tmp_path / "a.py"
    a.write_text("import b\n")
    b = tmp_path / "b.py"
    b.write_text("def f():\n    import a\n")
    modules = {"a": a, "b": b}
    assert imports_of("a", a, modules) == [("b", False)]
    assert imports_of("b", b, modules) == [("a", True)]


@pytest.mark.parametrize("module", ["core.features.registry", "core.io", "core.cli.main"])
def test_light_modules_do_not_import_torch(module):
    """Registry facts, stack reading and the CLI's start-up stay free of torch (start-up time)."""
    code = f"import sys, {module}; print('torch' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "False"


def test_spec_references_resolve():
    """Docstrings and comments cite specs by their path in the repository; every cited file exists."""
    import re

    cited = re.compile(r"(?<![\w/.])((?:docs/[\w/.-]+|[A-Z][A-Z_]+)\.md)\b")
    missing = []
    for folder in ("core", "ui", "tests", "bench"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            text = path.read_text(encoding="utf-8")
            if "/work/" in text.replace("/work/main", "") and folder in ("core", "ui"):
                missing.append(f"{path.relative_to(ROOT)} names an absolute path of a development machine")
            for name in set(cited.findall(text)):
                if not ((ROOT / name).is_file() or (ROOT / "docs" / name).is_file()):
                    missing.append(f"{path.relative_to(ROOT)} cites {name}")
    assert missing == []
