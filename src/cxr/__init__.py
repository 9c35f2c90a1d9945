"""cxr: train, evaluate and explain chest X-ray classifiers (pneumonia vs normal) with ResNet-18."""

__version__ = "0.1.0"


def load_model(path, device="cpu", site=None):
    """A trained checkpoint ready for `.predict(paths_or_images)` and `.explain(...)`; `site`: decide
    with the operating point stored for that site (a model fine-tuned by `cxr adapt --finetune`)."""
    from .deploy.predict import load_model as _load

    return _load(path, device, site)


__all__ = ["load_model", "__version__"]
