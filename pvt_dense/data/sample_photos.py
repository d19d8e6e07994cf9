"""Real photographs for demos and tests, taken from the ones bundled inside scikit-image (no download needed)."""
import os

import cv2

from ..atomic import write_atomic

# (file name, skimage.data loader). Only images whose files ship inside the scikit-image wheel: the others are
# fetched with pooch on first use, which needs network access. Both encoders are represented on purpose.
SAMPLES = (
    ("astronaut.png", "astronaut"),
    ("coffee.jpg", "coffee"),
    ("chelsea.png", "chelsea"),
    ("rocket.jpg", "rocket"),
)


def sample_images(dest_dir):
    """Write the sample photographs into `dest_dir` (files already there are kept) and return their paths."""
    import skimage.data

    os.makedirs(dest_dir, exist_ok=True)
    paths = []
    for filename, loader in SAMPLES:
        path = os.path.join(os.fspath(dest_dir), filename)
        if not os.path.exists(path):
            rgb = getattr(skimage.data, loader)()
            ok, encoded = cv2.imencode(os.path.splitext(filename)[1], cv2.cvtColor(rgb, cv2.COLOR_RGB2BGR),
                                       [cv2.IMWRITE_JPEG_QUALITY, 95])
            if not ok:
                raise RuntimeError(f"OpenCV failed to encode the sample {filename}")
            # Atomic, so an interrupted call never leaves a half file that the next call would keep.
            write_atomic(path, encoded.tobytes())
        paths.append(path)
    return paths
