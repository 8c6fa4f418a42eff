"""Semantic (and stochastic) codes of whole image folders, streamed from disk, resumable.

    from semdiff import SemanticAutoencoder
    from semdiff.features import extract_features, iter_folder_codes, load_features

    model = SemanticAutoencoder.from_pretrained()
    for paths, z, x_T in iter_folder_codes(model, "photos/"):       # batches, as they are computed
        ...
    result = extract_features(model, "photos/**/*.jpg", "codes.safetensors")  # all of them, in one file
    files, z = result.files, result.z                                        # row i is files[i]

Images are decoded by a ``torch.utils.data.DataLoader`` (``num_workers`` processes decode while the
model runs), converted to RGB (transparency composited over white, EXIF orientation applied),
resized on their shorter side and centre-cropped to the model's size (``resize=True``, the same
preprocessing as ``model.encode(..., resize=True)``). Files that cannot be read are skipped with a
warning that names them and are listed in ``.skipped``.

``extract_features`` writes progress shards into ``<out>.partial/`` as it goes (atomically, every
``shard_size`` images or ``shard_seconds`` seconds, and on any exception or Ctrl-C), so a run that is
interrupted, even killed, resumes where it stopped: what is in the shards is never recomputed. When
every file is done, the shards are merged in sorted file order into the output and the partial
folder is deleted.

Output formats:

* ``.safetensors``: tensors ``z`` (N, code_dim) float32 and, with ``stochastic=True``, ``x_T``;
  metadata ``files`` (the file names, one per line, as ``semdiff encode`` writes them), ``model``,
  ``family``, ``code_dim``, ``image_size``, ``inversion_steps``. When the names would make the header
  larger than 1 MB they go into a JSON sidecar ``<out>.files.json`` (metadata ``files_sidecar``).
* ``.npy``: ``z`` in ``<out>.npy``, ``x_T`` in ``<out>.x_T.npy``, the names in ``<out>.files.txt``.

Both are read back by :func:`load_features`.
"""

from __future__ import annotations

import glob
import json
import math
import os
import shutil
import struct
import time
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Sequence

import torch
from torch.utils.data import DataLoader, Dataset

from semdiff.images import IMAGE_EXTENSIONS, ImageInputError, resize_center_crop

__all__ = [
    "FeatureResult",
    "FolderCodes",
    "auto_batch_size",
    "extract_features",
    "iter_folder_codes",
    "list_images",
    "load_features",
    "read_image_file",
]

#: Largest automatic batch on a GPU (halved on out-of-memory) and on the CPU (where larger batches
#: gain no throughput but make progress and resumption coarser).
MAX_BATCH_CUDA = 256
MAX_BATCH_CPU = 64
#: metadata larger than this goes into a sidecar file
MAX_METADATA_BYTES = 1 << 20


# ---------------------------------------------------------------------------------------------
# Files


def list_images(images: str | os.PathLike | Iterable[str | os.PathLike]) -> list[Path]:
    """Image files named by a folder (recursive), a glob pattern, a file, or a list of those.

    The result is sorted and free of duplicates. Raises ``FileNotFoundError`` naming a folder or
    pattern that holds no image, or a file that does not exist.
    """
    items = [images] if isinstance(images, (str, os.PathLike)) else list(images)
    if not items:
        raise FileNotFoundError("no images given")
    found: dict[str, Path] = {}
    for item in items:
        p = Path(item).expanduser()
        if p.is_dir():
            hits = [f for f in p.rglob("*") if f.is_file() and f.suffix.lower() in IMAGE_EXTENSIONS]
            if not hits:
                raise FileNotFoundError(f"no image files ({', '.join(IMAGE_EXTENSIONS)}) in folder {p}")
        elif p.is_file():
            hits = [p]
        elif glob.has_magic(str(item)):
            hits = [Path(m) for m in glob.glob(str(p), recursive=True)
                    if Path(m).is_file() and Path(m).suffix.lower() in IMAGE_EXTENSIONS]
            if not hits:
                raise FileNotFoundError(f"no image files match {str(item)!r}")
        else:
            raise FileNotFoundError(f"no such image file or folder: {item}")
        for f in hits:
            found.setdefault(str(f), f)
    return [found[k] for k in sorted(found)]


def _decode(path: str | os.PathLike, size: int, resize: bool) -> torch.Tensor:
    from PIL import Image, ImageOps

    with Image.open(path) as opened:
        img = ImageOps.exif_transpose(opened)
        img.load()
        img = img.copy() if img is opened else img
    if img.mode in ("RGBA", "LA", "PA") or (img.mode == "P" and "transparency" in img.info):
        rgba = img.convert("RGBA")
        img = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
        img.alpha_composite(rgba)
    elif img.mode.startswith("I") or img.mode == "F":
        # 16-bit / 32-bit / float grey: Pillow's convert("RGB") would clip it at 255
        import numpy as np

        arr = np.asarray(img, dtype=np.float64)
        top = 1.0 if img.mode == "F" and arr.max() <= 1.0 else 255.0 if arr.max() <= 255 else 65535.0
        img = Image.fromarray(np.clip(np.rint(arr / top * 255), 0, 255).astype(np.uint8), "L")
    img = img.convert("RGB")
    if img.size != (size, size):
        if not resize:
            raise ImageInputError(f"it is {img.size[0]}x{img.size[1]}, the model expects {size}x{size} "
                                  "(pass resize=True / --resize to resize and centre-crop)")
        img = resize_center_crop(img, size)
    data = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8)
    return data.reshape(size, size, 3).permute(2, 0, 1).float().div_(255.0)


def _reason(err: BaseException) -> str:
    return str(err) if isinstance(err, ImageInputError) else f"{type(err).__name__}: {err}"


def read_image_file(path: str | os.PathLike, size: int, *, resize: bool = True) -> torch.Tensor:
    """One image file -> float32 (3, size, size) in [0, 1]; raises ``ImageInputError`` naming the file.

    RGB conversion with transparency composited over white, EXIF orientation applied; with
    ``resize=True`` the shorter side is resized to ``size`` and the centre cropped (the official
    preprocessing, identical to ``model.encode(path, resize=True)`` for RGB files).
    """
    try:
        return _decode(path, size, resize)
    except Exception as err:  # noqa: BLE001 - any decoder failure makes the file unreadable
        raise ImageInputError(f"cannot read image {path}: {_reason(err)}") from None


class _FileDataset(Dataset):
    def __init__(self, files: Sequence[Path], size: int, resize: bool):
        self.files = [str(f) for f in files]
        self.size = size
        self.resize = resize

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int):
        path = self.files[i]
        try:
            return path, _decode(path, self.size, self.resize), None
        except Exception as err:  # noqa: BLE001 - reported, not raised
            return path, None, _reason(err)


def _collate(items):
    paths = [p for p, x, _ in items if x is not None]
    x = torch.stack([x for _, x, _ in items if x is not None]) if paths else None
    failed = [(p, e) for p, x, e in items if x is None]
    return paths, x, failed


# ---------------------------------------------------------------------------------------------
# Batch size


def _available_memory() -> int:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_AVPHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 8 << 30


def bytes_per_image(model, stochastic: bool = False) -> int:
    """A rough estimate of the activation memory one image needs in the encoder (or the UNet)."""
    network = model.config.get("network") or {}
    width = int(network.get("model_channels", 128))
    mult = max(network.get("channel_mult") or [1])
    size = model.image_size
    # a handful of live float32 feature maps at full resolution, plus the deeper levels
    per = 4 * size * size * width * 12
    if stochastic:
        per = int(per * max(1.0, mult / 2))
    return per


def auto_batch_size(model, *, stochastic: bool = False, n: int | None = None, budget_bytes: int | None = None) -> int:
    """The largest power of two (at most 256 on a GPU, 64 on the CPU, and at most ``n``) that fits.

    On the CPU the fit is estimated from :func:`bytes_per_image` against ``budget_bytes`` (default:
    a quarter of the available memory, at most 4 GiB). On a GPU the returned size is only the first
    try: :class:`FolderCodes` halves it whenever the device runs out of memory.
    """
    cap = MAX_BATCH_CUDA if model.device.type == "cuda" else MAX_BATCH_CPU
    if n is not None:
        cap = max(1, min(cap, 1 << max(0, math.ceil(math.log2(max(1, n))))))
    if model.device.type == "cuda":
        return cap
    budget = budget_bytes if budget_bytes is not None else min(4 << 30, _available_memory() // 4)
    fits = max(1, budget // max(1, bytes_per_image(model, stochastic)))
    bs = 1
    while bs * 2 <= min(cap, fits):
        bs *= 2
    return bs


@contextmanager
def _model_batch_size(model, bs: int):
    old = model.batch_size
    model.batch_size = bs
    try:
        yield
    finally:
        model.batch_size = old


# ---------------------------------------------------------------------------------------------
# Streaming


class FolderCodes:
    """Iterator over ``(paths, z, x_T or None)`` batches of a list of image files; see :func:`iter_folder_codes`.

    ``files`` are the files to encode, ``skipped`` collects ``(path, reason)`` of the unreadable ones
    as they are met, ``batch_size`` is the size in use (it shrinks after an out-of-memory error).
    """

    def __init__(self, model, files: Sequence[str | os.PathLike], *, batch_size: int | None = None,
                 stochastic: bool = False, steps: int | None = None, num_workers: int = 0, resize: bool = True,
                 hflip: bool = False):
        if batch_size is not None and (not isinstance(batch_size, int) or batch_size < 1):
            raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
        self.model = model
        self.files = [Path(f) for f in files]
        self.stochastic = stochastic
        self.steps = steps
        self.resize = resize
        self.hflip = hflip
        self.batch_size = batch_size or auto_batch_size(model, stochastic=stochastic, n=len(self.files))
        self.skipped: list[tuple[str, str]] = []
        self.num_images = 0
        self._loader = DataLoader(_FileDataset(self.files, model.image_size, resize), batch_size=self.batch_size,
                                  shuffle=False, num_workers=num_workers, collate_fn=_collate,
                                  persistent_workers=False, pin_memory=model.device.type == "cuda")
        self._it: Iterator | None = None

    def __len__(self) -> int:
        """Number of batches."""
        return len(self._loader)

    def __iter__(self) -> "FolderCodes":
        self._it = iter(self._loader)
        return self

    def __next__(self) -> tuple[list[str], torch.Tensor, torch.Tensor | None]:
        if self._it is None:
            self.__iter__()
        while True:
            paths, x, failed = next(self._it)  # StopIteration ends the iteration
            for path, reason in failed:
                self.skipped.append((path, reason))
                warnings.warn(f"skipped unreadable image {path} ({reason})", stacklevel=2)
            if paths:
                break
        if self.hflip:
            x = x.flip(-1)
        z = self._run(lambda: self.model.encode(x, progress=False))
        x_T = None
        if self.stochastic:
            x_T = self._run(lambda: self.model.encode_stochastic(x, z, steps=self.steps, progress=False))
        self.num_images += len(paths)
        return paths, z.cpu(), None if x_T is None else x_T.cpu()

    def _run(self, fn: Callable[[], torch.Tensor]) -> torch.Tensor:
        while True:
            try:
                with _model_batch_size(self.model, self.batch_size):
                    return fn()
            except torch.OutOfMemoryError:
                if self.batch_size == 1:
                    raise
                self.batch_size //= 2
                if torch.cuda.is_available():
                    torch.cuda.empty_cache()
                warnings.warn(f"out of memory: batch size lowered to {self.batch_size}", stacklevel=3)


def iter_folder_codes(model, images: str | os.PathLike | Iterable[str | os.PathLike], *,
                      batch_size: int | None = None, stochastic: bool = False, steps: int | None = None,
                      num_workers: int = 0, resize: bool = True, hflip: bool = False) -> FolderCodes:
    """Stream ``(paths, z, x_T or None)`` batches of every image in a folder, glob or list of files.

    ``model`` is a :class:`semdiff.SemanticAutoencoder`. Files are taken in sorted order; unreadable
    ones are skipped with a warning naming them and collected in the iterator's ``.skipped``.
    ``batch_size=None`` picks one automatically (:func:`auto_batch_size`); ``stochastic=True`` also
    inverts each image to its stochastic code x_T with ``steps`` DDIM steps (default: the model's).
    ``hflip=True`` encodes the mirror images instead (for flip augmentation). Codes are returned on the CPU.
    """
    return FolderCodes(model, list_images(images), batch_size=batch_size, stochastic=stochastic, steps=steps,
                       num_workers=num_workers, resize=resize, hflip=hflip)


# ---------------------------------------------------------------------------------------------
# Shards and output files


@dataclass
class FeatureResult:
    """What :func:`extract_features` wrote (or :func:`load_features` read).

    ``files[i]`` is the image of row ``i`` of ``z`` (and ``x_T``, loaded lazily from the file on
    first access, since stochastic codes of many images are large). ``skipped`` lists
    ``(file, reason)`` of unreadable images, ``computed``/``reused`` how many images this run encoded
    and how many it took from an interrupted run's shards, ``seconds`` the time it took.
    """

    path: Path
    files: list[str]
    z: torch.Tensor
    skipped: list[tuple[str, str]] = field(default_factory=list)
    computed: int = 0
    reused: int = 0
    seconds: float = 0.0
    metadata: dict[str, str] = field(default_factory=dict)
    _x_T: torch.Tensor | None = field(default=None, repr=False)
    _has_x_T: bool = field(default=False, repr=False)

    @property
    def has_x_T(self) -> bool:
        return self._has_x_T

    @property
    def x_T(self) -> torch.Tensor | None:
        if self._x_T is None and self._has_x_T:
            self._x_T = _read_tensor(self.path, "x_T")
        return self._x_T

    @property
    def images_per_second(self) -> float:
        return self.computed / self.seconds if self.seconds > 0 else float("nan")

    def index(self) -> dict[str, int]:
        """File name -> row."""
        return {f: i for i, f in enumerate(self.files)}


def _partial_dir(out: Path) -> Path:
    return out.with_name(out.name + ".partial")


def _fingerprint(model, stochastic: bool, steps: int | None, resize: bool) -> dict[str, Any]:
    """What must be equal for shards of an earlier run to be reused (a hash of the weights' bytes)."""
    import hashlib

    h = hashlib.blake2b(json.dumps(model.config, sort_keys=True, default=str).encode(), digest_size=16)
    for name, t in sorted(model.family.state_dict().items()):
        if name.startswith("encoder.") or (stochastic and name.startswith("unet.")) or name.startswith("codes_"):
            h.update(name.encode())
            h.update(t.detach().to("cpu").contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return {"weights": h.hexdigest(), "stochastic": bool(stochastic),
            "steps": model._steps("encode_stochastic", steps) if stochastic else None, "resize": bool(resize),
            "image_size": model.image_size, "code_dim": model.code_dim}


class _Shards:
    """``<out>.partial/``: a ``run.json`` fingerprint and ``shard_NNNNN.safetensors`` files."""

    def __init__(self, out: Path, fingerprint: dict[str, Any], resume: bool):
        self.dir = _partial_dir(out)
        self.fingerprint = fingerprint
        if self.dir.exists() and not resume:
            shutil.rmtree(self.dir)
        if self.dir.exists():
            run = self.dir / "run.json"
            old = json.loads(run.read_text()) if run.is_file() else None
            if old != fingerprint:
                raise ValueError(
                    f"{self.dir} holds the progress of a run with other settings or another model "
                    f"({_differences(old, fingerprint)}); delete it or pass resume=False (--no-resume) to start over")
        self.dir.mkdir(parents=True, exist_ok=True)
        _atomic_write_text(self.dir / "run.json", json.dumps(fingerprint, indent=1))
        self.paths = sorted(self.dir.glob("shard_*.safetensors"))
        self.next_index = 1 + max((int(p.stem.split("_")[1]) for p in self.paths), default=-1)

    def done(self) -> dict[str, tuple[Path, int]]:
        """File -> (shard, row) of everything already computed."""
        from safetensors import safe_open

        out: dict[str, tuple[Path, int]] = {}
        for path in self.paths:
            with safe_open(str(path), "pt") as f:
                files = json.loads(f.metadata()["files"])
            for row, name in enumerate(files):
                out[name] = (path, row)
        return out

    def write(self, files: list[str], z: torch.Tensor, x_T: torch.Tensor | None) -> Path:
        from safetensors.torch import save_file

        path = self.dir / f"shard_{self.next_index:05d}.safetensors"
        tmp = path.with_name(path.name + ".tmp")
        tensors = {"z": z.contiguous()}
        if x_T is not None:
            tensors["x_T"] = x_T.contiguous()
        save_file(tensors, str(tmp), metadata={"files": json.dumps(files)})
        os.replace(tmp, path)
        self.next_index += 1
        self.paths.append(path)
        return path


def _differences(old: dict | None, new: dict) -> str:
    if old is None:
        return "no run.json"
    keys = [k for k in sorted(set(old) | set(new)) if old.get(k) != new.get(k)]
    return ", ".join(f"{k}: {old.get(k)!r} then, {new.get(k)!r} now" for k in keys)


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def _rows_in_order(order: list[tuple[Path, int]], name: str, chunk: int = 4096) -> Iterator[torch.Tensor]:
    """Rows of tensor ``name`` gathered from shards in the given order, in chunks of consecutive rows."""
    from safetensors import safe_open

    handles: dict[Path, Any] = {}
    try:
        i = 0
        while i < len(order):
            shard, row = order[i]
            j = i + 1
            while j < len(order) and j - i < chunk and order[j][0] == shard and order[j][1] == order[j - 1][1] + 1:
                j += 1
            if shard not in handles:
                handles[shard] = safe_open(str(shard), "pt")
            yield handles[shard].get_slice(name)[row:row + (j - i)]
            i = j
    finally:
        handles.clear()


def _shape_of(shard: Path, name: str) -> tuple[int, ...]:
    from safetensors import safe_open

    with safe_open(str(shard), "pt") as f:
        return tuple(f.get_slice(name).get_shape())


def _write_safetensors_streaming(path: Path, sections: list[tuple[str, tuple[int, ...], Callable[[], Iterator[torch.Tensor]]]],
                                 metadata: dict[str, str]) -> None:
    """Write float32 tensors into a .safetensors file chunk by chunk (never all in memory)."""
    header: dict[str, Any] = {"__metadata__": metadata}
    offset = 0
    for name, shape, _ in sections:
        nbytes = 4 * math.prod(shape)
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name, shape, chunks in sections:
            written = 0
            for c in chunks():
                c = c.detach().to("cpu", torch.float32).contiguous()
                f.write(c.numpy().tobytes())
                written += c.numel()
            if written != math.prod(shape):
                raise RuntimeError(f"internal error: wrote {written} values of {name}, expected {math.prod(shape)}")
    os.replace(tmp, path)


def _write_npy_streaming(path: Path, shape: tuple[int, ...], chunks: Iterator[torch.Tensor]) -> None:
    import numpy as np

    tmp = path.with_name(path.name + ".tmp.npy")
    arr = np.lib.format.open_memmap(tmp, mode="w+", dtype=np.float32, shape=shape)
    i = 0
    for c in chunks:
        arr[i:i + len(c)] = c.numpy()
        i += len(c)
    arr.flush()
    del arr
    os.replace(tmp, path)


def _npy_paths(out: Path) -> tuple[Path, Path, Path]:
    stem = out.with_suffix("")
    return out, stem.with_name(stem.name + ".x_T.npy"), stem.with_name(stem.name + ".files.txt")


def _sidecar_json(out: Path) -> Path:
    return out.with_suffix("").with_name(out.with_suffix("").name + ".files.json")


def _read_tensor(path: Path, name: str) -> torch.Tensor:
    if path.suffix == ".npy":
        import numpy as np

        z_path, x_path, _ = _npy_paths(path)
        return torch.from_numpy(np.load(z_path if name == "z" else x_path))
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return f.get_tensor(name)


def load_features(path: str | os.PathLike) -> FeatureResult:
    """Read a file written by :func:`extract_features` (or ``semdiff features`` / ``semdiff encode``)."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no features file {path}")
    if path.suffix == ".npy":
        import numpy as np

        _, x_path, files_path = _npy_paths(path)
        if not files_path.is_file():
            raise FileNotFoundError(f"{path} has no file list {files_path}")
        files = files_path.read_text().splitlines()
        z = torch.from_numpy(np.load(path))
        if len(files) != len(z):
            raise ValueError(f"{files_path} names {len(files)} files but {path} has {len(z)} rows")
        return FeatureResult(path, files, z, _has_x_T=x_path.is_file())
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        keys = set(f.keys())
        if "z" not in keys:
            raise ValueError(f"{path} has no tensor 'z'; is it a features file?")
        z = f.get_tensor("z")
    if "files_sidecar" in meta:
        files = json.loads((path.parent / meta["files_sidecar"]).read_text())
    elif "files" in meta:
        files = meta["files"].split("\n") if meta["files"] else []
    else:
        raise ValueError(f"{path} has no file names in its metadata")
    if len(files) != len(z):
        raise ValueError(f"{path} names {len(files)} files but has {len(z)} rows")
    return FeatureResult(path, files, z, metadata=meta, _has_x_T="x_T" in keys)


# ---------------------------------------------------------------------------------------------
# The whole job


def extract_features(
    model,
    images: str | os.PathLike | Iterable[str | os.PathLike],
    out_path: str | os.PathLike,
    *,
    stochastic: bool = False,
    steps: int | None = None,
    resume: bool = True,
    batch_size: int | None = None,
    num_workers: int = 0,
    resize: bool = True,
    shard_size: int = 1024,
    shard_seconds: float = 60.0,
    progress: bool | None = None,
    callback: Callable[[int, int], None] | None = None,
) -> FeatureResult:
    """Encode every image of a folder / glob / list into ``out_path`` (.safetensors or .npy).

    Resumable: progress goes to ``<out_path>.partial/`` every ``shard_size`` images or
    ``shard_seconds`` seconds (and when an exception or Ctrl-C stops the run); a later call with
    the same model and settings skips every file found there (``resume=False`` starts afresh).
    The output rows follow the sorted file order. ``callback(done, total)`` is called after each
    batch. Unreadable files are skipped with a warning and listed in ``result.skipped``.
    """
    from semdiff.utils import progress_enabled

    t0 = time.perf_counter()
    out = Path(out_path)
    if out.suffix not in (".safetensors", ".npy"):
        raise ValueError(f"output must end in .safetensors or .npy, got {out}")
    if shard_size < 1:
        raise ValueError("shard_size must be at least 1")
    files = [str(f) for f in list_images(images)]
    out.parent.mkdir(parents=True, exist_ok=True)
    shards = _Shards(out, _fingerprint(model, stochastic, steps, resize), resume)
    done = shards.done()
    todo = [f for f in files if f not in done]
    reused = len(files) - len(todo)
    total = len(files)

    bar = None
    if progress_enabled(progress if progress is not None else model.progress) and todo:
        from tqdm.auto import tqdm

        bar = tqdm(total=total, initial=reused, desc="features", unit="img", dynamic_ncols=True)
    stream = FolderCodes(model, todo, batch_size=batch_size, stochastic=stochastic, steps=steps,
                         num_workers=num_workers, resize=resize) if todo else None
    buf_files: list[str] = []
    buf_z: list[torch.Tensor] = []
    buf_x: list[torch.Tensor] = []
    last_flush = time.monotonic()

    def flush() -> None:
        nonlocal last_flush
        if buf_files:
            shards.write(list(buf_files), torch.cat(buf_z), torch.cat(buf_x) if buf_x else None)
            buf_files.clear(), buf_z.clear(), buf_x.clear()
        last_flush = time.monotonic()

    try:
        for paths, z, x_T in stream or ():
            buf_files.extend(paths)
            buf_z.append(z)
            if x_T is not None:
                buf_x.append(x_T)
            if len(buf_files) >= shard_size or time.monotonic() - last_flush >= shard_seconds:
                flush()
            if bar is not None:
                bar.update(len(paths))
            if callback is not None:
                callback(reused + stream.num_images, total)
    finally:
        # keep what is done, however the loop ended (an exception, Ctrl-C)
        try:
            flush()
        finally:
            if bar is not None:
                bar.close()
    skipped = list(stream.skipped) if stream is not None else []

    done = shards.done()
    order_files = [f for f in files if f in done]
    order = [done[f] for f in order_files]
    n = len(order_files)
    if n == 0:
        raise ImageInputError(f"none of the {len(files)} image files could be read "
                              f"(first: {skipped[0][0]}: {skipped[0][1]})" if skipped else "no images")
    z_shape = (n, model.code_dim)
    x_shape = (n, *_shape_of(order[0][0], "x_T")[1:]) if stochastic else None
    meta = {"model": str(model.name), "family": model.family_name, "code_dim": str(model.code_dim),
            "image_size": str(model.image_size), "format": "pt",
            "inversion_steps": str(shards.fingerprint["steps"]) if stochastic else ""}
    if isinstance(images, (str, os.PathLike)) and Path(images).expanduser().is_dir():
        meta["root"] = str(Path(images).expanduser())  # the CSV of fit-attributes may name files relative to it
    if out.suffix == ".npy":
        z_path, x_path, files_path = _npy_paths(out)
        _write_npy_streaming(z_path, z_shape, _rows_in_order(order, "z"))
        if stochastic:
            _write_npy_streaming(x_path, x_shape, _rows_in_order(order, "x_T"))
        _atomic_write_text(files_path, "".join(f + "\n" for f in order_files))
    else:
        names = "\n".join(order_files)
        if len(names.encode()) > MAX_METADATA_BYTES:
            sidecar = _sidecar_json(out)
            _atomic_write_text(sidecar, json.dumps(order_files))
            meta["files_sidecar"] = sidecar.name
        else:
            meta["files"] = names
        sections = [("z", z_shape, lambda: _rows_in_order(order, "z"))]
        if stochastic:
            sections.append(("x_T", x_shape, lambda: _rows_in_order(order, "x_T")))
        _write_safetensors_streaming(out, sections, meta)
    shutil.rmtree(shards.dir, ignore_errors=True)
    result = load_features(out)
    result.skipped = skipped
    result.computed = stream.num_images if stream is not None else 0
    result.reused = reused
    result.seconds = time.perf_counter() - t0
    return result
