"""The one entry point: ``python -m experiments.run +method=NAME +task=NAME [key=value ...]``.

Composes the Hydra config, refuses an incompatible method x task pair in one sentence, then trains
(unless ``train=false``) and evaluates on the target, writing into ``run_dir``: the resolved
``config.yaml``, ``checkpoints/{last,best}.ckpt``, CSV/W&B logs and ``results.json``.
"""

from __future__ import annotations

import difflib
import json
import logging
import math
import os
import sys
from pathlib import Path

from datamodules.errors import CheckpointError, ConfigError, DatasetLayoutError, require_choice

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
log = logging.getLogger("experiments.run")


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def compose_config(overrides: list[str]):
    """The composed project config for ``overrides``, outside ``hydra.main`` (benchmark, probe, tests). The caller
    passes ``run_dir``: it defaults to Hydra's output directory, which exists only under ``hydra.main``."""
    from hydra import compose, initialize_config_dir

    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        return compose("config", overrides=overrides)


# The config groups a run picks from with GROUP=NAME (method and task are required).
CHOSEN_GROUPS = ("method", "task", "arch", "model", "trainer", "logger", "seco_psa")
# Groups that only one method's config has: choosing them under another method is refused by name.
METHOD_GROUPS = {"seco_psa": "seco"}


def check_choices(argv: list[str]) -> str | None:
    """One sentence when +method / +task is missing or a group's choice is unknown (Hydra's own message is a page).
    A multirun's comma list is checked item by item."""
    for group in CHOSEN_GROUPS:
        values = [a.split("=", 1)[1] for a in argv if a.startswith((f"+{group}=", f"{group}="))]
        choices = ", ".join(available(group))
        if not values and group in ("method", "task"):
            return f"Choose a {group} with +{group}=NAME; available: {choices}."
        unknown = [v for v in values[-1].split(",") if v not in available(group)] if values else []
        if unknown and "(" not in values[-1]:
            return f"Unknown {group} '{unknown[0]}'; available: {choices}."
    methods = [a.split("=", 1)[1] for a in argv if a.startswith("+method=")]
    for group, owner in METHOD_GROUPS.items():
        if any(a.startswith(f"{group}=") for a in argv) and methods and methods[-1] != owner:
            return f"{group} is a setting of +method={owner}, not of +method={methods[-1]}."
    return None


def check_keys(argv: list[str]) -> str | None:
    """One sentence for a ``key=value`` whose key the composed config lacks, with the nearest keys. Hydra's own
    message suggests ``+key=value``, which would add a key that nothing reads."""
    from omegaconf import OmegaConf

    assignments = [a.split("=", 1)[0] for a in argv if "=" in a and not a.startswith(("+", "~", "-", "hydra."))]
    keys = [k for k in assignments if k not in CHOSEN_GROUPS and "/" not in k and "@" not in k]
    if not keys or any(a in ("-m", "--multirun") for a in argv):
        return None
    choices = [a for a in argv if a.startswith("+") or a.split("=", 1)[0] in CHOSEN_GROUPS]
    tree = OmegaConf.to_container(compose_config(choices), resolve=False)  # a default may name Hydra's runtime
    leaves = [name for name, _ in config_leaves(tree)]
    paths = {".".join(name.split(".")[:depth]) for name in leaves for depth in range(1, name.count(".") + 2)}
    for key in keys:
        if key not in paths:
            nearest = difflib.get_close_matches(key, leaves, n=3, cutoff=0.75)
            hint = f"; did you mean {' or '.join(nearest)}?" if nearest else " (+key=value adds a new key)."
            return f"Unknown config key '{key}'{hint}"
    return None


def config_leaves(tree: dict, prefix: str = ""):
    """(dotted key, value) of every leaf of a config tree."""
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            yield from config_leaves(value, f"{prefix}{key}.")
        else:
            yield f"{prefix}{key}", value


def normalise_overrides(argv: list[str]) -> list[str]:
    """``+model=tiny`` is accepted as ``model=tiny`` (the model size is a choice the task already made), and
    ``run_dir=X`` becomes Hydra's output directory, so ``.hydra/`` and ``run.log`` land in X too."""
    multirun = any(a in ("-m", "--multirun") for a in argv)
    normalised = []
    for argument in argv:
        if argument.startswith("+model="):
            argument = argument[1:]
        elif argument.startswith("run_dir="):
            argument = f"hydra.{'sweep' if multirun else 'run'}.dir={argument.split('=', 1)[1]}"
        normalised.append(argument)
    return normalised


def check_compatibility(cfg) -> None:
    method, task, data = cfg.method, cfg.task, cfg.data
    if method.task_kind != task.kind:
        raise SystemExit(
            f"Method '{method.name}' works on {method.task_kind} tasks, but task '{task.name}' is a "
            f"{task.kind} task; pick a {method.task_kind} task."
        )
    if "src" in method.streams and data.labelled_domain == "source" and data.get("source") is None:
        raise SystemExit(
            f"Method '{method.name}' needs labelled source data, but task '{task.name}' has no source "
            f"dataset; use data.labelled_domain=target for a supervised target run."
        )
    required = method.get("requires_checkpoint")
    if required and not method.get(required):
        raise SystemExit(
            f"Method '{method.name}' adapts a trained model: set method.{required}=PATH, e.g. the "
            f"checkpoints/last.ckpt of `python -m experiments.run +method={method.checkpoint_from} "
            f"+task={task.name}`."
        )


# The modes wandb.Settings accepts.
WANDB_MODES = ("online", "offline", "shared", "disabled", "dryrun", "run")


def build_loggers(cfg, resolved: dict, run_dir: Path, resume_step: int | None) -> list:
    from experiments.run_dir import ResumingCSVLogger
    from experiments.wandb_run import build_wandb_logger

    loggers = []
    if cfg.logger.wandb.enabled:
        chosen = cfg.logger.wandb.mode or os.environ.get("WANDB_MODE")
        mode = chosen or ("online" if wandb_api_key() else "offline")
        require_choice("logger.wandb.mode (or WANDB_MODE)", mode, WANDB_MODES)
        reason = "as chosen" if chosen else "no API key found"
        loggers.append(build_wandb_logger(cfg, resolved, run_dir, mode, resume_step, reason))
    if cfg.logger.csv.enabled:
        loggers.append(ResumingCSVLogger(save_dir=str(run_dir), name="csv", version="", resume_step=resume_step))
    return loggers


def wandb_api_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    netrc = Path.home() / ".netrc"
    return netrc.is_file() and "api.wandb.ai" in netrc.read_text()


def build_module(cfg: dict):
    """The method's LightningModule, ``module._target_`` of its yaml, given the whole resolved config as ``cfg``."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(cfg["module"], cfg=cfg, _recursive_=False, _convert_="all")
    except InstantiationException as error:
        # Hydra wraps what the constructor raised; the original names the bad key or file.
        raise (error.__cause__ or error) from None


def build_trainer(trainer_cfg, **arguments):
    """Lightning's Trainer from ``trainer.*``; a value it refuses (a precision, an accelerator) is one sentence."""
    import hydra
    from hydra.errors import InstantiationException

    try:
        return hydra.utils.instantiate(trainer_cfg, **arguments)
    except InstantiationException as error:
        raise ConfigError(f"trainer.*: Lightning's Trainer refused it: {error.__cause__ or error}") from None


def training_on_gpu(cfg) -> bool:
    import torch

    return torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")


def resolve_precision(precision) -> str:
    """``auto``: bf16-mixed where the GPU computes in bf16 (Ampere and newer), full precision elsewhere."""
    import torch

    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


def resolve_progress_bar(enabled) -> bool:
    """``auto``: a progress bar on a terminal only; in a log file each of its redraws would be a line of its own."""
    return sys.stderr.isatty() if enabled == "auto" else enabled


def apply_performance_options(module, cfg):
    """channels_last weights (cuDNN then runs NHWC convolutions) and optional torch.compile."""
    import torch

    channels_last = cfg.performance.channels_last
    if channels_last is True or (channels_last == "auto" and training_on_gpu(cfg)):
        module = module.to(memory_format=torch.channels_last)
    if cfg.performance.compile:
        module = torch.compile(module)
    return module


def results_table(results: dict) -> str:
    metrics = {**results.get("per_class_iou", {}), **results["metrics"]}
    header = "| " + " | ".join(metrics) + " |"
    rule = "|" + "---|" * len(metrics)
    values = "| " + " | ".join(f"{v:.2f}" for v in metrics.values()) + " |"
    return "\n".join([header, rule, values])


def run_stage(module, stage: str, trainer) -> dict:
    """A method's non-training stage (e.g. seco's pseudo-labelling): the module's ``run_<stage>(trainer)``."""
    runner = getattr(module, f"run_{stage}", None)
    if runner is None:
        stages = sorted(name[4:] for name in dir(type(module)) if name.startswith("run_"))
        raise SystemExit(
            f"Method '{module.hparams['method']['name']}' has no stage '{stage}'; available: "
            f"{', '.join(['train', *stages])}."
        )
    return runner(trainer)


def execute(cfg) -> dict:
    import lightning as L
    from omegaconf import OmegaConf

    from experiments.run_dir import check_resumed_config, claimed, resume_checkpoint

    check_compatibility(cfg)
    run_dir = Path(cfg.run_dir)
    ckpt_path = resume_checkpoint(run_dir, cfg.ckpt_path, cfg.stage, cfg.train)
    L.seed_everything(cfg.seed, workers=True)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    if ckpt_path is not None:
        check_resumed_config(run_dir, resolved)
    with claimed(run_dir, OmegaConf.to_yaml(resolved), new_run=ckpt_path is None):
        return run_in(run_dir, cfg, resolved, ckpt_path)


def run_in(run_dir: Path, cfg, resolved: dict, ckpt_path: str | None) -> dict:
    """Train (unless ``train=false``) or run the configured stage, then test; writes into the claimed ``run_dir``."""
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint

    from datamodules.build import build_datamodule
    from experiments.checkpointing import VerifiedCheckpointIO
    from experiments.console import ValidationLine
    from experiments.profiling import StepProfiler
    from experiments.resume import RNGStateCheckpoint
    from experiments.run_dir import checkpoint_step
    from experiments.wandb_run import finish_wandb
    from lightning_modules.panels import PredictionPanels

    datamodule = build_datamodule(resolved)
    module = apply_performance_options(build_module(resolved), cfg)
    # Two callbacks: Lightning writes save_last only when the monitored best improves, but resuming
    # (ckpt_path=last) and source checkpoints need the latest state at every validation.
    best = ModelCheckpoint(
        dirpath=run_dir / "checkpoints",
        filename="best",
        monitor=cfg.task.monitor,
        mode="max",
        auto_insert_metric_name=False,
        enable_version_counter=False,
    )
    last = ModelCheckpoint(
        dirpath=run_dir / "checkpoints", filename="last", monitor=None, save_top_k=1, enable_version_counter=False
    )
    profiler = StepProfiler()
    callbacks = [best, last, LearningRateMonitor("step"), profiler, ValidationLine(), RNGStateCheckpoint()]
    if cfg.logger.panels.enabled:
        callbacks.append(PredictionPanels(run_dir / "predictions", cfg.logger.panels.images))
    trainer = build_trainer(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.precision),
        enable_progress_bar=resolve_progress_bar(cfg.trainer.enable_progress_bar),
        logger=build_loggers(cfg, resolved, run_dir, checkpoint_step(ckpt_path) if ckpt_path else None),
        callbacks=callbacks,
        plugins=[VerifiedCheckpointIO()],
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,
    )
    if cfg.stage != "train":
        results = run_stage(module, cfg.stage, trainer)
        if trainer.is_global_zero:
            finish_wandb(trainer.loggers, strict_json(results))
        return results
    if cfg.train:
        # A method that writes what its training streams read (bicl's offline static labels) does so first.
        if hasattr(module, "before_fit"):
            module.before_fit(trainer)
        trainer.fit(module, datamodule=datamodule, ckpt_path=ckpt_path)
        # The final state, also when max_steps ends between validations (no callback saved it then).
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt", weights_only=False)
    trainer.test(module, datamodule=datamodule, verbose=False)
    results = {**module.last_results, **profiler.summary()}
    if trainer.is_global_zero:
        write_results(run_dir / "results.json", results)
        finish_wandb(trainer.loggers, strict_json(results))
        print(f"\n{cfg.method.name} on {cfg.task.name} (target {cfg.data.val.split}):\n{results_table(results)}")
        print(f"run directory: {run_dir}")
    return results


def strict_json(value):
    """``value`` with every non-finite float (an absent class's NaN IoU) as None, which strict JSON can hold."""
    if isinstance(value, dict):
        return {key: strict_json(item) for key, item in value.items()}
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


def write_results(path: Path, results: dict) -> None:
    """results.json as strict JSON, written whole or not at all."""
    from datamodules.files import write_atomically

    text = json.dumps(strict_json(results), indent=2, allow_nan=False)
    write_atomically(path, lambda temporary: temporary.write_text(text))


def check_types(cfg) -> None:
    """Every value given on the command line has the type of the default it replaces (a number stays a number, a
    list a list), so ``trainer.max_steps=abc`` is named here rather than failing deep inside Lightning."""
    from hydra import compose
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    groups = {path.name for path in CONFIG_DIR.iterdir() if path.is_dir()}
    choices = [o for o in HydraConfig.get().overrides.task if o.split("=")[0].lstrip("+~") in groups]
    defaults = OmegaConf.to_container(compose("config", overrides=choices), resolve=False)
    given = OmegaConf.to_container(cfg, resolve=False)
    for key, value, default in paired_leaves(given, defaults):
        if not compatible(value, default):
            raise ConfigError(f"{key}={value!r} must be {type(default).__name__} like its default {default!r}")


def check_counts(cfg) -> None:
    """The counts a run needs at least one of: torch would fail deep in the loader on a batch of 0, and Lightning
    would train nothing (0 steps) or without end (-1) where ``trainer.max_steps`` is meant."""
    counts = {"data.batch_size": cfg.data.batch_size}
    if cfg.train:
        counts["trainer.max_steps"] = cfg.trainer.max_steps
    if cfg.task.kind == "prompted":
        counts["data.max_instances"] = cfg.data.max_instances
    for key, value in counts.items():
        if value < 1:
            hint = " (train=false evaluates without training)" if key == "trainer.max_steps" else ""
            raise ConfigError(f"{key}={value} must be at least 1{hint}")
    if cfg.data.num_workers < 0:
        raise ConfigError(f"data.num_workers={cfg.data.num_workers} must be 0 (load in the main process) or more")
    if not 0 <= cfg.seed < 2**32:
        raise ConfigError(f"seed={cfg.seed} must be in [0, 2**32), the seeds numpy accepts")
    crop = cfg.data.get("crop_size")
    if crop is not None and (len(crop) != 2 or min(crop) < 1):
        raise ConfigError(f"data.crop_size={list(crop)} must be [height, width], each at least 1, or null")


def paired_leaves(given: dict, defaults: dict):
    """(key, given value, default) of every leaf both configs hold, Hydra's own settings aside."""
    default_leaves = dict(config_leaves(defaults))
    for key, value in config_leaves(given):
        if key in default_leaves and not key.startswith("hydra."):
            yield key, value, default_leaves[key]


def compatible(value, default) -> bool:
    if default is None or value is None or isinstance(default, str) or isinstance(value, str) and "${" in value:
        return True
    if isinstance(default, bool):
        return isinstance(value, bool)
    if isinstance(default, (int, float)):
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, type(default))


def one_line(error: Exception) -> str:
    """The error's own sentence; for one re-raised from a DataLoader worker, the original's last line."""
    lines = [line for line in str(error).splitlines() if line.strip()]
    last = lines[-1] if lines else type(error).__name__
    name = type(error).__name__
    return last.split(f"{name}: ", 1)[1] if f"{name}: " in last else last


def job(cfg) -> dict:
    """One run under Hydra: the errors a user can fix are one sentence on stderr and exit status 1."""
    from tqdm.contrib.logging import logging_redirect_tqdm

    from experiments.console import silence_known_noise, use_hydra_logging

    use_hydra_logging()
    silence_known_noise()
    try:
        check_types(cfg)
        check_counts(cfg)
        # Console log lines are written above the progress bars rather than through them.
        with logging_redirect_tqdm():
            return execute(cfg)
    except (ConfigError, CheckpointError, DatasetLayoutError) as error:
        if cfg.debug or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise
        print(f"error: {one_line(error)} (debug=true shows the traceback)", file=sys.stderr)
        raise SystemExit(1) from None


def main() -> None:
    argv = normalise_overrides(sys.argv[1:])
    if not any(a.startswith(("--help", "-h", "--cfg", "-c", "--info")) for a in argv):
        problem = check_choices(argv) or check_keys(argv)
        if problem:
            print(problem, file=sys.stderr)
            raise SystemExit(2)
    sys.argv = [sys.argv[0], *argv]

    import hydra
    from omegaconf import OmegaConf

    from experiments.run_dir import launch_id

    OmegaConf.register_new_resolver("launch_id", launch_id, use_cache=True, replace=True)
    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")(job)()


if __name__ == "__main__":
    main()
