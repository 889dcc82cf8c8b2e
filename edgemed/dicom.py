"""DICOM as hospitals store it, decoded to the 8-bit RGB image a vision model takes.

The display pipeline of DICOM PS3.3 C.11, with pydicom's own functions for each step:

1. Decode one frame (``pydicom.pixels.pixel_array``); compressed transfer syntaxes need a decoder plug-in, the
   optional extra ``edgemed[dicom]`` (pylibjpeg with its JPEG, JPEG 2000 and RLE plug-ins); without it a clear
   error names the extra. YBR colour is converted to RGB by pydicom; PALETTE COLOR through its colour LUT.
2. Modality LUT or rescale slope/intercept (``apply_modality_lut``), per frame for enhanced multi-frame files
   (the Pixel Value Transformation of the shared and per-frame functional groups).
3. VOI: the VOI LUT Sequence, else window centre/width with VOILUTFunction LINEAR, LINEAR_EXACT or SIGMOID
   (``apply_voi_lut``), else the frame's min..max. The result is scaled from the VOI output range to 0..255.
4. MONOCHROME1 is inverted after the VOI step (pydicom leaves that to the caller).

For CT, ``render="ct-windows"`` replaces steps 3-4 with the three-window RGB rendering of MedGemma's CT
notebooks: R = Hounsfield units -1024..1024 (wide), G = -135..215 (soft tissue), B = 0..80 (brain), each a
LINEAR_EXACT window through ``apply_voi_lut``: no step of the pipeline hand-writes a window.

No tag value of the file is ever written to a log or an error message: pydicom's warnings (which quote values)
are silenced while a file is read, and errors name only the problem and, for compression, the standard name of
the transfer syntax from pydicom's UID dictionary.
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from edgemed.errors import DataError

RENDERS = ("voi", "ct-windows")
CT_WINDOWS = ((-1024.0, 1024.0), (-135.0, 215.0), (0.0, 80.0))  # MedGemma's CT channels: wide, soft tissue, brain
EXTRA = "pip install 'edgemed[dicom]'"  # pylibjpeg, pylibjpeg-libjpeg, pylibjpeg-openjpeg, pylibjpeg-rle


def too_many_pixels(name: str, w: int, h: int, max_pixels: int) -> DataError:
    return DataError(f"{name}: declares {w}x{h} = {w * h:,} pixels, over the limit of {max_pixels:,} (checked "
                     "before decoding, against decompression bombs); downscale the image or raise max_pixels")


def _frame_view(ds: Any, frame: int) -> Any:
    """A dataset whose top level carries this frame's rescale and VOI values, so that pydicom's LUT functions
    (which read only the top level) see them. Enhanced multi-frame files keep these in the shared and per-frame
    functional groups; the per-frame value wins."""
    from pydicom.dataset import Dataset

    view = Dataset()
    for kw in ("PixelRepresentation", "BitsStored", "BitsAllocated", "PhotometricInterpretation",
               "RescaleSlope", "RescaleIntercept", "RescaleType", "ModalityLUTSequence", "VOILUTSequence",
               "WindowCenter", "WindowWidth", "VOILUTFunction", "Modality"):
        if kw in ds:
            setattr(view, kw, ds[kw].value)
    groups = [ds.get("SharedFunctionalGroupsSequence"), ds.get("PerFrameFunctionalGroupsSequence")]
    for g, seq in enumerate(groups):
        if not seq:
            continue
        idx = 0 if g == 0 else frame
        if idx >= len(seq):
            continue
        item = seq[idx]
        for seq_kw, kws in (("PixelValueTransformationSequence", ("RescaleSlope", "RescaleIntercept", "RescaleType")),
                            ("FrameVOILUTSequence", ("WindowCenter", "WindowWidth", "VOILUTFunction"))):
            sub = item.get(seq_kw)
            if sub:
                for kw in kws:
                    if kw in sub[0]:
                        setattr(view, kw, sub[0][kw].value)
    return view


def _voi_range(view: Any) -> tuple[float, float]:
    """The output range of pydicom's apply_windowing for this dataset (PS3.3 C.11.2.1.2: the range of the
    modality values), to scale its result to 8 bits."""
    if view.get("ModalityLUTSequence"):
        lo, hi = 0.0, float(2 ** int(view.ModalityLUTSequence[0].LUTDescriptor[2]) - 1)
    elif int(view.get("PixelRepresentation", 0)) == 0:
        lo, hi = 0.0, float(2 ** int(view.BitsStored) - 1)
    else:
        lo, hi = float(-(2 ** (int(view.BitsStored) - 1))), float(2 ** (int(view.BitsStored) - 1) - 1)
    slope, intercept = view.get("RescaleSlope"), view.get("RescaleIntercept")
    if slope is not None and intercept is not None:
        lo, hi = sorted((lo * float(slope) + float(intercept), hi * float(slope) + float(intercept)))
    return lo, hi


def _to_u8(x: np.ndarray, lo: float, hi: float) -> np.ndarray:
    if hi <= lo:
        return np.zeros(x.shape, dtype=np.uint8)
    return np.clip(np.rint((np.asarray(x, dtype=np.float64) - lo) / (hi - lo) * 255.0), 0, 255).astype(np.uint8)


def voi_to_u8(modality: np.ndarray, view: Any) -> np.ndarray:
    """The VOI step to 8 bits: VOI LUT Sequence, else windowing (any VOILUTFunction), else min..max."""
    from pydicom.pixels import apply_voi_lut

    seq = view.get("VOILUTSequence")
    if seq and seq[0].get("LUTDescriptor") is not None and seq[0].get("LUTData") is not None:
        out = apply_voi_lut(modality, view)
        bits = int(seq[0].LUTDescriptor[2])
        return _to_u8(out, 0.0, float(2 ** bits - 1))
    if view.get("WindowCenter") is not None and view.get("WindowWidth") is not None:
        try:
            out = apply_voi_lut(modality, view, prefer_lut=False)
        except (ValueError, TypeError, IndexError, ZeroDivisionError):
            out = None  # a window width below 1 (or unreadable): fall back to the frame's range, as viewers do
        if out is not None:
            return _to_u8(out, *_voi_range(view))
    return _to_u8(modality, float(np.min(modality)), float(np.max(modality)))


def ct_windows_rgb(hu: np.ndarray, view: Any) -> np.ndarray:
    """MedGemma's CT rendering: one Hounsfield window per RGB channel, each lo..hi to 0..255. The windows go through
    pydicom's apply_voi_lut as LINEAR_EXACT windows (centre (lo+hi)/2, width hi-lo), which is that clip and scale
    exactly (PS3.3 C.11.2.1.3.2)."""
    import copy

    from pydicom.pixels import apply_voi_lut

    channels = []
    for lo, hi in CT_WINDOWS:
        w = copy.deepcopy(view)
        w.PhotometricInterpretation = "MONOCHROME2"  # the channels are not inverted, whatever the file says
        w.WindowCenter, w.WindowWidth, w.VOILUTFunction = (lo + hi) / 2, hi - lo, "LINEAR_EXACT"
        channels.append(_to_u8(apply_voi_lut(hu, w, prefer_lut=False), *_voi_range(w)))
    return np.stack(channels, axis=-1)


def _transfer_syntax(ds: Any) -> Any:
    return getattr(getattr(ds, "file_meta", None), "TransferSyntaxUID", None)


def _decode(ds: Any, name: str, frame: int) -> np.ndarray:
    from pydicom.pixels import pixel_array

    try:
        return pixel_array(ds, index=frame)
    except Exception as e:  # noqa: BLE001 - pydicom raises many types (missing plug-in, bad length, ...)
        ts = _transfer_syntax(ds)
        if getattr(ts, "is_compressed", False):
            # the standard name from pydicom's UID dictionary: not free text from the file
            kind = ts.name if getattr(ts, "is_transfer_syntax", False) else "a compressed transfer syntax"
            raise DataError(f"{name}: the pixel data is compressed ({kind}) and no installed decoder reads it; "
                            f"{EXTRA}, or decompress the file (gdcmconv --raw)") from e
        raise DataError(f"{name}: cannot decode the DICOM pixel data ({type(e).__name__}); the file is damaged, "
                        "export it again") from e


def load_dicom(src: Path | io.IOBase, name: str, max_pixels: int, frame: int | None = None,
               render: str = "voi") -> Image.Image:
    """Decode one frame of a DICOM file as an 8-bit RGB image (see the module docstring for the steps).

    Args:
        src: The file path, or a binary file object.
        name: How errors name the file.
        max_pixels: Refuse frames declaring more pixels than this, before decoding.
        frame: Frame of a multi-frame file (default: the first).
        render: "voi" (the file's own display settings) or "ct-windows" (MedGemma's three CT windows; used
            for CT only, other modalities fall back to "voi").

    Raises:
        DataError: not DICOM, no pixel data, oversized, frame out of range, missing decoder, damaged data.
    """
    import pydicom
    from pydicom.errors import InvalidDicomError

    if render not in RENDERS:
        raise DataError(f"unknown DICOM rendering {render!r}; choose one of {', '.join(RENDERS)}")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # pydicom's warnings quote element values
        try:
            ds = pydicom.dcmread(src, force=True)
        except (InvalidDicomError, OSError, ValueError, EOFError, KeyError, TypeError) as e:
            raise DataError(f"{name}: not a readable DICOM file ({type(e).__name__}); export it again from the "
                            "PACS") from e
        if not any(k in ds for k in ("PixelData", "FloatPixelData", "DoubleFloatPixelData")):
            raise DataError(f"{name}: DICOM file has no pixel data; it may be a report, presentation state or "
                            "header-only file; give an image instance instead")
        try:
            rows, cols = int(ds.get("Rows") or 0), int(ds.get("Columns") or 0)
            n_frames = int(ds.get("NumberOfFrames") or 1)
        except (TypeError, ValueError):
            rows = cols = n_frames = 0
        if not rows or not cols or n_frames < 1:
            raise DataError(f"{name}: DICOM file has pixel data but no valid Rows/Columns/NumberOfFrames; the file "
                            "is damaged, export it again")
        if rows * cols > max_pixels:
            raise too_many_pixels(name, cols, rows, max_pixels)
        f = 0 if frame is None else frame
        if not 0 <= f < n_frames:
            raise DataError(f"{name}: frame {f} does not exist; the file has {n_frames} frame(s), 0..{n_frames - 1}")
        arr = _decode(ds, name, f)
        return _render(ds, arr, f, render)


def _render(ds: Any, arr: np.ndarray, frame: int, render: str) -> Image.Image:
    from pydicom.pixels import apply_color_lut, apply_modality_lut

    photometric = str(ds.get("PhotometricInterpretation", "")).strip().upper()
    if photometric == "PALETTE COLOR":
        rgb = apply_color_lut(arr, ds)  # 8 or 16 bits per entry, as the LUT descriptor says
        bits = int(ds.RedPaletteColorLookupTableDescriptor[2])
        return Image.fromarray(_to_u8(rgb, 0.0, float(2 ** bits - 1)), "RGB")
    if arr.ndim == 3 and arr.shape[-1] in (3, 4):  # colour; pydicom has converted YBR to RGB
        a = arr[..., :3]
        if a.dtype != np.uint8:
            a = _to_u8(a, 0.0, float(2 ** int(ds.get("BitsStored", 16)) - 1))
        return Image.fromarray(np.ascontiguousarray(a), "RGB")
    if arr.ndim != 2:
        raise DataError("DICOM frame has an unexpected shape; give a single-frame greyscale or colour image")
    view = _frame_view(ds, frame)
    modality = apply_modality_lut(arr, view).astype(np.float64)
    if render == "ct-windows" and str(ds.get("Modality", "")).strip().upper() == "CT":
        return Image.fromarray(ct_windows_rgb(modality, view), "RGB")
    u8 = voi_to_u8(modality, view)
    if photometric == "MONOCHROME1":
        u8 = 255 - u8  # MONOCHROME1: the lowest value is white
    return Image.fromarray(u8, "L").convert("RGB")
