"""MLR-SNet (Shu et al.): an LSTM that maps the training loss to the LR, meta-learned online on a
validation loss, then reusable ("plug and play") on other tasks.

Equations: docs/design.md, MLR-SNet, and the paper's Eq. 7-11: LR_t = gamma * sigmoid(head(h_t)),
h_t from an LSTM cell whose input (the training loss) and previous state each go through a
fully connected layer with ReLU before the gates. Meta-training: w^ = w - LR d (d the inner
optimizer's last update direction, detached), dL_val(w^)/dLR = -<grad L_val(w^), d> (one dot
product: the scalar chain rule), backpropagated through the net into an Adam step on its weights.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer
from torch.optim.lr_scheduler import LRScheduler

from hyperlr_ext._common.checks import check_bool, check_number
from hyperlr_ext._common.grads import validation_grads
from hyperlr_ext._common.sharded import distribute_like, local_shards, mesh_group
from hyperlr_ext.schedulers._step_tracker import StepTracker

__all__ = ["MLRSNet", "MLRSNetModule", "PRETRAINED_DIR"]

PRETRAINED_DIR = Path(__file__).resolve().parent.parent / "pretrained"
# sigmoid(head) is kept inside [_EDGE, 1 - _EDGE], so that the LR stays strictly inside (0, gamma)
# even where float32's sigmoid saturates to 0 or 1.
_EDGE = 1e-6


class MLRSNetModule(nn.Module):
    """The network of MLR-SNet: pre-processing layers, an LSTM cell and a sigmoid head.

    gates = W_i2h(loss) + W_h2h(h) with W_i2h = Linear(1, H) -> ReLU -> Linear(H, 4H) and
    W_h2h = Linear(H, H) -> ReLU -> Linear(H, 4H); gates (input, forget, output, cell) as in the
    paper's code; c' = f c + i g, h' = o tanh(c'); p = sigmoid(Linear(H, 1)(h')). The forget gate
    starts with bias -1.
    """

    def __init__(self, hidden_size: int = 50) -> None:
        super().__init__()
        if isinstance(hidden_size, bool) or not isinstance(hidden_size, int) or hidden_size < 1:
            raise ValueError(f"hidden_size must be a positive integer, got {hidden_size!r}")
        self.hidden_size = hidden_size
        h = hidden_size
        self.input_to_gates = nn.Sequential(nn.Linear(1, h), nn.ReLU(), nn.Linear(h, 4 * h))
        self.state_to_gates = nn.Sequential(nn.Linear(h, h), nn.ReLU(), nn.Linear(h, 4 * h))
        self.head = nn.Linear(h, 1)
        with torch.no_grad():
            self.input_to_gates[2].bias[h : 2 * h].fill_(-1.0)
            self.state_to_gates[2].bias[h : 2 * h].zero_()

    def initial_state(self) -> tuple[Tensor, Tensor]:
        """(h, c) = 0, on the net's device and dtype."""
        weight = self.head.weight
        zeros = torch.zeros(1, self.hidden_size, dtype=weight.dtype, device=weight.device)
        return zeros, zeros.clone()

    def forward(
        self, loss: Tensor, state: tuple[Tensor, Tensor]
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        """(p in [_EDGE, 1 - _EDGE] as a 0-dim tensor, the new (h, c))."""
        hidden, cell = state
        x = loss.detach().reshape(1, 1).to(hidden.dtype)
        gates = self.input_to_gates(x) + self.state_to_gates(hidden)
        i, f, o, g = gates.split(self.hidden_size, dim=1)
        cell = torch.sigmoid(f) * cell + torch.sigmoid(i) * torch.tanh(g)
        hidden = torch.sigmoid(o) * torch.tanh(cell)
        p = torch.sigmoid(self.head(hidden)).clamp(_EDGE, 1 - _EDGE)
        return p.reshape(()), (hidden, cell)

    def output_from(self, state: tuple[Tensor, Tensor]) -> Tensor:
        """p from a state alone (the LR before any loss is seen: the net's first LR)."""
        return torch.sigmoid(self.head(state[0])).clamp(_EDGE, 1 - _EDGE).reshape(())


class MLRSNet(LRScheduler):
    """The LR of any optimizer predicted from the training loss by an LSTM (MLR-SNet).

    Args:
        optimizer: the optimizer whose LR it sets (every param group gets the same LR).
        gamma: the LR scale: LR = gamma * p with p in (0, 1) (the paper: 1 for images).
        meta_every: meta-train the net at every ``meta_every``-th step that passes a
            ``val_closure`` (the paper: twice per epoch).
        meta_lr, meta_weight_decay: the Adam step on the net's weights (1e-3, 1e-4).
        hidden_size: the LSTM's width (50).
        net: a trained :class:`MLRSNetModule` to start from (copied), else a fresh one.
        train: meta-train (True) or only predict with a frozen net (meta-test).
        input_scale: the loss fed to the net is ``loss * input_scale`` (the paper divides text
            losses by log(vocabulary size)).

    Call ``sched.step(loss, val_closure=None)`` after every ``optimizer.step()``, with the
    training loss of that step. The net reads the loss and sets the LR of the next step (the
    paper predicts the LR of a step from that step's loss, before the step; scheduling after the
    step, as torch does, shifts that by one step). At a meta-training step, ``val_closure()``
    returns a validation loss; the net's weights take one Adam step on
    dL_val(w - LR d)/dLR * dLR/dtheta, d being the last step's direction
    (w_before - w_after) / LR_applied, and the next LR is predicted by the updated net. The LR
    is written to ``group["lr"]``: in place when it is a tensor, else as a float (one host read
    per step). ``last_hypergrad`` holds the last meta-hypergradient (a tensor).

    Skipped steps change nothing: a step ``torch.amp.GradScaler`` skipped (``optimizer.step()``
    was not called) is not counted at all; a non-finite loss, or a step our optimizers skipped
    on the device (their ``nonfinite_step`` flag), leaves the LSTM state, the LR and the net's
    weights as they were (selected on the device; only the step counts advance).
    """

    def __init__(
        self,
        optimizer: Optimizer,
        gamma: float = 1.0,
        meta_every: int = 100,
        meta_lr: float = 1e-3,
        *,
        meta_weight_decay: float = 1e-4,
        hidden_size: int = 50,
        net: MLRSNetModule | None = None,
        train: bool = True,
        input_scale: float = 1.0,
        last_epoch: int = -1,
    ) -> None:
        check_number("gamma", gamma, low=0.0)
        if gamma == 0:
            raise ValueError("Invalid gamma value: 0; gamma must be a finite number > 0")
        if isinstance(meta_every, bool) or not isinstance(meta_every, int) or meta_every < 1:
            raise ValueError(f"meta_every must be a positive integer, got {meta_every!r}")
        check_number("meta_lr", meta_lr)
        check_number("meta_weight_decay", meta_weight_decay)
        check_number("input_scale", input_scale)
        check_bool("train", train)
        if not isinstance(optimizer, Optimizer):
            raise TypeError(f"{type(optimizer).__name__} is not an Optimizer")
        params = [p for g in optimizer.param_groups for p in g["params"]]
        device = params[0].device if params else torch.device("cpu")
        if net is None:
            net = MLRSNetModule(hidden_size)
        elif not isinstance(net, MLRSNetModule):
            raise TypeError(f"net must be an MLRSNetModule, got {type(net).__name__}")
        self.net = _copy_net(net).to(device=device, dtype=torch.float32)
        self.gamma, self.meta_every, self.train = float(gamma), int(meta_every), bool(train)
        self.input_scale = float(input_scale)
        self.meta_optimizer = torch.optim.Adam(
            self.net.parameters(), lr=meta_lr, weight_decay=meta_weight_decay
        )
        # Adam's state made now, as its first step would make it, so that the state_dict has one
        # structure from the start (torch.distributed.checkpoint loads into that structure).
        wide = torch.get_default_dtype() == torch.float64
        scalar_dtype = torch.float64 if wide else torch.float32
        for q in self.net.parameters():
            self.meta_optimizer.state[q] = {
                "step": torch.tensor(0.0, dtype=scalar_dtype),
                "exp_avg": torch.zeros_like(q, memory_format=torch.preserve_format),
                "exp_avg_sq": torch.zeros_like(q, memory_format=torch.preserve_format),
            }
        self.lstm_state = self.net.initial_state()
        self.steps = 0  # optimizer steps seen
        self.val_steps = 0  # steps that came with a val_closure
        self.snapshot: list[Tensor] | None = None  # the weights before a meta-training step
        self.applied_lr: float | Tensor = 0.0  # the LR the last step applied
        self.last_input: Tensor | None = None  # the net's input and state that produced it
        self.last_state: list[Tensor] | None = None
        self.last_p: Tensor | None = None  # the net's last output
        self.last_hypergrad = torch.zeros((), device=device)
        self.phases: list[list[Any]] = []  # [first step, net state_dict] of later phases
        super().__init__(optimizer, last_epoch)
        self._tracker = StepTracker(optimizer)  # after the initial step, which it must not see

    # ------------------------------------------------------------------ construction helpers
    @classmethod
    def from_pretrained(cls, optimizer: Optimizer, name: str, **kwargs: Any) -> MLRSNet:
        """A frozen MLR-SNet (meta-test) with a net shipped in the package (offline).

        ``name`` is one of :func:`MLRSNet.pretrained_names`; ``gamma`` and ``input_scale``
        default to the values it was trained with; ``train=True`` continues meta-training it.
        """
        path = PRETRAINED_DIR / f"{name}.pt"
        if not path.is_file():
            raise ValueError(
                f"no pretrained MLR-SNet named {name!r}; available: {cls.pretrained_names()}"
            )
        saved = torch.load(path, map_location="cpu", weights_only=True)
        net = MLRSNetModule(int(saved["hidden_size"]))
        net.load_state_dict(saved["net"])
        kwargs.setdefault("gamma", float(saved["gamma"]))
        kwargs.setdefault("input_scale", float(saved.get("input_scale", 1.0)))
        kwargs.setdefault("train", False)
        return cls(optimizer, net=net, **kwargs)

    @classmethod
    def multi_phase(
        cls,
        optimizer: Optimizer,
        nets: list[MLRSNetModule | str],
        boundaries: list[int],
        **kwargs: Any,
    ) -> MLRSNet:
        """The paper's multi-phase transfer: frozen nets (modules or pretrained names), net i
        driving the steps from ``boundaries[i - 1]`` (0 for the first) to ``boundaries[i]``.
        The LSTM state carries over from one net to the next."""
        if len(boundaries) != len(nets) - 1 or any(
            b <= a for a, b in zip([0, *boundaries], boundaries)
        ):
            raise ValueError(
                "multi_phase needs len(nets) - 1 increasing positive boundaries, got "
                f"{len(nets)} nets and boundaries {boundaries}"
            )
        modules = []
        for net in nets:
            if isinstance(net, str):
                net = cls.from_pretrained(optimizer, net, **kwargs).net
            modules.append(net)
        kwargs = {k: v for k, v in kwargs.items() if k != "train"}
        sched = cls(optimizer, net=modules[0], train=False, **kwargs)
        later = zip(boundaries, modules[1:])
        sched.phases = [[int(b), _copy_net(m).state_dict()] for b, m in later]
        return sched

    @staticmethod
    def pretrained_names() -> list[str]:
        """The nets shipped in hyperlr_ext/pretrained/."""
        return sorted(p.stem for p in PRETRAINED_DIR.glob("*.pt"))

    # ------------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """Everything, with the net and the meta-optimizer as their own state_dicts (tensors,
        numbers and lists only: loads with torch.load(weights_only=True)).

        Its structure does not change as training goes on (torch.distributed.checkpoint loads
        into the structure of a fresh scheduler's state_dict): the tensors that are not set yet
        (the snapshot between meta-training steps, the inputs of the next one before the first
        step) are stored as zeros and named in ``"unset"``. The snapshot's tensors are laid out
        as the params (DTensors under FSDP2)."""
        state = {
            k: v for k, v in self.__dict__.items()
            if k not in ("optimizer", "net", "meta_optimizer", "lstm_state", "_tracker")
        }  # fmt: skip
        state["net"] = self.net.state_dict()
        state["hidden_size"] = self.net.hidden_size
        state["meta_optimizer"] = self.meta_optimizer.state_dict()
        state["lstm_state"] = [t.clone() for t in self.lstm_state]
        placeholders = {
            "snapshot": lambda: [torch.zeros_like(p) for p in self._params()],
            "last_input": lambda: torch.zeros((), device=self.last_hypergrad.device),
            "last_state": lambda: [torch.zeros_like(t) for t in self.lstm_state],
        }
        state["unset"] = [key for key in placeholders if state[key] is None]
        for key in state["unset"]:
            state[key] = placeholders[key]()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        state = dict(state_dict)
        if int(state.pop("hidden_size")) != self.net.hidden_size:
            raise ValueError(
                f"MLRSNet state_dict: hidden size {state_dict['hidden_size']} differs from this "
                f"net's {self.net.hidden_size}"
            )
        device = self.net.head.weight.device
        self.net.load_state_dict(state.pop("net"))
        self.meta_optimizer.load_state_dict(state.pop("meta_optimizer"))
        h, c = state.pop("lstm_state")
        self.lstm_state = (h.to(device), c.to(device))
        for key in state.pop("unset", []):
            state[key] = None
        if state.get("snapshot") is not None:
            params = self._params()
            state["snapshot"] = [distribute_like(t, p) for t, p in zip(state["snapshot"], params)]
        super().load_state_dict(state)

    # ------------------------------------------------------------------ the schedule
    def _params(self) -> list[Tensor]:
        return [p for g in self.optimizer.param_groups for p in g["params"]]

    def get_lr(self) -> list[float | Tensor]:
        return [group["lr"] for group in self.optimizer.param_groups]

    def _set_lr(self, p: Tensor) -> None:
        """Every group's LR <- gamma * p; ``applied_lr`` keeps it as the groups hold it."""
        lr = self.gamma * p.detach()
        applied: float | Tensor = 0.0
        for group in self.optimizer.param_groups:
            if isinstance(group["lr"], Tensor):
                group["lr"].copy_(lr)
                applied = group["lr"].detach().clone()
            else:
                group["lr"] = float(lr)  # a host read: float LRs are Python numbers
                applied = group["lr"]
        self.applied_lr = applied

    def step(  # type: ignore[override]
        self, loss: Tensor | float | None = None, val_closure: Callable[[], Tensor] | None = None
    ) -> None:
        """Feed the loss of the step that just ran; set the LR of the next one."""
        if self.last_epoch < 0:  # the call from LRScheduler.__init__: the net's first LR
            self.last_epoch = 0
            self._step_count = 1
            with torch.no_grad():
                self.last_p = self.net.output_from(self.lstm_state)
                self._set_lr(self.last_p)
            self._last_lr = self.get_lr()
            return
        if loss is None:
            raise ValueError("MLRSNet.step(loss) needs the training loss of the step that just ran")
        loss_t = torch.as_tensor(loss).detach()
        if loss_t.numel() != 1:
            raise ValueError(f"loss must be a scalar, got shape {tuple(loss_t.shape)}")
        x = loss_t.reshape(()).to(self.net.head.weight.device, torch.float32) * self.input_scale
        tracker = getattr(self, "_tracker", None)
        if tracker is not None and not tracker.ran():
            return  # the optimizer did not step (GradScaler skipped it): nothing changes
        # An optimizer that skipped the step on the device (ours under GradScaler or with
        # skip_nonfinite) says so in `nonfinite_step`; that step is treated as a non-finite loss.
        skipped = getattr(self.optimizer, "nonfinite_step", None)
        skipped = None if not isinstance(skipped, Tensor) else skipped.reshape(()).to(x.device) != 0
        self._step_count += 1
        self.last_epoch += 1
        self.steps += 1
        if self.train and val_closure is not None:
            self.val_steps += 1
            if self.val_steps % self.meta_every == 0 and self.snapshot is not None:
                self._meta_step(val_closure, skipped)
        while self.phases and self.steps >= self.phases[0][0]:
            self.net.load_state_dict(self.phases.pop(0)[1])  # the next phase's net
        state = self.lstm_state
        with torch.no_grad():
            p, new_state = self.net(x, state)
            if self.last_p is not None:
                # A non-finite loss (a diverging or AMP-skipped step) leaves the LSTM, the LR
                # and the inputs of the next meta step as they were: selected on the device.
                finite = torch.isfinite(x) if skipped is None else torch.isfinite(x) & ~skipped
                p = torch.where(finite, p, self.last_p)
                new_state = tuple(torch.where(finite, n, o) for n, o in zip(new_state, state))
                previous = self.last_input if self.last_input is not None else torch.zeros_like(x)
                x = torch.where(finite, x, previous)
                if self.last_state is not None:
                    state = tuple(torch.where(finite, n, o)
                                  for n, o in zip(state, self.last_state))  # fmt: skip
        self.lstm_state = new_state
        self.last_input, self.last_state, self.last_p = x, [t.clone() for t in state], p.clone()
        self._set_lr(p)
        # The weights before the next step, when that step may be a meta-training one.
        upcoming = self.train and (self.val_steps + 1) % self.meta_every == 0
        self.snapshot = [t.detach().clone() for t in self._params()] if upcoming else None
        self._last_lr = self.get_lr()

    def _meta_step(self, val_closure: Callable[[], Tensor], skipped: Tensor | None) -> None:
        """One Adam step on the net's weights for the step that just ran, w' = w - LR d:
        dL_val(w')/dLR = -<grad L_val(w'), d> with d = (w_before - w') / LR (detached), times
        dLR/dtheta through the net's forward that produced LR (the scalar chain rule)."""
        params = self._params()
        applied = self.applied_lr
        # Under FSDP2 (DTensor params) every rank works on its shards: the validation gradient
        # comes from FSDP2's backward (averaged over the ranks), the partial dot products are
        # summed by one all-reduce over the mesh.
        mesh = mesh_group(params)
        directions = [(s - w.detach()) / applied for s, w in
                      zip(local_shards(self.snapshot), local_shards(params))]  # fmt: skip
        grads = validation_grads(val_closure, params, by_backward=mesh is not None)
        hypergrad = torch.zeros((), dtype=torch.float64, device=directions[0].device)
        for g, d in zip(grads, directions):
            hypergrad = hypergrad - torch.dot(g.reshape(-1).double(), d.reshape(-1).double())
        if mesh is not None:
            torch.distributed.all_reduce(hypergrad, group=mesh)
        self.last_hypergrad = hypergrad.detach()
        # A diverged validation loss or a step skipped on the device: no meta step (one host
        # read, at meta-training steps only).
        ok = torch.isfinite(hypergrad)
        if skipped is not None:
            ok = ok & ~skipped.to(ok.device)
        if not bool(ok):
            return
        with torch.enable_grad():
            if self.last_input is None:  # the first LR, from the initial state alone
                p = self.net.output_from(tuple(self.last_state or self.net.initial_state()))
            else:
                p, _ = self.net(self.last_input, tuple(self.last_state))
            lr = self.gamma * p
        self.meta_optimizer.zero_grad()
        (lr * hypergrad.to(device=lr.device, dtype=lr.dtype)).backward()
        self.meta_optimizer.step()


def _copy_net(net: MLRSNetModule) -> MLRSNetModule:
    copy = MLRSNetModule(net.hidden_size)
    copy.load_state_dict(net.state_dict())
    return copy
