"""Run-time device choice: CUDA when present, else CPU; recorded in every run."""

from __future__ import annotations

import torch

from jobs.common.config import DTYPES
from jobs.common.errors import JobError


def pick_device(setting: str) -> str:
    if setting == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise JobError(f"device={setting!r} requested but no CUDA device is visible")
    if setting not in ("cpu", "mps") and not setting.startswith("cuda"):
        raise JobError(f"device={setting!r}: expected auto, cpu, cuda or cuda:N")
    return setting


def pick_dtype(setting: str, device: str) -> torch.dtype:
    """auto: bf16 on CUDA (halves memory, tensor cores), fp32 on CPU (bf16 is slow on CPUs without
    avx512_bf16/AMX, and answers must not depend on which CPU ran them)."""
    if setting == "auto":
        return torch.bfloat16 if device.startswith("cuda") else torch.float32
    if setting not in DTYPES:
        raise JobError(f"dtype={setting!r}: expected one of {', '.join(DTYPES)}")
    return getattr(torch, DTYPES[setting])
