"""ImageNet pretraining of the PVT classifier with the reference recipe, on one process or many (msrun/mpirun).

The loop is written for runs that last days: every checkpoint is atomic and carries the model, the optimizer
moments, the lr step, the loss scale and the position in the data order, so `resume: auto` continues exactly where
the last checkpoint left off (see `ImageFolderSource` for the data side). A non-finite loss stops the run and leaves
the last good checkpoint in place; steps whose scaled gradients overflow are skipped and counted.
"""
import math
import os
import time

import numpy as np

from ..engine.loop import NonFiniteLossError  # noqa: F401  (raised here, importable from here)
from ..engine.recipe import set_seeds
from ..errors import PVTDenseError
from .recipe import effective_lr, official_recipe_overrides


def no_decay_names(net, filter_bias_and_norm, extra_patterns=()):
    """Names of parameters trained without weight decay: 1-D ones (biases, norm scales and shifts) when asked, and
    any whose name contains one of `extra_patterns` (the official recipe adds pos embeds and the cls token)."""
    names = set()
    for param in net.trainable_params():
        if filter_bias_and_norm and len(param.shape) <= 1:
            names.add(param.name)
        if any(pattern in param.name for pattern in extra_patterns):
            names.add(param.name)
    return names


def build_optimizer(net, cfg, lr_schedule):
    """AdamW (mindcv's, a real AdamW: bias-corrected moments, decoupled decay; fused in place by
    `pvt_dense.engine.optim`) or MindSpore's SGD/Adam, with parameter groups for weight decay. mindcv's
    `create_optimizer` is not used: it drops its `eps` argument for AdamW and cannot take extra no-decay names from
    a parameter list."""
    from mindspore import nn

    from ..engine.optim import AdamW
    extra = official_recipe_overrides(cfg)[2] if cfg.official_recipe else ()
    skip = no_decay_names(net, cfg.filter_bias_and_bn or cfg.official_recipe, extra)
    params = net.trainable_params()
    groups = [{"params": [p for p in params if p.name not in skip], "weight_decay": cfg.weight_decay},
              {"params": [p for p in params if p.name in skip], "weight_decay": 0.0}]
    groups = [g for g in groups if g["params"]] + [{"order_params": params}]
    if cfg.opt == "adamw":
        return AdamW(groups, learning_rate=lr_schedule, eps=cfg.eps)
    if cfg.opt == "adam":
        return nn.Adam(groups, learning_rate=lr_schedule, eps=cfg.eps, use_nesterov=cfg.use_nesterov)
    return nn.Momentum(groups, learning_rate=lr_schedule, momentum=cfg.momentum if cfg.opt == "momentum" else 0.0,
                       use_nesterov=cfg.use_nesterov)


def build_lr_schedule(cfg, steps_per_epoch, world_size):
    from mindcv.scheduler import create_scheduler

    from ..engine.recipe import check_schedule_length
    check_schedule_length(steps_per_epoch * cfg.epoch_size, "epoch_size x steps per epoch")
    name = "cosine_decay" if cfg.scheduler == "warmup_cosine_decay" else cfg.scheduler
    return create_scheduler(steps_per_epoch, scheduler=name, lr=effective_lr(cfg, world_size), min_lr=cfg.min_lr,
                            warmup_epochs=cfg.warmup_epochs, warmup_factor=cfg.warmup_factor,
                            decay_epochs=cfg.decay_epochs, decay_rate=cfg.decay_rate,
                            milestones=list(cfg.multi_step_decay_milestones), num_epochs=cfg.epoch_size,
                            lr_epoch_stair=cfg.lr_epoch_stair)


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


class Trainer:
    """Everything one classification run needs, built from a checked config (`load_classification_config`)."""

    def __init__(self, cfg):
        from mindcv.loss import create_loss
        from mindspore import nn

        from ..engine.checkpoints import CheckpointManager
        from ..engine.recipe import init_run
        from ..engine.train_step import TrainStep
        from ..models import create_model
        from ..models.fast_ops import mixed_precision
        from .data import ImageFolderSource, build_loader, scan_image_folder

        self.cfg = cfg
        self.rank, self.world_size = init_run(cfg)
        self.is_main = self.rank == 0

        paths, labels, classes = scan_image_folder(cfg.data_dir, cfg.train_split)
        val_split = scan_image_folder(cfg.data_dir, cfg.val_split) if cfg.val_while_train else None
        if len(classes) != cfg.num_classes:
            raise PVTDenseError(f"num_classes is {cfg.num_classes} but {os.path.join(cfg.data_dir, cfg.train_split)}"
                                f" has {len(classes)} class folders; set num_classes: {len(classes)}")
        self.class_names = classes
        self.train_source = ImageFolderSource(paths, labels, seed=cfg.seed, shuffle=cfg.shuffle, rank=self.rank,
                                              world_size=self.world_size, batch_size=cfg.batch_size)
        self.train_loader = build_loader(self.train_source, cfg, cfg.num_classes, training=True)
        full_steps = len(self.train_source) // cfg.batch_size
        if full_steps == 0:
            raise PVTDenseError(f"{len(self.train_source)} training images per process is less than one batch of "
                                f"{cfg.batch_size}")
        self.steps_per_epoch = min(full_steps, cfg.max_steps_per_epoch) if cfg.max_steps_per_epoch else full_steps
        self.val_loader = None
        if val_split is not None and self.is_main:
            self.val_source = ImageFolderSource(*val_split[:2], shuffle=False, batch_size=cfg.batch_size)
            self.val_loader = build_loader(self.val_source, cfg, cfg.num_classes, training=False)

        self.net = create_model(cfg.model, num_classes=cfg.num_classes, drop_path_rate=cfg.drop_path_rate,
                                drop_rate=cfg.drop_rate, pretrained=cfg.ckpt_path or None, strict=False)
        if cfg.amp_level != "O0":
            # In place; LayerNorm and GELU stay float32 under O2 (see fast_ops.mixed_precision).
            mixed_precision(self.net, cfg.amp_level)
        self.lr_schedule = build_lr_schedule(cfg, self.steps_per_epoch, self.world_size)
        self.optimizer = build_optimizer(self.net, cfg, self.lr_schedule)
        loss = create_loss(name=cfg.loss, label_smoothing=cfg.label_smoothing)
        clip = cfg.clip_value if cfg.clip_grad else 0.0
        if cfg.official_recipe:
            official_clip, official_value, _ = official_recipe_overrides(cfg)
            clip = official_value if official_clip else clip
        self.train_step = TrainStep(nn.WithLossCell(self.net, loss), self.optimizer, loss_scale=cfg.loss_scale,
                                    dynamic_loss_scale=cfg.dynamic_loss_scale, clip_grad_norm=clip)
        self.checkpoints = CheckpointManager(cfg.ckpt_save_dir, keep_last=cfg.keep_checkpoint_max,
                                             metric_name="top1", mode="max", prefix=cfg.model,
                                             lock=self.is_main)
        self.state = {"epoch": 0, "step_in_epoch": 0, "global_step": 0, "overflow_steps": 0, "best_top1": None,
                      "skipped_images": 0}
        self.metrics = None

    # -- checkpoints ------------------------------------------------------------------------------------------
    def state_parameters(self):
        """What a checkpoint holds: model weights, optimizer state (moments, lr step), loss-scale state."""
        from ..engine.train_step import training_state_parameters
        return training_state_parameters(self.net, self.optimizer, self.train_step)

    def resume_point(self):
        resume = self.cfg.resume
        if resume == "":
            return None
        if resume == "auto":
            return self.checkpoints.latest()
        if not os.path.isfile(resume):
            raise PVTDenseError(f"resume checkpoint not found: {resume}")
        return resume, None

    def restore(self, path):
        meta = self.checkpoints.load_into(path, self.state_parameters())
        for key in self.state:
            if key in meta:
                self.state[key] = meta[key]
        return meta

    def save(self, metric=None):
        if not self.is_main:
            return None
        broken = [p.name for p in self.net.trainable_params() if not np.isfinite(p.asnumpy()).all()]
        if broken:
            raise NonFiniteLossError(
                f"weights became non-finite ({', '.join(broken[:3])}...) at epoch {self.state['epoch']}, global "
                f"step {self.state['global_step']}; stopping without saving. {self.checkpoints.kept_sentence()} "
                "(lower lr or loss_scale, or check the data)")
        meta = dict(self.state, config=dict(self.cfg), class_names=self.class_names)
        return self.checkpoints.save(self.state_parameters(), meta, metric=metric)

    # -- the loop ---------------------------------------------------------------------------------------------
    def fit(self):
        from tqdm import tqdm

        from ..engine.metrics_log import MetricsLog
        cfg = self.cfg
        point = self.resume_point()
        if point is not None:
            self.restore(point[0])
            if self.is_main:
                print(f"resumed from {point[0]}: epoch {self.state['epoch']}, step {self.state['step_in_epoch']} "
                      f"of {self.steps_per_epoch}, global step {self.state['global_step']}")
        if self.is_main:
            os.makedirs(cfg.ckpt_save_dir, exist_ok=True)
            # state["epoch"] counts finished epochs, and records are numbered by it: keep records 1..epoch.
            self.metrics = MetricsLog(cfg.ckpt_save_dir, resume_from_epoch=self.state["epoch"]
                                      if point is not None else -1)
        while self.state["epoch"] < cfg.epoch_size:
            epoch = self.state["epoch"]
            start_step = self.state["step_in_epoch"]
            set_seeds(cfg.seed * 1000 + epoch)
            self.train_source.set_epoch(epoch, start_batch=start_step)
            self.net.set_train(True)
            losses, started = [], time.perf_counter()
            lr = self.lr_schedule[min(self.state["global_step"], len(self.lr_schedule) - 1)]
            bar = tqdm(total=self.steps_per_epoch, initial=start_step, disable=not (self.is_main and cfg.progress_bar),
                       desc=f"epoch {epoch + 1}/{cfg.epoch_size}", unit="step", leave=False)
            iterator = self.train_loader.create_tuple_iterator(num_epochs=1)
            for step in range(start_step, self.steps_per_epoch):
                images, labels = next(iterator)
                loss, overflow, _ = self.train_step(images, labels)
                loss_value = float(loss.asnumpy())
                if not math.isfinite(loss_value):
                    raise NonFiniteLossError(
                        f"loss is {loss_value} at epoch {epoch + 1}, step {step + 1}; stopping. "
                        f"{self.checkpoints.kept_sentence()} (lower lr or loss_scale, or check the data)")
                if bool(overflow.asnumpy()):
                    self.state["overflow_steps"] += 1
                else:
                    losses.append(loss_value)
                self.state["global_step"] += 1
                self.state["step_in_epoch"] = step + 1
                lr = self.lr_schedule[min(self.state["global_step"] - 1, len(self.lr_schedule) - 1)]
                elapsed = time.perf_counter() - started
                rate = (step + 1 - start_step) * cfg.batch_size * self.world_size / max(elapsed, 1e-9)
                bar.set_postfix(loss=f"{loss_value:.4f}", lr=f"{lr:.2e}", img_s=f"{rate:.1f}")
                bar.update(1)
                if cfg.save_every_steps and (step + 1) % cfg.save_every_steps == 0 and step + 1 < self.steps_per_epoch:
                    self.save()
            bar.close()
            epoch_time = time.perf_counter() - started
            self.state["epoch"] = epoch + 1
            self.state["step_in_epoch"] = 0
            self.state["skipped_images"] = len(self.train_source.bad_files)
            record = {"epoch": epoch + 1, "train_loss": float(np.mean(losses)) if losses else float("nan"),
                      "lr": float(lr), "epoch_time_s": round(epoch_time, 3),
                      "overflow_steps": self.state["overflow_steps"],
                      "skipped_images": self.state["skipped_images"]}
            metric = None
            if self.val_loader is not None and (epoch + 1) % cfg.val_interval == 0:
                result = evaluate(self.net, self.val_loader)
                record.update(val_top1=result["top1"], val_top5=result["top5"], val_loss=result["loss"])
                metric = result["top1"]
                best = self.state["best_top1"]
                self.state["best_top1"] = metric if best is None else max(best, metric)
            if self.is_main:
                self.metrics.append(record)
                self.metrics.plot()
                print(format_epoch_line(record, cfg.epoch_size))
                if (epoch + 1) % cfg.ckpt_save_interval == 0 or epoch + 1 == cfg.epoch_size:
                    self.save(metric)
        return self.state


def format_epoch_line(record, total_epochs):
    parts = [f"epoch {record['epoch']}/{total_epochs}", f"train loss {record['train_loss']:.4f}"]
    if "val_top1" in record:
        parts += [f"val top-1 {record['val_top1']:.2f}", f"top-5 {record['val_top5']:.2f}",
                  f"val loss {record['val_loss']:.4f}"]
    parts += [f"lr {record['lr']:.3e}", f"{record['epoch_time_s']:.1f} s"]
    if record.get("overflow_steps"):
        parts.append(f"{record['overflow_steps']} overflow steps skipped")
    if record.get("skipped_images"):
        parts.append(f"{record['skipped_images']} unreadable images skipped")
    return " | ".join(parts)


def train_classifier(cfg):
    """Run (or resume) the training described by `cfg`; returns the final state dict."""
    return Trainer(cfg).fit()
