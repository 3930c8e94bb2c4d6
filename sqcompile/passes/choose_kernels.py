"""Hand every sqcompile op in the graph its implementation from the compile's `KernelPlan` (each op's `impl` argument).

The ops the backend puts in a graph, or finds there from a `SpectralCache`'s update, take an `impl` argument
("torch" | "triton" | "cuda"; "auto" only where nothing chose, e.g. an eager cache; not `kernel`, which
torch 2.11's Inductor fallback takes as its own first argument). This pass sets it on each of
them from the one plan `sqcompile.kernels.resolve_kernels` made for this compile, so two compiles with different
options in one process never read each other's choice. The fused MoE ops are chosen by their target instead
(`substitute_moe`). A decode site on the "cuda" plan whose layout the CUDA kernel does not support is handed the
Triton kernel, and its `kernel` column in `explain` says why (an error where the decode override asked for cuda).
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.fx as fx

from ..kernels import DECODE_ENV, KernelPlan
from .fx_utils import concrete_int, meta_tensor
from .sites import Site

# op name -> the implementation it takes on the "cuda" plan; ops without a CUDA kernel read "cuda" as "triton"
_DECODE_OPS = {"decode_attention": "triton", "decode_attention_fast": "cuda", "decode_attention_fast_write": "cuda",
               "exact_split": "triton"}
_WRITE_OPS = ("quantize_write", "quantize_write_fast", "store_exact")


def _op_name(node: fx.Node) -> Optional[str]:
    if node.op != "call_function":
        return None
    name = str(node.target)  # "sqcompile.quantize_write.default" or "sqcompile.quantize_write"
    return name.split(".")[1] if name.startswith("sqcompile.") else None


def _cuda_decode_reason(site: Site, node: fx.Node) -> Optional[str]:
    """None when the CUDA decode kernel supports this site's fast layout and shapes, else why not."""
    from ..kernels import decode_attention_cuda as cuda_kernel
    from ..quant.fast_layout import FastLayout

    if not hasattr(torch.cuda, "_compile_kernel"):
        return "this torch has no torch.cuda._compile_kernel (NVRTC)"
    packed = meta_tensor(node.args[1])
    capacity = concrete_int(packed.shape[2]) if packed is not None else None
    if capacity is None or not site.kv_heads:
        return "the cache capacity is not known when compiling"
    d, (k_groups, v_groups) = site.head_dim, node.args[7:9]
    kl = FastLayout.from_flat(d, list(k_groups), [1.0] * (len(k_groups) // 4))
    vl = FastLayout.from_flat(d, list(v_groups), [1.0] * (len(v_groups) // 4))
    return cuda_kernel.supports(kl, vl, d, site.q_heads // site.kv_heads, capacity)


def choose_kernels(gm: fx.GraphModule, sites: list[Site], plan: KernelPlan) -> None:
    """Set `impl` (and the fused decode op's `write_impl`) on every sqcompile op of gm from `plan`; the decode
    sites' `kernel` column gets the implementation chosen."""
    decode_site = {s.nodes["decode_op"]: s for s in sites if isinstance(s.nodes.get("decode_op"), fx.Node)}
    for node in gm.graph.nodes:
        name = _op_name(node)
        if name in _DECODE_OPS:
            impl = plan.decode if (plan.decode != "cuda" or _DECODE_OPS[name] == "cuda") else "triton"
            site, why = decode_site.get(node), None
            if impl == "cuda" and site is not None:
                why = _cuda_decode_reason(site, node)
                if why is not None and plan.strict_cuda:
                    raise ValueError(f"{DECODE_ENV}=cuda but the CUDA decode kernel cannot run at layer {site.layer}: "
                                     f"{why}")
                impl = "triton" if why is not None else impl
            extra = {"write_impl": plan.write} if name == "decode_attention_fast_write" else {}
            node.kwargs = {**node.kwargs, "impl": impl, **extra}
            if site is not None:
                site.kernel = f"{site.kernel} ({impl}{'; CUDA kernel: ' + why if why else ''})"
        elif name in _WRITE_OPS:
            node.kwargs = {**node.kwargs, "impl": plan.write}
