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


FP32_OR_WIDER = (torch.float32, torch.float64)


def at_least_fp32(x: torch.Tensor) -> torch.Tensor:
    """`x` in fp32 when it is in a lower floating precision; fp32, fp64 and integer tensors as they are."""
    if x.dtype in FP32_OR_WIDER or not x.is_floating_point():  # the common case, without a dispatcher call
        return x
    return x.to(torch.promote_types(x.dtype, torch.float32))
