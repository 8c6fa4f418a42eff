"""Sub-commands ``features`` (codes of image folders, resumable) and ``fit-attributes`` (your own labels)."""

from __future__ import annotations

import argparse
import json
import sys
import warnings
from pathlib import Path

from semdiff.cli import CLIError
from semdiff.cli.models import _model_args, load_model

#: exit code when some images could not be read (the others were processed)
EXIT_SKIPPED = 3


def _load(args, batch_size: int | None = None):
    ns = argparse.Namespace(**vars(args))
    ns.batch_size = batch_size or args.batch_size or 16
    return load_model(ns)


def _report_skipped(skipped: list[tuple[str, str]], what: str) -> int:
    if not skipped:
        return 0
    first = "; ".join(f"{p} ({r})" for p, r in skipped[:5])
    more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
    print(f"semdiff {what}: skipped {len(skipped)} unreadable image(s): {first}{more}", file=sys.stderr)
    return EXIT_SKIPPED


def cmd_features(args) -> int:
    from semdiff.features import extract_features, list_images

    if args.batch_size is not None and args.batch_size < 1:
        raise CLIError("--batch-size must be positive")
    try:
        list_images(args.images)  # a clear error before the model loads
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    model = _load(args)
    out = Path(args.out)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # skipped files are summarised below, one line for all
            result = extract_features(
                model, args.images, out, stochastic=args.stochastic, steps=args.inversion_steps,
                resume=not args.no_resume, batch_size=args.batch_size, num_workers=args.workers,
                resize=not args.no_resize, shard_size=args.shard_size,
            )
    except KeyboardInterrupt:
        print(f"semdiff features: interrupted; the progress is kept in {out}.partial/ - run the same command "
              "again to continue", file=sys.stderr)
        return 130
    what = "semantic and stochastic codes" if args.stochastic else "semantic codes"
    extra = f", {result.reused} taken from the interrupted run" if result.reused else ""
    print(f"wrote {what} of {len(result.files)} images to {out} ({result.computed} computed{extra}; "
          f"{result.images_per_second:.1f} images/s)")
    return _report_skipped(result.skipped, "features")


def _parse_kinds(specs: list[str] | None):
    if not specs:
        return "auto"
    if len(specs) == 1 and "=" not in specs[0]:
        return specs[0]
    kinds = {}
    for spec in specs:
        name, sep, kind = spec.partition("=")
        if not sep:
            raise CLIError(f"bad --kind {spec!r}: use KIND for every column or COLUMN=KIND")
        kinds[name] = kind
    return kinds


def _writable_folder(args) -> Path | None:
    """Where fit-attributes saves: --out, else MODEL itself when it is a folder of one's own."""
    if args.out:
        return Path(args.out)
    folder = Path(args.model)
    if not folder.is_dir():
        return None
    import semdiff

    package = Path(semdiff.__file__).resolve().parent
    if package in folder.resolve().parents:
        return None  # never write into the installed package
    return folder


def cmd_fit_attributes(args) -> int:
    from semdiff.attributes import fit_attributes

    target = _writable_folder(args)
    if target is None and not args.dry_run:
        raise CLIError(f"{args.model} is a named or bundled model; pass --out FOLDER to write a copy of it with "
                       "the new attributes (or --dry-run to only measure them)")
    labels = Path(args.labels)
    if not labels.is_file():
        raise CLIError(f"no labels file {labels}")
    model = _load(args)
    skipped: list[tuple[str, str]] = []
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = fit_attributes(
            model, args.images, labels, kind=_parse_kinds(args.kind), columns=args.columns, steps=args.steps,
            lr=args.lr, holdout=args.holdout, seed=args.seed, resize=not args.no_resize,
            weight_decay=args.weight_decay, encode_batch_size=args.batch_size, hflip=args.hflip,
        )
    for w in caught:
        text = str(w.message)
        if text.startswith("skipped unreadable image "):
            path, _, reason = text[len("skipped unreadable image "):].partition(" (")
            skipped.append((path, reason.rstrip(")")))
        else:
            print(f"semdiff fit-attributes: warning: {text}", file=sys.stderr)
    print(report.table())
    if args.report:
        Path(args.report).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    if not args.dry_run:
        folder = report.save(model, target)
        names = ", ".join(report.names[:3]) + (", ..." if len(report.names) > 3 else "")
        print(f"saved {len(report.names)} attribute(s) ({names}) to {folder}; the model now has "
              f"{len(model.attributes)}: e.g. semdiff manipulate IMAGE --model {folder} -a {report.names[0]}")
    return _report_skipped(skipped, "fit-attributes")


def cmd_align(args) -> int:
    from semdiff.align import LandmarkDetectorMissing, _to_pil, align_face, detect_landmarks
    from semdiff.features import list_images
    from semdiff.utils import progress_bar, progress_enabled

    try:
        files = list_images(args.images)
    except FileNotFoundError as err:
        raise CLIError(str(err)) from None
    out = Path(args.out)
    roots = [Path(p) for p in args.images if Path(p).is_dir()]
    skipped: list[tuple[str, str]] = []
    written = 0
    try:
        for f in progress_bar(files, total=len(files), enabled=progress_enabled(False if args.no_progress else None)
                              and len(files) > 1, desc="align"):
            try:
                img = _to_pil(f)
            except (ValueError, OSError) as err:
                skipped.append((str(f), str(err)))
                continue
            faces = detect_landmarks(img, upsample=args.upsample)
            if not faces:
                skipped.append((str(f), "no face found"))
                continue
            root = next((r for r in roots if r in f.parents), None)
            rel = f.relative_to(root) if root is not None else Path(f.name)
            for k, lm in enumerate(faces if args.all_faces else faces[:1]):
                name = rel.with_suffix(".png") if k == 0 else rel.with_name(f"{rel.stem}_{k}.png")
                (out / name).parent.mkdir(parents=True, exist_ok=True)
                align_face(img, args.size, landmarks=lm).save(out / name)
                written += 1
    except LandmarkDetectorMissing as err:
        raise CLIError(str(err)) from None
    print(f"wrote {written} aligned face(s) of {len(files) - len(skipped)} image(s) to {out}")
    if skipped:
        first = "; ".join(f"{p} ({r})" for p, r in skipped[:5])
        more = f" and {len(skipped) - 5} more" if len(skipped) > 5 else ""
        print(f"semdiff align: skipped {len(skipped)} image(s): {first}{more}", file=sys.stderr)
        return EXIT_SKIPPED
    return 0


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "features", help="semantic (and stochastic) codes of every image in folders/globs -> .safetensors or .npy",
        description="Encode every image (folders are searched recursively; globs may use **) into one file: "
                    ".safetensors (tensors z and x_T, file names in the metadata) or .npy (+ .x_T.npy, .files.txt). "
                    "Interrupted runs resume from <out>.partial/ without recomputing. Unreadable files are "
                    f"skipped and listed; the exit code is then {EXIT_SKIPPED}.")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--out", "-o", required=True, help="output .safetensors or .npy")
    p.add_argument("--stochastic", action="store_true", help="also store x_T (DDIM inversion: slow)")
    p.add_argument("--inversion-steps", type=int, default=None, help="DDIM inversion steps (default: the model's)")
    p.add_argument("--no-resume", action="store_true", help="ignore the progress of an interrupted run")
    p.add_argument("--workers", type=int, default=0, help="image-decoding worker processes (default 0)")
    p.add_argument("--shard-size", type=int, default=1024, help="save progress every this many images")
    p.add_argument("--resize", action="store_true", help="(default) resize + centre-crop images of another size")
    p.add_argument("--no-resize", action="store_true", help="skip images that are not the model's size")
    _model_args(p)
    p.set_defaults(func=cmd_features, batch_size=None)

    p = subparsers.add_parser(
        "fit-attributes", help="linear attribute classifiers from your labels, stored in the model folder",
        description="Fit linear heads on normalised semantic codes (Diff-AE's recipe: BCE + Adam, lr 1e-3, "
                    "batch 32; regression for continuous labels; one-vs-rest for categorical ones), print "
                    "held-out accuracy, and save them into the model folder so that `semdiff manipulate -a NAME` "
                    "works. LABELS.csv: a header row; the first column names image files (relative to IMAGES "
                    "or absolute), every other column is a label (0/1, -1/1, true/false, categories, numbers).")
    p.add_argument("model", help="model folder (updated in place unless --out), manifest or hf-hub name")
    p.add_argument("images", help="image folder or glob, or a features file from `semdiff features`")
    p.add_argument("labels", help="LABELS.csv")
    p.add_argument("--out", "-o", default=None, help="write the model with its new attributes here")
    p.add_argument("--kind", action="append", default=None,
                   help="auto (default), binary, categorical, continuous; or COLUMN=KIND (repeatable)")
    p.add_argument("--columns", nargs="+", default=None, help="use only these label columns")
    p.add_argument("--steps", type=int, default=None, help="Adam steps (default: the official 9375)")
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--weight-decay", type=float, default=0.0)
    p.add_argument("--holdout", type=float, default=0.2, help="fraction held out for the reported accuracy")
    p.add_argument("--hflip", action="store_true",
                   help="the official augmentation: also train on mirror images (needs images, not a features file)")
    p.add_argument("--report", default=None, help="also write the numbers as JSON here")
    p.add_argument("--dry-run", action="store_true", help="fit and report, save nothing")
    p.add_argument("--no-resize", action="store_true", help="skip images that are not the model's size")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cpu)")
    p.add_argument("--dtype", default=None, choices=["fp32", "bf16", "fp16"], help="compute precision")
    p.add_argument("--batch-size", type=int, default=None, help="encoding batch size (default: automatic)")
    p.add_argument("--offline", action="store_true", help="never touch the network (HF_HUB_OFFLINE)")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.add_argument("--seed", type=int, default=0, help="seed of the hold-out split and the training")
    p.set_defaults(func=cmd_fit_attributes)

    p = subparsers.add_parser(
        "align", help="FFHQ face alignment (landmark crop + rotation) of photos; needs the align extra",
        description="Detect faces with dlib's 68-point landmarks and write FFHQ-aligned crops (the recipe of "
                    "FFHQ and Diff-AE): pip install \"semdiff[align]\". Images without a face are listed; the exit "
                    f"code is then {EXIT_SKIPPED}.")
    p.add_argument("images", nargs="+", help="image files, folders or glob patterns")
    p.add_argument("--out", "-o", required=True, help="output folder (one PNG per face)")
    p.add_argument("--size", type=int, default=256, help="output side (default 256)")
    p.add_argument("--all-faces", action="store_true", help="every face, not only the first one found")
    p.add_argument("--upsample", type=int, default=1, help="detector upsampling: 2 finds smaller faces")
    p.add_argument("--no-progress", action="store_true", help="hide progress bars")
    p.set_defaults(func=cmd_align)
