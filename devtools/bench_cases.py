"""The benchmark's cases: the measured workloads (`BenchCase`, `CASES`), the two frameworks compared, and the
FLOP count of a case from the model spec (`forward_flops`, `case_flops`)."""
from dataclasses import dataclass

from pvt_dense.errors import PVTDenseError
from pvt_dense.models.layers_v2 import LINEAR_POOL_SIZE
from pvt_dense.models.pvt_v2 import PVTv2Spec

from .hf_reference import NUM_CLASSES

OURS, THEIRS = "mindspore", "torch_hf"
FRAMEWORK_LABELS = {OURS: "pvt_dense (MindSpore)",
                    THEIRS: "torch (HF transformers; mmdet / mmseg in the pipeline cases)"}


class BenchmarkError(PVTDenseError):
    """A benchmark argument is invalid or a benchmark worker failed."""


@dataclass(frozen=True)
class BenchCase:
    """One measured workload at a fixed size.

    kind: "forward" (dense backbone, eval), "train" (classifier, forward + backward + AdamW), or one of the whole
    pipelines of `devtools.pipeline_bench`: "det_train" (RetinaNet training step on a synthetic batch padded to
    height x width), "det_folder" / "seg_folder" / "export_folder" (a folder of `images` photos, each resized with
    height x width as (short side, long side limit), from model loading to the last result).
    run (folder cases): 1, the first run, with empty caches (pvt_dense's kernel library built in the run); 2, a
    second run with the caches the first one left.
    """

    name: str
    kind: str
    batch: int
    height: int
    width: int
    images: int = 0  # folder cases: photos in the folder
    run: int = 1

    @property
    def is_pipeline(self):
        return self.kind in PIPELINE_KINDS

    @property
    def is_folder(self):
        return self.kind in FOLDER_KINDS

    @property
    def label(self):
        if self.kind == "train":
            return f"train step {self.height}x{self.width} b{self.batch}"
        if self.kind == "det_train":
            return f"RetinaNet train step {self.height}x{self.width} b{self.batch}"
        if self.is_folder:
            what = FOLDER_KINDS[self.kind]
            when = "empty caches" if self.run == 1 else "second run"
            return f"{what}, {self.images} photos at {self.height}/{self.width} (whole process, {when})"
        return f"forward {self.height}x{self.width} b{self.batch}"


FOLDER_KINDS = {"det_folder": "RetinaNet folder inference", "seg_folder": "Semantic FPN folder inference",
                "export_folder": "feature export of a folder"}
PIPELINE_KINDS = ("det_train",) + tuple(FOLDER_KINDS)

CASES = {case.name: case for case in (
    BenchCase("fwd224_b1", "forward", 1, 224, 224),
    BenchCase("fwd224_b8", "forward", 8, 224, 224),
    BenchCase("fwd512_b1", "forward", 1, 512, 512),
    BenchCase("fwd800x1344_b1", "forward", 1, 800, 1344),
    BenchCase("train224_b8", "train", 8, 224, 224),
    # The 1x recipe's training batch: 2 images padded to 800 x 1216 (the second one narrower inside it).
    BenchCase("det_train", "det_train", 2, 800, 1216),
    # The same batch at half the side: what fits our im2col head's memory on a 24 GB machine (see docs/speed.md).
    BenchCase("det_train_half", "det_train", 2, 400, 608),
    # The test scales of the recipes: RetinaNet (1333, 800), Semantic FPN (2048, 512), feature export 800 / 1333.
    BenchCase("det_folder", "det_folder", 1, 800, 1333, images=32),
    BenchCase("seg_folder", "seg_folder", 1, 512, 2048, images=32),
    BenchCase("export_folder", "export_folder", 1, 800, 1333, images=30),
    BenchCase("det_folder_again", "det_folder", 1, 800, 1333, images=32, run=2),
    BenchCase("seg_folder_again", "seg_folder", 1, 512, 2048, images=32, run=2),
    BenchCase("export_folder_again", "export_folder", 1, 800, 1333, images=30, run=2),
)}
DEFAULT_MODELS = ("pvt_tiny", "pvt_small")


# ---------------------------------------------------------------------------------------------------------------
# FLOP count from the model spec

def forward_flops(spec, batch, height, width, classifier=False, num_classes=NUM_CLASSES):
    """Floating-point operations (2 per multiply-add) of one forward pass of PVT (v1) or PVT v2.

    Counts the patch-embedding and spatial-reduction convolutions, the q/kv/proj/fc1/fc2 linear layers, the two
    attention products (q k^T and attn v) and, for the classifier, the head; for v2 also the MLP's depth-wise 3x3
    conv and, for the linear "-li" sizes, the 1x1 reduction conv on the 7x7 pooled grid (keys and values then come
    from 49 tokens at any input size). Biases, norms, pooling, softmax, GELU and additions are not counted (the
    convention of `torch.utils.flop_counter` and of published FLOP figures). `classifier=True` counts v1's extra
    cls token in the last stage (v2 has none; it mean-pools).
    """
    if isinstance(spec, PVTv2Spec):
        return _v2_forward_flops(spec, batch, height, width, classifier, num_classes)
    macs = 0
    grid_h, grid_w, in_channels = height, width, 3
    last = len(spec.depths) - 1
    for stage, depth in enumerate(spec.depths):
        patch, dim = spec.patch_sizes[stage], spec.embed_dims[stage]
        grid_h, grid_w = grid_h // patch, grid_w // patch
        macs += grid_h * grid_w * dim * in_channels * patch * patch
        tokens = grid_h * grid_w + (1 if classifier and stage == last else 0)
        ratio = spec.sr_ratios[stage]
        kv_tokens = (grid_h // ratio) * (grid_w // ratio) if ratio > 1 else tokens
        hidden = int(dim * spec.mlp_ratios[stage])
        per_block = ((kv_tokens * dim * dim * ratio * ratio if ratio > 1 else 0)  # spatial-reduction conv
                     + tokens * dim * dim         # q
                     + kv_tokens * dim * 2 * dim  # kv
                     + 2 * tokens * kv_tokens * dim  # q k^T and attn v over all heads
                     + tokens * dim * dim         # proj
                     + 2 * tokens * dim * hidden)  # fc1, fc2
        macs += depth * per_block
        in_channels = dim
    if classifier:
        macs += spec.embed_dims[-1] * num_classes
    return 2 * macs * batch


def _v2_forward_flops(spec, batch, height, width, classifier, num_classes):
    macs, in_channels = 0, 3
    for stage, ((grid_h, grid_w), depth) in enumerate(zip(spec.stage_grids(height, width), spec.depths)):
        kernel, dim = spec.patch_sizes[stage], spec.embed_dims[stage]
        tokens = grid_h * grid_w
        macs += tokens * dim * in_channels * kernel * kernel  # overlapping patch embedding
        ratio = spec.sr_ratios[stage]
        if spec.linear:
            kv_tokens = LINEAR_POOL_SIZE * LINEAR_POOL_SIZE
            reduction = kv_tokens * dim * dim  # 1x1 conv on the pooled grid
        elif ratio > 1:
            kv_tokens = (grid_h // ratio) * (grid_w // ratio)
            reduction = kv_tokens * dim * dim * ratio * ratio
        else:
            kv_tokens, reduction = tokens, 0
        hidden = int(dim * spec.mlp_ratios[stage])
        per_block = (reduction
                     + tokens * dim * dim  # q
                     + kv_tokens * dim * 2 * dim  # kv
                     + 2 * tokens * kv_tokens * dim  # q k^T and attn v
                     + tokens * dim * dim  # proj
                     + 2 * tokens * dim * hidden  # fc1, fc2
                     + tokens * hidden * 9)  # depth-wise 3x3 conv
        macs += depth * per_block
        in_channels = dim
    if classifier:
        macs += spec.embed_dims[-1] * num_classes
    return 2 * macs * batch


def case_flops(spec, case):
    """FLOPs of one call of `case`; a training step counts as 3 forwards (backward = input and weight gradients)."""
    if case.kind == "train":
        return 3 * forward_flops(spec, case.batch, case.height, case.width, classifier=True)
    return forward_flops(spec, case.batch, case.height, case.width)



def resolve_cases(cases):
    """BenchCase objects for case names (or cases given whole, as tests do at tiny sizes)."""
    resolved, bad = [], []
    for case in cases:
        if isinstance(case, BenchCase):
            resolved.append(case)
        elif case in CASES:
            resolved.append(CASES[case])
        else:
            bad.append(case)
    if bad:
        raise BenchmarkError(f"unknown case(s) {bad}; valid: {', '.join(CASES)}")
    return resolved
