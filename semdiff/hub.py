"""The model zoo: name resolution, pinned downloads, sha256 verification, convert-on-first-load, publishing.

A model is named in one of three ways (like timm / open_clip):

- a manifest name (``semdiff list``), e.g. ``"diffae-ffhq256"``;
- ``"hf-hub:org/repo"``, ``"hf-hub:org/repo@revision"`` or ``"hf-hub:org/repo/subfolder@revision"``:
  any Hub repo holding a semdiff model folder, no manifest entry needed;
- the path of a local model folder (``config.json`` + ``model.safetensors``).

Downloads go through ``huggingface_hub`` (``library_name="semdiff"``) into the standard Hugging Face
cache (``HF_HOME`` / ``HF_HUB_CACHE`` or ``cache_dir=``). The endpoint is ``HF_ENDPOINT`` read at call
time (or ``endpoint=``). Manifest entries are pinned to a commit, so a cached model loads with zero
requests; ``HF_HUB_OFFLINE=1`` or ``local_files_only=True`` never makes a request.

The download client only checks sizes. semdiff checks the sha256 of every file the manifest lists
(streamed in 1 MiB chunks) each time a model is resolved; for ``hf-hub:`` names it checks the hashes
the server's tree listing gives (LFS sha256, git blob sha1) when the listing is in the cache, and skips
the check otherwise. On a mismatch the bad cached file is deleted, reported (:class:`ChecksumWarning`
with the expected and actual hash) and downloaded once more; if it is still wrong,
:class:`ChecksumError` is raised. A bad file is never returned.

Official checkpoints (``source.type == "official-checkpoint"``) are downloaded once, hash-checked,
converted by the family's converter (named by the manifest, dispatched through :data:`CONVERTERS`) and
cached as a model folder under ``<hub cache>/semdiff-converted/<name>-<sha256[:16]>/``; later loads use
that folder only. A checkpoint you downloaded yourself can be imported with :func:`import_checkpoint`.
"""

from __future__ import annotations

import dataclasses
import hashlib
import importlib
import json
import logging
import os
import re
import shutil
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterable, Mapping

from semdiff.manifest import (
    ManifestError,
    UnknownModelError,
    ZooError,
    get_entry,
    list_models,
    load_manifest,
    suggest_names,
)

__all__ = [
    "CONVERTERS",
    "ChecksumError",
    "ChecksumWarning",
    "DownloadError",
    "ModelNotAvailableError",
    "ModelNotCachedError",
    "ModelSpec",
    "RemoteNotFoundError",
    "UnknownModelError",
    "ZooError",
    "cache_status",
    "converted_dir",
    "download",
    "get_converter",
    "hub_cache_dir",
    "import_checkpoint",
    "is_offline",
    "parse_model_name",
    "push_folder_to_hub",
    "register_converter",
    "resolve_model_dir",
    "sha256_file",
    "verify",
    "write_model_card",
]

logger = logging.getLogger(__name__)

LIBRARY_NAME = "semdiff"
HF_HUB_PREFIX = "hf-hub:"
CONVERTED_DIRNAME = "semdiff-converted"
CONVERSION_RECORD = "semdiff_conversion.json"
MODEL_FILES = ("config.json", "model.safetensors")
HUB_ALLOW_PATTERNS = ("*.json", "*.safetensors", "*.md", "*.txt")
CARD_REPO_PLACEHOLDER = "hf-hub:<org>/<repo>"  # filled in by push_folder_to_hub
CHUNK_SIZE = 1 << 20
_HEX40 = re.compile(r"^[0-9a-f]{40}$")
_HEX64 = re.compile(r"^[0-9a-f]{64}$")
_REPO_ID = re.compile(r"^[\w.-]+/[\w.-]+$")


# --------------------------------------------------------------------------------------------------
# errors


class ModelNotAvailableError(ZooError, FileNotFoundError):
    """The model's files are not located (manifest status ``not-located``) or the folder is not a model."""


class ModelNotCachedError(ZooError, FileNotFoundError):
    """Downloads are off (offline mode / no network) and the model is not in the cache."""


class RemoteNotFoundError(ZooError, FileNotFoundError):
    """The Hub has no such repo, revision or file. ``kind`` is ``"repo"``, ``"revision"`` or ``"file"``."""

    def __init__(self, message: str, *, kind: str):
        super().__init__(message)
        self.kind = kind


class DownloadError(ZooError, OSError):
    """A transfer failed (e.g. truncated) twice in a row; nothing was cached."""


class ChecksumError(ZooError, OSError):
    """A file's sha256 (or size) differs from the expected one, also after fetching it again once."""

    def __init__(self, file: str, expected: str | None, actual: str | None, *, expected_size: int | None = None,
                 actual_size: int | None = None, algorithm: str = "sha256", detail: str = ""):
        self.file, self.expected, self.actual = file, expected, actual
        self.expected_size, self.actual_size, self.algorithm = expected_size, actual_size, algorithm
        msg = f"{algorithm} mismatch for {file}: expected {expected}, actual {actual}"
        if expected_size is not None and actual_size is not None and expected_size != actual_size:
            msg += f" (expected {expected_size:,} bytes, got {actual_size:,})"
        super().__init__(msg + (f". {detail}" if detail else ""))


class ChecksumWarning(UserWarning):
    """A cached or downloaded file failed its hash check and is being fetched again."""


# --------------------------------------------------------------------------------------------------
# environment (read at call time, not at import)


def _truthy(value: str | None) -> bool:
    return (value or "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def is_offline(local_files_only: bool | None = None) -> bool:
    """True when no request may be made: ``local_files_only=True`` or ``HF_HUB_OFFLINE`` is set."""
    if local_files_only:
        return True
    if _truthy(os.environ.get("HF_HUB_OFFLINE")) or _truthy(os.environ.get("TRANSFORMERS_OFFLINE")):
        return True
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE)


def _endpoint(endpoint: str | None = None) -> str:
    if endpoint:
        return endpoint.rstrip("/")
    if os.environ.get("HF_ENDPOINT"):
        return os.environ["HF_ENDPOINT"].rstrip("/")
    from huggingface_hub import constants

    return constants.ENDPOINT.rstrip("/")


def hub_cache_dir(cache_dir: str | os.PathLike | None = None) -> Path:
    """The Hugging Face hub cache in use: ``cache_dir``, else ``$HF_HUB_CACHE``, else ``$HF_HOME/hub``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get("HF_HUB_CACHE"):
        return Path(os.environ["HF_HUB_CACHE"]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE)


def _library_version() -> str:
    try:
        import semdiff

        version = getattr(semdiff, "__version__", None)
        if version:
            return str(version)
    except Exception:  # pragma: no cover - the package is always importable here
        pass
    try:
        from importlib.metadata import version as _v

        return _v("semdiff")
    except Exception:
        return "0+unknown"


# --------------------------------------------------------------------------------------------------
# hashing


def sha256_file(path: str | os.PathLike, chunk_size: int = CHUNK_SIZE) -> str:
    """The sha256 of a file, read in chunks (never the whole file in memory)."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


def _git_blob_sha1(path: str | os.PathLike, chunk_size: int = CHUNK_SIZE) -> str:
    h = hashlib.sha1()
    h.update(b"blob %d\0" % os.path.getsize(path))
    with open(path, "rb") as f:
        while block := f.read(chunk_size):
            h.update(block)
    return h.hexdigest()


@dataclass
class _Check:
    ok: bool
    actual: str | None
    actual_size: int | None


def _check_file(path: Path, sha256: str | None, size: int | None, *, algorithm: str = "sha256") -> _Check:
    if not path.exists():
        return _Check(False, None, None)
    actual_size = path.stat().st_size
    if size is not None and actual_size != size:  # cheap check first; still report the real hash
        return _Check(False, sha256_file(path) if algorithm == "sha256" else _git_blob_sha1(path), actual_size)
    if sha256 is None:
        return _Check(True, None, actual_size)
    actual = sha256_file(path) if algorithm == "sha256" else _git_blob_sha1(path)
    return _Check(actual == sha256, actual, actual_size)


def _evict(path: Path) -> None:
    """Delete a cached snapshot file and the blob it points to (so the client fetches it again)."""
    blob = None
    try:
        if path.is_symlink():
            blob = path.resolve()
    except OSError:
        blob = None
    path.unlink(missing_ok=True)
    if blob is not None and blob != path:
        blob.unlink(missing_ok=True)


# --------------------------------------------------------------------------------------------------
# names


@dataclass(frozen=True)
class ModelSpec:
    """A parsed model name: ``kind`` is ``"manifest"``, ``"hf-hub"`` or ``"local"``."""

    kind: str
    name: str
    repo_id: str | None = None
    revision: str | None = None
    subfolder: str | None = None
    path: Path | None = None


def parse_model_name(name_or_path: str | os.PathLike) -> ModelSpec:
    """Classify a model name: manifest name, ``hf-hub:org/repo[/subfolder][@revision]``, or local folder.

    Raises :class:`UnknownModelError` (a ``KeyError``) with the closest manifest names otherwise.
    """
    if isinstance(name_or_path, os.PathLike):
        path = Path(name_or_path).expanduser()
        if not path.is_dir():
            raise UnknownModelError(f"Model folder {str(path)!r} does not exist.", name=str(path))
        return ModelSpec("local", str(path), path=path)
    name = str(name_or_path).strip()
    if name.startswith(HF_HUB_PREFIX):
        rest = name[len(HF_HUB_PREFIX):].strip().strip("/")
        revision = None
        if "@" in rest:
            rest, revision = rest.rsplit("@", 1)
            if not revision:
                raise ValueError(f"{name!r}: empty revision after '@'")
        parts = [p for p in rest.split("/") if p]
        if len(parts) < 2 or not _REPO_ID.match("/".join(parts[:2])):
            raise ValueError(f"{name!r} is not a valid Hub name; expected 'hf-hub:org/repo[@revision]'")
        return ModelSpec("hf-hub", name, repo_id="/".join(parts[:2]), revision=revision,
                         subfolder="/".join(parts[2:]) or None)
    if name in load_manifest()["models"]:
        return ModelSpec("manifest", name)
    path = Path(name).expanduser()
    if path.is_dir():
        return ModelSpec("local", name, path=path)
    try:
        get_entry(name)
    except UnknownModelError as err:
        if os.sep in name or name.startswith((".", "~")) or (os.altsep and os.altsep in name):
            hint = ""
            if _REPO_ID.match(name):
                hint = f" For the Hub repo write 'hf-hub:{name}'."
            raise UnknownModelError(f"{err} (No folder {name!r} exists either.){hint}", name=name,
                                    suggestions=err.suggestions) from None
        raise
    raise AssertionError("unreachable")  # pragma: no cover


# --------------------------------------------------------------------------------------------------
# downloads


@dataclass
class _Opts:
    cache_dir: Path
    offline: bool
    force_download: bool
    endpoint: str
    token: str | bool | None
    label: str  # what the user asked for, for messages


def _how_to_fetch(label: str) -> str:
    return (f"Fetch it once while online with `semdiff download {label}` (or call from_pretrained without "
            "HF_HUB_OFFLINE=1 / local_files_only=True); it then loads offline from the cache.")


def _translate(err: Exception, *, repo_id: str, filename: str | None, revision: str, opts: _Opts) -> Exception:
    """Map huggingface_hub errors to semdiff's (clear messages, no misleading 'check your connection')."""
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    where = f"{repo_id}@{revision}" + (f" file {filename!r}" if filename else "")
    if isinstance(err, RevisionNotFoundError):
        return RemoteNotFoundError(
            f"Revision {revision!r} of {repo_id} does not exist on {opts.endpoint} (asked for {opts.label!r}). "
            "If the manifest pins it, the pin is wrong or the commit was removed.", kind="revision")
    if isinstance(err, RepositoryNotFoundError):
        return RemoteNotFoundError(
            f"Repository {repo_id} not found on {opts.endpoint} (asked for {opts.label!r}); it may be private "
            "(log in with `hf auth login`) or the name may be wrong.", kind="repo")
    if isinstance(err, LocalEntryNotFoundError) or isinstance(err, OfflineModeIsEnabled):
        if opts.offline:
            return ModelNotCachedError(
                f"{opts.label!r} ({where}) is not in the cache {opts.cache_dir} and downloads are disabled "
                f"(HF_HUB_OFFLINE=1 or local_files_only=True). {_how_to_fetch(opts.label)}")
        cause = err.__cause__ or err
        return ModelNotCachedError(
            f"Could not reach the Hub at {opts.endpoint} to download {opts.label!r} ({where}): "
            f"{type(cause).__name__}: {cause}. It is not in the cache {opts.cache_dir}. {_how_to_fetch(opts.label)}")
    if isinstance(err, EntryNotFoundError):
        return RemoteNotFoundError(f"{where} does not exist on {opts.endpoint} (asked for {opts.label!r}).",
                                   kind="file")
    return DownloadError(f"Downloading {where} from {opts.endpoint} failed: {type(err).__name__}: {err}")


def _hf_download(repo_id: str, filename: str, revision: str, opts: _Opts, *, force: bool = False) -> Path:
    """``hf_hub_download`` with semdiff's defaults; a failed transfer (truncated, reset) is retried once."""
    import httpx2
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    force = (force or opts.force_download) and not opts.offline
    last: Exception | None = None
    for attempt in range(2):
        try:
            path = hf_hub_download(
                repo_id, filename, revision=revision, cache_dir=str(opts.cache_dir),
                local_files_only=opts.offline, force_download=force, endpoint=opts.endpoint, token=opts.token,
                library_name=LIBRARY_NAME, library_version=_library_version())
            return Path(path)
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, LocalEntryNotFoundError,
                OfflineModeIsEnabled) as err:
            raise _translate(err, repo_id=repo_id, filename=filename, revision=revision, opts=opts) from err
        except (OSError, ValueError, httpx2.HTTPError) as err:  # truncated / reset transfer, server error
            last = err
            logger.warning("download of %s@%s %s failed (%s: %s)%s", repo_id, revision, filename,
                           type(err).__name__, err, "; trying once more" if attempt == 0 else "")
            force = True
    raise DownloadError(
        f"Downloading {filename!r} of {repo_id}@{revision} from {opts.endpoint} failed twice "
        f"(last error: {type(last).__name__}: {last}). Nothing was cached; check the connection and retry."
    ) from last


def _fetch_verified(repo_id: str, filename: str, revision: str, opts: _Opts, *, sha256: str | None,
                    size: int | None, algorithm: str = "sha256") -> Path:
    """Download (or find in the cache) one file and check its hash; on mismatch evict and fetch once more."""
    path = _hf_download(repo_id, filename, revision, opts)
    if sha256 is None and size is None:
        return path
    check = _check_file(path, sha256, size, algorithm=algorithm)
    if check.ok:
        return path
    label = f"{filename!r} of {repo_id}@{revision[:12]}"
    _evict(path)
    if opts.offline:
        raise ChecksumError(label, sha256, check.actual, expected_size=size, actual_size=check.actual_size,
                            algorithm=algorithm,
                            detail="The corrupted cached copy was deleted and not loaded; downloads are disabled, so "
                                   f"it was not fetched again. {_how_to_fetch(opts.label)}")
    warnings.warn(f"{algorithm} mismatch for {label}: expected {sha256}, actual {check.actual}"
                  f" (size {check.actual_size}, expected {size}); deleted it, downloading it again",
                  ChecksumWarning, stacklevel=3)
    path = _hf_download(repo_id, filename, revision, opts, force=True)
    check = _check_file(path, sha256, size, algorithm=algorithm)
    if check.ok:
        return path
    _evict(path)
    raise ChecksumError(label, sha256, check.actual, expected_size=size, actual_size=check.actual_size,
                        algorithm=algorithm,
                        detail=f"It was downloaded again once from {opts.endpoint} and is still wrong; the file was "
                               "deleted from the cache and not loaded. The server's copy differs from the one "
                               "the manifest pins (tampered, corrupted, or a wrong manifest hash).")


def _check_model_folder(folder: Path, label: str, *, listing: Iterable[str] | None = None) -> Path:
    missing = [f for f in MODEL_FILES if not (folder / f).is_file()]
    if missing:
        files = sorted(listing) if listing is not None else (
            sorted(p.name for p in folder.iterdir()) if folder.is_dir() else [])
        ckpts = [f for f in files if f.endswith((".ckpt", ".pt", ".pth", ".bin"))]
        hint = (f" It holds {', '.join(ckpts)}: if that is an official checkpoint, convert it with "
                "`semdiff convert <family> CHECKPOINT OUT_DIR` and load OUT_DIR.") if ckpts else ""
        raise ModelNotAvailableError(
            f"{label!r} is not a semdiff model folder: missing {', '.join(missing)} in {folder} "
            f"(files: {', '.join(files) or 'none'}).{hint}")
    return folder


# --------------------------------------------------------------------------------------------------
# source types


def _resolve_hub_entry(name: str, entry: dict, opts: _Opts) -> Path:
    src = entry["source"]
    repo_id, revision, sub = src["repo_id"], src["revision"], src.get("subfolder")
    folder: Path | None = None
    for rel, meta in src["files"].items():
        in_repo = f"{sub}/{rel}" if sub else rel
        path = _fetch_verified(repo_id, in_repo, revision, opts, sha256=meta["sha256"], size=meta["size"])
        if folder is None:
            folder = path
            for _ in rel.split("/"):
                folder = folder.parent
    assert folder is not None
    return _check_model_folder(folder, name)


def _resolve_bundled(name: str, entry: dict, opts: _Opts) -> Path:
    src = entry["source"]
    folder = Path(__file__).parent / src["path"]
    for rel, meta in src["files"].items():
        path = folder / rel
        if not path.is_file():
            raise ModelNotAvailableError(
                f"Bundled model {name!r} is missing {rel} in {folder}; reinstall semdiff "
                "(`pip install --force-reinstall semdiff`).")
        check = _check_file(path, meta["sha256"], meta["size"])
        if not check.ok:
            raise ChecksumError(f"{rel!r} of bundled model {name!r} ({path})", meta["sha256"], check.actual,
                                expected_size=meta["size"], actual_size=check.actual_size,
                                detail="The installed package is corrupted; reinstall semdiff.")
    return _check_model_folder(folder, name)


def _official_files(src: dict) -> dict[str, dict]:
    """The files an official-checkpoint entry converts: ``{"checkpoint": spec, <converter arg>: spec, ...}``,
    each spec ``{"repo_id", "revision", "filename", "sha256", "size"}``."""
    files = {"checkpoint": {k: src.get(k) for k in ("repo_id", "revision", "filename", "sha256", "size")}}
    for arg, spec in src.get("inputs", {}).items():
        files[arg] = {"repo_id": spec.get("repo_id") or src.get("repo_id"),
                      "revision": spec.get("revision") or src.get("revision"),
                      "filename": spec["filename"], "sha256": spec.get("sha256"), "size": spec.get("size")}
    return files


def _conversion_key(shas: Mapping[str, str | None]) -> str | None:
    """The sha256 that names a conversion: the checkpoint's, or one over all inputs' hashes."""
    if any(v is None for v in shas.values()):
        return None
    if list(shas) == ["checkpoint"]:
        return shas["checkpoint"]
    return hashlib.sha256("\n".join(f"{k}={shas[k]}" for k in sorted(shas)).encode()).hexdigest()


def _is_located(src: dict) -> bool:
    return all(f["repo_id"] and f["revision"] and f["sha256"] for f in _official_files(src).values())


def _not_located_message(name: str, entry: dict) -> str:
    src = entry["source"]
    files = _official_files(src)
    fam = src["convert"]["family"]

    def known(f):
        sha, size = f.get("sha256"), f.get("size")
        return (f"sha256 {sha}, {size:,} bytes" if sha and size else f"sha256 {sha}" if sha else
                f"{size:,} bytes, sha256 not recorded" if size else "sha256 and size not recorded")

    lines = [
        f"Model {name!r} is listed but its weights are not located: no verified copy of the official checkpoint "
        + " + ".join(f"{f['filename']!r} ({known(f)})" for f in files.values())
        + " is pinned on the Hugging Face Hub, so it cannot be downloaded automatically.",
    ]
    if src.get("official_location"):
        lines.append(f"Official source: {src['official_location']}.")
    cands = [c for c in src.get("candidates", []) if c.get("repo_id")]
    if cands:
        lines.append("Unverified third-party copies (not used): " + "; ".join(
            f"{c['repo_id']}" + (f"/{c['filename']}" if c.get("filename") else "") for c in cands) + ".")
    extra = "".join(f" --input {arg}=PATH/TO/{f['filename']}" for arg, f in files.items() if arg != "checkpoint")
    flag = "" if all(f["sha256"] for f in files.values()) else " --allow-unverified"
    conv_extra = "".join(f" --{arg.replace('_', '-')} PATH/TO/{f['filename']}" for arg, f in files.items()
                         if arg != "checkpoint")
    lines.append(
        f"To use it: download the file(s) yourself, then either `semdiff download {name} --checkpoint "
        f"PATH/TO/{files['checkpoint']['filename']}{extra}{flag}` (checks the hash, converts and caches it; "
        f"`from_pretrained({name!r})` then works offline), or `semdiff convert {fam} "
        f"PATH/TO/{files['checkpoint']['filename']} OUT_DIR{conv_extra}` and load OUT_DIR.")
    return " ".join(lines)


def converted_dir(name: str, sha256: str, cache_dir: str | os.PathLike | None = None) -> Path:
    """Where the converted model folder of a checkpoint with this sha256 is cached."""
    return hub_cache_dir(cache_dir) / CONVERTED_DIRNAME / f"{name}-{sha256[:16]}"


def _read_record(folder: Path) -> dict | None:
    try:
        with open(folder / CONVERSION_RECORD, encoding="utf-8") as f:
            record = json.load(f)
        return record if isinstance(record, dict) else None
    except (OSError, ValueError):
        return None


def _converted_ok(folder: Path, name: str, src: dict, *, warn: bool = True) -> bool:
    """A converted folder is used only if its record matches the entry and every file's hash matches."""
    if not folder.is_dir():
        return False
    record = _read_record(folder)
    if record is None or record.get("name") != name:
        return False
    recorded = record.get("inputs", {})
    for arg, spec in _official_files(src).items():
        if arg not in recorded or (spec["sha256"] and recorded[arg].get("sha256") != spec["sha256"]):
            return False
    conv = record.get("converter", {})
    if conv.get("family") != src["convert"]["family"] or conv.get("args", {}) != src["convert"].get("args", {}):
        return False
    for rel, meta in record.get("files", {}).items():
        check = _check_file(folder / rel, meta.get("sha256"), meta.get("size"))
        if not check.ok:
            if warn:
                warnings.warn(f"sha256 mismatch for converted file {folder / rel}: expected {meta.get('sha256')}, "
                              f"actual {check.actual}; converting the checkpoint again", ChecksumWarning, stacklevel=4)
            return False
    return all((folder / f).is_file() for f in MODEL_FILES)


def _find_converted(name: str, src: dict, cache: Path) -> Path | None:
    key = _conversion_key({a: f["sha256"] for a, f in _official_files(src).items()})
    if key is not None:
        folder = converted_dir(name, key, cache)
        return folder if _converted_ok(folder, name, src) else None
    root = cache / CONVERTED_DIRNAME
    candidates = sorted((p for p in root.glob(f"{name}-*") if (_read_record(p) or {}).get("name") == name),
                        key=lambda p: p.stat().st_mtime, reverse=True)
    return next((p for p in candidates if _converted_ok(p, name, src)), None)


# converters: family -> "module:function" or a callable; a manifest entry may name its own ("function")
CONVERTERS: dict[str, str | Callable[..., Any]] = {
    "diffae": "semdiff.families.diffae.convert:convert_diffae_checkpoint",
}


def register_converter(family: str, converter: str | Callable[..., Any]) -> None:
    """Register the checkpoint converter of a family: a callable or ``"module:function"``.

    It is called as ``converter(checkpoint_path, out_dir, **args, **{input_name: path})`` and writes
    ``config.json`` + ``model.safetensors`` into ``out_dir``. Unregistered families fall back to
    ``semdiff.families.<family>.convert:convert_<family>_checkpoint``.
    """
    CONVERTERS[family] = converter


def get_converter(family: str, function: str | None = None) -> Callable[..., Any]:
    """The converter for ``family`` (or the explicit ``"module:function"``), imported lazily."""
    spec = function or CONVERTERS.get(family) or f"semdiff.families.{family}.convert:convert_{family}_checkpoint"
    if callable(spec):
        return spec
    module_name, _, attr = spec.partition(":")
    try:
        module = importlib.import_module(module_name)
    except ModuleNotFoundError as err:
        raise ModelNotAvailableError(
            f"No checkpoint converter for family {family!r}: cannot import {module_name} ({err}).") from err
    try:
        return getattr(module, attr)
    except AttributeError:
        raise ModelNotAvailableError(f"No checkpoint converter {spec!r} for family {family!r}.") from None


def _convert_into_cache(name: str, src: dict, paths: Mapping[str, Path], shas: Mapping[str, str], cache: Path,
                        *, verified: bool) -> Path:
    """Convert into ``<cache>/semdiff-converted/<name>-<key[:16]>`` atomically (temp folder, then rename)."""
    conv = src["convert"]
    converter = get_converter(conv["family"], conv.get("function"))
    key = _conversion_key(shas)
    target = converted_dir(name, key, cache)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-{target.name}-", dir=target.parent))
    files_spec = _official_files(src)
    try:
        logger.info("converting %s into %s", paths["checkpoint"], target)
        extra = {arg: p for arg, p in paths.items() if arg != "checkpoint"}
        converter(paths["checkpoint"], tmp, **conv.get("args", {}), **extra)
        _check_model_folder(tmp, name)
        files = {}
        for p in sorted(tmp.rglob("*")):
            if p.is_file():
                files[p.relative_to(tmp).as_posix()] = {"sha256": sha256_file(p), "size": p.stat().st_size}
        function = conv.get("function") or CONVERTERS.get(conv["family"])
        record = {
            "format": 1,
            "name": name,
            "inputs": {arg: {"repo_id": files_spec[arg]["repo_id"], "revision": files_spec[arg]["revision"],
                             "filename": files_spec[arg]["filename"], "sha256": shas[arg],
                             "size": Path(paths[arg]).stat().st_size} for arg in paths},
            "verified_against_manifest": verified,
            "converter": {"family": conv["family"], "args": conv.get("args", {}),
                          "function": function if isinstance(function, str) else getattr(function, "__qualname__",
                                                                                          None)},
            "semdiff_version": _library_version(),
            "converted_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
            "files": files,
        }
        with open(tmp / CONVERSION_RECORD, "w", encoding="utf-8") as f:
            json.dump(record, f, indent=2)
        if target.exists():
            shutil.rmtree(target)
        try:
            os.rename(tmp, target)
        except OSError:
            if _converted_ok(target, name, src, warn=False):  # another process finished first
                shutil.rmtree(tmp, ignore_errors=True)
            else:
                raise
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target


def _resolve_official(name: str, entry: dict, opts: _Opts) -> Path:
    src = entry["source"]
    if not opts.force_download:
        found = _find_converted(name, src, opts.cache_dir)
        if found is not None:
            return found  # never touches the checkpoint again
    if entry["status"] == "not-located" or not _is_located(src):
        raise ModelNotAvailableError(_not_located_message(name, entry))
    paths, shas = {}, {}
    for arg, f in _official_files(src).items():
        paths[arg] = _fetch_verified(f["repo_id"], f["filename"], f["revision"], opts, sha256=f["sha256"],
                                     size=f["size"])
        shas[arg] = f["sha256"]
    return _convert_into_cache(name, src, paths, shas, opts.cache_dir, verified=True)


SOURCE_RESOLVERS: dict[str, Callable[[str, dict, _Opts], Path]] = {
    "hub": _resolve_hub_entry,
    "bundled": _resolve_bundled,
    "official-checkpoint": _resolve_official,
}


# --------------------------------------------------------------------------------------------------
# hf-hub: names


def _storage_folder(cache: Path, repo_id: str) -> Path:
    return cache / ("models--" + repo_id.replace("/", "--"))


def _tree_listing(cache: Path, repo_id: str, commit: str) -> dict[str, dict] | None:
    """The server's tree listing of ``commit`` as cached by ``snapshot_download`` (no request)."""
    try:
        with open(_storage_folder(cache, repo_id) / "trees" / f"{commit}.json", encoding="utf-8") as f:
            data = json.load(f)
        files = data.get("files")
        return files if isinstance(files, dict) else None
    except (OSError, ValueError):
        return None


def _expected_hash(path: Path, tree_entry: dict | None) -> tuple[str | None, str]:
    """(expected hash, algorithm) of a snapshot file from the tree listing, else from its LFS etag."""
    etag = path.resolve().name if path.is_symlink() else None
    if tree_entry is not None:
        if tree_entry.get("lfs_sha256"):
            return tree_entry["lfs_sha256"], "sha256"
        blob_id = tree_entry.get("blob_id")
        # a plain git blob: its oid is the sha1 of the content (only trusted when the etag agrees, since a
        # listing without LFS info gives the oid of the LFS pointer for large files)
        if blob_id and _HEX40.match(blob_id) and etag == blob_id:
            return blob_id, "git-sha1"
    if etag and _HEX64.match(etag):  # the Hub's X-Linked-Etag of an LFS file is its sha256
        return etag, "sha256"
    return None, "sha256"


def _snapshot(repo_id: str, revision: str, opts: _Opts, patterns: list[str]) -> Path:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (
        EntryNotFoundError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
        RevisionNotFoundError,
    )

    import httpx2

    last: Exception | None = None
    for attempt in range(2):  # a failed transfer (truncated, reset) is retried once; finished files are kept
        try:
            return Path(snapshot_download(
                repo_id, revision=revision, cache_dir=str(opts.cache_dir), local_files_only=opts.offline,
                force_download=opts.force_download and not opts.offline and attempt == 0,
                allow_patterns=patterns, endpoint=opts.endpoint, token=opts.token, library_name=LIBRARY_NAME,
                library_version=_library_version()))
        except (RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError, LocalEntryNotFoundError,
                OfflineModeIsEnabled) as err:
            raise _translate(err, repo_id=repo_id, filename=None, revision=revision, opts=opts) from err
        except (OSError, ValueError, httpx2.HTTPError) as err:
            last = err
            logger.warning("download of %s@%s failed (%s: %s)%s", repo_id, revision, type(err).__name__, err,
                           "; trying once more" if attempt == 0 else "")
    raise DownloadError(
        f"Downloading {repo_id}@{revision} from {opts.endpoint} failed twice (last error: {type(last).__name__}: "
        f"{last}). Incomplete files were not cached; check the connection and retry.") from last


def _resolve_hf_hub(spec: ModelSpec, revision: str | None, opts: _Opts) -> Path:
    if spec.revision and revision and spec.revision != revision:
        raise ValueError(f"{spec.name!r} names revision {spec.revision!r} but revision={revision!r} was passed")
    revision = spec.revision or revision or "main"
    sub = spec.subfolder
    patterns = [f"{sub}/{p}" for p in HUB_ALLOW_PATTERNS] if sub else list(HUB_ALLOW_PATTERNS)
    snap = _snapshot(spec.repo_id, revision, opts, patterns)
    commit = snap.name
    opts = dataclasses.replace(opts, force_download=False)  # already (re)downloaded by the snapshot
    tree = _tree_listing(opts.cache_dir, spec.repo_id, commit)
    folder = snap / sub if sub else snap
    if folder.is_dir():
        for path in sorted(p for p in folder.rglob("*") if p.is_file() or p.is_symlink()):
            rel = path.relative_to(snap).as_posix()
            expected, algo = _expected_hash(path, tree.get(rel) if tree else None)
            if expected is None:
                continue
            _fetch_verified(spec.repo_id, rel, commit, opts, sha256=expected,
                            size=(tree or {}).get(rel, {}).get("lfs_size") if algo == "sha256" else None,
                            algorithm=algo)
    listing = None
    if tree is not None:
        prefix = f"{sub}/" if sub else ""
        listing = [k[len(prefix):] for k in tree if k.startswith(prefix)]
    return _check_model_folder(folder, spec.name, listing=listing)


# --------------------------------------------------------------------------------------------------
# public entry points


def _opts(label: str, cache_dir, local_files_only, force_download, endpoint, token) -> _Opts:
    return _Opts(cache_dir=hub_cache_dir(cache_dir), offline=is_offline(local_files_only),
                 force_download=bool(force_download), endpoint=_endpoint(endpoint), token=token, label=label)


def resolve_model_dir(name_or_path: str | os.PathLike, *, revision: str | None = None,
                      cache_dir: str | os.PathLike | None = None, local_files_only: bool | None = None,
                      force_download: bool = False, endpoint: str | None = None,
                      token: str | bool | None = None) -> Path:
    """A local folder with ``config.json`` + ``model.safetensors`` for a model name, path or ``hf-hub:`` name.

    Every file the manifest lists is sha256-verified (after downloading it if needed); see the module
    docstring for the rules. ``local_files_only=None`` follows ``HF_HUB_OFFLINE``.

    Raises:
        UnknownModelError: not a manifest name, ``hf-hub:`` name or folder (a ``KeyError``; suggests names).
        ModelNotAvailableError: the entry's files are not located, or the folder is not a model.
        ModelNotCachedError: offline (or no network) and not in the cache.
        RemoteNotFoundError: the Hub has no such repo / revision / file.
        ChecksumError: a file is corrupted, also after fetching it again once.
        DownloadError: a transfer failed twice.
    """
    spec = parse_model_name(name_or_path)
    if spec.kind == "local":
        if revision is not None:
            raise ValueError(f"revision={revision!r} makes no sense for the local folder {spec.name!r}")
        return _check_model_folder(Path(spec.path), spec.name)
    opts = _opts(spec.name, cache_dir, local_files_only, force_download, endpoint, token)
    if spec.kind == "hf-hub":
        return _resolve_hf_hub(spec, revision, opts)
    entry = get_entry(spec.name)
    src = entry["source"]
    pinned = src.get("revision")
    if revision is not None and revision != pinned:
        raise ValueError(
            f"{spec.name!r} is pinned to revision {pinned!r} by the manifest; to load another revision of "
            + (f"its repo use 'hf-hub:{src['repo_id']}@{revision}'." if src.get("repo_id") else "it, use a folder."))
    resolver = SOURCE_RESOLVERS.get(src["type"])
    if resolver is None:  # pragma: no cover - the schema only allows known types
        raise ManifestError(f"{spec.name!r}: unknown source type {src['type']!r}")
    return resolver(spec.name, entry, opts)


def download(name: str, *, cache_dir: str | os.PathLike | None = None, force_download: bool = False,
             revision: str | None = None, endpoint: str | None = None, token: str | bool | None = None) -> Path:
    """Download (and for official checkpoints convert) a model into the cache and verify it; return its folder.

    Under ``HF_HUB_OFFLINE=1`` this only verifies what is cached (and raises if it is not).
    """
    return resolve_model_dir(name, revision=revision, cache_dir=cache_dir, local_files_only=None,
                             force_download=force_download, endpoint=endpoint, token=token)


def import_checkpoint(name: str, checkpoint: str | os.PathLike, *, inputs: Mapping[str, str | os.PathLike] | None = None,
                      cache_dir: str | os.PathLike | None = None, allow_unverified: bool = False) -> Path:
    """Convert checkpoint file(s) you obtained yourself for the manifest entry ``name`` into the cache.

    ``inputs`` gives the entry's further files by converter argument (e.g. ``{"classifier": path}``).
    Each file's sha256 and size must match the manifest; a file whose hash the manifest does not record
    is accepted only with ``allow_unverified=True`` (a recorded hash or size is always enforced).
    Afterwards ``from_pretrained(name)`` loads the converted folder, offline too.
    """
    entry = get_entry(name)
    src = entry["source"]
    if src["type"] != "official-checkpoint":
        raise ValueError(f"{name!r} is not converted from a checkpoint (source type {src['type']!r})")
    specs = _official_files(src)
    given = {"checkpoint": checkpoint, **dict(inputs or {})}
    unknown = sorted(set(given) - set(specs))
    if unknown:
        raise ValueError(f"{name!r} takes no input(s) {unknown}; it takes: {sorted(a for a in specs if a != 'checkpoint')}")
    missing = sorted(set(specs) - set(given))
    if missing:
        raise ValueError(f"{name!r} also needs the input(s) {missing} "
                         f"({', '.join(specs[a]['filename'] for a in missing)})")
    paths, shas, verified = {}, {}, True
    for arg, spec in specs.items():
        path = Path(given[arg]).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"{arg} file {str(path)!r} not found")
        actual, size = sha256_file(path), path.stat().st_size
        label = f"{arg} {str(path)!r} for {name!r} (official {spec['filename']})"
        if spec["sha256"] and (actual != spec["sha256"] or (spec["size"] is not None and size != spec["size"])):
            raise ChecksumError(label, spec["sha256"], actual, expected_size=spec["size"], actual_size=size,
                                detail="It is not the official file the manifest describes; nothing was converted.")
        if not spec["sha256"]:
            if spec["size"] is not None and size != spec["size"]:
                raise ChecksumError(label, None, actual, expected_size=spec["size"], actual_size=size,
                                    algorithm="size", detail="Its size differs from the official file's; "
                                                             "nothing was converted.")
            if not allow_unverified:
                raise ModelNotAvailableError(
                    f"The manifest records no sha256 for {name!r}'s {spec['filename']}, so {str(path)!r} (sha256 "
                    f"{actual}) cannot be verified. Pass allow_unverified=True (`--allow-unverified`) to convert "
                    "it anyway.")
            verified = False
        paths[arg], shas[arg] = path, actual
    return _convert_into_cache(name, src, paths, shas, hub_cache_dir(cache_dir), verified=verified)


# --------------------------------------------------------------------------------------------------
# cache inspection and verification (no requests)


def _cached_path(repo_id: str, filename: str, revision: str, cache: Path) -> Path | None:
    p = _storage_folder(cache, repo_id) / "snapshots" / revision / filename
    return p if p.exists() else None


def cache_status(name: str, *, cache_dir: str | os.PathLike | None = None) -> str:
    """``"cached"``, ``"partial"``, ``"converted"``, ``"checkpoint"`` (downloaded, not converted), ``"bundled"``
    or ``"no"`` for a manifest name; looks at the cache only (no hashing, no requests)."""
    entry = get_entry(name)
    src = entry["source"]
    cache = hub_cache_dir(cache_dir)
    if src["type"] == "bundled":
        folder = Path(__file__).parent / src["path"]
        return "bundled" if all((folder / f).is_file() for f in src["files"]) else "no"
    if src["type"] == "hub":
        sub = src.get("subfolder")
        have = [_cached_path(src["repo_id"], f"{sub}/{f}" if sub else f, src["revision"], cache) for f in src["files"]]
        n = sum(p is not None for p in have)
        return "cached" if n == len(have) else "partial" if n else "no"
    if _converted_folders(name, src, cache):
        return "converted"
    files = _official_files(src).values()
    if all(f["repo_id"] and f["revision"] and _cached_path(f["repo_id"], f["filename"], f["revision"], cache)
           for f in files):
        return "checkpoint"
    return "no"


def _converted_folders(name: str, src: dict, cache: Path) -> list[Path]:
    """Converted folders of an entry with a conversion record (not checked)."""
    key = _conversion_key({a: f["sha256"] for a, f in _official_files(src).items()})
    pattern = f"{name}-{key[:16]}" if key else f"{name}-*"
    return [p for p in sorted((cache / CONVERTED_DIRNAME).glob(pattern)) if (_read_record(p) or {}).get("name") == name]


def verify(name: str | None = None, *, cache_dir: str | os.PathLike | None = None) -> list[dict]:
    """Check the sha256 of cached files without downloading anything.

    ``name`` may be a manifest name, an ``hf-hub:`` name (checked against the cached tree listing) or a
    converted/local folder; ``None`` checks every manifest entry. Returns one dict per file:
    ``{"model", "file", "path", "status", "expected", "actual"}`` with status ``"ok"``, ``"mismatch"``,
    ``"missing"`` (not cached) or ``"unchecked"`` (no expected hash known).
    """
    cache = hub_cache_dir(cache_dir)
    names = list_models() if name is None else [name]
    results: list[dict] = []

    def add(model, file, path, expected, size=None, algorithm="sha256"):
        if path is None or not Path(path).exists():
            results.append({"model": model, "file": file, "path": None, "status": "missing",
                            "expected": expected, "actual": None})
            return
        if expected is None and size is None:
            results.append({"model": model, "file": file, "path": str(path), "status": "unchecked",
                            "expected": None, "actual": None})
            return
        check = _check_file(Path(path), expected, size, algorithm=algorithm)
        results.append({"model": model, "file": file, "path": str(path), "status": "ok" if check.ok else "mismatch",
                        "expected": expected, "actual": check.actual, "expected_size": size,
                        "actual_size": check.actual_size})

    for n in names:
        spec = parse_model_name(n)
        if spec.kind == "local":
            record = _read_record(Path(spec.path))
            for rel, meta in (record or {}).get("files", {}).items():
                add(n, rel, Path(spec.path) / rel, meta.get("sha256"), meta.get("size"))
            if record is None:
                for f in MODEL_FILES:
                    add(n, f, Path(spec.path) / f, None)
            continue
        if spec.kind == "hf-hub":
            from huggingface_hub.errors import LocalEntryNotFoundError

            try:
                snap = _snapshot(spec.repo_id, spec.revision or "main", _Opts(cache, True, False, _endpoint(None),
                                                                                None, n),
                                 [f"{spec.subfolder}/{p}" for p in HUB_ALLOW_PATTERNS] if spec.subfolder
                                 else list(HUB_ALLOW_PATTERNS))
            except (ModelNotCachedError, LocalEntryNotFoundError):
                add(n, "(snapshot)", None, None)
                continue
            tree = _tree_listing(cache, spec.repo_id, snap.name) or {}
            for path in sorted(p for p in snap.rglob("*") if p.is_file()):
                rel = path.relative_to(snap).as_posix()
                expected, algo = _expected_hash(path, tree.get(rel))
                add(n, rel, path, expected, algorithm=algo)
            continue
        entry = get_entry(n)
        src = entry["source"]
        if src["type"] == "bundled":
            folder = Path(__file__).parent / src["path"]
            for rel, meta in src["files"].items():
                add(n, rel, folder / rel, meta["sha256"], meta["size"])
        elif src["type"] == "hub":
            sub = src.get("subfolder")
            for rel, meta in src["files"].items():
                in_repo = f"{sub}/{rel}" if sub else rel
                add(n, rel, _cached_path(src["repo_id"], in_repo, src["revision"], cache), meta["sha256"],
                    meta["size"])
        else:
            folders = _converted_folders(n, src, cache)
            for folder in folders:
                record = _read_record(folder) or {}
                for rel, meta in record.get("files", {}).items():
                    add(n, f"converted/{rel}", folder / rel, meta.get("sha256"), meta.get("size"))
            for f in _official_files(src).values():
                ckpt = (_cached_path(f["repo_id"], f["filename"], f["revision"], cache)
                        if f["repo_id"] and f["revision"] else None)
                if ckpt is not None or not folders:  # a converted model does not need its checkpoint any more
                    add(n, f["filename"], ckpt, f["sha256"], f["size"])
    return results


# --------------------------------------------------------------------------------------------------
# publishing


def _card_fields(entry_or_config: Mapping[str, Any]) -> dict:
    d = dict(entry_or_config)
    cfg = d.get("config") if isinstance(d.get("config"), dict) else {}
    return {
        "family": d.get("family") or cfg.get("family"),
        "description": d.get("description"),
        "license": d.get("license"),
        "data_license": d.get("data_license"),
        "paper": d.get("paper"),
        "preprocessing": d.get("preprocessing"),
        "defaults": d.get("defaults"),
        "datasets": d.get("datasets") or ([d["training_data"]] if d.get("training_data") else None),
        "base_model": d.get("base_model"),
        "image_size": (d.get("preprocessing") or {}).get("image_size") or d.get("image_size")
        or (d.get("network") or {}).get("image_size") or cfg.get("image_size"),
        "semdiff_version": d.get("semdiff_version"),
    }


def write_model_card(folder: str | os.PathLike, entry_or_config: Mapping[str, Any],
                     metrics: Mapping[str, Any] | None = None, *, name: str | None = None,
                     repo_id: str | None = None) -> Path:
    """Write ``README.md`` (a huggingface_hub ``ModelCard`` with ``library_name: semdiff``) into ``folder``.

    ``entry_or_config`` is a manifest entry or a model's ``config.json`` dict. ``metrics`` maps a metric
    name to a number, or to ``{"value": v, "dataset": "...", "task": "..."}`` (which also becomes a
    model-index result). Returns the card's path.
    """
    from huggingface_hub import EvalResult, ModelCard, ModelCardData

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    saved: dict = {}
    try:  # fill what the caller's dict lacks (e.g. semdiff_version) from the folder's config.json
        saved = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        pass
    f = _card_fields({**(saved if isinstance(saved, dict) else {}), **dict(entry_or_config)})
    family = f["family"] or "unknown"
    name = name or (repo_id.split("/")[-1] if repo_id else folder.name)
    metrics = dict(metrics or {})
    eval_results = []
    for metric, value in metrics.items():
        if isinstance(value, Mapping) and value.get("dataset") and isinstance(value.get("value"), (int, float)):
            eval_results.append(EvalResult(task_type=value.get("task", "image-to-image"),
                                           dataset_type=value["dataset"],
                                           dataset_name=value.get("dataset_name", value["dataset"]),
                                           metric_type=metric, metric_value=value["value"]))
    license_id = f["license"]
    card_kwargs: dict[str, Any] = {}
    if license_id and not re.match(r"^[a-z0-9][a-z0-9.\-]*$", license_id):
        card_kwargs.update(license="other", license_name=license_id.lower().replace(" ", "-")[:60])
    elif license_id:
        card_kwargs["license"] = license_id
    data = ModelCardData(
        library_name=LIBRARY_NAME,
        tags=["semdiff", family, "diffusion", "autoencoder", "semantic-autoencoder"],
        pipeline_tag="image-to-image",
        metrics=sorted(metrics) or None,
        eval_results=eval_results or None,
        model_name=name if eval_results else None,
        base_model=f["base_model"] if f["base_model"] and "/" in str(f["base_model"]) else None,
        **card_kwargs,
    )
    load_name = f"hf-hub:{repo_id}" if repo_id else CARD_REPO_PLACEHOLDER
    lines = [f"# {name}", "", f["description"] or f"A semantic diffusion autoencoder ({family}) for semdiff.", ""]
    lines += ["## Usage", "", "```python", "from semdiff import SemanticAutoencoder", "",
              f"model = SemanticAutoencoder.from_pretrained({load_name!r})", "```", ""]
    details = [("Family", family)]
    if f["image_size"]:
        details.append(("Image size", f"{f['image_size']}x{f['image_size']}"))
    pre = f["preprocessing"] or {}
    if pre.get("alignment"):
        details.append(("Alignment", pre["alignment"]))
    if pre.get("range"):
        details.append(("Input range", str(pre["range"])))
    for key, value in (f["defaults"] or {}).items():
        if value:
            details.append((f"Default steps: {key}", str(value)))
    if license_id:
        details.append(("Licence", license_id))
    if f["data_license"]:
        details.append(("Training data licence", f["data_license"]))
    if f["semdiff_version"]:
        details.append(("semdiff version", str(f["semdiff_version"])))
    lines += ["## Details", "", "| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in details] + [""]
    if metrics:
        lines += ["## Metrics", "", "| metric | value | dataset |", "|---|---|---|"]
        for metric, value in sorted(metrics.items()):
            if isinstance(value, Mapping):
                lines.append(f"| {metric} | {value.get('value')} | {value.get('dataset', '')} |")
            else:
                lines.append(f"| {metric} | {value} | |")
        lines.append("")
    paper = f["paper"]
    if isinstance(paper, Mapping) and paper.get("title"):
        ref = paper.get("url") or (f"https://arxiv.org/abs/{paper['arxiv']}" if paper.get("arxiv") else "")
        lines += ["## Paper", "", f"{paper.get('authors', '')}{'. ' if paper.get('authors') else ''}"
                  f"*{paper['title']}*{', ' + paper['venue'] if paper.get('venue') else ''}. {ref}".strip(), ""]
    content = f"---\n{data.to_yaml()}\n---\n\n" + "\n".join(lines)
    card = ModelCard(content)
    path = folder / "README.md"
    card.save(path)
    return path


def push_folder_to_hub(folder: str | os.PathLike, repo_id: str, *, commit_message: str = "Upload semdiff model",
                       private: bool = False, token: str | bool | None = None, endpoint: str | None = None,
                       revision: str | None = None) -> str:
    """Create ``repo_id`` if needed and upload a model folder to it in one commit; return
    ``"hf-hub:<repo_id>@<commit>"``, the exact name that loads what was pushed.

    Hidden files and folders are skipped; a model card's ``hf-hub:<org>/<repo>`` placeholder is replaced
    by the repo's name in the uploaded copy (the local file is left as it is).
    """
    from huggingface_hub import CommitOperationAdd, HfApi

    folder = Path(folder)
    _check_model_folder(folder, str(folder))
    if not _REPO_ID.match(repo_id):
        raise ValueError(f"repo_id must look like 'org/name', got {repo_id!r}")
    if is_offline(None):
        raise ZooError("Cannot push: the Hub is disabled (HF_HUB_OFFLINE=1 is set).")
    operations = []
    for path in sorted(folder.rglob("*")):
        rel = path.relative_to(folder)
        if not path.is_file() or any(part.startswith(".") for part in rel.parts):
            continue
        content: Any = str(path)
        if rel.as_posix() == "README.md":
            text = path.read_text(encoding="utf-8")
            if CARD_REPO_PLACEHOLDER in text:
                content = text.replace(CARD_REPO_PLACEHOLDER, f"{HF_HUB_PREFIX}{repo_id}").encode("utf-8")
        operations.append(CommitOperationAdd(path_in_repo=rel.as_posix(), path_or_fileobj=content))
    api = HfApi(endpoint=_endpoint(endpoint), token=token, library_name=LIBRARY_NAME,
                library_version=_library_version())
    api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    info = api.create_commit(repo_id=repo_id, operations=operations, commit_message=commit_message,
                             token=token, revision=revision)
    return f"{HF_HUB_PREFIX}{repo_id}@{info.oid}"


def describe(name: str, *, cache_dir: str | os.PathLike | None = None) -> dict:
    """The manifest entry of ``name`` plus its cache status and, for unlocated entries, how to get it."""
    entry = get_entry(name)
    info = {"name": name, **entry, "cache": cache_status(name, cache_dir=cache_dir)}
    if entry["status"] == "not-located":
        info["how_to_get"] = _not_located_message(name, entry)
    return info


def closest_names(name: str) -> list[str]:
    """The manifest names closest to ``name``."""
    return suggest_names(name)
