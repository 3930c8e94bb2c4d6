"""sqcompile: a torch.compile backend ("spectralquant") that compresses the KV cache with SpectralQuant.

    import torch, sqcompile
    compiled = torch.compile(model.forward, backend="spectralquant", options={"profile": "profile.safetensors"})
"""
from __future__ import annotations

from .backend import spectralquant
from .calibrate import calibrate  # noqa: E402  (the function shadows the submodule on purpose)
from .options import Options
from .passes.sites import Site
from .profile import SpectralProfile
from .report import Report, explain
from .optimize import Optimized, optimize


def __getattr__(name: str):
    if name == "SpectralCache":  # needs transformers: imported on first use
        from .cache import SpectralCache

        return SpectralCache
    raise AttributeError(f"module 'sqcompile' has no attribute {name!r}")

__version__ = "0.1.0"


def _register_backend() -> None:
    """backend="spectralquant" by name also where the package is imported but not installed: an install registers
    it through its entry point (pyproject.toml), which torch loads itself (registering it here too would then be a
    duplicate); a checkout on PYTHONPATH has none."""
    from importlib.metadata import entry_points

    from torch._dynamo import register_backend

    if "spectralquant" in entry_points(group="torch_dynamo_backends").names:
        return
    try:
        register_backend(spectralquant, name="spectralquant")
    except AssertionError:  # registered already (an earlier import)
        pass


_register_backend()


__all__ = ["spectralquant", "Options", "Site", "SpectralProfile", "Report", "explain", "calibrate", "optimize",
           "Optimized", "SpectralCache"]
