"""Rotate keys at the KV write and queries at the attention input: k' = B_k (k - mu_k), q' = B_k q.

RoPE sits between k_proj and the cache, so the key rotation cannot fold into a weight: it is an online
[d x d] product per kv head, inserted right after the fresh (post-RoPE) key, before the cache write. The
query gets the same basis (query head h uses its kv head h // (q_heads / kv_heads)), so q'.k' = q.k - q.mu_k;
the q.mu_k term is the same for every key and softmax ignores it. Where the scores pass through a soft-cap
(tanh) that shift is not harmless, and the key mean is not subtracted.
"""
from __future__ import annotations

import torch
import torch.fx as fx

from .fx_utils import add_constant, meta_tensor
from .sites import Site


def _dtype_of(n: fx.Node, default: torch.dtype = torch.float32) -> torch.dtype:
    t = meta_tensor(n)
    return t.dtype if t is not None and t.is_floating_point() else default


def _device_of(n: fx.Node) -> torch.device:
    t = meta_tensor(n)
    return t.device if t is not None else torch.device("cpu")


def insert_kv_rotation(gm: fx.GraphModule, site: Site, key_basis: torch.Tensor, key_mean: torch.Tensor) -> None:
    """Insert k' = (k - mu) @ B^T after the fresh key and q' = q @ B_q^T before attention."""
    new_k, q, attn = site.nodes["new_k"], site.nodes["q"], site.nodes["attn"]
    dtype, device = _dtype_of(new_k), _device_of(new_k)
    rep = site.q_heads // site.kv_heads
    basis_t = key_basis.to(torch.float64).transpose(-1, -2)  # [Hkv, d, d]: x @ B^T
    b_node = add_constant(gm, "sq_key_basis_t", basis_t.to(device=device, dtype=dtype), new_k.next)
    users = list(new_k.users)
    with gm.graph.inserting_after(b_node):
        x = new_k
        if site.nodes.get("centering_ok", True) and key_mean is not None and bool(key_mean.abs().sum() > 0):
            mu = key_mean.to(torch.float64)[None, :, None, :].to(device=device, dtype=dtype)
            mu_node = add_constant(gm, "sq_key_mean", mu, b_node.next)
            with gm.graph.inserting_after(mu_node):
                x = gm.graph.call_function(torch.sub, (new_k, mu_node))
            with gm.graph.inserting_after(x):
                rotated = gm.graph.call_function(torch.matmul, (x, b_node))
        else:
            rotated = gm.graph.call_function(torch.matmul, (x, b_node))
    for u in users:
        u.replace_input_with(new_k, rotated)
    site.nodes["key_store"] = rotated

    q_dtype, q_device = _dtype_of(q), _device_of(q)
    q_basis = basis_t.repeat_interleave(rep, dim=0).to(device=q_device, dtype=q_dtype)
    qb_node = add_constant(gm, "sq_query_basis_t", q_basis, attn)
    with gm.graph.inserting_before(attn):
        q_rot = gm.graph.call_function(torch.matmul, (q, qb_node))
    attn.replace_input_with(q, q_rot)
    site.rotation = True
