"""Find attention sites in a dynamo-captured FX graph, and prove each one before anything rewrites it.

A site is accepted only when every piece the rewrite relies on is found and has no consumer outside the
site: the fresh key and value written to the cache (`index_copy_` into a StaticCache tensor, `cat` onto a
DynamicCache tensor, or used directly), the `v_proj` linear behind the value (alone or a slice of a fused
QKV linear), and either the `o_proj` linear that is the only consumer of the attention output (it absorbs the
inverse value rotation) or, where there is none (a gated output `o_proj(attn * sigmoid(gate))`, a second reader), an
output in [batch, q_heads, tokens, head_dim] that the rotation is undone on (`o_proj_or_read`). Anything else is
reported with the reason it was left alone. Two forms are recognised:

- ``sdpa``:  ``F.scaled_dot_product_attention(q, k, v, ...)`` (GQA by ``enable_gqa`` or ``repeat_kv``);
- ``eager``: ``matmul(q, k^T) -> (*scale) -> (tanh soft-cap) -> (+mask) -> softmax -> matmul(., v)``, or the
  same on [B*H, S, d] with an additive bias inside ``baddbmm`` (BLOOM's ALiBi, `_baddbmm_attention`);
- ``eager+sinks`` (GPT-OSS): the same scores concatenated with one learned logit per query head before softmax,
  whose column is dropped after it: ``cat([scores, sinks], -1) -> (- row max) -> softmax -> [..., :-1] ->
  matmul(., v)`` (`_sink_attention`). The weights on the values sum to one minus the sink's share.

The value projection may be a fused QKV split per head, a Conv1D ``addmm`` or a hand-written ``x @ W.T``:
`projections.value_rows` derives from the graph which rows of it are the values of each kv head.
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx as fx

from .fx_utils import (
    arg,
    op_name,
    concrete_int,
    is_linear,
    is_op,
    is_sdpa,
    layer_from_module_stack,
    layer_from_name,
    meta_tensor,
    node_source_name,
    only_user,
    same_size,
    static_shape,
)
from .projections import RowsUnproven, projection_of, value_rows
from .sites import Site

log = logging.getLogger("sqcompile")

# Ops that read a cache tensor back for attention without changing its values (slices, repeat_kv).
_READ_OPS = ("getitem", "expand", "reshape", "view", "contiguous", "unsqueeze", "repeat_interleave", "to",
             "float", "type_as", "clone")
# Ops between the attention output and o_proj that only move data (checked for layout below).
_OUT_OPS = ("reshape", "view", "transpose", "permute", "contiguous", "to", "flatten")
# Ops allowed between the score matmul and softmax in the eager form; "tanh" forbids key centering.
_SCORE_OPS = ("mul", "truediv", "div", "add", "iadd", "to", "float", "tanh", "masked_fill", "type_as", "type",
              "itruediv", "imul")
# Ops allowed between softmax and the value matmul (dtype casts, inference dropout).
_PROB_OPS = ("to", "dropout", "type_as", "float", "type")
# Ops that scale the scores: shift-invariance (key centering) needs the factor to be the same for every key.
_SCALE_OPS = ("mul", "truediv", "div", "itruediv", "imul")
_SOFTMAX = ("softmax", "_softmax", "_safe_softmax")
_SPLITS = ("split", "chunk", "split_with_sizes", "tensor_split")
# What `_sink_attention` adds to a site's nodes: the softmax over [scores, sink], the slice dropping the sink's
# column, the sink operand of the cat, and the cat.
SINK_NODES = ("probs", "sink_slice", "sink_logits", "sink_cat")


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
    if is_op(base, "cat") and arg(base, 1, "dim", 0) not in (-1, 3):  # a cat of the features: RoPE's, a fresh key
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
    if not writers and base.op == "placeholder":
        rolled = _roll_write(base)
        if rolled is not None:  # StaticSlidingWindowLayer when full: roll, write the last slot, copy_ back
            new = rolled.args[2]
            if not isinstance(new, fx.Node):
                raise _Unproven(f"{what}: cache write of a non-tensor")
            return new, "roll"
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


def _roll_write(base: fx.Node) -> Optional[fx.Node]:
    """`new = base.roll(-1, dims=-2); new[:, :, idx] = x; base.copy_(new)`: the setitem node writing x, or None."""
    copies = [u for u in base.users if is_op(u, "copy_") and u.args[0] is base]
    if len(copies) != 1 or not is_op(copies[0].args[1], "roll"):
        return None
    roll = copies[0].args[1]
    if roll.args[0] is not base or arg(roll, 2, "dims") not in (-2, 2, (-2,), [-2], (2,), [2]):
        return None
    sets = [u for u in roll.users if u.op == "call_function" and u.target is operator.setitem and u.args[0] is roll]
    if len(sets) != 1 or set(roll.users) != {sets[0], copies[0]}:
        return None
    idx = sets[0].args[1]
    if not (isinstance(idx, tuple) and len(idx) == 3 and idx[0] == slice(None) and idx[1] == slice(None)):
        return None
    return sets[0]


def _cache_state_write(n: fx.Node) -> bool:
    """`cache.copy_(n)` into a cache tensor (a graph input, or one the graph allocates: StaticCache's lazy init):
    n is handed back as cache state (sliding-window StaticCache)."""
    return is_op(n, "copy_") and isinstance(n.args[0], fx.Node) and (
        n.args[0].op == "placeholder" or is_op(n.args[0], "zeros", "empty", "full", "zeros_like", "new_zeros"))


def _only_to_cache_state(n: fx.Node, depth: int = 6) -> bool:
    """True when `n` (a read op) only reaches the cache state: the graph output or a copy_ into a cache input."""
    if depth == 0 or not is_op(n, *_READ_OPS):
        return False
    return all(u.op == "output" or is_op(u, *_SIZE_OPS) or (_cache_state_write(u) and u.args[1] is n)
               or _only_to_cache_state(u, depth - 1) for u in n.users)


def _rope_at(n: fx.Node) -> bool:
    """`x*cos + rotate_half(x)*sin`: an add of two products, one of them over a cat (half-split RoPE, Llama) or a
    stack + flatten (interleaved RoPE, GPT-J / Cohere) that holds a neg."""
    if not is_op(n, "add", "iadd") or len(n.args) < 2:
        return False
    a, b = n.args[0], n.args[1]
    if not (is_op(a, "mul") and is_op(b, "mul")):
        return False
    for m in (a, b):
        for x in m.args:
            while is_op(x, "flatten", "view", "reshape"):
                x = x.args[0]
            if is_op(x, "cat", "stack") and any(is_op(t, "neg") for t in arg(x, 0, "tensors", [])):
                return True
    return False


def _complex_rope_at(n: fx.Node) -> bool:
    """`view_as_real(view_as_complex(x) * freqs)`: RoPE as a complex product (Llama-4, Meta's reference code)."""
    if not (is_op(n, "view_as_real") and is_op(n.args[0], "mul")):
        return False
    return any(is_op(a, "view_as_complex") for a in n.args[0].args)


def _trace_key(new_k: fx.Node, gm: fx.GraphModule) -> tuple[fx.Node, bool]:
    """Prove the fresh key is a projection of activations (through RoPE, norms, reshapes)."""
    seen, frontier, rope = set(), [(new_k, 0)], False
    while frontier:
        n, depth = frontier.pop(0)
        if n in seen or depth > 48:
            continue
        seen.add(n)
        rope = rope or _rope_at(n) or _complex_rope_at(n)
        if is_linear(n, gm) or projection_of(n, gm) is not None:
            return n, rope
        if n.op in ("call_function", "call_method"):
            for a in n.all_input_nodes:
                frontier.append((a, depth + 1))
    raise _Unproven("the key does not come from a linear projection" + _not_linear_hint(seen))


def _not_linear_hint(nodes) -> str:
    """Name a projection-like product whose weight is not a parameter the folds can rewrite (F.linear, Conv1D
    addmm and `x @ W.T` over a parameter are projections)."""
    for n in nodes:
        if is_op(n, "addmm", "mm", "matmul", "baddbmm") and any(a.op == "placeholder" or is_op(a, "T", "t")
                                                                for a in n.all_input_nodes):
            return (f" (it comes from '{n.target if isinstance(n.target, str) else op_name(n)}' over a weight that is "
                    f"not a parameter in F.linear, Conv1D addmm or x @ W.T form: the weight folding cannot rewrite "
                    f"it)")
    return ""


def _trace_value(new_v: fx.Node, gm: fx.GraphModule, kv_heads: int, head_dim: int) -> tuple[fx.Node, int]:
    """The v_proj linear behind the fresh value, and the row offset of the value rows in its weight.

    Accepted exactly: linear [-> slice|split|chunk of a fused QKV] -> view/reshape [B,S,Hkv,d]
    -> transpose(1, 2). Anything in between would make folding the rotation into the weight wrong.
    """
    n = new_v
    chain = [n]  # every node from new_v back to the projection: nothing else may read them (they get rotated)
    while is_op(n, "contiguous", "to"):
        n = n.args[0]
        chain.append(n)
    if is_op(n, "getitem") and is_op(n.args[0], *_SPLITS):
        raise _Unproven("value is split out of a fused projection AFTER the head split (per-head interleaved "
                        "rows: GPT-NeoX / BLOOM / GPTBigCode fused QKV, MLA's kv_b_proj): its v_proj rows are not "
                        "one block, so the rotation cannot be folded into the weight")
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
    chain.append(n)
    while is_op(n, "contiguous"):
        n = n.args[0]
        chain.append(n)
    if not is_op(n, "view", "reshape"):
        raise _Unproven("value is not split into heads by a view/reshape")
    split_shape = static_shape(n)
    if split_shape is None or len(split_shape) != 4 or split_shape[2:] != (kv_heads, head_dim):
        raise _Unproven(f"value head split has shape {split_shape}, expected [B, S, {kv_heads}, {head_dim}]")
    n = n.args[0]
    offset = 0
    width = kv_heads * head_dim
    fused = None  # the node whose other users must stay clear of the value rows
    if is_op(n, "getitem") and _is_tensor_getitem(n):
        chain.append(n)
        fused = "slice"
        bounds = _last_dim_slice(n)
        if bounds is None:
            raise _Unproven("fused QKV slice is not a plain constant slice of the last dim")
        offset, stop = bounds
        if stop - offset != width:
            raise _Unproven(f"fused QKV value slice [{offset}:{stop}] is not {width} rows")
        n = n.args[0]
    elif is_op(n, "getitem") and is_op(n.args[0], *_SPLITS):
        chain.append(n)
        fused = "split"
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
        if not isinstance(i, int) or any(is_op(u, "getitem") and u.args[1] == i and u is not chain[-1]
                                         for u in split.users) or any(not is_op(u, "getitem") for u in split.users):
            raise _Unproven("the value part of the fused QKV split is read more than once")
        n = split.args[0]
        if len(n.users) != 1:
            raise _Unproven(f"the fused QKV output has {len(n.users)} consumers besides its split")
    if not is_linear(n, gm):
        raise _Unproven("value is not the output of a linear projection (v_proj)"
                        + _not_linear_hint([n] + list(n.all_input_nodes)))
    out_features = static_shape(n)[-1] if static_shape(n) else None
    if out_features is None or offset + width > out_features:
        raise _Unproven("value rows fall outside the projection's output")
    for a, b in zip(chain[1:], chain[2:]):  # each link of the value path has the next one as its only reader
        if len(a.users) != 1:
            raise _Unproven(f"the value (at '{a.name}') has a consumer outside the cache write")
    last = chain[-1]
    if len(last.users) != 1:
        raise _Unproven(f"the value (at '{last.name}') has a consumer outside the cache write")
    if fused == "slice":
        for u in n.users:
            if u is last:
                continue
            lo_hi = _last_dim_slice(u)
            if lo_hi is None:
                raise _Unproven(f"the fused QKV output is read by '{u.name}', not only by slices")
            lo, hi = lo_hi
            if lo < offset + width and hi > offset:
                raise _Unproven(f"the fused QKV slice '{u.name}' overlaps the value rows")
    elif fused is None and len(n.users) != 1:
        raise _Unproven(f"v_proj output has {len(n.users)} consumers")
    return n, offset


def _trace_value_rows(new_v: fx.Node, gm: fx.GraphModule, kv_heads: int,
                      head_dim: int) -> tuple[fx.Node, Optional[int], Optional[torch.Tensor]]:
    """(v projection, row offset, None) when the value rows are one block of a linear (`_trace_value`), else
    (projection, None, rows[kv_head, head_dim]) where the graph proves which rows of the projection (a fused
    QKV split per head, a Conv1D or `x @ W.T`) each value feature is (`projections.value_rows`)."""
    try:
        lin, offset = _trace_value(new_v, gm, kv_heads, head_dim)
        return lin, offset, None
    except _Unproven:  # the general mapping covers the block forms too: its reason is the one to report
        try:
            proj, rows = value_rows(new_v, gm, kv_heads, head_dim)
        except RowsUnproven as e:
            raise _Unproven(f"the value's rows in its projection cannot be mapped: {e}") from None
        return proj.out, None, rows


def _last_dim_slice(n: fx.Node) -> Optional[tuple]:
    """(start, stop), normalized to 0 <= start <= stop <= width, of a getitem that slices only the last dim of a
    tensor with a static last dim, with constant bounds and step 1; None otherwise."""
    if not (is_op(n, "getitem") and _is_tensor_getitem(n)):
        return None
    src = meta_tensor(n.args[0])
    width = concrete_int(src.shape[-1]) if src is not None and src.dim() > 0 else None
    if width is None:
        return None
    idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    sl, lead = idx[-1], idx[:-1]
    if any(i not in (Ellipsis, slice(None)) for i in lead):
        return None
    if Ellipsis not in lead and len(idx) != src.dim():  # x[:, a:b] on a 3-D tensor slices dim 1, not features
        return None
    if not isinstance(sl, slice) or sl.step not in (None, 1):
        return None
    if not all(v is None or (isinstance(v, int) and not isinstance(v, bool)) for v in (sl.start, sl.stop)):
        return None
    lo, hi, _ = sl.indices(width)
    return lo, max(lo, hi)


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
        proj = projection_of(u, gm)
        if proj is not None and proj.x is n:  # Conv1D addmm, `x @ W.T` [+ b]
            u = proj.out
            break
        if not is_op(u, *_OUT_OPS) or u.args[0] is not n:
            raise _Unproven(f"attention output reaches '{op_name(u)}' before any projection")
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


def o_proj_or_read(out: fx.Node, gm: fx.GraphModule, q_heads: int, head_dim: int) -> tuple[Optional[fx.Node],
                                                                                             Optional[str]]:
    """(o_proj, None) when o_proj can absorb the inverse value rotation (`_find_o_proj`); else (None, why not): the
    inverse is applied to the attention output itself (`insert_output_rotation`: a gated output, a second reader),
    which needs only that output to be [batch, q_heads, tokens, head_dim]."""
    try:
        return _find_o_proj(out, gm, q_heads, head_dim), None
    except _Unproven as e:
        t = meta_tensor(out)
        if t is None or t.dim() != 4 or concrete_int(t.shape[1]) != q_heads or concrete_int(t.shape[-1]) != head_dim:
            raise _Unproven(f"{e}, and the attention output is not [batch, {q_heads}, tokens, {head_dim}] for the "
                            f"value rotation to be undone at the read") from None
        return None, str(e)


def _weight_node(lin: Optional[fx.Node]) -> Optional[fx.Node]:
    if lin is None:
        return None
    proj = projection_of(lin)
    w = proj.weight if proj is not None else arg(lin, 1, "weight")
    return w if isinstance(w, fx.Node) else None


def _site_layer(*nodes: Optional[fx.Node]) -> Optional[int]:
    """The layer of a site's projections: from dynamo's module stack (`layer_from_module_stack`), else from the
    names of their weights (graphs without the metadata)."""
    for n in nodes:
        layer = layer_from_module_stack(n)
        if layer is not None:
            return layer
    for n in nodes:
        if n is None:
            continue
        for cand in [n] + [a for a in n.all_input_nodes]:
            layer = layer_from_name(node_source_name(cand))
            if layer is not None:
                return layer
    return None


def _softmax_dim_is_last(softmax: fx.Node) -> bool:
    dim = arg(softmax, 1, "dim")
    t = meta_tensor(softmax)
    return isinstance(dim, int) and t is not None and dim % t.dim() == t.dim() - 1


def _uniform_over_keys(x) -> bool:
    """A scale factor that is the same for every key: a number, or a tensor of size 1 in the last dim."""
    if isinstance(x, (int, float)):
        return True
    t = meta_tensor(x)
    return t is not None and (t.dim() == 0 or concrete_int(t.shape[-1]) == 1)


def _eager_attention(softmax: fx.Node) -> Optional[dict]:
    """Match matmul -> scale/cap/mask -> softmax -> matmul around one softmax; None when it is not that."""
    n, centering_ok = softmax.args[0], True
    if not _softmax_dim_is_last(softmax):
        return None
    while isinstance(n, fx.Node) and is_op(n, *_SCORE_OPS):
        if is_op(n, "tanh"):
            centering_ok = False  # a soft-cap is not shift-invariant: keys keep their mean
        if is_op(n, *_SCALE_OPS) and not all(_uniform_over_keys(a) for a in n.args[1:2]):
            centering_ok = False  # a per-key factor breaks shift-invariance too
        n = n.args[0]
    if not is_op(n, "matmul", "bmm") or not isinstance(n, fx.Node):
        return None
    scores = n
    q, kt = scores.args[0], scores.args[1]
    if not is_op(kt, "transpose") or {d % 4 for d in kt.args[1:3]} != {2, 3}:
        return None
    p, users = softmax, list(softmax.users)
    while len(users) == 1 and is_op(users[0], *_PROB_OPS) and not _training_dropout(users[0]):
        p = users[0]
        users = list(p.users)
    if len(users) != 1 or not is_op(users[0], "matmul", "bmm") or users[0].args[0] is not p:
        return None
    return {"attn": scores, "out": users[0], "q": q, "k": kt.args[0], "v": users[0].args[1], "kt": kt,
            "centering_ok": centering_ok}


def _is_row_max_shift(n: fx.Node) -> Optional[fx.Node]:
    """`x - x.max(dim=-1, keepdim=True).values` (or `amax`): x, else None. A shift by a per-row constant, which
    softmax ignores."""
    if not is_op(n, "sub") or len(n.args) != 2 or not isinstance(n.args[0], fx.Node):
        return None
    x, m = n.args
    if is_op(m, "getitem") and m.args[1] == 0 and is_op(m.args[0], "max"):
        m = m.args[0]
    elif not is_op(m, "amax"):
        return None
    dim, keep = arg(m, 1, "dim"), arg(m, 2, "keepdim", False)
    t = meta_tensor(x)
    if m.args[0] is not x or not keep or t is None or not isinstance(dim, (int, list, tuple)):
        return None
    dims = [dim] if isinstance(dim, int) else list(dim)
    return x if [d % t.dim() for d in dims] == [t.dim() - 1] else None


def _drops_last_column(n: fx.Node) -> bool:
    """`p[..., :-1]` (or `p[:, :, :, :-1]` on a 4-D p): every column but the last."""
    if not (is_op(n, "getitem") and _is_tensor_getitem(n)):
        return False
    idx = n.args[1] if isinstance(n.args[1], tuple) else (n.args[1],)
    t = meta_tensor(n.args[0])
    if not idx or idx[-1] != slice(None, -1, None) or t is None:
        return False
    lead = idx[:-1]
    return all(i == slice(None) for i in lead if i is not Ellipsis) and (Ellipsis in lead or len(idx) == t.dim())


def _sink_attention(softmax: fx.Node) -> Optional[dict]:
    """The attention-sink form (GPT-OSS's eager attention in transformers):

        logits = cat([q @ k^T * scale (+ mask), sinks.reshape(1, -1, 1, 1).expand(B, -1, S, -1)], -1)
        p = softmax(logits - logits.max(-1, keepdim=True))[..., :-1]  ->  p @ v

    The sink operand must be one value per query head, the same for every query and key ([B|1, Hq|1, S|1, 1]
    from a tensor of at most Hq values, through reshape/expand/casts only). The key mean is kept (`centering_ok`
    False): q . mu_k is the same for every key of a query but the sink logit does not move with it, so
    removing it from the scores would change the sink's share. Returns `_eager_attention`'s dict plus the
    softmax node (`probs`, whose last column is the sink's weight) and the sink operand; None when it is not
    this form."""
    if not _softmax_dim_is_last(softmax):
        return None
    n, chain = softmax.args[0], [softmax]  # chain: the readers of the logits on the way to softmax
    while is_op(n, "to", "float", "type") and len(n.users) == 1:
        chain.append(n)
        n = n.args[0]
    shift, x = n, _is_row_max_shift(n)
    if x is not None:
        chain.append(shift)
        n = x
    if not is_op(n, "cat") or len(arg(n, 0, "tensors", [])) != 2:
        return None
    cat = n
    t = meta_tensor(cat)
    if t is None or t.dim() != 4 or arg(cat, 1, "dim", 0) % 4 != 3:
        return None
    scores, sinks = arg(cat, 0, "tensors")
    st = meta_tensor(sinks)
    if not isinstance(sinks, fx.Node) or st is None or st.dim() != 4 or concrete_int(st.shape[-1]) != 1:
        return None
    leaf = sinks
    while is_op(leaf, "expand", "reshape", "view", "to", "float", "type_as", "unsqueeze", "contiguous"):
        leaf = leaf.args[0]
    lt = meta_tensor(leaf)
    if not isinstance(leaf, fx.Node) or leaf.op not in ("placeholder", "get_attr") or lt is None \
            or concrete_int(lt.numel()) not in (1, concrete_int(t.shape[1])):
        return None
    users = list(softmax.users)
    if len(users) != 1 or not _drops_last_column(users[0]):
        return None
    # the logits are read on the way to softmax and by the row max only; the max only by the shift
    row_max = ([shift.args[1]] + ([shift.args[1].args[0]] if is_op(shift.args[1], "getitem") else [])) \
        if x is not None else []
    if any(u not in chain[-1:] + row_max for u in cat.users) or any(
            u not in row_max + [shift] for m in row_max for u in m.users):
        return None
    # from the scores back to q @ k^T, and from the kept columns on to the value product
    m = _scores_to_values(scores, users[0])
    if m is None:
        return None
    m.update(centering_ok=False, probs=softmax, sink_slice=users[0], sink_logits=sinks, sink_cat=cat)
    return m


def _scores_to_values(scores: fx.Node, p: fx.Node) -> Optional[dict]:
    """q @ k^T -> scale/mask ops = `scores`; `p` -> casts/dropout -> @ v: the nodes `_prove` needs."""
    n = scores
    while isinstance(n, fx.Node) and is_op(n, *_SCORE_OPS):
        if is_op(n, "tanh"):
            return None
        n = n.args[0]
    if not is_op(n, "matmul", "bmm") or not isinstance(n, fx.Node):
        return None
    q, kt = n.args[0], n.args[1]
    if not is_op(kt, "transpose") or {d % 4 for d in kt.args[1:3]} != {2, 3}:
        return None
    users = list(p.users)
    while len(users) == 1 and is_op(users[0], *_PROB_OPS) and not _training_dropout(users[0]):
        p = users[0]
        users = list(p.users)
    if len(users) != 1 or not is_op(users[0], "matmul", "bmm") or users[0].args[0] is not p:
        return None
    return {"attn": n, "out": users[0], "q": q, "k": kt.args[0], "v": users[0].args[1], "kt": kt}


def _merged_heads(n, four) -> bool:
    """n is `four` ([B, H, T, d]) reshaped to [B*H, T, d]: batch and heads merged row-major (b*H + h)."""
    if not is_op(n, "reshape", "view") or n.args[0] is not four:
        return False
    a, b = meta_tensor(four), meta_tensor(n)
    return a is not None and b is not None and a.dim() == 4 and b.dim() == 3 \
        and all(same_size(x, y) for x, y in zip(a.shape[2:], b.shape[1:]))


def _baddbmm_attention(softmax: fx.Node) -> Optional[dict]:
    """Attention on [B*H, S, d] with an additive bias inside `baddbmm` (BLOOM's ALiBi):

        view(baddbmm(bias, q.reshape(B*H, S, d), k.reshape(B*H, T, d).transpose(-1, -2), beta, alpha), [B, H, S, T])
        -> (+mask) -> softmax -> (casts, dropout) -> view [B*H, S, T] -> bmm(., v.reshape(B*H, T, d))
        -> view [B, H, S, d]

    The bias adds the same term whatever the key values are, and alpha scales every key alike, so rotating q and k
    (and centering k) keeps the softmax; q, k and v are the 4-D tensors before the merge. None when not this form."""
    if not _softmax_dim_is_last(softmax):
        return None
    n, centering_ok = softmax.args[0], True
    while isinstance(n, fx.Node) and is_op(n, *_SCORE_OPS):
        if is_op(n, "tanh"):
            centering_ok = False
        if is_op(n, *_SCALE_OPS) and not all(_uniform_over_keys(a) for a in n.args[1:2]):
            centering_ok = False
        n = n.args[0]
    if not is_op(n, "view", "reshape") or not is_op(n.args[0], "baddbmm"):
        return None
    scores = n.args[0]
    q3, kt3 = arg(scores, 1, "batch1"), arg(scores, 2, "batch2")
    if not all(isinstance(scores.kwargs.get(c, 1), (int, float)) for c in ("beta", "alpha")):
        return None
    if not is_op(kt3, "transpose") or {d % 3 for d in kt3.args[1:3]} != {1, 2} or not isinstance(q3, fx.Node):
        return None
    k3 = kt3.args[0]
    q, k = q3.args[0] if q3.args else None, k3.args[0] if isinstance(k3, fx.Node) and k3.args else None
    if not (_merged_heads(q3, q) and _merged_heads(k3, k)):
        return None
    p, users = softmax, list(softmax.users)
    while len(users) == 1 and is_op(users[0], *_PROB_OPS) and not _training_dropout(users[0]):
        p = users[0]
        users = list(p.users)
    if len(users) != 1 or not is_op(users[0], "view", "reshape"):
        return None
    p3 = users[0]
    bmm_users = list(p3.users)
    if len(bmm_users) != 1 or not is_op(bmm_users[0], "bmm", "matmul") or bmm_users[0].args[0] is not p3:
        return None
    out3 = bmm_users[0]
    v3 = out3.args[1]
    v = v3.args[0] if is_op(v3, "reshape", "view") else None
    outs = list(out3.users)
    if not _merged_heads(v3, v) or len(outs) != 1 or not is_op(outs[0], "view", "reshape"):
        return None
    out, qt = outs[0], meta_tensor(q)
    ot = meta_tensor(out)
    if ot is None or ot.dim() != 4 or not all(same_size(x, y) for x, y in zip(ot.shape[:3], qt.shape[:3])):
        return None
    return {"attn": q3, "out": out, "q": q, "k": k, "v": v, "kt": k3, "v_consumer": v3, "centering_ok": centering_ok}


def _training_dropout(n: fx.Node) -> bool:
    """A dropout that is not the identity: training on (or not a constant) and p not 0. In eval mode (GPT-2's,
    BLOOM's attention dropout) it passes the weights through and the attention is still attention."""
    if not is_op(n, "dropout"):
        return False
    p, training = arg(n, 1, "p", 0.5), arg(n, 2, "training", n.kwargs.get("train", True))
    return not (training is False or p == 0)


_NEAR_SCORE_OPS = _SCORE_OPS + ("view", "reshape", "cat", "where", "sub", "contiguous", "clamp", "dropout")
_NEAR_PROB_OPS = _PROB_OPS + ("view", "reshape", "getitem", "contiguous", "mul", "masked_fill", "where")


def _near_miss(softmax: fx.Node) -> Optional[str]:
    """Why an attention-looking `matmul -> ... -> softmax -> ... -> matmul` is not the recognised eager form.

    None when the softmax is not between two products (a classifier head, an MoE router): those are not
    attention and are not reported at all. An attention-like site is reported and left alone with the reason.
    """
    n, first_odd = softmax.args[0], None
    for _ in range(12):
        if not isinstance(n, fx.Node) or not is_op(n, *_NEAR_SCORE_OPS):
            break
        if is_op(n, "cat"):
            first_odd = ("the scores are concatenated with extra logits before softmax (attention sinks?): the "
                         "weights on the values do not sum to one")
        elif first_odd is None and not is_op(n, *_SCORE_OPS):
            first_odd = f"the scores pass through '{op_name(n)}' before softmax"
        n = n.args[0]
        if isinstance(n, (list, tuple)) and n:  # cat: follow the first tensor
            n = n[0]
    if not is_op(n, "matmul", "bmm", "baddbmm", "einsum"):
        return None
    score_op = op_name(n)
    p = softmax
    for _ in range(12):
        users = list(p.users)
        if len(users) != 1:
            return None
        u = users[0]
        if is_op(u, "matmul", "bmm", "einsum"):
            break
        if not is_op(u, *_NEAR_PROB_OPS):
            return None
        if first_odd is None and not is_op(u, *_PROB_OPS):
            first_odd = f"the attention weights pass through '{op_name(u)}' before the value product"
        if first_odd is None and _training_dropout(u):
            first_odd = ("the attention weights go through dropout in training mode: the weights on the values do "
                         "not sum to one (compile the model in eval mode)")
        p = u
    else:
        return None
    if score_op not in ("matmul", "bmm"):
        return f"attention-like scores come from '{score_op}' (not a 4-D q @ k^T; ALiBi-in-baddbmm / einsum form)"
    if not _softmax_dim_is_last(softmax):
        return "attention-like softmax is not over the last (key) dim"
    if first_odd:
        return f"attention-like softmax not in a provable form: {first_odd}"
    return "attention-like softmax not in a provable form: the key operand is not k.transpose(2, 3) of a 4-D key"


def detect_attention(gm: fx.GraphModule, graph_index: int = 0) -> list[Site]:
    """One Site per attention call in the graph; each either proven (nodes filled) or left with a reason."""
    found = []
    for n in gm.graph.nodes:
        if is_sdpa(n):
            found.append(("sdpa", {"attn": n, "out": n, "q": arg(n, 0, "query"), "k": arg(n, 1, "key"),
                                   "v": arg(n, 2, "value"), "centering_ok": True}))
        elif is_op(n, *_SOFTMAX):
            m = _eager_attention(n) or _baddbmm_attention(n)
            sink = _sink_attention(n) if m is None else None
            if m is not None:
                found.append(("eager", m))
            elif sink is not None:
                found.append(("eager+sinks", sink))
            else:
                why = _near_miss(n)
                if why is not None:
                    found.append(("eager", {"near_miss": why}))
    sites = []
    for order, (form, m) in enumerate(found):
        site = Site(layer=-1, kind="attention", form=form, graph=graph_index)
        if "attn" in m:
            site.nodes["attn_candidate"] = m["attn"]
        if form == "eager+sinks":
            site.nodes["candidate"] = m  # a SpectralCache's read is proven later (`upgrade_spectral_sites`)
        try:
            if "near_miss" in m:
                raise _Unproven(m["near_miss"])
            _prove(gm, site, m)
        except _Unproven as e:
            site.leave(str(e))
        if site.layer < 0 and "attn" in m:  # left alone: the layer dynamo traced the attention in, where known
            site.layer = layer_from_module_stack(m["attn"]) if layer_from_module_stack(m["attn"]) is not None else -1
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
    if k_write == "direct" and any(_only_to_cache_state(u) for u in new_k.users):
        k_write = "copy"  # sliding-window StaticCache: the fresh window is copied into the cache, attention reads it
    if v_write == "direct" and any(_only_to_cache_state(u) for u in new_v.users):
        v_write = "copy"
    site.kv_write = k_write if k_write == v_write else f"{k_write}/{v_write}"
    nk = meta_tensor(new_k)
    if nk is None or nk.dim() != 4 or concrete_int(nk.shape[-1]) != site.head_dim:
        raise _Unproven("the key written to the cache is not [batch, kv_heads, tokens, head_dim]")
    site.kv_heads = concrete_int(nk.shape[1])
    if not site.kv_heads:
        raise _Unproven("kv heads are symbolic")
    if site.q_heads % site.kv_heads:
        raise _Unproven(f"{site.q_heads} query heads are not a multiple of {site.kv_heads} kv heads")
    gqa = bool(site.form == "sdpa" and attn.kwargs.get("enable_gqa", False))
    for name, read, base, write, consumer in (("key", k, k_base, k_write, m.get("kt", attn)),
                                              ("value", v, v_base, v_write, m.get("v_consumer", out))):
        chain = _check_head_map(read, base, site.kv_heads, site.q_heads, gqa, name)
        if write not in ("direct", "copy"):
            _check_cache_readers(base, chain[0] if chain else consumer, name)
    k_lin, site.rope = _trace_key(new_k, gm)
    v_lin, v_offset, v_rows = _trace_value_rows(new_v, gm, site.kv_heads, site.head_dim)
    o_lin, output_read = o_proj_or_read(out, gm, site.q_heads, site.head_dim)
    # Nothing outside the site may see the rotated key/value: every consumer must be the cache write or
    # the attention read.
    sinks = (attn, out) + tuple(x for x in (m.get("kt"), m.get("v_consumer")) if x is not None)
    for name, node, base, write in (("key", new_k, k_base, k_write), ("value", new_v, v_base, v_write)):
        if write == "roll":
            extra = [u for u in node.users if u is not _roll_write(base)]
        elif write == "copy":
            extra = [u for u in node.users if not _reads_into(u, sinks) and not _only_to_cache_state(u)]
        if write in ("roll", "copy"):
            if extra:
                raise _Unproven(f"the new {name} has a consumer outside the cache write: '{extra[0].name}'")
        elif write != "direct":
            # a size read sees no values (DynamicSlidingWindowLayer counts the new tokens: key_states.shape[-2])
            extra = [u for u in node.users if u is not base and not (u.args and u.args[0] is base)
                     and not is_op(u, *_SIZE_OPS)]
            if extra:
                raise _Unproven(f"the new {name} has a consumer outside the cache write: '{extra[0].name}'")
        else:
            # read into attention, or cropped and copied into a cache input (sliding window becoming full)
            extra = [u for u in node.users if not _reads_into(u, sinks) and not _only_to_cache_state(u)]
            if extra:
                raise _Unproven(f"the {name} has a consumer outside attention: '{extra[0].name}'")
    site.layer = _site_layer(v_lin, o_lin, _weight_node(v_lin), _weight_node(o_lin), k_base, v_base)
    site.layer = -1 if site.layer is None else site.layer
    site.nodes.update(q=q, attn=attn, out=out, new_k=new_k, new_v=new_v, k_linear=k_lin, v_linear=v_lin,
                      v_offset=v_offset, v_rows=v_rows, o_linear=o_lin, output_read=output_read,
                      centering_ok=m["centering_ok"],
                      k_base=k_base, v_base=v_base, k_read=k, v_read=v, k_consumer=m.get("kt", attn),
                      v_consumer=m.get("v_consumer", out))
    site.nodes.update({key: m[key] for key in SINK_NODES if key in m})


def _check_head_map(read: fx.Node, base: fx.Node, kv_heads: int, q_heads: int, gqa: bool, what: str) -> list:
    """Prove that the ops between the cache tensor `base` and the attention input `read` map query head h to kv
    head h // (q_heads / kv_heads) (repeat_kv / repeat_interleave / enable_gqa), the mapping the rotation uses,
    and touch neither the head dim nor the feature dim. A tiled repeat (h % kv_heads) or any other layout change
    is refused. Returns the chain of read ops, base first excluded."""
    chain, n = [], read
    while n is not base:
        chain.append(n)
        n = n.args[0]
    chain.reverse()
    bt = meta_tensor(base)
    if bt is None or bt.dim() != 4:
        raise _Unproven(f"the {what} cache is not a 4-D [batch, kv_heads, tokens, head_dim] tensor")
    labels = ["B", "H", "S", "D"]  # R: a repeat axis; HR: kv heads merged with their repeats (h // rep)

    def refuse(node, why):
        raise _Unproven(f"the {what} read '{node.name}' ({op_name(node)}) {why}: cannot prove which kv head "
                        f"each query head reads")

    for node in chain:
        t, src = meta_tensor(node), meta_tensor(node.args[0])
        if t is None or src is None:
            refuse(node, "has no shape")
        name = op_name(node)
        if name in ("contiguous", "to", "float", "type_as", "clone"):
            if t.dim() != len(labels):
                refuse(node, "changes the rank")
        elif name == "getitem":
            idx = node.args[1] if isinstance(node.args[1], tuple) else (node.args[1],)
            real = sum(1 for i in idx if i is not None and i is not Ellipsis)
            new, pos = [], 0
            for i in idx:
                if i is Ellipsis:
                    for _ in range(len(labels) - real):
                        new.append(labels[pos])
                        pos += 1
                elif i is None:
                    new.append("R")
                elif isinstance(i, slice):
                    if pos >= len(labels):
                        refuse(node, "indexes past the last dim")
                    if labels[pos] in ("H", "HR", "D") and i != slice(None):
                        refuse(node, "slices the head or feature dim")
                    new.append(labels[pos])
                    pos += 1
                else:
                    refuse(node, f"indexes with {type(i).__name__}")
            labels = new + labels[pos:]
        elif name == "unsqueeze":
            dim = arg(node, 1, "dim")
            if not isinstance(dim, int):
                refuse(node, "has a symbolic dim")
            labels.insert(dim % (len(labels) + 1), "R")
        elif name == "expand":
            if t.dim() != len(labels):
                refuse(node, "adds dims")
            for i, (a, b) in enumerate(zip(src.shape, t.shape)):
                if concrete_int(a) == 1 and concrete_int(b) != 1:
                    if labels[i] == "R" or (labels[i] == "H" and kv_heads == 1):
                        continue
                    refuse(node, f"broadcasts the '{labels[i]}' dim")
        elif name in ("reshape", "view"):
            a, b = list(src.shape), list(t.shape)
            if len(a) == len(b) and all(same_size(x, y) for x, y in zip(a, b)):
                continue
            merged = None
            if len(b) == len(a) - 1:
                for i in range(len(labels) - 1):
                    if labels[i:i + 2] == ["H", "R"] and all(same_size(x, y) for x, y in zip(a[:i], b[:i])) \
                            and all(same_size(x, y) for x, y in zip(a[i + 2:], b[i + 1:])):
                        h, r, hr = concrete_int(a[i]), concrete_int(a[i + 1]), concrete_int(b[i])
                        if None not in (h, r, hr) and h * r == hr:
                            merged = i
                            break
            if merged is None:
                refuse(node, "reshapes the heads other than merging (kv_heads, repeats)")
            labels = labels[:merged] + ["HR"] + labels[merged + 2:]
        elif name == "repeat_interleave":
            dim = arg(node, 2, "dim")
            if not isinstance(dim, int) or not isinstance(arg(node, 1, "repeats"), int) \
                    or labels[dim % len(labels)] != "H":
                refuse(node, "is not a repeat_interleave over the kv-head dim")
            labels[dim % len(labels)] = "HR"
        else:
            refuse(node, "is not a known read op")
    if len(labels) != 4 or labels[0] != "B" or labels[2:] != ["S", "D"] or labels[1] not in ("H", "HR"):
        raise _Unproven(f"the {what} reaches attention with layout {labels}, not [batch, heads, tokens, head_dim]")
    heads = meta_tensor(read).shape[1]
    if labels[1] == "H" and concrete_int(heads) != q_heads and not gqa and kv_heads != 1:
        raise _Unproven(f"the {what} has {kv_heads} heads for {q_heads} query heads without enable_gqa/repeat_kv")
    if labels[1] == "HR" and concrete_int(heads) != q_heads:
        raise _Unproven(f"the {what} is repeated to {heads} heads, not the {q_heads} query heads")
    return chain


_SIZE_OPS = ("size", "sym_size", "dim", "numel", "sym_numel", "stride")


def _check_cache_readers(base: fx.Node, reader: fx.Node, what: str) -> None:
    """The cache tensor (after its write) may be read only by this attention, returned as the new cache state
    (graph output, possibly cropped to a sliding window) or written by the site's own write op."""
    for u in base.users:
        if u is reader or is_op(u, *_SIZE_OPS) or u.op == "output":
            continue
        if (is_op(u, "index_copy_", "index_copy") or (u.op == "call_function" and u.target is operator.setitem)) \
                and u.args[0] is base:
            continue
        if _only_to_cache_state(u):
            continue
        if is_op(u, "roll") and _roll_write(base) is not None and u is _roll_write(base).args[0]:
            continue
        if _cache_state_write(u) and u.args[0] is base and _roll_write(base) is not None:
            continue
        raise _Unproven(f"the {what} cache is also read by '{u.name}' ({op_name(u)}) outside this attention")


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
    by_kv: dict[fx.Node, list[Site]] = {}
    for s in sites:
        if s.reason is None:
            for key in ("new_k", "new_v"):
                by_kv.setdefault(s.nodes[key], []).append(s)
    for node, group in by_kv.items():
        if len(group) > 1:  # one cache read by two attention calls (KV sharing): rotating it twice is wrong
            for s in group:
                s.leave(f"the key/value '{node.name}' feeds {len(group)} attention sites (shared KV)")
