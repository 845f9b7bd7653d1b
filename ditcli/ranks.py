"""Agreed decisions across torchrun ranks: every branch to a collective, checkpoint, stop or exit reads what this
module hands out, never one rank's file system, signal or clock.

- `from_rank0(value)` broadcasts rank 0's choice (the resume step, the images still to sample).
- `on_every_rank(fn)` runs `fn` on every rank and, if it failed anywhere, raises the same `AgreedError` everywhere,
  naming the rank, so all ranks exit together with one clear message.
- `collectives(...)` turns a collective that fails or times out (a dead or stalled peer) into one `UserError` line.

With one process every helper is a plain local call.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import re
from dataclasses import dataclass
from typing import Callable, Iterator, TypeVar

import torch
import torch.distributed as dist

from ditcli.errors import UserError

T = TypeVar("T")
DEFAULT_TIMEOUT_S = 600  # longest wait in one collective: a rank-0 checkpoint write, a VAE download, cache encoding
MAX_TIMEOUT_S = 7 * 24 * 3600  # a week: a longer wait is a hang, and 1e300 s overflows the process group's timedelta
SHARED_DISK_HINT = "--out must be on a disk that all nodes share, at the same path"


class AgreedError(UserError):
    """Raised identically on every rank; only rank 0 reports it (see ditcli.cli)."""


@contextlib.contextmanager
def from_arguments() -> Iterator[None]:
    """Checks that read only the command line fail alike on every rank, before any group is joined: raise their
    errors as AgreedError, so that rank 0 alone reports them."""
    try:
        yield
    except AgreedError:
        raise
    except UserError as exc:
        raise AgreedError(exc.what, exc.hint) from None


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def env_rank() -> int:
    """This process's rank as torchrun set it (0 when run alone); usable before the group exists."""
    return int(os.environ.get("RANK", "0"))


def check_timeout(timeout_s: float) -> float:
    if not 0 < timeout_s <= MAX_TIMEOUT_S:  # the same option on every rank: rank 0 reports it
        raise AgreedError(f"--dist-timeout must be in (0, {MAX_TIMEOUT_S:,}] seconds, got {timeout_s:g}",
                          "the default is 600")
    return timeout_s


def init_group(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S) -> None:
    """Join the torchrun group (nccl on CUDA, gloo otherwise) with a bound on every collective's wait."""
    check_timeout(timeout_s)
    if dist.is_initialized():
        return
    backend = "nccl" if device.type == "cuda" else "gloo"
    timeout = datetime.timedelta(seconds=timeout_s)
    with collectives(env_rank(), world_size(), timeout_s, "joining the process group"):
        store = _attempt_store(timeout)
        if store is None:
            dist.init_process_group(backend, timeout=timeout)
        else:
            dist.init_process_group(backend, store=store, rank=env_rank(), world_size=world_size(), timeout=timeout)


def _attempt_store(timeout: datetime.timedelta) -> dist.Store | None:
    """On one node, torchrun's TCPStore with this attempt's keys apart from the dead attempt's; None elsewhere.

    torchrun keeps one TCPStore for all restarts of the group without separating them (pytorch/pytorch#135712), so
    a restarted rank can read a dead rank's address and hang while connecting. On one node every worker has the same
    TORCHELASTIC_RESTART_COUNT, so it names the attempt; several nodes need TORCH_DISABLE_SHARE_RDZV_TCP_STORE=1 in
    torchrun's environment (docs/training.md), which gives each attempt a fresh store.
    """
    env = os.environ
    if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True" or env.get("GROUP_WORLD_SIZE") != "1":
        return None
    store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), world_size(), is_master=False,
                          timeout=timeout)
    return dist.PrefixStore(f"ditcli/attempt-{env.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def from_rank0(value: T) -> T:
    """Rank 0's `value` on every rank (any picklable object)."""
    if not dist.is_initialized():
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def on_every_rank(fn: Callable[[], T], what: str | None = None, hint: str | None = None) -> T:
    """Run `fn` on every rank; if it raised a user-facing error anywhere, raise one AgreedError on all ranks.

    An error that every rank hit alike, or rank 0 alone when `what` is None (a decision only rank 0 takes), is passed
    on as it is. Otherwise the first failing rank is named: "rank 1 <what>: <its error> (<hint>)", e.g.
    what="cannot read the checkpoint".
    """
    try:
        result, problem = fn(), None
    except (UserError, OSError) as exc:  # a ValueError is a bug: it keeps its traceback
        result, problem = None, _describe(exc)
    problems = [problem]
    if dist.is_initialized():
        problems = [None] * dist.get_world_size()
        dist.all_gather_object(problems, problem)
    failed = [(rank, p) for rank, p in enumerate(problems) if p is not None]
    if not failed:
        return result
    rank, (text, own_hint) = failed[0]
    alike = len(failed) == len(problems) and all(p == failed[0][1] for _, p in failed)
    if alike or (rank == 0 and what is None):  # a rank-0 decision or a shared error speaks for itself
        raise AgreedError(text, own_hint)
    others = f" (and {len(failed) - 1} more)" if len(failed) > 1 else ""
    raise AgreedError(f"rank {rank}{others} {what or 'failed'}: {text}", hint or own_hint)


def _describe(exc: BaseException) -> tuple[str, str | None]:
    if isinstance(exc, UserError):
        return exc.what, exc.hint
    if isinstance(exc, OSError) and exc.filename is not None and exc.strerror:
        return f"{exc.strerror}: {exc.filename}", None
    return " ".join(str(exc).split()) or type(exc).__name__, None


@contextlib.contextmanager
def collectives(rank: int, world: int, timeout_s: float, doing: str | Callable[[], str]) -> Iterator[None]:
    """Report a failed or timed-out collective as one line naming this rank (and its peer when there is only one),
    instead of a backend traceback or an endless wait."""
    try:
        yield
    except (dist.DistError, RuntimeError) as exc:
        if world <= 1 or not _is_collective_failure(exc):
            raise
        peer = f"rank {1 - rank}" if world == 2 else "another rank"
        doing = doing() if callable(doing) else doing
        raise UserError(f"rank {rank} of {world}: {peer} stopped answering while {doing} (waited at most "
                        f"{timeout_s:g} s; {_cause(exc)})",
                        "see that rank's log for why it died or stalled, then run the same command with --resume "
                        "auto; --dist-timeout sets the wait") from None


def _cause(exc: BaseException) -> str:
    """The backend's message without its source path and advice: "Connection closed by peer [10.0.0.2]:29500"."""
    text = re.sub(r"^\[[^\]]*\]\s*", "", " ".join(str(exc).split()))
    return (text.split(". ")[0] or type(exc).__name__)[:160]


def _is_collective_failure(exc: BaseException) -> bool:
    if isinstance(exc, dist.DistError):
        return True
    text = str(exc).lower()
    return any(word in text for word in ("gloo", "nccl", "connection", "timed out", "timeout", "peer", "socket"))


# This process's place in the group.

@dataclass(frozen=True)
class Ranks:
    """This process's place in a torchrun group (rank 0 of 1, not grouped, when run alone)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: float = DEFAULT_TIMEOUT_S
    grouped: bool = False  # in a process group (gloo or nccl)

    def barrier(self) -> None:
        if self.grouped:
            dist.barrier()

    @contextlib.contextmanager
    def zero_first(self) -> Iterator[None]:
        """Rank 0 runs the block first (a download, say), then the others, which find its result. If it fails on
        rank 0, every rank raises its error."""
        if self.rank != 0:
            on_every_rank(lambda: None)
            yield
            return
        failure = None
        try:
            yield
        except (UserError, OSError) as exc:  # a ValueError is a bug: it keeps its traceback
            failure = exc

        def outcome():
            if failure is not None:
                raise failure

        on_every_rank(outcome)


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun, each process takes the GPU of its LOCAL_RANK."""
    if device.type == "cuda" and device.index is None and "LOCAL_RANK" in os.environ:
        device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
        torch.cuda.set_device(device)
    return device


def join(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S, always: bool = False) -> Ranks:
    """Join the torchrun group (nccl on CUDA, gloo otherwise) when WORLD_SIZE > 1, or under torchrun at all with
    `always` (training: DDP and NCCL even for one process). Collectives wait at most `timeout_s`."""
    check_timeout(timeout_s)
    if world_size() <= 1 and not (always and "TORCHELASTIC_RUN_ID" in os.environ):
        return Ranks(timeout_s=timeout_s)
    init_group(device, timeout_s)
    return Ranks(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")), timeout_s, True)


def leave(ranks: Ranks) -> None:
    """Leave the group: a gloo group still alive at interpreter exit made a rank abort with SIGABRT ("terminate
    called without an active exception") after a finished or failed run."""
    if ranks.grouped and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def distributed(device: torch.device, timeout_s: float = DEFAULT_TIMEOUT_S, always: bool = False) -> Iterator[Ranks]:
    """`join` for the block, and `leave` however it ends."""
    ranks = join(device, timeout_s, always)
    try:
        yield ranks
    finally:
        leave(ranks)
