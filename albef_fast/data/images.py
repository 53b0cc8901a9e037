"""Reading one training image, whatever state it is in: from a file or a webdataset shard member, decoded
with PIL (CPU backend) or validated and handed over encoded (DALI backends).

Every failure is classified (`BadSampleError.kind`, see `quality.EVENTS`) so that the dataset can
replace the sample and count the event:

| input                                   | PIL backend                   | DALI backends                       |
|-----------------------------------------|-------------------------------|-------------------------------------|
| missing file                            | replaced ("missing")          | same                                |
| zero bytes, not an image, corrupt header| replaced ("unreadable")       | same                                |
| truncated (data ends early)             | replaced ("truncated")        | JPEG without its end marker / PNG   |
|                                         |                               | without IEND is decoded on the host |
|                                         |                               | to decide: replaced if it fails     |
| corrupt image data                      | replaced ("unreadable")       | as DALI reports it: the batch is    |
|                                         |                               | decoded by the PIL twin instead     |
| more than PIL's bomb limit (~179 MP)    | replaced ("too_large")        | same                                |
| very large but allowed JPEG             | decoded at 1/2..1/8 scale by  | header size > 40 MP: decoded on the |
|                                         | libjpeg (`draft`), no quality | host at reduced scale, handed over  |
|                                         | lost at the output size       | as PNG ("transcoded")               |
| grayscale, CMYK, palette, alpha, 16-bit | converted to RGB              | JPEG L/RGB and PNG L/RGB/RGBA go    |
|                                         | ("converted_mode"); alpha is  | raw (DALI converts); the others are |
|                                         | dropped as ALBEF's convert    | converted on the host and handed    |
|                                         | ("RGB") does                  | over as PNG ("transcoded")          |
| other formats (GIF, WebP, BMP, TIFF)    | decoded by PIL                | converted on the host as above      |

ALBEF sets `ImageFile.LOAD_TRUNCATED_IMAGES = True`, which pads a truncated JPEG with grey and trains
on it; here a truncated image is replaced instead (its caption describes an image that is not there).
"""

from __future__ import annotations

import io
import struct
from pathlib import Path

import numpy as np
from PIL import Image

__all__ = ["BadSampleError", "ImageReadError", "decode_rgb", "encoded_image", "load_rgb", "read_image_bytes"]

# Headers whose pixel count is above this are shrunk on the host before DALI sees them (a 40 MP
# image is 120 MB decoded; GPU decoders have their own limits and gain nothing at a 256 px output).
DALI_MAX_PIXELS = 40_000_000
_RAW_FOR_DALI = {"JPEG": ("RGB", "L"), "PNG": ("RGB", "RGBA", "L")}
_DECODE_ERRORS = (OSError, ValueError, SyntaxError, EOFError, struct.error, IndexError, Image.DecompressionBombError)


class ImageReadError(OSError):
    """An image file could not be opened or decoded (the message names the file)."""


class BadSampleError(ImageReadError):
    """A training image that cannot be used; `kind` is its `quality.EVENTS` category."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


def _classify(e: BaseException) -> str:
    if isinstance(e, FileNotFoundError):
        return "missing"
    if isinstance(e, Image.DecompressionBombError):
        return "too_large"
    if "truncated" in str(e) or isinstance(e, EOFError):
        return "truncated"
    return "unreadable"


def read_image_bytes(path: str, member: tuple[int, int] | None = None) -> bytes:
    """The encoded bytes of an image file, or of a member of a webdataset shard.

    Args:
        path: image file, or the shard for a member.
        member: (byte offset, byte length) inside the shard, or None for a plain file.
    Returns:
        the bytes (non-empty).
    Raises:
        BadSampleError: missing, empty or cut short (the message names the file).
    """
    name = path if member is None else f"{path} (member at byte {member[0]})"
    try:
        with open(path, "rb") as f:
            if member is None:
                data = f.read()
            else:
                f.seek(member[0])
                data = f.read(member[1])
                if len(data) != member[1]:
                    raise BadSampleError("truncated", f"image {name}: {len(data)} of {member[1]} bytes (shard cut)")
    except FileNotFoundError:
        raise BadSampleError("missing", f"image {name} does not exist") from None
    except BadSampleError:
        raise
    except OSError as e:
        raise BadSampleError("unreadable", f"cannot read image {name}: {type(e).__name__}: {e}") from e
    if not data:
        raise BadSampleError("unreadable", f"image {name} is empty (0 bytes)")
    return data


def decode_rgb(data: bytes, name: str, *, min_side: int | None = None) -> tuple[Image.Image, bool]:
    """Decode encoded image bytes to an 8-bit RGB PIL image.

    Args:
        data: the encoded file.
        name: for messages.
        min_side: if given, a JPEG is decoded at the smallest 1/2, 1/4 or 1/8 scale (libjpeg DCT scaling,
            PIL `draft`) that keeps its shorter side >= min_side: large photos decode several times faster.
    Returns:
        (RGB image, whether the mode had to be converted).
    Raises:
        BadSampleError: undecodable, truncated or over PIL's pixel limit.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:
            mode = im.mode
            if min_side is not None and im.format == "JPEG" and min(im.size) >= 2 * min_side:
                im.draft("RGB", (min_side, min_side))
            if mode == "RGBA" or mode == "LA" or (mode == "P" and "transparency" in im.info):
                # Drop alpha the way ALBEF's convert("RGB") does (the colour under it is kept).
                rgb = im.convert("RGBA").convert("RGB") if mode == "P" else im.convert("RGB")
            else:
                rgb = im.convert("RGB")  # loads the pixels: truncation and corrupt data surface here
    except _DECODE_ERRORS as e:
        raise BadSampleError(_classify(e), f"cannot decode image {name}: {type(e).__name__}: {e}") from e
    return rgb, mode != "RGB"


def load_rgb(path: str | Path) -> Image.Image:
    """Read and decode an image file to RGB (evaluation; training goes through the dataset).

    Raises:
        ImageReadError: missing, unreadable or undecodable (the message names the file).
    """
    return decode_rgb(read_image_bytes(str(path)), str(path))[0]


def _looks_complete(data: bytes, fmt: str) -> bool:
    tail = data[-4096:]
    if fmt == "JPEG":
        return b"\xff\xd9" in tail  # the end-of-image marker (a few files carry trailing bytes after it)
    if fmt == "PNG":
        return b"IEND" in tail
    return False


def encoded_image(data: bytes, name: str, *, min_side: int) -> tuple[np.ndarray, int, int, str | None]:
    """Validate encoded bytes for the DALI decoder, converting on the host what DALI should not see.

    Args:
        data: the encoded file.
        name: for messages.
        min_side: the output needs at least this shorter side (used when a huge image is shrunk).
    Returns:
        (1-D uint8 array of the bytes to decode, width, height of what they decode to, event) where
        event is None, "converted_mode" (handed over raw, DALI converts to RGB) or "transcoded".
    Raises:
        BadSampleError: as `decode_rgb`.
    """
    try:
        with Image.open(io.BytesIO(data)) as im:  # parses the header only
            fmt, mode, (width, height) = im.format, im.mode, im.size
    except _DECODE_ERRORS as e:
        raise BadSampleError(_classify(e), f"cannot decode image {name}: {type(e).__name__}: {e}") from e
    raw_ok = mode in _RAW_FOR_DALI.get(fmt or "", ()) and width * height <= DALI_MAX_PIXELS
    if raw_ok and _looks_complete(data, fmt):
        return np.frombuffer(data, dtype=np.uint8), width, height, (None if mode == "RGB" else "converted_mode")
    # Not for DALI as it is, or possibly truncated: decode here (raises on truncation / corruption).
    rgb, _ = decode_rgb(data, name, min_side=min_side)
    if raw_ok:  # complete after all (trailing bytes after the end marker): hand over the original
        return np.frombuffer(data, dtype=np.uint8), width, height, (None if mode == "RGB" else "converted_mode")
    buf = io.BytesIO()
    rgb.save(buf, format="PNG", compress_level=1)  # lossless; level 1 is fast and the file is short-lived
    return np.frombuffer(buf.getvalue(), dtype=np.uint8), rgb.width, rgb.height, "transcoded"
