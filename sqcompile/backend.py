"""The `spectralquant` torch.compile backend: options -> passes -> lowering.

The pipeline, in order (each step a function over the FX graph, testable alone):

0. localize_tensor_parallel       tensor-parallel (DTensor) linears as local ones (a sharded model only)
1. detect_attention, detect_moe   find the sites and prove them (or record why they are left alone)
   detect_sequence_mixers         hybrid models' state-space / linear-attention blocks: reported, left alone
2. insert_kv_rotation             k' = B_k (k - mu_k) at the KV write, q' = B_k q at the attention input
3. fold_value_rotation            B_v into v_proj, B_v^T into o_proj (weights rewritten once, on copies)
   insert_sink_value              attention sinks: the dropped sink column's value, -B_v mu_v (GPT-OSS)
   insert_output_rotation         no o_proj to absorb B_v^T (a gated output): o = o' B_v + mu_v after attention
4. insert_kv_quantization         quantize K and V at the write (when options["quantize"])
5. substitute_moe                 the fused MoE op for each proven MoE site (when options["moe"])
6. choose_kernels                 every sqcompile op gets its implementation from the compile's `KernelPlan`
7. lower                          Inductor (`compile_fx`), or the rewritten graph as is (`lower="eager"`)

The `KernelPlan` (`sqcompile.kernels.resolve_kernels`: options["kernels"], the device, what is importable, the
documented environment overrides) is made once per compiled graph, here, and reaches the ops only as arguments
(`choose_kernels`) and op targets (`substitute_moe`); `explain` reports it.
"""
from __future__ import annotations

import contextvars
import dataclasses
import logging
from typing import Any, Callable, Optional

import torch
import torch.fx as fx

from .kernels import KernelPlan, resolve_kernels
from .options import Options
from .passes.choose_kernels import choose_kernels
from .passes.detect_attention import detect_attention
from .passes.detect_moe import detect_moe
from .passes.detect_sequence_mixers import detect_sequence_mixers
from .passes.fold_value_rotation import fold_value_rotation
from .passes.insert_kv_quantization import insert_kv_quantization
from .passes.insert_kv_rotation import insert_kv_rotation
from .passes.insert_output_rotation import insert_output_rotation
from .passes.insert_sink_value import insert_sink_value
from .passes.localize_tensor_parallel import (has_dtensor_inputs, localize_tensor_parallel, moe_left_alone_reason,
                                              site_kv_heads)
from .passes.sites import Site
from .passes.substitute_moe import substitute_moe
from .passes.substitute_decode_attention import substitute_decode_attention, upgrade_spectral_sites
from .transform import KVTransform

log = logging.getLogger("sqcompile")

# where a compile records its sites and kernel plan (a `report.Report`), set by `recording_backend` (explain, optimize)
_REPORT_SINK: contextvars.ContextVar[Optional[Any]] = contextvars.ContextVar("sqcompile_report_sink", default=None)
_logged: set = set()
_transforms: dict = {}
_graph_counter = [0]


def _log_once(msg: str) -> None:
    if msg not in _logged:
        _logged.add(msg)
        log.info(msg)


def _transform_for(opts: Options) -> KVTransform:
    """One KVTransform per options object, so every graph of one compiled model shares its rotations."""
    key = (id(opts.profile), opts.profile if isinstance(opts.profile, str) else None, float(opts.bits),
           opts.quantize, opts.resolved_method, opts.seed, opts.layout)
    t = _transforms.get(key)
    if t is None or (opts.profile is not None and not isinstance(opts.profile, str) and t.options.profile is not opts.profile):
        t = _transforms[key] = KVTransform(opts)
    return t


def _device_type(example_inputs: list) -> str:
    for x in example_inputs:
        if isinstance(x, torch.Tensor):
            return x.device.type
    return "cpu"


_decisions: dict = {}


def _check_consistent(scope: Any, sites: list[Site]) -> None:
    """Every graph of one compiled model must treat a layer's attention the same way: a cache written rotated
    by one graph (prefill) and read unrotated by another (decode) would be silently wrong. A conflict is an error.

    `scope` is the options dict of one torch.compile call (dynamo hands the same object to every graph it
    compiles for that call); it is kept alive here so its id is never reused."""
    if scope is None:
        return
    _, decisions = _decisions.setdefault(id(scope), (scope, {}))
    for s in sites:
        if s.nodes.get("layer_from_order") or s.nodes.get("spectral"):
            continue
        seen = decisions.setdefault(s.layer, s.rewritten)
        if seen != s.rewritten:
            raise RuntimeError(
                f"sqcompile: attention at layer {s.layer} was {'rewritten' if seen else 'left alone'} in an earlier "
                f"graph but {'rewritten' if s.rewritten else 'left alone'} in graph {s.graph}"
                f"{' (' + s.reason + ')' if s.reason else ''}; the KV cache would be read in the wrong basis. "
                "Compile with options={'quantize': False} to inspect with sqcompile.explain, or report this model.")


def _reads_spectral_cache(gm: fx.GraphModule) -> bool:
    return any(n.op == "call_function" and str(n.target).startswith(("sqcompile.dequantize_packed", "sqcompile.dequantize_fast"))
               for n in gm.graph.nodes)


def spectral_cache_window(gm: fx.GraphModule) -> Optional[int]:
    """The recent window W of the `SpectralCache` `gm` reads (the ring's length in its `put_window` reads; 0 where
    it reads the cache without one), None where `gm` reads no SpectralCache or W is not a known int."""
    if not _reads_spectral_cache(gm):
        return None
    from .kernels import sink as _sink  # noqa: F401  (registers sqcompile::put_window)
    from .passes.fx_utils import meta_tensor

    put = (torch.ops.sqcompile.put_window, torch.ops.sqcompile.put_window.default)
    sizes = set()
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in put:
            ring = meta_tensor(n.args[1])
            sizes.add(ring.shape[2] if ring is not None and ring.dim() == 4 else None)
    if not sizes:
        return 0
    w = sizes.pop()
    return w if not sizes and isinstance(w, int) else None


def check_window_option(gm: fx.GraphModule, opts: Options) -> None:
    """options["recent_window"] W > 0 with a `SpectralCache` that holds another window is an error: the option asks
    for exact tokens the cache does not keep (its window is fixed when it is built). With the option at 0 the
    cache's own window is read as it is."""
    want = opts.recent_window
    if not want:
        return
    held = spectral_cache_window(gm)
    if held is not None and held != want:
        raise ValueError(f"sqcompile: options['recent_window'] = {want}, but the SpectralCache passed to the compiled "
                         f"model keeps {'no recent window' if held == 0 else f'a recent window of {held}'}; build it "
                         f"with SpectralCache(..., recent_window={want}), or compile without the option (a "
                         "SpectralCache carries its own window; the option sets the plain-cache simulation's and "
                         "sqcompile.optimize's)")


def kernel_plan(opts: Options, example_inputs: list) -> KernelPlan:
    """The implementation of every op this compile inserts (one decision per compiled graph, logged once)."""
    plan = resolve_kernels(opts.kernels, _device_type(example_inputs))
    _log_once(f"sqcompile: {plan}")
    return plan


def run_passes(gm: fx.GraphModule, example_inputs: list, opts: Options, scope: Any = None,
               plan: Optional[KernelPlan] = None) -> list[Site]:
    """Detect, prove and rewrite every site of `gm` in place; returns the sites (rewritten or not, with reasons).
    `plan`: the compile's kernel choices (default: resolved from opts and the inputs' device)."""
    graph_index = _graph_counter[0]
    _graph_counter[0] += 1
    plan = plan or kernel_plan(opts, example_inputs)
    tensor_parallel = has_dtensor_inputs(example_inputs)  # a sharded model (sqcompile.parallel)
    if tensor_parallel:
        localize_tensor_parallel(gm, example_inputs)
    check_window_option(gm, opts)
    sites = detect_attention(gm, graph_index)
    if any(s.reason is not None for s in sites) and _reads_spectral_cache(gm):
        upgrade_spectral_sites(gm, sites)
    moe_sites = detect_moe(gm, graph_index)
    mixer_sites = detect_sequence_mixers(gm, graph_index, sites)  # hybrid models' SSM / linear-attention blocks
    if tensor_parallel:  # each site's kv-heads of the profile, from its k/v/o_proj shards
        for site in sites:
            if site.reason is None and not site.nodes.get("spectral"):
                try:
                    site.nodes["tp_kv_heads"] = site_kv_heads(gm, site, example_inputs)  # (first, stop, total) | None
                except ValueError as e:
                    site.leave(str(e))
    transform = _transform_for(opts) if any(not s.nodes.get("spectral") for s in sites) else None
    if transform is not None and transform.profile is not None:
        check_profile(gm, sites, transform.profile)  # one error, before any rewrite, on a profile/model mismatch
    for site in sites:
        if site.reason is not None:
            continue
        if site.nodes.get("spectral"):  # the cache owns rotation and quantization: fold and substitute only
            substitute_decode_attention(gm, site, example_inputs)
            site.rewritten = True
            continue
        heads = site.nodes.get("tp_kv_heads")  # a tensor-parallel site: (first, stop, total) kv-heads of the profile
        rot = transform.layer(site.layer, site.kv_heads, site.head_dim, heads)  # raises on a profile/model mismatch
        insert_kv_rotation(gm, site, rot.key_basis, rot.key_mean)
        fold_value_rotation(gm, site, rot.value_basis, rot.value_mean, example_inputs)
        out = site.nodes["out"]
        if site.nodes.get("sink_slice") is not None:  # attention sinks: the sink column's value (see the pass)
            out = insert_sink_value(gm, site, rot.value_basis, rot.value_mean)
        if site.nodes.get("o_linear") is None:  # no o_proj to absorb the inverse (a gated output): undo it at the read
            insert_output_rotation(gm, site, out, rot.value_basis, rot.value_mean)
            site.output_rotation = f"at the read ({site.nodes['output_read']})"
        if opts.quantize:
            insert_kv_quantization(gm, site, transform.codec(site.kv_heads, site.head_dim) if heads is None
                                   else transform.sliced_codec(site.head_dim, heads), opts.outlier_tokens,
                                   opts.recent_window)
        site.rewritten = True
    if moe_sites and tensor_parallel:
        for s in moe_sites:
            why = s.reason is None and moe_left_alone_reason(gm, s, example_inputs)
            if why:
                s.leave(why)
    if moe_sites:
        if opts.moe:
            # Expert weights already in the kernel layout are shared read-only, not copied (no 2x memory).
            substitute_moe(gm, moe_sites, example_inputs, plan.moe, copy_weights=False)
        else:
            for s in moe_sites:
                if s.reason is None:
                    s.leave("MoE substitution is off (options['moe'] = False)")
    all_sites = sites + moe_sites + mixer_sites
    choose_kernels(gm, sites, plan)
    _check_consistent(scope, sites)
    if any(s.rewritten and not s.nodes.get("spectral") for s in sites):
        check_recompile_headroom(gm)
    _inline_fast_cache_ops(gm)
    for s in all_sites:
        if s.reason is not None:
            _log_once(f"sqcompile: left {s.kind} site at layer {s.layer} (graph {s.graph}) alone: {s.reason}")
    gm.graph.lint()
    gm.recompile()
    return all_sites


def decoder_depth(gm: fx.GraphModule, sites: list[Site]) -> Optional[int]:
    """The number of decoder layers when `gm` provably holds the whole stack, else None.

    Proof: the attention sites' layers (read from the weights' module paths) are exactly 0..n-1, a parameter
    outside every layer (the token embedding) is read before the first site's attention and another (the final
    norm or the LM head) after the last one's output. A graph cut by a graph break inside the stack lacks one of
    the two ends; a graph of one layer called alone has neither.
    """
    from .passes.detect_moe import _LAYER_RE

    named = [s for s in sites if s.kind == "attention" and not s.nodes.get("layer_from_order")
             and isinstance(s.nodes.get("attn"), fx.Node) and isinstance(s.nodes.get("out"), fx.Node)]
    layers = sorted({s.layer for s in named})
    if not layers or layers != list(range(len(layers))):
        return None
    order = {n: i for i, n in enumerate(gm.graph.nodes)}
    first = min(order[s.nodes["attn"]] for s in named)
    last = max(order[s.nodes["out"]] for s in named)
    outside = [n for n in gm.graph.nodes if n.op in ("placeholder", "get_attr") and "parameters" in n.name
               and not _LAYER_RE.search(n.name)]
    uses = [order[u] for n in outside for u in n.users]
    if any(i < first for i in uses) and any(i > last for i in uses):
        return len(layers)
    return None


def check_profile(gm: fx.GraphModule, sites: list[Site], profile: Any) -> None:
    """A profile that does not fit the model is one ValueError, raised when the first graph compiles (the first
    call), with `SpectralCache`'s wording for the layer count.

    A site past the profile's last layer is always caught; a profile with MORE layers than the model is caught
    where the graph provably holds the whole decoder stack (`decoder_depth`), which is the case for a model
    compiled without graph breaks. Head counts and sizes are checked per site (`KVTransform.check_site`).
    """
    profile_layers = int(profile.key_mean.shape[0])
    depth = decoder_depth(gm, sites)
    if depth is not None and depth != profile_layers:
        profile.check_matches({"num_layers": depth})  # raises with SpectralCache's message
        raise ValueError(f"SpectralProfile does not match the model: num_layers: profile has {profile_layers}, "
                         f"model has {depth}")
    rewritable = [s for s in sites if s.kind == "attention" and s.reason is None and not s.nodes.get("spectral")]
    beyond = [s.layer for s in rewritable if s.layer >= profile_layers]
    if beyond:
        raise ValueError(f"SpectralProfile does not match the model: num_layers: profile has {profile_layers}, "
                         f"model has at least {max(beyond) + 1} (an attention site at layer {max(beyond)})")
    _, p_heads, p_dim = (int(v) for v in profile.key_mean.shape)
    for s in rewritable:
        kv_heads = (s.nodes.get("tp_kv_heads") or (0, s.kv_heads, s.kv_heads))[2]  # a sharded site: the model's count
        problems = [f"{name}: profile has {p}, model has {m}"
                    for name, p, m in (("num_kv_heads", p_heads, kv_heads), ("head_dim", p_dim, s.head_dim)) if p != m]
        if problems:
            raise ValueError("SpectralProfile does not match the model: " + "; ".join(problems) +
                             f" (attention at layer {s.layer})")


def check_recompile_headroom(gm: fx.GraphModule) -> None:
    """Raise when this is the last compile dynamo allows the frame and the graph writes a rotated KV cache.

    Past `torch._dynamo.config.recompile_limit` dynamo runs the frame eagerly: the model's own attention would then
    read keys this backend stored rotated with unrotated queries, and values unrotated through an `o_proj` that
    was not folded, a silently wrong answer. Dynamo offers no hook at that fallback, so the frame's last allowed
    compile is refused instead, with the cause and the fix.
    """
    import torch._dynamo.config as dynamo_config
    from torch._guards import CompileContext

    limit = getattr(dynamo_config, "recompile_limit", None) or getattr(dynamo_config, "cache_size_limit", None)
    compile_id = CompileContext.current_compile_id()
    index = getattr(compile_id, "frame_compile_id", None)
    if not isinstance(limit, int) or index is None or index + 1 < limit:
        return
    raise RuntimeError(
        f"sqcompile: this frame is being compiled for the {index + 1}th time, dynamo's recompile_limit ({limit}). "
        "At the next recompile dynamo would run the frame eagerly, and the model's attention would read the KV cache "
        "this backend wrote rotated with unrotated queries (a silently wrong answer), so sqcompile stops here. "
        "Fix: raise torch._dynamo.config.recompile_limit, or remove the recompiles (TORCH_LOGS=recompiles shows "
        "them; a StaticCache or torch.compile(..., dynamic=True) avoids the usual ones), or use sqcompile.optimize, "
        "whose SpectralCache reads correctly in eager too.")


def _inline_fast_cache_ops(gm: fx.GraphModule) -> None:
    """Calls of the fast cache's write/read ops -> calls of their plain-torch implementations, so AOTAutograd
    traces through them and Inductor fuses the rotation, quantization and packing. (Their layout arguments
    are strings, which must not reach Inductor's generated code; the passes above needed the op calls
    only to find the cache's write and read.)"""
    from .kernels import fast_cache

    ops = torch.ops.sqcompile
    impl = {ops.quantize_write_fast: fast_cache.quantize_write_fast,
            ops.quantize_write_fast.default: fast_cache.quantize_write_fast,
            ops.dequantize_fast: fast_cache.dequantize_fast, ops.dequantize_fast.default: fast_cache.dequantize_fast}
    for n in gm.graph.nodes:
        if n.op == "call_function" and n.target in impl:
            n.target = impl[n.target]


def spectralquant(gm: fx.GraphModule, example_inputs: list, options: Any = None, **kwargs: Any) -> Callable:
    """torch.compile backend: `torch.compile(model, backend="spectralquant", options={...})`."""
    opts = Options.from_dict(options)
    mode = kwargs.get("mode")
    if mode == "reduce-overhead":  # torch.compile passes mode only when no options are given
        opts = dataclasses.replace(opts, cudagraphs=True)
    elif mode not in (None, "default"):
        _log_once(f"sqcompile: mode={mode!r} is ignored by the spectralquant backend (only 'reduce-overhead', "
                  f"= options={{'cudagraphs': True}}, has a meaning here)")
    plan = kernel_plan(opts, example_inputs)
    sites = run_passes(gm, example_inputs, opts, scope=options if isinstance(options, dict) else None, plan=plan)
    report = _REPORT_SINK.get()
    if isinstance(report, list):  # a caller collecting the sites only
        report.extend(sites)
    elif report is not None:
        report.add(sites, plan)
    if opts.lower == "eager":
        return gm.forward
    if plan.path == "tensorrt":
        # torch_tensorrt's dynamo backend; sqcompile's custom ops have no TensorRT converter yet and run as
        # PyTorch fallback segments. Never run on hardware (no SM100 GPU here): see README.
        from torch._dynamo.backends.registry import lookup_backend

        return lookup_backend("torch_tensorrt")(gm, example_inputs)
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, example_inputs, config_patches={"triton.cudagraphs": True} if opts.cudagraphs else None)


def recording_backend(report: Any):
    """A fresh backend callable (so dynamo compiles again) that records each compile's sites and kernel plan in
    `report` (a `report.Report`): what `explain` and `optimize(...).report` show."""

    def spectralquant_recording(gm, example_inputs, **kwargs):
        token = _REPORT_SINK.set(report)
        try:
            return spectralquant(gm, example_inputs, **kwargs)
        finally:
            _REPORT_SINK.reset(token)

    return spectralquant_recording
