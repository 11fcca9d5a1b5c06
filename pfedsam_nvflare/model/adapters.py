"""Low-rank adapters around a frozen linear layer.

``y = W x + s·B A x + Σ_e g_e(x) · s_e·B_e A_e x``: the global LoRA (``LowRankAdapter``) is shared by all
sites, the mixture of LoRA experts with its router (``ExpertMixture``, the L-MoE) stays at its site.
Both start with ``B = 0`` so an adapted model begins exactly where the pretrained one is.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn


def _kaiming_(weight: torch.Tensor) -> torch.Tensor:
    return nn.init.kaiming_uniform_(weight, a=math.sqrt(5))


class LowRankAdapter(nn.Module):
    """``s·B A x`` with rank ``rank`` and scale ``alpha / rank``."""

    def __init__(self, in_features: int, out_features: int, rank: int, alpha: float) -> None:
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be at least 1, got {rank}")
        self.scale = alpha / rank
        self.down = nn.Parameter(_kaiming_(torch.empty(rank, in_features)))
        self.up = nn.Parameter(torch.zeros(out_features, rank))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(F.linear(x, self.down), self.up) * self.scale


class ExpertMixture(nn.Module):
    """The L-MoE: ``num_experts`` LoRA experts weighted by a router on the token mean of the input.

    The router sees one vector per sequence (an image, or a window of one in windowed attention), so every
    token of that sequence is routed alike. With ``top_k`` only the k best experts are mixed, their gates
    renormalised. ``balance_loss`` holds the load-balancing term of the last forward pass.
    """

    def __init__(
        self, in_features: int, out_features: int, num_experts: int, rank: int, alpha: float, top_k: int | None
    ) -> None:
        super().__init__()
        if num_experts < 1 or rank < 1:
            raise ValueError(f"an expert mixture needs at least one expert of rank 1, got {num_experts} of {rank}")
        if top_k is not None and not 1 <= top_k <= num_experts:
            raise ValueError(f"top_k must be between 1 and {num_experts}, got {top_k}")
        self.num_experts, self.rank, self.top_k = num_experts, rank, top_k
        self.scale = alpha / rank
        self.router = nn.Linear(in_features, num_experts)
        self.down = nn.Parameter(torch.stack([_kaiming_(torch.empty(rank, in_features)) for _ in range(num_experts)]))
        self.up = nn.Parameter(torch.zeros(num_experts, out_features, rank))
        self.balance_loss: torch.Tensor | None = None

    def gates(self, x: torch.Tensor) -> torch.Tensor:
        """Expert weights (N, E) for input (N, ..., C)."""
        logits = self.router(x.flatten(1, -2).mean(dim=1))
        if self.top_k is not None and self.top_k < self.num_experts:
            kept = logits.topk(self.top_k, dim=-1).indices
            mask = torch.full_like(logits, float("-inf")).scatter(-1, kept, 0.0)
            logits = logits + mask
        return logits.softmax(dim=-1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gates = self.gates(x)
        self.balance_loss = self._balance(gates)
        hidden = F.linear(x, self.down.reshape(-1, self.down.shape[-1]))  # (N, ..., E*r)
        hidden = hidden.unflatten(-1, (self.num_experts, self.rank))
        hidden = hidden * gates.reshape(gates.shape[0], *([1] * (x.dim() - 2)), self.num_experts, 1)
        up = self.up.permute(1, 0, 2).reshape(self.up.shape[1], -1)  # (out, E*r)
        return F.linear(hidden.flatten(-2), up) * self.scale

    def _balance(self, gates: torch.Tensor) -> torch.Tensor:
        """Switch-Transformer load balancing: E · Σ_e (share of sequences whose top expert is e) · (mean gate e)."""
        top = F.one_hot(gates.argmax(dim=-1), self.num_experts).float()
        return self.num_experts * (top.mean(dim=0) * gates.mean(dim=0)).sum()


class AdaptedLinear(nn.Module):
    """A frozen ``nn.Linear`` plus a global adapter and, optionally, local experts.

    ``use_experts`` switches between the personalized path (all terms) and the global-only path.
    """

    def __init__(self, base: nn.Linear, adapter: LowRankAdapter | None, experts: ExpertMixture | None) -> None:
        super().__init__()
        self.base, self.adapter, self.experts = base, adapter, experts
        self.use_experts = True

    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.base(x)
        if self.adapter is not None:
            y = y + self.adapter(x)
        if self.experts is not None and self.use_experts:
            y = y + self.experts(x)
        return y
