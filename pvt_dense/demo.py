"""The end-to-end demo behind `make demo`, on sample photographs that ship with scikit-image.

For now it covers the backbone: build a PVT-Tiny classifier, save it as a checkpoint, load that checkpoint into a
dense backbone (the path an ImageNet-pretrained model takes into detection), export the four stage maps of the
sample images, and print what came out. Pretraining, detection and segmentation join here as they land.
"""
import os
import time

import numpy as np


def run_demo(output_dir="outputs/demo", model_name="pvt_tiny", short_side=320, max_long_side=512):
    import mindspore as ms

    from .checkpoint import save_native
    from .data.samples import sample_images
    from .features import export_features
    from .models import create_backbone, create_model
    from .models.pvt import parameter_count

    ms.set_device("CPU")
    ms.set_context(mode=ms.GRAPH_MODE)
    os.makedirs(output_dir, exist_ok=True)
    images = sample_images(os.path.join(output_dir, "samples"))
    print(f"[1/3] {len(images)} sample photographs in {os.path.join(output_dir, 'samples')}")

    ckpt = os.path.join(output_dir, f"{model_name}_random_classifier.ckpt")
    if not os.path.exists(ckpt):
        classifier = create_model(model_name)
        save_native(classifier, ckpt)
    backbone = create_backbone(model_name, pretrained=ckpt)
    print(f"[2/3] {model_name} backbone from {ckpt}: {parameter_count(backbone):,} parameters, "
          f"channels {backbone.out_channels}, strides {backbone.strides}")

    start = time.perf_counter()
    summary = export_features(backbone, os.path.join(output_dir, "samples"), os.path.join(output_dir, "features"),
                              short_side=short_side, max_long_side=max_long_side)
    elapsed = time.perf_counter() - start
    print(f"[3/3] feature export ({elapsed:.1f} s, graph mode):")
    print("\n".join("  " + line for line in summary.lines()))
    for path in sorted(summary.exported + summary.skipped_existing):
        with np.load(path) as npz:
            shapes = " ".join("x".join(map(str, npz[f"stage{i + 1}"].shape)) for i in npz["out_indices"])
            print(f"  {os.path.basename(path)}: {tuple(npz['original_size'])} -> padded "
                  f"{tuple(npz['padded_size'])}; maps {shapes}")
    return summary
