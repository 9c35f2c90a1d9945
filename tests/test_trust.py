"""cxr.trust: the out-of-distribution score, the shift tests and the label-free estimates, on
tensors and on real images through a ResNet-18."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cxr.trust.estimate import MAX_FLAGGED, calibrate, estimate_accuracy
from cxr.trust.features import LAYERS, forward_with_features, pooled_features
from cxr.trust.fit import Trust, fit_trust, stratified_draw
from cxr.trust.ood import class_gaussians, fit_detector, mahalanobis
from cxr.trust.shift import compare, mmd_test


def gaussian_features(n, d=6, shift=0.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, d, generator=g) + shift


def test_mahalanobis_matches_pytorch_ood():
    """The score cxr computes is pytorch-ood's Mahalanobis (which reports half the squared
    distance to the nearest class mean) for the same class means and precision."""
    from pytorch_ood.detector import Mahalanobis

    z, y = gaussian_features(200), torch.arange(200) % 2
    means, precision = class_gaussians(z, y, 2)
    reference = Mahalanobis(None)
    reference.mu, reference.precision = means, precision
    new = gaussian_features(30, seed=1) * 3
    assert torch.allclose(mahalanobis(new, means, precision).float(), 2 * reference.predict_features(new), rtol=1e-4)


def test_the_threshold_accepts_95_percent_of_validation_and_flags_far_points():
    y = torch.arange(400) % 2
    train = {name: gaussian_features(400, seed=k) + y[:, None] for k, name in enumerate(LAYERS)}
    yv = torch.arange(200) % 2
    val = {name: gaussian_features(200, seed=10 + k) + yv[:, None] for k, name in enumerate(LAYERS)}
    detector = fit_detector(train, y, val, 2)
    assert detector.in_distribution(detector.score(val)).mean() == pytest.approx(0.95, abs=0.006)
    far = {name: gaussian_features(50, seed=20 + k, shift=4.0) for k, name in enumerate(LAYERS)}
    assert not detector.in_distribution(detector.score(far)).any()
    near = {name: gaussian_features(200, seed=30 + k) + yv[:, None] for k, name in enumerate(LAYERS)}
    assert 0.88 <= detector.in_distribution(detector.score(near)).mean() <= 1.0  # fresh draws: about 95%


def test_stratified_draw_keeps_the_class_shares():
    labels = torch.tensor([0] * 300 + [1] * 900)
    idx = stratified_draw(labels, 400)
    assert len(idx) == 400 and (labels[idx] == 0).sum() == 100
    assert torch.equal(stratified_draw(labels, 5000), torch.arange(1200))


def test_the_kernel_test_fires_on_a_shift_and_rarely_on_two_draws_of_one_set():
    """Its false-alarm rate on two draws of one distribution stays near its level (5%)."""
    alarms = [mmd_test(gaussian_features(20, seed=2 * k), gaussian_features(20, seed=2 * k + 1), permutations=100,
                       seed=k).p_value < 0.05 for k in range(60)]
    assert np.mean(alarms) <= 0.12
    assert mmd_test(gaussian_features(20), gaussian_features(20, seed=1, shift=1.5), permutations=200).p_value < 0.01


def test_the_shift_check_combines_its_tests_and_says_so():
    rng = np.random.default_rng(0)
    ref = rng.beta(2, 2, 300)
    same = compare(np.c_[1 - rng.beta(2, 2, 40), rng.beta(2, 2, 40)], np.c_[1 - ref, ref])
    assert not same.shifted and "no shift" in same.verdict
    moved = rng.beta(8, 1, 40)
    shifted = compare(np.c_[1 - moved, moved], np.c_[1 - ref, ref], scores=rng.normal(3, 1, 40),
                      reference_scores=rng.normal(0, 1, 300), flagged_share=0.6)
    assert shifted.shifted and "differ" in shifted.verdict and "60%" in shifted.verdict
    assert shifted.p_value == pytest.approx(min(1.0, 2 * min(t.p_value for t in shifted.tests)))
    few = compare(np.c_[1 - ref[:8], ref[:8]], np.c_[1 - ref, ref])
    assert "fewer than 20" in few.verdict


def test_atc_and_doc_return_validation_accuracy_on_validation_and_follow_a_confidence_drop():
    rng = np.random.default_rng(0)
    p1 = rng.beta(0.5, 0.5, 2000)
    y = (rng.random(2000) < p1).astype(int)  # calibrated by construction
    probs = np.c_[1 - p1, p1]
    cal = calibrate(probs, y, 0.5)
    same = estimate_accuracy(probs, 0.5, cal)
    assert same.atc == pytest.approx(cal.accuracy, abs=0.002) and same.doc == pytest.approx(cal.accuracy)
    assert same.atc_ci[0] <= same.atc <= same.atc_ci[1]
    q = rng.beta(2, 2, 2000)  # less confident images, still calibrated
    truth = np.mean(((rng.random(2000) < q).astype(int)) == (q >= 0.5))
    harder = estimate_accuracy(np.c_[1 - q, q], 0.5, cal)
    # a calibrated model's accuracy is its mean confidence, so DoC follows the drop; ATC falls with it
    assert abs(harder.doc - truth) < 0.03 and harder.atc < same.atc - 0.1


def test_no_estimate_when_many_images_are_flagged():
    probs = np.full((10, 2), 0.5)
    cal = calibrate(probs, np.zeros(10, int), 0.5)
    accepted = np.array([True] * 7 + [False] * 3)
    refused = estimate_accuracy(probs, 0.5, cal, accepted)
    assert 0.3 > MAX_FLAGGED and not refused.trusted and refused.atc is None
    assert "no estimate of accuracy can be trusted" in refused.verdict
    assert estimate_accuracy(probs, 0.5, cal, np.ones(10, bool)).trusted


def test_pooled_features_are_the_stage_means_and_the_hooks_go():
    from cxr.training.model import build_model

    net = build_model(None).eval()
    x = torch.randn(2, 3, 64, 64)
    with pooled_features(net) as store:
        net(x)
    expected = net.layer1(net.maxpool(net.relu(net.bn1(net.conv1(x))))).mean((2, 3))
    assert torch.allclose(store["layer1"], expected, atol=1e-5)
    assert [store[k].shape[1] for k in LAYERS] == [64, 128, 256, 512]
    assert all(not m._forward_hooks for m in (net.layer1, net.layer2, net.layer3, net.layer4))


@pytest.mark.slow
def test_real_far_images_are_flagged_and_dev_test_images_mostly_not(shared_data):
    """On real X-rays, through a ResNet-18 (untrained: what the score needs is features that tell
    images apart, not a classifier): a photograph, text, noise and inverted films are flagged;
    nearly all unseen dev-test X-rays are not."""
    from cxr.data.folders import list_split
    from cxr.data.loading import load_images
    from cxr.training.model import build_model

    torch.manual_seed(0)
    net = build_model(None).eval()
    train = [s for s in list_split(shared_data, "train")]
    picked = [train[i] for i in np.random.default_rng(0).choice(len(train), 260, replace=False)]
    images = load_images([s.path for s in picked], 64, workers=2)
    labels = torch.tensor([s.label for s in picked])
    trust = fit_trust(net, "none", images[:200], labels[:200], images[200:], labels[200:], "cpu")
    test = list_split(shared_data, "test")
    unseen = load_images([s.path for s in test[::12]], 64, workers=2)
    g = torch.Generator().manual_seed(0)
    yy, xx = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    far = torch.stack([torch.randint(0, 256, (1, 64, 64), generator=g, dtype=torch.uint8),  # noise
                       ((xx * 4) % 256).to(torch.uint8)[None],                                # a gradient
                       (((yy // 6) % 2) * 255 * ((xx % 5) > 1)).to(torch.uint8)[None],         # lines of "text"
                       *(255 - unseen[:5])])                                                   # inverted films
    _, feats = forward_with_features(net, far, "cpu")
    assert not trust.detector.in_distribution(trust.detector.score(feats)).any()
    _, feats = forward_with_features(net, unseen, "cpu")
    assert trust.detector.in_distribution(trust.detector.score(feats)).mean() >= 0.8
    # the statistics survive the checkpoint's format (plain tensors, weights_only)
    restored = Trust.from_checkpoint({"trust": trust.to_dict()})
    assert np.allclose(restored.detector.score(feats), trust.detector.score(feats))


def test_confidence_is_continuous_at_any_threshold():
    """At a threshold other than 0.5 the decided class's probability would jump at the threshold;
    the margin-based confidence is 0.5 there and rises on both sides."""
    from cxr.trust.estimate import confidence

    p = np.array([0.05, 0.0736, 0.074, 0.2, 0.9])
    c = confidence(np.c_[1 - p, p], 0.074)
    assert abs(c[1] - 0.5) < 0.01 and abs(c[2] - 0.5) < 0.01 and c[0] > c[1] and c[4] > c[3] > c[2]
    q = np.array([0.1, 0.4, 0.7])
    assert np.allclose(confidence(np.c_[1 - q, q], 0.5), [0.9, 0.6, 0.7])


def test_too_few_validation_images_store_no_statistics(tmp_path):
    from cxr.trust.fit import store_trust

    from .helpers import fake_images, make_run_dir

    run = make_run_dir(tmp_path / "run")
    images, labels = fake_images(12)
    assert store_trust(run / "best.pt", images[:11], labels[:11], images[11:], labels[11:], "cpu") is None
    from cxr.training.checkpoint import load_checkpoint

    assert "trust" not in load_checkpoint(run / "best.pt")


def test_a_labelled_folder_reads_the_models_label_set(tmp_path):
    from cxr.evaluation.check import folder_images

    from .helpers import write_png

    for name in ("NORMAL/IM-0001-0001.png", "PNEUMONIA/person1_virus_1.png", "PNEUMONIA/person2_bacteria_2.png"):
        write_png(tmp_path / name, 1)
    _, pneumonia = folder_images(tmp_path)
    _, three = folder_images(tmp_path, "three-way")
    assert sorted(pneumonia.tolist()) == [0, 1, 1] and sorted(three.tolist()) == [0, 1, 2]


@pytest.mark.parametrize("k", [2, 3])
def test_many_draws_at_once_decide_as_compare_does_one_at_a_time(k):
    from cxr.trust.shift import compare, shifted_draws

    rng = np.random.default_rng(k)
    ref_probs = rng.dirichlet(np.ones(k), 60)
    ref_scores = rng.normal(0, 1, 60)
    draws, n = 40, 15
    shift = np.linspace(0, 2, draws)[:, None]  # from none to far: both verdicts occur
    probs = np.stack([rng.dirichlet(np.ones(k) + np.array([2 * s[0]] + [0] * (k - 1)), n) for s in shift])
    scores = rng.normal(0, 1, (draws, n)) + shift
    one_by_one = [compare(probs[d], ref_probs, scores[d], ref_scores).shifted for d in range(draws)]
    assert 0 < sum(one_by_one) < draws
    assert shifted_draws(probs, ref_probs[None], scores, ref_scores[None]).tolist() == one_by_one
    # each draw against a reference of its own (the false-alarm rate: a draw against the rest of its set)
    refs_p, refs_s = np.stack([ref_probs] * draws), np.stack([ref_scores + d / draws for d in range(draws)])
    assert shifted_draws(probs, refs_p, scores, refs_s).tolist() == [
        compare(probs[d], refs_p[d], scores[d], refs_s[d]).shifted for d in range(draws)]
