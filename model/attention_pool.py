"""Attention pooling A (Selfie §2.2): BERT-style Transformer blocks over [u0, h_1..h_n]; u is u0's output.

A block is post-layer-norm, as in BERT: x = LN(x + Drop(SelfAttn(x))); x = LN(x + Drop(W2 GeLU(W1 x))).
Dropout also acts on the attention weights. GeLU is the only non-linearity.

`query` runs the same blocks with several query tokens at once (Selfie's context-conditioned query): each
attends to itself and the context, never to another query, and the context attends only to itself, so
every query's output is what A gives it alone with that context.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn


class SelfAttention(nn.Module):
    def __init__(self, hidden: int, heads: int, dropout: float) -> None:
        super().__init__()
        if hidden % heads:
            raise ValueError(f"attention hidden size {hidden} is not divisible by {heads} heads")
        self.heads = heads
        self.dropout = dropout
        self.qkv = nn.Linear(hidden, 3 * hidden)
        self.proj = nn.Linear(hidden, hidden)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        """`mask` (tokens, tokens) bool, True where row may attend to column; None: every pair."""
        batch, tokens, hidden = x.shape
        q, k, v = self.qkv(x).view(batch, tokens, 3, self.heads, hidden // self.heads).unbind(2)
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2),
            k.transpose(1, 2),
            v.transpose(1, 2),
            attn_mask=mask,
            dropout_p=self.dropout if self.training else 0.0,
        )
        return self.proj(out.transpose(1, 2).reshape(batch, tokens, hidden))


class TransformerBlock(nn.Module):
    def __init__(self, hidden: int, intermediate: int, heads: int, dropout: float) -> None:
        super().__init__()
        self.attn = SelfAttention(hidden, heads, dropout)
        self.norm1 = nn.LayerNorm(hidden)
        self.fc1 = nn.Linear(hidden, intermediate)
        self.fc2 = nn.Linear(intermediate, hidden)
        self.norm2 = nn.LayerNorm(hidden)
        self.drop = nn.Dropout(dropout)

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.norm1(x + self.drop(self.attn(x, mask)))
        return self.norm2(x + self.drop(self.fc2(F.gelu(self.fc1(x)))))


@dataclass(frozen=True)
class PoolShape:
    """The size of an attention pooling A (paper: 3 blocks of 32 heads, feed-forward 640, dropout 0.1)."""

    layers: int = 3  # Transformer blocks
    intermediate: int = 640  # feed-forward size inside each block
    heads: int = 32  # attention heads; must divide the pooled vectors' size
    dropout: float = 0.1  # on attention weights and before each residual

    def build(self, hidden: int) -> AttentionPooling:
        return AttentionPooling(hidden, self.layers, self.intermediate, self.heads, self.dropout)


PAPER_POOL = PoolShape()


class AttentionPooling(nn.Module):
    """(B, n, hidden) -> (B, hidden): a learned u0 token is prepended and its output returned."""

    def __init__(
        self, hidden: int, layers: int = 3, intermediate: int = 640, heads: int = 32, dropout: float = 0.1
    ) -> None:
        super().__init__()
        self.u0 = nn.Parameter(torch.zeros(1, 1, hidden))
        nn.init.trunc_normal_(self.u0, std=0.02)
        self.blocks = nn.Sequential(*(TransformerBlock(hidden, intermediate, heads, dropout) for _ in range(layers)))
        for module in self.blocks.modules():
            if isinstance(module, nn.Linear):
                nn.init.trunc_normal_(module.weight, std=0.02)  # BERT's initializer range
                nn.init.zeros_(module.bias)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        u0 = self.u0.to(tokens.dtype).expand(tokens.shape[0], -1, -1)
        return self.blocks(torch.cat([u0, tokens], dim=1))[:, 0]

    def query(self, tokens: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
        """tokens (B, n, hidden), queries (B, m, hidden) -> (B, m, hidden): the blocks over [queries, tokens]
        in one call, each query attending to itself and the tokens only (see the module docstring)."""
        count, total = queries.shape[1], queries.shape[1] + tokens.shape[1]
        mask = torch.zeros(total, total, dtype=torch.bool, device=tokens.device)
        mask[:, count:] = True  # everyone sees the context
        mask[:count, :count] = torch.eye(count, dtype=torch.bool, device=tokens.device)  # a query sees itself
        mask[count:, :count] = False  # the context never sees a query
        x = torch.cat([queries, tokens], dim=1)
        for block in self.blocks:
            x = block(x, mask)
        return x[:, :count]
