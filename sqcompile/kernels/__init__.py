"""Custom ops (torch.library) with a torch reference and a Triton implementation each; kernel-path selection.

`resolve_kernels` is the one place that decides which implementation every op the backend puts in a graph
runs: from `options["kernels"]`, the device, what is importable, and two documented environment overrides. The
backend resolves it once per compile into a `KernelPlan` and hands each choice to its ops as their `kernel`
argument (`sqcompile.passes.choose_kernels`); the ops read no environment and no module state to choose.

Environment overrides (read here only, at compile time):
  SQCOMPILE_DECODE_KERNEL = auto | cuda | triton | torch   decode attention on a GPU: "cuda" the hand-written
      fast-layout kernel (an unsupported layout is then a compile-time error instead of the Triton kernel),
      "triton" the Triton kernels, "torch" the torch reference.
  SQCOMPILE_WRITE_KERNEL = auto | triton | torch           the KV-cache writes (quantize and pack, exact slots).
An override applies where the resolved path runs kernels at all (not under kernels="torch").
"""
from __future__ import annotations

import copy
import functools
import importlib.util
import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Optional

import torch

KERNEL_CHOICES = ("auto", "triton", "tensorrt", "torch")
DECODE_ENV = "SQCOMPILE_DECODE_KERNEL"
WRITE_ENV = "SQCOMPILE_WRITE_KERNEL"
DECODE_CHOICES = ("auto", "cuda", "triton", "torch")
WRITE_CHOICES = ("auto", "triton", "torch")


def tensorrt_unavailable_reason(device_type: str, capability: Optional[tuple] = None) -> Optional[str]:
    """None when the TensorRT path can run here, else why not (not importable / not an SM100 GPU)."""
    if importlib.util.find_spec("torch_tensorrt") is None:
        return "torch_tensorrt is not importable"
    if device_type != "cuda" or not torch.cuda.is_available():
        return "TensorRT needs a CUDA GPU"
    major, minor = capability or torch.cuda.get_device_capability()
    if major != 10:
        return f"the TensorRT path targets SM100 (Blackwell); this GPU is SM{major}{minor}"
    return None


def triton_unavailable_reason(device_type: str) -> Optional[str]:
    if importlib.util.find_spec("triton") is None:
        return "triton is not importable"
    if device_type == "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return None
    return f"Triton kernels need a GPU (device is {device_type}); set TRITON_INTERPRET=1 to interpret them on CPU"


def select_kernels(choice: str, device_type: str, capability: Optional[tuple] = None) -> str:
    """Resolve the `kernels` option to a path: "auto" picks Triton on a GPU, torch elsewhere. "auto" never picks
    TensorRT: no test runs sqcompile's ops through torch_tensorrt on hardware; it is taken only when asked for."""
    if choice not in KERNEL_CHOICES:
        raise ValueError(f"kernels must be one of {KERNEL_CHOICES}, got {choice!r}")
    if choice == "torch":
        return "torch"
    if choice == "tensorrt":
        why = tensorrt_unavailable_reason(device_type, capability)
        if why:
            raise RuntimeError(f"kernels='tensorrt' cannot run here: {why}")
        return "tensorrt"
    if choice == "triton":
        why = triton_unavailable_reason(device_type)
        if why:
            raise RuntimeError(f"kernels='triton' cannot run here: {why}")
        return "triton"
    if device_type == "cuda" and triton_unavailable_reason(device_type) is None:
        return "triton"
    return "torch"


@dataclass(frozen=True)
class KernelPlan:
    """Which implementation each op the backend inserts runs, decided once per compile (`resolve_kernels`).

    path:   what `kernels` resolved to: "torch" | "triton" | "tensorrt" (TensorRT lowers the graph; its ops run as
            on the Triton path).
    decode: decode attention and its exact-token split: "torch" | "triton" | "cuda" (the hand-written CUDA kernel
            of the fast layout where it supports the layout, else Triton; the bit-plane layout has Triton only):
            "cuda" on a GPU under kernels="auto" (or "tensorrt"), "triton" under kernels="triton".
    write:  the KV-cache writes (quantize and pack; the exact slots): "torch" | "triton".
    moe:    the fused MoE and experts ops: "torch" | "triton".
    strict_cuda: the decode override asked for "cuda": a layout it does not support is an error, not Triton.
    """

    requested: str
    device: str
    path: str
    decode: str
    write: str
    moe: str
    overrides: tuple[str, ...] = ()
    strict_cuda: bool = False

    def __str__(self) -> str:
        extra = f"; overrides {', '.join(self.overrides)}" if self.overrides else ""
        return (f"kernels={self.requested!r} on {self.device} -> {self.path} (decode {self.decode}, write "
                f"{self.write}, moe {self.moe}{extra})")


def resolve_kernels(choice: str, device_type: str, capability: Optional[tuple] = None,
                    env: Optional[Mapping[str, str]] = None) -> KernelPlan:
    """The `KernelPlan` of one compile: `select_kernels`' path, then per op family, then the environment
    overrides (`env`, default os.environ). An explicit choice or override that cannot run here is an error."""
    env = os.environ if env is None else env
    path = select_kernels(choice, device_type, capability)
    if path == "torch":
        return KernelPlan(choice, device_type, "torch", "torch", "torch", "torch")
    on_gpu = device_type == "cuda"
    # the hand-written CUDA decode kernel where "auto" (or TensorRT, whose graph runs our ops as they are) chose
    # the GPU kernels; kernels="triton" means Triton
    decode, write, moe = ("cuda" if on_gpu and choice != "triton" else "triton"), "triton", "triton"
    overrides, strict = [], False
    d = env.get(DECODE_ENV, "auto") or "auto"
    if d not in DECODE_CHOICES:
        raise ValueError(f"{DECODE_ENV} must be one of {DECODE_CHOICES}, got {d!r}")
    if d != "auto":
        if d == "cuda" and not on_gpu:
            raise ValueError(f"{DECODE_ENV}=cuda but the CUDA decode kernel cannot run: the compile's device is "
                             f"{device_type}")
        decode, strict = d, d == "cuda"
        overrides.append(f"{DECODE_ENV}={d}")
    w = env.get(WRITE_ENV, "auto") or "auto"
    if w not in WRITE_CHOICES:
        raise ValueError(f"{WRITE_ENV} must be one of {WRITE_CHOICES}, got {w!r}")
    if w != "auto":
        write = w
        overrides.append(f"{WRITE_ENV}={w}")
    return KernelPlan(choice, device_type, path, decode, write, moe, tuple(overrides), strict)


OP_KERNELS = ("auto", "torch", "triton", "cuda")


def op_kernel(kernel: str, tensor: torch.Tensor) -> str:
    """An op's `kernel` argument -> the implementation it runs: "torch" | "triton" | "cuda". "auto" (what a call
    outside a compiled graph passes, e.g. an eager `SpectralCache`) is "cuda" on CUDA tensors, else "torch";
    ops without a CUDA kernel of their own read "cuda" as "triton"."""
    if kernel not in OP_KERNELS:
        raise ValueError(f"kernel must be one of {OP_KERNELS}, got {kernel!r}")
    if kernel == "auto":
        return "cuda" if tensor.is_cuda else "torch"
    return kernel


def uses_triton(kernel: str, tensor: torch.Tensor) -> bool:
    """Whether an op without a CUDA kernel of its own runs its Triton kernel for this `kernel` argument."""
    return op_kernel(kernel, tensor) != "torch"


@functools.lru_cache(maxsize=None)
def _tuned_table(kernel: str) -> dict:
    return json.loads((Path(__file__).parent / "configs" / f"{kernel}.json").read_text())


def tuned_config(kernel: str, device_name: Optional[str] = None) -> dict:
    """The tuned launch configs of `kernel` as data (`sqcompile/kernels/configs/<kernel>.json`, written from the
    tuning benchmarks) for the GPU named `device_name` (`torch.cuda.get_device_name`), else the file's "default"
    entry. A copy: callers may change it."""
    table = _tuned_table(kernel)
    return copy.deepcopy(table.get(device_name or "", table["default"]))
