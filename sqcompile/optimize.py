"""`sqcompile.optimize`: the one-call HF drop-in (compile with the backend, generate with a SpectralCache)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

import torch

from .options import DEFAULT_BITS, Options


@dataclass
class Optimized:
    """A model whose forward runs under backend="spectralquant", and the cache settings that go with it."""

    model: Any
    profile: Any
    bits: float
    max_cache_len: int
    max_batch_size: Optional[int] = None
    options: dict = field(default_factory=dict)
    report: Any = None  # a `sqcompile.report.Report`: the sites and kernel plans of every graph compiled so far
    recent_window: int = 0  # the SpectralCache's last tokens kept exact (fp16 ring read by the decode kernels)

    def cache(self):
        """A fresh SpectralCache for one generation (packed storage, capacity max_cache_len)."""
        from .cache import SpectralCache
        from .kernels.sink import OUTLIER_TOKENS

        return SpectralCache(self.model, profile=self.profile, bits=self.bits, max_cache_len=self.max_cache_len,
                             max_batch_size=self.max_batch_size, layout=self.options.get("layout", "planes"),
                             outlier_tokens=self.options.get("outlier_tokens", OUTLIER_TOKENS),
                             recent_window=self.recent_window)

    def generate(self, input_ids: torch.Tensor, **kwargs: Any):
        """`model.generate` with a new SpectralCache; kwargs go to generate (max_new_tokens, do_sample, ...)."""
        need = input_ids.shape[-1] + int(kwargs.get("max_new_tokens", 20))
        if need > self.max_cache_len:
            raise ValueError(f"prompt + max_new_tokens = {need} tokens exceeds max_cache_len={self.max_cache_len}")
        from .calibrate import cache_kwarg

        # the cache's buffers exist before the compiled prefill runs, so they get static addresses (CUDA graphs)
        gc = getattr(self.model, "generation_config", None)
        beams = int(kwargs.get("num_beams", getattr(gc, "num_beams", 1)) or 1)
        returns = int(kwargs.get("num_return_sequences", getattr(gc, "num_return_sequences", 1)) or 1)
        rows = input_ids.shape[0] * (beams if beams > 1 else returns)  # the batch generate expands the prompt to
        param = next(self.model.parameters())
        cache = self.cache().allocate(rows, input_ids.device, param.dtype)
        if self.report is not None:
            self.report.note_exact_layers(cache.exact_layers)
        with torch.no_grad():
            return self.model.generate(input_ids, **{cache_kwarg(self.model): cache}, **kwargs)

    def __call__(self, *args: Any, **kwargs: Any):
        return self.model(*args, **kwargs)


def optimize(model: Any, profile: Any = None, *, bits: float = DEFAULT_BITS, max_cache_len: int = 4096,
             max_batch_size: Optional[int] = None, recent_window: int = 0, **options: Any) -> Optimized:
    """Compile `model.forward` with backend="spectralquant" (the module's weights are not touched; its
    `forward` attribute is replaced by the compiled one) and return an `Optimized` handle whose `generate`
    uses a `SpectralCache` (`recent_window` W: its last W tokens kept exact beside the codes; also passed to the
    backend as its `recent_window` option); its `report` fills
    with what each compile did (as `sqcompile.explain` prints it).
    `options` are the backend's (kernels, moe, lower, ...). On a tensor-parallel model
    (`sqcompile.parallel`) every rank calls it; each rank's cache holds its own kv-heads."""
    from .backend import recording_backend
    from .cache import _refuse_hybrid
    from .profile import text_config
    from .report import Report

    if profile is not None:
        from .latent_cache import refuse_latent_cache

        refuse_latent_cache(model, "sqcompile.optimize with a profile")
    # the window is a backend option too: the compiled graphs then read what the cache holds, and a plain HF cache
    # passed to the compiled model reads the same window (the simulation)
    opts = dict(options, profile=profile, bits=bits, recent_window=recent_window)
    Options.from_dict(opts)  # validate now, not at the first call
    # generate's SpectralCache has no layer for a hybrid model's state-space layers: say so now
    if getattr(model, "config", None) is not None:
        _refuse_hybrid(text_config(model))
    report = Report()
    model.forward = torch.compile(model.forward, backend=recording_backend(report), options=opts)
    return Optimized(model, profile, bits, max_cache_len, max_batch_size, opts, report, recent_window)
