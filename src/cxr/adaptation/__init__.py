"""Adaptation: a trained run and a second site's images make a new run folder.

The methods (threshold, AdaBN, TENT, fine-tuning) in one table (`methods`), the source run and what
it brings (`source`), the settings both ways share and the k-fold estimate a model may carry
(`settings`), the run folder they write (`adapt`), the fine-tuning loop with replay of the source's
images (`finetune`, `weights`) and the k-fold evaluation by patient inside the site (`kfold`; what
its folds gather, `heldout`; its table, `kfold_table`). May import reporting and below; never
deploy or the commands. It never changes the run it starts from.
"""
