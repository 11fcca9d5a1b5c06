"""The pFedSAM model: a frozen SAM backbone with a global partition (LoRA, decoder part, no-prompt
embedding) and a local partition (the L-MoE experts and routers), segmenting without prompts by default."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, fields
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .adapters import AdaptedLinear, ExpertMixture, LowRankAdapter
from .backbones import BACKBONES, Backbone, build_backbone, encoder_steps
from .decoder import predict_masks

PROMPT_MODES = ("none", "box")
# The model's two paths: with the site's own part (its experts, or Ditto's personal copy), and the global part alone.
PATHS = ("personalized", "global")
DECODER_MODES = ("full", "lora", "frozen")
# The decoder layers that ``decoder="lora"`` adapts: attention projections and MLP layers of its transformer.
DECODER_LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "out_proj", "lin1", "lin2")
EXPERT_SEED_OFFSET = 7919  # the experts' stream: seed + this, apart from the global adapters' stream (seed)


@dataclass(frozen=True)
class ModelConfig:
    """Everything that decides the model's architecture and its initial weights.

    ``num_experts = 0`` removes the L-MoE (FedAvg with LoRA); ``full_finetune`` trains every SAM weight and
    adds no adapters (the FedSAM baseline). ``adapted_blocks`` adapts only that many of the last encoder
    attention blocks (all when ``None``); everything before them is frozen and can be cached.
    ``decoder_experts`` puts L-MoE experts beside the decoder's LoRA too (``decoder="lora"`` only).
    """

    backbone: str = "lite_medsam"
    checkpoint: str | None = None
    num_labels: int = 1
    prompt: str = "none"
    decoder: str = "full"
    lora_rank: int = 4
    lora_alpha: float = 4.0
    num_experts: int = 4
    expert_rank: int = 4
    expert_alpha: float = 4.0
    top_k: int | None = None
    adapted_blocks: int | None = None
    decoder_experts: bool = False
    full_finetune: bool = False
    seed: int = 0

    def __post_init__(self) -> None:
        if self.backbone not in BACKBONES:
            raise ValueError(f"unknown backbone {self.backbone!r}; choose one of {', '.join(BACKBONES)}")
        if self.prompt not in PROMPT_MODES:
            raise ValueError(f"prompt must be one of {PROMPT_MODES}, got {self.prompt!r}")
        if self.decoder not in DECODER_MODES:
            raise ValueError(f"decoder must be one of {DECODER_MODES}, got {self.decoder!r}")
        if self.num_labels < 1:
            raise ValueError(f"num_labels must be at least 1, got {self.num_labels}")
        if self.num_experts < 0:
            raise ValueError(f"num_experts must be 0 (no L-MoE) or more, got {self.num_experts}")
        if self.num_experts and self.top_k is not None and not 1 <= self.top_k <= self.num_experts:
            raise ValueError(f"top_k must be between 1 and num_experts={self.num_experts}, got {self.top_k}")
        if self.decoder_experts and self.decoder != "lora":
            raise ValueError(f"decoder_experts needs decoder='lora', got decoder={self.decoder!r}")
        if self.adapted_blocks is not None and self.adapted_blocks < 1:
            raise ValueError(f"adapted_blocks must be at least 1 or None (all), got {self.adapted_blocks}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, values: dict[str, Any]) -> ModelConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(values) - known
        if unknown:
            raise ValueError(f"unknown model settings: {', '.join(sorted(unknown))}")
        return cls(**values)


class PFedSAM(nn.Module):
    """SAM with adapters. ``forward`` takes images in [0, 1] of shape (B, 1 or 3, S, S) and returns
    logits (B, num_labels, S, S); label k is read from SAM's k-th mask token."""

    def __init__(self, backbone: Backbone, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.backbone_name = backbone.name
        self.image_size = backbone.image_size
        self.sam = backbone.sam
        self.register_buffer("pixel_mean", torch.tensor(backbone.pixel_mean).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("pixel_std", torch.tensor(backbone.pixel_std).view(1, 3, 1, 1), persistent=False)
        num_tokens = self.sam.mask_decoder.num_mask_tokens
        if config.num_labels > num_tokens:
            raise ValueError(f"{backbone.name} has {num_tokens} mask tokens; num_labels={config.num_labels} is too many")
        with torch.random.fork_rng(devices=[]):
            # The global adapters and the experts draw from two streams, so that the global partition a
            # federation starts from is the same whatever the L-MoE's size or place.
            torch.manual_seed(config.seed)
            encoder = [] if config.full_finetune else self._adapt_encoder()
            decoder = self._adapt_decoder() if config.decoder == "lora" and not config.full_finetune else []
            self.adapted = encoder + decoder
            torch.manual_seed(config.seed + EXPERT_SEED_OFFSET)
            if config.num_experts:
                for layer in encoder + (decoder if config.decoder_experts else []):
                    layer.experts = ExpertMixture(
                        layer.in_features, layer.out_features, config.num_experts, config.expert_rank,
                        config.expert_alpha, config.top_k,
                    )
        self._steps = encoder_steps(self.sam.image_encoder)  # a plain list: the steps' weights belong to self.sam
        trainable = [*self.global_parameters(), *self.local_parameters()]
        self.requires_grad_(False)
        for parameter in trainable:
            parameter.requires_grad_(True)
        self.cache_start = self._first_step_holding(trainable)
        self.train(False)

    def _adapt_encoder(self) -> list[AdaptedLinear]:
        attentions = [m for m in self.sam.image_encoder.modules() if isinstance(getattr(m, "qkv", None), nn.Linear)]
        if self.config.adapted_blocks is not None:
            if self.config.adapted_blocks > len(attentions):
                raise ValueError(
                    f"adapted_blocks={self.config.adapted_blocks} but {self.backbone_name} has {len(attentions)} "
                    "attention blocks"
                )
            attentions = attentions[-self.config.adapted_blocks :]
        for attention in attentions:
            attention.qkv = self._adapted(attention.qkv)
        return [attention.qkv for attention in attentions]

    def _adapted(self, linear: nn.Linear) -> AdaptedLinear:
        """``linear`` with a global LoRA; the experts are added after every adapter is drawn."""
        adapter = LowRankAdapter(linear.in_features, linear.out_features, self.config.lora_rank, self.config.lora_alpha)
        return AdaptedLinear(linear, adapter, None)

    def _adapt_decoder(self) -> list[AdaptedLinear]:
        adapted = []
        for module in list(self.sam.mask_decoder.transformer.modules()):
            for name in DECODER_LINEAR_NAMES:
                linear = getattr(module, name, None)
                if isinstance(linear, nn.Linear):
                    setattr(module, name, self._adapted(linear))
                    adapted.append(getattr(module, name))
        return adapted

    # --- the partition's two trainable sets (named by ``Partition``) ---

    def global_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters shared by all sites and averaged every round."""
        if self.config.full_finetune:
            yield from self.sam.parameters()
            return
        for module in self.modules():
            if isinstance(module, LowRankAdapter):
                yield from module.parameters()
        prompt_encoder = self.sam.prompt_encoder
        yield prompt_encoder.no_mask_embed.weight
        if self.config.prompt == "box":
            yield prompt_encoder.point_embeddings[2].weight  # the two box-corner embeddings
            yield prompt_encoder.point_embeddings[3].weight
        if self.config.decoder == "full":
            yield from self.sam.mask_decoder.parameters()

    def local_parameters(self) -> Iterator[nn.Parameter]:
        """Parameters that never leave their site: the experts and routers of the L-MoE."""
        for module in self.modules():
            if isinstance(module, ExpertMixture):
                yield from module.parameters()

    @property
    def has_experts(self) -> bool:
        return any(adapted.experts is not None for adapted in self.adapted)

    # --- modes ---

    def train(self, mode: bool = True) -> PFedSAM:
        """Batch-norm statistics of the backbone stay frozen: fine-tuning batches are too small to estimate them.

        Calling this also refreshes mode-dependent caches (TinyViT caches attention biases in eval mode), so it
        is called again after weights are loaded.
        """
        super().train(mode)
        for module in self.modules():
            if isinstance(module, nn.modules.batchnorm._BatchNorm):
                module.eval()
        return self

    @contextmanager
    def global_only(self) -> Iterator[None]:
        """Run the global-only path (no experts), the model every site shares."""
        previous = [adapted.use_experts for adapted in self.adapted]
        for adapted in self.adapted:
            adapted.use_experts = False
        try:
            yield
        finally:
            for adapted, flag in zip(self.adapted, previous):
                adapted.use_experts = flag

    def balance_loss(self) -> torch.Tensor:
        """The L-MoE load-balancing loss of the last forward pass (0 on the global-only path)."""
        losses = [a.experts.balance_loss for a in self.adapted if a.experts is not None and a.experts.balance_loss is not None]
        return torch.stack(losses).mean() if losses else torch.zeros((), device=self.pixel_mean.device)

    # --- forward ---

    @property
    def encoder_steps(self) -> list[nn.Module]:
        """The image encoder as a sequence of steps (``encoder_steps``); the first ``cache_start`` are frozen."""
        return self._steps

    def _first_step_holding(self, parameters: list[nn.Parameter]) -> int:
        """Index of the first encoder step holding one of ``parameters``: ``cache_start``, before which nothing
        is ever trained, so its output can be cached."""
        wanted = {id(p) for p in parameters}
        for index, step in enumerate(self._steps):
            if any(id(p) in wanted for p in step.parameters()):
                return index
        return len(self._steps)

    def encode_prefix(self, images: torch.Tensor, end: int | None = None) -> torch.Tensor:
        """Normalise the images and run the frozen encoder steps before ``end`` (``cache_start`` by default)."""
        if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[-2:] != (self.image_size,) * 2:
            raise ValueError(
                f"{self.backbone_name} expects images of shape (B, 1 or 3, {self.image_size}, {self.image_size}), "
                f"got {tuple(images.shape)}"
            )
        x = (images.expand(-1, 3, -1, -1) - self.pixel_mean) / self.pixel_std
        for step in self._steps[: self.cache_start if end is None else end]:
            x = step(x)
        return x

    def forward(
        self, images: torch.Tensor | None = None, boxes: torch.Tensor | None = None, prefix: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Segment ``images``, or continue from ``prefix`` = ``encode_prefix(images)`` computed earlier."""
        for adapted in self.adapted:
            if adapted.experts is not None:
                adapted.experts.balance_loss = None
        start = self.cache_start
        x = self.encode_prefix(images, start) if prefix is None else prefix
        for step in self._steps[start:]:
            x = step(x)
        return self._decode(x, boxes)

    def _decode(self, embeddings: torch.Tensor, boxes: torch.Tensor | None) -> torch.Tensor:
        if (boxes is None) != (self.config.prompt == "none"):
            raise ValueError(f"prompt mode {self.config.prompt!r} {'needs' if boxes is None else 'takes no'} boxes")
        prompt_encoder = self.sam.prompt_encoder
        batch = embeddings.shape[0]
        sparse, dense = prompt_encoder(points=None, boxes=boxes, masks=None)  # batch 1 without boxes
        logits = predict_masks(
            self.sam.mask_decoder,
            embeddings,
            prompt_encoder.get_dense_pe(),
            sparse.expand(batch, -1, -1),
            dense.expand(batch, -1, -1, -1),
            self.config.num_labels,
        )
        if logits.shape[-1] != self.image_size:
            logits = F.interpolate(logits, size=(self.image_size, self.image_size), mode="bilinear", align_corners=False)
        return logits


def build_pfedsam(config: ModelConfig) -> PFedSAM:
    return PFedSAM(build_backbone(config.backbone, config.checkpoint), config)
