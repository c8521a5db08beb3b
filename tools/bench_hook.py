"""How much of the GCT DDP hook's work hides behind backward: asynchronous vs synchronous hook.

    python tools/bench_hook.py --steps 30   # 2 gloo ranks, about a minute on 2 quiet cores

2 gloo ranks (ggspeed.testing's harness) run forward + backward of the small GPT (the
configuration of tools/bench_gct.py) under DDP with small buckets, alternating step by step
between two models with the same weights: one with ``gct_hook`` (returns at once, the worker
thread reduces while backward goes on) and one with a hook that makes the same
``compressed_all_reduce`` call before it returns (what ``gct_hook`` did before). Reported: the
median backward time of each (the slower rank's), their ratio, and the time the compressed
all-reduce itself took per step (GCT's own phase timers), the most that overlap could hide.
Overlap needs a spare core: with every core busy computing, the worker competes with backward.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def sync_hook(state, bucket):  # no annotations: DDP checks them as objects
    """The same compressed all-reduce, done before the hook returns."""
    import torch

    from ggspeed.gct import compressed_all_reduce

    buf = bucket.buffer()
    compressed_all_reduce(buf, state, state.group, key=f"ddp{bucket.index()}", average=True)
    fut = torch.futures.Future()
    fut.set_result(buf)
    return fut


def _rank(args: argparse.Namespace) -> dict[str, Any]:
    import torch
    import torch.distributed as dist

    from ggspeed.config import GCTConfig
    from ggspeed.data.corpus import load_corpus_tokens, random_batches
    from ggspeed.gct import GCTState, gct_hook
    from ggspeed.models.nanogpt import GPT, GPTConfig

    rank = dist.get_rank()
    tokens = load_corpus_tokens(vocab_size=4096).train
    cfg = GPTConfig(vocab_size=4096, seq_len=128, n_layer=4, n_head=4, d_model=128)
    runs = {}
    for name, hook in (("async", gct_hook), ("sync", sync_hook)):
        torch.manual_seed(0)
        model = torch.nn.parallel.DistributedDataParallel(GPT(cfg), bucket_cap_mb=args.bucket_mb)
        state = GCTState(GCTConfig(enabled=True, quant_step=1.0, rdoq_mu=0.1))
        model.register_comm_hook(state, hook)
        runs[name] = (model, state, [], [])
    batches = random_batches(tokens, args.batch, 128, seed=rank)
    for step in range(args.steps):
        x, y = next(batches)
        for model, state, times, gct_s in runs.values():
            loss = model(x, y)[1]
            dist.barrier()
            s0 = state.stats.encode_s + state.stats.comm_s + state.stats.decode_s
            t0 = time.perf_counter()
            loss.backward()  # returns once every bucket's future is complete
            if step >= 3:  # past the first call's group set-up and DDP's bucket rebuild
                times.append(time.perf_counter() - t0)
                st = state.stats
                gct_s.append(st.encode_s + st.comm_s + st.decode_s - s0)
            model.zero_grad()
    return {
        name: {"backward_s": statistics.median(t), "gct_s": statistics.median(g)}
        for name, (_, _, t, g) in runs.items()
    }


def main() -> None:
    p = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--bucket-mb", type=float, default=2.0, help="DDP bucket_cap_mb")
    args = p.parse_args()
    from ggspeed.testing import run_ranks

    res = run_ranks(_rank, 2, args, timeout=1800)
    out = {m: {k: max(r[m][k] for r in res) for k in res[0][m]} for m in res[0]}
    out["backward_async_over_sync"] = out["async"]["backward_s"] / out["sync"]["backward_s"]
    print(json.dumps(out, indent=1))


if __name__ == "__main__":
    main()
