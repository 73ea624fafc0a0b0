"""benchmarks/scaling.py's arithmetic on made-up points (its measurement: `python benchmarks/scaling.py`)."""

from helpers import benchmark_script

scaling = benchmark_script("scaling")


def point(sites, size, images, modules_s, classifier_s=20.0):
    timings = {k: 1.0 for k in scaling.PHASES} | {"modules": modules_s, "classifier": classifier_s, "synthesis": 10.0}
    return {"timings": timings, "total": sum(timings.values()), "dominant": max(timings, key=timings.get),
            "accuracy": 0.5, "sites": sites, "size": size, "module_images": images, "module_images_total": sites * images,
            "calls_per_image": 10, "synthetic_images": 3000, "classifier_images": 20000}


def test_scaling_estimates_grow_with_the_work_and_the_table_names_the_dominant_phase(tmp_path):
    from fedfactory.config import load_config

    res = {"processor": {"model": "test cpu", "cpu_count": 2}, "grid": scaling.GRID,
           "points": {"sites-2": point(2, 28, 2000, 8.0), "sites-50": point(50, 28, 2000, 200.0),
                      "base": point(10, 28, 2000, 40.0), "px-64": point(10, 64, 2000, 200.0),
                      "images-8000": point(10, 28, 8000, 160.0)}}
    shipped = load_config(scaling.CONFIG, [])
    fl = {s: {"module_train": 0.35 * (s / 28) ** 2, "module_call": 0.12 * (s / 28) ** 2, "classifier_train": 0.22}
          for s in (28, 128)}
    res["rates"] = scaling.rates(res["points"], fl)
    # 28 px points only: (2 + 50 + 10) x 2000 + 10 x 8000 images in 408 s of module training
    assert abs(res["rates"]["modules"] - 204_000 * 0.35 / 408) < 1e-9
    res["estimates"] = scaling.estimates(shipped, fl, res["rates"])
    by = {e["federation"]: e for e in res["estimates"]}
    assert abs(by["50 sites, 128 px"]["here_s"]["modules"] - 5 * by["10 sites, 128 px"]["here_s"]["modules"]) <= 5
    assert by["50 sites, 28 px"]["here_s"]["classifier"] == by["50 sites, 128 px"]["here_s"]["classifier"]
    assert by["50 sites, 128 px"]["gpu_s"]["modules"] < by["50 sites, 128 px"]["here_s"]["modules"]
    table = scaling.table(res)
    assert "| sites-50 | 50 | 28 | 2,000 |" in table and "| modules | 0.5000 |" in table and "| classifier | 0.5000 |" in table
    assert [v for v, _ in scaling.axis(res, "images", "module_images")] == [2000, 8000]
    assert [v for v, _ in scaling.axis(res, "sites", "sites")] == [2, 50]
    scaling.plot(res, tmp_path / "scaling.png")
    assert (tmp_path / "scaling.png").stat().st_size > 0
