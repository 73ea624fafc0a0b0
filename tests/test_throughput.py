"""benchmarks/throughput.py at a tiny size (its measurement: `python benchmarks/throughput.py`)."""

import json

from helpers import benchmark_script, needs_fashion

throughput = benchmark_script("throughput")


@needs_fashion
def test_throughput_reports_every_section(tmp_path, capsys):
    # one process here: spawned workers would add seconds of start-up to a check of the figures' shape
    assert throughput.main(["--images", "128", "--sample", "4", "--splits", "single", "--out", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "throughput.json").read_text())
    assert res["processor"]["cpu_count"] > 0 and res["processor"]["torch_threads"] > 0
    assert all(v > 0 for k, v in res["flops"].items())
    split = f"1x{throughput.DEFAULT_THREADS}"
    train, sample = res["training"][split], res["sampling"][split]
    assert all(train[k] > 0 for k in ("fit_images_per_s", "bare_images_per_s", "fit_GFLOP_s", "bare_GFLOP_s", "fit_share_of_bare",
                                      "matmul_GFLOP_s", "fit_share_of_matmul"))
    assert abs(train["fit_share_of_matmul"] - train["fit_GFLOP_s"] / train["matmul_GFLOP_s"]) < 2e-3
    assert sample["images_per_s"] > 0 and sample["GFLOP_s"] > 0 and sample["images_made"] == 100
    assert f"| single | {split} |" in capsys.readouterr().out
