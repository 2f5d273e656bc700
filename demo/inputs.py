"""Any image a user brings, turned into what the served models take (28x28 gray for Fashion-MNIST).

``convert_file`` (an upload), ``convert_drawing`` (the sketchpad) and ``convert_image`` (any decoded
image) return the model input as 8-bit pixels plus every conversion step as a captioned picture, so
the page can show how a photo became a 28x28 input. The input stays on the 8-bit grid from here on:
the pixels the attack starts from are exactly the pixels of the PNG that goes over REST.

Fashion-MNIST items are light objects centred on a black background and filling the frame; a
photo or a drawing is usually the opposite (dark on white, anywhere in the picture). So the steps
are: flatten transparency onto white, gray, invert when the border is light, crop to the object,
pad to a square, resize.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from training.errors import RobustServeError

MAX_UPLOAD_BYTES = 5 * 1024 * 1024
MAX_SIDE = 4096
STEP_THUMBNAIL = 256  # the steps are shown, not processed, at this size: a 4096 px original stays out of the page
OBJECT_CONTRAST = 0.3  # after inversion, the object is this share of the way from the background to the brightest pixel
MARGIN = 2 / 28  # Fashion-MNIST leaves about two pixels of background around an item


class InputError(RobustServeError, ValueError):
    """An image the demo refuses; the message says why and what is accepted."""


@dataclass
class ModelInput:
    """The model's input as 8-bit pixels [H, W] (gray), and how it was made."""

    pixels: np.ndarray  # uint8 [H, W]
    steps: list[tuple[Image.Image, str]] = field(default_factory=list)
    label: str | None = None  # the true class, when the image comes from the test set

    @property
    def unit(self) -> np.ndarray:
        """Pixels in [0, 1], [1, H, W]: what the models and attacks take."""
        return self.pixels[None].astype(np.float32) / 255


def _thumbnail(image: Image.Image) -> Image.Image:
    shown = image.copy()
    shown.thumbnail((STEP_THUMBNAIL, STEP_THUMBNAIL))
    return shown


def _check_size(width: int, height: int) -> None:
    if width > MAX_SIDE or height > MAX_SIDE:
        raise InputError(f"the image is {width}x{height} pixels; the demo takes at most {MAX_SIDE}x{MAX_SIDE}")
    if width < 1 or height < 1:
        raise InputError("the image is empty")


def convert_file(path: str | Path, size: tuple[int, int] = (28, 28)) -> ModelInput:
    """An uploaded file (any format Pillow reads, <= 5 MB, <= 4096x4096) as the model's input."""
    path = Path(path)
    nbytes = path.stat().st_size
    if nbytes > MAX_UPLOAD_BYTES:
        raise InputError(f"the file is {nbytes / 2**20:.1f} MB; the demo takes images up to "
                         f"{MAX_UPLOAD_BYTES / 2**20:.0f} MB")
    try:
        with Image.open(path) as image:
            _check_size(*image.size)  # from the header, before any pixel is decoded
            described = f"uploaded: {image.format or 'image'} {image.width}x{image.height} {image.mode}"
            image.load()
            return convert_image(ImageOps.exif_transpose(image), size, first_caption=described)
    except (UnidentifiedImageError, Image.DecompressionBombError) as err:
        raise InputError(f"{path.name} is not an image the demo can read: {_without_folder(err, path)}") from None
    except OSError as err:  # truncated or corrupt data
        raise InputError(f"{path.name} could not be decoded: {_without_folder(err, path)}") from None


def _without_folder(err: Exception, path: Path) -> str:
    """Pillow's message with the upload's path cut to its file name: the folder is the server's temporary one."""
    message = str(err)
    for shown in {str(path), str(path.absolute()), str(path.resolve())}:
        message = message.replace(shown, path.name)
    return message


def convert_drawing(sketch: dict[str, Any] | None, size: tuple[int, int] = (28, 28)) -> ModelInput:
    """Gradio's sketchpad value (its ``composite``: the layers flattened, RGBA) as the model's input."""
    composite = (sketch or {}).get("composite")
    if composite is None or np.asarray(composite)[..., -1].max() == 0:
        raise InputError("the sketchpad is empty: draw something first")
    return convert_image(np.asarray(composite), size)


def convert_image(image: Image.Image | np.ndarray, size: tuple[int, int] = (28, 28), *,
                  first_caption: str | None = None) -> ModelInput:
    """Any decoded image (a PIL image, or an array as Gradio's sketchpad gives it) as the model's input."""
    if isinstance(image, np.ndarray):
        image = Image.fromarray(image)
    _check_size(*image.size)
    caption = first_caption or f"input: {image.width}x{image.height} {image.mode}"
    if image.mode in ("I", "F") or image.mode.startswith("I;16"):  # more than 8 bits: Pillow's "L" would clip
        levels = np.asarray(image, dtype=np.float64)
        stretched = (levels - levels.min()) / max(float(np.ptp(levels)), 1e-12) * 255
        image, caption = Image.fromarray(stretched.round().astype(np.uint8)), f"{caption}, stretched to 8 bits"
    steps = [(_thumbnail(image), caption)]

    def step(picture: Image.Image, caption: str) -> Image.Image:
        steps.append((_thumbnail(picture), caption))
        return picture

    if image.mode in ("RGBA", "LA", "PA") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        image = step(Image.alpha_composite(Image.new("RGBA", rgba.size, "white"), rgba),
                     "transparency flattened onto white")
    gray = image if image.mode == "L" else step(image.convert("L"), "grayscale")
    pixels = np.asarray(gray, dtype=np.float64) / 255
    border = np.concatenate([pixels[0], pixels[-1], pixels[:, 0], pixels[:, -1]])
    if border.mean() > 0.5:
        pixels, border = 1 - pixels, 1 - border
        step(Image.fromarray((pixels * 255).round().astype(np.uint8)), "inverted: Fashion-MNIST is light on dark")
    # The object: what stands out from the background level, above its noise (JPEG artefacts, dithering).
    background = float(border.mean())
    rows, cols = np.nonzero(pixels > background + OBJECT_CONTRAST * (pixels.max() - background))
    if len(rows):
        pixels = pixels[rows.min():rows.max() + 1, cols.min():cols.max() + 1]
        step(Image.fromarray((pixels * 255).round().astype(np.uint8)), "cropped to the object")
    side = round(max(pixels.shape) * (1 + 2 * MARGIN))
    square = np.zeros((side, side))
    top, left = (side - pixels.shape[0]) // 2, (side - pixels.shape[1]) // 2
    square[top:top + pixels.shape[0], left:left + pixels.shape[1]] = pixels
    padded = step(Image.fromarray((square * 255).round().astype(np.uint8)), "padded to a square")
    resized = padded.resize(size, Image.Resampling.LANCZOS, reducing_gap=3.0)
    steps.append((resized, f"resized to {size[0]}x{size[1]}: the model's input"))
    return ModelInput(np.asarray(resized, dtype=np.uint8).copy(), steps)
