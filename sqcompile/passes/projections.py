"""Projections `y = x W^T + b` in a dynamo-captured graph, whatever op computes them, and which output rows of a
(fused) projection a tensor is made of.

Three forms compute a projection: `F.linear(x, W, b)` (W is [out, in]); GPT-2's Conv1D `addmm(b, x, W)` (W is
[in, out]); a hand-written `x @ W.T` [+ b] (Falcon's `FalconLinear`). `projection_of` names the weight, the bias
and the layout of each, and `as_linear` turns any of them into `F.linear` with new weights (the folds write
copies, never the user's parameters).

`value_rows` follows the data-movement ops between a projection and the value written to the cache (view /
reshape / flatten, transpose / permute, split / chunk / unbind and their getitems, slicing and integer indexing,
unsqueeze)
and derives, for each kv head h and feature e of the value, the output row of the projection that holds it: one
block for a plain v_proj or Phi-3's `qkv_proj` slice, a per-head gather for a fused QKV split after the head split
(GPT-NeoX, Falcon's grouped `[q.. | k | v]` per kv head, GPTBigCode's `[q | k | v]` with one kv head). Every
other reader of the fused output must read rows disjoint from the value's, proven the same way. Anything else
(a gather by a tensor, a roll, a reshape mixing tokens with features) is refused with the op that stopped it.
"""
from __future__ import annotations

import operator
from dataclasses import dataclass
from typing import Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from .fx_utils import arg, concrete_int, is_linear, is_op, meta_tensor, op_name, same_size


class RowsUnproven(Exception):
    """The rows of the projection behind a tensor cannot be derived; the message says why."""


@dataclass
class Projection:
    """`out = x W^T + b` computed by `node` (plus a separate bias add `out` for `x @ W.T + b`)."""

    node: fx.Node  # linear / addmm / matmul
    out: fx.Node  # the node holding x W^T + b (node itself, or the add of the bias)
    x: fx.Node
    weight: fx.Node
    bias: Optional[fx.Node]
    weight_in_out: bool  # True: the weight is stored [in, out] (Conv1D)


def _is_param(n) -> bool:
    """A weight: a graph input or constant (a tensor-parallel shard read by `to_local` counts too)."""
    while isinstance(n, fx.Node) and n.op == "call_method" and n.target == "to_local":
        n = n.args[0]
    return isinstance(n, fx.Node) and n.op in ("placeholder", "get_attr")


def _dims(n) -> Optional[int]:
    t = meta_tensor(n)
    return None if t is None else t.dim()


def _transposed_weight(n) -> Optional[fx.Node]:
    """W when n is `W.T`, `W.t()` or `W.transpose(0, 1)` of a 2-D weight."""
    if not isinstance(n, fx.Node):
        return None
    if n.op == "call_function" and n.target is getattr and len(n.args) == 2 and n.args[1] in ("T", "mT"):
        w = n.args[0]
    elif is_op(n, "t") or (is_op(n, "transpose") and {a % 2 for a in n.args[1:3] if isinstance(a, int)} == {0, 1}):
        w = n.args[0]
    else:
        return None
    return w if _is_param(w) and _dims(w) == 2 else None


def _bias_add(core: fx.Node) -> Optional[fx.Node]:
    """The `core + b` that is the only user of `core`, with b a 1-D weight of the output width."""
    users = list(core.users)
    if len(users) != 1 or not is_op(users[0], "add", "iadd") or len(users[0].args) != 2:
        return None
    add = users[0]
    other = add.args[1] if add.args[0] is core else add.args[0]
    out = meta_tensor(core)
    if _is_param(other) and _dims(other) == 1 and out is not None and \
            concrete_int(meta_tensor(other).shape[0]) == concrete_int(out.shape[-1]):
        return add
    return None


def projection_of(n, gm: Optional[fx.GraphModule] = None) -> Optional[Projection]:
    """The projection `n` computes (n is its linear / addmm / matmul, or the add of its bias), else None."""
    if not isinstance(n, fx.Node):
        return None
    if is_linear(n, gm):
        if n.op == "call_module":
            return None  # the folds rewrite F.linear calls; a module call has no weight node to replace
        w, b = arg(n, 1, "weight"), arg(n, 2, "bias")
        return Projection(n, n, n.args[0], w, b if isinstance(b, fx.Node) else None, False)
    if is_op(n, "addmm"):
        b, x, w = n.args[:3] if len(n.args) >= 3 else (None, None, None)
        if n.kwargs.get("beta", 1) != 1 or n.kwargs.get("alpha", 1) != 1 or not _is_param(w) or _dims(w) != 2:
            return None
        if not (_is_param(b) and _dims(b) == 1):
            return None
        return Projection(n, n, x, w, b, True)
    if is_op(n, "matmul") and len(n.args) == 2 and _transposed_weight(n.args[1]) is not None:
        return Projection(n, _bias_add(n) or n, n.args[0], _transposed_weight(n.args[1]),
                          None if _bias_add(n) is None else _other_arg(_bias_add(n), n), False)
    if is_op(n, "add", "iadd") and len(n.args) == 2:
        for core in n.args:
            if is_op(core, "matmul") and _transposed_weight(core.args[1]) is not None and _bias_add(core) is n:
                return projection_of(core, gm)
    return None


def _other_arg(add: fx.Node, core: fx.Node) -> fx.Node:
    return add.args[1] if add.args[0] is core else add.args[0]


def as_linear(gm: fx.GraphModule, proj: Projection, weight: fx.Node, bias: fx.Node) -> fx.Node:
    """Make `proj.out` compute `F.linear(x, weight, bias)` (weight [out, in]); returns the node, which keeps its
    identity (the sites' references stay valid). A matmul whose bias add became the linear is erased."""
    out = proj.out
    out.target = F.linear
    out.op = "call_function"
    out.args = (proj.x, weight, bias)
    out.kwargs = {}
    if proj.node is not out and not proj.node.users:
        wt = proj.node.args[1]
        gm.graph.erase_node(proj.node)
        if isinstance(wt, fx.Node) and not wt.users and wt.op == "call_function":
            gm.graph.erase_node(wt)
    return out


# --- rows of a fused projection --------------------------------------------------------------------------------

_SPLITS = ("split", "chunk", "split_with_sizes", "unbind")
_SAME = ("contiguous", "clone", "to", "float", "half", "bfloat16", "type_as", "type", "detach")
_RESHAPES = ("view", "reshape", "flatten", "unflatten", "_unsafe_view")
# readers that see only the shape (DeepSeek's `k_pe.new_empty(...)`): they read no rows
_SHAPE_ONLY = ("size", "sym_size", "dim", "numel", "stride", "new_empty", "new_zeros", "new_ones", "empty_like")
_FOLLOWED = _SAME + _RESHAPES + ("transpose", "permute", "getitem", "unsqueeze", "squeeze", "select", "narrow")


@dataclass
class _State:
    """Which dims of a tensor are token dims ("t": batch, sequence) and which carry projection features ("f"), and
    `labels`: for every position of the feature dims (in their order), the projection output row it holds."""

    dims: list
    labels: torch.Tensor


def _sizes(n) -> list:
    t = meta_tensor(n)
    if t is None:
        raise RowsUnproven(f"'{n.name}' has no recorded shape")
    return list(t.shape)


def _f_axis(dims: list, d: int) -> int:
    """The labels axis of tensor dim d (a feature dim)."""
    return sum(1 for x in dims[:d] if x == "f")


def _reshape(src: _State, a: list, b: list, node: fx.Node) -> _State:
    """Row-major reshape a -> b: a common leading part passes through; the rest must be token dims then feature
    dims, and the feature part must become the shortest trailing part of b of the same (static) size."""
    p = 0
    while p < min(len(a), len(b)) and same_size(a[p], b[p]):
        p += 1
    if p == len(a) == len(b):
        return src
    rest = src.dims[p:]
    if "f" in rest and "t" in rest[rest.index("f"):]:
        raise RowsUnproven(f"'{node.name}' ({op_name(node)}) merges token dims with feature dims")
    nf = rest.count("f")
    fsizes = [concrete_int(s) for s in a[len(a) - nf:]] if nf else []
    if None in fsizes:
        raise RowsUnproven(f"'{node.name}' reshapes symbolic feature dims")
    total, k = 1, len(b)
    for s in fsizes:
        total *= s
    prod = 1
    while prod != total:
        if k == p:
            raise RowsUnproven(f"'{node.name}' ({op_name(node)}) splits the features across token dims")
        s = concrete_int(b[k - 1])
        if s is None:
            raise RowsUnproven(f"'{node.name}' ({op_name(node)}) mixes features with a symbolic dim")
        prod *= s
        k -= 1
        if prod > total or (total % prod):
            raise RowsUnproven(f"'{node.name}' ({op_name(node)}) does not keep the feature dims whole")
    lead = "t" if "t" in rest else "f"  # without token dims in the reshaped part, the leading 1s are features
    out_f = [concrete_int(s) for s in b[k:]]
    new_dims = src.dims[:p] + [lead] * (k - p) + ["f"] * (len(b) - k)
    keep = src.labels.shape[:src.labels.dim() - nf]
    lead_f = [1] * (k - p) if lead == "f" else []
    return _State(new_dims, src.labels.reshape(list(keep) + lead_f + out_f))


def _index(src: _State, idx, node: fx.Node, a: list) -> _State:
    """x[idx] with slices, ints, None, Ellipsis and at most one list of ints."""
    idx = idx if isinstance(idx, tuple) else (idx,)
    real = sum(1 for i in idx if i is not None and i is not Ellipsis)
    dims, labels, pos, out_dims = src.dims, src.labels, 0, []
    sel: list = []  # per labels axis: an index object
    lists = 0
    for i in idx:
        if i is Ellipsis:
            for _ in range(len(dims) - real):
                out_dims.append(dims[pos])
                if dims[pos] == "f":
                    sel.append(slice(None))
                pos += 1
            continue
        if i is None:
            out_dims.append("f")
            sel.append(None)
            continue
        if pos >= len(dims):
            raise RowsUnproven(f"'{node.name}' indexes past the last dim")
        kind, size = dims[pos], a[pos]
        if isinstance(i, slice):
            if kind == "t":
                if i not in (slice(None), slice(0, None), slice(None, None, 1)):
                    raise RowsUnproven(f"'{node.name}' slices a token dim")
            else:
                bounds = i.indices(concrete_int(size))
                if bounds[2] <= 0:
                    raise RowsUnproven(f"'{node.name}' slices with step {bounds[2]}")
                sel.append(slice(*bounds))
            out_dims.append(kind)
        elif isinstance(i, int) and not isinstance(i, bool):
            if kind == "t":
                raise RowsUnproven(f"'{node.name}' indexes a token dim")
            sel.append(i)
        elif isinstance(i, (list, tuple)) and all(isinstance(j, int) and not isinstance(j, bool) for j in i):
            if kind == "t" or lists:
                raise RowsUnproven(f"'{node.name}' gathers along a token dim or along two dims")
            lists += 1
            sel.append(torch.tensor(list(i), dtype=torch.long))
            out_dims.append(kind)
        else:
            raise RowsUnproven(f"'{node.name}' indexes with {type(i).__name__} (a gather the rows cannot follow)")
        pos += 1
    if lists and any(isinstance(i, int) and not isinstance(i, bool) for i in idx):
        raise RowsUnproven(f"'{node.name}' mixes an integer with a list index (advanced indexing moves dims)")
    out_dims += dims[pos:]
    sel += [slice(None)] * (labels.dim() - sum(1 for s in sel if s is not None))
    # apply axis by axis (None inserts an axis; a list gathers along one axis)
    axis = 0
    for s in sel:
        if s is None:
            labels = labels.unsqueeze(axis)
            axis += 1
        elif isinstance(s, int):
            labels = labels.select(axis, s)
        elif isinstance(s, torch.Tensor):
            labels = labels.index_select(axis, s % labels.shape[axis])
            axis += 1
        else:
            labels = labels[(slice(None),) * axis + (s,)]
            axis += 1
    return _State(out_dims, labels)


def _permute(src: _State, perm: list) -> _State:
    dims = [src.dims[p] for p in perm]
    axes = [_f_axis(src.dims, p) for p in perm if src.dims[p] == "f"]
    return _State(dims, src.labels.permute(axes) if axes else src.labels)


def _step(node: fx.Node, src: _State, src_node: fx.Node) -> _State:
    """The state of `node`'s output from the state of its input `src_node` (its first argument, or the tensor
    its split came from)."""
    name = op_name(node)
    a, b = _sizes(src_node), _sizes(node)
    rank = len(a)
    if name in _SAME:
        if len(a) != len(b) or not all(same_size(x, y) for x, y in zip(a, b)):
            raise RowsUnproven(f"'{node.name}' ({name}) changes the shape")
        return src
    if name in _RESHAPES:
        return _reshape(src, a, b, node)
    if name == "transpose":
        d0, d1 = (arg(node, 1, "dim0"), arg(node, 2, "dim1"))
        perm = list(range(rank))
        perm[d0 % rank], perm[d1 % rank] = perm[d1 % rank], perm[d0 % rank]
        return _permute(src, perm)
    if name == "permute":
        perm = node.args[1] if isinstance(node.args[1], (list, tuple)) else node.args[1:]
        return _permute(src, [p % rank for p in perm])
    if name == "unsqueeze":
        d = arg(node, 1, "dim") % (rank + 1)
        dims = src.dims[:d] + ["f"] + src.dims[d:]
        return _State(dims, src.labels.unsqueeze(_f_axis(dims, d)))
    if name == "squeeze" and isinstance(arg(node, 1, "dim"), int):
        d = arg(node, 1, "dim") % rank
        if concrete_int(a[d]) != 1:
            return src
        dims = src.dims[:d] + src.dims[d + 1:]
        return _State(dims, src.labels.squeeze(_f_axis(src.dims, d)) if src.dims[d] == "f" else src.labels)
    if name == "select":
        d, i = arg(node, 1, "dim") % rank, arg(node, 2, "index")
        return _index(src, (slice(None),) * d + (i,), node, a)
    if name == "narrow":
        d, start, length = arg(node, 1, "dim") % rank, arg(node, 2, "start"), arg(node, 3, "length")
        return _index(src, (slice(None),) * d + (slice(start, start + length),), node, a)
    if name == "getitem":
        split = node.args[0]
        if is_op(split, *_SPLITS):
            return _split_part(node, split, src, a)
        return _index(src, node.args[1], node, a)
    raise RowsUnproven(f"the value passes through '{node.name}' ({name}), which the row mapping does not follow")


def _split_part(item: fx.Node, split: fx.Node, src: _State, a: list) -> _State:
    """Part `i` of `split(x, size, dim)` / `chunk(x, n, dim)` (a slice along dim) or `unbind(x, dim)` (an index)."""
    i = item.args[1]
    dim = arg(split, 1 if is_op(split, "unbind") else 2, "dim", 0)
    if not isinstance(i, int) or not isinstance(dim, int):
        raise RowsUnproven(f"'{split.name}' has a symbolic dim or part")
    dim %= len(a)
    if src.dims[dim] == "t":
        raise RowsUnproven(f"'{split.name}' splits a token dim")
    if is_op(split, "unbind"):  # part i: x.select(dim, i)
        return _index(src, (slice(None),) * dim + (i,), item, a)
    length = concrete_int(a[dim])
    size = arg(split, 1, "split_size_or_sections", arg(split, 1, "chunks", arg(split, 1, "split_sizes")))
    if length is None:
        raise RowsUnproven(f"'{split.name}' splits a symbolic dim")
    if is_op(split, "chunk"):
        step = -(-length // size)
        bounds = [(j, min(j + step, length)) for j in range(0, length, step)]
    elif isinstance(size, int):
        bounds = [(j, min(j + size, length)) for j in range(0, length, size)]
    elif isinstance(size, (list, tuple)) and all(isinstance(s, int) for s in size):
        starts = [sum(size[:j]) for j in range(len(size))]
        bounds = list(zip(starts, [s + w for s, w in zip(starts, size)]))
    else:
        raise RowsUnproven(f"'{split.name}' has sizes that are not constants")
    lo, hi = bounds[i]
    return _index(src, (slice(None),) * dim + (slice(lo, hi),), item, a)


def _chain_to_projection(new_v: fx.Node, gm) -> tuple[Projection, list]:
    """The projection behind `new_v` and the nodes from its output to new_v (a split node is stepped over: its
    getitem carries the part)."""
    chain, n = [], new_v
    for _ in range(32):
        proj = projection_of(n, gm)
        if proj is not None:
            return proj, list(reversed(chain))
        if not is_op(n, *_FOLLOWED) or not isinstance(n.args[0], fx.Node):
            hint = "" if n is new_v else f" (reached from the value through {len(chain)} data-movement ops)"
            raise RowsUnproven(f"the value is not a projection's output moved by view/transpose/split/slice ops: "
                               f"it passes through '{n.name}' ({op_name(n)}){hint}")
        chain.append(n)
        n = n.args[0]
        if is_op(n, *_SPLITS) and is_op(chain[-1], "getitem"):
            n = n.args[0]
    raise RowsUnproven("the value is more than 32 ops away from any projection")


def value_rows(new_v: fx.Node, gm: fx.GraphModule, kv_heads: int, head_dim: int) -> tuple[Projection, torch.Tensor]:
    """(projection, rows): rows[h, e] is the projection's output row that holds feature e of kv head h of the
    value `new_v` ([batch, kv_heads, tokens, head_dim]). Raises RowsUnproven with the reason."""
    proj, chain = _chain_to_projection(new_v, gm)
    width = concrete_int(_sizes(proj.out)[-1])
    if width is None:
        raise RowsUnproven("the projection's output width is symbolic")
    rank = len(_sizes(proj.out))
    state = _State(["t"] * (rank - 1) + ["f"], torch.arange(width))
    states, src = {proj.out: state}, proj.out
    for node in chain:
        states[node] = _step(node, states[src], src)
        src = node
    value = states[new_v]
    # every other reader of the chain (the query's and key's parts) must read rows outside the value's
    on_chain = set(chain)
    read: set = set()
    for parent in [proj.out] + chain[:-1]:
        readers = list(parent.users)
        for u in readers:
            if u in on_chain:
                continue
            if is_op(u, *_SPLITS) and u.args[0] is parent:
                for part in u.users:
                    if part in on_chain:
                        continue
                    if not is_op(part, "getitem"):
                        raise RowsUnproven(f"the split '{u.name}' is read by '{part.name}', not by its parts")
                    read |= set(_split_part(part, u, states[parent], _sizes(parent)).labels.flatten().tolist())
                continue
            if is_op(u, *_SHAPE_ONLY):
                continue
            try:
                read |= set(_step(u, states[parent], parent).labels.flatten().tolist())
            except RowsUnproven:
                raise RowsUnproven(f"the projection output is also read by '{u.name}' ({op_name(u)}), which the row "
                                   f"mapping does not follow: it may read the value's rows") from None
    sizes = _sizes(new_v)
    if len(sizes) != 4 or (value.dims[1] != "f" and concrete_int(sizes[1]) != 1) or value.dims[3] != "f" \
            or any(value.dims[i] == "f" and concrete_int(sizes[i]) != 1 for i in (0, 2)):
        raise RowsUnproven(f"the value's dims {value.dims} are not [tokens, kv heads, tokens, head_dim] features")
    full = value.labels.reshape([concrete_int(s) if k == "f" else 1 for k, s in zip(value.dims, sizes)])
    rows = full[0, :, 0, :]
    if tuple(rows.shape) != (kv_heads, head_dim):
        raise RowsUnproven(f"the value has {rows.shape[0]} heads of head_dim {rows.shape[1]}, the key {kv_heads} of "
                           f"{head_dim}: a value head_dim other than the key's (as in multi-head latent attention) is "
                           f"not supported")
    if rows.unique().numel() != rows.numel():
        raise RowsUnproven("the value repeats projection rows (a broadcast of one row to several features)")
    if read & set(rows.flatten().tolist()):
        raise RowsUnproven("another reader of the projection output (the query's or key's part) reads value rows")
    return proj, rows
