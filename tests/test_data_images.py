import struct
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from soapvit.data import images
from soapvit.data.images import DataFolderError, ImageReadError, list_images, load_image, read_annotation

RNG = np.random.default_rng(0)
RGB8 = RNG.integers(0, 256, (12, 20, 3), dtype=np.uint8)


def _write_png(path, width, height, color_type, bit_depth, rows: bytes = b""):
    """A PNG written by hand: signature, IHDR, one IDAT, IEND (an independent reference)."""

    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data))

    header = struct.pack(">IIBBBBB", width, height, bit_depth, color_type, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows))
                     + chunk(b"IEND", b""))
    return path


def _pixels(path) -> np.ndarray:
    image = load_image(path)
    assert image.mode == "RGB"
    return np.asarray(image).astype(np.int64)


def _gray(values: np.ndarray) -> np.ndarray:
    return np.repeat(values[..., None], 3, axis=-1)


@pytest.mark.parametrize("mode, suffix", [("I;16", "png"), ("I;16B", "tif"), ("I", "tif")])
def test_sixteen_bit_grayscale_is_scaled_by_bit_depth(tmp_path, mode, suffix):
    values = RNG.integers(0, 65536, (12, 20)).astype(np.uint16)
    values[0, :3] = (0, 65535, 257 * 200)
    dtype = {"I;16": "<u2", "I;16B": ">u2", "I": "<i4"}[mode]
    image = Image.frombuffer(mode, (20, 12), values.astype(dtype).tobytes(), "raw", mode, 0, 1)
    image.save(path := tmp_path / f"gray16.{suffix}")
    assert Image.open(path).mode.startswith("I")
    np.testing.assert_array_equal(_pixels(path), _gray(np.round(values / 257)))
    # the 16-bit version of an 8-bit image reads back as that image, not as white
    Image.fromarray((RGB8[..., 0].astype(np.uint16) * 257)).save(path8 := tmp_path / "from8.png")
    np.testing.assert_array_equal(_pixels(path8), _gray(RGB8[..., 0]))


def test_sixteen_bit_rgb_png_matches_its_8_bit_image(tmp_path):
    low_bits = RNG.integers(0, 128, RGB8.shape)
    values = np.minimum(RGB8.astype(np.int64) * 257 + low_bits, 65535)
    rows = b"".join(b"\x00" + row.astype(">u2").tobytes() for row in values)
    path = _write_png(tmp_path / "rgb16.png", 20, 12, color_type=2, bit_depth=16, rows=rows)
    assert np.abs(_pixels(path) - RGB8).max() <= 1


def test_integer_image_beyond_sixteen_bits_is_refused(tmp_path):
    values = np.full((4, 4), 70000, dtype=np.int32)
    Image.frombuffer("I", (4, 4), values.tobytes(), "raw", "I", 0, 1).save(path := tmp_path / "i32.tif")
    with pytest.raises(ImageReadError, match="outside 16 bits"):
        load_image(path)


def _cmyk_reference(cmyk: np.ndarray) -> np.ndarray:
    ink, black = cmyk[..., :3].astype(np.float64), cmyk[..., 3:].astype(np.float64)
    return (255 - ink) * (255 - black) / 255


def test_cmyk_tiff_and_adobe_jpeg_give_the_rgb_of_their_inks(tmp_path):
    cmyk = RNG.integers(0, 256, (4, 5, 4), dtype=np.uint8).repeat(8, axis=0).repeat(8, axis=1)  # 8x8 blocks
    image = Image.fromarray(cmyk, "CMYK")
    image.save(tiff := tmp_path / "cmyk.tif")
    image.save(jpeg := tmp_path / "cmyk.jpg", quality=100)
    assert b"Adobe" in jpeg.read_bytes()  # inverted polarity, marked by an Adobe APP14 segment
    assert np.abs(_pixels(tiff) - _cmyk_reference(cmyk)).max() <= 1
    assert np.abs(_pixels(jpeg) - _cmyk_reference(cmyk)).max() <= 2  # JPEG's own rounding


def test_cmyk_of_an_rgb_image_reads_back_as_that_image(tmp_path):
    Image.fromarray(RGB8).convert("CMYK").save(path := tmp_path / "cmyk.tif")
    assert np.abs(_pixels(path) - RGB8).max() <= 1


ORIENTATIONS = {
    1: lambda a: a,
    2: np.fliplr,
    3: lambda a: np.rot90(a, 2),
    4: np.flipud,
    5: lambda a: a.transpose(1, 0, 2),
    6: lambda a: np.rot90(a, -1),  # displayed turned 90° clockwise
    7: lambda a: np.rot90(a, 2).transpose(1, 0, 2),
    8: lambda a: np.rot90(a, 1),
}


@pytest.mark.parametrize("orientation", sorted(ORIENTATIONS))
def test_exif_orientation_is_applied(tmp_path, orientation):
    exif = Image.Exif()
    exif[0x0112] = orientation
    Image.fromarray(RGB8).save(path := tmp_path / "exif.png", exif=exif)
    np.testing.assert_array_equal(_pixels(path), ORIENTATIONS[orientation](RGB8))


def test_palette_image_without_transparency_is_its_palette_lookup(tmp_path):
    palette = RNG.integers(0, 256, (256, 3), dtype=np.uint8)
    index = RNG.integers(0, 256, (12, 20), dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.tobytes())
    image.save(path := tmp_path / "palette.png")
    np.testing.assert_array_equal(_pixels(path), palette[index])


def test_palette_transparency_is_composited_over_black(tmp_path):
    palette = RNG.integers(0, 256, (4, 3), dtype=np.uint8)
    alpha = np.array([0, 128, 255, 255])
    index = RNG.integers(0, 4, (12, 20), dtype=np.uint8)
    image = Image.fromarray(index, "P")
    image.putpalette(palette.tobytes())
    image.save(path := tmp_path / "palette_alpha.png", transparency=bytes(alpha[:3].tolist()))
    expected = palette[index] * alpha[index][..., None] / 255
    assert np.abs(_pixels(path) - expected).max() <= 1
    assert (_pixels(path)[index == 0] == 0).all()


@pytest.mark.parametrize("mode", ["RGBA", "LA"])
def test_alpha_is_composited_over_black(tmp_path, mode):
    alpha = RNG.integers(0, 256, (12, 20), dtype=np.uint8)
    alpha[0, :2] = (0, 255)
    colour = RGB8 if mode == "RGBA" else RGB8[..., :1]
    Image.fromarray(np.dstack([colour, alpha]), mode).save(path := tmp_path / f"{mode}.png")
    expected = np.broadcast_to(colour * (alpha[..., None] / 255), RGB8.shape)
    pixels = _pixels(path)
    assert np.abs(pixels - expected).max() <= 1
    assert (pixels[0, 0] == 0).all() and (pixels[0, 1] == np.broadcast_to(colour[0, 1], 3)).all()


def test_header_declaring_a_huge_image_is_skipped_with_a_reason(tmp_path):
    path = _write_png(tmp_path / "bomb.png", 100_000, 100_000, color_type=2, bit_depth=8)
    for read in (load_image, read_annotation):
        with pytest.raises(ImageReadError, match="decompression bomb") as info:
            read(path)
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_files_beyond_the_decode_limit_are_skipped(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_DECODE_PIXELS", 4000)
    Image.fromarray(RNG.integers(0, 256, (100, 100, 3), dtype=np.uint8)).save(path := tmp_path / "big.png")
    with pytest.raises(ImageReadError, match=r"100x100 pixels to decode, more than MAX_DECODE_PIXELS = 4000"):
        load_image(path)
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # Pillow's own check (2x: error)
    with pytest.raises(ImageReadError, match="decompression bomb"):
        load_image(path)


def test_large_png_is_downscaled_by_box_averaging(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    big = RNG.integers(0, 256, (40, 50, 3), dtype=np.uint8)
    Image.fromarray(big).save(path := tmp_path / "big.png")
    with pytest.warns(UserWarning, match=r"big.png is 50x40, more than 1000 pixels .* downscaled to 25x20"):
        pixels = _pixels(path)
    expected = big.reshape(20, 2, 25, 2, 3).mean(axis=(1, 3))
    assert np.abs(pixels - expected).max() <= 1


def test_large_jpeg_is_reduced_while_decoding(tmp_path, monkeypatch):
    monkeypatch.setattr(images, "MAX_PIXELS", 1000)
    monkeypatch.setattr(images, "MAX_DECODE_PIXELS", 4000)  # the full 200x160 (32,000 pixels) is never decoded
    colours = RNG.integers(0, 256, (2, 2, 3), dtype=np.uint8)
    Image.fromarray(colours.repeat(80, axis=0).repeat(100, axis=1)).save(path := tmp_path / "big.jpg", quality=95)
    with pytest.warns(UserWarning, match="downscaled to 25x20"):
        pixels = _pixels(path)
    blocks = pixels.reshape(2, 10, 25, 3)[:, 2:8]  # each colour block is now 12.5 x 10 pixels
    assert np.abs(blocks[:, :, 2:10] - colours[:, None, None, 0]).max() <= 6
    assert np.abs(blocks[:, :, 15:23] - colours[:, None, None, 1]).max() <= 6


@pytest.mark.parametrize("content", [b"", b"not an image at all", b"\x89PNG\r\n\x1a\n" + b"\x00" * 40])
def test_unreadable_bytes_raise_image_read_error(tmp_path, content):
    (path := tmp_path / "bad.png").write_bytes(content)
    for read in (load_image, read_annotation):
        with pytest.raises(ImageReadError, match=f"cannot read .*{path.name}"):
            read(path)


@pytest.mark.parametrize("suffix", ["png", "jpg", "gif", "tif", "webp"])
def test_truncated_and_corrupted_files_raise_image_read_error_only(tmp_path, suffix):
    Image.fromarray(RGB8.repeat(4, axis=0).repeat(4, axis=1)).save(good := tmp_path / f"good.{suffix}")
    data = good.read_bytes()
    rng = np.random.default_rng(1)
    variants = [data[: len(data) // 2], data[: len(data) - 10]]
    for _ in range(40):
        broken = bytearray(data)
        broken[rng.integers(len(data))] = rng.integers(256)
        variants.append(bytes(broken))
    failures = 0
    for n, variant in enumerate(variants):
        (path := tmp_path / f"broken{n}.{suffix}").write_bytes(variant)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            try:
                assert load_image(path).mode == "RGB"
            except ImageReadError as err:
                failures += 1
                assert str(path) in str(err)
    assert failures >= 1


def test_annotations_keep_their_values(tmp_path):
    labels = RNG.choice(np.arange(0, 400, 13), (12, 20)).astype(np.uint16)  # 31 class ids, some beyond 8 bits
    Image.fromarray(labels).save(path := tmp_path / "labels16.png")
    np.testing.assert_array_equal(np.asarray(read_annotation(path, kind="label map")), labels)
    index = RNG.integers(0, 21, (12, 20), dtype=np.uint8)
    palette = Image.fromarray(index, "P")
    palette.putpalette(RNG.integers(0, 256, 768, dtype=np.uint8).tobytes())
    palette.save(path := tmp_path / "voc.png")
    annotation = read_annotation(path)
    assert annotation.mode == "P"
    np.testing.assert_array_equal(np.asarray(annotation), index)


def test_list_images_skips_hidden_files_and_folders(tmp_path):
    for name in ["b.jpg", "a.PNG", "._a.png", ".cache/c.jpg", "sub/d.jpeg", "notes.txt"]:
        (tmp_path / name).parent.mkdir(exist_ok=True)
        (tmp_path / name).write_bytes(b"")
    assert [p.name for p in list_images(tmp_path)] == ["a.PNG", "b.jpg"]
    assert [p.relative_to(tmp_path).as_posix() for p in list_images(tmp_path, recursive=True)] == [
        "a.PNG", "b.jpg", "sub/d.jpeg"]
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataFolderError, match="--images: folder .*empty holds no images"):
        list_images(tmp_path / "empty")
