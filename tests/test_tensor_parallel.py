"""Tensor parallel on CPU with gloo (issue #20): the backend on tiny Llama, Qwen2 and Mixtral models sharded over
2 and 4 processes with `sqcompile.parallel.parallelize` (q/k/v colwise, o_proj rowwise, dense MLPs too).

Each model has 8 query heads and 4 kv-heads of head_dim 16, 2 layers, random nonzero biases. The parent process
computes the references on the unsharded model: eager logits for a 12-token prefill and 8 greedy steps (their
tokens are then fed to every run), and the same steps compiled with quantization. The ranks (spawned with
torch.multiprocessing, a FileStore rendezvous: no network) decode the same tokens sharded under
`backend="spectralquant"`, `lower="eager"`:

- rotation only (`quantize=False`): logits equal the unsharded eager model's within 1e-4 relative;
- quantized (simulated at the KV write): logits equal the unsharded compressed model's within float tolerance;
  (on 2 ranks every architecture in both modes, on 4 each architecture in one mode and each mode at least once:
  `RUNS`, to keep the test's CPU time down);
- every compiled graph reports each layer's attention (and Mixtral's MoE) rewritten, with the rank's heads;
- `SpectralCache` (Llama): each rank holds 1/N of the unsharded cache's packed bytes, and its logits equal
  the unsharded compiled model's with a `SpectralCache` (no outlier slots: `spectral_cache`);
- transformers' own sharding, `from_pretrained(..., tp_plan="auto")` (2 ranks, a 12-token prefill): rotation-only
  logits equal eager, every attention site rewritten with the rank's heads;
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

BASE = dict(vocab_size=128, hidden_size=128, intermediate_size=96, num_hidden_layers=2, num_attention_heads=8,
            num_key_value_heads=4, head_dim=16, max_position_embeddings=256, pad_token_id=0, bos_token_id=1,
            eos_token_id=2)
ARCHS = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(attention_bias=True)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict()),
    "mixtral": ("MixtralConfig", "MixtralForCausalLM", dict(num_local_experts=4, num_experts_per_tok=2)),
}
PROMPT, STEPS, CACHE_LEN, BITS = 12, 8, 32, 4.25
# quantized: no outlier slots (a rank picks its outliers by its own kv-heads' keys, the unsharded model by all of them)
MODES = {"rotation": {"quantize": False}, "quantized": {"bits": BITS, "outlier_tokens": 0}}
# (arch, mode) runs per world size: every one on 2 ranks; on 4 ranks each arch once and each mode at least once
# (dynamo's tracing is most of the time: each run is two graphs per rank)
RUNS = {2: [(arch, mode) for arch in ARCHS for mode in MODES],
        4: [("llama", "quantized"), ("qwen2", "rotation"), ("mixtral", "quantized")]}
TIMEOUT = 1200  # seconds per spawn of all ranks: a guard against a hang (a loaded 2-core machine took 600 for 2 ranks)


def build(arch: str, **overrides) -> torch.nn.Module:
    cfg_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(0)
    cfg = getattr(transformers, cfg_cls)(**{**BASE, **extra, **overrides})
    model = getattr(transformers, model_cls)(cfg).eval()
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, torch.nn.Linear) and m.bias is not None:
                m.bias.normal_(0, 0.2)
    return model


def profile(arch: str) -> sqcompile.SpectralProfile:
    return sqcompile.SpectralProfile.random(BASE["num_hidden_layers"], BASE["num_key_value_heads"], BASE["head_dim"],
                                            num_heads=BASE["num_attention_heads"], seed=5)


def prompt() -> torch.Tensor:
    return torch.randint(3, BASE["vocab_size"], (1, PROMPT), generator=torch.Generator().manual_seed(1))


def static_cache(model) -> transformers.StaticCache:
    return transformers.StaticCache(config=model.config, max_cache_len=CACHE_LEN)


def spectral_cache(model) -> sqcompile.SpectralCache:
    """No outlier slots: a rank picks its outliers by its own kv-heads' keys, the unsharded cache by all kv-heads'
    (sqcompile.parallel's doc), so only without them are the two caches' contents the same."""
    return sqcompile.SpectralCache(model, profile("llama"), bits=BITS, max_cache_len=CACHE_LEN, outlier_tokens=0)


def decode(fn, tokens: torch.Tensor, cache) -> torch.Tensor:
    """Logits [1, STEPS + 1, V] of the prompt's last position and of each next token in `tokens` [1, STEPS]
    (teacher forcing: every run sees the same inputs). A static cache: two graphs (prefill, decode) per run."""
    x, out = prompt(), []
    with torch.no_grad():
        for i in range(STEPS + 1):
            out.append(fn(input_ids=x, past_key_values=cache, use_cache=True).logits[:, -1].float())
            x = tokens[:, i:i + 1]
    return torch.cat(out)


def compiled_decode(model, tokens, options, cache=None):
    """(logits, sites of every graph compiled on the way: the machinery of sqcompile.explain)."""
    torch._dynamo.reset()
    fn = torch.compile(model.forward, backend="spectralquant", options=dict(options, lower="eager"))
    sink: list = []
    token = backend._REPORT_SINK.set(sink)
    try:
        logits = decode(fn, tokens, static_cache(model) if cache is None else cache)
    finally:
        backend._REPORT_SINK.reset(token)
    return logits, sink


def _rank_main(rank: int, world: int, store: str, out_dir: str, refs: dict) -> None:
    """One rank: shard each model, decode under the backend, save logits, reports and cache bytes."""
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
            tokens = refs[arch]["tokens"]
            for mode in [m for a, m in RUNS[world] if a == arch]:
                logits, sites = compiled_decode(model, tokens, dict(MODES[mode], profile=profile(arch)))
                result[f"{arch}/{mode}"] = logits
                result[f"{arch}/{mode}/report"] = str(Report(sites=sites))
                result[f"{arch}/{mode}/sites"] = [(s.graph, s.kind, s.layer, s.rewritten, s.q_heads, s.kv_heads,
                                                   s.reason) for s in sites]
            if arch == "llama":
                cache = spectral_cache(model)
                logits, _ = compiled_decode(model, tokens, {"profile": profile(arch), "bits": BITS}, cache)
                result["llama/spectral"] = logits
                result["llama/spectral/nbytes"] = cache.nbytes
                result["llama/spectral/kv_heads"] = cache.codec.config["kv_heads"]
        if world == 2:  # transformers' own tensor parallelism: from_pretrained(tp_plan="auto"), one prefill
            os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank))
            hf = transformers.AutoModelForCausalLM.from_pretrained(refs["hf_dir"], tp_plan="auto")
            torch._dynamo.reset()
            fn = torch.compile(hf.forward, backend="spectralquant",
                               options={"profile": profile("llama"), "quantize": False, "lower": "eager"})
            sink: list = []
            token = backend._REPORT_SINK.set(sink)
            with torch.no_grad():
                result["tp_plan"] = fn(input_ids=prompt()).logits[:, -1].float()
            backend._REPORT_SINK.reset(token)
            result["tp_plan/sites"] = [(s.layer, s.rewritten, s.q_heads, s.kv_heads) for s in sink]
        if world == 4:  # 2 kv-heads over 4 ranks: not whole heads per rank
            try:
                parallel.parallelize(build("llama", num_key_value_heads=2), mesh)
                result["indivisible"] = None
            except ValueError as e:
                result["indivisible"] = str(e)
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
    """Unsharded references, computed once: eager logits and greedy tokens, compiled quantized logits, and the
    compiled logits and packed bytes with a SpectralCache (Llama)."""
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
        refs[arch] = {"eager": torch.cat(eager), "tokens": tokens, "quantized": quantized}
        if arch == "llama":
            cache = spectral_cache(model)
            refs[arch]["spectral"], _ = compiled_decode(model, tokens, {"profile": profile(arch), "bits": BITS}, cache)
            refs[arch]["spectral_nbytes"] = cache.nbytes
    return refs


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.mark.parametrize("world", [2, 4])
def test_tensor_parallel(world, references, tmp_path):
    results = _spawn(world, tmp_path, references)
    hq, hkv = BASE["num_attention_heads"] // world, BASE["num_key_value_heads"] // world
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
            assert attn == [(layer, True, hq, hkv) for layer in range(BASE["num_hidden_layers"])], report
            if arch == "mixtral":
                moe = sorted((layer, ok) for gg, kind, layer, ok, *_ in sites if gg == g and kind == "moe")
                assert moe == [(layer, True) for layer in range(BASE["num_hidden_layers"])], report
    for r, res in enumerate(results):
        assert res["llama/spectral/kv_heads"] == (r * hkv, (r + 1) * hkv)
        assert res["llama/spectral/nbytes"] * world == references["llama"]["spectral_nbytes"]
        err = _rel(res["llama/spectral"], references["llama"]["spectral"])
        assert err < 1e-4, f"rank {r} of {world}: SpectralCache logits differ from unsharded by {err:.2e}"
        if world == 2:  # transformers' tp_plan="auto": rotation-only prefill equals eager, every site rewritten
            err = _rel(res["tp_plan"], references["llama"]["eager"][:1])
            assert err < 1e-4, f"rank {r}: tp_plan='auto' logits differ from eager by {err:.2e}"
            assert sorted(res["tp_plan/sites"]) == [(layer, True, hq, hkv) for layer in range(BASE["num_hidden_layers"])]
        if world == 4:
            assert res["indivisible"] is not None and "num_kv_heads=2 is not divisible by the world size 4" \
                in res["indivisible"]


def test_slice_codec_matches_whole():
    """A rank's codec is the whole codec's heads: its packed codes equal the whole codec's for those heads."""
    from sqcompile.parallel import slice_codec
    from sqcompile.quant import build_codec

    prof = profile("llama")
    whole = build_codec(prof, bits=BITS)
    part = slice_codec(whole, 2, 4)
    assert part.num_kv_heads == 2 and part.bits_per_element == whole.bits_per_element
    x = torch.randn(2, 4, 5, BASE["head_dim"])
    for layer in range(BASE["num_hidden_layers"]):
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
