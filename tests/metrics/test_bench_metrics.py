"""The metrics benchmark's rows: ours and Quantus's, on the same maps, in the same run."""

from __future__ import annotations

# isort: off
import torchvision  # noqa: F401  (before quantus, which imports tensorflow: the other order segfaults)

# isort: on
import numpy as np
import pytest

from benchmarks import bench_metrics, report


def test_localisation_rows_pair_ours_with_quantus():
    bench_metrics._give_quantus_trapz()
    rows = bench_metrics.localisation(rounds=1)
    methods = {r["method"] for r in rows}
    assert methods == {"pointing_game", "relevance_mass", "relevance_rank", "top_k_intersection",
                       "localisation_auc", "weakly_supervised_localisation"}
    for method in methods - {"weakly_supervised_localisation"}:
        libraries = {r["library"]: r for r in rows if r["method"] == method}
        assert set(libraries) == {"gradcam_ref", "quantus"}
        assert libraries["quantus"]["ratio"] == 1.0 and libraries["gradcam_ref"]["ms_per_map"] > 0
    text = report.markdown({"rows": rows})
    assert "### Metrics against Quantus 0.6" in text and "ms per map (wall; " in text
    assert "| weakly_supervised_localisation (gradcam_ref) |" in text and "- (Quantus has none)" in text
    goals = bench_metrics.localisation_goals(rows)
    assert [g["method"] for g in goals] == [r["method"] for r in rows if r["library"] == "gradcam_ref"]
    for g in goals:  # wall and CPU time of the same row, each judged against 5 ms
        row = next(r for r in rows if r["method"] == g["method"] and r["library"] == "gradcam_ref")
        assert (g["wall_ms"], g["cpu_ms"]) == (row["ms_per_map"], row["cpu_ms_per_map"])
        assert g["met_wall"] == (row["ms_per_map"] <= 5.0) and g["met_cpu"] == (row["cpu_ms_per_map"] <= 5.0)
        assert len(g["load_average"]) == 3


def test_the_localisation_goal_is_judged_in_wall_and_cpu_time():
    rows = [{"suite": "metrics", "kind": "localisation", "method": "localisation_auc", "library": "gradcam_ref",
             "ms_per_map": 7.4, "cpu_ms_per_map": 1.2, "load_average": (16.0, 15.5, 12.25)},
            {"suite": "metrics", "kind": "localisation", "method": "localisation_auc", "library": "quantus",
             "ms_per_map": 118.1, "cpu_ms_per_map": 16.7, "load_average": (16.0, 15.5, 12.25)}]
    assert bench_metrics.localisation_goals_text(rows) == (
        "localisation_auc per 224 x 224 map | wall 7.40 ms > 5 ms, MISSED | CPU 1.20 ms <= 5 ms, met "
        "| load 16.0, 15.5, 12.2")
    with pytest.raises(SystemExit):
        bench_metrics.main(["--kinds", "localization"])
    with pytest.raises(ValueError, match="kinds must be among"):
        bench_metrics.run(kinds=("mrpt",))


def test_the_benchmarked_maps_look_like_grad_cam():
    maps, masks = bench_metrics._maps()
    zeros = np.mean(maps == 0)
    assert maps.shape == masks.shape == (8, 224, 224) and 0.15 < zeros < 0.8


@pytest.mark.slow  # ResNet-18's 41 layers, six ways: about two minutes on an idle core
def test_mprt_rows_pair_ours_with_quantus_against_the_explains():
    rows = bench_metrics.mprt(rounds=1, size=64)
    assert {r["method"] for r in rows} == {"42 explains", "gradcam_ref cascading", "gradcam_ref independent",
                                           "gradcam_ref cascading (quantus scheme)", "quantus MPRT top_down",
                                           "quantus MPRT independent"}
    assert all(r["explanations"] == 42 and r["seconds"] > 0 for r in rows)
    assert next(r for r in rows if r["method"] == "42 explains")["ratio"] == 1.0
    assert "to 42 explains" in bench_metrics.table(rows)


def test_batch_memory_rows_per_input():
    import torch

    from benchmarks import bench_batch_memory

    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1)).eval()
    calls = []
    net.register_forward_hook(lambda m, i, o: calls.append(i[0].shape[0]))
    rows = bench_batch_memory.rows(net, 16, [2, 4], rounds=2, total=8)
    assert [(r["size"], r["batch"]) for r in rows] == [(16, 2), (16, 4)]
    assert sorted(calls) == sorted([2] * 4 * 3 + [4] * 2 * 3)  # warm-up and 2 rounds: 8 inputs each time
    assert all(r["user_s"] >= 0 and r["system_s"] >= 0 and r["faults"] >= 0 for r in rows)
    assert "| 16 x 16 | 4 |" in bench_batch_memory.table(rows)
