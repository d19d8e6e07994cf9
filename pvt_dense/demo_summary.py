"""`outputs/demo/summary.png`: one picture of a whole demo run, the file a person opens first.

Everything on it is read back from the run's own files under the demo's output folder, never from values held in
memory, so the picture shows what the run left on disk (and can be rebuilt from it alone):

* `pretrain/metrics.jsonl`: the pretraining curves (train loss, val top-1 per epoch);
* `detection/metrics.jsonl`, `segmentation/metrics.jsonl`: the last evaluation of each dense task (box AP/AP50,
  mIoU), recorded by the training loop;
* `detections/*`: a few drawn detections; `segmentation_overlays/{overlay,color}/*`: two segmentation overlays,
  each beside its colour mask;
* `features/*.npz`: the four stage maps of one photograph, each shown as its first three principal components
  (over the channels) mapped to red, green and blue.

A part the run did not do (`--tasks none`) is a panel that says so. The PNG is written atomically.
"""
import io
import json
import os

import numpy as np

from .atomic import write_atomic

SUMMARY_NAME = "summary.png"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp")


def read_metrics(path):
    """The records of a `metrics.jsonl` (one JSON object per line); [] when the file is missing."""
    if not os.path.isfile(path):
        return []
    records = []
    with open(path, encoding="utf-8") as handle:
        for line in handle:
            line = line.strip()
            if line:
                records.append(json.loads(line))
    return records


def last_value(records, key):
    """The value of `key` in the last record that has it, or None."""
    for record in reversed(records):
        if record.get(key) is not None:
            return float(record[key])
    return None


def list_images(folder, count):
    if not os.path.isdir(folder):
        return []
    names = sorted(name for name in os.listdir(folder) if name.lower().endswith(IMAGE_SUFFIXES))
    return [os.path.join(folder, name) for name in names[:count]]


def segmentation_panels(run_dir, count):
    """(path, title) of up to `count` panels: overlays, each followed by its colour mask when there is one. The
    demo's digits are drawn in every colour, so in an overlay alone the tint of the predicted class is hard to tell
    from the digit's own colour; the mask beside it shows the predicted shape plainly."""
    root = os.path.join(run_dir, "segmentation_overlays")
    panels = []
    for overlay in list_images(os.path.join(root, "overlay"), count):
        name = os.path.basename(overlay)
        color = os.path.join(root, "color", os.path.splitext(name)[0] + ".png")
        panels.append((overlay, f"overlay/{name}"))
        if os.path.isfile(color):
            panels.append((color, f"color/{os.path.basename(color)}"))
    return panels[:count]


def principal_components_rgb(feature_map):
    """(C, H, W) -> (H, W, 3) in [0, 1]: the first three principal components of the channels, each stretched to
    its 1st-99th percentile (fewer than three channels or components leave the rest black)."""
    channels, height, width = feature_map.shape
    pixels = feature_map.reshape(channels, -1).T.astype(np.float64)
    pixels -= pixels.mean(axis=0, keepdims=True)
    _, _, components = np.linalg.svd(pixels, full_matrices=False)
    projected = pixels @ components[:3].T
    rgb = np.zeros((pixels.shape[0], 3))
    for k in range(projected.shape[1]):
        low, high = np.percentile(projected[:, k], [1, 99])
        rgb[:, k] = np.clip((projected[:, k] - low) / max(high - low, 1e-12), 0, 1)
    return rgb.reshape(height, width, 3)


def read_stage_maps(npz_path):
    """[(name, (C, H, W) array)] of the stage maps in a feature-export .npz, in stage order."""
    with np.load(npz_path) as npz:
        names = sorted((key for key in npz.files if key.startswith("stage") and key[5:].isdigit()),
                       key=lambda key: int(key[5:]))
        return [(name, npz[name][0] if npz[name].ndim == 4 else npz[name]) for name in names]


def headline(run_dir):
    """{'top1', 'AP', 'AP50', 'mIoU'}: the numbers the run's metrics files end with (None where absent); top-1 in
    percent, the others fractions, as the training loops record them."""
    pretrain = read_metrics(os.path.join(run_dir, "pretrain", "metrics.jsonl"))
    detection = read_metrics(os.path.join(run_dir, "detection", "metrics.jsonl"))
    segmentation = read_metrics(os.path.join(run_dir, "segmentation", "metrics.jsonl"))
    return {"top1": last_value(pretrain, "val_top1"), "AP": last_value(detection, "val_AP"),
            "AP50": last_value(detection, "val_AP50"), "mIoU": last_value(segmentation, "val_mIoU")}


def _format(value, percent=False, fraction=False):
    """`percent`: a value already in percent (top-1); `fraction`: a fraction shown in percent (mIoU)."""
    if value is None:
        return "not run"
    if fraction:
        return f"{100 * value:.1f}%"
    return f"{value:.1f}%" if percent else f"{value:.3f}"


def _placeholder(ax, text):
    ax.text(0.5, 0.5, text, ha="center", va="center", fontsize=10, color="0.4", wrap=True)
    ax.set_axis_off()


def _show_image(ax, path, title):
    import cv2
    image = cv2.imread(path, cv2.IMREAD_COLOR)
    if image is None:
        _placeholder(ax, f"unreadable: {os.path.basename(path)}")
        return
    ax.imshow(image[:, :, ::-1], interpolation="nearest")
    ax.set_title(title, fontsize=9)
    ax.set_axis_off()


def build_summary(run_dir, path=None, examples=4):
    """Draw the summary of the demo run in `run_dir` into `path` (default `run_dir/summary.png`); returns the
    path and the headline numbers it shows."""
    import matplotlib
    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    run_dir = os.path.abspath(run_dir)
    path = path or os.path.join(run_dir, SUMMARY_NAME)
    numbers = headline(run_dir)
    columns = 4
    figure = plt.figure(figsize=(14, 14), dpi=80)
    grid = figure.add_gridspec(4, columns, hspace=0.3, wspace=0.15, left=0.06, right=0.97, top=0.93, bottom=0.03)
    figure.suptitle(f"pvt_dense demo: PVT-Tiny pretrained on digits (val top-1 {_format(numbers['top1'], True)}), "
                    f"RetinaNet box AP {_format(numbers['AP'])} / AP50 {_format(numbers['AP50'])}, "
                    f"Semantic FPN mIoU {_format(numbers['mIoU'], fraction=True)}", fontsize=12)

    # Row 1: the pretraining curves.
    records = [r for r in read_metrics(os.path.join(run_dir, "pretrain", "metrics.jsonl")) if "epoch" in r]
    loss_ax = figure.add_subplot(grid[0, 0:2])
    if records:
        epochs = [r["epoch"] for r in records]
        loss_ax.plot(epochs, [r.get("train_loss") for r in records], "o-", color="tab:blue", label="train loss")
        loss_ax.set_xlabel("epoch")
        loss_ax.set_xticks(epochs)
        loss_ax.set_ylabel("train loss", color="tab:blue")
        top1_ax = loss_ax.twinx()
        top1_ax.plot(epochs, [r.get("val_top1") for r in records], "s-", color="tab:red", label="val top-1")
        top1_ax.set_ylabel("val top-1 (%)", color="tab:red")
        top1_ax.set_ylim(0, 100)
        loss_ax.set_title("pretraining on digits (pretrain/metrics.jsonl)", fontsize=10)
    else:
        _placeholder(loss_ax, "no pretraining metrics")
    text_ax = figure.add_subplot(grid[0, 2:4])
    text_ax.set_axis_off()
    lines = [f"classification val top-1   {_format(numbers['top1'], True)}",
             f"detection box AP            {_format(numbers['AP'])}",
             f"detection box AP50          {_format(numbers['AP50'])}",
             f"segmentation mIoU           {_format(numbers['mIoU'], fraction=True)}",
             "", f"run folder: {run_dir}"]
    text_ax.text(0.15, 0.9, "\n".join(lines), va="top", family="monospace", fontsize=11)

    # Row 2: drawn detections; row 3: segmentation overlays, each beside its colour mask.
    detections = list_images(os.path.join(run_dir, "detections"), examples)
    rows = ((1, [(p, f"detections/{os.path.basename(p)}") for p in detections], "detections"),
            (2, segmentation_panels(run_dir, columns), "overlay"))
    for row, panels, label in rows:
        for column in range(columns):
            ax = figure.add_subplot(grid[row, column])
            if column < len(panels):
                _show_image(ax, *panels[column])
            elif column == 0:
                _placeholder(ax, f"no {label} images")
            else:
                ax.set_axis_off()

    # Row 4: the stage maps of one photograph.
    features = os.path.join(run_dir, "features")
    npz_paths = sorted(os.path.join(features, n) for n in os.listdir(features) if n.endswith(".npz")) \
        if os.path.isdir(features) else []
    maps = read_stage_maps(npz_paths[0]) if npz_paths else []
    for column in range(columns):
        ax = figure.add_subplot(grid[3, column])
        if column < len(maps):
            name, feature_map = maps[column]
            ax.imshow(principal_components_rgb(feature_map), interpolation="nearest")
            ax.set_title(f"{os.path.basename(npz_paths[0])} {name}: {feature_map.shape[0]} ch, "
                         f"{feature_map.shape[1]}x{feature_map.shape[2]}", fontsize=8)
            ax.set_axis_off()
        elif column == 0:
            _placeholder(ax, "no feature maps")
        else:
            ax.set_axis_off()

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    write_atomic(path, buffer.getvalue())
    return path, numbers
