"""Undo the value rotation at the attention output, where o_proj cannot absorb it (a gated output).

Values are stored as v' = B_v (v - mu_v) per kv head (`fold_value_rotation` folds that into v_proj, or
`SpectralCache` writes it). Attention mixes values with weights that sum to one, so it returns o' = B_v (o - mu_v)
per query head (with its kv head's basis; `insert_sink_value` restores that form where a sink column takes part of
the weight). When the attention output reaches o_proj only through data movement, o_proj absorbs B_v^T and mu_v
(`fold_value_rotation`, zero cost). When it does not, e.g. Qwen3-Next's and Qwen3.5's `o_proj(attn * sigmoid(gate))`,
whose elementwise gate sees each feature of the model basis, the inverse is applied online right after attention:

    o = o' @ B_q + mu_q      (row vectors; B_q [Hq, d, d], mu_q [Hq, d]: each query head's kv head)

one d x d product per head and query token, which Inductor fuses after the attention (on GPU it is the decode
kernel's epilogue). Every consumer of the attention output then sees the model-basis output, so nothing after it
needs proving.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from .fx_utils import add_constant, concrete_int, meta_tensor
from .sites import Site


def output_rotation(value_basis: torch.Tensor, value_mean: Optional[torch.Tensor],
                    q_heads: int) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(B_q [Hq, d, d], mu_q [Hq, d] or None when the mean is zero), float64: the inverse value rotation per query
    head, each with its kv head's basis (query head h reads kv head h // (q_heads / kv_heads))."""
    basis = value_basis.detach().to(torch.float64)
    rep = q_heads // basis.shape[0]
    mean = None
    if value_mean is not None and bool(value_mean.abs().sum() > 0):
        mean = value_mean.detach().to(torch.float64).repeat_interleave(rep, dim=0)
    return basis.repeat_interleave(rep, dim=0), mean


def insert_output_rotation(gm: fx.GraphModule, site: Site, out: fx.Node, value_basis: torch.Tensor,
                           value_mean: Optional[torch.Tensor], like: Optional[fx.Node] = None) -> fx.Node:
    """out -> out @ B_q (+ mu_q) right after `out` (the site's attention output [B, Hq, S, d] in the storage basis,
    as the last pass before it left it); every reader of `out` reads the result. `like`: a node whose recorded value
    has out's shape and dtype, where out is one a pass inserted (default: out). Returns the new output node."""
    t = meta_tensor(out if like is None else like)
    if t is None or t.dim() != 4 or concrete_int(t.shape[1]) != site.q_heads \
            or concrete_int(t.shape[-1]) != site.head_dim:
        raise ValueError(f"layer {site.layer}: the attention output is not [batch, {site.q_heads}, tokens, "
                         f"{site.head_dim}]")
    basis, mean = output_rotation(value_basis, value_mean, site.q_heads)
    users = list(out.users)
    b_node = add_constant(gm, "sq_output_basis", basis.to(device=t.device, dtype=t.dtype), out.next)
    with gm.graph.inserting_after(b_node):
        new_out = gm.graph.call_function(torch.matmul, (out, b_node))
    if mean is not None:
        mu_node = add_constant(gm, "sq_output_mean", mean[None, :, None, :].to(device=t.device, dtype=t.dtype),
                               new_out.next)
        with gm.graph.inserting_after(mu_node):
            new_out = gm.graph.call_function(torch.add, (new_out, mu_node))
    for u in users:
        u.replace_input_with(out, new_out)
    return new_out
