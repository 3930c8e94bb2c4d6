"""Fold the value rotation into v_proj and its inverse into o_proj: zero cost at run time.

With v' = B_v (v - mu_v) per kv head, the value rows of v_proj (one block, or rows gathered per kv head from a
fused QKV weight: `site.nodes["v_rows"]`) become W_v' = B_v W_v, b_v' = B_v (b_v - mu_v). Attention
mixes values with weights that sum to one, so its output is o' = B_v (o - mu_v) per head, and o_proj absorbs
the inverse: W_o' = W_o blockdiag(B_v^T over query heads, each with its kv head), b_o' = b_o + W_o concat(mu_v).
The new weights are copies held by the compiled graph; the user's module is not touched. Where the attention output
does not reach o_proj through data movement only (a gated output: `o_proj(attn * sigmoid(gate))`), the detector
finds no o_proj (`site.nodes["o_linear"]` None): only v_proj is folded here, and `insert_output_rotation` undoes
the rotation on the attention output itself.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from .fx_utils import add_constant, tensor_value
from .projections import Projection, as_linear, projection_of
from .sites import Site


def _params(gm: fx.GraphModule, lin: fx.Node, example_inputs: Optional[list]):
    """(projection, weight as [out, in], bias) of a projection node (F.linear, Conv1D addmm, `x @ W.T` [+ b])."""
    proj = projection_of(lin, gm)
    if proj is None:
        raise ValueError(f"'{lin.name}' is not a projection the fold can rewrite")
    w = tensor_value(gm, proj.weight, example_inputs)
    if w is not None and proj.weight_in_out:
        w = w.t()
    return proj, w, tensor_value(gm, proj.bias, example_inputs)


def _set_linear_params(gm: fx.GraphModule, proj: Projection, weight: torch.Tensor, bias: torch.Tensor,
                       tag: str) -> None:
    """The projection becomes F.linear over copies: `weight` [out, in] and `bias`."""
    w_node = add_constant(gm, f"sq_{tag}_weight", weight, proj.out)
    b_node = add_constant(gm, f"sq_{tag}_bias", bias, proj.out)
    as_linear(gm, proj, w_node, b_node)


def fold_value_rotation(gm: fx.GraphModule, site: Site, value_basis: torch.Tensor, value_mean: Optional[torch.Tensor],
                        example_inputs: Optional[list], fold_v_proj: bool = True) -> None:
    """Rewrite v_proj and o_proj of `site` with the value basis folded in (float64 math on the weights' device,
    original dtype).

    fold_v_proj=False rewrites o_proj only (the caller keeps rotating values online at the write). A site without
    an o_proj to absorb the inverse (`o_linear` None) gets v_proj only; the caller inserts the output rotation."""
    v_lin, o_lin, off = site.nodes["v_linear"], site.nodes.get("o_linear"), site.nodes["v_offset"]
    hkv, d, hq = site.kv_heads, site.head_dim, site.q_heads
    # rows[h, e]: the v_proj output row of feature e of kv head h (one block, or gathered from a fused weight)
    rows = site.nodes.get("v_rows")
    if rows is None:
        rows = off + torch.arange(hkv * d).reshape(hkv, d)
    if not fold_v_proj and o_lin is None:
        return
    v_proj, w_v, b_v = _params(gm, v_lin, example_inputs) if fold_v_proj else (None, None, None)
    o_proj, w_o, b_o = _params(gm, o_lin, example_inputs) if o_lin is not None else (None, None, None)
    if (fold_v_proj and w_v is None) or (o_lin is not None and w_o is None):
        raise ValueError(f"layer {site.layer}: v_proj/o_proj weights are not graph inputs or constants")
    # The fold runs once, in float64 on the weights' device (a GPU's float64 einsum takes milliseconds where
    # the CPU took 0.2-0.4 s per layer of a Llama-3-8B shape on 2 cores: compile time).
    dev = (w_o if w_o is not None else w_v).device
    basis = value_basis.detach().to(dev, torch.float64)
    mean = (torch.zeros(hkv, d, dtype=torch.float64, device=dev) if value_mean is None
            else value_mean.detach().to(dev, torch.float64))

    if fold_v_proj:
        _fold_v_proj(gm, v_proj, rows, hkv, d, w_v, b_v, basis, mean)
    if o_lin is not None:
        _fold_o_proj(gm, o_proj, hq, hkv, d, w_o, b_o, basis, mean)
        site.o_proj_folded = True


def _fold_v_proj(gm, v_proj, rows, hkv, d, w_v, b_v, basis, mean) -> None:
    wv = w_v.detach().to(basis.device, torch.float64).clone()
    idx = rows.reshape(-1).to(wv.device)
    wv[idx] = torch.einsum("hed,hdi->hei", basis, wv[idx].reshape(hkv, d, -1)).reshape(hkv * d, -1)
    bv = (torch.zeros(wv.shape[0], dtype=torch.float64, device=wv.device) if b_v is None
          else b_v.detach().to(wv.device, torch.float64).clone())
    bv[idx] = torch.einsum("hed,hd->he", basis, bv[idx].reshape(hkv, d) - mean).reshape(-1)
    _set_linear_params(gm, v_proj, wv.to(w_v.device, w_v.dtype), bv.to(w_v.device, w_v.dtype), "v_proj")


def _fold_o_proj(gm, o_proj, hq, hkv, d, w_o, b_o, basis, mean) -> None:
    rep = hq // hkv
    q_basis, q_mean = basis.repeat_interleave(rep, dim=0), mean.repeat_interleave(rep, dim=0)  # [Hq, d, d], [Hq, d]
    wo = w_o.detach().to(basis.device, torch.float64).reshape(w_o.shape[0], hq, d)
    bo = (torch.zeros(w_o.shape[0], dtype=torch.float64, device=wo.device) if b_o is None
          else b_o.detach().to(wo.device, torch.float64))
    bo = bo + torch.einsum("ohd,hd->o", wo, q_mean)
    wo = torch.einsum("ohd,hed->ohe", wo, q_basis).reshape(w_o.shape[0], hq * d)
    _set_linear_params(gm, o_proj, wo.to(w_o.device, w_o.dtype), bo.to(w_o.device, w_o.dtype), "o_proj")
