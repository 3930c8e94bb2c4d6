"""Find attention sites in a dynamo-captured FX graph, and prove each one before anything rewrites it.

A site is accepted only when every piece the rewrite relies on is found and has no consumer outside the
site: the fresh key and value written to the cache (`index_copy_` into a StaticCache tensor, `cat` onto a
DynamicCache tensor, or used directly), the `v_proj` linear behind the value (alone or a slice of a fused
QKV linear), and the `o_proj` linear that is the only consumer of the attention output. Anything else is
reported with the reason it was left alone. Two forms are recognised:

- ``sdpa``:  ``F.scaled_dot_product_attention(q, k, v, ...)`` (GQA by ``enable_gqa`` or ``repeat_kv``);
- ``eager``: ``matmul(q, k^T) -> (*scale) -> (tanh soft-cap) -> (+mask) -> softmax -> matmul(., v)``.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch.fx as fx

from .fx_utils import (
    arg,
    concrete_int,
    is_linear,
    is_op,
    is_sdpa,
    layer_from_name,
    meta_tensor,
    node_source_name,
    only_user,
    static_shape,
)
from .sites import Site

log = logging.getLogger("sqcompile")

# Ops that read a cache tensor back for attention without changing its values (slices, repeat_kv).
_READ_OPS = ("getitem", "expand", "reshape", "view", "contiguous", "unsqueeze", "repeat_interleave", "to",
             "float", "type_as", "clone")
# Ops between the attention output and o_proj that only move data (checked for layout below).
_OUT_OPS = ("reshape", "view", "transpose", "permute", "contiguous", "to", "flatten")
# Ops allowed between the score matmul and softmax in the eager form; "tanh" forbids key centering.
_SCORE_OPS = ("mul", "truediv", "div", "add", "iadd", "to", "float", "tanh", "masked_fill", "type_as")
_SOFTMAX = ("softmax", "_softmax", "_safe_softmax")
_SPLITS = ("split", "chunk", "split_with_sizes", "tensor_split")


class _Unproven(Exception):
    """Raised inside detection when a site cannot be proven; the message is the report's reason."""


def _is_tensor_getitem(n: fx.Node) -> bool:
    return is_op(n, "getitem") and isinstance(n.args[0], fx.Node) and not is_op(n.args[0], *_SPLITS)


def _strip_kv_read(n: fx.Node) -> fx.Node:
    """From an attention input back through repeat_kv / cache slicing to the cache tensor or fresh K/V."""
    while isinstance(n, fx.Node) and is_op(n, *_READ_OPS):
        if is_op(n, "getitem") and not _is_tensor_getitem(n):
            break
        src = n.args[0]
        if not isinstance(src, fx.Node):
            break
        n = src
    return n


def _find_kv_write(base: fx.Node, attn: fx.Node, what: str) -> tuple[fx.Node, str]:
    """The fresh tensor written into the cache that `base` is, and the form of the write."""
    if is_op(base, "cat"):
        tensors = arg(base, 0, "tensors")
        dim = arg(base, 1, "dim", 0)
        if not isinstance(tensors, (list, tuple)) or len(tensors) != 2 or dim not in (-2, 2):
            raise _Unproven(f"{what} comes from a cat that is not a DynamicCache append (dim={dim})")
        new = tensors[1]
        if not isinstance(new, fx.Node):
            raise _Unproven(f"{what}: cache append of a non-tensor")
        return new, "cat"
    writers = [u for u in base.users
               if (is_op(u, "index_copy_", "index_copy") and u.args[0] is base)
               or (u.op == "call_function" and u.target is operator.setitem and u.args[0] is base)]
    if len(writers) > 1:
        raise _Unproven(f"{what} cache tensor is written {len(writers)} times in one graph")
    if writers:
        w = writers[0]
        if w.op == "call_function" and w.target is operator.setitem:
            new, form = w.args[2], "setitem"
        else:
            dim = arg(w, 1, "dim")
            if dim not in (2, -2):
                raise _Unproven(f"{what} cache write index_copy_ on dim {dim}, expected the token dim 2")
            new, form = arg(w, 3, "source"), "index_copy"
        if not isinstance(new, fx.Node):
            raise _Unproven(f"{what}: cache write of a non-tensor")
        return new, form
    if base.op == "placeholder":
        raise _Unproven(f"{what} is read from a cache input that this graph never writes")
    return base, "direct"


def _rope_at(n: fx.Node) -> bool:
    """`x*cos + rotate_half(x)*sin`: an add of two products, one of them over a cat that holds a neg."""
    if not is_op(n, "add", "iadd") or len(n.args) < 2:
        return False
    a, b = n.args[0], n.args[1]
    if not (is_op(a, "mul") and is_op(b, "mul")):
        return False
    for m in (a, b):
        for x in m.args:
            if is_op(x, "cat") and any(is_op(t, "neg") for t in arg(x, 0, "tensors", [])):
                return True
    return False


def _trace_key(new_k: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, bool]:
    """Prove the fresh key is a projection of activations (through RoPE, norms, reshapes)."""
    seen, frontier, rope = set(), [(new_k, 0)], False
    while frontier:
        n, depth = frontier.pop(0)
        if n in seen or depth > 48:
            continue
        seen.add(n)
        rope = rope or _rope_at(n)
        if is_linear(n, gm):
            return n, rope
        if n.op in ("call_function", "call_method"):
            for a in n.all_input_nodes:
                frontier.append((a, depth + 1))
    raise _Unproven("the key does not come from a linear projection")


def _trace_value(new_v: fx.Node, gm: fx.GraphModule, kv_heads: int, head_dim: int) -> tuple[fx.Node, int]:
    """The v_proj linear behind the fresh value, and the row offset of the value rows in its weight.

    Accepted exactly: linear [-> slice|split|chunk of a fused QKV] -> view/reshape [B,S,Hkv,d]
    -> transpose(1, 2). Anything in between would make folding the rotation into the weight wrong.
    """
    n = new_v
    while is_op(n, "contiguous", "to"):
        n = n.args[0]
    if is_op(n, "transpose"):
        dims = {d % 4 for d in n.args[1:3]}
        if dims != {1, 2}:
            raise _Unproven("value transpose is not (1, 2)")
    elif is_op(n, "permute"):
        perm = tuple(n.args[1]) if isinstance(n.args[1], (list, tuple)) else tuple(n.args[1:])
        if perm != (0, 2, 1, 3):
            raise _Unproven(f"value permute {perm} is not (0, 2, 1, 3)")
    else:
        raise _Unproven(f"value reaches the cache through '{n.target}', not a head transpose")
    n = n.args[0]
    while is_op(n, "contiguous"):
        n = n.args[0]
    if not is_op(n, "view", "reshape"):
        raise _Unproven("value is not split into heads by a view/reshape")
    split_shape = static_shape(n)
    if split_shape is None or len(split_shape) != 4 or split_shape[2:] != (kv_heads, head_dim):
        raise _Unproven(f"value head split has shape {split_shape}, expected [B, S, {kv_heads}, {head_dim}]")
    n = n.args[0]
    offset = 0
    width = kv_heads * head_dim
    if is_op(n, "getitem") and _is_tensor_getitem(n):
        idx = n.args[1]
        sl = idx[-1] if isinstance(idx, tuple) else idx
        if isinstance(idx, tuple) and any(i not in (Ellipsis, slice(None)) for i in idx[:-1]):
            raise _Unproven("fused QKV slice is not on the last dim")
        if not isinstance(sl, slice) or sl.step not in (None, 1) or not isinstance(sl.start or 0, int):
            raise _Unproven("fused QKV slice is not a plain slice")
        offset = sl.start or 0
        n = n.args[0]
    elif is_op(n, "getitem") and is_op(n.args[0], *_SPLITS):
        split, i = n.args[0], n.args[1]
        total = static_shape(split.args[0])
        dim = arg(split, 2, "dim", 0)
        if total is None or dim not in (-1, len(total) - 1):
            raise _Unproven("fused QKV split is not on the last dim")
        size = arg(split, 1, "split_size_or_sections", arg(split, 1, "chunks"))
        if is_op(split, "chunk"):
            offset = i * (total[-1] // size)
        elif isinstance(size, int):
            offset = i * size
        elif isinstance(size, (list, tuple)) and all(isinstance(s, int) for s in size):
            offset = sum(size[:i])
        else:
            raise _Unproven("fused QKV split sizes are not constants")
        n = split.args[0]
    if not is_linear(n, gm):
        raise _Unproven("value is not the output of a linear projection (v_proj)")
    out_features = static_shape(n)[-1] if static_shape(n) else None
    if out_features is None or offset + width > out_features:
        raise _Unproven("value rows fall outside the projection's output")
    return n, offset


def _find_o_proj(out: fx.Node, gm: fx.GraphModule, q_heads: int, head_dim: int) -> fx.Node:
    """The o_proj linear that is the only consumer of the attention output, via a [B,S,H*d] layout."""
    n, swaps = out, 0
    while True:
        users = list(n.users)
        if len(users) != 1:
            raise _Unproven(f"attention output has {len(users)} consumers before o_proj")
        u = users[0]
        if is_linear(u, gm) and u.args[0] is n:
            break
        if not is_op(u, *_OUT_OPS) or u.args[0] is not n:
            raise _Unproven(f"attention output reaches '{u.target}' before any projection")
        if is_op(u, "transpose"):
            if {d % 4 for d in u.args[1:3]} != {1, 2}:
                raise _Unproven("attention output transposed on dims other than (1, 2)")
            swaps += 1
        if is_op(u, "permute"):
            perm = tuple(u.args[1]) if isinstance(u.args[1], (list, tuple)) else tuple(u.args[1:])
            if perm != (0, 2, 1, 3):
                raise _Unproven(f"attention output permuted by {perm}")
            swaps += 1
        n = u
    if swaps != 1:
        raise _Unproven("attention output layout is not [B, S, heads, head_dim] before o_proj")
    shape = static_shape(n)
    if shape is None or shape[-1] != q_heads * head_dim:
        raise _Unproven(f"o_proj input width {shape and shape[-1]} is not heads*head_dim={q_heads * head_dim}")
    return u


def _weight_node(lin: fx.Node) -> Optional[fx.Node]:
    w = arg(lin, 1, "weight")
    return w if isinstance(w, fx.Node) else None


def _site_layer(*nodes: Optional[fx.Node]) -> Optional[int]:
    for n in nodes:
        if n is None:
            continue
        for cand in [n] + [a for a in n.all_input_nodes]:
            layer = layer_from_name(node_source_name(cand))
            if layer is not None:
                return layer
    return None


def _eager_attention(softmax: fx.Node) -> Optional[dict]:
    """Match matmul -> scale/cap/mask -> softmax -> matmul around one softmax; None when it is not that."""
    n, centering_ok = softmax.args[0], True
    while isinstance(n, fx.Node) and is_op(n, *_SCORE_OPS):
        if is_op(n, "tanh"):
            centering_ok = False  # a soft-cap is not shift-invariant: keys keep their mean
        n = n.args[0]
    if not is_op(n, "matmul", "bmm") or not isinstance(n, fx.Node):
        return None
    scores = n
    q, kt = scores.args[0], scores.args[1]
    if not is_op(kt, "transpose") or {d % 4 for d in kt.args[1:3]} != {2, 3}:
        return None
    p, users = softmax, list(softmax.users)
    while len(users) == 1 and is_op(users[0], "to", "dropout", "type_as", "float"):
        p = users[0]
        users = list(p.users)
    if len(users) != 1 or not is_op(users[0], "matmul", "bmm") or users[0].args[0] is not p:
        return None
    return {"attn": scores, "out": users[0], "q": q, "k": kt.args[0], "v": users[0].args[1],
            "centering_ok": centering_ok}


def detect_attention(gm: fx.GraphModule, graph_index: int = 0) -> list[Site]:
    """One Site per attention call in the graph; each either proven (nodes filled) or left with a reason."""
    found = []
    for n in gm.graph.nodes:
        if is_sdpa(n):
            found.append(("sdpa", {"attn": n, "out": n, "q": arg(n, 0, "query"), "k": arg(n, 1, "key"),
                                   "v": arg(n, 2, "value"), "centering_ok": True}))
        elif is_op(n, *_SOFTMAX):
            m = _eager_attention(n)
            if m is not None:
                found.append(("eager", m))
    sites = []
    for order, (form, m) in enumerate(found):
        site = Site(layer=-1, kind="attention", form=form, graph=graph_index)
        site.nodes["attn_candidate"] = m["attn"]
        try:
            _prove(gm, site, m)
        except _Unproven as e:
            site.leave(str(e))
        if site.layer < 0:
            site.layer = order
            site.nodes["layer_from_order"] = True
        sites.append(site)
    _refuse_shared(sites)
    return sites


def _prove(gm: fx.GraphModule, site: Site, m: dict) -> None:
    q, k, v, attn, out = m["q"], m["k"], m["v"], m["attn"], m["out"]
    qt, kt = meta_tensor(q), meta_tensor(k)
    if qt is None or kt is None or qt.dim() != 4 or kt.dim() != 4:
        raise _Unproven("query/key are not 4-D [batch, heads, tokens, head_dim] tensors")
    site.q_heads, site.head_dim = concrete_int(qt.shape[1]), concrete_int(qt.shape[-1])
    if site.q_heads is None or site.head_dim is None:
        raise _Unproven("query heads / head_dim are symbolic")
    k_base, v_base = _strip_kv_read(k), _strip_kv_read(v)
    new_k, k_write = _find_kv_write(k_base, attn, "key")
    new_v, v_write = _find_kv_write(v_base, attn, "value")
    site.kv_write = k_write if k_write == v_write else f"{k_write}/{v_write}"
    nk = meta_tensor(new_k)
    if nk is None or nk.dim() != 4 or concrete_int(nk.shape[-1]) != site.head_dim:
        raise _Unproven("the key written to the cache is not [batch, kv_heads, tokens, head_dim]")
    site.kv_heads = concrete_int(nk.shape[1])
    if not site.kv_heads:
        raise _Unproven("kv heads are symbolic")
    if site.q_heads % site.kv_heads:
        raise _Unproven(f"{site.q_heads} query heads are not a multiple of {site.kv_heads} kv heads")
    k_lin, site.rope = _trace_key(new_k, gm)
    v_lin, v_offset = _trace_value(new_v, gm, site.kv_heads, site.head_dim)
    o_lin = _find_o_proj(out, gm, site.q_heads, site.head_dim)
    # Nothing outside the site may see the rotated key/value: every consumer must be the cache write or
    # the attention read.
    for name, node, base, write in (("key", new_k, k_base, k_write), ("value", new_v, v_base, v_write)):
        if write != "direct":
            extra = [u for u in node.users if u is not base and not (u.args and u.args[0] is base)]
            if extra:
                raise _Unproven(f"the new {name} has a consumer outside the cache write: '{extra[0].name}'")
        else:
            extra = [u for u in node.users if not _reads_into(u, (attn, out))]
            if extra:
                raise _Unproven(f"the {name} has a consumer outside attention: '{extra[0].name}'")
    if v_offset == 0 and len(v_lin.users) != 1:
        raise _Unproven(f"v_proj output has {len(v_lin.users)} consumers")
    site.layer = _site_layer(_weight_node(v_lin), _weight_node(o_lin), k_base, v_base)
    site.layer = -1 if site.layer is None else site.layer
    site.nodes.update(q=q, attn=attn, out=out, new_k=new_k, new_v=new_v, k_linear=k_lin, v_linear=v_lin,
                      v_offset=v_offset, o_linear=o_lin, centering_ok=m["centering_ok"])


def _reads_into(n: fx.Node, sinks: tuple, depth: int = 8) -> bool:
    """True when `n` only feeds one of `sinks` (the attention ops) through read ops (repeat_kv, slicing)."""
    for _ in range(depth):
        if n in sinks:
            return True
        if not is_op(n, *_READ_OPS) and not is_op(n, "transpose"):
            return False
        users = list(n.users)
        if len(users) != 1:
            return False
        n = users[0]
    return n in sinks


def _refuse_shared(sites: list[Site]) -> None:
    """A projection weight used by two sites, or by anything but its site, is never rewritten."""
    by_weight: dict[fx.Node, list[Site]] = {}
    for s in sites:
        if s.reason is not None:
            continue
        for key in ("v_linear", "o_linear"):
            w = _weight_node(s.nodes[key])
            if w is not None:
                by_weight.setdefault(w, []).append(s)
                lins = [u for u in w.users]
                if len(lins) != 1:
                    s.leave(f"{key.split('_')[0]}_proj weight '{w.name}' is used by {len(lins)} ops")
    for w, group in by_weight.items():
        if len(group) > 1:
            for s in group:
                s.leave(f"projection weight '{w.name}' is shared by {len(group)} attention sites")
