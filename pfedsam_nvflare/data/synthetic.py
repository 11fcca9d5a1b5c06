"""Deterministic synthetic multi-site data in the site layout.

Each site images the same kind of object (a lobed ellipsoid, optionally with a nested inner structure)
through its own "scanner": intensity gamma, contrast (negative: the object is darker than its
surroundings), a smooth multiplicative bias field, noise and blur; and sees its own object statistics
(size, elongation, lobes, position). Personalization has something real to learn; this is not a
benchmark of medical accuracy. Same arguments, same bytes.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import nibabel as nib
import numpy as np
from PIL import Image
from scipy.ndimage import gaussian_filter

from .layout import Labels

FORMATS = {"nifti": ".nii.gz", "png": ".png"}
SITES_FILE = "sites.json"


@dataclass(frozen=True)
class SiteStyle:
    gamma: float  # I ** gamma after contrast; < 1 brightens mid-tones
    contrast: float  # object-to-background contrast; negative inverts it
    bias: float  # strength of the smooth multiplicative bias field
    noise: float  # standard deviation of Gaussian noise, in [0, 1] intensity units
    blur: float  # Gaussian blur sigma in pixels
    radius: float  # mean object radius as a share of the image side
    elongation: float  # ratio of the long to the short axis
    lobes: float  # amplitude of the lobes on the object's outline
    offset: tuple[float, float]  # mean object centre offset (rows, cols) as a share of the side


# The first six sites; further sites draw their style from the seed.
SITE_STYLES = (
    SiteStyle(gamma=1.0, contrast=0.45, bias=0.0, noise=0.02, blur=0.0, radius=0.20, elongation=1.1, lobes=0.05, offset=(0.0, 0.0)),
    SiteStyle(gamma=0.6, contrast=0.30, bias=0.35, noise=0.05, blur=1.2, radius=0.15, elongation=1.6, lobes=0.10, offset=(-0.08, -0.06)),
    SiteStyle(gamma=1.7, contrast=-0.35, bias=0.15, noise=0.07, blur=0.6, radius=0.25, elongation=1.3, lobes=0.20, offset=(0.06, 0.08)),
    SiteStyle(gamma=1.2, contrast=0.20, bias=0.50, noise=0.10, blur=0.0, radius=0.12, elongation=1.0, lobes=0.02, offset=(0.10, -0.10)),
    SiteStyle(gamma=0.8, contrast=-0.25, bias=0.25, noise=0.03, blur=2.0, radius=0.22, elongation=2.0, lobes=0.12, offset=(-0.05, 0.10)),
    SiteStyle(gamma=1.4, contrast=0.55, bias=0.10, noise=0.12, blur=0.8, radius=0.18, elongation=1.4, lobes=0.30, offset=(0.0, -0.12)),
)


def site_style(index: int, seed: int) -> SiteStyle:
    if index < len(SITE_STYLES):
        return SITE_STYLES[index]
    rng = np.random.default_rng([seed, 7919, index])
    return SiteStyle(
        gamma=float(rng.uniform(0.6, 1.7)),
        contrast=float(rng.choice([-1, 1]) * rng.uniform(0.2, 0.55)),
        bias=float(rng.uniform(0.0, 0.5)),
        noise=float(rng.uniform(0.02, 0.12)),
        blur=float(rng.uniform(0.0, 2.0)),
        radius=float(rng.uniform(0.12, 0.25)),
        elongation=float(rng.uniform(1.0, 2.0)),
        lobes=float(rng.uniform(0.02, 0.3)),
        offset=(float(rng.uniform(-0.1, 0.1)), float(rng.uniform(-0.1, 0.1))),
    )


def _smooth_field(rng: np.random.Generator, shape: tuple[int, ...], scale: float) -> np.ndarray:
    """Zero-mean noise smoothed at ``scale`` pixels and scaled to unit peak."""
    field = gaussian_filter(rng.standard_normal(shape), sigma=scale, mode="wrap")
    return field / (np.abs(field).max() + 1e-8)


def _case_volume(style: SiteStyle, rng: np.random.Generator, size: int, depth: int, labels: int):
    """Image in [0, 1] and label map for one case, shape (size, size, depth)."""
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    centre = (0.5 + np.array(style.offset) + rng.normal(0, 0.03, 2)) * size
    radius = style.radius * size * rng.uniform(0.8, 1.2)
    angle, phases = rng.uniform(0, math.pi), rng.uniform(0, 2 * math.pi, 3)
    dy, dx = rows - centre[0], cols - centre[1]
    along = dx * math.cos(angle) + dy * math.sin(angle)
    across = -dx * math.sin(angle) + dy * math.cos(angle)
    distance = np.hypot(along / math.sqrt(style.elongation), across * math.sqrt(style.elongation))
    theta = np.arctan2(across, along)
    outline = 1 + style.lobes * sum(np.cos((k + 2) * theta + phases[k]) / (k + 1) for k in range(3))
    image = np.empty((size, size, depth))
    label_map = np.zeros((size, size, depth), dtype=np.uint8)
    for z in range(depth):
        # an ellipsoid through the slices: the first and last slices may miss the object
        height = 1 - ((z + 0.5 - depth / 2) / (depth / 2 * 0.9)) ** 2 if depth > 1 else 1.0
        slice_radius = radius * math.sqrt(max(height, 0.0))
        inside = distance < slice_radius * outline
        label_map[..., z][inside] = 1
        if labels > 1:
            label_map[..., z][distance < 0.5 * slice_radius * outline] = 2
        tissue = 0.45 + 0.15 * _smooth_field(rng, (size, size), size / 12)
        plane = tissue + style.contrast * (label_map[..., z] > 0) + 0.5 * style.contrast * (label_map[..., z] > 1)
        image[..., z] = plane
    image = np.clip(image, 0, 1)
    if style.bias:
        image = image * (1 + style.bias * _smooth_field(rng, (size, size), size / 3))[..., None]
    image = np.clip(image, 0, 1) ** style.gamma
    if style.blur:
        image = gaussian_filter(image, sigma=(style.blur, style.blur, 0))
    image = np.clip(image + rng.normal(0, style.noise, image.shape), 0, 1)
    return image, label_map


def make_sites(
    out: str | Path, *, sites: int = 3, cases: int = 6, size: int = 128, depth: int = 8, seed: int = 0,
    fmt: str = "nifti", labels: int = 1,
) -> list[str]:
    """Write ``sites`` sites of ``cases`` cases each under ``out``; returns the site names.

    ``nifti`` writes int16 volumes of ``depth`` slices (MRI-like intensities); ``png`` writes 8-bit 2D images
    (one slice per case). ``labels=2`` adds a nested inner structure (as a cup inside a disc).
    """
    if fmt not in FORMATS:
        raise ValueError(f"format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if sites < 1 or cases < 1 or size < 16 or depth < 1 or labels not in (1, 2):
        raise ValueError("need sites >= 1, cases >= 1, size >= 16, depth >= 1 and labels 1 or 2")
    out = Path(out)
    depth = 1 if fmt == "png" else depth
    extension = FORMATS[fmt]
    names = [f"site-{index + 1}" for index in range(sites)]
    described = {}
    for index, name in enumerate(names):
        style = site_style(index, seed)
        described[name] = asdict(style)
        for folder in ("images", "masks"):
            (out / name / folder).mkdir(parents=True, exist_ok=True)
        for case in range(cases):
            rng = np.random.default_rng([seed, index, case])
            image, label_map = _case_volume(style, rng, size, depth, labels)
            stem = f"case{case + 1:03d}"
            if fmt == "png":
                Image.fromarray(np.round(image[..., 0] * 255).astype(np.uint8)).save(out / name / "images" / f"{stem}.png")
                Image.fromarray(label_map[..., 0]).save(out / name / "masks" / f"{stem}.png")
            else:
                affine = np.diag([0.8, 0.8, 3.0, 1.0])  # mm: in-plane 0.8, slices 3.0, as a prostate MRI
                raw = np.round(image * 1200 + 50).astype(np.int16)
                nib.save(nib.Nifti1Image(raw, affine), out / name / "images" / f"{stem}{extension}")
                nib.save(nib.Nifti1Image(label_map, affine), out / name / "masks" / f"{stem}{extension}")
    Labels(("foreground",) if labels == 1 else ("outer", "inner"), nested=labels > 1).write(out)
    (out / SITES_FILE).write_text(json.dumps({"seed": seed, "sites": described}, indent=2) + "\n")
    return names
