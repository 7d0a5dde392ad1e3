"""Agreement across processes: every rank branches on the same values, and a failure on one rank is the same error
on every rank.

With several processes (`accelerate launch`), a rank that takes a branch the others skip reaches a different
collective than they do, and every rank waits forever (issue #12: each rank kept its own best checkpoint). Two rules
prevent that.

1. **Decisions come from agreed values.** A statistic is reduced (`optim.all_mean`), a stop request is the maximum
   over ranks, and a value only the main process can compute (evaluation metrics, a file it wrote) is broadcast from
   it (`broadcast_from_main`).
2. **Every collective is preceded by a status exchange.** One all-reduce (max) of a fixed-size int64 vector

       [failed, stop, point, -point, a, -a, b, -b, c, -c]

   `failed` is `world_size - rank` on a rank that failed and 0 otherwise, so its maximum names the lowest failing
   rank. `stop` is a pending signal number. `point` says which collective or trainer step the rank reached and
   a, b, c are values every rank must hold there (a payload size, the step). Since max(-x) = -min(x), the one
   all-reduce tells every rank whether any rank failed and whether all ranks reached the same point with the same
   values (`DisagreementError` on every rank otherwise, instead of a hang or a mismatched reduction).

A rank that raises calls `raise_together`: its status exchange says `failed`, and it meets the status exchange in
front of whatever collective each other rank reaches next (every collective has one), so no collective is left
waiting. Those ranks raise `PeerFailure` from there, and the lowest failing rank's exception is broadcast: every
rank raises the same class with the same message. `together(point)` wraps a block in this protocol. In a single
process every function here is free: no collective, errors propagate unchanged.

Cost: one extra all-reduce of 10 integers before each collective (and a device synchronisation on a GPU, to read
it), plus one per training iteration.
"""

from __future__ import annotations

import enum
import pickle
from collections import deque
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from typing import Any, NoReturn

import torch
import torch.distributed as dist

from rewardtune.errors import DisagreementError, RewardtuneError

NUM_VALUES = 3  # the values a, b, c a status exchange compares across ranks
AGREED = "_rewardtune_agreed"  # attribute set on an exception every rank raises together
# The last status exchanges' work handles, kept alive from Python. A gloo worker thread drops its reference to a
# finished all-reduce (and a later barrier may hold one) after `wait()` has returned; when that is the last reference
# it frees the Python-made tensor from that thread, which needs the GIL, and if the interpreter is exiting by then
# (rank 1 exits right after the run's final barrier) the process aborts with "terminate called without an active
# exception" (measured: 4 runs in 10 of a 2-process CLI run). Holding the handle makes the main thread free it.
RECENT_WORK: deque = deque(maxlen=4)


class Point(enum.IntEnum):
    """Where a status exchange happens; the names appear in `DisagreementError` messages."""

    FAILURE = 0  # a failing rank's exchange: it meets any point of the others
    GRADIENTS = 1  # optim.average_gradients, values: payload_signature
    MEAN = 2  # optim.all_mean, values: payload_signature
    INIT = 3  # Trainer.__init__, before rank 0's weights are broadcast
    RESUME = 4  # Trainer.resume, after every rank loaded the checkpoint
    ITERATION = 5  # the top of every training iteration, values: (step, lr-schedule start, lr-schedule end)
    EVALUATION = 6  # after every rank evaluated
    BROADCAST = 7  # before a broadcast from the main process
    CHECKPOINT_RNG = 8  # after every rank wrote its RNG file
    CHECKPOINT_COMMIT = 9  # after the main process committed a checkpoint
    BEST = 10  # after the main process copied the best checkpoint
    FIT_END = 11  # the end of Trainer.fit
    GATHER = 12  # gather_objects, before every rank's objects are gathered
    CHECKPOINT_GATHER = 13  # after every rank gathered a sharded run's checkpoint tensors


POINT_NAMES = {
    Point.GRADIENTS: "a gradient all-reduce",
    Point.MEAN: "an all_mean",
    Point.INIT: "the trainer's start",
    Point.RESUME: "the resume",
    Point.ITERATION: "the iteration start",
    Point.EVALUATION: "the end of an evaluation",
    Point.BROADCAST: "a broadcast from the main process",
    Point.CHECKPOINT_RNG: "a checkpoint's RNG files",
    Point.CHECKPOINT_COMMIT: "a checkpoint's commit",
    Point.BEST: "the best checkpoint's copy",
    Point.FIT_END: "the end of training",
    Point.GATHER: "a gather of every rank's objects",
    Point.CHECKPOINT_GATHER: "a checkpoint's gather of sharded tensors",
}
VALUE_NAMES = {
    Point.GRADIENTS: ("the number of gradient elements", "the gradient dtype"),
    Point.MEAN: ("the number of elements", "the dtype"),
    Point.ITERATION: ("the step", "the lr-schedule start", "the lr-schedule end"),
    Point.BROADCAST: ("the number of tensors", "the number of elements", "the number of bytes"),
}
DTYPES = (torch.float32, torch.float64, torch.float16, torch.bfloat16, torch.int64, torch.int32, torch.bool)


def payload_signature(x: torch.Tensor) -> tuple[int, int]:
    """(elements, dtype code) of a collective's payload: two ranks reducing different tensors at the same point would
    otherwise mix unrelated numbers, or abort (gloo) when the byte counts differ."""
    return x.numel(), DTYPES.index(x.dtype) if x.dtype in DTYPES else len(DTYPES)


class PeerFailure(BaseException):
    """Raised at a status exchange on a rank whose peer failed; `Trainer` turns it into the peer's error.

    A BaseException, so that a component's `except Exception` cannot swallow it and go on to a collective the failed
    rank never joins.
    """

    def __init__(self, failed_rank: int) -> None:
        super().__init__(f"rank {failed_rank} failed")
        self.failed_rank = failed_rank


def world_size() -> int:
    """The number of processes (1 without an initialised process group)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_world_size()
    return 1


def exchange(point: Point, device: torch.device | str, *, stop: int = 0, values: Sequence[int] = ()) -> int:
    """A healthy rank's status exchange at `point`; returns the largest pending stop signal of all ranks.

    Raises:
        PeerFailure: another rank failed.
        DisagreementError: the ranks reached different points, or hold different `values` (at most 3 integers).
    """
    if world_size() == 1:
        return stop
    status = reduce_status(point, device, failed=False, stop=stop, values=values)
    if status[0]:
        raise PeerFailure(world_size() - status[0])
    problem = disagreement(point, status)
    if problem:  # every rank reads the same reduced status: every rank raises this
        raise agreed(DisagreementError(problem))
    return status[1]


def disagreement(point: Point, status: list[int]) -> str:
    """What the ranks disagree on according to a reduced status vector ('' when nothing)."""
    high, low = status[2], -status[3]
    if high != low:
        return (
            f"the processes reached different points ({point_name(low)} on one, {point_name(high)} on another): some "
            "code ran a rank-dependent branch or collective"
        )
    names = VALUE_NAMES.get(point, ())
    for i in range(NUM_VALUES):
        high, low = status[4 + 2 * i], -status[5 + 2 * i]
        if high != low:
            name = names[i] if i < len(names) else f"value {i}"
            if name.endswith("dtype"):
                low, high = describe_dtype(low), describe_dtype(high)
            return f"the processes disagree at {point_name(point)}: {name} is {low} on one and {high} on another"
    return ""


def point_name(code: int) -> str:
    """'an all_mean', 'the iteration start', ... for a `Point` code."""
    return POINT_NAMES.get(code, f"point {code}")


def describe_dtype(code: int) -> str:
    return str(DTYPES[code]) if code < len(DTYPES) else "another dtype"


def reduce_status(
    point: Point, device: torch.device | str, *, failed: bool, stop: int, values: Sequence[int]
) -> list[int]:
    """All-reduce (max) [failed, stop, point, -point, a, -a, b, -b, c, -c] (see the module docstring)."""
    local = status_vector(point, rank=dist.get_rank(), size=dist.get_world_size(), failed=failed, stop=stop, values=values)
    status = torch.tensor(local, dtype=torch.int64, device=device)
    work = dist.all_reduce(status, op=dist.ReduceOp.MAX, async_op=True)
    if work is not None:  # a work handle (torch.distributed); None from a test's in-process stand-in
        work.wait()
        RECENT_WORK.append(work)
    return status.tolist()


def status_vector(
    point: Point, *, rank: int, size: int, failed: bool, stop: int, values: Sequence[int]
) -> list[int]:
    """One rank's [failed, stop, point, -point, a, -a, b, -b, c, -c] (values a, b, c padded with zeros)."""
    if len(values) > NUM_VALUES:
        raise ValueError(f"a status exchange compares at most {NUM_VALUES} values, got {len(values)}")
    vector = [size - rank if failed else 0, int(stop)]
    for value in (int(point), *(int(v) for v in values), *([0] * (NUM_VALUES - len(values)))):
        vector += [value, -value]
    return vector


def agreed(err: BaseException) -> BaseException:
    """Mark `err` as raised by every rank at the same point (no further exchange needed); returns it."""
    setattr(err, AGREED, True)
    return err


def is_agreed(err: BaseException) -> bool:
    return bool(getattr(err, AGREED, False))


def raise_together(err: BaseException, device: torch.device | str) -> NoReturn:
    """Make every rank raise the lowest failing rank's error (call on a failing rank, or with a `PeerFailure`).

    The failing rank's message gains "(on rank r of n)". Its exception is pickled and broadcast; where it cannot be
    pickled, the other ranks raise a `RewardtuneError` "<class>: <message>" instead.
    """
    size = world_size()
    if size == 1 or is_agreed(err):
        raise err
    if isinstance(err, PeerFailure):
        failed_rank = err.failed_rank
    else:
        failed_rank = size - reduce_status(Point.FAILURE, device, failed=True, stop=0, values=())[0]
    rank = dist.get_rank()
    if rank == failed_rank:
        name_rank(err, rank, size)
    shared = [pickled_error(err) if rank == failed_rank else None]
    dist.broadcast_object_list(shared, src=failed_rank, device=broadcast_device(device))
    if rank == failed_rank:
        raise agreed(err)
    raise agreed(unpickled_error(shared[0]))


def name_rank(err: BaseException, rank: int, size: int) -> None:
    """Append "(on rank r of n)" to a one-string-argument exception's message."""
    if len(err.args) == 1 and isinstance(err.args[0], str):
        err.args = (f"{err.args[0]} (on rank {rank} of {size})",)


def pickled_error(err: BaseException) -> bytes:
    """`err` pickled, when it survives a round trip; else a `RewardtuneError` naming its class and message."""
    try:
        blob = pickle.dumps(err)
        pickle.loads(blob)
        return blob
    except Exception:  # noqa: BLE001 (any exception a custom __reduce__ or __init__ raises)
        return pickle.dumps(RewardtuneError(f"{type(err).__name__}: {err}"))


def unpickled_error(blob: bytes) -> BaseException:
    return pickle.loads(blob)


def broadcast_device(device: torch.device | str) -> torch.device | None:
    """The device `broadcast_object_list` stages through: the accelerator for NCCL, else the CPU (None)."""
    device = torch.device(device)
    return device if device.type == "cuda" else None


@contextmanager
def together(point: Point, device: torch.device | str) -> Iterator[None]:
    """Run a block on every rank: it ends with a status exchange at `point` when it succeeds, and an exception on
    any rank becomes the same exception on every rank (`raise_together`)."""
    try:
        yield
        exchange(point, device)
    except (Exception, PeerFailure) as err:  # noqa: BLE001 (any error on one rank must reach every rank)
        raise_together(err, device)


def gather_objects(obj: Any, device: torch.device | str) -> list[Any]:
    """Every rank's `obj` (picklable), in rank order, on every rank, after a status exchange ([obj] in one process)."""
    if world_size() == 1:
        return [obj]
    try:
        exchange(Point.GATHER, device)
    except PeerFailure as err:
        raise_together(err, device)
    gathered: list[Any] = [None] * world_size()
    dist.all_gather_object(gathered, obj)
    return gathered


def broadcast_from_main(obj: Any, device: torch.device | str) -> Any:
    """The main process's `obj` on every rank (picklable objects), after a status exchange."""
    if world_size() == 1:
        return obj
    try:
        exchange(Point.BROADCAST, device)
    except PeerFailure as err:
        raise_together(err, device)
    shared = [obj if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(shared, src=0, device=broadcast_device(device))
    return shared[0]
