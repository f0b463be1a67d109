"""Forward-mode (tangent) hypergradients of the LR: RTHO, RT-HPO and MARTHE.

Notation of docs/design.md ("Tangent-system methods"); docs/tangents.md derives every line. The
inner step is torch.optim.SGD's or Adam's / AdamW's, written w' = w - s eta d with s the
scheduler scale (AdamW's decay is folded into d = ratio + lambda w). The tangents Z = d(state)/d eta
of the weights and of every state buffer follow

    Z_{t+1} = mu_t A_t Z_t + B_t,   B_t = (-s_t d_t, 0, ...),

where A_t is the Jacobian of one inner step with respect to (w, state). A is linear, so every
function below takes the Hessian-vector products H Z_w of the *undamped* tangent and applies mu
itself (z = mu Z). With H~ = H + lambda I for L2 decay:

SGD (buffer b, momentum m, dampening tau):

    Hz   = mu (H Z_w) + lambda z_w
    Z_b' = Hz on the first step (torch sets b = g~), else m z_b + (1 - tau) Hz
    Z_d  = Z_b' (momentum), Hz + m Z_b' (Nesterov), Hz (no momentum)
    Z_w' = z_w - s eta Z_d - s d

Adam (moments m, v; bias corrections c1 = 1 - beta1^t, c2 = 1 - beta2^t; r = sqrt(v') / sqrt(c2)):

    Z_m' = beta1 z_m + (1 - beta1) Hz
    Z_v' = beta2 z_v + 2 (1 - beta2) g~ Hz
    Z_r  = Z_v' / (2 sqrt(v') sqrt(c2))             (0 where v' = 0; then Z_v' = 0 too)
    ratio = m' / (c1 (r + eps)),  Z_ratio = (Z_m' / c1 - ratio Z_r) / (r + eps)
    Z_d  = Z_ratio (+ lambda z_w for AdamW),  Z_w' = z_w - s eta Z_d - s d

The LR moves along Delta_t = <Z_w, grad E(w_t)>: eta_t = max(eta_{t-1} - beta Delta_t, 0).

``tangent_sgd_step_`` and ``tangent_adam_step_`` are the pure-PyTorch references; the fused ops
(csrc/tangent_math.h, one pass over all tensors) share their signatures and compute the same
arithmetic in the same order (hyperlr_ext/functional/_marthe_fused.py).
"""

from __future__ import annotations

import torch
from torch import Tensor

from hyperlr_ext.functional._foreach_hd import SkipFold
from hyperlr_ext.functional._hd_rule import FoundInfGuard

__all__ = [
    "tangent_adam_step_",
    "marthe_mu_",
    "tangent_sgd_step_",
    "tensor_list_dot",
]


def tensor_list_dot(a: list[Tensor], b: list[Tensor], dtype: torch.dtype) -> Tensor:
    """sum_i <a_i, b_i> accumulated in ``dtype`` (a 0-dim tensor on the tensors' device)."""
    total = torch.zeros((), dtype=dtype, device=a[0].device)
    for x, y in zip(a, b):
        total = total + torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype))
    return total


def marthe_mu_(mu: Tensor, c: Tensor, delta: Tensor, g_prime: Tensor) -> None:
    """MARTHE's adaptive mu (appendix B): q = Delta g', q~ = clip(q / g'^2, 0, 1),
    mu <- q~^(1 / (c + 1)) and then c <- mu_old (1 + c). q~ = 0 when g' = 0. In place, on device.

    q / g'^2 = Delta / g' (g' != 0), which takes fewer kernel launches."""
    q_tilde = torch.where(g_prime != 0, (delta / g_prime).clamp(0.0, 1.0), 0.0)
    new_mu = q_tilde.pow((c + 1.0).reciprocal())
    c.add_(1.0).mul_(mu)
    mu.copy_(new_mu)


def _upcast(tensor: Tensor, dtype: torch.dtype) -> Tensor:
    return tensor if tensor.dtype == dtype else tensor.to(dtype)


def _store(target: Tensor, value: Tensor) -> None:
    """Writes an accumulation-type result into a (possibly lower-precision) state tensor."""
    target.copy_(value)


def tangent_sgd_step_(
    params: list[Tensor],
    grads: list[Tensor],
    hvps: list[Tensor],
    momentum_buffers: list[Tensor],
    z_params: list[Tensor],
    z_buffers: list[Tensor],
    directions: list[Tensor],
    *,
    lr: Tensor,
    mu: Tensor,
    lr_scale: float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
    first_step: bool,
    found_inf: Tensor | None = None,
    foreach: bool = False,
) -> None:
    """One torch.optim.SGD step and its tangent update, in place, for every tensor.

    ``grads``: the training gradients g at w (without decay); ``hvps``: H Z_w for the undamped
    tangent, or an empty list where no product was computed (it counts as 0); ``lr``: the
    learned eta (0-dim, on the device) and ``mu`` the damping (0-dim). ``momentum_buffers`` and
    ``z_buffers`` are empty lists without momentum; on ``first_step`` the buffers are set to g~
    and H~ z as torch does. ``directions`` receives d_t (MARTHE's adaptive mu needs it next
    step), or is an empty list when d_t is not kept. ``found_inf`` (AMP; a float32 tensor of one
    element): when nonzero the call changes nothing (decided on the device, no host sync).
    Math in float32 (float64 for float64 tensors), results stored in the tensors' dtype.
    ``foreach``: the same operations as list ops (a number of ATen ops that does not depend on
    the number of tensors) where every tensor has the LR's dtype; else one tensor at a time.
    """
    lists = [params, grads, hvps, momentum_buffers, z_params, z_buffers, directions]
    if foreach and _one_dtype(lists, lr.dtype):
        _sgd_tangent_foreach(
            params, grads, hvps, momentum_buffers, z_params, z_buffers, directions, lr=lr,
            mu=mu, lr_scale=lr_scale, momentum=momentum, dampening=dampening,
            nesterov=nesterov, weight_decay=weight_decay, first_step=first_step,
            fold=_Fold(found_inf, lr.dtype),
        )  # fmt: skip
        return
    guard = FoundInfGuard(found_inf, [params, momentum_buffers, z_params, z_buffers, directions])
    _sgd_tangent_step(
        params, grads, hvps, momentum_buffers, z_params, z_buffers, directions, lr=lr, mu=mu,
        lr_scale=lr_scale, momentum=momentum, dampening=dampening, nesterov=nesterov,
        weight_decay=weight_decay, first_step=first_step,
    )  # fmt: skip
    guard.restore()


def _sgd_tangent_step(
    params, grads, hvps, momentum_buffers, z_params, z_buffers, directions, *, lr, mu, lr_scale,
    momentum, dampening, nesterov, weight_decay, first_step,
) -> None:  # fmt: skip
    acc = lr.dtype
    step_lr = lr * lr_scale
    has_momentum = momentum != 0
    for i, w_stored in enumerate(params):
        w = _upcast(w_stored, acc)
        g = _upcast(grads[i], acc)
        z_w = _upcast(z_params[i], acc) * mu
        h_z = (_upcast(hvps[i], acc) * mu if hvps else torch.zeros_like(w)) + weight_decay * z_w
        decayed = g + weight_decay * w
        if has_momentum:
            buffer, z_buffer = momentum_buffers[i], z_buffers[i]
            if first_step:
                new_buffer, new_z_buffer = decayed, h_z
            else:
                new_buffer = _upcast(buffer, acc) * momentum + (1 - dampening) * decayed
                new_z_buffer = (_upcast(z_buffer, acc) * mu) * momentum + (1 - dampening) * h_z
            _store(buffer, new_buffer)
            _store(z_buffer, new_z_buffer)
            if nesterov:
                direction = decayed + momentum * new_buffer
                z_direction = h_z + momentum * new_z_buffer
            else:
                direction, z_direction = new_buffer, new_z_buffer
        else:
            direction, z_direction = decayed, h_z
        # Z_w' = z_w - s eta Z_d - s d, then w' = w - s eta d (the tangent reads w before it moves).
        _store(z_params[i], (z_w - step_lr * z_direction) - lr_scale * direction)
        if directions:
            _store(directions[i], direction)
        _store(w_stored, w + direction * -step_lr)


def tangent_adam_step_(
    params: list[Tensor],
    grads: list[Tensor],
    hvps: list[Tensor],
    exp_avgs: list[Tensor],
    exp_avg_sqs: list[Tensor],
    z_params: list[Tensor],
    z_exp_avgs: list[Tensor],
    z_exp_avg_sqs: list[Tensor],
    directions: list[Tensor],
    *,
    lr: Tensor,
    mu: Tensor,
    step: Tensor,
    lr_scale: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    decoupled_weight_decay: bool,
    found_inf: Tensor | None = None,
    foreach: bool = False,
) -> None:
    """One torch.optim.Adam (or AdamW, ``decoupled_weight_decay``) step and its tangent update.

    Arguments as :func:`tangent_sgd_step_`; ``step`` is the step count t of this step (0-dim,
    already incremented, on the device), from which the bias corrections are formed. The moments
    start at zero as in torch, so the first step needs no special case. ``directions`` receives
    d_t = ratio (+ lambda w for AdamW), so that the step is w' = w - s eta d_t (or is empty).
    ``found_inf`` and ``foreach`` as in :func:`tangent_sgd_step_` (the caller keeps ``step``
    unchanged on a skipped step).
    """
    lists = [params, exp_avgs, exp_avg_sqs, z_params, z_exp_avgs, z_exp_avg_sqs, directions]
    if foreach and _one_dtype([*lists, grads, hvps], lr.dtype):
        _adam_tangent_foreach(
            params, grads, hvps, exp_avgs, exp_avg_sqs, z_params, z_exp_avgs, z_exp_avg_sqs,
            directions, lr=lr, mu=mu, step=step, lr_scale=lr_scale, beta1=beta1, beta2=beta2,
            eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
            fold=_Fold(found_inf, lr.dtype),
        )  # fmt: skip
        return
    guard = FoundInfGuard(found_inf, lists)
    _adam_tangent_step(
        params, grads, hvps, exp_avgs, exp_avg_sqs, z_params, z_exp_avgs, z_exp_avg_sqs,
        directions, lr=lr, mu=mu, step=step, lr_scale=lr_scale, beta1=beta1, beta2=beta2,
        eps=eps, weight_decay=weight_decay, decoupled_weight_decay=decoupled_weight_decay,
    )  # fmt: skip
    guard.restore()


def _adam_scalars(lr, step, lr_scale, beta1, beta2, weight_decay, decoupled):
    """s eta, the L2 and AdamW decay (one of them 0), 1 - beta1^t and sqrt(1 - beta2^t)."""
    step = _upcast(step, lr.dtype)
    return (
        lr * lr_scale,
        0.0 if decoupled else weight_decay,
        weight_decay if decoupled else 0.0,
        1 - torch.pow(beta1, step),
        (1 - torch.pow(beta2, step)).sqrt(),
    )


def _adam_tangent_step(
    params, grads, hvps, exp_avgs, exp_avg_sqs, z_params, z_exp_avgs, z_exp_avg_sqs, directions,
    *, lr, mu, step, lr_scale, beta1, beta2, eps, weight_decay, decoupled_weight_decay,
) -> None:  # fmt: skip
    acc = lr.dtype
    step_lr, l2, adamw, bias1, bias2_sqrt = _adam_scalars(
        lr, step, lr_scale, beta1, beta2, weight_decay, decoupled_weight_decay
    )
    tiny = torch.finfo(acc).tiny
    for i, w_stored in enumerate(params):
        w = _upcast(w_stored, acc)
        g = _upcast(grads[i], acc) + l2 * w
        z_w = _upcast(z_params[i], acc) * mu
        h_z = (_upcast(hvps[i], acc) * mu if hvps else torch.zeros_like(w)) + l2 * z_w
        exp_avg = torch.lerp(_upcast(exp_avgs[i], acc), g, 1 - beta1)
        exp_avg_sq = _upcast(exp_avg_sqs[i], acc) * beta2 + ((1 - beta2) * g) * g
        z_exp_avg = (_upcast(z_exp_avgs[i], acc) * mu) * beta1 + (1 - beta1) * h_z
        z_exp_avg_sq = (_upcast(z_exp_avg_sqs[i], acc) * mu) * beta2 + ((2 * (1 - beta2)) * g) * h_z
        root = exp_avg_sq.sqrt()
        denom = root / bias2_sqrt + eps
        ratio = (exp_avg / denom) / bias1
        z_root = z_exp_avg_sq / ((2 * root.clamp_min(tiny)) * bias2_sqrt)
        z_ratio = (z_exp_avg / bias1 - ratio * z_root) / denom
        direction = ratio + adamw * w
        z_direction = z_ratio + adamw * z_w
        _store(exp_avgs[i], exp_avg)
        _store(exp_avg_sqs[i], exp_avg_sq)
        _store(z_exp_avgs[i], z_exp_avg)
        _store(z_exp_avg_sqs[i], z_exp_avg_sq)
        _store(z_params[i], (z_w - step_lr * z_direction) - lr_scale * direction)
        if directions:
            _store(directions[i], direction)
        _store(w_stored, w + direction * -step_lr)


def _one_dtype(lists: list[list[Tensor]], dtype: torch.dtype) -> bool:
    return all(t.dtype == dtype for ts in lists for t in ts)


class _Fold:
    """The foreach tangent step's view of AMP's ``found_inf`` (:class:`SkipFold` when given):
    on a skipped step every factor is 1, every weight and LR 0 and the gradient-like inputs
    -0.0, so that the step writes back what was there and nothing is copied beforehand."""

    def __init__(self, found_inf: Tensor | None, dtype: torch.dtype) -> None:
        self.skip = None if found_inf is None else SkipFold(found_inf, dtype)

    def factor(self, value):
        """A decay factor (a float, or mu's tensor): itself, or 1 on a skipped step."""
        if self.skip is None:
            return value
        if isinstance(value, Tensor):
            return torch.where(self.skip.skip, 1.0, value)
        return self.skip.value(value, 1.0)

    def weight(self, value: float):
        """An LR-like scale: itself, or 0 on a skipped step."""
        return value if self.skip is None else self.skip.value(value, 0.0)

    def lr(self, step_lr: Tensor) -> Tensor:
        """The step's LR, or 0 on a skipped step (selected: the LR of a skipped step may have
        been computed from inf/NaN sums)."""
        return step_lr if self.skip is None else torch.where(self.skip.skip, 0.0, step_lr)

    def inputs(self, tensors: list[Tensor]) -> list[Tensor]:
        """Gradients and Hessian products: -0.0 on a skipped step (they may hold inf/NaN)."""
        return tensors if self.skip is None else self.skip.grads(tensors)

    def copy_(self, targets: list[Tensor], values: list[Tensor]) -> None:
        if self.skip is None:
            torch._foreach_copy_(targets, values)
        else:
            self.skip.select_(targets, values)


def _sgd_tangent_foreach(
    params, grads, hvps, momentum_buffers, z_params, z_buffers, directions, *, lr, mu, lr_scale,
    momentum, dampening, nesterov, weight_decay, first_step, fold,
) -> None:  # fmt: skip
    """:func:`_sgd_tangent_step` as list ops, the same operations in the same order; ``fold``
    (:class:`_Fold`) makes a skipped step write back what was there."""
    step_lr = fold.lr(lr * lr_scale)
    mu = fold.factor(mu)
    z_w = torch._foreach_mul(z_params, mu)
    h_z = fold.inputs(_damped_hvps(hvps, mu, z_w, weight_decay))
    decayed = fold.inputs(torch._foreach_add(grads, torch._foreach_mul(params, weight_decay)))
    if momentum != 0:
        if first_step:
            fold.copy_(momentum_buffers, decayed)
            fold.copy_(z_buffers, h_z)
        else:
            decay = fold.factor(momentum)
            torch._foreach_mul_(momentum_buffers, decay)
            torch._foreach_add_(momentum_buffers, torch._foreach_mul(decayed, 1 - dampening))
            torch._foreach_mul_(z_buffers, mu)
            torch._foreach_mul_(z_buffers, decay)
            torch._foreach_add_(z_buffers, torch._foreach_mul(h_z, 1 - dampening))
        if nesterov:
            direction = torch._foreach_add(decayed, torch._foreach_mul(momentum_buffers, momentum))
            z_direction = torch._foreach_add(h_z, torch._foreach_mul(z_buffers, momentum))
        else:
            direction, z_direction = momentum_buffers, z_buffers
    else:
        direction, z_direction = decayed, h_z
    _finish_tangent_step(params, z_params, directions, z_w, direction, z_direction, step_lr,
                         fold.weight(lr_scale), fold)  # fmt: skip


def _damped_hvps(hvps, mu, z_w, l2):
    """H~ z = mu (H Z_w) + lambda z_w (an absent product counts as 0, as 0 + x)."""
    decay = torch._foreach_mul(z_w, l2)
    if not hvps:
        torch._foreach_add_(decay, 0.0)
        return decay
    h_z = torch._foreach_mul(hvps, mu)
    torch._foreach_add_(h_z, decay)
    return h_z


def _finish_tangent_step(params, z_params, directions, z_w, direction, z_direction, step_lr,
                         lr_scale, fold) -> None:  # fmt: skip
    """Z_w' = z_w - s eta Z_d - s d, the kept d_t, then w' = w - s eta d."""
    z_new = torch._foreach_sub(z_w, torch._foreach_mul(z_direction, step_lr))
    torch._foreach_sub_(z_new, torch._foreach_mul(direction, lr_scale))
    torch._foreach_copy_(z_params, z_new)
    if directions:
        fold.copy_(directions, direction)
    torch._foreach_add_(params, torch._foreach_mul(direction, -step_lr))


def _adam_tangent_foreach(
    params, grads, hvps, exp_avgs, exp_avg_sqs, z_params, z_exp_avgs, z_exp_avg_sqs, directions,
    *, lr, mu, step, lr_scale, beta1, beta2, eps, weight_decay, decoupled_weight_decay, fold,
) -> None:  # fmt: skip
    """:func:`_adam_tangent_step` as list ops, the same operations in the same order; ``fold``
    (:class:`_Fold`) makes a skipped step write back what was there."""
    acc = lr.dtype
    if fold.skip is not None:
        # A skipped step's count was not advanced; its (discarded) direction uses t + 1 so that
        # the bias corrections are not 0 at t = 0.
        step = step + (1 - fold.skip.keep)
    step_lr, l2, adamw, bias1, bias2_sqrt = _adam_scalars(
        lr, step, lr_scale, beta1, beta2, weight_decay, decoupled_weight_decay
    )
    step_lr = fold.lr(step_lr)
    mu = fold.factor(mu)
    g = fold.inputs(torch._foreach_add(grads, torch._foreach_mul(params, l2)))
    z_w = torch._foreach_mul(z_params, mu)
    h_z = fold.inputs(_damped_hvps(hvps, mu, z_w, l2))
    n = len(params)
    lerp_weight = 1 - beta1 if fold.skip is None else [fold.weight(1 - beta1)] * n
    torch._foreach_lerp_(exp_avgs, g, lerp_weight)
    torch._foreach_mul_(exp_avg_sqs, fold.factor(beta2))
    g_term = torch._foreach_mul(g, 1 - beta2)
    torch._foreach_mul_(g_term, g)
    torch._foreach_add_(exp_avg_sqs, g_term)
    torch._foreach_mul_(z_exp_avgs, mu)
    torch._foreach_mul_(z_exp_avgs, fold.factor(beta1))
    torch._foreach_add_(z_exp_avgs, torch._foreach_mul(h_z, 1 - beta1))
    torch._foreach_mul_(z_exp_avg_sqs, mu)
    torch._foreach_mul_(z_exp_avg_sqs, fold.factor(beta2))
    g_term = torch._foreach_mul(g, 2 * (1 - beta2))
    torch._foreach_mul_(g_term, h_z)
    torch._foreach_add_(z_exp_avg_sqs, g_term)
    del g, g_term
    root = torch._foreach_sqrt(exp_avg_sqs)
    denom = torch._foreach_div(root, bias2_sqrt)
    torch._foreach_add_(denom, eps)
    ratio = torch._foreach_div(exp_avgs, denom)
    torch._foreach_div_(ratio, bias1)
    torch._foreach_clamp_min_(root, torch.finfo(acc).tiny)
    torch._foreach_mul_(root, 2)
    torch._foreach_mul_(root, bias2_sqrt)
    z_root = torch._foreach_div(z_exp_avg_sqs, root)
    del root
    z_ratio = torch._foreach_div(z_exp_avgs, bias1)
    torch._foreach_sub_(z_ratio, torch._foreach_mul(ratio, z_root))
    torch._foreach_div_(z_ratio, denom)
    del z_root, denom
    direction = torch._foreach_add(ratio, torch._foreach_mul(params, adamw))
    z_direction = torch._foreach_add(z_ratio, torch._foreach_mul(z_w, adamw))
    _finish_tangent_step(params, z_params, directions, z_w, direction, z_direction, step_lr,
                         fold.weight(lr_scale), fold)  # fmt: skip
