"""Tensor parallelism: the backend on a model whose attention heads are split across processes.

sqcompile's rotation is per (layer, kv-head), so it shards by heads with no new mathematics: each rank rotates,
compresses and attends over its own kv-heads, and the folded o_proj shard stays on its rank. The model is sharded
by PyTorch's own tensor parallelism, the plan transformers' `tp_plan` uses for Llama, Qwen2, Mistral and Mixtral:

    q_proj, k_proj, v_proj  ColwiseParallel()   (weight rows = the rank's heads, output local)
    o_proj                  RowwiseParallel()   (weight columns = the rank's heads, an all-reduce after it)
    gate/up_proj, down_proj ColwiseParallel() / RowwiseParallel() for dense MLPs (`mlp=True`)

`parallelize(model, mesh)` applies it with `torch.distributed.tensor.parallel.parallelize_module`. Then

    model.forward = torch.compile(model.forward, backend="spectralquant", options={"profile": profile})
    model.generate(ids, past_key_values=sqcompile.SpectralCache(model, profile, ...))

work as on one process (and so they do on a model loaded with transformers' `from_pretrained(path, tp_plan="auto")`,
whose inference path runs local linears and an explicit all-reduce: tested with transformers 5.25): the backend turns the DTensor linears into local ones (`passes.localize_tensor_parallel`;
the all-reduce dynamo put after o_proj stays as it is), reads each site's kv-heads from its k/v/o_proj shards and
takes that slice of the profile's (or the codec's) bases; `SpectralCache` on a sharded model allocates the packed
codes of its rank's kv-heads only (1/N of the bytes). The codec is built from the whole profile and then sliced,
so every rank's formats and bases are the unsharded model's, head for head. `sqcompile.optimize(model, profile)`
on a sharded model compiles the same way and its `generate` builds such a cache.

`sqcompile.calibrate(model, texts)`, called on every rank with the same text, all-gathers each rank's per-kv-head
sums over the k_proj weight's process group (`kv_head_shard`), so every rank gets the same whole profile, the
unsharded model's up to float rounding (and eigenvector signs, eigh's free choice). The ranks stop at the same
window (a token budget, `max_tokens`, makes the profile independent of timing); `sensitivity_tokens` is refused (its
simulated cache picks outlier tokens per rank).

A `SpectralCache`'s outlier slots (`outlier_tokens`) are chosen per rank, by the distance of the rank's own
kv-heads' keys from their mean (the unsharded cache sums it over all kv-heads: choosing the same tokens would need an
all-reduce inside the cache write), so with outlier slots a rank may keep other tokens exact than the unsharded cache
does; the sink and the new tokens are the same, and with `outlier_tokens=0` the ranks' codes and logits are the
unsharded cache's. The backend's simulation on a plain cache (its `outlier_tokens` option) chooses them per rank too.

Supported: kv-heads and query heads divisible by the world size (each rank whole heads; `parallelize` raises
otherwise: replicating kv-heads across ranks is not done), a 1-D mesh, separate q/k/v projections. Left alone (with
the reason in `explain`): a sharded fused QKV projection, MoE blocks whose expert weights are DTensors (the fused MoE
op takes whole local experts; transformers' plans for Mixtral and Qwen2-MoE leave experts replicated, and replicated
experts are substituted as on one process).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Optional

import torch

from .profile import model_fingerprint, text_config


def check_divisible(config: Any, world_size: int) -> None:
    """Each rank must hold whole kv-heads (and whole query-head groups): a clear error otherwise."""
    fp = model_fingerprint(text_config(config))
    if world_size < 1:
        raise ValueError(f"world size must be >= 1, got {world_size}")
    for name in ("num_kv_heads", "num_heads"):
        if fp[name] % world_size:
            raise ValueError(
                f"sqcompile tensor parallel: {name}={fp[name]} is not divisible by the world size {world_size}; each "
                f"rank must hold whole kv-heads (replicated kv-heads are not supported). Use a world size that "
                f"divides {fp['num_kv_heads']} kv-heads and {fp['num_heads']} query heads.")


def tensor_parallel_plan(model: torch.nn.Module, mlp: bool = True) -> dict:
    """{module name: ParallelStyle} for `parallelize_module`: q/k/v colwise and o_proj rowwise for every attention
    module that has the four linears; gate/up colwise and down rowwise for dense MLPs when `mlp`."""
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel

    plan = {}
    for name, mod in model.named_modules():
        lin = {c: getattr(mod, c, None) for c in ("q_proj", "k_proj", "v_proj", "o_proj")}
        if all(isinstance(l, torch.nn.Linear) for l in lin.values()):
            for c in ("q_proj", "k_proj", "v_proj"):
                plan[f"{name}.{c}"] = ColwiseParallel()
            plan[f"{name}.o_proj"] = RowwiseParallel()
        ffn = {c: getattr(mod, c, None) for c in ("gate_proj", "up_proj", "down_proj")}
        if mlp and all(isinstance(l, torch.nn.Linear) for l in ffn.values()):
            plan[f"{name}.gate_proj"] = ColwiseParallel()
            plan[f"{name}.up_proj"] = ColwiseParallel()
            plan[f"{name}.down_proj"] = RowwiseParallel()
    if not plan:
        raise ValueError("sqcompile tensor parallel: no attention module with q_proj/k_proj/v_proj/o_proj linears")
    return plan


def parallelize(model: torch.nn.Module, mesh: Any, mlp: bool = True) -> torch.nn.Module:
    """Shard `model` in place over the 1-D DeviceMesh `mesh` with `tensor_parallel_plan` (module doc)."""
    from torch.distributed.tensor.parallel import parallelize_module

    if mesh.ndim != 1:
        raise ValueError(f"sqcompile tensor parallel needs a 1-D device mesh, got {mesh.ndim}-D")
    check_divisible(model, mesh.size())
    return parallelize_module(model, mesh, tensor_parallel_plan(model, mlp=mlp))


def _k_proj_shard(model: Any) -> Optional[tuple[Any, int, int]]:
    """(sharded k_proj weight, first, stop kv-heads) of the first attention whose k_proj weight is a DTensor; None for
    a model that is not sharded (or a config)."""
    if not isinstance(model, torch.nn.Module):
        return None
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        from torch.distributed.tensor.placement_types import Shard
    except ImportError:  # pragma: no cover
        return None
    for mod in model.modules():
        w = getattr(getattr(mod, "k_proj", None), "weight", None)
        if not isinstance(w, DTensor):
            continue
        head_dim = model_fingerprint(text_config(model))["head_dim"]
        if len(w.placements) != 1 or not isinstance(w.placements[0], Shard) or w.placements[0].dim % w.dim() != 0:
            raise ValueError(f"sqcompile tensor parallel: k_proj weight placed {w.placements}, expected (Shard(0),)")
        shape, offset = compute_local_shape_and_global_offset(w.shape, w.device_mesh, w.placements)
        if offset[0] % head_dim or shape[0] % head_dim:
            raise ValueError(f"sqcompile tensor parallel: this rank's k_proj rows [{offset[0]}, {offset[0] + shape[0]})"
                             f" are not whole kv-heads of head_dim {head_dim}")
        return w, offset[0] // head_dim, (offset[0] + shape[0]) // head_dim
    return None


def local_kv_heads(model: Any) -> Optional[tuple[int, int]]:
    """(first, stop) kv-heads this rank holds, read from the first attention's sharded k_proj weight; None for a
    model that is not sharded (or a config)."""
    shard = _k_proj_shard(model)
    return None if shard is None else shard[1:]


def kv_head_shard(model: Any) -> Optional[tuple[Any, int, int]]:
    """(process group, first, stop): the tensor-parallel group over which a sharded model's kv-heads are split (the
    device mesh of its k_proj weight) and this rank's kv-heads; None for a model that is not sharded."""
    shard = _k_proj_shard(model)
    return None if shard is None else (shard[0].device_mesh.get_group(), shard[1], shard[2])


def slice_codec(codec: Any, start: int, stop: int) -> Any:
    """The codec of kv-heads [start, stop) of `codec`: bases, means and per-head channel scales sliced; group
    structure, codebooks and the QJL matrix (shared by a layer's heads) unchanged."""
    if not 0 <= start < stop <= codec.num_kv_heads:
        raise ValueError(f"kv-head range [{start}, {stop}) is outside the codec's {codec.num_kv_heads} kv-heads")

    def fmt(f):
        return dataclasses.replace(f, channel_scale=f.channel_scale[start:stop])

    layers = [dataclasses.replace(lc, key_basis=lc.key_basis[start:stop], key_mean=lc.key_mean[start:stop],
                                  value_basis=lc.value_basis[start:stop], value_mean=lc.value_mean[start:stop],
                                  key_format=fmt(lc.key_format), value_format=fmt(lc.value_format))
              for lc in codec.layers]
    return dataclasses.replace(codec, layers=layers, num_kv_heads=stop - start,
                               config=dict(codec.config, kv_heads=(start, stop)))


__all__ = ["check_divisible", "kv_head_shard", "local_kv_heads", "parallelize", "slice_codec", "tensor_parallel_plan"]
