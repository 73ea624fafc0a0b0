"""The classifier as ONNX, so that a hospital can run it without Python or fedfactory.

    blob = to_onnx(model)            # the whole decision in one graph
    check_onnx(model, blob)          # onnxruntime against torch on seeded random images

The graph takes `images`, uint8 N x H x W x C (H, W, C as the classifier's file says: resize
beforehand, bilinearly, as `fedfactory predict` does), and returns `probabilities` and
`log_probabilities`, float32 N x K: the pixels scaled to [-1, 1], every network, their Product of
Experts in local mode (sum of log-softmax, renormalised) and the classes that no module covered
masked to probability 0. The class names and the rest of the description ride in the model's
metadata_props.
"""

from __future__ import annotations

import io
import json
import warnings

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from .classify.model import FederatedClassifier
from .errors import FedFactoryError

OPSET = 17
TOLERANCE = 1e-4  # on probabilities, onnxruntime against torch (float32 both)


class Decision(nn.Module):
    """uint8 NHWC pixels -> (probabilities, log-probabilities), as FederatedClassifier.predict_log_proba."""

    def __init__(self, model: FederatedClassifier):
        super().__init__()
        self.nets = nn.ModuleList(net.eval() for net in model.nets.values())
        mask = torch.zeros(model.num_classes)
        mask[list(model.missing_classes)] = float("-inf")
        self.register_buffer("mask", mask)

    def forward(self, images):
        x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0  # tensors.to_model
        log_proba = F.log_softmax(sum(F.log_softmax(net(x), dim=1) for net in self.nets) + self.mask, dim=1)
        return log_proba.exp(), log_proba


def to_onnx(model: FederatedClassifier, opset: int = OPSET) -> bytes:
    """The ONNX bytes of the classifier's whole decision, its description in metadata_props."""
    import onnx

    h, w, c = model.image_shape
    buf = io.BytesIO()
    with warnings.catch_warnings():  # the TorchScript exporter's deprecation and tracer notes: this graph has no branches
        warnings.simplefilter("ignore")
        torch.onnx.export(Decision(model).eval(), (torch.zeros(2, h, w, c, dtype=torch.uint8),), buf, dynamo=False,
                          input_names=["images"], output_names=["probabilities", "log_probabilities"],
                          dynamic_axes={"images": {0: "n"}, "probabilities": {0: "n"}, "log_probabilities": {0: "n"}},
                          opset_version=opset, do_constant_folding=True)
    proto = onnx.load_from_string(buf.getvalue())
    proto.doc_string = (f"fedfactory classifier ({model.mode} mode): images uint8 N x {h} x {w} x {c} (resize "
                        f"beforehand) -> probabilities over {model.num_classes} classes (metadata: class_names)")
    meta = {"class_names": json.dumps(model.class_names), "image_shape": json.dumps(list(model.image_shape)),
            "classifier_sha256": model.file_sha256, "description": json.dumps(model.describe(), sort_keys=True)}
    for k, v in meta.items():
        proto.metadata_props.add(key=k, value=v)
    onnx.checker.check_model(proto)
    return proto.SerializeToString()


def run_onnx(blob: bytes, images: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(probabilities, log-probabilities) of ONNX bytes on uint8 NHWC images, with onnxruntime on the CPU."""
    import onnxruntime

    session = onnxruntime.InferenceSession(blob, providers=["CPUExecutionProvider"])
    return tuple(session.run(["probabilities", "log_probabilities"], {"images": images}))


def check_onnx(model: FederatedClassifier, blob: bytes, n: int = 16, seed: int = 0) -> float:
    """The largest probability difference between onnxruntime and torch (float32, no bf16) on seeded
    random images; over TOLERANCE is an error, so a broken export never reaches a hospital."""
    x = np.random.default_rng(seed).integers(0, 256, (n, *model.image_shape), dtype=np.uint8)
    diff = float(np.abs(run_onnx(blob, x)[0] - model.predict_proba(x, "cpu", False)).max())
    if not diff <= TOLERANCE:
        raise FedFactoryError(f"the ONNX model's probabilities differ from torch's by {diff:.2g} (over {TOLERANCE})")
    return diff
