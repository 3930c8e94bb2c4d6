"""The backend over a plain HF cache tells the truth: its perplexity equals `SpectralCache`'s (issue #17).

Perplexity of `--eval-tokens` Hamlet tokens fed in chunks of `--chunk` (each chunk attends to the cache of the
earlier ones) through: the exact cache; `torch.compile(model.forward, backend="spectralquant", options=...)` over a
DynamicCache (the simulated compression, `passes/insert_kv_quantization.py`); and the same model eager over
`SpectralCache(model, profile, bits, layout=...)` (the packed codes). Same profile (`sqcompile.calibrate` with its
defaults on the Britannica text, or `--calib-tokens` tokens of it), same bits, layout and `--recent-window` (the
backend option and `SpectralCache(recent_window=...)`). Prints a markdown table.

`--decode-context C` runs the decode protocol of `sqcompile eval --context C` instead (the first C - `--scored`
tokens prefilled in chunks of 256, then the last `--scored` ONE TOKEN AT A TIME), with an FP16-cache baseline row.

    python benchmarks/plain_cache_quality.py --model smollm2 --bits 3.25 --threads 2
    python benchmarks/plain_cache_quality.py --bits 2.75 --layouts fast --recent-window 48 --decode-context 2048 \
        --scored 512 --calib-tokens 1024 --threads 1
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


@torch.no_grad()
def perplexity(step, ids: torch.Tensor, cache, chunk: int) -> float:
    nll, count, last = 0.0, 0, None
    for start in range(0, ids.numel(), chunk):
        piece = ids[start:start + chunk]
        logits = step(input_ids=piece[None], past_key_values=cache, use_cache=True).logits[0].float()
        if last is not None:
            nll += F.cross_entropy(last[None], piece[:1], reduction="sum").item()
            count += 1
        nll += F.cross_entropy(logits[:-1], piece[1:], reduction="sum").item()
        count += piece.numel() - 1
        last = logits[-1]
    return math.exp(nll / count)


@torch.no_grad()
def decode_perplexity(step, ids: torch.Tensor, cache, scored: int, prefill_chunk: int = 256) -> float:
    """The decode protocol (`sqcompile.evaluate._decode_nll`) through `step`: prefill ids[:-scored] in chunks, then
    score the last `scored` tokens one at a time."""
    prefix, nll, count = ids.numel() - scored, 0.0, 0
    for start in range(0, prefix, prefill_chunk):
        last = step(input_ids=ids[None, start:min(prefix, start + prefill_chunk)], past_key_values=cache,
                    use_cache=True).logits[0, -1].float()
    nll += F.cross_entropy(last[None], ids[prefix:prefix + 1], reduction="sum").item()
    count += 1
    for t in range(prefix, ids.numel() - 1):
        logits = step(input_ids=ids[None, t:t + 1], past_key_values=cache, use_cache=True).logits[0, -1].float()
        nll += F.cross_entropy(logits[None], ids[t + 1:t + 2], reduction="sum").item()
        count += 1
    return math.exp(nll / count)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    ap.add_argument("--bits", type=float, nargs="+", default=[3.25])
    ap.add_argument("--layouts", nargs="+", default=["fast", "planes"])
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--profile", default=None, help="a saved profile to load (else calibrate, and save here)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--recent-window", type=int, default=0, help="the last W tokens exact (both paths)")
    ap.add_argument("--decode-context", type=int, default=0, help="C > 0: the decode protocol on C Hamlet tokens")
    ap.add_argument("--scored", type=int, default=512, help="decode protocol: tokens scored one at a time")
    ap.add_argument("--calib-tokens", type=int, default=0, help="calibrate on this many Britannica tokens "
                    "(calibrate(max_tokens=...), no time budget); 0: calibrate()'s defaults")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    import sqcompile
    from sqcompile.evaluate import fp16_kv_bytes
    from sqcompile.hf import bos_prefix, load_text
    from models import load_model

    model, tok = load_model(args.model)
    bos = bos_prefix(tok)  # [BOS] where the tokenizer starts its encodings with it (Gemma-3), else []
    if args.profile and Path(args.profile).is_file():
        profile = sqcompile.SpectralProfile.load(args.profile)
    elif args.calib_tokens:
        profile = sqcompile.calibrate(model, load_text("britannica"), tokenizer=tok, seconds=1e9,
                                      max_tokens=args.calib_tokens, progress=False)
        if args.profile:
            profile.save(args.profile)
    else:
        # windows of max(1024, eval tokens), each starting with BOS where the tokenizer adds it (calibrate's own)
        profile = sqcompile.calibrate(model, load_text("britannica")[:200_000], tokenizer=tok,
                                      chunk=max(1024, args.eval_tokens))
        if args.profile:
            profile.save(args.profile)
    W = args.recent_window
    if args.decode_context:
        from sqcompile.evaluate import decode_context, fp16_cache

        ids = decode_context(tok, load_text("hamlet"), args.decode_context, bos=bool(bos))
        run = lambda step, cache: decode_perplexity(step, ids, cache, args.scored)
        base_name, base_cache = "FP16 cache", lambda: fp16_cache(model.config)
        how = f"the decode protocol: {ids.numel()} Hamlet tokens, the last {args.scored} token by token"
    else:
        hamlet = tok(load_text("hamlet")[:60_000], add_special_tokens=False)["input_ids"]
        ids = torch.tensor(bos + hamlet[:args.eval_tokens - len(bos)])
        run = lambda step, cache: perplexity(step, ids, cache, args.chunk)
        base_name, base_cache = "exact cache", lambda: transformers.DynamicCache(config=model.config)
        how = f"{ids.numel()} Hamlet tokens in chunks of {args.chunk}"
    forward = model.forward
    t0 = time.monotonic()
    base = run(model, base_cache())
    rows = [(base_name, "-", "-", base, "")]
    print(f"{base_name}: {base:.3f} ({time.monotonic() - t0:.0f} s)", flush=True)
    for bits in args.bits:
        for layout in args.layouts:
            torch._dynamo.reset()
            step = torch.compile(forward, backend="spectralquant",
                                 options={"profile": profile, "bits": bits, "layout": layout, "lower": "eager",
                                          "recent_window": W})
            t0 = time.monotonic()
            plain = run(step, transformers.DynamicCache(config=model.config))
            t1 = time.monotonic()
            real_cache = sqcompile.SpectralCache(model, profile, bits=bits, layout=layout, max_cache_len=ids.numel(),
                                                 recent_window=W, read_copy=True)
            real = run(model, real_cache)
            t2 = time.monotonic()
            ratio = fp16_kv_bytes(model.config, ids.numel()) / real_cache.sequence_nbytes
            for name, ppl, secs in (("backend + DynamicCache", plain, t1 - t0), ("SpectralCache", real, t2 - t1)):
                rows.append((name, f"{bits:.2f} ({ratio:.2f}x)", layout, ppl, f"{secs:.0f} s"))
                print(f"{name} {layout} {bits}: {ppl:.3f} ({100 * (ppl / base - 1):+.2f}%, {secs:.0f} s)", flush=True)
    print(f"\n{args.model}, {how}, recent window {W}, profile: calibrate() on Britannica ({profile.tokens} "
          f"tokens); ratio = FP16 K/V bytes / SpectralCache.sequence_nbytes\n")
    print("| cache | bits (ratio vs FP16, every byte) | layout | PPL | dPPL | time |\n|---|---|---|---|---|---|")
    for name, bits, layout, ppl, secs in rows:
        print(f"| {name} | {bits} | {layout} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {secs} |")


if __name__ == "__main__":
    main()
