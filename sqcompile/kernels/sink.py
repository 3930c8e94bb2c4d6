"""The attention-sink token kept exact beside the packed codes (IntactKV's idea, arXiv:2403.01241).

The first token a sequence sees (RoPE position 0) draws a large share of every later query's attention and has a
nearly constant key in most layers; quantizing it costs SmolLM2-135M about 5 points of teacher-forced agreement
at 3.76x (BENCHMARKS.md, "Quality"). `SpectralCache` therefore also keeps that token's key (model basis) and
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

Exact slots: besides the sink, `SpectralCache(outlier_tokens=N)` keeps the N tokens whose keys lie
farthest from the key mean exact the same way (slot form: sink_k / sink_v [B, Hkv, S, d], sink_pos [B, S]; the
one-token form [B, Hkv, d] / [B] is still taken everywhere). The decode graph holds two ops for them, each one node
for Inductor: `sqcompile::store_exact` (the slot update at the write) and `sqcompile::exact_split` (the extra
split); on CUDA each is one Triton launch (`sink_triton.py`).

Recent window: `SpectralCache(recent_window=W)` keeps the last W tokens exact in a ring (fp16 window_k model basis,
window_v storage basis, window_pos [B, W]; position p in slot p % W). Reads put its rows over the dequantized cache
(`sqcompile::put_window`, under the slots and the new token); a compiled decode step hands the ring to
`sqcompile::exact_split`, which merges it into the same extra split (a ring position that a slot or the new token
also holds counts once, from that copy), and the decode kernel reads the codes only before the ring's first
position (`codes_lengths`).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import uses_triton

LOG2E = 1.4426950408889634


MAX_SLOTS = 8  # exact tokens per batch row a decode kernel skips (the CUDA split kernel keeps them in registers)
OUTLIER_TOKENS = 4  # SpectralCache's default number of exact outlier tokens per row, besides the sink


def as_slots(sink: torch.Tensor, sink_pos: torch.Tensor):
    """The one-token form (sink [B, H, d], sink_pos [B]) as the slot form (sink [B, H, S, d], sink_pos [B, S])."""
    if sink_pos.dim() == 1:
        sink_pos = sink_pos[:, None]
    if sink.dim() == 3:
        sink = sink[:, :, None]
    return sink, sink_pos


@torch.library.custom_op("sqcompile::put_sink", mutates_args=())
def put_sink(x: torch.Tensor, sink: torch.Tensor, sink_pos: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, d] with row sink_pos[b, s] of batch row b replaced by sink[b, :, s] for each exact slot s
    (sink [B, H, S, d], sink_pos [B, S]; or one token: [B, H, d] / [B]). Slots with sink_pos < 0, or at or past T,
    leave x as it is."""
    B, H, T, D = x.shape
    if sink_pos.dim() not in (1, 2) or sink.dim() != sink_pos.dim() + 2:
        raise ValueError(f"put_sink: needs sink [B, H, S, d] with sink_pos [B, S] (or [B, H, d] with [B]), got "
                         f"{tuple(sink.shape)} / {tuple(sink_pos.shape)}")
    sink, sink_pos = as_slots(sink, sink_pos)
    S = sink_pos.shape[1]
    if sink.shape != (B, H, S, D) or sink_pos.shape != (B, S):
        raise ValueError(f"put_sink: x {tuple(x.shape)} needs sink [{B}, {H}, S, {D}] and sink_pos [{B}, S], got "
                         f"{tuple(sink.shape)} / {tuple(sink_pos.shape)}")
    t = torch.arange(T, device=x.device)[None, None, :, None]
    out = x
    for s in range(S):
        at = t == sink_pos[:, s].to(x.device)[:, None, None, None]
        out = torch.where(at, sink[:, :, s].to(x.dtype)[:, :, None, :], out)
    return out.contiguous()


@put_sink.register_fake
def _(x, sink, sink_pos):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("sqcompile::put_window", mutates_args=())
def put_window(x: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
    """x [B, H, T, d] with row pos[b, s] of batch row b replaced by rows[b, :, s] (the recent window's ring: rows
    [B, H, W, d], pos [B, W]; -1 or >= T: nothing). `put_sink` for W rows in one scatter instead of W passes over
    x; its own op so that the substitution pass tells the window from the exact slots."""
    B, H, T, D = x.shape
    W = pos.shape[-1]
    if rows.dim() != 4 or rows.shape != (B, H, W, D) or pos.shape != (B, W):
        raise ValueError(f"put_window: x {tuple(x.shape)} needs rows [{B}, {H}, W, {D}] and pos [{B}, W], got "
                         f"{tuple(rows.shape)} / {tuple(pos.shape)}")
    at = torch.where((pos >= 0) & (pos < T), pos.long(), T)  # T: a scratch row past the end, dropped
    out = torch.cat([x, x.new_zeros(B, H, 1, D)], 2)
    out.scatter_(2, at[:, None, :, None].expand(B, H, W, D), rows.to(x.dtype))
    return out[:, :, :T].contiguous()


@put_window.register_fake
def _(x, rows, pos):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _scores(q: torch.Tensor, k: torch.Tensor, k_mean: torch.Tensor, scale: float) -> torch.Tensor:
    """[B, Hkv, G] = scale * log2(e) * q . (k - k_mean) for exact keys k [B, Hkv, d]: the kernels' score units (they
    drop q . k_mean from every score: the same for all tokens of a query)."""
    B, Hq, D = q.shape
    Hkv = k.shape[1]
    kc = k.float() - k_mean.float().reshape(1, Hkv, D)
    return torch.einsum("bhgd,bhd->bhg", q.float().reshape(B, Hkv, Hq // Hkv, D), kc) * (float(scale) * LOG2E)


def _slot_scores(q: torch.Tensor, sink_k: torch.Tensor, k_mean: torch.Tensor, sink_pos: torch.Tensor,
                 kv_mask: Optional[torch.Tensor], scale: float) -> torch.Tensor:
    """[B, Hkv, G, S] scores of the exact slots (sink_k [B, Hkv, S, d], sink_pos [B, S]): -inf for an empty slot
    (position -1) and for one the mask hides (a padding token taken for a sink, a window past it)."""
    B, Hq, D = q.shape
    Hkv, S = sink_k.shape[1], sink_k.shape[2]
    s = torch.stack([_scores(q, sink_k[:, :, i], k_mean, scale) for i in range(S)], -1)  # [B, Hkv, G, S]
    ok = sink_pos >= 0
    if kv_mask is not None:
        allowed = kv_mask.expand(B, kv_mask.shape[-1]) != 0
        ok = ok & allowed.gather(1, sink_pos.clamp(min=0))
    return torch.where(ok[:, None, None, :], s, float("-inf"))


def _merge_exact(s: torch.Tensor, v: torch.Tensor):
    """Tokens with scores s [B, Hkv, G, N] (log2 units) and values v [B, Hkv, 1 or G, N, d] as one split: (score
    log2(sum 2^s) [B, Hkv, G], value their softmax-weighted mean [B, Hkv, G, d]); all -inf: score -inf, value 0."""
    m = s.amax(-1, keepdim=True)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    w = torch.exp2(s - m)
    tot = w.sum(-1)
    value = torch.einsum("bhgn,bhgnd->bhgd", w, v.expand(-1, -1, s.shape[2], -1, -1)) / tot.clamp_min(1e-30)[..., None]
    score = torch.where(tot > 0, m[..., 0] + torch.log2(tot.clamp_min(1e-30)), float("-inf"))
    return score, value


def sink_inputs(q: torch.Tensor, sink_k: torch.Tensor, k_mean: torch.Tensor, sink_pos: torch.Tensor,
                kv_mask: Optional[torch.Tensor], scale: float, sink_v: Optional[torch.Tensor] = None):
    """What a decode op needs for the exact sink: (sink_score [B, Hq] float32 = scale * log2(e) *
    q . (k_sink - k_mean), -inf for rows without a sink or whose mask hides it; sink_pos as int32 [B]).

    q [B, Hq, d] (model basis, after RoPE); sink_k [B, Hkv, d] exact keys; k_mean [Hkv, d]. Slots (sink_k
    [B, Hkv, S, d], sink_pos [B, S], with their values sink_v [B, Hkv, S, d]): the slots merged into one split,
    (score [B, Hq], value [B, Hq, d], sink_pos int32 [B, S])."""
    B, Hq, D = q.shape
    if sink_k.dim() == 3:
        s = _slot_scores(q, sink_k[:, :, None], k_mean, sink_pos[:, None], kv_mask, scale)
        return s.reshape(B, Hq), sink_pos.to(torch.int32)
    s = _slot_scores(q, sink_k, k_mean, sink_pos, kv_mask, scale)
    score, value = _merge_exact(s, sink_v.float()[:, :, None])
    return score.reshape(B, Hq), value.reshape(B, Hq, D), sink_pos.to(torch.int32)


def window_scores(q: torch.Tensor, window: tuple, k_mean: torch.Tensor, kv_mask: Optional[torch.Tensor],
                  scale: float, exact_pos: Optional[torch.Tensor] = None) -> torch.Tensor:
    """[B, Hkv, G, W] scores of the recent-window ring (window_k [B, Hkv, W, d] model basis, window_v, window_pos
    [B, W]): -inf for an empty slot, one the mask hides, and one whose position an exact copy of higher precedence
    holds (`exact_pos` [B, S'] int: the exact slots and the step's new token; the eager read puts them over the
    window's rows, so here they count once, from their own fp32 copy)."""
    window_k, _, window_pos = window
    s = _slot_scores(q, window_k.float(), k_mean, window_pos.long(), kv_mask, scale)
    if exact_pos is not None:
        held = exact_pos.long()
        dup = ((window_pos.long()[:, :, None] == held[:, None, :]) & (held[:, None, :] >= 0)).any(-1)  # [B, W]
        s = torch.where(dup[:, None, None, :], float("-inf"), s)
    return s


def codes_lengths(length: torch.Tensor, window_pos: torch.Tensor) -> torch.Tensor:
    """int32 [B]: how many leading cache positions a decode kernel reads from the codes when the recent window
    holds the rest: the lowest position the ring holds per row (it holds a contiguous run of the newest ones),
    capped at `length` (the positions written before this step's own token, [] or [B])."""
    B, W = window_pos.shape
    length = length.reshape(-1).expand(B).to(torch.int64)
    held = torch.where(window_pos >= 0, window_pos.long(), length[:, None]).amin(1)
    return torch.minimum(held, length).to(torch.int32)


def extra_inputs(q: torch.Tensor, k_mean: torch.Tensor, kv_mask: Optional[torch.Tensor], scale: float,
                 sink: Optional[tuple] = None, new: Optional[tuple] = None, window: Optional[tuple] = None):
    """The decode op's one extra split for the exact tokens of a step: the exact slots (sink_k, sink_v, sink_pos:
    [B, Hkv, d] / [B, Hkv, d] / [B] for the sink alone, or [B, Hkv, S, d] / [B, Hkv, S, d] / [B, S] for the sink and
    the outlier tokens), the step's own new token (key [B, Hkv, 1, d] model basis, v_store [B, Hkv, 1, d]
    storage basis, position [1]) and the recent window (window_k / window_v [B, Hkv, W, d] fp16, model / storage
    basis, window_pos [B, W]), any of them. Returns (sink_score [B, Hq], sink_value [B, Hkv or Hq, d], sink_pos
    int32 [B] or [B, S]); with `new` the op reads the packed cache up to, not including, the new token's position,
    with `window` up to the window's first position (`codes_lengths`; the caller passes that length).

    Several exact tokens: one split holding them, score log2(sum 2^s), value their softmax-weighted mean per
    query head; a token held twice counts once, with the eager read's precedence: the new token, then a slot,
    then the window."""
    B, Hq, D = q.shape
    if new is None and window is None:
        if sink[0].dim() == 3:
            return sink_inputs(q, sink[0], k_mean, sink[2], kv_mask, scale)
        return sink_inputs(q, sink[0], k_mean, sink[2], kv_mask, scale, sink_v=sink[1])
    if sink is None and window is None:  # the new token alone: its value per kv-head
        key, v_new, _ = new
        return (_scores(q, key[:, :, 0], k_mean, scale).reshape(B, Hq), v_new.float()[:, :, 0],
                torch.full((B,), -1, dtype=torch.int32, device=q.device))
    scores, values, held = [], [], []
    pos = None
    one = sink is not None and sink[0].dim() == 3
    if new is not None:
        key, v_new, position = new
        scores.append(_scores(q, key[:, :, 0], k_mean, scale)[..., None])  # [B, Hkv, G, 1]
        values.append(v_new.float()[:, :, 0:1])
        held.append(position.reshape(1, 1).long().expand(B, 1))
    if sink is not None:
        sink_k, sink_v, sink_pos = sink
        if one:
            sink_k, sink_v, sink_pos = sink_k[:, :, None], sink_v[:, :, None], sink_pos[:, None]
        s = _slot_scores(q, sink_k, k_mean, sink_pos, kv_mask, scale)
        if new is not None:
            s = torch.where((sink_pos.long() == new[2].reshape(1).long())[:, None, None, :], float("-inf"), s)
        scores.append(s)
        values.append(sink_v.float())
        held.append(sink_pos.long())
        pos = sink_pos.to(torch.int32)
    if window is not None:
        scores.append(window_scores(q, window, k_mean, kv_mask, scale, torch.cat(held, 1) if held else None))
        values.append(window[1].float())
    score, value = _merge_exact(torch.cat(scores, -1), torch.cat(values, 2)[:, :, None])
    if pos is None:
        pos = torch.full((B,), -1, dtype=torch.int32, device=q.device)
    return score.reshape(B, Hq), value.reshape(B, Hq, D), pos[:, 0] if one else pos


def exact_split_torch(q, k_mean, kv_mask, scale, sink_k, sink_v, sink_pos, new_k, new_v, new_pos, window_k=None,
                      window_v=None, window_pos=None):
    """`sqcompile::exact_split` in torch (CPU, and the reference of `sink_triton.exact_split_triton`):
    (score [B, Hq], value [B, Hq, d] per query head), from `extra_inputs`."""
    B, Hq, D = q.shape
    sink = None if sink_k is None else (sink_k, sink_v, sink_pos)
    new = None if new_k is None else (new_k, new_v, new_pos)
    window = None if window_k is None else (window_k, window_v, window_pos)
    score, value, _ = extra_inputs(q, k_mean, kv_mask, scale, sink=sink, new=new, window=window)
    value = value.float().reshape(B, value.shape[1], 1, D).expand(B, value.shape[1], Hq // value.shape[1], D)
    return score.contiguous(), value.reshape(B, Hq, D).contiguous()


@torch.library.custom_op("sqcompile::exact_split", mutates_args=())
def exact_split(q: torch.Tensor, k_mean: torch.Tensor, kv_mask: Optional[torch.Tensor], scale: float,
                sink_k: Optional[torch.Tensor], sink_v: Optional[torch.Tensor], sink_pos: Optional[torch.Tensor],
                new_k: Optional[torch.Tensor], new_v: Optional[torch.Tensor],
                new_pos: Optional[torch.Tensor], window_k: Optional[torch.Tensor] = None,
                window_v: Optional[torch.Tensor] = None, window_pos: Optional[torch.Tensor] = None,
                impl: str = "auto") -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """`extra_inputs` as one op (what the substitution pass puts in a decode graph: Inductor sees one node, not the
    few dozen of the merge, which cost it more compile time than the rest of a layer; on CUDA one Triton launch,
    `sink_triton.exact_split_triton`). Returns (sink_score [B, Hq], sink_value [B, Hq, d] per query head,
    sink_pos int32 [B, S]; S = 1 and -1 without exact slots). window_k / window_v [B, Hkv, W, d] (fp16, model /
    storage basis) and window_pos [B, W]: the recent window's ring, one more set of exact tokens in the split.
    impl: "torch" | "triton" ("cuda" = "triton") | "auto" (Triton on CUDA, else torch): the backend's choice
    (`sqcompile.kernels.KernelPlan.decode`)."""
    B, Hq, D = q.shape
    if sink_k is None and new_k is None and window_k is None:
        raise ValueError("exact_split needs the exact slots, the new token, the recent window, or any of them")
    if window_k is not None and (window_v is None or window_pos is None or window_k.dim() != 4
                                 or window_v.shape != window_k.shape or window_pos.shape != (B, window_k.shape[2])):
        raise ValueError(f"exact_split: window_k / window_v must be [B, Hkv, W, d] with window_pos [B, W], got "
                         f"{tuple(window_k.shape)} / {None if window_v is None else tuple(window_v.shape)} / "
                         f"{None if window_pos is None else tuple(window_pos.shape)}")
    if sink_k is not None:
        sink_k, sink_pos = as_slots(sink_k, sink_pos)
        sink_v = as_slots(sink_v, sink_pos)[0]
    if uses_triton(impl, q):  # one launch, the int32 positions included (no conversion and copy of their own)
        from .sink_triton import exact_split_triton

        return exact_split_triton(q, k_mean, kv_mask, scale, sink_k, sink_v, sink_pos, new_k, new_v, new_pos,
                                  window=None if window_k is None else (window_k, window_v, window_pos))
    pos = torch.full((B, 1), -1, dtype=torch.int32, device=q.device) if sink_pos is None \
        else sink_pos.to(torch.int32).clone()
    score, value = exact_split_torch(q, k_mean, kv_mask, scale, sink_k, sink_v, sink_pos, new_k, new_v, new_pos,
                                     window_k, window_v, window_pos)
    return score, value, pos


@exact_split.register_fake
def _(q, k_mean, kv_mask, scale, sink_k, sink_v, sink_pos, new_k, new_v, new_pos, window_k=None, window_v=None,
      window_pos=None, impl="auto"):
    B, Hq, D = q.shape
    S = 1 if sink_pos is None or sink_pos.dim() == 1 else sink_pos.shape[1]
    return (q.new_empty(B, Hq, dtype=torch.float32), q.new_empty(B, Hq, D, dtype=torch.float32),
            q.new_empty(B, S, dtype=torch.int32))


def store_exact_torch(sink_k, sink_v, sink_pos, sink_crit, key_states, v_store, positions, position_ids, k_mean,
                      keep_sink: bool, outliers: int) -> None:
    """`sqcompile::store_exact` in torch (CPU, prompts, and the reference of `sink_triton.store_exact_step_triton`)."""
    B, H, n, D = key_states.shape
    if position_ids is not None:
        pid = position_ids.to(key_states.device).expand(B, n)
        after = torch.cat([pid[:, 1:], torch.ones_like(pid[:, :1])], 1)
        first = (pid == 0) & (after != 0)
        # padding: RoPE position 0, or any token before the row's first real one (left padding at position 1)
        pad = (pid == 0) | ((first.cumsum(1) == 0) & first.any(1, keepdim=True))
    else:
        first = (positions == 0)[None, :].expand(B, n)
        pad = first
    kf, vf = key_states.to(torch.float32), v_store.to(torch.float32)
    if keep_sink:
        has = first.any(-1)
        idx = first.to(torch.int32).argmax(-1)  # the first such token per row
        at = idx[:, None, None, None].expand(B, H, 1, D)
        sink_k[:, :, 0].copy_(torch.where(has[:, None, None], kf.gather(2, at)[:, :, 0], sink_k[:, :, 0]))
        sink_v[:, :, 0].copy_(torch.where(has[:, None, None], vf.gather(2, at)[:, :, 0], sink_v[:, :, 0]))
        sink_pos[:, 0].copy_(torch.where(has, positions[idx], sink_pos[:, 0]))
    if outliers:
        o = int(keep_sink)
        crit = (kf - k_mean[None, :, None, :]).square().sum((1, 3))  # [B, n]
        crit = torch.where(pad, float("-inf"), crit)
        best, idx = torch.cat([sink_crit[:, o:], crit], 1).topk(outliers, dim=1)
        at = idx[:, None, :, None].expand(B, H, outliers, D)
        new_k = torch.cat([sink_k[:, :, o:], kf], 2).gather(2, at)
        new_v = torch.cat([sink_v[:, :, o:], vf], 2).gather(2, at)
        pos = torch.cat([sink_pos[:, o:], positions[None, :].expand(B, n)], 1).gather(1, idx)
        sink_k[:, :, o:].copy_(new_k), sink_v[:, :, o:].copy_(new_v)
        sink_pos[:, o:].copy_(torch.where(best > float("-inf"), pos, -1)), sink_crit[:, o:].copy_(best)


@torch.library.custom_op("sqcompile::store_exact", mutates_args=("sink_k", "sink_v", "sink_pos", "sink_crit"))
def store_exact(sink_k: torch.Tensor, sink_v: torch.Tensor, sink_pos: torch.Tensor, sink_crit: torch.Tensor,
                key_states: torch.Tensor, v_store: torch.Tensor, positions: torch.Tensor,
                position_ids: Optional[torch.Tensor], k_mean: torch.Tensor, keep_sink: bool, outliers: int,
                impl: str = "auto") -> None:
    """Copy the new tokens (key_states [B, H, n, d] model basis, v_store storage basis, cache positions [n]) that
    become exact slots into sink_k / sink_v [B, H, S, d], sink_pos / sink_crit [B, S] (`SpectralLayer._store_exact`
    says which). One op, so that Inductor compiles one node per layer, not the selection's few dozen; a decode step
    on CUDA is one Triton launch (`sink_triton.store_exact_step_triton`). impl as `exact_split`'s (the
    backend's `KernelPlan.write`)."""
    if uses_triton(impl, key_states) and key_states.shape[-2] == 1:
        from .sink_triton import store_exact_step_triton

        store_exact_step_triton(sink_k, sink_v, sink_pos, sink_crit, key_states, v_store, positions, position_ids,
                                k_mean, keep_sink, outliers)
        return
    store_exact_torch(sink_k, sink_v, sink_pos, sink_crit, key_states, v_store, positions, position_ids, k_mean,
                      keep_sink, outliers)


@store_exact.register_fake
def _(sink_k, sink_v, sink_pos, sink_crit, key_states, v_store, positions, position_ids, k_mean, keep_sink, outliers,
      impl="auto"):
    return None


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
    sink_pos [B] or [B, S] (the cache positions of the exact tokens' packed copies, which the kernels skip; -1:
    none; S <= MAX_SLOTS). Returns float32, float32, int32 [B, S], contiguous."""
    given = [t is not None for t in (sink_score, sink_value, sink_pos)]
    if any(given) and not all(given):
        raise ValueError("sink_score, sink_value and sink_pos go together (all three or none)")
    if sink_score is None:
        return None, None, None
    B, Hq, D = q.shape
    if tuple(sink_score.shape) != (B, Hq) or tuple(sink_value.shape) not in ((B, kv_heads, D), (B, Hq, D)) \
            or sink_pos.dim() not in (1, 2) or sink_pos.shape[0] != B \
            or (sink_pos.dim() == 2 and not 1 <= sink_pos.shape[1] <= MAX_SLOTS):
        raise ValueError(f"sink_score must be [{B}, {Hq}], sink_value [{B}, {kv_heads}, {D}] (or [{B}, {Hq}, {D}]) and "
                         f"sink_pos [{B}] or [{B}, S] with 1 <= S <= {MAX_SLOTS}, got "
                         f"{tuple(sink_score.shape)} / {tuple(sink_value.shape)} / {tuple(sink_pos.shape)}")
    return (sink_score.to(torch.float32).contiguous(), sink_value.to(torch.float32).contiguous(),
            sink_pos.to(device=q.device, dtype=torch.int32).reshape(B, -1).contiguous())


def skip_mask(kv_mask: Optional[torch.Tensor], sink_pos: Optional[torch.Tensor], batch: int, capacity: int,
              device) -> Optional[torch.Tensor]:
    """kv_mask [B, T] (None: all) without the exact tokens' packed copies (sink_pos [B] or [B, S]): the Triton
    kernels and the references skip them through their token mask."""
    if sink_pos is None:
        return kv_mask
    pos = sink_pos.to(device).long().reshape(batch, -1)
    keep = (torch.arange(capacity, device=device)[None, :, None] != pos[:, None, :]).all(-1)
    return keep if kv_mask is None else keep & (kv_mask.to(device).expand(batch, capacity) != 0)
