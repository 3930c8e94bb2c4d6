"""Find mixture-of-experts blocks in a dynamo-captured FX graph.

A site is anchored on its router: router logits [T, E] -> softmax or sigmoid (fp32 casts allowed)
-> topk (-> top-k values divided by their sum: renormalisation). The expert weights are the first two
3-D tensors [E, ., .] the routed computation reads after the topk: `gate_up_proj [E, 2I, H]` and
`down_proj [E, H, I]` (HF's fused layout). The form says how HF dispatched the experts:

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
_CASTS = {"float", "to", "type", "contiguous", "_to_copy"}
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
        if top_k is None or routing is None:
            continue
        if routing == "softmax" and _arg(scores, 1, "dim", None) not in (-1, 1):
            continue
        router_logits = strip_casts(scores.args[0])
        logits_shape = shape_of(router_logits)
        if logits_shape is None or len(logits_shape) != 2 or not isinstance(logits_shape[1], int):
            continue
        tokens, num_experts = logits_shape  # tokens may be symbolic (dynamic shapes)
        values = indices = None
        for user in node.users:
            if op_name(user) == "getitem":
                if user.args[1] == 0:
                    values = user
                elif user.args[1] == 1:
                    indices = user
        if values is None or indices is None:
            continue
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
                              renormalize=_renormalised(values))
            site.leave("expert loop is split from the router by graph breaks (HF 'eager' experts); "
                       "use experts_implementation='grouped_mm' or 'batched_mm'")
            sites.append(site)
            continue
        w_gate_up, w_down = weights[:2]
        gu, dn = static_shape(w_gate_up), static_shape(w_down)
        if hidden is None:
            hidden = dn[1]
        # HF layout: gate_up [E, 2I, H], down [E, H, I]; swap if the down weight was met first.
        if not (gu[2] == hidden and dn[1] == hidden and gu[1] == 2 * dn[2]):
            if dn[2] == hidden and gu[1] == hidden and dn[1] == 2 * gu[2]:
                w_gate_up, w_down, gu, dn = w_down, w_gate_up, dn, gu
        ffn = dn[2] if len(dn) == 3 else None
        site = Site(layer=-1, kind="moe", experts=num_experts, top_k=top_k, hidden=hidden, ffn=ffn,
                    routing=routing, moe_form=_form(routed, weights), graph=graph_index)
        site.nodes.update(topk=node, scores=scores, router_logits=router_logits, values=values,
                          indices=indices, router_weight=router_weight, w_gate_up=w_gate_up,
                          w_down=w_down, renormalize=_renormalised(values), tokens=tokens)
        if not (gu[2] == hidden and dn[1] == hidden and gu[1] == 2 * dn[2]):
            site.leave(f"expert weights {gu} / {dn} are not the [E, 2I, H] / [E, H, I] layout")
        sites.append(site)

    for order, site in enumerate(sites):
        layer = layer_of(site.nodes.get("router_weight"), site.nodes.get("w_gate_up"))
        site.layer = layer if layer is not None else order
    return sites


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
