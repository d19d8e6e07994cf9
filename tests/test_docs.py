"""The docs site builds strictly (`make docs`): a broken link, a page missing from the nav, a results table include
that points nowhere or an API name that no longer exists fails `make test` here."""
import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_docs_build_strictly(tmp_path):
    env = dict(os.environ, PYTHONPATH=ROOT, NO_MKDOCS_2_WARNING="1")
    run = subprocess.run([sys.executable, "-m", "mkdocs", "build", "--strict", "--config-file",
                          os.path.join(ROOT, "mkdocs.yml"), "--site-dir", str(tmp_path / "site")],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    for page in ("index.html", "results/index.html", "api/models/index.html", "bad_inputs/index.html"):
        assert (tmp_path / "site" / page).is_file(), page
    # the API pages are generated from the docstrings, not empty shells
    models = (tmp_path / "site" / "api" / "models" / "index.html").read_text()
    assert 'id="pvt_dense.create_backbone"' in models
    # the results tables beside the configs are included, not just linked
    results = (tmp_path / "site" / "results" / "index.html").read_text()
    assert "retinanet_pvt_v2_b5_fpn_1x_coco.yaml" in results and "semfpn_pvt_tiny_ade20k_40k.yaml" in results
