"""The package layout: what the product runs never imports the research tooling.

``models/`` holds what the product loads at run time (tasks, the networks, their weights and
inference engines); ``models/training/`` holds data, degradations, training, evaluation and model
cards. Every module is parsed (not imported), and every import counts, at the top or inside a
function.
"""
from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RUNTIME = {"__init__.py", "tasks.py", "registry.py", "nets.py", "vae.py", "facemath.py", "export.py", "quantize.py"}
MAX_LINES = 400


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported(path: Path) -> set[str]:
    """Every module ``path`` imports (relative imports resolved), and ``module.name`` for each
    name taken from one (``from models import training`` gives ``models.training``)."""
    name = module_name(path)
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            found.add(module)
            found.update(f"{module}.{a.name}" for a in node.names)
        elif (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)
              and isinstance(node.args[0].value, str)
              and getattr(node.func, "attr", getattr(node.func, "id", "")) in ("import_module", "__import__")):
            found.add(node.args[0].value)
    return found


def offending(paths, forbidden: tuple[str, ...]) -> dict[str, list[str]]:
    out = {}
    for path in paths:
        bad = sorted(m for m in imported(path) if any(m == f or m.startswith(f + ".") for f in forbidden))
        if bad:
            out[str(path.relative_to(ROOT))] = bad
    return out


def test_the_import_check_sees_relative_lazy_and_dynamic_imports(tmp_path, monkeypatch):
    pkg = tmp_path / "models"
    pkg.mkdir()
    (pkg / "x.py").write_text("def f():\n    from .training import loop\n    from . import training\n"
                              "    import importlib\n    importlib.import_module('pipeline.align')\n")
    monkeypatch.setitem(globals(), "ROOT", tmp_path)
    assert offending([pkg / "x.py"], ("pipeline", "models.training")) == {
        "models/x.py": ["models.training", "models.training.loop", "pipeline.align"]}


def test_runtime_models_import_neither_pipeline_nor_training():
    runtime = sorted((ROOT / "models").glob("*.py"))
    assert {p.name for p in runtime} == RUNTIME, "models/ keeps the run-time modules; tools go in models/training/"
    assert offending(runtime, ("pipeline", "models.training")) == {}


def test_the_product_does_not_import_the_training_tools():
    product = [ROOT / "cli.py", *sorted((ROOT / "pipeline").rglob("*.py")), *sorted((ROOT / "worker").rglob("*.py"))]
    assert len(product) > 10
    assert offending(product, ("models.training",)) == {}


def test_the_worker_opens_no_media_itself():
    """Media (PyAV) is the pipeline's: the worker asks ``pipeline`` to probe, count or join."""
    assert offending(sorted((ROOT / "worker").rglob("*.py")), ("av",)) == {}


def test_no_product_module_is_over_400_lines():
    """A newcomer reads a module in one sitting: the product's modules stay at most 410 lines."""
    product = [ROOT / "cli.py", *(ROOT / "pipeline").rglob("*.py"), *(ROOT / "worker").rglob("*.py")]
    long = {str(p.relative_to(ROOT)): n for p in product if (n := len(p.read_text().splitlines())) > MAX_LINES + 10}
    assert long == {}


def test_no_models_module_is_over_400_lines():
    long = {str(p.relative_to(ROOT)): n for p in sorted((ROOT / "models").rglob("*.py"))
            if (n := len(p.read_text().splitlines())) > MAX_LINES}
    assert long == {}


def test_the_tools_write_where_the_product_reads():
    from models import registry
    from models.training import age, data, train, train_vae

    for module in (age, train, train_vae):
        assert module.WEIGHTS_DIR == registry.WEIGHTS_DIR == ROOT / "models" / "weights"
    for module in (age, data, train, train_vae):
        assert module.ROOT == ROOT
    assert data.CACHE_DIR == ROOT / "cache" / "crops"
