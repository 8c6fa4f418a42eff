"""Model cards (README.md) for models trained with ``semdiff train``, with ``semdiff evaluate`` figures."""

from __future__ import annotations

import json
from typing import Any, Mapping

CC_BY_SA = "cc-by-sa-4.0"


def _fmt(value: Any, digits: int = 4) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        if value == float("inf"):
            return "inf"
        return f"{value:.{digits}g}" if abs(value) < 1e4 else f"{value:.1f}"
    return str(value)


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """The tables of an ``evaluate`` result (see :func:`semdiff.evaluation.evaluate_model`)."""
    lines: list[str] = []
    data = metrics.get("data", {})
    lines.append(f"Held-out split: **{data.get('split', '?')}** of `{data.get('name', '?')}` "
                 f"({data.get('items', '?')} images never used in training; {data.get('split_rule', '')}).")
    lines.append("")
    rec = metrics.get("reconstruction")
    if rec:
        lines.append("**Reconstruction** (images in [0, 1]; decoded with "
                     f"{rec.get('decode_steps', '?')} DDIM steps)")
        lines.append("")
        lines.append("| code | MSE | PSNR (dB) | SSIM |")
        lines.append("| --- | --- | --- | --- |")
        for row in rec.get("rows", []):
            lines.append(f"| {row['name']} | {_fmt(row['mse'])} | {_fmt(row['psnr'], 4)} | {_fmt(row['ssim'])} |")
        lines.append("")
    probe = metrics.get("probe")
    if probe:
        lines.append(f"**Linear probes** (multinomial logistic regression fitted on the training split's codes, "
                     f"accuracy on the held-out split; baseline: PCA of the pixels with the same number of "
                     f"dimensions, {probe.get('dims', '?')})")
        lines.append("")
        lines.append("| label | classes | z_sem | PCA pixels | majority class |")
        lines.append("| --- | --- | --- | --- | --- |")
        for row in probe.get("rows", []):
            lines.append(f"| {row['label']} | {row['classes']} | {_fmt(row['z_sem'], 3)} | {_fmt(row['pca'], 3)} | "
                         f"{_fmt(row['majority'], 3)} |")
        lines.append("")
    edit = metrics.get("edit")
    if edit:
        lines.append(f"**Attribute edits** (held-out images, scale {edit.get('scale')}, decoded, re-encoded and "
                     "classified; success = the edited attribute's probability rises and crosses 0.5 while every "
                     "other attribute's prediction stays)")
        lines.append("")
        lines.append("| attribute | n | moved right way | crossed 0.5 | others kept | success |")
        lines.append("| --- | --- | --- | --- | --- | --- |")
        for row in edit.get("rows", []):
            lines.append(f"| {row['attribute']} | {row['n']} | {_fmt(row['moved'], 3)} | {_fmt(row['flipped'], 3)} | "
                         f"{_fmt(row['others_kept'], 3)} | {_fmt(row['success'], 3)} |")
        if "mean_success" in edit:
            lines.append(f"| **mean** | | {_fmt(edit.get('mean_moved'), 3)} | {_fmt(edit.get('mean_flipped'), 3)} | "
                         f"{_fmt(edit.get('mean_others_kept'), 3)} | {_fmt(edit['mean_success'], 3)} |")
        lines.append("")
    fd = metrics.get("sample_quality")
    if fd:
        lines.append("**Sample quality**")
        lines.append("")
        for key, value in fd.items():
            if isinstance(value, (int, float)):
                lines.append(f"- {key}: {_fmt(value)}")
            elif isinstance(value, str):
                lines.append(f"- {key}: {value}")
            elif isinstance(value, Mapping):
                lines.append(f"- {key}: " + ", ".join(f"{k} {_fmt(v)}" for k, v in value.items()))
        lines.append("")
    if metrics.get("runtime_s") is not None:
        lines.append(f"(evaluation took {metrics['runtime_s']:.0f} s on {metrics.get('device', '?')})")
    return "\n".join(lines)


def render_model_card(config: Mapping[str, Any], *, name: str, metrics: Mapping[str, Any] | None = None) -> str:
    """The model card of a trained model; a family's ``semdiff.families.<family>.training.render_card``
    writes its own where it has one."""
    from semdiff.training.config import family_training_module

    render_card = getattr(family_training_module(config.get("family", "diffae")), "render_card", None)
    if render_card is not None:
        return render_card(dict(config), name=name, metrics=dict(metrics) if metrics else None)
    training = config.get("training") or {}
    data_license = training.get("data_license") or ""
    openmoji = "OpenMoji" in data_license or training.get("data") == "emoji"
    license_id = CC_BY_SA if openmoji else "other"
    net = config.get("network", {})
    prior = config.get("latent_prior")
    attrs = config.get("attributes") or []
    front = ["---", "library_name: semdiff", f"license: {license_id}",
             "tags:", "- semdiff", f"- {config.get('family', 'diffae')}", "- diffusion", "- autoencoder",
             "pipeline_tag: image-to-image", "---", ""]
    body = [f"# {name}", ""]
    body.append(f"A semantic diffusion autoencoder (family `{config.get('family')}`, Diff-AE) trained from scratch with "
                f"`semdiff train` on `{training.get('data', '?')}` at {config.get('image_size', net.get('image_size'))}x"
                f"{config.get('image_size', net.get('image_size'))}: semantic encoder + z-conditioned UNet, "
                + ("a latent DDIM prior on the normalised codes, " if prior else "")
                + (f"and a linear classifier of {len(attrs)} attributes on the normalised codes." if attrs else "") )
    body.append("")
    body.append("```python\nfrom semdiff import SemanticAutoencoder\nmodel = SemanticAutoencoder.from_pretrained("
                f"\"{name}\")\n```")
    body.append("")
    if openmoji:
        body.append("## Licence")
        body.append("")
        body.append("Trained on emoji images rendered from the **OpenMoji** font: \"All emojis designed by OpenMoji – "
                    "the open-source emoji and icon project. License: CC BY-SA 4.0\" (https://openmoji.org, "
                    "https://creativecommons.org/licenses/by-sa/4.0/). These weights, and the images they produce, "
                    "are adaptations of that artwork and are shared under **CC BY-SA 4.0** with the same "
                    "attribution. Labels: Unicode emoji-test.txt, (c) Unicode, Inc., Unicode License.")
        body.append("")
    elif data_license:
        body.append("## Data licence")
        body.append("")
        body.append(data_license)
        body.append("")
    body.append("## Training")
    body.append("")
    stages = training.get("stages", {})
    wall = training.get("wall_time_s", {})
    body.append("| stage | steps | batch | lr | loss | wall time |")
    body.append("| --- | --- | --- | --- | --- | --- |")
    for stage, info in stages.items():
        if info.get("steps"):
            minutes = f"{wall[stage] / 60:.1f} min" if stage in wall else "-"
            body.append(f"| {stage} | {info['steps']} | {info.get('batch_size')} | {info.get('lr')} | "
                        f"{info.get('loss')} | {minutes} |")
    body.append("")
    body.append(f"AdamW, gradient clipping {training.get('grad_clip')}, EMA, seed {training.get('seed')}, "
                f"{training.get('data_items', '?')} training images; {training.get('split', '')} "
                f"(holdout {training.get('holdout')}).")
    body.append("")
    body.append("Architecture: " + json.dumps({k: net.get(k) for k in ("model_channels", "channel_mult", "num_res_blocks",
                                                                       "attention_resolutions", "z_dim",
                                                                       "enc_channel_mult")}))
    if prior:
        body.append("")
        body.append("Latent prior: " + json.dumps({k: prior.get(k) for k in ("hidden_channels", "num_layers")}))
    if attrs:
        body.append("")
        body.append("Attributes: " + ", ".join(f"`{a}`" for a in attrs))
    body.append("")
    body.append("## Evaluation")
    body.append("")
    if metrics:
        body.append(metrics_markdown(metrics))
    else:
        body.append("Not evaluated yet: `semdiff evaluate <model folder> --write-card`.")
    body.append("")
    return "\n".join(front + body)
