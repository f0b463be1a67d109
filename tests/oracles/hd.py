"""An independent oracle for hypergradient descent, written from docs/design.md, HD, and the papers.

Plain float64 code over one flat vector per LR slot (a whole param group, or one tensor with
per_tensor=True). It keeps d_{t-1} explicitly (the package recomputes it for Adam), and shares no
code with hyperlr_ext.

    w_{t+1} = w_t - s_t * eta_t * d_t
    h_t = <g_hat_t, s_{t-1} d_{t-1}>                        (0 at the first step)
    additive:       eta_t = max(eta_{t-1} + beta * h_t, 0)
    multiplicative: eta_t = max(eta_{t-1} * (1 + beta * h_t / (|g_hat_t| |s_{t-1} d_{t-1}|)), 0)
    lr_lag = 1:     the step uses eta_{t-1}, then eta_t is computed.

hyper_optimizer="adam" (an Adam step on log eta, from its hypergradient q = eta_{t-1} * (-h_t)),
on the steps where the previous step moved the slot (|s_{t-1} d_{t-1}| > 0), n counting them:
    m = b1 m + (1 - b1) q,  v = b2 v + (1 - b2) q^2
    eta_t = min(max(eta_{t-1} * exp(-beta * (m / (1 - b1^n)) / (sqrt(v / (1 - b2^n)) + eps)),
                    low), high)
"""

from __future__ import annotations

import math

import torch


class HDSlotOracle:
    """One LR slot: the inner optimizer (SGD or Adam, as torch.optim defines them) plus HD."""

    def __init__(self, kind: str, lr: float, **cfg) -> None:
        self.kind = kind  # "sgd" or "adam"
        self.eta = lr
        self.cfg = cfg
        self.d_prev = None
        self.s_prev = 1.0
        self.buf = None
        self.m = self.v = self.vmax = None
        self.k = 0
        self.hypergrad = 0.0
        self.applied = lr
        self.adam_m = self.adam_v = 0.0  # hyper_optimizer="adam": moments of q, and their count
        self.adam_n = 0

    def _direction(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        c = self.cfg
        if c.get("maximize", False):
            g = -g
        if self.kind == "sgd":
            if c.get("weight_decay", 0.0):
                g = g + c["weight_decay"] * w
            mom = c.get("momentum", 0.0)
            if mom == 0:
                return g
            if self.buf is None:
                self.buf = g.clone()
            else:
                self.buf = mom * self.buf + (1 - c.get("dampening", 0.0)) * g
            return g + mom * self.buf if c.get("nesterov", False) else self.buf
        beta1, beta2 = c.get("betas", (0.9, 0.999))
        decoupled = c.get("decoupled_weight_decay", False)
        wd = c.get("weight_decay", 0.0)
        if wd and not decoupled:
            g = g + wd * w
        if self.m is None:
            self.m = torch.zeros_like(w)
            self.v = torch.zeros_like(w)
            self.vmax = torch.zeros_like(w)
        self.k += 1
        self.m = beta1 * self.m + (1 - beta1) * g
        self.v = beta2 * self.v + (1 - beta2) * g * g
        self.vmax = torch.maximum(self.vmax, self.v)
        second = self.vmax if c.get("amsgrad", False) else self.v
        m_hat = self.m / (1 - beta1**self.k)
        v_hat = second / (1 - beta2**self.k)
        d = m_hat / (v_hat.sqrt() + c.get("eps", 1e-8))
        return d + wd * w if decoupled else d

    def objective_grad(self, w: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
        """Gradient of the training objective (L2 decay is part of it, decoupled decay is not)."""
        c = self.cfg
        g = -g if c.get("maximize", False) else g
        decoupled = c.get("decoupled_weight_decay", False)
        if c.get("weight_decay", 0.0) and not decoupled:
            g = g + c["weight_decay"] * w
        return g

    def step(self, w, g, scale: float, val_grad=None) -> torch.Tensor:
        """Return w_{t+1}; ``val_grad`` replaces the training objective's gradient in h_t."""
        c = self.cfg
        if val_grad is None:
            g_hat = self.objective_grad(w, g)
        else:
            g_hat = -val_grad if c.get("maximize", False) else val_grad
        beta = c["hyper_lr"]
        if self.d_prev is None:
            h = 0.0
            cosine = 0.0
        else:
            prev = self.s_prev * self.d_prev
            h = float(g_hat @ prev)
            norms = float(g_hat.norm()) * float(prev.norm())
            cosine = h / norms if norms > 0 else 0.0
        if c.get("hyper_optimizer", "sgd") == "adam":
            moved = self.d_prev is not None and float((self.s_prev * self.d_prev).norm()) > 0
            new_eta = self._log_lr_adam(-h) if moved else self.eta
        elif c.get("multiplicative", False):
            new_eta = max(self.eta * (1 + beta * cosine), 0.0)
        else:
            new_eta = max(self.eta + beta * h, 0.0)
        used = self.eta if c.get("lr_lag", 0) else new_eta
        self.eta = new_eta
        self.hypergrad = -h
        d = self._direction(w, g)
        self.applied = scale * used
        self.d_prev = d.clone()
        self.s_prev = scale
        assert math.isfinite(self.eta)
        return w - scale * used * d

    def _log_lr_adam(self, hypergrad: float) -> float:
        """eta_t from the Adam step on log eta (hyper_optimizer="adam")."""
        c = self.cfg
        b1, b2 = c["hyper_betas"]
        q = self.eta * hypergrad
        self.adam_n += 1
        self.adam_m = b1 * self.adam_m + (1 - b1) * q
        self.adam_v = b2 * self.adam_v + (1 - b2) * q * q
        m_hat = self.adam_m / (1 - b1**self.adam_n)
        v_hat = self.adam_v / (1 - b2**self.adam_n)
        eta = self.eta * math.exp(-c["hyper_lr"] * m_hat / (math.sqrt(v_hat) + c["hyper_eps"]))
        low, high = c["lr_bounds"]
        return min(max(eta, low), high)
