"""`SpectralProfile`: per (layer, kv-head) means and covariance eigenbases of post-RoPE keys and values.

A profile is what calibration produces and what the codec, the backend and `SpectralCache` consume.
Layout (all float32):

    key_mean     [L, Hkv, d]        mean of post-RoPE keys
    key_eigvecs  [L, Hkv, d, d]     ROWS are eigenvectors of the centered covariance, eigenvalues
                                    descending, so R_k = key_eigvecs[l, h] and k' = R_k (k - mu_k)
    key_eigvals  [L, Hkv, d]        descending
    value_*                         the same for values

Saved as one safetensors file; the fingerprint, token count and meta travel as JSON strings in the
safetensors metadata header.
"""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import Tensor

FORMAT_VERSION = 1
_TENSOR_NAMES = (
    "key_mean", "key_eigvecs", "key_eigvals", "value_mean", "value_eigvecs", "value_eigvals",
)
_KINDS = ("key", "value")


def _config_get(config: Any, name: str, default: Any = None) -> Any:
    if isinstance(config, dict):
        return config.get(name, default)
    return getattr(config, name, default)


def _jsonable(value: Any) -> Any:
    """Keep what JSON can hold (numbers, strings, bools, lists, dicts); drop the rest."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, torch.Tensor) and value.numel() == 1:
        return value.item()
    return str(value)


def text_config(model_or_config: Any) -> Any:
    """The decoder's text config of a model or config (a multimodal config's `get_text_config(decoder=True)`), or
    what was given where it has none."""
    config = getattr(model_or_config, "config", model_or_config)
    return config.get_text_config(decoder=True) if hasattr(config, "get_text_config") else config


def model_fingerprint(config: Any) -> dict:
    """The shape facts a profile must match: layers, heads, kv-heads, head_dim and the RoPE settings.

    Accepts an HF `PretrainedConfig` (or a plain dict with the same keys). `head_dim` is
    `config.head_dim` when set, else `hidden_size // num_attention_heads`; RoPE settings come from
    `config.rope_parameters` (transformers >= 5) or `rope_theta` / `rope_scaling` (older configs).
    """
    text_config = _config_get(config, "text_config", None)
    if text_config is not None and _config_get(config, "num_hidden_layers") is None:
        config = text_config
    num_layers = _config_get(config, "num_hidden_layers")
    num_heads = _config_get(config, "num_attention_heads")
    if num_layers is None or num_heads is None:
        raise ValueError("config has no num_hidden_layers / num_attention_heads: not a decoder LLM config")
    num_kv_heads = _config_get(config, "num_key_value_heads") or num_heads
    head_dim = _config_get(config, "head_dim") or _config_get(config, "hidden_size") // num_heads
    rope = _config_get(config, "rope_parameters", None)
    if rope is None:
        rope = {}
        theta = _config_get(config, "rope_theta", None)
        if theta is not None:
            rope["rope_theta"] = theta
        scaling = _config_get(config, "rope_scaling", None)
        if scaling:
            rope.update(dict(scaling))
    rope = _jsonable(dict(rope))
    return {
        "num_layers": int(num_layers),
        "num_heads": int(num_heads),
        "num_kv_heads": int(num_kv_heads),
        "head_dim": int(head_dim),
        "rope": rope,
    }


def participation_ratio(eigvals: Tensor) -> Tensor:
    """(sum lambda)^2 / sum lambda^2 over the last dim (negative round-off eigenvalues count as 0)."""
    lam = eigvals.double().clamp_min(0)
    num = lam.sum(-1) ** 2
    den = (lam ** 2).sum(-1)
    return torch.where(den > 0, num / den.clamp_min(1e-300), torch.zeros_like(num)).float()


@dataclass
class SpectralProfile:
    """Calibrated spectra of post-RoPE keys and values, per (layer, kv-head). See the module doc."""

    fingerprint: dict
    key_mean: Tensor
    key_eigvecs: Tensor
    key_eigvals: Tensor
    value_mean: Tensor
    value_eigvecs: Tensor
    value_eigvals: Tensor
    tokens: int = 0
    meta: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        for name in _TENSOR_NAMES:
            setattr(self, name, getattr(self, name).detach().to(torch.float32).contiguous())
        self._check_shapes()

    # -- shapes -----------------------------------------------------------------------------
    @property
    def num_layers(self) -> int:
        return self.key_mean.shape[0]

    @property
    def num_kv_heads(self) -> int:
        return self.key_mean.shape[1]

    @property
    def head_dim(self) -> int:
        return self.key_mean.shape[2]

    def _check_shapes(self) -> None:
        L, H, d = self.key_mean.shape
        want = {"mean": (L, H, d), "eigvecs": (L, H, d, d), "eigvals": (L, H, d)}
        for kind in _KINDS:
            for part, shape in want.items():
                got = tuple(getattr(self, f"{kind}_{part}").shape)
                if got != shape:
                    raise ValueError(f"SpectralProfile: {kind}_{part} has shape {got}, expected {shape}")
        fp = self.fingerprint
        for name, actual in (("num_layers", L), ("num_kv_heads", H), ("head_dim", d)):
            if name in fp and int(fp[name]) != actual:
                raise ValueError(
                    f"SpectralProfile: fingerprint says {name}={fp[name]} but the tensors have {actual}")

    # -- accessors --------------------------------------------------------------------------
    def mean(self, kind: str) -> Tensor:
        return getattr(self, f"{_kind(kind)}_mean")

    def eigvecs(self, kind: str) -> Tensor:
        return getattr(self, f"{_kind(kind)}_eigvecs")

    def eigvals(self, kind: str) -> Tensor:
        return getattr(self, f"{_kind(kind)}_eigvals")

    def d_eff(self, kind: str = "key") -> Tensor:
        """[L, Hkv] participation ratio (sum lambda)^2 / sum lambda^2 of the centered spectrum."""
        return participation_ratio(self.eigvals(kind))

    def check_matches(self, fingerprint: dict) -> None:
        """Raise ValueError naming every mismatch (layers, heads, kv-heads, head_dim) with both values."""
        problems = []
        for name in ("num_layers", "num_kv_heads", "head_dim", "num_heads"):
            expected = self.fingerprint.get(name)
            actual = fingerprint.get(name)
            if expected is None or actual is None:
                continue
            if int(expected) != int(actual):
                problems.append(f"{name}: profile has {expected}, model has {actual}")
        if problems:
            raise ValueError("SpectralProfile does not match the model: " + "; ".join(problems))

    # -- persistence ------------------------------------------------------------------------
    def save(self, path: Union[str, Path]) -> Path:
        from safetensors.torch import save_file

        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tensors = {name: getattr(self, name).contiguous() for name in _TENSOR_NAMES}
        metadata = {
            "format": "sqcompile.SpectralProfile",
            "format_version": str(FORMAT_VERSION),
            "fingerprint": json.dumps(_jsonable(self.fingerprint)),
            "tokens": str(int(self.tokens)),
            "meta": json.dumps(_jsonable(self.meta)),
        }
        tmp = path.with_name(path.name + ".tmp")
        save_file(tensors, str(tmp), metadata=metadata)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: Union[str, Path]) -> "SpectralProfile":
        from safetensors import safe_open

        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no SpectralProfile at {path}")
        try:
            with safe_open(str(path), framework="pt") as f:
                metadata = f.metadata() or {}
                tensors = {name: f.get_tensor(name) for name in f.keys()}
        except Exception as e:  # safetensors raises its own error types for truncated/garbled files
            raise ValueError(f"{path} is not a readable SpectralProfile (corrupted or truncated?): {e}") from e
        if metadata.get("format") != "sqcompile.SpectralProfile":
            raise ValueError(f"{path} is a safetensors file but not a SpectralProfile (no sqcompile metadata)")
        missing = [n for n in _TENSOR_NAMES if n not in tensors]
        if missing:
            raise ValueError(f"{path}: SpectralProfile is missing tensors {missing}")
        try:
            fingerprint = json.loads(metadata["fingerprint"])
            meta = json.loads(metadata.get("meta", "{}"))
            tokens = int(metadata.get("tokens", "0"))
        except (KeyError, ValueError) as e:
            raise ValueError(f"{path}: SpectralProfile metadata is corrupted: {e}") from e
        for name in _TENSOR_NAMES:
            if not torch.isfinite(tensors[name]).all():
                raise ValueError(f"{path}: SpectralProfile tensor {name} holds non-finite values")
        return cls(fingerprint=fingerprint, tokens=tokens, meta=meta,
                   **{name: tensors[name] for name in _TENSOR_NAMES})

    # -- construction -----------------------------------------------------------------------
    @classmethod
    def from_moments(cls, fingerprint: dict, key_sum: Tensor, key_outer: Tensor, value_sum: Tensor,
                     value_outer: Tensor, count: Union[int, Tensor], meta: Optional[dict] = None,
                     ) -> "SpectralProfile":
        """Build a profile from float64 sums [L,H,d] and sums of outer products [L,H,d,d] over `count` tokens."""
        count_t = torch.as_tensor(count, dtype=torch.float64)
        if (count_t < 2).any():
            raise ValueError(f"need at least 2 tokens per (layer, kv-head) to estimate a covariance, got {count}")
        out = {}
        for kind, s, o in (("key", key_sum, key_outer), ("value", value_sum, value_outer)):
            s = s.double()
            o = o.double()
            n = count_t.reshape(count_t.shape + (1,) * (s.dim() - count_t.dim()))
            mean = s / n
            cov = o / n.unsqueeze(-1) - mean.unsqueeze(-1) * mean.unsqueeze(-2)
            cov = 0.5 * (cov + cov.transpose(-1, -2))
            eigvals, eigvecs = torch.linalg.eigh(cov)  # ascending, columns
            eigvals = eigvals.flip(-1)
            eigvecs = eigvecs.flip(-1).transpose(-1, -2)  # rows, descending
            out[f"{kind}_mean"] = mean.float()
            out[f"{kind}_eigvecs"] = eigvecs.float()
            out[f"{kind}_eigvals"] = eigvals.clamp_min(0).float()
        tokens = int(count_t.min().item()) if count_t.numel() else 0
        return cls(fingerprint=dict(fingerprint), tokens=tokens, meta=dict(meta or {}), **out)

    @classmethod
    def random(cls, num_layers: int, num_kv_heads: int, head_dim: int, num_heads: Optional[int] = None,
               seed: int = 0, mean_scale: float = 1.0) -> "SpectralProfile":
        """Random orthogonal bases, nonzero means, decreasing eigenvalues: for tests and rotation-only use."""
        g = torch.Generator().manual_seed(seed)
        L, H, d = num_layers, num_kv_heads, head_dim
        out = {}
        for kind in _KINDS:
            a = torch.randn(L, H, d, d, generator=g, dtype=torch.float64)
            q, r = torch.linalg.qr(a)
            q = q * torch.sign(torch.diagonal(r, dim1=-2, dim2=-1)).unsqueeze(-2)  # Haar-distributed
            out[f"{kind}_eigvecs"] = q.transpose(-1, -2).float()
            decay = torch.exp(-torch.arange(d, dtype=torch.float64) / max(d / 8, 1.0))
            out[f"{kind}_eigvals"] = (decay * (1 + 0.1 * torch.rand(L, H, 1, generator=g, dtype=torch.float64))).float()
            out[f"{kind}_mean"] = (mean_scale * torch.randn(L, H, d, generator=g)).float()
        fingerprint = {"num_layers": L, "num_heads": int(num_heads or H), "num_kv_heads": H,
                       "head_dim": d, "rope": {}}
        return cls(fingerprint=fingerprint, tokens=0, meta={"method": "random", "seed": seed}, **out)

    def __repr__(self) -> str:
        L, H, d = self.num_layers, self.num_kv_heads, self.head_dim
        dk = self.d_eff("key").mean().item()
        dv = self.d_eff("value").mean().item()
        return (f"SpectralProfile(layers={L}, kv_heads={H}, head_dim={d}, tokens={self.tokens}, "
                f"d_eff key={dk:.1f} value={dv:.1f})")


def _kind(kind: str) -> str:
    if kind in ("key", "k", "keys"):
        return "key"
    if kind in ("value", "v", "values"):
        return "value"
    raise ValueError(f"kind must be 'key' or 'value', got {kind!r}")


__all__ = ["SpectralProfile", "model_fingerprint", "participation_ratio"]
