"""Attention sinks (GPT-OSS): give the dropped sink column the value that keeps the value-mean fold exact.

Softmax runs over [scores, sink logit] and the sink's column is dropped, so the weights on the values sum to
1 - p_sink. With values stored as v' = B_v (v - mu_v) (`fold_value_rotation`), attention returns
B_v (o - (1 - p_sink) mu_v) per head, and o_proj's folded bias adds back mu_v whole: off by p_sink mu_v. The sink
attends, in effect, to a zero value in the model basis, which in the storage basis is -B_v mu_v; adding that term

    out' = p @ v' + p_sink * (-B_v mu_v)

makes the output B_v (o - mu_v), exactly what the folded o_proj expects. The codes stored are the same as without
a sink (centered values, as `SpectralCache` stores them); the decode kernels take the same term as one more entry
of their exact split (`substitute_decode_attention`). The key mean is kept in the keys by the detector
(`_sink_attention`: the sink logit does not move with q . mu_k).
"""
from __future__ import annotations

import operator
from typing import Optional

import torch
import torch.fx as fx

from .fx_utils import add_constant, meta_tensor
from .sites import Site


def sink_value(value_basis: torch.Tensor, value_mean: Optional[torch.Tensor], q_heads: int) -> Optional[torch.Tensor]:
    """[Hq, d] float64: the storage-basis value of the model-basis zero vector per query head (-B_v mu_v of its kv
    head); None when the mean is zero (nothing to add)."""
    if value_mean is None or not bool(value_mean.abs().sum() > 0):
        return None
    basis, mean = value_basis.detach().to(torch.float64), value_mean.detach().to(torch.float64)
    per_kv = -torch.einsum("hed,hd->he", basis, mean)
    return per_kv.repeat_interleave(q_heads // per_kv.shape[0], dim=0)


def insert_sink_value(gm: fx.GraphModule, site: Site, value_basis: torch.Tensor,
                      value_mean: Optional[torch.Tensor]) -> fx.Node:
    """out -> out + probs[..., -1:] * sink_value at a site proven by `_sink_attention` (after the value fold).
    Returns the attention output node the readers of `out` now read (out itself when there is nothing to add)."""
    value = sink_value(value_basis, value_mean, site.q_heads)
    probs, out = site.nodes["probs"], site.nodes["out"]
    if value is None:
        return out
    t = meta_tensor(out)
    dtype = t.dtype if t is not None else torch.float32
    device = t.device if t is not None else torch.device("cpu")
    users = list(out.users)
    const = add_constant(gm, "sq_sink_value", value[None, :, None, :].to(device=device, dtype=torch.float32), out)
    with gm.graph.inserting_after(out):
        p_sink = gm.graph.call_function(operator.getitem, (probs, (Ellipsis, slice(-1, None))))
    with gm.graph.inserting_after(p_sink):
        term = gm.graph.call_function(torch.mul, (p_sink, const))
    with gm.graph.inserting_after(term):
        term = gm.graph.call_method("to", (term, dtype))
    with gm.graph.inserting_after(term):
        new_out = gm.graph.call_function(torch.add, (out, term))
    for u in users:
        u.replace_input_with(out, new_out)
    return new_out
