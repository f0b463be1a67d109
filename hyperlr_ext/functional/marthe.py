"""Forward-mode (tangent) hypergradients of the LR for SGD dynamics: RTHO, RT-HPO and MARTHE.

Notation of DESIGN.md §2 ("Tangent-system methods"). The inner step is torch.optim.SGD's
(L2 decay g~ = g + lambda w, momentum m, dampening tau, Nesterov), written w' = w - s eta d with
s the scheduler scale. The tangents Z_w = dw/d eta and Z_b = db/d eta follow

    Z_{t+1} = mu_t A_t Z_t + B_t,   B_t = (-s_t d_t, 0),

where A_t is the Jacobian of one SGD step with respect to (w, b). With H~ = H + lambda I the
Hessian of the training loss plus the decay, and z = mu Z (A is linear):

    Hz       = H~ z_w
    Z_b'     = Hz                       on a tensor's first step (torch sets b = g~)
             = m z_b + (1 - tau) Hz     afterwards
    Z_d      = Z_b' (plain momentum),  Hz + m Z_b' (Nesterov),  Hz (no momentum)
    Z_w'     = z_w - s eta Z_d - s d.

The LR moves along Delta_t = <Z_w, grad E(w_t)>: eta_t = max(eta_{t-1} - beta Delta_t, 0).
docs/tangents.md derives these equations.
"""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["sgd_tangent_step_", "marthe_mu_", "tensor_list_dot"]


def tensor_list_dot(a: list[Tensor], b: list[Tensor], dtype: torch.dtype) -> Tensor:
    """sum_i <a_i, b_i> accumulated in ``dtype`` (a 0-dim tensor on the tensors' device)."""
    total = torch.zeros((), dtype=dtype, device=a[0].device)
    for x, y in zip(a, b):
        total = total + torch.dot(x.reshape(-1).to(dtype), y.reshape(-1).to(dtype))
    return total


def marthe_mu_(mu: Tensor, c: Tensor, delta: Tensor, g_prime: Tensor) -> None:
    """MARTHE's adaptive mu (appendix B): q = Delta g', q~ = clip(q / g'^2, 0, 1),
    mu <- q~^(1 / (c + 1)) and then c <- mu_old (1 + c). q~ = 0 when g' = 0. In place, on device."""
    q = delta * g_prime
    safe = torch.where(g_prime != 0, g_prime * g_prime, torch.ones_like(g_prime))
    q_tilde = torch.where(g_prime != 0, (q / safe).clamp(0.0, 1.0), torch.zeros_like(q))
    new_mu = q_tilde.pow(1.0 / (c + 1.0))
    c.copy_(mu * (1.0 + c))
    mu.copy_(new_mu)


def sgd_tangent_step_(
    params: list[Tensor],
    grads: list[Tensor],
    hvps: list[Tensor] | None,
    buffers: list[Tensor | None],
    z_params: list[Tensor],
    z_buffers: list[Tensor | None],
    directions: list[Tensor],
    *,
    lr: Tensor,
    lr_scale: float,
    mu: Tensor | float,
    momentum: float,
    dampening: float,
    nesterov: bool,
    weight_decay: float,
) -> None:
    """One SGD step and its tangent update, in place.

    ``grads`` are the training gradients g (without decay) at w; ``hvps`` the products H z_w with
    z_w = mu * Z_w (None when z_w is known to be 0); ``lr`` the learned LR eta (0-dim, on device).
    ``buffers``/``z_buffers`` entries that are None are created (first step). ``directions``
    receives d_t for each tensor (overwritten in place), which MARTHE's adaptive mu needs next
    step.
    """
    step_lr = lr * lr_scale
    for i, (w, g) in enumerate(zip(params, grads)):
        z_w = z_params[i] * mu
        decayed = g.add(w, alpha=weight_decay) if weight_decay != 0 else g
        h_z = hvps[i] if hvps is not None else torch.zeros_like(w)
        if weight_decay != 0:
            h_z = h_z.add(z_w, alpha=weight_decay)
        if momentum != 0:
            if buffers[i] is None:
                buffers[i] = decayed.detach().clone()
                z_buffers[i] = h_z.clone()
            else:
                buffers[i].mul_(momentum).add_(decayed, alpha=1 - dampening)
                z_buffers[i] = (z_buffers[i] * mu).mul_(momentum).add_(h_z, alpha=1 - dampening)
            if nesterov:
                direction = decayed.add(buffers[i], alpha=momentum)
                z_direction = h_z.add(z_buffers[i], alpha=momentum)
            else:
                direction, z_direction = buffers[i], z_buffers[i]
        else:
            direction, z_direction = decayed, h_z
        # Z_w' = z_w - s eta Z_d - s d, then w' = w - s eta d (the tangent uses d before w moves).
        z_params[i] = z_w - step_lr * z_direction - lr_scale * direction
        directions[i].copy_(direction)
        w.sub_(step_lr * direction)
