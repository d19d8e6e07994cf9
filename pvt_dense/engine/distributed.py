"""Data parallel through MindSpore's own engine: processes started by msrun (or mpirun on Ascend/GPU clusters)."""
import os
import warnings

LAUNCHER_VARIABLES = ("MS_WORKER_NUM", "MS_ROLE", "RANK_SIZE", "OMPI_COMM_WORLD_SIZE", "PMI_SIZE")


def launched_by_a_launcher():
    return any(os.environ.get(name) for name in LAUNCHER_VARIABLES)


def init_distributed(distribute):
    """(rank, world_size). With `distribute`, joins the process group that msrun/mpirun started and switches
    MindSpore to data-parallel mode (gradients averaged across ranks inside each training step)."""
    if not distribute:
        return 0, 1
    if not launched_by_a_launcher():
        warnings.warn("distribute is True but this process was not started by msrun or mpirun; running as a single "
                      "process (pass --distribute False to say so, or start it with msrun --worker_num=N "
                      "--local_worker_num=N python ...)", RuntimeWarning, stacklevel=2)
        return 0, 1
    import mindspore as ms
    from mindspore.communication import get_group_size, get_rank, init
    from mindspore.context import ParallelMode
    init()
    world_size, rank = get_group_size(), get_rank()
    ms.reset_auto_parallel_context()
    ms.set_auto_parallel_context(parallel_mode=ParallelMode.DATA_PARALLEL, gradients_mean=True,
                                 device_num=world_size)
    return rank, world_size
