import numpy as np
import pytest
import torch
from torchmetrics.classification import BinaryJaccardIndex

from lightning_modules.metrics import CIoU, GIoU, ciou, giou, intersection_union, token_stats


def hand_case():
    """Three samples of different sizes: IoU 1/2, an empty union, and 2/4."""
    preds = [
        torch.tensor([[1, 1], [0, 0]]),
        torch.zeros(3, 3),
        torch.tensor([[1, 1, 1, 1]]),
    ]
    targets = [
        torch.tensor([[1, 0], [0, 0]]),
        torch.zeros(3, 3),
        torch.tensor([[0, 0, 1, 1]]),
    ]
    return preds, targets


def test_hand_computed_values():
    preds, targets = hand_case()
    inter, union = intersection_union(preds, targets)
    assert inter.tolist() == [1, 0, 2] and union.tolist() == [2, 0, 4]
    assert ciou(preds, targets) == pytest.approx(3 / 6)
    assert giou(preds, targets) == pytest.approx((0.5 + 1.0 + 0.5) / 3)


def test_batch_numpy_bool_and_probabilities_agree():
    g = torch.Generator().manual_seed(0)
    probs = torch.rand(4, 5, 6, generator=g)
    targets = torch.rand(4, 5, 6, generator=g) > 0.5
    as_list = [p > 0.5 for p in probs]
    assert ciou(probs, targets) == pytest.approx(ciou(as_list, list(targets)))
    assert giou(probs.numpy(), targets.numpy()) == pytest.approx(giou(as_list, list(targets)))


def test_all_empty_is_perfect_and_bad_input_raises():
    empty = [np.zeros((2, 2)), np.zeros((4, 1))]
    assert ciou(empty, empty) == 1.0 and giou(empty, empty) == 1.0
    with pytest.raises(ValueError, match="sample 0"):
        ciou([torch.zeros(2, 2)], [torch.zeros(2, 3)])
    with pytest.raises(ValueError, match="2 predictions for 1 targets"):
        giou(empty, empty[:1])
    with pytest.raises(ValueError):
        ciou([], [])


def test_binary_jaccard_index_over_concatenated_pixels_is_ciou():
    g = torch.Generator().manual_seed(1)
    sizes = [(7, 9), (12, 5), (3, 3), (10, 10)]
    preds = [torch.rand(s, generator=g) > 0.6 for s in sizes]
    targets = [torch.rand(s, generator=g) > 0.4 for s in sizes]
    jaccard = BinaryJaccardIndex()
    jaccard.update(
        torch.cat([p.flatten() for p in preds]).long(), torch.cat([t.flatten() for t in targets])
    )
    assert float(jaccard.compute()) == pytest.approx(ciou(preds, targets), abs=1e-6)


def test_metric_classes_match_functional_across_updates_and_merged_ranks():
    preds, targets = hand_case()
    for metric_cls, fn in ((CIoU, ciou), (GIoU, giou)):
        metric = metric_cls()
        metric.update(preds[:2], targets[:2])
        metric.update(preds[2:], targets[2:])
        assert float(metric.compute()) == pytest.approx(fn(preds, targets))
        rank0, rank1 = metric_cls(), metric_cls()
        rank0.update(preds[:1], targets[:1])
        rank1.update(preds[1:], targets[1:])
        rank0.merge_state(rank1)
        assert float(rank0.compute()) == pytest.approx(fn(preds, targets))
        metric.reset()
        metric.update(preds[:1], targets[:1])
        assert float(metric.compute()) == pytest.approx(0.5)


def test_token_stats():
    stats = token_stats(torch.arange(1, 101))
    assert stats == pytest.approx({"mean": 50.5, "p50": 50.5, "p95": 95.05})
    assert token_stats([64, 64]) == {"mean": 64.0, "p50": 64.0, "p95": 64.0}
    with pytest.raises(ValueError):
        token_stats([])


def test_format_metrics_adds_pointing_columns_only_with_a_grounding_head():
    from lightning_modules.cli.train import format_metrics

    plain = format_metrics({"val_ciou": 0.25, "val_giou": 0.3, "val_tokens_mean": 14.0}, ["val"])
    assert "point acc" not in plain and "| val | 0.2500 | 0.3000 | 14.0 | nan |" in plain
    metrics = {"val_ciou": 0.25, "val_giou": 0.3, "val_point_acc": 0.4, "val_ciou_hit": 0.7}
    table = format_metrics(metrics, ["val"]).splitlines()
    assert table[0].endswith("| point acc | cIoU hit | cIoU miss |")
    assert table[2].endswith("| 0.4000 | 0.7000 | nan |")  # no misses: absent, shown as nan
