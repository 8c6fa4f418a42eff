"""``semdiff train`` and ``semdiff evaluate``.

    semdiff train --preset emoji32 --out runs/emoji32            # ~1 hour on 2 CPU cores
    semdiff train --resume --out runs/emoji32                     # continue a killed run
    accelerate launch -m semdiff train --data PATH --out runs/x   # several GPUs / nodes
    semdiff evaluate runs/emoji32/model --data emoji --split test --out metrics.json --write-card
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

DEFAULT_PRESET_FOR_DATA = {"emoji": "emoji32", "shapes": "shapes32"}


def register(subparsers) -> None:
    p = subparsers.add_parser(
        "train", help="train a model on an image folder or a built-in data set (Diff-AE: autoencoder, prior, "
                      "attribute classifier)",
        description="Train a semantic diffusion autoencoder. Stages: autoencoder (eps loss), latent prior on the "
                    "frozen encoder's normalised codes, linear attribute classifiers (when the data has labels). "
                    "Checkpoints are written atomically every --ckpt-every steps; --resume continues the run in "
                    "--out from the last one. Multi-GPU / multi-node: accelerate launch -m semdiff train ...")
    p.add_argument("--data", help="emoji | shapes | an image folder or glob (default: the preset's)")
    p.add_argument("--preset", help="recipe: tiny | emoji32 | shapes32 | folder64 (default: emoji32 for emoji, "
                                    "shapes32 for shapes, folder64 otherwise)")
    p.add_argument("--family", default=None, help="model family (default diffae)")
    p.add_argument("--image-size", type=int)
    p.add_argument("--out", help="run folder: checkpoints/, samples/, train_log.jsonl, model/ (default runs/<preset>)")
    p.add_argument("--steps", type=int, help="autoencoder steps")
    p.add_argument("--prior-steps", type=int, help="latent prior steps (0: no prior)")
    p.add_argument("--classifier-steps", type=int, help="attribute classifier steps (0: no classifier)")
    p.add_argument("--batch-size", type=int, help="global batch size of the autoencoder stage")
    p.add_argument("--prior-batch-size", type=int)
    p.add_argument("--lr", type=float)
    p.add_argument("--prior-lr", type=float)
    p.add_argument("--classifier-lr", type=float)
    p.add_argument("--weight-decay", type=float)
    p.add_argument("--warmup-steps", type=int)
    p.add_argument("--ema-decay", type=float)
    p.add_argument("--grad-clip", type=float)
    p.add_argument("--aux-decoder-weight", type=float, help="weight of the auxiliary z_sem -> image decoder loss "
                                                           "(0: the paper's objective)")
    p.add_argument("--encoder-lr-scale", type=float, help="learning-rate multiplier of the semantic encoder")
    p.add_argument("--loss-weighting", help="uniform | snr-trunc:<max> (per-timestep weights of the eps-MSE)")
    p.add_argument("--seed", type=int)
    p.add_argument("--mixed-precision", choices=["no", "bf16", "fp16"], help="autocast on the GPU (default no)")
    p.add_argument("--ckpt-every", type=int, help="steps between checkpoints")
    p.add_argument("--keep-checkpoints", type=int)
    p.add_argument("--sample-every", type=int, help="steps between PNG grids (0: end of each stage)")
    p.add_argument("--log-every", type=int)
    p.add_argument("--holdout", type=float, help="fraction held out for evaluation (default 0.1)")
    p.add_argument("--data-limit", type=int, help="use only the first N images (quick runs)")
    p.add_argument("--attribute-labels", help="comma-separated labels to train classifiers for")
    p.add_argument("--model-config", help="JSON merged into the preset's family config, e.g. "
                                          "'{\"network\": {\"z_dim\": 64}}'")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint "
                                                         "(its saved config is used; --steps, --prior-steps, "
                                                         "--classifier-steps, --ckpt-every, --sample-every may "
                                                         "change it)")
    p.add_argument("--device", help="cpu, cuda, cuda:1 (default: cuda if available)")
    p.add_argument("--num-threads", type=int, help="torch CPU threads")
    p.add_argument("--distributed", choices=["auto", "accelerate", "none"],
                   help="auto: accelerate when started by a multi-process launcher")
    p.add_argument("--no-progress", action="store_true", help="log lines instead of a progress bar")
    p.add_argument("--dump-rank-hashes", action="store_true", help=argparse.SUPPRESS)
    p.set_defaults(func=run_train)

    e = subparsers.add_parser(
        "evaluate", help="reconstruction, linear probes, edit success and sample quality on a held-out split",
        description="Evaluate a model on data it was not trained on: reconstruction MSE/PSNR/SSIM from z_sem alone and "
                    "with the inverted x_T at T = 10, 20, 100 DDIM steps; linear probes of z_sem per label next to PCA "
                    "of the pixels with as many dimensions; attribute-edit success; semdiff-FD (and FID with "
                    "--inception).")
    e.add_argument("model", nargs="?", default=None, help="model name or folder (default: the shipped model)")
    e.add_argument("--data", help="emoji | shapes | folder (default: the data the model was trained on)")
    e.add_argument("--split", default="test", choices=["test", "train", "all"])
    e.add_argument("--holdout", type=float, help="held-out fraction (default: the model's training holdout)")
    e.add_argument("--out", help="write the metrics JSON here")
    e.add_argument("--write-card", action="store_true", help="write the figures into the model folder's README.md")
    e.add_argument("--steps", default="10,20,100", help="DDIM step counts T for reconstruction (default 10,20,100)")
    e.add_argument("--max-items", type=int, help="evaluate at most N held-out images (quick look)")
    e.add_argument("--edit-scale", type=float, default=0.3)
    e.add_argument("--num-samples", type=int, default=1000, help="samples for the sample-quality figures")
    e.add_argument("--inception", help="pt_inception-2015-12-05 weights (safetensors, or a torch state dict) for FID")
    e.add_argument("--skip", default="", help="comma-separated parts to skip: reconstruction,probe,edit,samples")
    e.add_argument("--device")
    e.add_argument("--seed", type=int, default=0)
    e.set_defaults(func=run_evaluate)


def _config_from_args(args):
    """A ``TrainConfig`` from the parsed arguments (the preset's values, then the given ones)."""
    from semdiff.training import TrainConfig

    if args.resume and args.out:
        from semdiff.training.checkpointing import latest_checkpoint

        if latest_checkpoint(Path(args.out)) is not None:
            # the saved config is authoritative; only runtime options are taken from the command line
            changes = {k: getattr(args, k) for k in ("steps", "prior_steps", "classifier_steps", "ckpt_every",
                                                     "sample_every", "keep_checkpoints") if getattr(args, k) is not None}
            return TrainConfig(out=args.out, resume=True, progress=False if args.no_progress else None,
                               num_threads=args.num_threads, device=args.device,
                               distributed=args.distributed or "auto", dump_rank_hashes=args.dump_rank_hashes,
                               log_every=args.log_every or 50, resume_overrides=changes or None)
        print(f"semdiff train: no checkpoint in {args.out}; starting a new run", file=sys.stderr)
    data = args.data
    preset = args.preset or DEFAULT_PRESET_FOR_DATA.get(str(data or "emoji"), "folder64")
    model = json.loads(args.model_config) if args.model_config else None
    labels = [s.strip() for s in args.attribute_labels.split(",") if s.strip()] if args.attribute_labels else None
    overrides = dict(
        data=data, family=args.family, image_size=args.image_size, out=args.out or f"runs/{preset}",
        steps=args.steps, prior_steps=args.prior_steps, classifier_steps=args.classifier_steps,
        batch_size=args.batch_size, prior_batch_size=args.prior_batch_size, lr=args.lr, prior_lr=args.prior_lr,
        classifier_lr=args.classifier_lr, weight_decay=args.weight_decay, warmup_steps=args.warmup_steps,
        ema_decay=args.ema_decay, grad_clip=args.grad_clip, loss_weighting=args.loss_weighting, seed=args.seed,
        encoder_lr_scale=args.encoder_lr_scale, aux_decoder_weight=args.aux_decoder_weight,
        mixed_precision=args.mixed_precision,
        ckpt_every=args.ckpt_every, keep_checkpoints=args.keep_checkpoints, sample_every=args.sample_every,
        log_every=args.log_every, holdout=args.holdout, data_limit=args.data_limit, attribute_labels=labels,
        resume=args.resume, device=args.device, num_threads=args.num_threads, distributed=args.distributed,
        progress=False if args.no_progress else None, dump_rank_hashes=args.dump_rank_hashes or None, model=model,
    )
    return TrainConfig.from_preset(preset, **overrides)


def run_train(args) -> int:
    from semdiff.training import train

    import os

    config = _config_from_args(args)
    folder = train(config)
    if os.environ.get("RANK", "0") == "0":
        print(f"wrote {folder}")
    return 0


def run_evaluate(args) -> int:
    from semdiff.evaluation import evaluate_model

    steps = [int(s) for s in str(args.steps).split(",") if s.strip()]
    skip = {s.strip() for s in args.skip.split(",") if s.strip()}
    metrics = evaluate_model(args.model, data=args.data, split=args.split, holdout=args.holdout,
                             steps=steps, max_items=args.max_items, edit_scale=args.edit_scale,
                             num_samples=args.num_samples, inception=args.inception, skip=skip,
                             device=args.device, seed=args.seed, write_card=args.write_card, out=args.out,
                             print_report=True)
    return 0 if metrics else 1
