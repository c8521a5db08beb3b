"""The compressed all-reduce on CUDA tensors (torch ops + the Triton codec) against the CPU path.

Skipped without a GPU (CI has none); run where one is lent (``tools/gpu_checks.sh``). Two gloo
ranks share the one GPU (NCCL refuses two ranks on one device); gloo moves the coded bytes
through host memory, which changes nothing in what is computed on the device.
"""

from __future__ import annotations

import pytest
import torch

from tests.dist import run_ranks
from tests.test_gct_dist import _grad_like

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

STEPS = 4


def _cuda_against_cpu() -> dict:
    import torch.distributed as dist

    from ggspeed.config import GCTConfig
    from ggspeed.gct import GCTState, compressed_all_reduce

    rank, world = dist.get_rank(), dist.get_world_size()
    out: dict = {}
    n = 70_001  # several codec chunks and GCT blocks, a short tail
    cfgs = {
        "round": {"quant_step": 0.5},
        "rdoq_auto_runs": {"quant_step": 1.0, "rdoq_mu": 0.1, "eg_order": "auto"},
        "plain_k2": {"quant_step": 0.25, "eg_order": 2, "zero_runs": False},
        "reduce_scatter": {"quant_step": 1.0, "rdoq_mu": 0.05, "exchange": "reduce_scatter"},
    }
    for name, kw in cfgs.items():
        cpu_state, gpu_state = (GCTState(GCTConfig(enabled=True, **kw)) for _ in range(2))
        rows = []
        for t in range(STEPS):
            x = _grad_like(100 * t + rank, n)
            exact = x.clone()
            dist.all_reduce(exact)
            exact /= world
            y_cpu = compressed_all_reduce(x.clone(), cpu_state, key="g")
            y_gpu = compressed_all_reduce(x.cuda(), gpu_state, key="g")
            rows.append(
                {
                    "device": y_gpu.device.type,
                    "gpu": y_gpu.cpu(),
                    "same_bits": torch.equal(y_gpu.cpu(), y_cpu),
                    "max_diff_steps": float((y_gpu.cpu() - y_cpu).abs().max())
                    / cpu_state.stats.last_step,
                    "err_steps": float((y_gpu.cpu() - exact).abs().max())
                    / gpu_state.stats.last_step,
                    "bits_cpu": cpu_state.stats.bits_per_element,
                    "bits_gpu": gpu_state.stats.bits_per_element,
                }
            )
        out[name] = rows
        out[name + "_residual_device"] = gpu_state.residuals["g"].device.type
    # bf16 gradients on the GPU: the result keeps the caller's dtype and device
    state = GCTState(GCTConfig(enabled=True, quant_step=0.5))
    xb = _grad_like(7 + rank, 4099).to(device="cuda", dtype=torch.bfloat16)
    yb = compressed_all_reduce(xb.clone(), state)
    out["bf16"] = (str(yb.dtype), yb.device.type, yb.float().cpu())
    # one rank's inf reaches every rank on the GPU path too, and the residual stays as it was
    state = GCTState(GCTConfig(enabled=True, exchange="allgather"))
    compressed_all_reduce(_grad_like(8 + rank, 1000).cuda(), state, key="b")
    before = state.residuals["b"].clone()
    x = _grad_like(9 + rank, 1000).cuda()
    if rank == 1:
        x[5] = float("inf")
    y = compressed_all_reduce(x, state, key="b")
    out["nonfinite_all_nan"] = bool(torch.isnan(y).all())
    out["nonfinite_residual_kept"] = bool(torch.equal(before, state.residuals["b"]))
    return out


def test_cuda_path_matches_cpu_path_on_two_ranks() -> None:
    r0, r1 = run_ranks(_cuda_against_cpu, 2, timeout=600)
    report = []
    for name in ("round", "rdoq_auto_runs", "plain_k2", "reduce_scatter"):
        assert r0[name + "_residual_device"] == "cuda"
        for t, (a, b) in enumerate(zip(r0[name], r1[name], strict=True)):
            assert a["device"] == "cuda"
            assert torch.equal(a["gpu"], b["gpu"]), (name, t)  # identical on every rank
            assert a["err_steps"] <= 2.0 + 1e-6, (name, t, a["err_steps"])
            report.append((name, t, a["same_bits"], a["max_diff_steps"], a["bits_gpu"]))
        # the first call has no residual yet: the same levels, so the same bits as on the CPU
        assert r0[name][0]["same_bits"] and r1[name][0]["same_bits"], (name, r0[name][0])
    print("name, step, same bits as CPU, max |gpu - cpu| in steps, bits/elem:", *report, sep="\n")
    assert r0["bf16"][:2] == ("torch.bfloat16", "cuda") and torch.equal(
        r0["bf16"][2], r1["bf16"][2]
    )
    assert r0["nonfinite_all_nan"] and r1["nonfinite_all_nan"]
    assert r0["nonfinite_residual_kept"] and r1["nonfinite_residual_kept"]
