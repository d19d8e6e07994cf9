"""Two-process data parallel with msrun on the CPU equals one process with the same global batch."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pvt_dense.checkpoint.mindspore_ckpt import load_mindspore_checkpoint
from pvt_dense.data.digits import make_digits_imagenet

ROOT = Path(__file__).resolve().parents[1]
RUN = ["--num_classes", "10", "--image_resize", "32", "--amp_level", "O0", "--auto_augment", "null", "--mixup", "0",
       "--cutmix", "0", "--re_prob", "0", "--hflip", "0", "--warmup_epochs", "0", "--num_parallel_workers", "1",
       "--loss_scale", "1", "--drop_path_rate", "0", "--label_smoothing", "0", "--scale", "1.0", "1.0", "--ratio",
       "1.0", "1.0", "--progress_bar", "False", "--scheduler", "constant", "--opt", "sgd", "--lr", "0.05",
       "--weight_decay", "0", "--epoch_size", "2", "--max_steps_per_epoch", "3", "--val_while_train", "False",
       "--mode", "1", "--resume", ""]


def run_worker(args, launcher=(), timeout=900, log_dir=None):
    env = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
               PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", GLOG_v="3")
    # msrun starts `python` from PATH (the venv's, put first above), as in the documented command line.
    python = "python" if launcher else sys.executable
    command = [*launcher, python, str(ROOT / "tests" / "distributed_worker.py"), *args]
    done = subprocess.run(command, capture_output=True, text=True, timeout=timeout, env=env, cwd=str(ROOT))
    logs = ""
    if log_dir and Path(log_dir).exists():
        logs = "\n".join(p.read_text(errors="replace")[-3000:] for p in sorted(Path(log_dir).glob("*.log")))
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-3000:]}\n{logs}"
    return done


def final_weights(ckpt_dir):
    latest = json.loads((Path(ckpt_dir) / "latest.json").read_text())["checkpoint"]
    params = load_mindspore_checkpoint(str(Path(ckpt_dir) / latest))
    return {k: v.asnumpy() for k, v in params.items() if not k.startswith(("adam_", "pvt_dense_meta"))}


def losses(ckpt_dir):
    return [json.loads(line)["train_loss"] for line in (Path(ckpt_dir) / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.skipif(shutil.which("msrun", path=str(Path(sys.executable).parent)) is None, reason="msrun not installed")
def test_two_process_msrun_matches_one_process_with_the_same_global_batch(tmp_path, free_port):
    data = tmp_path / "digits"
    make_digits_imagenet(data, image_size=32, limit_per_class=10, val_fraction=0.2)
    single = tmp_path / "single"
    run_worker(RUN + ["--data_dir", str(data), "--ckpt_save_dir", str(single), "--batch_size", "16",
                      "--distribute", "False"])
    double = tmp_path / "double"
    log_dir = tmp_path / "msrun_logs"
    launcher = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
                f"--log_dir={log_dir}", "--join=True"]
    run_worker(RUN + ["--data_dir", str(data), "--ckpt_save_dir", str(double), "--batch_size", "8",
                      "--distribute", "True"], launcher=launcher, log_dir=log_dir)
    # Only rank 0 writes checkpoints and logs.
    assert not list(double.glob("rank_1*"))
    np.testing.assert_allclose(losses(double), losses(single), rtol=0, atol=1e-5)
    expected, actual = final_weights(single), final_weights(double)
    assert set(expected) == set(actual)
    for name in expected:
        # The all-reduce sums in another order than one process: float32 rounding only. Plain SGD keeps it at
        # that size (Adam's normalised step would blow up rounding differences of near-zero gradients to ~lr).
        np.testing.assert_allclose(actual[name], expected[name], rtol=0, atol=1e-5, err_msg=name)
