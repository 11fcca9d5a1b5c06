"""SAM's mask decoder run on a batch of images with one prompt each, in one call.

SAM's ``MaskDecoder.predict_masks`` repeats every image embedding once per prompt, so a batch of images has to be
decoded one image at a time; here the i-th prompt belongs to the i-th image and the whole batch runs at once.
"""

from __future__ import annotations

import torch
from torch import nn


def predict_masks(
    decoder: nn.Module,
    embeddings: torch.Tensor,
    image_pe: torch.Tensor,
    sparse: torch.Tensor,
    dense: torch.Tensor,
    num_masks: int,
) -> torch.Tensor:
    """The first ``num_masks`` mask logits (B, num_masks, 4h, 4w) of images ``embeddings`` (B, C, h, w), with
    ``sparse`` (B, N, C) and ``dense`` (B, C, h, w) prompt embeddings from SAM's prompt encoder."""
    batch, channels, height, width = embeddings.shape
    output_tokens = torch.cat([decoder.iou_token.weight, decoder.mask_tokens.weight], dim=0)
    tokens = torch.cat([output_tokens.unsqueeze(0).expand(batch, -1, -1), sparse], dim=1)
    queries, keys = decoder.transformer(embeddings + dense, image_pe.expand(batch, -1, -1, -1), tokens)
    mask_tokens = queries[:, 1 : 1 + num_masks]  # token 0 is the IoU token
    upscaled = decoder.output_upscaling(keys.transpose(1, 2).reshape(batch, channels, height, width))
    hyper = torch.stack(
        [mlp(mask_tokens[:, index]) for index, mlp in enumerate(decoder.output_hypernetworks_mlps[:num_masks])], dim=1
    )
    return (hyper @ upscaled.flatten(2)).view(batch, num_masks, *upscaled.shape[-2:])
