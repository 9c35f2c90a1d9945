"""Knowing where a model can be trusted: pure functions on a network's features and probabilities.

- `features.py`: the spatial mean of each ResNet stage's output, recorded during the forward pass
  that predicts (so the score costs no second pass).
- `ood.py`: the out-of-distribution score of one image (multi-layer Mahalanobis distance to the
  training images' class means), fitted once when a model is trained and stored in its
  checkpoint with a threshold chosen on validation.
- `shift.py`: two-sample tests between a folder of images and the model's validation images.
- `estimate.py`: the model's accuracy on unlabelled images (ATC, DoC) with an interval.

Training fits (`fit.py`), and evaluation, adaptation, prediction, serving and the report all call
the same functions.
"""
