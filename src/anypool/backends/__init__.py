"""One small module per framework, each with the same functions:

``is_array(x)``, ``shape(x)``, ``dtype_name(x)``, ``is_floating(x)``,
``avg_pool(x, spec)``, ``max_pool(x, spec, return_indices)``, ``squeeze(x, axes)``,
``from_numpy(a, dtype_name)`` and ``to_numpy(x)`` (the last two for the conformance harness).
``spec`` is an :class:`anypool._args.PoolSpec`, already checked.
"""
