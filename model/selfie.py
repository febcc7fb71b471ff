"""Selfie (Trinh, Luong, Le 2019): patch network P, attention pooling A, positional embeddings, the loss.

Forward, for a group-major patch tensor (see `pipeline.patches`):
  h = P(all patches)                      one call, (B * N, D)
  u = A(h_context + pos(context))         (B, D); the position term can be switched off
  v_j = u + pos(j)                        for every masked position j of the image
  logits[b, j, k] = s * v_j . h_k         over the masked patches k of the *same* image (s = 1, the
                                          paper's; or 1/sqrt(D); or learned; or 1/sqrt(D)
                                          rising to 1 over the first training steps)
  loss = cross-entropy(logits, k = j), averaged over all masked positions of the batch.

The query v_j above is the paper's (`query="paper"`). Its u term is the same for every masked slot of an
image, so it adds the same u.h_k to every slot's logit for patch k and cannot say which patch goes where:
the task reduces to each patch's absolute position. `query="attend"` produces each slot's query by
attention over the context instead: A runs with one query token u0 + pos(j) per masked slot (queries
attend to themselves and the context, not to each other, in one call), so the context can decide which
patch fills which slot. Both are `queries(encode_context(...))`, which the context ablation reuses.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from model.attention_pool import PAPER_POOL, PoolShape
from model.backbones import build_backbone
from pipeline.patches import split_context_masked

POSITION_KINDS = ("auto", "full", "rowcol")
# How the patch-selection logits are scaled: plain v.h (the paper's), by 1/sqrt(D) (dot-product attention's
# scale, logits of unit order at any width), or by a learned temperature that starts at 1/sqrt(D).
LOGIT_SCALES = ("plain", "sqrt_d", "learned", "warmup")
QUERY_KINDS = ("paper", "attend")  # v_j = u + pos(j) | A over the context with one u0 + pos(j) token per slot
# `warmup` keeps the paper's plain logits after a start at 1/sqrt(D) (against the plain logits' early blow-up).
# Grids up to this side learn one vector per position (4x4 on 32x32 images, paper §2.2); larger
# grids learn row + column vectors (7 + 7 on 224x224 instead of 49).
FULL_POSITION_MAX_GRID = 4


@dataclass(frozen=True)
class LogitScale:
    """How the patch-selection logits are scaled (a plain kind name also does where `warmup` is not used)."""

    kind: str = "plain"  # one of LOGIT_SCALES
    warmup: int = 500  # kind "warmup": training forwards from 1/sqrt(D) to the paper's plain logits


class PositionEmbedding(nn.Module):
    """Learned embeddings of row-major grid positions: (...) int64 -> (..., D)."""

    def __init__(self, grid: int, dim: int, kind: str = "auto") -> None:
        super().__init__()
        if kind not in POSITION_KINDS:
            raise ValueError(f"position embedding kind must be one of {POSITION_KINDS}, got {kind!r}")
        if kind == "auto":
            kind = "full" if grid <= FULL_POSITION_MAX_GRID else "rowcol"
        self.grid = grid
        self.kind = kind
        if kind == "full":
            self.table = nn.Parameter(torch.empty(grid * grid, dim))
        else:
            self.rows = nn.Parameter(torch.empty(grid, dim))
            self.cols = nn.Parameter(torch.empty(grid, dim))
        for param in self.parameters():
            nn.init.trunc_normal_(param, std=0.02)

    def forward(self, positions: torch.Tensor) -> torch.Tensor:
        if self.kind == "full":
            return self.table[positions]
        return self.rows[positions // self.grid] + self.cols[positions % self.grid]


class SelfieOutput(NamedTuple):
    loss: torch.Tensor  # scalar, mean cross-entropy over all masked positions of the batch
    accuracy: torch.Tensor  # scalar, fraction of masked positions whose own patch scores highest
    logits: torch.Tensor  # (B, Nm, Nm) fp32: row j = query of masked slot j, column k = candidate patch k


def patch_selection_loss(
    queries: torch.Tensor, candidates: torch.Tensor, scale: torch.Tensor | float | None = None
) -> SelfieOutput:
    """queries v (B, Nm, D), candidates h (B, Nm, D), both in masked-slot order -> loss and accuracy;
    `scale` multiplies the logits (None: the plain dot product).

    Computed in fp32 whatever the autocast state: the logits are a tiny batched matmul, and
    full-precision softmax keeps the loss exact under bf16/fp16 training.
    """
    with torch.autocast(device_type=queries.device.type, enabled=False):
        logits = torch.bmm(queries.float(), candidates.float().transpose(1, 2))
        if scale is not None:
            logits = logits * scale
    batch, num_masked, _ = logits.shape
    targets = torch.arange(num_masked, device=logits.device).expand(batch, num_masked)
    loss = F.cross_entropy(logits.reshape(-1, num_masked), targets.reshape(-1))
    accuracy = (logits.argmax(dim=-1) == targets).float().mean()
    return SelfieOutput(loss, accuracy, logits)


class Selfie(nn.Module):
    def __init__(
        self,
        patch_net: nn.Module,
        grid: int,
        pool: PoolShape = PAPER_POOL,
        position_kind: str = "auto",
        position_on_context: bool = True,
        logit_scale: str | LogitScale = "plain",
        query: str = "paper",
    ) -> None:
        super().__init__()
        logit_scale, logit_warmup = (
            (logit_scale.kind, logit_scale.warmup) if isinstance(logit_scale, LogitScale) else (logit_scale, 1)
        )
        if logit_scale not in LOGIT_SCALES:
            raise ValueError(f"logit scale must be one of {LOGIT_SCALES}, got {logit_scale!r}")
        if query not in QUERY_KINDS:
            raise ValueError(f"query kind must be one of {QUERY_KINDS}, got {query!r}")
        self.query_kind = query
        self.patch_net = patch_net
        dim = patch_net.num_features
        self.position = PositionEmbedding(grid, dim, position_kind)
        self.pool = pool.build(dim)
        self.position_on_context = position_on_context
        self.logit_scale_kind = logit_scale
        if logit_scale == "learned":  # log of the scale, so it stays positive; no weight decay (a scalar)
            self.log_logit_scale = nn.Parameter(torch.tensor(-0.5 * math.log(dim)))
        self.fixed_scale = dim**-0.5 if logit_scale == "sqrt_d" else None
        # training forwards seen, a buffer: it resumes, and a CUDA graph replays it. The graph's few warm-up
        # forwards before its capture advance it too, but the capture puts every buffer back as it was
        # (train/engine/step.py, TrainingSnapshot), so they do not count
        if logit_scale == "warmup":
            if logit_warmup < 1:
                raise ValueError(f"logit warm-up must be a positive number of forwards, got {logit_warmup}")
            self.register_buffer("logit_warmup_seen", torch.zeros(()))
            self.logit_warmup, self.start_scale = logit_warmup, dim**-0.5

    @property
    def backbone(self) -> nn.Module:
        """P, under the name every pretext model gives the network fine-tuning reuses (its state-dict names
        stay patch_net.*, as every Selfie checkpoint holds them)."""
        return self.patch_net

    def logit_scale(self) -> torch.Tensor | float | None:
        if self.logit_scale_kind == "learned":
            return self.log_logit_scale.float().exp()
        if self.logit_scale_kind == "warmup":  # 1/sqrt(D) rising linearly to 1, the paper's, then kept
            progress = (self.logit_warmup_seen / self.logit_warmup).clamp(max=1.0)
            return self.start_scale + (1.0 - self.start_scale) * progress
        return self.fixed_scale

    def forward_features(self, patches: torch.Tensor) -> torch.Tensor:
        """(M, C, p, p) -> (M, D): P, then spatial average pooling (any patches, of any number of images)."""
        return self.patch_net.forward_features(patches).mean(dim=(2, 3))

    def forward_head(self, features: torch.Tensor, context_pos: torch.Tensor, masked_pos: torch.Tensor) -> SelfieOutput:
        """features (B * N, D) of a group-major patch tensor; context_pos (B, Nc), masked_pos (B, Nm) int64:
        A pools the context, each masked position's query picks among the image's masked patches."""
        context, masked = self.encode_context(features, context_pos)
        output = patch_selection_loss(self.queries(context, masked_pos), masked, self.logit_scale())
        if self.logit_scale_kind == "warmup" and self.training:  # monitors (eval mode) do not advance it
            self.logit_warmup_seen.add_(1)
        return output

    def encode_context(self, features: torch.Tensor, context_pos: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(what the queries read of the context, the masked patches' features (B, Nm, D)). What they read
        is u (B, D) for the paper's query, the context tokens (B, Nc, D) for the attending one."""
        batch, num_context = context_pos.shape
        context, masked = split_context_masked(features, batch, num_context)
        if self.position_on_context:
            context = context + self.position(context_pos).to(context.dtype)
        return (self.pool(context) if self.query_kind == "paper" else context), masked

    def queries(self, context: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """The query of every slot in `positions` (B, M) from `encode_context`'s first output: (B, M, D)."""
        if self.query_kind == "paper":
            return context.unsqueeze(1) + self.position(positions).to(context.dtype)
        seeds = self.pool.u0.to(context.dtype) + self.position(positions).to(context.dtype)
        return self.pool.query(context, seeds)

    def forward(self, patches: torch.Tensor, context_pos: torch.Tensor, masked_pos: torch.Tensor) -> SelfieOutput:
        """patches (B * N, C, p, p) group-major; context_pos (B, Nc) and masked_pos (B, Nm) int64."""
        return self.forward_head(self.forward_features(patches), context_pos, masked_pos)


def build_selfie(
    width: float = 1.0, stem: str = "small", grid: int = 4, backbone: str = "resnet36", **kwargs
) -> Selfie:
    """Selfie with P = `backbone` (paper: resnet36, ResNet-36 v2 at width 1, 1024-d patch vectors; A of 3
    blocks, 32 heads). `kwargs` go to `Selfie` (A's `PoolShape`, position embeddings, logit scale, query)."""
    return Selfie(build_backbone(backbone, width, stem), grid, **kwargs)
