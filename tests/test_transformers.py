"""Our optimizers and schedulers inside transformers' Trainer, as users wire them, offline: a
2-layer GPT-2 built from a config on synthetic tokens. The optimizer passed as
``optimizers=(opt, None)`` (the Trainer wraps it in its warm-up/decay scheduler, which scales the
learned LR), built by the Trainer through ``optimizer_cls_and_kwargs``, and TLR as the scheduler;
checkpoints and ``resume_from_checkpoint`` continue the uninterrupted run exactly; the callback
logs what was learned."""

from __future__ import annotations

import pytest
import torch

transformers = pytest.importorskip("transformers")

import hyperlr_ext as hx  # noqa: E402
from hyperlr_ext.integrations.transformers import HyperLRCallback  # noqa: E402

STEPS = 8


class _Tokens(torch.utils.data.Dataset):
    def __init__(self, n=64, length=16, vocab=64):
        gen = torch.Generator().manual_seed(0)
        self.ids = torch.randint(0, vocab, (n, length), generator=gen)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def _model():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_layer=2, n_head=2, n_embd=32, vocab_size=64, n_positions=16,
                                     resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)  # fmt: skip
    return transformers.GPT2LMHeadModel(config)


def _args(out, **kw):
    return transformers.TrainingArguments(
        output_dir=str(out), per_device_train_batch_size=8, max_steps=STEPS, save_steps=4,
        logging_steps=2, report_to=[], use_cpu=True, seed=0, disable_tqdm=True,
        learning_rate=0.05, warmup_steps=2, save_strategy="steps", **kw,
    )  # fmt: skip


def _wrapped(opt):
    hx.HyperLR(opt, 1e-6)  # learns the LR of the optimizer the Trainer steps
    return dict(optimizers=(opt, None))


WIRINGS = {
    "SGDHD via optimizers": lambda m: dict(optimizers=(hx.SGDHD(
        m.parameters(), lr=0.05, hyper_lr=1e-3, momentum=0.9), None)),
    "AdamHD via optimizer_cls_and_kwargs": lambda m: dict(
        optimizer_cls_and_kwargs=(hx.AdamHD, {"lr": 0.05, "hyper_lr": 1e-4})),
    "TLR as the scheduler": lambda m: (lambda o: dict(optimizers=(o, hx.TLR(o, update_every=2))))(
        torch.optim.SGD(m.parameters(), lr=0.05, momentum=0.9)),
    "HyperLR around AdamW": lambda m: _wrapped(torch.optim.AdamW(m.parameters(), lr=0.05)),
}  # fmt: skip


def _train(tmp_path, wiring, resume=None, out="run"):
    model = _model()
    trainer = transformers.Trainer(model=model, args=_args(tmp_path / out),
                                   train_dataset=_Tokens(), callbacks=[HyperLRCallback()],
                                   **WIRINGS[wiring](model))  # fmt: skip
    trainer.train(resume_from_checkpoint=resume)
    return model, trainer


@pytest.mark.parametrize("wiring", list(WIRINGS))
def test_trainer_trains_checkpoints_and_resumes_exactly(wiring, tmp_path):
    model, trainer = _train(tmp_path, wiring)
    history = trainer.state.log_history
    assert any("loss" in h for h in history)
    learned = [h for h in history if "effective_lr/group0" in h or "lr/group0" in h]
    assert learned, history  # the callback logged what the optimizer applies
    if wiring != "TLR as the scheduler":
        # The Trainer's own warm-up/decay scheduler scales the learned LR, not replaces it.
        opt = (
            trainer.optimizer.optimizer
            if hasattr(trainer.optimizer, "optimizer")
            else trainer.optimizer
        )
        group = opt.param_groups[0]
        # The linear decay has brought group["lr"] to 0 after the last step; that step applied
        # the learned LR times the decay's previous factor (1/6 of the way from the end).
        assert group["initial_lr"] == 0.05 and group["lr"] == 0.0
        hyper = hx.HyperLR.attached(opt)
        learned = (hyper.effective_lr[0], hyper.learned_lr[0]) if hyper else (
            group["effective_lr"], group["learned_lr"])  # fmt: skip
        assert 0 < float(learned[0]) < float(learned[1])
    checkpoint = tmp_path / "run" / "checkpoint-4"
    assert (checkpoint / "optimizer.pt").is_file()

    resumed, _ = _train(tmp_path, wiring, resume=str(checkpoint), out="resumed")
    for (name, p), q in zip(model.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), name
