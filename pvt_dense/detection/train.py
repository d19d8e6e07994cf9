"""Train RetinaNet on a COCO-layout dataset with the shared iteration loop; evaluate a checkpoint.

Epochs become iterations once the training set is read: `epochs * steps_per_epoch` iterations, lr steps at
`lr_steps` epochs, evaluation every `eval_interval` epochs. One process or data parallel under msrun/mpirun
(`init_run` joins the process group; TrainStep averages the gradients), with atomic checkpoints and exact resume.
"""
import os

from ..config import dump_config
from ..checkpoint.dense import load_dense_checkpoint, print_report
from ..engine.loop import IterationLoop
from ..engine.recipe import build_adamw, init_run, warmup_step_schedule
from ..engine.train_step import TrainStep, training_state_parameters
from ..errors import ConfigError, PVTDenseError
from .coco import CocoDetection
from .data import DetectionBatchSource
from .evaluation import evaluate_detector
from .recipe import build_retinanet, resolve, inference_settings


def open_dataset(cfg, split, check_files=True):
    ann, images = resolve(cfg, f"{split}_ann"), resolve(cfg, f"{split}_images")
    dataset = CocoDetection(ann, images, max_gt=cfg.max_gt, check_files=check_files)
    if dataset.num_classes != cfg.num_classes:
        raise ConfigError(f"num_classes is {cfg.num_classes} but {ann} has {dataset.num_classes} categories; set "
                          f"num_classes: {dataset.num_classes}")
    return dataset


def evaluate_on(detector, dataset, cfg, results_json=None, verbose=True):
    return evaluate_detector(detector, dataset, inference_settings(cfg), tuple(cfg.img_scale), cfg.pad_divisor,
                             tuple(cfg.mean), tuple(cfg.std), cfg.max_eval_images, results_json=results_json,
                             verbose=verbose, progress=cfg.progress_bar)


def starting_weights(cfg):
    """(cfg with its backbone eps style resolved, the `load_from` checkpoint or ''): fine-tuning starts from a
    whole-model checkpoint's weights only; a resumable run in ckpt_save_dir still takes precedence (`resume`)."""
    from ..checkpoint.dense import config_for_checkpoint
    from ..engine.recipe import resolve_backbone_norm_eps
    if cfg.load_from:
        return config_for_checkpoint(cfg, cfg.load_from)[0], cfg.load_from
    return type(cfg)(cfg, backbone_norm_eps=resolve_backbone_norm_eps(cfg)), ""


def train_detector(cfg):
    """Train as the config says; returns the loop's final state plus the last evaluation (`metrics`)."""
    rank, world_size = init_run(cfg)
    train_set = open_dataset(cfg, "train")
    val_set = open_dataset(cfg, "val") if cfg.val_ann and rank == 0 else None
    source = DetectionBatchSource(train_set, cfg.batch_size, cfg.max_gt, tuple(cfg.img_scale), cfg.pad_divisor,
                                  cfg.flip_ratio, tuple(cfg.mean), tuple(cfg.std), cfg.seed, rank, world_size,
                                  pad_grid=cfg.pad_grid)
    steps = source.steps_per_epoch
    total_iters = cfg.max_iters or cfg.epochs * steps
    schedule = warmup_step_schedule(cfg.lr, total_iters, [epoch * steps for epoch in cfg.lr_steps], cfg.lr_gamma,
                                    cfg.warmup_iters, cfg.warmup_ratio)
    cfg, start = starting_weights(cfg)
    detector, train_net = build_retinanet(cfg, train_set.num_classes, load_pretrained=not start)
    if start:
        print_report(load_dense_checkpoint(detector, start, skip_mismatched_classifier=True))
    optimizer = build_adamw(train_net, cfg, schedule)
    train_step = TrainStep(train_net, optimizer, loss_scale=cfg.loss_scale,
                           dynamic_loss_scale=cfg.dynamic_loss_scale, clip_grad_norm=cfg.clip_grad_norm)
    train_step.set_train(True)
    last = {}

    def evaluate(iteration):
        metrics = evaluate_on(detector, val_set, cfg)
        detector.set_train(True)
        last.clear()
        last.update(metrics)
        return {key: float(value) for key, value in metrics.items()}

    if rank == 0:
        os.makedirs(cfg.ckpt_save_dir, exist_ok=True)
        dump_config(cfg, os.path.join(cfg.ckpt_save_dir, "config.yaml"))
        print(f"RetinaNet on {cfg.backbone}: {len(train_set)} training images ({train_set.num_classes} classes), "
              f"{steps} iterations per epoch x {world_size} process(es), {total_iters} iterations")
    loop = IterationLoop(train_step, source, schedule, total_iters, cfg.ckpt_save_dir,
                         training_state_parameters(train_net, optimizer, train_step),
                         meta={"config": dict(cfg), "class_names": train_set.class_names,
                               "category_ids": train_set.category_ids},
                         evaluate=evaluate if val_set is not None else None,
                         eval_interval=cfg.eval_interval * steps, save_interval=cfg.save_interval,
                         metric_name="AP", keep_last=cfg.keep_checkpoint_max, resume=cfg.resume, rank=rank,
                         world_size=world_size, progress_bar=cfg.progress_bar, log_interval=cfg.log_interval,
                         prefix=f"retinanet_{cfg.backbone}", num_workers=cfg.num_workers)
    state = loop.run()
    if rank == 0:
        print(f"training batches came in {len(source.shapes)} distinct shapes (one graph compilation each): "
              f"{sorted(source.shapes)}")
    return dict(state, metrics=dict(last), detector=detector, run_dir=cfg.ckpt_save_dir)


def load_detector(cfg, ckpt_path, num_classes=None):
    """A RetinaNet built from the config with the weights of a whole-detector checkpoint: a training checkpoint
    of ours, an official PVT RetinaNet release or an mmdetection 3.x file (strict: every detector weight must be
    in the file with its shape). See `load_detector_with_report`."""
    return load_detector_with_report(cfg, ckpt_path, num_classes)[0]


def load_detector_with_report(cfg, ckpt_path, num_classes=None):
    """(detector, `DenseLoadReport`); the backbone's LayerNorm eps follows the checkpoint (config 'auto')."""
    import mindspore as ms

    from ..checkpoint.dense import config_for_checkpoint
    ms.set_device(cfg.device_target)
    ms.set_context(mode=ms.GRAPH_MODE if cfg.mode == 0 else ms.PYNATIVE_MODE)
    if not ckpt_path or not os.path.isfile(ckpt_path):
        raise PVTDenseError(f"checkpoint not found: {ckpt_path!r}")
    cfg, _ = config_for_checkpoint(cfg, ckpt_path)
    detector, _ = build_retinanet(cfg, num_classes, load_pretrained=False)
    report = load_dense_checkpoint(detector, ckpt_path)
    print_report(report)
    detector.set_train(False)
    return detector, report


def evaluate_checkpoint(cfg, ckpt_path, results_json=None):
    """The 12 COCO metrics of a checkpoint on the config's val set (printed by pycocotools' summary)."""
    val_set = open_dataset(cfg, "val")
    detector = load_detector(cfg, ckpt_path, val_set.num_classes)
    return evaluate_on(detector, val_set, cfg, results_json=results_json)


def load_detector_with_names(cfg, ckpt_path):
    """(detector, class names, COCO category ids). A training checkpoint of ours records its names (and is built
    with that many classes); an OpenMMLab file gives its meta's names, or COCO's for 80 classes, and must have
    the config's num_classes. Falls back to "0".."K-1"."""
    from ..checkpoint.dense import NATIVE, read_dense_checkpoint_meta
    if not ckpt_path or not os.path.isfile(ckpt_path):
        raise PVTDenseError(f"checkpoint not found: {ckpt_path!r}")
    info = read_dense_checkpoint_meta(ckpt_path)
    if info.source_format == NATIVE:
        from ..engine.checkpoints import read_checkpoint_meta
        try:
            meta = read_checkpoint_meta(ckpt_path)
        except PVTDenseError:
            meta = {}
        names = meta.get("class_names") or [str(i) for i in range(cfg.num_classes)]
        detector = load_detector(cfg, ckpt_path, len(names))
        return detector, list(names), meta.get("category_ids")
    detector, report = load_detector_with_report(cfg, ckpt_path)
    names = report.class_names or [str(i) for i in range(detector.num_classes)]
    return detector, list(names), None
