"""Our optimizers and schedulers in Lightning, as users wire them, offline: returned from
``configure_optimizers`` (alone, with a torch scheduler, with TLR or MLR-SNet as step-interval
schedulers), under automatic optimization (Lightning's closure), manual optimization and skipped
batches; a checkpoint resumed with ``ckpt_path=`` continues the uninterrupted run exactly; the
callback logs what was learned."""

from __future__ import annotations

import pytest
import torch

pl = pytest.importorskip("lightning.pytorch")

import hyperlr_ext as hx  # noqa: E402
from hyperlr_ext.integrations.lightning import HyperLRMonitor  # noqa: E402

STEPS = 8


def _data():
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(64, 5, generator=gen)
    y = x @ torch.randn(5, 1, generator=gen)
    return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=16)


class Module(pl.LightningModule):
    def __init__(self, wiring: str, manual: bool = False, skip: int | None = None):
        super().__init__()
        torch.manual_seed(0)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1)
        )
        self.wiring, self.skip = wiring, skip
        self.automatic_optimization = not manual
        self.last_loss = None

    def training_step(self, batch, batch_idx):
        if self.skip is not None and batch_idx == self.skip:
            return None  # a skipped batch
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.last_loss = loss.detach()
        if not self.automatic_optimization:
            opt = self.optimizers()
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()
            sched = self.lr_schedulers()
            if isinstance(sched, hx.MLRSNet):
                sched.step(loss.detach())
            elif sched is not None:
                sched.step()
        return loss

    def configure_optimizers(self):
        params = self.net.parameters()
        if self.wiring == "SGDHD":
            return hx.SGDHD(params, lr=0.05, hyper_lr=1e-3, momentum=0.9)
        if self.wiring == "AdamHD + StepLR":
            opt = hx.AdamHD(params, lr=0.05, hyper_lr=1e-4)
            sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
            return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}
        if self.wiring == "HyperLR + AdamW":
            opt = torch.optim.AdamW(params, lr=0.01)
            hx.HyperLR(opt, 1e-6)
            return opt
        opt = torch.optim.SGD(params, lr=0.05, momentum=0.9)
        if self.wiring == "TLR":
            sched = hx.TLR(opt, update_every=2)
        else:
            sched = hx.MLRSNet(opt, gamma=0.2, meta_every=4, hidden_size=8)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}

    def lr_scheduler_step(self, scheduler, metric):
        if isinstance(scheduler, hx.MLRSNet):
            scheduler.step(self.last_loss)  # MLR-SNet reads the loss of the step that ran
        else:
            scheduler.step()


def _trainer(tmp_path, **kw):
    return pl.Trainer(max_steps=STEPS, accelerator="cpu", devices=1, logger=False,
                      enable_progress_bar=False, enable_model_summary=False,
                      default_root_dir=str(tmp_path), deterministic=True, **kw)  # fmt: skip


WIRINGS = ["SGDHD", "AdamHD + StepLR", "TLR", "MLRSNet", "HyperLR + AdamW"]


@pytest.mark.parametrize("manual", [False, True], ids=["automatic", "manual"])
@pytest.mark.parametrize("wiring", WIRINGS)
def test_fit_checkpoint_and_resume_exactly(wiring, manual, tmp_path):
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4,
                                              save_top_k=-1)  # fmt: skip
    module = Module(wiring, manual)
    _trainer(tmp_path, callbacks=[checkpoint]).fit(module, _data())
    assert any(not torch.equal(p, q) for p, q in zip(module.net.parameters(),
                                                      Module(wiring).net.parameters()))  # fmt: skip
    # 4 batches per epoch: the step-4 checkpoint is an epoch boundary (Lightning restarts an
    # interrupted epoch's data from its start).
    path = next(p for p in (tmp_path / "ckpt").iterdir() if "step=4" in p.name)
    resumed = Module(wiring, manual)
    _trainer(tmp_path / "resumed").fit(resumed, _data(), ckpt_path=str(path))
    for p, q in zip(module.net.parameters(), resumed.net.parameters()):
        assert torch.equal(p, q)


def test_skipped_batch_is_a_no_op_and_the_monitor_logs(tmp_path):
    module = Module("SGDHD", skip=2)
    metrics = {}

    unchanged = []

    class Capture(pl.Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            self.before = [p.detach().clone() for p in pl_module.net.parameters()]
            self.lr = pl_module.optimizers().optimizer.param_groups[0]["learned_lr"].clone()

        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})
            if batch_idx == 2:  # the skipped batch: weights and learned LR keep their bits
                after = list(pl_module.net.parameters())
                group = pl_module.optimizers().optimizer.param_groups[0]
                unchanged.append(all(torch.equal(a, b) for a, b in zip(self.before, after))
                                 and torch.equal(self.lr, group["learned_lr"]))  # fmt: skip

    trainer = _trainer(tmp_path, callbacks=[HyperLRMonitor(), Capture()], log_every_n_steps=1)
    trainer.fit(module, _data())
    assert "effective_lr/group0" in metrics and "hypergrad/group0" in metrics
    assert metrics["effective_lr/group0"] > 0
    assert unchanged and all(unchanged)


class MartheModule(Module):
    """MARTHE differentiates the loss itself: manual optimization, the closure returns the
    loss without backward."""

    def __init__(self):
        super().__init__("MARTHE", manual=True)

    def training_step(self, batch, batch_idx):
        x, y = batch
        opt = self.optimizers()
        loss = opt.step(closure=lambda: torch.nn.functional.mse_loss(self.net(x), y))
        return loss

    def configure_optimizers(self):
        return hx.MARTHE(self.net.parameters(), lr=0.05, hyper_lr=1e-3, momentum=0.9)


def test_marthe_in_manual_optimization_logs_mu_and_resumes(tmp_path):
    checkpoint = pl.callbacks.ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4,
                                              save_top_k=-1)  # fmt: skip
    metrics = {}

    class Capture(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            metrics.update({k: float(v) for k, v in trainer.callback_metrics.items()})

    module = MartheModule()
    _trainer(tmp_path, callbacks=[checkpoint, HyperLRMonitor(), Capture()],
             log_every_n_steps=1).fit(module, _data())  # fmt: skip
    assert {"effective_lr/group0", "hypergrad/group0", "mu/group0"} <= set(metrics)
    path = next(p for p in (tmp_path / "ckpt").iterdir() if "step=4" in p.name)
    resumed = MartheModule()
    _trainer(tmp_path / "resumed").fit(resumed, _data(), ckpt_path=str(path))
    for p, q in zip(module.net.parameters(), resumed.net.parameters()):
        assert torch.equal(p, q)
