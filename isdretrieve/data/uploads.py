"""Images from untrusted bytes (uploads): capped in bytes and in pixels before anything is decoded.

    image = decode_untrusted(data, max_bytes=8 << 20, max_pixels=40_000_000)

The pixel count comes from the file's header (``Image.open`` reads no pixel data), so a decompression
bomb (a small file that claims a huge canvas) is refused without being decoded. Only common still-image
formats are parsed; the first frame of an animation is used.
"""

from __future__ import annotations

import io
import warnings

from PIL import Image

from isdretrieve.errors import ImageTooLarge, NotAnImage

FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF", "PPM")


def decode_untrusted(data: bytes, *, max_bytes: int, max_pixels: int) -> Image.Image:
    """``data`` decoded as an RGB image; ImageTooLarge over ``max_bytes`` bytes or ``max_pixels`` pixels,
    NotAnImage when it is no image (or a corrupt one)."""
    if len(data) > max_bytes:
        raise ImageTooLarge(f"image upload is over the {max_bytes:,}-byte limit")
    if not data:
        raise NotAnImage("the upload is empty, not an image")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=FORMATS) as img:
                width, height = img.size
                if width * height > max_pixels:
                    raise ImageTooLarge(
                        f"image of {width} x {height} pixels is over the {max_pixels:,}-pixel limit"
                    )
                img.seek(0)
                return img.convert("RGB")
    except Image.DecompressionBombError as exc:
        raise ImageTooLarge(f"image refused as a decompression bomb: {exc}") from None
    except ImageTooLarge:
        raise
    except Image.UnidentifiedImageError:
        raise NotAnImage(f"the upload is not an image ({', '.join(FORMATS)})") from None
    except Exception as exc:  # PIL raises many types for corrupt or unknown data
        message = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise NotAnImage(f"the upload is not a readable image ({message})") from None
