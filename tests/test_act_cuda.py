"""ACT's coded activation storage on a CUDA device: the Triton codec holds the checkpoints.

Skipped without a GPU (CI has none); run where one is lent (``tools/gpu_checks.sh``).
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from ggspeed import act, codec, gg
from ggspeed.act.storage import CodedStored, step_for
from ggspeed.config import ACTConfig
from tests.test_act import active  # noqa: F401  (fixture)

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@pytest.mark.parametrize("k", ["auto", 0])
@pytest.mark.parametrize("to_cpu", [False, True])
def test_coded_storage_on_cuda_matches_cpu(k: int | str, to_cpu: bool) -> None:
    torch.manual_seed(3)
    a = gg.sample(0.6, 1.0, (64, 3000)) * 3.0
    step = step_for(a, 0.3)
    ref = CodedStored(a, step, k=k, cpu=True, part=None)
    st = CodedStored(a.cuda(), step, k=k, cpu=to_cpu, part=None)
    assert st.stream.data.is_cuda != to_cpu  # cpu_checkpointing keeps the stream in host memory
    assert st.bits == ref.bits and st.nbytes == ref.nbytes
    assert st.stream.to_bytes() == ref.stream.to_bytes()
    back = st.load()
    assert back.is_cuda and back.shape == a.shape
    assert torch.equal(back.cpu(), ref.load())


def test_compressed_checkpoint_on_cuda(active) -> None:  # noqa: F811
    cfg = ACTConfig(enabled=True, lambda_target=0.0, compress=True, rel_step=0.2, rate="l1")
    st = active(act.ACTState(cfg))
    torch.manual_seed(0)
    lin = nn.Linear(256, 256).cuda()
    seen: list[torch.Tensor] = []

    def f(x):
        seen.append(x.detach().clone())
        return lin(x)

    a = torch.randn(512, 256, device="cuda", requires_grad=True)
    out = act.checkpoint(f, a)
    assert st.live_bytes > 0
    g = torch.randn_like(out)
    out.backward(g)
    assert st.live_bytes == 0
    step = step_for(a.detach(), 0.2)
    decoded = codec.dequantize(codec.quantize(a.detach(), step), step).view_as(a)
    assert torch.equal(seen[0], a.detach()) and torch.equal(seen[1], decoded)
    torch.testing.assert_close(lin.weight.grad, g.t() @ decoded)
    assert 0 < st.scalars()["bits_per_element"] < 8
