"""A small character-level language model for ``train.py --dataset python-source``.

:class:`CharTransformer` is a decoder-only transformer (Vaswani et al., "Attention Is All You
Need", NeurIPS 2017) in the GPT-2 arrangement (Radford et al., "Language Models are Unsupervised
Multitask Learners", 2019): token and learned position embeddings, pre-norm blocks of causal
self-attention and a 4x GELU MLP, each added to the residual stream, a final LayerNorm and a linear
head to the vocabulary. The head is untied from the token embedding, so every parameter is its own
tensor (the optimizers flatten ``model.parameters()`` into one buffer). Weights start from
N(0, 0.02), the residual projections from N(0, 0.02 / sqrt(2 · layers)) as in GPT-2, biases from
zero; with ``seed`` the draw uses its own generator, independent of the global one.

:func:`lm_loss` is the mean next-token cross-entropy (nats) over every position of a batch,
:func:`validation_loss` the same over a whole set without gradients, and :func:`bits_per_character`
converts: the tokens of :func:`gossip.tools.data.load_python_source` are bytes, nearly all ASCII, so
bits per byte and per character nearly coincide.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


class CausalSelfAttention(nn.Module):
    """Multi-head self-attention in which position t attends to positions 0..t only."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} is not a multiple of heads {heads}")
        self.heads, self.dropout = heads, dropout
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        batch, length, width = h.shape
        q, k, v = (t.view(batch, length, self.heads, width // self.heads).transpose(1, 2)
                   for t in self.qkv(h).split(width, dim=2))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=self.dropout if self.training else 0.0)
        return self.proj(out.transpose(1, 2).reshape(batch, length, width))


class Block(nn.Module):
    """Pre-norm transformer block: h + attention(LN(h)), then h + MLP(LN(h)), the MLP 4x wide."""

    def __init__(self, width: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attention = CausalSelfAttention(width, heads, dropout)
        self.mlp = nn.Sequential(nn.Linear(width, 4 * width), nn.GELU(), nn.Linear(4 * width, width))
        self.drop = nn.Dropout(dropout)

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        h = h + self.drop(self.attention(self.norm1(h)))
        return h + self.drop(self.mlp(self.norm2(h)))


class CharTransformer(nn.Module):
    """Decoder-only transformer over ``vocab_size`` tokens and at most ``context`` positions.

    ``forward(x)``: x int64 of shape (batch, length), length <= context; returns logits of shape
    (batch, length, vocab_size), position t's predicting token t + 1 from tokens 0..t.
    """

    def __init__(self, vocab_size: int, context: int, width: int = 128, layers: int = 2, heads: int = 4,
                 dropout: float = 0.0, seed: int | None = None) -> None:
        super().__init__()
        if vocab_size < 2 or context < 1 or width < 1 or layers < 0 or not 0 <= dropout < 1:
            raise ValueError(f"need vocab_size >= 2, context >= 1, width >= 1, layers >= 0, 0 <= dropout < 1; got "
                             f"{vocab_size}, {context}, {width}, {layers}, {dropout}")
        self.vocab_size, self.context = vocab_size, context
        self.token = nn.Embedding(vocab_size, width)
        self.position = nn.Embedding(context, width)
        self.drop = nn.Dropout(dropout)
        self.blocks = nn.ModuleList(Block(width, heads, dropout) for _ in range(layers))
        self.norm = nn.LayerNorm(width)
        self.head = nn.Linear(width, vocab_size, bias=False)
        self.reset_parameters(seed)

    @torch.no_grad()
    def reset_parameters(self, seed: int | None = None) -> None:
        """GPT-2's initialisation, from ``torch.Generator().manual_seed(seed)`` if a seed is given."""
        generator = torch.Generator().manual_seed(seed) if seed is not None else None
        residual_std = 0.02 / math.sqrt(2 * max(1, len(self.blocks)))
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear | nn.Embedding):
                std = residual_std if name.endswith(("attention.proj", "mlp.2")) else 0.02
                module.weight.copy_(torch.randn(module.weight.shape, generator=generator) * std)
                if getattr(module, "bias", None) is not None:
                    module.bias.zero_()
            elif isinstance(module, nn.LayerNorm):
                module.weight.fill_(1.0)
                module.bias.zero_()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        length = x.shape[1]
        if length > self.context:
            raise ValueError(f"a sequence of {length} tokens is longer than the context {self.context}")
        positions = torch.arange(length, device=x.device)
        h = self.drop(self.token(x) + self.position(positions))
        for block in self.blocks:
            h = block(h)
        return self.head(self.norm(h))


def lm_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy (nats per token) over every position: x, y int64 of shape (batch, length)."""
    logits = model(x)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))


@torch.no_grad()
def validation_loss(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch: int = 256) -> float:
    """Mean cross-entropy (nats per token) over all of x, y (windows, length), ``batch`` windows at a
    time, in eval mode (no dropout; the model's mode is restored)."""
    was_training = model.training
    model.eval()
    total = 0.0
    for i in range(0, len(x), batch):
        logits = model(x[i:i + batch])
        total += float(F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y[i:i + batch].reshape(-1),
                                       reduction="sum"))
    model.train(was_training)
    return total / y.numel()


def bits_per_character(nats: float) -> float:
    """A loss in nats per token as bits per token (per byte; per character for ASCII text)."""
    return nats / math.log(2)
