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

    python benchmarks/agreement_diagnosis.py --bits 4.25 3.25      # ~2 min on 2 cores
    python benchmarks/agreement_diagnosis.py --sensitivity-tokens 512   # + ~1.5 min
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

MODES = ("base", "keys exact", "values exact", "first-token key exact", "first-token key and value exact",
         "prefill K/V exact", "prefill K/V and first-token K/V exact", "two key means (simulated)")


def main():
    from test_smollm2_e2e import NEW_TOKENS, PROMPTS

    ap = argparse.ArgumentParser()
    ap.add_argument("--bits", type=float, nargs="+", default=[4.25])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--sensitivity-tokens", type=int, default=0,
                    help="calibrate with the per-layer K/V sensitivity pass on this many tokens (0: as the test)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model, tok = load_smollm2()
    calib = tok(load_text("britannica", prefer_shared=True)[:120_000], return_tensors="pt")["input_ids"][0]
    profile = sqcompile.calibrate(model, calib, seconds=600, max_tokens=8192, tokenizer=tok, progress=False,
                                  sensitivity_tokens=args.sensitivity_tokens)
    ids, mask = left_padded(tok, PROMPTS)
    first = [int(mask[b].nonzero()[0]) for b in range(mask.shape[0])]
    with torch.no_grad():
        ref = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS, do_sample=False,
                             pad_token_id=tok.eos_token_id or 0)
        cont = ref[:, ids.shape[1]:]
        ref_lp = teacher_forced_logits(model, ids, mask, cont, DynamicCache()).log_softmax(-1)
    valid = generated_positions(cont, tok.eos_token_id)
    firsts = []  # first-token keys [L, Hkv, d] of 8 calibration windows of 16 tokens
    with torch.no_grad():
        for i in range(0, 8 * 256, 256):
            c = DynamicCache()
            model(input_ids=calib[None, i:i + 16], past_key_values=c, use_cache=True)
            firsts.append(torch.stack([lay.keys[0, :, 0] for lay in c.layers]))
    sink_mean = torch.stack(firsts).float().mean(0)
    mode = {"m": "base", "codec": None}
    update = SpectralLayer.update

    def patched(self, k, v, *a, **kw):  # the dequantized cache, with the chosen parts exact
        kh, vh = update(self, k, v, *a, **kw)
        n, end = k.shape[-2], int(self.cumulative_length)
        if end == n:
            self._exact_k, self._exact_v = torch.zeros_like(kh), torch.zeros_like(vh)
        self._exact_k[:, :, end - n:end], self._exact_v[:, :, end - n:end] = k.to(kh.dtype), v.to(vh.dtype)
        if mode["m"] == "keys exact":
            kh = self._exact_k
        elif mode["m"] == "values exact":
            vh = self._exact_v
        elif mode["m"].startswith("first-token key") or mode["m"].startswith("prefill"):
            kh, vh = kh.clone(), vh.clone()
            if mode["m"].startswith("prefill") and n > 1:  # the prompt attends to its own fresh K/V
                kh[:, :, end - n:end], vh[:, :, end - n:end] = self._exact_k[:, :, end - n:end], self._exact_v[:, :, end - n:end]
            if "first-token" in mode["m"]:
                for b, f in enumerate(first):
                    kh[b, :, f] = self._exact_k[b, :, f]
                    if "value" in mode["m"] or "K/V" in mode["m"]:
                        vh[b, :, f] = self._exact_v[b, :, f]
        elif mode["m"] == "two key means (simulated)":
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
    with torch.no_grad():  # the noise floor of the measure: the same model in half precision, no KV compression
        for dt in (torch.bfloat16, torch.float16):
            half = copy.deepcopy(model).to(dt)  # a copy: casting the model back would round its weights
            lp = teacher_forced_logits(half, ids, mask, cont, DynamicCache()).float().log_softmax(-1)
            del half
            kl = ((ref_lp.exp() * (ref_lp - lp)).sum(-1) * valid).sum() / valid.sum()
            print(f"model in {dt}, FP cache: agreement {agreement(lp.argmax(-1), cont, tok.eos_token_id):.1%}, "
                  f"KL {kl.item():.4f}")
    print(f"FP32 teacher-forced vs its own greedy continuation: {agreement(ref_lp.argmax(-1), cont, tok.eos_token_id):.1%}"
          f" over {int(valid.sum())} of {valid.numel()} positions")
    print("| bits | row | agreement | KL |\n|---|---|---|---|")
    cap = ids.shape[1] + NEW_TOKENS + 1
    for bits in args.bits:
        for m in MODES:
            mode["m"] = m
            cache = SpectralCache(model, profile=profile, bits=bits, max_cache_len=cap)
            mode["codec"] = cache.codec
            with torch.no_grad():
                lp = teacher_forced_logits(model, ids, mask, cont, cache).log_softmax(-1)
            kl = ((ref_lp.exp() * (ref_lp - lp)).sum(-1) * valid).sum() / valid.sum()
            print(f"| {bits} | {m} | {agreement(lp.argmax(-1), cont, tok.eos_token_id):.1%} | {kl.item():.4f} |",
                  flush=True)
    SpectralLayer.update = update


if __name__ == "__main__":
    main()
