"""The activation rate term R(a) and the identity function that injects its gradient.

R(a) = (1/N) sum_i (|a_i| + eps)^nu (docs/method.md; nu = 1 with eps = 0 is L1). A penalty
computed inside a reentrant checkpointed function runs under no_grad and silently gets no
gradient, and adding ``lambda * R`` to the loss would need the activation kept alive until the
loss is formed. Instead :class:`RateGrad` is the identity in forward and adds
``coef * dR/da`` to the incoming gradient in backward, so it can sit inside a checkpointed
function (reentrant or not): the recomputation records it and its backward runs there.
"""

from __future__ import annotations

import torch


def rate_value(a: torch.Tensor, shape: float, eps: float) -> float:
    """R(a) = mean((|a| + eps)^shape), in float32 or wider (no autograd)."""
    with torch.no_grad():
        x = _wide(a).abs()
        if shape == 1.0:
            return float((x + eps).mean())
        return float((x + eps).pow_(shape).mean())


def rate_grad(a: torch.Tensor, shape: float, eps: float) -> torch.Tensor:
    """dR/da = shape * (|a| + eps)^(shape - 1) * sign(a) / N, in float32 (or a's wider dtype)."""
    x = _wide(a)
    n = max(1, x.numel())
    if shape == 1.0:
        return torch.sign(x).div_(n)
    return _magnitude(x, shape, eps).mul_(torch.sign(x)).mul_(shape / n)


def _magnitude(x: torch.Tensor, shape: float, eps: float) -> torch.Tensor:
    """(|x| + eps)^(shape - 1) in one new tensor (in-place after the abs).

    As exp((shape - 1) * log(.)): torch's CPU pow with a fractional scalar exponent is not
    vectorized, log and exp are (docs/benchmarks.md); 0 and inf map as pow maps them.
    """
    t = x.abs()
    if eps:
        t.add_(eps)
    return t.log_().mul_(shape - 1.0).exp_()


def _grad_plus_rate(
    grad: torch.Tensor, a: torch.Tensor, coef: float, shape: float, eps: float
) -> torch.Tensor:
    """grad + coef * dR/da; with grad in a's working dtype, one fused addcmul instead of a
    chain of elementwise passes and copies (the backward runs once per checkpoint per step)."""
    x = _wide(a)
    if grad.dtype != x.dtype:
        return grad + rate_grad(a, shape, eps).mul_(coef).to(grad.dtype)
    c = coef * shape / max(1, x.numel())
    if shape == 1.0:
        return torch.add(grad, torch.sign(x), alpha=c)
    return torch.addcmul(grad, _magnitude(x, shape, eps), torch.sign(x), value=c)


class RateGrad(torch.autograd.Function):
    """Identity forward; backward returns ``grad + coef * dR/da``.

    ``coef`` is lambda_a times whatever scale the task gradient carries at this point (1 /
    gradient_accumulation_steps under DeepSpeed), so the result is exactly the gradient of
    ``L + lambda_a * R(a)``.
    """

    @staticmethod
    def forward(ctx, a: torch.Tensor, coef: float, shape: float, eps: float) -> torch.Tensor:
        ctx.save_for_backward(a)
        ctx.coef, ctx.shape, ctx.eps = coef, shape, eps
        return a.view_as(a)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (a,) = ctx.saved_tensors
        return _grad_plus_rate(grad, a, ctx.coef, ctx.shape, ctx.eps), None, None, None


def apply_rate(a: torch.Tensor, coef: float, shape: float, eps: float) -> torch.Tensor:
    """``a`` unchanged, with ``coef * dR/da`` added to its gradient in backward.

    A no-op (returns ``a`` itself) when there is nothing to inject: coef == 0, grad disabled,
    or ``a`` is not a floating tensor that requires grad.
    """
    if coef == 0.0 or not torch.is_grad_enabled() or not _eligible(a):
        return a
    return RateGrad.apply(a, coef, shape, eps)


def _wide(a: torch.Tensor) -> torch.Tensor:
    return a.detach().to(torch.promote_types(a.dtype, torch.float32))


def _eligible(a: object) -> bool:
    return isinstance(a, torch.Tensor) and a.is_floating_point() and a.requires_grad
