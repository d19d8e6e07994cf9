"""Classification accuracy: top-1 / top-5 / loss of a network over a loader (`evaluate`, used while training) and of
a checkpoint (any supported format) on an ImageNet-layout val split (`validate_classifier`)."""
import numpy as np

from ..errors import PVTDenseError


def top_k_accuracy(logits, labels, ks=(1, 5)):
    order = np.argsort(-logits, axis=1)
    return {k: float(np.mean([label in row[:k] for row, label in zip(order, labels)])) for k in ks}


def evaluate(net, loader):
    """top-1, top-5 and mean cross-entropy of `net` over a batched (image, label) loader."""
    import mindspore as ms
    net.set_train(False)
    correct1 = correct5 = total = 0
    loss_sum = 0.0
    for images, labels in loader.create_tuple_iterator(num_epochs=1, output_numpy=True):
        logits = net(ms.Tensor(images)).asnumpy().astype(np.float64)
        labels = labels.astype(np.int64).reshape(-1)
        shifted = logits - logits.max(axis=1, keepdims=True)
        log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
        loss_sum += float(-log_probs[np.arange(len(labels)), labels].sum())
        accuracy = top_k_accuracy(logits, labels, ks=(1, min(5, logits.shape[1])))
        correct1 += accuracy[1] * len(labels)
        correct5 += accuracy[min(5, logits.shape[1])] * len(labels)
        total += len(labels)
    if total == 0:
        raise PVTDenseError("the validation set produced no batches")
    return {"top1": 100.0 * correct1 / total, "top5": 100.0 * correct5 / total, "loss": loss_sum / total,
            "samples": total}


def validate_classifier(cfg):
    """top-1 / top-5 / loss of cfg.ckpt_path on data_dir/val_split; returns the result dict."""
    from ..engine.run_setup import set_device_and_mode
    from .build import load_classifier
    from .data import ImageFolderSource, build_eval_loader, scan_image_folder

    if not cfg.ckpt_path:
        raise PVTDenseError("validation needs --ckpt_path (a checkpoint to validate)")
    set_device_and_mode(cfg)
    paths, labels, classes = scan_image_folder(cfg.data_dir, cfg.val_split)
    net = load_classifier(cfg, cfg.ckpt_path)
    if len(classes) != cfg.num_classes:
        raise PVTDenseError(f"{cfg.ckpt_path} has {cfg.num_classes} classes but {cfg.data_dir}/{cfg.val_split} has "
                            f"{len(classes)} class folders; pass --num_classes {len(classes)} if the head matches")
    source = ImageFolderSource(paths, labels, shuffle=False, batch_size=cfg.batch_size)
    result = evaluate(net, build_eval_loader(source, cfg, cfg.num_classes))
    result["skipped_images"] = len(source.bad_files)
    return result
