"""The sampler the three tasks share: classification, detection and segmentation deal the same global batches from
the same seed, whether one process takes 16 images per step or two processes take 8 each, and they replace an
unreadable image by the same one."""
import json
import os
import warnings

import cv2
import numpy as np
import pytest

from pvt_dense.classification.data import ImageFolderSource
from pvt_dense.data.sampler import EpochSampler
from pvt_dense.detection.coco import CocoDetection
from pvt_dense.detection.data import DetectionBatchSource
from pvt_dense.segmentation.ade20k import Sample
from pvt_dense.segmentation.data import SegmentationBatchSource

NUM_IMAGES, GLOBAL_BATCH, SEED = 32, 16, 5
WIDTH, HEIGHT = 64, 48  # landscape: detection puts them all in one orientation group


def write_sets(root, corrupt=None):
    """The same 32 images as the three tasks read them; each source's output names the image it read: the
    classification label, the x of the detection box, the segmentation label value."""
    paths, samples, coco_images, annotations = [], [], [], []
    for split in ("cls", "det", "seg_images", "seg_labels"):
        os.makedirs(os.path.join(root, split))
    for index in range(NUM_IMAGES):
        image = np.full((HEIGHT, WIDTH, 3), 40 + index, np.uint8)
        for folder in ("cls", "det", "seg_images"):
            path = os.path.join(root, folder, f"{index:02d}.png")
            if index == corrupt:
                with open(path, "wb") as handle:
                    handle.write(b"\x89PNG\r\n\x1a\n not really")
            else:
                cv2.imwrite(path, image)
        label_path = os.path.join(root, "seg_labels", f"{index:02d}.png")
        cv2.imwrite(label_path, np.full((HEIGHT, WIDTH), index + 1, np.uint8))  # index after the zero-label shift
        paths.append(os.path.join(root, "cls", f"{index:02d}.png"))
        samples.append(Sample(os.path.join(root, "seg_images", f"{index:02d}.png"), label_path, f"{index:02d}"))
        coco_images.append({"id": index + 1, "file_name": f"{index:02d}.png", "width": WIDTH, "height": HEIGHT})
        annotations.append({"id": index + 1, "image_id": index + 1, "category_id": 1, "bbox": [index, 2, 20, 20],
                            "iscrowd": 0, "area": 400})
    ann_file = os.path.join(root, "ann.json")
    with open(ann_file, "w") as handle:
        json.dump({"images": coco_images, "annotations": annotations,
                   "categories": [{"id": 1, "name": "thing"}]}, handle)
    return paths, CocoDetection(ann_file, os.path.join(root, "det")), samples


def classification_batches(paths, epoch, world_size):
    per_rank = GLOBAL_BATCH // world_size
    ranks = []
    for rank in range(world_size):
        source = ImageFolderSource(paths, np.arange(NUM_IMAGES), seed=SEED, rank=rank, world_size=world_size,
                                   batch_size=per_rank)
        source.set_epoch(epoch)
        read = [int(source[position][1]) for position in range(len(source))]
        ranks.append([read[k * per_rank:(k + 1) * per_rank] for k in range(len(read) // per_rank)])
    return [sum((ranks[rank][k] for rank in range(world_size)), []) for k in range(len(ranks[0]))]


def detection_batches(dataset, epoch, world_size):
    per_rank = GLOBAL_BATCH // world_size
    sources = [DetectionBatchSource(dataset, per_rank, max_gt=1, img_scale=(WIDTH, HEIGHT), flip_prob=0.0,
                                    seed=SEED, rank=rank, world_size=world_size, pad_grid=32)
               for rank in range(world_size)]
    return [sum((np.rint(source.batch(epoch, k)[1][:, 0, 0]).astype(int).tolist() for source in sources), [])
            for k in range(sources[0].steps_per_epoch)]


def identity_transform(image, label, rng):
    return image.transpose(2, 0, 1)[:, :2, :2].astype(np.float32), label[:2, :2].astype(np.int32)


def segmentation_batches(samples, epoch, world_size):
    per_rank = GLOBAL_BATCH // world_size
    sources = [SegmentationBatchSource(samples, identity_transform, NUM_IMAGES, True, per_rank, seed=SEED, rank=rank,
                                       world_size=world_size) for rank in range(world_size)]
    return [sum((source.batch(epoch, k)[1][:, 0, 0].tolist() for source in sources), [])
            for k in range(sources[0].steps_per_epoch)]


@pytest.fixture(scope="module")
def sets(tmp_path_factory):
    return write_sets(str(tmp_path_factory.mktemp("sampler")))


@pytest.mark.parametrize("epoch", [0, 1])
def test_three_tasks_deal_the_same_global_batches_for_1x16_and_2x8(sets, epoch):
    paths, dataset, samples = sets
    expected = EpochSampler(NUM_IMAGES, GLOBAL_BATCH, seed=SEED).epoch_plan(epoch)[0]
    expected = [batch.tolist() for batch in expected]
    assert sorted(sum(expected, [])) == list(range(NUM_IMAGES)) and len(expected) == 2
    assert expected != [list(range(16)), list(range(16, 32))]  # shuffled
    for world_size in (1, 2):
        assert classification_batches(paths, epoch, world_size) == expected, world_size
        assert detection_batches(dataset, epoch, world_size) == expected, world_size
        assert segmentation_batches(samples, epoch, world_size) == expected, world_size


def test_epochs_are_different_permutations(sets):
    plans = [EpochSampler(NUM_IMAGES, GLOBAL_BATCH, seed=SEED).epoch_plan(epoch)[0] for epoch in (0, 1)]
    assert not all(np.array_equal(a, b) for a, b in zip(*plans, strict=True))


def test_three_tasks_replace_an_unreadable_image_by_the_same_next_one(tmp_path):
    corrupt = 7
    paths, dataset, samples = write_sets(str(tmp_path), corrupt=corrupt)
    order = np.concatenate(EpochSampler(NUM_IMAGES, GLOBAL_BATCH, seed=SEED).epoch_plan(0)[0])
    position = int(np.flatnonzero(order == corrupt)[0])
    expected = [int(i) for i in order]
    expected[position] = int(order[(position + 1) % NUM_IMAGES])
    expected = [expected[:16], expected[16:]]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", RuntimeWarning)
        assert classification_batches(paths, 0, 1) == expected
        assert detection_batches(dataset, 0, 1) == expected
        assert segmentation_batches(samples, 0, 1) == expected


@pytest.mark.parametrize("tail, steps", [("drop", 2), ("keep", 3), ("fill", 3)])
def test_tail_rules(tail, steps):
    sampler = EpochSampler(40, 16, seed=1, tail=tail)
    batches, _ = sampler.epoch_plan(0)
    assert sampler.steps_per_epoch == len(batches) == steps
    order, _ = sampler.epoch_order(0)
    assert np.array_equal(np.concatenate(batches[:2]), order[:32])
    if tail == "keep":
        assert np.array_equal(batches[2], order[32:])
    if tail == "fill":
        assert np.array_equal(batches[2], np.concatenate([order[32:], order[:8]]))
