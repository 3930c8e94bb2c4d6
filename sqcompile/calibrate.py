"""Calibration: run real text through the model and collect post-RoPE key/value spectra.

No model-specific code: the keys and values are taken where every HF decoder hands them to the cache,
`Cache.update(key_states, value_states, layer_idx, ...)`, which receives them after RoPE. A
`DynamicCache` subclass accumulates, per (layer, kv-head), the float64 sum and sum of outer products,
then delegates. The profile is the mean and the eigendecomposition of the centered covariance.

Token requirement: at least `head_dim + 1` tokens (a covariance of n tokens has rank <= n - 1, so fewer
tokens cannot span all head_dim directions); in practice use thousands.

Tensor parallel (a model sharded with `sqcompile.parallel.parallelize`, or any plan whose k_proj weights are
DTensors): each rank sees only its kv-heads' keys and values, so the per-head sums are all-gathered over the k_proj
weight's process group before the eigendecomposition; every rank then holds the same whole profile, equal to the
unsharded model's on the same text up to float rounding (which may flip an eigenvector's sign, eigh's free choice).
The ranks must be given the same text (checked), they stop at the same window (a rank out of `seconds` stops them
all), and `sensitivity_tokens` is refused (its simulated cache chooses outlier tokens per rank).
"""
from __future__ import annotations

import contextlib
import logging
import sys
import time
from typing import Any, Callable, ContextManager, Iterable, Optional, Union

import torch
from torch import Tensor

from .hf import cache_kwarg
from .latent_cache import refuse_latent_cache
from .profile import SpectralProfile, model_fingerprint

log = logging.getLogger(__name__)

DEFAULT_MAX_TOKENS = 65536
DEFAULT_CHUNK = 1024


class MomentAccumulator:
    """Float64 running sums of x and x x^T per (layer, kv-head), for keys and values."""

    def __init__(self, num_layers: int):
        self.num_layers = num_layers
        self.sums: dict[str, list[Optional[Tensor]]] = {"key": [None] * num_layers, "value": [None] * num_layers}
        self.outers: dict[str, list[Optional[Tensor]]] = {"key": [None] * num_layers, "value": [None] * num_layers}
        self.counts = [0] * num_layers

    def add(self, layer_idx: int, key_states: Tensor, value_states: Tensor) -> None:
        if key_states.shape[:2] != value_states.shape[:2] or key_states.shape[-1] != value_states.shape[-1]:
            raise ValueError(f"calibrate: layer {layer_idx} gave the cache keys {tuple(key_states.shape)} and values "
                             f"{tuple(value_states.shape)}; a SpectralProfile needs per-kv-head keys and values of one "
                             f"head_dim, [B, Hkv, T, head_dim] both")
        # [B, Hkv, S, d] -> per head [Hkv, B*S, d]
        for kind, x in (("key", key_states), ("value", value_states)):
            x = x.detach().to(torch.float64)
            x = x.transpose(0, 1).reshape(x.shape[1], -1, x.shape[-1])
            s = x.sum(1)
            o = x.transpose(1, 2) @ x
            if self.sums[kind][layer_idx] is None:
                self.sums[kind][layer_idx] = s
                self.outers[kind][layer_idx] = o
            else:
                self.sums[kind][layer_idx] += s
                self.outers[kind][layer_idx] += o
        self.counts[layer_idx] += key_states.shape[0] * key_states.shape[2]

    def missing_layers(self) -> list[int]:
        return [l for l in range(self.num_layers) if self.sums["key"][l] is None]

    def gather_heads(self, group: Any, first: int, stop: int, num_kv_heads: int) -> None:
        """Replace this rank's sums over kv-heads [first, stop) by all heads' sums, all-gathered over the
        tensor-parallel process `group` (every rank of it calls this, each with its own heads)."""
        import torch.distributed as dist

        world = dist.get_world_size(group)
        shards: list = [None] * world
        dist.all_gather_object(shards, (first, stop, list(self.counts), self.missing_layers()), group=group)
        for r, (_, _, _, missing) in enumerate(shards):
            if missing:
                raise RuntimeError(f"calibration saw no keys for layers {missing} on tensor-parallel rank {r}: did "
                                   f"the model call Cache.update?")
        if any(counts != list(self.counts) for _, _, counts, _ in shards):
            raise RuntimeError(f"tensor-parallel ranks saw different token counts per layer: "
                               f"{[counts for _, _, counts, _ in shards]}")
        order = sorted(range(world), key=lambda r: shards[r][0])
        heads = [tuple(shards[r][:2]) for r in order]
        starts = [0] + [b for _, b in heads[:-1]]
        if [a for a, _ in heads] != starts or heads[-1][1] != num_kv_heads or len({b - a for a, b in heads}) != 1:
            raise ValueError(f"tensor-parallel ranks hold kv-heads {heads}: expected equal shares that tile "
                             f"0..{num_kv_heads} (sqcompile.parallel.parallelize)")
        for kind in ("key", "value"):
            for store in (self.sums, self.outers):
                local = torch.stack(store[kind]).contiguous()  # [L, heads of this rank, ...]
                parts = [torch.empty_like(local) for _ in range(world)]
                dist.all_gather(parts, local, group=group)
                store[kind] = list(torch.cat([parts[r] for r in order], dim=1).unbind(0))

    def to_profile(self, fingerprint: dict, meta: Optional[dict] = None) -> SpectralProfile:
        missing = self.missing_layers()
        if missing:
            raise RuntimeError(f"calibration saw no keys for layers {missing}: did the model call Cache.update?")
        if len(set(self.counts)) != 1:
            log.warning("layers saw different token counts: %s", self.counts)
        return SpectralProfile.from_moments(
            fingerprint,
            torch.stack(self.sums["key"]), torch.stack(self.outers["key"]),
            torch.stack(self.sums["value"]), torch.stack(self.outers["value"]),
            count=torch.tensor(self.counts, dtype=torch.float64)[:, None],
            meta=meta,
        )


def _dynamic_cache_class():
    from transformers import DynamicCache

    class MomentCollectingCache(DynamicCache):
        """A DynamicCache that records every key/value it is given (post-RoPE) before storing it."""

        def __init__(self, accumulator: MomentAccumulator, **kwargs):
            super().__init__(**kwargs)
            self.accumulator = accumulator

        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            self.accumulator.add(layer_idx, key_states, value_states)
            return super().update(key_states, value_states, layer_idx, *args, **kwargs)

    return MomentCollectingCache


def _model_config(model) -> Any:
    config = model.config
    return getattr(config, "get_text_config", lambda: config)() if hasattr(config, "get_text_config") else config


def _to_windows(texts_or_batches: Any, tokenizer, chunk: int) -> list[Tensor]:
    """Strings, token-id tensors ([S] or [B, S]) or lists of ints -> 1-D LongTensor windows of at most `chunk`
    tokens, each a sequence the model will see from position 0. A string is tokenized without special tokens;
    where the tokenizer starts its encodings with BOS (`hf.bos_prefix`: Gemma-3), every window of it starts with
    BOS and holds chunk - 1 text tokens, as every sequence the model sees in use does. Token ids are cut as given."""
    from .hf import bos_prefix

    if isinstance(texts_or_batches, (str, Tensor)):
        texts_or_batches = [texts_or_batches]
    windows = []
    for item in texts_or_batches:
        head = []
        if isinstance(item, str):
            if tokenizer is None:
                raise ValueError("calibrate got text but no tokenizer: pass tokenizer=..., or token-id tensors")
            ids = tokenizer(item, add_special_tokens=False, return_tensors="pt")["input_ids"]
            head = bos_prefix(tokenizer)
        elif isinstance(item, dict) and "input_ids" in item:
            ids = torch.as_tensor(item["input_ids"])
        else:
            ids = torch.as_tensor(item)
        if ids.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        ids = ids.long()
        if ids.dim() == 1:
            ids = ids[None]
        step = chunk - len(head)
        if step < 1:
            raise ValueError(f"calibrate: chunk={chunk} leaves no room for text after the BOS token")
        prefix = torch.tensor(head, dtype=torch.long)
        windows += [torch.cat([prefix, row[i:i + step]]) for row in ids for i in range(0, row.numel(), step)]
    return windows


@torch.no_grad()
def calibrate(model, texts_or_batches: Union[str, Tensor, Iterable], seconds: float = 15,
              tokenizer=None, max_tokens: int = DEFAULT_MAX_TOKENS, chunk: int = DEFAULT_CHUNK,
              progress: bool = True, sensitivity_tokens: int = 0) -> SpectralProfile:
    """Calibrate a `SpectralProfile` on real text.

    `sensitivity_tokens` > 0 also measures, on that many calibration tokens, how much each layer's keys and
    values matter (`measure_kv_sensitivity`): the codec then gives more bytes to the sensitive ones at the same
    average budget (SmolLM2-135M at 4.92x: +21.9% -> +8.5% perplexity). It is not bounded by `seconds`
    (1 + 2 * layers forward passes over those tokens: minutes on a CPU).

    `texts_or_batches`: a string, a token-id tensor ([S] or [B, S]), or an iterable of those. Long
    sequences are cut into independent windows of `chunk` tokens (each starting at position 0, like
    the prefixes the model sees; text windows start with BOS where the tokenizer adds one, `_to_windows`).
    Stops at `max_tokens` or after `seconds` (at window granularity, always at least one window) and records
    how many tokens it used in `profile.tokens`.

    On a tensor-parallel model every rank of the group calls it with the same text and gets the whole profile
    (the module doc); for a profile that does not depend on timing, bound it by `max_tokens`.
    """
    from tqdm.auto import tqdm

    from .parallel import kv_head_shard

    tokenizer = tokenizer if tokenizer is not None else getattr(model, "tokenizer", None)
    config = _model_config(model)
    refuse_latent_cache(config, "calibrate")
    fingerprint = model_fingerprint(config)
    needed = fingerprint["head_dim"] + 1
    windows = _to_windows(texts_or_batches, tokenizer, chunk)
    windows = [w for w in windows if w.numel() >= 2] or windows
    available = min(sum(w.numel() for w in windows), max_tokens)
    if available < needed:
        raise ValueError(
            f"calibration text too short: {available} tokens, need at least head_dim + 1 = {needed} "
            f"(a covariance of n tokens has rank <= n - 1); thousands are recommended")
    shard = kv_head_shard(model)  # (group, first, stop) on a tensor-parallel model
    if shard is not None:
        if sensitivity_tokens > 0:
            raise ValueError("calibrate on a tensor-parallel model: sensitivity_tokens > 0 is not supported (the "
                             "sensitivity pass's simulated cache picks outlier tokens per rank, from its own kv-heads, "
                             "so ranks would measure different models); calibrate with sensitivity_tokens=0, or "
                             "measure sensitivity on the unsharded model")
        _check_same_text(windows, max_tokens, chunk, shard[0])
        progress = progress and _group_rank(shard[0]) == 0

    accumulator = MomentAccumulator(fingerprint["num_layers"])
    cache_cls = _dynamic_cache_class()
    kwarg = cache_kwarg(model)
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    used, stopped_by_time, last_window_s = 0, False, 0.0
    start = time.monotonic()
    bar = tqdm(total=available, unit="tok", desc="calibrating", disable=not progress)
    try:
        for window in windows:
            if used >= max_tokens:
                break
            # stop before a window that would overrun the budget (at least one window always runs)
            over = used > 0 and time.monotonic() - start + last_window_s > seconds
            if shard is not None:  # every rank stops at the same window: the forward's all-reduces need them all
                over = _any_rank(over, shard[0], device)
            if over:
                stopped_by_time = True
                break
            t0 = time.monotonic()
            window = window[: max_tokens - used]
            cache = cache_cls(accumulator, config=config)
            model(input_ids=window[None].to(device), use_cache=True, **{kwarg: cache})
            last_window_s = time.monotonic() - t0
            used += window.numel()
            bar.update(window.numel())
    finally:
        bar.close()
        model.train(was_training)
    elapsed = time.monotonic() - start
    if used < needed:
        raise ValueError(f"calibration stopped after {used} tokens (time budget {seconds}s); "
                         f"need at least head_dim + 1 = {needed}: raise `seconds`")
    reason = "time budget" if stopped_by_time else ("max_tokens" if used >= max_tokens else "end of text")
    (log.warning if stopped_by_time else log.info)(
        "calibration used %d of %d available tokens in %.1fs (stopped by %s)", used, available, elapsed, reason)
    meta = {"method": "moments", "seconds": seconds, "elapsed_s": round(elapsed, 2), "chunk": chunk,
            "max_tokens": max_tokens, "stopped_by": reason, "model": getattr(config, "_name_or_path", "")}
    if shard is not None:
        accumulator.gather_heads(shard[0], shard[1], shard[2], fingerprint["num_kv_heads"])
        meta["tensor_parallel"] = _group_size(shard[0])
    profile = accumulator.to_profile(fingerprint, meta)
    profile.tokens = used
    if sensitivity_tokens > 0:
        ids = torch.cat([w.reshape(-1) for w in windows])[:sensitivity_tokens]
        measure_kv_sensitivity(model, ids, profile, progress=progress)
    return profile


def _group_rank(group) -> int:
    import torch.distributed as dist

    return dist.get_rank(group)


def _group_size(group) -> int:
    import torch.distributed as dist

    return dist.get_world_size(group)


def _check_same_text(windows: list[Tensor], max_tokens: int, chunk: int, group) -> None:
    """Every tensor-parallel rank must calibrate on the same windows (the forward's collectives pair them up)."""
    import hashlib

    import torch.distributed as dist

    digest = hashlib.sha256()
    for w in windows:
        digest.update(w.cpu().numpy().tobytes())
    mine = (len(windows), max_tokens, chunk, digest.hexdigest())
    everyone: list = [None] * dist.get_world_size(group)
    dist.all_gather_object(everyone, mine, group=group)
    if any(other != mine for other in everyone):
        raise ValueError("calibrate on a tensor-parallel model: the ranks were given different calibration text or "
                         "settings ((windows, max_tokens, chunk, sha256) per rank: "
                         f"{everyone}); every rank must pass the same")


def _any_rank(flag: bool, group, device) -> bool:
    import torch.distributed as dist

    t = torch.tensor([int(flag)], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=group)
    return bool(t.item())


# --- per-(layer, kind) sensitivity for the layer-adaptive codec --------------------------------------------
class _OnlyOne:
    """Codec view that fake-quantizes one (kind, layer) and passes everything else through."""

    def __init__(self, codec, kind: str, layer: int):
        self.codec, self.kind, self.layer = codec, kind, layer
        self.layers, self.head_dim, self.bits_per_element = codec.layers, codec.head_dim, codec.bits_per_element

    def fake_quant(self, kind, layer, x_store):
        if kind == self.kind and layer == self.layer:
            return self.codec.fake_quant(kind, layer, x_store)
        return x_store


@torch.no_grad()
def _chunked_log_probs(model, ids: Tensor, codec=None, chunk: int = 64,
                       around: Optional[Callable[[Any], ContextManager]] = None) -> Tensor:
    """Log-probabilities of `ids` fed in chunks of `chunk` through the simulated cache (`codec` None: FP16);
    `around(cache)`, when given, is entered around the chunks (`_LayerReplay` records or replays in it)."""
    from . import evaluate as ev
    from .kernels.sink import OUTLIER_TOKENS

    ev._register_attention()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ev.ATTN_NAME)
    # as SpectralCache keeps the sink and the outlier tokens exact
    state = ev.EvalState(codec, [], fp16=codec is None, keep_sink=True, outlier_tokens=OUTLIER_TOKENS)
    cache = ev.simulated_cache(state, model.config)
    kwarg = cache_kwarg(model)
    device = next(model.parameters()).device
    out = []
    ev._ACTIVE = state
    try:
        with around(cache) if around is not None else contextlib.nullcontext():
            for start in range(0, ids.numel(), chunk):
                logits = model(input_ids=ids[start:start + chunk].to(device)[None], use_cache=True,
                               **{kwarg: cache}).logits
                out.append(torch.log_softmax(logits[0].float(), -1))
    finally:
        ev._ACTIVE = None
        model.set_attn_implementation(previous)
    return torch.cat(out)


def _decoder_layers(model, num_layers: int) -> Optional[torch.nn.ModuleList]:
    """The model's one list of `num_layers` decoder layers whose i-th holds the module of `layer_idx` i (the
    attention that writes cache layer i); None when there is no such list or more than one."""
    found = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m) == num_layers
             and all(any(getattr(sub, "layer_idx", None) == i for sub in layer.modules()) for i, layer in enumerate(m))]
    return found[0] if len(found) == 1 else None


@contextlib.contextmanager
def _replaced(obj: Any, name: str, value: Callable):
    """`obj.name` is `value` inside the block (an instance attribute: `module(...)` then runs it as its forward,
    hooks included), what it was after it."""
    own = vars(obj).get(name)
    setattr(obj, name, value)
    try:
        yield
    finally:
        if own is None:
            delattr(obj, name)
        else:
            setattr(obj, name, own)


def _cloned(tree):
    from torch.utils._pytree import tree_map

    return tree_map(lambda x: x.clone() if isinstance(x, Tensor) else x, tree)


class _LayerReplay:
    """The decoder layers' outputs and cache writes of one chunked run, replayed so that a later run starts at a layer.

    Fake-quantizing only cache layer l changes nothing that layers 0..l-1 compute: each layer reads only its own
    cache and the hidden states from the layers below it. So the sensitivity run for layer l takes layers 0..l-1
    from one recorded run in which every layer is passed through (their outputs returned, their cache writes
    repeated, so the cache holds what it would) and computes layers l..L-1 only: the same operations on the same
    tensors as the full run, about half the layer work. Held in memory: every layer's output for every token."""

    def __init__(self, layers: torch.nn.ModuleList):
        self.layers = layers
        self.outputs: list[list] = [[] for _ in layers]  # [layer][chunk] what the layer returned
        self.writes: list[list[list]] = [[] for _ in layers]  # [layer][chunk] its cache.update calls
        self.stray_writes = 0  # cache writes from outside a decoder layer, or from a layer inside another

    @classmethod
    def record(cls, model, ids: Tensor, codec, chunk: int = 64) -> Optional["_LayerReplay"]:
        """Record a run with `codec` passed through at every layer; None (logged) when the model's decoder layers
        cannot be found or do not write their cache once per call, each its own layer (the caller then runs every
        layer)."""
        layers = _decoder_layers(model, codec.num_layers)
        if layers is None:
            log.info("kv sensitivity: no single list of %d decoder layers found; every run computes all layers",
                     codec.num_layers)
            return None
        replay = cls(layers)
        _chunked_log_probs(model, ids, _OnlyOne(codec, None, -1), chunk, around=replay._recording)
        calls = -(-ids.numel() // chunk)
        bad = [j for j in range(len(layers)) if len(replay.outputs[j]) != calls
               or any([w[0] for w in writes] != [j] for writes in replay.writes[j])]
        if bad or replay.stray_writes:
            log.info("kv sensitivity: decoder layers %s do not write only their own cache once per call (%d writes "
                     "from elsewhere); every run computes all layers", bad, replay.stray_writes)
            return None
        return replay

    @contextlib.contextmanager
    def _recording(self, cache):
        current: list[Optional[int]] = [None]
        update = cache.update

        def recording_update(key_states, value_states, layer_idx, *args, **kwargs):
            if current[0] is None:
                self.stray_writes += 1
            else:
                self.writes[current[0]][-1].append((layer_idx, key_states.clone(), value_states.clone(), args, kwargs))
            return update(key_states, value_states, layer_idx, *args, **kwargs)

        def recorder(j: int, forward: Callable) -> Callable:
            def run(*args, **kwargs):
                if current[0] is not None:
                    self.stray_writes += 1  # a layer called inside another: not replayable
                current[0] = j
                self.writes[j].append([])
                try:
                    out = forward(*args, **kwargs)
                finally:
                    current[0] = None
                self.outputs[j].append(_cloned(out))
                return out
            return run

        with contextlib.ExitStack() as stack:
            stack.enter_context(_replaced(cache, "update", recording_update))
            for j, layer in enumerate(self.layers):
                stack.enter_context(_replaced(layer, "forward", recorder(j, layer.forward)))
            yield

    def replaying(self, start: int) -> Callable[[Any], ContextManager]:
        """`around` for `_chunked_log_probs`: layers 0..start-1 return their recorded outputs and repeat their
        recorded cache writes instead of computing."""
        @contextlib.contextmanager
        def around(cache):
            calls = [0] * start

            def replayer(j: int) -> Callable:
                def run(*args, **kwargs):
                    c = calls[j]
                    calls[j] += 1
                    for layer_idx, k, v, a, kw in self.writes[j][c]:
                        cache.update(k, v, layer_idx, *a, **kw)
                    return _cloned(self.outputs[j][c])
                return run

            with contextlib.ExitStack() as stack:
                for j in range(start):
                    stack.enter_context(_replaced(self.layers[j], "forward", replayer(j)))
                yield
        return around


def measure_kv_sensitivity(model, ids: Tensor, profile: SpectralProfile, bits: float = 3.25,
                           progress: bool = True, layout: str = "planes", start_at_layer: bool = True) -> list:
    """How much the model's output suffers per unit of quantization error, per (layer, kind).

    For each layer and kind, only that tensor is quantized (equal-bytes codec at `bits`), `ids` are fed through
    the simulated cache in chunks of 64, and KL(FP16 logits || quantized logits) is divided by the codec's
    predicted relative error of that format. Stored in `profile.meta["kv_sensitivity"]` ([L][key, value],
    mean 1), `build_codec` spends more bytes where it is large.

    Cost: with `start_at_layer` (the default), 2 full forward passes over `ids` (FP16, and one recorded with every
    layer passed through) and per (layer l, kind) one pass over layers l..L-1 only, the earlier layers replayed
    from the recording (`_LayerReplay`: the same numbers as running them); without it, or where the model's
    decoder layers cannot be replayed, 1 + 2L full passes.
    """
    from tqdm.auto import tqdm

    from .quant import build_codec

    codec = build_codec(profile, bits=bits, layer_weights=False, layout=layout)
    predicted = codec.config["predicted"]
    ref = _chunked_log_probs(model, ids)
    replay = _LayerReplay.record(model, ids, codec) if start_at_layer and codec.num_layers > 1 else None
    out = []
    for layer in tqdm(range(codec.num_layers), desc="kv sensitivity", disable=not progress):
        row = []
        for ki, kind in enumerate(("key", "value")):
            around = replay.replaying(layer) if replay is not None and layer > 0 else None
            lp = _chunked_log_probs(model, ids, _OnlyOne(codec, kind, layer), around=around)
            kl = float((ref.exp() * (ref - lp)).sum(-1).mean())
            row.append(max(kl, 0.0) / max(predicted[layer][ki], 1e-12))
        out.append(row)
    mean = sum(sum(r) for r in out) / (2 * len(out))
    sens = [[v / mean for v in r] for r in out]
    profile.meta["kv_sensitivity"] = sens
    profile.meta["kv_sensitivity_info"] = (f"KL per unit predicted error, {ids.numel()} tokens, {bits}-bit codec, "
                                           f"layout {layout}")
    return sens


__all__ = ["calibrate", "measure_kv_sensitivity", "MomentAccumulator", "cache_kwarg"]

