"""The attention-sink token kept exact beside the packed codes (IntactKV's idea, arXiv:2403.01241).

The first token a sequence sees (RoPE position 0) draws a large share of every later query's attention and has a
nearly constant key in most layers; quantizing it costs SmolLM2-135M about 5 points of teacher-forced agreement
at 3.76x (BENCHMARKS.md, issue #6). `SpectralCache` therefore also keeps that token's key (model basis) and
value (storage basis) in float32 per (batch row, kv-head), with its cache position (`sink_pos`, -1 while a
row has none). Reads use the exact copy in place of the token's codes:

- eager (and prefill under the backend): `sqcompile::put_sink` overwrites the token's row of the dequantized
  K / storage-basis V;
- compiled decode steps: the substitution pass hands the decode op one extra split (`extra_inputs`: the sink and,
  with `exact_new`, the step's own new token; scores in log2 units, the kernels' own) and the sink's position;
  the kernel skips the sink's packed copy (one compare per tile; a [B, T] mask read per token cost the CUDA
  kernel 20% at 32K tokens, batch 8), reads the cache up to the new token, and its split reduction merges the
  extra split (`merge_sink_reference` is the torch form).

The cost: 8 * head_dim bytes per (layer, batch row, kv-head), whatever the context length.
"""
from __future__ import annotations

from typing import Optional

import torch

LOG2E = 1.4426950408889634


@torch.library.custom_op("sqcompile::put_sink", mutates_args=())
def put_sink(x: torch.Tensor, sink: torch.Tensor, sink_pos: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, d] with row sink_pos[b] of batch row b replaced by sink [B, H, d] (rows with sink_pos < 0,
    or at or past T, keep x)."""
    B, H, T, D = x.shape
    if sink.shape != (B, H, D) or sink_pos.shape != (B,):
        raise ValueError(f"put_sink: x {tuple(x.shape)} needs sink [{B}, {H}, {D}] and sink_pos [{B}], got "
                         f"{tuple(sink.shape)} / {tuple(sink_pos.shape)}")
    at = torch.arange(T, device=x.device)[None, None, :, None] == sink_pos.to(x.device)[:, None, None, None]
    return torch.where(at, sink.to(x.dtype)[:, :, None, :], x).contiguous()


@put_sink.register_fake
def _(x, sink, sink_pos):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _scores(q: torch.Tensor, k: torch.Tensor, k_mean: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, Hkv, G] = scale * log2(e) * q . (k - k_mean) for exact keys k [B, Hkv, d]: the kernels' score units (they
    drop q . k_mean from every score: the same for all tokens of a query)."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    kc = k.float() - k_mean.float().reshape(1, Hkv, D)
    return torch.einsum("bhgd,bhd->bhg", q.float().reshape(B, Hkv, Hq // Hkv, D), kc) * (float(scale) * LOG2E)


def sink_inputs(q: torch.Tensor, sink_k: torch.Tensor, k_mean: torch.Tensor, sink_pos: torch.Tensor,
                kv_mask: Optional[torch.Tensor], scale: float):
    """What a decode op needs for the exact sink: (sink_score [B, Hq] float32 = scale * log2(e) *
    q . (k_sink - k_mean), -inf for rows without a sink or whose mask hides it; sink_pos as int32 [B]).

    q [B, Hq, d] (model basis, after RoPE); sink_k [B, Hkv, d] exact keys; k_mean [Hkv, d]."""
    B, Hq, _ = q.shape
    s = torch.where((sink_pos >= 0)[:, None], _scores(q, sink_k, k_mean, scale).reshape(B, Hq), float("-inf"))
    if kv_mask is not None:
        # the mask hides the sink too (a padding token taken for one, a window past it): so does its score
        allowed = kv_mask.expand(B, kv_mask.shape[-1]) != 0
        s = torch.where(allowed.gather(1, sink_pos.clamp(min=0)[:, None]), s, float("-inf"))
    return s, sink_pos.to(torch.int32)


def extra_inputs(q: torch.Tensor, k_mean: torch.Tensor, kv_mask: Optional[torch.Tensor], scale: float,
                 sink: Optional[tuple] = None, new: Optional[tuple] = None):
    """The decode op's one extra split for the exact tokens of a step: the sink (sink_k, sink_v, sink_pos) and/or
    the step's own new token (key [B, Hkv, 1, d] model basis, v_store [B, Hkv, 1, d] storage basis, position
    [1]). Returns (sink_score [B, Hq], sink_value [B, Hkv or Hq, d], sink_pos int32 [B]); with `new` the op
    reads the packed cache up to, not including, the new token's position (the caller passes that length).

    Both exact: one split holding the two tokens, score log2(2^s_sink + 2^s_new), value their softmax-weighted
    mean per query head; a sink that is the new token itself counts once."""
    B, Hq, D = q.shape
    if new is None:
        return sink_inputs(q, sink[0], k_mean, sink[2], kv_mask, scale)
    key, v_new, position = new
    Hkv = key.shape[1]
    G = Hq // Hkv
    s_new = _scores(q, key[:, :, 0], k_mean, scale)  # [B, Hkv, G]
    v_new = v_new.float()[:, :, 0]
    if sink is None:
        return s_new.reshape(B, Hq), v_new, torch.full((B,), -1, dtype=torch.int32, device=q.device)
    s_sink, pos = sink_inputs(q, sink[0], k_mean, sink[2], kv_mask, scale)
    s_sink = torch.where((pos.long() == position.reshape(1).long())[:, None], float("-inf"), s_sink)
    s_sink = s_sink.reshape(B, Hkv, G)
    m = torch.maximum(s_sink, s_new)
    w_sink, w_new = torch.exp2(s_sink - m), torch.exp2(s_new - m)  # s_new is finite: m too, and 2^-inf = 0
    tot = w_sink + w_new
    value = (w_sink[..., None] * sink[1].float()[:, :, None, :] + w_new[..., None] * v_new[:, :, None, :]) / tot[..., None]
    return (m + torch.log2(tot)).reshape(B, Hq), value.reshape(B, Hq, D), pos


def merge_sink_reference(scores: torch.Tensor, v: torch.Tensor, sink_score: Optional[torch.Tensor],
                         sink_value: Optional[torch.Tensor]):
    """The references' form of the merge: scores [B, Hkv, G, T] (natural-log units, masked with -inf),
    v [B, Hkv, T, d] -> softmax attention over the T tokens and, where given, one more token with score
    sink_score [B, Hq] (log2 units) / ln 2 and value sink_value [B, Hkv, d] (or [B, Hq, d]: one per query head).
    Returns [B, Hkv, G, d]."""
    if sink_score is None:
        p = torch.softmax(scores, -1).nan_to_num(0.0)
        return torch.einsum("bhgt,bhtd->bhgd", p, v)
    B, Hkv, G, _ = scores.shape
    s = sink_score.float().reshape(B, Hkv, G, 1) / LOG2E
    p = torch.softmax(torch.cat([scores, s], -1), -1).nan_to_num(0.0)
    value = sink_value.float().reshape(B, Hkv, -1, sink_value.shape[-1])  # [B, Hkv, 1 or G, d]
    return torch.einsum("bhgt,bhtd->bhgd", p[..., :-1], v) + p[..., -1:] * value


def check_sink(q: torch.Tensor, sink_score: Optional[torch.Tensor], sink_value: Optional[torch.Tensor],
               sink_pos: Optional[torch.Tensor], kv_heads: int):
    """All three or none: sink_score [B, Hq], sink_value [B, Hkv, d] or [B, Hq, d] (one per query head),
    sink_pos [B] (the cache position of the sink's packed copy, which the kernels skip; -1: none). Returns
    float32, float32, int32, contiguous."""
    given = [t is not None for t in (sink_score, sink_value, sink_pos)]
    if any(given) and not all(given):
        raise ValueError("sink_score, sink_value and sink_pos go together (all three or none)")
    if sink_score is None:
        return None, None, None
    B, Hq, D = q.shape
    if tuple(sink_score.shape) != (B, Hq) or tuple(sink_value.shape) not in ((B, kv_heads, D), (B, Hq, D)) \
            or tuple(sink_pos.shape) != (B,):
        raise ValueError(f"sink_score must be [{B}, {Hq}], sink_value [{B}, {kv_heads}, {D}] (or [{B}, {Hq}, {D}]) and "
                         f"sink_pos [{B}], got "
                         f"{tuple(sink_score.shape)} / {tuple(sink_value.shape)} / {tuple(sink_pos.shape)}")
    return (sink_score.to(torch.float32).contiguous(), sink_value.to(torch.float32).contiguous(),
            sink_pos.to(device=q.device, dtype=torch.int32).contiguous())


def skip_mask(kv_mask: Optional[torch.Tensor], sink_pos: Optional[torch.Tensor], batch: int, capacity: int,
              device) -> Optional[torch.Tensor]:
    """kv_mask [B, T] (None: all) without the sink's packed copy: the Triton kernels and the references skip it
    through their token mask."""
    if sink_pos is None:
        return kv_mask
    keep = torch.arange(capacity, device=device)[None, :] != sink_pos.to(device)[:, None].long()
    return keep if kv_mask is None else keep & (kv_mask.to(device).expand(batch, capacity) != 0)
