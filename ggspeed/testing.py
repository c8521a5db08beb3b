"""Run a function on N real processes joined by a gloo process group (tests and benchmarks).

Two ways to get the ranks, with one calling convention (``fn`` module-level, so that the ranks
can import it; its return value on each rank comes back in rank order):

- :func:`run_ranks` spawns fresh interpreters for each call: the rank starts from nothing, as it
  would under a launcher. Use it for whatever leaves global state behind that cannot be undone
  (DeepSpeed engines and Megatron's parallel state) and for benchmarks.
- :func:`pool_ranks` runs the call on a :class:`RankPool` kept per world size: the interpreters
  (and their torch, numba and DeepSpeed imports, most of a short test's cost) are started once
  and reused. Each call still gets what a fresh rank gets: the caller's environment of the
  moment plus the launcher's, a new default gloo group on a new port (destroyed with every
  subgroup afterwards), a new random seed, float32 as default dtype, grad mode on, one thread.
  Afterwards ggspeed's test switches (``gct.common`` flags, ``Exchange.send_hook``,
  ``direct.usable``) are restored and DeepSpeed's communication backend and group caches are
  dropped. A rank that raises, dies or hangs past ``timeout`` ends the pool (the next call
  starts a new one), so a failing test cannot leave a half-finished collective or changed
  state to the tests after it.

Each rank has the environment a launcher would give it (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT) and one OpenMP and one numba thread (ranks share the machine's cores).
LOCAL_SIZE is not set, so DeepSpeed on CPU does not create its never-freed /dev/shm all-reduce
segment. An exception on a rank fails the caller with an ``AssertionError`` that names the rank
and carries its traceback; a hang raises ``TimeoutError`` naming the ranks still running the function.
"""

from __future__ import annotations

import atexit
import contextlib
import multiprocessing as std_mp
import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from multiprocessing.connection import Connection, wait
from pathlib import Path
from typing import Any

__all__ = ["RankPool", "close_pools", "free_port", "pool_ranks", "rank_env", "run_ranks"]

# ggspeed switches that tests flip and put back; a pooled rank restores them after every call.
_SWITCHES = (
    ("ggspeed.gct.common", "WIRE_CHECKSUM"),
    ("ggspeed.gct.common", "FUSED_CPU"),
    ("ggspeed.gct.exchange", "Exchange.send_hook"),
    ("ggspeed.gct.direct", "usable"),
)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_env(rank: int, world_size: int, port: int) -> dict[str, str]:
    """What a launcher gives one local rank: its place in the job, the rendezvous on loopback,
    and one OpenMP and one numba thread (ranks share the machine's cores)."""
    return {
        "RANK": str(rank),
        "LOCAL_RANK": str(rank),
        "WORLD_SIZE": str(world_size),
        "MASTER_ADDR": "127.0.0.1",
        "MASTER_PORT": str(port),
        "OMP_NUM_THREADS": "1",
        "NUMBA_NUM_THREADS": "1",
    }


def _call(
    fn: Callable[..., Any],
    args: tuple,
    kwargs: dict,
    init_pg: bool,
    rank: int,
    world: int,
    returned: Callable[[], None] | None = None,
):
    """One rank's part of a call, in an environment already set: group, function, teardown
    (``returned`` is told when the function has returned, before the teardown waits for peers)."""
    import torch.distributed as dist

    if init_pg:
        dist.init_process_group("gloo", rank=rank, world_size=world)
    result = fn(*args, **kwargs)
    if returned is not None:
        returned()
    if dist.is_initialized():
        # Tear the group down together, whoever created it: a rank that exits while its peer's
        # gloo pairs are still open makes the peer abort ("terminate called without an active
        # exception") on its way out.
        dist.barrier()
        dist.destroy_process_group()
    return result


# ---------------------------------------------------------------------------------------------
# fresh processes
def _entry(
    local_rank: int,
    fn: Callable[..., Any],
    world_size: int,
    port: int,
    outdir: str,
    args: tuple,
    kwargs: dict,
    init_pg: bool,
    env: dict[str, str],
) -> None:
    os.environ.update(rank_env(local_rank, world_size, port), **env)
    os.environ.pop("LOCAL_SIZE", None)
    import torch

    torch.set_num_threads(1)
    try:
        result = _call(fn, args, kwargs, init_pg, local_rank, world_size)
    except BaseException:
        Path(outdir, f"error{local_rank}").write_text(
            f"rank {local_rank}: {traceback.format_exc()}"
        )
        raise
    with open(os.path.join(outdir, f"result{local_rank}"), "wb") as f:
        pickle.dump(result, f)


def run_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    init_pg: bool = True,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """Run ``fn(*args, **kwargs)`` on ``world_size`` fresh gloo ranks; return per-rank results.

    With ``init_pg=False`` the function makes its own process group (e.g. through
    ``deepspeed.init_distributed``) from the environment; ``env`` adds variables on every rank.
    """
    import torch.multiprocessing as mp

    port = free_port()
    with tempfile.TemporaryDirectory(prefix="ggspeed-dist-") as outdir:
        ctx = mp.start_processes(
            _entry,
            args=(fn, world_size, port, outdir, args, kwargs, init_pg, dict(env or {})),
            nprocs=world_size,
            join=False,
            start_method="spawn",
        )
        deadline = time.monotonic() + timeout
        try:
            while not ctx.join(timeout=max(0.1, min(5.0, deadline - time.monotonic()))):
                if time.monotonic() > deadline:
                    raise TimeoutError(f"{fn.__name__} on {world_size} ranks hung for {timeout} s")
        except mp.ProcessRaisedException as e:
            errors = [
                Path(outdir, name).read_text()
                for name in sorted(os.listdir(outdir))
                if name.startswith("error")
            ]
            raise AssertionError("\n".join(errors) or str(e)) from None
        finally:
            for p in ctx.processes:
                if p.is_alive():
                    p.kill()
        results = []
        for rank in range(world_size):
            with open(os.path.join(outdir, f"result{rank}"), "rb") as f:
                results.append(pickle.load(f))
        return results


# ---------------------------------------------------------------------------------------------
# a pool of ranks
def _lookup(module: str, path: str) -> tuple[Any, str] | None:
    """The object that holds ``module.path`` and the attribute's name, if both exist."""
    import importlib

    try:
        obj: Any = importlib.import_module(module)
    except ImportError:
        return None
    *parents, name = path.split(".")
    for part in parents:
        obj = getattr(obj, part, None)
    return (obj, name) if obj is not None and hasattr(obj, name) else None


def _fresh_torch_state() -> None:
    """What a new interpreter has: a nondeterministic seed, float32, grad mode, one thread."""
    import torch

    torch.seed()
    torch.set_default_dtype(torch.float32)
    torch.set_grad_enabled(True)
    torch.use_deterministic_algorithms(False)
    torch.set_num_threads(1)


def _drop_library_state() -> None:
    """Forget the process groups that DeepSpeed and Megatron keep in module globals (all were
    destroyed with the default group), so that the next call sets them up again."""
    import sys

    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
    comm = sys.modules.get("deepspeed.comm.comm")
    if comm is not None:
        comm.cdb = None
    groups = sys.modules.get("deepspeed.utils.groups")
    if groups is not None:
        for name, value in vars(groups).items():
            if not (name.startswith("_") and name.isupper()):
                continue
            if isinstance(value, dict):
                setattr(groups, name, {})
            elif value is not None and not isinstance(value, str | bool | int | float):
                setattr(groups, name, None)  # a process group or an mpu
    parallel_state = sys.modules.get("megatron.core.parallel_state")
    if parallel_state is not None:
        parallel_state.destroy_model_parallel()


def _worker(rank: int, world_size: int, conn: Connection) -> None:
    """A pooled rank: run calls until told to stop, or until one raises (then exit)."""
    os.environ.update(rank_env(rank, world_size, 0))
    os.environ.pop("LOCAL_SIZE", None)
    switches = [(held, getattr(*held)) for m, p in _SWITCHES if (held := _lookup(m, p))]
    while True:
        task = conn.recv_bytes()
        if not task:
            return
        try:
            fn, args, kwargs, port, init_pg, env, caller_env = pickle.loads(task)
            # what a rank spawned now would have: the caller's environment, the launcher's, env
            os.environ.clear()
            os.environ.update(caller_env)
            os.environ.update(rank_env(rank, world_size, port), **env)
            os.environ.pop("LOCAL_SIZE", None)
            _fresh_torch_state()
            result = _call(
                fn,
                args,
                kwargs,
                init_pg,
                rank,
                world_size,
                returned=lambda: conn.send_bytes(pickle.dumps(("returned", None))),
            )
            reply = ("ok", pickle.dumps(result))
        except BaseException:
            reply = ("error", f"rank {rank}: {traceback.format_exc()}")
        conn.send_bytes(pickle.dumps(reply))
        if reply[0] == "error":
            return
        for (obj, name), value in switches:
            setattr(obj, name, value)
        _drop_library_state()


class RankPool:
    """``world_size`` spawned ranks that run one call after another (see the module docstring).

    ``pool.run(fn, *args, timeout=..., init_pg=..., env=..., **kwargs)`` takes what
    :func:`run_ranks` takes. After a failed call the pool is closed; ``alive`` says so.
    """

    def __init__(self, world_size: int) -> None:
        self.world_size = world_size
        ctx = std_mp.get_context("spawn")
        self._conns: list[Connection] = []
        self._procs: list[Any] = []
        # The children inherit the environment at start: numba reads its thread count on import.
        saved = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "NUMBA_NUM_THREADS")}
        os.environ.update(OMP_NUM_THREADS="1", NUMBA_NUM_THREADS="1")
        try:
            for rank in range(world_size):
                parent, child = ctx.Pipe()
                proc = ctx.Process(
                    target=_worker, args=(rank, world_size, child), daemon=True, name=f"rank{rank}"
                )
                proc.start()
                child.close()
                self._conns.append(parent)
                self._procs.append(proc)
        finally:
            for k, v in saved.items():
                if v is None:
                    os.environ.pop(k, None)
                else:
                    os.environ[k] = v

    @property
    def alive(self) -> bool:
        return bool(self._procs) and all(p.is_alive() for p in self._procs)

    def close(self) -> None:
        """Stop the ranks (a rank that does not stop within a few seconds is killed)."""
        for conn, proc in zip(self._conns, self._procs, strict=True):
            if proc.is_alive():
                with contextlib.suppress(OSError):  # already gone
                    conn.send_bytes(b"")
        for proc in self._procs:
            proc.join(timeout=5)
            if proc.is_alive():
                proc.kill()
                proc.join()
        for conn in self._conns:
            conn.close()
        self._procs, self._conns = [], []

    def run(
        self,
        fn: Callable[..., Any],
        *args: Any,
        timeout: float = 300.0,
        init_pg: bool = True,
        env: dict[str, str] | None = None,
        **kwargs: Any,
    ) -> list[Any]:
        if not self.alive:
            raise RuntimeError("the rank pool is closed")
        task = pickle.dumps(
            (fn, args, kwargs, free_port(), init_pg, dict(env or {}), dict(os.environ))
        )
        for conn in self._conns:
            conn.send_bytes(task)
        replies: dict[int, tuple[str, Any]] = {}
        deadline = time.monotonic() + timeout
        waiting = {conn: rank for rank, conn in enumerate(self._conns)}
        returned: set[int] = set()  # ranks whose function returned (now in the teardown)
        sentinels = {proc.sentinel: rank for rank, proc in enumerate(self._procs)}
        try:
            while waiting:
                left = deadline - time.monotonic()
                ready = wait([*waiting, *sentinels], timeout=max(0.0, left)) if left > 0 else []
                if not ready:
                    running = sorted(set(waiting.values()) - returned)
                    raise TimeoutError(
                        f"{fn.__name__} on {self.world_size} pooled ranks: rank(s) {running} "
                        f"still running after {timeout} s (rank(s) "
                        f"{sorted(returned & set(waiting.values()))} returned and wait for them)"
                    )
                for obj in ready:
                    if obj in waiting:
                        rank = waiting[obj]
                        try:
                            reply = pickle.loads(obj.recv_bytes())
                        except (EOFError, OSError):
                            reply = ("error", f"rank {rank}: died without an answer")
                        if reply[0] == "returned":
                            returned.add(rank)
                            continue
                        replies[rank] = reply
                        del waiting[obj]
                        if replies[rank][0] == "error":
                            raise AssertionError(replies[rank][1])
                    elif obj in sentinels and sentinels[obj] in waiting.values():
                        rank = sentinels[obj]
                        code = self._procs[rank].exitcode
                        raise AssertionError(
                            f"rank {rank}: died (exit code {code}) while running {fn.__name__}"
                        )
        except BaseException:
            self.close()
            raise
        return [pickle.loads(replies[rank][1]) for rank in range(self.world_size)]


_POOLS: dict[int, RankPool] = {}


def pool_ranks(
    fn: Callable[..., Any],
    world_size: int,
    *args: Any,
    timeout: float = 300.0,
    init_pg: bool = True,
    env: dict[str, str] | None = None,
    **kwargs: Any,
) -> list[Any]:
    """:func:`run_ranks` on this process's pool of ``world_size`` ranks (started on first use,
    restarted after a failed call, stopped at exit or by :func:`close_pools`)."""
    pool = _POOLS.get(world_size)
    if pool is None or not pool.alive:
        pool = _POOLS[world_size] = RankPool(world_size)
    return pool.run(fn, *args, timeout=timeout, init_pg=init_pg, env=env, **kwargs)


def close_pools() -> None:
    """Stop every pool's ranks."""
    while _POOLS:
        _POOLS.popitem()[1].close()


atexit.register(close_pools)
