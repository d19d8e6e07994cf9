"""One rank of the two-process data-parallel test (started by msrun from test_distributed.py; not a test itself)."""
import sys
from pathlib import Path

from pvt_dense.classification.config import load_classification_config
from pvt_dense.classification.train import ClassificationRun

if __name__ == "__main__":
    root = Path(__file__).resolve().parents[1]
    cfg = load_classification_config(root / "configs/classification/pvt_tiny.yaml", sys.argv[1:])
    ClassificationRun(cfg).fit()
