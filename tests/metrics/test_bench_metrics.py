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
    assert "### Metrics against Quantus 0.6" in text and "ms per map" in text


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
