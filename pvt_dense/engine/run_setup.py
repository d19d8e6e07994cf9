"""What every run of the three tasks sets up first: device, execution mode, process group and seeds."""
import random

import numpy as np


def set_seeds(seed):
    """Seed every generator a run draws from: Python's, numpy's, MindSpore's and its dataset pipeline's."""
    import mindspore as ms
    import mindspore.dataset as ds
    random.seed(seed)
    np.random.seed(seed % (2 ** 32))
    ms.set_seed(seed)
    ds.config.set_seed(seed % (2 ** 32))


def set_device_and_mode(cfg):
    """The config's device (`device_target`) and execution mode (`mode` 0: GRAPH_MODE, 1: PYNATIVE_MODE), for
    training, evaluation and inference alike."""
    import mindspore as ms
    ms.set_device(cfg.device_target)
    ms.set_context(mode=ms.GRAPH_MODE if cfg.mode == 0 else ms.PYNATIVE_MODE)


def init_run(cfg):
    """Device, execution mode, process group (msrun/mpirun data parallel when launched so) and seeds, for all three
    tasks; returns (rank, world_size)."""
    from .distributed import init_distributed
    set_device_and_mode(cfg)
    rank, world_size = init_distributed(cfg.distribute)
    set_seeds(cfg.seed)
    return rank, world_size
