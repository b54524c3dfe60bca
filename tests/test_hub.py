"""The Hugging Face Hub, offline: pull through a local Hub cache laid out by huggingface_hub itself, push checked
against huggingface_hub's commit API with the server calls captured, and the model card amp push and amp demo write.

No test reaches a server: every HTTP request huggingface_hub makes goes to :class:`FakeHub` (an in-process
``httpx2.MockTransport`` serving local folders as repositories), which fails the test on any request it does not
serve, and ``HfApi.create_repo``/``create_commit`` are replaced by recorders.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import httpx2
import huggingface_hub
import pytest
import torch
from conftest import images_for, tiny
from huggingface_hub import HfApi, ModelCard, constants, snapshot_download
from huggingface_hub.utils import _http

import amp
from amp import hub
from amp.cli import main
from amp.pipeline import markdown

REPO = "amp-tests/tiny-pruned"
ROOT = Path(__file__).resolve().parents[1]


class FakeHub:
    """The Hub's download API over local folders (repository id → folder), for huggingface_hub's own client."""

    def __init__(self) -> None:
        self.repos: dict[str, tuple[str, Path]] = {}
        self.requests: list[str] = []

    def add(self, repo_id: str, folder: Path) -> str:
        """Serve ``folder`` as ``repo_id`` at one commit (its hash derived from the files) and return the hash."""
        digest = hashlib.sha1()
        for file in sorted(folder.iterdir()):
            digest.update(file.name.encode() + file.read_bytes())
        self.repos[repo_id] = (digest.hexdigest(), folder)
        return digest.hexdigest()

    def _files(self, folder: Path) -> list[dict]:
        return [
            {"type": "file", "path": f.name, "size": f.stat().st_size, "oid": hashlib.sha1(f.read_bytes()).hexdigest()}
            for f in sorted(folder.iterdir())
            if f.is_file()
        ]

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        self.requests.append(f"{request.method} {request.url.path}")
        parts = request.url.path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6:  # /api/models/<user>/<name>/(revision|tree)/<rev>
            repo_id, kind = "/".join(parts[2:4]), parts[4]
            if repo_id in self.repos:
                sha, folder = self.repos[repo_id]
                if kind == "revision":
                    files = self._files(folder)
                    siblings = [{"rfilename": f["path"]} for f in files]
                    return httpx2.Response(200, json={"id": repo_id, "sha": sha, "siblings": siblings})
                if kind == "tree":
                    return httpx2.Response(200, json=self._files(folder))
        if len(parts) >= 5 and parts[2] == "resolve":  # /<user>/<name>/resolve/<revision>/<file>
            repo_id, name = "/".join(parts[:2]), "/".join(parts[4:])
            if repo_id in self.repos and (self.repos[repo_id][1] / name).is_file():
                sha, folder = self.repos[repo_id]
                data = (folder / name).read_bytes()
                headers = {
                    "X-Repo-Commit": sha,
                    "ETag": f'"{hashlib.sha1(data).hexdigest()}"',
                    "Content-Length": str(len(data)),
                }
                return httpx2.Response(200, headers=headers, content=b"" if request.method == "HEAD" else data)
        return httpx2.Response(404, headers={"X-Error-Code": "RepoNotFound"}, json={"error": "not served"})


@pytest.fixture
def fake_hub(tmp_path, monkeypatch):
    """huggingface_hub with a cache in ``tmp_path`` and its HTTP client on :class:`FakeHub` (no network)."""
    served = FakeHub()
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    hooks = {"request": [_http.hf_request_event_hook]}  # the library's own hook: it enforces HF_HUB_OFFLINE
    huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(served), event_hooks=hooks))
    yield served
    huggingface_hub.set_client_factory(_http.default_client_factory)


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A tiny open_clip tower pruned to uneven widths, saved with a recorded command: (backbone, directory)."""
    dense = tiny("open_clip")
    scores = amp.api.random_scores(dense, seed=1)
    backbone = amp.prune(dense, scores, widths=[96, 40, 144])
    directory = tmp_path_factory.mktemp("pruned") / "model"
    amp.save_pruned(backbone, directory, commands=["amp prune open_clip:amp-test-tiny --out model"])
    return backbone, directory


def _embed(backbone) -> torch.Tensor:
    with torch.no_grad():
        return backbone.embed(images_for(backbone, n=4), project=True)


# --- pull: hf-hub:<repo id> -----------------------------------------------------------------------------


def test_a_repository_in_the_hub_cache_loads_offline_bit_identically(pruned, fake_hub, monkeypatch):
    backbone, directory = pruned
    commit = fake_hub.add(REPO, directory)
    # huggingface_hub lays the cache out itself: refs/main, blobs, snapshots/<commit> and the tree listing
    snapshot_download(REPO)
    assert hub.snapshot(f"hf-hub:{REPO}") == Path(constants.HF_HUB_CACHE, f"models--{REPO.replace('/', '--')}",
                                                  "snapshots", commit)  # fmt: skip
    fake_hub.repos.clear()  # from here on the "server" knows nothing: only the cache can answer
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    served = len(fake_hub.requests)
    expected = _embed(backbone)
    for spec in (f"hf-hub:{REPO}", f"hf-hub:{REPO}@main", f"hf-hub:{REPO}@{commit}"):
        loaded = amp.load_model(spec)
        assert loaded.spec == spec and loaded.widths() == [96, 40, 144]
        assert torch.equal(_embed(loaded), expected)
        assert loaded.info["base_model"] == "open_clip:amp-test-tiny"
    assert amp.load_pruned(f"hf-hub:{REPO}").widths() == [96, 40, 144]
    assert len(fake_hub.requests) == served  # offline: not one request


def test_HF_HUB_OFFLINE_from_the_environment_is_honoured(pruned, fake_hub, tmp_path):
    backbone, directory = pruned
    fake_hub.add(REPO, directory)
    snapshot_download(REPO)
    out = tmp_path / "embedding.pt"
    code = (
        "import sys, torch, amp; sys.path.insert(0, 'tests'); from conftest import images_for; "
        f"b = amp.load_model('hf-hub:{REPO}'); "
        f"torch.save(b.embed(images_for(b, n=4), project=True).detach(), {str(out)!r})"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": constants.HF_HUB_CACHE, "PYTHONPATH": str(ROOT)}
    env.pop("HF_ENDPOINT", None)
    subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, check=True, timeout=300)
    assert torch.equal(torch.load(out), _embed(backbone))


def test_a_repository_not_in_the_cache_is_one_clear_error_offline(fake_hub, monkeypatch, capsys):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(hub.HubError, match=rf"hf-hub:{REPO}: not in the local Hub cache .* HF_HUB_OFFLINE is set"):
        amp.load_model(f"hf-hub:{REPO}")
    assert main(["info", f"hf-hub:{REPO}"]) == 2
    assert capsys.readouterr().err.count("\n") == 1 and not fake_hub.requests


def test_a_repository_the_hub_does_not_have_is_named(fake_hub):
    with pytest.raises(hub.HubError, match=rf"hf-hub:{REPO}"):
        amp.load_model(f"hf-hub:{REPO}")


@pytest.mark.parametrize(
    ("spec", "problem"),
    [("hf-hub:no-user", "<user or organisation>/<name>"), ("hf-hub:a/b@", "no revision"), ("hf-hub:a//b", "not a Hub")],
)
def test_malformed_hub_names_are_refused_before_any_request(spec, problem, fake_hub):
    with pytest.raises(hub.HubError, match=problem):
        amp.load_model(spec)
    assert not fake_hub.requests


# --- push ---------------------------------------------------------------------------------------------


@pytest.fixture
def captured(monkeypatch, fake_hub):
    """HfApi.create_repo and create_commit replaced by recorders of their arguments."""
    calls: dict[str, tuple] = {}

    def create_repo(self, repo_id, **kwargs):
        calls["create_repo"] = (repo_id, kwargs)
        return SimpleNamespace(repo_id=repo_id)

    def create_commit(self, repo_id, operations, **kwargs):
        calls["create_commit"] = (repo_id, list(operations), kwargs)
        return SimpleNamespace(commit_url=f"https://huggingface.co/{repo_id}/commit/0123", oid="0123")

    monkeypatch.setattr(HfApi, "create_repo", create_repo)
    monkeypatch.setattr(HfApi, "create_commit", create_commit)
    return calls


def test_push_is_one_commit_of_the_model_files_and_the_card(pruned, captured):
    _, directory = pruned
    card = hub.model_card(amp.load_pruned(directory, device="meta"), repo_id=REPO)
    hub.push(directory, REPO, card, revision="v1", private=True, commit_message="first")
    assert captured["create_repo"] == (REPO, {"private": True, "exist_ok": True})
    repo_id, operations, kwargs = captured["create_commit"]
    assert repo_id == REPO and kwargs == {"commit_message": "first", "revision": "v1", "create_pr": False}
    assert all(isinstance(op, huggingface_hub.CommitOperationAdd) for op in operations)
    by_path = {op.path_in_repo: op for op in operations}
    assert set(by_path) == {"model.safetensors", "amp.json", "README.md"}
    for name in ("model.safetensors", "amp.json"):
        data = (directory / name).read_bytes()
        assert by_path[name].upload_info.size == len(data)
        assert by_path[name].upload_info.sha256 == hashlib.sha256(data).digest()
    assert by_path["README.md"].path_or_fileobj == str(card).encode()


def test_push_refuses_a_bad_repository_id_before_uploading(pruned, captured):
    with pytest.raises(hub.HubError, match="not a Hub repository id"):
        hub.push(pruned[1], "a b/c", "card")
    assert not captured


def test_amp_push_uploads_a_pruned_model_with_its_card(pruned, captured, capsys):
    _, directory = pruned
    assert main(["push", str(directory), REPO, "--create-pr"]) == 0
    assert f"load it with amp.load_model('hf-hub:{REPO}')" in capsys.readouterr().out
    _, operations, kwargs = captured["create_commit"]
    assert kwargs["create_pr"] is True and kwargs["revision"] is None
    card = ModelCard(next(op.path_or_fileobj for op in operations if op.path_in_repo == "README.md").decode())
    assert card.data.tags[:2] == ["amp", "pruned"] and "amp prune open_clip:amp-test-tiny --out model" in card.text
    assert main(["push", str(directory.parent / "missing"), REPO]) == 2
    assert "not a pruned amp model" in capsys.readouterr().err


def test_amp_push_dry_run_uploads_nothing(pruned, captured, capsys):
    _, directory = pruned
    assert main(["push", str(directory), REPO, "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert f"{(directory / 'model.safetensors').stat().st_size} bytes" in out and "## Widths per layer" in out
    assert not captured


# --- the model card -----------------------------------------------------------------------------------


def test_the_card_has_base_licence_widths_sizes_and_commands(pruned):
    backbone, directory = pruned
    loaded = amp.load_pruned(directory, device="meta")
    card = hub.model_card(loaded, repo_id=REPO)
    assert card.data.license == "other" and card.data.license_name == "see-base-model"  # a random-init test model
    assert "amp does not know the licence of the base model `open_clip:amp-test-tiny`" in card.text
    assert card.data.base_model is None and card.data.pipeline_tag == "image-feature-extraction"
    assert "| 1 | 40 | 192 | 20.8% |" in card.text and f'amp.load_model("hf-hub:{REPO}")' in card.text
    stats = amp.model_stats(backbone)
    assert f"| {stats.params / 1e6:.3f} |" in card.text
    assert f"| {stats.flops / 1e9:.3f} |" in card.text and f"| {stats.linear_flops / 1e9:.3f} |" in card.text
    assert "```bash\namp prune open_clip:amp-test-tiny --out model\n```" in card.text
    assert "No evaluation report" in card.text


def test_base_models_licences_and_hub_ids_come_from_their_libraries():
    assert hub.base_model_info("timm:vit_small_patch14_dinov2.lvd142m") == {
        "hub_id": "timm/vit_small_patch14_dinov2.lvd142m",
        "license": "apache-2.0",
    }
    assert hub.base_model_info("open_clip:ViT-B-32:openai") == {
        "hub_id": "timm/vit_base_patch32_clip_224.openai",
        "license": "apache-2.0",
    }
    assert hub.base_model_info("zoo:tiny-clip") == {"hub_id": None, "license": "mit"}
    for random_or_own_weights in ("timm:vit_tiny_patch16_224", "timm:vit_tiny_patch16_224:/w.pth", "open_clip:ViT-B-32",
                                  "open_clip:ViT-B-32:/ckpt.pt", "timm:vit_tiny_patch16_224.no_such_tag"):  # fmt: skip
        assert hub.base_model_info(random_or_own_weights) == {"hub_id": None, "license": None}
    assert hub.base_model_info("hf-hub:someone/model@v2")["hub_id"] == "someone/model"


def test_amp_demo_writes_the_card_amp_push_uploads(tmp_path, captured, capsys):
    out = tmp_path / "demo"
    argv = ["demo", "--model", "open_clip:amp-test-tiny", "--threshold", "1e9", "--steps", "1", "--batch-size", "16",
            "--score-images", "16", "--val-images", "16", "--eval-images", "16", "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    card = ModelCard.load(out / hub.CARD_FILE)
    report = json.loads((out / "report.json").read_text())
    low, high = report["intervals"]["pruned"]["zero_shot_top1"]
    assert f"[{100 * low:.1f}, {100 * high:.1f}]" in card.text  # the evaluation table with its 95 % intervals
    assert "```bash\namp demo --model open_clip:amp-test-tiny" in card.text  # the exact command, recorded by the CLI
    assert json.loads((out / "amp.json").read_text())["commands"] == [hub.command_line(argv)]
    assert main(["push", str(out), REPO]) == 0
    _, operations, _ = captured["create_commit"]
    assert {op.path_in_repo for op in operations} == {"model.safetensors", "amp.json", "search.json", "report.json",
                                                      "REPORT.md", "README.md"}  # fmt: skip
    pushed = next(op.path_or_fileobj for op in operations if op.path_in_repo == "README.md").decode()
    assert pushed.partition("## Size")[2] == str(card).partition("## Size")[2]  # the same card, named for its repo
    assert markdown(report).splitlines()[2] in pushed  # the report's table header
