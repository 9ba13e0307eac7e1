"""Where this process sits in the job, and the process group's life cycle.

`DistEnv.from_env()` reads torchrun / the deepspeed launcher (RANK, WORLD_SIZE, LOCAL_RANK),
or Slurm (SLURM_PROCID, SLURM_NTASKS, SLURM_LOCALID) when srun starts one task per device,
and falls back to a single process. It does not start anything, so the config can be
validated against the world size before any process group exists.
"""

from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist


class DistEnvError(RuntimeError):
    """The launcher environment is half-set or inconsistent."""


@dataclass(frozen=True, slots=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    source: str  # "torchrun/deepspeed", "slurm" or "single"

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @staticmethod
    def from_env(environ: dict[str, str] | None = None) -> DistEnv:
        env = os.environ if environ is None else environ
        launcher_keys = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
        present = [k for k in launcher_keys if k in env]
        if present:
            missing = [k for k in launcher_keys if k not in env]
            if missing and not (present == ["LOCAL_RANK"] and "WORLD_SIZE" not in env):
                raise DistEnvError(f"half-set launcher environment: {present} set but {missing} missing")
            if missing:  # LOCAL_RANK alone (e.g. some notebook setups): single process
                return DistEnv(rank=0, world_size=1, local_rank=0, source="single")
            env_ = DistEnv(
                rank=_int(env, "RANK"),
                world_size=_int(env, "WORLD_SIZE"),
                local_rank=_int(env, "LOCAL_RANK"),
                source="torchrun/deepspeed",
            )
        elif "SLURM_PROCID" in env and int(env.get("SLURM_NTASKS", "1")) > 1:
            # srun with one task per device and no torchrun inside.
            env_ = DistEnv(
                rank=_int(env, "SLURM_PROCID"),
                world_size=_int(env, "SLURM_NTASKS"),
                local_rank=_int(env, "SLURM_LOCALID"),
                source="slurm",
            )
        else:
            return DistEnv(rank=0, world_size=1, local_rank=0, source="single")
        if not 0 <= env_.rank < env_.world_size:
            raise DistEnvError(f"rank {env_.rank} outside world size {env_.world_size}")
        return env_


def _int(env, key: str) -> int:
    try:
        return int(env[key])
    except (KeyError, ValueError) as e:
        raise DistEnvError(f"environment variable {key}={env.get(key)!r} is not an integer") from e


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _export_rendezvous(env: DistEnv) -> None:
    """Make sure torch's env:// rendezvous variables exist for every way of starting us."""
    os.environ.setdefault("RANK", str(env.rank))
    os.environ.setdefault("WORLD_SIZE", str(env.world_size))
    os.environ.setdefault("LOCAL_RANK", str(env.local_rank))
    if env.source == "single":
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(_free_port()))
    elif env.source == "slurm" and "MASTER_ADDR" not in os.environ:
        nodes = subprocess.run(
            ["scontrol", "show", "hostnames", os.environ["SLURM_JOB_NODELIST"]],
            capture_output=True,
            text=True,
            check=True,
        ).stdout.split()
        os.environ["MASTER_ADDR"] = nodes[0]
        os.environ.setdefault("MASTER_PORT", str(10000 + int(os.environ.get("SLURM_JOB_ID", "0")) % 50000))


def device_index(env: DistEnv) -> int:
    """This rank's CUDA device among the visible ones: its local rank, or 0 when the process
    sees a single GPU (srun --gpus-per-task=1 / --gpu-bind give each task its own device, while
    SLURM_LOCALID still counts the node's tasks)."""
    count = torch.cuda.device_count()
    if env.local_rank < count:
        return env.local_rank
    if count == 1:
        return 0
    raise DistEnvError(
        f"local rank {env.local_rank} sees {count} GPUs (CUDA_VISIBLE_DEVICES="
        f"{os.environ.get('CUDA_VISIBLE_DEVICES')!r}): give each rank its own GPU, or one task per GPU"
    )


def device_for(env: DistEnv) -> torch.device:
    """Select and return this rank's device (set before any collective, so nccl binds to it)."""
    if torch.cuda.is_available():
        index = device_index(env)
        torch.cuda.set_device(index)
        return torch.device("cuda", index)
    return torch.device("cpu")


def init_distributed(env: DistEnv, timeout_s: int) -> None:
    """Start the process group (nccl on GPUs, gloo on CPU; engine.py, the only `import
    deepspeed`, does it through DeepSpeed).

    collective: every rank calls this. `timeout_s` bounds how long a rank waits in a collective
    for a peer that died, so a crash elsewhere ends this rank too instead of hanging.
    """
    from simcse_dist.engine import init_process_group

    _export_rendezvous(env)
    if torch.cuda.is_available():
        # DeepSpeed picks its device from LOCAL_RANK: the visible index, set before any barrier.
        os.environ["LOCAL_RANK"] = str(device_for(env).index)
        os.environ.setdefault("TORCH_NCCL_ASYNC_ERROR_HANDLING", "1")
    init_process_group(env.rank, env.world_size, timeout_s)


def teardown(together: bool = False) -> None:
    """Leave the process group. `together` (every rank alive and past the same agreement: a run
    that ended well, or a failure all ranks agreed on): meet in a barrier first, so no rank closes
    its connections while a peer still uses them (gloo can then abort the peer with `terminate
    called without an active exception`). Never after a failure a peer may not have seen: a dead
    peer would keep the barrier waiting for the whole timeout."""
    if dist.is_available() and dist.is_initialized():
        if together and world_size() > 1:
            dist.barrier()
        dist.destroy_process_group()


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def rank() -> int:
    return dist.get_rank() if dist.is_available() and dist.is_initialized() else 0


def world_size() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


def _all_reduce(values: torch.Tensor, op) -> torch.Tensor:
    if world_size() == 1:
        return values
    out = values.clone()
    dist.all_reduce(out, op=op)
    return out


def all_reduce_mean(values: torch.Tensor) -> torch.Tensor:
    """Mean over ranks of a small metrics tensor. collective: every rank calls this."""
    return _all_reduce(values, dist.ReduceOp.SUM) / world_size()


def all_reduce_sum(values: torch.Tensor) -> torch.Tensor:
    """Sum over ranks. collective: every rank calls this."""
    return _all_reduce(values, dist.ReduceOp.SUM)


def all_reduce_max(values: torch.Tensor) -> torch.Tensor:
    """Element-wise max over ranks (flags that any rank raised). collective: every rank calls this."""
    return _all_reduce(values, dist.ReduceOp.MAX)


def _device() -> torch.device:
    """Where small collective tensors live: nccl only takes CUDA tensors."""
    return torch.device("cuda", torch.cuda.current_device()) if torch.cuda.is_available() else torch.device("cpu")


class PeerFailed(RuntimeError):
    """Another rank failed an action all ranks agreed on; that rank reports why."""


def agreed(action, describe=lambda error: error, shared: tuple[type[BaseException], ...] = ()):
    """Run `action()` on every rank, then agree on the outcome: if it raised on any rank, every
    rank stops together — the lowest rank that failed raises `describe(its error)` (a message
    naming the path and cause), the others `PeerFailed`, so the user sees the real error and
    no peer dies first on a broken connection. An error of a type in `shared` (e.g. bad data
    that only one rank read) is raised on every rank with that rank's message, so rank 0, which
    prints, names it. collective: every rank calls this."""
    error, result = None, None
    try:
        result = action()
    except Exception as e:  # noqa: BLE001 - re-raised below, after the ranks agreed
        error = e
    # the lowest failing rank reports (max over world_size - rank)
    failed = world_size() - int(
        all_reduce_max(torch.tensor([world_size() - rank() if error is not None else 0], device=_device()))[0]
    )
    if failed == world_size():
        return result
    if error is not None and failed == rank():
        raise describe(error) from error
    if shared and world_size() > 1:
        kind, message = _failure_report(error, failed, shared, _device())
        if kind >= 0:
            raise shared[kind](message)
    raise PeerFailed(f"rank {rank()}: stopping because rank {failed} failed")


def broadcast_from_main(obj):
    """Rank 0's `obj` (small and picklable) on every rank. collective: every rank calls this."""
    if world_size() == 1:
        return obj
    box = [obj if rank() == 0 else None]
    dist.broadcast_object_list(box, src=0, device=_device())
    return box[0]


def _failure_report(error, failed: int, shared, device) -> tuple[int, str]:
    """(index in `shared` of the failing rank's error type, or -1; its message) on every rank.
    Called by every rank once all know that rank `failed` failed."""
    box: list = [None]
    if rank() == failed:
        kind = next((i for i, t in enumerate(shared) if isinstance(error, t)), -1)
        box = [(kind, str(error) if kind >= 0 else f"{type(error).__name__}: {error}")]
    dist.broadcast_object_list(box, src=failed, device=device)
    return box[0]


class Team:
    """What `together` hands its work: `tick()` (call it often: it raises as soon as another rank
    failed or was lost), `add(n)` (this rank's progress) and `total` (every rank's progress, as
    of the last heartbeat)."""

    def __init__(self, every_s: float, shared: tuple[type[BaseException], ...]) -> None:
        self.every_s, self.shared = every_s, shared
        self._mine, self._total = 0, 0
        self._error: BaseException | None = None  # this rank's own failure
        self._done = False
        self._outcome: tuple | None = None  # the heartbeat's last word: ("done",), ("failed", ...), ("lost", e)
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def total(self) -> int:
        return self._total if self._thread is not None else self._mine

    def add(self, n: int) -> None:
        self._mine += n

    def tick(self) -> None:
        if self._outcome is not None and self._outcome[0] != "done":
            raise self._peer_error()

    def _start(self) -> None:
        self._thread = threading.Thread(target=self._beat, args=(_device(),), name="simcse-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self, device: torch.device) -> None:
        """The heartbeat thread: one small all-reduce every `every_s` (at once when this rank ends),
        until every rank is done or one failed. No collective runs on the main thread meanwhile."""
        if device.type == "cuda":
            torch.cuda.set_device(device)  # the current device is per thread
        w, r = world_size(), rank()
        try:
            while True:
                self._wake.wait(self.every_s)
                failed, done = self._error is not None, self._done
                state = torch.tensor([int(failed), int(not (failed or done)), self._mine], device=device)
                out = [int(v) for v in all_reduce_sum(state).tolist()]
                self._total = out[2]
                if out[0]:
                    low = w - int(all_reduce_max(torch.tensor([w - r if failed else 0], device=device))[0])
                    self._outcome = ("failed", low, *_failure_report(self._error, low, self.shared, device))
                    return
                if not out[1]:
                    self._outcome = ("done",)
                    return
        except Exception as e:  # noqa: BLE001 - a peer died or the group broke: the main thread raises
            self._outcome = ("lost", e)

    def _peer_error(self) -> BaseException:
        outcome = self._outcome
        if outcome[0] == "lost":
            e = outcome[1]
            return PeerFailed(f"rank {rank()}: stopping: lost the other ranks ({type(e).__name__}: {e})")
        _, failed, kind, message = outcome
        if kind >= 0:
            return self.shared[kind](message)
        return PeerFailed(f"rank {rank()}: stopping because rank {failed} failed ({message})")

    def _finish(self, error: BaseException | None) -> None:
        if error is None:
            self._done = True
        elif self._outcome is None:
            self._error = error
        self._wake.set()
        while self._thread.is_alive():  # joins with a timeout: signals still reach the main thread
            self._thread.join(0.5)


def together(work, every_s: float = 2.0, shared: tuple[type[BaseException], ...] = ()):
    """Every rank runs `work(team)` on its own share of one job (`Team`), and every rank learns
    how all ended: `work`'s result when every rank finished; else, as soon as one rank fails,
    every rank stops (its `team.tick()` raises): an error of a type in `shared` is raised on
    every rank with the failing rank's message (rank 0, which prints, names it), any other
    error on the rank that had it and `PeerFailed` elsewhere; a rank that dies (SIGKILL) ends
    the others with `PeerFailed` as soon as the process group notices.

    The ranks meet in a heartbeat thread: one all-reduce of three integers every `every_s`
    seconds, so no collective waits longer than that for a working peer (keep it well under the
    process-group timeout), and no rank's work waits for another's. A rank that is done keeps
    beating until all are. collective: every rank calls this."""
    team = Team(every_s, shared)
    if world_size() == 1:
        return work(team)
    team._start()
    try:
        result = work(team)
    except BaseException as e:
        team._finish(e)
        if team._outcome[0] == "failed" and team._outcome[1] != rank():  # every rank reports the lowest failure
            raise team._peer_error() from (e if team._error is e else None)
        raise
    team._finish(None)
    if team._outcome[0] != "done":
        raise team._peer_error()
    return result


def main_first(work, every_s: float = 30.0):
    """Rank 0 runs `work(tick)` while the others wait, then every rank learns how it ended: an
    error on rank 0 raises there and `PeerFailed` elsewhere (no rank waits out a timeout).

    The wait is a series of small all-reduces, not one barrier: `tick()`, which `work` must call
    often, joins one at most every `every_s` seconds, so no collective outlasts the process-group
    timeout however long `work` takes (preparing a corpus of 10^8 rows takes most of an hour).
    Returns `work`'s result on rank 0, None elsewhere. collective: every rank calls this."""
    if world_size() == 1:
        return work(lambda: None)
    flag = lambda v: int(all_reduce_max(torch.tensor([v], device=_device()))[0])  # noqa: E731  0 working, 1 done, 2 failed
    if rank() != 0:
        while (state := flag(0)) == 0:
            pass
        if state == 2:
            raise PeerFailed(f"rank {rank()}: stopping because rank 0 failed")
        return None
    last = [time.monotonic()]

    def tick() -> None:
        if time.monotonic() - last[0] >= every_s:
            flag(0)
            last[0] = time.monotonic()

    try:
        result = work(tick)
    except BaseException:
        flag(2)
        raise
    flag(1)
    return result


@torch.no_grad()
def gather_no_grad(x: torch.Tensor) -> torch.Tensor:
    """[b, ...] on every rank -> [N*b, ...], rank-major, detached (evaluation, mining, the
    loss's padding flags and text ids; the autograd gather is train/gather.py's).

    collective: every rank calls this with the same shape.
    """
    if world_size() == 1:
        return x
    parts = [torch.empty_like(x) for _ in range(world_size())]
    dist.all_gather(parts, x.contiguous())
    return torch.cat(parts, dim=0)
