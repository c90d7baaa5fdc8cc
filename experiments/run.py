"""The one entry point: ``python -m experiments.run +method=NAME +task=NAME [key=value ...]``.

Composes the Hydra config, refuses an incompatible method x task pair in one sentence, then trains
(unless ``train=false``) and evaluates on the target, writing into ``run_dir``: the resolved
``config.yaml``, ``checkpoints/{last,best}.ckpt``, CSV/W&B logs and ``results.json``.
"""

from __future__ import annotations

import json
import logging
import os
import sys
from pathlib import Path

CONFIG_DIR = Path(__file__).resolve().parent.parent / "configs"
log = logging.getLogger("experiments.run")


def available(group: str) -> list[str]:
    return sorted(p.stem for p in (CONFIG_DIR / group).glob("*.yaml") if not p.stem.startswith("_"))


def check_choices(argv: list[str]) -> str | None:
    """One sentence when +method / +task is missing or unknown (Hydra's own message is a page)."""
    for group in ("method", "task"):
        values = [a.split("=", 1)[1] for a in argv if a.startswith((f"+{group}=", f"{group}="))]
        choices = ", ".join(available(group))
        if not values:
            return f"Choose a {group} with +{group}=NAME; available: {choices}."
        if values[-1] not in available(group):
            return f"Unknown {group} '{values[-1]}'; available: {choices}."
    return None


def normalise_overrides(argv: list[str]) -> list[str]:
    """``+model=tiny`` is accepted as ``model=tiny``: the model size is a choice the task already made."""
    return [a[1:] if a.startswith("+model=") else a for a in argv]


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


def build_loggers(cfg, run_dir: Path) -> list:
    from lightning.pytorch.loggers import CSVLogger, WandbLogger

    loggers = []
    if cfg.logger.wandb.enabled:
        mode = cfg.logger.wandb.mode or os.environ.get("WANDB_MODE") or ("online" if wandb_api_key() else "offline")
        if mode == "offline":
            log.info("W&B runs offline (no API key found); sync later with `wandb sync %s/wandb`", run_dir)
        loggers.append(
            WandbLogger(
                project=cfg.logger.wandb.project,
                entity=cfg.logger.wandb.entity,
                save_dir=str(run_dir),
                mode=mode,
                tags=list(cfg.logger.wandb.tags),
                name=f"{cfg.method.name}-{cfg.task.name}-s{cfg.seed}",
            )
        )
    if cfg.logger.csv.enabled:
        loggers.append(CSVLogger(save_dir=str(run_dir), name="csv", version=""))
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


def training_on_gpu(cfg) -> bool:
    import torch

    return torch.cuda.is_available() and cfg.trainer.accelerator in ("auto", "gpu", "cuda")


def resolve_precision(precision) -> str:
    """``auto``: bf16-mixed where the GPU computes in bf16 (Ampere and newer), full precision elsewhere."""
    import torch

    if precision != "auto":
        return precision
    return "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"


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
    import hydra
    import lightning as L
    from lightning.pytorch.callbacks import LearningRateMonitor, ModelCheckpoint
    from omegaconf import OmegaConf

    from datamodules import build_datamodule
    from experiments.profiling import StepProfiler
    from experiments.resume import RNGStateCheckpoint

    check_compatibility(cfg)
    L.seed_everything(cfg.seed, workers=True)
    run_dir = Path(cfg.run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    resolved = OmegaConf.to_container(cfg, resolve=True)
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(resolved))

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
    trainer = hydra.utils.instantiate(
        cfg.trainer,
        precision=resolve_precision(cfg.trainer.precision),
        logger=build_loggers(cfg, run_dir),
        callbacks=[best, last, LearningRateMonitor("step"), profiler, RNGStateCheckpoint()],
        default_root_dir=str(run_dir),
        use_distributed_sampler=False,
    )
    if cfg.stage != "train":
        return run_stage(module, cfg.stage, trainer)
    if cfg.train:
        trainer.fit(module, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
        # The final state, also when max_steps ends between validations (no callback saved it then).
        trainer.save_checkpoint(run_dir / "checkpoints" / "last.ckpt")
    elif cfg.ckpt_path:
        raise SystemExit("train=false evaluates the starting weights; drop ckpt_path or use train=true to resume.")
    trainer.test(module, datamodule=datamodule, verbose=False)
    results = {**module.last_results, **profiler.summary()}
    if trainer.is_global_zero:
        (run_dir / "results.json").write_text(json.dumps(results, indent=2))
        print(f"\n{cfg.method.name} on {cfg.task.name} (target {cfg.data.val.split}):\n{results_table(results)}")
        print(f"run directory: {run_dir}")
    return results


def main() -> None:
    argv = normalise_overrides(sys.argv[1:])
    if not any(a.startswith(("--help", "-h", "--cfg", "-c", "--info")) for a in argv):
        problem = check_choices(argv)
        if problem:
            print(problem, file=sys.stderr)
            raise SystemExit(2)
    sys.argv = [sys.argv[0], *argv]

    import hydra

    hydra.main(version_base="1.3", config_path=str(CONFIG_DIR), config_name="config")(execute)()


if __name__ == "__main__":
    main()
