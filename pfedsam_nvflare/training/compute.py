"""Where and how a site computes: the device, bfloat16 autocast where the hardware runs it natively, and
convolution weights in channels-last memory order.

bfloat16 halves the cost of LiteMedSAM's matrix products on a GPU and on CPUs with bfloat16 instructions (AVX-512
BF16 or AMX): measured in ``benchmarks/step_time.py``, a training step ran 2.1x faster on a 2-core AVX-512 BF16 CPU.
On a CPU without them, bfloat16 is emulated and many times slower, so ``auto`` keeps float32 there. The choice
depends on the machine only, never on a timing, so a site's runs repeat on the same machine. Channels-last
convolution weights made LiteMedSAM's frozen encoder prefix a further 24 % faster on that CPU (bfloat16).
"""

from __future__ import annotations

from contextlib import nullcontext
from typing import Any, TypeVar

import torch
from torch import nn

ModuleT = TypeVar("ModuleT", bound=nn.Module)

DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "float32", "bfloat16")


def check_device(device: str) -> None:
    if device not in ("auto", "cpu") and not device.startswith("cuda"):
        raise ValueError(f"device must be 'auto', 'cpu' or 'cuda[:N]', got {device!r}")


def check_precision(precision: str) -> None:
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {', '.join(PRECISIONS)}, got {precision!r}")


def resolve_device(device: str) -> torch.device:
    """``auto``: the GPU where there is one, else the CPU."""
    check_device(device)
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def native_bfloat16(device: torch.device) -> bool:
    """Whether ``device`` computes in bfloat16 natively (not emulated)."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    checks = [getattr(torch.cpu, name, None) for name in ("_is_avx512_bf16_supported", "_is_amx_tile_supported")]
    return any(check() for check in checks if check is not None)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype:
    """The dtype of autocast on ``device``: ``auto`` is bfloat16 where it is native, float32 elsewhere."""
    check_precision(precision)
    if precision == "auto":
        return torch.bfloat16 if native_bfloat16(device) else torch.float32
    return torch.bfloat16 if precision == "bfloat16" else torch.float32


def autocast(device: torch.device, dtype: torch.dtype) -> Any:
    """Mixed precision in ``dtype`` (bfloat16 needs no loss scaling), or nothing for float32."""
    if dtype == torch.float32:
        return nullcontext()
    return torch.autocast(device.type, dtype=dtype)


def place(model: ModuleT, device: torch.device) -> ModuleT:
    """``model`` on ``device``, its convolution weights in channels-last order (oneDNN's and cuDNN's fast layout;
    the partition's states are handed out in the standard layout, see ``Partition.state``)."""
    return model.to(device=device, memory_format=torch.channels_last)
