"""Find mixture-of-experts blocks in a dynamo-captured FX graph.

A site is anchored on its router: router logits [T, E] -> softmax or sigmoid (fp32 casts allowed)
-> topk (-> top-k values divided by their sum: renormalisation). The expert weights are the first two
3-D tensors [E, ., .] the routed computation reads after the topk: `gate_up_proj [E, 2I, H]` and
`down_proj [E, H, I]` (HF's fused layout), or the transposed `[E, H, 2I]` / `[E, I, H]` (GPT-OSS, Aria). The form says how HF dispatched the experts:

- "grouped_mm": sort -> histc -> cumsum -> `transformers::grouped_mm_fallback` / `torch._grouped_mm`;
- "batched_mm": `W[expert_ids]` gathers + `bmm`;
- "loop": a per-expert loop (`index_add_`); HF's "eager" experts break the graph at `nonzero`, so the
  router's graph ends at the topk and the experts are elsewhere: such a site is recorded and left.

Detection only reads the graph. `substitute_moe` proves each site before it changes anything.
"""
from __future__ import annotations

import operator
import re
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .fx_utils import meta_tensor as example_value  # noqa: F401  (re-exported for substitute_moe)
from .fx_utils import op_name  # noqa: F401
from .sites import Site

_LAYER_RE = re.compile(r"layers[._](?:modules_)?(\d+)")
_CASTS = {"float", "to", "type", "type_as", "contiguous", "_to_copy"}
_GROUPED_MM = {"grouped_mm_fallback", "_grouped_mm", "grouped_mm"}


def static_shape(n: Any) -> Optional[tuple[int, ...]]:
    v = example_value(n)
    if v is None:
        return None
    # Never int() a SymInt inside a backend: it adds a guard and recompiles every decode step.
    from .fx_utils import concrete_int

    shape = tuple(concrete_int(s) for s in v.shape)
    return None if any(s is None for s in shape) else shape


def shape_of(n: Any) -> Optional[tuple]:
    """The example value's shape; sizes are ints or SymInts (dynamic token counts)."""
    v = example_value(n)
    return None if v is None else tuple(v.shape)


def same_size(a: Any, b: Any) -> bool:
    """Two sizes are the same: equal ints, or the same symbolic expression."""
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if isinstance(a, torch.SymInt) and isinstance(b, torch.SymInt):
        return str(a) == str(b)
    return False


def size_hint(s: Any) -> Optional[int]:
    """A concrete value for a size: the int, or the SymInt's hint (None when unbacked)."""
    if isinstance(s, int):
        return s
    if isinstance(s, torch.SymInt):
        hint = s.node.hint
        return int(hint) if hint is not None else None
    return None


def strip_casts(n: Any) -> Any:
    """Follow dtype casts (`.float()`, `.to(dtype)`) back to the tensor they cast."""
    while isinstance(n, fx.Node) and op_name(n) in _CASTS and n.args:
        n = n.args[0]
    return n


def _arg(n: fx.Node, index: int, name: str, default: Any = None) -> Any:
    if len(n.args) > index:
        return n.args[index]
    return n.kwargs.get(name, default)


def weight_source(n: Any) -> Optional[fx.Node]:
    """The placeholder / get_attr a node reads through views (transpose, getitem, casts), if any."""
    while isinstance(n, fx.Node):
        if n.op in ("placeholder", "get_attr"):
            return n
        if op_name(n) in _CASTS | {"transpose", "t", "permute", "getitem", "contiguous", "view", "reshape"}:
            n = n.args[0]
            continue
        return None
    return None


def layer_of(*nodes: Optional[fx.Node]) -> Optional[int]:
    for n in nodes:
        if n is None:
            continue
        m = _LAYER_RE.search(str(n.target) if n.op in ("placeholder", "get_attr") else n.name)
        if m:
            return int(m.group(1))
    return None


def _topk_k(n: fx.Node) -> Optional[int]:
    k = _arg(n, 1, "k")
    dim = _arg(n, 2, "dim", -1)
    largest = _arg(n, 3, "largest", True)
    if not isinstance(k, int) or largest is not True:
        return None
    return k if dim in (-1, 1) else None


def _renormalised(values: fx.Node) -> bool:
    """True when the top-k values are divided by their own sum (HF's norm_topk_prob)."""
    for user in values.users:
        if op_name(user) in ("truediv", "itruediv", "div", "div_") and user.args[0] is values:
            divisor = strip_casts(user.args[1])
            if op_name(divisor) == "sum" and strip_casts(divisor.args[0]) is values:
                return True
    return False


def _descendants_in_order(start: fx.Node, limit: int) -> list[fx.Node]:
    """Descendants of `start` in graph order, at most `limit` of them (the next block's are far)."""
    seen = {start}
    out = []
    node = start.next
    while node.op != "root" and len(out) < limit:
        if any(a in seen for a in node.all_input_nodes):
            seen.add(node)
            out.append(node)
        node = node.next
    return out


def _expert_weights(routed: list[fx.Node], num_experts: int) -> list[fx.Node]:
    """The 3-D [E, ., .] tensors read by the routed computation, in order of first use."""
    found: list[fx.Node] = []
    for node in routed:
        for inp in node.all_input_nodes:
            src = weight_source(inp)
            shape = static_shape(src)
            if src is not None and shape is not None and len(shape) == 3 and shape[0] == num_experts:
                if src not in found:
                    found.append(src)
        if len(found) >= 2:
            break
    return found


def _form(routed: list[fx.Node], weights: list[fx.Node]) -> str:
    names = {op_name(n) for n in routed}
    if names & _GROUPED_MM:
        return "grouped_mm"
    if "bmm" in names:
        return "batched_mm"
    return "loop"


def detect_moe(gm: fx.GraphModule, graph_index: int = 0) -> list[Site]:
    """One `Site` (kind="moe") per router found in `gm`, in graph order."""
    sites: list[Site] = []
    for node in gm.graph.nodes:
        if op_name(node) != "topk":
            continue
        top_k = _topk_k(node)
        scores = strip_casts(node.args[0])
        routing = {"softmax": "softmax", "_softmax": "softmax", "sigmoid": "sigmoid"}.get(op_name(scores))
        values = indices = None
        for user in node.users:
            if op_name(user) == "getitem":
                if user.args[1] == 0:
                    values = user
                elif user.args[1] == 1:
                    indices = user
        if top_k is None or values is None or indices is None:
            continue
        renormalize = None
        if routing is None:
            # top-k of the raw logits, softmax over the k chosen (GPT-OSS, Granite, Aria): softmax is monotone,
            # so this is softmax -> top-k -> renormalise (substitute_moe checks it numerically)
            soft = [u for u in values.users if op_name(u) in ("softmax", "_softmax") and _arg(u, 1, "dim", None) in (-1, 1)]
            if len(soft) != 1 or op_name(scores) in ("add", "sub", "mul", "masked_fill"):
                continue
            routing, renormalize, router_logits, values = "softmax", True, scores, soft[0]
        else:
            if routing == "softmax" and _arg(scores, 1, "dim", None) not in (-1, 1):
                continue
            router_logits = strip_casts(scores.args[0])
        logits_shape = shape_of(router_logits)
        if logits_shape is None or len(logits_shape) != 2 or not isinstance(logits_shape[1], int):
            continue
        tokens, num_experts = logits_shape  # tokens may be symbolic (dynamic shapes)
        if renormalize is None:
            renormalize = _renormalised(values)
        router_weight = None
        if op_name(router_logits) == "linear":
            router_weight = weight_source(_arg(router_logits, 1, "weight"))
        router_shape = static_shape(router_weight)

        routed = _descendants_in_order(node, limit=400)
        weights = _expert_weights(routed, num_experts)
        hidden = router_shape[1] if router_shape is not None and len(router_shape) == 2 else None
        if len(weights) < 2:
            # The experts are not in this graph (HF "eager" experts: graph break at nonzero). Such a
            # router graph hands the experts' inputs on: the top-k weights, the top-k ids and the
            # hidden states the router read all leave the graph (a top-k classifier does not).
            if router_weight is None or not _hands_on_to_experts(router_logits, values, indices):
                continue
            site = Site(layer=-1, kind="moe", experts=num_experts, top_k=top_k, hidden=hidden,
                        routing=routing, moe_form="loop", graph=graph_index)
            site.nodes.update(topk=node, scores=scores, router_logits=router_logits, values=values,
                              indices=indices, router_weight=router_weight,
                              renormalize=renormalize)
            site.leave("expert loop is split from the router by graph breaks (HF 'eager' experts); "
                       "use experts_implementation='grouped_mm' or 'batched_mm'")
            sites.append(site)
            continue
        w_gate_up, w_down = weights[:2]
        gu, dn = static_shape(w_gate_up), static_shape(w_down)
        if hidden is None:
            hidden = dn[1]
        # HF layout: gate_up [E, 2I, H], down [E, H, I]; or transposed (GPT-OSS, Aria): [E, H, 2I], [E, I, H].
        # Swap if the down weight was met first.
        hf = lambda a, b: a[2] == hidden and b[1] == hidden and a[1] == 2 * b[2]  # noqa: E731
        transposed = lambda a, b: a[1] == hidden and b[2] == hidden and a[2] == 2 * b[1]  # noqa: E731
        if not (hf(gu, dn) or transposed(gu, dn)) and (hf(dn, gu) or transposed(dn, gu)):
            w_gate_up, w_down, gu, dn = w_down, w_gate_up, dn, gu
        is_transposed = not hf(gu, dn) and transposed(gu, dn)
        if is_transposed:
            gu, dn = (gu[0], gu[2], gu[1]), (dn[0], dn[2], dn[1])
        ffn = dn[2] if len(dn) == 3 else None
        site = Site(layer=-1, kind="moe", experts=num_experts, top_k=top_k, hidden=hidden, ffn=ffn,
                    routing=routing, moe_form=_form(routed, weights), graph=graph_index)
        site.nodes.update(topk=node, scores=scores, router_logits=router_logits, values=values,
                          indices=indices, router_weight=router_weight, w_gate_up=w_gate_up,
                          w_down=w_down, renormalize=renormalize, tokens=tokens, transposed=is_transposed)
        if not hf(gu, dn):
            site.leave(f"expert weights {gu} / {dn} are not the [E, 2I, H] / [E, H, I] layout")
        sites.append(site)

    for order, site in enumerate(sites):
        layer = layer_of(site.nodes.get("router_weight"), site.nodes.get("w_gate_up"))
        site.layer = layer if layer is not None else order
    return sites + unmatched_moe_blocks(gm, sites, graph_index)


# ----------------------------------------------------------------------------------------------------
# MoE-looking blocks no router pattern matched: still reported, with what differs from the fused op
# ----------------------------------------------------------------------------------------------------

_EXPERTS_RE = re.compile(r"^(.*)\.experts(?:\.|$)")
_PATH_LAYER_RE = re.compile(r"(?:layers|layer|h|blocks|block)[.\[](\d+)")
_ROUTER_RE = re.compile(r"(?:\.gate|\.router|\.gating|\.gate_network)$")
_ACTIVATIONS = {"gelu": "GELU", "relu": "ReLU", "tanh": "tanh", "sigmoid": "sigmoid", "clamp": "clamped",
                "clip": "clamped", "relu2": "ReLU^2", "square": "squared", "pow": "a power"}


def module_stack(n: fx.Node) -> list[tuple[str, str]]:
    """(module path, class name) of the modules `n` was traced in, outermost first."""
    stack = n.meta.get("nn_module_stack") or {}
    out = []
    for path, cls in stack.values():
        out.append((str(path), getattr(cls, "__name__", str(cls))))
    return out


def moe_block_of(n: fx.Node) -> Optional[str]:
    """The module path of the MoE block `n` belongs to: the parent of an `experts` module, or of the router
    (a `gate` / `router` / `*Router` module holding a topk); None outside any."""
    stack = module_stack(n)
    for path, cls in stack:
        m = _EXPERTS_RE.match(path)
        if m:
            return m.group(1)
        if cls.endswith("Experts") and "." in path:
            return path.rsplit(".", 1)[0]
    if op_name(n) == "topk":
        for path, cls in reversed(stack):
            if (_ROUTER_RE.search(path) or "Router" in cls) and "." in path:
                return path.rsplit(".", 1)[0]
    return None


def _layer_from_path(path: str) -> Optional[int]:
    m = _PATH_LAYER_RE.search(path)
    return int(m.group(1)) if m else None


def _site_blocks(site: Site) -> set[str]:
    blocks = set()
    for key in ("topk", "w_gate_up", "w_down", "router_logits", "fused"):
        n = site.nodes.get(key)
        if isinstance(n, fx.Node):
            b = moe_block_of(n)
            if b is not None:
                blocks.add(b)
            for path, _ in module_stack(n):  # the router's own block (Mixtral's `mlp` holding `gate`)
                if _ROUTER_RE.search(path):
                    blocks.add(path.rsplit(".", 1)[0])
    return blocks


def unmatched_moe_blocks(gm: fx.GraphModule, sites: list[Site], graph_index: int = 0) -> list[Site]:
    """One left-alone `Site` per MoE-looking block of `gm` that no detected site covers, with the reason.

    A block is MoE-looking when nodes were traced inside an `experts` module (HF's fused `*Experts` or a
    ModuleList of per-expert MLPs) or a topk ran inside a router module. So a form the router pattern does not
    know still gets a row in `explain` saying what differs from the fused op, instead of no row at all.
    """
    covered = set()
    for s in sites:
        covered |= _site_blocks(s)
    blocks: dict[str, list[fx.Node]] = {}
    for n in gm.graph.nodes:
        b = moe_block_of(n)
        if b is not None and b not in covered:
            blocks.setdefault(b, []).append(n)
    out = []
    for order, (block, nodes) in enumerate(blocks.items()):
        inner = block_nodes(gm, block)
        layer = _layer_from_path(block)
        site = Site(layer=layer if layer is not None else len(sites) + order, kind="moe", moe_form="unrecognized",
                    graph=graph_index)
        site.nodes["block"] = block
        _describe(site, inner or nodes)
        out.append(site)
    return out


def block_nodes(gm: fx.GraphModule, block: Optional[str]) -> list[fx.Node]:
    """The nodes of `gm` traced inside the module at path `block` (or below it)."""
    if block is None:
        return []
    return [n for n in gm.graph.nodes if any(p == block or p.startswith(block + ".") for p, _ in module_stack(n))]


def expert_differences(nodes: list[fx.Node], experts: Optional[int]) -> list[str]:
    """What in a block's experts differs from the fused op's SiLU-gated, bias-free [E, 2I, H] / [E, H, I] experts."""
    found = []
    ops = [op_name(n) for n in nodes]
    weights3d = [n for n in nodes if n.op in ("placeholder", "get_attr") and len(static_shape(n) or ()) == 3]
    if not weights3d:
        found.append("experts are separate modules (one set of linears per expert), not stacked [E, ., .] weights")
    acts = sorted({_ACTIVATIONS[o] for o in ops if o in _ACTIVATIONS and o != "sigmoid"})
    if acts:
        found.append(f"experts use {', '.join(acts)} (the fused op computes SiLU(gate) * up)")
    if any("bias" in str(n.target) and "experts" in str(n.target) for n in nodes if n.op in ("placeholder", "get_attr")):
        found.append("experts have biases")
    return found


def router_differences(nodes: list[fx.Node]) -> list[str]:
    """What in a block's router differs from softmax | sigmoid -> top-k [-> renormalise]."""
    topks = [n for n in nodes if op_name(n) == "topk"]
    if not topks:
        return ["no top-k router in this graph (the router runs in another graph: a graph break)"]
    found = []
    scores = strip_casts(topks[0].args[0])
    while op_name(scores) in ("view", "reshape"):
        scores = strip_casts(scores.args[0])
    if len(topks) > 1:
        found.append(f"{len(topks)} top-k's (group-limited selection: top-k over expert groups first)")
    if op_name(scores) in ("add", "sub") and any(op_name(strip_casts(a)) in ("sigmoid", "softmax")
                                                for a in scores.args if isinstance(a, fx.Node)):
        found.append("experts are selected by score + a learned correction bias, weighted by the score alone")
    elif op_name(scores) not in ("softmax", "_softmax", "sigmoid"):
        after = {op_name(u) for v in topks[0].users for u in v.users}
        if after & {"softmax", "_softmax"}:
            found.append("top-k of the raw router logits, softmax over the k chosen")
        elif "sigmoid" in after or any(op_name(n) == "sigmoid" for n in nodes):
            found.append("top-k of the raw router logits, sigmoid of the k chosen")
        else:
            found.append(f"top-k of router scores computed by {op_name(scores)}")
    k_shape = shape_of(next((u for u in topks[0].users if op_name(u) == "getitem"), None))
    scaled = [n for n in nodes if op_name(n) in ("mul", "imul", "mul_")
              and any(isinstance(a, float) and a != 1.0 for a in n.args) and k_shape is not None
              and any(isinstance(a, fx.Node) and shape_of(a) == k_shape for a in n.args)]
    if scaled:
        found.append("the routing weights are scaled by a constant (routed scaling factor)")
    return found


def _describe(site: Site, nodes: list[fx.Node]) -> None:
    """Fill the site's expert count / top-k where visible and leave it with what the fused op cannot compute."""
    topks = [n for n in nodes if op_name(n) == "topk"]
    weights3d = [static_shape(n) for n in nodes if n.op in ("placeholder", "get_attr") and len(static_shape(n) or ()) == 3]
    if weights3d:
        site.experts = weights3d[0][0]
    if topks:
        site.top_k = _topk_k(topks[-1])
    found = router_differences(nodes) + expert_differences(nodes, site.experts)
    if not found:
        found.append("the router or expert pattern is not one sqcompile proves (softmax | sigmoid -> top-k "
                     "[-> renormalise] -> SiLU-gated experts [E, 2I, H] / [E, H, I])")
    site.leave("MoE block left as is (runs unfused, output unchanged): " + "; ".join(found))


def _users_through_casts(n: fx.Node) -> list[fx.Node]:
    out = []
    for u in n.users:
        out.append(u)
        if op_name(u) in _CASTS | {"itruediv", "truediv", "div", "reshape", "view"}:
            out.extend(_users_through_casts(u))
    return out


def _hands_on_to_experts(router_logits: fx.Node, values: fx.Node, indices: fx.Node) -> bool:
    outputs = [n for n in router_logits.graph.nodes if n.op == "output"]
    returned = set(outputs[0].all_input_nodes) if outputs else set()
    if not all(any(u in returned or u.op == "output" for u in [v, *_users_through_casts(v)])
               for v in (values, indices)):
        return False
    node = router_logits.args[0] if router_logits.args else None
    while isinstance(node, fx.Node):  # the router's input, through views, must be returned too
        if node in returned:
            return True
        node = node.args[0] if op_name(node) in _CASTS | {"view", "reshape"} and node.args else None
    return False
