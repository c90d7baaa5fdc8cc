"""Pieces every method shares: the EMA teacher, cross-rank reductions, segmenter building and loading,
and the refusal of a method that needs a trained checkpoint."""

import importlib
import os
import re

import pytest
import timm
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from datamodules.errors import CheckpointError
from experiments.run import check_compatibility
from lightning_modules.distributed import all_gather_cat, all_reduce_mean, all_reduce_sum
from lightning_modules.networks.factory import build_network, load_segmenter_weights
from lightning_modules.networks.region_classifier import RegionClassifier
from lightning_modules.teachers import ema_update, labelling_mode
from tests.conftest import compose_config


def test_ema_update_moves_teacher_towards_student_by_one_minus_momentum():
    teacher, student = nn.BatchNorm1d(2), nn.BatchNorm1d(2)
    nn.init.constant_(teacher.weight, 1.0)
    nn.init.constant_(student.weight, 3.0)
    student.running_mean.fill_(5.0)
    ema_update(teacher, student, momentum=0.75)
    assert teacher.weight.tolist() == pytest.approx([1.5, 1.5])
    assert teacher.running_mean.tolist() == [5.0, 5.0]
    assert student.weight.tolist() == [3.0, 3.0]


def test_reductions_are_identities_in_one_process():
    tensor = torch.arange(3.0)
    assert all_reduce_sum(tensor) is tensor and all_reduce_mean(tensor) is tensor and all_gather_cat(tensor) is tensor


def _ddp_reductions(rank, world, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    local = torch.full((rank + 1, 2), float(rank + 1), requires_grad=True)
    summed = all_reduce_sum(local.sum(0))
    summed.sum().backward()  # differentiable: each rank's gradient is the world size
    gathered = all_gather_cat(local)
    out.put(
        (
            rank,
            summed.tolist(),
            all_reduce_mean(torch.tensor([float(rank)])).tolist(),
            gathered.tolist(),
            local.grad.tolist(),
        )
    )
    dist.destroy_process_group()


def test_reductions_across_two_processes():
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_ddp_reductions, args=(2, 29531, queue), nprocs=2, start_method="spawn")
    results = dict((r[0], r[1:]) for r in (queue.get(), queue.get()))
    for rank in (0, 1):
        summed, mean, gathered, grad = results[rank]
        assert summed == [5.0, 5.0]  # 1 row of 1s + 2 rows of 2s
        assert mean == [0.5]
        assert gathered == [[1.0, 1.0], [2.0, 2.0], [2.0, 2.0]]
        assert grad == [[2.0, 2.0]] * (rank + 1)


def small_deeplab(name: str = "deeplabv2_small", channels=(8, 8, 8, 8), freeze_bn: bool = False, dilations=(1,)):
    """A DeepLabV2 model config of a few thousand weights, built in milliseconds."""
    return {
        "name": name,
        "builder": "lightning_modules.networks.deeplabv2.build_deeplabv2",
        "backbone": "resnet18",
        "backbone_kwargs": {"channels": list(channels), "stem_width": 8},
        "aspp_dilations": list(dilations),
        "freeze_bn": freeze_bn,
    }


def test_segmenter_weights_round_trip_through_a_checkpoint(tmp_path):
    model = small_deeplab()
    torch.manual_seed(0)
    source = build_network(model, 3)
    path = tmp_path / "source.ckpt"
    torch.save({"state_dict": {f"segmenter.{k}": v for k, v in source.state_dict().items()}}, path)
    torch.manual_seed(1)
    adapted = build_network(model, 3)
    load_segmenter_weights(adapted, str(path), model)
    images = torch.randn(1, 3, 32, 32)
    assert torch.equal(source.eval()(images)[0], adapted.eval()(images)[0])
    with pytest.raises(CheckpointError, match="no weights under 'segmenter.'"):
        torch.save({"state_dict": {"other.weight": torch.zeros(1)}}, path)
        load_segmenter_weights(adapted, str(path), model)


def test_a_checkpoint_of_another_network_or_a_corrupt_one_is_named(tmp_path):
    model = small_deeplab(channels=(8, 8, 16, 16), dilations=(1, 2))
    wider = small_deeplab("deeplabv2_wide", channels=(8, 8, 16, 32), dilations=(1, 2))
    path = tmp_path / "wide.ckpt"
    state = {f"segmenter.{k}": v for k, v in build_network(wider, 3).state_dict().items()}
    torch.save({"state_dict": state, "hyper_parameters": {"model": wider}}, path)
    with pytest.raises(CheckpointError, match=r"wide.ckpt holds deeplabv2_wide, but this run builds deeplabv2_small"):
        load_segmenter_weights(build_network(model, 3), str(path), model)
    path.write_bytes(path.read_bytes()[:100])
    with pytest.raises(CheckpointError, match=r"wide.ckpt cannot be read"):
        load_segmenter_weights(build_network(model, 3), str(path), model)


RESNET = {"channels": [8, 16, 32, 64], "stem_width": 8}  # every stage changes width, as in the real ResNets


def imagenet_resnet_file(path, name="resnet18", kwargs=RESNET, wrap=lambda state: state):
    """An ImageNet ResNet weight file in torchvision's key layout (timm's is the same), fc included."""
    torch.manual_seed(0)
    state = timm.create_model(name, **kwargs).state_dict()
    torch.save(wrap(state), path)
    return state


def without_second_blocks(state):
    """A shallower ResNet's file: the second block of every stage is absent."""
    return {k: v for k, v in state.items() if ".1." not in k}


def test_imagenet_resnet_weights_load_into_deeplab_and_the_region_classifier(tmp_path):
    """A released file often wraps its weights ({'state_dict': ...}, a 'module.' prefix); fc is ImageNet's."""
    model = small_deeplab(channels=RESNET["channels"])
    path = tmp_path / "resnet18.pth"
    state = imagenet_resnet_file(path, wrap=lambda state: {"state_dict": {f"module.{k}": v for k, v in state.items()}})
    backbone = build_network({**model, "pretrained": str(path)}, 3).backbone.state_dict()
    assert backbone.keys() == {k for k in state if not k.startswith("fc.")}
    assert all(torch.equal(backbone[k], state[k]) for k in backbone)
    classifier = RegionClassifier(19, "resnet18", str(path), RESNET).resnet.state_dict()
    assert all(torch.equal(classifier[k], state[k]) for k in state if not k.startswith("fc."))
    assert classifier["fc.weight"].shape == (19, 64)


def test_imagenet_weights_of_another_depth_layout_or_width_are_refused_not_loaded_in_part(tmp_path):
    """timm's own file loading is not strict here: a ResNet-50 file in a ResNet-101 loaded half its tensors."""
    model = small_deeplab(channels=RESNET["channels"])
    cases = {
        "deeper": (lambda path: imagenet_resnet_file(path, "resnet34"), "96 tensors not in the network"),
        "shallower": (
            lambda path: imagenet_resnet_file(path, wrap=without_second_blocks),
            "tensors missing from the file",
        ),
        "caffe": (
            lambda path: imagenet_resnet_file(path, wrap=lambda state: {f"Scale.{k}": v for k, v in state.items()}),
            "Caffe DeepLab ResNet init",
        ),
        "wider": (
            lambda path: imagenet_resnet_file(path, kwargs={**RESNET, "channels": [8, 16, 32, 96]}),
            r"tensors of another shape \(layer4.0.conv1.weight \[96, 32, 3, 3\] for \[64, 32, 3, 3\]",
        ),
    }
    for case, (write_file, expected) in cases.items():
        path = tmp_path / f"{case}.pth"
        write_file(path)
        with pytest.raises(CheckpointError, match=re.escape(f"model.pretrained={path}") + ".*" + expected):
            build_network({**model, "pretrained": str(path)}, 3)
    text = tmp_path / "notes.pth"
    text.write_text("not weights")
    with pytest.raises(CheckpointError, match=re.escape(f"method.scc.classifier.network.pretrained={text} cannot be")):
        RegionClassifier(19, "resnet18", str(text), RESNET)


def test_method_that_needs_a_checkpoint_is_refused_in_one_sentence(tmp_path):
    cfg = compose_config(
        "source_only",
        "synth2real",
        tmp_path,
        "+method.requires_checkpoint=source_ckpt",
        "method.source_ckpt=null",
        "+method.checkpoint_from=source_only",
    )
    with pytest.raises(SystemExit, match=r"set method.source_ckpt=PATH.*\+method=source_only \+task=synth2real"):
        check_compatibility(cfg)


@pytest.mark.parametrize(
    "method, module_path, attribute",
    [
        ("tmt", "lightning_modules.tmt.TMT", "teacher"),
        ("mt_metric", "lightning_modules.mt_metric.MTMetric", "teacher"),
        ("bicl", "lightning_modules.bicl.BiCL", "static_labeler"),
    ],
)
def test_teachers_predict_in_eval_mode_throughout_a_lightning_run(
    run_tiny, monkeypatch, request, method, module_path, attribute
):
    # Lightning keeps the modes a module was built with and restores them after validation; a teacher must
    # label without dropout, normalising with the labelled batch's statistics (DAFormer's mean teacher).
    module_name, class_name = module_path.rsplit(".", 1)
    cls = getattr(importlib.import_module(module_name), class_name)
    modes = []
    original = cls.training_step

    def recording_step(self, batch, batch_idx):
        layers = list(getattr(self, attribute).modules())
        batch_norms = [m for m in layers if isinstance(m, nn.modules.batchnorm._BatchNorm)]
        modes.append(
            (
                self.segmenter.training,
                any(m.training for m in layers if m not in batch_norms),
                bool(batch_norms) and all(m.training for m in batch_norms),
            )
        )
        return original(self, batch, batch_idx)

    monkeypatch.setattr(cls, "training_step", recording_step)
    overrides = []
    if compose_config(method, "synth2real", "unused").method.get("requires_checkpoint"):
        overrides.append(f"method.source_ckpt={request.getfixturevalue('source_ckpt')}")
    run_tiny(method, "synth2real", *overrides)
    assert modes == [(True, False, True)] * 4  # steps 2 and 3 follow a validation


def test_labelling_mode_keeps_frozen_batch_norm_frozen():
    frozen = build_network(small_deeplab(freeze_bn=True), 3)
    batch_norms = [m for m in labelling_mode(frozen).modules() if isinstance(m, nn.BatchNorm2d)]
    assert batch_norms and not any(m.training for m in batch_norms)


def test_labelling_mode_normalises_with_the_batch_and_leaves_running_statistics_alone():
    network = build_network(small_deeplab(freeze_bn=False), 3)
    before = {k: v.clone() for k, v in network.state_dict().items()}
    images = torch.randn(4, 3, 32, 32) * 5 + 3
    labelled = labelling_mode(network)(images)[0]
    assert all(torch.equal(before[k], v) for k, v in network.state_dict().items())
    with_running_statistics = network.eval()(images)[0]
    assert not torch.allclose(labelled, with_running_statistics)
