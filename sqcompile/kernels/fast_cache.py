"""The write and read ops of a `SpectralCache` in the fast layout (`sqcompile.quant.fast_layout`).

- `sqcompile::quantize_write_fast(key, v_store, k_packed, v_packed, positions, k_basis, k_mean, k_layout,
  v_layout)` (layouts as `FastLayout.spec()` strings): rotate the new keys ((k - mu) @ B^T; values arrive in their storage basis),
  quantize to uniform levels, pack the codes inside bytes with the fp16 token scales, and write the rows at
  `positions` [T_new] (shared by the batch) of k_packed / v_packed [B, Hkv, capacity, row_bytes].
- `sqcompile::dequantize_fast(packed, layout, head_dim)`: rows -> float32 storage coordinates.

Both are CompositeImplicitAutograd: plain torch ops that dynamo records as one call (so the backend's
passes can find the cache's write and read), and that AOTAutograd decomposes. On CUDA tensors the write
decomposes into one Triton launch, `sqcompile::quantize_write_fast_triton` (a `triton_op` Inductor traces):
Inductor made the torch form below several kernels, ~20 us per decode step of one layer on an H100/H200.
The write's `kernel` argument (the backend's `KernelPlan.write`) picks: "torch" the torch form (also the reference
the tests compare the kernel with), "triton" the one launch (CPU tensors: under TRITON_INTERPRET=1), "auto" the
launch on CUDA, else torch. Decode attention over these rows is `sqcompile::decode_attention_fast`.
"""
from __future__ import annotations

import torch

from ..quant.fast_layout import FastLayout
from . import quantize_write_fast_triton as one_launch  # registers sqcompile::quantize_write_fast_triton
from . import uses_triton

_LIB = torch.library.Library("sqcompile", "FRAGMENT")  # noqa: TOR901  (defines into the shared namespace)
_LIB.define("quantize_write_fast(Tensor key, Tensor v_store, Tensor(a!) k_packed, Tensor(b!) v_packed, "
            "Tensor positions, Tensor k_basis, Tensor k_mean, str k_layout, str v_layout, str impl=\"auto\") -> ()")
_LIB.define("dequantize_fast(Tensor packed, str layout, int head_dim) -> Tensor")


def layout_spec(layout: FastLayout) -> str:
    """How the ops take a layout (token-scaled groups only): `FastLayout.spec()`."""
    if any(g.scale != "token" for g in layout.groups if g.bits):
        raise ValueError("the fast cache ops take token-scaled groups only")
    return layout.spec()


def quantize_write_fast(key, v_store, k_packed, v_packed, positions, k_basis, k_mean, k_layout: str,
                        v_layout: str, impl: str = "auto") -> None:
    d = key.shape[-1]
    if key.dim() != 4 or v_store.shape != key.shape:
        raise ValueError(f"key/v_store must be [B, Hkv, T_new, d] of one shape, got {tuple(key.shape)} / "
                         f"{tuple(v_store.shape)}")
    if positions.dim() != 1 or positions.shape[0] != key.shape[2]:
        raise ValueError(f"positions must be [T_new={key.shape[2]}] (shared by the batch), got {tuple(positions.shape)}")
    if uses_triton(impl, key):
        if one_launch.supports(d, k_layout, v_layout) is None:  # else (e.g. head_dim 80) the torch form below
            torch.ops.sqcompile.quantize_write_fast_triton(key, v_store, k_packed, v_packed, positions, k_basis,
                                                           k_mean, k_layout, v_layout)
            return
    quantize_write_fast_torch(key, v_store, k_packed, v_packed, positions, k_basis, k_mean, k_layout, v_layout)


def quantize_write_fast_torch(key, v_store, k_packed, v_packed, positions, k_basis, k_mean, k_layout: str,
                              v_layout: str) -> None:
    """The write in plain torch: the reference of the one-launch kernel, and what Inductor fuses on CPU."""
    d = key.shape[-1]
    kl, vl = FastLayout.from_spec(d, k_layout), FastLayout.from_spec(d, v_layout)
    k_store = torch.matmul(key.to(torch.float32) - k_mean[None, :, None, :], k_basis.transpose(-1, -2))
    k_rows = kl.quantize(k_store)
    v_rows = vl.quantize(v_store.to(torch.float32))
    k_packed.index_copy_(2, positions, k_rows)
    v_packed.index_copy_(2, positions, v_rows)


def dequantize_fast(packed, layout: str, head_dim: int):
    return FastLayout.from_spec(head_dim, layout).dequantize(packed).to(torch.float32)


_LIB.impl("quantize_write_fast", quantize_write_fast, "CompositeImplicitAutograd")
_LIB.impl("dequantize_fast", dequantize_fast, "CompositeImplicitAutograd")
