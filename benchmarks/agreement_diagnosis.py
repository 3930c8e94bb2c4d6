"""Where the teacher-forced agreement of tests/test_smollm2_e2e.py is lost (CPU, the real SmolLM2-135M).

The eager `SpectralCache` at --bits, with parts of what attention reads replaced by the exact K/V: nothing
("base"), all keys, all values, the key (or key and value) of each prompt's first token (the attention sink),
the prompt's own K/V while it is prefilled (decode steps still read the compressed prompt), or both; and a
simulated format change, "two key means": each key is coded relative to the calibrated mean or to a second,
calibrated "sink" mean (the mean first-token key of 8 calibration windows), whichever is nearer, with the
same bytes (the choice would fit in the sign bit of the fp16 token scale). Prints the
top-1 agreement with the FP32 greedy continuation over the positions generate() asked the model for
(`sqcompile.evaluate.generated_positions`) and the mean KL(FP32 || quantized) of the next-token distribution
there. The profile is calibrated as in the test (8192 britannica tokens), optionally with the per-layer
sensitivity pass. First it prints the measure's noise floor: the same model in bf16 and fp16 with an exact cache.

The "first-token" rows keep each row's first REAL token exact (found from the attention mask, which a cache
never sees when it writes). The "position-0" rows are the rule a cache can implement: cache position 0 of
every row is kept exact, which under left padding is a pad token for all but the longest prompts; "newest
token" keeps the K/V a decode step writes exact for that step only (attention reads the fresh K/V, later steps
the compressed one). `--unpadded` also runs every prompt alone (batch 1, no padding; position 0 is then the
first token) against the same FP32 continuation of the padded batch, over the same positions; the KL there is
against the unpadded FP32 run. It first checks the unpadded FP32 greedy continuations against the padded ones.
Every run passes RoPE positions counted from each row's first real token, as generate() does
(`sqcompile.evaluate.teacher_forced_logits`; without them a padded row's keys would be rotated `pad` positions later
than in generate()).

    python benchmarks/agreement_diagnosis.py --bits 4.25 3.25      # ~2 min on 2 cores
    python benchmarks/agreement_diagnosis.py --sensitivity-tokens 512   # + ~1.5 min
    python benchmarks/agreement_diagnosis.py --unpadded   # + the batch-1 rows
"""
from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import torch
from transformers import DynamicCache

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import sqcompile  # noqa: E402
from sqcompile.cache import SpectralCache, SpectralLayer  # noqa: E402
from sqcompile.evaluate import agreement, generated_positions, left_padded, teacher_forced_logits  # noqa: E402
from sqcompile.hf import load_smollm2, load_text  # noqa: E402

# mode -> what attention reads exactly: all_k / all_v (every key / value), first_k / first_v (each row's first
# real token), pos0 (cache position 0 of every row, K and V), prefill (the prompt's K/V while it is prefilled),
# newest (a decode step's own K/V in that step), two (the simulated two-key-means format)
FEATURES = {
    "base": set(),
    "keys exact": {"all_k"},
    "values exact": {"all_v"},
    "first-token key exact": {"first_k"},
    "first-token key and value exact": {"first_k", "first_v"},
    "prefill K/V exact": {"prefill"},
    "prefill K/V and first-token K/V exact": {"prefill", "first_k", "first_v"},
    "two key means (simulated)": {"two"},
    "newest token K/V exact": {"newest"},
    "position-0 K/V exact": {"pos0"},
    "position-0 K/V + newest token K/V exact": {"pos0", "newest"},
    "position-0 K/V + prefill K/V exact": {"pos0", "prefill"},
    "position-0 K/V + prefill K/V + newest token K/V exact": {"pos0", "prefill", "newest"},
    # SpectralCache's own options, no simulated part: the sink and the new tokens exact (outlier_tokens=0; the row's
    # name is kept as a selector), each alone, the defaults (4 outlier slots), and other outlier counts
    "SpectralCache defaults (exact sink + exact new tokens)": {"cache:sink+new"},
    "SpectralCache exact sink only": {"cache:sink"},
    "SpectralCache exact new tokens only": {"cache:new"},
    "SpectralCache defaults (exact sink + new tokens + 4 outlier tokens)": {"cache:defaults"},
    **{f"SpectralCache outlier_tokens={n}": {f"cache:out{n}"} for n in (1, 2, 3, 5, 7)},
}
CACHE_OPTIONS = {"cache:defaults": {}, "cache:sink+new": dict(outlier_tokens=0),
                 "cache:sink": dict(exact_new=False, outlier_tokens=0), "cache:new": dict(keep_sink=False, outlier_tokens=0),
                 **{f"cache:out{n}": dict(outlier_tokens=n) for n in (1, 2, 3, 5, 7)}}
MODES = tuple(FEATURES)
# every row starts from the codes alone: SpectralCache's own exact sink and exact new tokens (its defaults) off, so
# the rows measure what each exact part is worth ("prefill K/V and first-token K/V exact" plus "newest" is what the
# defaults do; unpadded, "position-0 K/V + prefill K/V + newest token K/V exact")
CODES_ONLY = dict(keep_sink=False, exact_new=False, outlier_tokens=0)


def cache_options(m: str) -> dict:
    """SpectralCache keyword arguments of a row: its own options for the "SpectralCache ..." rows, else codes only."""
    own = [CACHE_OPTIONS[f] for f in FEATURES[m] if f in CACHE_OPTIONS]
    return own[0] if own else CODES_ONLY
# unpadded, the first real token is position 0: the first-token rows would repeat the position-0 rows
UNPADDED_MODES = ("base", "prefill K/V exact", "newest token K/V exact", "position-0 K/V exact",
                  "position-0 K/V + newest token K/V exact", "position-0 K/V + prefill K/V exact",
                  "position-0 K/V + prefill K/V + newest token K/V exact")


def mean_kl(ref_lp, lp, valid):
    return (((ref_lp.exp() * (ref_lp - lp)).sum(-1) * valid).sum() / valid.sum()).item()


def main():
    from test_smollm2_e2e import NEW_TOKENS, PROMPTS

    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=float, nargs="+", default=[4.25])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sensitivity-tokens", type=int, default=0,
                    help="calibrate with the per-layer K/V sensitivity pass on this many tokens (0: as the test)")
    ap.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES, metavar="MODE",
                    help="rows of the padded batch (default: all)")
    ap.add_argument("--unpadded", action="store_true",
                    help="also run each prompt alone (batch 1, no padding) in --unpadded-modes")
    ap.add_argument("--unpadded-modes", nargs="+", default=list(UNPADDED_MODES), choices=MODES, metavar="MODE")
    ap.add_argument("--no-noise-floor", action="store_true", help="skip the bf16/fp16 rows")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    calib = tok(load_text("britannica")[:120_000], return_tensors="pt")["input_ids"][0]
    profile = sqcompile.calibrate(model, calib, seconds=600, max_tokens=8192, tokenizer=tok, progress=False,
                                  sensitivity_tokens=args.sensitivity_tokens)
    ids, mask = left_padded(tok, PROMPTS)
    first = [int(mask[b].nonzero()[0]) for b in range(mask.shape[0])]
    eos, pad = tok.eos_token_id, tok.eos_token_id or 0
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False, pad_token_id=pad)
        cont = ref[:, ids.shape[1]:]
        ref_lp = teacher_forced_logits(model, ids, mask, cont, DynamicCache()).log_softmax(-1)
    valid = generated_positions(cont, eos)
    # each prompt alone: (ids [1, n], mask [1, n]) without padding; the same continuation, row by row
    alone = [(ids[b:b + 1, f:], mask[b:b + 1, f:]) for b, f in enumerate(first)]
    if args.unpadded:
        with torch.no_grad():
            alone_lp = torch.cat([teacher_forced_logits(model, i, m, cont[b:b + 1], DynamicCache())
                                  for b, (i, m) in enumerate(alone)]).log_softmax(-1)
            for b, (i, m) in enumerate(alone):  # generate() stops at EOS in batch 1: compare the picked positions
                own = model.generate(i, attention_mask=m, max_new_tokens=NEW_TOKENS, do_sample=False,
                                     pad_token_id=pad)[0, i.shape[1]:]
                n = int(valid[b].sum())
                same = own.shape[0] >= n and torch.equal(own[:n], cont[b, :n])
                print(f"prompt {b} ({first[b]} pad tokens): unpadded FP32 greedy continuation "
                      f"{'equals' if same else 'DIFFERS FROM'} the padded one over its {n} generated positions"
                      + ("" if same else f"\n  padded:   {tok.decode(cont[b, :n])!r}\n  unpadded: {tok.decode(own)!r}"))
        print(f"FP32 unpadded (batch 1) teacher-forced vs the padded greedy continuation: "
              f"{agreement(alone_lp.argmax(-1), cont, eos):.1%}, KL(padded || unpadded) {mean_kl(ref_lp, alone_lp, valid):.6f}")
    firsts = []  # first-token keys [L, Hkv, d] of 8 calibration windows of 16 tokens
    with torch.no_grad():
        for i in range(0, 8 * 256, 256):
            c = DynamicCache()
            model(input_ids=calib[None, i:i + 16], past_key_values=c, use_cache=True)
            firsts.append(torch.stack([lay.keys[0, :, 0] for lay in c.layers]))
    sink_mean = torch.stack(firsts).float().mean(0)
    mode = {"m": "base", "codec": None, "first": first}
    update = SpectralLayer.update

    def patched(self, k, v, *a, **kw):  # the dequantized cache, with the chosen parts exact
        kh, vh = update(self, k, v, *a, **kw)
        n, end = k.shape[-2], int(self.cumulative_length)
        if end == n:
            self._exact_k, self._exact_v = torch.zeros_like(kh), torch.zeros_like(vh)
        self._exact_k[:, :, end - n:end], self._exact_v[:, :, end - n:end] = k.to(kh.dtype), v.to(vh.dtype)
        f = FEATURES[mode["m"]]
        if "all_k" in f:
            kh = self._exact_k
        if "all_v" in f:
            vh = self._exact_v
        if f & {"first_k", "first_v", "pos0", "prefill", "newest"}:
            kh, vh = kh.clone(), vh.clone()
            if "prefill" in f and n > 1:  # the prompt attends to its own fresh K/V
                kh[:, :, end - n:end], vh[:, :, end - n:end] = self._exact_k[:, :, end - n:end], self._exact_v[:, :, end - n:end]
            if "newest" in f and n == 1:  # a decode step attends to its own fresh K/V
                kh[:, :, end - 1], vh[:, :, end - 1] = self._exact_k[:, :, end - 1], self._exact_v[:, :, end - 1]
            if "pos0" in f:  # what a cache can do without the mask: position 0 of every row
                kh[:, :, 0], vh[:, :, 0] = self._exact_k[:, :, 0], self._exact_v[:, :, 0]
            for b, p in enumerate(mode["first"]):  # each row's first real token (needs the mask)
                if "first_k" in f:
                    kh[b, :, p] = self._exact_k[b, :, p]
                if "first_v" in f:
                    vh[b, :, p] = self._exact_v[b, :, p]
        if "two" in f:
            if end == n:
                self._two = kh.clone()
            kf, mu, sm = k.float(), self.k_mean[None, :, None, :], sink_mean[self.layer_idx][None, :, None, :]
            near_sink = ((kf - sm).norm(dim=-1) < (kf - mu).norm(dim=-1))[..., None]
            x = torch.matmul(kf - sm, self.k_basis.transpose(-1, -2))
            k_sink = torch.matmul(mode["codec"].fake_quant("key", self.layer_idx, x), self.k_basis) + sm
            self._two[:, :, end - n:end] = torch.where(near_sink, k_sink.to(kh.dtype), kh[:, :, end - n:end])
            kh = self._two
        return kh, vh

    SpectralLayer.update = patched
    if not args.no_noise_floor:
        with torch.no_grad():  # the noise floor of the measure: the same model in half precision, no KV compression
            for dt in (torch.bfloat16, torch.float16):
                half = copy.deepcopy(model).to(dt)  # a copy: casting the model back would round its weights
                lp = teacher_forced_logits(half, ids, mask, cont, DynamicCache()).float().log_softmax(-1)
                print(f"model in {dt}, FP cache: agreement {agreement(lp.argmax(-1), cont, eos):.1%}, "
                      f"KL {mean_kl(ref_lp, lp, valid):.4f}")
                if args.unpadded:
                    lp = torch.cat([teacher_forced_logits(half, i, m, cont[b:b + 1], DynamicCache())
                                    for b, (i, m) in enumerate(alone)]).float().log_softmax(-1)
                    print(f"model in {dt}, FP cache, unpadded: agreement {agreement(lp.argmax(-1), cont, eos):.1%}, "
                          f"KL {mean_kl(alone_lp, lp, valid):.4f}")
                del half
    print(f"FP32 teacher-forced vs its own greedy continuation: {agreement(ref_lp.argmax(-1), cont, eos):.1%}"
          f" over {int(valid.sum())} of {valid.numel()} positions")
    print("| bits | row | agreement | KL |\n|---|---|---|---|")
    runs = [("", m) for m in args.modes] + ([("unpadded: ", m) for m in args.unpadded_modes] if args.unpadded else [])
    for bits in args.bits:
        for label, m in runs:
            mode["m"] = m
            with torch.no_grad():
                if not label.startswith("unpadded"):  # the padded batch of the test
                    mode["first"] = first
                    cache = SpectralCache(model, profile=profile, bits=bits, max_cache_len=ids.shape[1] + NEW_TOKENS + 1,
                                         **cache_options(m))
                    mode["codec"] = cache.codec
                    lp, rlp = teacher_forced_logits(model, ids, mask, cont, cache).log_softmax(-1), ref_lp
                else:  # each prompt alone, its first token at position 0
                    mode["first"], out = [0], []
                    for b, (i, msk) in enumerate(alone):
                        cache = SpectralCache(model, profile=profile, bits=bits, max_cache_len=i.shape[1] + NEW_TOKENS + 1,
                                              **cache_options(m))
                        mode["codec"] = cache.codec
                        out.append(teacher_forced_logits(model, i, msk, cont[b:b + 1], cache))
                    lp, rlp = torch.cat(out).log_softmax(-1), alone_lp
            print(f"| {bits} | {label}{m} | {agreement(lp.argmax(-1), cont, eos):.1%} | {mean_kl(rlp, lp, valid):.4f} |",
                  flush=True)
    SpectralLayer.update = update


if __name__ == "__main__":
    main()
