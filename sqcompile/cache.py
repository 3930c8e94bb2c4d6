"""`SpectralCache`: a transformers `Cache` whose layers hold the packed SpectralQuant codes.

Per layer: `k_packed`, `v_packed` uint8 [batch, kv_heads, max_cache_len, row_bytes] (the format of
`sqcompile.quant.packing`: bit-planes per group, fp16 token scales, QJL bits; or, for a codec built with
layout="fast", the codes packed inside bytes of `sqcompile.quant.fast_layout`), allocated once at the packed
size, never at FP16 size. `update()` quantizes the new tokens into them (`sqcompile::quantize_write`) and, for
eager attention, returns the dequantized cache in the model's own basis: correct everywhere, slow. Under
`torch.compile(backend="spectralquant")` the substitution pass replaces "dequantize then SDPA" of a decode step
with `sqcompile::decode_attention`, which reads the codes directly, and folds the value basis into
v_proj/o_proj, so the compiled model never materialises FP16 K/V for the cache.

The sink token (the first token of each sequence: RoPE position 0, told by the `position_ids` transformers
passes to `update()`, else cache position 0) is also kept exact beside the codes, in float32 (`keep_sink`,
`sqcompile.kernels.sink`): every read uses that copy instead of its codes. An update's new tokens attend to their
own exact K/V (`exact_new`): a prompt to itself (prefill attends to its fresh full-precision K/V),
a decode step to its own token; every later step reads them from the codes. `outlier_tokens` (default 4) more
tokens per row stay exact the same way: those whose keys lie farthest from the calibrated key mean so far. On
SmolLM2-135M at 3.76x the KL of the next-token distribution to FP32's falls from 0.044 (codes only) to 0.017 (sink and
new tokens) to 0.0096 (and the outliers), and the teacher-forced agreement rises to 92.5% (BENCHMARKS.md, "Quality").

Writing past `max_cache_len` is an error that names the capacity (checked on the host in eager mode, by an
async assert inside compiled graphs), never a silent wrap.
"""
from __future__ import annotations

from typing import Any, Optional

import torch
from transformers.cache_utils import Cache, StaticLayer

from .kernels import dequantize as _dequantize  # noqa: F401  (registers sqcompile::dequantize_packed)
from .kernels import fast_cache as _fast_cache  # registers sqcompile::quantize_write_fast, dequantize_fast
from .kernels import quantize_write as _quantize_write  # noqa: F401  (registers sqcompile::quantize_write)
from .kernels import sink as _sink  # noqa: F401  (registers sqcompile::put_sink)
from .kernels._bitplanes import kernel_args


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover
        return False


def _claim_positions(layer: StaticLayer, n_new: int) -> torch.Tensor:
    """The cache positions of `n_new` new tokens of `layer` (advancing its `cumulative_length`); writing past
    `max_cache_len` is an error naming the capacity (on the host in eager mode, an async assert when compiled)."""
    if not _is_compiling():
        end = int(layer.cumulative_length) + n_new
        if end > layer.max_cache_len:
            raise IndexError(f"SpectralCache is full: writing {n_new} token(s) at position {int(layer.cumulative_length)} "
                             f"would exceed its capacity max_cache_len={layer.max_cache_len}")
    positions = torch.arange(n_new, device=layer.device) + layer.cumulative_length
    if _is_compiling():
        torch._assert_async(positions[-1] < layer.max_cache_len,
                            f"SpectralCache capacity max_cache_len={layer.max_cache_len} exceeded")
    layer.cumulative_length.add_(n_new)
    return positions


class SpectralLayer(StaticLayer):
    """One layer's packed K/V. Mask and length semantics are StaticLayer's (full capacity, causal mask)."""

    is_compileable = True
    # the per-layer constants of the codec (None where the codec has none), moved to the cache's device and given
    # static addresses at initialization
    CONSTANTS = ("k_basis", "k_mean", "v_basis", "v_mean", "k_codebooks", "k_channel_scale", "v_codebooks",
                 "v_channel_scale", "k_qjl_proj")

    def __init__(self, max_cache_len: int, codec, layer_idx: int, max_batch_size: Optional[int] = None,
                 keep_sink: bool = True, exact_new: bool = True, outlier_tokens: int = 0, read_copy: bool = False,
                 recent_window: int = 0):
        super().__init__(max_cache_len=max_cache_len)
        self.recent_window = _check_window(recent_window)
        self.read_copy = bool(read_copy)
        self._read_k = self._read_v = None  # read_copy: the dequantized cache in the model basis, rows [0, _read_rows)
        self._read_rows = 0
        self.layer_idx = layer_idx
        self.keep_sink = bool(keep_sink)
        self.outlier_tokens = _check_outliers(outlier_tokens, self.keep_sink)
        self.slots = int(self.keep_sink) + self.outlier_tokens  # exact tokens per batch row: sink first, then outliers
        self.exact_new = bool(exact_new)
        self.max_batch_size = max_batch_size
        lc = codec.layers[layer_idx]
        kf, vf = lc.key_format, lc.value_format
        self.head_dim = kf.head_dim
        if kf.packing != vf.packing:
            raise ValueError(f"layer {layer_idx}: keys and values must share a packing, got {kf.packing}/{vf.packing}")
        self.fast = kf.packing == "fast"
        if self.fast:  # uniform levels, codes inside bytes: sqcompile::quantize_write_fast / decode_attention_fast
            self.k_layout = _fast_cache.layout_spec(kf.fast_layout())
            self.v_layout = _fast_cache.layout_spec(vf.fast_layout())
            k_cb = k_cs = v_cb = v_cs = None
        else:
            self.k_groups, k_cb, k_cs = kernel_args(kf)
            self.v_groups, v_cb, v_cs = kernel_args(vf)
        self.qjl_dims, self.qjl_bits = int(kf.qjl_dims), int(kf.qjl_bits)
        self.k_row_bytes, self.v_row_bytes = kf.bytes_per_token(), vf.bytes_per_token()
        f32 = lambda t: None if t is None else t.detach().to(torch.float32).contiguous()
        self.k_basis, self.k_mean = f32(lc.key_basis), f32(lc.key_mean)
        self.v_basis, self.v_mean = f32(lc.value_basis), f32(lc.value_mean)
        self.k_codebooks, self.k_channel_scale = f32(k_cb), f32(k_cs)
        self.v_codebooks, self.v_channel_scale = f32(v_cb), f32(v_cs)
        self.k_qjl_proj = f32(getattr(lc, "qjl_matrix", None)) if self.qjl_bits else None

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device = key_states.device
        self.dtype = key_states.dtype
        self.batch_size, self.num_heads = key_states.shape[:2]
        if self.max_batch_size is not None and self.batch_size > self.max_batch_size:
            raise ValueError(f"SpectralCache was built for max_batch_size={self.max_batch_size}, got batch {self.batch_size}")
        if key_states.shape[-1] != self.head_dim or self.num_heads != self.k_basis.shape[0]:
            raise ValueError(f"SpectralCache layer {self.layer_idx} expects [B, {self.k_basis.shape[0]}, T, {self.head_dim}] "
                             f"keys, got {tuple(key_states.shape)}")
        if value_states.shape[:2] != key_states.shape[:2] or value_states.shape[-1] != self.head_dim:
            raise ValueError(f"SpectralCache layer {self.layer_idx} expects values shaped as its keys, "
                             f"[B, {self.k_basis.shape[0]}, T, {self.head_dim}], got {tuple(value_states.shape)} (keys "
                             f"{tuple(key_states.shape)}): a value head_dim other than the key's is not supported")
        shape = (self.batch_size, self.num_heads, self.max_cache_len)
        self.keys = torch.zeros(*shape, self.k_row_bytes, dtype=torch.uint8, device=self.device)
        self.values = torch.zeros(*shape, self.v_row_bytes, dtype=torch.uint8, device=self.device)
        if self.slots:  # the exact tokens' keys (model basis), values (storage basis), cache positions, criteria
            self.sink_k = torch.zeros(*shape[:2], self.slots, self.head_dim, dtype=torch.float32, device=self.device)
            self.sink_v = torch.zeros_like(self.sink_k)
            self.sink_pos = torch.full((self.batch_size, self.slots), -1, dtype=torch.int64, device=self.device)
            self.sink_crit = torch.full((self.batch_size, self.slots), float("-inf"), device=self.device)
        if self.recent_window:  # the ring of the last tokens' exact K (model basis) / V (storage basis), fp16
            W = self.recent_window
            self.window_k = torch.zeros(*shape[:2], W, self.head_dim, dtype=torch.float16, device=self.device)
            self.window_v = torch.zeros_like(self.window_k)
            self.window_pos = torch.full((self.batch_size, W), -1, dtype=torch.int64, device=self.device)
        constants = []
        for name in self.CONSTANTS:
            t = getattr(self, name)
            if t is not None:
                setattr(self, name, t.to(self.device))
                constants.append(getattr(self, name))
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not _is_compiling():
            # Static addresses for every tensor a compiled step reads, the per-layer constants (bases, means,
            # codebooks) included: CUDA graph trees copy each non-static input into the graph's pool at every
            # replay (4 copies per layer, 2 MiB), and the CUDA decode op's query matrix, cached per k_basis
            # address, was rebuilt inside the graph from the copy (index and copy kernels at every step).
            sink = (self.sink_k, self.sink_v, self.sink_pos, self.sink_crit) if self.slots else ()
            window = (self.window_k, self.window_v, self.window_pos) if self.recent_window else ()
            for t in (self.keys, self.values, self.cumulative_length, *sink, *window, *constants):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    # the tensors a layer allocates per sequence (batch row) at lazy_initialization; None where unused
    SEQUENCE_TENSORS = ("keys", "values", "sink_k", "sink_v", "sink_pos", "sink_crit", "window_k", "window_v",
                        "window_pos")
    # what `read_copy` keeps for eager reads: a reader's float32 buffer, not storage
    READ_BUFFERS = ("_read_k", "_read_v")

    @property
    def nbytes(self) -> int:
        return 0 if not self.is_initialized else self.keys.numel() + self.values.numel()

    @property
    def sequence_nbytes(self) -> int:
        """Every byte this layer allocates for its sequences (`SEQUENCE_TENSORS`: codes, exact slots and their
        positions and criteria); 0 before the first update."""
        if not self.is_initialized:
            return 0
        return sum(t.nbytes for t in (getattr(self, n, None) for n in self.SEQUENCE_TENSORS) if t is not None)

    @property
    def constant_nbytes(self) -> int:
        """Bytes of the per-layer constants (`CONSTANTS`: bases, means, codebooks), shared by every sequence."""
        return sum(t.nbytes for t in (getattr(self, n) for n in self.CONSTANTS) if t is not None)

    @property
    def sink_nbytes(self) -> int:
        """Bytes of the exact tokens' copies (8 * head_dim per exact slot, batch row and kv-head, plus 12 per slot
        and row for its position and criterion; 0 without slots)."""
        if not (self.is_initialized and self.slots):
            return 0
        return sum(t.numel() * t.element_size() for t in (self.sink_k, self.sink_v, self.sink_pos, self.sink_crit))

    def reset(self) -> None:
        super().reset()
        self._read_rows = 0
        if self.is_initialized and self.slots:
            self.sink_k.zero_(), self.sink_v.zero_(), self.sink_pos.fill_(-1), self.sink_crit.fill_(float("-inf"))
        if self.is_initialized and self.recent_window:
            self.window_pos.fill_(-1)

    def crop(self, tokens_to_remove: int) -> None:
        super().crop(tokens_to_remove)
        self._read_rows = 0
        if self.is_initialized and self.slots:  # an exact token cropped away is none
            gone = self.sink_pos >= self.cumulative_length
            self.sink_pos.masked_fill_(gone, -1), self.sink_crit.masked_fill_(gone, float("-inf"))
        if self.is_initialized and self.recent_window:
            self.window_pos.masked_fill_(self.window_pos >= self.cumulative_length, -1)

    def reorder_cache(self, beam_idx: torch.LongTensor) -> None:
        super().reorder_cache(beam_idx)
        self._read_rows = 0
        if self.is_initialized and self.slots:
            for t in (self.sink_k, self.sink_v, self.sink_pos, self.sink_crit):  # in place: static addresses
                t.copy_(t.index_select(0, beam_idx.to(self.device)))
        if self.is_initialized and self.recent_window:
            for t in (self.window_k, self.window_v, self.window_pos):
                t.copy_(t.index_select(0, beam_idx.to(self.device)))

    def _store_window(self, key_states: torch.Tensor, v_store: torch.Tensor, positions: torch.Tensor) -> None:
        """The ring of the `recent_window` last tokens: position p in slot p % W (K model basis, V storage basis,
        fp16); reads replace the dequantized rows of the positions it holds with these (`sqcompile::put_window`), and
        a compiled decode step reads it as part of its exact split (`sqcompile::exact_split`), the codes only up to
        the window's first position (`sink.codes_lengths`)."""
        m = min(key_states.shape[-2], self.recent_window)
        pos = positions[-m:]
        slot = pos % self.recent_window
        self.window_k.index_copy_(2, slot, key_states[:, :, -m:].to(torch.float16))
        self.window_v.index_copy_(2, slot, v_store[:, :, -m:].to(torch.float16))
        self.window_pos.index_copy_(1, slot, pos[None, :].expand(self.window_pos.shape[0], m).contiguous())

    def _store_exact(self, key_states, v_store, positions, position_ids) -> None:
        """Copy the new tokens that become exact slots. Slot 0 (`keep_sink`): the sink, by `position_ids` [B|1, n]
        the token at RoPE position 0 that is not followed by another position 0 (generate() gives left padding
        position 0, or 1 in older versions: the first real token is the last of a run of zeros), else the token at
        cache position 0. The other slots (`outlier_tokens`): the tokens of the row so far whose keys lie farthest
        from the calibrated key mean (sum over kv-heads of ||k - k_mean||^2), the sink and padding (RoPE position 0,
        or before the row's first real token) not counted; a new token takes the slot of the nearest one held. A
        padding token taken by mistake costs only the benefit: the attention mask still hides it. The work is one op
        (`sqcompile::store_exact`), one node for Inductor."""
        pid = position_ids if isinstance(position_ids, torch.Tensor) and position_ids.dim() == 2 \
            and position_ids.shape[-1] == key_states.shape[-2] and position_ids.shape[0] in (1, key_states.shape[0]) \
            else None
        torch.ops.sqcompile.store_exact(self.sink_k, self.sink_v, self.sink_pos, self.sink_crit, key_states, v_store,
                                        positions, pid, self.k_mean, self.keep_sink, self.outlier_tokens)

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = _claim_positions(self, key_states.shape[-2])
        # Values enter in the storage basis; keys are rotated inside quantize_write.
        v_store = rotate_values(value_states, self.v_mean, self.v_basis)
        if self.slots:
            self._store_exact(key_states, v_store, positions, _position_ids(args, kwargs))
        if self.recent_window:
            self._store_window(key_states, v_store, positions)
        # the new tokens attend to their own exact K/V (a prompt to itself, a decode step to its token)
        fresh = (positions, key_states, v_store) if self.exact_new else None
        if self.fast:
            torch.ops.sqcompile.quantize_write_fast(
                key_states.to(torch.float32), v_store, self.keys, self.values, positions, self.k_basis, self.k_mean,
                self.k_layout, self.v_layout)
        else:
            torch.ops.sqcompile.quantize_write(
                key_states.to(torch.float32), v_store, self.keys, self.values, positions, self.k_basis, self.k_mean,
                self.k_codebooks, self.k_channel_scale, self.v_codebooks, self.v_channel_scale, self.k_qjl_proj,
                self.k_groups, self.v_groups, self.qjl_dims, self.qjl_bits)
        if self.read_copy and not _is_compiling():
            return self._read_from_copy(int(positions[0]), int(positions[-1]) + 1, fresh)
        return self._from_store(*self._dequantize(self.keys, self.values), fresh)

    def _dequantize(self, keys: torch.Tensor, values: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Packed rows [B, H, n, row_bytes] -> float32 [B, H, n, head_dim] in the storage basis (keys, values)."""
        if self.fast:
            return (torch.ops.sqcompile.dequantize_fast(keys, self.k_layout, self.head_dim),
                    torch.ops.sqcompile.dequantize_fast(values, self.v_layout, self.head_dim))
        return (torch.ops.sqcompile.dequantize_packed(keys, self.k_codebooks, self.k_channel_scale, self.k_groups,
                                                      self.head_dim),
                torch.ops.sqcompile.dequantize_packed(values, self.v_codebooks, self.v_channel_scale, self.v_groups,
                                                      self.head_dim))

    def _read_from_copy(self, start: int, end: int, fresh=None):
        """`_from_store`'s result from a float32 copy of the dequantized cache in the model basis that only the rows
        not yet in it, [min(_read_rows, start), end), are dequantized into: O(new tokens) per step instead of
        O(capacity). A reader's buffer, not storage (`sequence_nbytes` leaves it out): eager token-by-token
        evaluation on a CPU (`read_copy=True`)."""
        if self._read_k is None or self._read_k.shape[:3] != self.keys.shape[:3]:
            shape = (*self.keys.shape[:3], self.head_dim)  # unwritten rows read as zero codes would: the means
            self._read_k = self.k_mean[None, :, None, :].expand(shape).clone()
            self._read_v = self.v_mean[None, :, None, :].expand(shape).clone()
            self._read_rows = 0
        lo = min(self._read_rows, start)
        k_store, v_store = self._dequantize(self.keys[:, :, lo:end].contiguous(), self.values[:, :, lo:end].contiguous())
        self._read_k[:, :, lo:end] = torch.matmul(k_store, self.k_basis) + self.k_mean[None, :, None, :]
        self._read_v[:, :, lo:end] = torch.matmul(v_store, self.v_basis) + self.v_mean[None, :, None, :]
        self._read_rows = max(self._read_rows, end)
        k_hat, v_hat = self._read_k.clone(), self._read_v.clone()
        if self.recent_window:
            window_v = torch.matmul(self.window_v.float(), self.v_basis) + self.v_mean[None, :, None, :]
            _put_rows(k_hat, self.window_k, self.window_pos), _put_rows(v_hat, window_v, self.window_pos)
        if self.slots:
            sink_v = torch.matmul(self.sink_v, self.v_basis) + self.v_mean[None, :, None, :]
            _put_rows(k_hat, self.sink_k, self.sink_pos), _put_rows(v_hat, sink_v, self.sink_pos)
        if fresh is not None:
            k_hat[:, :, fresh[0]] = fresh[1].to(k_hat.dtype)
            v_hat[:, :, fresh[0]] = torch.matmul(fresh[2].to(torch.float32), self.v_basis) + self.v_mean[None, :, None, :]
        return k_hat.to(self.dtype), v_hat.to(self.dtype)

    def _from_store(self, k_store: torch.Tensor, v_store_hat: torch.Tensor, fresh=None):
        """The model-basis K/V attention reads: the dequantized cache, the exact sink over its row, and the new
        tokens' exact K/V over theirs (`fresh`: a prompt attends to itself in full precision; a decode
        step to its own token); later steps read them compressed. Values are replaced in the storage basis (what
        SDPA reads once o_proj absorbs the basis), keys in the model basis."""
        if self.recent_window:
            v_store_hat = torch.ops.sqcompile.put_window(v_store_hat, self.window_v, self.window_pos)
        if self.slots:
            v_store_hat = torch.ops.sqcompile.put_sink(v_store_hat, self.sink_v, self.sink_pos)
        if fresh is not None:
            v_store_hat = v_store_hat.index_copy(2, fresh[0], fresh[2].to(v_store_hat.dtype))
        k_hat = torch.matmul(k_store, self.k_basis) + self.k_mean[None, :, None, :]
        v_hat = torch.matmul(v_store_hat, self.v_basis) + self.v_mean[None, :, None, :]
        if self.recent_window:
            k_hat = torch.ops.sqcompile.put_window(k_hat, self.window_k, self.window_pos)
        if self.slots:
            k_hat = torch.ops.sqcompile.put_sink(k_hat, self.sink_k, self.sink_pos)
        if fresh is not None:
            k_hat = k_hat.index_copy(2, fresh[0], fresh[1].to(k_hat.dtype))
        return k_hat.to(self.dtype), v_hat.to(self.dtype)


class ExactLayer(StaticLayer):
    """A layer `SpectralCache` keeps exact (uncompressed, the model's dtype): for cache entries that are not per-head
    K/V of one head_dim (`sqcompile.latent_cache`: the latent and the shared RoPE key of multi-head latent attention).
    Keys and values may differ in width and head count; what `update` is given is stored and read back unchanged.
    `reason` says why the layer is not compressed (`SpectralCache.exact_layers`)."""

    is_compileable = True
    SEQUENCE_TENSORS = ("keys", "values")

    def __init__(self, max_cache_len: int, layer_idx: int, reason: str, max_batch_size: Optional[int] = None):
        super().__init__(max_cache_len=max_cache_len)
        self.layer_idx, self.reason, self.max_batch_size = layer_idx, reason, max_batch_size

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        self.device, self.dtype = key_states.device, key_states.dtype
        self.batch_size = key_states.shape[0]
        if self.max_batch_size is not None and self.batch_size > self.max_batch_size:
            raise ValueError(f"SpectralCache was built for max_batch_size={self.max_batch_size}, got batch {self.batch_size}")
        if value_states.shape[0] != self.batch_size:
            raise ValueError(f"SpectralCache layer {self.layer_idx}: keys {tuple(key_states.shape)} and values "
                             f"{tuple(value_states.shape)} differ in batch size")
        self.keys = torch.zeros(self.batch_size, key_states.shape[1], self.max_cache_len, key_states.shape[-1],
                                dtype=key_states.dtype, device=self.device)
        self.values = torch.zeros(self.batch_size, value_states.shape[1], self.max_cache_len, value_states.shape[-1],
                                  dtype=value_states.dtype, device=self.device)
        self.cumulative_length = self.cumulative_length.to(self.device)
        if not _is_compiling():
            for t in (self.keys, self.values, self.cumulative_length):
                torch._dynamo.mark_static_address(t)
        self.is_initialized = True

    def update(self, key_states: torch.Tensor, value_states: torch.Tensor, *args: Any, **kwargs: Any):
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        positions = _claim_positions(self, key_states.shape[-2])
        self.keys.index_copy_(2, positions, key_states.to(self.keys.dtype))
        self.values.index_copy_(2, positions, value_states.to(self.values.dtype))
        return self.keys, self.values

    @property
    def nbytes(self) -> int:
        return 0 if not self.is_initialized else self.keys.nbytes + self.values.nbytes

    sequence_nbytes = nbytes
    constant_nbytes = 0
    sink_nbytes = 0

    def bytes_per_token(self) -> int:
        """Bytes one token occupies in this layer (keys and values, every head); 0 before the first update."""
        if not self.is_initialized:
            return 0
        return (self.keys.nbytes + self.values.nbytes) // (self.batch_size * self.max_cache_len)


def _put_rows(x: torch.Tensor, rows: torch.Tensor, pos: torch.Tensor) -> None:
    """In place: x[b, :, pos[b, s]] = rows[b, :, s] for every slot with 0 <= pos[b, s] < T (x [B, H, T, d], rows
    [B, H, S, d], pos [B, S]): `put_sink` by indexing, O(slots) instead of O(T) per slot."""
    valid = (pos >= 0) & (pos < x.shape[2])
    b, s = valid.nonzero(as_tuple=True)
    x[b, :, pos[b, s]] = rows[b, :, s].to(x.dtype)


def rotate_values(value_states: torch.Tensor, v_mean: torch.Tensor, v_basis: torch.Tensor) -> torch.Tensor:
    """Values [B, Hkv, n, d] in the storage basis, (v - mu_v) @ B_v^T per kv-head, float32 [B, Hkv, n, d] (a view of
    an [Hkv, B, n, d] result: not contiguous).

    One bmm batched over the kv-heads, [Hkv, B * n, d] @ [Hkv, d, d]: `matmul` broadcasting [B, Hkv, n, d] against the
    [Hkv, d, d] bases expanded the bases to [B, Hkv, d, d] and copied them (B * Hkv * d * d floats) before a gemv,
    four nodes of a decode step's CUDA graph per layer where this is two (the subtraction and the bmm). The
    substitution pass matches this form (`substitute_decode_attention._match_value_rotation`)."""
    B, H, n, d = value_states.shape
    centered = (value_states.to(torch.float32) - v_mean[None, :, None, :]).transpose(0, 1).reshape(H, B * n, d)
    return torch.matmul(centered, v_basis.transpose(-1, -2)).reshape(H, B, n, d).transpose(0, 1)


def _check_window(recent_window: Any) -> int:
    if isinstance(recent_window, bool) or not isinstance(recent_window, int) or recent_window < 0:
        raise ValueError(f"recent_window must be an int >= 0 (the last tokens kept exact), got {recent_window!r}")
    return recent_window


def _check_outliers(outlier_tokens: Any, keep_sink: bool) -> int:
    from .kernels.sink import MAX_SLOTS

    room = MAX_SLOTS - int(keep_sink)
    if isinstance(outlier_tokens, bool) or not isinstance(outlier_tokens, int) or not 0 <= outlier_tokens <= room:
        raise ValueError(f"outlier_tokens must be an int in 0..{room} (the decode kernels skip at most {MAX_SLOTS} "
                         f"exact tokens per row, the sink included), got {outlier_tokens!r}")
    return outlier_tokens


def _position_ids(args, kwargs) -> Optional[torch.Tensor]:
    """The `position_ids` a model passed to `Cache.update` (transformers >= 5.2x: inside a `kwargs` dict), else None."""
    for d in (kwargs, kwargs.get("kwargs"), kwargs.get("cache_kwargs"), *args):
        if isinstance(d, dict) and isinstance(d.get("position_ids"), torch.Tensor):
            return d["position_ids"]
    return None


def non_attention_layers(config: Any) -> dict[int, str]:
    """{layer: kind} of the decoder layers that keep a convolution / recurrent state instead of (or beside) a KV cache:
    the state-space, linear-attention and short-convolution layers of hybrid models (Jamba, Bamba, Falcon-H1,
    Qwen3-Next, LFM2). From the layers transformers' own cache builds for the config (its linear-attention layer
    class), else from `config.layer_types` / `layers_block_type`."""
    try:
        from transformers import DynamicCache
        from transformers.cache_utils import LinearAttentionCacheLayerMixin

        layers = DynamicCache(config=config).layers
        return {i: type(layer).__name__ for i, layer in enumerate(layers)
                if isinstance(layer, LinearAttentionCacheLayerMixin)}
    except Exception:  # an older transformers (no linear-attention cache layers), or a config it cannot build for
        pass
    kinds = getattr(config, "layer_types", None) or getattr(config, "layers_block_type", None) or []
    return {i: str(k) for i, k in enumerate(kinds)
            if any(w in str(k) for w in ("linear", "mamba", "conv", "hybrid", "ssm", "recurrent"))}


def _refuse_hybrid(config: Any) -> None:
    """SpectralCache has a layer for softmax attention only: a hybrid model is one clear error, not transformers'
    failure at the first state update."""
    other = non_attention_layers(config)
    if other:
        shown = ", ".join(f"{i}: {k}" for i, k in list(other.items())[:8]) + (", ..." if len(other) > 8 else "")
        raise ValueError(
            f"SpectralCache holds softmax-attention KV layers only; this model has {len(other)} layer(s) with a "
            f"convolution / recurrent state (state-space or linear-attention blocks: {shown}), which it has no layer "
            "for. Use the model's own cache (e.g. transformers.DynamicCache(config=model.config)) under "
            "torch.compile(model.forward, backend='spectralquant'): the attention layers are rotated and quantized "
            "through it (SpectralCache's quality, not its memory savings); the other layers run as they are.")


class SpectralCache(Cache):
    """A compressed KV cache: `SpectralCache(model_or_config, profile=None, bits=4.25, max_cache_len=...)`.

    `profile` None gives the data-oblivious TurboQuant format. With `layout="fast"` the capacity is rounded
    up to a multiple of 8 tokens (the CUDA decode kernel copies whole 16-byte chunks). Pass it to `model(...)`/`model.generate(...)` as
    `past_key_values`. `nbytes` is the memory the packed layers hold; `sink_nbytes` that of the exact slots (the
    sink with `keep_sink`, and `outlier_tokens` more: 8 * head_dim bytes each per layer, batch row and kv-head).
    `exact_new`: an update's new tokens attend to their own exact K/V (the module docstring). `kv_heads`
    (first, stop): hold only these kv-heads (a tensor-parallel rank's; read from a sharded model's k_proj when not
    given, `sqcompile.parallel`): the codec is built for all heads and sliced, so the codes are the unsharded cache's.
    `read_copy`: eager
    reads keep a float32 copy of the dequantized cache that only new rows are dequantized into (what eager attention
    reads is the same; a step costs O(new tokens) instead of O(capacity), at FP32 K/V memory for the capacity: for
    token-by-token evaluation on a CPU, `sqcompile.evaluate.evaluate_decode`; compiled steps never use it).
    `recent_window` W: the last W tokens also kept exact (fp16) in a ring beside the codes, 4 * W * head_dim bytes
    per layer, batch row and kv-head (counted in `sequence_nbytes`); compiled decode steps read it in their exact
    split (`sqcompile::exact_split`) and the codes only before it.
    Layers whose cache entries are not per-head K/V of one head_dim (multi-head latent attention,
    `sqcompile.latent_cache`) are kept exact and uncompressed (`ExactLayer`; listed with their reason in
    `exact_layers`, their full-precision bytes counted in `nbytes` and `sequence_nbytes`); such a model takes no
    profile.
    """

    def __init__(self, model_or_config: Any, profile: Any = None, bits: float = 4.25, max_cache_len: int = 4096,
                 max_batch_size: Optional[int] = None, method: Optional[str] = None, seed: int = 0,
                 keep_sink: bool = True, exact_new: bool = True, outlier_tokens: int = _sink.OUTLIER_TOKENS,
                 kv_heads: Optional[tuple[int, int]] = None, read_copy: bool = False, recent_window: int = 0,
                 **codec_kwargs: Any):
        from .latent_cache import exact_layers, refuse_latent_cache
        from .profile import SpectralProfile, model_fingerprint, text_config
        from .quant import build_codec

        config = text_config(model_or_config)
        _refuse_hybrid(config)
        fp = model_fingerprint(config)
        if isinstance(profile, (str, bytes)) or hasattr(profile, "__fspath__"):
            profile = SpectralProfile.load(profile)
        if profile is not None:
            refuse_latent_cache(config, "SpectralCache with a profile")
            profile.check_matches(fp)
        if not isinstance(max_cache_len, int) or max_cache_len <= 0:
            raise ValueError(f"max_cache_len must be a positive int, got {max_cache_len!r}")
        method = method or ("spectralquant" if profile is not None else "turboquant")
        kw = {} if profile is not None else dict(num_layers=fp["num_layers"], num_kv_heads=fp["num_kv_heads"],
                                                  head_dim=fp["head_dim"])
        self.codec = build_codec(profile, bits=float(bits), method=method, seed=seed, **kw, **codec_kwargs)
        if kv_heads is None:  # a tensor-parallel model: this rank's kv-heads, from its k_proj shard
            from .parallel import local_kv_heads

            kv_heads = local_kv_heads(model_or_config)
        if kv_heads is not None:
            from .parallel import slice_codec

            self.codec = slice_codec(self.codec, *kv_heads)
        self.bits = bits
        if self.codec.config.get("layout") == "fast":
            # whole 16-byte chunks per (batch, kv-head) plane for the CUDA decode kernel's copies
            max_cache_len = -(-max_cache_len // 8) * 8
        _check_outliers(outlier_tokens, bool(keep_sink))
        _check_window(recent_window)
        # layers whose cache entries are not per-head K/V of one head_dim (multi-head latent attention) stay exact
        exact = exact_layers(config, fp["num_layers"])
        layers = [ExactLayer(max_cache_len, i, exact[i], max_batch_size) if i in exact else
                  SpectralLayer(max_cache_len, self.codec, i, max_batch_size, keep_sink, exact_new, outlier_tokens,
                                read_copy, recent_window) for i in range(fp["num_layers"])]
        super().__init__(layers=layers)

    def allocate(self, batch_size: int, device: Any, dtype: torch.dtype) -> "SpectralCache":
        """Allocate every layer's buffers now (else the first `update` does, inside the compiled prefill).

        Under CUDA graphs this matters: buffers created inside a compiled graph get no static address, so the
        decode graphs read them through copies, or fail to launch. `sqcompile.optimize(...).generate` calls it.
        """
        if not isinstance(batch_size, int) or batch_size <= 0:
            raise ValueError(f"batch_size must be a positive int, got {batch_size!r}")
        for layer in self.layers:  # an ExactLayer's entry widths are known at its first update only
            if not layer.is_initialized and isinstance(layer, SpectralLayer):
                empty = torch.zeros(batch_size, layer.k_basis.shape[0], 0, layer.head_dim, dtype=dtype, device=device)
                layer.lazy_initialization(empty, empty)
        return self

    @property
    def max_cache_len(self) -> int:
        """Capacity in tokens (a property in some transformers versions, an attribute in others)."""
        return self.layers[0].max_cache_len

    @property
    def nbytes(self) -> int:
        """Bytes held by the packed K/V of all layers (the exact sink copy apart: `sink_nbytes`)."""
        return sum(layer.nbytes for layer in self.layers)

    @property
    def sink_nbytes(self) -> int:
        """Bytes of the exact sink token copies of all layers (a constant per batch row, not per token)."""
        return sum(layer.sink_nbytes for layer in self.layers)

    @property
    def sequence_nbytes(self) -> int:
        """Every byte the layers allocate for the sequences (codes, exact slots, their positions and criteria), the
        batch's rows together: what a compression ratio against an FP16 cache divides by. 0 before the first update."""
        return sum(layer.sequence_nbytes for layer in self.layers)

    @property
    def constant_nbytes(self) -> int:
        """Bytes of the per-model constants (every layer's bases, means, codebooks), reported apart."""
        return sum(layer.constant_nbytes for layer in self.layers)

    def packed_bytes_per_token(self) -> int:
        """K+V bytes one token occupies across all layers and kv-heads (the bit accounting, exactly); an exact
        layer counts its full-precision bytes once its first update has told its widths (0 before)."""
        heads = self.codec.num_kv_heads
        return sum(l.bytes_per_token() if isinstance(l, ExactLayer) else (l.k_row_bytes + l.v_row_bytes) * heads
                   for l in self.layers)

    @property
    def exact_layers(self) -> dict[int, str]:
        """{layer index: reason} of the layers kept exact and uncompressed (`ExactLayer`)."""
        return {l.layer_idx: l.reason for l in self.layers if isinstance(l, ExactLayer)}
