"""Eval metrics against hand-computed values."""

import math

import pytest
import torch

from kdcli.tasks.classify import classification_metrics


def test_metrics_hand_computed():
    # 4 rows, 3 classes. predictions: 0, 1, 1, 2 ; labels: 0, 1, 2, 2
    logits = torch.log(torch.tensor([[0.8, 0.1, 0.1], [0.2, 0.7, 0.1], [0.1, 0.6, 0.3], [0.1, 0.1, 0.8]]))
    y = torch.tensor([0, 1, 2, 2])
    m = classification_metrics(logits, y, 3)
    assert m["accuracy"] == pytest.approx(0.75) and m["errors"] == 1
    # per class precision: 1, 1/2, 1 ; recall: 1, 1, 1/2 ; F1: 1, 2/3, 2/3
    assert m["precision_macro"] == pytest.approx((1 + 0.5 + 1) / 3)
    assert m["recall_macro"] == pytest.approx((1 + 1 + 0.5) / 3)
    assert m["f1_macro"] == pytest.approx((1 + 2 / 3 + 2 / 3) / 3)
    assert m["nll"] == pytest.approx(-(math.log(0.8) + math.log(0.7) + math.log(0.3) + math.log(0.8)) / 4, rel=1e-6)
    # ECE, 15 bins: confidences 0.8 (bin 12, two rows, both right), 0.7 (bin 10, right), 0.6 (bin 9, wrong)
    ece = 2 / 4 * abs(1 - 0.8) + 1 / 4 * abs(1 - 0.7) + 1 / 4 * abs(0 - 0.6)
    assert m["ece"] == pytest.approx(ece, rel=1e-5)
    assert sum(b["count"] for b in m["reliability"]) == 4


def test_perfectly_calibrated_has_zero_ece():
    logits = torch.log(torch.tensor([[0.5, 0.5]] * 4))
    y = torch.tensor([0, 1, 0, 1])  # argmax picks class 0: right half the time at confidence 0.5
    assert classification_metrics(logits, y, 2)["ece"] == pytest.approx(0.0, abs=1e-6)
