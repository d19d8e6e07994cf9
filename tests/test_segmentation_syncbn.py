"""The head's cross-rank BatchNorm under msrun (2 CPU processes) equals torch's BatchNorm on the whole batch."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]


def run_env():
    # msrun starts `python` from PATH: the venv's must come first, and the workers must find pvt_dense.
    return dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}",
                PYTHONPATH=f"{ROOT}{os.pathsep}{os.environ.get('PYTHONPATH', '')}", GLOG_v="3")


@pytest.mark.skipif(shutil.which("msrun", path=str(Path(sys.executable).parent)) is None, reason="msrun not installed")
@pytest.mark.parametrize("mode", ["graph"])
def test_two_rank_statistics_outputs_and_gradients_equal_whole_batch_batchnorm(tmp_path, mode, free_port):
    log_dir = tmp_path / "logs"
    command = ["msrun", "--worker_num=2", "--local_worker_num=2", f"--master_port={free_port()}",
               f"--log_dir={log_dir}", "--join=True", "python", str(ROOT / "tests" / "segmentation_syncbn_worker.py"),
               str(tmp_path), mode]
    done = subprocess.run(command, capture_output=True, text=True, timeout=300, env=run_env(), cwd=str(ROOT))
    logs = "\n".join(p.read_text(errors="replace")[-2000:] for p in sorted(log_dir.glob("*.log")))
    assert done.returncode == 0, f"{done.stdout[-2000:]}\n{done.stderr[-2000:]}\n{logs}"
    ranks = [np.load(tmp_path / f"rank{r}.npz") for r in range(2)]

    rng = np.random.default_rng(0)  # the worker's global batch
    x = torch.tensor(rng.normal(2.0, 3.0, size=(4, 3, 5, 6)).astype(np.float32), requires_grad=True)
    weights = torch.tensor(rng.normal(size=(4, 3, 5, 6)).astype(np.float32))
    bn = torch.nn.BatchNorm2d(3, momentum=0.1)
    with torch.no_grad():
        bn.weight.copy_(torch.tensor([1.0, 2.0, 0.5]))
        bn.bias.copy_(torch.tensor([0.0, -1.0, 0.3]))
    bn(x.detach())  # the worker runs the forward twice (once alone, once for the gradients): two stat updates
    output = bn(x)
    (output * weights).sum().backward()

    close = dict(rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(np.concatenate([r["output"] for r in ranks]), output.detach().numpy(), **close)
    np.testing.assert_allclose(np.concatenate([r["grad_x"] for r in ranks]), x.grad.numpy(), **close)
    # Each rank holds its part of the parameter gradients; data parallel sums (then averages) them.
    np.testing.assert_allclose(sum(r["grad_gamma"] for r in ranks), bn.weight.grad.numpy(), **close)
    np.testing.assert_allclose(sum(r["grad_beta"] for r in ranks), bn.bias.grad.numpy(), **close)
    for r in ranks:
        np.testing.assert_allclose(r["moving_mean"], bn.running_mean.numpy(), **close)
        np.testing.assert_allclose(r["moving_variance"], bn.running_var.numpy(), **close)
