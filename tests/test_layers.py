"""Imports point one way: cli -> engine -> methods/optim/tta -> models, tasks -> data -> measure.

Each package may import only packages of the layers below it (and the shared bottom modules),
so only the command line reads flags and no library package reaches back up into the engine.
"""

import ast
from pathlib import Path

import fastadapt

ROOT = Path(fastadapt.__file__).parent
BOTTOM = {"errors", "io", "registry", "progress", "precision", "measure", "_vmap", "config"}
# What each package may import from fastadapt (besides itself and BOTTOM).
ALLOWED = {
    "measure": set(),
    "data": {"tasks"},
    "tasks": {"data"},
    "models": set(),
    "methods": {"models", "tasks", "data"},
    "optim": {"models", "tasks", "data"},
    "tta": {"models", "tasks", "data"},
    "engine": {"methods", "optim", "tta", "models", "tasks", "data"},
    "cli": {"engine", "methods", "optim", "tta", "models", "tasks", "data"},
}


def _fastadapt_imports(path: Path, package: str) -> set[str]:
    """Top-level fastadapt packages that ``path`` (inside ``package``) imports."""
    out = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level == 0:
                if node.module and node.module.startswith("fastadapt."):
                    out.add(node.module.split(".")[1])
                continue
            up = node.level - 1  # levels above the file's own package
            parts = list(path.relative_to(ROOT).parts[:-1])
            base = parts[: len(parts) - up] if up <= len(parts) else None
            if base is None:
                continue
            target = base + (node.module.split(".") if node.module else [])
            if target:
                out.add(target[0])
            else:  # "from .. import data": the names that are modules count
                out.update(a.name for a in node.names if (ROOT / a.name).is_dir() or (ROOT / f"{a.name}.py").is_file())
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.startswith("fastadapt."):
                    out.add(alias.name.split(".")[1])
    out.discard(package)
    return {m.removesuffix(".py") for m in out}


def test_imports_point_one_way():
    wrong = []
    for package, allowed in ALLOWED.items():
        for path in sorted((ROOT / package).rglob("*.py")):
            for imported in _fastadapt_imports(path, package) - allowed - BOTTOM:
                wrong.append(f"{path.relative_to(ROOT)} imports fastadapt.{imported}")
    assert not wrong, "\n".join(wrong)


def test_only_the_cli_parses_flags():
    offenders = [str(p.relative_to(ROOT)) for p in ROOT.rglob("*.py")
                 if "argparse" in p.read_text() and p.relative_to(ROOT).parts[0] not in ("cli", "__main__.py")]
    assert not offenders, offenders
