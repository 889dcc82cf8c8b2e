"""Images in requests: base64 ``data:`` URLs, or local paths under an ``--allow-dir``; never a remote URL.

Decoding is the training pipeline's (``edgemed.data.load_image_bytes``): DICOM is windowed as in fine-tuning,
and the pixel count is checked from the header before any decoding.
"""

from __future__ import annotations

import base64
import binascii
from pathlib import Path
from typing import TYPE_CHECKING
from urllib.parse import unquote, urlparse

from edgemed.errors import DataError
from edgemed.serve.schema import ApiError

if TYPE_CHECKING:
    from PIL import Image

    from edgemed.serve.config import ServeConfig

IMAGE_MIMES = ("image/png", "image/jpeg", "image/jpg", "application/dicom")
SUFFIX_MIME = {".png": "image/png", ".jpg": "image/jpeg", ".jpeg": "image/jpeg", ".dcm": "application/dicom",
               ".dicom": "application/dicom"}


def decode_image(data: bytes, mime: str, max_pixels: int, render: str = "voi") -> Image.Image:
    """PNG, JPEG or DICOM bytes as an RGB image, windowed as in training (``render``: the served family's CT
    rendering, ``ArchSpec.dicom_render``); pixel count checked before decoding."""
    from edgemed.data import load_image_bytes

    return load_image_bytes(data, mime, max_pixels=max_pixels, name="the image_url image", render=render)


def image_from_url(url: str, config: ServeConfig, render: str = "voi") -> Image.Image:
    """An image from a ``data:`` URL, or a local path (``file://`` or plain) under one of the allowed folders;
    DICOM rendered with ``render`` (the served family's, as in its training)."""
    if url.startswith("data:"):
        return _from_data_url(url, config, render)
    parsed = urlparse(url)
    if parsed.scheme in ("http", "https", "ftp"):
        raise ApiError(400, "remote image URLs are not fetched (this server is offline); send the image as a "
                       "base64 data: URL", "remote_url_refused")
    if parsed.scheme not in ("file", ""):
        raise ApiError(400, f"image URL scheme {parsed.scheme!r} is not accepted; use data: URLs",
                       "invalid_image_url")
    return _from_path(Path(unquote(parsed.path) if parsed.scheme == "file" else url), config, render)


def _from_data_url(url: str, config: ServeConfig, render: str) -> Image.Image:
    head, sep, payload = url[5:].partition(",")
    if not sep or not head.endswith(";base64"):
        raise ApiError(400, "image_url data URLs must be base64: data:image/png;base64,...", "invalid_image_url")
    mime = head[: -len(";base64")].lower() or "image/png"
    if mime not in IMAGE_MIMES:
        raise ApiError(400, f"image type {mime!r} is not accepted; send one of {', '.join(IMAGE_MIMES)}",
                       "unsupported_image_type")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError) as e:
        raise ApiError(400, f"the image's base64 payload is invalid ({e})", "invalid_base64") from e
    return _image_or_4xx(data, mime, config, render)


def _from_path(path: Path, config: ServeConfig, render: str) -> Image.Image:
    if not config.allow_dirs:
        raise ApiError(403, "local image paths are not allowed on this server (start it with --allow-dir FOLDER); "
                       "send the image as a base64 data: URL", "path_not_allowed")
    try:
        real = path.resolve()  # links followed: a link inside an allowed folder cannot point out of it
    except (OSError, RuntimeError):
        raise ApiError(400, f"image path {path} cannot be resolved", "invalid_image_url") from None
    # checked before existence, so that nothing can be learnt about files outside the allowed folders
    if not path.is_absolute() or not any(real.is_relative_to(Path(d).resolve()) for d in config.allow_dirs):
        raise ApiError(403, f"image file {path} is outside the allowed folders", "path_not_allowed")
    if not real.is_file():
        raise ApiError(404, f"image file {path} does not exist", "image_not_found")
    if real.stat().st_size > config.max_body_bytes:
        raise ApiError(413, f"image file {path} is larger than {config.max_body_bytes} bytes", "image_too_large")
    return _image_or_4xx(real.read_bytes(), SUFFIX_MIME.get(real.suffix.lower(), "image/png"), config, render)


def _image_or_4xx(data: bytes, mime: str, config: ServeConfig, render: str) -> Image.Image:
    try:
        return decode_image(data, mime, config.max_image_pixels, render)
    except DataError as e:
        code = "image_too_large" if "pixels" in str(e) and "limit" in str(e) else "invalid_image"
        raise ApiError(413 if code == "image_too_large" else 400, str(e), code) from None
