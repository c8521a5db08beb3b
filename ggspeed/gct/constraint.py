"""The gradient constraint of GCT: the gradient of J = L + lambda_g ||g||_1.

grad J = g + lambda_g H sign(g). The Hessian H is out of reach at scale, so the diagonal secant
estimate h_i = (g_i(t) - g_i(t-1)) / (theta_i(t) - theta_i(t-1)) stands in for it:

    g'_i = g_i + lambda_g sign(g_i) h_i

with h = 0 where the parameter moved less than ``constraint_eps`` (no division by noise) and h
clipped to +-``constraint_clip``. It is applied to the *averaged* gradient right before the
optimizer step (identical on every rank, so replicas stay in step): the constraint steers
training toward regions where gradients are small and sparse, which is what makes the next
steps' gradients cheap to code. :func:`exact_constraint_term` (double backward) gives the exact
H sign(g) on small models, to check the estimate's direction.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import torch

from .state import GCTState

__all__ = ["apply_constraint", "exact_constraint_term", "secant_term"]


def secant_term(
    param: torch.Tensor,
    grad: torch.Tensor,
    prev_param: torch.Tensor,
    prev_grad: torch.Tensor,
    eps: float,
    clip: float,
) -> torch.Tensor:
    """sign(g) * h with h the guarded, clipped diagonal secant estimate (float32)."""
    dp = param.float() - prev_param
    dg = grad.float() - prev_grad
    moved = dp.abs() > eps
    h = torch.where(moved, dg / torch.where(moved, dp, torch.ones_like(dp)), torch.zeros_like(dp))
    return torch.sign(grad.float()) * h.clamp_(-clip, clip)


@torch.no_grad()
def apply_constraint(state: GCTState, named_params: Iterable[tuple[str, torch.Tensor]]) -> None:
    """Add lambda_g sign(g) h to each ``param.grad`` in place; remember (param, g) for next time.

    The remembered gradient is the task-loss gradient (before the constraint): the secant must
    estimate the Hessian of L, not of J.
    """
    cfg = state.cfg
    lam = state.constraint_lambda
    num = den = 0.0
    for key, p in named_params:
        g = p.grad
        if g is None:
            continue
        prev = state.constraint_prev.get(key)
        if prev is not None and prev[0].shape == p.shape and lam > 0:
            term = secant_term(p, g, prev[0], prev[1], cfg.constraint_eps, cfg.constraint_clip)
            cur_g = g.detach().float().clone()
            g.add_((lam * term).to(g.dtype))
            num += float((lam * term).square().sum())
            den += float(cur_g.square().sum())
        else:
            cur_g = g.detach().float().clone()
        state.constraint_prev[key] = (p.detach().float().clone(), cur_g)
    if den > 0:
        state.record_constraint((num / den) ** 0.5)


def exact_constraint_term(
    loss: torch.Tensor, params: Sequence[torch.Tensor]
) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """(g, H sign(g)) by double backward: the exact constraint term, for small models and tests."""
    grads = torch.autograd.grad(loss, list(params), create_graph=True)
    signs = [torch.sign(g).detach() for g in grads]
    hv = torch.autograd.grad(grads, list(params), grad_outputs=signs)
    return [g.detach() for g in grads], [h.detach() for h in hv]
