"""Tensor parallel on CPU with gloo (issue #20): the backend, `SpectralCache`, `sqcompile.optimize` and
`sqcompile.calibrate` on tiny Llama, Qwen2 and Mixtral models sharded over 2 and 4 processes with
`sqcompile.parallel.parallelize` (q/k/v colwise, o_proj rowwise, dense MLPs too).

Each model has 8 query heads and 4 kv-heads of head_dim 16 and random nonzero biases; Llama has 2 layers (a site's
profile slice is its layer's), Qwen2 and Mixtral 1 (what they add is their attention and MoE blocks: `LAYERS`). The
parent computes the references on the unsharded model once: eager logits for a 12-token prefill and 8 greedy steps
(their tokens are then fed to every run), the same steps compiled with quantization, an optimized model's greedy
generation and calibrated profiles. One spawn per world size (torch.multiprocessing, a FileStore rendezvous: no
network) runs all of that world's checks sharded, under `backend="spectralquant"`, `lower="eager"`:

- rotation only (`quantize=False`): logits equal the unsharded eager model's within 1e-4 relative;
- quantized (simulated at the KV write, no outlier slots): logits equal the unsharded compressed model's within
  float tolerance; each world runs every architecture once and both modes (`RUNS`: together every architecture in
  both modes; dynamo's tracing is nearly all the test's CPU time, two graphs per run and rank);
- every compiled graph reports each layer's attention (and Mixtral's MoE) rewritten, with the rank's heads;
- `sqcompile.optimize(...).generate` (Llama, its `SpectralCache` without outlier slots): the same greedy tokens as
  the unsharded optimized model, logits within 1e-4 (2 ranks); each rank's `SpectralCache` holds 1/N of the
  unsharded cache's packed bytes (2 and 4 ranks);
- `sqcompile.calibrate` (every architecture, a fixed token budget): every rank's profile is the unsharded model's;
  different text on the ranks and `sensitivity_tokens` are refused with a clear error; a rank out of time stops all;
- transformers' own sharding, `from_pretrained(..., tp_plan="auto")` (2 ranks, a 12-token prefill): rotation-only
  logits equal eager, every attention site rewritten with the rank's heads; its calibrated profile is the unsharded model's;
- 4 ranks and a model with 2 kv-heads: `parallelize` raises a clear error.
"""
from __future__ import annotations

import os
import time
import traceback

import pytest
import torch
import transformers

import sqcompile
from sqcompile import backend
from sqcompile.report import Report

pytestmark = pytest.mark.skipif(not torch.distributed.is_available(), reason="torch built without distributed")

BASE = dict(vocab_size=128, hidden_size=128, intermediate_size=96, num_attention_heads=8,
            num_key_value_heads=4, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict()),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}
LAYERS = {"llama": 2, "qwen2": 1, "mixtral": 1}
PROMPT, STEPS, CACHE_LEN, BITS = 12, 8, 32, 4.25
# quantized: no outlier slots (a rank picks its outliers by its own kv-heads' keys, the unsharded model by all of them)
MODES = {"rotation": {"quantize": False}, "quantized": {"bits": BITS, "outlier_tokens": 0}}
# (arch, mode) runs per world size: each world every arch once and both modes; the two worlds together every pair
RUNS = {2: [("llama", "rotation"), ("qwen2", "quantized"), ("mixtral", "rotation")],
        4: [("llama", "quantized"), ("qwen2", "rotation"), ("mixtral", "quantized")]}
GENERATE_WORLDS = (2,)  # optimize(...).generate sharded (its two graphs cost the most); the cache bytes: every world
# calibration: 2 windows of 48 tokens, cut at 80 by the token budget (never by time: `seconds` is far away)
CALIB = dict(max_tokens=80, chunk=48, seconds=1e9, progress=False)
TIMEOUT = 1200  # seconds per spawn of all ranks: a guard against a hang (a loaded 2-core machine took 600 for 2 ranks)


def build(arch: str, **overrides) -> torch.nn.Module:
    cfg_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**BASE, "num_hidden_layers": LAYERS[arch], **extra, **overrides})
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.2)
    return model


def profile(arch: str) -> sqcompile.SpectralProfile:
    return sqcompile.SpectralProfile.random(LAYERS[arch], BASE["num_key_value_heads"], BASE["head_dim"],
                                            num_heads=BASE["num_attention_heads"], seed=5)


def prompt() -> torch.Tensor:
    return torch.randint(3, BASE["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))


def calibration_ids() -> torch.Tensor:
    return torch.randint(3, BASE["vocab_size"], (2, 48), generator=torch.Generator().manual_seed(7))


def static_cache(model) -> transformers.StaticCache:
    return transformers.StaticCache(config=model.config, max_cache_len=CACHE_LEN)


def optimized(model):
    """`sqcompile.optimize` with a SpectralCache without outlier slots: a rank picks its outliers by its own kv-heads'
    keys, the unsharded cache by all kv-heads' (sqcompile.parallel's doc), so only without them are the codes equal."""
    torch._dynamo.reset()
    return sqcompile.optimize(model, profile("llama"), bits=BITS, max_cache_len=CACHE_LEN, outlier_tokens=0,
                              lower="eager")


def generate(opt) -> dict:
    """Greedy generation of STEPS tokens: {"tokens", "logits" [STEPS, V]}, and a fresh cache's packed bytes."""
    out = opt.generate(prompt(), max_new_tokens=STEPS, do_sample=False, output_logits=True,
                       return_dict_in_generate=True)
    return {"tokens": out.sequences, "logits": torch.cat([l.float() for l in out.logits])}


def cache_nbytes(opt) -> tuple[int, object]:
    """(packed bytes, kv-heads) of the cache `opt.generate` builds, allocated for one row."""
    cache = opt.cache().allocate(1, torch.device("cpu"), torch.float32)
    return cache.nbytes, cache.codec.config.get("kv_heads")


def decode(fn, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Logits [1, STEPS + 1, V] of the prompt's last position and of each next token in `tokens` [1, STEPS]
    (teacher forcing: every run sees the same inputs). A static cache: two graphs (prefill, decode) per run."""
    x, out = prompt(), []
    with torch.no_grad():
        for i in range(STEPS + 1):
            out.append(fn(input_ids=x, past_key_values=cache, use_cache=True).logits[:, -1].float())
            x = tokens[:, i:i + 1]
    return torch.cat(out)


def compiled_decode(model, tokens, options):
    """(logits, sites of every graph compiled on the way: the machinery of sqcompile.explain)."""
    torch._dynamo.reset()
    report = Report()
    fn = torch.compile(model.forward, backend=backend.recording_backend(report), options=dict(options, lower="eager"))
    return decode(fn, tokens, static_cache(model)), report.sites


def _error(fn) -> str | None:
    try:
        fn()
    except ValueError as e:
        return str(e)
    return None


def _rank_main(rank: int, world: int, store: str, out_dir: str, refs: dict) -> None:
    """One rank: every check of this world on sharded models; saves logits, reports, profiles and cache bytes."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    from sqcompile import parallel

    torch.set_num_threads(1)
    result: dict = {}
    try:
        dist.init_process_group("gloo", store=dist.FileStore(store, world), rank=rank, world_size=world)
        mesh = init_device_mesh("cpu", (world,))
        for arch in ARCHS:
            model = parallel.parallelize(build(arch), mesh)
            result[f"{arch}/calibrate"] = sqcompile.calibrate(model, calibration_ids(), **CALIB)
            tokens = refs[arch]["tokens"]
            for mode in [m for a, m in RUNS[world] if a == arch]:
                logits, sites = compiled_decode(model, tokens, dict(MODES[mode], profile=profile(arch)))
                result[f"{arch}/{mode}"] = logits
                result[f"{arch}/{mode}/report"] = str(Report(sites=sites))
                result[f"{arch}/{mode}/sites"] = [(s.graph, s.kind, s.layer, s.rewritten, s.q_heads, s.kv_heads,
                                                   s.reason) for s in sites]
            if arch == "llama":
                ids = calibration_ids()
                result["calibrate/sensitivity"] = _error(
                    lambda: sqcompile.calibrate(model, ids, sensitivity_tokens=16, **CALIB))
                result["calibrate/other_text"] = _error(
                    lambda: sqcompile.calibrate(model, ids + (rank == 1), **CALIB))
                # rank 1 out of time after its first window: every rank stops there (else rank 0 would wait alone)
                result["calibrate/time"] = sqcompile.calibrate(model, ids, **dict(CALIB, seconds=0 if rank else 1e9))
                opt = optimized(model)
                result["generate/nbytes"] = cache_nbytes(opt)
                if world in GENERATE_WORLDS:
                    result["generate"] = generate(opt)
        if world == 2:  # transformers' own tensor parallelism: from_pretrained(tp_plan="auto"), one prefill
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
            hf = transformers.AutoModelForCausalLM.from_pretrained(refs["hf_dir"], tp_plan="auto")
            torch._dynamo.reset()
            report = Report()
            fn = torch.compile(hf.forward, backend=backend.recording_backend(report),
                               options={"profile": profile("llama"), "quantize": False, "lower": "eager"})
            with torch.no_grad():
                result["tp_plan"] = fn(input_ids=prompt()).logits[:, -1].float()
            result["tp_plan/sites"] = [(s.layer, s.rewritten, s.q_heads, s.kv_heads) for s in report.sites]
            result["tp_plan/calibrate"] = sqcompile.calibrate(hf, calibration_ids(), **CALIB)
        if world == 4:  # 2 kv-heads over 4 ranks: not whole heads per rank
            result["indivisible"] = _error(lambda: parallel.parallelize(build("llama", num_key_value_heads=2), mesh))
        dist.barrier()
        dist.destroy_process_group()
    except Exception:
        result["error"] = traceback.format_exc()
    torch.save(result, os.path.join(out_dir, f"rank{rank}.pt"))


def _spawn(world: int, tmp_path, refs: dict) -> list[dict]:
    import torch.multiprocessing as mp

    # fork: the ranks inherit the imported modules (a spawned rank spends seconds importing torch and transformers);
    # the parent never initializes torch.distributed
    ctx = mp.start_processes(_rank_main, args=(world, str(tmp_path / "store"), str(tmp_path), refs), nprocs=world,
                             join=False, start_method="fork")
    deadline = time.time() + TIMEOUT
    try:
        while not ctx.join(timeout=max(1.0, deadline - time.time())):
            if time.time() > deadline:
                raise TimeoutError(f"tensor-parallel ranks did not finish within {TIMEOUT} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(world)]
    for r, res in enumerate(results):
        assert "error" not in res, f"rank {r} failed:\n{res['error']}"
    return results


@pytest.fixture(scope="module")
def references(tmp_path_factory) -> dict:
    """Unsharded references, computed once: eager logits and greedy tokens, compiled quantized logits, calibrated
    profiles, and (Llama) the optimized model's greedy generation and its cache's packed bytes."""
    torch.set_num_threads(1)
    refs: dict = {"hf_dir": str(tmp_path_factory.mktemp("llama"))}
    build("llama").save_pretrained(refs["hf_dir"])
    for arch in ARCHS:
        model = build(arch)
        with torch.no_grad():
            x, tokens, eager = prompt(), [], []
            cache = static_cache(model)
            for _ in range(STEPS + 1):
                logits = model(input_ids=x, past_key_values=cache, use_cache=True).logits[:, -1].float()
                eager.append(logits)
                x = logits.argmax(-1, keepdim=True)
                tokens.append(x)
        tokens = torch.cat(tokens[:STEPS], 1)
        quantized, _ = compiled_decode(model, tokens, {"profile": profile(arch), **MODES["quantized"]})
        refs[arch] = {"eager": torch.cat(eager), "tokens": tokens, "quantized": quantized,
                      "calibrate": sqcompile.calibrate(model, calibration_ids(), **CALIB)}
        if arch == "llama":
            opt = optimized(model)
            refs["generate/nbytes"] = cache_nbytes(opt)
            refs["generate"] = generate(opt)
    return refs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def _check_profile(got: sqcompile.SpectralProfile, want: sqcompile.SpectralProfile, what: str) -> None:
    """The same profile within float rounding. An eigenvector's sign is eigh's arbitrary choice, which float
    rounding can flip (seen with tp_plan="auto"), so eigenvectors are compared with their signs aligned; their error
    is the rounding over the eigenvalue gap, well inside 1e-3."""
    assert got.fingerprint == want.fingerprint and got.tokens == want.tokens == CALIB["max_tokens"], what
    for kind in ("key", "value"):
        for part, tol in (("mean", 1e-5), ("eigvals", 1e-5), ("eigvecs", 1e-3)):
            a, b = getattr(got, f"{kind}_{part}"), getattr(want, f"{kind}_{part}")
            assert a.shape == b.shape, (what, kind, part, a.shape, b.shape)
            if part == "eigvecs":  # rows are the eigenvectors
                a = a * torch.where((a * b).sum(-1, keepdim=True) < 0, -1.0, 1.0)
            err = _rel(a, b)
            assert err < tol, f"{what}: {kind}_{part} differs from the unsharded profile's by {err:.2e}"


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel(world, references, tmp_path):
    results = _spawn(world, tmp_path, references)
    hq, hkv = BASE["num_attention_heads"] // world, BASE["num_key_value_heads"] // world
    assert sorted(a for a, _ in RUNS[world]) == sorted(ARCHS) and {m for _, m in RUNS[world]} == set(MODES)
    for arch, mode in RUNS[world]:
        ref = references[arch]["eager" if mode == "rotation" else "quantized"]
        for r, res in enumerate(results):
            err = _rel(res[f"{arch}/{mode}"], ref)
            assert err < 1e-4, f"{arch}, {mode}, rank {r} of {world}: logits differ from unsharded by {err:.2e}"
        # rank 0's report: every graph has each layer's attention rewritten with this rank's heads (and MoE)
        sites, report = results[0][f"{arch}/{mode}/sites"], results[0][f"{arch}/{mode}/report"]
        graphs = sorted({g for g, *_ in sites})
        assert len(graphs) >= 2, report
        for g in graphs:
            attn = sorted((layer, ok, q, kv) for gg, kind, layer, ok, q, kv, _ in sites if gg == g and kind == "attention")
            assert attn == [(layer, True, hq, hkv) for layer in range(LAYERS[arch])], report
            if arch == "mixtral":
                moe = sorted((layer, ok) for gg, kind, layer, ok, *_ in sites if gg == g and kind == "moe")
                assert moe == [(layer, True) for layer in range(LAYERS[arch])], report
    for r, res in enumerate(results):
        for arch in ARCHS:  # every rank holds the whole profile: the unsharded model's
            _check_profile(res[f"{arch}/calibrate"], references[arch]["calibrate"], f"{arch}, rank {r} of {world}")
            assert res[f"{arch}/calibrate"].meta["tensor_parallel"] == world
        assert "sensitivity_tokens > 0 is not supported" in (res["calibrate/sensitivity"] or "")
        assert "different calibration text" in (res["calibrate/other_text"] or "")
        timed = res["calibrate/time"]
        assert (timed.tokens, timed.meta["stopped_by"]) == (CALIB["chunk"], "time budget"), timed.meta
        nbytes, heads = res["generate/nbytes"]
        assert heads == (r * hkv, (r + 1) * hkv)
        assert nbytes * world == references["generate/nbytes"][0]
        if world in GENERATE_WORLDS:  # the sharded optimized model generates the unsharded one's tokens
            assert torch.equal(res["generate"]["tokens"], references["generate"]["tokens"]), (r, res["generate"])
            err = _rel(res["generate"]["logits"], references["generate"]["logits"])
            assert err < 1e-4, f"rank {r} of {world}: optimize(...).generate logits differ from unsharded by {err:.2e}"
        if world == 2:  # transformers' tp_plan="auto": rotation-only prefill equals eager, every site rewritten
            err = _rel(res["tp_plan"], references["llama"]["eager"][:1])
            assert err < 1e-4, f"rank {r}: tp_plan='auto' logits differ from eager by {err:.2e}"
            assert sorted(res["tp_plan/sites"]) == [(layer, True, hq, hkv) for layer in range(LAYERS["llama"])]
            _check_profile(res["tp_plan/calibrate"], references["llama"]["calibrate"], f"tp_plan='auto', rank {r}")
        if world == 4:
            assert "num_kv_heads=2 is not divisible by the world size 4" in (res["indivisible"] or "")
    for res in results[1:]:  # the ranks' profiles are the same tensors
        for arch in ARCHS:
            a, b = res[f"{arch}/calibrate"], results[0][f"{arch}/calibrate"]
            assert all(torch.equal(getattr(a, n), getattr(b, n)) for n in ("key_eigvecs", "value_eigvecs", "key_mean"))


def test_slice_codec_matches_whole():
    """A rank's codec is the whole codec's heads: its packed codes equal the whole codec's for those heads."""
    from sqcompile.parallel import slice_codec
    from sqcompile.quant import build_codec

    prof = profile("llama")
    whole = build_codec(prof, bits=BITS)
    part = slice_codec(whole, 2, 4)
    assert part.num_kv_heads == 2 and part.bits_per_element == whole.bits_per_element
    x = torch.randn(2, 4, 5, BASE["head_dim"])
    for layer in range(LAYERS["llama"]):
        for kind in ("key", "value"):
            s_whole = whole.to_storage(kind, layer, x)
            s_part = part.to_storage(kind, layer, x[:, 2:])
            assert torch.equal(s_part, s_whole[:, 2:])
            assert torch.equal(part.pack(kind, layer, s_part), whole.pack(kind, layer, s_whole)[:, 2:])
    with pytest.raises(ValueError, match="outside the codec's 4 kv-heads"):
        slice_codec(whole, 3, 5)


def test_check_divisible_message():
    from sqcompile.parallel import check_divisible

    check_divisible(build("llama").config, 4)
    with pytest.raises(ValueError, match="num_kv_heads=4 is not divisible by the world size 3"):
        check_divisible(build("llama").config, 3)


def test_sharded_weights_read_and_sharded_experts_left_alone():
    """In one process on a fake 2-rank group: `weight_shard` reads rank 0's rows of a colwise weight, and an MoE
    site whose expert weights are DTensors is left alone with the reason (plain weights are not)."""
    import torch.distributed as dist
    import torch.fx as fx
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Shard, distribute_tensor
    from torch.testing._internal.distributed.fake_pg import FakeStore

    from sqcompile.passes.localize_tensor_parallel import moe_left_alone_reason, weight_shard
    from sqcompile.passes.sites import Site

    dist.init_process_group("fake", store=FakeStore(), rank=0, world_size=2)
    try:
        mesh = init_device_mesh("cpu", (2,))
        w = distribute_tensor(torch.randn(64, 32), mesh, [Shard(0)])
        experts = distribute_tensor(torch.randn(4, 16, 32), mesh, [Shard(0)])
        graph = fx.Graph()
        w_node, e_node, plain_node = graph.placeholder("w"), graph.placeholder("e"), graph.placeholder("p")
        local = graph.call_method("to_local", (w_node,))
        graph.output((local, e_node, plain_node))
        gm = fx.GraphModule(torch.nn.Module(), graph)
        inputs = [w, experts, torch.randn(4, 16, 32)]
        assert weight_shard(gm, local, inputs) == (0, 0, 32, 64)
        assert weight_shard(gm, plain_node, inputs) is None
        site = Site(layer=0, kind="moe")
        site.nodes["w_gate_up"] = e_node
        assert "DTensors (sharded experts)" in moe_left_alone_reason(gm, site, inputs)
        site.nodes["w_gate_up"] = plain_node
        assert moe_left_alone_reason(gm, site, inputs) is None
    finally:
        dist.destroy_process_group()
