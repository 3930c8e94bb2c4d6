"""KV-compression quality on a real model: perplexity, dPPL, key cosine, attention-output error.

Calibrate on one text, evaluate on another. The evaluation text goes through the cache in chunks of
64 tokens, so every chunk attends to the compressed cache of all earlier chunks (a single prefill would
attend to fresh full-precision K/V and hide the compression).

The compression is simulated at the KV write with the transformers Cache API: `SimulatedKVCache.update`
maps K and V into the codec's storage coordinates, x_store = (x - mu) B^T, applies
`codec.fake_quant(kind, layer, x_store)`, and maps back, x_hat = x_store_hat B + mu. That is the same as
storing rotated codes (for keys the mean shift is softmax-invariant; for values it is added back, as the
o_proj fold does).

A custom attention function (registered through `AttentionInterface` as "sqcompile_eval") returns
exactly `sdpa_attention_forward`'s output for codecs without QJL; with QJL it adds the codec's score
correction to q.k_hat. On a few layers it also measures the attention-output relative error against
exact K/V with the same (real) queries.
"""
from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import Tensor

from .hf import cache_kwarg

log = logging.getLogger(__name__)

EVAL_CHUNK = 64
ATTN_NAME = "sqcompile_eval"


# --- rows -----------------------------------------------------------------------------------------
@dataclass
class RowSpec:
    """One configuration to evaluate: `build_codec` keywords, or FP16 when `method` is None."""

    name: str
    method: Optional[str] = None  # None = FP16 cache
    ratio: Optional[float] = None  # target compression vs FP16; bits = 16 / ratio
    qjl: Any = False
    center: bool = True
    uniform_bits: bool = False
    group: str = ""

    @property
    def bits(self) -> Optional[float]:
        return None if self.ratio is None else 16.0 / self.ratio

    def codec_kwargs(self) -> dict:
        return {"bits": self.bits, "method": self.method, "qjl": self.qjl, "center": self.center,
                "uniform_bits": self.uniform_bits}


def default_rows(budgets: Sequence[float] = (4.25, 3.25, 2.69)) -> list[RowSpec]:
    """The table of the eval: FP16, headline points, ablations at 5.95x, then both methods per budget."""
    rows = [
        RowSpec("FP16", group="baseline"),
        RowSpec("TurboQuant, QJL all dims", "turboquant", 5.02, qjl="all", group="headline"),
        RowSpec("TurboQuant, no QJL", "turboquant", 5.02, group="headline"),
        RowSpec("SpectralQuant", "spectralquant", 5.95, group="headline"),
        RowSpec("SpectralQuant", "spectralquant", 7.0, group="headline"),
        RowSpec("SQ ablation: selective QJL (signal dims)", "spectralquant", 5.95, qjl="signal", group="ablation"),
        RowSpec("SQ ablation: QJL on all dims", "spectralquant", 5.95, qjl="all", group="ablation"),
        RowSpec("SQ ablation: no centering", "spectralquant", 5.95, center=False, group="ablation"),
        RowSpec("SQ ablation: uniform bits", "spectralquant", 5.95, uniform_bits=True, group="ablation"),
    ]
    for b in budgets:
        ratio = 16.0 / b
        rows += [
            RowSpec("TurboQuant, no QJL", "turboquant", ratio, group=f"{b} bits"),
            RowSpec("TurboQuant, QJL all dims", "turboquant", ratio, qjl="all", group=f"{b} bits"),
            RowSpec("SpectralQuant", "spectralquant", ratio, group=f"{b} bits"),
        ]
    return rows


@dataclass
class RowResult:
    name: str
    group: str
    method: Optional[str]
    target_bits: Optional[float]
    qjl: Any
    center: bool
    uniform_bits: bool
    bits_key: float = 16.0
    bits_value: float = 16.0
    bits: float = 16.0
    compression: float = 1.0
    key_cosine: float = 1.0
    attn_rel_error: float = 0.0
    ppl: float = float("nan")
    dppl_pct: float = 0.0
    seconds: float = 0.0
    error: Optional[str] = None
    attn_rel_error_by_layer: dict = field(default_factory=dict)


# --- codec adapter --------------------------------------------------------------------------------
def _codec_bits(codec) -> tuple[float, float, float]:
    """(key, value, both) stored bits per element, metadata included, averaged over layers."""
    both = float(codec.bits_per_element)
    if hasattr(codec, "bytes_per_token"):
        L, d = len(codec.layers), codec.head_dim
        k = sum(codec.bytes_per_token("key", l) for l in range(L)) * 8.0 / (L * d)
        v = sum(codec.bytes_per_token("value", l) for l in range(L)) * 8.0 / (L * d)
        return k, v, both
    return both, both, both


def _layer_params(codec, layer: int, kind: str) -> tuple[Tensor, Tensor]:
    entry = codec.layers[layer]
    return getattr(entry, f"{kind}_basis"), getattr(entry, f"{kind}_mean")


def _to_store(x: Tensor, basis: Tensor, mean: Tensor) -> Tensor:
    """x [B, H, S, d] -> (x - mu) B^T per head; basis [H, d, d] has the storage directions as rows."""
    return torch.einsum("bhsd,hed->bhse", x - mean[None, :, None, :], basis)


def _from_store(x_store: Tensor, basis: Tensor, mean: Tensor) -> Tensor:
    return torch.einsum("bhse,hed->bhsd", x_store, basis) + mean[None, :, None, :]


def _qjl_enabled(codec, layer: int) -> bool:
    has = getattr(codec, "has_qjl", None)
    return bool(has(layer)) if callable(has) else False


# --- the simulating cache -------------------------------------------------------------------------
class EvalState:
    """Everything one evaluation run shares between the cache and the attention function."""

    def __init__(self, codec, measure_layers: Sequence[int], fp16: bool = False, keep_sink: bool = False,
                 exact_fresh: bool = False, outlier_tokens: int = 0):
        self.codec = codec
        self.fp16 = fp16
        self.keep_sink = keep_sink  # the first token's K/V exact, as `SpectralCache(keep_sink=True)` keeps them
        # an update's new tokens attend to their own exact K/V, as SpectralCache(exact_new=True) does (off for the
        # perplexity rows: fed in chunks, every token then reads the compressed cache, its own chunk included)
        self.exact_fresh = exact_fresh
        # the keys farthest from the key mean exact, as `SpectralCache(outlier_tokens=...)` keeps them
        self.outlier_tokens = outlier_tokens
        self.slots: dict[int, tuple] = {}  # per layer: the outlier slots (K, V [B, H, N, d], positions, criteria [B, N])
        self.sketch_norm: dict[int, Tensor] = {}  # per layer: QJL residual norms before the exact tokens' are zeroed
        self.measure_layers = set(measure_layers)
        self.exact: dict[int, tuple[Tensor, Tensor]] = {}  # exact K/V of the measured layers
        self.sketch: dict[int, Any] = {}  # per-layer QJL residual data, concatenated along tokens
        self.cos_sum = 0.0
        self.cos_count = 0
        self.attn_err_sq: dict[int, float] = {}
        self.attn_ref_sq: dict[int, float] = {}

    def attn_rel_error_by_layer(self) -> dict[int, float]:
        """Per measured layer: ||o_hat - o|| / ||o|| over all its queries and heads."""
        return {l: math.sqrt(self.attn_err_sq[l] / max(self.attn_ref_sq[l], 1e-30)) for l in sorted(self.attn_err_sq)}

    def attn_rel_error(self) -> float:
        """Mean over the measured layers of the per-layer relative error."""
        errs = list(self.attn_rel_error_by_layer().values())
        return sum(errs) / len(errs) if errs else float("nan")


def _append(store: dict, layer: int, k: Tensor, v: Tensor) -> None:
    if layer in store:
        k0, v0 = store[layer]
        store[layer] = (torch.cat([k0, k], 2), torch.cat([v0, v], 2))
    else:
        store[layer] = (k, v)


def simulated_cache(state: EvalState, config):
    """A DynamicCache whose update() stores the codec's dequantized K/V (quantize-on-write, simulated).

    A sliding-window layer (DynamicSlidingWindowLayer) returns only the last window of the sequence, so its rows
    are not its tokens' positions: the exact outlier slots (kept by absolute position, over the whole sequence,
    as `SpectralCache` keeps them) are put on the row `position - offset`, offset = the absolute position of the
    returned tensor's first row (slots outside the window are left out: `SpectralCache` holds them too, and the
    window mask hides them)."""
    from transformers import DynamicCache

    class SimulatedKVCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            k, v = key_states, value_states
            seen = getattr(self, "_sq_seen", None)
            if seen is None:
                seen = self._sq_seen = {}
            start = seen.get(layer_idx, 0)  # absolute position of the first new token
            seen[layer_idx] = start + k.shape[2]
            if layer_idx in state.measure_layers:
                _append(state.exact, layer_idx, k.detach(), v.detach())
            if state.fp16:
                k_hat, v_hat = k.half().to(k.dtype), v.half().to(v.dtype)
            else:
                codec = state.codec
                kb, km = _layer_params(codec, layer_idx, "key")
                vb, vm = _layer_params(codec, layer_idx, "value")
                k_store = _to_store(k.float(), kb, km)
                k_store_hat = codec.fake_quant("key", layer_idx, k_store)
                v_store_hat = codec.fake_quant("value", layer_idx, _to_store(v.float(), vb, vm))
                k_hat = _from_store(k_store_hat, kb, km).to(k.dtype)
                v_hat = _from_store(v_store_hat, vb, vm).to(v.dtype)
                first = state.keep_sink and start == 0
                if first:  # the sink token (position 0 of the sequence) stays exact
                    k_hat, v_hat = k_hat.clone(), v_hat.clone()
                    k_hat[:, :, 0], v_hat[:, :, 0] = k[:, :, 0], v[:, :, 0]
                if _qjl_enabled(codec, layer_idx):
                    sk = codec.qjl_sketch(layer_idx, k_store)  # (sign bits [B,H,S,m], norm [B,H,S])
                    if first:  # no residual to correct on the exact sink: its norm 0
                        bits, norm = sk
                        norm = norm.clone()
                        norm[:, :, 0] = 0
                        sk = (bits, norm)
                    prev = state.sketch.get(layer_idx)
                    state.sketch[layer_idx] = sk if prev is None else _cat_tokens(prev, sk)
            cos = F.cosine_similarity(k_hat.float(), k.float(), dim=-1)
            state.cos_sum += cos.sum().item()
            state.cos_count += cos.numel()
            keys, values = super().update(k_hat, v_hat, layer_idx, *args, **kwargs)
            n = k.shape[2]
            if state.outlier_tokens and not state.fp16:
                offset = start + n - keys.shape[2]  # > 0 once a sliding-window layer has dropped tokens
                keys, values = _outliers_exact(state, layer_idx, k, v, keys, values, start, offset)
            if state.exact_fresh:
                keys, values = keys.clone(), values.clone()
                keys[:, :, -n:], values[:, :, -n:] = k, v
            return keys, values

    return SimulatedKVCache(config=config)


def _outliers_exact(state: EvalState, layer: int, k: Tensor, v: Tensor, keys: Tensor, values: Tensor, start: int,
                    offset: int = 0):
    """keys/values [B, H, T, d] with the rows of the `state.outlier_tokens` tokens so far whose keys lie farthest
    from the key mean exact: the cache's own slot update (`sink.store_exact_torch`, position 0 not counted) on this
    layer's slot buffers, then `put_sink`, as `SpectralCache` reads them; their QJL residual norms read 0. Row t of
    keys/values holds absolute position offset + t (offset > 0: a sliding window that dropped tokens)."""
    from .kernels.sink import put_sink, store_exact_torch

    B, H, n, D = k.shape
    if layer not in state.slots:
        z = torch.zeros(B, H, state.outlier_tokens, D, device=k.device)
        state.slots[layer] = (z, z.clone(), torch.full((B, state.outlier_tokens), -1, device=k.device),
                              torch.full((B, state.outlier_tokens), float("-inf"), device=k.device))
    sk, sv, sp, sc = state.slots[layer]
    _, km = _layer_params(state.codec, layer, "key")
    store_exact_torch(sk, sv, sp, sc, k, v, torch.arange(start, start + n, device=k.device), None,
                      km.to(k.device), False, state.outlier_tokens)
    rows = torch.where(sp >= offset, sp - offset, -1)  # the slots' rows; -1: empty, or outside the window
    keys, values = put_sink(keys, sk, rows), put_sink(values, sv, rows)
    if layer in state.sketch:  # QJL: no residual to correct on an exact token (raw norms kept for evictions)
        bits, norm = state.sketch[layer]
        raw = state.sketch_norm.get(layer)
        raw = state.sketch_norm[layer] = norm if raw is None else torch.cat([raw, norm[:, :, raw.shape[2]:]], 2)
        held = (torch.arange(raw.shape[2], device=k.device)[None, :, None] == sp[:, None, :]).any(-1)  # absolute
        state.sketch[layer] = (bits, raw.masked_fill(held[:, None, :], 0))
    return keys, values


def _cat_tokens(prev, new):
    """Concatenate QJL residual data along the token axis (dim 2; tuples element-wise)."""
    if isinstance(prev, Tensor):
        return torch.cat([prev, new], 2)
    return type(prev)(_cat_tokens(p, n) for p, n in zip(prev, new))


# --- attention ------------------------------------------------------------------------------------
_ACTIVE: Optional[EvalState] = None


def _causal_mask(q_len: int, k_len: int, device) -> Tensor:
    """Bool [q_len, k_len]: query i (at absolute position k_len - q_len + i) sees keys <= its position."""
    offset = k_len - q_len
    qi = torch.arange(q_len, device=device)[:, None] + offset
    kj = torch.arange(k_len, device=device)[None, :]
    return kj <= qi


def _attend(q: Tensor, k: Tensor, v: Tensor, scaling: float, score_bias: Optional[Tensor] = None) -> Tensor:
    """Eager GQA attention, batch 1, causal: q [B,Hq,Sq,d], k/v [B,Hkv,Sk,d]; optional additive scores."""
    groups = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(groups, 1)
    v = v.repeat_interleave(groups, 1)
    scores = (q.float() @ k.float().transpose(-1, -2))
    if score_bias is not None:
        scores = scores + score_bias
    scores = scores * scaling
    mask = _causal_mask(q.shape[2], k.shape[2], q.device)
    scores = scores.masked_fill(~mask, float("-inf"))
    return torch.softmax(scores, -1) @ v.float()


def _qjl_score_bias(codec, layer: int, query: Tensor, sketch) -> Tensor:
    """QJL correction of q.k_hat, [B, Hq, Sq, Sk], from the codec (queries rotated into key storage space)."""
    kb, _ = _layer_params(codec, layer, "key")
    groups = query.shape[1] // kb.shape[0]
    basis_q = kb.repeat_interleave(groups, 0)  # [Hq, d, d]
    q_store = torch.einsum("bhsd,hed->bhse", query.float(), basis_q)
    from .quant import qjl_score_correction

    bits, norm = sketch
    return qjl_score_correction(q_store, bits, norm, codec.layers[layer].qjl_matrix)


def eval_attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
    """sdpa for plain codecs; eager with the QJL score correction for QJL codecs; measures attention error."""
    from transformers.integrations.sdpa_attention import sdpa_attention_forward

    state = _ACTIVE
    layer = module.layer_idx
    scaling = module.scaling if scaling is None else scaling
    use_qjl = state is not None and not state.fp16 and _qjl_enabled(state.codec, layer)
    bias = None
    if use_qjl:
        if state.sketch[layer][1].shape[2] != key.shape[2]:
            raise ValueError(f"layer {layer}: the QJL rows of the evaluation need every token of the sequence in "
                             f"the cache, and this is a sliding-window layer ({key.shape[2]} of "
                             f"{state.sketch[layer][1].shape[2]} tokens); evaluate QJL on a model without one")
        bias = _qjl_score_bias(state.codec, layer, query, state.sketch[layer])
        attn_output = _attend(query, key, value, scaling, bias).to(query.dtype).transpose(1, 2).contiguous()
    else:
        attn_output, _ = sdpa_attention_forward(module, query, key, value, attention_mask,
                                                dropout=dropout, scaling=scaling, **kwargs)
    if state is not None and layer in state.measure_layers:
        k_exact, v_exact = state.exact[layer]
        # the tokens attention read (a sliding-window layer: the last window), under the same mask
        k_exact, v_exact = k_exact[:, :, -key.shape[2]:], v_exact[:, :, -key.shape[2]:]
        if attention_mask is None:
            ref = _attend(query, k_exact, v_exact, scaling)
        else:
            ref = sdpa_attention_forward(module, query.float(), k_exact.float(), v_exact.float(),
                                         attention_mask, scaling=scaling)[0].transpose(1, 2)
        got = attn_output.transpose(1, 2).float()
        state.attn_err_sq[layer] = state.attn_err_sq.get(layer, 0.0) + (got - ref).pow(2).sum().item()
        state.attn_ref_sq[layer] = state.attn_ref_sq.get(layer, 0.0) + ref.pow(2).sum().item()
    return attn_output, None


def _register_attention() -> None:
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

    AttentionInterface.register(ATTN_NAME, eval_attention)
    AttentionMaskInterface.register(ATTN_NAME, sdpa_mask)


# --- perplexity -----------------------------------------------------------------------------------
@torch.no_grad()
def run_row(model, ids: Tensor, codec=None, fp16: bool = False, measure_layers: Sequence[int] = (),
            chunk: int = EVAL_CHUNK, keep_sink: bool = True,
            outlier_tokens: Optional[int] = None) -> tuple[float, EvalState]:
    """Perplexity of `ids` [S] fed in chunks through the simulated cache; returns (ppl, state). keep_sink: the
    first token's K/V stay exact, as in `SpectralCache` (its default); outlier_tokens (None: SpectralCache's
    default): so do those of the keys farthest from the key mean."""
    from .kernels.sink import OUTLIER_TOKENS
    global _ACTIVE
    _register_attention()
    previous = model.config._attn_implementation
    model.set_attn_implementation(ATTN_NAME)
    state = EvalState(codec, measure_layers, fp16=fp16, keep_sink=keep_sink,
                      outlier_tokens=OUTLIER_TOKENS if outlier_tokens is None else outlier_tokens)
    cache = simulated_cache(state, model.config)
    kwarg = cache_kwarg(model)
    device = next(model.parameters()).device
    nll, count = 0.0, 0
    last_logits = None
    _ACTIVE = state
    try:
        for start in range(0, ids.numel(), chunk):
            piece = ids[start:start + chunk].to(device)
            out = model(input_ids=piece[None], use_cache=True, **{kwarg: cache})
            logits = out.logits[0].float()
            if last_logits is not None:  # the previous chunk's last position predicts this chunk's first token
                nll += F.cross_entropy(last_logits[None], piece[:1], reduction="sum").item()
                count += 1
            if piece.numel() > 1:
                nll += F.cross_entropy(logits[:-1], piece[1:], reduction="sum").item()
                count += piece.numel() - 1
            last_logits = logits[-1]
    finally:
        _ACTIVE = None
        model.set_attn_implementation(previous)
    return math.exp(nll / max(count, 1)), state


def _measure_layers(num_layers: int, n: int = 1 << 30) -> list[int]:
    """The layers whose attention error is measured: all of them by default (a layer-adaptive codec moves bytes
    between layers, so a sample of layers would be biased)."""
    if num_layers <= n:
        return list(range(num_layers))
    return sorted({round(i * (num_layers - 1) / (n - 1)) for i in range(n)})


def evaluate(model, profile, eval_ids: Tensor, rows: Optional[Sequence[RowSpec]] = None,
             build_codec: Optional[Callable] = None, measure_layers: Optional[Sequence[int]] = None,
             chunk: int = EVAL_CHUNK, progress: bool = True) -> list[RowResult]:
    """Evaluate every row on `eval_ids` (1-D token ids); dPPL is relative to the FP16 row (or the first row)."""
    from tqdm.auto import tqdm

    if build_codec is None:
        from .quant import build_codec  # the codec package
    rows = list(rows) if rows is not None else default_rows()
    num_layers = model.config.num_hidden_layers
    measure = list(measure_layers) if measure_layers is not None else _measure_layers(num_layers)
    results: list[RowResult] = []
    base_ppl = None
    for spec in tqdm(rows, desc="eval rows", disable=not progress):
        t0 = time.monotonic()
        res = RowResult(spec.name, spec.group, spec.method, spec.bits, spec.qjl, spec.center, spec.uniform_bits)
        try:
            if spec.method is None:
                ppl, state = run_row(model, eval_ids, fp16=True, measure_layers=measure, chunk=chunk)
            else:
                codec = build_codec(profile, **spec.codec_kwargs())
                res.bits_key, res.bits_value, res.bits = _codec_bits(codec)
                res.compression = 16.0 / res.bits
                ppl, state = run_row(model, eval_ids, codec=codec, measure_layers=measure, chunk=chunk)
            res.ppl = ppl
            res.key_cosine = state.cos_sum / max(state.cos_count, 1)
            res.attn_rel_error = state.attn_rel_error()
            res.attn_rel_error_by_layer = {l: round(e, 5) for l, e in state.attn_rel_error_by_layer().items()}
        except Exception as e:  # a row that cannot be built is reported, not fatal
            log.exception("row %s failed", spec)
            res.error = f"{type(e).__name__}: {e}"
        res.seconds = round(time.monotonic() - t0, 2)
        if spec.method is None and res.error is None:
            base_ppl = res.ppl
        results.append(res)
    if base_ppl is None:
        base_ppl = next((r.ppl for r in results if r.error is None), float("nan"))
    for r in results:
        r.dppl_pct = 100.0 * (r.ppl / base_ppl - 1.0) if r.error is None else float("nan")
    return results


# --- reporting ------------------------------------------------------------------------------------
def _qjl_label(q) -> str:
    return {False: "none", None: "none", "signal": "signal", "all": "all", True: "signal"}.get(q, str(q))


def to_markdown(results: Sequence[RowResult]) -> str:
    head = ("| group | row | target bits | bits K | bits V | bits K+V | ratio vs FP16 | key cos | "
            "attn-out rel err | PPL | dPPL % |")
    lines = [head, "|" + "---|" * 11]
    for r in results:
        if r.error:
            lines.append(f"| {r.group} | {r.name} | {_fmt(r.target_bits)} | | | | | | | error: {r.error[:80]} | |")
            continue
        lines.append(
            f"| {r.group} | {r.name} | {_fmt(r.target_bits)} | {r.bits_key:.3f} | {r.bits_value:.3f} | "
            f"{r.bits:.3f} | {r.compression:.2f}x | {r.key_cosine:.4f} | {r.attn_rel_error:.4f} | "
            f"{r.ppl:.3f} | {r.dppl_pct:+.2f} |")
    return "\n".join(lines)


def _fmt(x) -> str:
    return "16 (fp16)" if x is None else f"{x:.3f}"


def write_results(results: Sequence[RowResult], out_dir: Path, info: dict) -> tuple[Path, Path]:
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    md = out_dir / "eval.md"
    js = out_dir / "eval.json"
    header = "\n".join(f"- {k}: {v}" for k, v in info.items())
    md.write_text(f"{header}\n\n{to_markdown(results)}\n")
    js.write_text(json.dumps({"info": info, "rows": [asdict(r) for r in results]}, indent=2, default=str))
    return md, js


# --- teacher-forced agreement on a batch of prompts -------------------------------------------------
def left_padded(tokenizer, prompts: Sequence[str]) -> tuple[Tensor, Tensor]:
    """(input_ids, attention_mask) [len(prompts), longest], padded on the left with id 0 / mask 0."""
    enc = [tokenizer(p, return_tensors="pt")["input_ids"][0] for p in prompts]
    width = max(len(e) for e in enc)
    ids = torch.zeros(len(enc), width, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for i, e in enumerate(enc):
        ids[i, width - len(e):] = e
        mask[i, width - len(e):] = 1
    return ids, mask


def generated_positions(continuation: Tensor, eos_token_id: Optional[int]) -> Tensor:
    """bool [B, T]: the positions of a greedy `generate()` continuation that the model picked, i.e. up to and
    including the first EOS. After it, generate() writes the pad token (here EOS) without asking the model,
    so a teacher-forced pick there is compared against filler, not against the model's own choice (on the 8
    prompts of tests/test_smollm2_e2e.py, 17 of the 256 positions; FP32 itself "disagrees" at 7 of them)."""
    if eos_token_id is None:
        return torch.ones_like(continuation, dtype=torch.bool)
    eos = (continuation == eos_token_id).to(torch.int64)
    return (eos.cumsum(1) - eos) == 0


def agreement(picks: Tensor, continuation: Tensor, eos_token_id: Optional[int]) -> float:
    """Top-1 agreement of teacher-forced `picks` with a greedy `continuation` over its `generated_positions`."""
    valid = generated_positions(continuation, eos_token_id)
    return ((picks == continuation) & valid).sum().item() / max(1, int(valid.sum()))


@torch.no_grad()
def teacher_forced_logits(step, ids: Tensor, mask: Tensor, continuation: Tensor, cache) -> Tensor:
    """Next-token logits [B, T, vocab] (float32) at each position of `continuation` [B, T], feeding the
    continuation itself one token at a time after the prompt (`step` = a model or its compiled forward; `cache`
    its KV cache). Positions count from each row's first unmasked token, as `generate()` passes them
    (`position_ids = cumsum(mask) - 1`, 1 on padding): without them a left-padded row's tokens would sit `pad`
    positions later than in `generate()`, which an exact cache does not notice (RoPE is relative) but a cache that
    quantizes keys after RoPE does."""
    pos = mask.long().cumsum(-1) - 1
    pos = pos.masked_fill(mask == 0, 1)
    kw = {cache_kwarg(step): cache}
    out = [step(input_ids=ids, attention_mask=mask, position_ids=pos, use_cache=True, **kw).logits[:, -1].float()]
    for t in range(continuation.shape[1] - 1):
        mask = torch.cat([mask, torch.ones_like(mask[:, :1])], 1)
        pos = pos[:, -1:] + 1
        out.append(step(input_ids=continuation[:, t:t + 1], attention_mask=mask, position_ids=pos, use_cache=True,
                        **kw).logits[:, -1].float())
    return torch.stack(out, 1)


def teacher_forced_picks(step, ids: Tensor, mask: Tensor, continuation: Tensor, cache) -> Tensor:
    """Greedy next-token picks [B, T] of `teacher_forced_logits`."""
    return teacher_forced_logits(step, ids, mask, continuation, cache).argmax(-1)


# --- the decode quality protocol (issue #17) ----------------------------------------------------------
DECODE_CONTEXT = 2048
DECODE_SCORED = 512
DECODE_PREFILL_CHUNK = 256
# the recent window of the eval's windowed fast row: SmolLM2-135M, C = 2048, 512 scored token by token, fast 2.75 bits
# (CPU, 2026-12-07): W = 32 5.40x +3.65% dPPL, 48 5.18x +2.52%, 56 5.08x +2.83% (64: 4.98x, below 5x)
DECODE_WINDOW = 48


@dataclass
class DecodeRowSpec:
    """One cache to score on the decode protocol: FP16 when `bits` is None, else `SpectralCache(layout, bits,
    **cache_kwargs)` (cache_kwargs: SpectralCache / build_codec keywords, e.g. recent_window or key_weight)."""

    name: str
    layout: Optional[str] = None
    bits: Optional[float] = None
    cache_kwargs: dict = field(default_factory=dict)


def default_decode_rows(budgets: Sequence[float] = (4.25, 3.25, 2.69),
                        layouts: Sequence[str] = ("fast", "planes"), window: int = DECODE_WINDOW,
                        window_bits: Sequence[float] = (2.75,)) -> list[DecodeRowSpec]:
    """FP16, then every layout at every budget (SpectralCache's defaults otherwise), then (window > 0, with "fast"
    among the layouts) the fast layout at each of `window_bits` with the last `window` tokens exact
    (`recent_window`)."""
    rows = [DecodeRowSpec("FP16")]
    for b in budgets:
        rows += [DecodeRowSpec(f"{layout} {b:g} bits", layout, float(b)) for layout in layouts]
    if window and "fast" in layouts:
        rows += [DecodeRowSpec(f"fast {b:g} bits + recent window {window}", "fast", float(b),
                               {"recent_window": int(window)}) for b in window_bits]
    return rows


@dataclass
class DecodeRowResult:
    name: str
    layout: Optional[str]
    target_bits: Optional[float]
    ppl: float = float("nan")  # token by token
    dppl_pct: float = 0.0
    ppl_chunked: float = float("nan")  # the same tokens scored in chunks of 64 (exact_new: a free recent window)
    dppl_chunked_pct: float = 0.0
    sequence_bytes: int = 0  # every byte the cache allocates per sequence for the context (all layers)
    constant_bytes: int = 0  # per-model constants (bases, means, codebooks), apart
    fp16_bytes: int = 0  # FP16 K/V of every layer for the whole context
    compression: float = 1.0  # fp16_bytes / sequence_bytes
    fp16_model_bytes: int = 0  # what the model's own FP16 cache holds (sliding-window layers: their window only)
    compression_model: float = 1.0  # fp16_model_bytes / sequence_bytes
    seconds: float = 0.0
    error: Optional[str] = None


def fp16_cache(config):
    """A DynamicCache storing K/V rounded to fp16 (the decode protocol's baseline)."""
    from transformers import DynamicCache

    class FP16KVCache(DynamicCache):
        def update(self, key_states, value_states, layer_idx, *args, **kwargs):
            return super().update(key_states.half().to(key_states.dtype), value_states.half().to(value_states.dtype),
                                  layer_idx, *args, **kwargs)

    return FP16KVCache(config=config)


def fp16_kv_bytes(config, tokens: int) -> int:
    """Bytes an FP16 cache holds for `tokens` tokens of one sequence: K and V, every layer and kv-head."""
    from .profile import model_fingerprint, text_config

    fp = model_fingerprint(text_config(config))
    return 2 * fp["num_layers"] * fp["num_kv_heads"] * fp["head_dim"] * tokens * 2


def fp16_model_cache_bytes(config, tokens: int) -> int:
    """Bytes the model's own FP16 cache allocates for a `tokens`-token context of one sequence: transformers'
    `StaticCache` for the config, whose sliding-window layers hold only their window (Gemma-3-270M: 512 tokens on
    15 of 18 layers), every other layer `tokens`. Equal to `fp16_kv_bytes` on a model without sliding layers."""
    from transformers import StaticCache

    from .profile import model_fingerprint, text_config

    config = text_config(config)
    fp = model_fingerprint(config)
    layers = StaticCache(config=config, max_cache_len=tokens).layers
    if len(layers) != fp["num_layers"]:
        raise ValueError(f"StaticCache for this config has {len(layers)} layers, the model {fp['num_layers']}")
    held = sum(min(tokens, getattr(layer, "max_cache_len", tokens)) for layer in layers)
    return 2 * fp["num_kv_heads"] * fp["head_dim"] * held * 2


@torch.no_grad()
def _decode_nll(model, ids: Tensor, cache, scored: int, prefill_chunk: int, score_chunk: int = 1) -> tuple[float, int]:
    """Sum of the next-token NLL of the last `scored` tokens of `ids` [S] and their count: the first S - scored
    tokens are prefilled through `cache` in chunks of `prefill_chunk` (each write compressed), then the scored
    tokens are fed `score_chunk` at a time (1: as decode does, every token reads the cache of all before it)."""
    kwarg = cache_kwarg(model)
    device = next(model.parameters()).device
    ids = ids.to(device)
    S = ids.numel()
    prefix = S - scored
    last = None
    for start in range(0, prefix, prefill_chunk):
        out = model(input_ids=ids[None, start:min(prefix, start + prefill_chunk)], use_cache=True, **{kwarg: cache})
        last = out.logits[0, -1].float()
    nll, count = 0.0, 0
    if last is not None:  # the prefill's last position predicts the first scored token
        nll += F.cross_entropy(last[None], ids[prefix:prefix + 1], reduction="sum").item()
        count += 1
    start = prefix
    while start < S - 1:  # feed ids[start:stop], scoring ids[start + 1:stop + 1]
        stop = min(S - 1, start + score_chunk)
        out = model(input_ids=ids[None, start:stop], use_cache=True, **{kwarg: cache})
        nll += F.cross_entropy(out.logits[0].float(), ids[start + 1:stop + 1], reduction="sum").item()
        count += stop - start
        start = stop
    return nll, count


def decode_perplexity(model, ids: Tensor, make_cache: Callable[[], Any], scored: int = DECODE_SCORED,
                      prefill_chunk: int = DECODE_PREFILL_CHUNK, score_chunk: int = 1) -> float:
    """Perplexity of the last `scored` tokens of `ids` [C] under the decode protocol (`_decode_nll`), with a fresh
    cache from `make_cache()`."""
    if not 1 <= scored < ids.numel():
        raise ValueError(f"scored must be in 1..{ids.numel() - 1} (the context has {ids.numel()} tokens), got {scored}")
    nll, count = _decode_nll(model, ids, make_cache(), scored, prefill_chunk, score_chunk)
    return math.exp(nll / count)


def evaluate_decode(model, profile, ids: Tensor, rows: Optional[Sequence[DecodeRowSpec]] = None,
                    scored: int = DECODE_SCORED, prefill_chunk: int = DECODE_PREFILL_CHUNK,
                    chunked: Optional[int] = EVAL_CHUNK, progress: bool = True) -> list[DecodeRowResult]:
    """The decode quality protocol on the context `ids` [C] (1-D): per row, prefill the first C - `scored` tokens
    through the row's real cache in chunks of `prefill_chunk`, then score the last `scored` tokens one token at a
    time (what decode sees: the compressed cache of everything before, the exact slots, the current token's own
    exact K/V). `chunked` (64; None: off) also scores the same tokens in chunks of that many after the same
    prefill, the short protocol, where every token reads up to chunked - 1 predecessors exact. dPPL against the
    FP16 row (else the first row); compression = FP16 KV bytes of C tokens / `SpectralCache.sequence_nbytes`, and
    compression_model = the bytes of the model's own FP16 cache (`fp16_model_cache_bytes`: sliding-window layers hold
    their window only, SpectralCache holds all C tokens on every layer) / the same."""
    from tqdm.auto import tqdm

    from .cache import SpectralCache

    rows = list(rows) if rows is not None else default_decode_rows()
    C = ids.numel()
    fp16_bytes = fp16_kv_bytes(model.config, C)
    try:
        fp16_model_bytes = fp16_model_cache_bytes(model.config, C)
    except (ValueError, TypeError) as e:  # a cache layout StaticCache does not build: that ratio is not shown
        log.warning("no ratio vs the model's own FP16 cache: %s", e)
        fp16_model_bytes = 0
    results: list[DecodeRowResult] = []
    for spec in tqdm(rows, desc="decode rows", disable=not progress):
        t0 = time.monotonic()
        res = DecodeRowResult(spec.name, spec.layout, spec.bits, fp16_bytes=fp16_bytes,
                              fp16_model_bytes=fp16_model_bytes)
        try:
            if spec.bits is None:  # the baseline, 1.00x in both ratios
                make = lambda: fp16_cache(model.config)
                res.sequence_bytes = fp16_bytes
            else:
                kw = dict(spec.cache_kwargs)
                if spec.layout is not None:
                    kw["layout"] = spec.layout
                make = lambda kw=kw, b=spec.bits: SpectralCache(model, profile, bits=b, max_cache_len=C, read_copy=True, **kw)
                cache = make()
                model(input_ids=ids[None, :1].to(next(model.parameters()).device), use_cache=True,
                      **{cache_kwarg(model): cache})  # allocates every layer: the bytes counted are the real ones
                res.sequence_bytes, res.constant_bytes = cache.sequence_nbytes, cache.constant_nbytes
                del cache
            res.compression = fp16_bytes / res.sequence_bytes
            res.compression_model = (float("nan") if not fp16_model_bytes else
                                     fp16_model_bytes / res.sequence_bytes if spec.bits is not None else 1.0)
            res.ppl = decode_perplexity(model, ids, make, scored, prefill_chunk, 1)
            if chunked:
                res.ppl_chunked = decode_perplexity(model, ids, make, scored, prefill_chunk, chunked)
        except Exception as e:  # a row that cannot be built is reported, not fatal
            log.exception("decode row %s failed", spec)
            res.error = f"{type(e).__name__}: {e}"
        res.seconds = round(time.monotonic() - t0, 1)
        results.append(res)
    base = next((r for r in results if r.layout is None and r.target_bits is None and r.error is None),
                next((r for r in results if r.error is None), None))
    for r in results:
        if r.error is None and base is not None:
            r.dppl_pct = 100.0 * (r.ppl / base.ppl - 1.0)
            r.dppl_chunked_pct = 100.0 * (r.ppl_chunked / base.ppl_chunked - 1.0) if chunked else float("nan")
    return results


def decode_markdown(results: Sequence[DecodeRowResult]) -> str:
    """The decode protocol's table: one row per cache, token-by-token and 64-token-chunk columns."""
    lines = ["| row | target bits | ratio vs FP16 (all per-sequence bytes) | ratio vs the model's FP16 cache | "
             "PPL token by token | dPPL % | PPL chunks of 64 | dPPL % (chunks) | per-sequence bytes | "
             "constants bytes | s |",
             "|" + "---|" * 11]
    for r in results:
        if r.error:
            lines.append(f"| {r.name} | {_fmt(r.target_bits)} | | | error: {r.error[:100]} | | | | | | |")
            continue
        lines.append(f"| {r.name} | {_fmt(r.target_bits)} | {r.compression:.2f}x | {r.compression_model:.2f}x | "
                     f"{r.ppl:.3f} | {r.dppl_pct:+.2f} | {r.ppl_chunked:.3f} | {r.dppl_chunked_pct:+.2f} | "
                     f"{r.sequence_bytes} | {r.constant_bytes} | {r.seconds:.0f} |")
    return "\n".join(lines)


def decode_context(tokenizer, text: str, context: int, offset: int = 0, bos: bool = False) -> Tensor:
    """The C-token window of `text` (1-D ids) starting at its token `offset`; `bos`: the tokenizer's BOS id first,
    then C - 1 text tokens (models whose perplexity needs it, e.g. Gemma-3). Raises when the text is too short."""
    from .hf import tokenize

    ids = tokenize(tokenizer, text)
    head = []
    if bos:
        if tokenizer.bos_token_id is None:
            raise ValueError("bos=True but the tokenizer has no bos_token_id")
        head = [tokenizer.bos_token_id]
    body = ids[offset:offset + context - len(head)]
    if body.numel() < context - len(head):
        raise ValueError(f"the evaluation text has {ids.numel()} tokens; a {context}-token context from offset "
                         f"{offset}{' after BOS' if head else ''} needs {offset + context - len(head)}")
    return torch.cat([torch.tensor(head, dtype=ids.dtype), body])


__all__ = ["RowSpec", "RowResult", "default_rows", "evaluate", "run_row", "to_markdown",
           "write_results", "left_padded", "teacher_forced_logits", "teacher_forced_picks", "generated_positions",
           "agreement", "DecodeRowSpec", "DecodeRowResult", "default_decode_rows", "evaluate_decode",
           "fp16_model_cache_bytes", "decode_perplexity", "decode_markdown", "decode_context"]
