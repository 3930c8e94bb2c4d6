"""Attention that reads a `SpectralCache`: fold the value basis into v_proj/o_proj and, for decode steps,
replace "dequantize the whole cache then SDPA" with one `sqcompile::decode_attention` over the packed codes.

What the cache's update() traces to (per layer):

    v_store = ((value.to(f32) - v_mean).transpose(0, 1).reshape(Hkv, B*n, d) @ v_basis^T)   (`cache.rotate_values`:
              .reshape(Hkv, B, n, d).transpose(0, 1)          one bmm over kv-heads; a plain broadcast matmul is
                                                              matched too)
    sqcompile.quantize_write(key, v_store, k_packed, v_packed, positions, k_basis, k_mean, codebooks, ...)
    k_hat = dequantize_packed(k_packed, ...) @ k_basis + k_mean          -> repeat_kv -> SDPA(q, k_hat, v_hat)
    v_hat = dequantize_packed(v_packed, ...) @ v_basis + v_mean

After the rewrite: SDPA reads the storage-basis values (o_proj absorbs v_basis^T and the mean; the write side
keeps the cache's online value rotation of the new tokens, so compiled and eager write identical codes); and a single-token query (decode) calls
`decode_attention(q, k_packed, v_packed, lengths, ...)`, which rotates q in its prologue, so neither the
FP16 K nor V of the cache is ever materialised. A multi-token query (prefill) keeps SDPA over the
dequantized cache. A boolean [B, 1, 1, T] mask (padding, sliding window) is passed to the kernel per token;
an additive float mask (a bias such as ALiBi) keeps SDPA.

With the cache's exact sink token (`keep_sink`), the read is `put_sink(k_hat, sink_k, sink_pos)` for keys and
`put_sink(dequantize(values), sink_v, sink_pos) @ basis + mean` for values; with `exact_new` the step's own tokens
are put over their rows too (`index_copy`). A decode step hands the op one extra split holding the exact sink and
its own token (`sqcompile.kernels.sink.extra_inputs`) and the sink's position: the kernel skips the sink's codes,
reads the cache up to the new token, and merges the extra split. With a recent window (`put_window` under the
other rows), the extra split also holds the window's ring and the codes are read only up to its first position.
"""
from __future__ import annotations

import math
import operator
from typing import Optional

import torch
import torch.fx as fx

from .detect_attention import _strip_kv_read, _trace_value_rows, _Unproven, o_proj_or_read
from .fold_value_rotation import fold_value_rotation
from .insert_output_rotation import insert_output_rotation
from .insert_sink_value import insert_sink_value, sink_value
from .fx_utils import (add_constant, arg, concrete_int, is_op, layer_from_name, meta_tensor, node_source_name,
                       op_name, same_size, tensor_value)
from .sites import Site


def _ops():
    from ..kernels import decode_attention as _d  # noqa: F401  (registers the ops)
    from ..kernels import decode_attention_fast as _f  # noqa: F401  (also sqcompile::decode_attention_fast_write)
    from ..kernels import dequantize as _q  # noqa: F401
    from ..kernels import fast_cache as _c  # noqa: F401

    ops = torch.ops.sqcompile
    return ((ops.dequantize_packed, ops.dequantize_packed.default, ops.dequantize_fast, ops.dequantize_fast.default),
            (ops.quantize_write, ops.quantize_write.default, ops.quantize_write_fast, ops.quantize_write_fast.default))


def _is_fast_write(qw: fx.Node) -> bool:
    ops = torch.ops.sqcompile
    return qw.target in (ops.quantize_write_fast, ops.quantize_write_fast.default)


def _strip_to(n):
    while is_op(n, "to", "contiguous"):
        n = n.args[0]
    return n


def _is_put_sink(n) -> bool:
    from ..kernels import sink as _s  # noqa: F401  (registers sqcompile::put_sink)

    ops = torch.ops.sqcompile
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in (ops.put_sink, ops.put_sink.default)


def _is_put_window(n) -> bool:
    from ..kernels import sink as _s  # noqa: F401  (registers sqcompile::put_window)

    ops = torch.ops.sqcompile
    return isinstance(n, fx.Node) and n.op == "call_function" and n.target in (ops.put_window, ops.put_window.default)


def _peel(n):
    """n through the rows a cache puts over its dequantized read (the exact sink: put_sink; the recent window:
    put_window; a prefill's own tokens: index_copy) -> (the read, those nodes outermost first)."""
    over = []
    n = _strip_to(n)
    while _is_put_sink(n) or _is_put_window(n) or (is_op(n, "index_copy") and isinstance(n.args[0], fx.Node)):
        over.append(n)
        n = _strip_to(n.args[0])
    return n, over


def _match_read(base: fx.Node, dequant) -> Optional[dict]:
    """base = over(dequantize_packed(packed)) @ basis + mean[None, :, None, :], wrapped in more of `_peel`'s rows
    -> {dq, basis, mean, store: what the matmul reads, sink: the put_sink node or None, sink_inner: whether the
    sink is put in the storage basis, fresh / fresh_inner: the same for the index_copy of the new tokens' rows}."""
    base, outer = _peel(base)
    if not is_op(base, "add") or not is_op(base.args[0], "matmul"):
        return None
    mm = base.args[0]
    dq, inner = _peel(mm.args[0])
    if not (isinstance(dq, fx.Node) and dq.op == "call_function" and dq.target in dequant):
        return None
    sinks = [n for n in outer + inner if _is_put_sink(n)]
    windows = [n for n in outer + inner if _is_put_window(n)]
    fresh = [n for n in outer + inner if not (_is_put_sink(n) or _is_put_window(n))]
    if len(sinks) > 1 or len(fresh) > 1 or len(windows) > 1:
        return None
    # the precedence the decode op's exact split applies (the new token over a slot over the window): the window's
    # rows put first, under the others
    order = inner[::-1] + outer[::-1]  # innermost (first applied) first
    if windows and order.index(windows[0]) != 0:
        return None
    mean = base.args[1]
    mean = mean.args[0] if is_op(mean, "getitem") else mean
    return dict(dq=dq, basis=mm.args[1], mean=mean, store=_strip_to(mm.args[0]), sink=sinks[0] if sinks else None,
                sink_inner=bool(sinks) and sinks[0] in inner, fresh=fresh[0] if fresh else None,
                fresh_inner=bool(fresh) and fresh[0] in inner, window=windows[0] if windows else None,
                window_inner=bool(windows) and windows[0] in inner)


def upgrade_spectral_sites(gm: fx.GraphModule, sites: list[Site]) -> None:
    """Sites whose K/V come from a SpectralCache: prove them (the generic detector cannot see the write)."""
    if not sites:
        return
    dequant, qwrite = _ops()
    for site in sites:
        if site.kind != "attention" or site.form not in ("sdpa", "eager+sinks"):
            continue
        attn = site.nodes.get("attn") or _attn_of(gm, site)
        if attn is None:
            continue
        sink = site.nodes.get("candidate") if site.form == "eager+sinks" else None  # `_sink_attention`'s match
        if site.form == "eager+sinks" and sink is None:
            continue
        key, value = (arg(attn, 1, "key"), arg(attn, 2, "value")) if sink is None else (sink["k"], sink["v"])
        k_read = _match_read(_strip_kv_read(key), dequant)
        v_read = _match_read(_strip_kv_read(value), dequant)
        if k_read is None or v_read is None:
            continue
        try:
            _prove_spectral(gm, site, attn, k_read, v_read, qwrite, sink=sink)
            site.reason = None
        except _Unproven as e:
            site.leave(f"SpectralCache attention: {e}")


def _attn_of(gm: fx.GraphModule, site: Site) -> Optional[fx.Node]:
    return site.nodes.get("attn_candidate")


def _prove_spectral(gm, site, attn, k_read, v_read, qwrite, sink: Optional[dict] = None) -> None:
    """`sink`: the attention-sink form's match (`detect_attention._sink_attention`; attn is then its q @ k^T and the
    value product is sink["out"]), else attn is SDPA."""
    k_dq, k_sink = k_read["dq"], k_read["sink"]
    v_dq, v_basis, v_mean, v_sink = v_read["dq"], v_read["basis"], v_read["mean"], v_read["sink"]
    k_window, v_window = k_read["window"], v_read["window"]
    for part, what in (("sink", "exact sink"), ("window", "recent window")):
        k_part, v_part = k_read[part], v_read[part]
        if (k_part is None) != (v_part is None):
            raise _Unproven(f"the {what} replaces only one of K and V")
        if k_part is not None:
            if k_part.args[2] is not v_part.args[2]:
                raise _Unproven(f"K and V {part}s have different positions")
            if k_read[f"{part}_inner"] or not v_read[f"{part}_inner"]:
                raise _Unproven(f"the {what} is not on the model-basis keys and the storage-basis values")
    k_fresh, v_fresh = k_read["fresh"], v_read["fresh"]
    if (k_fresh is None) != (v_fresh is None):
        raise _Unproven("the new tokens' exact rows replace only one of K and V")
    k_packed, v_packed = k_dq.args[0], v_dq.args[0]
    writers = [u for u in k_packed.users if u.op == "call_function" and u.target in qwrite and u.args[2] is k_packed]
    if len(writers) != 1 or writers[0].args[3] is not v_packed:
        raise _Unproven("packed K/V are not written by exactly one quantize_write of this layer")
    qw = writers[0]
    if k_fresh is not None:
        model_basis_keys = not k_read["fresh_inner"] and v_read["fresh_inner"]
        at_written = k_fresh.args[2] is qw.args[4] and v_fresh.args[2] is qw.args[4]
        written = _strip_to(k_fresh.args[3]) is _strip_to(qw.args[0]) and _strip_to(v_fresh.args[3]) is _strip_to(qw.args[1])
        if not (model_basis_keys and at_written and written):
            raise _Unproven("the exact rows put over the read are not the tokens this step writes")
    v_store = _strip_to(qw.args[1])
    sub = _match_value_rotation(v_store)
    if sub is None:
        raise _Unproven("the value written is not (v - mean) @ basis^T")
    new_v = _strip_to(sub.args[0])
    q = arg(attn, 0, "query")
    qt, nv = meta_tensor(q), meta_tensor(new_v)
    if qt is None or nv is None:
        raise _Unproven("no shapes recorded for q/v")
    site.q_heads, site.head_dim = concrete_int(qt.shape[1]), concrete_int(qt.shape[-1])
    site.kv_heads = concrete_int(nv.shape[1])
    if None in (site.q_heads, site.head_dim, site.kv_heads) or site.q_heads % site.kv_heads:
        raise _Unproven("head counts are symbolic or not a GQA ratio")
    v_lin, v_offset, v_rows = _trace_value_rows(new_v, gm, site.kv_heads, site.head_dim)
    out = attn if sink is None else sink["out"]
    o_lin, output_read = o_proj_or_read(out, gm, site.q_heads, site.head_dim)
    for u in new_v.users:
        if u is sub or (is_op(u, "to", "contiguous") and set(u.users) == {sub}):
            continue
        raise _Unproven(f"the value has a consumer outside the cache write: '{u.name}'")
    mask = arg(attn, 3, "attn_mask") if sink is None else None
    q_len = concrete_int(qt.shape[2])
    decode, why = q_len == 1, None
    if sink is not None:
        scale, mask, why = _sink_score_terms(attn, sink["sink_cat"])
        decode = decode and why is None
    if decode and isinstance(mask, fx.Node):
        mt, cap = meta_tensor(mask), concrete_int(meta_tensor(k_packed).shape[2]) if meta_tensor(k_packed) is not None else None
        if mt is None or (mt.dtype != torch.bool and not (sink is not None and mt.is_floating_point())):
            decode, why = False, "the attention mask is not boolean (an additive bias cannot be a token mask)"
        elif mt.dim() != 4 or concrete_int(mt.shape[1]) != 1 or concrete_int(mt.shape[2]) != 1 \
                or concrete_int(mt.shape[3]) != cap:
            decode, why = False, f"the attention mask has shape {tuple(mt.shape)}, not [B, 1, 1, capacity]"
    site.nodes["decode_reason"] = why
    layer = layer_from_name(node_source_name(_strip_to(k_packed)))
    if layer is None:
        w = arg(v_lin, 1, "weight")
        layer = layer_from_name(node_source_name(w)) if isinstance(w, fx.Node) else None
    site.layer = site.layer if layer is None else layer
    site.kv_write = "spectral"
    site.rope = site.rope or False
    if sink is not None:
        from .detect_attention import SINK_NODES

        site.nodes.update({key: sink[key] for key in SINK_NODES}, sink_scale=scale, sink_mask=mask)
    site.nodes.update(spectral=True, attn=attn, out=out, q=q, qwrite=qw, v_store=v_store, new_v=new_v,
                      v_linear=v_lin, v_offset=v_offset, v_rows=v_rows, o_linear=o_lin, output_read=output_read,
                      v_basis=v_basis, v_mean=v_mean,
                      decode=decode,
                      k_packed=k_packed, v_packed=v_packed, k_sink=k_sink, v_sink=v_sink, exact_new=k_fresh is not None,
                      k_window=k_window, v_window=v_window,
                      # what SDPA reads of V in the storage basis once o_proj absorbs the basis
                      v_dq=v_read["store"])


def _shape_ops(n, ops=("transpose", "reshape", "view", "contiguous", "to")):
    """n under the shape-only ops of `cache.rotate_values` (and dtype casts)."""
    while is_op(n, *ops) and isinstance(n.args[0], fx.Node):
        n = n.args[0]
    return n


def _match_value_rotation(v_store) -> Optional[fx.Node]:
    """The subtraction `v - mean` of the value rotation the cache writes, (v - mean) @ basis^T, in the form of
    `cache.rotate_values` (one bmm over kv-heads, between transposes and reshapes) or a plain broadcast matmul;
    None when v_store is neither."""
    mm = _shape_ops(v_store)
    if not is_op(mm, "matmul"):
        return None
    sub = _shape_ops(mm.args[0])
    return sub if is_op(sub, "sub") else None


def _erase_dead(nodes: list) -> None:
    """Erase nodes left without users (and their inputs that become dead), never anything that mutates."""
    todo = [n for n in nodes if isinstance(n, fx.Node)]
    while todo:
        n = todo.pop()
        if getattr(n, "_erased", False) or n.graph is None or n.users or n.op not in ("call_function", "call_method"):
            continue
        if is_op(n, "index_copy_", "add_", "copy_") or "quantize_write" in str(n.target) or "assert" in str(n.target) \
                or getattr(getattr(n.target, "_schema", None), "is_mutable", False):
            continue
        inputs = n.all_input_nodes
        n.graph.erase_node(n)
        todo.extend(inputs)


def substitute_decode_attention(gm: fx.GraphModule, site: Site, example_inputs: Optional[list]) -> None:
    """Fold the cache's value basis into o_proj; decode steps read the packed codes directly."""
    nodes = site.nodes
    basis_t = tensor_value(gm, _strip_to(nodes["v_basis"]), example_inputs)
    mean_t = tensor_value(gm, _strip_to(nodes["v_mean"]), example_inputs)
    if basis_t is None or mean_t is None:
        raise _Unproven("the cache's value basis is not a graph input")
    # o_proj absorbs the value basis; the write keeps the cache's own (v - mu) @ B_v^T for the one new token,
    # so the codes written are bit-identical to the eager cache's. Without an o_proj to absorb it (a gated output),
    # the attention output is mapped back after attention (`insert_output_rotation`, at the end).
    fold_value_rotation(gm, site, basis_t, mean_t, example_inputs, fold_v_proj=False)
    # SDPA reads the storage-basis values; o_proj (folded) or the output rotation maps them back.
    v_dq = nodes["v_dq"]
    v_hat = [u for u in v_dq.users if is_op(u, "matmul")]
    for mm in v_hat:
        for add in list(mm.users):
            if is_op(add, "add"):
                add.replace_all_uses_with(v_dq)
                _erase_dead([add])
    attn, qw = nodes["attn"], nodes["qwrite"]
    sinks = nodes.get("sink_slice") is not None  # attention sinks (GPT-OSS): eager scores, one more softmax column
    site.rotation = True
    site.quantized = True
    if not nodes["decode"]:
        out = nodes["out"]
        if sinks:  # the eager softmax stays: its sink column gets the storage-basis value of zero (-B_v mu_v)
            out = insert_sink_value(gm, site, basis_t, mean_t)
        _undo_at_read(gm, site, out, basis_t, mean_t)
        site.kernel = ("eager attention" if sinks else "sdpa") + " over the dequantized cache" + (
            f" ({nodes['decode_reason']})" if nodes.get("decode_reason") else " (prefill)")
        return
    q = nodes["q"]
    scale = arg(attn, 6, "scale") if not sinks else nodes["sink_scale"]
    if scale is None:
        scale = 1.0 / math.sqrt(site.head_dim)
    elif not isinstance(scale, fx.Node):
        scale = float(scale)
    # else: a graph input (dynamo makes a float argument symbolic once one code object has seen two values, e.g.
    # two models with different head_dim in one process): the ops read it at run time, never a stale constant
    positions = qw.args[4]
    a = qw.args
    # the eager sink form: at the value product (the sink logits are read after q @ k^T)
    with gm.graph.inserting_before(nodes["out"] if sinks else attn):
        q3 = gm.graph.call_method("select", (q, 2, 0))
        last = gm.graph.call_method("max", (positions,))
        # the step's own token exact (its rows put over the read): the kernel reads the cache up to it, not it
        length = last if nodes.get("exact_new") else gm.graph.call_function(torch.add, (last, 1))
        length = gm.graph.call_method("to", (length, torch.int32))
        k_window, v_window = nodes.get("k_window"), nodes.get("v_window")
        if k_window is not None:  # the codes end where the recent window's ring begins (per row)
            from ..kernels import sink as _sink

            lengths = gm.graph.call_function(_sink.codes_lengths, (length, k_window.args[2]))
        else:
            batch = gm.graph.call_method("size", (q, 0))  # symbolic under dynamic shapes
            lengths = gm.graph.call_method("reshape", (length, (1,)))
            lengths = gm.graph.call_method("expand", (lengths, batch))
            lengths = gm.graph.call_method("contiguous", (lengths,))
        mask = arg(attn, 3, "attn_mask") if not sinks else nodes["sink_mask"]
        kv_mask = None
        if isinstance(mask, fx.Node) and meta_tensor(mask).is_floating_point():  # the sink form's handed-in mask
            kv_mask = _bias_token_mask(gm, mask)
        elif isinstance(mask, fx.Node):  # [B|1, 1, 1, T] bool -> [B|1, T] uint8: padding and windows, read per token
            kv_mask = _token_mask(gm, mask)
        sink = {}
        if nodes.get("k_sink") is not None or nodes.get("exact_new") or k_window is not None:
            # the exact tokens as the op's extra split: the sink (its codes skipped), this step's own token, the
            # recent window (the codes read before it)
            from ..kernels import sink as _sink  # noqa: F401  (registers sqcompile::exact_split)

            k_sink, v_sink = nodes["k_sink"], nodes["v_sink"]
            exact_sink = (None,) * 3 if k_sink is None else (k_sink.args[1], v_sink.args[1], k_sink.args[2])
            new = (a[0], a[1], positions) if nodes.get("exact_new") else (None,) * 3
            window = () if k_window is None else (k_window.args[1], v_window.args[1], k_window.args[2])
            ex = gm.graph.call_function(torch.ops.sqcompile.exact_split.default,
                                        (q3, a[6], kv_mask, scale, *exact_sink, *new, *window))
            sink = {name: gm.graph.call_function(operator.getitem, (ex, i))
                    for i, name in enumerate(("sink_score", "sink_value", "sink_pos"))}
        if sinks:  # the sink logit as one more entry of the extra split
            sink = _add_sink_logit(gm, site, q3, a[6], scale, basis_t, mean_t, sink)
        if _is_fast_write(qw):
            # (key, v_store, k_packed, v_packed, positions, k_basis, k_mean, k_layout, v_layout): layouts are str
            from ..quant.fast_layout import FastLayout

            kl, vl = (FastLayout.from_spec(site.head_dim, spec) for spec in (a[7], a[8]))
            k_fac, v_fac = (_column_factor(gm, site, lay, q, attn) for lay in (kl, vl))
            out = gm.graph.call_function(torch.ops.sqcompile.decode_attention_fast.default,
                                         (q3, a[2], a[3], lengths, a[5], k_fac, v_fac, kl.flat_groups(),
                                          vl.flat_groups(), scale), {"kv_mask": kv_mask, **sink})
        else:
            out = gm.graph.call_function(torch.ops.sqcompile.decode_attention.default,
                                         (q3, a[2], a[3], lengths, a[5], a[7], a[8], a[9], a[10], a[11], a[12],
                                          a[13], a[14], a[15], scale), {"kv_mask": kv_mask, **sink})
        out4 = gm.graph.call_method("unsqueeze", (out, 2))
    replaced = nodes["out"] if sinks else attn  # the eager form: the value product; its scores die with it
    old_inputs = list(replaced.all_input_nodes)
    replaced.replace_all_uses_with(out4)
    gm.graph.erase_node(replaced)
    _erase_dead(old_inputs)
    _undo_at_read(gm, site, out4, basis_t, mean_t, like=replaced)
    site.kernel = "decode_attention_fast" if _is_fast_write(qw) else "decode_attention"
    site.nodes["decode_op"] = out  # `choose_kernels` hands it the compile's implementation
    if _is_fast_write(qw):
        _fuse_write(gm, site, qw, out)


def _undo_at_read(gm: fx.GraphModule, site: Site, out: fx.Node, basis_t: torch.Tensor, mean_t: torch.Tensor,
                  like: Optional[fx.Node] = None) -> None:
    """A site whose o_proj could not absorb the value basis (a gated output): the attention output `out` (storage
    basis) mapped back to the model basis right after it (on GPU, the decode kernel's epilogue). `like`: the
    replaced attention node, whose recorded value has out's shape."""
    if site.nodes.get("o_linear") is None:
        insert_output_rotation(gm, site, out, basis_t, mean_t, like=like)
        site.output_rotation = f"at the read ({site.nodes['output_read']})"


def _sink_score_terms(attn: fx.Node, cat: fx.Node) -> tuple:
    """The scores of the attention-sink form between q @ k^T (`attn`) and the cat with the sinks: (scale, boolean
    token mask or None, None) when they are `q @ k^T * c (/ c) (+ where(mask, 0, -big))`, else (None, None, why not)
    (such a site keeps the eager softmax over the dequantized cache)."""
    n, scale, mask = arg(cat, 0, "tensors")[0], 1.0, None
    for _ in range(8):
        if n is attn:
            return scale, mask, None
        if is_op(n, "mul", "truediv", "div") and isinstance(n.args[1], (int, float)) and n.args[0] is not None:
            scale = scale * n.args[1] if is_op(n, "mul") else scale / n.args[1]
            n = n.args[0]
        elif is_op(n, "add") and len(n.args) == 2 and mask is None and all(isinstance(x, fx.Node) for x in n.args):
            chain, bias = (n.args[0], n.args[1]) if _reaches(n.args[0], attn) else (n.args[1], n.args[0])
            mask = _token_mask_of(bias)
            handed_in, bt = _mask_root(bias), meta_tensor(bias)
            if mask is None and (bt is None or not bt.is_floating_point() or handed_in.op != "placeholder"):
                return None, None, ("the scores get an additive bias that is not a token mask (where(mask, 0, -inf)) "
                                    f"nor a float mask input: '{_describe(bias)}'")
            # a float mask handed in (`generate` builds it outside the graph), or a slice of one that keeps its
            # shape: read as a token mask at run time, where the op raises on any value but 0 and -inf
            # (`sink_logits.token_mask_from_bias`)
            mask = handed_in if mask is None else mask
            n = chain
        else:
            break
    return None, None, f"the scores pass through '{n.target if isinstance(n, fx.Node) else n}' before the sinks"


def _reaches(n, target: fx.Node, depth: int = 8) -> bool:
    for _ in range(depth):
        if n is target:
            return True
        if not isinstance(n, fx.Node) or not n.args or not isinstance(n.args[0], fx.Node):
            return False
        n = n.args[0]
    return n is target


def _token_mask_of(bias: fx.Node) -> Optional[fx.Node]:
    """`where(mask, 0, -big)` (transformers' eager mask from a boolean one; 0 and -big as numbers or as constant
    tensors the graph makes, e.g. `torch.tensor(0.0)` in transformers 5.17, `torch.zeros(())` in 5.25): the boolean
    mask, else None. -big is at or below `sink_logits.HIDDEN_BELOW` (finfo(dtype).min in fp32, bf16 and fp16), and
    0 / -big must not broadcast the mask to another shape."""
    from ..kernels.sink_logits import HIDDEN_BELOW

    if not (is_op(bias, "where") and len(bias.args) == 3):
        return None
    cond, keep, drop = bias.args
    ct, bt = meta_tensor(cond), meta_tensor(bias)
    if ct is None or bt is None or ct.dtype != torch.bool or not bt.is_floating_point() or ct.dim() != bt.dim() \
            or not all(same_size(a, b) for a, b in zip(ct.shape, bt.shape)):
        return None
    keep, drop = _constant_of(keep), _constant_of(drop)
    return cond if keep == 0 and drop is not None and drop <= HIDDEN_BELOW else None


def _constant_of(n) -> Optional[float]:
    """The single value of a number or of a tensor the graph fills with a literal (`torch.tensor(c)`,
    `scalar_tensor(c)`, `new_tensor(c)`, `zeros*`, `full(size, c)`, `full_like(x, c)`, `x.new_full(size, c)`),
    else None."""
    if isinstance(n, (int, float)) and not isinstance(n, bool):
        return float(n)
    if not isinstance(n, fx.Node):
        return None
    if is_op(n, "zeros", "zeros_like", "new_zeros"):
        return 0.0
    if is_op(n, "tensor", "scalar_tensor", "as_tensor") and n.op == "call_function":
        value = arg(n, 0, "data")
    elif is_op(n, "new_tensor") and n.op == "call_method":
        value = arg(n, 1, "data")
    elif is_op(n, "full", "full_like") and n.op == "call_function":
        value = arg(n, 1, "fill_value")
    elif is_op(n, "new_full") and n.op == "call_method":
        value = arg(n, 2, "fill_value")
    else:
        return None
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def _describe(n) -> str:
    """A node as 'op(inputs)', for a reason shown in `explain`."""
    if not isinstance(n, fx.Node):
        return repr(n)
    return f"{op_name(n)}({', '.join(a.name if isinstance(a, fx.Node) else repr(a) for a in n.args)})"


def _add_sink_logit(gm: fx.GraphModule, site: Site, q3: fx.Node, k_mean: fx.Node, scale, basis_t, mean_t,
                    split: dict) -> dict:
    """The decode op's extra split with the site's sink logit merged in (`kernels.sink_logits`): from the exact
    tokens' split where there is one, else the sink alone (no packed copy to skip)."""
    from ..kernels import sink_logits

    value = sink_value(basis_t, mean_t, site.q_heads)
    v_node = None if value is None else add_constant(
        gm, "sq_sink_value", value.to(device=meta_tensor(site.nodes["q"]).device, dtype=torch.float32), q3)
    score_v = gm.graph.call_function(sink_logits.sink_logit_split, (q3, site.nodes["sink_logits"], k_mean, scale,
                                                                   v_node))
    s_score = gm.graph.call_function(operator.getitem, (score_v, 0))
    s_value = gm.graph.call_function(operator.getitem, (score_v, 1))
    if not split:
        return {"sink_score": s_score, "sink_value": s_value,
                "sink_pos": gm.graph.call_function(sink_logits.no_exact_positions, (q3,))}
    merged = gm.graph.call_function(sink_logits.merge_splits, (split["sink_score"], split["sink_value"], s_score,
                                                               s_value))
    return {"sink_score": gm.graph.call_function(operator.getitem, (merged, 0)),
            "sink_value": gm.graph.call_function(operator.getitem, (merged, 1)), "sink_pos": split["sink_pos"]}


def _bias_token_mask(gm: fx.GraphModule, bias: fx.Node) -> fx.Node:
    """`sqcompile::token_mask_from_bias` of an additive mask input, made once after the graph's inputs and shared by
    the layers that read it."""
    from ..kernels import sink_logits  # noqa: F401  (registers sqcompile::token_mask_from_bias)

    for u in bias.users:
        if u.op == "call_function" and u.target == torch.ops.sqcompile.token_mask_from_bias.default:
            return u
    with gm.graph.inserting_after([n for n in gm.graph.nodes if n.op == "placeholder"][-1]):
        return gm.graph.call_function(torch.ops.sqcompile.token_mask_from_bias.default, (bias,))


def _mask_root(mask: fx.Node) -> fx.Node:
    """The mask node under slices that keep its shape (`mask[:, :, :, :T]` with T the capacity): layers that slice
    one mask so share one token mask."""
    while is_op(mask, "getitem") and isinstance(mask.args[0], fx.Node):
        index = mask.args[1] if isinstance(mask.args[1], tuple) else (mask.args[1],)
        inner, outer = meta_tensor(mask.args[0]), meta_tensor(mask)
        if inner is None or outer is None or inner.dim() != outer.dim() \
                or not all(same_size(a, b) for a, b in zip(inner.shape, outer.shape)) \
                or not all(isinstance(i, slice) or i is Ellipsis for i in index):
            break
        mask = mask.args[0]
    return mask


def _token_mask(gm: fx.GraphModule, mask: fx.Node) -> fx.Node:
    """The decode ops' token mask, uint8 [B|1, T] contiguous, from a boolean [B|1, 1, 1, T] attention mask: made
    once per mask in the graph, right after it, and shared by every layer that reads it. (Handed the boolean
    mask, each op converted it itself: one uint8 copy per op, two per layer and step, in the CUDA graph.)"""
    root = _mask_root(mask)
    for u in root.users:
        made = u.meta.get("sq_token_mask")
        if made is not None and made.graph is gm.graph:
            return made
    at = root
    if root.op == "placeholder":  # a mask passed in: after the graph's inputs, not among them
        at = [n for n in gm.graph.nodes if n.op == "placeholder"][-1]
    with gm.graph.inserting_after(at):
        rows = gm.graph.call_function(operator.getitem, (root, (slice(None), 0, 0)))
    with gm.graph.inserting_after(rows):
        u8 = gm.graph.call_method("to", (rows, torch.uint8))
    with gm.graph.inserting_after(u8):
        token_mask = gm.graph.call_method("contiguous", (u8,))
    rows.meta["sq_token_mask"] = token_mask  # the next layer finds it through root.users
    return token_mask


def _fuse_write(gm: fx.GraphModule, site: Site, qw: fx.Node, att: fx.Node) -> None:
    """quantize_write_fast then decode_attention_fast -> one `decode_attention_fast_write` at the attention's
    place, when the write is one token per sequence and nothing else reads or writes the packed K/V (so
    moving the write down to the attention changes no value anyone sees). On CUDA the op stores the token
    inside the decode kernel's first launch."""
    key = meta_tensor(qw.args[0])
    if key is None or key.dim() != 4 or concrete_int(key.shape[2]) != 1:
        site.nodes["write_fusion"] = "not one new token per sequence"
        return
    k_packed, v_packed = qw.args[2], qw.args[3]
    others = [u.name for p in (k_packed, v_packed) for u in p.users if u is not qw and u is not att]
    if others:
        site.nodes["write_fusion"] = f"the packed cache has other users: {others}"
        return
    a = qw.args
    with gm.graph.inserting_before(att):
        fused = gm.graph.call_function(
            torch.ops.sqcompile.decode_attention_fast_write.default,
            tuple(att.args[:10]) + (a[0], a[1], a[4], a[6], a[7], a[8]), dict(att.kwargs))
    fused.meta.update(att.meta)
    att.replace_all_uses_with(fused)
    gm.graph.erase_node(att)
    gm.graph.erase_node(qw)
    site.kernel = "decode_attention_fast_write"
    site.nodes["decode_op"] = fused


def _column_factor(gm: fx.GraphModule, site: Site, lay, q: fx.Node, before: fx.Node) -> fx.Node:
    """The fast kernel's [Hkv, d] level step per column, a constant of the graph on q's device."""
    return add_constant(gm, "sq_fast_factor", lay.column_factor(None, site.kv_heads, device=meta_tensor(q).device),
                        before)
