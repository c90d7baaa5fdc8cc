"""Every W&B sweep file composes: parameter sets sampled as the agent would are valid Hydra overrides
of the fixed +method/+task command, and the optimised metric is one the run logs."""

from __future__ import annotations

import itertools
import math
from pathlib import Path

import pytest
import yaml
from hydra import compose, initialize_config_dir

from experiments.run import CONFIG_DIR, check_compatibility

SWEEPS = sorted((CONFIG_DIR / "sweep").glob("*.yaml"))
GRID_LIMIT = 64


def candidate_values(spec: dict) -> list:
    """What the agent may send for one parameter: its values, or a distribution's ends and middle."""
    if "values" in spec:
        return list(spec["values"])
    if "value" in spec:
        return [spec["value"]]
    low, high = spec["min"], spec["max"]
    if spec.get("distribution", "").startswith("int") or isinstance(low, int) and isinstance(high, int):
        return [low, (low + high) // 2, high]
    if "log" in spec.get("distribution", ""):
        return [low, math.sqrt(low * high), high]
    return [low, (low + high) / 2, high]


def parameter_sets(sweep: dict) -> list[dict]:
    names = list(sweep["parameters"])
    grid = itertools.product(*(candidate_values(sweep["parameters"][n]) for n in names))
    return [dict(zip(names, values)) for values in itertools.islice(grid, GRID_LIMIT)]


def override(key: str, value) -> str:
    text = str(value).lower() if isinstance(value, bool) else str(value)
    return f"{key}={text}"


def test_there_is_a_sweep_for_every_method():
    methods = {p.stem for p in (CONFIG_DIR / "method").glob("*.yaml")} - {"oracle"}
    swept = {yaml.safe_load(p.read_text())["command"][4].split("=", 1)[1] for p in SWEEPS}
    assert methods <= swept, f"no sweep for {sorted(methods - swept)}"


@pytest.mark.parametrize("path", SWEEPS, ids=[p.stem for p in SWEEPS])
def test_sweep_parameter_sets_compose(path: Path, tmp_path):
    sweep = yaml.safe_load(path.read_text())
    command = sweep["command"]
    assert command[:4] == ["${env}", "python", "-m", "experiments.run"] and command[-1] == "${args_no_hyphens}"
    fixed = [token for token in command[4:-1]]
    assert fixed[0].startswith("+method=") and fixed[1].startswith("+task="), "+method/+task must be fixed tokens"
    sets = parameter_sets(sweep)
    assert sets
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        for parameters in sets:
            overrides = [*fixed, f"run_dir={tmp_path}", *(override(k, v) for k, v in parameters.items())]
            cfg = compose("config", overrides=overrides)
            for key, value in parameters.items():
                node = cfg
                for part in key.split("."):
                    node = node[part]
                assert str(node).lower() == str(value).lower() or node == value, (key, node, value)
            if "source_ckpt" not in parameters and cfg.method.get("requires_checkpoint"):
                continue
            check_compatibility(cfg)
    assert sweep["metric"]["name"] == cfg.task.monitor, (
        f"{path.name} optimises {sweep['metric']['name']} but the run logs {cfg.task.monitor} as its monitor"
    )
