"""Smoke test of an installed (not editable) anypool: ``make dist-check`` runs it in a fresh venv.

Run from outside the source tree, so ``import anypool`` can only find the installed copy.
Checks the metadata, the shipped kernel sources, the command line, and each framework
that is installed (each Keras backend in its own process).  Exits non-zero on the first
failure; prints one line per check.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np

import anypool

HERE = Path(anypool.__file__).resolve().parent


def ok(what: str) -> None:
    print(f"ok   {what}", flush=True)


def run(*argv: str, env: dict | None = None) -> str:
    out = subprocess.run(argv, capture_output=True, text=True, env={**os.environ, **(env or {})})
    if out.returncode != 0:
        sys.exit(f"FAIL {' '.join(argv)} exited {out.returncode}\n{out.stdout}\n{out.stderr}")
    return out.stdout


def has(module: str) -> bool:
    return importlib.util.find_spec(module) is not None


def reference(x, output_size):
    """Average pooling from the window formulas, written out (the oracle here, not anypool's)."""
    h, w = x.shape[-2:]
    oh, ow = output_size
    out = np.empty((*x.shape[:-2], oh, ow), np.float64)
    for i in range(oh):
        for j in range(ow):
            rows = slice(i * h // oh, -(-(i + 1) * h // oh))
            cols = slice(j * w // ow, -(-(j + 1) * w // ow))
            out[..., i, j] = x[..., rows, cols].mean(axis=(-2, -1))
    return out


def main() -> None:
    if "site-packages" not in str(HERE):
        sys.exit(f"FAIL anypool imported from {HERE}, not from an installed copy")
    ok(f"anypool imported from {HERE}")
    if anypool.__version__ != importlib.metadata.version("anypool"):
        sys.exit(f"FAIL __version__ {anypool.__version__} != metadata {importlib.metadata.version('anypool')}")
    ok(f"version {anypool.__version__}")

    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 3, 37, 53))
    np.testing.assert_allclose(anypool.adaptive_avg_pool2d(x, (5, 9)), reference(x, (5, 9)), rtol=1e-12)
    ok("numpy: adaptive_avg_pool2d 37x53 -> 5x9")

    text = run("anypool", "explain", "10", "3")
    if [line.split()[:3] for line in text.splitlines()[3:]] != [["0", "0", "4"], ["1", "3", "7"], ["2", "6", "10"]]:
        sys.exit(f"FAIL anypool explain 10 3 printed:\n{text}")
    ok("cli: anypool explain 10 3")
    if has("matplotlib"):  # the demo's photograph is matplotlib's sample data
        with tempfile.TemporaryDirectory() as tmp:
            run("anypool", "demo", "--output", str(Path(tmp) / "demo.png"))
            if not (Path(tmp) / "demo.png").stat().st_size:
                sys.exit("FAIL anypool demo wrote an empty picture")
        ok("cli: anypool demo")
    text = run("anypool", "check", "--cases", "12")
    ok("cli: anypool check --cases 12 (" + text.strip().splitlines()[-1] + ")")

    if has("torch"):
        import torch

        csrc = HERE / "backends" / "torch" / "csrc"
        sources = sorted(p.name for p in csrc.iterdir() if p.suffix in (".cpp", ".h"))
        if "pool.cpp" not in sources or "bins.h" not in sources:
            sys.exit(f"FAIL kernel sources missing from the wheel: {sources}")
        ok(f"torch: kernel sources shipped {sources}")
        from anypool.backends.torch import cpu  # compiles the kernels from the shipped sources

        t = torch.from_numpy(x.astype(np.float32))
        want = torch.nn.functional.adaptive_avg_pool2d(t, (5, 9))
        with anypool.backends.torch.ops.force_implementation(cpu.__name__):
            got = anypool.adaptive_avg_pool2d(t, (5, 9))
        torch.testing.assert_close(got, want)
        ok("torch: C++ kernel built from the installed sources, equal to torch's op")
        from anypool.layers.torch import AdaptiveMaxPool2d

        torch.testing.assert_close(AdaptiveMaxPool2d(7)(t), torch.nn.AdaptiveMaxPool2d(7)(t))
        ok("torch: anypool.layers.torch.AdaptiveMaxPool2d")

    if has("torch") and has("onnxruntime") and has("onnxscript"):
        import torch

        from anypool import onnx as aox

        model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.AdaptiveAvgPool2d((5, 7)))
        with tempfile.TemporaryDirectory() as tmp:
            path = Path(tmp) / "m.onnx"
            aox.export(model, (torch.randn(1, 3, 32, 32),), path, dynamic_shapes=({2: "H", 3: "W"},))
            with torch.no_grad():
                n = aox.verify(path, lambda a: model(torch.from_numpy(a)).numpy(), [(1, 3, 40, 29), (1, 3, 9, 64)])
        ok(f"onnx: dynamic-shape export verified in ONNX Runtime on {n} other sizes")

    if has("jax"):
        import jax.numpy as jnp

        np.testing.assert_allclose(np.asarray(anypool.adaptive_avg_pool2d(jnp.asarray(x, jnp.float32), (5, 9))),
                                   reference(x, (5, 9)), rtol=1e-5, atol=1e-6)
        ok("jax: adaptive_avg_pool2d")
    if has("flax"):
        code = ("import jax.numpy as jnp, anypool.layers.flax as f; "
                "print(f.AdaptiveAvgPool((2, 3))(jnp.ones((1, 9, 9, 4))).shape)")
        if run(sys.executable, "-c", code).strip() != "(1, 2, 3, 4)":
            sys.exit("FAIL flax layer shape")
        ok("flax: anypool.layers.flax.AdaptiveAvgPool")
    if has("keras"):
        backends = [b for b, m in (("tensorflow", "tensorflow"), ("jax", "jax"), ("torch", "torch")) if has(m)]
        code = ("import numpy as np, keras, anypool.layers.keras as k; "
                "print(tuple(k.AdaptiveAveragePooling2D((5, 9))(np.ones((2, 37, 53, 3), 'float32')).shape))")
        for backend in backends:
            if run(sys.executable, "-c", code, env={"KERAS_BACKEND": backend}).strip() != "(2, 5, 9, 3)":
                sys.exit(f"FAIL keras layer on {backend}")
            ok(f"keras ({backend} backend): anypool.layers.keras.AdaptiveAveragePooling2D")
    if has("tensorflow"):
        code = ("import numpy as np, tensorflow as tf, anypool; "
                "print(tuple(anypool.adaptive_max_pool2d(tf.ones((2, 3, 37, 53)), 7).shape))")
        if run(sys.executable, "-c", code).strip() != "(2, 3, 7, 7)":
            sys.exit("FAIL tensorflow")
        ok("tensorflow: adaptive_max_pool2d")
    print("installed package: every check passed")


if __name__ == "__main__":
    main()
