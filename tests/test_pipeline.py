"""The main job end to end on a tiny random CLIP and the committed Fashion-MNIST subsets (a smoke run with checks)."""

import json

from amp.cli import main


def test_demo_on_a_tiny_budget(tmp_path, capsys):
    out = tmp_path / "demo"
    argv = [
        "demo",
        "--model", "open_clip:amp-test-tiny",
        "--threshold", "1e9",  # accept every probe: the smallest widths the bisection can reach
        "--steps", "2",
        "--batch-size", "16",
        "--score-images", "32",
        "--val-images", "32",
        "--eval-images", "48",
        "--out", str(out),
    ]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "report.json").read_text())
    assert report["widths"] == [48, 48, 48]  # 192 → 96 → 48
    dense, pruned = report["results"]["dense"], report["results"]["pruned"]
    assert pruned["params_M"] < dense["params_M"] and pruned["gflops"] < dense["gflops"]
    for row in (dense, pruned):
        for key in ("zero_shot_top1", "i2t_R@1", "t2i_R@1"):
            assert 0 <= row[key] <= 1
        assert row["images_per_s"] > 0
    assert -1 <= pruned["fidelity_cosine"] <= 1
    assert set(report["seconds"]) >= {"load", "score", "search", "evaluate dense", "evaluate pruned"}
    text = (out / "REPORT.md").read_text()
    assert "| pruned |" in text and "zero-shot top-1" in text
    # 95 % intervals in the table and in report.json, and a paired comparison per quality metric
    low, high = report["intervals"]["pruned"]["zero_shot_top1"]
    assert low <= pruned["zero_shot_top1"] <= high
    assert f"{100 * pruned['zero_shot_top1']:.1f}% [{100 * low:.1f}, {100 * high:.1f}]" in text
    compared = {c["metric"]: c for c in report["comparisons"]}
    assert set(compared) == {"zero_shot_top1", "i2t_R@1", "t2i_R@1"}  # the cosine is measured on pruned only
    assert all(c["items"] == 48 and 0 <= c["p_value"] <= 1 and c["verdict"] in text for c in compared.values())
    assert (out / "model.safetensors").is_file() and main(["info", str(out)]) == 0
