"""The SegFormer network against HuggingFace's, and the DAFormer head against its reference FLOPs:
``python -m experiments.network_speed`` (HuggingFace's ``transformers`` comes with the ``dev`` extra).

For MiT-B0 and MiT-B5 at a ``crop`` x ``crop`` batch of 2 it builds the project's network (MiT encoder + DAFormer
head, ``lightning_modules.networks.segformer``) and HuggingFace's ``SegformerForSemanticSegmentation`` (MiT + the
SegFormer all-MLP head, 256-d at B0, 768-d at B5), each in a fresh process, and prints per network: parameters,
forward GFLOPs per image (``torch.utils.flop_counter``), the training step (forward, cross-entropy, backward, SGD
step; median of ``--steps``) in float32 and under bf16 autocast, and the memory the steps add to the built model
(peak resident set on CPU, peak allocation on a GPU).

The DAFormer head's FLOPs are also computed from its definition (``daformer_head_flops``, DAFormer's
``daformer_sepaspp`` config: 256-d embeddings, depthwise-separable ASPP with dilations 1/6/12/18, 3x3 bottleneck)
and printed beside the counted ones: the implementation does the reference head's work, no more.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import multiprocessing
import statistics
import time
from typing import Sequence

import torch
import torch.nn.functional as F
from omegaconf import OmegaConf
from torch.utils.flop_counter import FlopCounterMode

from experiments.profiling import peak_memory_mb
from experiments.run import CONFIG_DIR
from lightning_modules.networks.segformer import build_segformer

# MiT sizes (NVlabs mix_transformer.py mit_b0 / mit_b5) and HuggingFace's decoder width for each.
SIZES = {
    "b0": {"embed_dims": [32, 64, 160, 256], "depths": [2, 2, 2, 2], "hf_decoder": 256},
    "b5": {"embed_dims": [64, 128, 320, 512], "depths": [3, 6, 40, 3], "hf_decoder": 768},
}
NUM_CLASSES = 19


def daformer_head_flops(
    in_channels: Sequence[int], embed_dim: int, dilations: Sequence[int], num_classes: int, height: int, width: int
) -> int:
    """Multiply-adds x 2 of DAFormer's head on features at strides 4 / 8 / 16 / 32 of a height x width image."""
    grid = (height // 4) * (width // 4)
    embed = sum(c * embed_dim * (height // s) * (width // s) for c, s in zip(in_channels, (4, 8, 16, 32)))
    fused = len(in_channels) * embed_dim
    aspp = sum(fused * embed_dim if d == 1 else fused * 9 + fused * embed_dim for d in dilations) * grid
    bottleneck = len(dilations) * embed_dim * embed_dim * 9 * grid
    return 2 * (embed + aspp + bottleneck + embed_dim * num_classes * grid)


def network_config(size: str) -> dict:
    """configs/network/segformer_paper.yaml (MiT-B5, DAFormer head) with the encoder widths and depths of ``size``."""
    config = OmegaConf.to_container(OmegaConf.load(CONFIG_DIR / "network" / "segformer_paper.yaml"))
    config.update(embed_dims=SIZES[size]["embed_dims"], depths=SIZES[size]["depths"])
    return config


def build(kind: str, size: str):
    config = network_config(size)
    if kind == "project":
        network = build_segformer(config, NUM_CLASSES)
        return network, lambda images: network(images)[0]
    from transformers import SegformerConfig, SegformerForSemanticSegmentation

    reference = SegformerConfig(
        num_labels=NUM_CLASSES,
        hidden_sizes=config["embed_dims"],
        depths=config["depths"],
        num_attention_heads=config["num_heads"],
        sr_ratios=config["sr_ratios"],
        decoder_hidden_size=SIZES[size]["hf_decoder"],
    )
    network = SegformerForSemanticSegmentation(reference)
    return network, lambda images: network(pixel_values=images).logits


def measure(kind: str, size: str, crop: int, steps: int) -> dict:
    """One network in this (fresh) process: parameters, GFLOPs per image, step times, the memory the steps add."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    network, logits_of = build(kind, size)
    network.to(device)
    row = {"network": kind, "size": size, "parameters": sum(p.numel() for p in network.parameters())}
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        logits_of(torch.zeros(1, 3, crop, crop, device=device))
    row["gflops"] = counter.get_total_flops() / 1e9
    if kind == "project":
        row["head_gflops"] = row["gflops"] - encoder_gflops(network, crop, device)
        config = network_config(size)
        reference = daformer_head_flops(
            config["embed_dims"], config["decoder_embed_dim"], config["aspp_dilations"], NUM_CLASSES, crop, crop
        )
        row["reference_head_gflops"] = reference / 1e9
    optimizer = torch.optim.SGD(network.parameters(), lr=1e-6, momentum=0.9)
    images = torch.randn(2, 3, crop, crop, device=device)
    labels = torch.randint(0, NUM_CLASSES, (2, crop, crop), device=device)
    network.train()
    built_mb = peak_memory_mb()
    for precision in ("fp32", "bf16"):
        durations = []
        for _ in range(steps + 1):  # the first step warms up
            started = time.perf_counter()
            with torch.autocast(device, dtype=torch.bfloat16, enabled=precision == "bf16"):
                logits = F.interpolate(logits_of(images), size=(crop, crop), mode="bilinear", align_corners=False)
                loss = F.cross_entropy(logits.float(), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if device == "cuda":
                torch.cuda.synchronize()
            durations.append(time.perf_counter() - started)
        row[f"step_{precision}_s"] = statistics.median(durations[1:])
    row["step_memory_mb"] = peak_memory_mb() - built_mb
    return row


def encoder_gflops(network, crop: int, device: str) -> float:
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        network.backbone(torch.zeros(1, 3, crop, crop, device=device))
    return counter.get_total_flops() / 1e9


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sizes", nargs="+", default=list(SIZES), choices=list(SIZES))
    parser.add_argument("--crop", type=int, default=512, help="square training crop (DAFormer: 512)")
    parser.add_argument("--steps", type=int, default=3, help="timed training steps per precision")
    args = parser.parse_args(argv)
    print(f"batch 2 x {args.crop} x {args.crop}, torch threads {torch.get_num_threads()}, "
          f"{'GPU ' + torch.cuda.get_device_name() if torch.cuda.is_available() else 'CPU'}")  # fmt: skip
    print("| network | MiT | parameters (M) | GFLOPs / image | head GFLOPs (reference) | step fp32 (s) | "
          "step bf16 autocast (s) | step memory (MB) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    context = multiprocessing.get_context("spawn")
    for size in args.sizes:
        for kind in ("project", "huggingface"):
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as fresh_process:
                row = fresh_process.submit(measure, kind, size, args.crop, args.steps).result()
            head = f"{row['head_gflops']:.1f} ({row['reference_head_gflops']:.1f})" if "head_gflops" in row else "-"
            name = "MiT + DAFormer head (project)" if kind == "project" else "HF SegFormer (all-MLP head)"
            print(
                f"| {name} | {size.upper()} | {row['parameters'] / 1e6:.2f} | {row['gflops']:.1f} | {head} | "
                f"{row['step_fp32_s']:.2f} | {row['step_bf16_s']:.2f} | {row['step_memory_mb']:.0f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
