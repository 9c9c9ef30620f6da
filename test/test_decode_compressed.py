"""Tests for decoding sensor_msgs/CompressedImage (jpeg, png) to numpy: round trips, headers read
without decoding, crafted and mutated headers, size limits and downscaling, OpenCV's limits."""

import os
import struct
import subprocess
import sys
import zlib

import cv2
import numpy as np
import pytest
from codecutil import compressed_msg, encode, random_rgb, smooth_rgb
from sensor_msgs.msg import CompressedImage

from ovseg_ros.ros import decode_compressed
from ovseg_ros.ros.decode import OVERSIZE_MODES, ImageDecodeError
from ovseg_ros.ros.decode_compressed import compressed_to_rgb

# rosidl_parser (inside the ROS wheels) imports lark, which imports the deprecated sre_* modules.
pytestmark = pytest.mark.filterwarnings("ignore:module 'sre_:DeprecationWarning")


@pytest.mark.parametrize("fmt", ["jpeg", "rgb8; jpeg compressed bgr8", "JPEG", ""])
def test_compressed_jpeg_round_trip(fmt):
    rgb = smooth_rgb(48, 64)
    out = compressed_to_rgb(compressed_msg(encode(rgb, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95), fmt))
    assert out.shape == rgb.shape and out.dtype == np.uint8 and out.flags.c_contiguous
    diff = np.abs(out.astype(int) - rgb.astype(int))
    assert diff.mean() < 2.0 and diff.max() <= 24
    # Channel order: red rises left to right, green top to bottom.
    assert out[24, -1, 0] > 200 and out[24, 0, 0] < 40
    assert out[-1, 32, 1] > 200 and out[0, 32, 1] < 40


@pytest.mark.parametrize("fmt", ["png", "bgr8; png compressed bgr8", ""])
@pytest.mark.parametrize("height,width", [(1, 1), (7, 13), (480, 640)])
def test_compressed_png_round_trip_exact(fmt, height, width):
    rgb = random_rgb(height, width, seed=9)
    out = compressed_to_rgb(compressed_msg(encode(rgb, ".png"), fmt))
    np.testing.assert_array_equal(out, rgb)


def test_compressed_png_alpha_and_gray():
    rgb = random_rgb(7, 13, seed=2)
    rgba = np.concatenate([rgb, np.full((7, 13, 1), 10, np.uint8)], axis=-1)
    ok, buf = cv2.imencode(".png", cv2.cvtColor(rgba, cv2.COLOR_RGBA2BGRA))
    np.testing.assert_array_equal(compressed_to_rgb(compressed_msg(buf.tobytes(), "png")), rgb)
    gray = rgb[..., 0]
    ok, buf = cv2.imencode(".png", gray)
    out = compressed_to_rgb(compressed_msg(buf.tobytes(), "mono8; png compressed mono8"))
    np.testing.assert_array_equal(out, np.repeat(gray[..., None], 3, axis=-1))


def test_compressed_through_serialization():
    from rclpy.serialization import deserialize_message, serialize_message

    rgb = random_rgb(7, 13, seed=6)
    sent = compressed_msg(encode(rgb, ".png"), "png")
    received = deserialize_message(serialize_message(sent), CompressedImage)
    np.testing.assert_array_equal(compressed_to_rgb(received), rgb)


def test_compressed_without_imread_color_rgb(monkeypatch):
    """OpenCV before 4.10 (Humble's 4.5) has no IMREAD_COLOR_RGB: decode BGR, then swap."""
    monkeypatch.setattr(decode_compressed, "_IMREAD_RGB", None)
    rgb = random_rgb(7, 13, seed=7)
    np.testing.assert_array_equal(
        compressed_to_rgb(compressed_msg(encode(rgb, ".png"), "png")), rgb
    )
    with pytest.raises(ImageDecodeError, match="corrupt"):
        compressed_to_rgb(compressed_msg(b"not an image", "jpeg"))


def test_compressed_jpeg_exif_orientation_is_ignored():
    """A camera JPEG tagged 'rotate 90' keeps its pixel grid (it must match camera_info)."""
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:, :20] = 255
    jpeg = encode(rgb, ".jpg")
    # APP1 Exif segment with a single IFD0 entry: Orientation (0x0112), SHORT, value 6.
    tiff = b"MM\x00*" + struct.pack(">I", 8) + struct.pack(">H", 1)
    tiff += struct.pack(">HHIHH", 0x0112, 3, 1, 6, 0) + struct.pack(">I", 0)
    payload = b"Exif\x00\x00" + tiff
    tagged = jpeg[:2] + b"\xff\xe1" + struct.pack(">H", len(payload) + 2) + payload + jpeg[2:]
    assert cv2.imdecode(np.frombuffer(tagged, np.uint8), cv2.IMREAD_COLOR).shape == (40, 20, 3)
    out = compressed_to_rgb(compressed_msg(tagged, "jpeg"))
    assert out.shape == (20, 40, 3)
    assert out[:, :18].min() > 200 and out[:, 22:].max() < 50


@pytest.mark.parametrize("fmt", ["jpeg", "png", ""])
def test_compressed_rejects_empty(fmt):
    with pytest.raises(ImageDecodeError, match="has no data"):
        compressed_to_rgb(compressed_msg(b"", fmt))


def test_compressed_rejects_corrupt():
    garbage = np.random.default_rng(0).integers(0, 256, 500, dtype=np.uint8).tobytes()
    with pytest.raises(ImageDecodeError, match=r"\(500 bytes\) is not valid jpeg data"):
        compressed_to_rgb(compressed_msg(garbage, "jpeg"))
    png = encode(random_rgb(32, 32), ".png")
    with pytest.raises(ImageDecodeError, match="'png'.*corrupt or truncated"):
        compressed_to_rgb(compressed_msg(png[: len(png) // 2], "png"))
    jpeg = encode(smooth_rgb(32, 32), ".jpg")
    broken = jpeg[:2] + garbage
    with pytest.raises(ImageDecodeError, match="corrupt"):
        compressed_to_rgb(compressed_msg(broken, "rgb8; jpeg compressed bgr8"))


@pytest.mark.parametrize("fmt", ["h264", "theora", "16UC1; compressedDepth png", "bgr8; tiff"])
def test_compressed_rejects_unsupported_format(fmt):
    data = encode(random_rgb(4, 4), ".png")
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, fmt))
    text = str(err.value)
    assert f"'{fmt}'" in text and "jpeg, png" in text


# --- compressed frames: headers ------------------------------------------------------------


def header_of(data: bytes):
    return decode_compressed._read_header(np.frombuffer(data, np.uint8))


def png_chunk(kind: bytes, payload: bytes) -> bytes:
    return (
        struct.pack(">I", len(payload))
        + kind
        + payload
        + struct.pack(">I", zlib.crc32(kind + payload))
    )


def crafted_png(width: int, height: int) -> bytes:
    """A PNG whose header claims width x height, with a body of a few bytes."""
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    body = png_chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + png_chunk(b"IEND", b"")
    return b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + body


def segment(marker: int, payload: bytes) -> bytes:
    return bytes([0xFF, marker]) + struct.pack(">H", len(payload) + 2) + payload


def sof(marker: int, width: int, height: int, components: int = 3) -> bytes:
    specs = b"".join(bytes([i + 1, 0x11, 0]) for i in range(components))
    return segment(marker, bytes([8]) + struct.pack(">HHB", height, width, components) + specs)


def sos(components: int) -> bytes:
    specs = b"".join(bytes([i + 1, 0]) for i in range(components))
    return segment(0xDA, bytes([components]) + specs + b"\x00\x3f\x00")


def crafted_jpeg(*parts: bytes) -> bytes:
    """SOI, the given segments, a few bytes of scan data and EOI."""
    return b"\xff\xd8" + b"".join(parts) + b"\x12" * 16 + b"\xff\xd9"


def jpeg_segments(data: bytes) -> tuple[list[bytes], bytes]:
    """A well-formed JPEG's header segments (each with its marker) and the rest from SOS on."""
    pos, segments = 2, []
    while data[pos + 1] != 0xDA:
        length = struct.unpack(">H", data[pos + 2 : pos + 4])[0]
        segments.append(data[pos : pos + 2 + length])
        pos += 2 + length
    return segments, data[pos:]


def decoded_shape(data: bytes) -> tuple[int, ...]:
    image = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_UNCHANGED)
    assert image is not None
    return image.shape[:2]


@pytest.fixture
def no_decoding(monkeypatch):
    """Fail the test if OpenCV's decoder is called at all."""

    def imdecode(*args, **kwargs):
        raise AssertionError("cv2.imdecode was called")

    monkeypatch.setattr(cv2, "imdecode", imdecode)


SIZES = [(1, 1), (1, 2), (2, 1), (7, 13), (13, 7), (8, 8), (9, 17), (255, 256), (480, 640),
         (1, 3000), (2000, 3)]  # fmt: skip


@pytest.mark.parametrize("height,width", SIZES)
def test_header_size_of_real_images(height, width):
    """The header scan finds what libjpeg / libpng decode, for every variant OpenCV writes."""
    rgb = random_rgb(height, width, seed=height * 7 + width)
    gray = rgb[..., 0]
    variants = {
        "baseline JPEG": encode(rgb, ".jpg"),
        "baseline JPEG gray": cv2.imencode(".jpg", gray)[1].tobytes(),
        "progressive JPEG": encode(rgb, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1),
        "progressive JPEG gray": cv2.imencode(".jpg", gray, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[
            1
        ].tobytes(),
        "baseline JPEG restart": encode(rgb, ".jpg", cv2.IMWRITE_JPEG_RST_INTERVAL, 1),
        "PNG": encode(rgb, ".png"),
        "PNG gray": cv2.imencode(".png", gray)[1].tobytes(),
        "PNG 16-bit": cv2.imencode(".png", gray.astype(np.uint16) * 257)[1].tobytes(),
        "PNG rgba": cv2.imencode(".png", np.dstack([rgb, gray]))[1].tobytes(),
    }
    sampling = getattr(cv2, "IMWRITE_JPEG_SAMPLING_FACTOR", None)
    if sampling is not None:  # OpenCV >= 4.5.5
        variants["baseline JPEG 444"] = encode(rgb, ".jpg", sampling, 0x111111)
    for name, data in variants.items():
        header = header_of(data)
        assert (header.width, header.height) == (width, height), name
        assert decoded_shape(data) == (height, width), name
        is_png = name.startswith("PNG")
        assert header.codec == ("png" if is_png else "jpeg")
        assert header.what == ("PNG" if is_png else name.split(" JPEG")[0] + " JPEG"), name
        assert header.reducible == name.startswith("baseline"), name


def test_header_crafted_png_claiming_12000x12000(no_decoding):
    data = crafted_png(12000, 12000)
    assert len(data) < 100
    header = header_of(data)
    assert (header.codec, header.width, header.height) == ("png", 12000, 12000)
    assert not header.reducible
    msg = compressed_msg(data, "png")
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(msg, max_pixels=3840 * 2160)
    assert err.value.kind == "oversize"
    assert "PNG of 12000x12000 (144000000 pixels)" in str(err.value)
    assert "max_pixels 8294400" in str(err.value)
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(msg, max_pixels=3840 * 2160, oversize="downscale")
    assert err.value.kind == "oversize"
    assert "cannot be decoded at reduced size" in str(err.value)


@pytest.mark.parametrize(
    "ihdr,why",
    [
        (b"\x00\x00\x00\x0dIHDR" + struct.pack(">II", 0, 10), "invalid size 0x10"),
        (b"\x00\x00\x00\x0dIHDR" + struct.pack(">II", 2**31, 10), "invalid size"),
        (b"\x00\x00\x00\x0dIDAT" + struct.pack(">II", 10, 10), "IHDR"),
        (b"\x00\x00\x00\x0eIHDR" + struct.pack(">II", 10, 10), "IHDR"),
        (b"\x00\x00\x00\x0dIHDR\x00\x00", "ends before"),
    ],
)
def test_header_bad_png(no_decoding, ihdr, why):
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(b"\x89PNG\r\n\x1a\n" + ihdr, ""))
    assert err.value.kind == "corrupt" and why in str(err.value)
    assert "not valid png data" in str(err.value)


@pytest.fixture(scope="module")
def issue_png(tmp_path_factory) -> str:
    """A real, valid 140 KB PNG of 12000 x 12000 gray pixels (issue 10's 137 KB bomb)."""
    compressor = zlib.compressobj(9)
    row = bytes(12001)  # filter byte + 12000 zero pixels
    idat = b"".join(compressor.compress(row) for _ in range(12000)) + compressor.flush()
    ihdr = struct.pack(">IIBBBBB", 12000, 12000, 8, 0, 0, 0, 0)
    data = b"\x89PNG\r\n\x1a\n" + png_chunk(b"IHDR", ihdr) + png_chunk(b"IDAT", idat)
    path = tmp_path_factory.mktemp("png") / "bomb.png"
    path.write_bytes(data + png_chunk(b"IEND", b""))
    return str(path)


def test_issue_png_bomb_is_rejected_before_decoding(issue_png, no_decoding):
    with open(issue_png, "rb") as f:
        data = f.read()
    assert len(data) < 150_000
    for mode in OVERSIZE_MODES:
        with pytest.raises(ImageDecodeError) as err:
            compressed_to_rgb(compressed_msg(data, "png"), max_pixels=3840 * 2160, oversize=mode)
        assert err.value.kind == "oversize" and "12000x12000" in str(err.value)


PEAK_SCRIPT = """
import resource, sys
from sensor_msgs.msg import CompressedImage
from ovseg_ros.ros.decode import ImageDecodeError
from ovseg_ros.ros.decode_compressed import compressed_to_rgb
msg = CompressedImage(format="png")
msg.data = open(sys.argv[1], "rb").read()
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
try:
    compressed_to_rgb(msg, max_pixels=3840 * 2160, oversize=sys.argv[2])
except ImageDecodeError as exc:
    print(exc.kind)
print((resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before) // 1024)
"""


def test_issue_png_bomb_peak_memory(issue_png):
    """Measured in a fresh process: the 12000 x 12000 PNG adds no memory (826 MB before)."""
    for mode in OVERSIZE_MODES:
        done = subprocess.run(
            [sys.executable, "-c", PEAK_SCRIPT, issue_png, mode],
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert done.returncode == 0, done.stderr[-2000:]
        kind, grown_mb = done.stdout.split()
        assert kind == "oversize" and int(grown_mb) < 20, done.stdout


def test_header_crafted_jpeg_claiming_12000x12000(no_decoding):
    segments, rest = jpeg_segments(encode(smooth_rgb(16, 16), ".jpg"))
    patched = [
        s[:5] + struct.pack(">HH", 12000, 12000) + s[9:] if s[1] == 0xC0 else s for s in segments
    ]
    data = b"\xff\xd8" + b"".join(patched) + rest
    header = header_of(data)
    assert (header.width, header.height, header.what) == (12000, 12000, "baseline JPEG")
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, "jpeg"), max_pixels=3840 * 2160)
    assert err.value.kind == "oversize" and "12000x12000" in str(err.value)
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, "jpeg"), max_pixels=1000, oversize="downscale")
    assert err.value.kind == "oversize" and "even at 1/8 scale (1500x1500)" in str(err.value)


@pytest.mark.parametrize(
    "marker,what,reducible",
    [
        (0xC0, "baseline", True),
        (0xC1, "extended sequential", True),
        (0xC2, "progressive", False),
        (0xC3, "lossless", False),
        (0xC5, "hierarchical sequential", False),
        (0xC6, "hierarchical progressive", False),
        (0xC7, "hierarchical lossless", False),
        (0xC9, "arithmetic sequential", True),
        (0xCA, "arithmetic progressive", False),
        (0xCB, "arithmetic lossless", False),
        (0xCD, "arithmetic hierarchical sequential", False),
        (0xCE, "arithmetic hierarchical progressive", False),
        (0xCF, "arithmetic hierarchical lossless", False),
    ],
)
def test_header_every_sof_marker(marker, what, reducible):
    header = header_of(crafted_jpeg(segment(0xE0, b"JFIF\x00"), sof(marker, 4000, 3000), sos(3)))
    assert (header.width, header.height) == (4000, 3000)
    assert header.what == f"{what} JPEG" and header.reducible is reducible


def test_header_not_sof_markers_are_skipped():
    """DHT (C4), JPG (C8) and DAC (CC) sit in the SOF range but are not frame headers."""
    decoys = [segment(m, struct.pack(">BHHB", 8, 9999, 9999, 3)) for m in (0xC4, 0xC8, 0xCC)]
    header = header_of(crafted_jpeg(*decoys, sof(0xC0, 640, 480), sos(3)))
    assert (header.width, header.height) == (640, 480)


def test_header_multi_scan_sequential_is_not_reducible():
    """A sequential JPEG whose first scan lacks components buffers the whole image in libjpeg."""
    assert header_of(crafted_jpeg(sof(0xC0, 64, 48, 3), sos(3))).reducible
    assert not header_of(crafted_jpeg(sof(0xC0, 64, 48, 3), sos(1))).reducible
    assert header_of(crafted_jpeg(sof(0xC0, 64, 48, 1), sos(1))).reducible


def test_header_fill_bytes_stray_bytes_and_standalone_markers():
    """What libjpeg tolerates between segments, the scan tolerates the same way."""
    rgb = smooth_rgb(37, 53)
    data = encode(rgb, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95)
    plain = cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR)
    segments, rest = jpeg_segments(data)
    variants = {
        "fill": [b"\xff" * 5 + s for s in segments] + [b"\xff\xff" + rest],
        "stray": segments[:1] + [b"junk" + s for s in segments[1:]] + [b"\x00\x01" + rest],
        "stuffed": [b"\xff\x00" + s for s in segments] + [rest],
        "standalone": [b"\xff\x01\xff\xd3" + s for s in segments] + [rest],
    }
    for name, parts in variants.items():
        variant = b"\xff\xd8" + b"".join(parts)
        header = header_of(variant)
        assert (header.width, header.height) == (53, 37), name
        decoded = cv2.imdecode(np.frombuffer(variant, np.uint8), cv2.IMREAD_COLOR)
        np.testing.assert_array_equal(decoded, plain, err_msg=name)  # libjpeg reads it the same
        np.testing.assert_array_equal(
            compressed_to_rgb(compressed_msg(variant, "jpeg")), plain[..., ::-1]
        )


def test_header_after_a_long_exif_block():
    """Segments past the first 64 KB (large EXIF / ICC data) are followed to the frame header."""
    data = encode(smooth_rgb(37, 53), ".jpg")
    app = b"".join(segment(0xE1, bytes([i]) * 60_000) for i in range(3))
    long_header = data[:2] + app + data[2:]
    header = header_of(long_header)
    assert (header.width, header.height) == (53, 37)
    assert decoded_shape(long_header) == (37, 53)
    with pytest.raises(decode_compressed._BadHeader, match="ends inside its header"):
        header_of(long_header[:150_000])


def test_header_truncated_jpeg(no_decoding):
    data = encode(smooth_rgb(37, 53), ".jpg")
    scan = data.index(b"\xff\xda")
    for cut in range(3, scan + 5):  # SOS: marker, length, component count
        with pytest.raises(ImageDecodeError) as err:
            compressed_to_rgb(compressed_msg(data[:cut], "jpeg"))
        assert err.value.kind == "corrupt"
        assert "not valid jpeg data" in str(err.value)
        assert "ends inside its header" in str(err.value), cut
    assert header_of(data[: scan + 5]).width == 53


@pytest.mark.parametrize(
    "parts,kind,why",
    [
        ((b"\xff\xd8", sof(0xC0, 8, 8), sos(3)), "corrupt", "second start-of-image"),
        ((segment(0xE0, b"JFIF"), b"\xff\xd9"), "corrupt", "ends (EOI)"),
        ((sos(3), sof(0xC0, 8, 8)), "corrupt", "scan before any frame header"),
        ((b"\xff\xe0\x00\x01", sof(0xC0, 8, 8), sos(3)), "corrupt", "segment length of 1"),
        ((sof(0xC0, 8, 8), sof(0xC2, 9, 9), sos(3)), "corrupt", "two frame headers"),
        ((sof(0xC0, 8, 0), sos(3)), "corrupt", "size of 8x0"),
        ((segment(0xC0, b"\x08\x00"), sos(3)), "corrupt", "frame header has a length of 4"),
        ((segment(0xF7, b"\x08\x00\x08\x00\x08\x01"), sos(1)), "unsupported_format", "JPEG-LS"),
    ],
)
def test_header_bad_jpeg(no_decoding, parts, kind, why):
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(crafted_jpeg(*parts), ""))
    assert err.value.kind == kind and why in str(err.value), str(err.value)


OTHER_FORMATS = {
    ".bmp": "BMP",
    ".tiff": "TIFF",
    ".webp": "WebP",
    ".ppm": "PNM",
    ".pbm": "PNM",
    ".pam": "PNM",
    ".pfm": "PNM",
    ".hdr": "Radiance HDR",
    ".ras": "Sun raster",
    ".avif": "AVIF/HEIF",
    ".gif": "GIF",
    ".jp2": "JPEG 2000",
    ".exr": "OpenEXR",
}


@pytest.mark.parametrize("ext,name", OTHER_FORMATS.items())
def test_other_image_formats_are_rejected_before_decoding(monkeypatch, ext, name):
    """OpenCV would decode BMP, TIFF, WebP...: the contract says jpeg and png only."""
    rgb = random_rgb(16, 16)
    image = rgb.astype(np.float32) / 255 if ext in (".pfm", ".hdr", ".exr") else rgb
    image = image[..., 0] if ext == ".pbm" else image  # bilevel: one channel
    try:
        ok, buf = cv2.imencode(ext, image)
    except cv2.error:
        ok = False
    data = buf.tobytes() if ok else None
    if data is None:  # no writer in this OpenCV build: the signature alone
        data = {
            ".jp2": b"\x00\x00\x00\x0cjP  \r\n\x87\n",
            ".exr": b"v/1\x01\x02\x00\x00\x00",
        }.get(ext, b"")
        if not data:
            pytest.skip(f"OpenCV cannot write {ext}")
        data += bytes(64)

    def imdecode(*args, **kwargs):
        raise AssertionError("cv2.imdecode was called")

    monkeypatch.setattr(cv2, "imdecode", imdecode)
    for fmt in ("png", "jpeg", "rgb8; jpeg compressed bgr8", ""):
        with pytest.raises(ImageDecodeError) as err:
            compressed_to_rgb(compressed_msg(data, fmt))
        assert err.value.kind == "unsupported_format"
        assert f"holds {name} data" in str(err.value) and "supported: jpeg, png" in str(err.value)


@pytest.mark.parametrize(
    "data", [b"\x00" * 64, b"not an image", b"\xff\xd8\x00\xff\xc0", b"\x89PNG\r\n", b"G"]
)
def test_unknown_bytes_are_corrupt_without_decoding(no_decoding, data):
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, "jpeg"))
    assert err.value.kind == "corrupt"
    assert "neither the JPEG nor the PNG signature" in str(err.value)


# --- compressed frames: limits and downscaling ---------------------------------------------


def block_mean(rgb: np.ndarray, size: int) -> np.ndarray:
    """Means of size x size blocks, the image extended by its edge (libjpeg's DCT scaling)."""
    height, width = rgb.shape[:2]
    padded_h, padded_w = -(-height // size) * size, -(-width // size) * size
    pad = ((0, padded_h - height), (0, padded_w - width), (0, 0))
    padded = np.pad(rgb.astype(np.float64), pad, mode="edge")
    return padded.reshape(padded_h // size, size, padded_w // size, size, 3).mean(axis=(1, 3))


@pytest.mark.parametrize(
    "height,width,max_pixels,denominator",
    [
        (480, 640, 480 * 640, 1),
        (480, 640, 480 * 640 - 1, 2),
        (480, 640, 240 * 320, 2),
        (480, 640, 240 * 320 - 1, 4),
        (480, 640, 120 * 160 - 1, 8),
        (480, 640, 60 * 80, 8),
        (481, 641, 241 * 321, 2),
        (481, 641, 61 * 81, 8),
        (37, 53, 100, 8),
    ],
)
def test_jpeg_downscale_decodes_at_the_least_reduction_that_fits(
    height, width, max_pixels, denominator
):
    rgb = smooth_rgb(height, width)
    data = encode(rgb, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95)
    # The data decides the codec, so a JPEG labelled png is still decoded as JPEG.
    msg = compressed_msg(data, "png")
    out = compressed_to_rgb(msg, max_pixels=max_pixels, oversize="downscale")
    out_h, out_w = -(-height // denominator), -(-width // denominator)
    assert out.shape == (out_h, out_w, 3) and out.flags.c_contiguous
    assert out_h * out_w <= max_pixels
    diff = np.abs(out - block_mean(rgb, denominator))
    assert diff.mean() < 1.5 and diff.max() <= 16, (diff.mean(), diff.max())
    # Channel order: red rises left to right, green top to bottom.
    assert out[out_h // 2, -1, 0] > 180 and out[out_h // 2, 0, 0] < 60
    assert out[-1, out_w // 2, 1] > 180 and out[0, out_w // 2, 1] < 60
    if denominator > 1:
        with pytest.raises(ImageDecodeError) as err:
            compressed_to_rgb(msg, max_pixels=max_pixels)  # oversize="reject"
        assert err.value.kind == "oversize"
        assert f"baseline JPEG of {width}x{height}" in str(err.value)


def test_jpeg_downscale_without_imread_color_rgb(monkeypatch):
    monkeypatch.setattr(decode_compressed, "_IMREAD_RGB", None)
    rgb = smooth_rgb(48, 64)
    data = encode(rgb, ".jpg", cv2.IMWRITE_JPEG_QUALITY, 95)
    for max_pixels, shape in ((0, (48, 64, 3)), (24 * 32, (24, 32, 3))):
        out = compressed_to_rgb(
            compressed_msg(data, "jpeg"), max_pixels=max_pixels, oversize="downscale"
        )
        assert out.shape == shape and out[24 * shape[0] // 48, -1, 0] > 180


def test_progressive_jpeg_over_the_limit_is_rejected_even_in_downscale_mode(no_decoding):
    """libjpeg keeps every coefficient of a progressive image in memory, whatever the scale."""
    data = encode(smooth_rgb(48, 64), ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1)
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, "jpeg"), max_pixels=1000, oversize="downscale")
    assert err.value.kind == "oversize"
    assert "progressive JPEG of 64x48" in str(err.value)
    assert "cannot be decoded at reduced size" in str(err.value)


def test_progressive_jpeg_within_the_limit_decodes():
    rgb = smooth_rgb(48, 64)
    data = encode(rgb, ".jpg", cv2.IMWRITE_JPEG_PROGRESSIVE, 1, cv2.IMWRITE_JPEG_QUALITY, 95)
    out = compressed_to_rgb(compressed_msg(data, "jpeg"), max_pixels=48 * 64, oversize="downscale")
    assert out.shape == rgb.shape
    assert np.abs(out.astype(int) - rgb.astype(int)).mean() < 2


def test_png_within_the_limit_decodes_exactly():
    rgb = random_rgb(48, 64, seed=3)
    for mode in OVERSIZE_MODES:
        out = compressed_to_rgb(
            compressed_msg(encode(rgb, ".png"), "png"), max_pixels=48 * 64, oversize=mode
        )
        np.testing.assert_array_equal(out, rgb)


def test_decoded_image_larger_than_its_header_is_rejected(monkeypatch):
    """Should the decoder ever read a size other than the header scan did, the frame is refused."""
    data = encode(smooth_rgb(48, 64), ".jpg")
    monkeypatch.setattr(
        decode_compressed, "_imdecode_rgb", lambda buf, d: np.zeros((49, 64, 3), np.uint8)
    )
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, "jpeg"))
    assert err.value.kind == "corrupt"
    assert "decoded to 64x49 but its header declares 64x48" in str(err.value)
    monkeypatch.setattr(
        decode_compressed, "_imdecode_rgb", lambda buf, d: np.zeros((13, 16, 3), np.uint8)
    )
    with pytest.raises(ImageDecodeError, match="decoded to 16x13 at 1/4 scale") as err:
        compressed_to_rgb(compressed_msg(data, "jpeg"), max_pixels=200, oversize="downscale")
    assert err.value.kind == "corrupt"


def test_decoder_errors_are_one_short_line(monkeypatch):
    data = encode(smooth_rgb(8, 8), ".png")

    def raises(text):
        def imdecode(buf, denominator):
            raise cv2.error(text)

        return imdecode

    monkeypatch.setattr(
        decode_compressed, "_imdecode_rgb", raises("OpenCV(5.0) x.cpp:1: error:\n" * 50)
    )
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, "png"))
    assert err.value.kind == "corrupt" and "\n" not in str(err.value)
    assert len(str(err.value)) < 250
    limit_text = "(-215:Assertion failed) pixels <= CV_IO_MAX_IMAGE_PIXELS"
    monkeypatch.setattr(decode_compressed, "_imdecode_rgb", raises(limit_text))
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(data, "png"))
    assert err.value.kind == "oversize"


def test_opencv_limits_are_checked_before_decoding(monkeypatch, no_decoding):
    """OpenCV's own size limits apply with max_pixels 0, reported as oversize, not corrupt."""
    png = encode(random_rgb(20, 30), ".png")
    monkeypatch.setattr(decode_compressed, "_CV_MAX_PIXELS", 599)
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(png, "png"))
    assert err.value.kind == "oversize" and "OPENCV_IO_MAX_IMAGE" in str(err.value)
    monkeypatch.setattr(decode_compressed, "_CV_MAX_PIXELS", 1 << 30)
    monkeypatch.setattr(decode_compressed, "_CV_MAX_WIDTH", 29)
    with pytest.raises(ImageDecodeError) as err:
        compressed_to_rgb(compressed_msg(png, "png"))
    assert err.value.kind == "oversize"


@pytest.mark.parametrize(
    "value,expected",
    [("", 77), ("1000", 1000), ("4MB", 4 << 20), ("2kb", 2048), ("3Mb", 3 << 20),
     ("1 MB", 77), ("-5", 77), ("1GB", 77), ("x", 77)],
)  # fmt: skip
def test_opencv_limit_settings_are_parsed_as_opencv_does(monkeypatch, value, expected):
    monkeypatch.setenv("OPENCV_IO_MAX_IMAGE_PIXELS", value)
    assert decode_compressed._env_size("OPENCV_IO_MAX_IMAGE_PIXELS", 77) == expected


ENV_LIMIT_SCRIPT = """
import cv2, numpy as np
from sensor_msgs.msg import CompressedImage
from ovseg_ros.ros import decode_compressed
from ovseg_ros.ros.decode import ImageDecodeError

assert decode_compressed._CV_MAX_PIXELS == 4096, decode_compressed._CV_MAX_PIXELS

def decode(ext, size, **kwargs):
    msg = CompressedImage()
    msg.data = cv2.imencode(ext, np.full((size, size, 3), 128, np.uint8))[1].tobytes()
    try:
        return decode_compressed.compressed_to_rgb(msg, **kwargs).shape[:2]
    except ImageDecodeError as exc:
        return exc.kind

print(decode(".png", 64), decode(".png", 65), decode(".jpg", 65))
# OpenCV checks the scaled size of a JPEG decoded reduced, so downscaling works under its limit.
print(decode(".jpg", 250, max_pixels=4096, oversize="downscale"))
"""


def test_opencv_limit_from_the_environment():
    """OPENCV_IO_MAX_IMAGE_PIXELS set for the process is honoured (and reported as oversize)."""
    env = dict(os.environ, OPENCV_IO_MAX_IMAGE_PIXELS="4096")
    done = subprocess.run(
        [sys.executable, "-c", ENV_LIMIT_SCRIPT],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.split("\n")[:2] == ["(64, 64) oversize oversize", "(63, 63)"]


FUZZ_SCRIPT = """
import sys
import cv2, numpy as np
from ovseg_ros.ros import decode_compressed

rng = np.random.default_rng(int(sys.argv[1]))
image = rng.integers(0, 256, (37, 53, 3), dtype=np.uint8)
bases = [
    cv2.imencode(".jpg", image)[1].tobytes(),
    cv2.imencode(".jpg", image, [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])[1].tobytes(),
    cv2.imencode(".jpg", image[..., 0])[1].tobytes(),
]
agree = disagree = stricter = 0
for i in range(int(sys.argv[2])):
    data = bytearray(bases[i % 3])
    end = data.find(b"\\xff\\xda") + 12
    for _ in range(int(rng.integers(1, 4))):
        at, op = int(rng.integers(2, end)), int(rng.integers(0, 3))
        byte = int(rng.choice([0xFF, 0x00, 0xD0, 0xC0, 0xC2, 0xDA, 0xD9, int(rng.integers(256))]))
        if op == 0:
            data[at] = byte
        elif op == 1:
            data.insert(at, byte)
        else:
            del data[at]
    buf = np.frombuffer(bytes(data), np.uint8)
    try:
        header = decode_compressed._read_header(buf)
        ours = (header.height, header.width)
    except decode_compressed._BadHeader:
        ours = None
    try:
        decoded = cv2.imdecode(buf, cv2.IMREAD_COLOR | decode_compressed._IGNORE_ORIENTATION)
    except cv2.error:
        decoded = None
    if decoded is None:
        continue
    if ours is None:
        stricter += 1
    elif decoded.shape[:2] == ours:
        agree += 1
    else:
        disagree += 1
print(agree, disagree, stricter)
"""


def test_header_scan_agrees_with_libjpeg_on_mutated_headers():
    """Random byte edits in JPEG headers: whatever libjpeg decodes has the size the scan found.

    Run in a process of its own with OpenCV's pixel limit lowered, since a mutated size field
    could otherwise make libjpeg allocate gigabytes.
    """
    env = dict(os.environ, OPENCV_IO_MAX_IMAGE_PIXELS="1000000")
    done = subprocess.run(
        [sys.executable, "-c", FUZZ_SCRIPT, "7", "1500"],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    agree, disagree, stricter = map(int, done.stdout.split())
    assert disagree == 0 and agree > 300
    assert stricter <= 5  # e.g. an APPn length below 2, which libjpeg skips over and we refuse
