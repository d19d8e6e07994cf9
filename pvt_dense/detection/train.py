"""Train RetinaNet on a COCO-layout dataset with the shared iteration loop (loading a checkpoint to evaluate or
infer: `loading.py`).

Epochs become iterations once the training set is read: `epochs * steps_per_epoch` iterations, lr steps at
`lr_steps` epochs, evaluation every `eval_interval` epochs. One process or data parallel under msrun/mpirun
(`init_run` joins the process group; TrainStep averages the gradients), with atomic checkpoints and exact resume.
"""
import os

from ..config import dump_config
from ..engine.loop import IterationLoop
from ..engine.recipe import build_adamw, init_run, load_starting_weights, starting_weights, warmup_step_schedule
from ..engine.train_step import TrainStep, training_state_parameters
from ..errors import ConfigError
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
    load_starting_weights(detector, start)
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
