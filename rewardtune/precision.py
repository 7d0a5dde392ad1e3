"""Mixed precision in one place: the autocast dtype of `train.mixed_precision`, and `at_least_fp32`, which every
quantity the maths needs exactly (states, log-probabilities, values, rewards, samples) passes through when a network
ran in bf16/fp16."""

from __future__ import annotations

import torch

AUTOCAST_DTYPES = {"no": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def autocast(device_type: str, mixed_precision: str):
    """`torch.autocast` for a `train.mixed_precision` setting ("no": a context that changes nothing).

    Autocast's cache of low-precision weight copies is off: a training iteration takes several optimiser steps inside
    one autocast region (the value's T TD steps, the energy's step, then the policy step on the updated value), and a
    cached copy is not refreshed when its weight changes in place, so every forward after the region's first step
    would use the weights of before it. FSDP refills its gathered weights in place at every forward too."""
    dtype = AUTOCAST_DTYPES[mixed_precision]
    return torch.autocast(device_type, dtype=dtype, enabled=dtype is not None, cache_enabled=False)


def slow_precision_warning(device: torch.device, mixed_precision: str) -> str | None:
    """A warning line when `mixed_precision` will make a run slower, not faster, on `device`: bf16 on a CPU without
    bf16 instructions (AVX512-BF16 or AMX, which oneDNN's bf16 kernels need; elsewhere they emulate it), or fp16 on a
    CPU. None otherwise (a GPU, or a CPU that has them)."""
    if device.type != "cpu" or mixed_precision == "no":
        return None
    if mixed_precision == "fp16":
        return 'train.mixed_precision = "fp16" on a CPU is slower than fp32; use "bf16" or "no"'
    if mixed_precision == "bf16" and not cpu_has_bf16():
        return ('train.mixed_precision = "bf16" on a CPU without bf16 instructions (AVX512-BF16 or AMX) is slower '
                'than fp32; --set train.mixed_precision=no')
    return None


def cpu_has_bf16() -> bool:
    """Whether this CPU runs oneDNN's bf16 kernels natively."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):  # a build without oneDNN
        return False


FP32_OR_WIDER = (torch.float32, torch.float64)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32 when it is in a lower floating precision; fp32, fp64 and integer tensors as they are."""
    if x.dtype in FP32_OR_WIDER or not x.is_floating_point():  # the common case, without a dispatcher call
        return x
    return x.to(torch.promote_types(x.dtype, torch.float32))
