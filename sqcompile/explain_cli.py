"""`sqcompile explain`: compile a model with the backend, run one prefill, print which sites were rewritten."""
from __future__ import annotations

import argparse


def main(args) -> int:
    p = argparse.ArgumentParser(prog="sqcompile explain")
    p.add_argument("--model", default="smollm2", help="'smollm2' (cached from PyPI) or a local HF model directory")
    p.add_argument("--profile", default=None, help="a SpectralProfile file (default: TurboQuant mode)")
    p.add_argument("--bits", type=float, default=4.25)
    p.add_argument("--no-quantize", action="store_true", help="rotation only")
    p.add_argument("--cache", choices=["static", "dynamic"], default="static")
    p.add_argument("--prompt", default="The quick brown fox")
    ns = p.parse_args(getattr(args, "rest", None) or [])

    import torch
    from transformers import DynamicCache, StaticCache

    from .cli import _load_model
    from .report import explain

    model, tokenizer = _load_model(ns.model)
    ids = tokenizer(ns.prompt, return_tensors="pt")["input_ids"]
    cache = (StaticCache(config=model.config, max_cache_len=ids.shape[1] + 16) if ns.cache == "static"
             else DynamicCache(config=model.config))
    options = {"bits": ns.bits, "quantize": not ns.no_quantize}
    if ns.profile:
        options["profile"] = ns.profile
    with torch.no_grad():
        report = explain(model, input_ids=ids, past_key_values=cache, use_cache=True, options=options)
    print(report)
    return 0
