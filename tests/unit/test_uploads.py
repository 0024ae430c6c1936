"""Uploads' pure parts: type sniffing, the image check, the streaming multipart reader's limits,
and the thumbnail maker (orientation, size bound, metadata stripped)."""

from __future__ import annotations

import io

import pytest
from hypothesis import given
from hypothesis import strategies as st
from PIL import Image

from photostack.service._uploads import (
    MULTIPART_OVERHEAD_BYTES,
    InvalidUpload,
    UploadReader,
    check_image,
    media_key,
    sniff_image_type,
)
from photostack.service.tasks import make_thumbnail

BOUNDARY = "b0undary"
CT = f"multipart/form-data; boundary={BOUNDARY}"


def image_bytes(fmt: str, size: tuple[int, int] = (40, 30), **save: object) -> bytes:
    out = io.BytesIO()
    mode = "RGBA" if fmt == "PNG" else "RGB"
    Image.new(mode, size, (200, 10, 10)).save(out, fmt, **save)
    return out.getvalue()


def multipart(file: bytes, caption: str = "hello", filename: str = "x.jpg") -> bytes:
    return (
        (
            f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="caption"\r\n\r\n{caption}\r\n'
            f"--{BOUNDARY}\r\nContent-Disposition: form-data; "
            f'name="file"; filename="{filename}"\r\n'
            "Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + file
        + f"\r\n--{BOUNDARY}--\r\n".encode()
    )


def read(body: bytes, limit: int = 1 << 20, chunk: int = 7) -> UploadReader:
    reader = UploadReader(CT, limit)
    for start in range(0, len(body), chunk):
        reader.feed(body[start : start + chunk])
    return reader


@pytest.mark.parametrize(
    ("fmt", "media"), [("JPEG", "image/jpeg"), ("PNG", "image/png"), ("WEBP", "image/webp")]
)
def test_sniffing_and_pillow_agree_on_the_three_types(fmt: str, media: str) -> None:
    data = image_bytes(fmt)
    assert sniff_image_type(data[:16]) == media
    assert check_image(io.BytesIO(data)) == media


@pytest.mark.parametrize(
    "data",
    [
        b"GIF89a" + b"\0" * 40,  # an image, not one of ours
        b"%PDF-1.7 not an image",
        b"<html>hello</html>",
        b"",
        b"\xff\xd8\xff" + b"garbage after a JPEG magic",  # the magic alone is not enough
        b"\x89PNG\r\n\x1a\n" + b"\0" * 30,
    ],
)
def test_non_images_and_fake_magic_are_415(data: bytes) -> None:
    with pytest.raises(InvalidUpload) as info:
        check_image(io.BytesIO(data))
    assert (info.value.status, info.value.code) == (415, "unsupported_media_type")


def test_a_png_named_jpeg_is_judged_by_its_content() -> None:
    body = multipart(image_bytes("PNG"), filename="photo.jpg")
    parts = read(body).finish()
    assert parts.file is not None
    assert check_image(parts.file) == "image/png"
    parts.close()


@given(st.binary(max_size=64))
def test_sniffing_never_raises(head: bytes) -> None:
    assert sniff_image_type(head) in {None, "image/jpeg", "image/png", "image/webp"}


def test_the_reader_returns_file_and_caption_whatever_the_chunking() -> None:
    data = image_bytes("JPEG")
    for chunk in (1, 5, 64, 10_000):
        parts = read(multipart(data, caption="héllo"), chunk=chunk).finish()
        assert parts.caption == "héllo"
        assert parts.size == len(data)
        assert parts.filename == "x.jpg"
        assert parts.file is not None
        assert parts.file.read() == data
        parts.close()


def test_an_oversize_file_is_refused_before_the_rest_is_read() -> None:
    limit = 1000
    reader = UploadReader(CT, limit)
    body = multipart(b"\xff" * 50_000)
    fed = 0
    refused: InvalidUpload | None = None
    for start in range(0, len(body), 100):
        fed += 100
        try:
            reader.feed(body[start : start + 100])
        except InvalidUpload as exc:
            refused = exc
            break
    assert refused is not None
    assert refused.status == 413
    assert fed < limit + 500  # stopped right after the limit, not at the end of the body


def test_a_declared_length_past_the_limit_is_refused_at_once() -> None:
    reader = UploadReader(CT, 1000)
    reader.declared_length(str(1000 + MULTIPART_OVERHEAD_BYTES))  # at the limit: fine
    with pytest.raises(InvalidUpload) as info:
        reader.declared_length(str(1001 + MULTIPART_OVERHEAD_BYTES))
    assert info.value.status == 413


def test_the_whole_body_is_bounded_even_without_a_file() -> None:
    reader = UploadReader(CT, 100)
    junk = f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="other"\r\n\r\n'.encode()
    with pytest.raises(InvalidUpload) as info:
        reader.feed(junk + b"x" * (MULTIPART_OVERHEAD_BYTES + 200))
    assert info.value.status == 413


@pytest.mark.parametrize(
    ("content_type", "status"),
    [("application/json", 415), ("multipart/form-data", 415), (None, 415)],
)
def test_not_multipart_is_415(content_type: str | None, status: int) -> None:
    with pytest.raises(InvalidUpload) as info:
        UploadReader(content_type, 1000)
    assert info.value.status == status


def test_missing_file_long_caption_and_truncated_bodies() -> None:
    no_file = (
        f'--{BOUNDARY}\r\nContent-Disposition: form-data; name="caption"\r\n\r\nhi\r\n'
        f"--{BOUNDARY}--\r\n"
    ).encode()
    with pytest.raises(InvalidUpload) as info:
        read(no_file).finish()
    assert (info.value.status, info.value.code) == (422, "missing_file")

    with pytest.raises(InvalidUpload) as info:
        read(multipart(b"abc", caption="x" * 2201)).finish()
    assert (info.value.status, info.value.code) == (422, "invalid_caption")
    read(multipart(b"abc", caption="é" * 2200)).finish().close()  # chars, not bytes

    body = multipart(b"abcdef")
    with pytest.raises(InvalidUpload) as info:
        read(body[: len(body) // 2]).finish()
    assert (info.value.status, info.value.code) == (400, "malformed_upload")


def test_media_keys_are_content_addressed() -> None:
    a, b = image_bytes("JPEG"), image_bytes("PNG")
    assert media_key(a, "image/jpeg") == media_key(a, "image/jpeg")
    assert media_key(a, "image/jpeg") != media_key(b, "image/png")
    assert media_key(a, "image/jpeg").endswith(".jpg")


def test_thumbnails_are_bounded_upright_and_carry_no_metadata() -> None:
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise to display
    exif[0x010F] = "SecretCam"  # camera make: must not survive
    source = io.BytesIO()
    Image.new("RGB", (800, 400), (0, 128, 255)).save(source, "JPEG", exif=exif, comment=b"hi")
    thumb = make_thumbnail(source.getvalue(), 320)
    with Image.open(io.BytesIO(thumb)) as out:
        assert out.format == "JPEG"
        assert out.size == (160, 320)  # stored 800x400, displayed (and thumbnailed) 400x800
        assert not out.getexif()
        assert "comment" not in out.info
        assert "icc_profile" not in out.info


def test_transparent_png_thumbnails_flatten_and_small_images_stay_small() -> None:
    thumb = make_thumbnail(image_bytes("PNG", (50, 20)), 320)
    with Image.open(io.BytesIO(thumb)) as out:
        assert (out.format, out.mode, out.size) == ("JPEG", "RGB", (50, 20))


def test_a_truncated_jpeg_passes_the_header_check_but_not_the_thumbnailer() -> None:
    whole = image_bytes("JPEG", (400, 400))
    broken = whole[: len(whole) // 3]
    assert check_image(io.BytesIO(broken)) == "image/jpeg"  # the header is fine
    with pytest.raises(OSError, match="truncated"):
        make_thumbnail(broken, 320)
