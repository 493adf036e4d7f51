"""Pick the backend for an array without importing a framework the caller has not loaded.

As in einops: a framework that is not in ``sys.modules`` cannot have produced the
array, so its backend is never imported (importing anypool costs NumPy only).
"""

from __future__ import annotations

import importlib
import sys
from types import ModuleType

from . import _args

# framework module -> anypool backend module.  NumPy last: other frameworks' arrays
# are checked first because some of them convert to NumPy implicitly.
BACKENDS = {
    "torch": "anypool.backends.torch",
    "jax": "anypool.backends.jax",
    "tensorflow": "anypool.backends.tensorflow",
    "numpy": "anypool.backends.numpy",
}


def _backend(module: str) -> ModuleType | None:
    # an already imported backend comes from sys.modules: no import machinery on the
    # hot path, which also keeps torch.compile from breaking the graph there
    found = sys.modules.get(module)
    if found is not None:
        return found
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name != module:  # a real import error inside the backend
            raise
        return None


def loaded_backends() -> list[ModuleType]:
    """Backends whose framework is already imported and whose backend module exists."""
    found = [_backend(module) for framework, module in BACKENDS.items() if framework in sys.modules]
    return [b for b in found if b is not None]


def backend_for(x, function: str) -> ModuleType:
    # lazily, in order: the first match is returned before later backends are even imported
    for framework, module in BACKENDS.items():
        if framework in sys.modules:
            backend = _backend(module)
            if backend is not None and backend.is_array(x):
                return backend
    raise _args.unsupported_type(x, function)


def installed_backends() -> list[ModuleType]:
    """Every backend whose framework can be imported (imports them: for tools, not the API)."""
    found = []
    for framework, module in BACKENDS.items():
        try:
            importlib.import_module(framework)
            found.append(importlib.import_module(module))
        except ImportError:
            continue
    return found
