"""sqcompile: a torch.compile backend ("spectralquant") that compresses the KV cache with SpectralQuant.

    import torch, sqcompile
    compiled = torch.compile(model.forward, backend="spectralquant", options={"profile": "profile.safetensors"})

The public names below are imported on first use, so `import sqcompile` (and `sqcompile --help`) does not load
torch by itself; an installed package's backend is found by torch through its entry point (pyproject.toml).
"""
from __future__ import annotations

import importlib
import sys
import types

__version__ = "0.1.0"

# public name -> the submodule that defines it
_PUBLIC = {
    "spectralquant": "backend",
    "Options": "options",
    "Site": "passes.sites",
    "SpectralProfile": "profile",
    "Report": "report",
    "explain": "report",
    "calibrate": "calibrate",
    "optimize": "optimize",
    "Optimized": "optimize",
    "SpectralCache": "cache",
}
__all__ = list(_PUBLIC)


def __getattr__(name: str):
    if name not in _PUBLIC:
        raise AttributeError(f"module 'sqcompile' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_PUBLIC[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """`sqcompile.calibrate` is the function: importing the submodule of that name (which the import system binds
    on the package) must not replace it."""

    def __setattr__(self, name: str, value) -> None:
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


def _register_backend() -> None:
    """backend="spectralquant" by name also where the package is imported but not installed: an install registers
    it through its entry point, which torch loads itself (registering it here too would then be a duplicate); a
    checkout on PYTHONPATH has none, so it is registered here (this imports torch)."""
    from importlib.metadata import entry_points

    if "spectralquant" in entry_points(group="torch_dynamo_backends").names:
        return
    from torch._dynamo import register_backend

    from .backend import spectralquant

    try:
        register_backend(spectralquant, name="spectralquant")
    except AssertionError:  # registered already (an earlier import)
        pass


_register_backend()
