"""What segmentation hands the generic whole-model loader (`pvt_dense.checkpoint.whole_model`): how mmsegmentation's
Semantic FPN head keys map onto our head's, which tensors classify (re-initialised when fine-tuning on another
class count) and the class names a file without names gets when it has ADE20K's 150."""
import re

from ..checkpoint.whole_model import SEGMENTOR, HeadLayout
from .ade20k import ADE20K_CLASSES

_SCALE_HEAD = re.compile(r"^decode_head\.scale_heads\.(\d+)\.(\d+)\.(conv\.weight|bn\.\w+)$")
_CONV_SEG = re.compile(r"^decode_head\.conv_seg\.(weight|bias)$")
_BN_LEAVES = {"bn.weight": "bn.gamma", "bn.bias": "bn.beta", "bn.running_mean": "bn.moving_mean",
              "bn.running_var": "bn.moving_variance"}


def semantic_fpn_head_name(key):
    """Our head's name for an mmsegmentation Semantic FPN head key; '' to drop it knowingly (BatchNorm counters);
    None if it has no place."""
    match = _SCALE_HEAD.match(key)
    if match:
        level, index, leaf = match.groups()
        if leaf == "bn.num_batches_tracked":
            return ""
        if leaf == "conv.weight":
            return f"head.scale_heads.{level}.{index}.conv.weight"
        return f"head.scale_heads.{level}.{index}.{_BN_LEAVES[leaf]}" if leaf in _BN_LEAVES else None
    match = _CONV_SEG.match(key)
    return f"head.classifier.{match.group(1)}" if match else None


SEGMENTATION_LAYOUT = HeadLayout(task=SEGMENTOR, head_name=semantic_fpn_head_name,
                                 classifier_params=("head.classifier.weight", "head.classifier.bias"),
                                 default_class_names=tuple(ADE20K_CLASSES), default_names_label="ADE20K")
