"""The benchmark's own arithmetic: FLOP count, timing statistics, memory reading, ratios and reports.

The FLOP count is checked against torch's FlopCounterMode on HuggingFace's PVT (an independent count of an
independent implementation) and against the published GFLOPs; the timing of real models is the tool's job, not a
test's (tools/benchmark.py).
"""
import csv
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from devtools import benchmark
from devtools.hf_reference import hf_classifier, hf_pvt_config, official_dense_hf_backbone, official_dense_hf_model
from pvt_dense.models.pvt import PVT_SPECS
from pvt_dense.models.pvt_v2 import PVT_V2_SPECS

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def flop_counter_total(build_model, shape):
    """FlopCounterMode's total for one forward; on the meta device, so nothing is computed (counting needs shapes
    only)."""
    from torch.utils.flop_counter import FlopCounterMode
    with torch.device("meta"):
        model = build_model()
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(pixel_values=torch.empty(shape, device="meta"))
    return counter.get_total_flops()


@pytest.mark.parametrize("name", ["pvt_tiny", "pvt_small"])
def test_backbone_flops_equal_torch_flop_counter_on_hf_at_odd_size(name):
    spec = PVT_SPECS[name]
    theirs = flop_counter_total(lambda: official_dense_hf_model(spec), (2, 3, 97, 131))
    assert benchmark.forward_flops(spec, 2, 97, 131) == theirs


def test_classifier_flops_equal_torch_flop_counter_and_published_figure():
    spec = PVT_SPECS["pvt_tiny"]
    ours = benchmark.forward_flops(spec, 1, 224, 224, classifier=True)
    theirs = flop_counter_total(lambda: transformers.PvtForImageClassification(hf_pvt_config(spec)).eval(),
                                (1, 3, 224, 224))
    assert ours == theirs
    # The paper's 1.9 GFLOPs for PVT-Tiny counts multiply-adds.
    assert ours / 2e9 == pytest.approx(1.9, abs=0.05)


@pytest.mark.parametrize("name", ["pvt_v2_b0", "pvt_v2_b2_li"])
def test_v2_backbone_flops_equal_torch_flop_counter_on_hf_at_odd_size(name):
    """Overlapping patch embedding (ceil grids at 97x131), depth-wise MLP conv and, for b2_li, the 7x7 pooled
    linear attention, against HF's PvtV2Model; and for the classifier (mean-pooled, no cls token)."""
    spec = PVT_V2_SPECS[name]
    theirs = flop_counter_total(lambda: official_dense_hf_backbone(spec), (2, 3, 97, 131))
    assert benchmark.forward_flops(spec, 2, 97, 131) == theirs
    classifier = flop_counter_total(lambda: hf_classifier(spec).eval(), (1, 3, 224, 224))
    assert benchmark.forward_flops(spec, 1, 224, 224, classifier=True) == classifier


def test_v2_flops_equal_published_figures():
    # The PVT v2 paper's GFLOPs at 224x224 (multiply-adds), to the one decimal it prints. b5's 11.8 is the one
    # exception: this count (equal to FlopCounterMode's above) gives 11.72; the paper's counter adds ~0.7% there.
    published = {"pvt_v2_b0": 0.6, "pvt_v2_b1": 2.1, "pvt_v2_b2": 4.0, "pvt_v2_b2_li": 3.9, "pvt_v2_b3": 6.9,
                 "pvt_v2_b4": 10.1, "pvt_v2_b5": 11.7}
    for name, gmacs in published.items():
        ours = benchmark.forward_flops(PVT_V2_SPECS[name], 1, 224, 224, classifier=True) / 2e9
        assert round(ours, 1) == gmacs, name


def test_train_step_counts_three_forwards():
    spec = PVT_SPECS["pvt_tiny"]
    case = benchmark.CASES["train224_b8"]
    assert benchmark.case_flops(spec, case) == 3 * benchmark.forward_flops(spec, 8, 224, 224, classifier=True)


def test_summarize_times_by_hand():
    stats = benchmark.summarize_times([0.4, 0.1, 0.3, 0.2, 10.0])
    assert stats["median_s"] == 0.3 and stats["min_s"] == 0.1 and stats["max_s"] == 10.0
    assert stats["p25_s"] == pytest.approx(0.2) and stats["p75_s"] == pytest.approx(0.4)
    assert stats["spread"] == pytest.approx(0.2 / 0.3) and stats["repeats"] == 5


def test_time_calls_warms_up_and_stops_at_the_time_budget():
    calls = []
    first, times = benchmark.time_calls(lambda: calls.append(1), warmup=3, repeats=50, max_seconds=0.0,
                                        min_repeats=4)
    # 3 warm-up calls (the first timed on its own), then the minimum number of timed calls.
    assert len(times) == 4 and len(calls) == 7 and first >= 0


def test_resident_memory_reading_sees_a_200_mb_allocation():
    # In a fresh process: in a long-lived test worker, other threads free and touch memory between two readings.
    script = ("import numpy as np; from devtools import benchmark; before = benchmark.current_rss_mb(); "
              "block = np.ones(50 * 2 ** 20, dtype=np.float32); after = benchmark.current_rss_mb(); "
              "print(before, after, benchmark.peak_rss_mb())")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], cwd=root, capture_output=True, text=True, timeout=120,
                            check=True)
    before, after, peak = (float(v) for v in result.stdout.split())
    assert 180 < after - before < 260  # 200 MiB, touched
    assert peak >= after - 1


def fake_row(framework, median_s, peak_mb, case="fwd224_b8"):
    return benchmark.result_row("pvt_tiny", benchmark.CASES[case], framework,
                                {"times_s": [median_s * 0.9, median_s, median_s * 1.2], "first_call_s": 5.0,
                                 "peak_rss_mb": peak_mb, "rss_after_import_mb": 300.0})


def test_rows_ratios_and_reports(tmp_path):
    rows = [fake_row(benchmark.OURS, 0.4, 900.0), fake_row(benchmark.THEIRS, 0.5, 1200.0),
            benchmark.result_row("pvt_tiny", benchmark.CASES["fwd224_b1"], benchmark.OURS, {"error": "boom"})]
    ours = rows[0]
    assert ours["images_per_s"] == pytest.approx(8 / 0.4)
    flops = benchmark.forward_flops(PVT_SPECS["pvt_tiny"], 8, 224, 224)
    assert ours["achieved_gflops"] == pytest.approx(flops / 0.4 / 1e9)
    ratio = benchmark.ratios(rows)[("pvt_tiny", "fwd224_b8")]
    assert ratio["speed"] == pytest.approx(1.25) and ratio["memory"] == pytest.approx(0.75)

    info = benchmark.machine_info(threads=2)
    assert info["threads"] == 2 and info["versions"]["mindspore"]
    benchmark.write_reports(str(tmp_path), info, rows, profiles={})
    table = (tmp_path / "results.md").read_text()
    assert "| 1.25x |" in table and "| 0.75x |" in table and "boom" in table
    with open(tmp_path / "results.csv", newline="") as handle:
        written = list(csv.DictReader(handle))
    assert float(written[1]["images_per_s"]) == pytest.approx(16.0) and written[2]["error"] == "boom"
    payload = json.loads((tmp_path / "results.json").read_text())
    assert payload["machine"]["threads"] == 2 and payload["ratios"][0]["speed"] == pytest.approx(1.25)
    assert (tmp_path / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.bad_input("benchmark arguments", "an unknown case name", "BenchmarkError listing the valid cases")
def test_unknown_case_is_refused(tmp_path):
    with pytest.raises(benchmark.BenchmarkError, match="fwd224_b1"):
        benchmark.run_benchmark(cases=("fwd999",), output=str(tmp_path), progress=False)


def test_photo_folder_is_deterministic_with_both_orientations_codecs_and_ten_sizes(tmp_path):
    pytest.importorskip("skimage")
    import cv2

    from devtools.pipeline_bench import write_photo_folder
    paths = write_photo_folder(str(tmp_path / "a"), 30)
    again = write_photo_folder(str(tmp_path / "b"), 30)
    sizes = [cv2.imread(p).shape[:2] for p in paths]
    assert len(set(sizes)) >= 10
    assert any(h > w for h, w in sizes) and any(w > h for h, w in sizes)
    assert {os.path.splitext(p)[1] for p in paths} == {".jpg", ".png"}
    for first, second in zip(paths, again, strict=True):
        assert open(first, "rb").read() == open(second, "rb").read()


# The pipeline cases once each at a tiny size, through the real workers (subprocesses, mmdet/mmseg/HF on the torch
# side, the converted checkpoint on ours), into the report.
TINY_PIPELINE_CASES = (
    benchmark.BenchCase("det_folder", "det_folder", 1, 96, 160, images=2),
    benchmark.BenchCase("seg_folder", "seg_folder", 1, 64, 256, images=2),
    benchmark.BenchCase("export_folder", "export_folder", 1, 64, 128, images=2),
    benchmark.BenchCase("det_train", "det_train", 2, 96, 160),
)


@pytest.fixture(scope="module")
def tiny_pipeline_run(tmp_path_factory):
    pytest.importorskip("mmdet")
    pytest.importorskip("mmseg")
    pytest.importorskip("mmcv")
    pytest.importorskip("skimage")
    output = tmp_path_factory.mktemp("bench")
    rows = benchmark.run_benchmark(models=("pvt_tiny",), cases=TINY_PIPELINE_CASES, output=str(output), repeats=1,
                                   warmup=1, threads=1, profile_cases=(), progress=False)
    return rows, (output / "results.md").read_text()


@pytest.mark.slow
@pytest.mark.parametrize("case", TINY_PIPELINE_CASES, ids=lambda c: c.name)
def test_pipeline_case_runs_on_both_sides_into_the_report(tiny_pipeline_run, case):
    rows, report = tiny_pipeline_run
    mine = {r["framework"]: r for r in rows if r["case"] == case.name}
    assert set(mine) == {benchmark.OURS, benchmark.THEIRS}
    for row in mine.values():
        assert "error" not in row, row.get("error")
        assert row["images_per_s"] > 0 and row["peak_rss_mb"] > 100 and row["spread"] >= 0
    ratio = mine[benchmark.OURS]["images_per_s"] / mine[benchmark.THEIRS]["images_per_s"]
    line = next(line for line in report.splitlines() if line.startswith(f"| pvt_tiny | {case.label} |"))
    assert f"| {ratio:.2f}x |" in line
    if case.is_folder:
        for row in mine.values():
            assert row["images"] == case.images
            # the whole process (interpreter, imports, loading, compilations) is what a command line costs
            assert row["process_s"] > row["total_s"] > 0
            assert row["images_per_s"] == pytest.approx(case.images / row["process_s"])
        assert f"pvt_tiny {case.name}, {benchmark.FRAMEWORK_LABELS[benchmark.OURS]}: {case.images} images" in report
        assert "of which compilation" in report


@pytest.mark.bad_input("benchmark arguments", "a pipeline case with a PVT v2 model first",
                       "BenchmarkError: the pipeline cases compare with mmdetection's PVT v1")
def test_pipeline_cases_refuse_a_v2_model_first(tmp_path):
    with pytest.raises(benchmark.BenchmarkError, match="v1"):
        benchmark.run_benchmark(models=("pvt_v2_b0",), cases=("det_folder",), output=str(tmp_path), progress=False)


def test_first_runs_start_from_empty_caches_and_second_runs_reuse_them(tmp_path, monkeypatch):
    """A folder case's first run gets an empty PVT_DENSE_CACHE_DIR (a user's first run builds the kernel library);
    its second run the same folder, filled by the first run, or by an untimed first run made for it."""
    from devtools import benchmark as module
    made = []

    def worker(task):
        made.append(task)
        os.makedirs(task["cache_dir"], exist_ok=True)
        open(os.path.join(task["cache_dir"], "library"), "w").close()
        return {}

    monkeypatch.setattr(module, "run_worker", worker)
    again = {"framework": benchmark.OURS}
    module.prepare_caches(again, benchmark.CASES["seg_folder_again"], str(tmp_path))
    assert len(made) == 1 and made[0]["case_spec"]["run"] == 1 and made[0]["cache_dir"] == again["cache_dir"]
    module.prepare_caches(again, benchmark.CASES["seg_folder_again"], str(tmp_path))
    assert len(made) == 1  # the first run's caches are there: reused
    first = {"framework": benchmark.OURS}
    module.prepare_caches(first, benchmark.CASES["seg_folder"], str(tmp_path))
    assert first["cache_dir"] == again["cache_dir"] and not os.path.exists(first["cache_dir"])
    assert "empty caches" in benchmark.CASES["seg_folder"].label
    assert "second run" in benchmark.CASES["seg_folder_again"].label
