"""A checkpoint as a file that runs without cxr: ONNX or TorchScript, the whole path from a decoded
image to the probability inside the graph, and the out-of-distribution score as a second output
when the checkpoint stores its statistics; a side file (OUT.json) with the input contract."""

from __future__ import annotations

from pathlib import Path

import torch

from ..data.labels import probability_key
from ..errors import CxrError
from ..files import atomic_write, write_json
from ..training.preprocess import normalize
from ..trust.fit import Trust
from .predict import load_model


class Deployable(torch.nn.Module):
    """The whole path from a decoded image to P(PNEUMONIA), as one graph to export: uint8
    grayscale (N, 1, S, S) in; the task's intensity normalisation (histogram equalisation, or
    per-image standardisation), the ImageNet scaling, the network and softmax(logits / T) inside;
    (N,) P(PNEUMONIA) out. What cxr predict computes, so an exported model cannot be fed wrongly."""

    def __init__(self, net: torch.nn.Module, intensity: str, temperature: float, every_class: bool = False,
                 trust: Trust | None = None):
        super().__init__()
        self.net, self.intensity, self.temperature = net, intensity, float(temperature)
        self.every_class = every_class  # (N, K) probabilities out instead of (N,) P(class 1)
        self.scored = trust is not None  # a second output: each image's out-of-distribution score
        if trust is not None:
            d = trust.detector
            assert tuple(d.layers) == ("layer1", "layer2", "layer3", "layer4")
            for k, (m, p) in enumerate(zip(d.means, d.precisions)):
                self.register_buffer(f"mean{k}", m.float().clone())
                self.register_buffer(f"precision{k}", p.float().clone())
            self.register_buffer("center", d.center.float().clone())
            self.register_buffer("scale", d.scale.float().clone())

    def forward(self, image: torch.Tensor):
        x = normalize(image, image.device, self.intensity)
        if not self.scored:
            logits = self.net(x)
            probs = torch.softmax(logits.float() / self.temperature, 1)
            return probs if self.every_class else probs[:, 1]
        net = self.net  # the stages one by one, as ResNet.forward runs them, to read each one's output
        x = net.maxpool(net.relu(net.bn1(net.conv1(x))))
        distances = []
        for k, stage in enumerate((net.layer1, net.layer2, net.layer3, net.layer4)):
            x = stage(x)
            d = x.float().mean((2, 3))[:, None, :] - getattr(self, f"mean{k}")[None]       # (N, K, C)
            distances.append(((d @ getattr(self, f"precision{k}")) * d).sum(-1).min(1).values)
        logits = net.fc(torch.flatten(net.avgpool(x), 1))
        probs = torch.softmax(logits.float() / self.temperature, 1)
        score = ((torch.stack(distances, 1) - self.center) / self.scale).mean(1)
        return (probs if self.every_class else probs[:, 1]), score


def export_model(checkpoint_path: Path, fmt: str, out: Path, site: str | None = None) -> tuple[Path, Path]:
    """Write the model as ONNX or TorchScript (input: (N, 1, S, S) uint8 grayscale, decoded and
    resized as cxr does; output: (N,) P(PNEUMONIA), temperature applied; for a checkpoint with
    out-of-distribution statistics, a second output (N,) ood_score) and OUT.json beside it with the
    input contract, the operating point and the score's threshold; `site`: as the model decides and
    flags at that site (checkpoint.for_site)."""
    model = load_model(checkpoint_path, site=site)
    net = model.net.to(memory_format=torch.contiguous_format).eval()
    many = len(model.classes) > 2
    graph = Deployable(net, model.intensity, model.temperature, every_class=many, trust=model.trust).eval()
    output = "probabilities" if many else probability_key(model.classes[1])
    example = torch.zeros(2, 1, model.image_size, model.image_size, dtype=torch.uint8)  # batch 2: dynamic
    out = Path(out)
    if fmt == "torchscript":
        with torch.no_grad():
            traced = torch.jit.trace(graph, example)
        atomic_write(out, lambda p: torch.jit.save(traced, str(p)))
    elif fmt == "onnx":
        def write(p: Path) -> None:
            torch.onnx.export(graph, (example,), str(p), dynamo=True, verbose=False, input_names=["image"],
                              output_names=[output, *(["ood_score"] if graph.scored else [])],
                              dynamic_shapes=({0: torch.export.Dim("batch")},),
                              external_data=False)

        atomic_write(out, write)
    else:
        raise CxrError(f"--format {fmt}: choose onnx or torchscript")
    sidecar = out.with_name(out.name + ".json")
    write_json(sidecar, {
        "format": fmt, "input": "uint8 (N, 1, S, S) grayscale", "input_size": model.image_size,
        "preprocessing": "outside the model: decode to 8-bit grayscale (16-bit / 257; colour via ITU-R 601 luma; "
                         "DICOM: modality LUT, VOI LUT or window, MONOCHROME1 inverted), resize to (S, S) bilinear "
                         "(cxr.images.load_image). Inside the model: the intensity normalisation, scaling and "
                         "the temperature",
        "intensity": model.intensity, "class_names": list(model.classes),
        "output": (f"probabilities (N, {len(model.classes)}): P of each class in class_names order, temperature "
                   "already applied" if many else f"{output} (N,): P({model.classes[1]}), temperature already applied"),
        "temperature": model.temperature, "threshold": None if many else model.threshold,
        "label": ("the class of highest probability" + ("; the pneumonia reading: PNEUMONIA when 1 - P(NORMAL) >= "
                                                        "0.5" if "NORMAL" in model.classes else "")
                  if many else f"{model.classes[1]} when {output} >= threshold, else {model.classes[0]}"),
        "task": model.task, "labels": model.config.labels,
        "ood_score": ({"output": "ood_score (N,), the second output: the multi-layer Mahalanobis score of cxr.trust.ood "
                       "(higher: less like the training images), in float32 (cxr computes it in float64: they agree "
                       "to about 1e-4)", "threshold": model.trust.detector.threshold,
                       "flag": "an image scoring above the threshold is not like the chest X-rays this model was "
                               "trained on; its probability means little",
                       "threshold_chosen_on": model.describe_trust()["threshold_chosen_on"]}
                      if model.trust else None),
        "site": site,  # None: the checkpoint's own point; else the site's, as `cxr predict --site` decides
    })
    return out, sidecar
