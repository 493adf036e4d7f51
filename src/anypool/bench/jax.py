"""JAX benchmark: anypool on JAX (jit) vs Keras 3's ops on its JAX backend and torch eager native.

Every contender runs on the same data: anypool and ``keras.ops.adaptive_average_pool``
/ ``adaptive_max_pool`` (``KERAS_BACKEND=jax``) each inside one ``jax.jit``, torch's
``F.adaptive_*_pool{1,2,3}d`` eagerly.  ``fwd+bwd`` is value and vector-Jacobian
product with a fixed output gradient (``y.backward(g)`` in torch).  Timed after
warm-up with ``block_until_ready``; the compile time of the largest case is
reported through ``progress`` (it is no speed-up, so it is not a column), and the
machine's read bandwidth is measured beside every case (a jitted ``sum`` over a
buffer of the input's size).
"""

from __future__ import annotations

import functools
import time

import numpy as np

from . import BenchCase, Row, keras_on, median_ms

KERAS = "keras-jax"
TORCH = "torch"




def _layout(case: BenchCase) -> tuple[tuple[int, ...], str]:
    n, c, *s = case.shape
    return ((n, *s, c), "channels_last") if case.channels_last else (case.shape, "channels_first")


def _jax_steps(fn, g):
    import jax
    import jax.numpy as jnp

    fwd = jax.jit(fn)

    @jax.jit
    def fwd_bwd_of(x, g):
        y, vjp = jax.vjp(fn, x)
        return y, vjp(g.astype(y.dtype))[0]

    # g is an argument, not a constant: XLA would otherwise fold a backward that does not
    # depend on x (average pooling's) at compile time and time nothing
    g = jnp.asarray(g)
    return {"fwd": fwd, "fwd+bwd": lambda x: fwd_bwd_of(x, g)}


def _torch_steps(torch, case: BenchCase, op: str, x_np: np.ndarray, g_np: np.ndarray):
    import torch.nn.functional as F

    dtype = getattr(torch, case.dtype)
    fn = getattr(F, f"adaptive_{op}_pool{case.rank}d")
    size = case.output_size if case.rank > 1 else case.output_size[0]
    x = torch.from_numpy(x_np).to(dtype)
    g = torch.from_numpy(g_np).to(dtype)
    if case.channels_last:  # the same memory layout as the JAX input: a channels_last view
        x = x.movedim(-1, 1)
        g = g.movedim(-1, 1)
    xg = x.detach().requires_grad_(True)

    def fwd():
        with torch.no_grad():
            return fn(x, size)

    def fwd_bwd():
        xg.grad = None
        y = fn(xg, size)
        y.backward(g)
        return y

    return {"fwd": fwd, "fwd+bwd": fwd_bwd}


def run(cases, device: str = "cpu", repeats: int = 20, progress=None) -> list[Row]:
    say = progress or (lambda msg: None)
    if device != "cpu":
        say("jax: only the CPU is benchmarked here; skipped")
        return []
    try:
        import jax
    except ImportError:
        say("jax: not installed; skipped")
        return []
    import anypool

    keras = keras_on("jax")
    if keras is None:
        say("jax: Keras is missing or loaded with a non-JAX backend; the keras-jax column is empty "
            "(run `anypool bench --framework jax` in a fresh process)")
    try:
        import torch
    except ImportError:
        torch = None

    rng = np.random.default_rng(0)
    largest = max(cases, key=lambda c: c.nbytes)
    rows = []
    for case in cases:
        rows.extend(_case_rows(case, case == largest, jax, anypool, keras, torch, rng, repeats, say))
    return rows


def _time(call, repeats: int, warmup: int) -> float:
    return median_ms(call, repeats=repeats, warmup=warmup)


def _case_rows(case, largest, jax, anypool, keras, torch, rng, repeats, say) -> list[Row]:
    import jax.numpy as jnp

    shape, layout = _layout(case)
    x_np = rng.standard_normal(shape, dtype=np.float32)
    x = jnp.asarray(x_np, jnp.bfloat16 if case.dtype == "bfloat16" else case.dtype)
    buffer = jnp.asarray(rng.standard_normal(shape, dtype=np.float32))
    bandwidth_fn = jax.jit(jnp.sum)
    rows = []
    for op in ("avg", "max"):
        ours = functools.partial(anypool.adaptive_avg_pool if op == "avg" else anypool.adaptive_max_pool,
                                 output_size=case.output_size, data_format=layout)
        out_shape = jax.eval_shape(ours, x).shape
        g_np = rng.standard_normal(out_shape, dtype=np.float32)
        if largest and op == "avg":
            t0 = time.perf_counter()
            jax.jit(ours).lower(x).compile()
            say(f"jax: compile of the largest case {case.label()} {op} fwd: {time.perf_counter() - t0:.2f} s")
        contenders = {"anypool": _jax_steps(ours, g_np)}
        if keras is not None:
            native = keras.ops.adaptive_average_pool if op == "avg" else keras.ops.adaptive_max_pool
            contenders[KERAS] = _jax_steps(functools.partial(native, output_size=case.output_size,
                                                             data_format=layout), g_np)
        if torch is not None:
            contenders[TORCH] = _torch_steps(torch, case, op, x_np, g_np)
        out_bytes = case.nbytes * int(np.prod(out_shape)) // int(np.prod(shape))
        for mode in ("fwd", "fwd+bwd"):
            say(f"jax {op} {mode} {case.label()}")
            times = {}
            for label, steps in contenders.items():
                step = steps[mode]
                call = step if label == TORCH else functools.partial(_jax_call, jax, step, x)
                try:  # Keras' JAX ops take up to seconds per call: fewer runs keep the suite within minutes
                    times[label] = _time(call, min(repeats, 3) if label == KERAS else repeats,
                                         warmup=2 if label == "anypool" else 1)
                except Exception as e:  # a baseline may refuse a case; anypool must not
                    if label == "anypool":
                        raise
                    say(f"  {label} failed: {type(e).__name__}: {str(e).splitlines()[0][:120]}")
                    times[label] = None
            bw_ms = _time(functools.partial(_jax_call, jax, bandwidth_fn, buffer), repeats, warmup=2)
            moved = (case.nbytes + out_bytes) * (2 if mode == "fwd+bwd" else 1)
            rows.append(Row("jax", case.label(), op, mode, times.pop("anypool"),
                            {KERAS: times.get(KERAS), TORCH: times.get(TORCH)}, bytes_moved=moved,
                            bandwidth_gbs=4 * buffer.size / (bw_ms * 1e6)))
    return rows


def _jax_call(jax, step, x):
    return jax.block_until_ready(step(x))
