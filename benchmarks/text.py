"""The language-model task's text and model: characters of the Python reference documentation
that CPython itself ships, and a small decoder-only transformer built from ``torch.nn``.

The corpus is ``pydoc_data.topics.topics`` (the text behind ``help("assert")`` and the other
help topics: about 465,000 characters of English prose with code examples in Python 3.11),
joined in the order of its sorted keys. Nothing is downloaded; the text changes only with the
Python version (the report prints it). The split is fixed: the first 80% of the characters
train, the next 10% are the validation text of the methods that read a validation loss
(RT-HPO, MLR-SNet's meta-training), the last 10% are held out and give the reported loss. The
examples are windows of ``context`` characters, the target the same window shifted by one; the
training windows start every ``context // 2`` characters (overlapping by half), the others do
not overlap.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

CONTEXT = 32
SPLIT = (0.8, 0.9)  # train | validation | held out


def corpus() -> str:
    """The text, as described in the module's docstring."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def load_text(context: int = CONTEXT) -> dict[str, Tensor]:
    """Train / validation / held-out ("test") windows of the corpus as int64 character indices:
    x of shape (n, context), y the next characters; the vocabulary size is
    ``int(out["vocab"])``."""
    text = corpus()
    vocab = sorted(set(text))
    index = {c: i for i, c in enumerate(vocab)}
    ids = torch.tensor([index[c] for c in text], dtype=torch.int64)
    cut, held = (int(len(ids) * f) for f in SPLIT)

    def windows(part: Tensor, stride: int) -> tuple[Tensor, Tensor]:
        starts = torch.arange(0, len(part) - context - 1, stride)
        rows = starts[:, None] + torch.arange(context + 1)
        chunks = part[rows]
        return chunks[:, :-1].contiguous(), chunks[:, 1:].contiguous()

    x_tr, y_tr = windows(ids[:cut], context // 2)
    x_val, y_val = windows(ids[cut:held], context)
    x_te, y_te = windows(ids[held:], context)
    return {"x_train": x_tr, "y_train": y_tr, "x_val": x_val, "y_val": y_val,
            "x_test": x_te, "y_test": y_te, "vocab": torch.tensor(len(vocab))}  # fmt: skip


class CharGPT(nn.Module):
    """A decoder-only transformer over characters: token and learned position embeddings,
    ``layers`` pre-norm blocks (causal self-attention, GELU MLP of 4x width), a final
    LayerNorm and a linear head. ``forward`` returns logits as (batch, vocab, time), the layout
    ``F.cross_entropy`` takes with targets of shape (batch, time)."""

    def __init__(self, vocab: int, width: int = 32, layers: int = 2, heads: int = 2,
                 context: int = CONTEXT) -> None:  # fmt: skip
        super().__init__()
        self.token = nn.Embedding(vocab, width)
        self.position = nn.Embedding(context, width)
        block = nn.TransformerEncoderLayer(
            width, heads, 4 * width, dropout=0.0, activation="gelu", batch_first=True,
            norm_first=True,
        )  # fmt: skip
        self.blocks = nn.TransformerEncoder(block, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab)
        mask = torch.triu(torch.full((context, context), -math.inf), diagonal=1)
        self.register_buffer("mask", mask, persistent=False)

    def forward(self, x: Tensor) -> Tensor:
        t = x.shape[1]
        h = self.token(x) + self.position(torch.arange(t, device=x.device))
        h = self.blocks(h, mask=self.mask[:t, :t], is_causal=True)
        return self.head(self.norm(h)).transpose(1, 2)
