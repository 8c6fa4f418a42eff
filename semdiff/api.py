"""The public API: one class for every family.

    model = SemanticAutoencoder.from_pretrained("diffae-ffhq256")
    z = model.encode(img)                  # semantic code
    x_T = model.encode_stochastic(img, z)  # stochastic code
    img2 = model.decode(z, x_T)            # near-exact reconstruction

Images go in as PIL images, paths, or float tensors in [0, 1] ((B,3,H,W) or (3,H,W)); they come
out as tensors in [0, 1] (``output_type="pt"``), numpy arrays (``"np"``) or PIL images (``"pil"``).
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Any, Iterable, Sequence

import torch

from semdiff.families.base import Family, FeatureNotSupported
from semdiff.images import to_model_input, to_output
from semdiff.interpolation import lerp, slerp  # noqa: F401  (re-exported)
from semdiff.utils import progress_bar, progress_enabled

Codes = tuple[torch.Tensor, torch.Tensor]


class SemanticAutoencoder:
    """A semantic diffusion autoencoder of any family: encoder, conditional denoiser, prior.

    Build it with :meth:`from_pretrained`; every method is batched, takes a ``torch.Generator``
    where randomness is involved, and shows progress bars unless ``progress=False`` (or the
    environment sets ``SEMDIFF_PROGRESS=0``).
    """

    def __init__(self, family: Family, *, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, name: str | None = None, batch_size: int = 16,
                 progress: bool | None = None):
        self.family = family
        self.name = name
        self.batch_size = batch_size
        self.progress = progress
        self.device = torch.device(device) if device is not None else torch.device("cpu")
        self.compute_dtype = _check_dtype(dtype, self.device)
        self.family.to(self.device)
        self._set_memory_format()

    # ------------------------------------------------------------------------------------------
    # Loading and saving

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str | os.PathLike | None = None,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
        *,
        revision: str | None = None,
        cache_dir: str | os.PathLike | None = None,
        local_files_only: bool | None = None,
        progress: bool | None = None,
        batch_size: int = 16,
    ) -> "SemanticAutoencoder":
        """Load a model by manifest name, ``hf-hub:org/repo[@revision]`` or local folder.

        With no name, the default model that ships inside the package is loaded (no network).
        ``dtype=torch.bfloat16`` (or ``"bf16"``) runs the networks under autocast in bf16; the
        weights and the sampler state stay float32.
        """
        from semdiff.io import load_model_folder

        if name_or_path is None:
            from semdiff.manifest import default_model_name

            name_or_path = default_model_name()
        path = Path(name_or_path)
        if path.is_dir():
            folder = path
        else:
            from semdiff.hub import resolve_model_dir

            folder = resolve_model_dir(str(name_or_path), revision=revision, cache_dir=cache_dir,
                                       local_files_only=local_files_only)
        family = load_model_folder(folder)
        return cls(family, device=device, dtype=_parse_dtype(dtype), name=str(name_or_path),
                   batch_size=batch_size, progress=progress)

    def save_pretrained(self, save_directory: str | os.PathLike, *, push_to_hub: bool = False,
                        repo_id: str | None = None, metrics: dict[str, Any] | None = None, **push_kwargs) -> Path:
        """Write ``config.json``, ``model.safetensors`` and a model card; optionally upload them."""
        from semdiff.io import save_model_folder

        folder = save_model_folder(self.family, save_directory)
        try:
            from semdiff.hub import write_model_card
        except ImportError:  # pragma: no cover - hub module missing
            write_model_card = None
        if write_model_card is not None:
            write_model_card(folder, self.family.get_config(), metrics=metrics)
        if push_to_hub:
            if not repo_id:
                raise ValueError("push_to_hub=True needs repo_id='org/name'")
            self.push_to_hub(repo_id, folder=folder, **push_kwargs)
        return folder

    def push_to_hub(self, repo_id: str, *, folder: str | os.PathLike | None = None, **kwargs) -> str:
        """Upload the model folder to the Hugging Face Hub; returns ``"hf-hub:<repo>@<commit>"``, the name
        that loads exactly what was pushed."""
        import tempfile

        from semdiff.hub import push_folder_to_hub

        if folder is None:
            with tempfile.TemporaryDirectory() as tmp:
                folder = self.save_pretrained(Path(tmp) / "model")
                return push_folder_to_hub(folder, repo_id, **kwargs)
        return push_folder_to_hub(folder, repo_id, **kwargs)

    # ------------------------------------------------------------------------------------------
    # Properties

    @property
    def family_name(self) -> str:
        return self.family.family_name

    @property
    def image_size(self) -> int:
        return self.family.image_size

    @property
    def code_dim(self) -> int:
        return self.family.code_dim

    @property
    def attributes(self) -> list[str]:
        return list(self.family.attribute_names)

    @property
    def has_prior(self) -> bool:
        return self.family.has_prior

    @property
    def config(self) -> dict[str, Any]:
        return self.family.get_config()

    def to(self, device=None, dtype=None) -> "SemanticAutoencoder":
        if device is not None:
            self.device = torch.device(device)
            self.family.to(self.device)
        if dtype is not None:
            self.compute_dtype = _check_dtype(_parse_dtype(dtype), self.device)
        self._set_memory_format()
        return self

    def _set_memory_format(self) -> None:
        # bf16 convolutions on CPUs run 1.1-1.35x faster channels-last (benchmarks/README.md); the
        # numbers stay within bf16 rounding. float32 keeps the contiguous layout of the parity tests.
        cl = self.compute_dtype == torch.bfloat16 and self.device.type == "cpu"
        self.family.to(memory_format=torch.channels_last if cl else torch.contiguous_format)

    def __repr__(self) -> str:
        return (f"SemanticAutoencoder(family={self.family_name!r}, name={self.name!r}, image_size={self.image_size}, "
                f"code_dim={self.code_dim}, prior={self.has_prior}, attributes={len(self.attributes)}, "
                f"device={str(self.device)!r})")

    # ------------------------------------------------------------------------------------------
    # Helpers

    def _steps(self, kind: str, steps: int | None) -> int:
        if steps is None:
            defaults = {**self.family.default_steps, **self.family.config.get("default_steps", {})}
            # "reconstruct": decoding an inverted x_T (reconstruct, interpolate); the decode default otherwise
            return int(defaults.get(kind, defaults["decode"]))
        if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
            raise ValueError(f"steps must be a positive integer, got {steps!r}")
        return steps

    def _progress(self, progress: bool | None) -> bool:
        return progress_enabled(progress if progress is not None else self.progress)

    @contextlib.contextmanager
    def _compute(self):
        with torch.inference_mode():
            if self.compute_dtype in (torch.bfloat16, torch.float16):
                with torch.autocast(self.device.type, dtype=self.compute_dtype):
                    yield
            else:
                yield

    def _images(self, images: Any, resize: bool) -> torch.Tensor:
        x01 = to_model_input(images, self.image_size, resize=resize)
        return (x01 * 2 - 1).to(self.device)

    def _codes(self, z: Any, name: str = "z") -> torch.Tensor:
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"{name} must be a tensor of codes (B, {self.code_dim}), got {type(z).__name__}")
        if z.dim() == 1:
            z = z[None]
        if z.dim() != 2 or z.shape[1] != self.code_dim:
            raise ValueError(f"{name} must have shape (B, {self.code_dim}), got {tuple(z.shape)}")
        if not torch.isfinite(z).all():
            raise ValueError(f"{name} contains NaN or infinite values")
        return z.float().to(self.device)

    def _stochastic(self, x_T: Any, n: int) -> torch.Tensor:
        shape = self.family.stochastic_shape()
        if not isinstance(x_T, torch.Tensor):
            raise TypeError(f"x_T must be a tensor of shape (B, {', '.join(map(str, shape))})")
        if x_T.dim() == len(shape):
            x_T = x_T[None]
        if tuple(x_T.shape[1:]) != shape or x_T.shape[0] != n:
            raise ValueError(f"x_T must have shape ({n}, {', '.join(map(str, shape))}), got {tuple(x_T.shape)}")
        if not torch.isfinite(x_T).all():
            raise ValueError("x_T contains NaN or infinite values")
        return x_T.float().to(self.device)

    def _random_stochastic(self, n: int, generator: torch.Generator | None) -> torch.Tensor:
        gen_device = generator.device if generator is not None else self.device
        return self.family.random_stochastic(n, generator=generator, device=gen_device).to(self.device)

    def _batches(self, n: int, progress: bool, desc: str) -> Iterable[slice]:
        starts = range(0, n, self.batch_size)
        bars = progress and len(starts) > 1
        for s in progress_bar(starts, total=len(starts), enabled=bars, desc=desc):
            yield slice(s, min(n, s + self.batch_size))

    def _inverted(self, decode_options: dict[str, Any]) -> dict[str, Any]:
        """Decode options for x_T from ``encode_stochastic``: the family's, then the caller's."""
        return {**self.family.inverted_decode_options, **decode_options}

    def _is_codes(self, value: Any) -> bool:
        return isinstance(value, tuple) and len(value) == 2 and all(isinstance(v, torch.Tensor) for v in value)

    # ------------------------------------------------------------------------------------------
    # The three parts

    def encode(self, images: Any, *, sample: bool = False, generator: torch.Generator | None = None,
               resize: bool = False, progress: bool | None = None) -> torch.Tensor:
        """Semantic codes (B, code_dim) of images; ``sample=True`` draws from a stochastic encoder."""
        x = self._images(images, resize)
        out = []
        with self._compute():
            for sl in self._batches(len(x), self._progress(progress), "encode"):
                out.append(self.family.encode(x[sl], sample=sample, generator=generator).float())
        return torch.cat(out)

    def encode_stochastic(self, images: Any, z: torch.Tensor | None = None, steps: int | None = None, *,
                          resize: bool = False, progress: bool | None = None, **options) -> torch.Tensor:
        """Stochastic codes x_T by deterministic inversion of the denoiser (default 250 steps)."""
        x = self._images(images, resize)
        z = self.encode(x.add(1).div(2), progress=False) if z is None else self._codes(z)
        if len(z) != len(x):
            raise ValueError(f"got {len(x)} images but {len(z)} codes")
        steps = self._steps("encode_stochastic", steps)
        out = []
        with self._compute():
            for sl in self._batches(len(x), self._progress(progress), "encode_stochastic"):
                out.append(self.family.encode_stochastic(x[sl], z[sl], steps=steps, progress=self._progress(progress),
                                                         **options).float())
        return torch.cat(out)

    def decode(self, z: torch.Tensor, x_T: torch.Tensor | None = None, steps: int | None = None, *,
               generator: torch.Generator | None = None, output_type: str = "pt", progress: bool | None = None,
               **options):
        """Images from semantic codes (and stochastic codes; random N(0, I) if ``x_T`` is None)."""
        z = self._codes(z)
        unknown = set(options) - self.family.decode_options
        if unknown:
            raise FeatureNotSupported(
                f"{self.family_name} decode has no option(s) {sorted(unknown)}; "
                f"it takes: {sorted(self.family.decode_options) or 'none'}"
            )
        noise = self._random_stochastic(len(z), generator) if x_T is None else None
        x_T = None if x_T is None else self._stochastic(x_T, len(z))
        steps = self._steps("decode", steps)
        out = []
        with self._compute():
            for sl in self._batches(len(z), self._progress(progress), "decode"):
                start = x_T[sl] if noise is None else self.family.start_state(z[sl], noise[sl], **options)
                x = self.family.decode(z[sl], start, steps=steps, generator=generator,
                                       progress=self._progress(progress), **options)
                out.append(x.float())
        return to_output((torch.cat(out) + 1) / 2, output_type)

    def reconstruct(self, images: Any, steps: int | None = None, *, inversion_steps: int | None = None,
                    inversion_options: dict[str, Any] | None = None, output_type: str = "pt", resize: bool = False,
                    progress: bool | None = None, **decode_options):
        """encode -> encode_stochastic -> decode: a near-exact reconstruction.

        ``inversion_options`` go to :meth:`encode_stochastic` (e.g. ``{"inverter": "fixed-point"}``),
        other keywords to :meth:`decode` (e.g. ``sampler="dpmsolver++"``).
        """
        x01 = to_model_input(images, self.image_size, resize=resize)
        z = self.encode(x01, progress=progress)
        x_T = self.encode_stochastic(x01, z, steps=inversion_steps, progress=progress, **(inversion_options or {}))
        return self.decode(z, x_T, steps=self._steps("reconstruct", steps), output_type=output_type,
                           progress=progress, **self._inverted(decode_options))

    def interpolate(self, a: Any, b: Any, num: int = 10, steps: int | None = None, *,
                    inversion_steps: int | None = None, inversion_options: dict[str, Any] | None = None,
                    mode: str | None = None, output_type: str = "pt", resize: bool = False,
                    progress: bool | None = None, **decode_options):
        """Decode ``num`` points between two images or two ``(z, x_T)`` codes.

        Codes are interpolated as the family prescribes (``mode``: "lerp" for Diff-AE and DiffuseVAE,
        "slerp" for LRDM's representations); x_T spherically (Diff-AE, LRDM) or held fixed (DiffuseVAE).
        """
        if num < 2:
            raise ValueError("num must be at least 2")
        (za, xa), (zb, xb) = (self._as_codes(v, inversion_steps, resize, progress, inversion_options) for v in (a, b))
        alpha = torch.linspace(0, 1, num)
        z = self.family.interpolate_codes(za, zb, alpha, mode=mode)
        if self.family.stochastic_interpolation == "slerp":
            x_T = slerp(xa, xb, alpha)
        else:
            x_T = xa[None].expand(num, *xa.shape).clone()
        return self.decode(z, x_T, steps=self._steps("reconstruct", steps), output_type=output_type,
                           progress=progress, **self._inverted(decode_options))

    def _as_codes(self, value: Any, inversion_steps, resize, progress, inversion_options=None) -> Codes:
        if self._is_codes(value):
            z, x_T = value
            z = self._codes(z)
            return z[0], self._stochastic(x_T, 1)[0]
        x01 = to_model_input(value, self.image_size, resize=resize)
        if len(x01) != 1:
            raise ValueError("interpolate takes one image (or one (z, x_T) pair) at each end")
        z = self.encode(x01, progress=progress)
        x_T = self.encode_stochastic(x01, z, steps=inversion_steps, progress=progress, **(inversion_options or {}))
        return z[0], x_T[0]

    def sample(self, n: int, steps: int | None = None, *, prior_steps: int | None = None,
               generator: torch.Generator | None = None, output_type: str = "pt", progress: bool | None = None,
               return_codes: bool = False, decode_options: dict[str, Any] | None = None, **prior_options):
        """Sample new images: codes from the representation prior, then decode from x_T ~ N(0, I).

        ``decode_options`` go to :meth:`decode` (e.g. ``{"sampler": "unipc"}``); other keywords to the prior.
        """
        if not self.family.has_prior:
            raise FeatureNotSupported(f"this {self.family_name} model has no representation prior, so it cannot sample; "
                                      "use decode() with codes from encode()")
        if n < 1:
            raise ValueError("n must be at least 1")
        decode_options = decode_options or {}
        # x_T's noise is drawn before the prior's: the official RNG order.
        noise = self._random_stochastic(n, generator)
        with self._compute():
            z = self.family.sample_codes(n, steps=self._steps("prior", prior_steps), generator=generator,
                                         progress=self._progress(progress), **prior_options).float()
            x_T = self.family.start_state(z, noise, **decode_options)
        images = self.decode(z, x_T, steps=steps, output_type=output_type, progress=progress, **decode_options)
        return (images, z, x_T) if return_codes else images

    def classify(self, images_or_codes: Any, *, resize: bool = False) -> dict[str, torch.Tensor]:
        """Attribute probabilities (sigmoid of the linear classifier) for images or codes."""
        z = self._codes(images_or_codes) if isinstance(images_or_codes, torch.Tensor) and images_or_codes.dim() <= 2 \
            else self.encode(images_or_codes, resize=resize, progress=False)
        with torch.inference_mode():
            probs = torch.sigmoid(self.family.classify(z).float()).cpu()
        return {name: probs[:, i] for i, name in enumerate(self.family.attribute_names)}

    def manipulate(self, images_or_codes: Any, attribute: str | dict[str, float], scale: float = 0.3,
                   steps: int | None = None, *, keep: Sequence[str] | str | None = None,
                   inversion_steps: int | None = None, inversion_options: dict[str, Any] | None = None,
                   output_type: str = "pt", resize: bool = False, progress: bool | None = None, **decode_options):
        """Move images (inverted first) or ``(z, x_T)`` codes along attribute directions and decode.

        ``attribute`` is a name (with ``scale``) or ``{name: scale}`` for several at once. ``keep``
        lists attributes to hold fixed, or ``"others"`` for every known attribute of another label: the
        edit direction is made orthogonal to their classifier weights. The step of the official recipe
        is ``scale * sqrt(code_dim)`` in the normalised space.
        """
        scales = {attribute: float(scale)} if isinstance(attribute, str) else {k: float(v) for k, v in attribute.items()}
        for name in scales:
            self.family.attribute_direction(name)  # validates the name before any expensive work
        if self._is_codes(images_or_codes):
            z, x_T = images_or_codes
            z = self._codes(z)
            x_T = self._stochastic(x_T, len(z))
        else:
            x01 = to_model_input(images_or_codes, self.image_size, resize=resize)
            z = self.encode(x01, progress=progress)
            x_T = self.encode_stochastic(x01, z, steps=inversion_steps, progress=progress,
                                         **(inversion_options or {}))
        with torch.inference_mode():
            z_edit = self.family.edit_codes(z, scales, keep=keep)
        return self.decode(z_edit, x_T, steps=self._steps("manipulate", steps), output_type=output_type,
                           progress=progress, **self._inverted(decode_options))


def _parse_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    names = {"fp32": torch.float32, "float32": torch.float32, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
             "fp16": torch.float16, "float16": torch.float16}
    if dtype not in names:
        raise ValueError(f"dtype must be one of {sorted(names)} or a torch.dtype, got {dtype!r}")
    return names[dtype]


def _check_dtype(dtype: torch.dtype | None, device: torch.device) -> torch.dtype:
    if dtype is None or dtype == torch.float32:
        return torch.float32
    if dtype not in (torch.bfloat16, torch.float16):
        raise ValueError(f"unsupported dtype {dtype}; use float32, bfloat16 or float16")
    if device.type == "cuda":
        if dtype == torch.bfloat16 and not torch.cuda.is_bf16_supported():
            raise ValueError("this GPU has no bfloat16 support; use dtype=torch.float16 or float32")
        return dtype
    if device.type == "cpu":
        if dtype == torch.float16:
            raise ValueError("float16 is not supported on the CPU; use bfloat16 (if the CPU has it) or float32")
        if not cpu_has_bf16():
            raise ValueError("this CPU has no native bfloat16 instructions (AVX512-BF16/AMX), so bf16 would be slower "
                             "than float32; use dtype=torch.float32")
    return dtype


def cpu_has_bf16() -> bool:
    """Whether the CPU runs bf16 matrix work natively (AVX512-BF16 or AMX)."""
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except Exception:  # pragma: no cover
        return False
