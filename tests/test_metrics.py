"""Evaluation math on constructed inputs, and its reduction across two DDP processes."""

import math
import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torchmetrics.classification import MulticlassConfusionMatrix

from lightning_modules.metrics import instance_iou, mean_iou, per_class_iou
from lightning_modules.optim import poly_lr_lambda


def test_per_class_iou_from_constructed_confusion_matrix():
    # rows = truth, columns = prediction
    confusion = torch.tensor([[8, 2, 0], [1, 4, 0], [0, 0, 0]])
    iou = per_class_iou(confusion)
    assert iou[0].item() == pytest.approx(8 / (8 + 2 + 1))
    assert iou[1].item() == pytest.approx(4 / (4 + 1 + 2))
    assert math.isnan(iou[2].item())  # never in truth nor prediction: excluded from the mean
    assert mean_iou(iou, [0, 1, 2]) == pytest.approx((8 / 11 + 4 / 7) / 2)
    assert mean_iou(iou, [1]) == pytest.approx(4 / 7)


def test_synthia_subsets_come_from_one_matrix():
    from datamodules.datasets.labels import SYNTHIA_13, SYNTHIA_16

    confusion = torch.diag(torch.arange(1, 20))
    confusion[3, 4] = 5  # wall predicted as fence lowers wall and fence, which mIoU13 drops
    iou = per_class_iou(confusion)
    assert len(SYNTHIA_16) == 16 and len(SYNTHIA_13) == 13
    assert mean_iou(iou, SYNTHIA_13) == pytest.approx(1.0)
    assert mean_iou(iou, SYNTHIA_16) < 1.0


def test_confusion_matrix_ignores_255():
    metric = MulticlassConfusionMatrix(3, ignore_index=255)
    metric.update(torch.tensor([[0, 1, 2, 2]]), torch.tensor([[0, 1, 255, 2]]))
    assert metric.compute().sum().item() == 3


def test_instance_iou_thresholds_logits_at_zero():
    truth = torch.zeros(2, 4, 4)
    truth[0, :2] = 1
    truth[1, :, :1] = 1
    logits = torch.full((2, 4, 4), -1.0)
    logits[0, :2] = 2.0  # exact
    logits[1, :, :2] = 0.5  # twice the truth
    assert instance_iou(logits, truth).tolist() == pytest.approx([1.0, 0.5])


def test_poly_schedule_warms_up_then_decays_to_zero():
    factor = poly_lr_lambda(max_steps=100, power=0.9, warmup_steps=10)
    assert factor(0) == pytest.approx(0.1)
    assert factor(9) == pytest.approx(1.0)
    assert factor(50) == pytest.approx(0.5**0.9)
    assert factor(100) == 0.0


def _ddp_confusion(rank, world, port, preds, target, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world)
    metric = MulticlassConfusionMatrix(4, ignore_index=255)
    metric.update(preds[rank::world], target[rank::world])  # the datamodule's strided, unpadded share
    result = metric.compute()
    if rank == 0:
        out.put(result.tolist())
    dist.destroy_process_group()


def test_confusion_matrix_is_summed_across_two_ddp_processes():
    generator = torch.Generator().manual_seed(0)
    preds = torch.randint(0, 4, (5, 6, 6), generator=generator)  # odd count: shares differ in size
    target = torch.randint(0, 4, (5, 6, 6), generator=generator)
    target[0, 0] = 255
    single = MulticlassConfusionMatrix(4, ignore_index=255)
    single.update(preds, target)
    queue = mp.get_context("spawn").SimpleQueue()
    mp.start_processes(_ddp_confusion, args=(2, 29517, preds, target, queue), nprocs=2, start_method="spawn")
    assert torch.tensor(queue.get()).equal(single.compute())
