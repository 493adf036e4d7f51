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


# --- LP, GeM, avgmax, catavgmax, SelectAdaptivePool2d ------------------------------------------


def _spec(x, output_size, data_format="channels_last"):
    return _args.pool_spec(x.shape, output_size, len(output_size), data_format)


def test_reduction_modules_match_reference():
    rng = np.random.default_rng(5)
    jobs = [((2, 9, 7, 3), (4, 5), "channels_last"), ((2, 3, 11), (4,), "channels_first"),
            ((1, 5, 4, 6, 2), (2, 3, 7), "channels_last"), ((8, 13, 3), (3, None), "channels_last")]
    for shape, out, data_format in jobs:
        x = rng.standard_normal(shape).astype(np.float32)
        x64, spec = x.astype(np.float64), _spec(x, out, data_format)
        modules = {"lp": (apf.AdaptiveLPPool(2.0, out, data_format=data_format), reference.lp_pool(x64, spec, 2.0)),
                   "gem": (apf.AdaptiveGeMPool(out, p=2.5, eps=0.1, data_format=data_format),
                           reference.gem_pool(x64, spec, 2.5, 0.1)),
                   "avgmax": (apf.AdaptiveAvgMaxPool(out, data_format=data_format), reference.avgmax_pool(x64, spec)),
                   "catavgmax": (apf.AdaptiveCatAvgMaxPool(out, data_format=data_format),
                                 reference.catavgmax_pool(x64, spec))}
        for name, (module, want) in modules.items():
            got = np.asarray(module(jnp.asarray(x)))
            assert got.shape == want.shape, (name, shape)
            np.testing.assert_allclose(got, want, rtol=2e-6, atol=2e-6, err_msg=f"{name} {shape} -> {out}")
    x = jnp.asarray(rng.standard_normal((2, 9, 7, 3)), jnp.float32)
    assert apf.AdaptiveCatAvgMaxPool(2, spatial_dims=2)(x).shape == (2, 2, 2, 6)
    assert apf.AdaptiveGeMPool(1, spatial_dims=2)(jnp.abs(x)).shape == (2, 1, 1, 3)
    unbatched = np.asarray(apf.AdaptiveLPPool(3.0, (2, 2))(jnp.abs(x[0])))
    np.testing.assert_allclose(unbatched, reference.lp_pool(np.abs(np.asarray(x[0], np.float64)),
                                                            _args.pool_spec((9, 7, 3), (2, 2), 2, "channels_last"),
                                                            3.0), rtol=2e-6)


def test_gem_p_is_a_param_unless_fixed():
    x = jnp.abs(jnp.asarray(np.random.default_rng(6).standard_normal((2, 9, 7, 3)), jnp.float32)) + 0.1
    gem = apf.AdaptiveGeMPool((3, 2), p=2.5)
    params = nnx.state(gem, nnx.Param)
    assert len(jax.tree_util.tree_leaves(params)) == 1 and float(gem.p[...]) == 2.5
    fixed = apf.AdaptiveGeMPool((3, 2), p=2.5, p_trainable=False)
    assert jax.tree_util.tree_leaves(nnx.state(fixed, nnx.Param)) == [] and fixed.p == 2.5
    np.testing.assert_allclose(np.asarray(fixed(x)), np.asarray(gem(x)), rtol=1e-6)
    grads = nnx.grad(lambda m: jnp.sum(m(x) ** 2))(gem)
    g = float(grads.p[...])
    # d/dp of sum(out^2) by central differences of the functional form (float64 reference)
    x64, spec, h = np.asarray(x, np.float64), _spec(x, (3, 2)), 1e-4
    fd = (np.sum(reference.gem_pool(x64, spec, 2.5 + h, 1e-6) ** 2)
          - np.sum(reference.gem_pool(x64, spec, 2.5 - h, 1e-6) ** 2)) / (2 * h)
    assert g != 0 and abs(g - fd) <= 1e-3 * abs(fd), (g, fd)


def test_gem_learns_p_in_nnx_jit():
    """Trained towards max pooling (GeM's p -> inf limit), p grows and the loss falls."""
    rng = np.random.default_rng(7)
    x = jnp.asarray(rng.random((8, 10, 9, 4)) + 0.01, jnp.float32)
    target = jnp.asarray(reference.max_pool(np.asarray(x), _spec(x, (3, 2))))
    pool = apf.AdaptiveGeMPool((3, 2), p=2.0)
    optimizer = nnx.Optimizer(pool, optax.sgd(20.0), wrt=nnx.Param)

    @nnx.jit
    def step(pool, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: jnp.mean((m(x) - target) ** 2))(pool)
        optimizer.update(pool, grads)
        return loss

    losses = [float(step(pool, optimizer)) for _ in range(15)]
    assert float(pool.p[...]) > 4.0 and losses[-1] < 0.5 * losses[0], (float(pool.p[...]), losses)


def test_select_adaptive_pool2d_module():
    x = np.random.default_rng(8).standard_normal((2, 7, 5, 3)).astype(np.float32)
    spec = _spec(x, (1, 1))
    want = {"avg": reference.avg_pool(x, spec), "max": reference.max_pool(x, spec),
            "avgmax": reference.avgmax_pool(x, spec), "catavgmax": reference.catavgmax_pool(x, spec)}
    for pool_type in ("avg", "max", "avgmax", "catavgmax", "fast", "fastcatavgmax", ""):
        for flatten in (False, True):
            module = apf.SelectAdaptivePool2d(1, pool_type, flatten)
            expect = x if not pool_type else want[pool_type.removeprefix("fast") or "avg"]
            np.testing.assert_allclose(np.asarray(module(jnp.asarray(x))), expect.reshape(2, -1) if flatten else expect,
                                       rtol=1e-6, atol=1e-6, err_msg=f"{pool_type} {flatten}")
            assert module.feat_mult() == (2 if pool_type.endswith("catavgmax") else 1)
            assert module.is_identity() == (pool_type == "")
    nchw = apf.SelectAdaptivePool2d((2, 3), "avgmax", data_format="channels_first")
    assert nchw(jnp.asarray(x)).shape == (2, 7, 2, 3)


def test_reduction_module_errors_name_the_module():
    with pytest.raises(ValueError, match=r"AdaptiveGeMPool\(p\): got 0"):
        apf.AdaptiveGeMPool((1, 1), p=0)
    with pytest.raises(ValueError, match=r"AdaptiveGeMPool\(eps\): got 0"):
        apf.AdaptiveGeMPool((1, 1), eps=0)
    with pytest.raises(ValueError, match=r"AdaptiveLPPool\(norm_type\): got -1"):
        apf.AdaptiveLPPool(-1, (2,))
    with pytest.raises(ValueError, match=r"AdaptiveCatAvgMaxPool\(data_format\)"):
        apf.AdaptiveCatAvgMaxPool((2, 2), data_format="NHWC")
    with pytest.raises(ValueError, match=r"SelectAdaptivePool2d\(output_size\): got 2"):
        apf.SelectAdaptivePool2d(2, "fast")
    with pytest.raises(ValueError, match=r"SelectAdaptivePool2d\(pool_type\)"):
        apf.SelectAdaptivePool2d(1, "mean")
