"""Custom ops (torch.library) with a torch reference and a Triton implementation each; kernel-path selection."""
from __future__ import annotations

import importlib.util
import os
from typing import Optional

import torch

KERNEL_CHOICES = ("auto", "triton", "tensorrt", "torch")


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
    """Resolve the `kernels` option: "auto" picks TensorRT on SM100, Triton on other GPUs, torch on CPU."""
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
    if tensorrt_unavailable_reason(device_type, capability) is None:
        return "tensorrt"
    if device_type == "cuda" and triton_unavailable_reason(device_type) is None:
        return "triton"
    return "torch"
