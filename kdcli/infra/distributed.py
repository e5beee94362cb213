"""Multi-process runs under ``torchrun``: one process per rank, ``torch.distributed`` for the few collectives.

kdcli never launches processes itself. ``torchrun --standalone --nproc-per-node N -m kdcli COMMAND ...`` (or
``torchrun --standalone --nproc-per-node N --no-python kdcli COMMAND ...``) starts N copies of the command and
sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``; ``--standalone`` picks a free
port so two runs on one machine never collide. Without those variables (a plain ``kdcli ...``) every helper here
is a no-op for rank 0 of 1, so single-process code paths need no special case.

Backend: ``nccl`` when the stage runs on CUDA (rank ``r`` uses ``cuda:LOCAL_RANK``), ``gloo`` on the CPU.

Failure handling: a rank that raises while the others wait in a collective would leave them hanging until the
launcher kills them, and the user would read a timeout instead of the cause. :meth:`Dist.agree` and
:meth:`Dist.on_main` therefore exchange each rank's outcome, so every rank raises the *same* error
(``UsageError``, ``CacheError``, ...) with its exit code, naming the rank it came from.
"""

from __future__ import annotations

import atexit
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from kdcli.infra import log
from kdcli.infra.errors import CacheError, CheckFailed, KdError, UsageError

T = TypeVar("T")
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_ERRORS = {c.__name__: c for c in (KdError, CheckFailed, UsageError, CacheError)}


def env_world() -> tuple[int, int, int]:
    """(rank, world size, local rank) from the torchrun environment; (0, 1, 0) outside torchrun."""
    raw = {k: os.environ.get(k) for k in ENV}
    if raw["WORLD_SIZE"] in (None, ""):
        return 0, 1, 0
    try:
        world = int(raw["WORLD_SIZE"])
        rank = int(raw["RANK"] or 0)
        local = int(raw["LOCAL_RANK"] if raw["LOCAL_RANK"] not in (None, "") else rank)
    except ValueError:
        raise UsageError(
            f"bad torchrun environment {raw}: RANK, WORLD_SIZE and LOCAL_RANK must be integers; "
            "launch with `torchrun --standalone --nproc-per-node N ...`"
        ) from None
    if world < 1 or not 0 <= rank < world or local < 0:
        raise UsageError(f"bad torchrun environment {raw}: need 0 <= RANK < WORLD_SIZE")
    return rank, world, local


@dataclass
class Dist:
    """This process's place in the run. ``world == 1``: no process group, every collective is the identity."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))

    @property
    def enabled(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def describe(self) -> str:
        return f"rank {self.rank} of {self.world}" if self.enabled else "one process"

    # -- collectives (identity when world == 1) ----------------------------------------------------------------
    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def broadcast(self, obj: T) -> T:
        """Rank 0's ``obj`` on every rank (pickled: only for small, trusted, in-run objects)."""
        if not self.enabled:
            return obj
        box = [obj if self.is_main else None]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def all_gather(self, obj: Any) -> list:
        if not self.enabled:
            return [obj]
        out: list = [None] * self.world
        dist.all_gather_object(out, obj)
        return out

    def all_reduce(self, values: list[float], op: str = "sum") -> list[float]:
        """Element-wise sum / max / min of a list of numbers over ranks (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        # nccl reduces CUDA tensors only; gloo reduces CPU tensors
        dev = self.device if self.device.type == "cuda" else torch.device("cpu")
        t = torch.tensor([float(v) for v in values], dtype=torch.float64, device=dev)
        dist.all_reduce(t, op={"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}[op])
        return t.cpu().tolist()

    # -- error-safe steps --------------------------------------------------------------------------------------
    def agree(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on every rank; if it raised on any rank, raise on every rank (nobody is left waiting)."""
        if not self.enabled:
            return fn()
        try:
            value, outcome = fn(), None
        except Exception as e:  # KeyboardInterrupt/SystemExit propagate at once: the launcher is stopping us all
            value, outcome = None, e
        self._raise_any(self.all_gather(_describe_error(outcome)), outcome)
        return value

    def on_main(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` on rank 0 only and hand its result (or its error) to every rank."""
        if not self.enabled:
            return fn()
        value, outcome = None, None
        if self.is_main:
            try:
                value = fn()
            except Exception as e:
                outcome = e
        value, err = self.broadcast((value, _describe_error(outcome)))
        self._raise_any([err], outcome)
        return value

    def _raise_any(self, errors: list, own: BaseException | None) -> None:
        if own is not None:
            raise own
        for r, err in enumerate(errors):
            if err is not None:
                kind, message = err
                cls = _ERRORS.get(kind)
                if cls is None:
                    raise RuntimeError(f"rank {r} failed: {message}")
                raise cls(f"{message} (reported by rank {r})")

    def check_replicas(self, module: torch.nn.Module) -> None:
        """After DDP training every rank must hold the same weights; a mismatch is a bug, never silent."""
        if not self.enabled:
            return
        sums = [float(p.detach().double().sum()).hex() for p in module.parameters()]  # exact; NaN == NaN
        ranks = self.all_gather(sums)
        for r, other in enumerate(ranks[1:], start=1):
            if other != ranks[0]:
                raise RuntimeError(f"DDP replicas diverged: rank {r}'s weights differ from rank 0's")


def _describe_error(e: BaseException | None) -> tuple[str, str] | None:
    if e is None:
        return None
    if isinstance(e, KdError):
        return type(e).__name__ if type(e).__name__ in _ERRORS else "KdError", e.message
    return "internal", f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"


_current: Dist | None = None


def init(device: torch.device) -> Dist:
    """Join the torchrun process group (once per process) and pick this rank's device.

    ``device`` is the resolved ``--device``: on CUDA rank ``r`` uses ``cuda:LOCAL_RANK`` and the ``nccl`` backend;
    on the CPU the ``gloo`` backend. Outside torchrun this returns rank 0 of 1 and touches nothing.
    """
    global _current
    rank, world, local = env_world()
    if world == 1 and not dist.is_initialized():
        return Dist(device=device)
    if device.type == "cuda":
        n = torch.cuda.device_count()
        if local >= n:
            raise UsageError(
                f"LOCAL_RANK {local} but only {n} CUDA device(s) are visible; use --nproc-per-node {n} or fewer"
            )
        device = torch.device("cuda", local)
        torch.cuda.set_device(device)
    if _current is not None:
        return _current
    if dist.is_initialized():  # a caller set up the group (e.g. a script embedding kdcli): use it, leave it
        _current = Dist(dist.get_rank(), dist.get_world_size(), local, device)
        return _current
    backend = "nccl" if device.type == "cuda" else "gloo"
    try:
        dist.init_process_group(backend=backend, device_id=device if device.type == "cuda" else None)
    except (ValueError, RuntimeError) as e:
        raise UsageError(
            f"cannot join the torchrun process group ({backend}): {str(e).splitlines()[0]}; launch "
            "with `torchrun --standalone --nproc-per-node N ...`"
        ) from None
    _current = Dist(rank, world, local, device)
    atexit.register(cleanup)
    log.set_rank(rank, world)
    if _current.is_main:
        log.info(f"distributed: {world} processes, backend {backend}")
    return _current


EXIT_TIMEOUT = timedelta(seconds=60)  # how long a rank waits at exit for the others (bounded: never a hang)


def cleanup() -> None:
    """Leave the process group this module created (registered at exit; safe to call twice).

    On gloo the ranks leave one after another, the highest first, each once every higher rank's process has
    exited. Why: ``destroy_process_group`` does not free a gloo group that DDP has used (DDP keeps a reference to
    it: its worker and ``gloo_tcp_loop`` threads are still running after the call), so gloo is torn down by the
    runtime as the process exits. When a peer closes its connections during that teardown -- two ranks exiting
    at the same moment, more likely on a busy machine where the teardown takes seconds -- gloo aborts the process
    with ``terminate called without an active exception`` (rank 1 of the DDP resume test, once). A peer's close
    that reaches a rank still alive and waiting is harmless. Measured with a 2-rank gloo DDP script that ends like
    ``train-student`` (a barrier, then exit), on a busy 2-core machine: 4 of 36 runs aborted (after the last
    Python frame, as the process exited) without this order, 0 of 20 with it.
    """
    global _current
    if _current is not None and dist.is_initialized():
        if _current.enabled and dist.get_backend() == "gloo":
            _leave_in_order(_current.rank, _current.world)
        dist.destroy_process_group()
    _current = None


def _leave_in_order(rank: int, world: int, timeout: timedelta = EXIT_TIMEOUT) -> None:
    """Return once every rank above ``rank`` has exited (after all ranks reached here), or after ``timeout``."""
    try:
        dist.monitored_barrier(timeout=timeout)  # every rank is done communicating (fails at once if one died)
    except RuntimeError:  # a rank died or is stuck: nothing to put in order, leave now
        return
    for peer in range(rank + 1, world):
        try:  # nothing is ever sent: this ends with an error when the peer's process closes its connection
            dist.irecv(torch.zeros(1), src=peer).wait(timeout)
        except RuntimeError:
            continue


def is_main_process() -> bool:
    """Whether this process prints results: rank 0 under torchrun, always otherwise."""
    return env_world()[0] == 0


# -- FSDP2: students larger than one device ------------------------------------------------------------------------


def shard_model(model: torch.nn.Module) -> torch.nn.Module:
    """Shard ``model`` in place over the process group with FSDP2 (``fully_shard``): each block of its largest
    ``ModuleList`` (a transformer's layers) is one unit, gathered for its own forward and backward only, then the
    root (embeddings, head, final norm). Parameters become DTensors; the optimizer must be built afterwards."""
    from torch.distributed.fsdp import fully_shard

    lists = [m for m in model.modules() if isinstance(m, torch.nn.ModuleList) and len(m)]
    if lists:
        blocks = max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))
        for block in blocks:
            fully_shard(block)
    fully_shard(model)
    return model


def _state_options(**kw):
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kw)


def full_model_state(model: torch.nn.Module) -> dict:
    """The whole (unsharded) state dict of an FSDP2 model, on rank 0's CPU (other ranks get ``{}``). Collective."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict

    return get_model_state_dict(model, options=_state_options(cpu_offload=True))


def full_optimizer_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict:
    """The whole optimizer state of an FSDP2 model (keyed by parameter name), on rank 0's CPU. Collective."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    return get_optimizer_state_dict(model, opt, options=_state_options(cpu_offload=True))


def load_full_state(model: torch.nn.Module, opt: torch.optim.Optimizer, model_state: dict, opt_state: dict) -> None:
    """Load whole state dicts (as :func:`full_model_state` / :func:`full_optimizer_state` wrote them) into an FSDP2
    model and its optimizer; every rank passes the same dicts and keeps its own shard. Collective."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    set_model_state_dict(model, model_state, options=_state_options())
    set_optimizer_state_dict(model, opt, opt_state, options=_state_options())
