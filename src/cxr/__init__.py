"""cxr: train, evaluate and explain chest X-ray classifiers (pneumonia vs normal) with ResNet-18."""

__version__ = "0.1.0"


def load_model(path, device="cpu"):
    """A trained checkpoint ready for `.predict(paths_or_images)` and `.explain(...)`."""
    from .deploy.predict import load_model as _load

    return _load(path, device)


__all__ = ["load_model", "__version__"]
