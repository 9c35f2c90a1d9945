"""Errors a user can act on. The CLI prints their message as one line and exits non-zero."""


class CxrError(Exception):
    """A problem with the user's input (data, weights, checkpoint, options), not a bug."""


class DataError(CxrError):
    """The data folder or an image in it cannot be used."""


class WeightsError(CxrError):
    """Pretrained weights are missing or do not fit ResNet-18."""


class CheckpointError(CxrError):
    """A file is not a usable cxr checkpoint."""
