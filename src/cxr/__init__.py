"""cxr: train, evaluate and explain chest X-ray classifiers (pneumonia vs normal) with ResNet-18."""

__version__ = "0.1.0"
