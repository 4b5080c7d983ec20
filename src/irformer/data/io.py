"""Reading, validating and writing images.

Images live in memory as ``numpy`` arrays ``(H, W, C)`` of ``uint8`` or
``uint16`` with channels in RGB(A) order; this is the one representation the
degradations and metrics agree on. Conversions are explicit and documented:

* ``channels="rgb"`` (the default): greyscale is replicated to three channels
  (what a 3-channel model needs, and what the SR convention does for greyscale
  images such as Set14's ``bridge``); an alpha channel is dropped with an
  :class:`AlphaDroppedWarning`.
* ``channels="grey"``: colour is converted with BT.601 luma (``0.299 R +
  0.587 G + 0.114 B``, OpenCV's ``RGB2GRAY``, as the greyscale JPEG benchmarks
  are made); alpha is dropped with a warning.
* ``channels="keep"``: the file's own channels (1, 2 = grey + alpha, 3 or 4).

Decoding goes through Pillow, which raises on truncated files (OpenCV silently
returns a partly grey JPEG). Pillow reduces 16-bit colour to 8 bits, so 16-bit
colour PNG/TIFF files are decoded with OpenCV after Pillow has validated them.

Size limit: a file whose header declares more than :func:`max_image_pixels`
pixels (default :data:`DEFAULT_MAX_IMAGE_PIXELS`, Pillow's own warning
threshold; environment variable ``IRFORMER_MAX_IMAGE_PIXELS``, ``0`` = no limit)
is refused with :class:`ImageTooLargeError` before any pixel is decoded, by
every reader here (:func:`read_image`, :func:`image_size`). A 300 KB PNG can
declare 10000x10000 pixels; Pillow alone only warns below twice its limit.
"""

from __future__ import annotations

import errno
import io
import logging
import os
import re
import tempfile
import warnings
from collections.abc import Iterable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Literal

import cv2
import numpy as np
import torch
from PIL import Image, UnidentifiedImageError

from irformer.errors import IrformerError, OutputNotWritableError
from irformer.files import atomic_write

__all__ = [
    "DEFAULT_MAX_IMAGE_PIXELS",
    "IMAGE_SUFFIXES",
    "MAX_IMAGE_PIXELS_ENV",
    "READ_SUFFIXES",
    "AlphaDroppedWarning",
    "ChannelMode",
    "ImageReadError",
    "ImageTooLargeError",
    "OutputExistsError",
    "check_folder_writable",
    "check_writable",
    "convert_channels",
    "image_size",
    "image_to_tensor",
    "list_images",
    "max_image_pixels",
    "quantize",
    "read_image",
    "split_alpha",
    "tensor_to_image",
    "to_float32",
    "write_image",
]

logger = logging.getLogger(__name__)

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".bmp", ".tif", ".tiff", ".jpg", ".jpeg")
"""File suffixes (lower case) that :func:`write_image` writes and :func:`list_images` lists."""


def _pillow_reads_webp() -> bool:
    from PIL import features

    return bool(features.check("webp"))


WEBP_READABLE: bool = _pillow_reads_webp()
"""Whether this Pillow decodes WebP (built with libwebp): then ``.webp`` files are read
(never written); else :func:`list_images` names them as skipped."""

READ_SUFFIXES: tuple[str, ...] = IMAGE_SUFFIXES + ((".webp",) if WEBP_READABLE else ())
"""File suffixes :func:`list_images` lists for reading."""

UNREADABLE_SUFFIXES: tuple[str, ...] = (".gif", ".heic", ".heif", ".avif", ".jxl", ".webp")
"""Image formats irformer does not read (``.webp`` only without Pillow's WebP support):
:func:`list_images` names the files it skips."""

_PIL_FORMATS = frozenset(
    {"PNG", "BMP", "TIFF", "JPEG", "MPO"} | ({"WEBP"} if WEBP_READABLE else set())
)
_WRITE_16BIT_SUFFIXES = frozenset({".png", ".tif", ".tiff"})

ChannelMode = Literal["rgb", "grey", "keep"]


DEFAULT_MAX_IMAGE_PIXELS = 89_478_485
"""Largest image (height x width) read without ``IRFORMER_MAX_IMAGE_PIXELS``:
Pillow's decompression-bomb threshold (about 9459 x 9459; 0.27 GB as 8-bit RGB)."""

MAX_IMAGE_PIXELS_ENV = "IRFORMER_MAX_IMAGE_PIXELS"


class ImageReadError(IrformerError, ValueError):
    """A file could not be decoded as a supported image; the message names the path."""


class ImageTooLargeError(ImageReadError):
    """An image declares more pixels than :func:`max_image_pixels` allows."""


class OutputExistsError(IrformerError, FileExistsError, ValueError):
    """Refusal to overwrite an existing output or an input file."""


class AlphaDroppedWarning(UserWarning):
    """An alpha channel was discarded while converting to RGB or greyscale."""


def _natural_key(path: Path) -> list[object]:
    # "2.png" before "10.png", as the benchmark lists are usually printed.
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", path.name)]


def list_images(folder: str | Path) -> list[Path]:
    """Image files directly inside ``folder`` (suffix in :data:`READ_SUFFIXES`), naturally sorted.

    Raises ``FileNotFoundError`` when the folder is missing and ``ValueError``
    when it holds no images, so a wrong ``--data-root`` fails loudly. Files of an
    image format irformer cannot read (:data:`UNREADABLE_SUFFIXES`) are named in
    one warning, not skipped silently.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"image folder not found: {folder}")
    entries = [p for p in folder.iterdir() if p.is_file()]
    files = [p for p in entries if p.suffix.lower() in READ_SUFFIXES]
    skipped = sorted(
        (p for p in entries if p.suffix.lower() in UNREADABLE_SUFFIXES and p not in files),
        key=_natural_key,
    )
    if skipped:
        shown = ", ".join(p.name for p in skipped[:5]) + (", ..." if len(skipped) > 5 else "")
        logger.warning(
            "skipping %d file(s) in %s that irformer cannot read (%s): %s",
            len(skipped),
            folder,
            "; ".join(sorted({_unreadable_reason(p.suffix.lower()) for p in skipped})),
            shown,
        )
    if not files:
        raise ValueError(f"no images ({', '.join(READ_SUFFIXES)}) found in folder {folder}")
    return sorted(files, key=_natural_key)


def _unreadable_reason(suffix: str) -> str:
    if suffix == ".webp":
        return "this Pillow was built without WebP support"
    return f"{suffix} is not supported; convert to PNG"


def _check_readable_file(path: Path) -> None:
    if not path.exists():
        raise FileNotFoundError(f"image not found: {path}")
    if not path.is_file():
        raise ImageReadError(f"not a regular file, expected an image: {path}")
    if path.stat().st_size == 0:
        raise ImageReadError(f"empty file, expected an image: {path}")


def max_image_pixels() -> int | None:
    """The pixel limit in force: ``IRFORMER_MAX_IMAGE_PIXELS`` if set (``0`` or
    ``none``: no limit), else :data:`DEFAULT_MAX_IMAGE_PIXELS`."""
    text = os.environ.get(MAX_IMAGE_PIXELS_ENV, "").strip()
    if not text:
        return DEFAULT_MAX_IMAGE_PIXELS
    if text.lower() == "none":
        return None
    try:
        limit = int(text.replace("_", ""))
    except ValueError:
        raise IrformerError(
            f"{MAX_IMAGE_PIXELS_ENV}={text!r}: expected a whole number of pixels (0 = no limit)"
        ) from None
    if limit < 0:
        raise IrformerError(f"{MAX_IMAGE_PIXELS_ENV}={text!r}: must be >= 0 (0 = no limit)")
    return limit or None


@contextmanager
def _pixel_limit() -> Iterator[int | None]:
    """Replace Pillow's decompression-bomb check (a warning up to twice its limit,
    then its own error) by irformer's one limit, checked by :func:`_check_pixels`."""
    limit = max_image_pixels()
    previous = Image.MAX_IMAGE_PIXELS
    Image.MAX_IMAGE_PIXELS = None
    try:
        yield limit
    finally:
        Image.MAX_IMAGE_PIXELS = previous


def _check_pixels(path: Path, im: Image.Image, limit: int | None) -> None:
    w, h = im.size
    if limit is not None and w * h > limit:
        raise ImageTooLargeError(
            f"{path}: {w}x{h} = {w * h:,} pixels exceeds irformer's limit of {limit:,} "
            f"(a decompression bomb, or a genuinely huge image: raise the limit with "
            f"{MAX_IMAGE_PIXELS_ENV}=N, 0 for none)"
        )


def _open_validated(path: Path, data: bytes) -> Image.Image:
    """Open and fully decode with Pillow so truncation and corruption raise here."""
    try:
        with _pixel_limit() as limit:
            im = Image.open(io.BytesIO(data))
            _check_pixels(path, im, limit)
            im.load()
    except ImageReadError:
        raise
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"not a readable image file: {path}") from exc
    except (OSError, SyntaxError, ValueError, EOFError, Image.DecompressionBombError) as exc:
        raise ImageReadError(f"corrupt or truncated image {path}: {exc}") from exc
    if im.format not in _PIL_FORMATS:
        raise ImageReadError(
            f"unsupported image format {im.format} in {path}; expected PNG, BMP, TIFF or JPEG"
            + (" or WebP" if WEBP_READABLE else "")
        )
    return im


def _is_16bit_colour(im: Image.Image, data: bytes) -> bool:
    if im.mode not in ("RGB", "RGBA"):
        return False
    if im.format == "PNG":
        # IHDR starts at byte 8; bit depth is byte 24 of the file.
        return len(data) > 24 and data[24] == 16
    if im.format == "TIFF":
        bits = im.tag_v2.get(258)  # BitsPerSample
        bits = bits if isinstance(bits, tuple) else (bits,)
        return any(b == 16 for b in bits if b is not None)
    return False


def _decode(path: Path, data: bytes, im: Image.Image) -> np.ndarray:
    """Pixels as ``(H, W, C)`` uint8/uint16 in the file's own channels."""
    if _is_16bit_colour(im, data):
        arr = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
        if arr is None or arr.dtype != np.uint16:
            raise ImageReadError(f"could not decode 16-bit colour image {path}")
        code = cv2.COLOR_BGRA2RGBA if arr.shape[2] == 4 else cv2.COLOR_BGR2RGB
        return cv2.cvtColor(arr, code)
    mode = im.mode
    if mode == "P":
        im = im.convert("RGBA" if "transparency" in im.info else "RGB")
    elif mode == "PA":
        im = im.convert("RGBA")
    elif mode == "1":
        im = im.convert("L")
    elif mode in ("CMYK", "YCbCr"):
        im = im.convert("RGB")
    elif mode.startswith("I;16"):
        return np.asarray(im).astype(np.uint16)[..., None]
    elif mode == "I":
        arr = np.asarray(im)
        if arr.min() < 0 or arr.max() > 65535:
            raise ImageReadError(f"32-bit integer pixels outside 0..65535 in {path}")
        return arr.astype(np.uint16)[..., None]
    elif mode not in ("L", "LA", "RGB", "RGBA"):
        raise ImageReadError(
            f"unsupported pixel mode {mode!r} in {path}; expected 8/16-bit grey, RGB or RGBA"
        )
    arr = np.array(im)  # a writable copy (np.asarray of a PIL image is read-only)
    return arr[..., None] if arr.ndim == 2 else arr


def _convert_channels(arr: np.ndarray, channels: ChannelMode, path: Path) -> np.ndarray:
    c = arr.shape[2]
    if channels == "keep":
        return arr
    if c in (2, 4):
        warnings.warn(f"dropping alpha channel of {path}", AlphaDroppedWarning, stacklevel=3)
        arr = arr[..., : c - 1]
        c -= 1
    if channels == "rgb":
        return np.ascontiguousarray(np.repeat(arr, 3, axis=2)) if c == 1 else arr
    if channels == "grey":
        if c == 1:
            return arr
        return cv2.cvtColor(np.ascontiguousarray(arr), cv2.COLOR_RGB2GRAY)[..., None]
    raise ValueError(f"channels must be 'rgb', 'grey' or 'keep', got {channels!r}")


def split_alpha(image: np.ndarray) -> tuple[np.ndarray, np.ndarray | None]:
    """``(colour, alpha)`` of an ``(H, W, C)`` image: grey+alpha and RGBA give their last
    channel as ``(H, W, 1)`` alpha; grey and RGB give ``alpha=None``."""
    if image.ndim == 3 and image.shape[2] in (2, 4):
        return image[..., :-1], image[..., -1:]
    return image, None


def convert_channels(
    image: np.ndarray, channels: ChannelMode, *, source: str | Path = ""
) -> np.ndarray:
    """An image read with ``channels="keep"`` converted as :func:`read_image` would
    (see the module docstring; an alpha channel is dropped with a warning)."""
    return _convert_channels(image, channels, Path(source))


def read_image(path: str | Path, *, channels: ChannelMode = "rgb") -> np.ndarray:
    """Read an image file into ``(H, W, C)`` ``uint8`` or ``uint16`` (bit depth kept).

    ``channels`` selects the conversion described in the module docstring.
    Raises ``FileNotFoundError`` for a missing file and :class:`ImageReadError`
    (a ``ValueError``) naming the path for empty, truncated, corrupt or
    non-image files and unsupported formats.
    """
    path = Path(path)
    if channels not in ("rgb", "grey", "keep"):
        raise ValueError(f"channels must be 'rgb', 'grey' or 'keep', got {channels!r}")
    _check_readable_file(path)
    data = path.read_bytes()
    im = _open_validated(path, data)
    arr = _decode(path, data, im)
    return _convert_channels(arr, channels, path)


def image_size(path: str | Path) -> tuple[int, int]:
    """``(height, width)`` from the file header, without decoding the pixels.

    Used to validate datasets cheaply; raises like :func:`read_image` for
    empty or non-image files.
    """
    path = Path(path)
    _check_readable_file(path)
    try:
        with _pixel_limit() as limit, Image.open(path) as im:
            if im.format not in _PIL_FORMATS:
                raise ImageReadError(f"unsupported image format {im.format} in {path}")
            _check_pixels(path, im, limit)
            w, h = im.size
    except UnidentifiedImageError as exc:
        raise ImageReadError(f"not a readable image file: {path}") from exc
    except (OSError, SyntaxError) as exc:
        raise ImageReadError(f"corrupt image header in {path}: {exc}") from exc
    return h, w


def to_float32(image: np.ndarray) -> np.ndarray:
    """Integer image -> float32 in [0, 1] (divides by 255 or 65535); floats are cast to float32."""
    if image.dtype == np.uint8:
        return image.astype(np.float32) / np.float32(255.0)
    if image.dtype == np.uint16:
        return image.astype(np.float32) / np.float32(65535.0)
    if np.issubdtype(image.dtype, np.floating):
        return image.astype(np.float32, copy=False)
    raise TypeError(f"expected a uint8, uint16 or float image, got dtype {image.dtype}")


def quantize(image: np.ndarray, dtype: type[np.unsignedinteger] = np.uint8) -> np.ndarray:
    """Float image in [0, 1] -> ``uint8``/``uint16``: clip, scale, round half up.

    Rounding half away from zero (on clipped, non-negative values: half up) is
    MATLAB's ``im2uint8`` behaviour; it differs from ``np.round`` only on exact
    ties. NaN becomes 0 (a non-finite output is scored as black, not as
    whatever the cast happens to produce).
    """
    maxval = {np.uint8: 255.0, np.uint16: 65535.0}.get(dtype)
    if maxval is None:
        raise ValueError(f"quantize supports uint8 and uint16, got {dtype}")
    x = np.clip(np.nan_to_num(np.asarray(image, dtype=np.float64), nan=0.0), 0.0, 1.0) * maxval
    return np.floor(x + 0.5).astype(dtype)


def image_to_tensor(image: np.ndarray) -> torch.Tensor:
    """``(H, W, C)`` image (integer, or float in [0, 1]) -> float32 tensor ``(C, H, W)``."""
    if image.ndim == 2:
        image = image[..., None]
    if image.ndim != 3:
        raise ValueError(f"expected an (H, W, C) image, got shape {image.shape}")
    return torch.from_numpy(np.ascontiguousarray(to_float32(image).transpose(2, 0, 1)))


def tensor_to_image(tensor: torch.Tensor, dtype: type[np.unsignedinteger] = np.uint8) -> np.ndarray:
    """Float tensor ``(C, H, W)`` or ``(1, C, H, W)`` in [0, 1] -> quantised ``(H, W, C)`` image."""
    t = tensor.detach()
    if t.ndim == 4 and t.shape[0] == 1:
        t = t[0]
    if t.ndim != 3:
        raise ValueError(f"expected a (C, H, W) or (1, C, H, W) tensor, got shape {tuple(t.shape)}")
    return quantize(t.to(device="cpu", dtype=torch.float64).numpy().transpose(1, 2, 0), dtype)


def check_writable(
    path: str | Path, *, overwrite: bool = False, protected: Iterable[str | Path] = ()
) -> Path:
    """Validate an output path and create its parent folders.

    Refuses (:class:`OutputExistsError`) a path that is one of ``protected``
    (the inputs of the run) even with ``overwrite=True``, and an existing file
    unless ``overwrite=True``.
    """
    path = Path(path)
    resolved = path.resolve()
    for p in protected:
        if Path(p).resolve() == resolved:
            raise OutputExistsError(errno.EEXIST, "refusing to overwrite an input file", str(path))
    if path.exists():
        if path.is_dir():
            raise OutputExistsError(errno.EISDIR, "output path is a folder", str(path))
        if not overwrite:
            raise OutputExistsError(
                errno.EEXIST, "output exists (overwrite=True or --overwrite replaces it)", str(path)
            )
    path.parent.mkdir(parents=True, exist_ok=True)
    return path


def check_folder_writable(folder: str | Path) -> Path:
    """Create ``folder`` (with parents) and prove a file can be written in it.

    Called before a long job (training, a folder restore) so a read-only or
    foreign output folder fails at once, not after the work. Creates and
    deletes one empty temporary file; raises :class:`OutputNotWritableError`
    naming the folder.
    """
    folder = Path(folder)
    try:
        folder.mkdir(parents=True, exist_ok=True)
        fd, probe = tempfile.mkstemp(prefix=".irformer-write-check.", dir=folder)
        os.close(fd)
        os.unlink(probe)
    except FileExistsError:
        raise OutputNotWritableError(
            f"output folder {folder}: a file of that name (or in its path) is in the way"
        ) from None
    except OSError as exc:
        raise OutputNotWritableError(
            f"output folder {folder} is not writable: {exc.strerror or exc}"
        ) from None
    return folder


def write_image(
    path: str | Path,
    image: np.ndarray,
    *,
    overwrite: bool = False,
    protected: Sequence[str | Path] = (),
    jpeg_quality: int = 95,
) -> Path:
    """Write an ``(H, W, C)`` / ``(H, W)`` ``uint8``/``uint16`` RGB(A) or grey image.

    The format follows the suffix (PNG, BMP, TIFF, JPEG; 16-bit only PNG/TIFF).
    Float images are rejected: quantise explicitly with :func:`quantize`.
    Output folders are created; see :func:`check_writable` for the overwrite rules.
    """
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in IMAGE_SUFFIXES:
        raise ValueError(
            f"unsupported output suffix {suffix!r} for {path}; use one of {IMAGE_SUFFIXES}"
        )
    if image.dtype not in (np.uint8, np.uint16):
        raise TypeError(
            f"write_image expects uint8 or uint16 pixels, got {image.dtype} for {path}; "
            "quantise float images with irformer.data.io.quantize first"
        )
    if image.dtype == np.uint16 and suffix not in _WRITE_16BIT_SUFFIXES:
        raise ValueError(f"16-bit images can only be written as PNG or TIFF, not {path}")
    arr = image[..., None] if image.ndim == 2 else image
    if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4):
        raise ValueError(f"expected an (H, W) or (H, W, 1|3|4) image for {path}, got {image.shape}")
    if arr.shape[2] == 4 and suffix in (".jpg", ".jpeg"):
        raise ValueError(f"JPEG cannot store alpha; drop it before writing {path}")
    check_writable(path, overwrite=overwrite, protected=protected)
    if arr.shape[2] == 1:
        bgr = arr[..., 0]
    elif arr.shape[2] == 3:
        bgr = arr[..., ::-1]
    else:
        bgr = arr[..., [2, 1, 0, 3]]
    is_jpeg = suffix in (".jpg", ".jpeg")
    params = [int(cv2.IMWRITE_JPEG_QUALITY), int(jpeg_quality)] if is_jpeg else []
    ok, buf = cv2.imencode(suffix, np.ascontiguousarray(bgr), params)
    if not ok:
        raise RuntimeError(f"OpenCV failed to encode {path}")
    atomic_write(path, buf.tobytes())
    logger.debug("wrote %s", path)
    return path
