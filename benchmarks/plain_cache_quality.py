"""The backend over a plain HF cache tells the truth: its perplexity equals `SpectralCache`'s (issue #17).

Perplexity of `--eval-tokens` Hamlet tokens fed in chunks of `--chunk` (each chunk attends to the cache of the
earlier ones) through: the exact cache; `torch.compile(model.forward, backend="spectralquant", options=...)` over a
DynamicCache (the simulated compression, `passes/insert_kv_quantization.py`); and the same model eager over
`SpectralCache(model, profile, bits, layout=...)` (the packed codes). Same profile (`sqcompile.calibrate` with its
defaults on the Britannica text), same bits and layout. Prints a markdown table.

    python benchmarks/plain_cache_quality.py --model smollm2 --bits 3.25 --threads 2
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


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    ap.add_argument("--bits", type=float, nargs="+", default=[3.25])
    ap.add_argument("--layouts", nargs="+", default=["fast", "planes"])
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--chunk", type=int, default=64)
    ap.add_argument("--profile", default=None, help="a saved profile to load (else calibrate, and save here)")
    ap.add_argument("--threads", type=int, default=0)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import transformers
    import sqcompile
    from sqcompile.hf import load_text
    from models import load_model

    model, tok = load_model(args.model)
    bos = [tok.bos_token_id] if args.model == "gemma3" else []
    if args.profile and Path(args.profile).is_file():
        profile = sqcompile.SpectralProfile.load(args.profile)
    else:
        text = tok(load_text("britannica")[:200_000], add_special_tokens=False)["input_ids"]
        window = max(1024, args.eval_tokens)
        windows = [torch.tensor(bos + text[i:i + window - len(bos)]) for i in range(0, len(text), window - len(bos))]
        profile = sqcompile.calibrate(model, windows, tokenizer=tok, chunk=window)
        if args.profile:
            profile.save(args.profile)
    hamlet = tok(load_text("hamlet")[:60_000], add_special_tokens=False)["input_ids"]
    ids = torch.tensor(bos + hamlet[:args.eval_tokens - len(bos)])
    forward = model.forward
    t0 = time.monotonic()
    base = perplexity(model, ids, transformers.DynamicCache(config=model.config), args.chunk)
    rows = [("exact cache", "-", "-", base, "")]
    print(f"exact cache: {base:.3f} ({time.monotonic() - t0:.0f} s)", flush=True)
    for bits in args.bits:
        for layout in args.layouts:
            torch._dynamo.reset()
            step = torch.compile(forward, backend="spectralquant",
                                 options={"profile": profile, "bits": bits, "layout": layout, "lower": "eager"})
            t0 = time.monotonic()
            plain = perplexity(step, ids, transformers.DynamicCache(config=model.config), args.chunk)
            t1 = time.monotonic()
            real = perplexity(model, ids, sqcompile.SpectralCache(model, profile, bits=bits, layout=layout,
                                                                  max_cache_len=ids.numel()), args.chunk)
            t2 = time.monotonic()
            for name, ppl, secs in (("backend + DynamicCache", plain, t1 - t0), ("SpectralCache", real, t2 - t1)):
                rows.append((name, f"{bits:.2f} ({16 / bits:.2f}x)", layout, ppl, f"{secs:.0f} s"))
                print(f"{name} {layout} {bits}: {ppl:.3f} ({100 * (ppl / base - 1):+.2f}%, {secs:.0f} s)", flush=True)
    print(f"\n{args.model}, {ids.numel()} Hamlet tokens in chunks of {args.chunk}, profile: calibrate() defaults on "
          f"Britannica ({profile.tokens} tokens)\n")
    print("| cache | bits (ratio) | layout | PPL | dPPL | time |\n|---|---|---|---|---|---|")
    for name, bits, layout, ppl, secs in rows:
        print(f"| {name} | {bits} | {layout} | {ppl:.3f} | {100 * (ppl / base - 1):+.2f}% | {secs} |")


if __name__ == "__main__":
    main()
