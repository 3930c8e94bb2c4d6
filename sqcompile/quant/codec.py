"""`KVCodec`: the storage bases and formats of every layer's K and V, and `build_codec` that makes one.

Per (layer, kv-head) a storage basis: an orthogonal d x d matrix B and a mean mu, x_store = (x - mu) @ B.T.
Per layer a `TensorFormat` for K and one for V (shared by the layer's kv-heads). The backend applies the
rotation; the codec quantizes storage coordinates (`fake_quant`, `pack`, `unpack`) and, optionally, adds
the QJL score correction for keys (`qjl_correction`).

Methods:

- ``"turboquant"`` (the default when there is no profile): B = randomized Hadamard (seeded, per layer,
  kv-head and kind), mu = 0, all dims in "token" groups: one group at uniform bits, or (default) two
  groups at b+1 / b bits so the budget is used to the byte. QJL on all dims optional.
- ``"spectralquant"``: B = blockdiag(I_s, H_rest) @ R where R is the PCA basis (rows = eigenvectors,
  descending) and H_rest a random rotation of the remaining d - s dims. The top s ("signal") dims use a
  calibrated "channel" scale sqrt(lambda_j) at high bits (8 by default); the rotated rest uses per-token
  scales at the bits the budget leaves. s (a multiple of 8, 0 allowed) and the K/V byte split are chosen
  to minimize the predicted relative MSE (see `allocation`) unless given.
  **Centering per kind** (default): keys use the centered PCA basis (the mean is dropped: softmax ignores
  it); values use the uncentered second-moment basis and no mean. Reason, measured on SmolLM2-135M: the
  attention-sink token (position 0) has a small key and value (0.2-0.3x a typical norm in layers 3-29);
  subtracting the mean makes the sink's stored vector 2-4x longer, so its per-token-scaled error grows
  4-16x, and the sink takes much of the attention. Centered values lost at 4.25 and 3.25 bits and tied
  at 2.69 (V-only dPPL at 3.25 bits: +7.7% centered, +2.9% uncentered); centered keys win on average.
  **Layer-adaptive bytes** (``layer_weights`` [L, 2] or ``profile.meta["kv_sensitivity"]``): the loss per
  unit of predicted relative error of each (layer, kind), measured on calibration text by quantizing one
  tensor at a time. The bytes of all layers are then allocated together (same average bits per element;
  each (layer, kind) within ``layer_spread`` = 1 bit per element of the average) to minimize the
  sensitivity-weighted predicted error. SmolLM2-135M, 1024 Hamlet tokens: dPPL +2.6% / +8.5% / +33% at
  4.25 / 3.25 / 2.69 bits, vs +4.2% / +21.9% / +75% with equal bytes per layer (keys centered, values
  not) and +6.9% / +25.4% / +74% before either change.
  Measured and not kept: forcing s = 8 or 16 at 8 bits, a second rotated token tier for the top PCA
  dims (``signal_scale="rotated"``), query-energy key weighting, per-layer centering choices, and, for
  layout="fast" on the decode protocol (SmolLM2-135M, C = 2048, 2.75 bits + a 32-token window, CPU, 2026-12-07):
  more key bytes at the same total (K 3.0 / V 2.25 bits in every layer: +3.61% dPPL vs +3.65% for the default
  split; key_weight=1.5: +4.59%), sensitivity-weighted layers (+14.5% vs +4.8% on 128 tokens) and a query-aware
  key transform k' = R U' S_q^(1/4) (k - mu) (half the mean score error offline, +7.4% vs +4.8% on 128 tokens).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch
from torch import Tensor

from ..profile import _kind  # the one spelling of "key"/"value" the profile and the codec accept
from . import allocation as alloc
from . import packing
from . import qjl as qjl_mod
from .codebooks import lloyd_max
from .fast_layout import gaussian_step
from .format import Group, TensorFormat, uniform_levels
from .hadamard import randomized_hadamard

KINDS = ("key", "value")
LAYOUTS = ("planes", "fast")
METHODS = ("spectralquant", "turboquant")
MAX_BITS_PER_ELEMENT = 16.0

RESEARCH_KNOBS = {
    "allocation": "spectralquant groups: 'hybrid' (default) | 'waterfill' (channel scales, PCA basis)",
    "signal_dims": "int: fix the number of signal (top PCA) dims; None = search multiples of 8",
    "signal_bits": "int 1..8 for the signal dims (default 8); None = search",
    "signal_scale": "'channel' (default, sqrt(eigval)) | 'token' (per-token fp16 scale) | 'rotated' (the signal "
                    "dims randomly rotated among themselves, per-token fp16 scale: a second, finer tier)",
    "key_weighting": "'none' (default: plain MSE) | 'eigvals' (query energy assumed proportional to key "
                     "variance) | Tensor [L, d] or [L, Hkv, d] of query energy per key PCA dim",
    "key_weight": "float (default 1.0): weight of the keys' relative error against the values' in the K/V "
                  "byte split search",
    "key_bytes": "int: fix the key bytes per token (values get the rest); None = search near half",
    "split_window": "bytes either side of half the budget searched for the K/V split (default d // 16)",
    "channel_codebook": "'laplace' (default) | 'gaussian' for 'channel' groups",
    "token_codebook": "'sphere' (default, exact for rotated coordinates) | 'gaussian'",
    "qjl_ratio": "sketch rows per covered dim (default 1.0; m rounded up to a multiple of 8)",
    "uniform_scale": "scale of the uniform_bits=True group: 'channel' (default) | 'token'",
    "rotate_rest": "bool (default True): randomly rotate the non-signal dims",
    "min_bits": "int (default 0): spectralquant rotated groups get at least this many bits (0 = may drop dims)",
    "fast_groups": "int 1..3 (default 2): layout='fast' plans use up to this many groups (a last group may get 0 "
                   "bits: the PCA tail dropped)",
    "layer_spread": "float (default 1.0): with layer_weights, no (layer, kind) more than this many bits per "
                    "element from the average",
    "center_keys": "bool or [num_layers] bools (default: profile.meta['kv_center'] if present, else True): with "
                   "center=True, center the keys (mean dropped, centered PCA basis)",
    "center_values": "bool or [num_layers] bools (default: profile.meta['kv_center'] if present, else False): with "
                     "center=True, center the values (mean added back); else the uncentered second-moment basis",
}


@dataclass
class LayerCodec:
    key_basis: Tensor  # [kv_heads, d, d]
    key_mean: Tensor  # [kv_heads, d]
    value_basis: Tensor
    value_mean: Tensor
    key_format: TensorFormat
    value_format: TensorFormat
    qjl_matrix: Optional[Tensor] = None  # [m, qjl_dims] Gaussian S for the key sketch

    def basis(self, kind: str) -> Tensor:
        return self.key_basis if _kind(kind) == "key" else self.value_basis

    def mean(self, kind: str) -> Tensor:
        return self.key_mean if _kind(kind) == "key" else self.value_mean

    def format(self, kind: str) -> TensorFormat:
        return self.key_format if _kind(kind) == "key" else self.value_format

    def bits_per_element(self) -> float:
        d = self.key_format.head_dim
        return 8.0 * (self.key_format.bytes_per_token() + self.value_format.bytes_per_token()) / (2 * d)

    def to(self, device=None, dtype=None) -> "LayerCodec":
        def mv(t):
            return None if t is None else t.to(device=device, dtype=dtype or t.dtype)
        return LayerCodec(mv(self.key_basis), mv(self.key_mean), mv(self.value_basis), mv(self.value_mean),
                          self.key_format.to(device), self.value_format.to(device),
                          None if self.qjl_matrix is None else self.qjl_matrix.to(device))


@dataclass
class KVCodec:
    """Bases and formats for every layer. Storage tensors are [B, kv_heads, S, head_dim]."""

    layers: list[LayerCodec]
    method: str
    num_layers: int
    num_kv_heads: int
    head_dim: int
    config: dict = field(default_factory=dict)

    @property
    def bits_per_element(self) -> float:
        """Stored bits per element, K and V averaged over all layers, every byte included."""
        return sum(lc.bits_per_element() for lc in self.layers) / len(self.layers)

    @property
    def compression_ratio(self) -> float:
        return 16.0 / self.bits_per_element

    def format(self, kind: str, layer: int) -> TensorFormat:
        return self.layers[layer].format(kind)

    def bytes_per_token(self, kind: str, layer: int) -> int:
        return self.layers[layer].format(kind).bytes_per_token()

    def has_qjl(self, layer: int) -> bool:
        return self.layers[layer].key_format.qjl_bits > 0

    # -- rotation helpers (the backend fuses these; here for tests and the reference path) ----------
    def to_storage(self, kind: str, layer: int, x: Tensor) -> Tensor:
        """x [B, kv_heads, S, d] -> (x - mu) @ B.T per kv-head, in x's dtype (computed in fp32)."""
        lc = self.layers[layer]
        basis, mean = lc.basis(kind).float(), lc.mean(kind).float()
        y = torch.einsum("bhsd,hed->bhse", x.float() - mean[:, None, :], basis)
        return y.to(x.dtype)

    def from_storage(self, kind: str, layer: int, x_store: Tensor, add_mean: bool = True) -> Tensor:
        """Inverse of `to_storage` (the mean added back unless add_mean=False)."""
        lc = self.layers[layer]
        y = torch.einsum("bhse,hed->bhsd", x_store.float(), lc.basis(kind).float())
        if add_mean:
            y = y + lc.mean(kind).float()[:, None, :]
        return y.to(x_store.dtype)

    # -- quantization -------------------------------------------------------------------------------
    def fake_quant(self, kind: str, layer: int, x_store: Tensor) -> Tensor:
        """Quantize + dequantize storage coordinates [B, kv_heads, S, d]; same shape and dtype.

        Plain torch ops (traceable). Does not include the QJL correction (that is a score term)."""
        return self.layers[layer].format(kind).fake_quant(x_store).to(x_store.dtype)

    def pack(self, kind: str, layer: int, x_store: Tensor) -> Tensor:
        """uint8 [B, kv_heads, S, bytes_per_token] in the layout of `sqcompile.quant.packing`."""
        lc = self.layers[layer]
        fmt = lc.format(kind)
        codes, scales = fmt.encode(x_store)
        bits = norm = None
        if fmt.qjl_bits > 0:
            residual = x_store.float() - fmt.decode(codes, scales, x_store)
            bits, norm = qjl_mod.sketch(residual[..., :fmt.qjl_dims], lc.qjl_matrix)
        return packing.pack(fmt, codes, scales, bits, norm)

    def unpack(self, kind: str, layer: int, packed: Tensor) -> Tensor:
        """float32 [B, kv_heads, S, d]; equals fake_quant(x_store).float() for packed = pack(x_store)."""
        fmt = self.layers[layer].format(kind)
        codes, scales, _, _ = packing.unpack(fmt, packed)
        return fmt.decode(codes, scales, packed[..., :1].expand(packed.shape[:-1] + (fmt.head_dim,)))

    def unpack_qjl(self, layer: int, packed_keys: Tensor) -> tuple[Tensor, Tensor]:
        """(sign bits {0,1} int64 [B, kv_heads, S, m], residual norm float32 [B, kv_heads, S])."""
        fmt = self.layers[layer].key_format
        if fmt.qjl_bits == 0:
            raise ValueError(f"layer {layer} keys have no QJL sketch")
        _, _, bits, norm = packing.unpack(fmt, packed_keys)
        return bits, norm

    def qjl_sketch(self, layer: int, k_store: Tensor) -> tuple[Tensor, Tensor]:
        """Sketch of the key residual k_store - fake_quant(k_store): (bits, norm) as in `unpack_qjl`."""
        lc = self.layers[layer]
        fmt = lc.key_format
        if fmt.qjl_bits == 0:
            raise ValueError(f"layer {layer} keys have no QJL sketch")
        residual = k_store.float() - fmt.fake_quant(k_store)
        return qjl_mod.sketch(residual[..., :fmt.qjl_dims], lc.qjl_matrix)

    def qjl_correction(self, layer: int, q_store: Tensor, k_store: Optional[Tensor] = None, *,
                       packed_keys: Optional[Tensor] = None) -> Tensor:
        """Unbiased estimate of q_store . (k_store - dequant(k_store)) for every (query, key) pair.

        q_store [B, Hq, Sq, d] (queries rotated by the key basis), keys given raw (k_store
        [B, Hkv, Sk, d]) or packed (packed_keys uint8 [B, Hkv, Sk, bytes]). Returns float32
        [B, Hq, Sq, Sk]; attention logits are (q_store . dequant(k) + correction) * softmax_scale.
        Zeros when the layer has no QJL sketch."""
        lc = self.layers[layer]
        if lc.key_format.qjl_bits == 0:
            src = k_store if k_store is not None else packed_keys
            return torch.zeros(q_store.shape[:-1] + (src.shape[2],), dtype=torch.float32, device=q_store.device)
        if packed_keys is not None:
            bits, norm = self.unpack_qjl(layer, packed_keys)
        else:
            bits, norm = self.qjl_sketch(layer, k_store)
        return qjl_mod.score_correction(q_store, bits, norm, lc.qjl_matrix)

    # -- misc ---------------------------------------------------------------------------------------
    def to(self, device=None, dtype=None) -> "KVCodec":
        """A copy on `device`; `dtype` casts the bases and means (formats always compute in fp32)."""
        return KVCodec([lc.to(device, dtype) for lc in self.layers], self.method, self.num_layers,
                       self.num_kv_heads, self.head_dim, dict(self.config))

    def describe(self) -> str:
        lines = [f"KVCodec method={self.method} layers={self.num_layers} kv_heads={self.num_kv_heads} "
                 f"head_dim={self.head_dim}: {self.bits_per_element:.4f} bits/elem "
                 f"({self.compression_ratio:.3f}x)"]
        for i, lc in enumerate(self.layers):
            lines.append(f"  layer {i:2d} K: {lc.key_format.describe()}")
            lines.append(f"           V: {lc.value_format.describe()}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"KVCodec(method={self.method!r}, layers={self.num_layers}, kv_heads={self.num_kv_heads}, "
                f"head_dim={self.head_dim}, bits_per_element={self.bits_per_element:.4f})")


# -- building -------------------------------------------------------------------------------------

def _generator(seed: int, layer: int, kind: str, salt: int = 0) -> torch.Generator:
    g = torch.Generator()
    g.manual_seed((seed * 1_000_003 + layer * 7_919 + (0 if kind == "key" else 104_729) + salt * 15_485_863)
                  % (2 ** 63))
    return g


def _profile_tensor(profile: Any, kind: str, part: str) -> Tensor:
    return getattr(profile, f"{kind}_{part}").detach().to(torch.float32)


def _qjl_mode(qjl: Union[bool, str], method: str) -> str:
    if qjl is False or qjl is None or qjl == "none":
        return "none"
    if qjl is True:
        return "all" if method == "turboquant" else "signal"
    if qjl in ("signal", "all"):
        if method == "turboquant" and qjl == "signal":
            raise ValueError("qjl='signal' needs a profile (method='spectralquant'); use qjl='all'")
        return qjl
    raise ValueError(f"qjl must be False, True, 'signal' or 'all', got {qjl!r}")


def valid_bits_range(head_dim: int, qjl_mode: str = "none", qjl_ratio: float = 1.0) -> tuple[float, float]:
    """(lowest, highest) bits per element build_codec accepts: the lowest stores 1 bit per dim, one
    fp16 scale per token for K and for V, and the QJL sketch when it covers all dims."""
    per_kind = (head_dim + 7) // 8 + 2
    qjl_bytes = 0
    if qjl_mode == "all":
        qjl_bytes = alloc.qjl_overhead_bits(alloc.sketch_size(head_dim, qjl_ratio)) // 8
    return 8.0 * (2 * per_kind + qjl_bytes) / (2 * head_dim), MAX_BITS_PER_ELEMENT


def _covariances(profile: Any, kind: str, layer: int, center: bool) -> tuple[Tensor, Tensor, Tensor]:
    """(mean [H, d], eigvecs rows [H, d, d], eigvals [H, d]) of the layer, centered or not."""
    mu = _profile_tensor(profile, kind, "mean")[layer]
    U = _profile_tensor(profile, kind, "eigvecs")[layer]
    lam = _profile_tensor(profile, kind, "eigvals")[layer].clamp_min(0)
    if center:
        return mu, U, lam
    # Uncentered: eigenbasis of the second moment Sigma + mu mu^T, and no mean subtracted.
    second = torch.einsum("hkd,hk,hke->hde", U.double(), lam.double(), U.double())
    second = second + mu.double()[:, :, None] * mu.double()[:, None, :]
    evals, evecs = torch.linalg.eigh(second)
    evals, evecs = evals.flip(-1), evecs.flip(-1)
    return torch.zeros_like(mu), evecs.transpose(-1, -2).float(), evals.clamp_min(0).float()


def _key_weights(knob: Any, layer: int, lam: Tensor) -> Optional[Tensor]:
    """Query energy per key PCA dim, averaged over kv-heads: [d] or None (plain MSE)."""
    if isinstance(knob, Tensor):
        w = knob[layer].float()
        return w.mean(0) if w.dim() == 2 else w
    if knob == "eigvals":
        return lam / lam.sum().clamp_min(1e-30)
    if knob in ("none", None):
        return None
    raise ValueError(f"key_weighting must be 'eigvals', 'none' or a tensor, got {knob!r}")


def _to_format(plan: alloc.Plan, d: int, channel_scale: Tensor) -> TensorFormat:
    if plan.rotate_groups:  # the fast layout: uniform levels, codes packed inside bytes
        groups = [Group(g.start, g.stop, g.bits, g.scale, uniform_levels(g.bits, gaussian_step(g.bits)))
                  for g in plan.groups]
        return TensorFormat(d, groups, channel_scale, packing="fast")
    groups = [Group(g.start, g.stop, g.bits, g.scale, lloyd_max(g.bits, g.dist, g.size)) for g in plan.groups]
    return TensorFormat(d, groups, channel_scale, plan.qjl_dims, plan.qjl_bits)


def build_codec(profile: Any = None, *, bits: float, method: str = "spectralquant",
                num_layers: Optional[int] = None, num_kv_heads: Optional[int] = None,
                head_dim: Optional[int] = None, qjl: Union[bool, str] = False, center: bool = True,
                uniform_bits: bool = False, seed: int = 0, layer_weights: Any = None, layout: str = "planes",
                **research_knobs: Any) -> KVCodec:
    """Build a `KVCodec` that stores at most `bits` bits per element (K and V averaged, all metadata).

    `profile` is a `SpectralProfile` (duck-typed: key_/value_ mean, eigvecs (rows), eigvals); None
    selects method="turboquant" and then num_layers, num_kv_heads and head_dim are required.
    `qjl`: False | True (= "signal" for spectralquant, "all" for turboquant) | "signal" | "all".
    `center=False` uses the uncentered second-moment basis and no mean for both kinds (center=True: keys
    centered, values not, unless center_keys/center_values or profile.meta["kv_center"] say otherwise);
    `uniform_bits=True` stores one group at uniform bits (turboquant: one token group; spectralquant: PCA
    basis, no rest rotation).
    `layer_weights`: sensitivity [L, 2] (key, value) or [L] for the layer-adaptive byte allocation; None =
    `profile.meta["kv_sensitivity"]` when present (spectralquant only), else equal bytes per layer;
    False = equal bytes per layer. `layout`: "planes" (default: Lloyd-Max levels, any bits, bit-planes, QJL
    possible; `sqcompile::decode_attention`) or "fast" (uniform levels at 1/2/4/8 bits, codes packed inside
    bytes, no QJL; `sqcompile::decode_attention_fast`, 2-4x faster on a GPU; for spectralquant each group is
    a block of PCA dims rotated within itself, so more bits go to the high-variance block).
    `codec.config["predicted"]` gives the predicted relative error of
    every (layer, kind) format (a measured loss divided by it is a layer weight).
    Research knobs (see RESEARCH_KNOBS): allocation, signal_dims, signal_bits, signal_scale,
    key_weighting, key_weight, key_bytes, split_window, channel_codebook, token_codebook, qjl_ratio,
    uniform_scale, rotate_rest, min_bits, layer_spread, center_keys, center_values.
    """
    unknown = set(research_knobs) - set(RESEARCH_KNOBS)
    if unknown:
        raise TypeError(f"unknown build_codec knobs {sorted(unknown)}; valid: {sorted(RESEARCH_KNOBS)}")
    if profile is None:
        method = "turboquant"
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if profile is not None:
        L, H, d = (int(n) for n in profile.key_mean.shape)
        for name, given, actual in (("num_layers", num_layers, L), ("num_kv_heads", num_kv_heads, H),
                                    ("head_dim", head_dim, d)):
            if given is not None and int(given) != actual:
                raise ValueError(f"{name}={given} does not match the profile ({actual})")
    else:
        if num_layers is None or num_kv_heads is None or head_dim is None:
            raise ValueError("without a profile, num_layers, num_kv_heads and head_dim are required")
        L, H, d = int(num_layers), int(num_kv_heads), int(head_dim)

    knobs = dict(research_knobs)
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    qjl_mode = _qjl_mode(qjl, method)
    fast_groups = int(knobs.get("fast_groups", 2))
    if not 1 <= fast_groups <= 3:
        raise ValueError(f"fast_groups must be 1, 2 or 3 (the fast kernel's limit), got {fast_groups}")
    if layout == "fast" and (qjl_mode != "none" or uniform_bits or knobs.get("allocation", "hybrid") != "hybrid"):
        raise ValueError("layout='fast' has no QJL sketch, uniform_bits or waterfill allocation; "
                         f"got qjl={qjl!r}, uniform_bits={uniform_bits}, allocation={knobs.get('allocation')!r}")
    qjl_ratio = float(knobs.get("qjl_ratio", 1.0))
    lo, hi = valid_bits_range(d, qjl_mode, qjl_ratio)
    if not (isinstance(bits, (int, float)) and math.isfinite(bits) and lo <= bits <= hi):
        raise ValueError(f"bits={bits} bits per element is outside the valid range [{lo:.4f}, {hi:g}] "
                         f"for head_dim={d}, method={method!r}, qjl={qjl_mode!r}")
    total_bytes = int(math.floor(bits * 2 * d / 8 + 1e-9))  # K + V bytes per (token, kv-head)

    channel_dist = knobs.get("channel_codebook", "laplace")
    token_dist = knobs.get("token_codebook", "sphere")
    allocation = knobs.get("allocation", "hybrid")
    if allocation not in ("hybrid", "waterfill"):
        raise ValueError(f"allocation must be 'hybrid' or 'waterfill', got {allocation!r}")
    window = int(knobs.get("split_window", max(2, d // 16)))
    key_bytes = knobs.get("key_bytes")
    key_weight = float(knobs.get("key_weight", 1.0))

    centering = {kind: _centering(knobs.get(f"center_{kind}s"), profile, kind, L) for kind in KINDS}
    stats_all: list[dict] = []
    for layer in range(L):
        stats = {}
        if method == "spectralquant":
            for kind in KINDS:
                stats[kind] = _covariances(profile, kind, layer, center and centering[kind][layer])
        stats_all.append(stats)

    plan_cache: dict = {}

    def plan_for(layer: int, kind: str, budget: int) -> Optional[alloc.Plan]:
        mode = qjl_mode if kind == "key" else "none"
        if layout == "fast":
            key = (layer if method == "spectralquant" else -1, kind, budget)
            if key not in plan_cache:
                lam = stats_all[layer][kind][2].mean(0) if method == "spectralquant" else None
                plan_cache[key] = alloc.plan_fast(lam, d, budget, max_groups=fast_groups)
            return plan_cache[key]
        if method == "turboquant":
            key = (kind, budget)
            if key not in plan_cache:
                plan_cache[key] = alloc.plan_rotated(
                    d, budget, qjl_dims=d if mode == "all" else 0, qjl_ratio=qjl_ratio,
                    uniform_bits=uniform_bits, dist=token_dist)
            return plan_cache[key]
        key = (layer, kind, budget)
        if key in plan_cache:
            return plan_cache[key]
        lam = stats_all[layer][kind][2].mean(0)
        if uniform_bits or allocation == "waterfill":
            qd = {"none": 0, "all": d, "signal": _signal_guess(lam)}[mode]
            if uniform_bits:
                plan = alloc.plan_channel_uniform(d, budget, scale=knobs.get("uniform_scale", "channel"),
                                                  dist=channel_dist if knobs.get("uniform_scale", "channel") == "channel" else token_dist,
                                                  qjl_dims=qd, qjl_ratio=qjl_ratio)
            else:
                plan = alloc.plan_waterfill(lam, budget, dist=channel_dist, qjl_dims=qd, qjl_ratio=qjl_ratio)
            plan_cache[key] = plan
            return plan
        weights = _key_weights(knobs.get("key_weighting", "none"), layer, lam) if kind == "key" else None
        hybrid = dict(weights=weights, signal_dims=knobs.get("signal_dims"),
                      signal_scale=knobs.get("signal_scale", "channel"), channel_dist=channel_dist,
                      token_dist=token_dist, qjl=mode, qjl_ratio=qjl_ratio, step=8,
                      min_bits=int(knobs.get("min_bits", 0)))
        plan = alloc.plan_hybrid(lam, budget, signal_bits=knobs.get("signal_bits", 8), **hybrid)
        if plan is None and "signal_bits" not in knobs:
            # small head_dim / tight budget: 8-bit signal dims do not fit; search their bits
            plan = alloc.plan_hybrid(lam, budget, signal_bits=None, **hybrid)
        if plan is not None:
            wsum = lam if weights is None or kind != "key" else weights * lam
            plan.predicted = plan.predicted / max(float(wsum.sum()), 1e-30)
        plan_cache[key] = plan
        return plan

    def no_fit() -> ValueError:
        return ValueError(f"bits={bits}: no {method} format fits {total_bytes} bytes per token for K+V at "
                          f"head_dim={d} (qjl={qjl_mode!r}, knobs={knobs}); valid range [{lo:.4f}, {hi:g}]")

    # a profile's measured sensitivity drives spectralquant only: turboquant stays data-oblivious unless
    # layer_weights is passed explicitly
    sens = _layer_weights(layer_weights if (layer_weights is not None or method == "spectralquant") else False,
                          profile, L)
    if sens is not None and key_bytes is None:
        chosen = _allocate_layers(plan_for, sens, L, total_bytes, d, float(knobs.get("layer_spread", 1.0)))
        if chosen is None:
            raise no_fit()
    else:
        chosen = []
        for layer in range(L):
            if key_bytes is not None:
                candidates = [int(key_bytes)]
            else:
                half = (total_bytes + 1) // 2
                candidates = list(range(max(1, half - window), min(total_bytes, half + window) + 1))
            best = None
            for kb in candidates:
                kp, vp = plan_for(layer, "key", kb), plan_for(layer, "value", total_bytes - kb)
                if kp is None or vp is None:
                    continue
                used = kp.bytes_per_token() + vp.bytes_per_token()
                score = (key_weight * kp.predicted + vp.predicted, -used, abs(kb - total_bytes / 2))
                if best is None or score < best[0]:
                    best = (score, kp, vp)
            if best is None:
                raise no_fit()
            chosen.append((best[1], best[2]))

    layers = []
    for layer, (kplan, vplan) in enumerate(chosen):
        parts = {}
        for kind, plan in (("key", kplan), ("value", vplan)):
            parts[kind] = _layer_part(method, stats_all[layer].get(kind), plan, d, H, layer, kind, seed,
                                      bool(knobs.get("rotate_rest", True)))
        S = None
        if kplan.qjl_bits > 0:
            S = qjl_mod.qjl_matrix(kplan.qjl_bits, kplan.qjl_dims, _generator(seed, layer, "key", salt=1))
        layers.append(LayerCodec(parts["key"][0], parts["key"][1], parts["value"][0], parts["value"][1],
                                 parts["key"][2], parts["value"][2], S))

    config = dict(bits=bits, method=method, qjl=qjl_mode, center=center, uniform_bits=uniform_bits,
                  seed=seed, layout=layout, **{k: v for k, v in knobs.items() if not isinstance(v, Tensor)})
    if method == "spectralquant":
        config["centered"] = [[center and centering[k][l] for k in KINDS] for l in range(L)]
    config["layer_adaptive"] = sens is not None and key_bytes is None
    # predicted relative error (1 = nothing stored) of every (layer, kind) format: what a measured
    # sensitivity is divided by to give layer_weights (loss per unit of predicted error)
    config["predicted"] = [[float(kp.predicted), float(vp.predicted)] for kp, vp in chosen]
    return KVCodec(layers, method, L, H, d, config)


def _centering(given: Any, profile: Any, kind: str, L: int) -> list[bool]:
    """Per layer: center this kind (centered PCA basis, mean subtracted) or not (second-moment basis).

    `given`: a bool or a sequence of L bools; None = the profile's `meta["kv_center"]` ([L, 2] bools,
    key then value) when present, else keys centered and values not (see the module doc)."""
    if given is None:
        meta = getattr(profile, "meta", None) or {}
        table = meta.get("kv_center")
        if table is not None:
            given = [bool(row[KINDS.index(kind)]) for row in table]
        else:
            given = kind == "key"
    if isinstance(given, (bool, int)):
        return [bool(given)] * L
    flags = [bool(x) for x in given]
    if len(flags) != L:
        raise ValueError(f"center_{kind}s must be a bool or {L} bools, got {len(flags)}")
    return flags


def _layer_weights(given: Any, profile: Any, L: int) -> Optional[Tensor]:
    """Sensitivity [L, 2] (key, value) for the layer-adaptive allocation, or None (equal bytes per layer).

    `given`: a tensor/list [L, 2] or [L] (both kinds alike); None = the profile's
    `meta["kv_sensitivity"]` when present; False = none."""
    if given is False:
        return None
    if given is None:
        meta = getattr(profile, "meta", None) or {}
        given = meta.get("kv_sensitivity")
        if given is None:
            return None
    w = torch.as_tensor(given, dtype=torch.float64)
    if w.dim() == 1:
        w = w[:, None].expand(-1, 2)
    if w.shape != (L, 2):
        raise ValueError(f"layer_weights must be [num_layers={L}, 2] (key, value) or [{L}], got {tuple(w.shape)}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("layer_weights must be finite and >= 0")
    return w.clamp_min(float(w.max()) * 1e-3 + 1e-30)


def _allocate_layers(plan_for, sens: Tensor, L: int, total_bytes: int, d: int, spread: float = math.inf):
    """Layer-adaptive bytes: per (layer, kind) a plan, minimizing sum sens[l, k] * predicted[l, k] with
    sum of bytes <= L * total_bytes (the same average bits per element as equal budgets).

    Lagrangian relaxation over the (convex hull of the) per-(layer, kind) byte/error curves, then the
    leftover bytes go greedily to the best error reduction per byte. Returns [(key plan, value plan)]."""
    per_kind = (d + 7) // 8 + 2
    lo_b, hi_b = per_kind, min(d + 2, total_bytes - per_kind)  # at most 8 bits per element on one kind
    if math.isfinite(spread):
        half = total_bytes / 2
        lo_b = max(lo_b, int(math.ceil(half - spread * d / 8 - 1e-9)))
        hi_b = min(hi_b, int(math.floor(half + spread * d / 8 + 1e-9)))
    opts: dict = {}
    for l in range(L):
        for ki, kind in enumerate(KINDS):
            seen: dict = {}
            for b in range(lo_b, hi_b + 1):
                p = plan_for(l, kind, b)
                if p is None or not math.isfinite(p.predicted):
                    continue
                used = p.bytes_per_token()
                if used not in seen or p.predicted < seen[used].predicted:
                    seen[used] = p
            curve, best_err = [], math.inf
            for used in sorted(seen):  # Pareto front: more bytes, strictly less error
                e = float(sens[l, ki]) * seen[used].predicted
                if e < best_err:
                    curve.append((used, e, seen[used]))
                    best_err = e
            if not curve:
                return None
            opts[(l, ki)] = curve
    budget = L * total_bytes
    if sum(c[0][0] for c in opts.values()) > budget:
        return None

    def pick(lam: float) -> dict:
        return {k: min(range(len(c)), key=lambda i: (c[i][1] + lam * c[i][0], c[i][0])) for k, c in opts.items()}

    def cost(sel: dict) -> int:
        return sum(opts[k][i][0] for k, i in sel.items())

    lo_l, hi_l = 0.0, 1.0
    while cost(pick(hi_l)) > budget:
        hi_l *= 4.0
    if cost(pick(lo_l)) <= budget:
        sel = pick(lo_l)
    else:
        for _ in range(100):
            mid = 0.5 * (lo_l + hi_l)
            if cost(pick(mid)) > budget:
                lo_l = mid
            else:
                hi_l = mid
        sel = pick(hi_l)
    spent = cost(sel)
    while True:  # spend the leftover: best error reduction per byte that still fits
        best = None
        for k, i in sel.items():
            c = opts[k]
            for j in range(i + 1, len(c)):
                extra = c[j][0] - c[i][0]
                if spent + extra > budget:
                    break
                gain = (c[i][1] - c[j][1]) / extra
                if best is None or gain > best[0]:
                    best = (gain, k, j, extra)
        if best is None:
            break
        _, k, j, extra = best
        sel[k] = j
        spent += extra
    return [(opts[(l, 0)][sel[(l, 0)]][2], opts[(l, 1)][sel[(l, 1)]][2]) for l in range(L)]


def _signal_guess(lam: Tensor) -> int:
    """Signal dims for a QJL sketch in the PCA-only ablations: the participation ratio, rounded up to 8."""
    lam = lam.double().clamp_min(0)
    pr = float(lam.sum() ** 2 / (lam.pow(2).sum().clamp_min(1e-300)))
    return min(lam.numel(), max(8, 8 * math.ceil(pr / 8)))


def _layer_part(method: str, stats, plan: alloc.Plan, d: int, H: int, layer: int, kind: str, seed: int,
                rotate_rest: bool) -> tuple[Tensor, Tensor, TensorFormat]:
    """(basis [H, d, d], mean [H, d], format) for one kind of one layer."""
    gen = _generator(seed, layer, kind)
    if method == "turboquant":
        basis = torch.stack([randomized_hadamard(d, gen) for _ in range(H)])
        return basis, torch.zeros(H, d), _to_format(plan, d, torch.ones(H, d))
    mu, U, lam = stats
    signal = plan.rotate_from
    if plan.rotate_groups:  # each group: a block of PCA dims, randomly rotated within itself
        bases = []
        for h in range(H):
            blocks = [randomized_hadamard(g.size, gen) for g in plan.groups]
            bases.append(torch.block_diag(*blocks) @ U[h])
        basis = torch.stack(bases)
    elif (rotate_rest and signal < d) or plan.rotate_signal:
        bases = []
        for h in range(H):
            rot = torch.eye(d)
            if rotate_rest and signal < d:
                rot[signal:, signal:] = randomized_hadamard(d - signal, gen)
            if plan.rotate_signal:
                rot[:signal, :signal] = randomized_hadamard(signal, gen)
            bases.append(rot @ U[h])
        basis = torch.stack(bases)
    else:
        basis = U.clone()
    # variance of each storage coordinate: diag(B Sigma B^T), Sigma = U^T diag(lam) U
    cov = torch.einsum("hkd,hk,hke->hde", U.double(), lam.double(), U.double())
    var = torch.einsum("hid,hde,hie->hi", basis.double(), cov, basis.double())
    channel_scale = var.clamp_min(1e-20).sqrt().float()
    return basis, mu.clone(), _to_format(plan, d, channel_scale)
