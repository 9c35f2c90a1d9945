"""The figures as drawn: what a reader sees on each axis."""

from itertools import combinations

import pytest

from cxr.reporting import plots


@pytest.fixture
def drawn(monkeypatch):
    """The figures a plot function would save, kept open and drawn instead."""
    figures = []
    monkeypatch.setattr(plots, "_save", lambda fig, path: figures.append(fig))
    yield figures
    for fig in figures:
        plots.plt.close(fig)


def _boxes(ax):
    """Window extents of every text drawn inside ax (annotations, notes) and of its legend."""
    ax.figure.canvas.draw()
    renderer = ax.figure.canvas.get_renderer()
    artists = [t for t in ax.texts if t.get_text()] + ([ax.get_legend()] if ax.get_legend() else [])
    return [a.get_window_extent(renderer) for a in artists]


def test_off_scale_labels_do_not_print_over_each_other(drawn):
    # train and validation both spike at epochs 1 and 2: four values above the cut, two per epoch
    train = [12.0, 9.0, 0.6, 0.55, 0.5, 0.48, 0.47, 0.46]
    val = [11.0, 8.0, 0.65, 0.6, 0.58, 0.57, 0.56, 0.55]
    history = [{"epoch": i + 1, "train_loss": t, "val_loss": v, "train_acc": 0.5, "val_acc": 0.5}
               for i, (t, v) in enumerate(zip(train, val))]
    plots.plot_history(history, best_epoch=8, task="scratch", path=None)
    plots.plot_compare_loss({"scratch": history, "finetune": history}, path=None)
    history_loss, compare = drawn[0].axes[0], drawn[1].axes[0]
    notes = " ".join(t.get_text() for t in history_loss.texts)
    assert "epoch 1: train 12, validation 11" in notes and "epoch 2: train 9, validation 8" in notes
    for ax in (history_loss, compare):
        assert "off scale" in " ".join(t.get_text() for t in ax.texts)
        boxes = _boxes(ax)
        assert len(boxes) >= 2  # the off-scale text and the legend at least
        overlapping = [(a, b) for a, b in combinations(boxes, 2) if a.overlaps(b)]
        assert not overlapping, overlapping
