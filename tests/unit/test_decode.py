"""serving.decode: every accepted request form gives the pixels training sees; every bad one a RequestError with
the right status and a message naming the problem. Images are real PNG/JPEG bytes made with Pillow."""

from __future__ import annotations

import base64
import io
import json
import math
import struct
import time
import warnings
import zlib

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image, ImageFile

from serving.decode import InputSpec, RequestError, decode_image
from training.errors import ConfigError

GRAY = InputSpec((1, 28, 28))
COLOR = InputSpec((3, 28, 28))
RNG = np.random.default_rng(0)
GRAY_PIXELS = RNG.integers(0, 256, (28, 28), dtype=np.uint8)
COLOR_PIXELS = RNG.integers(0, 256, (28, 28, 3), dtype=np.uint8)
OPAQUE = np.full((28, 28, 1), 255, dtype=np.uint8)


def encode(image: Image.Image, fmt: str = "PNG", **options) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **options)
    return buffer.getvalue()


def png(array: np.ndarray) -> bytes:
    return encode(Image.fromarray(array))


def b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


def as_training(array: np.ndarray) -> torch.Tensor:
    """What the training loader makes of uint8 pixels [H, W] or [H, W, C]: [C, H, W], float32 divided by 255."""
    return torch.from_numpy(np.atleast_3d(array)).permute(2, 0, 1).float().div(255)


def palette_image(indices: np.ndarray, colours: list[tuple[int, int, int]]) -> Image.Image:
    image = Image.new("P", indices.shape[::-1])
    image.putpalette([value for colour in colours for value in colour])
    image.putdata(indices.flatten().tolist())
    return image


def with_ihdr(data: bytes, fields: bytes) -> bytes:
    """A PNG whose IHDR holds ``fields`` (13 bytes), with its CRC fixed so that Pillow still identifies it."""
    assert data[12:16] == b"IHDR" and len(fields) == 13
    return data[:16] + fields + struct.pack(">I", zlib.crc32(b"IHDR" + fields)) + data[33:]


def with_crc_flipped(data: bytes, kind: bytes) -> bytes:
    """The PNG with its first ``kind`` chunk's CRC inverted (the chunk's data untouched)."""
    start = data.index(kind) - 4
    end = start + 8 + struct.unpack(">I", data[start:start + 4])[0]
    return data[:end] + bytes(b ^ 0xFF for b in data[end:end + 4]) + data[end + 4:]


def declaring(width: int, height: int) -> bytes:
    """A small valid PNG whose header declares width x height."""
    return with_ihdr(PNG, struct.pack(">II", width, height) + PNG[24:29])


PNG = png(GRAY_PIXELS)
JPEG = encode(Image.fromarray(GRAY_PIXELS), "JPEG")


def assert_rejects(payload, status: int, fragment: str, spec: InputSpec = GRAY) -> RequestError:
    with pytest.raises(RequestError) as info:
        decode_image(payload, spec)
    assert info.value.status == status, info.value.message
    assert fragment in info.value.message
    return info.value


# ----------------------------------------------------------------------------------------------
# Accepted


GRAY_16 = RNG.integers(0, 65536, (28, 28)).astype(np.uint16)
GRAY_PALETTE = [(i, i, i) for i in range(256)]
COLOR_PALETTE = [tuple(colour) for colour in RNG.integers(0, 256, (256, 3)).tolist()]
DECODED = {
    "gray to gray": (png(GRAY_PIXELS), GRAY, as_training(GRAY_PIXELS)),
    "16-bit gray": (png(GRAY_16), GRAY, torch.from_numpy(GRAY_16.astype(np.float32)).div(65535)[None]),
    "bilevel": (png(GRAY_PIXELS > 127), GRAY, as_training((GRAY_PIXELS > 127).astype(np.uint8) * 255)),
    "gray palette": (encode(palette_image(GRAY_PIXELS, GRAY_PALETTE)), GRAY, as_training(GRAY_PIXELS)),
    "RGB of equal channels to gray": (png(np.dstack([GRAY_PIXELS] * 3)), GRAY, as_training(GRAY_PIXELS)),
    "opaque gray+alpha to gray": (png(np.dstack([GRAY_PIXELS, OPAQUE])), GRAY, as_training(GRAY_PIXELS)),
    "RGB to colour": (png(COLOR_PIXELS), COLOR, as_training(COLOR_PIXELS)),
    "gray to colour": (png(GRAY_PIXELS), COLOR, as_training(GRAY_PIXELS).expand(3, -1, -1)),
    "opaque RGBA to colour": (png(np.dstack([COLOR_PIXELS, OPAQUE])), COLOR, as_training(COLOR_PIXELS)),
    "colour palette": (encode(palette_image(GRAY_PIXELS, COLOR_PALETTE)), COLOR,
                       as_training(np.array(COLOR_PALETTE, dtype=np.uint8)[GRAY_PIXELS])),
    "non-square": (png(GRAY_PIXELS[:20]), InputSpec((1, 20, 28)), as_training(GRAY_PIXELS[:20])),
}


@pytest.mark.parametrize("name", DECODED)
def test_png_decodes_to_the_training_pixels_exactly(name):
    data, spec, expected = DECODED[name]
    image = decode_image(data, spec)
    assert image.dtype == np.float32 and image.flags.c_contiguous
    assert torch.equal(torch.from_numpy(image), expected)


SMOOTH = np.add.outer(np.arange(28), np.arange(28)).astype(np.uint8) * 4


@pytest.mark.parametrize(("array", "spec"), [(SMOOTH, GRAY), (np.dstack([SMOOTH, SMOOTH[::-1], SMOOTH.T]), COLOR)])
def test_jpeg_decodes_close_to_its_source(array, spec):
    image = decode_image(encode(Image.fromarray(array), "JPEG", quality=95), spec)
    assert image.shape == spec.shape and image.dtype == np.float32
    assert torch.allclose(torch.from_numpy(image), as_training(array), atol=0.05)


ENCODED_FORMS = {
    "bytearray": bytearray(PNG),
    "base64 text": b64(PNG),
    "MIME base64 with line breaks": base64.encodebytes(PNG).decode(),
    "data URL": "data:image/png;base64," + b64(PNG),
    "image field, other options ignored": {"image": b64(PNG), "mode": "robust", "top_k": 3, "head": None},
    "image field with a data URL": {"image": "data:image/png;base64," + b64(PNG)},
    "JSON bytes": json.dumps({"image": b64(PNG)}).encode(),
    "JSON text after whitespace": f'\n  {{"image": "{b64(PNG)}"}}',
}


@pytest.mark.parametrize("form", ENCODED_FORMS)
def test_every_encoded_form_gives_the_same_image(form):
    assert torch.equal(torch.from_numpy(decode_image(ENCODED_FORMS[form], GRAY)), as_training(GRAY_PIXELS))


PIXEL_LAYOUTS = {  # name: (source image [H, W(, C)], spec, its pixel values in that layout)
    "[H, W]": (GRAY_PIXELS, GRAY, GRAY_PIXELS / 255),
    "[C, H, W] gray": (GRAY_PIXELS, GRAY, GRAY_PIXELS[None] / 255),
    "[H, W, C] gray": (GRAY_PIXELS, GRAY, GRAY_PIXELS[:, :, None] / 255),
    "[1, C, H, W] gray": (GRAY_PIXELS, GRAY, GRAY_PIXELS[None, None] / 255),
    "[C, H, W] colour": (COLOR_PIXELS, COLOR, COLOR_PIXELS.transpose(2, 0, 1) / 255),
    "[H, W, C] colour": (COLOR_PIXELS, COLOR, COLOR_PIXELS / 255),
    "[1, C, H, W] colour": (COLOR_PIXELS, COLOR, COLOR_PIXELS.transpose(2, 0, 1)[None] / 255),
}
WRAPPERS = {
    "list": lambda pixels: pixels,
    "pixels field": lambda pixels: {"pixels": pixels, "k": 5},
    "JSON bytes": lambda pixels: json.dumps(pixels).encode(),
    "JSON text": lambda pixels: json.dumps({"pixels": pixels}),
}


@pytest.mark.parametrize("wrap", WRAPPERS)
@pytest.mark.parametrize("layout", PIXEL_LAYOUTS)
def test_pixel_arrays_equal_the_png_of_the_same_image(layout, wrap):
    source, spec, values = PIXEL_LAYOUTS[layout]
    image = decode_image(WRAPPERS[wrap](values.tolist()), spec)
    assert image.dtype == np.float32 and np.array_equal(image, decode_image(png(source), spec))


def test_pixel_arrays_take_integers_0_and_1():
    assert np.array_equal(decode_image([[0, 1], [1, 0.5]], InputSpec((1, 2, 2))),
                          np.array([[[0.0, 1.0], [1.0, 0.5]]], dtype=np.float32))


def test_a_cube_shaped_model_takes_only_the_batch_layout():
    spec = InputSpec((3, 3, 3))
    values = np.arange(27).reshape(1, 3, 3, 3) / 27
    assert np.array_equal(decode_image(values.tolist(), spec), values[0].astype(np.float32))
    assert_rejects(values[0].tolist(), 400, "expected a pixel array of shape [1, 3, 3, 3] for this model", spec)


def test_input_spec_normalises_and_validates():
    spec = InputSpec([1, 28, 28])
    assert spec.shape == (1, 28, 28) and spec.max_json_values == 4 * 28 * 28
    with pytest.raises(ConfigError, match="1 or 3 channels"):
        InputSpec((4, 28, 28))


# ----------------------------------------------------------------------------------------------
# Refused


def with_entry(value) -> list:
    """GRAY's valid [H, W] pixel array with entry [3][5] replaced."""
    pixels = (GRAY_PIXELS / 255).tolist()
    pixels[3][5] = value
    return pixels


def with_row(row) -> list:
    """GRAY's valid [H, W] pixel array with row [3] replaced."""
    pixels = (GRAY_PIXELS / 255).tolist()
    pixels[3] = row
    return pixels


SMALL_LIMITS = InputSpec((1, 28, 28), max_bytes=1000)
REJECTED = {  # name: (payload, spec, status, message fragment)
    "empty bytes": (b"", GRAY, 400, "empty image"),
    "empty text": ("", GRAY, 400, "empty image"),
    "not an image": (b"hello, world", GRAY, 415, "expected a PNG or JPEG image (or JSON), got 12 bytes"),
    "GIF": (encode(Image.fromarray(GRAY_PIXELS), "GIF"), GRAY, 415, "starting b'GIF8"),
    "base64 of a non-image": (b64(b"hello, world"), GRAY, 415, "expected a PNG or JPEG image"),
    "truncated PNG": (PNG[: PNG.index(b"IDAT") + 100], GRAY, 400, "the PNG image is truncated or corrupt"),
    "truncated JPEG": (JPEG[: JPEG.index(b"\xff\xda") + 100], GRAY, 400, "the JPEG image is truncated or corrupt"),
    "wrong size": (png(np.zeros((32, 32), np.uint8)), GRAY, 400, "expected a 28x28 image (width x height), got 32x32"),
    "wrong height": (png(GRAY_PIXELS[:20]), GRAY, 400, "got 28x20"),
    "colour to gray": (png(COLOR_PIXELS), GRAY, 400, "takes grayscale (1-channel) images, got a colour RGB image"),
    "colour palette to gray": (encode(palette_image(GRAY_PIXELS, COLOR_PALETTE)), GRAY, 400, "colour RGB image"),
    "transparent RGBA": (png(np.dstack([COLOR_PIXELS, OPAQUE - 1])), COLOR, 400, "RGBA image has transparent pixels"),
    "transparent gray": (png(np.dstack([GRAY_PIXELS, OPAQUE // 2])), GRAY, 400, "LA image has transparent pixels"),
    "transparent palette": (encode(palette_image(GRAY_PIXELS, GRAY_PALETTE), transparency=int(GRAY_PIXELS[0, 0])),
                            GRAY, 400, "RGBA image has transparent pixels"),
    "CMYK JPEG": (encode(Image.new("CMYK", (28, 28)), "JPEG"), COLOR, 400, "unsupported image mode CMYK"),
    "invalid base64": ("not base64!", GRAY, 400, "invalid base64"),
    "data URL without base64": ("data:image/png,%89PNG", GRAY, 400, "expected a base64 data URL"),
    "base64 over max_bytes": (b64(bytes(1001)), SMALL_LIMITS, 413,
                              "the base64-decoded image has 1001 bytes, more than the limit of 1000"),
    # Pillow checks no IDAT CRC (it decoded the changed pixels), and a bad IHDR CRC was "not a PNG" (415).
    "PNG with a bad IDAT CRC": (with_crc_flipped(PNG, b"IDAT"), GRAY, 400, "b'IDAT' chunk at byte 33 does not match"),
    "PNG with a bad IHDR CRC": (with_crc_flipped(PNG, b"IHDR"), GRAY, 400, "b'IHDR' chunk at byte 8 does not match"),
    "PNG cut inside a chunk": (PNG[:PNG.index(b"IDAT") + 100], GRAY, 400, "runs past the end of the file"),
    "PNG without IEND": (PNG[:PNG.index(b"IEND") - 4], GRAY, 400, "before its IEND chunk"),
    "JPEG with a broken header": (JPEG[:4] + b"\x00" * 40, GRAY, 400, "the JPEG image header is truncated or corrupt"),
    "invalid JSON": (b'{"image": ', GRAY, 400, "invalid JSON"),
    "JSON repeating a key": (b'{"pixels": [0.5], "pixels": [0.5]}', GRAY, 400, "gives 'pixels' more than once"),
    "JSON with more values than a request holds": (b"[" + b"0," * (4 * 784 + 65) + b"0]", GRAY, 413,
                                                  "the JSON body has 3201 commas"),
    "JSON nested past the recursion limit": (b"[" * 100_000, GRAY, 400, "invalid JSON"),
    "JSON over its limit": (json.dumps({"image": "A" * 200_000}), SMALL_LIMITS, 413, "the JSON body has 200013"),
    "NaN in JSON text": (json.dumps({"pixels": with_entry(math.nan)}).encode(), GRAY, 400, "pixels[3][5] is nan"),
    "NaN": (with_entry(math.nan), GRAY, 400, "pixels[3][5] is nan, expected a number in [0, 1]"),
    "inf": (with_entry(math.inf), GRAY, 400, "is inf, expected a number in [0, 1]"),
    "-inf": (with_entry(-math.inf), GRAY, 400, "is -inf, expected"),
    "above 1": (with_entry(1.5), GRAY, 400, "is 1.5, expected a number in [0, 1] (divide 0-255 values by 255)"),
    "0-255 scale": (with_entry(255), GRAY, 400, "is 255, expected a number in [0, 1] (divide"),
    "negative": (with_entry(-0.1), GRAY, 400, "is -0.1, expected a number in [0, 1]"),
    "huge integer": (with_entry(10**5000), GRAY, 400, "is an integer of 16610 bits"),
    "bool": (with_entry(True), GRAY, 400, "pixels[3][5] is true, expected a number"),
    "string": (with_entry("0.5"), GRAY, 400, "pixels[3][5] is the string '0.5', expected a number"),
    "null": (with_entry(None), GRAY, 400, "is null, expected a number"),
    "list for a number": (with_entry([0.5]), GRAY, 400, "pixels[3][5] is a list of length 1, expected a number"),
    "short row": (with_row([0.5] * 27), GRAY, 400, "pixels[3] has 27 entries, expected 28"),
    "number for a row": (with_row(0.5), GRAY, 400, "pixels[3] is 0.5, expected a list of 28"),
    "nested too deep": ([[[[[0.5]]]]], GRAY, 400, "nests deeper than 4 levels"),
    "wrong shape": ((GRAY_PIXELS[:27] / 255).tolist(), GRAY, 400, "got shape [27, 28]"),
    "[H, W] for a colour model": ((GRAY_PIXELS / 255).tolist(), COLOR, 400,
                                  "expected a pixel array of shape [1, 3, 28, 28] or [3, 28, 28] or [28, 28, 3]"),
    "empty array": ([], GRAY, 400, "got shape [0]"),
    "too many values": ([[0.5] * (4 * 28 * 28 + 1)], GRAY, 413, "the pixel array has 3137 values"),
    "image not a string": ({"image": 5}, GRAY, 400, '"image" must be a base64 string of a PNG or JPEG, got 5'),
    "image null": ({"image": None}, GRAY, 400, "got null"),
    "image a list": ({"image": [b64(PNG)]}, GRAY, 400, "got a list of length 1"),
    "pixels a string": ({"pixels": "abc"}, GRAY, 400,
                        """"pixels" must be a nested list of numbers in [0, 1], got the string 'abc'"""),
    "no image field": ({"mode": "robust"}, GRAY, 400, ('exactly one of "image" (a base64 PNG or JPEG) and "pixels" '
                                                       "(a nested list of numbers in [0, 1]), got keys ['mode']")),
    "data is no alias": ({"data": b64(PNG)}, GRAY, 400, "got keys ['data']"),
    "both fields": ({"image": b64(PNG), "pixels": with_entry(0.5)}, GRAY, 400, "got keys ['image', 'pixels']"),
    "a number": (5, GRAY, 400, "expected image bytes, base64 text, a JSON object or a pixel array, got 5"),
    "None": (None, GRAY, 400, "got null"),
}


@pytest.mark.parametrize("name", REJECTED)
def test_bad_requests_are_refused_with_a_status_and_the_reason(name):
    payload, spec, status, fragment = REJECTED[name]
    assert isinstance(assert_rejects(payload, status, fragment, spec), ValueError)


def test_truncated_images_are_not_loaded_leniently():
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False  # else Pillow pads truncated images with gray


@pytest.mark.parametrize("encoded", [bytes, b64], ids=["raw", "base64"])
def test_a_50_mb_payload_is_refused_before_decoding(monkeypatch, encoded):
    decoded = []
    monkeypatch.setattr(Image, "open", lambda *args, **kwargs: decoded.append("image"))
    monkeypatch.setattr(base64, "b64decode", lambda *args, **kwargs: decoded.append("base64"))
    size = 50 * 2**20
    assert_rejects(encoded(PNG[:16] + bytes(size - 16)), 413, f"has {size} bytes, more than the limit of {8 * 2**20}")
    assert decoded == []


@pytest.mark.parametrize(("width", "height", "fragment"), [
    (100_000, 100_000, "too many pixels to decode"),  # Pillow's DecompressionBombError
    (10_000, 10_000, "too many pixels to decode"),  # Pillow's DecompressionBombWarning, made an error
    (5_000, 5_000, "the 5000x5000 image has 25000000 pixels, more than the limit of 16777216"),  # max_pixels
])
def test_decompression_bombs_are_refused_from_the_header(width, height, fragment):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        start = time.perf_counter()
        assert_rejects(declaring(width, height), 413, fragment)
    assert time.perf_counter() - start < 1  # decoding 10^10 pixels would take minutes, or all memory
    assert not [warning for warning in caught if issubclass(warning.category, Image.DecompressionBombWarning)]


# ----------------------------------------------------------------------------------------------
# Fuzz: whatever arrives, the answer is a valid image tensor or a RequestError


FUZZ_SPEC = InputSpec((1, 8, 8))
FUZZ_PNG = png(GRAY_PIXELS[:8, :8])
FUZZ_JPEG = encode(Image.fromarray(GRAY_PIXELS[:8, :8]), "JPEG")
FUZZ = settings(max_examples=100, deadline=None, database=None)

json_leaves = (st.none() | st.booleans() | st.integers() | st.floats() | st.text(max_size=12)
               | st.sampled_from([b64(FUZZ_PNG), "data:image/png;base64," + b64(FUZZ_PNG), 0.0, 1.0]))
json_values = st.recursive(
    json_leaves,
    lambda children: (st.lists(children, max_size=9)
                      | st.dictionaries(st.sampled_from(["image", "pixels", "mode", "top_k"]) | st.text(max_size=4),
                                        children, max_size=4)),
    max_leaves=80,
)


def assert_image_or_refusal(payload) -> None:
    try:
        image = decode_image(payload, FUZZ_SPEC)
    except RequestError as error:
        assert error.status in (400, 413, 415) and error.message
        return
    assert image.dtype == np.float32 and image.shape == FUZZ_SPEC.shape
    assert 0 <= image.min() and image.max() <= 1


@st.composite
def near_valid_pixels(draw) -> object:
    """An 8x8 array of values in [0, 1], maybe with one entry replaced, in some layout and wrapping."""
    pixels = draw(st.lists(st.lists(st.floats(0, 1), min_size=8, max_size=8), min_size=8, max_size=8))
    if draw(st.booleans()):
        pixels[draw(st.integers(0, 7))][draw(st.integers(0, 7))] = draw(json_values)
    pixels = draw(st.sampled_from([pixels, [pixels], [[pixels]], [[[value] for value in row] for row in pixels]]))
    return draw(st.sampled_from([pixels, {"pixels": pixels}, json.dumps(pixels).encode()]))


@st.composite
def mutated_images(draw) -> bytes:
    """FUZZ_PNG or FUZZ_JPEG with a rewritten (CRC-correct) PNG header and/or bytes flipped, cut or inserted."""
    data = draw(st.sampled_from([FUZZ_PNG, FUZZ_JPEG]))
    if data is FUZZ_PNG and draw(st.booleans()):
        size = st.sampled_from([8, 7, 2**31 - 1]) | st.integers(0, 2**32 - 1)
        depth_and_colour = st.sampled_from([1, 2, 4, 8, 16]) | st.integers(0, 255)
        fields = struct.pack(">IIBB", draw(size), draw(size), draw(depth_and_colour), draw(depth_and_colour))
        compression_filter_interlace = st.sampled_from([bytes(3), b"\0\0\1"]) | st.binary(min_size=3, max_size=3)
        data = with_ihdr(data, fields + draw(compression_filter_interlace))
    data = bytearray(data)
    for _ in range(draw(st.integers(0, 4))):
        if not data:
            break
        at = draw(st.integers(0, len(data) - 1))
        mutation = draw(st.sampled_from(["flip", "cut", "insert"]))
        if mutation == "flip":
            data[at] ^= 1 << draw(st.integers(0, 7))
        elif mutation == "cut":
            del data[at:]
        else:
            data[at:at] = draw(st.binary(min_size=1, max_size=8))
    return bytes(data)


@FUZZ
@given(st.binary(max_size=200) | st.text(max_size=200))
def test_fuzz_arbitrary_bytes_and_text(payload):
    assert_image_or_refusal(payload)


@FUZZ
@given(json_values)
def test_fuzz_arbitrary_json_values(payload):
    assert_image_or_refusal(payload)
    assert_image_or_refusal(json.dumps(payload))


@FUZZ
@given(near_valid_pixels())
def test_fuzz_near_valid_pixel_arrays(payload):
    assert_image_or_refusal(payload)


@settings(FUZZ, max_examples=200)
@given(mutated_images())
def test_fuzz_mutated_png_and_jpeg(payload):
    assert_image_or_refusal(payload)
