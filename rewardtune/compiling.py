"""`train.compile = true`: the run's networks under `torch.compile`, with a fallback (issue W2 8/8).

Each network (`networks`: every direct child with parameters of the modules the trainer owns, i.e. the backbone's
network, the value's, a learning reward's or the algorithm's own) is compiled in place (`nn.Module.compile`), so
parameter names and checkpoints are those of the uncompiled module; the EMA copy stays eager. Compilation happens
lazily, at a network's first call in a shape it has not seen; a failure then (no C++ compiler, an operation the
compiler cannot take) raises in the first evaluation or iteration, before any optimiser step of that network. The
trainer then turns compilation off for every network (`uncompile`), says so in one line and runs that evaluation or
iteration again (`Trainer.fall_back_from_compile`). It is meant for GPU runs, where a UNet's many small kernels fuse.
"""

from __future__ import annotations

import torch
from torch import nn

BACKEND = "inductor"  # torch.compile's backend (tests use "eager", which traces without generating code)


def networks(modules: dict[str, nn.Module]) -> list[nn.Module]:
    """The modules to compile among the trainer's `modules` (name -> module; the EMA copy, "ema", is left out: it
    only samples for evaluation): every direct child that holds parameters (the backbone's network, the value's,
    a reward's energy), each once. The top-level modules themselves are not compiled: their methods (`mean`,
    `sample`, the value at t) call these networks."""
    chosen: dict[int, nn.Module] = {}
    for name, module in modules.items():
        if name == "ema":
            continue
        for child in module.children():
            if any(True for _ in child.parameters()):
                chosen.setdefault(id(child), child)
    return list(chosen.values())


def compile_networks(modules: list[nn.Module], backend: str | None = None) -> None:
    """`torch.compile` each module in place (its forward; `dynamic=None`: a second batch size makes the graph
    dynamic rather than compiling once per size)."""
    for module in modules:
        module.compile(backend=backend or BACKEND)


def uncompile(modules: list[nn.Module]) -> None:
    """Undo `compile_networks` (nn.Module.compile keeps its compiled call in `_compiled_call_impl`) and drop
    dynamo's caches."""
    for module in modules:
        module._compiled_call_impl = None
    torch._dynamo.reset()


def is_compile_failure(err: BaseException) -> bool:
    """Whether `err` comes from torch.compile itself (dynamo tracing, the backend compiler, inductor's code
    generation) rather than from the network's own computation."""
    module = type(err).__module__ or ""
    return module.startswith(("torch._dynamo", "torch._inductor")) or "BackendCompilerFailed" in type(err).__name__


def failure_line(err: BaseException) -> str:
    """What failed, in one line: the compiler's own error when dynamo wraps one (`inner_exception`), else `err`'s
    first line."""
    inner = getattr(err, "inner_exception", None) or err
    lines = str(inner).strip().splitlines()
    return f"{type(inner).__name__}: {lines[0] if lines else ''}".rstrip(": ")
