"""Model-zoo downloads against a real HTTP server on 127.0.0.1 that speaks the Hub protocol (tests/fakehub.py).

No part of huggingface_hub is mocked: semdiff calls hf_hub_download / snapshot_download / HfApi, which
talk HTTP to the FakeHub started by the ``fakehub`` fixture. Assertions are on returned files, raised
errors and the server's request log.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from fakehub import FakeHub
from semdiff import hub, manifest

REPO_ROOT = Path(__file__).resolve().parents[1]
FIXTURE = Path(__file__).parent / "fixtures" / "diffae" / "parity_tiny.safetensors"


# ---------------------------------------------------------------------------------------------------
# fixtures


@pytest.fixture(scope="module")
def fakehub():
    with FakeHub() as server:
        yield server


@pytest.fixture
def server(fakehub, monkeypatch, tmp_path):
    """The running FakeHub with HF_ENDPOINT pointing at it, a fresh cache, online, an empty log."""
    from huggingface_hub import constants
    from huggingface_hub.utils import disable_progress_bars

    disable_progress_bars()
    monkeypatch.setenv("HF_ENDPOINT", fakehub.endpoint)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    for var in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_TOKEN", manifest.MANIFEST_ENV):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_TELEMETRY", True)  # no agent-registry probe
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)  # plain LFS uploads (FakeHub has no Xet)
    manifest.reload_manifest()
    fakehub.clear_faults()
    fakehub.clear_log()
    yield fakehub
    fakehub.clear_faults()
    manifest._registered.clear()
    manifest.reload_manifest()


@pytest.fixture
def cache(tmp_path) -> Path:
    return tmp_path / "hub-cache"


def _model_folder(path: Path, seed: int = 0, n: int = 3000) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps({"family": "diffae", "semdiff_version": "0.1.0", "seed": seed}))
    g = torch.Generator().manual_seed(seed)
    save_file({"w": torch.randn(n, generator=g)}, str(path / "model.safetensors"))
    return path


def _files_meta(folder: Path, names=("config.json", "model.safetensors")) -> dict:
    return {n: {"sha256": hashlib.sha256((folder / n).read_bytes()).hexdigest(), "size": (folder / n).stat().st_size}
            for n in names}


def _entry(source: dict, status: str = "available") -> dict:
    return {
        "family": "diffae",
        "description": "a tiny test model",
        "status": status,
        "source": source,
        "license": "mit",
        "data_license": "CC0-1.0",
        "paper": None,
        "preprocessing": {"image_size": 32, "alignment": "none", "range": [-1, 1]},
        "defaults": {"encode_stochastic": 5, "decode": 5, "manipulate": 5, "prior": None},
    }


def _publish(server: FakeHub, tmp_path: Path, repo: str, name: str, seed: int = 0) -> tuple[str, Path]:
    """Push a model folder to ``repo`` and register a manifest entry pinned to that commit."""
    folder = _model_folder(tmp_path / f"src-{repo.replace('/', '-')}-{seed}", seed)
    commit = server.add_folder(repo, folder)
    manifest.register_model(name, _entry({"type": "hub", "repo_id": repo, "revision": commit,
                                          "files": _files_meta(folder)}), overwrite=True)
    return commit, folder


def _same_files(a: Path, b: Path) -> bool:
    return all((a / f).read_bytes() == (b / f).read_bytes() for f in ("config.json", "model.safetensors"))


def _cached_blobs(cache: Path, repo: str) -> list[Path]:
    blobs = cache / f"models--{repo.replace('/', '--')}" / "blobs"
    return [p for p in blobs.iterdir() if p.is_file()] if blobs.exists() else []


# ---------------------------------------------------------------------------------------------------
# manifest entries pinned to a commit


def test_first_download_then_cached_reload_makes_zero_requests(server, tmp_path, cache):
    commit, src = _publish(server, tmp_path, "org/tiny", "tiny-test")
    folder = hub.resolve_model_dir("tiny-test", cache_dir=cache)
    assert _same_files(folder, src)
    assert folder.name == commit and str(folder).startswith(str(cache))
    log = server.log()
    # pinned: every request names the commit, never a branch
    resolve = [r for r in log if "/resolve/" in r.path]
    assert resolve and all(f"/resolve/{commit}/" in r.path for r in resolve)
    assert len(server.log(method="GET", contains="/cdn/")) == 1  # the LFS blob, once
    assert len(server.log(method="GET", contains="/resolve/")) == 1  # config.json (regular file)
    assert all("semdiff/" in r.headers.get("user-agent", "") for r in resolve)  # library_name / version

    server.clear_log()
    again = hub.resolve_model_dir("tiny-test", cache_dir=cache)
    assert again == folder
    assert server.requests == []  # cached + pinned: zero requests


def test_default_cache_is_hf_hub_cache_read_at_call_time(server, tmp_path, monkeypatch):
    _publish(server, tmp_path, "org/tiny", "tiny-test")
    other = tmp_path / "elsewhere"
    monkeypatch.setenv("HF_HUB_CACHE", str(other))
    folder = hub.resolve_model_dir("tiny-test")
    assert str(folder).startswith(str(other))
    monkeypatch.delenv("HF_HUB_CACHE")
    monkeypatch.setenv("HF_HOME", str(tmp_path / "home"))
    assert str(hub.resolve_model_dir("tiny-test")).startswith(str(tmp_path / "home" / "hub"))


def test_offline_cached_load_makes_zero_requests(server, tmp_path, cache, monkeypatch):
    _, src = _publish(server, tmp_path, "org/tiny", "tiny-test")
    folder = hub.resolve_model_dir("tiny-test", cache_dir=cache)
    server.clear_log()
    assert hub.resolve_model_dir("tiny-test", cache_dir=cache, local_files_only=True) == folder
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert hub.resolve_model_dir("tiny-test", cache_dir=cache) == folder
    assert server.requests == []
    # no network at all (nothing listens on the endpoint): still loads from the cache
    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    assert _same_files(hub.resolve_model_dir("tiny-test", cache_dir=cache), src)


def test_offline_uncached_error_says_how_to_fetch(server, tmp_path, cache):
    _publish(server, tmp_path, "org/tiny", "tiny-test")
    with pytest.raises(hub.ModelNotCachedError) as info:
        hub.resolve_model_dir("tiny-test", cache_dir=cache, local_files_only=True)
    assert "semdiff download tiny-test" in str(info.value) and "HF_HUB_OFFLINE" in str(info.value)
    assert isinstance(info.value, FileNotFoundError)
    assert server.requests == []
    # (without offline mode and without a network, huggingface_hub retries for ~20 s before the same error)


def test_offline_mode_set_before_import_in_a_fresh_process(server, tmp_path, cache):
    """HF_HUB_OFFLINE=1 in the environment of a new process (huggingface_hub reads it at import)."""
    commit, src = _publish(server, tmp_path, "org/tiny", "tiny-test")
    entry = manifest.get_entry("tiny-test")
    extra = tmp_path / "extra-manifest.json"
    extra.write_text(json.dumps({"schema_version": 1, "models": {"tiny-test": entry, "tiny-uncached": entry}}))
    hub.resolve_model_dir("tiny-test", cache_dir=cache)
    server.clear_log()
    script = textwrap.dedent(f"""
        import sys
        from semdiff import hub
        folder = hub.resolve_model_dir("tiny-test", cache_dir={str(cache)!r})
        print("FOLDER", folder)
        try:
            hub.resolve_model_dir("hf-hub:org/never-fetched", cache_dir={str(cache)!r})
        except hub.ModelNotCachedError as err:
            print("ERROR", err)
    """)
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_ENDPOINT": server.endpoint, manifest.MANIFEST_ENV: str(extra),
           "PYTHONPATH": str(REPO_ROOT)}
    out = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert f"FOLDER {cache}" in out.stdout and commit in out.stdout
    assert "ERROR" in out.stdout and "semdiff download hf-hub:org/never-fetched" in out.stdout
    assert server.requests == []


def test_pinned_revision_survives_a_moved_branch(server, tmp_path, cache):
    c1, src1 = _publish(server, tmp_path, "org/moving", "moving-test", seed=1)
    src2 = _model_folder(tmp_path / "v2", seed=2)
    c2 = server.add_folder("org/moving", src2)
    assert server.head("org/moving") == c2 != c1

    pinned = hub.resolve_model_dir("moving-test", cache_dir=cache)
    assert _same_files(pinned, src1) and pinned.name == c1
    assert all(c1 in r.path for r in server.log(contains="/resolve/"))

    # an hf-hub: name follows the branch ...
    latest = hub.resolve_model_dir("hf-hub:org/moving", cache_dir=cache)
    assert _same_files(latest, src2) and latest.name == c2
    # ... or a revision, which may be a commit
    assert _same_files(hub.resolve_model_dir(f"hf-hub:org/moving@{c1}", cache_dir=cache), src1)
    assert _same_files(hub.resolve_model_dir("hf-hub:org/moving", revision=c1, cache_dir=cache), src1)
    # the branch moves back: the next online load by branch name follows it
    server.move_branch("org/moving", "main", c1)
    server.clear_log()
    back = hub.resolve_model_dir("hf-hub:org/moving", cache_dir=cache)
    assert back.name == c1
    assert [r.path for r in server.requests] == ["/api/models/org/moving/revision/main"]  # files already cached
    # a manifest entry refuses another revision
    with pytest.raises(ValueError, match="pinned"):
        hub.resolve_model_dir("moving-test", revision="main", cache_dir=cache)


def test_corrupted_blob_is_fetched_again_once(server, tmp_path, cache):
    _, src = _publish(server, tmp_path, "org/tiny", "tiny-test")
    server.corrupt("org/tiny", "model.safetensors", times=1)
    with pytest.warns(hub.ChecksumWarning) as record:
        folder = hub.resolve_model_dir("tiny-test", cache_dir=cache)
    expected = hashlib.sha256((src / "model.safetensors").read_bytes()).hexdigest()
    message = str(record[0].message)
    assert expected in message and "actual" in message
    assert _same_files(folder, src)
    assert len(server.log(method="GET", contains="/cdn/")) == 2  # the bad transfer + one more


def test_corrupted_blob_every_time_raises_and_leaves_nothing(server, tmp_path, cache):
    _, src = _publish(server, tmp_path, "org/tiny", "tiny-test")
    good = (src / "model.safetensors").read_bytes()
    server.corrupt("org/tiny", "model.safetensors")
    with pytest.warns(hub.ChecksumWarning), pytest.raises(hub.ChecksumError) as info:
        hub.resolve_model_dir("tiny-test", cache_dir=cache)
    err = info.value
    bad = bytearray(good)
    bad[-1] ^= 0xFF
    assert err.expected == hashlib.sha256(good).hexdigest()
    assert err.actual == hashlib.sha256(bytes(bad)).hexdigest()
    assert "model.safetensors" in err.file and err.expected in str(err) and err.actual in str(err)
    assert len(server.log(method="GET", contains="/cdn/")) == 2  # fetched again exactly once
    # the bad copy is not in the cache: nothing can load it later
    assert not any(p.read_bytes() == bytes(bad) for p in _cached_blobs(cache, "org/tiny"))
    snap = next((cache / "models--org--tiny" / "snapshots").iterdir())
    assert not (snap / "model.safetensors").exists()
    # once the server is healthy again the model loads
    server.clear_faults()
    assert _same_files(hub.resolve_model_dir("tiny-test", cache_dir=cache), src)


def test_corrupted_file_in_the_cache_is_detected_on_load(server, tmp_path, cache):
    _, src = _publish(server, tmp_path, "org/tiny", "tiny-test")
    folder = hub.resolve_model_dir("tiny-test", cache_dir=cache)
    blob = (folder / "model.safetensors").resolve()
    data = bytearray(blob.read_bytes())
    data[100] ^= 0x01  # a bit flip on disk, same size
    blob.write_bytes(bytes(data))
    server.clear_log()
    # offline: detected, deleted, not loaded, and no request
    with pytest.raises(hub.ChecksumError, match="not fetched again"):
        hub.resolve_model_dir("tiny-test", cache_dir=cache, local_files_only=True)
    assert server.requests == [] and not blob.exists()
    # online: fetched again
    again = hub.resolve_model_dir("tiny-test", cache_dir=cache)
    assert _same_files(again, src)
    assert len(server.log(method="GET", contains="/cdn/")) == 1
    # the same on-disk corruption online: one warning, one more download
    blob = (again / "model.safetensors").resolve()
    blob.write_bytes(bytes(data))
    server.clear_log()
    with pytest.warns(hub.ChecksumWarning):
        assert _same_files(hub.resolve_model_dir("tiny-test", cache_dir=cache), src)
    assert len(server.log(method="GET", contains="/cdn/")) == 1


def test_truncated_transfer_is_resumed(server, tmp_path, cache):
    _, src = _publish(server, tmp_path, "org/tiny", "tiny-test")
    server.truncate("org/tiny", "model.safetensors", nbytes=500, times=1)  # connection drops mid-body
    folder = hub.resolve_model_dir("tiny-test", cache_dir=cache)
    assert _same_files(folder, src)
    gets = server.log(method="GET", contains="/cdn/")
    assert len(gets) == 2  # the dropped transfer, then the client resumed (or restarted) it
    assert gets[1].headers.get("Range") in (None, "bytes=500-")


def test_truncated_copy_on_the_server_is_never_cached(server, tmp_path, cache):
    _publish(server, tmp_path, "org/tiny", "tiny-test")
    server.truncate("org/tiny", "model.safetensors", nbytes=500, honest_length=True)  # short body, short length
    with pytest.raises(hub.DownloadError, match="failed twice"):
        hub.resolve_model_dir("tiny-test", cache_dir=cache)
    assert len(server.log(method="GET", contains="/cdn/")) == 2
    assert all(p.stat().st_size != 500 for p in _cached_blobs(cache, "org/tiny"))
    assert not list((cache / "models--org--tiny" / "blobs").glob("*.incomplete"))


def test_truncated_transfer_of_an_hf_hub_name(server, tmp_path, cache):
    src = _model_folder(tmp_path / "m", seed=8)
    server.add_folder("someone/trunc", src)
    server.truncate("someone/trunc", "model.safetensors", nbytes=500, honest_length=True)
    with pytest.raises(hub.DownloadError, match="failed twice"):
        hub.resolve_model_dir("hf-hub:someone/trunc", cache_dir=cache)
    assert all(p.stat().st_size != 500 for p in _cached_blobs(cache, "someone/trunc"))
    server.clear_faults()
    assert _same_files(hub.resolve_model_dir("hf-hub:someone/trunc", cache_dir=cache), src)


def test_missing_file_repo_and_revision(server, tmp_path, cache):
    commit, src = _publish(server, tmp_path, "org/tiny", "tiny-test")
    entry = manifest.get_entry("tiny-test")
    entry["source"]["files"]["extra.safetensors"] = {"sha256": "0" * 64, "size": 1}
    manifest.register_model("tiny-missing-file", entry)
    with pytest.raises(hub.RemoteNotFoundError) as info:
        hub.resolve_model_dir("tiny-missing-file", cache_dir=cache)
    assert info.value.kind == "file" and "extra.safetensors" in str(info.value)

    entry = manifest.get_entry("tiny-test")
    entry["source"]["repo_id"] = "org/does-not-exist"
    manifest.register_model("tiny-missing-repo", entry)
    with pytest.raises(hub.RemoteNotFoundError) as info:
        hub.resolve_model_dir("tiny-missing-repo", cache_dir=cache)
    assert info.value.kind == "repo" and "org/does-not-exist" in str(info.value)

    wrong = "f" * 40  # a wrong pin: no such commit
    entry = manifest.get_entry("tiny-test")
    entry["source"]["revision"] = wrong
    manifest.register_model("tiny-wrong-pin", entry)
    server.clear_log()
    with pytest.raises(hub.RemoteNotFoundError) as info:
        hub.resolve_model_dir("tiny-wrong-pin", cache_dir=cache)
    assert info.value.kind == "revision" and wrong in str(info.value) and "pin" in str(info.value)
    assert all(wrong in r.path for r in server.requests)

    for name, kind in [("hf-hub:org/nope", "repo"), ("hf-hub:org/tiny@no-such-branch", "revision")]:
        with pytest.raises(hub.RemoteNotFoundError) as info:
            hub.resolve_model_dir(name, cache_dir=cache)
        assert info.value.kind == kind


def test_pin_whose_files_differ_from_the_manifest_hashes(server, tmp_path, cache):
    commit, src = _publish(server, tmp_path, "org/tiny", "tiny-test")
    other = _model_folder(tmp_path / "other", seed=7)
    entry = manifest.get_entry("tiny-test")
    entry["source"]["files"] = _files_meta(other)  # hashes of another model: the pin is wrong
    manifest.register_model("tiny-wrong-hash", entry)
    with pytest.warns(hub.ChecksumWarning), pytest.raises(hub.ChecksumError) as info:
        hub.resolve_model_dir("tiny-wrong-hash", cache_dir=cache)
    assert info.value.expected == _files_meta(other)["config.json"]["sha256"]
    assert info.value.actual == _files_meta(src)["config.json"]["sha256"]


# ---------------------------------------------------------------------------------------------------
# hf-hub: names, local folders, unknown and unlocated names


def test_hf_hub_name_without_manifest_entry(server, tmp_path, cache):
    src = _model_folder(tmp_path / "m", seed=3)
    (src / "README.md").write_text("---\nlibrary_name: semdiff\n---\n# m\n")
    (src / "train-log.bin").write_bytes(b"x" * 5000)  # not part of a model folder: not downloaded
    commit = server.add_folder("someone/model", src)
    folder = hub.resolve_model_dir(f"hf-hub:someone/model@{commit}", cache_dir=cache)
    assert _same_files(folder, src) and (folder / "README.md").exists()
    assert not (folder / "train-log.bin").exists()
    server.clear_log()
    assert hub.resolve_model_dir(f"hf-hub:someone/model@{commit}", cache_dir=cache) == folder
    assert server.requests == []  # a commit revision, cached: zero requests
    # by branch name: one request to resolve the branch, files from the cache; then offline too
    assert hub.resolve_model_dir("hf-hub:someone/model", cache_dir=cache) == folder
    assert [r.path for r in server.requests] == ["/api/models/someone/model/revision/main"]
    server.clear_log()
    assert hub.resolve_model_dir("hf-hub:someone/model", cache_dir=cache, local_files_only=True) == folder
    assert server.requests == []


def test_hf_hub_name_is_verified_against_the_tree_listing(server, tmp_path, cache):
    src = _model_folder(tmp_path / "m", seed=4)
    server.add_folder("someone/model", src)
    server.corrupt("someone/model", "model.safetensors")  # served wrong, advertised hash unchanged
    with pytest.warns(hub.ChecksumWarning), pytest.raises(hub.ChecksumError) as info:
        hub.resolve_model_dir("hf-hub:someone/model", cache_dir=cache)
    assert info.value.expected == server.file("someone/model", "model.safetensors").sha256
    assert info.value.algorithm == "sha256"
    server.clear_faults()
    server.corrupt("someone/model", "config.json")  # a regular (non-LFS) file: git blob sha1
    with pytest.warns(hub.ChecksumWarning), pytest.raises(hub.ChecksumError) as info:
        hub.resolve_model_dir("hf-hub:someone/model", cache_dir=tmp_path / "cache2")
    assert info.value.algorithm == "git-sha1"
    assert info.value.expected == server.file("someone/model", "config.json").git_oid
    server.clear_faults()
    assert _same_files(hub.resolve_model_dir("hf-hub:someone/model", cache_dir=cache), src)
    checks = {c["file"]: c for c in hub.verify("hf-hub:someone/model", cache_dir=cache)}
    assert checks["model.safetensors"]["status"] == "ok" and checks["config.json"]["status"] == "ok"
    assert checks["config.json"]["expected"] == server.file("someone/model", "config.json").git_oid
    # force_download fetches every file exactly once more
    server.clear_log()
    hub.resolve_model_dir("hf-hub:someone/model", cache_dir=cache, force_download=True)
    assert len(server.log(method="GET", contains="/cdn/")) == 1
    assert len(server.log(method="GET", contains="/resolve/")) == 1


def test_hf_hub_subfolder_and_non_model_repo(server, tmp_path, cache):
    a = _model_folder(tmp_path / "a", seed=5)
    server.add_files("org/multi", {f"variant-a/{f}": (a / f).read_bytes() for f in ("config.json", "model.safetensors")}
                     | {"last.ckpt": b"not a model folder"}, replace=True)
    folder = hub.resolve_model_dir("hf-hub:org/multi/variant-a", cache_dir=cache)
    assert folder.name == "variant-a" and _same_files(folder, a)
    with pytest.raises(hub.ModelNotAvailableError) as info:
        hub.resolve_model_dir("hf-hub:org/multi", cache_dir=cache)
    assert "missing config.json" in str(info.value) and "last.ckpt" in str(info.value)
    assert "semdiff convert" in str(info.value)


def test_local_folder(tmp_path):
    src = _model_folder(tmp_path / "local")
    assert hub.resolve_model_dir(src) == src
    assert hub.resolve_model_dir(str(src)) == src
    (src / "model.safetensors").unlink()
    with pytest.raises(hub.ModelNotAvailableError, match="model.safetensors"):
        hub.resolve_model_dir(src)


def test_unknown_names(server):
    with pytest.raises(hub.UnknownModelError) as info:
        hub.resolve_model_dir("diffae-ffhq265")
    assert isinstance(info.value, KeyError) and info.value.suggestions[0] == "diffae-ffhq256"
    assert "Did you mean 'diffae-ffhq256'" in str(info.value)
    with pytest.raises(hub.UnknownModelError, match="hf-hub:org/repo"):
        hub.resolve_model_dir("org/repo")  # not a folder: tells how to name a Hub repo
    with pytest.raises(ValueError):
        hub.resolve_model_dir("hf-hub:just-a-name")
    assert server.requests == []


def test_not_located_entry_explains_what_is_missing(server, cache):
    with pytest.raises(hub.ModelNotAvailableError) as info:
        hub.resolve_model_dir("diffae-ffhq256", cache_dir=cache)
    text = str(info.value)
    assert "9bd2ba9e4c22afde8f18958026a4e8e625ef67d2c3ee76bb3aa72f3e67d3b9ca" in text and "2,722,085,968" in text
    assert "semdiff convert diffae" in text and "semdiff download diffae-ffhq256 --checkpoint" in text
    assert "taocode/diffdub" in text and "not used" in text
    assert server.requests == []


# ---------------------------------------------------------------------------------------------------
# official checkpoints converted on first load


def stub_convert(checkpoint_path, out_dir, *, image_size=None, scale=1.0, classifier=None):
    """A stand-in converter: EMA weights of a plain {"state_dict": ...} checkpoint -> model folder."""
    ckpt = torch.load(checkpoint_path, map_location="cpu", weights_only=True)
    state = {k[len("ema_model."):]: v * scale for k, v in ckpt["state_dict"].items() if k.startswith("ema_model.")}
    if classifier is not None:
        state["classifier.weight"] = torch.load(classifier, weights_only=True)["state_dict"]["classifier.weight"]
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.json").write_text(json.dumps({"family": "diffae", "image_size": image_size}))
    save_file(state, str(out / "model.safetensors"))
    stub_convert.calls += 1
    return out


stub_convert.calls = 0


def _official_entry(repo, commit, sha, size, family="stubfam", args=None, status="available", **extra):
    src = {"type": "official-checkpoint", "repo_id": repo, "revision": commit, "filename": "ffhq/last.ckpt",
           "sha256": sha, "size": size, "convert": {"family": family, "args": args or {"image_size": 32}}, **extra}
    return _entry(src, status=status)


@pytest.fixture
def stub_family():
    hub.register_converter("stubfam", stub_convert)
    stub_convert.calls = 0
    yield
    hub.CONVERTERS.pop("stubfam", None)


def _plain_ckpt(path: Path, seed=0) -> tuple[Path, dict]:
    g = torch.Generator().manual_seed(seed)
    w = {"a.weight": torch.randn(64, 64, generator=g), "a.bias": torch.randn(64, generator=g)}
    torch.save({"state_dict": {**{"model." + k: v + 1 for k, v in w.items()},
                               **{"ema_model." + k: v for k, v in w.items()}}, "global_step": 1}, path)
    return path, w


def test_convert_on_first_load_then_never_touches_the_checkpoint(server, tmp_path, cache, stub_family):
    ckpt, weights = _plain_ckpt(tmp_path / "last.ckpt")
    data = ckpt.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    commit = server.add_files("org/official", {"ffhq/last.ckpt": data}, replace=True)
    manifest.register_model("official-test", _official_entry("org/official", commit, sha, len(data)))

    folder = hub.resolve_model_dir("official-test", cache_dir=cache)
    assert folder == cache / "semdiff-converted" / f"official-test-{sha[:16]}"
    got = load_file(str(folder / "model.safetensors"))
    assert torch.equal(got["a.weight"], weights["a.weight"])  # EMA weights
    record = json.loads((folder / "semdiff_conversion.json").read_text())
    assert record["inputs"]["checkpoint"]["sha256"] == sha and record["verified_against_manifest"] is True
    assert len(server.log(method="GET", contains="/cdn/")) == 1 and stub_convert.calls == 1

    # later loads: the converted folder only, zero requests, no conversion, even without the .ckpt
    for blob in _cached_blobs(cache, "org/official"):
        blob.unlink()
    server.clear_log()
    assert hub.resolve_model_dir("official-test", cache_dir=cache) == folder
    assert hub.resolve_model_dir("official-test", cache_dir=cache, local_files_only=True) == folder
    assert server.requests == [] and stub_convert.calls == 1
    assert hub.cache_status("official-test", cache_dir=cache) == "converted"
    checks = hub.verify("official-test", cache_dir=cache)
    assert {(c["file"], c["status"]) for c in checks} == {("converted/config.json", "ok"),
                                                         ("converted/model.safetensors", "ok")}

    # a tampered converted file is caught: converted again (re-downloading the checkpoint it needs)
    (folder / "model.safetensors").write_bytes(b"garbage")
    with pytest.warns(hub.ChecksumWarning, match="converted file"):
        again = hub.resolve_model_dir("official-test", cache_dir=cache)
    assert again == folder and stub_convert.calls == 2
    assert torch.equal(load_file(str(again / "model.safetensors"))["a.weight"], weights["a.weight"])


def test_official_checkpoint_with_a_wrong_hash_is_never_converted(server, tmp_path, cache, stub_family):
    ckpt, _ = _plain_ckpt(tmp_path / "last.ckpt")
    data = ckpt.read_bytes()
    commit = server.add_files("org/official", {"ffhq/last.ckpt": data}, replace=True)
    manifest.register_model("official-bad", _official_entry("org/official", commit, "1" * 64, len(data)))
    with pytest.warns(hub.ChecksumWarning), pytest.raises(hub.ChecksumError, match="1111111111"):
        hub.resolve_model_dir("official-bad", cache_dir=cache)
    assert stub_convert.calls == 0
    assert not (cache / "semdiff-converted").exists() or not any((cache / "semdiff-converted").iterdir())


def test_interrupted_conversion_leaves_no_folder_that_loads(server, tmp_path, cache, stub_family):
    ckpt, _ = _plain_ckpt(tmp_path / "last.ckpt")
    data = ckpt.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    commit = server.add_files("org/official", {"ffhq/last.ckpt": data}, replace=True)
    manifest.register_model("official-test", _official_entry("org/official", commit, sha, len(data)))

    def dies_halfway(checkpoint_path, out_dir, **kwargs):
        (Path(out_dir) / "config.json").write_text("{}")
        raise KeyboardInterrupt  # e.g. Ctrl-C during the conversion

    hub.register_converter("stubfam", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        hub.resolve_model_dir("official-test", cache_dir=cache)
    assert list((cache / "semdiff-converted").iterdir()) == []
    hub.register_converter("stubfam", stub_convert)
    server.clear_log()
    folder = hub.resolve_model_dir("official-test", cache_dir=cache)
    assert (folder / "model.safetensors").exists()
    assert server.requests == []  # the verified checkpoint was already cached (pinned): no request


def test_import_a_checkpoint_for_an_unlocated_entry(server, tmp_path, cache, stub_family):
    ckpt, weights = _plain_ckpt(tmp_path / "last.ckpt")
    cls = tmp_path / "cls.ckpt"
    torch.save({"state_dict": {"classifier.weight": torch.ones(40, 64)}}, cls)
    sha = hub.sha256_file(ckpt)
    entry = _official_entry(None, None, sha, ckpt.stat().st_size, status="not-located",
                            inputs={"classifier": {"filename": "cls/last.ckpt", "sha256": None, "size": None}})
    manifest.register_model("unlocated-test", entry)
    with pytest.raises(hub.ModelNotAvailableError, match="--input classifier=") as info:
        hub.resolve_model_dir("unlocated-test", cache_dir=cache)
    assert "--allow-unverified" in str(info.value)

    other, _ = _plain_ckpt(tmp_path / "other.ckpt", seed=9)
    with pytest.raises(hub.ChecksumError, match=sha):
        hub.import_checkpoint("unlocated-test", other, inputs={"classifier": cls}, cache_dir=cache)
    with pytest.raises(hub.ModelNotAvailableError, match="allow_unverified"):
        hub.import_checkpoint("unlocated-test", ckpt, inputs={"classifier": cls}, cache_dir=cache)
    with pytest.raises(ValueError, match="classifier"):
        hub.import_checkpoint("unlocated-test", ckpt, cache_dir=cache, allow_unverified=True)
    folder = hub.import_checkpoint("unlocated-test", ckpt, inputs={"classifier": cls}, cache_dir=cache,
                                   allow_unverified=True)
    assert torch.equal(load_file(str(folder / "model.safetensors"))["classifier.weight"], torch.ones(40, 64))
    # now the entry loads, offline, without requests
    assert hub.resolve_model_dir("unlocated-test", cache_dir=cache, local_files_only=True) == folder
    assert server.requests == []


def test_convert_on_first_load_with_the_diffae_converter(server, tmp_path, cache):
    """An official-layout Lightning .ckpt built from the parity fixture, converted by the real converter."""
    pytest.importorskip("semdiff.families.diffae.convert")
    from diffae_helpers import load_fixture, official_weights, write_lightning_checkpoint
    from semdiff.io import load_model_folder

    fixture = load_fixture("parity_tiny")
    ckpt = write_lightning_checkpoint(tmp_path / "last.ckpt", official_weights(fixture))
    data = ckpt.read_bytes()
    sha = hashlib.sha256(data).hexdigest()
    commit = server.add_files("official/diffae-tiny", {"ffhq/last.ckpt": data}, replace=True)
    manifest.register_model("diffae-tiny-test", _official_entry("official/diffae-tiny", commit, sha, len(data),
                                                                family="diffae", args={"image_size": 32}))
    folder = hub.resolve_model_dir("diffae-tiny-test", cache_dir=cache)
    assert folder.name == f"diffae-tiny-test-{sha[:16]}"
    model = load_model_folder(folder).eval()
    with torch.no_grad():
        z = model.encode(fixture["x0"])
    torch.testing.assert_close(z, fixture["z_sem"], atol=1e-5, rtol=0)
    server.clear_log()
    assert hub.resolve_model_dir("diffae-tiny-test", cache_dir=cache, local_files_only=True) == folder
    assert server.requests == []


# ---------------------------------------------------------------------------------------------------
# publishing


def test_model_card_and_push_then_load_by_hf_hub_name(server, tmp_path, cache):
    from huggingface_hub import ModelCard

    src = _model_folder(tmp_path / "mine", seed=6)
    config = json.loads((src / "config.json").read_text())
    card_path = hub.write_model_card(src, {**config, "description": "my model",
                                           "preprocessing": {"image_size": 32, "alignment": "none",
                                                             "range": [-1, 1]}},
                                     metrics={"fid": {"value": 12.5, "dataset": "openmoji"}, "mse": 0.01},
                                     repo_id="me/mine")
    card = ModelCard.load(card_path)
    assert card.data.library_name == "semdiff"
    assert "diffae" in card.data.tags and sorted(card.data.metrics) == ["fid", "mse"]
    assert card.data.eval_results[0].metric_value == 12.5
    assert "hf-hub:me/mine" in card.text and "| mse | 0.01 |" in card.text

    name = hub.push_folder_to_hub(src, "me/mine", token="hf_fake_token")
    commit = server.head("me/mine")
    assert name == f"hf-hub:me/mine@{commit}"
    assert server.log(method="POST", contains="/api/repos/create")
    assert server.log(method="POST", contains="/preupload/") and server.log(method="PUT", contains="/lfs-upload/")
    # someone else loads it
    folder = hub.resolve_model_dir(name, cache_dir=tmp_path / "someone-else")
    assert _same_files(folder, src) and (folder / "README.md").read_text() == card_path.read_text()
    # pushing again (repo exists) makes a new commit on the branch
    (src / "config.json").write_text(json.dumps({**config, "seed": 99}))
    name2 = hub.push_folder_to_hub(src, "me/mine", token="hf_fake_token", commit_message="v2")
    assert name2 != name and json.loads((hub.resolve_model_dir("hf-hub:me/mine", cache_dir=cache)
                                         / "config.json").read_text())["seed"] == 99


def test_save_and_push_through_the_public_api(server, tmp_path, cache):
    api = pytest.importorskip("semdiff.api")
    from semdiff.families.diffae import DiffAE

    model = api.SemanticAutoencoder(DiffAE(DiffAE.default_config(
        image_size=16, model_channels=8, channel_mult=[1, 2], enc_channel_mult=[1, 2, 2], attention_resolutions=[8],
        num_res_blocks=1, enc_num_res_blocks=1, z_dim=8, embed_channels=16)))
    folder = model.save_pretrained(tmp_path / "saved", metrics={"mse": 0.5})
    card = (folder / "README.md").read_text()
    assert "library_name: semdiff" in card and "| mse | 0.5 |" in card and hub.CARD_REPO_PLACEHOLDER in card
    name = model.push_to_hub("me/api-model", folder=folder, token="hf_fake_token")
    loaded = hub.resolve_model_dir(name, cache_dir=cache)
    assert _same_files(loaded, folder)
    # the uploaded card names the repo; the local one is unchanged
    assert "from_pretrained('hf-hub:me/api-model')" in (loaded / "README.md").read_text()
    assert (folder / "README.md").read_text() == card


# ---------------------------------------------------------------------------------------------------
# CLI


def test_cli_download_verify_list(server, tmp_path, cache, capsys):
    from semdiff.cli import main

    _, src = _publish(server, tmp_path, "org/tiny", "tiny-test")
    assert main(["verify", "tiny-test", "--cache-dir", str(cache)]) == 0
    assert "MISSING" in capsys.readouterr().out
    assert main(["download", "tiny-test", "--cache-dir", str(cache)]) == 0
    folder = Path(capsys.readouterr().out.strip())
    assert _same_files(folder, src)
    assert main(["list", "--json", "--cache-dir", str(cache)]) == 0
    rows = {r["name"]: r for r in json.loads(capsys.readouterr().out)}
    assert rows["tiny-test"]["cached"] == "cached" and rows["diffae-ffhq256"]["cached"] == "no"
    assert main(["verify", "tiny-test", "--cache-dir", str(cache)]) == 0
    assert capsys.readouterr().out.count("OK ") == 2
    blob = (folder / "model.safetensors").resolve()
    blob.write_bytes(b"\0" * blob.stat().st_size)
    assert main(["verify", "tiny-test", "--cache-dir", str(cache), "--json"]) == 1
    result = {r["file"]: r for r in json.loads(capsys.readouterr().out)}
    assert result["model.safetensors"]["status"] == "mismatch"
    assert result["model.safetensors"]["expected"] == _files_meta(src)["model.safetensors"]["sha256"]
    assert main(["download", "tiny-tset", "--cache-dir", str(cache)]) == 2
    assert "Did you mean 'tiny-test'" in capsys.readouterr().err
    assert main(["download", "diffae-ffhq256", "--cache-dir", str(cache)]) == 2
    assert "semdiff convert diffae" in capsys.readouterr().err
