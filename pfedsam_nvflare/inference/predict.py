"""``pfedsam predict``: a kept model segments new scans, each written back as a label map in the scan's own
geometry (shape, affine, spacing), with the label values of ``dataset.json``.

NIfTI, NRRD and DICOM series are written as NIfTI (``<name>_seg.nii.gz``, through MONAI's NIfTI writer, the
scan's affine as MONAI read it); PNG as PNG (``<name>_seg.png``). A folder is searched for scans; a folder holding
``.dcm`` files is one DICOM series.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from monai.data import NibabelWriter
from PIL import Image
from tqdm import tqdm

from ..data.layout import EXTENSIONS, DataError, Labels
from ..data.reading import is_dicom_series, read_volume
from ..model.kept import load_kept_model
from .segment import Segmenter

SUFFIX = "_seg"


def find_scans(path: str | Path) -> list[Path]:
    """The scans under ``path``: the file itself, the DICOM series it is, or every supported file and DICOM series
    folder below it, in name order."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input {path} does not exist")
    if path.is_file() or is_dicom_series(path):
        if path.is_file() and not path.name.endswith(EXTENSIONS):
            raise DataError(f"{path}: unsupported file type; use one of {', '.join(EXTENSIONS)} or a DICOM series folder")
        return [path]
    scans = []
    for candidate in sorted(path.rglob("*")):
        if candidate.is_file() and candidate.name.endswith(EXTENSIONS) and not candidate.name.startswith("."):
            scans.append(candidate)
        elif candidate.is_dir() and is_dicom_series(candidate):
            scans.append(candidate)
    if not scans:
        raise DataError(f"no scans in {path}: expected {', '.join(EXTENSIONS)} files or folders of .dcm files")
    return scans


def output_path(scan: Path, root: Path, out: Path) -> Path:
    """Where the label map of ``scan`` goes: its place below ``root`` repeated below ``out``, named ``<name>_seg``
    with ``.png`` for PNG and ``.nii.gz`` for everything else."""
    relative = scan.relative_to(root) if scan != root else Path(scan.name)
    name = relative.name
    stem = next((name[: -len(ext)] for ext in EXTENSIONS if name.endswith(ext)), name)
    extension = ".png" if name.endswith(".png") else ".nii.gz"
    return out / relative.parent / f"{stem}{SUFFIX}{extension}"


def write_label_map(label_map: np.ndarray, affine: np.ndarray | None, path: Path) -> Path:
    """A label map (*spatial) as PNG (2D, no affine) or as NIfTI with ``affine``."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.name.endswith(".png"):
        Image.fromarray(label_map.astype(np.uint8)).save(path)
        return path
    writer = NibabelWriter(output_dtype=np.uint8)
    writer.set_data_array(label_map, channel_dim=None)
    writer.set_metadata({"affine": affine, "original_affine": affine}, resample=False)
    writer.write(str(path), verbose=False)
    return path


@dataclass
class Prediction:
    scan: Path
    output: Path
    shape: tuple[int, ...]
    planes: int
    labels_found: list[int]


@dataclass
class PredictionRun:
    model: Path
    path: str
    outputs: list[Prediction] = field(default_factory=list)
    seconds: float = 0.0

    def summary(self, out: Path) -> str:
        planes = sum(p.planes for p in self.outputs)
        lines = [f"{p.scan} -> {p.output} ({'x'.join(map(str, p.shape))}, labels {p.labels_found})" for p in self.outputs]
        lines.append(
            f"segmented {len(self.outputs)} scan(s), {planes} slice(s) in {self.seconds:.1f} s with the {self.path} "
            f"model of {self.model}; label maps in {out}"
        )
        return "\n".join(lines)


def predict(
    model_file: str | Path,
    inputs: str | Path,
    out: str | Path,
    *,
    global_only: bool = False,
    device: str = "auto",
    batch_size: int = 4,
    progress: bool = True,
) -> PredictionRun:
    """Segment every scan of ``inputs`` with the kept model in ``model_file`` (its personalized path, or with
    ``global_only`` the shared model) and write one label map per scan below ``out``. An output that would replace
    one of the scans is refused before anything is written."""
    if batch_size < 1:
        raise ValueError(f"--batch-size must be at least 1, got {batch_size}")
    began = time.perf_counter()
    kept = load_kept_model(model_file)
    root, out = Path(inputs), Path(out)
    scans = find_scans(root)
    root = root if root.is_dir() and not is_dicom_series(root) else root.parent
    targets = {scan: output_path(scan, root, out) for scan in scans}
    sources = {scan.resolve() for scan in scans}
    clashes = [str(target) for target in targets.values() if target.resolve() in sources]
    if clashes:
        raise DataError(f"refusing to overwrite input scan(s) {', '.join(clashes)}: choose another --out")
    segmenter = Segmenter(kept, device=device, batch_size=batch_size)
    labels = Labels(tuple(kept.labels), bool(kept.preprocessing["nested"]))
    path = "global" if global_only else "personalized"
    run = PredictionRun(Path(model_file), path)
    axis = segmenter.axis
    for scan in tqdm(scans, desc="scans", unit="scan", disable=not progress):
        volume = read_volume(scan)
        if volume.array.ndim not in (3, 4):
            raise DataError(f"{scan}: expected a 2D or 3D image, found {volume.array.ndim - 1} spatial dimensions")
        channels = volume.array.shape[0]
        if channels != 1 and not (channels == 3 and scan.name.endswith(".png")):
            raise DataError(f"{scan}: {channels} channels (frames of a 4D series?); expected one, or an RGB PNG")
        planes = 1 if volume.array.ndim == 3 else volume.array.shape[axis + 1]
        with tqdm(total=planes, desc=scan.name, unit="slice", leave=False, disable=not progress) as bar:
            logits = segmenter.logits(volume.array, (path,), on_planes=bar.update)[path]
        label_map = labels.label_map(logits.numpy())
        written = write_label_map(label_map, volume.affine, targets[scan])
        run.outputs.append(
            Prediction(scan, written, tuple(label_map.shape), planes, sorted(int(v) for v in np.unique(label_map)))
        )
    run.seconds = time.perf_counter() - began
    return run
