"""Referring-segmentation metrics (cIoU, gIoU) and token-count statistics.

Masks are binary: a pixel is foreground where its value is > 0.5, so {0,1} masks, bool masks and
probabilities all work. Inputs are a B×H×W batch or a list of H×W masks whose sizes may differ
from sample to sample (each prediction must match its own target).
"""

from collections.abc import Sequence

import numpy as np
import torch
from torchmetrics import Metric

Masks = torch.Tensor | np.ndarray | Sequence[torch.Tensor | np.ndarray]


def _binary(mask) -> torch.Tensor:
    return torch.as_tensor(mask) > 0.5


def intersection_union(preds: Masks, targets: Masks) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-sample foreground intersection and union pixel counts, each a LongTensor[N]."""
    if len(preds) != len(targets):
        raise ValueError(f"{len(preds)} predictions for {len(targets)} targets")
    inter, union = [], []
    for i, (pred, target) in enumerate(zip(preds, targets)):
        p = _binary(pred)
        t = _binary(target).to(p.device)
        if p.shape != t.shape:
            raise ValueError(f"sample {i}: prediction {tuple(p.shape)} vs target {tuple(t.shape)}")
        inter.append((p & t).sum())
        union.append((p | t).sum())
    if not inter:
        return torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long)
    return torch.stack(inter).long(), torch.stack(union).long()


def _ciou(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    total = union.sum()
    if total == 0:
        return torch.tensor(1.0, dtype=torch.float64, device=union.device)
    return inter.sum().double() / total.double()


def _ious(inter: torch.Tensor, union: torch.Tensor) -> torch.Tensor:
    empty = union == 0
    return torch.where(empty, 1.0, inter.double() / union.clamp(min=1).double())


def ciou(preds: Masks, targets: Masks) -> float:
    """Cumulative IoU: Σ intersection / Σ union over all samples (1.0 if every union is empty)."""
    inter, union = intersection_union(preds, targets)
    if len(inter) == 0:
        raise ValueError("ciou needs at least one sample")
    return float(_ciou(inter, union))


def giou(preds: Masks, targets: Masks) -> float:
    """Mean per-sample IoU; a sample whose union is empty counts 1.0, as in LISA."""
    inter, union = intersection_union(preds, targets)
    if len(inter) == 0:
        raise ValueError("giou needs at least one sample")
    return float(_ious(inter, union).mean())


class CIoU(Metric):
    """Cumulative IoU over every sample seen, summed across DDP ranks before the division."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("intersection", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")
        self.add_state("union", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Masks, targets: Masks) -> None:
        inter, union = intersection_union(preds, targets)
        self.intersection += inter.sum().to(self.intersection.device)
        self.union += union.sum().to(self.union.device)

    def compute(self) -> torch.Tensor:
        return _ciou(self.intersection, self.union).float()


class GIoU(Metric):
    """Mean per-sample IoU over every sample seen (empty union counts 1.0), exact under DDP."""

    is_differentiable = False
    higher_is_better = True
    full_state_update = False

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.add_state("iou_sum", torch.tensor(0.0, dtype=torch.float64), dist_reduce_fx="sum")
        self.add_state("count", torch.tensor(0, dtype=torch.long), dist_reduce_fx="sum")

    def update(self, preds: Masks, targets: Masks) -> None:
        inter, union = intersection_union(preds, targets)
        self.iou_sum += _ious(inter, union).sum().to(self.iou_sum)
        self.count += len(inter)

    def compute(self) -> torch.Tensor:
        return (self.iou_sum / self.count.clamp(min=1)).float()


def token_stats(counts) -> dict[str, float]:
    """Mean, median and 95th percentile of per-image visual token counts."""
    values = np.asarray(torch.as_tensor(counts).flatten().cpu(), dtype=np.float64)
    if values.size == 0:
        raise ValueError("token_stats needs at least one count")
    return {
        "mean": float(values.mean()),
        "p50": float(np.percentile(values, 50)),
        "p95": float(np.percentile(values, 95)),
    }


# What `svp train` / `svp eval` report per eval split, in this order (`<split>_<name>` in
# metrics.json, `<stage>/<split>/<name>` in TensorBoard).
SPLIT_METRICS = (
    "ciou",
    "giou",
    "tokens_mean",
    "tokens_p50",
    "tokens_p95",
    "seq_len_mean",
    "point_acc",
    "ciou_hit",
    "ciou_miss",
)


class SplitMetrics(torch.nn.Module):
    """Everything one eval split accumulates: cIoU and gIoU, visual tokens and sequence lengths
    per sample and, with a grounding pointer, which sentences it pointed right at (hits) and the
    cIoU of the hits and of the misses."""

    def __init__(self) -> None:
        super().__init__()
        self.ciou, self.giou = CIoU(), GIoU()
        self.ciou_hit, self.ciou_miss = CIoU(), CIoU()
        self.tokens: list[int] = []
        self.seq_len: list[int] = []
        self.hits: list[int] = []

    def update(self, preds, targets, tokens, seq_len, hits: torch.Tensor | None = None) -> None:
        self.ciou.update(preds, targets)
        self.giou.update(preds, targets)
        self.tokens.extend(tokens.tolist())
        self.seq_len.extend(seq_len.tolist())
        if hits is not None:
            self.hits.extend(hits.long().tolist())
            for metric, keep in ((self.ciou_hit, hits), (self.ciou_miss, ~hits)):
                picked = keep.nonzero()[:, 0].tolist()
                metric.update([preds[i] for i in picked], [targets[i] for i in picked])

    def compute(self, gather) -> dict[str, torch.Tensor | float]:
        """The split's metrics (`SPLIT_METRICS` names); `gather` joins a list across DDP ranks.
        Resets the accumulators."""
        out: dict[str, torch.Tensor | float] = {"ciou": self.ciou.compute()}
        out["giou"] = self.giou.compute()
        counts, lens = gather(self.tokens), gather(self.seq_len)
        if counts:
            out.update({f"tokens_{k}": v for k, v in token_stats(counts).items()})
            out["seq_len_mean"] = float(np.mean(lens))
        hits = gather(self.hits)
        if hits:  # a sentence without a target counts as a miss
            out["point_acc"] = float(np.mean(hits))
            for name, metric, n in (
                ("ciou_hit", self.ciou_hit, sum(hits)),
                ("ciou_miss", self.ciou_miss, len(hits) - sum(hits)),
            ):
                value = metric.compute()
                if n:
                    out[name] = value
        for metric in (self.ciou, self.giou, self.ciou_hit, self.ciou_miss):
            metric.reset()
        self.tokens, self.seq_len, self.hits = [], [], []
        return out
