"""dual_lora_sam and the wesam baseline: LoRA branches, role assignment, losses, merged checkpoints, runs."""

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from omegaconf import OmegaConf
from segment_anything import sam_model_registry

from datamodules.errors import CheckpointError
from lightning_modules import dual_lora_sam
from lightning_modules.components.sam_adaptation import (
    alpha_is_teacher,
    background_representations,
    branch_similarity,
    foreground_representations,
    instance_contrastive_loss,
    reverse_distillation_loss,
    self_training_loss,
    triplet_loss,
)
from lightning_modules.networks.sam import build_configured_sam, build_sam, predict_instances, save_sam_checkpoint
from lightning_modules.networks.sam_lora import (
    LoRALinear,
    active_branch,
    branch_parameters,
    encode,
    inject_lora,
    inject_output_lora,
    lora_modules,
    merged_sam,
    segment,
)
from tests.conftest import compose_config, method_module

ROOT = Path(__file__).resolve().parent.parent


@pytest.fixture(autouse=True)
def one_thread():
    # Tiny SAM ops are ~1 ms; with two OpenMP threads on a shared CPU each op waits for a sibling thread.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def tiny_sam_with_branches(seed=0, **lora):
    torch.manual_seed(seed)
    sam = build_sam("tiny", image_size=64, tiny={"depth": 2, "global_attn_indexes": [1]})
    options = {"rank": 2, "alpha": 2, "targets": ["q", "v"], "layers": None, "perturbation": 0.0, **lora}
    inject_lora(
        sam,
        ["alpha", "beta"],
        options.pop("rank"),
        options.pop("alpha"),
        options.pop("targets"),
        options.pop("layers"),
        options.pop("perturbation"),
    )
    return sam.eval()


def randomise_branch(sam, name, seed=1):
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in branch_parameters(sam, name):
            parameter.copy_(0.3 * torch.randn(parameter.shape, generator=generator))


def prompts(size=64):
    masks = torch.zeros(2, size, size)
    masks[0, 8:30, 10:40], masks[1, 35:60, 20:50] = 1, 1
    return {
        "boxes": torch.tensor([[10.0, 8.0, 39.0, 29.0], [20.0, 35.0, 49.0, 59.0]]),
        "polys": masks,
        "points": torch.tensor([[[20.0, 15.0]], [[30.0, 45.0]]]),
        "point_labels": torch.ones(2, 1, dtype=torch.long),
        "instances": masks,
        "input_size": (size, size),
    }


def test_lora_injection_freezes_everything_but_the_branches():
    sam = tiny_sam_with_branches(targets=["q", "v", "proj"], layers=[1])
    trainable = {name for name, p in sam.image_encoder.named_parameters() if p.requires_grad}
    assert trainable and all(".branches." in name for name in trainable)
    assert {name.split(".")[1] for name in trainable} == {"1"}  # only block 1 carries LoRA
    assert len(lora_modules(sam)) == 2  # qkv and proj of block 1
    qkv = sam.image_encoder.blocks[1].attn.qkv
    assert set(qkv.branches["alpha"].down) == {"q", "v"} and qkv.branches["alpha"].up["q"].shape == (64, 2)


def sam_module(method: str, *overrides: str):
    """The method's module on synth_shapes, built from the composed config (no run)."""
    return method_module(method, "synth_shapes", *overrides)


@pytest.mark.parametrize("method", ["dual_lora_sam", "wesam"])
def test_methods_train_only_lora(method):
    module = sam_module(method)
    trainable = [name for name, p in module.named_parameters() if p.requires_grad]
    branches = {"dual_lora_sam": {"alpha", "beta"}, "wesam": {"student"}}[method]
    assert trainable and {name.split(".branches.")[1].split(".")[0] for name in trainable} == branches


def test_branches_start_as_gamma_and_diverge_only_where_targeted():
    sam = tiny_sam_with_branches()
    images = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        gamma = encode(sam, None, images)
        assert torch.equal(encode(sam, "alpha", images), gamma)  # B = 0 at init
        randomise_branch(sam, "alpha")
        assert not torch.allclose(encode(sam, "alpha", images), gamma)
        assert torch.equal(encode(sam, "beta", images), gamma)
        assert torch.equal(encode(sam, None, images), gamma)
        qkv = sam.image_encoder.blocks[0].attn.qkv
        tokens = torch.randn(3, 64)
        with active_branch(sam, "alpha"):
            out = qkv(tokens)
        frozen = qkv.base(tokens)
        assert torch.equal(out[:, 64:128], frozen[:, 64:128])  # k is not a target
        assert not torch.allclose(out[:, :64], frozen[:, :64])


def test_perturbation_acts_on_the_frozen_path_of_a_branch_in_training_only():
    sam = tiny_sam_with_branches(perturbation=0.5).train()
    qkv = sam.image_encoder.blocks[0].attn.qkv
    tokens = torch.randn(5, 64)
    frozen = qkv.base(tokens)
    assert torch.equal(qkv(tokens), frozen)  # gamma is never perturbed
    with active_branch(sam, "alpha"):
        perturbed = qkv(tokens)  # B = 0: the output is the perturbed frozen path alone
        assert (perturbed == 0).any() and not torch.equal(perturbed, frozen)
        qkv.eval()
        assert torch.equal(qkv(tokens), frozen)


def test_foreground_and_background_representations_are_masked_means():
    features = torch.arange(2 * 4 * 4, dtype=torch.float).view(2, 4, 4)
    logits = torch.full((1, 1, 4, 4), -5.0)
    logits[0, 0, :2, :2] = 5.0
    f, valid = foreground_representations(features, logits, 0.5)
    assert valid.tolist() == [True]
    assert torch.allclose(f[0], features[:, :2, :2].mean((1, 2)))
    b, _ = background_representations(features, logits, 0.5)
    outside = torch.ones(4, 4, dtype=torch.bool)
    outside[:2, :2] = False
    assert torch.allclose(b[0], features[:, outside].mean(1))
    empty, valid = foreground_representations(features, torch.full((1, 1, 4, 4), -5.0), 0.5)
    assert valid.tolist() == [False] and torch.equal(empty, torch.zeros(1, 2))


def test_the_branch_closer_to_gamma_is_the_teacher():
    f_gamma = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    near, far = torch.tensor([[2.0, 0.1], [0.1, 3.0]]), torch.tensor([[1.0, 1.0], [1.0, 0.2]])
    sim_near, sim_far = branch_similarity(near, f_gamma).mean(), branch_similarity(far, f_gamma).mean()
    assert sim_near > sim_far
    assert alpha_is_teacher(sim_near, sim_far) and not alpha_is_teacher(sim_far, sim_near)
    assert alpha_is_teacher(torch.tensor([0.9, 0.2]), torch.tensor([0.5, 0.4])).tolist() == [True, False]


@pytest.mark.parametrize("roles", ["image", "batch"])
def test_roles_are_assigned_per_image_or_once_per_batch(roles):
    module = sam_module("dual_lora_sam", f"method.roles={roles}")
    # image 0 (rows 0, 1): alpha nearer gamma; image 1 (rows 2, 3): beta nearer, by more; row 3 is not valid.
    sims = torch.tensor([[0.9, 0.8, 0.1, 0.9], [0.5, 0.5, 0.6, 0.0]])
    valid, image = torch.tensor([True, True, True, False]), torch.tensor([0, 0, 1, 1])
    per_image = module.role_similarities(sims, valid, image, images=2)
    if roles == "image":
        assert torch.allclose(per_image, torch.tensor([[1.7, 0.1], [1.0, 0.6]]))
        assert alpha_is_teacher(*per_image).tolist() == [True, False]
    else:  # 1.8 vs 1.6 summed over the batch: alpha teaches both images
        assert torch.allclose(per_image, torch.tensor([[1.8, 1.8], [1.6, 1.6]]))
        assert alpha_is_teacher(*per_image).tolist() == [True, True]


@pytest.mark.parametrize("selection, expected", [("predicted_iou", "beta"), ("teacher_count", "alpha")])
def test_the_selected_branch_follows_the_configured_criterion(selection, expected):
    module = sam_module("dual_lora_sam", f"method.selection={selection}", "method.predicted_iou_ema=0.5")
    module.teacher_counts.copy_(torch.tensor([30.0, 10.0]))
    iou = {"alpha": torch.tensor([[0.6], [0.7]]), "beta": torch.tensor([[0.9], [0.8]])}
    module.track_predicted_iou({b: {"box": [(None, iou[b][:1]), (None, iou[b][1:])]} for b in iou})
    assert torch.allclose(module.predicted_iou, torch.tensor([0.325, 0.425]))  # 0.5 * mean, EMA from zero
    assert module.selected_branch == expected


def test_direct_alignment_pulls_the_student_to_the_teacher_masks_and_its_iou_head_to_their_overlap():
    teacher = torch.full((1, 8, 8), -4.0)
    teacher[0, 2:6, 2:6] = 4.0
    agreeing, opposing = teacher.clone(), -teacher

    def direct(student, iou_prediction, iou_weight=1.0):
        return self_training_loss(student, teacher, iou_prediction, 20, 1, iou_weight)

    assert direct(agreeing, torch.ones(1)) < direct(opposing, torch.ones(1))
    # The IoU head learns the IoU of the student's mask with the teacher's: 1 when they agree.
    assert direct(agreeing, torch.ones(1)) < direct(agreeing, torch.zeros(1))
    assert direct(agreeing, torch.zeros(1), iou_weight=0.0) == direct(agreeing, torch.ones(1), iou_weight=0.0)
    student = torch.zeros(1, 8, 8, requires_grad=True)
    self_training_loss(student, teacher.requires_grad_(), torch.ones(1), 20, 1, 0.0).backward()
    assert (student.grad[0, 2:6, 2:6] < 0).all() and (student.grad[0, :2] > 0).all()  # descent follows the teacher
    assert teacher.grad is None  # the teacher's masks are a fixed target


def test_reverse_distillation_pushes_the_teacher_away_from_the_student():
    f_student = torch.tensor([[1.0, 0.0]], requires_grad=True)
    f_teacher = torch.tensor([[1.0, 0.2]], requires_grad=True)
    valid = torch.tensor([True])
    loss = reverse_distillation_loss(f_teacher, f_student, valid)
    assert loss.item() == pytest.approx(torch.nn.functional.cosine_similarity(f_teacher, f_student).item())
    loss.backward()
    moved = f_teacher.detach() - 0.5 * f_teacher.grad
    assert torch.nn.functional.cosine_similarity(moved, f_student.detach()) < loss.detach()
    assert f_student.grad is None
    assert reverse_distillation_loss(f_teacher, f_student, torch.tensor([False])).item() == 0


def test_triplet_loss_is_zero_when_the_student_sits_with_the_teacher_and_positive_otherwise():
    valid = torch.tensor([True])
    teacher_fg, teacher_bg = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 1.0]])
    assert triplet_loss(teacher_fg.clone(), teacher_fg, teacher_bg, 0.5, valid).item() == 0
    student = teacher_bg.clone().requires_grad_()
    loss = triplet_loss(student, teacher_fg, teacher_bg, 0.5, valid)
    assert loss.item() == pytest.approx(1.5)  # d(a,p)=1, d(a,n)=0, margin 0.5
    loss.backward()
    assert student.grad[0, 0] < 0  # descent moves the student's foreground toward the teacher's


def test_instance_contrastive_loss_prefers_matching_instances():
    embedding = torch.zeros(2, 8, 8)
    embedding[0, :4], embedding[1, 4:] = 1.0, 1.0
    logits = torch.full((2, 1, 8, 8), -8.0)
    logits[0, 0, :4], logits[1, 0, 4:] = 8.0, 8.0
    matched = instance_contrastive_loss(embedding, embedding, logits, logits, 0.3)
    swapped = instance_contrastive_loss(embedding, embedding, logits, logits.flip(0), 0.3)
    assert matched < swapped


def test_anchor_regularisers_hold_the_images_teacher_and_student_to_gamma():
    module = sam_module("dual_lora_sam")
    target = prompts()
    gamma = torch.full((2, 1, 64, 64), -8.0)
    gamma[0, 0, 8:30, 10:40], gamma[1, 0, 35:60, 20:50] = 8.0, 8.0
    gamma_embedding = torch.zeros(1, 4, 64, 64)
    gamma_embedding[0, 0, :32], gamma_embedding[0, 1, 32:] = 1.0, 1.0

    def regularisers(student_logits, teacher_logits):
        embeddings = {b: gamma_embedding.clone().requires_grad_() for b in ("alpha", "beta")}
        losses = module.anchor_regularisers(
            {0: {kind: (student_logits, None) for kind in module.prompt_kinds}},
            {"alpha": {kind: [(teacher_logits, None)] for kind in module.prompt_kinds}, "beta": None},
            embeddings,
            gamma_embedding,
            {kind: [(gamma, None)] for kind in module.prompt_kinds},
            ["alpha"],
            [target],
        )
        return losses, embeddings

    agreeing, _ = regularisers(gamma.clone(), gamma.clone())
    teacher = (-gamma).requires_grad_()
    student = (-gamma).requires_grad_()
    opposing, embeddings = regularisers(student, teacher)
    assert agreeing["anchor"] < 0.01 < opposing["anchor"]
    (opposing["anchor"] + opposing["contrastive"]).backward()
    # WeSAM's anchor dice reaches the Student's and the Teacher's masks; the
    # contrast acts on the image's Teacher branch only.
    assert student.grad.abs().sum() > 0 and teacher.grad.abs().sum() > 0
    assert embeddings["alpha"].grad.abs().sum() > 0 and embeddings["beta"].grad is None


def test_merged_branch_round_trips_as_a_plain_sam_checkpoint(tmp_path):
    sam = tiny_sam_with_branches(targets=["q", "v", "proj"])
    randomise_branch(sam, "beta")
    merged = merged_sam(sam, "beta").eval()
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    save_sam_checkpoint(merged, tmp_path / "sam.pth")
    reloaded = build_sam("tiny", tmp_path / "sam.pth", image_size=64, tiny={"depth": 2, "global_attn_indexes": [1]})
    reloaded.eval()
    images, target = torch.randn(1, 3, 64, 64), prompts()
    with torch.no_grad():
        for kind in ("box", "point", "poly"):
            from_file = predict_instances(reloaded, reloaded.image_encoder(images), [target], kind)[0]
            in_memory = predict_instances(merged, merged.image_encoder(images), [target], kind)[0]
            unmerged = predict_instances(sam, encode(sam, "beta", images), [target], kind)[0]
            assert torch.equal(from_file > 0, in_memory > 0) and torch.equal(from_file, in_memory)
            assert torch.allclose(unmerged, in_memory, atol=1e-4)
            assert torch.equal(unmerged > 0, in_memory > 0)


def test_merged_vit_b_has_exactly_the_official_key_set():
    official = sam_model_registry["vit_b"]()
    expected = {name: tuple(v.shape) for name, v in official.state_dict().items()}
    inject_lora(official, ["alpha", "beta"], 4, 4, ["q", "v", "proj"])
    merged = merged_sam(official, "alpha").state_dict()
    assert {name: tuple(v.shape) for name, v in merged.items()} == expected


@pytest.mark.parametrize("branch_view", ["strong", "weak"])
def test_branch_view_sets_the_view_each_encoder_pass_reads(branch_view, monkeypatch):
    module = sam_module("dual_lora_sam", f"method.branch_view={branch_view}").train()
    size = module.sam.image_encoder.img_size
    torch.manual_seed(0)
    weak, strong = torch.rand(2, 3, size, size), torch.rand(2, 3, size, size)
    passes = []

    def recording_segment(sam, branch, images, *args):
        view = "weak" if any(torch.equal(images[0], w) for w in weak) else "strong"
        passes.append((branch, view, len(images)))
        return segment(sam, branch, images, *args)

    monkeypatch.setattr(dual_lora_sam, "segment", recording_segment)
    loss = module.training_step({"img": weak, "img_strong": strong, "targets": [prompts(size)] * 2}, 0)
    loss.backward()
    gamma_and_branches = [(None, "weak", 2), ("alpha", branch_view, 2), ("beta", branch_view, 2)]
    assert passes[:3] == gamma_and_branches
    if branch_view == "strong":  # the Student's masks come from its branch's own pass
        assert len(passes) == 3
    else:  # one more pass per branch that is an image's Student, on the strong view of its images
        assert {view for _, view, _ in passes[3:]} == {"strong"} and sum(n for *_, n in passes[3:]) == 2
    for branch in ("alpha", "beta"):
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in branch_parameters(module.sam, branch))


def read_metrics(run_dir: Path) -> list:
    import csv

    return list(csv.DictReader((run_dir / "csv" / "metrics.csv").open()))


def test_dual_lora_sam_runs_logs_roles_and_writes_the_selected_branch(run_tiny):
    results, run_dir = run_tiny(
        "dual_lora_sam", "synth_shapes", "trainer.log_every_n_steps=1", "method.lora.placement=blocks"
    )
    assert set(results["metrics"]) == {"box", "point", "poly", "avg"}
    rows = read_metrics(run_dir)
    rates = [float(r["train/alpha_teacher_rate"]) for r in rows if r.get("train/alpha_teacher_rate")]
    assert rates and all(0 <= r <= 1 for r in rates)
    assert {f"train/loss_{term}" for term in ("direct", "anchor", "contrastive", "reverse", "triplet")} <= set(rows[0])
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    counts, predicted_iou = state["teacher_counts"], state["predicted_iou"]
    batch_size = OmegaConf.load(run_dir / "config.yaml").data.batch_size
    assert counts.sum().item() == 4 * batch_size  # every image of the 4 steps has one Teacher
    assert (predicted_iou != 0).all()  # tracked on every step (this random-init SAM predicts IoU near 0)
    selected = ("alpha", "beta")[int(predicted_iou.argmax())]
    saved = torch.load(run_dir / "sam.pth", weights_only=True)
    qkv = saved["image_encoder.blocks.0.attn.qkv.weight"]
    prefix = "sam.image_encoder.blocks.0.attn.qkv"
    scale = 1.0  # alpha / rank = 4 / 4
    expected_q = state[f"{prefix}.base.weight"][:64] + scale * (
        state[f"{prefix}.branches.{selected}.up.q"] @ state[f"{prefix}.branches.{selected}.down.q"]
    )
    assert torch.allclose(qkv[:64], expected_q, atol=1e-6)
    run_model = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml").model, resolve=True)
    assert set(saved) == set(build_configured_sam(run_model).state_dict())


def test_output_placed_branches_keep_the_encoder_frozen_and_save_the_selected_branch(run_tiny):
    results, run_dir = run_tiny("dual_lora_sam", "synth_shapes", "method.lora.placement=output")
    assert set(results["metrics"]) == {"box", "point", "poly", "avg"}
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    saved = torch.load(run_dir / "adapted_sam.pt", weights_only=False)
    assert saved["selected_branch"] == ("alpha", "beta")[int(state["predicted_iou"].argmax())]
    learned = [state[f"sam.image_encoder.branches.{b}.up.embedding"].abs().sum() > 0 for b in ("alpha", "beta")]
    assert any(learned) and set(saved["state_dict"]) == {k.removeprefix("sam.") for k in state if k.startswith("sam.")}
    run_model = OmegaConf.to_container(OmegaConf.load(run_dir / "config.yaml").model, resolve=True)
    with pytest.raises(CheckpointError, match=r"adapted_sam.pt is an adapted SAM whose LoRA sits after the image enc"):
        build_configured_sam(run_model, run_dir / "adapted_sam.pt")


def test_output_lora_runs_the_frozen_encoder_once_per_image_tensor():
    model = compose_config("dual_lora_sam", "synth_shapes", Path("unused")).model
    sam = build_configured_sam(OmegaConf.to_container(model, resolve=True))
    inject_output_lora(sam, ["alpha", "beta"], rank=4, alpha=4, perturbation=0.0)
    calls = []
    sam.image_encoder.encoder.register_forward_hook(lambda *_: calls.append(1))
    weak, strong = torch.randn(2, 3, 128, 128), torch.randn(2, 3, 128, 128)
    for branch in (None, "alpha", "beta"):
        encode(sam, branch, weak)
    assert len(calls) == 1
    with torch.no_grad():
        sam.image_encoder.branches["beta"].up["embedding"].fill_(0.1)
    alpha, beta = encode(sam, "alpha", strong), encode(sam, "beta", strong)
    assert len(calls) == 2 and not torch.allclose(alpha, beta)
    strong.mul_(2)  # changed in place: encoded again
    assert torch.allclose(encode(sam, None, strong), sam.image_encoder.encoder(strong)) and len(calls) == 4


def test_output_lora_starts_as_the_frozen_encoder_and_trains_only_its_branches():
    model = compose_config("dual_lora_sam", "synth_shapes", Path("unused")).model
    sam = build_configured_sam(OmegaConf.to_container(model, resolve=True))
    images = torch.randn(2, 3, 128, 128)
    with torch.no_grad():
        plain = sam.image_encoder(images)
    wrapper = inject_output_lora(sam, ["alpha", "beta"], rank=4, alpha=4, perturbation=0.5).eval()
    with torch.no_grad():
        assert torch.equal(encode(sam, None, images), plain)
        assert torch.allclose(encode(sam, "alpha", images), plain)  # B = 0: every branch starts as gamma
    wrapper.train()
    encode(sam, "alpha", images).pow(2).mean().backward()
    trained = {name for name, p in sam.named_parameters() if p.grad is not None and p.grad.abs().sum() > 0}
    # LoRA's zero-initialised B: the first gradient reaches B only; nothing of the encoder trains.
    assert trained == {"image_encoder.branches.alpha.up.embedding"}
    assert not any(p.requires_grad for p in wrapper.encoder.parameters())
    with pytest.raises(ValueError, match="cannot be merged"):
        merged_sam(sam, "alpha")


def test_ablation_switches_and_bf16(run_tiny):
    results, run_dir = run_tiny(
        "dual_lora_sam",
        "synth_shapes",
        "method.reverse_distillation=false",
        "method.triplet=false",
        "trainer.precision=bf16-mixed",
        "trainer.log_every_n_steps=1",
    )
    assert results["trained"] and "train/loss_reverse" not in read_metrics(run_dir)[0]
    with pytest.raises(ValueError, match="enable at least one loss"):
        run_tiny(
            "dual_lora_sam",
            "synth_shapes",
            "method.direct_alignment=false",
            "method.reverse_distillation=false",
            "method.triplet=false",
            name="none",
        )


def test_wesam_runs_with_an_ema_teacher_and_the_student_alone_trains(run_tiny):
    results, run_dir = run_tiny("wesam", "synth_shapes", "method.teacher=ema", "trainer.log_every_n_steps=1")
    assert set(results["metrics"]) == {"box", "point", "poly", "avg"}
    state = torch.load(run_dir / "checkpoints" / "last.ckpt", weights_only=False)["state_dict"]
    student = state["sam.image_encoder.blocks.0.attn.qkv.branches.student.up.q"]
    teacher = state["sam.image_encoder.blocks.0.attn.qkv.branches.teacher.up.q"]
    assert student.abs().sum() > 0 and teacher.abs().sum() > 0  # teacher followed the student by EMA
    assert teacher.abs().sum() < student.abs().sum()  # m = 0.999 lags far behind
    assert {"train/loss_self", "train/loss_anchor", "train/loss_contrastive"} <= set(read_metrics(run_dir)[0])
    with pytest.raises(ValueError, match="method.teacher"):
        run_tiny("wesam", "synth_shapes", "method.teacher=frozen", name="bad")


DDP_SCRIPT = """
import sys, torch, lightning as L
from pathlib import Path
from omegaconf import OmegaConf
sys.path.insert(0, {root!r})
from tests.conftest import compose_config
from datamodules.build import build_datamodule
from experiments.run import build_module

class DumpBranches(L.Callback):
    def on_train_end(self, trainer, module):
        state = {{k: v for k, v in module.state_dict().items()
                  if ".branches." in k or k in ("teacher_counts", "predicted_iou")}}
        torch.save(state, Path({out!r}) / f"rank{{trainer.global_rank}}.pt")

cfg = OmegaConf.to_container(compose_config("dual_lora_sam", "synth_shapes", Path({out!r}) / "run"), resolve=True)
L.seed_everything(0, workers=True)
trainer = L.Trainer(accelerator="cpu", devices=2, strategy="ddp", max_steps=3, logger=False,
                    enable_checkpointing=False, enable_progress_bar=False, limit_val_batches=0,
                    use_distributed_sampler=False, callbacks=[DumpBranches()])
trainer.fit(build_module(cfg), datamodule=build_datamodule(cfg))
"""


def test_two_process_ddp_keeps_both_branches_roles_and_selection_identical(tmp_path):
    script = tmp_path / "ddp_run.py"
    script.write_text(textwrap.dedent(DDP_SCRIPT.format(root=str(ROOT), out=str(tmp_path))))
    result = subprocess.run(
        [sys.executable, str(script)],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env={**__import__("os").environ, "OMP_NUM_THREADS": "1"},
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rank0, rank1 = (torch.load(tmp_path / f"rank{r}.pt", weights_only=True) for r in (0, 1))
    batch_size = compose_config("dual_lora_sam", "synth_shapes", tmp_path).data.batch_size
    # roles per image, counted over both ranks' images; both ranks hold the same counts and IoU estimates
    assert rank0.keys() == rank1.keys() and rank0["teacher_counts"].sum() == 3 * 2 * batch_size
    assert any(v.abs().sum() > 0 for k, v in rank0.items() if ".up." in k)  # the branches did train
    assert all(torch.equal(rank0[k], rank1[k]) for k in rank0)
