"""Evaluation: the only reader of test and external sets, and the numbers made from predictions.

`evaluate` applies a checkpoint to a split and writes predictions and metrics; `metrics` and
`multiclass` are pure functions of labels and probabilities; `paired`, `compare` and `seeds` test
runs against each other and aggregate over seeds from their files; `robustness` scores a model under
image shifts. May import `training`, `data` and the top modules; never reporting or above.
"""
