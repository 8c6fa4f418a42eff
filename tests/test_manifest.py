"""The model-zoo manifest: schema, contents, name look-up, layering, CLI listing (no network)."""

from __future__ import annotations

import copy
import json

import pytest

from semdiff import manifest as m

OFFICIAL_FFHQ256_SHA = "9bd2ba9e4c22afde8f18958026a4e8e625ef67d2c3ee76bb3aa72f3e67d3b9ca"
OFFICIAL_FFHQ256_SIZE = 2_722_085_968


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    monkeypatch.delenv(m.MANIFEST_ENV, raising=False)
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    m.reload_manifest()
    yield
    m._registered.clear()
    m.reload_manifest()


def _hub_entry(**overrides):
    entry = {
        "family": "diffae",
        "description": "a test model",
        "status": "available",
        "source": {"type": "hub", "repo_id": "org/model", "revision": "a" * 40,
                   "files": {"config.json": {"sha256": "b" * 64, "size": 10},
                             "model.safetensors": {"sha256": "c" * 64, "size": 100}}},
        "license": "mit",
        "data_license": "CC-BY-4.0",
        "paper": None,
        "preprocessing": {"image_size": 32, "alignment": "none", "range": [-1, 1]},
        "defaults": {"encode_stochastic": 50, "decode": 20, "manipulate": 50, "prior": None},
    }
    entry.update(overrides)
    return entry


def test_packaged_manifest_is_valid_json_and_schema():
    raw = json.loads(m.MANIFEST_PATH.read_text())
    assert raw["schema_version"] == 1
    m.validate_manifest(raw)  # raises on any problem
    assert len(raw["models"]) >= 11


def test_every_entry_has_the_documented_fields():
    models = m.load_manifest()["models"]
    for name, e in models.items():
        assert m.validate_entry(name, e) == []
        for key in ("family", "description", "status", "source", "license", "data_license", "paper",
                    "preprocessing", "defaults"):
            assert key in e, (name, key)
        assert set(e["defaults"]) >= {"encode_stochastic", "decode", "manipulate", "prior"}
        if e.get("config", {}).get("image_size"):
            assert e["config"]["image_size"] == e["preprocessing"]["image_size"], name


def test_diffae_ffhq256_official_checkpoint_is_recorded_honestly():
    e = m.get_entry("diffae-ffhq256")
    src = e["source"]
    assert src["type"] == "official-checkpoint"
    assert src["sha256"] == OFFICIAL_FFHQ256_SHA
    assert src["size"] == OFFICIAL_FFHQ256_SIZE
    assert src["filename"] == "ffhq256_autoenc/last.ckpt"
    assert src["convert"] == {"family": "diffae", "args": {"image_size": 256}}
    # the third-party copy has a matching size but an unverified hash: listed as a candidate, not used
    assert e["status"] == "not-located" and src["repo_id"] is None and src["revision"] is None
    cand = {c["repo_id"]: c for c in src["candidates"]}
    assert cand["taocode/diffdub"]["filename"] == "assets/checkpoints/diffae_ffhq_last.ckpt"
    assert cand["taocode/diffdub"]["sha256_verified"] is False
    assert e["preprocessing"] == {"image_size": 256, "alignment": "ffhq",
                                  "resize": "bilinear resize of the short side, then center crop", "range": [-1, 1]}
    assert e["defaults"] == {"encode_stochastic": 250, "decode": 20, "manipulate": 100, "prior": None}
    assert e["config"]["num_parameters"] == 168_492_291
    assert e["paper"]["arxiv"] == "2111.15640"


def test_all_official_diffae_releases_are_listed():
    names = set(m.list_models(family="diffae"))
    assert {"diffae-ffhq256", "diffae-ffhq128-72m", "diffae-ffhq128-130m", "diffae-bedroom128", "diffae-horse128",
            "diffae-ffhq256-latent", "diffae-ffhq128-latent", "diffae-bedroom128-latent", "diffae-horse128-latent",
            "diffae-ffhq256-cls", "diffae-ffhq128-cls"} <= names
    for name in names:
        e = m.get_entry(name)
        if e["source"]["type"] == "official-checkpoint":
            assert e["status"] == "not-located", name  # nothing is pinned on the Hub yet
    assert m.get_entry("diffae-bedroom128-latent")["config"]["latent_prior"]["num_layers"] == 20
    assert m.get_entry("diffae-ffhq256-latent")["defaults"]["prior"] == 200
    cls = m.get_entry("diffae-ffhq256-cls")["source"]
    assert cls["sha256"] == OFFICIAL_FFHQ256_SHA  # the autoencoder it attaches to
    assert cls["inputs"]["classifier"] == {"filename": "ffhq256_autoenc_cls/last.ckpt", "sha256": None,
                                           "size": 339_862}


def test_get_entry_returns_a_copy():
    e = m.get_entry("diffae-ffhq256")
    e["status"] = "changed"
    assert m.get_entry("diffae-ffhq256")["status"] == "not-located"


@pytest.mark.parametrize("typo,best", [("diffae-ffhq265", "diffae-ffhq256"), ("Diffae-FFHQ256", "diffae-ffhq256"),
                                       ("diffae-horse", "diffae-horse128"), ("diffae-bedroom128-latnet",
                                                                             "diffae-bedroom128-latent")])
def test_unknown_name_suggests_closest(typo, best):
    with pytest.raises(m.UnknownModelError) as info:
        m.get_entry(typo)
    err = info.value
    assert isinstance(err, KeyError)
    assert err.suggestions[0] == best
    assert "did you mean" in str(err).lower() and repr(best) in str(err)
    assert not str(err).startswith('"')  # a readable message, not a KeyError repr


def test_unknown_name_without_close_match_lists_no_suggestion():
    with pytest.raises(m.UnknownModelError) as info:
        m.get_entry("zzzzzz")
    assert info.value.suggestions == []
    assert "semdiff list" in str(info.value)


@pytest.mark.parametrize("mutate,needle", [
    (lambda e: e.pop("license"), "missing required field 'license'"),
    (lambda e: e.update(status="maybe"), "status"),
    (lambda e: e["source"].update(revision="main"), "revision"),
    (lambda e: e["source"]["files"]["model.safetensors"].update(sha256="xyz"), "sha256"),
    (lambda e: e["source"]["files"]["model.safetensors"].update(size=-1), "size"),
    (lambda e: e["source"]["files"].update({"../evil": {"sha256": "d" * 64, "size": 1}}), "evil"),
    (lambda e: e.update(colour="blue"), "unknown field 'colour'"),
    (lambda e: e["source"].update(type="ftp"), "source.type"),
    (lambda e: e["preprocessing"].update(image_size="big"), "image_size"),
    (lambda e: e["defaults"].update(decode=0), "decode"),
    (lambda e: e.update(status="bundled"), "status 'bundled'"),
])
def test_schema_rejects_bad_entries(mutate, needle):
    entry = _hub_entry()
    assert m.validate_entry("test-model", entry) == []
    mutate(entry)
    problems = m.validate_entry("test-model", entry)
    assert problems and any(needle in p for p in problems), problems


def test_schema_rules_for_official_checkpoints():
    base = copy.deepcopy(m.get_entry("diffae-ffhq256"))
    available = copy.deepcopy(base)
    available["status"] = "available"
    problems = m.validate_entry("x", available)
    assert any("source.repo_id" in p for p in problems) and any("source.revision" in p for p in problems)
    located = copy.deepcopy(base)
    located["source"].update(repo_id="org/ckpt", revision="e" * 40)
    assert any("set status to 'available'" in p for p in m.validate_entry("x", located))
    located["status"] = "available"
    assert m.validate_entry("x", located) == []


def test_bad_names_are_rejected():
    assert m.validate_entry("Has Space", _hub_entry())
    assert m.validate_entry("hf-hub:org/x", _hub_entry())


def test_validate_manifest_reports_every_problem():
    doc = {"schema_version": 2, "models": {"a": _hub_entry(status="nope"), "b": _hub_entry(license=3)}}
    with pytest.raises(m.ManifestError) as info:
        m.validate_manifest(doc)
    text = str(info.value)
    assert "schema_version" in text and "models['a']" in text and "models['b']" in text
    assert isinstance(info.value, ValueError)


def test_extra_manifest_from_environment(tmp_path, monkeypatch):
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"schema_version": 1, "models": {"my-model": _hub_entry()}}))
    monkeypatch.setenv(m.MANIFEST_ENV, str(extra))
    m.reload_manifest()
    assert m.get_entry("my-model")["source"]["repo_id"] == "org/model"
    assert "diffae-ffhq256" in m.list_models()  # layered over the packaged one
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"schema_version": 1, "models": {"my-model": _hub_entry(status="??")}}))
    monkeypatch.setenv(m.MANIFEST_ENV, str(bad))
    m.reload_manifest()
    with pytest.raises(m.ManifestError, match="bad.json"):
        m.load_manifest()


def test_register_model_validates_and_refuses_duplicates():
    m.register_model("runtime-model", _hub_entry())
    assert m.get_entry("runtime-model")["description"] == "a test model"
    with pytest.raises(m.ManifestError, match="already"):
        m.register_model("runtime-model", _hub_entry())
    m.register_model("runtime-model", _hub_entry(description="v2"), overwrite=True)
    assert m.get_entry("runtime-model")["description"] == "v2"
    with pytest.raises(m.ManifestError):
        m.register_model("broken", _hub_entry(status="x"))
    m.unregister_model("runtime-model")
    with pytest.raises(m.UnknownModelError):
        m.get_entry("runtime-model")


def test_default_model_is_the_manifest_default_or_first_bundled(tmp_path, monkeypatch):
    bundled = _hub_entry(status="bundled", source={"type": "bundled", "path": "pretrained/x",
                                                   "files": {"config.json": {"sha256": "b" * 64, "size": 1}}})
    extra = tmp_path / "extra.json"
    extra.write_text(json.dumps({"schema_version": 1, "models": {"zz-bundled": bundled, "aa-bundled": bundled}}))
    monkeypatch.setenv(m.MANIFEST_ENV, str(extra))
    m.reload_manifest()
    # the packaged manifest names its default, which an extra manifest without one leaves in place
    assert m.default_model_name() == m.load_manifest()["default"] == "semdiff-emoji32-diffae"
    extra.write_text(json.dumps({"schema_version": 1, "default": "zz-bundled",
                                 "models": {"zz-bundled": bundled, "aa-bundled": bundled}}))
    m.reload_manifest()
    assert m.default_model_name() == "zz-bundled"


def test_cli_list_and_info(capsys):
    from semdiff.cli import main

    assert main(["list"]) == 0
    out = capsys.readouterr().out
    assert "diffae-ffhq256" in out and "CACHED" in out and "not-located" in out
    assert main(["list", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    row = next(r for r in rows if r["name"] == "diffae-ffhq256")
    assert row["cached"] == "no" and row["size"] == OFFICIAL_FFHQ256_SIZE and row["status"] == "not-located"
    assert main(["info", "diffae-ffhq256"]) == 0
    out = capsys.readouterr().out
    assert OFFICIAL_FFHQ256_SHA in out and "2,722,085,968" in out and "taocode/diffdub" not in out.split("note")[0]
    assert main(["info", "diffae-ffhq256", "--json"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert info["cache"] == "no" and "semdiff convert diffae" in info["how_to_get"]
    assert main(["info", "diffae-ffhq265"]) == 2
    err = capsys.readouterr().err
    assert "Did you mean 'diffae-ffhq256'" in err
