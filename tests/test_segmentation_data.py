"""ADE20K labels and pipelines: the zero-label shift, 16-bit and palette PNGs, odd sizes, mismatched and corrupt
files, out-of-range values, deterministic batches, safe output names."""
import io

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from PIL import Image

from pvt_dense.data.images import ImageReadError
from pvt_dense.errors import PVTDenseError
from pvt_dense.segmentation.ade20k import (AnnotationError, Sample, convert_label, list_samples, read_label,
                                           read_label_raw, read_sample)
from pvt_dense.segmentation.data import SegmentationBatchSource
from pvt_dense.segmentation.evaluation import Predictor, evaluate_segmentor, resize_logits, resized_argmax
from pvt_dense.output_names import relative_output_name
from pvt_dense.segmentation.infer import output_paths, palette
from pvt_dense.data.transforms import network_input_size, rescaled_size
from pvt_dense.segmentation.transforms import TrainTransform, prepare_test_image, random_crop, sliding_windows


def write_pair(root, name, image, label, split="training"):
    (root / "images" / split).mkdir(parents=True, exist_ok=True)
    (root / "annotations" / split).mkdir(parents=True, exist_ok=True)
    image_path = root / "images" / split / f"{name}.jpg"
    label_path = root / "annotations" / split / f"{name}.png"
    cv2.imwrite(str(image_path), image[:, :, ::-1])
    cv2.imwrite(str(label_path), label)
    return Sample(str(image_path), str(label_path), name)


def random_image(rng, height, width):
    return rng.integers(0, 256, (height, width, 3), dtype=np.uint8)


def test_zero_label_shift_and_out_of_range_values():
    raw = np.array([[0, 1, 150, 151, 255, 300]])
    label, outside = convert_label(raw, num_classes=150, reduce_zero_label=True)
    # 0 ("other") and 255 are ignored; k -> k - 1; 151 -> 150 and 300 -> 299 are not classes: ignored and counted.
    assert label.tolist() == [[255, 0, 149, 255, 255, 255]]
    assert outside == 2
    label, outside = convert_label(raw, num_classes=151, reduce_zero_label=False)
    assert label.tolist() == [[0, 1, 150, 255, 255, 255]] and outside == 2


def test_16_bit_and_palette_pngs_give_their_indices(tmp_path):
    sixteen = tmp_path / "sixteen.png"
    cv2.imwrite(str(sixteen), np.array([[0, 1, 2], [149, 150, 1000]], np.uint16))
    assert read_label_raw(sixteen).tolist() == [[0, 1, 2], [149, 150, 1000]]
    label, outside = read_label(sixteen, num_classes=150)
    assert label.tolist() == [[255, 0, 1], [148, 149, 255]] and outside == 1

    indexed = Image.fromarray(np.array([[3, 7], [0, 12]], np.uint8), mode="P")
    indexed.putpalette([200, 10, 10] * 256)  # every index the same colour: only the indices carry the classes
    indexed.save(tmp_path / "palette.png")
    assert read_label_raw(tmp_path / "palette.png").tolist() == [[3, 7], [0, 12]]


@pytest.mark.bad_input("ADE20K annotation", "an RGB colour PNG as a label map",
                       "AnnotationError naming the file and saying labels must be class indices")
def test_colour_label_is_refused(tmp_path):
    path = tmp_path / "colour.png"
    cv2.imwrite(str(path), np.zeros((4, 4, 3), np.uint8))
    with pytest.raises(AnnotationError, match="colour.png.*class-index"):
        read_label_raw(path)


@pytest.mark.bad_input("ADE20K annotation", "a label PNG whose size differs from its image",
                       "AnnotationError naming the label file and both sizes; training skips it with a warning")
def test_label_of_another_size_is_a_clear_error_naming_the_file(tmp_path):
    rng = np.random.default_rng(0)
    sample = write_pair(tmp_path, "odd", random_image(rng, 40, 50), np.ones((41, 50), np.uint8))
    with pytest.raises(AnnotationError, match=r"odd\.png.*50x41.*50x40"):
        read_sample(sample, num_classes=4)


@pytest.mark.bad_input("ADE20K annotation", "label values >= num_classes (after the zero-label shift)",
                       "those pixels are ignored (255) and counted; one warning per file")
def test_out_of_range_labels_are_ignored_and_counted_by_the_training_source(tmp_path):
    rng = np.random.default_rng(0)
    label = np.ones((32, 32), np.uint8)
    label[:4] = 9  # -> class 8 after the shift, outside 0..3
    samples = [write_pair(tmp_path, f"s{i}", random_image(rng, 32, 32), label) for i in range(2)]
    transform = TrainTransform(scale=(32, 32), ratio_range=(1, 1), crop_size=(32, 32), cat_max_ratio=1.0,
                               flip_prob=0.0, photometric=False)
    source = SegmentationBatchSource(samples, transform, num_classes=4, reduce_zero_label=True, batch_size=2)
    with pytest.warns(RuntimeWarning, match="outside the 4 classes"):
        _, labels = source.batch(0, 0)
    assert (labels[:, :4] == 255).all() and (labels[:, 4:] == 0).all()
    assert source.out_of_range_pixels == 2 * 4 * 32


@pytest.mark.bad_input("ADE20K image", "a corrupt training image (random bytes named .jpg)",
                       "skipped with a warning naming it, counted; the next image of the epoch takes its place")
def test_unreadable_training_image_is_skipped_and_counted(tmp_path):
    rng = np.random.default_rng(0)
    samples = [write_pair(tmp_path, f"s{i}", random_image(rng, 32, 32), np.ones((32, 32), np.uint8))
               for i in range(3)]
    with open(samples[1].image, "wb") as handle:
        handle.write(b"not a jpeg at all")
    transform = TrainTransform(scale=(32, 32), ratio_range=(1, 1), crop_size=(32, 32), cat_max_ratio=1.0)
    source = SegmentationBatchSource(samples, transform, 4, True, batch_size=3, shuffle=False)
    with pytest.warns(RuntimeWarning, match="skipping training sample s1"):
        images, labels = source.batch(0, 0)
    assert images.shape == (3, 3, 32, 32) and source.skipped == 1


def test_batches_are_a_pure_function_of_seed_epoch_index_and_rank(tmp_path):
    rng = np.random.default_rng(0)
    samples = [write_pair(tmp_path, f"s{i}", random_image(rng, 40, 48), rng.integers(0, 5, (40, 48)).astype(
        np.uint8)) for i in range(8)]
    transform = TrainTransform(scale=(48, 40), ratio_range=(0.5, 2.0), crop_size=(32, 32))
    one = SegmentationBatchSource(samples, transform, 4, True, batch_size=4, seed=3)
    again = SegmentationBatchSource(samples, transform, 4, True, batch_size=4, seed=3)
    ranks = [SegmentationBatchSource(samples, transform, 4, True, batch_size=2, seed=3, rank=r, world_size=2)
             for r in range(2)]
    for epoch, index in [(0, 0), (0, 1), (5, 1)]:
        images, labels = one.batch(epoch, index)
        repeat = again.batch(epoch, index)
        assert np.array_equal(images, repeat[0]) and np.array_equal(labels, repeat[1])
        # 2 processes x 2 images hold exactly the global batch of 1 process x 4.
        split = [r.batch(epoch, index) for r in ranks]
        assert np.array_equal(images, np.concatenate([s[0] for s in split]))
        assert np.array_equal(labels, np.concatenate([s[1] for s in split]))
    assert not np.array_equal(one.batch(0, 0)[0], one.batch(1, 0)[0])


@pytest.mark.parametrize("size", [(61, 97), (300, 17), (33, 33)])
def test_odd_image_sizes_train_to_the_crop_and_test_at_aligned_sizes(size):
    rng = np.random.default_rng(sum(size))
    image, label = random_image(rng, *size), rng.integers(0, 4, size).astype(np.uint8)
    transform = TrainTransform(scale=(128, 64), crop_size=(64, 64))
    x, y = transform(image, label, np.random.default_rng(0))
    assert x.shape == (3, 64, 64) and x.dtype == np.float32 and y.shape == (64, 64)
    assert set(np.unique(y)) <= {0, 1, 2, 3, 255}
    aligned, rescaled = network_input_size(*size, scale=(2048, 512)), rescaled_size(*size, 512, 2048)[:2]
    assert aligned[0] % 32 == 0 and aligned[1] % 32 == 0
    assert min(rescaled) == 512 or max(rescaled) == 2048
    assert prepare_test_image(image).shape == (3,) + aligned


def test_rescaled_size_follows_mmcv():
    # 512 short side for a landscape photo; the long bound wins for a panorama.
    assert rescaled_size(375, 500, 512, 2048)[:2] == (512, 683)
    assert rescaled_size(100, 1000, 512, 2048)[:2] == (205, 2048)


def test_random_crop_respects_the_single_class_cap_when_it_can():
    label = np.zeros((100, 100), np.uint8)
    label[:, 90:] = 1  # only crops reaching the right edge hold two classes
    image = np.zeros((100, 100, 3), np.uint8)
    capped = [random_crop(image, label, np.random.default_rng(s), (20, 20), 0.75)[1] for s in range(30)]
    free = [random_crop(image, label, np.random.default_rng(s), (20, 20), 1.0)[1] for s in range(30)]
    share = [np.bincount(c.ravel(), minlength=2).max() / c.size for c in capped]
    assert np.mean([s < 0.75 for s in share]) > np.mean([len(np.unique(c)) > 1 for c in free])


def test_sliding_windows_cover_the_image_with_windows_inside_it():
    for height, width in [(512, 512), (700, 1100), (300, 900)]:
        covered = np.zeros((height, width), bool)
        for top, bottom, left, right in sliding_windows(height, width, (512, 512), (341, 341)):
            assert 0 <= top < bottom <= height and 0 <= left < right <= width
            assert bottom - top == min(512, height) and right - left == min(512, width)
            covered[top:bottom, left:right] = True
        assert covered.all()


class ColourNetwork:
    """A stand-in network: logits = the normalised input channels, so class = the strongest channel."""

    def set_train(self, mode):
        pass

    def __call__(self, x):
        import mindspore as ms
        return (ms.Tensor(x.asnumpy()),)


def test_predictions_and_evaluation_come_back_at_each_images_own_size(tmp_path):
    rng = np.random.default_rng(0)
    samples = []
    for i, size in enumerate([(45, 77), (64, 64)]):
        blocks = rng.integers(0, 3, (size[0] // 8 + 1, size[1] // 8 + 1)).astype(np.uint8)
        label = np.kron(blocks, np.ones((8, 8), np.uint8))[:size[0], :size[1]]
        image = np.zeros(size + (3,), np.uint8)
        image[np.arange(size[0])[:, None], np.arange(size[1]), label] = 255  # colour channel = class
        samples.append(write_pair(tmp_path, f"p{i}", image, label + 1))
        predictor = Predictor(ColourNetwork(), scale=(256, 64), mode="whole")
        assert predictor.predict(image).shape == size
    slide = Predictor(ColourNetwork(), scale=(256, 64), mode="slide", crop_size=(32, 32), stride=(20, 20))
    assert slide.logits(cv2.imread(samples[0].image)).shape == (3, 45, 77)
    result = evaluate_segmentor(ColourNetwork(), list_samples(tmp_path, "training"), 3, True,
                                {"scale": (256, 64)})
    # 8x8 blocks survive JPEG and the resize round trip except near their edges.
    assert result["samples"] == 2 and result["aAcc"] > 0.9


def test_resize_logits_matches_opencv_per_channel():
    logits = np.random.default_rng(0).normal(size=(600, 5, 7)).astype(np.float32)
    resized = resize_logits(logits, (11, 13))
    assert resized.shape == (600, 11, 13)
    assert np.allclose(resized[599], cv2.resize(logits[599], (13, 11), interpolation=cv2.INTER_LINEAR))


@pytest.mark.parametrize("via", [None, (52, 68), (11, 13), (13, 17)], ids=["direct", "two_resizes", "via_size",
                                                                         "via_logits"])
def test_resized_argmax_is_the_argmax_of_the_resized_logits(via):
    """The masks' fast path equals resizing all the logits (through `via` first: the network input's size) and
    taking numpy's argmax, ties included (first index)."""
    logits = np.random.default_rng(1).normal(size=(9, 13, 17)).astype(np.float32)
    logits[3] = logits[5]  # a tie everywhere between two classes: the first one wins, as numpy's argmax
    full = logits if via is None else resize_logits(logits, via)
    expected = resize_logits(full, (11, 13)).argmax(axis=0)
    np.testing.assert_array_equal(resized_argmax(logits, (11, 13), via=via), expected)


def test_missing_annotation_and_missing_split_are_clear_errors(tmp_path):
    rng = np.random.default_rng(0)
    write_pair(tmp_path, "a", random_image(rng, 8, 8), np.ones((8, 8), np.uint8))
    (tmp_path / "annotations" / "training" / "a.png").unlink()
    with pytest.raises(PVTDenseError, match="1 images .* have no annotation.*a.jpg"):
        list_samples(tmp_path, "training")
    assert list_samples(tmp_path, "training", require_labels=False)[0].label is None
    with pytest.raises(PVTDenseError, match="ADE20K layout"):
        list_samples(tmp_path, "validation")


def test_output_names_never_leave_the_output_folder(tmp_path):
    for name in ["../../etc/passwd", "/abs/x.jpg", "a/../../b.png", "C:\\win\\y.jpg", "ok/z.jpg"]:
        paths = output_paths(tmp_path, relative_output_name(name))
        for path in paths.values():
            assert str(path).startswith(str(tmp_path.resolve()) + "/")
    assert output_paths(tmp_path, relative_output_name("ok/z.jpg"))["masks"] == str(
        tmp_path.resolve() / "masks" / "ok" / "z.jpg.png")
    with pytest.raises(PVTDenseError):
        relative_output_name("../..")
    colours = palette(150)
    assert len({tuple(c) for c in colours}) == 150


def valid_png_bytes():
    buffer = io.BytesIO()
    Image.fromarray(np.arange(64, dtype=np.uint8).reshape(8, 8)).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.mark.bad_input("ADE20K annotation", "malformed PNG bytes (fuzzed: truncated, flipped, random)",
                       "AnnotationError naming the file, or a valid 2-D label map; never another exception")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.one_of(
    st.binary(max_size=200),
    st.builds(lambda cut: valid_png_bytes()[:cut], st.integers(0, 200)),
    st.builds(lambda at, value: (lambda b: b[:at] + bytes([value]) + b[at + 1:])(valid_png_bytes()),
              st.integers(0, 150), st.integers(0, 255))))
def test_fuzzed_label_bytes_give_only_documented_errors(tmp_path, data):
    path = tmp_path / "fuzz.png"
    path.write_bytes(data)
    try:
        raw = read_label_raw(path)
    except AnnotationError as err:
        assert "fuzz.png" in str(err)
        return
    assert raw.ndim == 2 and raw.dtype == np.int64


@pytest.mark.bad_input("ADE20K image", "an image file that is not an image", "ImageReadError naming the file")
def test_unreadable_image_in_read_sample_names_the_file(tmp_path):
    image = tmp_path / "x.jpg"
    image.write_bytes(b"\x00" * 10)
    with pytest.raises(ImageReadError, match="x.jpg"):
        read_sample(Sample(str(image), None, "x"), 4)
