"""Size buckets: one compiled graph serves every input whose valid region fits in it, with the results of each
region at its own size.

Why: MindSpore compiles one graph per input shape (~3-5 s each for RetinaNet-PVT-Tiny on 2 cores, ~0.4 GB each
while it lives), and a folder of photos has many sizes. Padding to a common size would change every output of a
plain PVT, whose attention is global. It does not here, because every layer that could see the padding is told
where it is, so the valid region of a bucket computes exactly what the region alone computes:
- Patch embeddings: PVT v1's have kernel = stride, so each token reads only its own patch; v2's overlapping ones
  (k 7 s 4, k 3 s 2, padding k // 2) read at most up to the valid edge when the region is a multiple of 32.
- Attention: keys come from kernel = stride spatial-reduction cells; a cell that is not wholly inside the region
  (exactly those the region's own floor division drops) gets a score bias of -1e30, so it weighs nothing.
- v1's position embedding is resized to the valid grid (as at the region's own size) and is zero beyond it.
- v2's MLP depth-wise conv, and every 3x3 conv of the necks and heads, reads zeros beyond the region, as the
  zero padding of the region's own run gives: the maps are multiplied by a 0/1 mask first.
- A 2x bilinear upsampling reads one row and column past the region's edge, where the region's own run clamps:
  the edge is replicated there first.
- Outputs are cropped to the region's own grid on the host.
PVT v2's linear ("-li") attention pools the whole grid, so it cannot be bucketed (`supports_buckets` is False):
those models keep one graph per size. Valid regions and buckets are multiples of 32 (the last stage's stride): the
detection and segmentation test protocols already make every input one (pad or resize to a multiple of 32).

Which buckets: `plan_buckets` groups the sizes announced for a run (read from the image headers before the first
forward) so that compilations plus the extra pixels computed in padding cost least, by a cost model in units of
one pixel's forward: a compilation costs as much as `compile_pixels` pixels.
"""
import numpy as np

# A padded key's score bias: exp(-1e30 - max) is exactly 0 in float32, and unlike -inf it never makes inf - inf.
MASKED = -1e30
ALIGN = 32


def check_bucket(valid_size, bucket_size, divisor=ALIGN):
    """Raise ValueError unless both sizes are positive multiples of `divisor` and the valid region fits."""
    (height, width), (bucket_h, bucket_w) = valid_size, bucket_size
    if min(height, width) < 1 or height % divisor or width % divisor or bucket_h % divisor or bucket_w % divisor:
        raise ValueError(f"a size bucket needs a valid region and a bucket of multiples of {divisor} pixels, got "
                         f"{height}x{width} in {bucket_h}x{bucket_w}")
    if height > bucket_h or width > bucket_w:
        raise ValueError(f"the valid region {height}x{width} does not fit in the bucket {bucket_h}x{bucket_w}")


def grid_mask(valid_grid, bucket_grid):
    """(bucket_h, bucket_w) float32: 1 on the top-left valid_h x valid_w cells, 0 elsewhere."""
    mask = np.zeros(bucket_grid, np.float32)
    mask[:valid_grid[0], :valid_grid[1]] = 1.0
    return mask


def key_bias(valid_grid, bucket_grid, sr_ratio):
    """(1, M) float32 score bias over the keys of a token grid reduced `sr_ratio` times (kernel = stride, floor
    division): 0 on the cells the valid grid's own reduction has, MASKED on the others."""
    ratio = max(int(sr_ratio), 1)
    valid = (valid_grid[0] // ratio, valid_grid[1] // ratio)
    bucket = (bucket_grid[0] // ratio, bucket_grid[1] // ratio)
    bias = np.where(grid_mask(valid, bucket) > 0, 0.0, MASKED).astype(np.float32)
    return bias.reshape(1, -1)


def token_mask(valid_grid, bucket_grid):
    """(1, N, 1) float32 0/1 mask over the tokens of the bucket grid."""
    return grid_mask(valid_grid, bucket_grid).reshape(1, -1, 1)


def pixel_mask(valid_grid, bucket_grid):
    """(1, 1, H, W) float32 0/1 mask of a feature map."""
    return grid_mask(valid_grid, bucket_grid)[None, None]


def edge_index(valid_length, bucket_length):
    """(bucket_length,) int32 positions clamped to the valid length: gathering with it replicates the edge."""
    return np.minimum(np.arange(bucket_length), valid_length - 1).astype(np.int32)


def pad_tokens(tokens, valid_grid, bucket_grid):
    """(1, h*w, C) tokens of the valid grid -> (1, H*W, C) tokens of the bucket grid, zero beyond the valid grid."""
    channels = tokens.shape[-1]
    out = np.zeros((1, bucket_grid[0], bucket_grid[1], channels), np.float32)
    out[0, :valid_grid[0], :valid_grid[1]] = tokens.reshape(valid_grid[0], valid_grid[1], channels)
    return out.reshape(1, -1, channels)


def conv_grid(length, stride):
    """Map length after a stride-`stride` 3x3 conv with padding 1 (RetinaNet's P6/P7): ceil(length / stride)."""
    return -(-length // stride)


def level_grids(size, strides):
    """(h, w) of each pyramid level of an input `size` (a multiple of 32): size // stride up to 32, then the
    stride-2 3x3 convs' ceil divisions beyond (P6 of an 800x1344 input is 13x21)."""
    grids = []
    for stride in strides:
        if stride <= ALIGN:
            grids.append((size[0] // stride, size[1] // stride))
        else:
            previous = grids[-1]
            grids.append((conv_grid(previous[0], 2), conv_grid(previous[1], 2)))
    return tuple(grids)


def level_masks(valid_size, bucket_size, strides):
    """One (1, 1, h, w) mask per pyramid level."""
    return tuple(pixel_mask(valid, bucket) for valid, bucket in
                 zip(level_grids(valid_size, strides), level_grids(bucket_size, strides)))


def level_edges(valid_size, bucket_size, strides):
    """One (rows, columns) pair of `edge_index` gather indices per pyramid level."""
    return tuple((edge_index(valid[0], bucket[0]), edge_index(valid[1], bucket[1])) for valid, bucket in
                 zip(level_grids(valid_size, strides), level_grids(bucket_size, strides)))


def plan_buckets(sizes, compile_pixels, max_buckets=4):
    """Group the valid sizes of a run (one (h, w) per image, repeats counted) into buckets.

    Each bucket is the element-wise maximum of its sizes; the cost of a plan is the pixels all images are computed
    at plus `compile_pixels` per bucket. Starting from one bucket per distinct size, the two buckets whose merge
    lowers the cost most are merged until no merge lowers it and there are at most `max_buckets`.
    Returns {size: bucket}."""
    counts = {}
    for size in sizes:
        counts[tuple(size)] = counts.get(tuple(size), 0) + 1
    groups = [([size], size, count) for size, count in sorted(counts.items())]

    def cost(bucket, count):
        return bucket[0] * bucket[1] * count + compile_pixels

    while len(groups) > 1:
        best = None
        for i in range(len(groups)):
            for j in range(i + 1, len(groups)):
                members_a, bucket_a, count_a = groups[i]
                members_b, bucket_b, count_b = groups[j]
                merged = (max(bucket_a[0], bucket_b[0]), max(bucket_a[1], bucket_b[1]))
                saving = cost(bucket_a, count_a) + cost(bucket_b, count_b) - cost(merged, count_a + count_b)
                if best is None or saving > best[0]:
                    best = (saving, i, j, merged)
        saving, i, j, merged = best
        if saving <= 0 and len(groups) <= max_buckets:
            break
        members = groups[i][0] + groups[j][0]
        count = groups[i][2] + groups[j][2]
        groups = [group for k, group in enumerate(groups) if k not in (i, j)] + [(members, merged, count)]
    return {size: bucket for members, bucket, _ in groups for size in members}
