"""Image reading, dense preprocessing and the feature export (library and command line).

The export tests share one pvt_tiny in graph mode (the tool's mode) and keep every image at one padded size
(64x64: short side 64, long side at most 64), so the whole file compiles only a handful of graphs.
"""
import io
import os
import struct
import sys
import zlib

import cv2
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from PIL import Image

from pvt_dense.data.images import ImageEntry, list_image_entries, list_images, read_image
from pvt_dense.data.sample_photos import sample_images
from pvt_dense.data.transforms import normalize, pad_to_multiple, preprocess_dense, rescaled_size, resize_keep_ratio
from pvt_dense.errors import ImageReadError
from pvt_dense.features import SameShapeBatcher, export_features, output_names, write_npz_atomic

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "tools"))
import export_features as export_tool  # noqa: E402  (tools/ is not a package)

SHORT, LONG = 64, 64
MEAN = np.array([123.675, 116.28, 103.53])
STD = np.array([58.395, 57.12, 57.375])


def write_png(path, array):
    ok, encoded = cv2.imencode(".png", array)
    assert ok
    with open(path, "wb") as handle:
        handle.write(encoded.tobytes())
    return str(path)


def jpeg_bytes(rgb, **options):
    buffer = io.BytesIO()
    Image.fromarray(rgb).save(buffer, "JPEG", quality=95, **options)
    return buffer.getvalue()


def gradient(height, width):
    """A smooth RGB test picture: distinct channels, no two rows or columns alike."""
    rows, cols = np.mgrid[0:height, 0:width]
    return np.stack([rows * 255 // max(height - 1, 1), cols * 255 // max(width - 1, 1),
                     (rows + cols) * 255 // max(height + width - 2, 1)], axis=-1).astype(np.uint8)


# --- transforms: hand-computed values --------------------------------------------------------------------------

@pytest.mark.parametrize("height, width, short, long, expected", [
    (400, 600, 64, 200, (64, 96)),     # short side limits: min(64/400, 200/600) = 0.16
    (100, 400, 64, 96, (24, 96)),      # long side limits: min(0.64, 0.24) = 0.24
    (300, 451, 800, 1333, (800, 1203)),  # 451 * 8/3 = 1202.67 rounds up
    (300, 451, 64, 64, (43, 64)),      # 300 * 64/451 = 42.57 -> 43
    (1, 1, 64, 96, (64, 64)),
    (1, 10000, 64, 96, (1, 96)),       # 0.0096 would round to 0 rows; one is kept
])
def test_rescaled_size_picks_the_limiting_side(height, width, short, long, expected):
    assert rescaled_size(height, width, short, long)[:2] == expected


@settings(max_examples=200, deadline=None)
@given(st.integers(1, 5000), st.integers(1, 5000), st.integers(16, 1024), st.integers(16, 2048))
def test_rescaled_size_respects_both_limits(height, width, short, long):
    new_h, new_w, _ = rescaled_size(height, width, short, long)
    assert min(new_h, new_w) <= short + 1 and max(new_h, new_w) <= long + 1
    # One of the two limits is reached (up to rounding), unless the image degenerates to one pixel.
    assert min(new_h, new_w) >= short - 1 or max(new_h, new_w) >= long - 1 or min(new_h, new_w) == 1


def test_resize_is_bilinear_with_half_pixel_centres():
    img = np.array([[0, 100], [0, 100]], dtype=np.uint8)
    resized = resize_keep_ratio(img, 4, 4)
    # Output pixel centres map to source x = -0.25, 0.25, 0.75, 1.25 (clamped at the borders).
    np.testing.assert_array_equal(resized, [[0, 25, 75, 100]] * 4)


@pytest.mark.parametrize("size, expected", [((1, 1), (32, 32)), ((33, 64), (64, 64)), ((64, 96), (64, 96)),
                                            ((45, 96), (64, 96))])
def test_pad_to_multiple_pads_bottom_right_with_zeros(size, expected):
    img = np.full(size + (3,), 7.0, dtype=np.float32)
    padded = pad_to_multiple(img, 32)
    assert padded.shape == expected + (3,)
    assert (padded[:size[0], :size[1]] == 7).all()
    assert padded.sum() == 7 * img.size


def test_normalize_constant_image():
    out = normalize(np.full((2, 3, 3), 128, dtype=np.uint8))
    assert out.dtype == np.float32
    expected = [(128 - 123.675) / 58.395, (128 - 116.28) / 57.12, (128 - 103.53) / 57.375]
    np.testing.assert_allclose(out, np.broadcast_to(expected, (2, 3, 3)), rtol=1e-6)


def test_preprocess_dense_layout_and_meta():
    chw, meta = preprocess_dense(np.full((70, 150, 3), 128, dtype=np.uint8), 64, 96, 32)
    # scale = min(64/70, 96/150) = 0.64 -> 44.8 + 0.5 -> 45 rows, 96 columns; rows padded to 64.
    assert meta == {"original_size": (70, 150), "resized_size": (45, 96), "padded_size": (64, 96),
                    "scale_factor": (45 / 70, 96 / 150)}
    assert chw.shape == (3, 64, 96) and chw.dtype == np.float32
    np.testing.assert_allclose(chw[:, :45, :], np.broadcast_to(((128 - MEAN) / STD)[:, None, None], (3, 45, 96)),
                               rtol=1e-6)
    assert (chw[:, 45:, :] == 0).all()


# --- reading images ---------------------------------------------------------------------------------------------

@pytest.mark.bad_input("image",
                       "grayscale, gray+alpha, RGBA and 16-bit PNGs, a PNG named .jpg, a non-ASCII path, a 1x1 image",
                       "each read as 8-bit RGB (alpha dropped, 16 bits rounded to 8)")
def test_read_image_normalises_what_users_feed(tmp_path):
    rgb = gradient(6, 8)
    bgr = np.ascontiguousarray(rgb[..., ::-1])
    gray = rgb[..., 0]

    np.testing.assert_array_equal(read_image(write_png(tmp_path / "gray.png", gray)), np.stack([gray] * 3, -1))
    rgba = np.concatenate([bgr, np.zeros((6, 8, 1), np.uint8)], axis=-1)  # fully transparent: alpha is dropped
    np.testing.assert_array_equal(read_image(write_png(tmp_path / "rgba.png", rgba)), rgb)
    Image.fromarray(np.stack([gray, gray], -1), "LA").save(tmp_path / "la.png")
    np.testing.assert_array_equal(read_image(tmp_path / "la.png"), np.stack([gray] * 3, -1))
    deep = (bgr.astype(np.int64) * 257 - (bgr > 0) * 100).astype(np.uint16)  # 100/257 below a level rounds up to it
    np.testing.assert_array_equal(read_image(write_png(tmp_path / "deep16.png", deep)), rgb)
    write_png(tmp_path / "really_a_png.jpg", bgr)
    np.testing.assert_array_equal(read_image(tmp_path / "really_a_png.jpg"), rgb)
    unicode_dir = tmp_path / "фото 写真"
    unicode_dir.mkdir()
    np.testing.assert_array_equal(read_image(write_png(unicode_dir / "café.png", bgr)), rgb)
    one_pixel = read_image(write_png(tmp_path / "one.png", bgr[:1, :1]))
    assert one_pixel.shape == (1, 1, 3) and one_pixel.dtype == np.uint8


@pytest.mark.bad_input("image", "a JPEG with EXIF orientation 6 (a phone photo)", "rotated as it is displayed")
def test_read_image_applies_exif_orientation(tmp_path):
    rgb = np.zeros((20, 40, 3), np.uint8)
    rgb[:5, :5] = 255  # a white top-left corner
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90 degrees clockwise to display"
    (tmp_path / "phone.jpg").write_bytes(jpeg_bytes(rgb, exif=exif.tobytes()))
    shown = read_image(tmp_path / "phone.jpg")
    assert shown.shape == (40, 20, 3)
    assert shown[:5, -5:].mean() > 200 and shown[:5, :5].mean() < 50  # the corner moved to the top right


@pytest.mark.bad_input("image",
                       "an empty .jpg, text named .png, a PNG cut in half, a JPEG cut at 60 %, a progressive JPEG cut "
                       "in half",
                       "ImageReadError naming the file")
@pytest.mark.parametrize("name, content", [
    ("empty.jpg", b""),
    ("notes.png", b"these are not pixels\n"),
    ("truncated.png", "png-half"),
    ("truncated.jpg", "jpg-cut"),
    ("progressive_cut.jpg", "progressive-half"),
])
def test_read_image_rejects_broken_files(tmp_path, name, content):
    rgb = gradient(48, 64)
    if content == "png-half":
        ok, encoded = cv2.imencode(".png", rgb)
        content = encoded.tobytes()[: len(encoded) // 2]
    elif content == "jpg-cut":
        full = jpeg_bytes(rgb)
        content = full[: len(full) * 3 // 5]
    elif content == "progressive-half":
        full = jpeg_bytes(rgb, progressive=True)
        content = full[: len(full) // 2]
    path = tmp_path / name
    path.write_bytes(content)
    with pytest.raises(ImageReadError, match=name):
        read_image(path)


@pytest.mark.bad_input("image",
                       "a path that does not exist, or a directory",
                       "ImageReadError: 'no such file' / 'is a directory'")
def test_read_image_missing_and_directory(tmp_path):
    with pytest.raises(ImageReadError, match="no such file"):
        read_image(tmp_path / "nope.png")
    with pytest.raises(ImageReadError, match="is a directory"):
        read_image(tmp_path)


@pytest.mark.bad_input("image",
                       "an image above max_pixels (argument or PVT_DENSE_MAX_PIXELS); tiny PNGs whose headers claim "
                       "12000x10000 and 50000x50000 pixels (a decompression bomb)",
                       "ImageReadError naming the file, from the header before any pixel buffer exists ('120.0 "
                       "megapixels exceeds the limit of 100.0', 'more than 179 megapixels')")
def test_pixel_limit_from_header_argument_and_environment(tmp_path, monkeypatch):
    path = write_png(tmp_path / "small.png", gradient(10, 20))
    with pytest.raises(ImageReadError, match="exceeds the limit"):
        read_image(path, max_pixels=199)
    assert read_image(path, max_pixels=200).shape == (10, 20, 3)
    monkeypatch.setenv("PVT_DENSE_MAX_PIXELS", "150")
    with pytest.raises(ImageReadError, match="small.png"):
        read_image(path)
    monkeypatch.delenv("PVT_DENSE_MAX_PIXELS")
    # Tiny files whose headers claim huge sizes are refused before any pixel buffer exists (decoding them would
    # take gigabytes); past PIL's own bomb guard only a lower bound on the size is known.
    (tmp_path / "huge.png").write_bytes(png_header_only(12000, 10000))
    with pytest.raises(ImageReadError, match="120.0 megapixels exceeds the limit of 100.0"):
        read_image(tmp_path / "huge.png")
    (tmp_path / "bomb.png").write_bytes(png_header_only(50000, 50000))
    with pytest.raises(ImageReadError, match="bomb.png.*more than 179 megapixels"):
        read_image(tmp_path / "bomb.png")


def png_header_only(width, height):
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)  # 8-bit RGB
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + \
        chunk(b"IEND", b"")


@pytest.mark.bad_input("image",
                       "an image list (.txt) with a BOM, comments, blank lines, CRLF and padded paths; hidden and "
                       "non-image files in a folder; an input that does not exist",
                       "the list and the folder are read as meant (hidden and non-image files skipped); the missing "
                       "input is an ImageReadError 'input not found'")
def test_list_images_directory_list_file_and_single_file(tmp_path):
    photos = tmp_path / "photos"
    (photos / "b" / "deeper").mkdir(parents=True)
    (photos / ".cache").mkdir()
    for name in ("z.JPG", "a.png", "b/deeper/c.tif", "b/x.webp", "notes.txt", "._a.jpg", ".cache/hidden.png"):
        (photos / name).write_bytes(b"x")
    assert [e.name for e in list_image_entries(photos)] == ["a.png", "b/deeper/c.tif", "b/x.webp", "z.JPG"]
    assert list_images(photos)[0] == str(photos / "a.png")

    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "images.txt").write_text("\ufeff# my images\n\n  ../photos/a.png  \r\n/abs/path.jpg\n# done\n",
                                      encoding="utf-8")
    assert list_image_entries(lists / "images.txt") == [
        ImageEntry(str(lists / "../photos/a.png"), "../photos/a.png"), ImageEntry("/abs/path.jpg", "/abs/path.jpg")]
    assert list_image_entries(photos / "a.png") == [ImageEntry(str(photos / "a.png"), "a.png")]
    with pytest.raises(ImageReadError, match="input not found"):
        list_image_entries(tmp_path / "missing")


# --- output names, batching, atomic writes (no model) ----------------------------------------------------------

@pytest.mark.bad_input("output path",
                       "image names with ../, absolute and Windows paths, and names that collide (case, after "
                       "cleaning)",
                       "output names inside the output folder, made distinct with a `~2` suffix")
def test_output_names_are_contained_and_distinct():
    names = ["a.jpg", "a.png", "A.png", "../../etc/x.png", "/etc/x.png", "sub/../a.jpg", "C:\\data\\y.png"]
    assert output_names([ImageEntry(n, n) for n in names]) == [
        "a.jpg.npz", "a.png.npz", "A.png~2.npz", "etc/x.png.npz", "x.png.npz", "a.jpg~2.npz", "y.png.npz"]


def test_batcher_groups_by_shape_and_bounds_memory():
    class Item:
        def __init__(self, tag, shape):
            self.tag, self.chw = tag, np.zeros(shape, np.float32)

    def tags(batches):
        return [[item.tag for item in batch] for batch in batches]

    batcher = SameShapeBatcher(batch_size=3, max_pending=3)
    small, large, tall = (3, 32, 32), (3, 64, 64), (3, 96, 32)
    assert tags(batcher.add(Item("a", small)) + batcher.add(Item("b", large)) + batcher.add(Item("c", small))) == []
    # A fourth waiting image exceeds max_pending: the fullest group goes out as a short batch.
    assert tags(batcher.add(Item("d", tall))) == [["a", "c"]]
    assert tags(batcher.add(Item("e", large))) == []
    assert tags(batcher.add(Item("f", large))) == [["b", "e", "f"]]
    assert tags(batcher.drain()) == [["d"]]


@pytest.mark.bad_input("output path",
                       "a KeyboardInterrupt in the middle of writing a feature .npz",
                       "no partial file and no temporary left in the output folder")
def test_interrupted_write_leaves_nothing_behind(tmp_path, monkeypatch):
    def savez_then_interrupt(handle, **arrays):
        handle.write(b"PK half a zip")
        raise KeyboardInterrupt

    monkeypatch.setattr(np, "savez", savez_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        write_npz_atomic(str(tmp_path / "out" / "a.jpg.npz"), {"x": np.zeros(3)})
    assert os.listdir(tmp_path / "out") == []


# --- the export, with one shared pvt_tiny in graph mode --------------------------------------------------------

@pytest.fixture(scope="module")
def backbone():
    import mindspore as ms
    from pvt_dense import create_backbone
    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    net = create_backbone("pvt_tiny")
    net.set_train(False)
    return net


@pytest.fixture(scope="module")
def samples(tmp_path_factory):
    folder = tmp_path_factory.mktemp("samples")
    sample_images(folder)
    return folder


@pytest.fixture(scope="module")
def exported(backbone, samples, tmp_path_factory):
    out = tmp_path_factory.mktemp("features")
    summary = export_features(backbone, samples, out, short_side=SHORT, max_long_side=LONG, progress=False)
    return summary, out


def forward(net, chw):
    import mindspore as ms
    return [m.asnumpy()[0] for m in net(ms.Tensor(chw[None]))]


def hand_preprocessed(rgb, resized_hw):
    """The documented preprocessing written out by hand: bilinear resize, normalise, zero-pad to 64x64."""
    resized = cv2.resize(rgb, resized_hw[::-1], interpolation=cv2.INTER_LINEAR).astype(np.float64)
    chw = np.zeros((3, 64, 64), np.float32)
    chw[:, :resized_hw[0], :resized_hw[1]] = ((resized - MEAN) / STD).transpose(2, 0, 1)
    return chw


def test_export_matches_a_direct_forward(backbone, samples, exported):
    import skimage.data
    summary, out = exported
    assert sorted(os.path.basename(p) for p in summary.exported) == [
        "astronaut.png.npz", "chelsea.png.npz", "coffee.jpg.npz", "rocket.jpg.npz"]
    assert not summary.failed and not summary.skipped_existing

    with np.load(out / "chelsea.png.npz") as npz:  # chelsea is 300x451: 43x64 after resizing, padded to 64x64
        assert set(npz.files) == {"stage1", "stage2", "stage3", "stage4", "out_indices", "strides", "channels",
                                  "valid_sizes", "original_size", "resized_size", "padded_size", "scale_factor",
                                  "mean", "std", "backbone", "checkpoint", "source"}
        for key, channels, stride in zip(("stage1", "stage2", "stage3", "stage4"), backbone.out_channels,
                                         backbone.strides, strict=True):
            assert npz[key].shape == (channels, 64 // stride, 64 // stride) and npz[key].dtype == np.float32
        assert npz["original_size"].tolist() == [300, 451] and npz["resized_size"].tolist() == [43, 64]
        assert npz["padded_size"].tolist() == [64, 64]
        assert npz["valid_sizes"].tolist() == [[11, 16], [6, 8], [3, 4], [2, 2]]
        assert npz["strides"].tolist() == [4, 8, 16, 32] and npz["channels"].tolist() == [64, 128, 320, 512]
        np.testing.assert_allclose(npz["scale_factor"], [43 / 300, 64 / 451])
        np.testing.assert_allclose(npz["mean"], MEAN)
        np.testing.assert_allclose(npz["std"], STD)
        assert str(npz["backbone"]) == "pvt_tiny" and str(npz["checkpoint"]) == ""
        assert str(npz["source"]) == os.path.abspath(samples / "chelsea.png")
        expected = forward(backbone, hand_preprocessed(skimage.data.chelsea(), (43, 64)))
        for key, maps in zip(("stage1", "stage2", "stage3", "stage4"), expected, strict=True):
            np.testing.assert_allclose(npz[key], maps, rtol=1e-5, atol=1e-5)

    with np.load(out / "astronaut.png.npz") as npz:  # square: no padding at all
        assert npz["resized_size"].tolist() == [64, 64]
        expected = forward(backbone, hand_preprocessed(skimage.data.astronaut(), (64, 64)))
        np.testing.assert_allclose(npz["stage4"], expected[3], rtol=1e-5, atol=1e-5)


def test_rerun_skips_existing_and_redoes_missing(backbone, samples, exported, tmp_path):
    import shutil
    out = tmp_path / "features"
    shutil.copytree(exported[1], out)
    before = {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out)}
    again = export_features(backbone, samples, out, short_side=SHORT, max_long_side=LONG, progress=False)
    assert len(again.skipped_existing) == 4 and not again.exported and not again.failed
    assert {name: os.stat(out / name).st_mtime_ns for name in os.listdir(out)} == before

    os.remove(out / "coffee.jpg.npz")
    third = export_features(backbone, samples, out, short_side=SHORT, max_long_side=LONG, progress=False)
    assert [os.path.basename(p) for p in third.exported] == ["coffee.jpg.npz"] and len(third.skipped_existing) == 3
    with np.load(out / "coffee.jpg.npz") as redone, np.load(exported[1] / "coffee.jpg.npz") as first:
        np.testing.assert_array_equal(redone["stage2"], first["stage2"])


@pytest.mark.bad_input("image",
                       "a folder with a corrupt JPEG, an empty file and a text file named .png among good images",
                       "the three are reported failed with a reason ('corrupt or truncated', 'empty', 'not a "
                       "decodable image'); the rest are exported")
def test_problem_files_are_reported_and_the_run_goes_on(backbone, tmp_path):
    images = tmp_path / "images"
    images.mkdir()
    bgr = np.ascontiguousarray(gradient(40, 60)[..., ::-1])
    (images / "corrupt.jpg").write_bytes(jpeg_bytes(gradient(40, 60))[:300])
    (images / "empty.jpg").write_bytes(b"")
    (images / "text.png").write_text("not an image")
    write_png(images / "gray.png", bgr[..., 0])
    write_png(images / "rgba.png", np.concatenate([bgr, np.full((40, 60, 1), 128, np.uint8)], -1))
    write_png(images / "deep16.png", bgr.astype(np.uint16) * 257)
    write_png(images / "one_pixel.png", bgr[:1, :1])
    write_png(images / "photo.png", bgr)
    (images / "photo.jpg").write_bytes(jpeg_bytes(gradient(40, 60)))

    out = tmp_path / "out"
    summary = export_features(backbone, images, out, short_side=SHORT, max_long_side=LONG, progress=False)
    assert sorted(os.listdir(out)) == ["deep16.png.npz", "gray.png.npz", "one_pixel.png.npz", "photo.jpg.npz",
                                       "photo.png.npz", "rgba.png.npz"]
    failed = {os.path.basename(source): reason for source, reason in summary.failed}
    assert set(failed) == {"corrupt.jpg", "empty.jpg", "text.png"}
    assert "empty" in failed["empty.jpg"]
    assert "corrupt or truncated" in failed["corrupt.jpg"] and "not a decodable image" in failed["text.png"]
    with np.load(out / "one_pixel.png.npz") as npz:
        assert npz["resized_size"].tolist() == [64, 64] and npz["stage1"].shape == (64, 16, 16)
    with np.load(out / "deep16.png.npz") as deep, np.load(out / "photo.png.npz") as eight_bit:
        np.testing.assert_array_equal(deep["stage3"], eight_bit["stage3"])  # 16-bit input scaled to the same pixels
    with np.load(out / "rgba.png.npz") as rgba, np.load(out / "photo.png.npz") as rgb:
        np.testing.assert_array_equal(rgba["stage1"], rgb["stage1"])


def tree(root, exclude):
    found = set()
    for folder, subfolders, files in os.walk(root):
        subfolders[:] = [s for s in subfolders if os.path.join(folder, s) != str(exclude)]
        found.update(os.path.join(folder, f) for f in files + subfolders)
    return found


@pytest.mark.bad_input("output path",
                       "an image list with ../ and absolute paths, and a symlink inside the output folder pointing "
                       "out of it",
                       "nothing is written outside the output folder; the entry behind the symlink is reported failed "
                       "('outside the output folder'); an absolute entry gives a flat name")
def test_list_file_entries_never_write_outside_the_output(backbone, tmp_path):
    bgr = np.ascontiguousarray(gradient(40, 60)[..., ::-1])
    (tmp_path / "outside").mkdir()
    (tmp_path / "abs").mkdir()
    (tmp_path / "trap").mkdir()
    (tmp_path / "lists" / "deep" / "evil").mkdir(parents=True)
    write_png(tmp_path / "outside" / "x.png", bgr)
    absolute = write_png(tmp_path / "abs" / "y.png", bgr)
    write_png(tmp_path / "lists" / "deep" / "evil" / "z.png", bgr)
    list_file = tmp_path / "lists" / "deep" / "list.txt"
    list_file.write_text(f"../../outside/x.png\n{absolute}\nevil/z.png\n")
    out = tmp_path / "out"
    out.mkdir()
    os.symlink(tmp_path / "trap", out / "evil")  # an existing symlink inside the output pointing out of it
    before = tree(tmp_path, exclude=out)

    summary = export_features(backbone, list_file, out, short_side=SHORT, max_long_side=LONG, progress=False)
    assert tree(tmp_path, exclude=out) == before and os.listdir(tmp_path / "trap") == []
    assert os.path.isfile(out / "outside" / "x.png.npz")
    assert os.path.isfile(out / "y.png.npz")  # an absolute entry gives its file name, not mirrored folders
    assert len(summary.exported) == 2
    assert [(os.path.basename(s), "outside the output folder" in r) for s, r in summary.failed] == [
        ("z.png", True)]


def test_batches_of_two_give_the_same_features(backbone, samples, exported, tmp_path):
    summary = export_features(backbone, samples, tmp_path, short_side=SHORT, max_long_side=LONG, batch_size=2,
                              progress=False)
    assert len(summary.exported) == 4
    for name in ("astronaut.png.npz", "rocket.jpg.npz"):
        with np.load(tmp_path / name) as batched, np.load(exported[1] / name) as single:
            for key in ("stage1", "stage4"):
                np.testing.assert_allclose(batched[key], single[key], rtol=1e-4, atol=1e-4)


def test_export_loads_a_checkpoint(backbone, samples, exported, tmp_path):
    import mindspore as ms
    ckpt = str(tmp_path / "tiny.ckpt")
    ms.save_checkpoint(backbone, ckpt)
    summary = export_features("pvt_tiny", samples / "chelsea.png", tmp_path / "out", ckpt=ckpt, short_side=SHORT,
                              max_long_side=LONG, out_indices=(1, 3), progress=False)
    assert len(summary.exported) == 1
    with np.load(tmp_path / "out" / "chelsea.png.npz") as npz, np.load(exported[1] / "chelsea.png.npz") as ref:
        assert {"stage2", "stage4"} <= set(npz.files) and "stage1" not in npz.files
        assert npz["strides"].tolist() == [8, 32] and str(npz["checkpoint"]) == ckpt
        np.testing.assert_allclose(npz["stage4"], ref["stage4"], rtol=1e-5, atol=1e-5)


@pytest.mark.bad_input("command line",
                       "tools/export_features.py on a folder of undecodable images, on a missing --input, with "
                       "--batch-size 0",
                       "exit 1 naming each failed image; exit 2 with one 'error:' line and no traceback; argparse "
                       "usage error (exit 2)")
def test_command_line(backbone, samples, tmp_path, monkeypatch, capsys):
    import pvt_dense.features
    built = []

    def reuse_backbone(name, out_indices, pretrained):  # keeps the compiled graph; the tool's path is the same
        built.append((name, tuple(out_indices), pretrained))
        return backbone

    monkeypatch.setattr(pvt_dense.features, "create_backbone", reuse_backbone)
    args = ["--backbone", "pvt_tiny", "--input", str(samples), "--output", str(tmp_path / "out"),
            "--short-side", "64", "--max-long-side", "64", "--no-progress"]
    assert export_tool.main(args) == 0
    captured = capsys.readouterr()
    assert "warning: no --ckpt" in captured.err and "exported 4 feature files" in captured.out
    assert built == [("pvt_tiny", (0, 1, 2, 3), None)]
    assert export_tool.main(args) == 0
    assert "skipped 4 images" in capsys.readouterr().out

    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_text("text")
    assert export_tool.main(args[:2] + ["--input", str(broken), "--output", str(tmp_path / "o2")]) == 1
    assert "a.png: not a decodable image" in capsys.readouterr().out

    from pvt_dense.cli import run_tool
    missing = args[:2] + ["--input", str(tmp_path / "missing"), "--output", str(tmp_path / "o3")]
    assert run_tool(export_tool.main, missing) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert err[-1].startswith("error: input not found") and "Traceback" not in "\n".join(err)
    with pytest.raises(SystemExit) as usage:
        export_tool.main(args + ["--batch-size", "0"])
    assert usage.value.code == 2
