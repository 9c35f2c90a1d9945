"""Training: from decoded images to a checkpoint.

torchvision's ResNet-18 and its weights (`model`), normalisation and augmentation on the device
(`preprocess`, `augment`, the image shifts both augmentation and the robustness benchmark draw from in
`shifts`), precision and placement (`accel`), the fit loop (`engine`), torchrun helpers
(`distributed`), the checkpoint format (`checkpoint`) and the operating point it stores
(`operating_point`). May import `data` and the top modules; never evaluation, reporting or anything
above.
"""
