"""Writing a DICOM series for tests: one MR slice per file, with the geometry tags readers use."""

from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, MRImageStorage, generate_uid


def write_series(
    folder: Path,
    volume: np.ndarray,
    spacing: tuple[float, float] = (0.8, 0.7),
    thickness: float = 2.5,
    origin: tuple[float, float, float] = (-30.0, -20.0, 10.0),
) -> Path:
    """``volume`` (rows, columns, slices) of int16 as ``folder/slice<k>.dcm``."""
    folder.mkdir(parents=True, exist_ok=True)
    series, study = generate_uid(), generate_uid()
    rows, columns, count = volume.shape
    for k in range(count):
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = MRImageStorage
        meta.MediaStorageSOPInstanceUID = generate_uid()
        meta.TransferSyntaxUID = ExplicitVRLittleEndian
        ds = Dataset()
        ds.file_meta = meta
        ds.SOPClassUID, ds.SOPInstanceUID = MRImageStorage, meta.MediaStorageSOPInstanceUID
        ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
        ds.Modality, ds.PatientID = "MR", "pfedsam-test"
        ds.Rows, ds.Columns = rows, columns
        ds.PixelSpacing = list(spacing)
        ds.SliceThickness = thickness
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.ImagePositionPatient = [origin[0], origin[1], origin[2] + k * thickness]
        ds.InstanceNumber = k + 1
        ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
        ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 1
        ds.PixelData = np.ascontiguousarray(volume[:, :, k].astype(np.int16)).tobytes()
        ds.save_as(folder / f"slice{k:03d}.dcm", enforce_file_format=True)
    return folder
