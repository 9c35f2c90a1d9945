"""Deploy: a checkpoint applied to new images.

Safe loading, prediction and CAMs for new files, ONNX/TorchScript export (`predict`), and the web
page and REST API (`serve`). May import everything below it; only the commands import it.
"""
