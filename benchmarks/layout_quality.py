"""Quality of the packed layouts on the real SmolLM2-135M (CPU): perplexity and teacher-forced agreement.

For each budget and layout ("planes": Lloyd-Max bit-planes; "fast": uniform levels packed in bytes; and the
data-oblivious TurboQuant format in the fast layout) the K/V cache is simulated through the codec
(`sqcompile.evaluate.simulated_cache`, what `SpectralCache` stores, bit for bit in the eager path):

- dPPL: perplexity change on `--eval-tokens` Hamlet tokens, one chunk, vs the unquantized model;
- agreement: teacher-forced top-1 agreement with the FP32 greedy continuation of the 8 prompts of
  tests/test_smollm2_e2e.py (32 tokens each), the issue #6 acceptance metric. The FP16-cache row is its ceiling.

    python benchmarks/layout_quality.py --threads 2        # ~10 minutes on 2 CPU cores
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def turboquant_codec(config, bits: float, **codec_kwargs):
    """The data-oblivious TurboQuant codec sized for `config`: head_dim is `config.head_dim` where the model sets
    it (Gemma-3: 256, not hidden_size / heads = 160), the profile's fingerprint rule."""
    from sqcompile.profile import model_fingerprint
    from sqcompile.quant import build_codec

    fp = model_fingerprint(config)
    return build_codec(None, bits=bits, num_layers=fp["num_layers"], num_kv_heads=fp["num_kv_heads"],
                       head_dim=fp["head_dim"], **codec_kwargs)


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=float, nargs="+", default=[4.25, 3.25, 2.69])
    ap.add_argument("--calib-tokens", type=int, default=8192)
    ap.add_argument("--sensitivity-tokens", type=int, default=512)
    ap.add_argument("--eval-tokens", type=int, default=1024)
    ap.add_argument("--threads", type=int, default=0)
    ap.add_argument("--out", default="layout_quality.json")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)

    import sqcompile
    from sqcompile import evaluate as ev
    from sqcompile.calibrate import _chunked_log_probs
    from sqcompile.hf import load_smollm2, load_text
    from sqcompile.quant import build_codec
    from test_smollm2_e2e import NEW_TOKENS, PROMPTS

    model, tok = load_smollm2()
    calib = tok(load_text("britannica")[:120_000], return_tensors="pt")["input_ids"][0]
    profile = sqcompile.calibrate(model, calib, seconds=600, max_tokens=args.calib_tokens, tokenizer=tok,
                                  sensitivity_tokens=args.sensitivity_tokens)
    ids, mask = ev.left_padded(tok, PROMPTS)
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.eos_token_id or 0)
    cont = ref[:, ids.shape[1]:]
    text = tok(load_text("hamlet")[:40_000], return_tensors="pt")["input_ids"][0]
    text = text[: args.eval_tokens]

    def nll(codec) -> float:  # mean next-token NLL over `text` in one chunk (codec None: the FP16 cache)
        return -_chunked_log_probs(model, text, codec, chunk=text.numel())[:-1].gather(-1, text[1:, None]).mean().item()

    nll0 = nll(None)

    def row(name, bits, codec, fp16=False):
        cache = ev.simulated_cache(ev.EvalState(codec, [], fp16=fp16), model.config)
        agree = (ev.teacher_forced_picks(model, ids, mask, cont, cache) == cont).float().mean().item()
        r = {"row": name, "bits": bits, "bits_per_element": None if codec is None else codec.bits_per_element,
             "dppl_pct": (torch.exp(torch.tensor(nll(codec) - nll0)).item() - 1) * 100, "agreement": agree}
        print(json.dumps(r), flush=True)
        return r

    cfg = model.config
    rows = [row("fp16 cache", 16, None, fp16=True)]
    for bits in args.bits:
        rows.append(row("spectralquant planes", bits, build_codec(profile, bits=bits)))
        rows.append(row("spectralquant fast", bits, build_codec(profile, bits=bits, layout="fast")))
        rows.append(row("turboquant fast", bits, turboquant_codec(cfg, bits, layout="fast")))
    Path(args.out).write_text(json.dumps(rows, indent=1))
    print("\n| row | bits/elem | dPPL | teacher-forced agreement |\n|---|---|---|---|")
    for r in rows:
        print(f"| {r['row']} | {r['bits']} | {r['dppl_pct']:+.2f}% | {r['agreement']:.1%} |")


if __name__ == "__main__":
    main()
