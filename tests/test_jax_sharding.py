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
    from anypool import _harness
    from anypool.backends import jax as backend

    assert len(jax.devices()) == 8, jax.devices()
    mesh = Mesh(np.array(jax.devices()), ("batch",))
    cases = [((16, 3, 13, 9), (4, 5), "channels_first"), ((8, 10, 7, 2), (3, 9), "channels_last"),
             ((16, 4, 30), (7,), "channels_first")]
    for seed, (shape, out, fmt) in enumerate(cases):
        case = _harness.Case(shape, out, fmt, "float32", "ties" if seed == 1 else "normal", seed)
        x_np = case.input()
        sharding = NamedSharding(mesh, P("batch"))
        x = jax.device_put(x_np, sharding)
        fns = {
            "avg": lambda t: anypool.adaptive_avg_pool(t, out, data_format=fmt),
            "max": lambda t: anypool.adaptive_max_pool(t, out, data_format=fmt),
            "argmax": lambda t: anypool.adaptive_max_pool(t, out, data_format=fmt, return_indices=True)[1],
            "grad avg": jax.grad(lambda t: (anypool.adaptive_avg_pool(t, out, data_format=fmt) ** 2).sum()),
            "grad max": jax.grad(lambda t: (anypool.adaptive_max_pool(t, out, data_format=fmt) ** 2).sum()),
        }
        got = {}
        for name, fn in fns.items():
            jitted = jax.jit(fn)
            hlo = jitted.lower(x).compile().as_text()
            for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
                assert collective not in hlo, (name, shape, collective)
            y = jitted(x)
            assert y.sharding.is_equivalent_to(sharding, y.ndim), (name, shape, y.sharding)
            got[name] = np.asarray(y)
        # the oracle is the NumPy reference, not anypool's unsharded result
        want_values, want_indices = _harness.expected(case, x_np, "argmax")
        checks = [
            _harness.expected(case, x_np, "avg").problem(got["avg"], "float32"),
            None if np.array_equal(got["max"], want_values) else "max values differ",
            None if np.array_equal(got["argmax"], want_indices) else "indices differ",
            # d/dx sum(y**2) = the gradient for g = 2y (exact in float32)
            _harness.expected_gradient(case, "avg", 2 * got["avg"]).problem(got["grad avg"], "float32"),
            _harness.expected_gradient(case, "max", 2 * got["max"], want_indices).problem(got["grad max"], "float32"),
        ]
        for name, problem in zip(fns, checks):
            assert problem is None, (name, shape, problem)
        # the covering-range gather (the max backward off the CPU, which scatters) is collective-free too
        spec = anypool._args.pool_spec(shape, out, len(out), fmt)
        gather = jax.jit(lambda g, i: backend._max_grad_gather(g, i, spec))
        g_in, i_in = jax.device_put(2 * got["max"], sharding), jax.device_put(got["argmax"], sharding)
        hlo = gather.lower(g_in, i_in).compile().as_text()
        for collective in ("all-gather", "all-reduce", "all-to-all", "collective-permute"):
            assert collective not in hlo, ("gather", shape, collective)
        y = gather(g_in, i_in)
        assert y.sharding.is_equivalent_to(sharding, y.ndim), ("gather", shape, y.sharding)
        want = _harness.expected_gradient(case, "max", 2 * got["max"], want_indices)
        problem = want.problem(np.asarray(y), "float32")
        assert problem is None, ("gather", shape, problem)
    print("OK")
""")


def test_batch_sharded_input_stays_sharded_without_collectives():
    env = dict(os.environ, XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    src = os.path.join(os.path.dirname(__file__), "..", "src")
    env["PYTHONPATH"] = os.pathsep.join([os.path.abspath(src), env.get("PYTHONPATH", "")])
    result = subprocess.run([sys.executable, "-c", SCRIPT], env=env, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0 and "OK" in result.stdout, result.stdout + result.stderr[-3000:]
