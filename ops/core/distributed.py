"""Data parallelism under torchrun: who this process is, which examples are its own, and how rank 0 gets every
rank's results back in input order.

`torchrun --nproc-per-node N rechannel eval ...` starts N copies of the command; torchrun's environment
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT, multi-node rendezvous included) says who each is. Every
rank reads and checks the same inputs, loads the model on its own device (cuda:LOCAL_RANK, or the CPU with
gloo), runs its contiguous shard of the examples, and the shards travel back to rank 0 in one gather, which
also carries any rank's failure: then every rank raises it, so no rank writes half an output and all exit 1.
A plain process is world size 1 and takes none of these paths (no process group, no gather).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

from .errors import UserError

T = TypeVar("T")
GATHER_TIMEOUT_MINUTES = 120  # how long a rank waits in a gather for a slower one (a rank that dies ends the job
#                               sooner: torchrun stops every rank when one exits with an error)


class RankFailed(UserError):
    """A rank's failure, raised on every rank after the gather: rank 0 prints it, the others exit 1 quietly."""


@dataclass(frozen=True)
class World:
    """This process's place among the ranks torchrun started (rank 0 of 1 without torchrun)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes outputs, logs and progress."""
        return self.rank == 0

    def shard(self, n: int) -> range:
        """This rank's examples of n: the contiguous block [n·rank/size, n·(rank+1)/size), so concatenating
        the ranks' shards in rank order gives back the input order."""
        return range(n * self.rank // self.size, n * (self.rank + 1) // self.size)


def _env_int(name: str, default: int) -> int:
    text = os.environ.get(name)
    if text is None:
        return default
    try:
        return int(text)
    except ValueError:
        raise UserError(f"${name}={text!r}: torchrun sets it to an integer") from None


def world() -> World:
    """Read torchrun's environment; a plain process is rank 0 of 1."""
    size = _env_int("WORLD_SIZE", 1)
    return World(_env_int("RANK", 0), size, _env_int("LOCAL_RANK", 0)) if size > 1 else World()


def rank_device(device: str, w: World | None = None) -> str:
    """The device this rank runs on. Under torchrun, auto and cuda mean cuda:LOCAL_RANK (cpu when auto finds no
    GPU); a fixed cuda:N would put every rank on one GPU and is refused, as is cuda on a machine without one."""
    import torch

    w = w or world()
    if w.size == 1 or device == "cpu":
        return device
    if device == "auto" and not torch.cuda.is_available():
        return "cpu"
    if device not in ("auto", "cuda"):
        raise UserError(f"--device {device} under torchrun: every rank would use the same device; give --device "
                        "cuda (each rank takes cuda:LOCAL_RANK), auto or cpu")
    if not torch.cuda.is_available():
        raise UserError("--device cuda under torchrun: this machine finds no CUDA GPU; use --device cpu (gloo) or auto")
    if w.local_rank >= torch.cuda.device_count():
        raise UserError(f"rank {w.rank}: LOCAL_RANK {w.local_rank} but this node has {torch.cuda.device_count()} "
                        "GPU(s); start at most that many processes per node (--nproc-per-node)")
    torch.cuda.set_device(w.local_rank)
    return f"cuda:{w.local_rank}"


def join(w: World | None = None) -> World:
    """Join the process group torchrun prepared (once per process): gloo for CPU tensors and the gathers,
    NCCL beside it for CUDA tensors when this machine has GPUs."""
    import torch
    import torch.distributed as dist

    w = w or world()
    if w.size > 1 and not dist.is_initialized():
        dist.init_process_group("cpu:gloo,cuda:nccl" if torch.cuda.is_available() else "gloo",
                                timeout=timedelta(minutes=GATHER_TIMEOUT_MINUTES))
    return w


def leave() -> None:
    """Tear the process group down (at exit), so that no backend warns about a group left open."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def _failure(e: BaseException) -> str:
    message = " ".join(str(e).split())
    return message if isinstance(e, UserError) else f"{type(e).__name__}: {message}"


def _attempt(work: Callable[[], T]) -> tuple[T | None, str | None]:
    try:
        return work(), None
    except Exception as e:  # noqa: BLE001 - the failure travels to every rank, then is raised there
        return None, _failure(e)


def _raise_failures(errors: list[str | None], w: World) -> None:
    """Raise RankFailed when any rank failed: its message alone when every rank failed alike (a bad input),
    else naming the first rank that failed."""
    failed = [(rank, error) for rank, error in enumerate(errors) if error is not None]
    if not failed:
        return
    rank, error = failed[0]
    if len(failed) == w.size and len(set(errors)) == 1:
        raise RankFailed(error)
    raise RankFailed(f"rank {rank} of {w.size}: {error}")


def _all_gather(obj: Any, w: World) -> list[Any]:
    import torch.distributed as dist

    every: list[Any] = [None] * w.size
    dist.all_gather_object(every, obj)
    return every


def together(work: Callable[[], T], w: World | None = None) -> T:
    """Run `work` on every rank and return this rank's result; a failure on any rank is raised on every rank
    (RankFailed), so that all stop at the same point. Only the failures travel, not the results."""
    w = join(w)
    if w.size == 1:
        return work()
    result, error = _attempt(work)
    _raise_failures(_all_gather(error, w), w)
    return result  # type: ignore[return-value]


def gather(work: Callable[[], T], w: World | None = None) -> list[T]:
    """Run `work` on every rank and return every rank's result, in rank order, on every rank.

    A failure on any rank (a UserError or a bug) is gathered instead of a result and raised as RankFailed on
    every rank, so that all ranks stop together and none writes an output. World size 1 runs `work` and lets
    its errors pass untouched. `work` must not itself start a collective."""
    w = join(w)
    if w.size == 1:
        return [work()]
    every = _all_gather(_attempt(work), w)
    _raise_failures([error for _, error in every], w)
    return [result for result, _ in every]


def global_progress(progress: Any, w: World) -> Any:
    """A Progress callback for one rank: every rank adds the work it did to torchrun's key-value store, and
    rank 0 draws the count of all ranks together; the other ranks draw nothing."""
    if w.size == 1:
        return progress
    from torch.distributed import distributed_c10d

    store = distributed_c10d._get_default_store()  # the rendezvous store: a counter every rank can add to
    shown: dict[str, int] = {}

    def report(stage: str, advance: int = 0, total: int | None = None, note: str | None = None) -> None:
        if advance:
            done = store.add(f"rechannel/progress/{stage}", advance)
            advance, shown[stage] = max(0, done - shown.get(stage, 0)), done
        if w.main:
            progress(stage, advance, total, note)

    return report


def sharded(items: Sequence[T], w: World, what: str) -> list[T]:
    """This rank's share of `items` (all of them in a plain process); fewer items than ranks is refused, since
    a rank with nothing to do means the job was sized wrong."""
    if w.size > len(items):
        raise UserError(f"{w.size} ranks for {len(items)} {what}: start at most {len(items)} processes "
                        "(torchrun --nproc-per-node), or give more input")
    return [items[i] for i in w.shard(len(items))]


def refuse_stdin(option: str, path: str | None, w: World) -> None:
    """Under torchrun every rank reads the whole input, and ranks cannot share one stdin: a file is needed."""
    if w.size > 1 and path in (None, "-"):
        raise UserError(f"{option} -: under torchrun every rank reads the input itself; give a file, not stdin")


def all_reduce_sum(tensors: Sequence[Any], w: World | None = None) -> None:
    """Sum each tensor over the ranks, in place: the gradients of a global batch whose rows the ranks split,
    each rank's loss already divided by the global row count (a no-op in a plain process)."""
    w = w or world()
    if w.size == 1:
        return
    import torch.distributed as dist

    for t in tensors:
        dist.all_reduce(t)


def local_rows(n: int, what: str, w: World | None = None) -> slice:
    """This rank's contiguous rows of a step's n rows (all in a plain process); every rank needs one."""
    w = w or world()
    if w.size > n:
        raise UserError(f"{w.size} ranks for {n} {what} per step: give a global batch of at least {w.size}, or "
                        "start fewer processes")
    r = w.shard(n)
    return slice(r.start, r.stop)


def concat(parts: Sequence[Sequence[T]]) -> list[T]:
    """The ranks' shards back in input order."""
    return [x for part in parts for x in part]
