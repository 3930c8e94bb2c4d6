"""`sqcompile` command line: calibrate, eval, inspect, explain, bench.

One parser, one `cmd_*` function per subcommand. Heavy imports (torch, transformers) happen inside the commands,
so `sqcompile --help` and every subcommand's `--help` answer without loading torch.
"""
from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from pathlib import Path
from typing import Optional, Sequence

# `sqcompile bench NAME`: the scripts under benchmarks/ (a source checkout), each writing one JSON file
BENCHMARKS = {
    "decode_attention": "decode_attention.py",
    "decode_attention_fast": "decode_attention_fast.py",
    "decode_attention_cuda": "decode_attention_cuda.py",
    "moe": "moe.py",
    "e2e": "e2e_decode.py",
}


def _load_model(name: str):
    """`eval_pipeline.load_model` ("smollm2" as cached by `python tests/models.py smollm2`, a local model directory
    or a .gguf file), its error as one line."""
    from .eval_pipeline import load_model

    try:
        return load_model(name)
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"sqcompile: {e}") from None


def cmd_calibrate(args) -> int:
    from .calibrate import calibrate
    from .hf import load_text

    model, tokenizer = _load_model(args.model)
    try:
        texts = [load_text(t) for t in args.text]
    except (ValueError, FileNotFoundError) as e:
        raise SystemExit(f"sqcompile: {e}") from None
    profile = calibrate(model, texts, seconds=args.seconds, tokenizer=tokenizer, max_tokens=args.max_tokens,
                        chunk=args.chunk, sensitivity_tokens=args.sensitivity_tokens)
    profile.meta["texts"] = list(args.text)
    profile.meta["model"] = args.model
    path = profile.save(args.out)
    print(f"{profile}\nsaved to {path}")
    return 0


def cmd_eval(args) -> int:
    try:
        return _eval(args)
    except FileNotFoundError as e:  # the model or a text is not cached: the message says how to fetch it
        raise SystemExit(f"sqcompile: {e}") from None


def _eval(args) -> int:
    from .eval_pipeline import run_decode_eval, run_eval
    from .evaluate import DECODE_WINDOW, decode_markdown, default_decode_rows, default_rows, to_markdown

    window = DECODE_WINDOW if args.window is None else args.window
    budgets = ((4.25, 3.25, 2.69) if args.budgets is None
               else [float(b) for b in args.budgets.split(",") if b.strip()])
    window_bits = [float(b) for b in args.window_bits.split(",")]
    if args.protocol == "decode":
        results, info = run_decode_eval(model=args.model, gguf_file=args.gguf_file, context=args.context,
                                        scored=args.scored, calibration_text=args.calibration_text,
                                        eval_text=args.eval_text, eval_offset=args.eval_offset,
                                        profile_path=args.profile, bos=args.bos, out_dir=args.out,
                                        chunked=args.chunked or None,
                                        rows=default_decode_rows(budgets, args.layouts.split(","), window,
                                                                 window_bits))
        print("\n".join(f"- {k}: {v}" for k, v in info.items()) + "\n\n" + decode_markdown(results))
        return 0
    if args.model != "smollm2" or args.gguf_file:
        raise SystemExit("sqcompile eval --protocol short runs on SmolLM2 only; --model needs --protocol decode")
    rows = default_rows(budgets)
    if args.only:
        keep = [s.strip().lower() for s in args.only.split(",")]
        rows = [r for r in rows if r.method is None or any(k in f"{r.group} {r.name}".lower() for k in keep)]
    results, info = run_eval(calibration_text=args.calibration_text, eval_text=args.eval_text,
                             eval_tokens=args.eval_tokens, calibration_seconds=args.seconds,
                             calibration_tokens=args.calibration_tokens,
                             profile_path=args.profile, rows=rows, out_dir=args.out,
                             eval_offset=args.eval_offset, sensitivity_tokens=args.sensitivity_tokens)
    print("\n".join(f"- {k}: {v}" for k, v in info.items()))
    print()
    print(to_markdown(results))
    if args.out:
        print(f"\nwrote {Path(args.out) / 'eval.md'} and {Path(args.out) / 'eval.json'}")
    return 0


def _load_profile(path: str, command: str):
    """The SpectralProfile at `path`, or None after one line on stderr (missing, truncated, garbled, not a
    profile: the message says which; no traceback)."""
    from .profile import SpectralProfile

    try:
        return SpectralProfile.load(path)
    except (OSError, ValueError) as e:
        print(f"sqcompile {command}: {e}", file=sys.stderr)
        return None


def cmd_inspect(args) -> int:
    profile = _load_profile(args.profile, "inspect")
    if profile is None:
        return 2
    print(profile)
    print(f"fingerprint: {profile.fingerprint}")
    print(f"meta: {profile.meta}")
    d_key, d_value = profile.d_eff("key"), profile.d_eff("value")
    print("\n| layer | kv-head | d_eff key | d_eff value |\n|---|---|---|---|")
    for l in range(profile.num_layers):
        for h in range(profile.num_kv_heads):
            print(f"| {l} | {h} | {d_key[l, h]:.1f} | {d_value[l, h]:.1f} |")
    print(f"\nmean d_eff: key {d_key.mean():.2f}, value {d_value.mean():.2f} (head_dim {profile.head_dim})\n")
    for bits in args.bits:
        _print_bits(profile, bits)
    png = Path(args.plot) if args.plot else Path(args.profile).with_suffix(".spectra.png")
    _plot_spectra(profile, png)
    print(f"spectra plot: {png}")
    return 0


def _print_bits(profile, bits: float) -> None:
    """The codec's per-layer K/V formats (groups, bits, scales) at `bits` stored bits per element."""
    try:
        from .quant import build_codec
    except ImportError:
        print("(bits table skipped: sqcompile.quant.build_codec is not available)")
        return
    codec = build_codec(profile, bits=bits)
    print(f"codec at {bits} bits/element: {codec.bits_per_element:.3f} stored bits/element "
          f"({16 / codec.bits_per_element:.2f}x vs FP16)")
    print(codec.describe() if hasattr(codec, "describe") else repr(codec))


def _plot_spectra(profile, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    cmap = plt.get_cmap("viridis")
    L = profile.num_layers
    for ax, kind in zip(axes, ("key", "value")):
        lam = profile.eigvals(kind)
        for l in range(L):
            spec = lam[l].mean(0)
            spec = spec / spec.sum().clamp_min(1e-30)
            ax.semilogy(range(1, spec.numel() + 1), spec.clamp_min(1e-12).numpy(), color=cmap(l / max(L - 1, 1)),
                        lw=1)
        ax.set_title(f"{kind}s: centered spectrum, mean d_eff {profile.d_eff(kind).mean():.1f}", fontsize=10)
        ax.set_xlabel("eigen-index")
    axes[0].set_ylabel("fraction of variance (mean over kv-heads)")
    sm = plt.cm.ScalarMappable(cmap=cmap, norm=plt.Normalize(0, L - 1))
    fig.colorbar(sm, ax=axes, label="layer")
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def cmd_explain(args) -> int:
    """Compile the model with the backend, run one prefill, print which sites were rewritten and why not."""
    import torch
    from transformers import DynamicCache, StaticCache

    from .calibrate import cache_kwarg
    from .report import explain

    profile = _load_profile(args.profile, "explain") if args.profile else None
    if args.profile and profile is None:
        return 2
    model, tokenizer = _load_model(args.model)
    ids = tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    cache = (StaticCache(config=model.config, max_cache_len=ids.shape[1] + 16) if args.cache == "static"
             else DynamicCache(config=model.config))
    options = {"bits": args.bits, "quantize": not args.no_quantize}
    if profile is not None:
        options["profile"] = profile
    with torch.no_grad():
        report = explain(model, input_ids=ids, use_cache=True, options=options, **{cache_kwarg(model): cache})
    print(report)
    return 0


def cmd_bench(args) -> int:
    """Run the GPU benchmark scripts (benchmarks/ in a source checkout), one JSON file each under --out."""
    unknown = [name for name in args.which if name not in BENCHMARKS]
    if unknown:
        print(f"sqcompile bench: unknown benchmark {unknown[0]!r}; choose from {list(BENCHMARKS)}", file=sys.stderr)
        return 2
    import torch

    if not torch.cuda.is_available():
        print("sqcompile bench: the benchmarks time GPU kernels and need a CUDA GPU (none found)", file=sys.stderr)
        return 2
    root = Path(__file__).resolve().parent.parent / "benchmarks"
    if not root.is_dir():
        print(f"sqcompile bench: benchmark scripts not found at {root} (run from a source checkout)", file=sys.stderr)
        return 2
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    status = 0
    for name in args.which or list(BENCHMARKS):
        print(f"== {name}", flush=True)
        r = subprocess.run([sys.executable, str(root / BENCHMARKS[name]), "--out", str(out / f"{name}.json")])
        status = status or r.returncode
    return status


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sqcompile", description=__doc__)
    parser.add_argument("-v", "--verbose", action="store_true", help="log at INFO level")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("calibrate", help="calibrate a SpectralProfile on text")
    p.add_argument("--model", default="smollm2", help="'smollm2' (cached once by `python tests/models.py smollm2`) or a local HF model directory")
    p.add_argument("--text", nargs="+", default=["britannica"], help="text names (hamlet, britannica) or .txt paths")
    p.add_argument("--seconds", type=float, default=15)
    p.add_argument("--max-tokens", type=int, default=65536)
    p.add_argument("--chunk", type=int, default=1024)
    p.add_argument("-o", "--out", default="profile.safetensors")
    p.add_argument("--sensitivity-tokens", type=int, default=512,
                   help="measure per-layer K/V sensitivity on this many tokens (0: off; minutes on a CPU)")
    p.set_defaults(func=cmd_calibrate)

    p = sub.add_parser("eval", help="KV compression quality: perplexity decoded token by token through the real "
                                     "cache (--protocol decode), or the simulated 64-token-chunk table (short)")
    p.add_argument("--protocol", choices=("decode", "short"), default="decode",
                   help="decode: the last --scored tokens of a --context window scored one token at a time through "
                        "SpectralCache; short: SmolLM2, --eval-tokens in chunks of 64 through the simulated codec")
    p.add_argument("--context", type=int, default=2048, help="decode: context tokens C (the first C - scored prefilled)")
    p.add_argument("--scored", type=int, default=512, help="decode: tokens scored one at a time")
    p.add_argument("--chunked", type=int, default=64,
                   help="decode: also score the same tokens in chunks of this many (the short protocol's column; "
                        "0: off, about half the time)")
    p.add_argument("--model", default="smollm2", help="decode: 'smollm2' (cached by `python tests/models.py smollm2`), a local HF model directory or a .gguf file")
    p.add_argument("--gguf-file", default=None, help="decode: the GGUF file inside --model's directory")
    p.add_argument("--layouts", default="fast,planes", help="decode: comma-separated SpectralCache layouts")
    p.add_argument("--window", type=int, default=None,
                   help="decode: also the fast layout at --window-bits with this many recent tokens exact "
                        "(0: no such row; default evaluate.DECODE_WINDOW = 48)")
    p.add_argument("--window-bits", default="2.75",
                   help="decode: comma-separated bits/element of the recent-window rows (default 2.75)")
    p.add_argument("--bos", action=argparse.BooleanOptionalAction, default=None,
                   help="decode: prepend the BOS token (default: when the tokenizer does)")
    p.add_argument("--calibration-text", default="britannica")
    p.add_argument("--eval-text", default="hamlet")
    p.add_argument("--eval-tokens", type=int, default=1024)
    p.add_argument("--eval-offset", type=int, default=0)
    p.add_argument("--seconds", type=float, default=15, help="calibration time budget")
    p.add_argument("--calibration-tokens", type=int, default=8192, help="calibration token cap")
    p.add_argument("--profile", default=None, help="load this profile if it exists, else calibrate and save it")
    p.add_argument("--budgets", default=None, help="comma-separated bits/element, default 4.25,3.25,2.69 (decode: "
                                                   "\"\" for the FP16 and recent-window rows only)")
    p.add_argument("--only", default=None, help="comma-separated substrings of row group/name to keep")
    p.add_argument("--out", default=None, help="directory for eval.md and eval.json")
    p.add_argument("--sensitivity-tokens", type=int, default=512,
                   help="when calibrating: per-layer K/V sensitivity on this many tokens (0: off)")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("inspect", help="d_eff per layer/head, bits, and a PNG of the eigen-spectra")
    p.add_argument("profile")
    p.add_argument("--bits", type=float, nargs="*", default=[2.69],
                   help="show the codec's bit allocation at these budgets (bits/element; default 2.69 = 5.95x)")
    p.add_argument("--plot", default=None, help="PNG path (default: PROFILE.spectra.png)")
    p.set_defaults(func=cmd_inspect)

    p = sub.add_parser("explain", help="compile a model, run one prefill, print which attention/MoE sites are "
                                       "rewritten (and why the others are left alone)")
    p.add_argument("--model", default="smollm2", help="'smollm2' (cached once by `python tests/models.py smollm2`) or a local HF model directory")
    p.add_argument("--profile", default=None, help="a SpectralProfile file (default: TurboQuant mode)")
    p.add_argument("--bits", type=float, default=4.25, help="stored bits per element")
    p.add_argument("--no-quantize", action="store_true", help="rotation only")
    p.add_argument("--cache", choices=["static", "dynamic"], default="static")
    p.add_argument("--prompt", default="The quick brown fox")
    p.set_defaults(func=cmd_explain)

    p = sub.add_parser("bench", help="GPU benchmarks (decode attention, MoE, end to end); needs CUDA")
    p.add_argument("which", nargs="*", default=[], metavar="NAME",
                   help=f"benchmarks to run, any of {', '.join(BENCHMARKS)} (default: all)")
    p.add_argument("--out", default="bench-out", help="directory for the JSON files")
    p.set_defaults(func=cmd_bench)
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    """The `sqcompile` console script."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO if args.verbose else logging.WARNING,
                        format="%(levelname)s %(name)s: %(message)s")
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
