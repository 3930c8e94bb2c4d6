"""Replace each proven MoE site by one fused MoE op.

Proof, per site (anything unproven is left alone with `site.leave(reason)`; never a wrong rewrite):

1. The routed block ends at `final`: the last [T, H] node after the topk such that the region
   R = ancestors(final) - ancestors(router_logits) - {placeholders, get_attr}
   is closed (no node of R but `final` is used outside R), holds only ops an expert dispatch uses
   (no attention, no linear on a weight other than the experts', nothing random), mutates nothing
   outside itself, and reads from outside only the hidden states x [T, H], the router logits and the
   two expert weights. So R computes final = f(x, router_logits, w_gate_up, w_down) and nothing else.
2. f equals the fused op: R is run on the real expert weights with random x and router logits
   (balanced, and skewed to one expert) and compared with `fused_moe`'s torch reference.

The rewrite stores copies of the expert weights (contiguous, the kernel's layout) as new buffers on
`gm` (or shares them: `copy_weights=False`); the user's module is never mutated. Qwen2-MoE's shared
expert is outside R and stays as it is.

A site left alone because of its router (bias-corrected or group-limited selection, a routed scaling factor,
sigmoid after top-k...) then gets `substitute_experts`: the region traced inside the block's `experts` module
(HF 5.x's fused `*Experts`, called with the top-k ids and weights the model's router computed) is proven the same
way against `experts_reference` and replaced by `fused_experts`; the router stays as the model wrote it. Dynamic token counts are supported (sizes computed outside the
block take their hints in step 2).
"""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch.fx.node import map_arg

from ..kernels import fused_moe as fused_moe_kernels
from .detect_moe import (block_nodes, example_value, expert_differences, module_stack, moe_block_of, op_name,
                         router_differences, same_size, shape_of, size_hint, weight_source)
from .fx_utils import register_constant
from .sites import Site

# Ops an expert dispatch is made of (HF loop, grouped_mm and batched_mm forms, and plain variants).
_ALLOWED = {
    "float", "to", "type", "contiguous", "view", "reshape", "flatten", "unsqueeze", "squeeze", "expand",
    "transpose", "t", "permute", "getitem", "setitem", "chunk", "split", "unbind", "sort", "argsort",
    "floordiv", "histc", "bincount", "cumsum", "grouped_mm_fallback", "_grouped_mm", "grouped_mm",
    "bmm", "matmul", "mm", "silu", "mul", "mul_", "imul", "add", "add_", "iadd", "sum", "truediv",
    "itruediv", "div", "div_", "empty_like", "zeros_like", "new_zeros", "zeros", "empty", "arange",
    "repeat_interleave", "index_add_", "index_add", "index_select", "one_hot", "where", "nonzero",
    "eq", "ne", "gt", "greater", "any", "masked_fill", "scatter_add", "scatter_add_", "index_put_",
    "index_put", "linear", "clone", "size", "softmax", "_softmax", "sigmoid", "topk", "sym_size",
    "sym_numel", "floor_divide", "type_as",
}
_INPLACE = {"setitem", "mul_", "imul", "add_", "iadd", "itruediv", "div_", "index_add_",
            "scatter_add_", "index_put_"}
_MAX_REGION = 400


class _TooLarge(Exception):
    pass


def _ancestors(node: fx.Node, stop: set[fx.Node], limit: Optional[int] = None) -> set[fx.Node]:
    out: set[fx.Node] = set()
    todo = [node]
    while todo:
        n = todo.pop()
        if n in out or n in stop:
            continue
        out.add(n)
        if limit is not None and len(out) > limit:
            raise _TooLarge
        if not _is_size(n):  # sizes are shared, pure and read as inputs: not walked through
            todo.extend(n.all_input_nodes)
    return out


def _is_size(n: fx.Node) -> bool:
    """A node computing a size (int / SymInt), e.g. `2 * s0` for a dynamic token count."""
    return isinstance(n.meta.get("example_value", n.meta.get("val")), (int, torch.SymInt, torch.SymBool))


def _block_nodes(final: fx.Node, excluded: set[fx.Node]) -> set[fx.Node]:
    """Ancestors of `final`, plus the in-place ops (and their inputs) that mutate any of them.

    An in-place write such as `inv_perm[perm] = arange(S)` feeds `final` without being its
    ancestor in the FX graph, so it is added here.
    """
    region = _ancestors(final, excluded, 2 * _MAX_REGION)
    grew = True
    while grew:
        grew = False
        for n in list(region):
            for u in n.users:
                if u not in region and op_name(u) in _INPLACE and u.args and u.args[0] is n:
                    region |= _ancestors(u, excluded, 2 * _MAX_REGION)
                    grew = True
    return region


def _check_region(region: set[fx.Node], final: fx.Node, weights: set[fx.Node]) -> Optional[str]:
    """None when `region` is a closed expert dispatch; otherwise why not."""
    for n in region:
        name = op_name(n)
        if n.op not in ("call_function", "call_method") or name not in _ALLOWED:
            return f"unexpected op {name} ({n.name})"
        if name == "linear" and weight_source(n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")) not in weights:
            return f"linear on a non-expert weight ({n.name})"
        if n is not final and any(u not in region for u in n.users):
            return f"{n.name} is used outside the MoE block"
        if name in _INPLACE and n.args and isinstance(n.args[0], fx.Node) and \
                _alias_root(n.args[0], region) not in region:
            return f"{n.name} mutates a tensor from outside the MoE block"
    return None


_VIEWS = {"view", "reshape", "transpose", "t", "permute", "getitem", "unsqueeze", "squeeze", "expand",
          "flatten", "chunk", "split", "unbind", "contiguous", "to", "float", "type"}


def _alias_root(n: fx.Node, region: set[fx.Node]) -> fx.Node:
    """The tensor `n` may alias, following view-like ops (which can return their input's storage)."""
    while n in region and op_name(n) in _VIEWS and n.args and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def _find_block(gm: fx.GraphModule, site: Site):
    """(final, region, x) for the largest proven region ending at a [T, H] node, or (None, reason)."""
    n = site.nodes
    router_logits, topk = n["router_logits"], n["topk"]
    weights = {n["w_gate_up"], n["w_down"]}
    tokens, hidden = n["tokens"], site.hidden
    excluded = _ancestors(router_logits, set())
    best = None
    why = None
    seen_topk = False
    for node in gm.graph.nodes:
        if node is topk:
            seen_topk = True
            continue
        if not seen_topk or node.op not in ("call_function", "call_method"):
            continue
        if not _is_tokens_by_hidden(node, tokens, hidden):
            continue
        try:
            region = _block_nodes(node, excluded)
        except _TooLarge:
            break  # far past the MoE block
        if topk not in region or not weights <= region:
            continue
        region = {r for r in region if r.op not in ("placeholder", "get_attr") and not _is_size(r)}
        if len(region) > _MAX_REGION:
            break
        reason = _check_region(region, node, weights)
        if reason is None:
            inputs = {i for r in region for i in r.all_input_nodes if i not in region}
            # sizes computed outside (dynamic token counts) are fine: the fused op does not need them
            sizes = {i for i in inputs if _is_size(i)}
            others = inputs - weights - {router_logits} - sizes
            if len(others) != 1:
                reason = f"the block reads {sorted(o.name for o in others)} besides the router and experts"
            elif not _is_tokens_by_hidden(next(iter(others)), tokens, hidden):
                reason = f"hidden states {next(iter(others)).name} are not [T, H]"
            elif any(size_hint(s.meta.get("example_value", s.meta.get("val"))) is None for s in sizes):
                reason = "a size the block reads has no concrete value"
            else:
                best = (node, region, others.pop(), sizes)
                continue
        if best is not None:
            break  # the region grew past the MoE block
        why = why or reason
    if best is None:
        return None, why or "no [T, H] output after the experts"
    return best, None


def _is_tokens_by_hidden(node: fx.Node, tokens: Any, hidden: int) -> bool:
    shape = shape_of(node)
    return shape is not None and len(shape) == 2 and same_size(shape[0], tokens) and same_size(shape[1], hidden)


def _real_value(gm: fx.GraphModule, node: fx.Node, example_inputs: Sequence[Any]) -> Optional[torch.Tensor]:
    if node.op == "get_attr":
        obj = gm
        for part in str(node.target).split("."):
            obj = getattr(obj, part)
        return obj if isinstance(obj, torch.Tensor) else None
    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    i = placeholders.index(node)
    value = example_inputs[i] if i < len(example_inputs) else None
    return value if isinstance(value, torch.Tensor) else None


def _run_region(region: set[fx.Node], final: fx.Node, env: dict) -> torch.Tensor:
    """Evaluate the region's nodes, in graph order, on the tensors in env."""
    for node in final.graph.nodes:
        if node not in region:
            continue
        args = map_arg(node.args, lambda a: env[a])
        kwargs = map_arg(node.kwargs, lambda a: env[a])
        if node.op == "call_method":
            env[node] = getattr(args[0], node.target)(*args[1:], **kwargs)
        else:
            env[node] = node.target(*args, **kwargs)
        if node is final:
            return env[node]
    raise RuntimeError("final node not reached")


def _prove_numerically(region, final, x, router_logits, w_nodes, w_graph, w_values, sizes, site) -> Optional[str]:
    """Run the region (on the graph's weights `w_graph`) and the fused op's reference (on `w_values`, the
    kernel-layout weights it will be given) on random inputs; None when they agree.

    Symbolic sizes take their hints, and x gets the hinted token count, so they stay consistent.
    """
    xv = example_value(x)
    w_gate_up, w_down = w_values
    gen = torch.Generator(device="cpu").manual_seed(0)
    tokens, hidden = size_hint(xv.shape[0]), int(xv.shape[1])
    experts = site.experts
    tol = {torch.float32: 1e-4, torch.float64: 1e-9}.get(w_gate_up.dtype, 3e-2)
    for skew in (0.0, 8.0):
        x_test = torch.randn(tokens, hidden, generator=gen).to(device=w_gate_up.device, dtype=xv.dtype)
        logits = torch.randn(tokens, experts, generator=gen)
        logits[:, 0] += skew  # all tokens to expert 0 (the others get none)
        logits = logits.to(device=w_gate_up.device, dtype=example_value(router_logits).dtype)
        env = {x: x_test, router_logits: logits, w_nodes[0]: w_graph[0], w_nodes[1]: w_graph[1]}
        why = _compare(region, final, env, sizes, lambda: fused_moe_kernels.fused_moe_reference(
            x_test, logits, w_gate_up, w_down, site.top_k, site.nodes["renormalize"], site.routing), tol,
            "the block", "does not compute the fused MoE")
        if why is not None:
            return why
    return None


def _compare(region: set, final: fx.Node, env: dict, sizes, reference, tol: float, subject: str,
             claim: str) -> Optional[str]:
    """Run the region on `env` (its symbolic sizes at their hints) and `reference()`: None when the outputs agree
    within tol (relative to the region's max), else why not."""
    env.update({s: size_hint(s.meta.get("example_value", s.meta.get("val"))) for s in sizes})
    try:
        with torch.no_grad():
            expected = _run_region(region, final, env)
            got = reference()
    except Exception as e:  # noqa: BLE001 - any failure means "not proven"
        return f"could not run {subject} to check it ({type(e).__name__}: {e})"
    if not isinstance(expected, torch.Tensor) or expected.shape != got.shape:
        return f"the output of {subject} is not [T, H]"
    err = (expected.float() - got.float()).abs().max().item()
    scale = expected.float().abs().max().item() + 1e-6
    return None if err <= tol * scale else f"{subject} {claim} (max error {err:.3g} of {scale:.3g})"


def _kernel_for(kernels: str, device: torch.device) -> tuple[str, Any]:
    """The Triton op on CUDA, else the torch reference op.

    kernels="triton" also takes the Triton op on CPU under TRITON_INTERPRET=1 (tests); "tensorrt" has no
    MoE lowering of its own, so its MoE sites take the Triton kernel.
    """
    triton_ok = fused_moe_kernels.HAS_TRITON and fused_moe_kernels.fused_moe_triton is not None
    wanted = kernels in ("triton", "auto", "tensorrt")
    runs_here = device.type == "cuda" or (kernels == "triton" and fused_moe_kernels._interpreting())
    if wanted and triton_ok and runs_here:
        return "triton", torch.ops.sqcompile.fused_moe_triton.default
    return "torch", torch.ops.sqcompile.fused_moe.default


def _unique_attr(gm: fx.GraphModule, base: str) -> str:
    name, i = base, 0
    while hasattr(gm, name):
        i += 1
        name = f"{base}_{i}"
    return name


def _not_proven(gm: fx.GraphModule, site: Site, reason: str) -> str:
    """The reason a detected site is left, with what its block does that the fused op does not (when seen)."""
    nodes = block_nodes(gm, moe_block_of(site.nodes["topk"]))
    found = [d for d in router_differences(nodes) if "no top-k" not in d and "softmax over the k chosen" not in d]
    found += expert_differences(nodes, site.experts) if nodes else []
    return f"not proven: {reason}" + (f" ({'; '.join(found)})" if found else "")


def _kernel_layout(originals: list[torch.Tensor], transposed: bool, copy_weights: bool) -> list[torch.Tensor]:
    """The expert weights in the kernel's [E, 2I, H] / [E, H, I] layout; the user's parameters are never touched.

    Transposed experts ([E, H, 2I] / [E, I, H]) are always copied; others are shared when already contiguous and
    copy_weights is False."""
    if transposed:
        return [w.detach().transpose(1, 2).contiguous() for w in originals]
    return [w.detach() if not copy_weights and w.is_contiguous() else
            w.detach().clone(memory_format=torch.contiguous_format) for w in originals]


def _replace_block(gm: fx.GraphModule, tag: str, w_values: list[torch.Tensor], final: fx.Node, region: set,
                   x: fx.Node, call) -> fx.Node:
    """Register the kernel-layout weights on gm, put `call(w1, w2)` = (op, args) in place of `final` (cast to its
    dtype), and erase the region's now-unused nodes. Returns the op's node."""
    names = []
    for suffix, value in zip(("w_gate_up", "w_down"), w_values):
        name = _unique_attr(gm, f"{tag}_{suffix}")
        register_constant(gm, name, value)
        names.append(name)
    graph = gm.graph
    final_value, x_value = example_value(final), example_value(x)
    with graph.inserting_before(final):
        op, args = call(graph.get_attr(names[0]), graph.get_attr(names[1]))
        fused = graph.call_function(op, args)
        fused.meta["example_value"] = x_value.new_empty(x_value.shape) if final_value.dtype != x_value.dtype \
            else final_value
        out = fused
        if final_value.dtype != x_value.dtype:
            out = graph.call_method("to", (fused, final_value.dtype))
            out.meta["example_value"] = final_value
    final.replace_all_uses_with(out)
    for node in reversed(list(graph.nodes)):
        if node in region and not node.users:
            graph.erase_node(node)
    return fused


def substitute_moe(gm: fx.GraphModule, sites: list[Site], example_inputs: Sequence[Any],
                   kernels: str = "auto", copy_weights: bool = True) -> None:
    """Rewrite every proven MoE site of `gm` into one `sqcompile::fused_moe*` call (in place).

    copy_weights=False shares the user's expert weights instead of copying them when they are already
    contiguous (HF's layout is the kernel's): nothing writes to them either way, and a large model
    (Mixtral-8x7B: 87 GB of experts) does not need twice the memory.
    """
    changed = False
    for site in sites:
        if site.kind != "moe" or site.reason is not None or site.rewritten:
            continue
        if "w_gate_up" not in site.nodes:
            site.leave("expert weights not found in this graph")
            continue
        if site.nodes.get("tokens") is None or site.hidden is None:
            site.leave("token count or hidden size unknown")
            continue
        block, reason = _find_block(gm, site)
        if block is None:
            site.leave(_not_proven(gm, site, reason))
            continue
        final, region, x, sizes = block
        w_nodes = (site.nodes["w_gate_up"], site.nodes["w_down"])
        originals = [_real_value(gm, w, example_inputs) for w in w_nodes]
        if any(w is None or w.device.type == "meta" or isinstance(w, torch._subclasses.FakeTensor)
               for w in originals):
            site.leave("expert weights have no real values")
            continue
        w_values = _kernel_layout(originals, bool(site.nodes.get("transposed")), copy_weights)
        reason = _prove_numerically(region, final, x, site.nodes["router_logits"], w_nodes,
                                    [w.detach() for w in originals], w_values, sizes, site)
        if reason is not None:
            site.leave(_not_proven(gm, site, reason))
            continue
        kernel_name, op = _kernel_for(kernels, w_values[0].device)
        fused = _replace_block(gm, f"sq_moe_g{site.graph}_l{site.layer}", w_values, final, region, x,
                               lambda w1, w2: (op, (x, site.nodes["router_logits"], w1, w2, site.top_k,
                                                    bool(site.nodes["renormalize"]), site.routing)))
        site.rewritten = True
        site.reason = None
        site.kernel = kernel_name
        site.nodes["fused"] = fused
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()
    # what the router pattern could not prove may still have fused experts behind its own router
    substitute_experts(gm, sites, example_inputs, kernels, copy_weights)


# ----------------------------------------------------------------------------------------------------
# Experts only: the model's own router stays, its expert dispatch becomes `fused_experts`
# ----------------------------------------------------------------------------------------------------

def _experts_path(gm: fx.GraphModule, block: Optional[str]) -> Optional[str]:
    """The path of the `experts` module inside the MoE block at `block` (HF's fused `*Experts`)."""
    if block is None:
        return None
    for n in gm.graph.nodes:
        for path, cls in module_stack(n):
            if path == block + ".experts" or (path.startswith(block + ".") and cls.endswith("Experts")):
                return path
    return None


def _experts_region(gm: fx.GraphModule, path: str):
    """(final, region, inputs) of the nodes traced inside the experts module at `path`, or (None, reason)."""
    region = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method")
              and any(p == path for p, _ in module_stack(n))]
    if not region:
        return None, "the experts run in another graph"
    members = set(region)
    final = region[-1]
    for n in region:
        if n is not final and any(u not in members for u in n.users):
            return None, f"{n.name} of the experts is used outside them"
    inputs = []
    for n in region:
        for i in n.all_input_nodes:
            if i not in members and i not in inputs:
                inputs.append(i)
    return (final, members, inputs), None


# Llama-4's form: every expert runs on every token, the token scaled by its routing weight first (0 where not chosen).
_UNROUTED_EXPERTS = ("the experts read no top-k ids or weights, only hidden rows and their two stacked weights: the "
                     "routing is applied outside them (Llama-4 runs every expert on every token scaled by its routing "
                     "weight, experts(w * x), which through the SiLU is not w * experts(x) as `fused_experts` "
                     "computes); substituting them would need an experts op that scales its input")


def _experts_inputs(inputs: list[fx.Node], final: fx.Node, experts: Optional[int]):
    """Sort the experts' inputs into x [T, H], topk_weights / topk_ids [T, k] and the two 3-D weights."""
    sizes = [i for i in inputs if _is_size(i)]
    tensors = [i for i in inputs if i not in sizes]
    out_shape = shape_of(final)
    if out_shape is None or len(out_shape) != 2:
        return None, "the experts' output is not [T, H]"
    tokens, hidden = out_shape
    w3 = [i for i in tensors if i.op in ("placeholder", "get_attr") and len(shape_of(i) or ()) == 3]
    pairs = [i for i in tensors if i not in w3 and len(shape_of(i) or ()) == 2 and same_size(shape_of(i)[0], tokens)]
    x = [i for i in pairs if same_size(shape_of(i)[1], hidden)]
    routed = [i for i in pairs if i not in x]
    ids = [i for i in routed if not example_value(i).is_floating_point()]
    weights = [i for i in routed if example_value(i).is_floating_point()]
    if len(w3) == 2 and len(x) == 1 and not routed and len(tensors) == 3:
        return None, _UNROUTED_EXPERTS
    if len(w3) != 2 or len(x) != 1 or len(ids) != 1 or len(weights) != 1 or len(tensors) != 5:
        return None, (f"the experts read {sorted(t.name for t in tensors)}, not x [T, H], the top-k weights and "
                      "ids [T, k] and two stacked weights")
    if shape_of(ids[0]) != shape_of(weights[0]):
        return None, "top-k weights and ids differ in shape"
    a, b = (tuple(shape_of(w)) for w in w3)
    for gu, dn, (sa, sb) in ((w3[0], w3[1], (a, b)), (w3[1], w3[0], (b, a))):
        if sa[0] == sb[0] and sa[2] == hidden and sb[1] == hidden and sa[1] == 2 * sb[2]:
            return (x[0], weights[0], ids[0], gu, dn, False, sizes), None
        if sa[0] == sb[0] and sa[1] == hidden and sb[2] == hidden and sa[2] == 2 * sb[1]:
            return (x[0], weights[0], ids[0], gu, dn, True, sizes), None
    return None, f"expert weights {a} / {b} are not a gate-up / down pair for hidden size {hidden}"


def _prove_experts(region, final, x, weights, ids, w_nodes, w_graph, w_values, sizes) -> Optional[str]:
    """Run the experts region (graph weights) and `experts_reference` (kernel-layout weights) on random routing."""
    xv, wv = example_value(x), example_value(weights)
    tokens, hidden = size_hint(xv.shape[0]), int(xv.shape[1])
    top_k, experts = int(example_value(ids).shape[1]), int(w_values[0].shape[0])
    gen = torch.Generator(device="cpu").manual_seed(0)
    tol = {torch.float32: 1e-4, torch.float64: 1e-9}.get(w_values[0].dtype, 3e-2)
    device = w_values[0].device
    for skew in (False, True):
        x_test = torch.randn(tokens, hidden, generator=gen).to(device=device, dtype=xv.dtype)
        rank = torch.rand(tokens, experts, generator=gen)
        if skew:
            rank[:, : top_k] += 2.0  # every token to the same k experts, the others get none
        ids_test = rank.topk(top_k, dim=-1).indices.to(device=device, dtype=example_value(ids).dtype)
        w_test = torch.rand(tokens, top_k, generator=gen).to(device=device, dtype=wv.dtype)
        env = {x: x_test, weights: w_test, ids: ids_test, w_nodes[0]: w_graph[0], w_nodes[1]: w_graph[1]}
        why = _compare(region, final, env, sizes, lambda: fused_moe_kernels.experts_reference(
            x_test, w_test, ids_test, *w_values), tol, "the experts", "do not compute SiLU(gate) * up -> down")
        if why is not None:
            return why
    return None


def substitute_experts(gm: fx.GraphModule, sites: list[Site], example_inputs: Sequence[Any],
                       kernels: str = "auto", copy_weights: bool = True) -> None:
    """For each MoE site left alone because of its router, replace the expert dispatch alone by `fused_experts`.

    The router (bias-corrected, group-limited, scaled, softmax after top-k...) stays as the model wrote it; the
    region traced inside the block's `experts` module must read only x [T, H], the top-k weights and ids and the two
    stacked weights, and is checked numerically against `experts_reference` before anything changes.
    """
    changed = False
    for site in sites:
        if site.kind != "moe" or site.rewritten or site.reason is None or "substitution is off" in site.reason:
            continue
        block = site.nodes.get("block") or (moe_block_of(site.nodes["topk"]) if "topk" in site.nodes else None)
        path = _experts_path(gm, block)
        if path is None:
            continue
        found, why = _experts_region(gm, path)
        if found is None:
            site.reason += f"; experts alone not substituted: {why}"
            continue
        final, region, inputs = found
        parts, why = _experts_inputs(inputs, final, site.experts)
        if parts is None:
            site.reason += f"; experts alone not substituted: {why}"
            continue
        x, weights, ids, w_gu, w_dn, transposed, sizes = parts
        originals = [_real_value(gm, w, example_inputs) for w in (w_gu, w_dn)]
        if any(w is None or w.device.type == "meta" or isinstance(w, torch._subclasses.FakeTensor)
               for w in originals):
            site.reason += "; experts alone not substituted: expert weights have no real values"
            continue
        w_values = _kernel_layout(originals, transposed, copy_weights)
        why = _prove_experts(region, final, x, weights, ids, (w_gu, w_dn), [w.detach() for w in originals],
                             w_values, sizes)
        if why is not None:
            site.reason += f"; experts alone not substituted: {why}"
            continue
        kernel_name, op = _experts_kernel_for(kernels, w_values[0].device)
        fused = _replace_block(gm, f"sq_experts_g{site.graph}_l{site.layer}", w_values, final, region, x,
                               lambda w1, w2: (op, (x, weights, ids, w1, w2)))
        site.rewritten, site.reason, site.kernel, site.moe_form = True, None, kernel_name, "experts"
        site.experts = int(w_values[0].shape[0])
        site.top_k = int(example_value(ids).shape[1])
        site.nodes["fused"] = fused
        changed = True
    if changed:
        gm.graph.lint()
        gm.recompile()


def _experts_kernel_for(kernels: str, device: torch.device) -> tuple[str, Any]:
    name, _ = _kernel_for(kernels, device)
    if name == "triton":
        return "triton", torch.ops.sqcompile.fused_experts_triton.default
    return "torch", torch.ops.sqcompile.fused_experts.default
