"""Scale-out configuration: the SLURM launcher composes from the trainer's devices/nodes, precision
``auto`` resolves by hardware, channels_last converts the network."""

import torch
from hydra import compose, initialize_config_dir
from torch import nn

from experiments.run import CONFIG_DIR, apply_performance_options, resolve_precision
from tests.conftest import compose_config


def test_slurm_launcher_takes_its_shape_from_the_trainer(tmp_path):
    with initialize_config_dir(config_dir=str(CONFIG_DIR), version_base="1.3"):
        cfg = compose(
            "config",
            overrides=[
                "+method=source_only",
                "+task=gta2cs",
                f"run_dir={tmp_path}",
                "hydra/launcher=slurm",
                "trainer.devices=4",
                "trainer.num_nodes=2",
                "data.num_workers=6",
                "hydra.launcher.partition=gpu",
            ],
            return_hydra_config=True,
        )
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert (launcher.nodes, launcher.tasks_per_node, launcher.gpus_per_node) == (2, 4, 4)
    assert (launcher.cpus_per_task, launcher.partition) == (6, "gpu")


def test_precision_auto_is_full_precision_without_a_gpu():
    expected = "bf16-mixed" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "32-true"
    assert resolve_precision("auto") == expected
    assert resolve_precision("16-mixed") == "16-mixed"


def test_channels_last_converts_convolution_weights(tmp_path):
    cfg = compose_config("source_only", "synth2real", tmp_path, "performance.channels_last=true")
    module = apply_performance_options(nn.Sequential(nn.Conv2d(3, 8, 3)), cfg)
    assert module[0].weight.is_contiguous(memory_format=torch.channels_last)
    cfg = compose_config("source_only", "synth2real", tmp_path, "trainer.accelerator=cpu")
    untouched = apply_performance_options(nn.Sequential(nn.Conv2d(3, 8, 3)), cfg)
    assert untouched[0].weight.is_contiguous()
