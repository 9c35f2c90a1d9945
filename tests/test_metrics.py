import pytest

from cxr.metrics import classification_metrics


def test_metrics_match_hand_computed_values():
    y = [0, 0, 0, 1, 1, 1, 1]
    p = [0.1, 0.6, 0.2, 0.9, 0.8, 0.4, 0.7]
    m = classification_metrics(y, p)
    assert m["confusion_matrix"] == [[2, 1], [1, 3]]
    assert m["n"] == 7 and m["accuracy"] == pytest.approx(5 / 7)
    assert m["per_class"]["NORMAL"] == {"accuracy": pytest.approx(2 / 3), "correct": 2, "total": 3}
    assert m["per_class"]["PNEUMONIA"] == {"accuracy": pytest.approx(3 / 4), "correct": 3, "total": 4}
    # 12 positive/negative pairs; only 0.4 < 0.6 is ranked wrongly
    assert m["roc_auc"] == pytest.approx(11 / 12)


def test_threshold_moves_decisions():
    m = classification_metrics([0, 1], [0.3, 0.35], threshold=0.32)
    assert m["confusion_matrix"] == [[1, 0], [0, 1]] and m["threshold"] == 0.32


def test_single_class_has_no_auc():
    m = classification_metrics([1, 1, 1], [0.2, 0.7, 0.9])
    assert m["roc_auc"] is None
    assert m["per_class"]["NORMAL"] == {"accuracy": None, "correct": 0, "total": 0}
