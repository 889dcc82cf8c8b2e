"""Images: PNG, JPEG and DICOM files (or uploaded bytes) as 8-bit RGB images, checked before they are decoded.

DICOM goes to ``edgemed.dicom`` (the display pipeline, with pydicom's modality and VOI LUT functions); PNG and
JPEG are the only raster formats decoded, and every image declaring more pixels than the limit is refused from
its header, before decoding (decompression bombs).
"""

from __future__ import annotations

import io
import warnings
from pathlib import Path

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from edgemed.errors import DataError
from edgemed.files import reading

DEFAULT_MAX_PIXELS = 50_000_000
PIL_FORMATS = ("PNG", "JPEG")  # the only raster formats decoded: a smaller attack surface for the server
IMAGE_MIMES = ("image/png", "image/jpeg", "image/jpg", "application/dicom", "application/octet-stream")
DICOM_MIMES = ("application/dicom",)


def _is_dicom(head: bytes, suffix: str = "") -> bool:
    return head[128:132] == b"DICM" or suffix.lower() in (".dcm", ".dicom")


def _dicom_signature(head: bytes) -> bool:
    """A Part 10 file has "DICM" at byte 128; a file without the preamble (older PACS exports) starts with an
    element of group 0002 (file meta) or 0008 (identification). Anything else named .dcm is not DICOM: pydicom's
    forced read would take its bytes for elements and report "no pixel data" instead."""
    return head[128:132] == b"DICM" or (len(head) >= 8 and int.from_bytes(head[:2], "little") in (0x0002, 0x0008))


def _to_rgb(im: Image.Image) -> Image.Image:
    """RGB for any decoded mode; 16-bit and float grayscale are stretched min..max to 8 bit (not clipped)."""
    if im.mode in ("I", "I;16", "I;16B", "I;16L", "I;16N", "F"):
        a = np.asarray(im, dtype=np.float64)
        lo, hi = float(a.min()), float(a.max())
        a = (a - lo) / (hi - lo) * 255.0 if hi > lo else np.zeros_like(a)
        im = Image.fromarray(np.clip(np.rint(a), 0, 255).astype(np.uint8), "L")
    return im if im.mode == "RGB" else im.convert("RGB")


def _load_raster(fp: io.IOBase | Path, name: str, max_pixels: int) -> Image.Image:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            im = Image.open(fp, formats=PIL_FORMATS)  # reads the header only
    except Image.DecompressionBombError as e:
        raise DataError(f"{name}: {e}; refused before decoding (decompression bomb guard); downscale the "
                        "image") from e
    except UnidentifiedImageError as e:
        raise DataError(f"{name}: not a PNG, JPEG or DICOM image; convert it to PNG (or give a DICOM file)") from e
    except (OSError, SyntaxError, ValueError) as e:
        raise DataError(f"{name}: cannot read the image header ({e}); the file is damaged, export it again") from e
    w, h = im.size
    if w * h > max_pixels:
        from edgemed.dicom import too_many_pixels  # one wording for raster and DICOM images

        raise too_many_pixels(name, w, h, max_pixels)
    try:
        im.load()  # force decoding now, so a truncated file fails here and not deep in a training step
        im = ImageOps.exif_transpose(im)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"{name}: cannot decode the {im.format} image ({e}); the file is corrupt or truncated, "
                        "export it again") from e
    return _to_rgb(im)


def _load_dicom(src: Path | io.BytesIO, name: str, max_pixels: int, frame: int | None = None,
                render: str = "voi") -> Image.Image:
    from edgemed.dicom import load_dicom  # the DICOM display pipeline (modality LUT, VOI, frames, colour)

    head = src.read(132)
    src.seek(0)
    if not _dicom_signature(head):
        raise DataError(f"{name}: not a DICOM file (no DICM marker at byte 128, and it does not start with a DICOM "
                        "element); give a DICOM image, or a PNG or JPEG with its own suffix")
    return load_dicom(src, name, max_pixels, frame=frame, render=render)


def load_image(path: Path | str, max_pixels: int = DEFAULT_MAX_PIXELS, *, frame: int | None = None,
               render: str = "voi") -> Image.Image:
    """Load a PNG, JPEG or DICOM file as an 8-bit RGB image.

    DICOM is recognised by the "DICM" marker at byte 128 or a ``.dcm`` suffix and decoded by
    ``edgemed.dicom.load_dicom``: modality LUT, then the VOI LUT or window (LINEAR, LINEAR_EXACT, SIGMOID;
    min..max if absent), MONOCHROME1 inverted, YBR and palette colour to RGB, per-frame values of enhanced
    multi-frame files.

    Args:
        path: The image file.
        max_pixels: Refuse images declaring more pixels than this, before decoding them.
        frame: DICOM frame of a multi-frame file (default: the first).
        render: DICOM rendering: "voi" (the file's display settings) or "ct-windows" (MedGemma's three CT
            windows as RGB, for CT).

    Raises:
        DataError: missing, unsupported, corrupt or oversized file, or DICOM without pixel data.
    """
    path = Path(path)
    if path.is_dir():
        raise DataError(f"{path}: is a folder, not an image file; give a PNG, JPEG or DICOM file")
    if not path.is_file():
        raise DataError(f"{path}: no such image file; check the path (relative image paths are resolved against "
                        "the JSONL's folder or the image root)")
    with open(path, "rb") as f:
        head = f.read(132)
        f.seek(0)
        with reading(path, "an image", DataError, "give a PNG, JPEG or DICOM file"):
            if _is_dicom(head, path.suffix):
                return _load_dicom(f, str(path), max_pixels, frame, render)  # type: ignore[arg-type]
            return _load_raster(f, str(path), max_pixels)  # type: ignore[arg-type]


def load_image_bytes(data: bytes, mime: str | None = None, max_pixels: int = DEFAULT_MAX_PIXELS,
                     name: str = "uploaded image", *, frame: int | None = None, render: str = "voi") -> Image.Image:
    """Load an image sent as bytes (e.g. a data: URL) with the same rules as :func:`load_image`.

    Args:
        data: The encoded image.
        mime: Its media type, if known (image/png, image/jpeg, application/dicom); the content decides
            between PNG and JPEG.
        max_pixels: Refuse images declaring more pixels than this, before decoding them.
        name: How error messages name the image.
        frame: DICOM frame of a multi-frame file (default: the first).
        render: DICOM rendering, as for :func:`load_image`.
    """
    if not data:
        raise DataError(f"{name}: no bytes; send a PNG, JPEG or DICOM image")
    kind = (mime or "").split(";")[0].strip().lower()
    if kind and kind not in IMAGE_MIMES:
        raise DataError(f"{name}: unsupported media type {mime!r}; allowed: {', '.join(IMAGE_MIMES)}")
    with reading(name, "an image", DataError, "send a PNG, JPEG or DICOM image"):
        if kind in DICOM_MIMES or _is_dicom(data[:132]):
            return _load_dicom(io.BytesIO(data), name, max_pixels, frame, render)
        return _load_raster(io.BytesIO(data), name, max_pixels)

