"""Turn one inference request into one image tensor, or into a ``RequestError`` the HTTP layer replies with.

``decode_image(payload, spec)`` returns a float32 array ``[C, H, W]`` in [0, 1] of exactly ``spec.shape``.
Nothing here imports TorchServe, torch or model code, so every handler and the tests share one definition of a
valid request.

Accepted payloads
-----------------
* bytes: an encoded PNG or JPEG, told apart by its signature. No other format is tried, so that fewer of
  Pillow's parsers see untrusted bytes; every chunk of a PNG has its CRC checked first (Pillow checks only
  some). Bytes that start with ``{`` or ``[`` (after whitespace) are JSON text and decoded as below.
* str: base64 of a PNG or JPEG (line breaks allowed), or a ``data:image/png;base64,...`` URL; or JSON text.
* dict (a JSON object): exactly one of ``"image"`` (a str as above, without the JSON case) and ``"pixels"``
  (a pixel array as for list). Other keys are request options handled elsewhere and ignored here.
  ``"data"`` is not an alias of ``"image"``: TorchServe names a request's raw body ``data``, so accepting it
  would let a handler that forgot to unwrap the request work by accident.
* list (a JSON array): pixel values shaped ``[C, H, W]``, ``[H, W, C]``, ``[1, C, H, W]``, or ``[H, W]`` for a
  1-channel model. ``[H, W, C]`` and ``[C, H, W]`` are both refused where they read alike (C == H == W > 1):
  send ``[1, C, H, W]`` then. Values are numbers (booleans are not), finite and in [0, 1]. 0-255 values are
  refused, not rescaled: no rule tells a nearly black 0-255 image (only 0s and 1s) from a [0, 1] one.

Images
------
* The size must be exactly the spec's H x W: nothing is resized. A multi-frame file gives its first frame.
* 8-bit values are divided by 255, 16-bit grayscale (Pillow mode I;16) by 65535. Bilevel images count as
  grayscale, palette images as the colours their palette holds. EXIF orientation is not applied.
* A 1-channel model takes grayscale, and RGB whose three channels are equal everywhere (gray saved as RGB);
  real colour is refused, as any weighting of R, G and B into gray would be a guess. A 3-channel model takes
  RGB, and grayscale replicated to three channels.
* An alpha channel (LA, RGBA, palette transparency) is dropped only when every pixel is fully opaque:
  transparency would need a background colour nobody specified. CMYK and every other mode are refused.
* Truncated files are refused: Pillow's ``ImageFile.LOAD_TRUNCATED_IMAGES`` keeps its default, False, and
  nothing in the server may turn it on (it would pad a truncated image with gray instead).

JSON text
---------
``parse_json`` is the one JSON parser for requests. Before the parser sees a byte it refuses text longer than
``InputSpec.max_json_bytes`` and text with more separators (commas) than a request can need: any JSON body
holds at most ``max_json_values`` (the pixel array's limit) plus a few dozen values, and every value after the
first needs a comma, so the parser never builds more objects than that. An object that repeats a key is refused.

Status codes
------------
* 400: malformed or mismatched input: empty, invalid JSON or base64, repeated JSON keys, wrong field types, a
  corrupt or truncated PNG or JPEG (a bad chunk CRC included), the wrong size, channels, shape or values.
* 413: a limit exceeded: encoded bytes (raw, or after base64), JSON text or its number of values, declared
  width x height (read from the header before any pixel is decoded, so a decompression bomb costs nothing;
  Pillow's own ``Image.MAX_IMAGE_PIXELS`` check applies too), number of values in a pixel array.
* 415: an image that is neither PNG nor JPEG (by its signature): raw bytes that are not JSON either, or the
  base64 of such bytes.
"""

from __future__ import annotations

import base64
import io
import json
import math
import re
import reprlib
import warnings
import zlib
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from training.errors import ConfigError, RobustServeError

IMAGE_FORMATS = ("PNG", "JPEG")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
JPEG_SIGNATURE = b"\xff\xd8\xff"  # SOI, then the first marker
# Values a JSON body may hold beside a pixel array's: the object around it and the request's parameters.
JSON_OTHER_VALUES = 64
# Pillow modes whose values are indices or bits, and the mode they expand to (palette RGBA keeps transparency).
_EXPANDED_MODES = {"1": "L", "P": "RGBA"}
# Modes taken as they are, each with the value of white.
_WHITE = {"L": 255, "LA": 255, "RGB": 255, "RGBA": 255, "I;16": 65535}
_ALPHA_MODES = ("LA", "RGBA")
# JSON object fields that carry the image: the type each needs, and that type in words.
_IMAGE_FIELDS = {"image": (str, "a base64 string of a PNG or JPEG"),
                 "pixels": (list, "a nested list of numbers in [0, 1]")}
_MAX_PIXEL_DIMS = 4  # the deepest accepted layout, [1, C, H, W]
_JSON_START = re.compile(r"[ \t\r\n]*[{\[]")  # JSON's own whitespace, then an object or an array
_JSON_START_BYTES = re.compile(_JSON_START.pattern.encode())


class RequestError(RobustServeError, ValueError):
    """A request the server refuses; ``status`` is the HTTP status (400 bad input, 413 too large, 415 unsupported
    type) and ``message`` says what was expected and what was received."""

    def __init__(self, message: str, status: int = 400) -> None:
        super().__init__(message)
        self.message = message
        self.status = status


@dataclass(frozen=True)
class InputSpec:
    """What one model takes, and the limits on a request for it.

    ``shape`` is (channels, height, width) with 1 or 3 channels, pixels in [0, 1]. ``max_bytes`` limits an encoded
    image (raw, or after base64); ``max_pixels`` the width x height an image header declares; ``max_json_values``
    the numbers in a pixel array (None: 4 * C*H*W; an accepted array holds C*H*W, so only a grossly oversized one
    is refused as too large rather than as mis-shaped). The JSON text limit follows from max_bytes and this.
    """

    shape: tuple[int, int, int]
    max_bytes: int = 8 * 1024 * 1024
    max_pixels: int = 4096 * 4096
    max_json_values: int | None = None

    @property
    def max_json_bytes(self) -> int:
        """The longest JSON body: room for a base64 image of max_bytes or a pretty-printed pixel array of
        max_json_values, plus 64 KiB of other fields."""
        assert self.max_json_values is not None  # set by __post_init__
        return 4 * (self.max_bytes // 3 + 1) + 32 * self.max_json_values + 65536

    @property
    def max_json_separators(self) -> int:
        """The most commas a JSON body may hold: one per value after the first, for a pixel array of
        max_json_values and the values around it."""
        assert self.max_json_values is not None
        return self.max_json_values + JSON_OTHER_VALUES

    def __post_init__(self) -> None:
        shape = tuple(self.shape)
        if len(shape) != 3 or shape[0] not in (1, 3) or min(shape) < 1:
            raise ConfigError(f"InputSpec.shape must be (channels, height, width) with 1 or 3 channels, got {shape}")
        # A tuple whatever the caller passed: the size checks compare slices of it with tuples.
        object.__setattr__(self, "shape", shape)
        if self.max_json_values is None:
            object.__setattr__(self, "max_json_values", 4 * math.prod(shape))


def decode_image(payload: bytes | bytearray | str | dict[str, Any] | list[Any], spec: InputSpec) -> np.ndarray:
    """One request's image as a C-contiguous float32 array [C, H, W] in [0, 1] matching spec.shape.

    Raises ``RequestError`` for every bad payload; the accepted forms and the rules are in the module docstring.
    """
    if isinstance(payload, (bytes, bytearray)):  # no copy: a body may be as large as the frontend lets through
        return _decode_json(payload, spec) if is_json_text(payload) else _decode_encoded(payload, spec)
    if isinstance(payload, str):
        if is_json_text(payload):
            return _decode_json(payload, spec)
        return _decode_encoded(_decode_base64(payload, spec), spec)
    if isinstance(payload, dict):
        return _decode_fields(payload, spec)
    if isinstance(payload, list):
        return _decode_pixels(payload, spec)
    raise RequestError(f"expected image bytes, base64 text, a JSON object or a pixel array, got {_describe(payload)}")


def png_bytes(pixels: Any) -> bytes:
    """One image as PNG bytes: grayscale (``[H, W]`` or ``[1, H, W]``) or RGB (``[3, H, W]``), a torch tensor (any
    device) or a numpy array, of floats in [0, 1] (rounded to the nearest 8-bit level, half to even) or of uint8.

    The encoding side of ``decode_image``: for pixels on the 8-bit grid, ``decode_image(png_bytes(x), spec)`` gives
    ``x`` back. Every PNG the project makes from pixels (the benchmarks' requests, the curl example image, the demo's
    images) comes from here, so what is sent is what the runtime decodes.
    """
    if hasattr(pixels, "detach"):  # a torch tensor: duck-typed, so this stays numpy + Pillow
        pixels = pixels.detach().cpu().numpy()
    array = np.asarray(pixels)
    if array.dtype != np.uint8:
        array = np.clip(np.round(array * 255), 0, 255).astype(np.uint8)
    if array.ndim == 3 and array.shape[0] in (1, 3):
        array = array[0] if array.shape[0] == 1 else np.ascontiguousarray(array.transpose(1, 2, 0))
    elif array.ndim != 2:
        raise ValueError(f"png_bytes takes [H, W], [1, H, W] or [3, H, W] pixels, got shape {list(array.shape)}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")  # 2-D uint8: mode L; H x W x 3: RGB
    return buffer.getvalue()


# ----------------------------------------------------------------------------------------------
# Text: JSON, fields, base64


def is_json_text(text: str | bytes | bytearray) -> bool:
    # Neither base64 nor a PNG or JPEG signature can start with these, so the test is unambiguous. A match, not
    # lstrip(), which would copy the whole body.
    pattern = _JSON_START_BYTES if isinstance(text, bytes | bytearray) else _JSON_START
    return pattern.match(text) is not None


def parse_json(text: str | bytes | bytearray, spec: InputSpec) -> Any:
    """A request's JSON text, parsed only if its size and its number of values are within ``spec``'s limits
    (413 otherwise) and refused (400) when it is not JSON or an object in it repeats a key."""
    _check_limit(len(text), spec.max_json_bytes, "the JSON body", "bytes" if isinstance(text, bytes | bytearray)
                 else "characters")
    separators = text.count(b"," if isinstance(text, bytes | bytearray) else ",")
    _check_limit(separators, spec.max_json_separators, "the JSON body", "commas (one per value after the first)")
    try:
        return json.loads(text, object_pairs_hook=_object_without_repeated_keys)
    except RequestError:  # a repeated key; a ValueError too, so it must not be caught as bad syntax below
        raise
    except (ValueError, RecursionError) as error:  # bad syntax or UTF-8, over-long integers, absurd nesting
        raise RequestError(f"invalid JSON (it does not parse): {error}") from None


def _object_without_repeated_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """A JSON object as a dict, refusing repeated keys: json keeps the last value of a repeated key silently."""
    found = dict(pairs)
    if len(found) < len(pairs):
        seen: set[str] = set()
        repeated = sorted({key for key, _ in pairs if key in seen or seen.add(key)})  # type: ignore[func-returns-value]
        raise RequestError(f"the JSON body gives {', '.join(map(reprlib.repr, repeated))} more than once; "
                           "give each key once")
    return found


def _decode_json(text: str | bytes | bytearray, spec: InputSpec) -> np.ndarray:
    return decode_image(parse_json(text, spec), spec)


def _decode_fields(fields: dict[str, Any], spec: InputSpec) -> np.ndarray:
    given = [key for key in _IMAGE_FIELDS if key in fields]
    if len(given) != 1:
        raise RequestError('expected a JSON object with exactly one of "image" (a base64 PNG or JPEG) and "pixels" '
                           f"(a nested list of numbers in [0, 1]), got keys {reprlib.repr(list(fields))}")
    key = given[0]
    value = fields[key]
    expected_type, expected = _IMAGE_FIELDS[key]
    if not isinstance(value, expected_type):
        raise RequestError(f'"{key}" must be {expected}, got {_describe(value)}')
    if key == "image":
        return _decode_encoded(_decode_base64(value, spec), spec)
    return _decode_pixels(value, spec)


def _decode_base64(text: str, spec: InputSpec) -> bytes:
    if text.startswith("data:"):
        header, _, text = text.partition(",")
        if not header.endswith(";base64"):
            raise RequestError("expected a base64 data URL such as 'data:image/png;base64,...', "
                               f"got one starting {header[:40]!r}")
    compact = "".join(text.split())  # MIME base64 wraps lines
    # The decoded size, known before decoding (exact for valid base64).
    size = len(compact) // 4 * 3 - compact[-2:].count("=")
    _check_limit(size, spec.max_bytes, "the base64-decoded image", "bytes")
    try:
        return base64.b64decode(compact, validate=True)
    except ValueError as error:  # binascii.Error, or non-ASCII text
        raise RequestError(f"expected base64 of a PNG or JPEG image, got invalid base64 ({error})") from None


# ----------------------------------------------------------------------------------------------
# Encoded images


def _decode_encoded(data: bytes | bytearray, spec: InputSpec) -> np.ndarray:
    """An encoded PNG or JPEG as the model's array; limits and size are checked before any pixel is decoded."""
    if not data:
        raise RequestError("empty image: expected the bytes of a PNG or JPEG image, got 0 bytes")
    _check_limit(len(data), spec.max_bytes, "the encoded image", "bytes")
    image_format = _image_format(data)
    if image_format == "PNG":
        _check_png_chunks(data)
    with _open(data, image_format) as image:
        width, height = image.size
        _check_limit(width * height, spec.max_pixels, f"the {width}x{height} image", "pixels")
        if (height, width) != spec.shape[1:]:
            raise RequestError(f"expected a {spec.shape[2]}x{spec.shape[1]} image (width x height), "
                               f"got {width}x{height}: resize it before sending")
        try:
            image.load()
        # Bad data makes Pillow's decoders raise OSError, SyntaxError, ValueError, EOFError, struct.error...: no
        # documented list, and every one of them means the same here.
        except Exception as error:  # noqa: BLE001
            raise RequestError(f"the {image_format} image is truncated or corrupt ({error})") from None
        return _image_array(image, spec.shape[0])


def _image_format(data: bytes | bytearray) -> str:
    """PNG or JPEG, from the file's signature: anything else is a 415, and a broken file of either a 400."""
    if data.startswith(PNG_SIGNATURE):
        return "PNG"
    if data.startswith(JPEG_SIGNATURE):
        return "JPEG"
    raise RequestError(f"expected a PNG or JPEG image (or JSON), got {len(data)} bytes starting {bytes(data[:8])!r}",
                       status=415)


def _check_png_chunks(data: bytes | bytearray) -> None:
    """Every chunk up to IEND is whole and matches its CRC. Pillow checks the CRC of the chunks before the pixels
    but not of IDAT, so a PNG whose pixel data was changed in transit would decode to other pixels."""
    view, offset = memoryview(data), len(PNG_SIGNATURE)
    while True:
        if offset + 12 > len(data):
            raise RequestError(f"the PNG image is truncated or corrupt: it ends at byte {len(data)} before its "
                               "IEND chunk")
        length = int.from_bytes(view[offset:offset + 4], "big")
        kind = bytes(view[offset + 4:offset + 8])
        end = offset + 8 + length
        if end + 4 > len(data):
            raise RequestError(f"the PNG image is truncated or corrupt: its {kind!r} chunk of {length} bytes at "
                               f"byte {offset} runs past the end of the file ({len(data)} bytes)")
        if zlib.crc32(view[offset + 4:end]) != int.from_bytes(view[end:end + 4], "big"):
            raise RequestError(f"the PNG image is truncated or corrupt: its {kind!r} chunk at byte {offset} does "
                               "not match its CRC")
        if kind == b"IEND":
            return
        offset = end + 4


def _open(data: bytes | bytearray, image_format: str) -> Image.Image:
    """Read the header only (Pillow's open is lazy): mode and declared size."""
    try:
        # Pillow only warns between MAX_IMAGE_PIXELS and twice that; make the warning an error so that no
        # bomb passes as a log line. catch_warnings swaps process-wide filters, which is safe here because
        # a TorchServe worker process handles one batch at a time.
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            return Image.open(io.BytesIO(data), formats=(image_format,))
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as error:
        raise RequestError(f"the image declares too many pixels to decode ({error})", status=413) from None
    # The signature said PNG or JPEG, so whatever the parser trips on (UnidentifiedImageError included) is a
    # broken file of a supported type.
    except Exception as error:  # noqa: BLE001
        raise RequestError(f"the {image_format} image header is truncated or corrupt ({error})") from None


def _image_array(image: Image.Image, channels: int) -> np.ndarray:
    """A loaded image as [channels, H, W] in [0, 1], converting only what is unambiguous (see the module docstring)."""
    if image.mode in _EXPANDED_MODES:
        image = image.convert(_EXPANDED_MODES[image.mode])
    mode = image.mode
    if mode not in _WHITE:
        raise RequestError(f"unsupported image mode {mode}: send a grayscale or RGB image "
                           "(8-bit, or 16-bit grayscale PNG)")
    # float32 division by white, as the training data loader does, so a PNG gives the training pixels exactly.
    values = (np.atleast_3d(np.asarray(image, dtype=np.float32)) / np.float32(_WHITE[mode])).transpose(2, 0, 1)
    if mode in _ALPHA_MODES:
        if values[-1].min() < 1:
            raise RequestError(f"the {mode} image has transparent pixels, and this model has no alpha channel: "
                               "flatten it onto a background and send it without alpha")
        values = values[:-1]
    if len(values) == channels:
        return np.ascontiguousarray(values)
    if len(values) == 1:  # gray to a colour model
        return np.repeat(values, channels, axis=0)
    if (values == values[:1]).all():  # gray saved as RGB, to a grayscale model
        return np.ascontiguousarray(values[:1])
    raise RequestError("this model takes grayscale (1-channel) images, got a colour RGB image: "
                       "convert it to grayscale (mode L) before sending")


# ----------------------------------------------------------------------------------------------
# Pixel arrays


def _decode_pixels(pixels: list[Any], spec: InputSpec) -> np.ndarray:
    shape = _probe_shape(pixels)
    _check_limit(math.prod(shape), spec.max_json_values, "the pixel array", "values")
    layouts = _pixel_layouts(spec.shape)
    if shape not in layouts:
        accepted = " or ".join(str(list(layout)) for layout in layouts)
        raise RequestError(f"expected a pixel array of shape {accepted} for this model, got shape {list(shape)}")
    # Only a checked list becomes an array: ragged lists and bad values are found without building one.
    _check_values(pixels, shape, "pixels")
    values = np.array(pixels, dtype=np.float32)
    if layouts[shape]:
        values = values.transpose(2, 0, 1)
    return np.ascontiguousarray(values.reshape(spec.shape))


def _probe_shape(pixels: list[Any]) -> tuple[int, ...]:
    """The shape the array has if it is rectangular, read along first elements; ``_check_values`` checks the rest."""
    shape: list[int] = []
    node: Any = pixels
    while isinstance(node, list):
        if len(shape) == _MAX_PIXEL_DIMS:
            raise RequestError(f"the pixel array nests deeper than {_MAX_PIXEL_DIMS} levels; "
                               "expected [C, H, W], [H, W, C] or [1, C, H, W]")
        shape.append(len(node))
        node = node[0] if node else None
    return tuple(shape)


def _pixel_layouts(shape: tuple[int, int, int]) -> dict[tuple[int, ...], bool]:
    """The accepted shapes of a pixel array for a model's (C, H, W), each with whether it is channels-last."""
    c, h, w = shape
    layouts = {(1, c, h, w): False}
    # (C, H, W) == (H, W, C) only when C == H == W: then a 3-D array could be either (harmless for 1x1x1).
    if (c, h, w) != (h, w, c) or c == 1:
        layouts.update({(c, h, w): False, (h, w, c): True})
    if c == 1:
        layouts[(h, w)] = False
    return layouts


def _check_values(node: list[Any], shape: tuple[int, ...], where: str) -> None:
    """Raise unless ``node`` is a rectangular array of ``shape`` holding numbers in [0, 1]."""
    if len(node) != shape[0]:
        raise RequestError(f"{where} has {len(node)} entries, expected {shape[0]}: a pixel array must be rectangular")
    if len(shape) == 1:
        for i, value in enumerate(node):
            # NaN fails the comparison too; bool is an int to Python but not a pixel value to anyone.
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 <= value <= 1:
                hint = " (divide 0-255 values by 255)" if isinstance(value, (int, float)) and value > 1 else ""
                raise RequestError(f"{where}[{i}] is {_describe(value)}, expected a number in [0, 1]{hint}")
        return
    for i, child in enumerate(node):
        if not isinstance(child, list):
            raise RequestError(f"{where}[{i}] is {_describe(child)}, expected a list of {shape[1]}: "
                               "a pixel array must be rectangular")
        _check_values(child, shape[1:], f"{where}[{i}]")


# ----------------------------------------------------------------------------------------------
# Messages


def _check_limit(size: int, limit: int, what: str, unit: str) -> None:
    if size > limit:
        raise RequestError(f"{what} has {size} {unit}, more than the limit of {limit}", status=413)


def _describe(value: object) -> str:
    """A received value, briefly, for an error message: never a huge repr, nor one that raises."""
    if value is None or isinstance(value, bool):
        return json.dumps(value)  # null, true, false: what the client wrote
    if isinstance(value, int) and value.bit_length() > 64:
        return f"an integer of {value.bit_length()} bits"  # repr() refuses ints over 4300 digits
    if isinstance(value, (int, float)):
        return repr(value)
    if isinstance(value, str):
        return f"the string {reprlib.repr(value)}"
    if isinstance(value, (list, dict, bytes, bytearray)):
        return f"a {type(value).__name__} of length {len(value)}"
    return f"a {type(value).__name__}"


# -- request parameters ------------------------------------------------------------------------

def option_text(value: Any) -> Any:
    """TorchServe hands query and form values as bytes; everything else is already JSON-typed."""
    return value.decode("utf-8", "replace") if isinstance(value, bytes | bytearray) else value


def parse_integer(name: str, value: Any, low: int, high: int) -> int:
    """A request parameter as an integer in [low, high], or a 400 that says so."""
    value = option_text(value)
    text = value.strip() if isinstance(value, str) else ""
    # ASCII digits only: str.isdigit() also accepts e.g. "²", which int() refuses; and at most 18 of them, so
    # that int() never meets Python's 4300-digit limit (either would raise ValueError: a 500, not a 400).
    digits = 0 < len(text) <= 18 and text.isascii() and text.isdigit()
    if isinstance(value, bool) or not (isinstance(value, int) or digits):
        raise RequestError(f"{name} must be an integer from {low} to {high}, got {reprlib.repr(value)}")
    number = int(value)
    if not low <= number <= high:
        raise RequestError(f"{name} must be from {low} to {high}, got {number}")
    return number
