"""Model-zoo commands: ``semdiff list``, ``info NAME``, ``download NAME``, ``verify [NAME]``."""

from __future__ import annotations

import json
import shutil
import textwrap

from semdiff.cli import CLIError


def register(subparsers) -> None:
    p = subparsers.add_parser("list", help="list the model zoo (the manifest) and what is cached")
    p.add_argument("--family", default=None, help="only this family (diffae, diffusevae, lrdm, ...)")
    p.add_argument("--status", default=None, choices=["available", "bundled", "not-located"])
    p.add_argument("--cache-dir", default=None, help="Hugging Face hub cache (default: $HF_HUB_CACHE / $HF_HOME/hub)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    p.set_defaults(func=cmd_list)

    p = subparsers.add_parser("info", help="show one manifest entry: source, hashes, licences, defaults")
    p.add_argument("name")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_info)

    p = subparsers.add_parser("download", help="download (and convert) a model into the cache, verified")
    p.add_argument("name", help="manifest name or hf-hub:org/repo[@revision]")
    p.add_argument("--revision", default=None, help="revision of an hf-hub: name")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--force", action="store_true", help="download again even if cached")
    p.add_argument("--checkpoint", default=None,
                   help="import an official checkpoint you downloaded yourself (hash-checked, then converted)")
    p.add_argument("--input", action="append", default=[], metavar="ARG=PATH",
                   help="a further file the entry's converter takes, e.g. classifier=PATH (with --checkpoint)")
    p.add_argument("--allow-unverified", action="store_true",
                   help="with --checkpoint: accept a file whose sha256 the manifest does not record")
    p.set_defaults(func=cmd_download)

    p = subparsers.add_parser("verify", help="check the sha256 of cached model files (no downloads)")
    p.add_argument("name", nargs="?", default=None, help="manifest name, hf-hub: name or folder (default: all)")
    p.add_argument("--cache-dir", default=None)
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_verify)


def _zoo_errors(fn):
    """Report the zoo's errors (including UnknownModelError, a KeyError) as CLI errors."""

    def wrapper(args):
        from semdiff.manifest import ZooError

        try:
            return fn(args)
        except ZooError as err:
            raise CLIError(str(err)) from err

    wrapper.__name__ = fn.__name__
    wrapper.__doc__ = fn.__doc__
    return wrapper


def _size(n: int | None) -> str:
    if n is None:
        return "?"
    for unit in ("B", "kB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return "?"  # pragma: no cover


def _entry_size(entry: dict) -> int | None:
    src = entry["source"]
    if src["type"] in ("hub", "bundled"):
        return sum(f["size"] for f in src["files"].values())
    sizes = [src.get("size")] + [f.get("size") for f in src.get("inputs", {}).values()]
    return None if any(s is None for s in sizes) else sum(sizes)


def _table(rows: list[list[str]], headers: list[str]) -> str:
    width = shutil.get_terminal_size((120, 20)).columns
    cols = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]
    # the last column (description) takes what is left
    fixed = sum(cols[:-1]) + 2 * (len(cols) - 1)
    cols[-1] = max(20, min(cols[-1], width - fixed))
    def fmt(r):
        cells = [c.ljust(w) if i < len(r) - 1 else textwrap.shorten(c, w, placeholder="…")
                 for i, (c, w) in enumerate(zip(r, cols))]
        return "  ".join(cells).rstrip()
    return "\n".join([fmt(headers), fmt(["-" * w for w in cols])] + [fmt(r) for r in rows])


@_zoo_errors
def cmd_list(args) -> int:
    from semdiff.hub import cache_status
    from semdiff.manifest import list_models, load_manifest

    models = load_manifest()["models"]
    names = list_models(family=args.family, status=args.status)
    rows, data = [], []
    for name in names:
        e = models[name]
        cached = cache_status(name, cache_dir=args.cache_dir)
        data.append({"name": name, "family": e["family"], "kind": e.get("kind", "autoencoder"),
                     "status": e["status"], "cached": cached, "size": _entry_size(e), "license": e["license"],
                     "image_size": e["preprocessing"]["image_size"], "description": e["description"]})
        rows.append([name, e["family"], e["status"], cached, str(e["preprocessing"]["image_size"]),
                     _size(_entry_size(e)), e["license"], e["description"]])
    if args.json:
        print(json.dumps(data, indent=2))
    else:
        print(_table(rows, ["NAME", "FAMILY", "STATUS", "CACHED", "RES", "DOWNLOAD", "LICENSE", "DESCRIPTION"]))
        print(f"\n{len(rows)} model(s). `semdiff info NAME` for details; any Hub repo loads as 'hf-hub:org/repo'.")
    return 0


@_zoo_errors
def cmd_info(args) -> int:
    from semdiff.hub import describe

    info = describe(args.name, cache_dir=args.cache_dir)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    src = info["source"]
    out = [f"{info['name']}: {info['description']}",
           f"  family:        {info['family']} ({info.get('kind', 'autoencoder')})",
           f"  status:        {info['status']}",
           f"  cached:        {info['cache']}",
           f"  source:        {src['type']}"]
    if src["type"] == "hub":
        out.append(f"  repo:          {src['repo_id']}@{src['revision']}"
                   + (f" (subfolder {src['subfolder']})" if src.get("subfolder") else ""))
    if src["type"] == "bundled":
        out.append(f"  path:          semdiff/{src['path']}")
    for rel, meta in src.get("files", {}).items():
        out.append(f"    {rel}: {meta['size']:,} bytes, sha256 {meta['sha256']}")
    if src["type"] == "official-checkpoint":
        out.append(f"  repo:          {src['repo_id'] or '(not located)'}"
                   + (f"@{src['revision']}" if src.get("revision") else ""))
        files = {"checkpoint": src, **src.get("inputs", {})}
        for arg, f in files.items():
            size = f"{f['size']:,} bytes" if f.get("size") else "size unknown"
            out.append(f"    {arg}: {f['filename']}, {size}, sha256 {f.get('sha256') or 'unknown'}")
        out.append(f"  converter:     {src['convert']['family']} {json.dumps(src['convert'].get('args', {}))}")
    pre = info["preprocessing"]
    out += [f"  preprocessing: {pre['image_size']}x{pre['image_size']}, alignment {pre['alignment']}, "
            f"range {pre['range']}",
            "  defaults:      " + ", ".join(f"{k}={v}" for k, v in info["defaults"].items() if v is not None),
            f"  license:       {info['license']}" + (f" ({info['license_note']})" if info.get("license_note") else ""),
            f"  data license:  {info['data_license']}"]
    paper = info.get("paper") or {}
    if paper:
        out.append(f"  paper:         {paper.get('title')}" + (f", {paper['venue']}" if paper.get("venue") else "")
                   + (f" ({paper.get('url')})" if paper.get("url") else ""))
    for note in info.get("notes", []):
        out.append(textwrap.fill(note, 110, initial_indent="  note:          ", subsequent_indent=" " * 17))
    print("\n".join(out))
    return 0


@_zoo_errors
def cmd_download(args) -> int:
    from semdiff.hub import download, import_checkpoint

    if args.checkpoint:
        inputs = {}
        for item in args.input:
            key, sep, value = item.partition("=")
            if not sep:
                raise CLIError(f"--input wants ARG=PATH, got {item!r}")
            inputs[key.strip().replace("-", "_")] = value
        folder = import_checkpoint(args.name, args.checkpoint, inputs=inputs, cache_dir=args.cache_dir,
                                   allow_unverified=args.allow_unverified)
    else:
        if args.input or args.allow_unverified:
            raise CLIError("--input and --allow-unverified go with --checkpoint")
        folder = download(args.name, cache_dir=args.cache_dir, force_download=args.force, revision=args.revision)
    print(folder)
    return 0


@_zoo_errors
def cmd_verify(args) -> int:
    from semdiff.hub import verify

    results = verify(args.name, cache_dir=args.cache_dir)
    bad = [r for r in results if r["status"] == "mismatch"]
    if args.json:
        print(json.dumps(results, indent=2))
    else:
        for r in results:
            line = f"{r['status'].upper():9s} {r['model']}  {r['file']}"
            if r["status"] == "mismatch":
                line += f"\n          expected {r['expected']}\n          actual   {r['actual']}\n          at {r['path']}"
            print(line)
        ok = sum(r["status"] == "ok" for r in results)
        print(f"\n{ok} ok, {len(bad)} mismatched, {sum(r['status'] == 'missing' for r in results)} not cached, "
              f"{sum(r['status'] == 'unchecked' for r in results)} without a known hash")
        if bad:
            print("A mismatched file is deleted and downloaded again on the next load.")
    return 1 if bad else 0
