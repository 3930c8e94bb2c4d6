"""Simulate `SpectralCache` in a plain HF cache: attention reads exactly what the default `SpectralCache` would give it.

Runs after the rotation passes, so the fresh key and value are already in the codec's storage coordinates. With a
plain cache (DynamicCache, StaticCache) the backend gives `SpectralCache`'s quality, not its memory savings.
Attention reads, per layer, `SpectralCache`'s view of the sequence so far (`simulate_read`):

- every token's K/V quantized with the same codec, layout and packing as `SpectralCache(model, profile, bits,
  layout=...)` / `sqcompile.optimize` build from the same options (`KVTransform.codec`), bit for bit;
- its exact slots (`keep_sink`, `outlier_tokens` = the backend option of that name, default
  `sink.OUTLIER_TOKENS`, and `exact_new`, as in `SpectralCache`'s defaults): the sink (cache position 0), the `outlier_tokens` tokens whose keys lie farthest
  from the calibrated key mean (over the whole sequence so far, the sink not counted: the slots `SpectralCache`
  holds after the same updates, since the top-k of a union is the top-k of the earlier top-k and the new tokens),
  and the update's own new tokens, read exact;
- with the backend option `recent_window` W (`SpectralCache(recent_window=W)`, what `sqcompile.optimize(...,
  recent_window=W)` builds), the last W positions up to the last one written read the ring's copy: the key rounded to
  fp16 in the model basis, the value in the storage basis (under the exact slots and the new tokens, as
  `SpectralCache` reads them). In a chunk longer than W that is the chunk's own last W tokens, so its first tokens
  read the previous chunk from the codes, as `SpectralCache`'s ring (overwritten by the chunk before it attends)
  gives them.

The outlier slots need the exact K/V of earlier tokens, so the plain cache stores the rotated K/V exact and the
quantization happens at the read (`sqcompile::simulate_read`, inserted between the cache write and attention's read
of the cache; stateless: recomputed from the cache each step, O(tokens) quantization per step and layer, and with a
window two d x d products per token: a cost of the simulation, not of `SpectralCache`).

Where it differs from `SpectralCache` (the last two cases log a line per layer):
- left-padded batches: the sink is the token at cache position 0, not each row's first real token (RoPE position 0,
  which `SpectralCache` reads from `position_ids`), and padding is not excluded from the outlier slots (the mask
  hides it, but a slot spent on it is one fewer for real tokens);
- a sliding-window layer of a DynamicCache (DynamicSlidingWindowLayer): exact until it first holds window - 1
  tokens; from then on its rows no longer start at position 0 nor cover every token, and it reads the codes with
  only the new tokens exact (`SpectralCache` also keeps exact those of its 4 outlier slots, chosen over the whole
  sequence, that lie inside the window);
- a cache write this pass cannot map rows to positions in (a sliding-window StaticCache's roll or copy) falls back
  to quantizing at the write (`sqcompile::fake_quant`): the codec's format without the exact slots and the window;
- after a `crop` (assisted decoding) `SpectralCache`'s ring holds only the positions it kept, fewer than W until W
  more tokens are written (the dropped tail's earlier positions read from the codes); the simulation, stateless,
  reads the last W positions exact at once. The ring's key is rounded to fp16 after the round trip through the
  storage basis (k_store B + mu), which can differ from the fp16 of the model's key by one unit in the last place;
- QJL codecs: the sketch's score correction is not simulated;
- half-precision models: the graph rotates and stores K/V in the model's dtype before quantizing them in float32;
  `SpectralCache` rotates in float32 (a rounding of the input, not of the format).
"""
from __future__ import annotations

import logging
import operator
from typing import Optional

import torch
import torch.fx as fx

from ..kernels import dequantize as _ops  # noqa: F401  (registers sqcompile::fake_quant)
from ..kernels._bitplanes import format_from_args, kernel_args
from ..kernels.sink import OUTLIER_TOKENS
from .fx_utils import add_constant, is_op, meta_tensor
from .sites import Site

log = logging.getLogger("sqcompile")


def _format(head_dim: int, groups: list[int], codebooks: torch.Tensor, channel_scale: torch.Tensor, fast: bool):
    from ..quant.format import TensorFormat

    fmt = format_from_args(head_dim, groups, codebooks, channel_scale)
    return TensorFormat(fmt.head_dim, fmt.groups, fmt.channel_scale, packing="fast" if fast else "planes")


def simulate_read_reference(k_cache: torch.Tensor, v_cache: torch.Tensor, new_positions: Optional[torch.Tensor],
                            new_tokens: int, k_codebooks: torch.Tensor, k_channel_scale: torch.Tensor,
                            k_groups: list[int], v_codebooks: torch.Tensor, v_channel_scale: torch.Tensor,
                            v_groups: list[int], fast: bool, key_basis: torch.Tensor, key_shift: torch.Tensor,
                            keep_sink: bool, outliers: int, window: int = 0, recent_window: int = 0,
                            key_mean: Optional[torch.Tensor] = None):
    """`SpectralCache`'s view of a plain cache holding exact storage-coordinate K/V [B, Hkv, T, d] (row = cache
    position): every row quantized (keys as k_store - key_shift, the shift added back: key_shift [Hkv, d] is the key
    mean in storage coordinates where the graph did not subtract it, else 0), then rows kept exact: row 0 (the sink,
    `keep_sink`), the `outliers` rows of largest ||(k_store - key_shift) @ key_basis||^2 summed over kv-heads (the
    distance of the model-basis key from the key mean) among rows 1..last written, and the new tokens' rows
    (`new_positions` [n], or the last `new_tokens` rows when None). Rows past the last written one are left as
    quantized zeros (unwritten; the mask hides them). `window` > 0: the rows are the last tokens of a sliding
    window that may have dropped earlier ones (a DynamicSlidingWindowLayer's append: more than `window` - 2 rows
    before the new ones); once it may have, row 0 is no longer known to be the sink nor the rows to be every token
    since the outlier slots were chosen, and only the new tokens are kept exact.
    `recent_window` W > 0: the rows of the last W positions up to the last written one that are not exact above read
    `SpectralCache(recent_window=W)`'s fp16 ring: keys rounded to fp16 in the model basis (key_mean [Hkv, d], the
    model-basis key mean, needed then), values in the storage basis. Returns (keys, values) in k_cache's dtype."""
    B, H, T, D = k_cache.shape
    if window and new_positions is None and T - new_tokens >= window - 1:
        keep_sink, outliers = False, 0
    k = k_cache.to(torch.float32) - key_shift.to(torch.float32)[None, :, None, :]
    v = v_cache.to(torch.float32)
    k_hat = _format(D, k_groups, k_codebooks, k_channel_scale, fast).fake_quant(k)
    v_hat = _format(D, v_groups, v_codebooks, v_channel_scale, fast).fake_quant(v)
    rows = torch.arange(T, device=k.device)
    if new_positions is None:
        new = rows >= T - new_tokens
        last = torch.full((), T - 1, device=k.device)
    else:
        new = (rows[:, None] == new_positions.to(k.device)[None, :]).any(-1)
        last = new_positions.max()
    exact = new[None, :].expand(B, T)
    if keep_sink:
        exact = exact | (rows == 0)[None, :]
    centered = None  # the keys in the model basis, minus the key mean [B, H, T, d]
    if outliers or recent_window:
        centered = torch.matmul(k.transpose(0, 1), key_basis.to(torch.float32)[:, None]).transpose(0, 1)
    if outliers:
        crit = centered.square().sum((1, 3))  # [B, T]
        crit = torch.where((rows >= 1) & (rows <= last), crit, float("-inf"))
        best, idx = crit.topk(min(outliers, T), dim=1)
        held = torch.zeros(B, T, dtype=torch.bool, device=k.device).scatter(1, idx, best > float("-inf"))
        exact = exact | held
    if recent_window:
        if key_mean is None:
            raise ValueError("simulate_read: recent_window > 0 needs key_mean (the model-basis key mean [Hkv, d])")
        ring = ((rows > last - recent_window) & (rows <= last))[None, None, :, None]
        mu = key_mean.to(torch.float32)[None, :, None, :]
        k16 = (centered + mu).to(torch.float16).to(torch.float32) - mu  # the ring's fp16 key, model basis
        k16 = torch.matmul(k16.transpose(0, 1), key_basis.to(torch.float32).transpose(-1, -2)[:, None]).transpose(0, 1)
        k_hat = torch.where(ring, k16, k_hat)
        v_hat = torch.where(ring, v.to(torch.float16).to(torch.float32), v_hat)
    at = exact[:, None, :, None]
    keys = torch.where(at, k, k_hat) + key_shift.to(torch.float32)[None, :, None, :]
    values = torch.where(at, v, v_hat)
    return keys.to(k_cache.dtype), values.to(v_cache.dtype)


@torch.library.custom_op("sqcompile::simulate_read", mutates_args=())
def simulate_read(k_cache: torch.Tensor, v_cache: torch.Tensor, new_positions: Optional[torch.Tensor],
                  new_tokens: int, k_codebooks: torch.Tensor, k_channel_scale: torch.Tensor, k_groups: list[int],
                  v_codebooks: torch.Tensor, v_channel_scale: torch.Tensor, v_groups: list[int], fast: bool,
                  key_basis: torch.Tensor, key_shift: torch.Tensor, keep_sink: bool,
                  outliers: int, window: int, recent_window: int = 0,
                  key_mean: Optional[torch.Tensor] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """`simulate_read_reference` as one op (one node for Inductor; its outputs are fresh tensors)."""
    k, v = simulate_read_reference(k_cache, v_cache, new_positions, new_tokens, k_codebooks, k_channel_scale,
                                   k_groups, v_codebooks, v_channel_scale, v_groups, fast, key_basis, key_shift,
                                   keep_sink, outliers, window, recent_window, key_mean)
    return k.contiguous(), v.contiguous()


@simulate_read.register_fake
def _(k_cache, v_cache, new_positions, new_tokens, k_codebooks, k_channel_scale, k_groups, v_codebooks,
      v_channel_scale, v_groups, fast, key_basis, key_shift, keep_sink, outliers, window, recent_window=0,
      key_mean=None):
    return (torch.empty_like(k_cache, memory_format=torch.contiguous_format),
            torch.empty_like(v_cache, memory_format=torch.contiguous_format))


def _first_read(read: fx.Node, base: fx.Node) -> Optional[fx.Node]:
    """The node of attention's read chain (base -> repeat_kv ... -> read) that takes `base` itself; `read` is base:
    None (attention reads the cache tensor directly)."""
    n = read
    while isinstance(n, fx.Node) and n is not base:
        if n.args and n.args[0] is base:
            return n
        n = n.args[0] if n.args else None
    return None


def _window_slice(n: fx.Node) -> bool:
    """`x[:, :, -w + 1:, :]`: a slice of the token dim that drops the first rows (repeat_kv's `x[:, :, None]` is
    not one)."""
    if not (n.op == "call_function" and n.target is operator.getitem and len(n.args) == 2):
        return False
    idx = n.args[1]
    return isinstance(idx, tuple) and len(idx) > 2 and isinstance(idx[2], slice) and idx[2].start is not None


def _row_positions(site: Site) -> Optional[tuple]:
    """How the cache's rows map to positions, when provable: ("cat", window) for a DynamicCache append (window 0:
    the result is the whole sequence, row = position; window w: a DynamicSlidingWindowLayer's, the rows are the
    whole sequence until the layer first holds w - 1 tokens), ("index_copy", positions) for a StaticCache write at
    `positions`; None otherwise (a roll, a copy: a sliding-window StaticCache)."""
    k_base, v_base = site.nodes.get("k_base"), site.nodes.get("v_base")
    if k_base is None or v_base is None or site.kv_write not in ("cat", "index_copy"):
        return None
    if site.kv_write == "cat":
        # a DynamicSlidingWindowLayer keeps the last `window - 1` rows of the append: x[:, :, -window + 1:]
        windows = {1 - u.args[1][2].start for base in (k_base, v_base) for u in base.users if _window_slice(u)}
        if len(windows) > 1 or not all(isinstance(w, int) and w > 1 for w in windows):
            return None
        return "cat", (windows.pop() if windows else 0)
    writers = []
    for base in (k_base, v_base):
        w = [u for u in base.users if is_op(u, "index_copy_", "index_copy") and u.args[0] is base]
        if len(w) != 1:
            return None
        writers.append(w[0])
    pos = writers[0].args[2] if len(writers[0].args) > 2 else writers[0].kwargs.get("index")
    if pos is None or (writers[1].args[2] if len(writers[1].args) > 2 else writers[1].kwargs.get("index")) is not pos:
        return None
    return "index_copy", (pos, writers)


def insert_kv_quantization(gm: fx.GraphModule, site: Site, codec, outlier_tokens: int = OUTLIER_TOKENS,
                           recent_window: int = 0) -> None:
    """Make attention at `site` read `SpectralCache`'s view of the plain cache (`simulate_read`: with
    `recent_window` W, `SpectralCache(recent_window=W)`'s); where the rows of the cache cannot be mapped to positions,
    quantize at the write instead (`fake_quant`, no exact slots, no window)."""
    how = _row_positions(site)
    if how is None:
        log.info("sqcompile: layer %d (graph %d): the %s cache write does not map rows to positions; quantizing at "
                 "the write without SpectralCache's exact slots (sink, outliers, new tokens%s)", site.layer,
                 site.graph, site.kv_write, ", recent window" if recent_window else "")
        _quantize_at_write(gm, site, codec)
        return
    if how[0] == "cat" and how[1]:
        log.info("sqcompile: layer %d (graph %d): a sliding-window DynamicCache layer (window %d): SpectralCache's "
                 "exact slots until it holds %d tokens, then only the new tokens exact", site.layer, site.graph,
                 how[1], how[1] - 1)
    k_base, v_base = site.nodes["k_base"], site.nodes["v_base"]
    k_first, v_first = _first_read(site.nodes["k_read"], k_base), _first_read(site.nodes["v_read"], v_base)
    kf, vf = codec.format("key", site.layer), codec.format("value", site.layer)
    k_groups, k_cb, k_cs = kernel_args(kf)
    v_groups, v_cb, v_cs = kernel_args(vf)
    t = meta_tensor(site.nodes["key_store"])
    device = t.device if t is not None else torch.device("cpu")
    lc = codec.layers[site.layer]
    basis = lc.key_basis.to(torch.float32)
    centered = site.nodes.get("centering_ok", True)
    # the graph stores (k - mu) B^T where it centers, k B^T where it cannot (soft-capped scores): shift = mu B^T
    shift = torch.zeros_like(lc.key_mean, dtype=torch.float32) if centered else \
        torch.einsum("hd,hed->he", lc.key_mean.to(torch.float32), basis)
    reads = [n for n in (k_first, v_first, site.nodes["k_consumer"], site.nodes["v_consumer"]) if n is not None]
    anchor = next(n for n in gm.graph.nodes if n in reads)
    consts = [add_constant(gm, f"sq_{name}", value.to(device), anchor) for name, value in (
        ("key_codebooks", k_cb), ("key_channel_scale", k_cs), ("value_codebooks", v_cb),
        ("value_channel_scale", v_cs), ("key_basis", basis), ("key_shift", shift))]
    key_mean = add_constant(gm, "sq_key_mean", lc.key_mean.to(torch.float32).to(device), anchor) \
        if recent_window else None
    if how[0] == "cat":
        new_positions, new_tokens, window = None, site.nodes["key_store"], how[1]
    else:
        new_positions, new_tokens, window = how[1][0], None, 0
    with gm.graph.inserting_before(anchor):
        if new_tokens is not None:  # the append's new rows: the last `n` of the sequence
            new_tokens = gm.graph.call_function(torch.ops.aten.sym_size.int, (new_tokens, 2))
        view = gm.graph.call_function(torch.ops.sqcompile.simulate_read.default, (
            k_base, v_base, new_positions, new_tokens if new_tokens is not None else 0, consts[0], consts[1],
            list(k_groups), consts[2], consts[3], list(v_groups), kf.packing == "fast", consts[4], consts[5], True,
            outlier_tokens, window, recent_window, key_mean))
        k_view = gm.graph.call_function(operator.getitem, (view, 0))
        v_view = gm.graph.call_function(operator.getitem, (view, 1))
    for base, first, new_view, consumer in ((k_base, k_first, k_view, site.nodes["k_consumer"]),
                                            (v_base, v_first, v_view, site.nodes["v_consumer"])):
        (first if first is not None else consumer).replace_input_with(base, new_view)
    site.quantized = True


def _quantize_at_write(gm: fx.GraphModule, site: Site, codec) -> None:
    """`sqcompile::fake_quant` on the rotated key and value of `site`, before the cache write."""
    for kind, node in (("key", site.nodes["key_store"]), ("value", site.nodes["new_v"])):
        fmt = codec.format(kind, site.layer)
        groups, codebooks, channel_scale = kernel_args(fmt)
        t = meta_tensor(node)
        device = t.device if t is not None else torch.device("cpu")
        users = list(node.users)
        anchor = node.next
        cb = add_constant(gm, f"sq_{kind}_codebooks", codebooks.to(device), anchor)
        cs = add_constant(gm, f"sq_{kind}_channel_scale", channel_scale.to(device), anchor)
        with gm.graph.inserting_before(anchor):
            q = gm.graph.call_function(torch.ops.sqcompile.fake_quant.default,
                                       (node, cb, cs, list(groups), int(fmt.head_dim)))
        for u in users:
            u.replace_input_with(node, q)
    site.quantized = True
