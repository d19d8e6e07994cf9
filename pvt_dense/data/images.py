"""Turn whatever image files users point us at into (H, W, 3) uint8 RGB arrays, or one clear `ImageReadError`.

Decoding goes through bytes (`cv2.imdecode`) so non-ASCII paths work, and by content, so a PNG named `.jpg`
still loads. Flags `IMREAD_COLOR | IMREAD_ANYDEPTH` make OpenCV expand grayscale and palette images, drop alpha,
keep 16-bit samples (scaled to 8 bits here, by 257) and apply the EXIF orientation, as mmcv's OpenCV loader
does for the dense-prediction recipes. (`IMREAD_UNCHANGED` would ignore the orientation, so phone photos would
come out sideways.)
"""
import os
import stat
import warnings
from dataclasses import dataclass

import cv2
import numpy as np
from PIL import Image

from ..errors import ConfigError, ImageReadError

MAX_PIXELS_ENV = "PVT_DENSE_MAX_PIXELS"
DEFAULT_MAX_PIXELS = 100_000_000

# What OpenCV's wheel decodes; GIF is absent on purpose (OpenCV cannot read it), so folders full of GIFs are
# skipped instead of reported one by one. A single file or a list entry is tried whatever its extension.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".jpe", ".png", ".bmp", ".dib", ".tif", ".tiff", ".webp", ".ppm", ".pgm",
                    ".pbm", ".pnm")
LIST_FILE_EXTENSIONS = (".txt",)

DECODE_FLAGS = cv2.IMREAD_COLOR | cv2.IMREAD_ANYDEPTH


def image_error(path, reason):
    """An `ImageReadError` naming the file, with the bare reason kept for summaries that print the path anyway."""
    err = ImageReadError(f"cannot read image {os.fspath(path)!r}: {reason}")
    err.path = os.fspath(path)
    err.reason = reason
    return err


def resolve_max_pixels(max_pixels=None):
    """The pixel limit: the argument, else $PVT_DENSE_MAX_PIXELS, else 100 megapixels."""
    if max_pixels is None:
        text = os.environ.get(MAX_PIXELS_ENV, "").strip()
        if not text:
            return DEFAULT_MAX_PIXELS
        try:
            max_pixels = int(float(text))
        except ValueError:
            raise ConfigError(f"${MAX_PIXELS_ENV} must be a number of pixels, got {text!r}") from None
    max_pixels = int(max_pixels)
    if max_pixels <= 0:
        raise ConfigError(f"the image pixel limit must be positive, got {max_pixels}")
    return max_pixels


def open_regular_file(path):
    """A binary file object for `path`, or `ImageReadError` when it is not a regular file (a FIFO, a device, a
    socket, a folder). The file is opened without blocking and checked on the descriptor itself: opening a FIFO for
    reading would otherwise wait forever for a writer, and a check by name could be raced."""
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise image_error(path, "no such file") from None
    except IsADirectoryError:
        raise image_error(path, "is a directory") from None
    except PermissionError:
        raise image_error(path, "permission denied") from None
    except OSError as err:
        raise image_error(path, err.strerror or str(err)) from None
    try:
        mode = os.fstat(fd).st_mode
        if stat.S_ISDIR(mode):
            raise image_error(path, "is a directory")
        if not stat.S_ISREG(mode):
            raise image_error(path, "not a regular file (a FIFO, device or socket)")
        if hasattr(os, "set_blocking"):
            os.set_blocking(fd, True)
        return os.fdopen(fd, "rb")
    except BaseException:
        os.close(fd)
        raise


def check_header(path, max_pixels):
    """Refuse an over-limit image from its header alone; return PIL's name for the format.

    A file whose header PIL cannot parse is refused before decoding too: OpenCV would decode formats PIL does not
    know (Radiance HDR, OpenEXR, PFM, Sun raster) in full before their size could be checked, so a few megabytes
    could claim gigabytes. Every format of IMAGE_EXTENSIONS has a header PIL reads.

    PIL reads only the header here, so a 50000x50000 PNG of a few kilobytes is refused before any pixel buffer
    exists. PIL's own decompression-bomb guard fires above twice its `MAX_IMAGE_PIXELS`, which is all we learn
    about the size then.
    """
    try:
        with warnings.catch_warnings(), open_regular_file(path) as handle:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                (width, height), file_format = image.size, image.format
    except ImageReadError:
        raise
    except Image.DecompressionBombError:
        bomb_floor = 2 * Image.MAX_IMAGE_PIXELS
        if max_pixels < bomb_floor:
            raise image_error(path, f"more than {bomb_floor / 1e6:.0f} megapixels, above the limit of "
                                    f"{max_pixels / 1e6:.1f} megapixels") from None
        return None
    except Exception:  # PIL raises many types for files it does not know
        raise image_error(path, "not a decodable image (unknown format, or corrupt or truncated; formats read: "
                                "JPEG, PNG, BMP, TIFF, WebP, PPM/PGM/PBM)") from None
    check_pixel_count(path, height, width, max_pixels)
    return file_format


def header_image_size(path):
    """(height, width) of an image as `read_image` will return it (EXIF orientation applied), from its header
    only (no decoding); None when the header cannot be read, or when `path` is not a regular file (a FIFO would
    block the read). Used to tell a forward ahead which input sizes will come, where a wrong guess (an unusual
    file) costs only speed, never a result."""
    try:
        with warnings.catch_warnings(), open_regular_file(path) as handle:
            warnings.simplefilter("ignore", Image.DecompressionBombWarning)
            with Image.open(handle) as image:
                width, height = image.size
                if image.getexif().get(0x0112, 1) in (5, 6, 7, 8):  # EXIF orientations that swap the axes
                    width, height = height, width
    except Exception:  # noqa: BLE001  (any unreadable header: no guess for this image)
        return None
    return (height, width) if height > 0 and width > 0 else None


def check_pixel_count(path, height, width, max_pixels):
    if height * width > max_pixels:
        raise image_error(path, f"{width}x{height} = {height * width / 1e6:.1f} megapixels exceeds the limit of "
                                f"{max_pixels / 1e6:.1f} megapixels (raise it with max_pixels or "
                                f"${MAX_PIXELS_ENV})")


def read_image(path, max_pixels=None):
    """Read one image file as an (H, W, 3) uint8 RGB array.

    Grayscale, palette, gray+alpha and RGBA images become RGB (alpha is dropped, not composited); 16-bit
    images are scaled to 8 bits by 257; the EXIF orientation is applied. Zero-byte, truncated, non-image and
    over-limit files (more than `max_pixels`, default $PVT_DENSE_MAX_PIXELS or 100 megapixels) raise
    `ImageReadError` naming the file.
    """
    path = os.fspath(path)
    max_pixels = resolve_max_pixels(max_pixels)
    try:
        with open_regular_file(path) as handle:
            if os.fstat(handle.fileno()).st_size == 0:
                raise image_error(path, "the file is empty (0 bytes)")
        file_format = check_header(path, max_pixels)
        with open_regular_file(path) as handle:
            data = handle.read()
    except PermissionError:
        raise image_error(path, "permission denied") from None
    except OSError as err:
        raise image_error(path, err.strerror or str(err)) from None

    try:
        pixels = cv2.imdecode(np.frombuffer(data, dtype=np.uint8), DECODE_FLAGS)
    except cv2.error:  # some decoders assert instead of returning None on malformed data
        pixels = None
    if pixels is None or pixels.size == 0:
        if file_format is None:
            raise image_error(path, "not a decodable image (unknown format, or corrupt or truncated)")
        raise image_error(path, f"the {file_format} data is corrupt or truncated (or OpenCV cannot decode "
                                f"{file_format} files)")
    check_pixel_count(path, pixels.shape[0], pixels.shape[1], max_pixels)
    return to_rgb8(path, pixels)


# Pixels converted at a time from 16 to 8 bits: the wider intermediate exists for one band of rows only, so a
# 9000x9000 16-bit RGB image costs what OpenCV's decoder needs (its 486 MB of samples and as much again while
# decoding) and the 243 MB result, not full-size uint32 temporaries. tools/export_features.py on one: 2.24 GB peak
# RSS with whole-image temporaries, 1.52 GB this way (0.78 GB of it the tool itself, on a small image).
_PIXELS_PER_BAND = 1 << 16


def to_rgb8(path, pixels):
    """OpenCV's decoded BGR or gray (8- or 16-bit) -> RGB uint8, written band by band into the result."""
    if pixels.dtype not in (np.uint8, np.uint16):
        raise image_error(path, f"unsupported sample type {pixels.dtype} (only 8- and 16-bit images are read)")
    out = np.empty(pixels.shape[:2] + (3,), np.uint8)
    rows = max(1, _PIXELS_PER_BAND // max(1, pixels.shape[1]))
    for top in range(0, pixels.shape[0], rows):
        band = pixels[top:top + rows]
        if band.dtype == np.uint16:
            # Rounded division by 257 maps 0..65535 onto 0..255 exactly (65535 = 255 * 257).
            band = band.astype(np.uint32)
            band += 128
            band //= 257
        out[top:top + rows] = band[..., None] if band.ndim == 2 else band[..., ::-1]
    return out


@dataclass(frozen=True)
class ImageEntry:
    """One image to process: where to read it, and the name the user gave it relative to their input (the file
    name for a single file, the path under a directory, the line of a list file as written)."""

    path: str
    name: str


def is_image_name(filename):
    return filename.lower().endswith(IMAGE_EXTENSIONS)


def list_image_entries(input_path):
    """`ImageEntry`s of an image file, a directory (recursive, sorted, image extensions only, hidden files and
    folders skipped: macOS `._x.jpg` files are not images) or a .txt list file (one path per line, relative to
    the list file; blank lines and lines starting with # are skipped)."""
    input_path = os.fspath(input_path)
    if os.path.isdir(input_path):
        return list_directory(input_path)
    if not os.path.exists(input_path):
        raise ImageReadError(f"input not found: {input_path!r} (expected an image, a directory or a .txt list)")
    if input_path.lower().endswith(LIST_FILE_EXTENSIONS):
        return read_list_file(input_path)
    return [ImageEntry(input_path, os.path.basename(input_path))]


def list_images(input_path):
    """Paths of the images named by `input_path`; see `list_image_entries`."""
    return [entry.path for entry in list_image_entries(input_path)]


def list_directory(root):
    entries = []
    for folder, subfolders, filenames in os.walk(root):
        subfolders[:] = [name for name in subfolders if not name.startswith(".")]
        for filename in filenames:
            if filename.startswith(".") or not is_image_name(filename):
                continue
            path = os.path.join(folder, filename)
            entries.append(ImageEntry(path, os.path.relpath(path, root).replace(os.sep, "/")))
    if not entries:
        raise ImageReadError(f"no images found under {root!r} (extensions: {' '.join(IMAGE_EXTENSIONS)})")
    return sorted(entries, key=lambda entry: entry.name)


def read_list_file(list_path):
    base = os.path.dirname(os.path.abspath(list_path))
    try:
        # utf-8-sig: Windows editors start UTF-8 files with a BOM that would otherwise stick to the first path.
        with open_regular_file(list_path) as handle:  # a FIFO named list.txt must not block
            lines = handle.read().decode("utf-8-sig").splitlines()
    except UnicodeDecodeError:
        raise ImageReadError(f"list file {list_path!r} is not UTF-8 text") from None
    except ImageReadError as err:
        raise ImageReadError(f"list file {list_path!r}: {err.reason}") from None
    entries = []
    for line in lines:
        name = line.strip()
        if not name or name.startswith("#"):
            continue
        entries.append(ImageEntry(os.path.join(base, name), name))
    if not entries:
        raise ImageReadError(f"list file {list_path!r} names no images")
    return entries
