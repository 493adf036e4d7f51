"""Batch sharding: a batch-sharded input on 8 (host) devices gives the same result, sharded the same
way, with no collective (no gather to one device) in the compiled program — forward and backward.

Runs in a subprocess: the device count is fixed when JAX first starts (XLA_FLAGS).
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest

pytest.importorskip("jax")

SCRIPT = textwrap.dedent("""
    import numpy as np, jax, jax.numpy as jnp
    from jax.sharding import Mesh, NamedSharding, PartitionSpec as P
    import anypool
    from anypool import _args
    from anypool.backends import numpy as reference

    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    rng = np.random.default_rng(0)
    cases = [((16, 3, 13, 9), (4, 5), "channels_first"), ((8, 10, 7, 2), (3, 9), "channels_last"),
             ((16, 4, 30), (7,), "channels_first")]
    for shape, out, fmt in cases:
        x_np = rng.standard_normal(shape).astype(np.float32)
        sharding = NamedSharding(mesh, P("batch"))
        x = jax.device_put(x_np, sharding)
        spec = _args.pool_spec(shape, out, len(out), fmt)
        fns = {
            "avg": lambda t: anypool.adaptive_avg_pool(t, out, data_format=fmt),
            "max": lambda t: anypool.adaptive_max_pool(t, out, data_format=fmt),
            "argmax": lambda t: anypool.adaptive_max_pool(t, out, data_format=fmt, return_indices=True)[1],
            "grad avg": jax.grad(lambda t: (anypool.adaptive_avg_pool(t, out, data_format=fmt) ** 2).sum()),
            "grad max": jax.grad(lambda t: (anypool.adaptive_max_pool(t, out, data_format=fmt) ** 2).sum()),
        }
        for name, fn in fns.items():
            jitted = jax.jit(fn)
            hlo = jitted.lower(x).compile().as_text()
            for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
                assert collective not in hlo, (name, shape, collective)
            y = jitted(x)
            assert y.sharding.is_equivalent_to(sharding, y.ndim), (name, shape, y.sharding)
            want = np.asarray(jax.jit(fn)(jnp.asarray(x_np)))
            if "avg" in name:  # the per-shard matmul may block the sum differently: equal to rounding
                np.testing.assert_allclose(np.asarray(y), want, rtol=1e-6, atol=1e-7, err_msg=name)
            else:  # max values, indices and routed gradients are exact
                np.testing.assert_array_equal(np.asarray(y), want, err_msg=name)
        want = reference.avg_pool(x_np.astype(np.float64), spec)
        np.testing.assert_allclose(np.asarray(jax.jit(fns["avg"])(x)), want, rtol=1e-5, atol=1e-6)
    print("OK")
""")


def test_batch_sharded_input_stays_sharded_without_collectives():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-3000:]
