"""Flax NNX modules: shapes, equality with the functions, use inside nnx.jit, and a model that trains."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
nnx = pytest.importorskip("flax.nnx")
optax = pytest.importorskip("optax")
import jax.numpy as jnp  # noqa: E402

import anypool  # noqa: E402
import anypool.layers.flax as apf  # noqa: E402
from anypool import _args  # noqa: E402
from anypool.backends import numpy as reference  # noqa: E402


def test_layers_match_reference_channels_last():
    x = np.random.default_rng(0).standard_normal((2, 9, 7, 3)).astype(np.float32)
    spec = _args.pool_spec(x.shape, (4, 5), 2, "channels_last")
    np.testing.assert_allclose(np.asarray(apf.AdaptiveAvgPool((4, 5))(jnp.asarray(x))),
                               reference.avg_pool(x.astype(np.float64), spec), rtol=1e-6, atol=1e-6)
    v, i = apf.AdaptiveMaxPool((4, 5), return_indices=True)(jnp.asarray(x))
    rv, ri = reference.max_pool(x, spec, return_indices=True)
    np.testing.assert_array_equal(np.asarray(v), rv)
    np.testing.assert_array_equal(np.asarray(i), ri)
    assert apf.AdaptiveAvgPool(3, spatial_dims=2)(jnp.asarray(x)).shape == (2, 3, 3, 3)
    assert apf.AdaptiveMaxPool((None, 2), data_format="channels_first")(jnp.asarray(x)).shape == (2, 9, 7, 2)
    np.testing.assert_allclose(np.asarray(apf.GlobalAvgPool()(jnp.asarray(x))), x.mean(axis=(1, 2)),
                               rtol=1e-6, atol=1e-6)
    assert apf.GlobalMaxPool(keepdims=True)(jnp.asarray(x)).shape == (2, 1, 1, 3)


def test_layer_errors_name_the_module():
    with pytest.raises(ValueError, match="AdaptiveAvgPool\\(data_format\\)"):
        apf.AdaptiveAvgPool((2, 2), data_format="NHWC")
    with pytest.raises(TypeError, match="AdaptiveMaxPool\\(output_size\\)"):
        apf.AdaptiveMaxPool(3)  # an int needs spatial_dims


class Net(nnx.Module):
    def __init__(self, rngs: nnx.Rngs):
        self.conv = nnx.Conv(3, 8, kernel_size=(3, 3), rngs=rngs)
        self.pool = apf.AdaptiveMaxPool((5, 3))
        self.avg = apf.AdaptiveAvgPool((2, 2))
        self.head = nnx.Linear(8 * 4 + 8, 2, rngs=rngs)
        self.gap = apf.GlobalAvgPool()

    def __call__(self, x):
        h = nnx.relu(self.conv(x))
        p = self.avg(self.pool(h)).reshape(x.shape[0], -1)
        return self.head(jnp.concatenate([p, self.gap(h)], axis=-1))


def test_small_model_trains_in_nnx_jit():
    rng = np.random.default_rng(1)
    x = jnp.asarray(rng.standard_normal((16, 13, 11, 3)), jnp.float32)
    y = jnp.asarray(rng.integers(0, 2, 16))
    model = Net(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(1e-2), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, x, y):
        def loss_fn(model):
            logits = model(x)
            return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = [float(step(model, optimizer, x, y)) for _ in range(15)]
    assert all(np.isfinite(losses))
    assert losses[-1] < 0.8 * losses[0], losses
    # the pooled features inside the jitted model equal the functional call
    h = nnx.relu(model.conv(x))
    np.testing.assert_array_equal(np.asarray(nnx.jit(lambda m, t: m.pool(t))(model, h)),
                                  np.asarray(anypool.adaptive_max_pool(h, (5, 3), data_format="channels_last")))
