"""The repository's layout holds: every method composes with every task it fits (and is refused on the others in
one sentence), its module and network resolve, and the layers import only downwards."""

from __future__ import annotations

import ast
import subprocess
from pathlib import Path

import lightning as L
import pytest
from hydra.utils import get_class, get_method

from experiments.run import available, check_compatibility, compose_config

ROOT = Path(__file__).resolve().parent.parent
PAIRS = [(method, task) for method in available("method") for task in available("task")]


def compose_pair(method: str, task: str, *overrides: str):
    return compose_config([f"+method={method}", f"+task={task}", "run_dir=/tmp/unused", *overrides])


def fits(cfg) -> bool:
    """A method fits a task of its kind that has the labelled data its streams ask for."""
    needs_source = "src" in cfg.method.streams and cfg.data.labelled_domain == "source"
    return cfg.method.task_kind == cfg.task.kind and not (needs_source and cfg.data.get("source") is None)


@pytest.mark.parametrize(("method", "task"), PAIRS, ids=[f"{m}-{t}" for m, t in PAIRS])
def test_every_method_composes_with_every_task_it_fits(method, task):
    cfg = compose_pair(method, task)
    required = cfg.method.get("requires_checkpoint")
    if required:
        cfg = compose_pair(method, task, f"method.{required}=/weights/base.ckpt")
    if not fits(cfg):
        with pytest.raises(SystemExit, match=f"'{cfg.method.name}'"):
            check_compatibility(cfg)
        return
    check_compatibility(cfg)
    assert issubclass(get_class(cfg.module._target_), L.LightningModule)
    if cfg.task.kind == "semantic":
        assert callable(get_method(cfg.model.builder))
    for key in cfg.method:  # every setting is reachable as an attribute (no paper symbols like T or lambda)
        assert key.isidentifier() and key not in ("lambda",) and len(key) > 1, key


def test_a_method_needing_a_checkpoint_is_refused_without_one():
    cfg = compose_pair("mt_metric", "synth2real")
    with pytest.raises(SystemExit, match="method.source_ckpt=PATH"):
        check_compatibility(cfg)


def test_source_only_takes_source_ckpt_without_a_plus():
    assert (
        compose_pair("source_only", "synth2real", "method.source_ckpt=/w/last.ckpt").method.source_ckpt
        == "/w/last.ckpt"
    )


def imported_modules(path: Path) -> list[str]:
    """Every module a file imports, at module level or inside functions."""
    names = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def project_imports(folder: str) -> dict[str, list[str]]:
    packages = ("datamodules", "lightning_modules", "experiments")
    return {
        str(path.relative_to(ROOT)): [m for m in imported_modules(path) if m.split(".")[0] in packages]
        for path in sorted((ROOT / folder).rglob("*.py"))
    }


def test_components_hold_math_only():
    for path, modules in project_imports("lightning_modules/components").items():
        for module in modules:
            assert module.startswith(
                ("lightning_modules.components", "lightning_modules.distributed", "datamodules.constants")
            ), f"{path} imports {module}"


def test_layers_import_downwards():
    for path, modules in project_imports("datamodules").items():
        assert all(m.startswith("datamodules") for m in modules), f"{path} imports {modules}"
    for path, modules in project_imports("lightning_modules").items():
        assert not any(m.startswith("experiments") for m in modules), f"{path} imports {modules}"
    for path, modules in project_imports("lightning_modules/networks").items():
        assert not any(
            m.startswith("lightning_modules.") and m.split(".")[1] not in ("networks", "components") for m in modules
        ), f"{path} imports {modules}"


def test_constants_import_nothing():
    assert imported_modules(ROOT / "datamodules" / "constants.py") == []


def test_library_code_has_no_function_level_project_imports():
    for folder in ("datamodules", "lightning_modules"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text())):
                if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                    inner = [n for n in ast.walk(node) if isinstance(n, (ast.Import, ast.ImportFrom))]
                    assert not inner, f"{path}:{node.lineno} imports inside {node.name}"


def test_nothing_points_outside_the_repository():
    marker = "../" + "shared/"
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True, check=True).stdout.split()
    for name in tracked:
        if name.endswith((".py", ".yaml", ".md", ".toml")):
            assert marker not in (ROOT / name).read_text(), name
