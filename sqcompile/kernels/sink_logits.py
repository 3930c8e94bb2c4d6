"""Attention-sink logits (GPT-OSS) as one more entry of the decode ops' extra split.

GPT-OSS's softmax runs over [scores, s_h]: one learned logit per query head with no key, whose column is then
dropped. For the decode ops that is one more token with score s_h and a value that is zero in the model basis.
The ops' units (`sqcompile.kernels.sink`): scores in log2 units without q . k_mean (the same for every key of a
query, so the kernels drop it), values in the storage basis. The sink does not move with q . k_mean, so its
score in those units is

    score_h = log2(e) * (s_h - scale * q_h . k_mean_{kv(h)})          value_h = -B_v mu_v   (storage of zero)

and the ops' split reduction takes it like any exact token: nothing changes inside the Triton or CUDA kernels.
Merged with the exact tokens' split (`extra_inputs`) by log-sum-exp (`merge_splits`). Plain torch: a handful of
elementwise ops per step that Inductor fuses; `merge_sink_reference` in `sink.py` is the reference the tests
check the decode ops against.
"""
from __future__ import annotations

from typing import Optional

import torch

from .sink import LOG2E, _merge_exact


def sink_logit_split(q: torch.Tensor, sinks: torch.Tensor, k_mean: torch.Tensor, scale: float,
                     value: Optional[torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
    """The sink as a split: (score [B, Hq] float32, log2 units without q . k_mean; value [B, Hq, d] float32).

    q [B, Hq, d] model basis (after RoPE); sinks: the logits, broadcastable to [B, Hq] after dropping trailing
    size-1 dims ([B|1, Hq|1, 1, 1] as the model's cat reads them, or [Hq]); k_mean [Hkv, d]; value [Hq, d] the
    storage-basis value of the sink column (None: zero)."""
    B, Hq, D = q.shape
    Hkv = k_mean.shape[0]
    if Hq % Hkv:
        raise ValueError(f"sink_logit_split: {Hq} query heads are not a multiple of {Hkv} kv heads")
    s = sinks.float()
    while s.dim() > 2 and s.shape[-1] == 1:
        s = s[..., 0]
    s = s.reshape(-1, s.shape[-1]) if s.dim() == 2 else s.reshape(1, -1)
    s = s.expand(B, Hq)
    mean_q = k_mean.float().repeat_interleave(Hq // Hkv, dim=0)  # [Hq, d]
    shift = torch.einsum("bhd,hd->bh", q.float(), mean_q) * float(scale)
    score = ((s - shift) * LOG2E).contiguous()
    v = q.new_zeros(B, Hq, D, dtype=torch.float32) if value is None else value.float()[None].expand(B, Hq, D)
    return score, v.contiguous()


def merge_splits(score_a: torch.Tensor, value_a: torch.Tensor, score_b: torch.Tensor,
                 value_b: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Two splits (score [B, Hq] log2 units, may be -inf; value [B, Hkv or Hq, d]) as one: score log2(2^a + 2^b),
    value their weighted mean [B, Hq, d]."""
    B, Hq = score_a.shape
    va = value_a.float().repeat_interleave(Hq // value_a.shape[1], dim=1)
    vb = value_b.float().repeat_interleave(Hq // value_b.shape[1], dim=1)
    # the two as the tokens of one split per query head: [B, Hq, G=1, N=2] scores, [B, Hq, 1, 2, d] values
    score, value = _merge_exact(torch.stack([score_a, score_b], -1)[:, :, None], torch.stack([va, vb], 2)[:, :, None])
    return score[:, :, 0].contiguous(), value[:, :, 0].contiguous()


def no_exact_positions(q: torch.Tensor) -> torch.Tensor:
    """int32 [B] of -1: a split with no packed copy for the kernel to skip."""
    return torch.full((q.shape[0],), -1, dtype=torch.int32, device=q.device)


# An additive mask entry at or below this hides its token: exp(score + bias) is exactly 0 in float32 for any score a
# model produces. transformers' eager masks use torch.finfo(dtype).min (about -3.4e38; bf16 / fp16: -3.4e38 / -6.6e4).
HIDDEN_BELOW = -1e4


@torch.library.custom_op("sqcompile::token_mask_from_bias", mutates_args=())
def token_mask_from_bias(bias: torch.Tensor) -> torch.Tensor:
    """An additive attention mask [B|1, 1, 1, T] (0: attend, <= HIDDEN_BELOW: hidden; transformers' eager mask, a
    graph input under `generate`) as the decode ops' token mask, uint8 [B|1, T]. A value that is neither (a real
    bias: ALiBi, a soft penalty) cannot be a token mask: an error on CPU, a device-side assert on CUDA (no host sync
    inside a CUDA graph)."""
    if bias.dim() != 4 or bias.shape[1] != 1 or bias.shape[2] != 1:
        raise ValueError(f"token_mask_from_bias: expected an additive mask [B, 1, 1, T], got {tuple(bias.shape)}")
    rows = bias[:, 0, 0]
    keep, hidden = rows == 0, rows <= HIDDEN_BELOW
    ok = (keep | hidden).all()
    if rows.is_cuda:
        torch._assert_async(ok, "sqcompile: the additive attention mask holds a bias that is not 0 / -inf")
    elif not bool(ok):
        raise ValueError("sqcompile: the attention mask of a decode step holds values other than 0 (attend) and "
                         f"<= {HIDDEN_BELOW} (hidden): an additive bias the decode ops cannot take as a token mask. "
                         "Compile with options={'quantize': False} or without the substitution to run it.")
    return keep.to(torch.uint8).contiguous()


@token_mask_from_bias.register_fake
def _(bias):
    return bias.new_empty(bias.shape[0], bias.shape[-1], dtype=torch.uint8)
