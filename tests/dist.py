"""Run a function on N real processes joined by a gloo process group (the multi-rank test harness).

Each rank is a fresh ``spawn``-ed interpreter with the environment a launcher would give it
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR/PORT) and one OpenMP and one numba thread
(ranks share the machine's cores). LOCAL_SIZE is not set, so
DeepSpeed on CPU does not create its never-freed /dev/shm all-reduce segment. The function's return
value on each rank comes back to the caller; an exception on any rank fails the caller with that
rank's traceback; a hang is killed after ``timeout`` seconds.
"""

from __future__ import annotations

import os
import pickle
import socket
import tempfile
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch.multiprocessing as mp


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
    import torch.distributed as dist

    torch.set_num_threads(1)
    result: Any = None
    try:
        if init_pg:
            dist.init_process_group("gloo", rank=local_rank, world_size=world_size)
        result = fn(*args, **kwargs)
        if dist.is_initialized():
            # Tear the group down together, whoever created it: a rank that exits while its
            # peer's gloo pairs are still open makes the peer abort ("terminate called without
            # an active exception") on its way out.
            dist.barrier()
            dist.destroy_process_group()
    except BaseException:
        with open(os.path.join(outdir, f"error{local_rank}"), "w") as f:
            f.write(traceback.format_exc())
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
    """Run ``fn(*args, **kwargs)`` on ``world_size`` gloo ranks; return the per-rank results.

    ``fn`` must be importable (defined at module level). With ``init_pg=False`` the function makes
    its own process group (e.g. through ``deepspeed.init_distributed``) from the environment.
    """
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
