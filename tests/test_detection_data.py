"""The COCO reader, detection transforms and batches, and the pycocotools evaluator, including bad input."""
import json
import os
import warnings

import cv2
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pvt_dense.data.digits_detection import make_digits_detection
from pvt_dense.detection.coco import CocoDetection, CocoFormatError, MissingImagesError, read_annotation_file
from pvt_dense.detection.data import DetectionBatchSource
from pvt_dense.detection.evaluation import METRIC_NAMES, coco_evaluate, detections_to_coco
from pvt_dense.detection.transforms import canvas_shape, prepare_image


def write_coco(root, images, annotations, categories=({"id": 3, "name": "cat"}, {"id": 7, "name": "dog"})):
    """A COCO set under root: images [(id, width, height)] drawn as gray PNGs, annotations as given."""
    os.makedirs(os.path.join(root, "images"), exist_ok=True)
    entries = []
    for image_id, width, height in images:
        name = f"{image_id:04d}.png"
        cv2.imwrite(os.path.join(root, "images", name), np.full((height, width, 3), 90, np.uint8))
        entries.append({"id": image_id, "file_name": name, "width": width, "height": height})
    path = os.path.join(root, "ann.json")
    with open(path, "w") as handle:
        json.dump({"images": entries, "annotations": annotations, "categories": list(categories)}, handle)
    return path, os.path.join(root, "images")


def box(ann_id, image_id, category_id, x, y, w, h, crowd=0):
    return {"id": ann_id, "image_id": image_id, "category_id": category_id, "bbox": [x, y, w, h], "iscrowd": crowd,
            "area": w * h}


def test_reader_maps_categories_skips_crowd_and_keeps_empty_images(tmp_path):
    ann, images = write_coco(tmp_path, [(1, 40, 30), (2, 30, 40)],
                             [box(1, 1, 7, 2, 3, 10, 5), box(2, 1, 3, 0, 0, 40, 30, crowd=1), box(3, 1, 3, 5, 5, 0.5, 8)])
    dataset = CocoDetection(ann, images)
    assert dataset.class_names == ["cat", "dog"] and dataset.category_ids == [3, 7]
    first, empty = dataset.records
    np.testing.assert_allclose(first.boxes, [[2, 3, 12, 8]])  # crowd and sub-pixel-wide boxes left out
    assert list(first.labels) == [1]
    assert empty.boxes.shape == (0, 4)  # an image without objects stays in the set
    assert dataset.coco.getAnnIds(imgIds=[1]) == [1, 2, 3]  # evaluation still sees everything


def test_resize_flip_and_pad_move_boxes_with_the_pixels():
    image = np.zeros((50, 100, 3), np.uint8)
    image[10:20, 30:60] = 255
    assert canvas_shape(True, (64, 32), 32) == (32, 64)
    chw, boxes, meta = prepare_image(image, [[30, 10, 60, 20]], (64, 32), flip=True)
    assert meta["resized_size"] == (32, 64) and chw.shape == (3, 32, 64)
    np.testing.assert_allclose(boxes, [[64 - 60 * 0.64, 10 * 0.64, 64 - 30 * 0.64, 20 * 0.64]], atol=1e-4)
    bright = np.argwhere(chw[0] > 1.0)
    assert abs(bright[:, 1].min() - boxes[0, 0]) <= 1.5 and abs(bright[:, 1].max() + 1 - boxes[0, 2]) <= 1.5


def test_batches_are_deterministic_grouped_by_orientation_and_sharded(tmp_path):
    sizes = [(i + 1, 40, 30) if i % 3 else (i + 1, 30, 40) for i in range(9)]
    ann, images = write_coco(tmp_path, sizes, [box(i + 1, i + 1, 3, 1, 1, 10, 10) for i in range(9)])
    dataset = CocoDetection(ann, images)
    kwargs = dict(max_gt=3, img_scale=(64, 32), seed=5, flip_prob=0.5)
    single = DetectionBatchSource(dataset, batch_size=4, **kwargs)
    ranks = [DetectionBatchSource(dataset, batch_size=2, rank=r, world_size=2, **kwargs) for r in range(2)]
    assert single.steps_per_epoch == ranks[0].steps_per_epoch == 1 + 2  # 3 portrait, 6 landscape images
    for epoch in range(2):
        for index in range(single.steps_per_epoch):
            images_, boxes, labels, mask, pad_sizes = single.batch(epoch, index)
            assert images_.shape[2:] in ((32, 64), (64, 32)) and mask.shape == (4, 3)
            again = DetectionBatchSource(dataset, batch_size=4, **kwargs).batch(epoch, index)
            np.testing.assert_array_equal(images_, again[0])  # a pure function of (seed, epoch, index)
            shards = [source.batch(epoch, index) for source in ranks]
            np.testing.assert_array_equal(np.concatenate([s[0] for s in shards]), images_)
            np.testing.assert_array_equal(np.concatenate([s[1] for s in shards]), boxes)
    assert not np.array_equal(single.batch(0, 0)[0], single.batch(1, 0)[0]) or single.epoch_plan(0) != \
        single.epoch_plan(1)


@pytest.mark.parametrize("grid, expected", [(32, (128, 192)), (128, (128, 224))])
def test_batches_pad_to_their_largest_image_rounded_to_the_grid(tmp_path, grid, expected):
    ann, images = write_coco(tmp_path, [(1, 90, 50), (2, 60, 40)],
                             [box(1, 1, 3, 1, 1, 10, 10), box(2, 2, 3, 5, 5, 20, 20)])
    source = DetectionBatchSource(CocoDetection(ann, images), batch_size=2, max_gt=2, img_scale=(200, 100),
                                  flip_prob=0.0, shuffle=False, pad_grid=grid)
    images_, boxes, labels, mask, pad_sizes = source.batch(0, 0)
    # mmcv.imrescale within (200, 100): 90x50 -> x2 -> 180x100, pad 192x128; 60x40 -> x2.5 -> 150x100, pad 160x128.
    # The batch takes the largest (192x128), rounded up to the grid but never beyond the 224x128 canvas.
    np.testing.assert_array_equal(pad_sizes, [[128, 192], [128, 160]])
    np.testing.assert_allclose(boxes[1, 0], [12.5, 12.5, 62.5, 62.5])
    assert images_.shape[2:] == expected and source.shapes == {images_.shape}
    assert images_[1, :, :100, :150].any() and not images_[1, :, 100:].any() and not images_[1, :, :, 150:].any()


@pytest.mark.bad_input("COCO dataset", "an image whose file is corrupt", "skipped and counted; the next image of "
                       "its orientation group takes its place in the batch")
def test_corrupt_image_is_skipped_and_counted(tmp_path):
    ann, images = write_coco(tmp_path, [(1, 40, 30), (2, 40, 30), (3, 40, 30)],
                             [box(1, 2, 3, 1, 1, 10, 10)])
    with open(os.path.join(images, "0001.png"), "wb") as handle:
        handle.write(b"\x89PNG\r\n\x1a\n not really")
    source = DetectionBatchSource(CocoDetection(ann, images), batch_size=3, img_scale=(64, 32), max_gt=2,
                                  shuffle=False, flip_prob=0.0)
    with pytest.warns(RuntimeWarning, match="0001.png"):
        images_, boxes, labels, mask, _ = source.batch(0, 0)
    assert source.skipped == 1
    assert mask.sum() == 2  # the corrupt image's slot now holds image 2 (one box), which also has its own slot


@pytest.mark.bad_input("COCO dataset", "an image with 120 boxes and max_gt 100", "the 100 largest boxes are kept, "
                       "with one warning naming the image")
def test_more_boxes_than_max_gt_are_capped_with_a_warning(tmp_path):
    annotations = [box(i + 1, 1, 3, (i % 12) * 8, (i // 12) * 8, 4 + i % 5, 4) for i in range(120)]
    ann, images = write_coco(tmp_path, [(1, 100, 100)], annotations)
    with pytest.warns(RuntimeWarning, match="max_gt=100"):
        dataset = CocoDetection(ann, images, max_gt=100)
    record = dataset.records[0]
    assert len(record.boxes) == 100
    areas = (record.boxes[:, 2] - record.boxes[:, 0]) * (record.boxes[:, 3] - record.boxes[:, 1])
    all_areas = sorted(a["bbox"][2] * a["bbox"][3] for a in annotations)
    assert sorted(areas) == all_areas[-100:]  # the 20 smallest boxes were dropped
    _, boxes, _, mask, _ = DetectionBatchSource(dataset, batch_size=1, max_gt=100, img_scale=(100, 100)).batch(0, 0)
    assert mask.sum() == 100


@pytest.mark.bad_input("COCO annotations", "an annotation file naming images that are not in the image folder",
                       "MissingImagesError listing the missing files")
def test_missing_images_are_a_clear_error(tmp_path):
    ann, images = write_coco(tmp_path, [(1, 40, 30), (2, 40, 30)], [])
    os.remove(os.path.join(images, "0002.png"))
    with pytest.raises(MissingImagesError, match="(?s)1 of 2 images.*0002.png"):
        CocoDetection(ann, images)


@pytest.mark.bad_input("COCO annotations", "a file that is not JSON, or records without ids, with unknown "
                       "categories or bad boxes", "CocoFormatError naming the record")
@pytest.mark.parametrize("content, message", [
    ("{not json", "not valid JSON"),
    ('{"images": [], "annotations": []}', "missing the 'categories'"),
    ('{"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}], "categories": [{"id": 1, "name": '
     '"a"}], "annotations": [{"image_id": 1, "category_id": 2, "bbox": [0, 0, 1, 1]}]}', "category_id 2"),
    ('{"images": [{"id": 1, "file_name": "a.png", "width": 4, "height": 4}], "categories": [{"id": 1, "name": '
     '"a"}], "annotations": [{"image_id": 1, "category_id": 1, "bbox": [0, 0, -1, 1]}]}', "negative box"),
    ('{"images": [{"file_name": "a.png"}], "categories": [{"id": 1, "name": "a"}], "annotations": []}',
     "images\\[0\\]"),
])
def test_malformed_annotation_files_are_named(tmp_path, content, message):
    path = tmp_path / "ann.json"
    path.write_text(content)
    with pytest.raises(CocoFormatError, match=message):
        read_annotation_file(path)


json_values = st.recursive(st.none() | st.booleans() | st.integers(-3, 3) | st.floats(allow_nan=True) |
                           st.text(max_size=4), lambda children: st.lists(children, max_size=4) |
                           st.dictionaries(st.sampled_from(["id", "image_id", "category_id", "bbox", "iscrowd",
                                                            "area", "file_name", "width", "height", "name"]),
                                           children, max_size=6), max_leaves=12)


@pytest.mark.bad_input("COCO annotations", "random JSON documents and records (fuzzed)",
                       "either a checked dataset or CocoFormatError, never another exception")
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(images=st.lists(json_values, max_size=3), annotations=st.lists(json_values, max_size=3),
       categories=st.lists(json_values, max_size=2))
def test_fuzzed_annotation_records_raise_only_coco_format_errors(tmp_path, images, annotations, categories):
    path = tmp_path / "fuzz.json"
    path.write_text(json.dumps({"images": images, "annotations": annotations, "categories": categories}))
    try:
        CocoDetection(path, tmp_path, check_files=False)
    except CocoFormatError:
        pass


def digits_coco(tmp_path):
    summary = make_digits_detection(tmp_path / "digits", train_images=2, val_images=6, canvas_size=64,
                                    digit_sizes=(16, 28), min_digits=1, max_digits=4, classes=3, seed=3)
    return CocoDetection(summary["val_ann"], summary["val_images"])


def test_evaluator_gives_ap_one_for_the_ground_truth_and_zero_for_shifted_boxes(tmp_path, capsys):
    dataset = digits_coco(tmp_path)
    results = []
    for record in dataset.records:
        results += detections_to_coco(record.image_id, record.boxes, np.ones(len(record.boxes)), record.labels,
                                      dataset.category_ids)
    perfect = coco_evaluate(dataset.coco, results)
    assert list(perfect) == list(METRIC_NAMES)
    assert perfect["AP"] == pytest.approx(1.0) and perfect["AP50"] == pytest.approx(1.0)
    assert "Average Precision" in capsys.readouterr().out  # pycocotools' summary is printed
    shifted = [dict(r, bbox=[r["bbox"][0] + 70, r["bbox"][1], r["bbox"][2], r["bbox"][3]]) for r in results]
    assert coco_evaluate(dataset.coco, shifted, verbose=False)["AP"] == pytest.approx(0.0)
    wrong_class = [dict(r, category_id=dataset.category_ids[(dataset.category_ids.index(r["category_id"]) + 1) % 3])
                   for r in results]
    assert coco_evaluate(dataset.coco, wrong_class, verbose=False)["AP50"] == pytest.approx(0.0)
    assert coco_evaluate(dataset.coco, [], verbose=False)["AP"] == 0.0


def test_digits_detection_set_is_deterministic_and_boxes_hold_the_ink(tmp_path):
    first = make_digits_detection(tmp_path / "a", train_images=3, val_images=1, canvas_size=64,
                                  digit_sizes=(16, 24), seed=9)
    second = make_digits_detection(tmp_path / "b", train_images=3, val_images=1, canvas_size=64,
                                   digit_sizes=(16, 24), seed=9)
    again = make_digits_detection(tmp_path / "a", train_images=3, val_images=1, canvas_size=64,
                                  digit_sizes=(16, 24), seed=9)
    assert first["written"] and not again["written"]
    with open(first["train_ann"]) as a, open(second["train_ann"]) as b:
        assert json.load(a) == json.load(b)
    dataset = CocoDetection(first["train_ann"], first["train_images"])
    for index in range(len(dataset)):
        image, record = dataset.read(index)
        ink = image[..., 0] > 32
        for x1, y1, x2, y2 in record.boxes.astype(int):
            assert ink[y1:y2, x1:x2].any() and ink[y1, x1:x2].any() and ink[y2 - 1, x1:x2].any()
    with pytest.raises(Exception, match="not empty"):
        (tmp_path / "c").mkdir()
        (tmp_path / "c" / "mine.txt").write_text("x")
        make_digits_detection(tmp_path / "c")


def test_recipe_batch_shapes_are_at_most_eleven_per_orientation():
    from pvt_dense.data.transforms import network_input_size
    from pvt_dense.detection.transforms import batch_shape, is_landscape
    rng = np.random.default_rng(0)
    shapes = {True: set(), False: set()}
    for _ in range(3000):
        sizes = [(int(h), int(w)) for h, w in rng.integers(50, 2000, (2, 2))]
        landscape = is_landscape(*sizes[0])
        sizes = [s for s in sizes if is_landscape(*s) == landscape]
        pads = [network_input_size(h, w, (1333, 800)) for h, w in sizes]
        shape = batch_shape(pads, 128, canvas_shape(landscape, (1333, 800), 32))
        assert all(shape[0] >= p[0] and shape[1] >= p[1] for p in pads)
        shapes[landscape].add(shape)
    assert 8 <= len(shapes[True]) <= 11 and 8 <= len(shapes[False]) <= 11, shapes
