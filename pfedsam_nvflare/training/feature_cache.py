"""The model inputs of a site's samples on disk: the frozen encoder prefix of each image (or the image itself where
nothing is frozen) and its mask, one file per sample, read back batch by batch.

A folder holds the entries of one setting: it is named by everything that decides an entry (the weights of the
frozen prefix, where the prefix ends, the input size, the precision it is computed in and stored in); a file is named by the sample's own
content (image and mask). A changed image, mask or model setting therefore never meets a stale entry, and entries
of the same setting are reused by the next job of the site.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import torch

from ..atomic import atomic_save
from ..model import PFedSAM
from .compute import autocast

CACHE_FORMAT = "pfedsam_nvflare.feature_cache/1"
CACHE_DTYPES = {"float16": torch.float16, "float32": torch.float32}


def _update(digest: "hashlib._Hash", tensor: torch.Tensor) -> None:
    tensor = tensor.detach().cpu().contiguous()
    digest.update(f"{tensor.dtype}:{tuple(tensor.shape)}:".encode())
    digest.update(tensor.reshape(-1).view(torch.uint8).numpy().tobytes())  # 0-dim buffers too (batch-norm counts)


def setting_digest(model: PFedSAM, end: int, dtype: str, compute_dtype: torch.dtype = torch.float32) -> str:
    """The fingerprint of what decides an entry: the frozen weights and buffers of the first ``end`` encoder
    steps, the pixel normalisation, the input size, the precision the prefix is computed in and the stored one."""
    computed = f":{compute_dtype}" if end and compute_dtype != torch.float32 else ""
    digest = hashlib.sha256(f"{CACHE_FORMAT}:{model.image_size}:{end}:{dtype}{computed}".encode())
    for tensor in (model.pixel_mean, model.pixel_std):
        _update(digest, tensor)
    for step in model.encoder_steps[:end]:
        for name, tensor in step.state_dict().items():
            digest.update(name.encode())
            _update(digest, tensor)
    return digest.hexdigest()


def content_key(image: torch.Tensor, mask: torch.Tensor) -> str:
    digest = hashlib.sha256()
    _update(digest, image.float())
    _update(digest, mask.to(torch.uint8))
    return digest.hexdigest()


class FeatureCache:
    """Entries ``{"inputs", "mask"}`` under ``root/<setting digest>``: ``inputs`` is ``model.encode_prefix`` of
    the image up to step ``end`` (``end = 0``: the image itself) computed under autocast in ``compute_dtype``,
    stored as ``dtype``; ``mask`` as uint8."""

    def __init__(
        self,
        root: str | Path,
        model: PFedSAM,
        end: int,
        dtype: str = "float16",
        compute_dtype: torch.dtype = torch.float32,
    ) -> None:
        if dtype not in CACHE_DTYPES:
            raise ValueError(f"cache dtype must be one of {', '.join(CACHE_DTYPES)}, got {dtype!r}")
        self.model, self.end, self.dtype, self.compute_dtype = model, end, CACHE_DTYPES[dtype], compute_dtype
        self.folder = Path(root) / setting_digest(model, end, dtype, compute_dtype)[:24]

    def path(self, key: str) -> Path:
        return self.folder / key[:2] / f"{key}.pt"

    def has(self, key: str) -> bool:
        return self.path(key).is_file()

    @torch.no_grad()
    def store(self, keys: list[str], images: torch.Tensor, masks: torch.Tensor) -> None:
        """Compute and write the entries of ``images`` (B, C, S, S) in [0, 1] and their ``masks``."""
        device = self.model.pixel_mean.device
        if self.end:
            with autocast(device, self.compute_dtype):
                inputs = self.model.encode_prefix(images.to(device), self.end).float().cpu()
        else:
            inputs = images
        for key, entry_inputs, mask in zip(keys, inputs, masks):
            payload = {"format": CACHE_FORMAT, "inputs": entry_inputs.to(self.dtype).clone(), "mask": mask.to(torch.uint8).clone()}
            atomic_save(payload, self.path(key))

    def load(self, key: str) -> tuple[torch.Tensor, torch.Tensor]:
        """The inputs (float32) and mask (float32 of 0/1) of one entry."""
        path = self.path(key)
        try:
            payload = torch.load(path, map_location="cpu", weights_only=True)
            inputs, mask = payload["inputs"], payload["mask"]
        except FileNotFoundError:
            raise FileNotFoundError(f"feature cache entry {path} is missing; was the cache folder removed during training?") from None
        except Exception as error:
            raise ValueError(f"feature cache entry {path} is unreadable ({type(error).__name__}: {error}); delete {self.folder} to rebuild it") from error
        return inputs.float(), mask.float()
