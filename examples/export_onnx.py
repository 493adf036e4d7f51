"""Export models with adaptive pooling to ONNX with dynamic height/width, exact at every resolution.

A VGG-style classifier (``AdaptiveAvgPool2d((7, 7))`` head) and a detector-style head
(``AdaptiveMaxPool2d``) written with plain ``torch.nn`` layers are exported with
``anypool.onnx.export`` and checked in ONNX Runtime against PyTorch at resolutions the
export never saw — including sizes that do not divide by the output size.

    python examples/export_onnx.py
"""

from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import torch
from torch import nn

import anypool.onnx


class VGGLike(nn.Module):
    def __init__(self, classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(),
        )
        self.pool = nn.AdaptiveAvgPool2d((7, 7))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 7 * 7, 64), nn.ReLU(), nn.Linear(64, classes))

    def forward(self, x):
        return self.classifier(self.pool(self.features(x)))


class DetectorHead(nn.Module):
    """A feature map pooled to a fixed 5x5 grid per image (max), with the argmax positions."""

    def __init__(self):
        super().__init__()
        self.backbone = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
        self.pool = nn.AdaptiveMaxPool2d((5, 5), return_indices=True)
        self.score = nn.Conv2d(8, 4, 1)

    def forward(self, x):
        pooled, where = self.pool(self.backbone(x))
        return self.score(pooled), where


def check(model: nn.Module, path: Path, sizes) -> None:
    import onnxruntime as ort

    model.eval()
    anypool.onnx.export(model, (torch.randn(1, 3, 64, 64),), path,
                        dynamic_shapes=({0: "batch", 2: "height", 3: "width"},))
    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    for n, h, w in sizes:
        x = torch.randn(n, 3, h, w)
        with torch.no_grad():
            want = model(x)
        want = want if isinstance(want, tuple) else (want,)
        got = session.run(None, {session.get_inputs()[0].name: x.numpy()})
        for g, t in zip(got, want):
            t = t.numpy()
            assert g.shape == t.shape, (g.shape, t.shape)
            if t.dtype == np.int64:
                assert np.array_equal(g, t), "indices differ"
            else:
                np.testing.assert_allclose(g, t, rtol=1e-4, atol=1e-5)
        print(f"  {type(model).__name__} at {n}x3x{h}x{w}: outputs {[tuple(g.shape) for g in got]} match PyTorch")


def main() -> None:
    sizes = [(1, 64, 64), (2, 224, 224), (1, 97, 131), (3, 30, 45), (1, 12, 12)]  # 12/2 = 6 < 7: upsampling
    with tempfile.TemporaryDirectory() as tmp:
        print("VGG-style classifier, AdaptiveAvgPool2d((7, 7)):")
        check(VGGLike(), Path(tmp) / "vgg.onnx", sizes)
        print("Detector-style head, AdaptiveMaxPool2d((5, 5), return_indices=True):")
        check(DetectorHead(), Path(tmp) / "head.onnx", sizes)


if __name__ == "__main__":
    torch.manual_seed(0)
    main()
