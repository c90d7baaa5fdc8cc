"""Proxy-based metric learning that scores how reliable each teacher pseudo-label is (STvM: Akkaya & Halici,
"Self-training via Metric Learning for Source-Free Domain Adaptation of Semantic Segmentation", arXiv 2212.04227).

A metric network embeds the teacher's encoder features; one learnable proxy per class lives in the same
space. The metric loss is Proxy-Anchor (Kim et al., CVPR 2020), the standard proxy-based loss: the paper's
exact form could not be read (see configs/method/mt_metric.yaml). A pixel's reliability is the posterior
of its pseudo-class under the proxies, so a pixel close to its own proxy relative to the others weighs more.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from lightning_modules.components.ops import class_sums
from lightning_modules.distributed import all_reduce_sum


def proxy_similarity(embeddings: torch.Tensor, proxies: torch.Tensor) -> torch.Tensor:
    # s(x, p_c) = x·p_c / (|x| |p_c|), per pixel and class
    return torch.einsum("bdhw,cd->bchw", F.normalize(embeddings, dim=1), F.normalize(proxies, dim=1))


def proxy_anchor_loss(similarity: torch.Tensor, labels: torch.Tensor, alpha: float, delta: float) -> torch.Tensor:
    """Proxy-Anchor loss over all pixels of all ranks (sums reduced before the log, so DDP equals one big batch).

    ``similarity`` [B, C, h, w], ``labels`` [B, h, w] or its flattening (pseudo-labels, every pixel labelled).
    """
    num_classes = similarity.shape[1]
    similarity = similarity.float().permute(0, 2, 3, 1).reshape(-1, num_classes)
    positive = F.one_hot(labels.reshape(-1), num_classes).to(similarity.dtype)
    # l = 1/|P+| Σ_{p∈P+} log(1 + Σ_{x∈X_p+} e^{-α(s(x,p)-δ)}) + 1/|P| Σ_{p∈P} log(1 + Σ_{x∈X_p-} e^{α(s(x,p)+δ)})
    positive_sum = all_reduce_sum((torch.exp(-alpha * (similarity - delta)) * positive).sum(0))
    negative_sum = all_reduce_sum((torch.exp(alpha * (similarity + delta)) * (1 - positive)).sum(0))
    with_positives = all_reduce_sum(positive.sum(0).detach()) > 0
    positive_term = torch.log1p(positive_sum[with_positives]).sum() / with_positives.sum().clamp(min=1)
    negative_term = torch.log1p(negative_sum).sum() / num_classes
    return positive_term + negative_term


def normalised_softmax_loss(similarity: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Normalised-softmax (NormFace, Wang et al. 2017; Zhai & Wu, BMVC 2019) proxy loss over all pixels,
    ``similarity`` [B, C, h, w], ``labels`` [B, h, w]."""
    # l = -log( exp(σ s(x, p_ŷ)) / Σ_c exp(σ s(x, p_c)) )
    return F.cross_entropy(scale * similarity.float(), labels)


def proxy_nca_loss(similarity: torch.Tensor, labels: torch.Tensor, scale: float) -> torch.Tensor:
    """Proxy-NCA (Movshovitz-Attias et al., ICCV 2017) on unit vectors, the positive proxy left out of the
    denominator; ``scale`` is ProxyNCA++'s inverse temperature (Teh et al., ECCV 2020)."""
    # l = -log( exp(-σ d(x, p_ŷ)) / Σ_{c≠ŷ} exp(-σ d(x, p_c)) ), d = |x̂ - p̂|² = 2 - 2 s(x, p)
    logits = scale * similarity.float()
    positive = logits.gather(1, labels.unsqueeze(1)).squeeze(1)
    negatives = logits.masked_fill(F.one_hot(labels, logits.shape[1]).permute(0, 3, 1, 2).bool(), float("-inf"))
    return (negatives.logsumexp(1) - positive).mean()


def reliability_weight(similarity: torch.Tensor, pseudo_label: torch.Tensor, scale: float) -> torch.Tensor:
    """Per-pixel weight [B, H, W] in (0, 1) from similarities [B, C, H, W] and pseudo-labels [B, H, W]."""
    # w(x) = exp(scale·s(x, p_ŷ)) / Σ_c exp(scale·s(x, p_c)), ŷ the teacher's pseudo-label of x
    posterior = torch.softmax(scale * similarity.float(), dim=1)
    return posterior.gather(1, pseudo_label.unsqueeze(1)).squeeze(1)


def class_normalised_weight(
    weight: torch.Tensor, pseudo_label: torch.Tensor, num_classes: int, across_ranks: bool = True
) -> torch.Tensor:
    """Each weight divided by the mean weight of its pseudo-class over the batch (of all ranks unless
    ``across_ranks`` is false), so the weights rank pixels within a class and no class as a whole is trained less."""
    # w~(x) = w(x) / mean{w(x') : ŷ(x') = ŷ(x)}
    sums, counts = class_sums(weight.reshape(1, -1), pseudo_label.reshape(1, -1), num_classes)
    if across_ranks:
        sums, counts = all_reduce_sum(sums), all_reduce_sum(counts)
    class_mean = sums[0] / counts[0].clamp(min=1)
    return weight / class_mean[pseudo_label].clamp(min=1e-12)


def confidence_threshold_weight(probabilities: torch.Tensor, threshold: float) -> torch.Tensor:
    """The thresholded self-training baseline: weight 1 where the teacher's max probability >= threshold, else 0."""
    # w(x) = 1[max_c p_c(x) >= τ]
    return (probabilities.max(1).values >= threshold).float()


def weighted_cross_entropy(logits: torch.Tensor, pseudo_label: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Self-training loss on every pixel, each pixel's gradient scaled by its weight (mean over all pixels)."""
    # L_st = 1/N Σ_x w(x) · CE(f_student(x), ŷ(x))
    return (weight * F.cross_entropy(logits.float(), pseudo_label, reduction="none")).mean()


def correctness_histograms(
    scores: torch.Tensor, correct: torch.Tensor, pseudo_label: torch.Tensor, num_classes: int, bins: int
) -> torch.Tensor:
    """Counts [C, K, 2, bins] of K per-pixel scores in [0, 1] ([K, N]), by pseudo-class, incorrect (0) / correct (1)
    pseudo-label and score bin (bin b holds [b / bins, (b + 1) / bins)); one bincount, no loop over pixels."""
    kinds = scores.shape[0]
    score_bin = (scores.float().clamp(0, 1) * bins).long().clamp(max=bins - 1)
    kind = torch.arange(kinds, device=scores.device)[:, None]
    index = ((pseudo_label[None] * kinds + kind) * 2 + correct[None].long()) * bins + score_bin
    counts = torch.bincount(index.flatten(), minlength=num_classes * kinds * 2 * bins)
    return counts.reshape(num_classes, kinds, 2, bins).double()


def histogram_auc(histograms: torch.Tensor) -> torch.Tensor:
    """Area under the ROC curve of a score for telling correct from incorrect pseudo-labels, from the counts
    [..., 2, bins] of ``correctness_histograms``; NaN where either outcome never occurs."""
    # AUC = P(s_correct > s_incorrect) + 1/2 P(s_correct = s_incorrect), a bin's scores counted as tied
    incorrect, correct = histograms[..., 0, :], histograms[..., 1, :]
    incorrect_below = incorrect.cumsum(-1) - incorrect
    pairs = (correct * (incorrect_below + 0.5 * incorrect)).sum(-1)
    total = correct.sum(-1) * incorrect.sum(-1)
    return torch.where(total > 0, pairs / total.clamp(min=1), torch.full_like(pairs, float("nan")))


def thresholded(histograms: torch.Tensor, threshold: float) -> torch.Tensor:
    """The counts of the binary score 1[s >= threshold] in two bins, from counts of s [..., bins]."""
    bins = histograms.shape[-1]
    cut = int(round(threshold * bins))
    return torch.stack([histograms[..., :cut].sum(-1), histograms[..., cut:].sum(-1)], -1)
