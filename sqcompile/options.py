"""`Options`: the validated form of the `options` dict a user passes to `torch.compile(..., backend="spectralquant")`."""
from __future__ import annotations

from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Optional, Union

DEFAULT_BITS = 4.25  # 3.76x compression, every byte of metadata included
KERNEL_CHOICES = ("auto", "triton", "tensorrt", "torch")
LOWER_CHOICES = ("inductor", "eager")
METHOD_CHOICES = ("spectralquant", "turboquant")
LAYOUT_CHOICES = ("planes", "fast")


@dataclass(frozen=True)
class Options:
    """Backend options (DESIGN.md, "Public contract").

    profile:  path or `SpectralProfile`; None = the data-oblivious TurboQuant mode.
    bits:     stored bits per element, K and V averaged, metadata included (16/bits = compression ratio).
    quantize: False = rotation only (outputs equal eager to float tolerance).
    kernels:  "auto" | "triton" | "tensorrt" | "torch": which implementation the ops the backend inserts run
              (decode attention, the KV-cache writes, MoE), resolved per compile by
              `sqcompile.kernels.resolve_kernels`: "auto" = the GPU kernels (Triton, and the hand-written CUDA
              decode kernel of the fast layout) on a GPU, torch elsewhere; never TensorRT, which is taken only
              when asked for; "triton" = Triton only.
    moe:      substitute the fused MoE op for detected MoE blocks.
    lower:    "inductor" (default) | "eager" (run the rewritten graph as is: fast tests, debugging).
    method:   "spectralquant" (needs a profile) | "turboquant"; None picks by whether a profile is given.
    seed:     seed of the random rotations that stand in where no profile gives one.
    layout:   "planes" (default: Lloyd-Max levels, bit-planes, `decode_attention`) | "fast" (uniform levels
              at 1/2/4/8 bits packed inside bytes, `decode_attention_fast`: faster decode, a little more
              error at 4 bits). Used by the simulated quantization and by `sqcompile.optimize`'s cache; a
              `SpectralCache` passed by the user carries its own layout (`SpectralCache(..., layout=...)`).
    cudagraphs: run each compiled graph as a CUDA graph (Inductor's cudagraph trees, what
              mode="reduce-overhead" turns on for Inductor; torch.compile takes `mode` or `options`, not both,
              so this is the way with a profile). Removes the per-kernel host time that bounds small-batch
              decode; the caches' tensors are marked static (SpectralCache does it). No effect on CPU.
    outlier_tokens: exact outlier tokens per row besides the sink, as `SpectralCache(outlier_tokens=...)`: what the
              plain-cache simulation keeps exact and what `sqcompile.optimize`'s cache holds (default 4).
    recent_window: the last W tokens kept exact beside the codes, as `SpectralCache(recent_window=W)` (default 0:
              none): what the plain-cache simulation reads exact (the fp16 ring's rows) and what
              `sqcompile.optimize(..., recent_window=W)`'s cache holds (optimize sets this option). A `SpectralCache`
              passed by the user carries its own window: with the option at 0 the cache's window is read as it is;
              a window > 0 that the cache does not hold is an error at compile time (the option asks for exact
              tokens the cache cannot give).
    """

    profile: Any = None
    bits: float = DEFAULT_BITS
    quantize: bool = True
    kernels: str = "auto"
    moe: bool = True
    lower: str = "inductor"
    method: Optional[str] = None
    seed: int = 0
    layout: str = "planes"
    cudagraphs: bool = False
    outlier_tokens: int = 4  # sqcompile.kernels.sink.OUTLIER_TOKENS (a test keeps the two equal)
    recent_window: int = 0

    @classmethod
    def from_dict(cls, options: Union[None, dict, "Options"]) -> "Options":
        if options is None:
            return cls()
        if isinstance(options, Options):
            return options
        if not isinstance(options, dict):
            raise TypeError(f"spectralquant options must be a dict, got {type(options).__name__}")
        valid = [f.name for f in fields(cls)]
        unknown = sorted(set(options) - set(valid))
        if unknown:
            raise ValueError(f"unknown spectralquant option(s) {unknown}; valid options are {valid}")
        opts = cls(**options)
        opts.validate()
        return opts

    def validate(self) -> None:
        from .profile import SpectralProfile

        if self.profile is not None and not isinstance(self.profile, (str, Path, SpectralProfile)):
            raise TypeError(f"option 'profile' must be a path or a SpectralProfile, got {type(self.profile).__name__}")
        if isinstance(self.bits, bool) or not isinstance(self.bits, (int, float)):
            raise TypeError(f"option 'bits' must be a number of bits per element, got {self.bits!r}")
        if not 0 < float(self.bits) <= 16:
            raise ValueError(f"option 'bits' must be in (0, 16] bits per element, got {self.bits}")
        for name in ("quantize", "moe", "cudagraphs"):
            if not isinstance(getattr(self, name), bool):
                raise TypeError(f"option '{name}' must be True or False, got {getattr(self, name)!r}")
        if self.kernels not in KERNEL_CHOICES:
            raise ValueError(f"option 'kernels' must be one of {KERNEL_CHOICES}, got {self.kernels!r}")
        if self.lower not in LOWER_CHOICES:
            raise ValueError(f"option 'lower' must be one of {LOWER_CHOICES}, got {self.lower!r}")
        if self.method is not None and self.method not in METHOD_CHOICES:
            raise ValueError(f"option 'method' must be one of {METHOD_CHOICES} or None, got {self.method!r}")
        if self.method == "spectralquant" and self.profile is None and self.quantize:
            raise ValueError("method 'spectralquant' needs a calibrated profile (options['profile'])")
        if self.layout not in LAYOUT_CHOICES:
            raise ValueError(f"option 'layout' must be one of {LAYOUT_CHOICES}, got {self.layout!r}")
        from .kernels.sink import MAX_SLOTS

        o = self.outlier_tokens
        if isinstance(o, bool) or not isinstance(o, int) or not 0 <= o <= MAX_SLOTS - 1:
            raise ValueError(f"option 'outlier_tokens' must be an int in 0..{MAX_SLOTS - 1} (the decode kernels skip at "
                             f"most {MAX_SLOTS} exact tokens per row, the sink included), got {o!r}")
        w = self.recent_window
        if isinstance(w, bool) or not isinstance(w, int) or w < 0:
            raise ValueError(f"option 'recent_window' must be an int >= 0 (the last tokens kept exact beside the "
                             f"codes, as SpectralCache(recent_window=...); 0 = none), got {w!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int):
            raise TypeError(f"option 'seed' must be an int, got {self.seed!r}")
        if isinstance(self.profile, (str, Path)) and not Path(self.profile).exists():
            raise ValueError(f"option 'profile': no file at {self.profile}")

    @property
    def resolved_method(self) -> str:
        return self.method or ("spectralquant" if self.profile is not None else "turboquant")
