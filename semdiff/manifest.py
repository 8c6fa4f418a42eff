"""The model zoo's manifest: loading, schema validation, name look-up.

``semdiff/weights_manifest.json`` is the single source of truth for the named models. Its layout::

    {"schema_version": 1, "models": {NAME: ENTRY, ...}}

and each ENTRY is checked against :data:`ENTRY_SCHEMA` (a small JSON-Schema-like dict, so the schema is
data) plus the cross-field rules in :func:`validate_entry`. Adding a model is a JSON edit only.

Extra manifests can be layered over the packaged one, for private zoos or tests: list JSON files of the
same layout in the ``SEMDIFF_MANIFEST`` environment variable (separated by ``os.pathsep``), or call
:func:`register_model` at runtime. Later sources override earlier ones name by name.
"""

from __future__ import annotations

import copy
import difflib
import json
import os
import re
import threading
from pathlib import Path
from typing import Any, Iterable, Mapping

__all__ = [
    "ENTRY_SCHEMA",
    "MANIFEST_PATH",
    "MANIFEST_SCHEMA",
    "ManifestError",
    "UnknownModelError",
    "ZooError",
    "default_model_name",
    "get_entry",
    "list_models",
    "load_manifest",
    "register_model",
    "reload_manifest",
    "suggest_names",
    "validate_entry",
    "validate_manifest",
]

MANIFEST_PATH = Path(__file__).with_name("weights_manifest.json")
MANIFEST_ENV = "SEMDIFF_MANIFEST"
SCHEMA_VERSION = 1

NAME_PATTERN = r"^[a-z0-9][a-z0-9._-]*$"
_HEX40 = r"^[0-9a-f]{40}$"
_HEX64 = r"^[0-9a-f]{64}$"
_REL_PATH = r"^(?!/)(?!.*(^|/)\.\.(/|$))[^\\]+$"  # relative, forward slashes, no ".." segment

# --------------------------------------------------------------------------------------------------
# errors


class ZooError(Exception):
    """Base class of the model-zoo errors (manifest, resolution, download, verification)."""


class ManifestError(ZooError, ValueError):
    """The manifest (or an entry added to it) does not follow the schema."""


class UnknownModelError(ZooError, KeyError):
    """A model name is neither a manifest name, an ``hf-hub:`` name nor an existing folder."""

    def __init__(self, message: str, *, name: str | None = None, suggestions: Iterable[str] = ()):
        super().__init__(message)
        self.name = name
        self.suggestions = list(suggestions)

    def __str__(self) -> str:  # KeyError would print the repr of the message
        return str(self.args[0]) if self.args else ""


# --------------------------------------------------------------------------------------------------
# the schema, as data

_FILES = {
    "type": "object",
    "minProperties": 1,
    "propertyNames": {"pattern": _REL_PATH},
    "additionalProperties": {
        "type": "object",
        "required": ["sha256", "size"],
        "properties": {"sha256": {"type": "string", "pattern": _HEX64}, "size": {"type": "integer", "minimum": 0}},
        "additionalProperties": False,
    },
}
_CONVERT = {
    "type": "object",
    "required": ["family"],
    "properties": {
        "family": {"type": "string", "pattern": r"^[a-z][a-z0-9_]*$"},
        "args": {"type": "object"},
        # optional explicit converter, "package.module:function"; default: the registry / naming convention
        "function": {"type": "string", "pattern": r"^[A-Za-z_][\w.]*:[A-Za-z_]\w*$"},
    },
    "additionalProperties": False,
}
SOURCE_SCHEMAS: dict[str, dict] = {
    "hub": {
        "type": "object",
        "required": ["type", "repo_id", "revision", "files"],
        "properties": {
            "type": {"const": "hub"},
            "repo_id": {"type": "string", "pattern": r"^[\w.-]+/[\w.-]+$"},
            "revision": {"type": "string", "pattern": _HEX40},
            "subfolder": {"type": "string", "pattern": _REL_PATH},
            "files": _FILES,
        },
        "additionalProperties": False,
    },
    "bundled": {
        "type": "object",
        "required": ["type", "path", "files"],
        "properties": {
            "type": {"const": "bundled"},
            "path": {"type": "string", "pattern": _REL_PATH},
            "files": _FILES,
        },
        "additionalProperties": False,
    },
    "official-checkpoint": {
        "type": "object",
        "required": ["type", "repo_id", "revision", "filename", "sha256", "size", "convert"],
        "properties": {
            "type": {"const": "official-checkpoint"},
            "repo_id": {"type": ["string", "null"], "pattern": r"^[\w.-]+/[\w.-]+$"},
            "revision": {"type": ["string", "null"], "pattern": _HEX40},
            "filename": {"type": "string", "pattern": _REL_PATH},
            "sha256": {"type": ["string", "null"], "pattern": _HEX64},
            "size": {"type": ["integer", "null"], "minimum": 1},
            "convert": _CONVERT,
            # further files the converter takes by path, e.g. {"classifier": {"filename", "sha256", "size"}}
            # (from the same repo and revision unless they name their own)
            "inputs": {
                "type": "object",
                "propertyNames": {"pattern": r"^[a-z_][a-z0-9_]*$"},
                "additionalProperties": {
                    "type": "object",
                    "required": ["filename", "sha256", "size"],
                    "properties": {
                        "repo_id": {"type": ["string", "null"], "pattern": r"^[\w.-]+/[\w.-]+$"},
                        "revision": {"type": ["string", "null"], "pattern": _HEX40},
                        "filename": {"type": "string", "pattern": _REL_PATH},
                        "sha256": {"type": ["string", "null"], "pattern": _HEX64},
                        "size": {"type": ["integer", "null"], "minimum": 1},
                    },
                    "additionalProperties": False,
                },
            },
            "official_location": {"type": "string"},
            "candidates": {"type": "array", "items": {"type": "object", "required": ["repo_id"]}},
        },
        "additionalProperties": False,
    },
}
_STEPS = {"type": ["integer", "null"], "minimum": 1}
ENTRY_SCHEMA: dict = {
    "type": "object",
    "required": ["family", "description", "status", "source", "license", "data_license", "paper",
                 "preprocessing", "defaults"],
    "properties": {
        "family": {"type": "string", "pattern": r"^[a-z][a-z0-9_]*$"},
        "kind": {"enum": ["autoencoder", "autoencoder-with-prior", "classifier"]},
        "description": {"type": "string", "minLength": 1},
        "status": {"enum": ["available", "bundled", "not-located"]},
        "source": {"type": "object", "switch": "type", "cases": SOURCE_SCHEMAS},
        "license": {"type": "string", "minLength": 1},
        "license_note": {"type": "string"},
        "data_license": {"type": "string", "minLength": 1},
        "training_data": {"type": "string"},
        "training": {"type": "object"},
        "base_model": {"type": "string"},
        "paper": {
            "type": ["object", "null"],
            "required": ["title"],
            "properties": {"title": {"type": "string"}, "url": {"type": "string"}, "arxiv": {"type": "string"}},
        },
        "preprocessing": {
            "type": "object",
            "required": ["image_size", "alignment", "range"],
            "properties": {
                "image_size": {"type": "integer", "minimum": 1},
                "alignment": {"type": "string"},
                "range": {"type": "array", "minItems": 2, "maxItems": 2, "items": {"type": "number"}},
                "resize": {"type": "string"},
            },
        },
        "defaults": {
            "type": "object",
            "required": ["encode_stochastic", "decode", "manipulate", "prior"],
            "properties": {"encode_stochastic": _STEPS, "decode": _STEPS, "manipulate": _STEPS, "prior": _STEPS},
            "additionalProperties": _STEPS,
        },
        "config": {"type": "object"},
        "metrics": {"type": "object"},
        "notes": {"type": "array", "items": {"type": "string"}},
    },
    "additionalProperties": False,
}
MANIFEST_SCHEMA: dict = {
    "type": "object",
    "required": ["schema_version", "models"],
    "properties": {
        "schema_version": {"const": SCHEMA_VERSION},
        "description": {"type": "string"},
        # the model SemanticAutoencoder.from_pretrained() loads without a name (a bundled one)
        "default": {"type": ["string", "null"], "pattern": NAME_PATTERN},
        "models": {"type": "object", "propertyNames": {"pattern": NAME_PATTERN}, "additionalProperties": ENTRY_SCHEMA},
        # parts that are not models on their own but inputs of a conversion (e.g. LRDM's VQ-f4 first stage)
        "components": {"type": "object", "additionalProperties": {"type": "object"}},
    },
    "additionalProperties": False,
}

_TYPES: dict[str, tuple[type, ...]] = {
    "string": (str,), "integer": (int,), "number": (int, float), "boolean": (bool,),
    "object": (dict,), "array": (list,), "null": (type(None),),
}


def _type_ok(value: Any, name: str) -> bool:
    if name in ("integer", "number") and isinstance(value, bool):
        return False
    return isinstance(value, _TYPES[name])


def check_schema(value: Any, schema: Mapping[str, Any], where: str = "$") -> list[str]:
    """Check ``value`` against a small JSON-Schema subset; return the problems (empty when valid).

    Supported keywords: type (one or a list), const, enum, pattern, minLength, minimum, required,
    properties, additionalProperties (bool or schema), propertyNames, minProperties, items,
    minItems, maxItems, and ``switch``/``cases`` (choose the schema by the value of one key).
    """
    problems: list[str] = []
    types = schema.get("type")
    if types is not None:
        types = [types] if isinstance(types, str) else list(types)
        if not any(_type_ok(value, t) for t in types):
            return [f"{where}: expected {' or '.join(types)}, got {type(value).__name__} {value!r:.60}"]
    if value is None:
        return problems
    if "const" in schema and value != schema["const"]:
        problems.append(f"{where}: must be {schema['const']!r}, got {value!r:.60}")
    if "enum" in schema and value not in schema["enum"]:
        problems.append(f"{where}: must be one of {schema['enum']}, got {value!r:.60}")
    if isinstance(value, str):
        if "pattern" in schema and not re.search(schema["pattern"], value):
            problems.append(f"{where}: {value!r:.80} does not match {schema['pattern']}")
        if len(value) < schema.get("minLength", 0):
            problems.append(f"{where}: must not be empty")
    if isinstance(value, (int, float)) and not isinstance(value, bool) and "minimum" in schema:
        if value < schema["minimum"]:
            problems.append(f"{where}: must be >= {schema['minimum']}, got {value}")
    if isinstance(value, list):
        if len(value) < schema.get("minItems", 0) or len(value) > schema.get("maxItems", len(value)):
            problems.append(f"{where}: wrong number of items ({len(value)})")
        if "items" in schema:
            for i, item in enumerate(value):
                problems += check_schema(item, schema["items"], f"{where}[{i}]")
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            if key not in value:
                problems.append(f"{where}: missing required field {key!r}")
        if len(value) < schema.get("minProperties", 0):
            problems.append(f"{where}: must not be empty")
        props = schema.get("properties", {})
        extra = schema.get("additionalProperties", True)
        for key, item in value.items():
            if "propertyNames" in schema:
                problems += check_schema(key, schema["propertyNames"], f"{where} key")
            if key in props:
                problems += check_schema(item, props[key], f"{where}.{key}")
            elif extra is False:
                problems.append(f"{where}: unknown field {key!r}")
            elif isinstance(extra, dict):
                problems += check_schema(item, extra, f"{where}.{key}")
        if "switch" in schema:
            tag = value.get(schema["switch"])
            cases = schema["cases"]
            if tag not in cases:
                problems.append(f"{where}.{schema['switch']}: must be one of {sorted(cases)}, got {tag!r}")
            else:
                problems += check_schema(value, cases[tag], where)
    return problems


def validate_entry(name: str, entry: Any) -> list[str]:
    """All problems of one manifest entry: the schema plus the rules that tie fields together."""
    where = f"models[{name!r}]"
    problems = check_schema(name, {"type": "string", "pattern": NAME_PATTERN}, f"{where} name")
    problems += check_schema(entry, ENTRY_SCHEMA, where)
    if problems or not isinstance(entry, dict):
        return problems
    status, source = entry["status"], entry["source"]
    kind = source["type"]
    if status == "bundled" and kind != "bundled":
        problems.append(f"{where}: status 'bundled' needs a source of type 'bundled', not {kind!r}")
    if kind == "bundled" and status != "bundled":
        problems.append(f"{where}: a bundled source needs status 'bundled', not {status!r}")
    if status == "available" and kind == "official-checkpoint":
        for key in ("repo_id", "revision", "sha256", "size"):
            if source.get(key) is None:
                problems.append(f"{where}.source.{key}: must be set when status is 'available'")
    if kind == "official-checkpoint" and status == "available":
        for arg, spec in source.get("inputs", {}).items():
            if spec.get("sha256") is None or spec.get("size") is None:
                problems.append(f"{where}.source.inputs.{arg}: sha256 and size must be set when status is 'available'")
    if status == "not-located" and kind == "official-checkpoint" and source.get("repo_id") and source.get("revision") \
            and source.get("sha256"):
        problems.append(f"{where}: the checkpoint is fully located (repo, pinned revision, sha256); "
                        "set status to 'available'")
    return problems


def validate_manifest(data: Any) -> None:
    """Raise :class:`ManifestError` listing every problem of a whole manifest document."""
    top = dict(MANIFEST_SCHEMA, properties=dict(MANIFEST_SCHEMA["properties"], models={"type": "object"}))
    problems = check_schema(data, top, "$")  # the entries are checked one by one below, with cross-field rules
    models = data.get("models") if isinstance(data, dict) else None
    if not isinstance(models, dict):
        problems.append("$.models: expected an object of NAME: ENTRY")
    else:
        for name, entry in models.items():
            problems += validate_entry(name, entry)
    if isinstance(models, dict) and isinstance(data, dict) and data.get("default") and data["default"] not in models:
        problems.append(f"$.default: {data['default']!r} is not a model of this manifest")
    if problems:
        raise ManifestError("invalid model manifest:\n  " + "\n  ".join(problems))


# --------------------------------------------------------------------------------------------------
# loading

_lock = threading.Lock()
_cache: dict[str, Any] = {}
_registered: dict[str, dict] = {}


def _read(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            data = json.load(f)
    except json.JSONDecodeError as err:
        raise ManifestError(f"manifest {path} is not valid JSON: {err}") from err
    try:
        validate_manifest(data)
    except ManifestError as err:
        raise ManifestError(f"{path}: {err}") from None
    return data


def _extra_paths() -> list[Path]:
    value = os.environ.get(MANIFEST_ENV, "")
    return [Path(p).expanduser() for p in value.split(os.pathsep) if p.strip()]


def load_manifest(path: str | os.PathLike | None = None) -> dict:
    """The merged, validated manifest: ``{"schema_version": 1, "models": {...}}``.

    ``path`` replaces the packaged manifest (mainly for tests). Files named in ``SEMDIFF_MANIFEST`` and
    entries added by :func:`register_model` are layered on top. The result is cached per set of inputs;
    a deep copy is returned, so callers may modify it freely.
    """
    base = Path(path) if path is not None else MANIFEST_PATH
    sources = [base, *_extra_paths()]
    key = json.dumps([[str(p), p.stat().st_mtime_ns if p.exists() else None] for p in sources])
    with _lock:
        if key not in _cache:
            models: dict[str, dict] = {}
            merged = None
            for src in sources:
                if not src.exists():
                    raise ManifestError(f"manifest file not found: {src}"
                                        + (f" (listed in ${MANIFEST_ENV})" if src != base else ""))
                data = _read(src)
                merged = merged or data
                models.update(data["models"])
            _cache.clear()
            default = None
            for src in sources:  # the last manifest that names a default wins
                default = _read(src).get("default") or default
            _cache[key] = {"schema_version": SCHEMA_VERSION, "description": merged.get("description", ""),
                           "default": default, "models": models}
        result = copy.deepcopy(_cache[key])
        result["models"].update(copy.deepcopy(_registered))
    return result


def reload_manifest() -> None:
    """Forget the cached manifest (the next look-up reads the files again)."""
    with _lock:
        _cache.clear()


def register_model(name: str, entry: Mapping[str, Any], *, overwrite: bool = False) -> None:
    """Add (or with ``overwrite=True`` replace) a manifest entry at runtime, after validating it."""
    entry = copy.deepcopy(dict(entry))
    problems = validate_entry(name, entry)
    if problems:
        raise ManifestError("invalid model entry:\n  " + "\n  ".join(problems))
    if not overwrite and name in load_manifest()["models"]:
        raise ManifestError(f"model {name!r} is already in the manifest (pass overwrite=True to replace it)")
    with _lock:
        _registered[name] = entry


def unregister_model(name: str) -> None:
    """Remove an entry added by :func:`register_model` (no error if there is none)."""
    with _lock:
        _registered.pop(name, None)


def list_models(*, family: str | None = None, status: str | None = None) -> list[str]:
    """Manifest names, sorted, optionally filtered by family and status."""
    models = load_manifest()["models"]
    return sorted(n for n, e in models.items()
                  if (family is None or e["family"] == family) and (status is None or e["status"] == status))


def suggest_names(name: str, names: Iterable[str] | None = None, n: int = 3) -> list[str]:
    """The manifest names closest to ``name`` (difflib), best first."""
    pool = sorted(load_manifest()["models"] if names is None else names)
    query = name.strip().lower()
    if query.startswith("hf-hub:"):
        return []
    lowered = {p.lower(): p for p in pool}
    close = difflib.get_close_matches(query, list(lowered), n=n, cutoff=0.5)
    out = [lowered[c] for c in close]
    if len(out) < n:  # substrings ("ffhq256" -> the ffhq256 models)
        out += [p for p in pool if query and query in p.lower() and p not in out][: n - len(out)]
    return out[:n]


def default_model_name() -> str:
    """The model loaded when no name is given: the manifest's ``default``, else the first bundled model."""
    manifest = load_manifest()
    if manifest.get("default"):
        return manifest["default"]
    bundled = sorted(n for n, e in manifest["models"].items() if e["status"] == "bundled")
    if bundled:
        return bundled[0]
    raise UnknownModelError("No default model: none is bundled with this installation. Pass a model name "
                            "(`semdiff list`), an 'hf-hub:org/repo' name or a model folder.", name=None)


def get_entry(name: str) -> dict:
    """A deep copy of the manifest entry ``name``; :class:`UnknownModelError` with suggestions if absent."""
    models = load_manifest()["models"]
    if name in models:
        return models[name]
    suggestions = suggest_names(name, models)
    hint = f" Did you mean {' or '.join(repr(s) for s in suggestions)}?" if suggestions else ""
    raise UnknownModelError(
        f"Unknown model {name!r}.{hint} Known names: `semdiff list`. A Hub repo is named 'hf-hub:org/repo[@revision]'"
        ", a local model folder by its path.", name=name, suggestions=suggestions)
