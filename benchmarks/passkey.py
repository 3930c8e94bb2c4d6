"""Passkey retrieval through the compressed KV cache (issue #17, Q3): FP16 cache vs `sqcompile.optimize`'s.

A 5-digit number is hidden at `--depths` evenly spaced depths of a filler text of about `--lengths` tokens
(the filler of Mohtashami & Jaggi's landmark-attention passkey test); the model answers greedily after
"What is the pass key? The pass key is". A trial passes when the first 5 digits of the answer are the key.
Rows: the FP16 cache (the model's K/V rounded to fp16: `evaluate.simulated_cache(fp16=True)`) and
`sqcompile.optimize(model, profile, bits=16/ratio, layout=...)` (a `SpectralCache` under the backend, eager
lowering on CPU: the prompt written through the compressed cache, every decode step reading its codes) for each
`--layouts`. The profile comes from `sqcompile.calibrate` with its defaults on the Britannica text, in windows of
the longest context (with BOS where the tokenizer prepends one). Prints a markdown table.

    python benchmarks/passkey.py --model smollm2 --lengths 1800 3500 --threads 2
    python benchmarks/passkey.py --model gemma3 --lengths 1800 3500 --threads 2   # tests/models.py fetches it
"""
from __future__ import annotations

import argparse
import json
import random
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

INTRO = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize it. "
         "I will quiz you about the important information there.\n")
FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
NEEDLE = "The pass key is {key}. Remember it. {key} is the pass key. "
QUESTION = "\nWhat is the pass key? The pass key is"
NEW_TOKENS = 8


def _ids(tok, text: str, bos: bool) -> torch.Tensor:
    ids = tok(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if bos and tok.bos_token_id is not None:
        ids = torch.cat([torch.tensor([tok.bos_token_id]), ids])
    return ids


def prompt(tok, tokens: int, depth: float, key: int, bos: bool) -> torch.Tensor:
    """[1, ~tokens] ids: intro, filler with the needle after `depth` of it, the question."""
    fixed = len(_ids(tok, INTRO + NEEDLE.format(key=key) + QUESTION, bos))
    per = len(_ids(tok, FILLER * 10, False)) / 10
    n = max(1, round((tokens - fixed) / per))
    at = round(depth * n)
    text = INTRO + FILLER * at + NEEDLE.format(key=key) + FILLER * (n - at) + QUESTION
    return _ids(tok, text, bos)[None]


def _capacity(tokens: int) -> int:
    """The cache capacity for a prompt of `tokens`: the next multiple of 256 past the answer (few distinct shapes,
    so the compiled graphs are reused)."""
    return -(-(tokens + NEW_TOKENS) // 256) * 256


def answer(tok, out: torch.Tensor, n_prompt: int) -> str:
    return tok.decode(out[0, n_prompt:], skip_special_tokens=True)


def passed(text: str, key: int) -> bool:
    digits = "".join(c for c in text if c.isdigit())
    return digits[:5] == str(key)


def trial(tok, generate, tokens: int, depth: float, key: int, bos: bool) -> dict:
    """One passkey trial: `generate(ids)` -> output ids [1, prompt + new]; the answer and whether it passed."""
    ids = prompt(tok, tokens, depth, key, bos)
    t0 = time.monotonic()
    text = answer(tok, generate(ids), ids.shape[1])
    return {"tokens": ids.shape[1], "target": tokens, "depth": round(depth, 3), "key": key, "answer": text,
            "pass": passed(text, key), "seconds": round(time.monotonic() - t0, 1)}


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="smollm2", choices=["smollm2", "gemma3"])
    ap.add_argument("--lengths", type=int, nargs="+", default=[1800, 3500])
    ap.add_argument("--depths", type=int, default=10, help="depths 0, 1/(n-1), ..., 1 of the filler")
    ap.add_argument("--ratio", type=float, default=5.0, help="compression vs FP16 (bits = 16 / ratio)")
    ap.add_argument("--layouts", nargs="*", default=["fast", "planes"])
    ap.add_argument("--no-fp16", action="store_true", help="skip the FP16 row (measured in another run)")
    ap.add_argument("--profile", default=None, help="a saved profile to load (else calibrate, and save here)")
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="write the trials as JSON here")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import sqcompile
    from sqcompile import evaluate as ev
    from sqcompile.hf import bos_prefix, load_text
    from models import load_model

    model, tok = load_model(args.model)
    bos = bool(bos_prefix(tok))  # where the tokenizer adds BOS (Gemma-3: perplexity ~72 without, ~39 with)
    if args.profile and Path(args.profile).is_file():
        profile = sqcompile.SpectralProfile.load(args.profile)
    else:  # windows of the longest prompt, each starting with BOS where the tokenizer adds it (calibrate's own)
        profile = sqcompile.calibrate(model, load_text("britannica")[:400_000], tokenizer=tok, chunk=max(args.lengths))
        if args.profile:
            profile.save(args.profile)
    bits = 16.0 / args.ratio
    depths = [i / (args.depths - 1) for i in range(args.depths)] if args.depths > 1 else [0.5]
    rng = random.Random(args.seed)
    trials = [(n, d, rng.randrange(10_000, 100_000)) for n in args.lengths for d in depths]

    def fp16_generate(ids):
        cache = ev.simulated_cache(ev.EvalState(None, (), fp16=True), model.config)
        with torch.no_grad():
            return model.generate(ids, past_key_values=cache, max_new_tokens=NEW_TOKENS, do_sample=False,
                                  pad_token_id=tok.eos_token_id)

    rows = [] if args.no_fp16 else [("FP16 cache", None, fp16_generate)]
    forward = model.forward
    for layout in args.layouts:
        def run(ids, layout=layout):
            # one compiled forward per layout (every trial reuses its graphs), one cache capacity per context length
            model.forward = compiled[layout]
            opt = sqcompile.Optimized(model, profile, bits, _capacity(ids.shape[1]), None,
                                     options[layout])
            try:
                return opt.generate(ids, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=tok.eos_token_id)
            finally:
                model.forward = forward
        rows.append((f"SpectralCache {layout}", layout, run))
    options, compiled = {}, {}
    for layout in args.layouts:
        opt = sqcompile.optimize(model, profile, bits=bits, layout=layout, lower="eager")
        options[layout], compiled[layout] = opt.options, model.forward
        model.forward = forward

    results = []
    for name, layout, fn in rows:
        for n, depth, key in trials:
            r = {"row": name, "layout": layout, **trial(tok, fn, n, depth, key, bos)}
            results.append(r)
            print(json.dumps(r), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps({"bits": bits, "ratio": args.ratio, "model": args.model,
                                              "trials": results}, indent=1))
    print(f"\nPasskey retrieval, {args.model}, {args.depths} depths, greedy, "
          f"compressed at {bits:.2f} bits/element ({args.ratio:.2f}x vs FP16 by the codec's accounting)\n")
    print("| cache | " + " | ".join(f"~{n} tokens" for n in args.lengths) + " |")
    print("|---|" + "---|" * len(args.lengths))
    for name, _, _ in rows:
        cells = []
        for n in args.lengths:
            rs = [r for r in results if r["row"] == name and r["target"] == n]
            cells.append(f"{sum(r['pass'] for r in rs)}/{len(rs)}")
        print(f"| {name} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
