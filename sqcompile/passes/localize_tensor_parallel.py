"""Tensor-parallel linears as local linears, so the attention passes see each rank's own heads and weights.

`torch.distributed.tensor.parallel.parallelize_module` with `ColwiseParallel` (q/k/v, `use_local_output=True`)
and `RowwiseParallel` (o_proj) reaches the dynamo graph as DTensor calls around each linear:

    colwise:  to_local(redistribute(linear(from_local(x, mesh, (Replicate(),)), W[Shard(0)], b[Shard(0)]), (Shard(-1),)))
    rowwise:  to_local(redistribute(linear(from_local(x, mesh, (Shard(-1),)), W[Shard(1)], b[Replicate()]), (Replicate(),)))

A colwise linear with a replicated input computes exactly `linear(x, W.to_local(), b.to_local())` on each rank
(its redistribute moves nothing), so it becomes that. A rowwise linear becomes `linear(x, W.to_local())`, wrapped
back as a `Partial` DTensor whose redistribute to `Replicate` is the all-reduce dynamo put there (kept as it is),
and the replicated bias is added once after it. Then the attention output reaches o_proj through plain reshapes,
the value comes straight out of a linear, and the views show the rank's heads; transformers' own tensor-parallel
inference path (local weights via `W.to_local()`, an explicit all-reduce after o_proj) has this form already.

`weight_shard` reads which rows (or columns) of the full weight a `W.to_local()` holds: the passes take the
rank's kv-heads of the profile from it. Anything not in exactly these forms is left as it is.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx

from .fx_utils import arg, is_linear, is_op, meta_tensor, placeholders


def _dtensor_types():
    try:
        from torch.distributed.tensor import DTensor
        from torch.distributed.tensor.placement_types import Partial, Replicate, Shard
    except ImportError:  # pragma: no cover  (a torch built without distributed)
        return None
    return DTensor, Partial, Replicate, Shard


def example_value(gm: fx.GraphModule, n: Any, example_inputs: Optional[list]) -> Any:
    """The example input behind a placeholder (any type: DTensor, DeviceMesh), else None."""
    if not isinstance(n, fx.Node) or n.op != "placeholder" or example_inputs is None:
        return None
    idx = placeholders(gm).index(n)
    return example_inputs[idx] if idx < len(example_inputs) else None


def has_dtensor_inputs(example_inputs: Optional[list]) -> bool:
    types = _dtensor_types()
    return types is not None and any(isinstance(x, types[0]) for x in example_inputs or ())


def _placements(n: fx.Node) -> Optional[tuple]:
    """The placements of `from_local(local, device_mesh, placements)` / `redistribute(self, device_mesh, placements)`."""
    p = arg(n, 2, "placements")
    return tuple(p) if isinstance(p, (list, tuple)) else None


def _is_last_dim_shard(p: Any, ndim: Optional[int]) -> bool:
    _, _, _, Shard = _dtensor_types()
    return isinstance(p, Shard) and (p.dim == -1 or (ndim is not None and p.dim == ndim - 1))


def _dtensor_param(gm, n, example_inputs, want) -> bool:
    """`n` is a placeholder whose example is a DTensor on a 1-D mesh placed as `want` (a Placement)."""
    DTensor = _dtensor_types()[0]
    v = example_value(gm, n, example_inputs)
    return isinstance(v, DTensor) and v.device_mesh.ndim == 1 and tuple(v.placements) == (want,)


def _local_of(gm: fx.GraphModule, param: fx.Node, before: fx.Node) -> fx.Node:
    """A `param.to_local()` node placed before `before` (a view of the rank's shard: nothing copied)."""
    with gm.graph.inserting_before(before):
        local = gm.graph.call_method("to_local", (param,))
    lt = getattr(meta_tensor(param), "_local_tensor", None)
    if lt is not None:
        local.meta["example_value"] = lt
    return local


def _match(lin: fx.Node) -> Optional[tuple[fx.Node, fx.Node, fx.Node]]:
    """(from_local, redistribute, to_local) around a DTensor linear, each the only reader of the one before."""
    src = arg(lin, 0, "input")
    if not (isinstance(src, fx.Node) and is_op(src, "from_local") and len(src.users) == 1 and len(lin.users) == 1):
        return None
    red = next(iter(lin.users))
    if not (red.op == "call_method" and red.target == "redistribute" and red.args[0] is lin and len(red.users) == 1):
        return None
    loc = next(iter(red.users))
    if not (loc.op == "call_method" and loc.target == "to_local" and loc.args[0] is red):
        return None
    return src, red, loc


def localize_tensor_parallel(gm: fx.GraphModule, example_inputs: Optional[list]) -> int:
    """Rewrite every colwise/rowwise DTensor linear of `gm` (module doc) as a local one; returns how many."""
    types = _dtensor_types()
    if types is None or not has_dtensor_inputs(example_inputs):
        return 0
    _, Partial, Replicate, Shard = types
    count = 0
    for lin in list(gm.graph.nodes):
        if not is_linear(lin, gm) or lin.op != "call_function":
            continue
        m = _match(lin)
        if m is None:
            continue
        src, red, loc = m
        x, mesh = src.args[0], arg(src, 1, "device_mesh")
        w, b = arg(lin, 1, "weight"), arg(lin, 2, "bias")
        in_place, out_place = _placements(src), _placements(red)
        xt = meta_tensor(x)
        ndim = xt.dim() if xt is not None else None
        if in_place is None or out_place is None or len(in_place) != 1 or len(out_place) != 1:
            continue
        if in_place == (Replicate(),) and _is_last_dim_shard(out_place[0], ndim) \
                and _dtensor_param(gm, w, example_inputs, Shard(0)) \
                and (b is None or _dtensor_param(gm, b, example_inputs, Shard(0))):
            # colwise: each rank's output columns are its weight rows; the redistribute moves nothing
            w_l = _local_of(gm, w, lin)
            b_l = None if b is None else _local_of(gm, b, lin)
            with gm.graph.inserting_before(lin):
                new = gm.graph.call_function(torch._C._nn.linear, (x, w_l, b_l))
            new.meta.update({k: v for k, v in loc.meta.items() if k in ("example_value", "val", "stack_trace",
                                                                            "nn_module_stack", "source_fn_stack")})
            loc.replace_all_uses_with(new)
            for dead in (loc, red, lin, src):
                gm.graph.erase_node(dead)
            count += 1
        elif _is_last_dim_shard(in_place[0], ndim) and out_place == (Replicate(),) \
                and _dtensor_param(gm, w, example_inputs, Shard(1)) \
                and (b is None or _dtensor_param(gm, b, example_inputs, Replicate())):
            # rowwise: a local partial product, summed over ranks by the all-reduce dynamo put there
            w_l = _local_of(gm, w, lin)
            with gm.graph.inserting_before(lin):
                y = gm.graph.call_function(torch._C._nn.linear, (x, w_l, None))
                part = gm.graph.call_function(src.target, (y, mesh, (Partial(),)), {"run_check": False})
            y.meta.update({k: v for k, v in loc.meta.items() if k in ("example_value", "val")})
            red.replace_input_with(lin, part)
            gm.graph.erase_node(lin)
            gm.graph.erase_node(src)
            if b is not None:  # the replicated bias once, after the sum
                users = list(loc.users)
                b_l = _local_of(gm, b, loc.next)
                with gm.graph.inserting_after(b_l):
                    out = gm.graph.call_function(torch.add, (loc, b_l))
                out.meta.update({k: v for k, v in loc.meta.items() if k in ("example_value", "val")})
                for u in users:
                    u.replace_input_with(loc, out)
            count += 1
    if count:
        gm.graph.lint()
    return count


def weight_shard(gm: fx.GraphModule, w: Any, example_inputs: Optional[list]) -> Optional[tuple[int, int, int, int]]:
    """(dim, offset, local size, full size) of the part of a sharded weight that `w` (a `W.to_local()` node of a
    DTensor placeholder sharded on one dim of a 1-D mesh) holds; None for a weight that is not sharded."""
    types = _dtensor_types()
    if types is None or not (isinstance(w, fx.Node) and w.op == "call_method" and w.target == "to_local"):
        return None
    DTensor, _, Replicate, Shard = types
    v = example_value(gm, w.args[0], example_inputs)
    if not isinstance(v, DTensor):
        return None
    if v.device_mesh.ndim != 1 or len(v.placements) != 1:
        raise ValueError(f"sqcompile: weight '{w.args[0].target}' is a DTensor on a {v.device_mesh.ndim}-D mesh "
                         f"placed {v.placements}; tensor parallel needs a 1-D mesh (shard heads on one dim)")
    p = v.placements[0]
    if isinstance(p, Replicate):
        return None
    if not isinstance(p, Shard):
        raise ValueError(f"sqcompile: weight '{w.args[0].target}' is placed {p}, not sharded or replicated")
    dim = p.dim % v.dim()
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    shape, offset = compute_local_shape_and_global_offset(v.shape, v.device_mesh, v.placements)
    return dim, int(offset[dim]), int(shape[dim]), int(v.shape[dim])


def site_kv_heads(gm: fx.GraphModule, site: Any, example_inputs: Optional[list]) -> Optional[tuple[int, int, int]]:
    """(first, stop, total) kv-heads of the profile that a tensor-parallel attention site holds, read from its
    k_proj, v_proj and o_proj shards; None for an unsharded site. Raises ValueError (the site's reason) when the
    shards are not whole heads of one consistent slice."""
    DTensor = _dtensor_types()[0]
    if any(isinstance(meta_tensor(site.nodes[k]), DTensor) for k in ("q", "new_k", "new_v")):
        raise ValueError("tensor parallel: attention runs on DTensors (q/k/v_proj colwise with use_local_output=False"
                         "?); supported: local q/k/v (ColwiseParallel's default), so the graph shows the rank's heads")
    d, hkv, hq = site.head_dim, site.kv_heads, site.q_heads
    # a site without o_proj (a gated output: the value rotation is undone at the read) has no o_proj shard to check
    names = ("k", "v", "o") if site.nodes.get("o_linear") is not None else ("k", "v")
    shards = {name: weight_shard(gm, arg(site.nodes[f"{name}_linear"], 1, "weight"), example_inputs) for name in names}
    if all(s is None for s in shards.values()):
        return None
    if any(s is None for s in shards.values()):
        raise ValueError("tensor parallel: k_proj/v_proj/o_proj are not all sharded ("
                         + ", ".join(f"{k}_proj {'sharded' if s else 'whole'}" for k, s in shards.items()) + ")")
    if site.nodes.get("v_offset", 0) or site.nodes.get("v_rows") is not None or shards["k"] != shards["v"]:
        raise ValueError("tensor parallel: keys and values do not come from separate colwise k_proj/v_proj "
                         f"with one shard (k {shards['k']}, v {shards['v']}; a sharded fused QKV is not supported)")
    dim, offset, size, total = shards["v"]
    if dim != 0 or offset % d or size != hkv * d or total % d:
        raise ValueError(f"tensor parallel: v_proj shard rows [{offset}, {offset + size}) of {total} are not this "
                         f"site's {hkv} whole kv-heads of head_dim {d}")
    first, n_total, rep = offset // d, total // d, hq // hkv
    if "o" in shards:
        o_dim, o_offset, o_size, o_total = shards["o"]
        if (o_dim, o_offset, o_size, o_total) != (1, first * rep * d, hq * d, n_total * rep * d):
            raise ValueError(f"tensor parallel: o_proj shard (dim {o_dim}, columns [{o_offset}, {o_offset + o_size}) "
                             f"of {o_total}) is not the query heads of kv-heads [{first}, {first + hkv})")
    return first, first + hkv, n_total


def moe_left_alone_reason(gm: fx.GraphModule, site: Any, example_inputs: Optional[list]) -> Optional[str]:
    """Why an MoE site with DTensor (sharded) expert or router weights is left alone; None when they are plain."""
    types = _dtensor_types()
    if types is None:
        return None
    for key in ("w_gate_up", "w_down", "router_weight"):
        n = site.nodes.get(key)
        while isinstance(n, fx.Node) and n.op == "call_method" and n.target == "to_local":
            n = n.args[0]
        if isinstance(example_value(gm, n, example_inputs), types[0]):
            return (f"tensor parallel: the MoE {key.replace('w_', '')} weights are DTensors (sharded experts); the fused "
                    "MoE op takes whole experts on each rank (leave experts replicated to substitute it)")
    return None
