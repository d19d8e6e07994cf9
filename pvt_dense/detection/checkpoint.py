"""What detection hands the generic whole-model loader (`pvt_dense.checkpoint.whole_model`): how mmdetection's RetinaNet
head keys map onto our head's, which tensors classify (re-initialised when fine-tuning on another class count) and
the class names a file without names gets when it has COCO's 80."""
import re

from ..checkpoint.whole_model import DETECTOR, HeadLayout
from .coco import COCO_CLASSES

_RETINA_CONVS = re.compile(r"^bbox_head\.(cls_convs|reg_convs)\.(\d+)\.conv\.(weight|bias)$")
_RETINA_OUT = re.compile(r"^bbox_head\.(retina_cls|retina_reg)\.(weight|bias)$")


def retinanet_head_name(key):
    """Our head's name for an mmdetection RetinaNet head key; None if it has no place."""
    match = _RETINA_CONVS.match(key)
    if match:
        # Our branches interleave ReLUs in one SequentialCell: conv k sits at index 2k.
        return f"head.{match.group(1)}.{2 * int(match.group(2))}.{match.group(3)}"
    match = _RETINA_OUT.match(key)
    return f"head.{match.group(1)}.{match.group(2)}" if match else None


DETECTION_LAYOUT = HeadLayout(task=DETECTOR, head_name=retinanet_head_name,
                              classifier_params=("head.retina_cls.weight", "head.retina_cls.bias"),
                              default_class_names=tuple(COCO_CLASSES), default_names_label="COCO")
