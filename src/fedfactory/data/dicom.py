"""DICOM files at a site: one frame, grey or colour, as an 8-bit image the folder loader treats like a PNG.

Grey pixels go through the file's modality LUT (RescaleSlope/Intercept), then its own VOI LUT or window
(the first when it has several), else the image's min-max (8-bit files without a window or rescale are
taken as they are); MONOCHROME1 is inverted so that bright is dense, as in MONOCHROME2. Colour (RGB,
YBR_*, PALETTE COLOR) becomes RGB. Multi-frame files are refused: export one frame per file.
"""

from __future__ import annotations

import struct
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pydicom
from PIL import Image
from pydicom.errors import BytesLengthException, InvalidDicomError

try:  # pydicom >= 3
    from pydicom.pixels import apply_color_lut, apply_modality_lut, apply_voi_lut, convert_color_space
except ImportError:  # pydicom 2.4
    from pydicom.pixel_data_handlers.util import (apply_color_lut, apply_modality_lut, apply_voi_lut,
                                                  convert_color_space)

from ..errors import FedFactoryError
from .base import one_line

GREY, COLOUR = ("MONOCHROME1", "MONOCHROME2"), ("RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR")
# What pydicom raises on files it cannot parse or decode (missing elements included).
BAD_DICOM = (InvalidDicomError, BytesLengthException, OSError, EOFError, ValueError, TypeError, KeyError,
             AttributeError, IndexError, struct.error, NotImplementedError, RuntimeError, OverflowError)


class Header(NamedTuple):
    mode: str  # "L" or "RGB", as Pillow names the image it becomes
    size: tuple[int, int]  # width, height
    nbytes: int  # the decoded pixel data, all frames


def read_header(path: Path) -> Header:
    """The image's mode, size and decoded bytes from the header alone: nothing of the pixel data is read."""
    return _header(path, _dcmread(path, stop_before_pixels=True))


def read_image(path: Path) -> Image.Image:
    """The file's one frame as an 8-bit "L" or "RGB" image; call read_header first to check its size."""
    ds = _dcmread(path, defer_size="64 KB")  # the pixel data stays on disk until decoded
    _header(path, ds)
    if "PixelData" not in ds:
        raise FedFactoryError(f"DICOM file {path} has no pixel data")
    try:
        arr = ds.pixel_array
    except BAD_DICOM as e:
        ts = ds.file_meta.get("TransferSyntaxUID", "unknown")
        raise FedFactoryError(f"cannot decode the pixel data of DICOM file {path} (transfer syntax "
                              f"{one_line(getattr(ts, 'name', ts))}): {type(e).__name__}: {one_line(e)}") from None
    try:
        pi = ds.PhotometricInterpretation
        if pi in GREY:
            return Image.fromarray(_grey(arr, ds), "L")
        if pi == "PALETTE COLOR":
            arr = apply_color_lut(arr, ds)
        elif pi.startswith("YBR") and not hasattr(ds, "pixel_array_options"):  # pydicom 3 gives RGB already
            arr = convert_color_space(arr, pi, "RGB")
        bits = 8 * arr.itemsize if pi == "PALETTE COLOR" else int(ds.BitsStored)  # the LUT's entries, else stored
        return Image.fromarray(_to_uint8(arr, 0, (1 << bits) - 1), "RGB")
    except BAD_DICOM as e:
        raise FedFactoryError(f"DICOM file {path}: cannot make its pixels 8-bit with its own LUTs and window: "
                              f"{type(e).__name__}: {one_line(e)}") from None


def _dcmread(path: Path, **kw) -> pydicom.Dataset:
    try:
        return pydicom.dcmread(path, **kw)
    except InvalidDicomError:
        raise FedFactoryError(f"{path} is not a DICOM file (no DICM preamble and file meta header)") from None
    except BAD_DICOM as e:
        raise FedFactoryError(f"cannot read DICOM file {path}: {type(e).__name__}: {one_line(e)}") from None


def _header(path: Path, ds: pydicom.Dataset) -> Header:
    try:
        rows, cols, pi = int(ds.Rows), int(ds.Columns), str(ds.PhotometricInterpretation)
        spp, bits = int(ds.get("SamplesPerPixel", 1)), int(ds.BitsAllocated)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
    except BAD_DICOM as e:
        raise FedFactoryError(f"DICOM file {path} is not an image: {type(e).__name__}: {one_line(e)}") from None
    if pi not in GREY + COLOUR:
        raise FedFactoryError(f"DICOM file {path}: photometric interpretation {pi!r} is not supported "
                              f"(expected one of {', '.join(GREY + COLOUR)})")
    if frames != 1:
        raise FedFactoryError(f"DICOM file {path} holds {frames} frames; multi-frame files are not supported: "
                              f"export one frame per file")
    if min(rows, cols, spp, bits) < 1:
        raise FedFactoryError(f"DICOM file {path}: bad image header: {rows} x {cols} pixels, "
                              f"{spp} samples of {bits} bits")
    return Header("L" if pi in GREY else "RGB", (cols, rows), rows * cols * spp * frames * ((bits + 7) // 8))


def _grey(arr: np.ndarray, ds: pydicom.Dataset) -> np.ndarray:
    x = apply_modality_lut(arr, ds)
    plain = x.dtype == np.uint8 and int(ds.get("BitsStored", 8)) == 8  # 8-bit and no rescale: as it is
    if ds.get("VOILUTSequence"):
        x, lo, hi = apply_voi_lut(x, ds, index=0), 0, (1 << int(ds.VOILUTSequence[0].LUTDescriptor[2])) - 1
    elif "WindowCenter" in ds and "WindowWidth" in ds:
        with np.errstate(over="ignore"):  # the window's own output range: its value far below and far above
            lo, hi = apply_voi_lut(np.array([-1e12, 1e12]), ds, index=0)
        x = apply_voi_lut(x, ds, index=0)
    else:
        lo, hi = (0, 255) if plain else (x.min(), x.max())
    x = _to_uint8(x, lo, hi)
    return 255 - x if ds.PhotometricInterpretation == "MONOCHROME1" else x


def _to_uint8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if x.dtype == np.uint8 and (lo, hi) == (0, 255):
        return x
    scale = 255.0 / (hi - lo) if hi > lo else 0.0
    return np.clip(np.rint((x.astype(np.float64) - lo) * scale), 0, 255).astype(np.uint8)
