"""mmdetection 3.3 / mmsegmentation 1.2 as references (tests, benchmark) on a CPU without mmcv's compiled operators.

mmcv-lite ships no compiled operators, and mmdet imports `mmcv.ops` at module level. `install_mmcv_ops_stand_in()`
registers, before mmdet is imported, a stand-in `mmcv.ops` package whose `nms` and `batched_nms` follow mmcv 2.1's
documented signatures and return values on top of torchvision's NMS; every other name is a placeholder that raises
when used. That stand-in is the only thing faked: models, pipelines, assigners, losses and decoding are mmdet's and
mmseg's own code. `import_mmdet()` / `import_mmseg()` install it and set up the registries; tests go through
tests/mmlab_reference.py, which skips where the frameworks are not installed. Nothing here imports torch or mmdet at
module level, so the rest of the suite and `import pvt_dense` run without them.
"""
import importlib.abc
import importlib.machinery
import sys
import types



def _placeholder(name):
    def refuse(*args, **kwargs):
        raise RuntimeError(f"mmcv.ops.{name} is a placeholder: mmcv-lite has no compiled operators")

    return type(name, (), {"__init__": refuse, "__call__": refuse})


def nms(boxes, scores, iou_threshold, offset=0, score_threshold=0, max_num=-1):
    """mmcv.ops.nms: (dets (K, 5) = boxes and scores, best first; kept indices)."""
    import torch
    import torchvision

    if offset != 0:
        raise NotImplementedError("the stand-in nms supports mmcv's default offset=0 only")
    is_numpy = not isinstance(boxes, torch.Tensor)
    boxes_t = torch.as_tensor(boxes, dtype=torch.float32)
    scores_t = torch.as_tensor(scores, dtype=torch.float32)
    index = torch.arange(boxes_t.shape[0])
    if score_threshold > 0:
        valid = scores_t > score_threshold
        boxes_t, scores_t, index = boxes_t[valid], scores_t[valid], index[valid]
    keep = torchvision.ops.nms(boxes_t, scores_t, float(iou_threshold))
    if max_num > 0:
        keep = keep[:max_num]
    dets = torch.cat([boxes_t[keep], scores_t[keep][:, None]], dim=1)
    inds = index[keep]
    if is_numpy:
        return dets.numpy(), inds.numpy()
    return dets.to(boxes.dtype), inds


def batched_nms(boxes, scores, idxs, nms_cfg, class_agnostic=False):
    """mmcv.ops.batched_nms: NMS per class by offsetting each class's boxes apart, as mmcv 2.1 does it."""
    import torch

    if nms_cfg is None:
        scores, inds = scores.sort(descending=True)
        boxes = boxes[inds]
        return torch.cat([boxes, scores[:, None]], -1), inds
    cfg = dict(nms_cfg)
    class_agnostic = cfg.pop("class_agnostic", class_agnostic)
    if class_agnostic:
        boxes_for_nms = boxes
    elif boxes.numel() == 0:
        boxes_for_nms = boxes
    else:
        max_coordinate = boxes.max()
        offsets = idxs.to(boxes) * (max_coordinate + torch.tensor(1).to(boxes))
        boxes_for_nms = boxes + offsets[:, None]
    nms_type = cfg.pop("type", "nms")
    if nms_type != "nms":
        raise NotImplementedError(f"the stand-in batched_nms supports type='nms' only, got {nms_type!r}")
    split_thr = cfg.pop("split_thr", 10000)
    max_num = cfg.pop("max_num", -1)
    if boxes_for_nms.shape[0] < split_thr:
        dets, keep = nms(boxes_for_nms, scores, **cfg)
        boxes = boxes[keep]
        scores = dets[:, -1]
    else:
        total_mask = scores.new_zeros(scores.size(), dtype=torch.bool)
        scores_after_nms = scores.new_zeros(scores.size())
        for class_id in torch.unique(idxs):
            mask = (idxs == class_id).nonzero(as_tuple=False).view(-1)
            dets, keep = nms(boxes_for_nms[mask], scores[mask], **cfg)
            total_mask[mask[keep]] = True
            scores_after_nms[mask[keep]] = dets[:, -1]
        keep = total_mask.nonzero(as_tuple=False).view(-1)
        scores, inds = scores_after_nms[keep].sort(descending=True)
        keep = keep[inds]
        boxes = boxes[keep]
    if max_num > 0:
        keep = keep[:max_num]
        boxes = boxes[:max_num]
        scores = scores[:max_num]
    return torch.cat([boxes, scores[:, None]], -1), keep


class _OpsModule(types.ModuleType):
    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        value = _placeholder(name)
        setattr(self, name, value)
        return value


class _OpsFinder(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Serves `mmcv.ops` and any `mmcv.ops.<sub>` as stand-in modules."""

    def find_spec(self, fullname, path=None, target=None):
        if fullname == "mmcv.ops" or fullname.startswith("mmcv.ops."):
            return importlib.machinery.ModuleSpec(fullname, self, is_package=True)
        return None

    def create_module(self, spec):
        module = _OpsModule(spec.name)
        module.__path__ = []
        module.nms = nms
        module.batched_nms = batched_nms
        return module

    def exec_module(self, module):
        pass


_installed = False


def install_mmcv_ops_stand_in():
    global _installed
    if _installed:
        return
    for name in [n for n in sys.modules if n == "mmcv.ops" or n.startswith("mmcv.ops.")]:
        del sys.modules[name]
    sys.meta_path.insert(0, _OpsFinder())
    import mmcv.cnn.bricks.transformer as transformer

    if not hasattr(transformer, "MultiScaleDeformableAttention"):
        transformer.MultiScaleDeformableAttention = _placeholder("MultiScaleDeformableAttention")
    _installed = True


def import_mmlab(package):
    """Import `package` (mmdet or mmseg) with the stand-in ops installed and its registries set up (it becomes the
    default registry scope)."""
    import importlib

    install_mmcv_ops_stand_in()
    module = importlib.import_module(package)
    importlib.import_module(f"{package}.utils").register_all_modules(init_default_scope=True)
    return module


def import_mmdet():
    return import_mmlab("mmdet")


def import_mmseg():
    return import_mmlab("mmseg")
