"""Pictures in and out: PIL image <-> tensor in [-1, 1]."""
import os

import numpy as np
import torch
from PIL import Image, ImageOps, UnidentifiedImageError

from ..errors import MinleditsError, shorten
from .files import require_regular

ACCEPTED = "a path, a binary file object, a PIL image, or an H x W x 3 (or H x W, H x W x 4) uint8 numpy array"
MAX_STRETCH = 1.5  # the most keep_aspect may stretch a picture's aspect ratio (sides rounded to multiples of 64)
MAX_PIXELS = 2**25  # width x height of any picture read (33.5 megapixels: 8K UHD fits), checked before decoding


class PictureError(MinleditsError, ValueError):
    """A picture that cannot be read: empty, not a picture, truncated, or over MAX_PIXELS."""


def check_pixels(width: int, height: int, name="the picture") -> None:
    """Refuse a picture of no pixels or of more than MAX_PIXELS, from its size alone (a header, before decoding)."""
    if width * height == 0:
        raise PictureError(f"{name} is {width}x{height} px: a picture has pixels")
    if width * height > MAX_PIXELS:
        raise PictureError(f"{name} is {width}x{height} px ({width * height / 1e6:.0f} megapixels), over the limit "
                           f"of {MAX_PIXELS / 1e6:.1f} megapixels for any picture read (a decompression bomb, or a "
                           "picture to scale down first)")


def decode(image) -> Image.Image:
    """A picture file (path or binary file object) opened and decoded, after check_pixels on its header; an empty,
    unreadable, truncated or oversized file is one PictureError line naming it."""
    name = shorten(str(image), 500) if isinstance(image, (str, os.PathLike)) else "the picture"
    try:
        im = Image.open(image)
        check_pixels(*im.size, name)
        im.load()  # a truncated or corrupt file fails here, not later
    except PictureError:
        raise
    except Image.DecompressionBombError:
        raise PictureError(f"{name} has more pixels than Pillow opens (a decompression bomb), over the limit of "
                           f"{MAX_PIXELS / 1e6:.1f} megapixels for any picture read") from None
    except UnidentifiedImageError:
        empty = isinstance(image, (str, os.PathLike)) and os.path.getsize(image) == 0
        raise PictureError(f"{name} is {'empty (0 bytes)' if empty else 'not a picture Pillow can read'}") from None
    except (OSError, SyntaxError, ValueError) as e:
        if isinstance(e, OSError) and e.filename:  # cannot be opened at all (missing, unreadable): as it is
            raise
        raise PictureError(f"{name} is truncated or damaged ({' '.join(str(e).split())}): save it again") from None
    return im


def open_rgb(image) -> Image.Image:
    """An image (ACCEPTED), upright (EXIF), as 8-bit RGB; transparency composited on white."""
    if isinstance(image, np.ndarray):
        if image.dtype != np.uint8 or not (image.ndim == 2 or image.ndim == 3 and image.shape[2] in (3, 4)):
            raise TypeError(f"an image array must be H x W x 3 (or H x W, H x W x 4) uint8, got "
                            f"{' x '.join(map(str, image.shape))} {image.dtype}")
        check_pixels(image.shape[1], image.shape[0], "the image array")
        im = Image.fromarray(image)
    elif isinstance(image, (str, os.PathLike)) or hasattr(image, "read"):
        if not hasattr(image, "read") and os.path.exists(image):  # a named pipe would block open() for ever
            require_regular(image, "the image")
        im = decode(image)
    elif isinstance(image, Image.Image):
        check_pixels(*image.size, "the PIL image")
        im = image
    else:
        raise TypeError(f"an image is {ACCEPTED}; got {type(image).__name__}")
    im.load()
    im = ImageOps.exif_transpose(im)
    if im.mode in ("I;16", "I;16B", "I;16L", "I"):  # 16/32-bit greyscale: keep the top 8 bits of a 16-bit range
        im = Image.fromarray((np.asarray(im, dtype=np.float64) / 257.0).clip(0, 255).astype(np.uint8))
    if im.mode == "P":
        im = im.convert("RGBA")
    if im.mode in ("RGBA", "LA", "PA"):
        im = Image.alpha_composite(Image.new("RGBA", im.size, "white"), im.convert("RGBA"))
    return im.convert("RGB")


def fit_size(width: int, height: int, size: int, keep_aspect: bool) -> tuple[int, int]:
    """The (w, h) the image is resized to: size x size, or the longest side = size, sides multiples of 64 (refused
    where that stretches its aspect ratio more than MAX_STRETCH times)."""
    if not keep_aspect:
        return size, size
    scale = size / max(width, height)
    w, h = (max(64, round(side * scale / 64) * 64) for side in (width, height))
    if max(stretch := (w / h) / (width / height), 1 / stretch) > MAX_STRETCH:
        raise PictureError(f"a {width}x{height} px picture cannot keep its aspect ratio at size {size}: it would be "
                           f"{w}x{h} (sides are multiples of 64), stretched {max(stretch, 1 / stretch):.1f} times: "
                           "give a larger size, or leave out keep-aspect to centre-crop")
    return w, h


def to_tensor(image, size: int = 512, keep_aspect: bool = False) -> torch.Tensor:
    """Centre-crop to a square (unless keep_aspect), resize with PIL, map to [-1, 1]: [1, 3, H, W] float32."""
    im = open_rgb(image)
    if not keep_aspect:
        side = min(im.size)
        left, top = (im.width - side) // 2, (im.height - side) // 2
        im = im.crop((left, top, left + side, top + side))
    im = im.resize(fit_size(*im.size, size, keep_aspect), Image.Resampling.BICUBIC)
    x = torch.from_numpy(np.asarray(im, dtype=np.float32)).permute(2, 0, 1)[None]
    return x / 127.5 - 1


def to_pil(x: torch.Tensor) -> list[Image.Image]:
    """[B, 3, H, W] in about [-1, 1] -> PIL images."""
    x = ((x.float() / 2 + 0.5).clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    return [Image.fromarray(a) for a in x]
