"""Caches that do not hold per-head K/V: multi-head latent attention (MLA, the DeepSeek-V2/V3 form).

An MLA layer hands the cache what it stores. In transformers 5.25 that is the compressed latent
`kv_a_layernorm(kv_a_proj_with_mqa(x))[:kv_lora_rank]` as the "keys", [B, 1, T, kv_lora_rank], and the shared
RoPE key as the "values", [B, 1, T, qk_rope_head_dim]; the per-head keys and values are expanded from them by
`kv_b_proj` after the read. Older versions hand it per-head keys of width qk_nope_head_dim + qk_rope_head_dim and
values of width v_head_dim. Neither is what a SpectralProfile describes (per kv-head keys and values of one
head_dim, post-RoPE), so:

- `calibrate` refuses such a model with `refuse_latent_cache` (one ValueError naming the widths),
- `SpectralCache` keeps such a layer exact and uncompressed (`ExactLayer`, full precision, counted in
  `sequence_nbytes`), and `sqcompile.optimize(...).generate` says so in its report.

Compressing the latent itself (a calibrated basis of the latent folded into `kv_b_proj` on the read side, the
RoPE part treated as a key) is not implemented.
"""
from __future__ import annotations

from typing import Any, Optional

from .profile import text_config


def latent_cache_reason(model_or_config: Any) -> Optional[str]:
    """Why this model's cache entries are not per-head K/V of one head_dim (multi-head latent attention: the
    config has a `kv_lora_rank`), else None."""
    config = text_config(model_or_config)
    rank = getattr(config, "kv_lora_rank", None)
    if not rank:
        return None
    rope = getattr(config, "qk_rope_head_dim", None)
    nope = getattr(config, "qk_nope_head_dim", None)
    v = getattr(config, "v_head_dim", None)
    return (f"multi-head latent attention (kv_lora_rank={rank}): the cache stores the compressed latent of width "
            f"{rank} and a shared RoPE key of width {rope} (one head, [B, 1, T, width]; older transformers: "
            f"per-head keys of width {(nope or 0) + (rope or 0)} and values of width {v}), not per-head keys and "
            f"values of one head_dim")


def refuse_latent_cache(model_or_config: Any, what: str) -> None:
    """The one error `calibrate` and profile-based compression raise for an MLA model; nothing for any other."""
    reason = latent_cache_reason(model_or_config)
    if reason is None:
        return
    raise ValueError(
        f"{what}: {reason}. A SpectralProfile describes per-kv-head keys and values, "
        f"so this model cannot be calibrated and its cache cannot be compressed (compressing the latent with its own "
        f"basis folded into kv_b_proj is not implemented). Use sqcompile.optimize(model, None, ...) or "
        f"SpectralCache(model) without a profile: these layers are then kept exact (uncompressed) and the rest of the "
        f"backend (MoE substitution) still applies.")


def exact_layers(model_or_config: Any, num_layers: int) -> dict[int, str]:
    """{layer index: reason} for the layers whose cache entries `SpectralCache` keeps exact."""
    reason = latent_cache_reason(model_or_config)
    return {} if reason is None else {i: reason for i in range(num_layers)}


__all__ = ["exact_layers", "latent_cache_reason", "refuse_latent_cache"]
