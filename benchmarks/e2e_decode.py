"""End to end on one GPU: sqcompile against the strongest FP16 decode, at full depth and at full memory (issue #18).

A Llama-3-8B-shaped model (32 layers, 32/8 heads, head_dim 128, random bf16 weights). Rows, each with ms per decode
step, tokens/s, the step's floor and the % of it reached:

- `strong_fp16`: the FP16 baseline an engine built for speed gets. A small gpt-fast-style decoder (`StrongLlama`,
  below) over the HF model's own weight tensors: a static token-major KV cache, SDPA with `enable_gqa` over exactly
  the filled tokens (no mask, no repeat_kv: flash attention's split-KV decode), each layer compiled by Inductor and
  the whole step (32 layers and the head) replayed as one CUDA graph. A graph has one shape, so a timed step
  attends over exactly context + 1 tokens and writes its token at position `context` every time (the same bytes as
  a real step there). The generate loop attends through flash attention's varlen entry with a per-sequence length
  tensor (`seqused_k`: one graph for every step, still exactly the filled tokens) when that kernel is within 15% of
  fixed-length SDPA on the device, else at one fixed length, the mean of the loop's lengths (H100: varlen was 31%
  slower).
- `hf_inductor`: what a plain HF user gets: `torch.compile(model.forward, mode="reduce-overhead")` with HF
  `StaticCache` (attends over the whole capacity with a mask, K/V expanded to every query head).
- `sqcompile_<ratio>x`: `torch.compile(model.forward, backend="spectralquant", options={"cudagraphs": True})`
  with `SpectralCache(layout="fast")` (the CUDA decode kernel), at 2.69 bits (5.95x) and 3.25 bits (4.92x).

Floor: the bytes one step must read (all weights but the embedding table, and the KV cache as stored: FP16 over
the filled tokens; for sqcompile the packed codes, the exact slots and the per-layer bases) over the device's copy
bandwidth measured in the same run (a 1 GiB device-to-device copy, bytes read + written).

Sections: (d) decode steps at 4K and 32K context, batch 1 and 8; (e) capacity: with a stated KV budget (free
memory after the weights, less a workspace), the largest batch of 32K-token sequences for FP16 and for sqcompile,
and each one's decode tokens/s at that batch; (f) time to first token of a 32K prompt (batch 1): the strong
decoder's prefill (flash attention, causal) vs sqcompile's (through `sqcompile.optimize`, compressed write);
(g) `model.generate` through `sqcompile.optimize` (32K prompt, 256 new tokens), and the same compiled forward with
the SpectralCache's buffers allocated before the call (`sqcompile_preinit`: static addresses), vs the strong decoder
driven by the same loop (prefill, then one step per token, synchronized after each as generate does).
Correctness first: the strong decoder's logits against HF eager on the same weights (decode step, varlen step and
prefill). Sections run by priority under `--time-budget` seconds; a skipped row says why in the JSON.

    PYTHONPATH=$PWD python3 benchmarks/e2e_decode.py --out e2e.json         # GPU: ~15 min on an H100 (each
        # sqcompile or HF row compiles a 32-layer graph, ~50 s); split it with --time-budget S and --resume e2e.json
    PYTHONPATH=$PWD python3 benchmarks/e2e_decode.py --smoke --out s.json   # CPU, tiny shapes, no timing value

`fill_static` / `fill_spectral` / `build_model` are also used by e2e_step_gaps.py and profile_host.py.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from datetime import datetime, timezone

import torch
import torch.nn.functional as F

from sqcompile.calibrate import cache_kwarg
from sqcompile.kernels.sink import OUTLIER_TOKENS

DEV = "cuda"
HIDDEN, FFN, HEADS, KV_HEADS, VOCAB = 4096, 14336, 32, 8, 128256
COMPILER = "inductor"  # "eager" in --smoke (no C++ toolchain time on a CPU)
LOG: list = []


def log(msg: str) -> None:
    print(msg, flush=True)
    LOG.append(msg)


def sync() -> None:
    if DEV == "cuda":
        torch.cuda.synchronize()


def build_model(layers: int, dtype=torch.bfloat16):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=HIDDEN, intermediate_size=FFN, num_hidden_layers=layers, num_attention_heads=HEADS,
                      num_key_value_heads=KV_HEADS, vocab_size=VOCAB, max_position_embeddings=131072,
                      rope_theta=500000.0, attn_implementation="sdpa")
    with torch.device("meta"):
        model = LlamaForCausalLM(cfg)
    model = model.to_empty(device=DEV).to(dtype)
    g = torch.Generator(device=DEV).manual_seed(0)
    d = HIDDEN // HEADS
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() >= 2:
                p.normal_(0, 0.02, generator=g)
            else:
                p.fill_(1.0)
        model.model.rotary_emb.inv_freq.copy_(
            1.0 / (500000.0 ** (torch.arange(0, d, 2, device=DEV, dtype=torch.float32) / d)))
    model.generation_config.eos_token_id = None  # random weights: every generation runs its max_new_tokens
    model.generation_config.pad_token_id = 0
    return model.eval()


def _kv_shape(model, batch, n):
    c = model.config
    return batch, c.num_key_value_heads, n, c.hidden_size // c.num_attention_heads


def fill_static(model, batch, ctx, steps):
    """HF StaticCache holding `ctx` tokens of random K/V (capacity ctx + steps + 8)."""
    from transformers import StaticCache

    cfg = model.config
    cache = StaticCache(config=cfg, max_cache_len=ctx + steps + 8)
    for l in range(cfg.num_hidden_layers):
        k = torch.randn(*_kv_shape(model, batch, ctx), device=DEV, dtype=torch.bfloat16)
        cache.layers[l].update(k, torch.randn_like(k))
    return cache


def fill_spectral(model, batch, ctx, steps, bits, layout="planes", keep_sink=True, outlier_tokens=None):
    """SpectralCache holding `ctx` tokens of random K/V written by the cache's own quantize op (capacity
    ctx + steps + 8); the exact slots hold tokens spread over the context, as a prompt would leave them."""
    from sqcompile.cache import SpectralCache

    extra = {} if outlier_tokens is None else dict(outlier_tokens=outlier_tokens)
    cache = SpectralCache(model, bits=bits, max_cache_len=ctx + steps + 8, layout=layout, keep_sink=keep_sink, **extra)
    B, H, _, d = _kv_shape(model, batch, 1)
    chunk = max(1, min(4096, (256 << 20) // (B * H * d * 4)))  # float32 K and V chunks of <= 256 MiB each
    for layer in cache.layers:
        k0 = torch.zeros(B, H, 1, d, device=DEV, dtype=torch.bfloat16)
        layer.lazy_initialization(k0, k0)
        for s in range(0, ctx, chunk):
            n = min(chunk, ctx - s)
            k = torch.randn(B, H, n, d, device=DEV, dtype=torch.float32)
            v = torch.randn_like(k)
            pos = torch.arange(s, s + n, device=DEV)
            if layer.fast:
                torch.ops.sqcompile.quantize_write_fast(k, v, layer.keys, layer.values, pos, layer.k_basis,
                                                        layer.k_mean, layer.k_layout, layer.v_layout)
                continue
            torch.ops.sqcompile.quantize_write(k, v, layer.keys, layer.values, pos, layer.k_basis, layer.k_mean,
                                               layer.k_codebooks, layer.k_channel_scale, layer.v_codebooks,
                                               layer.v_channel_scale, layer.k_qjl_proj, layer.k_groups, layer.v_groups,
                                               layer.qjl_dims, layer.qjl_bits)
            del k, v
        layer.cumulative_length.fill_(ctx)
        if layer.slots:
            layer.sink_k.normal_(), layer.sink_v.normal_()
            layer.sink_pos.copy_(torch.linspace(0, ctx - 1, layer.slots, device=DEV).long()[None].expand(B, -1))
            layer.sink_crit.fill_(0.0)  # decode steps' keys replace them: the selection runs as in a real run
    return cache


# ------------------------------------------------------------------------------------------------------------------
# The strong FP16 baseline: a gpt-fast-style decoder over the HF model's weights
# ------------------------------------------------------------------------------------------------------------------

def _rms(x, w, eps: float):
    xf = x.float()
    return w * (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def _rope(x, cos, sin):
    h = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., h:], x[..., :h]), -1) * sin


def varlen_attention(q, kc, vc, lengths):
    """q [B, Hq, d] (one new token per sequence) over the first lengths[b] rows of kc/vc [B, cap, Hkv, d]: flash
    attention's varlen entry with `seqused_k` on CUDA (static shapes: one CUDA graph serves every length), the
    masked math form elsewhere. [B, Hq, d]."""
    B, cap, Hkv, d = kc.shape
    if q.is_cuda:
        cu = torch.arange(B + 1, dtype=torch.int32, device=q.device)
        return torch.ops.aten._flash_attention_forward(q, kc.view(B * cap, Hkv, d), vc.view(B * cap, Hkv, d), cu,
                                                       cu * cap, 1, cap, 0.0, False, False, seqused_k=lengths)[0]
    keep = torch.arange(cap, device=q.device)[None, :] < lengths[:, None].long()
    return F.scaled_dot_product_attention(q[:, :, None], kc.transpose(1, 2), vc.transpose(1, 2),
                                          attn_mask=keep[:, None, None, :], enable_gqa=True)[:, :, 0]


def strong_layer(x, cos, sin, ln1, wq, wk, wv, wo, ln2, wg, wu, wd, kc, vc, pos, length: int, eps: float,
                 lengths=None):
    """One Llama layer. x [B, n, hidden]; kc/vc [B, cap, Hkv, d]; pos [n] the new tokens' cache positions. n > 1: a
    prompt written at 0..n-1 attends to itself (causal). n == 1: attends over exactly kc[:, :length] (SDPA, no mask),
    or with `lengths` [B] int32 over each sequence's first lengths[b] rows (`varlen_attention`)."""
    B, n, _ = x.shape
    Hkv, d = kc.shape[2], kc.shape[3]
    h = _rms(x, ln1, eps)
    q = _rope((h @ wq.t()).view(B, n, -1, d), cos, sin)
    k = _rope((h @ wk.t()).view(B, n, Hkv, d), cos, sin)
    v = (h @ wv.t()).view(B, n, Hkv, d)
    kc[:, pos] = k  # index_put_, in place under Inductor (gpt-fast's KVCache.update)
    vc[:, pos] = v
    if n > 1:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), is_causal=True,
                                           enable_gqa=True).transpose(1, 2)
    elif lengths is not None:
        o = varlen_attention(q[:, 0], kc, vc, lengths)
    else:
        o = F.scaled_dot_product_attention(q.transpose(1, 2), kc[:, :length].transpose(1, 2),
                                           vc[:, :length].transpose(1, 2), enable_gqa=True).transpose(1, 2)
    x = x + o.reshape(B, n, -1) @ wo.t()
    h = _rms(x, ln2, eps)
    return x + (F.silu(h @ wg.t()) * (h @ wu.t())) @ wd.t()


def strong_rope(inv_freq, pos, dtype):
    f = pos.float()[:, None] * inv_freq[None, :]
    emb = torch.cat((f, f), -1)
    return emb.cos().to(dtype)[None, :, None, :], emb.sin().to(dtype)[None, :, None, :]


def strong_head(x, norm_w, lm_w, eps: float):
    return _rms(x[:, -1:], norm_w, eps) @ lm_w.t()


_COMPILED: dict = {}


def _compiled(fn):
    if fn not in _COMPILED:
        _COMPILED[fn] = fn if COMPILER == "none" else torch.compile(fn, dynamic=False, backend=COMPILER)
    return _COMPILED[fn]


class StrongLlama:
    """The FP16 baseline decoder: the HF model's weight tensors (shared, not copied), a static token-major
    KV cache [B, cap, Hkv, d] per layer, each layer compiled by Inductor (one graph per shape serves all 32)."""

    def __init__(self, model, batch: int, cap: int, compiled: bool = True):
        c = model.config
        self.eps, m = c.rms_norm_eps, model.model
        self.embed, self.norm, self.lm = m.embed_tokens.weight, m.norm.weight, model.lm_head.weight
        self.inv_freq = m.rotary_emb.inv_freq
        self.w = [(l.input_layernorm.weight, l.self_attn.q_proj.weight, l.self_attn.k_proj.weight,
                   l.self_attn.v_proj.weight, l.self_attn.o_proj.weight, l.post_attention_layernorm.weight,
                   l.mlp.gate_proj.weight, l.mlp.up_proj.weight, l.mlp.down_proj.weight) for l in m.layers]
        _, H, _, d = _kv_shape(model, batch, 1)
        self.kc = [torch.zeros(batch, cap, H, d, device=DEV, dtype=self.embed.dtype) for _ in m.layers]
        self.vc = [torch.zeros_like(t) for t in self.kc]
        self.layer, self.rope, self.head = ((_compiled(f) if compiled else f)
                                            for f in (strong_layer, strong_rope, strong_head))

    def fill(self, ctx: int) -> None:
        for t in self.kc + self.vc:
            t[:, :ctx].normal_()

    def kv_bytes(self, length: int) -> int:
        t = self.kc[0]
        return 2 * len(self.kc) * t.shape[0] * length * t.shape[2] * t.shape[3] * t.element_size()

    def forward(self, ids, pos, length: int = 0, lengths=None):
        x = F.embedding(ids, self.embed)
        cos, sin = self.rope(self.inv_freq, pos, x.dtype)
        for w, kc, vc in zip(self.w, self.kc, self.vc):
            x = self.layer(x, cos, sin, *w, kc, vc, pos, length, self.eps, lengths)
        return self.head(x, self.norm, self.lm, self.eps)


def graphed(fn):
    """fn() as one CUDA graph (two warm-up calls on a side stream first): returns a replay function giving fn's
    output tensor. On a CPU, fn itself."""
    if DEV != "cuda":
        return fn
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s), torch.no_grad():
        for _ in range(2):
            fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g), torch.no_grad():
        out = fn()

    def replay():
        g.replay()
        return out

    replay.graph = g
    return replay


# ------------------------------------------------------------------------------------------------------------------
# timing, bytes, memory
# ------------------------------------------------------------------------------------------------------------------

def timed_ms(fn, reps: int, warmup: int = 1) -> list:
    """ms of each of `reps` calls of fn (CUDA events around the call, synchronized after each), after `warmup`."""
    out = []
    for i in range(warmup + reps):
        if DEV == "cuda":
            s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            s.record()
        t0 = time.perf_counter()
        fn()
        if DEV == "cuda":
            e.record()
        sync()
        if i >= warmup:
            out.append(s.elapsed_time(e) if DEV == "cuda" else 1e3 * (time.perf_counter() - t0))
    return out


def time_decode(step_fn, cache, batch, steps, warmup=2):
    """Median ms of one decode step through an HF-style forward (CUDA events around the call, synchronized after
    each step, the argmax of its logits the next input) and the first call's seconds (compilation)."""
    x = torch.randint(0, min(1000, VOCAB), (batch, 1), device=DEV)
    times = []
    with torch.no_grad():
        t0 = time.perf_counter()
        step_fn(input_ids=x, use_cache=True, **{cache_kwarg(step_fn): cache})
        sync()
        first = time.perf_counter() - t0
        for i in range(warmup + steps):
            if DEV == "cuda":
                s, e = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                s.record()
            t1 = time.perf_counter()
            logits = step_fn(input_ids=x, use_cache=True, **{cache_kwarg(step_fn): cache}).logits
            if DEV == "cuda":
                e.record()
            sync()
            x = logits[:, -1:].argmax(-1)
            if i >= warmup:
                times.append(s.elapsed_time(e) if DEV == "cuda" else 1000 * (time.perf_counter() - t1))
    return statistics.median(times), first


def profile_step(step_fn, cache, batch, n=3, top=10) -> dict:
    """Device time per decode step by kernel (torch.profiler over n steps): the total, the kernel count, the time
    by kind (the CUDA decode kernel, matrix products, Triton kernels Inductor or sqcompile generated, the rest) and
    the top kernels."""
    from torch.profiler import ProfilerActivity, profile

    if DEV != "cuda":
        return {}
    x = torch.randint(0, min(1000, VOCAB), (batch, 1), device=DEV)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            step_fn(input_ids=x, use_cache=True, **{cache_kwarg(step_fn): cache})
        sync()
    tot: dict = {}
    count = 0
    for e in prof.events():
        if e.device_type.name == "CUDA":
            tot[e.name] = tot.get(e.name, 0.0) + e.device_time / n
            count += 1

    def kind(name):
        low = name.lower()
        if low.startswith("sq_fast"):
            return "cuda_decode_attention"
        if any(k in low for k in ("gemm", "gemv", "nvjet", "cutlass", "sm90_", "splitk")):
            return "matmul"
        if low.startswith("triton"):
            return "triton"
        return "other"

    kinds: dict = {}
    for name, us in tot.items():
        kinds[kind(name)] = kinds.get(kind(name), 0.0) + us
    return dict(device_us=sum(tot.values()), kernels_per_step=count / n, by_kind_us=kinds,
                top=[(name[:90], us) for name, us in sorted(tot.items(), key=lambda kv: -kv[1])[:top]])


def copy_bandwidth() -> float:
    """TB/s of a 1 GiB device-to-device copy, bytes read + written (median of 10)."""
    if DEV != "cuda":
        return float("nan")
    a = torch.randint(0, 255, (1 << 30,), dtype=torch.uint8, device=DEV)
    b = torch.empty_like(a)
    ms = statistics.median(timed_ms(lambda: b.copy_(a), 10, warmup=2))
    del a, b
    return 2 * (1 << 30) / (ms * 1e-3) / 1e12


def weight_bytes(model, batch: int) -> int:
    """Bytes of weights one decode step reads: every parameter but the embedding table, and `batch` of its rows."""
    emb = model.model.embed_tokens.weight
    rest = sum(p.numel() * p.element_size() for n, p in model.named_parameters() if "embed_tokens" not in n)
    return rest + batch * emb.shape[1] * emb.element_size()


def sq_read_bytes(cache, batch: int, length: int) -> int:
    """Bytes a sqcompile step reads from its cache: the packed codes of `length` tokens, the exact slots, the
    per-layer bases and means."""
    tot = 0
    for layer in cache.layers:
        tot += batch * layer.num_heads * length * (layer.k_row_bytes + layer.v_row_bytes)
        tot += sum(t.numel() * t.element_size() for t in (layer.sink_k, layer.sink_v)) if layer.slots else 0
        tot += sum(getattr(layer, n).numel() * 4 for n in ("k_basis", "k_mean", "v_basis", "v_mean")
                   if getattr(layer, n, None) is not None)
    return tot


def sq_seq_bytes(model, bits: float, cap: int) -> int:
    """Bytes one sequence of capacity `cap` allocates in a fast-layout SpectralCache (codes and exact slots)."""
    from sqcompile.cache import SpectralCache

    probe = SpectralCache(model, bits=bits, max_cache_len=cap, layout="fast")
    _, H, _, d = _kv_shape(model, 1, 1)
    slots = probe.layers[0].slots
    return probe.packed_bytes_per_token() * probe.max_cache_len + len(probe.layers) * slots * (2 * H * d * 4 + 16)


def free_memory() -> None:
    """Drop compiled graphs, their CUDA-graph pools and cached blocks."""
    torch._dynamo.reset()
    try:
        from torch._inductor import cudagraph_trees
        cudagraph_trees.reset_cudagraph_trees()
    except Exception:  # noqa: BLE001  (older torch: nothing to reset)
        pass
    _COMPILED.clear()
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


def ratio_name(bits: float) -> str:
    return f"sqcompile_{16 / bits:.2f}x"


# ------------------------------------------------------------------------------------------------------------------
# rows and sections
# ------------------------------------------------------------------------------------------------------------------

class Run:
    def __init__(self, args, model):
        self.args, self.model = args, model
        self.t0 = time.time()
        self.res: dict = {"rows": [], "skipped": [], "checks": {}}
        self.copy_tbps = float("nan")
        self.hf_fwd = model.forward
        self.hf_fn = None
        self.resumed: set = set()
        if args.resume:
            with open(args.resume) as f:
                old = json.load(f)
            self.res["rows"] = [r for r in old["rows"]]
            self.res["resumed_from"] = dict(file=args.resume, device=old.get("device"), date=old.get("date"),
                                            copy_TBps=old.get("copy_TBps"))
            self.resumed = {f"{r['row']} {r['context']}x{r['batch']}" for r in old["rows"] if r["section"] == "decode"}
            for sec in ("capacity", "generate"):
                if sec in old:
                    self.res[sec] = old[sec]
                    if not any(isinstance(v, dict) and "error" in v for v in old[sec].values()):
                        self.resumed.add(sec)

    def left(self) -> float:
        return self.args.time_budget - (time.time() - self.t0)

    def done(self, what: str) -> bool:
        """`what` ("row context x batch", "capacity", "generate") is in the --resume file: kept, not rerun."""
        return what in self.resumed

    def skip(self, what: str, need: float) -> bool:
        if self.done(what):
            log(f"{what}: from {self.args.resume}")
            return True
        if self.left() >= need:
            return False
        reason = f"time budget: {self.left():.0f} s left, ~{need:.0f} s needed"
        self.res["skipped"].append(dict(row=what, reason=reason))
        log(f"skip {what}: {self.left():.0f} s left of --time-budget, ~{need:.0f} s needed")
        return True

    def safe(self, what: str, fn, *a, **kw):
        """fn(*a, **kw); an exception is logged and listed under "errors" (the later rows still run)."""
        try:
            return fn(*a, **kw)
        except Exception as exc:  # noqa: BLE001
            import traceback

            msg = f"{type(exc).__name__}: {str(exc)[:600]} | " + traceback.format_exc()[-2500:]
            self.res.setdefault("errors", []).append(dict(row=what, error=msg))
            log(f"{what} FAILED: {msg}")
            free_memory()
            self.save()
            return None

    def floor_ms(self, nbytes: int) -> float:
        return nbytes / (self.copy_tbps * 1e12) * 1e3

    def add(self, name, ctx, batch, ms, kv_bytes, section="decode", **extra):
        wb = weight_bytes(self.model, batch)
        fl = self.floor_ms(wb + kv_bytes)
        row = dict(section=section, row=name, context=ctx, batch=batch, ms=ms, tok_s=batch * 1e3 / ms,
                   weight_bytes=wb, kv_bytes=kv_bytes, floor_ms=fl, pct_floor=100 * fl / ms, **extra)
        self.res["rows"].append(row)
        log(f"{section:8s} {name:18s} ctx {ctx:6d} B {batch:3d}: {ms:9.3f} ms/step {row['tok_s']:9.1f} tok/s, "
            f"floor {fl:.3f} ms ({row['pct_floor']:.0f}%)" + "".join(f", {k} {v}" for k, v in extra.items()))
        self.save()
        return row

    def save(self) -> None:
        if self.args.out:
            with open(self.args.out, "w") as f:
                json.dump(dict(self.res, log=LOG), f, indent=1)

    # -- rows ----------------------------------------------------------------------------------------------------
    def strong(self, ctx, batch, section="decode"):
        sm = StrongLlama(self.model, batch, ctx + 8)
        sm.fill(ctx)
        ids = torch.randint(0, min(1000, VOCAB), (batch, 1), device=DEV)
        pos = torch.tensor([ctx], device=DEV)
        t0 = time.perf_counter()
        step = graphed(lambda: sm.forward(ids, pos, length=ctx + 1))
        first = time.perf_counter() - t0

        ms = statistics.median(timed_ms(step, self.args.steps, warmup=2))
        row = self.add("strong_fp16", ctx, batch, ms, sm.kv_bytes(ctx + 1), section, first_call_s=round(first, 1))
        del step, sm
        free_memory()
        return row

    def hf(self, ctx, batch):
        if self.hf_fn is None:
            self.hf_fn = (torch.compile(self.hf_fwd, mode="reduce-overhead", dynamic=False) if COMPILER == "inductor"
                          else torch.compile(self.hf_fwd, backend=COMPILER, dynamic=False))
        cache = fill_static(self.model, batch, ctx, self.args.steps + 4)
        ms, first = time_decode(self.hf_fn, cache, batch, self.args.steps)
        kv = 2 * self.model.config.num_hidden_layers * batch * (ctx + 1) * KV_HEADS * (HIDDEN // HEADS) * 2
        del cache
        row = self.add("hf_inductor", ctx, batch, ms, kv, first_call_s=round(first, 1))
        free_memory()
        self.hf_fn = None
        return row

    def sq(self, ctx, batch, bits, section="decode"):
        import sqcompile

        fn = torch.compile(self.hf_fwd, backend=sqcompile.spectralquant, dynamic=False,
                           options=dict(bits=bits, moe=False, cudagraphs=DEV == "cuda", layout="fast",
                                        **({"lower": "eager"} if COMPILER != "inductor" else {})))
        cache = fill_spectral(self.model, batch, ctx, self.args.steps + 4, bits, layout="fast")
        calls0 = _cuda_calls()
        ms, first = time_decode(fn, cache, batch, self.args.steps)
        kv = sq_read_bytes(cache, batch, ctx + 1)
        launches = _cuda_calls() - calls0
        prof = {}
        if f"{ctx}x{batch}" in self.args.profile.split(","):
            prof = dict(profile=profile_step(fn, cache, batch))
            log(f"profile {ratio_name(bits)} {ctx}x{batch}: {json.dumps(prof['profile'])}")
        del cache, fn
        row = self.add(ratio_name(bits), ctx, batch, ms, kv, section, bits=bits, first_call_s=round(first, 1),
                       cuda_decode_launches=launches, **prof)
        free_memory()
        return row

    # -- sections ------------------------------------------------------------------------------------------------
    def check_strong(self) -> bool:
        """The strong decoder's logits (decode step, varlen step, prefill) against HF eager on the same weights."""
        from transformers import DynamicCache

        m, B, L = self.model, 2, 40
        torch.manual_seed(1)
        sm = StrongLlama(m, B, L + 8, compiled=False)
        sm.fill(L)
        dyn = DynamicCache(config=m.config)
        for i, (kc, vc) in enumerate(zip(sm.kc, sm.vc)):
            dyn.update(kc[:, :L].transpose(1, 2).contiguous(), vc[:, :L].transpose(1, 2).contiguous(), i)
        ids = torch.randint(0, min(1000, VOCAB), (B, 1), device=DEV)
        rel = lambda a, b: ((a.double() - b.double()).norm() / b.double().norm()).item()  # noqa: E731
        with torch.no_grad():
            ref = m(input_ids=ids, **{cache_kwarg(m): dyn}, position_ids=torch.full((B, 1), L, device=DEV),
                    cache_position=torch.tensor([L], device=DEV)).logits[:, -1]
            pos = torch.tensor([L], device=DEV)
            got = sm.forward(ids, pos, length=L + 1)[:, -1]
            try:
                got_v = sm.forward(ids, pos, lengths=torch.full((B,), L + 1, dtype=torch.int32, device=DEV))[:, -1]
            except Exception as exc:  # noqa: BLE001  (no varlen flash attention here: the generate loop says so)
                log(f"check: varlen step unavailable: {type(exc).__name__}: {str(exc)[:200]}")
                got_v = ref
            prompt = torch.randint(0, min(1000, VOCAB), (1, 24), device=DEV)
            sp = StrongLlama(m, 1, 32, compiled=False)
            got_p = sp.forward(prompt, torch.arange(24, device=DEV), length=24)[:, -1]
            ref_p = m(input_ids=prompt).logits[:, -1]
        errs = dict(decode=rel(got, ref), varlen=rel(got_v, ref), prefill=rel(got_p, ref_p))
        ok = all(e < 3e-2 for e in errs.values())
        self.res["checks"]["strong_vs_hf_eager_rel_err"] = errs
        self.res["checks"]["strong_ok"] = ok
        log(f"check: strong FP16 decoder vs HF eager logits, rel. err {errs} -> {'ok' if ok else 'FAILED'}")
        self.save()
        return ok

    def varlen_speed_ok(self) -> bool:
        """flash varlen (seqused_k) against fixed-length SDPA, one layer's attention at the generate shape: the
        generate loop uses varlen when it is within 15% (else a fixed length, the mean of the loop's lengths)."""
        if DEV != "cuda":
            return True
        a = self.args
        cap, L, d = a.prompt + a.new_tokens + 8, a.prompt + a.new_tokens // 2, HIDDEN // HEADS
        kc = torch.randn(1, cap, KV_HEADS, d, device=DEV, dtype=torch.bfloat16)
        vc = torch.randn_like(kc)
        q = torch.randn(1, HEADS, d, device=DEV, dtype=torch.bfloat16)
        lens = torch.full((1,), L, dtype=torch.int32, device=DEV)
        try:
            ref = F.scaled_dot_product_attention(q[:, :, None], kc[:, :L].transpose(1, 2), vc[:, :L].transpose(1, 2),
                                                 enable_gqa=True)[:, :, 0]
            got = varlen_attention(q, kc, vc, lens)
            err = ((got.double() - ref.double()).norm() / ref.double().norm()).item()
            t_v = statistics.median(timed_ms(lambda: varlen_attention(q, kc, vc, lens), 20, 3))
            t_f = statistics.median(timed_ms(lambda: F.scaled_dot_product_attention(
                q[:, :, None], kc[:, :L].transpose(1, 2), vc[:, :L].transpose(1, 2), enable_gqa=True), 20, 3))
        except Exception as exc:  # noqa: BLE001
            log(f"varlen flash attention unavailable: {type(exc).__name__}: {str(exc)[:200]}")
            self.res["checks"]["varlen"] = dict(error=str(exc)[:300])
            return False
        ok = err < 1e-2 and t_v < 1.15 * t_f
        self.res["checks"]["varlen"] = dict(rel_err=err, varlen_us=1e3 * t_v, fixed_us=1e3 * t_f, used=ok)
        log(f"check: varlen attention rel. err {err:.2e}, {1e3 * t_v:.1f} us vs fixed-length SDPA {1e3 * t_f:.1f} us "
            f"(one layer, batch 1, {L} tokens) -> {'varlen' if ok else 'fixed length'} in the generate loop")
        return ok

    def capacity(self):
        a, m = self.args, self.model
        free_memory()
        ctx, cap = a.capacity_context, a.capacity_context + a.steps + 12
        free = torch.cuda.mem_get_info()[0] if DEV == "cuda" else int(a.smoke_budget_mb * 2**20)
        work = int(a.workspace_gb * 2**30) if DEV == "cuda" else 0
        budget = free - work
        _, H, _, d = _kv_shape(m, 1, 1)
        fp16_seq = 2 * m.config.num_hidden_layers * cap * H * d * 2
        sq_seq = sq_seq_bytes(m, a.bits[0], cap)
        bf, bs = budget // fp16_seq, budget // sq_seq
        info = dict(free_bytes=free, workspace_bytes=work, kv_budget_bytes=budget, context=ctx,
                    fp16_bytes_per_seq=fp16_seq, sq_bytes_per_seq=sq_seq, bits=a.bits[0], fp16_max_batch=int(bf),
                    sq_max_batch=int(bs))
        self.res["capacity"] = info
        log(f"capacity: {free / 2**30:.1f} GiB free after the weights, workspace {work / 2**30:.1f} GiB -> KV budget "
            f"{budget / 2**30:.1f} GiB; per {ctx}-token sequence FP16 {fp16_seq / 2**30:.3f} GiB, sqcompile "
            f"{sq_seq / 2**30:.3f} GiB -> largest batch FP16 {bf}, sqcompile {bs} ({bs / max(bf, 1):.2f}x)")
        self.save()
        if bf >= 1:
            info["fp16"] = self.safe("capacity strong_fp16", self.strong, ctx, int(bf), section="capacity")
        if bs >= 1 and not self.skip("capacity sqcompile", 60):
            info["sq"] = self.safe("capacity sqcompile", self.sq, ctx, int(bs), a.bits[0], section="capacity")
        info = {k: v for k, v in info.items() if v is not None}
        self.res["capacity"] = info
        if "fp16" in info and "sq" in info:
            info["tok_s_ratio"] = info["sq"]["tok_s"] / info["fp16"]["tok_s"]
            log(f"capacity: sqcompile {info['sq']['tok_s']:.0f} tok/s at batch {bs} vs FP16 "
                f"{info['fp16']['tok_s']:.0f} "
                f"at batch {bf}: {info['tok_s_ratio']:.2f}x")
        self.save()

    def strong_generate(self, prompt, gen):
        """The strong decoder in a generate-like loop: prefill (each layer compiled for n = P), then one CUDA graph
        per decode step, synchronized after each."""
        a, m = self.args, self.model
        P, N = a.prompt, a.new_tokens
        # strong: prefill (each layer compiled for n = P), then one CUDA graph per decode step
        use_varlen = self.varlen_speed_ok()
        sm = StrongLlama(m, 1, P + N + 8)
        ids = torch.zeros(1, 1, dtype=torch.long, device=DEV)
        pos = torch.tensor([P], device=DEV)
        lens = torch.full((1,), P + 1, dtype=torch.int32, device=DEV)
        ppos = torch.arange(P, device=DEV)
        mid = P + N // 2
        with torch.no_grad():
            sm.forward(prompt, ppos, length=P)  # compile the prefill shape
            sync()
            step = None
            if use_varlen:
                try:
                    step = graphed(lambda: sm.forward(ids, pos, lengths=lens))
                except Exception as exc:  # noqa: BLE001  (varlen under Inductor / CUDA graphs refused)
                    log(f"varlen step failed under compilation ({type(exc).__name__}: {str(exc)[:200]}); fixed length")
                    use_varlen, step = False, None
            if step is None:
                step = graphed(lambda: sm.forward(ids, pos, length=mid))

            def loop(n_new):
                t0 = time.perf_counter()
                tok = sm.forward(prompt, ppos, length=P)[:, -1:].argmax(-1)
                sync()
                ttft = time.perf_counter() - t0
                out = [tok]
                for i in range(n_new - 1):
                    ids.copy_(tok)
                    if use_varlen:
                        pos.fill_(P + i), lens.fill_(P + i + 1)
                    tok = step()[:, -1:].argmax(-1)
                    out.append(tok)
                    sync()  # generate synchronizes every step (its stopping criteria)
                return ttft, time.perf_counter() - t0, torch.cat(out, 1)

            loop(2)
            ttft, total, toks = loop(N)
        gen["strong_fp16"] = dict(ttft_s=ttft, total_s=total, tok_s=N / total, decode_tok_s=(N - 1) / (total - ttft),
                                  tokens=int(toks.shape[1]), attention="varlen (exact lengths)" if use_varlen
                                  else f"fixed length {mid} (the loop's mean length)")
        log(f"generate strong_fp16: TTFT {ttft:.3f} s, {N} tokens in {total:.2f} s ({N / total:.1f} tok/s; decode "
            f"{(N - 1) / (total - ttft):.1f} tok/s), attention {gen['strong_fp16']['attention']}")
        del step, sm
        free_memory()
        self.save()

    def prefill_and_generate(self):
        """(f) TTFT of a `prompt`-token prompt, batch 1, and (g) generate `new_tokens`: the strong decoder in a
        generate-like loop, sqcompile through `sqcompile.optimize(...).generate`."""
        import sqcompile

        a, m = self.args, self.model
        P, N = a.prompt, a.new_tokens
        prompt = torch.randint(0, min(1000, VOCAB), (1, P), device=DEV)
        gen: dict = self.res.get("generate") or {"prompt": P, "new_tokens": N}
        self.res["generate"] = gen
        if "strong_fp16" not in gen:
            self.strong_generate(prompt, gen)
        fwd = m.forward
        try:
            opt = sqcompile.optimize(m, None, bits=a.bits[0], max_cache_len=P + N + 8, layout="fast", moe=False,
                                     cudagraphs=DEV == "cuda", **({"lower": "eager"} if COMPILER != "inductor" else {}))

            def preinit(n):  # the cache's buffers allocated before the call, so that they get static addresses
                cache = opt.cache()
                _, H, _, d = _kv_shape(m, 1, 1)
                k0 = torch.zeros(prompt.shape[0], H, 1, d, device=DEV, dtype=torch.bfloat16)
                for layer in cache.layers:
                    layer.lazy_initialization(k0, k0)
                with torch.no_grad():
                    return m.generate(prompt, **{cache_kwarg(m): cache}, max_new_tokens=n, do_sample=False)

            variants = {"sqcompile": lambda n: opt.generate(prompt, max_new_tokens=n, do_sample=False),
                        "sqcompile_preinit": preinit}
            for name, g in variants.items():
                if name in gen and "error" not in gen[name]:
                    continue
                if self.skip(f"generate {name}", 90):
                    continue
                gen[name] = self.safe(f"generate {name}", self.sq_generate, name, g, P, N) or \
                    dict(error=self.res["errors"][-1]["error"])
                self.save()
        finally:
            m.forward = fwd
            free_memory()
        f = gen["strong_fp16"]
        for name in ("sqcompile", "sqcompile_preinit"):
            s_ = gen.get(name, {})
            if "ttft_s" in s_:
                s_["ttft_ratio"], s_["tok_s_ratio"] = s_["ttft_s"] / f["ttft_s"], s_["tok_s"] / f["tok_s"]
                s_["decode_tok_s_ratio"] = s_["decode_tok_s"] / f["decode_tok_s"]
        self.save()

    def sq_generate(self, name, g, P, N) -> dict:
        """TTFT (generate of 1 token) and N tokens, after two warm-up calls (compilation, CUDA-graph recording)."""
        t0 = time.perf_counter()
        g(2)
        sync()
        first = time.perf_counter() - t0
        g(2)
        sync()
        t0 = time.perf_counter()
        g(1)
        sync()
        ttft = time.perf_counter() - t0
        calls0 = _cuda_calls()
        t0 = time.perf_counter()
        out = g(N)
        sync()
        total = time.perf_counter() - t0
        r = dict(bits=self.args.bits[0], ttft_s=ttft, total_s=total, tok_s=N / total,
                 decode_tok_s=(N - 1) / (total - ttft),
                 tokens=int(out.shape[1] - P), first_calls_s=first, cuda_decode_launches=_cuda_calls() - calls0)
        log(f"generate {name} ({ratio_name(self.args.bits[0])}): TTFT {ttft:.3f} s, {N} tokens in {total:.2f} s "
            f"({N / total:.1f} tok/s; decode {(N - 1) / (total - ttft):.1f} tok/s); first call (compile) "
            f"{first:.0f} s; "
            f"CUDA decode launches {r['cuda_decode_launches']}")
        return r


def _cuda_calls() -> int:
    from sqcompile.kernels import decode_attention_cuda as dc
    return dc.STATS["calls"]


def versions() -> dict:
    import transformers
    import sqcompile

    v = dict(torch=torch.__version__, transformers=transformers.__version__, python=platform.python_version())
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        pass
    v["sqcompile_commit"] = os.environ.get("SQCOMPILE_COMMIT")
    try:
        git = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                             cwd=sqcompile.__path__[0])
        v["sqcompile_commit"] = v["sqcompile_commit"] or git.stdout.strip() or None
    except OSError:
        v["sqcompile_commit"] = None
    return v


def table(res: dict) -> None:
    rank = lambda r: (r["section"] != "decode", -r["context"], -r["batch"],  # noqa: E731
                      0 if r["row"] == "strong_fp16" else 2 if r["row"] == "hf_inductor" else 1, r.get("bits", 0))
    rows = sorted(res["rows"], key=rank)
    log(f"\n# {res['device']}, copy {res['copy_TBps']:.2f} TB/s, {res['layers']} layers, {res['date']}")
    log("| section | context | batch | row | ms/step | tok/s | floor ms | % floor | vs strong FP16 | vs HF Inductor |")
    log("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        base = {k: x for k, x in ((x["row"], x) for x in rows if x["context"] == r["context"]
                                  and x["batch"] == r["batch"] and x["section"] == "decode")}
        s = base.get("strong_fp16")
        h = base.get("hf_inductor")
        vs = lambda b: f"{r['tok_s'] / b['tok_s']:.2f}x" if b and r["section"] == "decode" else ""  # noqa: E731
        log(f"| {r['section']} | {r['context']} | {r['batch']} | {r['row']} | {r['ms']:.3f} | {r['tok_s']:.1f} | "
            f"{r['floor_ms']:.3f} | {r['pct_floor']:.0f}% | {vs(s)} | {vs(h)} |")
    c = res.get("capacity")
    if c:
        log(f"capacity at {c['context']}: KV budget {c['kv_budget_bytes'] / 2**30:.1f} GiB (free "
            f"{c['free_bytes'] / 2**30:.1f}"
            f" GiB after the weights, less {c['workspace_bytes'] / 2**30:.1f} GiB workspace): largest batch FP16 "
            f"{c['fp16_max_batch']}, sqcompile {c['sq_max_batch']}; tok/s ratio "
            f"{c.get('tok_s_ratio', float('nan')):.2f}x")
    g = res.get("generate")
    if g and "strong_fp16" in g:
        for k in ("strong_fp16", "sqcompile", "sqcompile_preinit"):
            x = g.get(k, {})
            if "ttft_s" in x:
                log(f"generate {k}: prompt {g['prompt']}, {g['new_tokens']} new: TTFT {x['ttft_s']:.3f} s, "
                    f"{x['tok_s']:.1f} tok/s, decode {x['decode_tok_s']:.1f} tok/s" + (
                        f"; vs strong FP16: TTFT {x['ttft_ratio']:.2f}x, tok/s {x['tok_s_ratio']:.2f}x, decode tok/s "
                        f"{x['decode_tok_s_ratio']:.2f}x" if "ttft_ratio" in x else ""))
            elif "error" in x:
                log(f"generate {k}: FAILED {x['error'][:300]}")
    for s in res["skipped"]:
        log(f"skipped {s['row']}: {s['reason']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--contexts", type=int, nargs="+", default=[32768, 4096])
    ap.add_argument("--batches", type=int, nargs="+", default=[8, 1])
    ap.add_argument("--steps", type=int, default=8, help="timed decode steps per row (median)")
    ap.add_argument("--bits", type=float, nargs="+", default=[2.69, 3.25],
                    help="sqcompile budgets: the first at every shape, capacity and generate; the others at "
                         "--extra-shapes")
    ap.add_argument("--extra-shapes", default="32768x8,4096x1", help="context x batch for the other budgets")
    ap.add_argument("--hf-shapes", default="32768x8,4096x1,32768x1,4096x8", help="context x batch for hf_inductor")
    ap.add_argument("--capacity-context", type=int, default=32768)
    ap.add_argument("--workspace-gb", type=float, default=5.0, help="memory kept out of the KV budget (activations, "
                    "CUDA-graph pools, the allocator's slack)")
    ap.add_argument("--prompt", type=int, default=32768)
    ap.add_argument("--new-tokens", type=int, default=256)
    ap.add_argument("--sections", default="decode,capacity,generate")
    ap.add_argument("--profile", default="32768x8", help="context x batch where sqcompile rows also report device "
                    "time by kernel (torch.profiler)")
    ap.add_argument("--time-budget", type=float, default=1e9, help="seconds; later rows are skipped (and listed)")
    ap.add_argument("--out", default="e2e_decode.json")
    ap.add_argument("--resume", default=None, help="a JSON of an earlier run (same device): its rows and sections "
                    "are kept and not rerun, the rest run; --out gets all")
    ap.add_argument("--smoke", action="store_true", help="CPU run of the script itself: tiny shapes, eager "
                    "compilation, no timing value")
    ap.add_argument("--smoke-budget-mb", type=float, default=0.25, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    global DEV, HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, COMPILER
    if args.smoke:
        DEV, HIDDEN, FFN, HEADS, KV_HEADS, VOCAB, COMPILER = "cpu", 256, 256, 4, 2, 256, "eager"
        args.layers, args.contexts, args.steps = 2, [48], 2
        args.batches = [2, 1] if args.batches == [8, 1] else [min(b, 2) for b in args.batches]
        args.extra_shapes, args.hf_shapes, args.capacity_context = f"48x{args.batches[0]}", "48x1", 48
        args.prompt, args.new_tokens = 40, 4
    elif not torch.cuda.is_available():
        raise SystemExit("e2e_decode.py times a CUDA GPU; on a CPU run it with --smoke")
    torch.manual_seed(0)
    for knob in ("cache_size_limit", "recompile_limit", "accumulated_recompile_limit"):
        if hasattr(torch._dynamo.config, knob):
            setattr(torch._dynamo.config, knob, 256)
    LOG.clear()
    model = build_model(args.layers)
    run = Run(args, model)
    res = run.res
    res.update(device=torch.cuda.get_device_name() if DEV == "cuda" else "cpu", layers=args.layers,
               date=datetime.now(timezone.utc).isoformat(timespec="seconds"),
               command=" ".join(["python3"] + sys.argv),
               versions=versions(), weights_bytes=sum(p.numel() * p.element_size() for p in model.parameters()))
    run.copy_tbps = res["copy_TBps"] = copy_bandwidth() if DEV == "cuda" else 1.0
    log(f"# {res['device']}, {args.layers} layers, copy {res['copy_TBps']:.2f} TB/s, {res['versions']}")
    try:
        run.check_strong()
    except Exception as exc:  # noqa: BLE001  (the rows still run; the JSON says the check did not)
        res["checks"]["strong_ok"] = False
        res["checks"]["strong_error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
        log(f"check FAILED to run: {res['checks']['strong_error']}")
    sections = args.sections.split(",")
    shapes = lambda s: {tuple(int(v) for v in x.split("x")) for x in s.split(",") if x}  # noqa: E731
    extra, hf_at = shapes(args.extra_shapes), shapes(args.hf_shapes)
    grid = [(c, b) for c in args.contexts for b in args.batches]
    # est. seconds per task on an H100 (32 layers, compile included), for --time-budget
    need = dict(strong=15, sq=50, hf=55, capacity=90, generate=130)
    tasks = []  # by priority: the targets first (32K x 8 and 4K x 1 vs the strong baseline, capacity,
    # prefill and generate), then the other budget and the HF rows there, then the rest of the grid
    for i, (ctx, b) in enumerate(grid):
        tasks.append((i in (0, len(grid) - 1), f"strong_fp16 {ctx}x{b}", "strong", run.strong, (ctx, b)))
        for bits in args.bits:
            if bits == args.bits[0] or (ctx, b) in extra:
                tasks.append((i in (0, len(grid) - 1) and bits == args.bits[0], f"{ratio_name(bits)} {ctx}x{b}", "sq",
                              run.sq, (ctx, b, bits)))
        if (ctx, b) in hf_at:
            tasks.append((False, f"hf_inductor {ctx}x{b}", "hf", run.hf, (ctx, b)))
    first = [t for t in tasks if t[0]]
    middle = [t for t in tasks if not t[0] and (any(t[1].endswith(f" {c}x{b}") for c, b in (grid[0], grid[-1])))]
    order = [t for t in first if "decode" in sections] + [
        (True, "capacity", "capacity", run.capacity, ()), (True, "generate", "generate", run.prefill_and_generate, ())]
    order += [t for t in middle + [t for t in tasks if t not in first and t not in middle] if "decode" in sections]
    for _, name, kind, fn, fargs in order:
        if kind in ("capacity", "generate") and kind not in sections:
            continue
        if not run.skip(name, need[kind]):
            run.safe(name, fn, *fargs)
    table(res)
    run.save()
    return res


if __name__ == "__main__":
    main()
