"""Where the rotations come from: a calibrated profile, a codec (when quantizing), or seeded random stand-ins."""
from __future__ import annotations

import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import torch

from .options import Options

log = logging.getLogger("sqcompile")


@dataclass
class LayerRotation:
    key_basis: torch.Tensor  # [Hkv, d, d] orthogonal; k' = (k - key_mean) @ key_basis^T
    key_mean: torch.Tensor  # [Hkv, d]
    value_basis: torch.Tensor  # [Hkv, d, d]
    value_mean: torch.Tensor  # [Hkv, d]


def random_orthogonal(n: int, d: int, generator: torch.Generator) -> torch.Tensor:
    """n Haar-random orthogonal d x d matrices (QR of a Gaussian, signs fixed), float64."""
    a = torch.randn(n, d, d, generator=generator, dtype=torch.float64)
    q, r = torch.linalg.qr(a)
    return q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)


class KVTransform:
    """Per-layer bases and means for the rotation passes, and the fake quantizer for the KV write."""

    def __init__(self, options: Options):
        self.options = options
        self.profile = self._load_profile(options.profile)
        self._codec = None
        self._random: dict[tuple, LayerRotation] = {}
        self._sliced: dict[tuple, object] = {}

    @staticmethod
    def _load_profile(profile):
        if profile is None:
            return None
        from .profile import SpectralProfile

        if isinstance(profile, (str, Path)):
            return SpectralProfile.load(profile)
        return profile

    def check_site(self, layer: int, kv_heads: int, head_dim: int) -> None:
        """A profile that disagrees with the model is an error naming the layer and both shapes."""
        p = self.profile
        if p is None:
            return
        num_layers, p_heads, p_dim = p.key_mean.shape
        if layer >= num_layers:
            raise ValueError(f"profile has {num_layers} layers, but the model has an attention site at layer {layer}")
        if (p_heads, p_dim) != (kv_heads, head_dim):
            raise ValueError(
                f"profile does not match the model at layer {layer}: expected kv_heads={kv_heads}, head_dim={head_dim} "
                f"(the model's), got kv_heads={p_heads}, head_dim={p_dim} (the profile's)")

    def codec(self, num_kv_heads: int, head_dim: int):
        if self._codec is None:
            from .quant import build_codec

            kwargs = {}
            if self.profile is None:
                # The TurboQuant stand-in needs sizes; every layer's rotation depends only on (seed, layer).
                kwargs = dict(num_layers=256, num_kv_heads=num_kv_heads, head_dim=head_dim)
            self._codec = build_codec(self.profile, bits=float(self.options.bits), method=self.options.resolved_method,
                                      seed=self.options.seed, layout=self.options.layout, **kwargs)
        return self._codec

    def sliced_codec(self, head_dim: int, heads: tuple[int, int, int]):
        """The codec of a tensor-parallel site's kv-heads: heads = (first, stop, total), built whole, then sliced."""
        first, stop, total = heads
        key = (first, stop, total, head_dim)
        if key not in self._sliced:
            from .parallel import slice_codec

            self._sliced[key] = slice_codec(self.codec(total, head_dim), first, stop)
        return self._sliced[key]

    def layer(self, layer: int, kv_heads: int, head_dim: int,
              heads: Optional[tuple[int, int, int]] = None) -> LayerRotation:
        """The rotation of `layer`; `heads` = (first, stop, total) gives a tensor-parallel site's kv-heads of the
        model's `total` (the bases of those heads of the unsharded model)."""
        if heads is not None:
            first, stop, total = heads
            full = self.layer(layer, total, head_dim)
            return LayerRotation(full.key_basis[first:stop], full.key_mean[first:stop],
                                 full.value_basis[first:stop], full.value_mean[first:stop])
        self.check_site(layer, kv_heads, head_dim)
        if self.options.quantize:
            lc = self.codec(kv_heads, head_dim).layers[layer]
            return LayerRotation(lc.key_basis, lc.key_mean, lc.value_basis, lc.value_mean)
        if self.profile is not None:
            p = self.profile
            return LayerRotation(p.key_eigvecs[layer], p.key_mean[layer], p.value_eigvecs[layer], p.value_mean[layer])
        key = (layer, kv_heads, head_dim)
        if key not in self._random:
            g = torch.Generator().manual_seed(self.options.seed * 1_000_003 + layer)
            bases = random_orthogonal(2 * kv_heads, head_dim, g)
            zero = torch.zeros(kv_heads, head_dim, dtype=torch.float64)
            self._random[key] = LayerRotation(bases[:kv_heads], zero, bases[kv_heads:], zero)
        return self._random[key]
