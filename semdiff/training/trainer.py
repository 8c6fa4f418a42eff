"""The generic training loop: stages of a :class:`~semdiff.training.objectives.TrainingObjective`.

For every stage: AdamW with linear warm-up, gradient clipping, an EMA of the trained parameters,
autocast on the GPU, tqdm with the running loss, a JSONL log, PNG grids, and atomic checkpoints
every ``ckpt_every`` steps. A stage starts from the EMA weights of the stage before it.

Reproducibility: the model is initialised from ``seed``; each stage reseeds the torch RNG from
(seed, stage, rank); batches are a pure function of (seed, stage, step, rank); checkpoints hold the
RNG state of every process, so a run that is killed and resumed ends with the weights of an
uninterrupted run (bitwise on the CPU).
"""

from __future__ import annotations

import copy
import hashlib
import json
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import torch
from torch import nn

from semdiff.training import checkpointing as ckpt
from semdiff.training.config import TrainConfig
from semdiff.training.data import TrainData, load_data
from semdiff.training.objectives import Stage, TrainingObjective, get_objective
from semdiff.training.runtime import Runtime, make_runtime

#: config fields a resumed run takes from the command line rather than from the checkpoint
RUNTIME_FIELDS = ("resume", "progress", "num_threads", "device", "distributed", "dump_rank_hashes", "log_every")
#: what ``resume_overrides`` may change in a resumed run (the learning-rate schedule does not depend on them)
RESUME_OVERRIDABLE = ("steps", "prior_steps", "classifier_steps", "ckpt_every", "sample_every", "keep_checkpoints")
MODEL_DIRNAME = "model"


class EMA:
    """Exponential moving average of a model's parameters (a full copy; buffers are copied as they are)."""

    def __init__(self, model: nn.Module):
        self.model = copy.deepcopy(model).eval().requires_grad_(False)

    @torch.no_grad()
    def update(self, model: nn.Module, names: set[str], decay: float) -> None:
        params = dict(model.named_parameters())
        for name, p in self.model.named_parameters():
            if name in names:
                if decay <= 0:
                    p.copy_(params[name])
                else:
                    p.lerp_(params[name].detach().to(p.dtype), 1.0 - decay)
        for (name, b), (_, src) in zip(self.model.named_buffers(), model.named_buffers()):
            b.copy_(src)

    def state_dict(self) -> dict[str, torch.Tensor]:
        return self.model.state_dict()


def ema_decay_at(decay: float, step: int) -> float:
    """``min(decay, (1 + n) / (10 + n))``: the average forgets the random initialisation early on."""
    if decay <= 0:
        return 0.0
    return min(decay, (1 + step) / (10 + step))


def stage_seed(seed: int, stage_index: int, rank: int) -> int:
    digest = hashlib.sha256(f"semdiff-train:{seed}:{stage_index}:{rank}".encode()).hexdigest()
    return int(digest[:15], 16)


class BatchSampler:
    """Global batch ``step`` of a stage = positions ``[step*B, (step+1)*B)`` of the concatenation of
    per-epoch permutations (seeded by seed, stage, epoch); rank r takes its contiguous share."""

    def __init__(self, n: int, batch_size: int, seed: int, stage_index: int, rank: int = 0, world_size: int = 1):
        if batch_size % world_size:
            raise ValueError(f"batch size {batch_size} is not divisible by the {world_size} processes")
        if n < 1:
            raise ValueError("the training data is empty")
        self.n, self.batch_size, self.seed, self.stage_index = n, batch_size, seed, stage_index
        self.rank, self.world_size = rank, world_size
        self._perms: dict[int, torch.Tensor] = {}

    def _perm(self, epoch: int) -> torch.Tensor:
        if epoch not in self._perms:
            if len(self._perms) > 4:
                self._perms.clear()
            g = torch.Generator().manual_seed(stage_seed(self.seed, self.stage_index, -1 - epoch))
            self._perms[epoch] = torch.randperm(self.n, generator=g)
        return self._perms[epoch]

    def indices(self, step: int) -> torch.Tensor:
        local = self.batch_size // self.world_size
        start = step * self.batch_size + self.rank * local
        pos = torch.arange(start, start + local)
        epochs = pos // self.n
        out = torch.empty(local, dtype=torch.long)
        for e in epochs.unique().tolist():
            sel = epochs == e
            out[sel] = self._perm(e)[pos[sel] % self.n]
        return out


def weights_hash(module: nn.Module) -> str:
    h = hashlib.sha256()
    for name, t in sorted(module.state_dict().items()):
        h.update(name.encode())
        h.update(t.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


class Trainer:
    def __init__(self, config: TrainConfig, *, data: TrainData | None = None):
        self.config = config
        self._data = data

    # ------------------------------------------------------------------------------------------
    def _log(self, record: dict[str, Any]) -> None:
        if not self.runtime.is_main:
            return
        with open(self.out / "train_log.jsonl", "a") as f:
            f.write(json.dumps(record) + "\n")

    def _say(self, text: str) -> None:
        if self.runtime.is_main:
            print(f"[semdiff train] {text}", file=sys.stderr, flush=True)

    def _progress(self) -> bool:
        from semdiff.utils import progress_enabled

        return self.runtime.is_main and progress_enabled(self.config.progress)

    # ------------------------------------------------------------------------------------------
    def run(self) -> Path:
        cfg = self.config
        self.out = Path(cfg.out)
        latest = ckpt.latest_checkpoint(self.out)
        if latest is not None and not cfg.resume:
            raise FileExistsError(f"{self.out} already holds checkpoints ({latest.name}); pass --resume to continue "
                                  "that run, or choose another --out")
        if latest is not None:
            with open(latest / ckpt.STATE_NAME) as f:
                saved = TrainConfig.from_dict(json.load(f)["config"])
            for name in RUNTIME_FIELDS:
                setattr(saved, name, getattr(cfg, name))
            for name, value in (cfg.resume_overrides or {}).items():
                if name not in RESUME_OVERRIDABLE:
                    raise ValueError(f"{name} cannot be changed when resuming; changeable: {RESUME_OVERRIDABLE}")
                setattr(saved, name, value)
            saved.out = cfg.out
            saved.resume_overrides = None
            cfg = self.config = saved
        if cfg.num_threads:
            torch.set_num_threads(cfg.num_threads)
        self.runtime: Runtime = make_runtime(cfg.distributed, cfg.device, cfg.mixed_precision)
        rt = self.runtime
        if rt.is_main:
            self.out.mkdir(parents=True, exist_ok=True)
        rt.barrier()

        data = self._data if self._data is not None else load_data(
            cfg.data, cfg.image_size, split="train", holdout=cfg.holdout, limit=cfg.data_limit, seed=cfg.seed)
        objective: TrainingObjective = get_objective(cfg.family)
        torch.manual_seed(cfg.seed)
        model = objective.build_model(cfg, data).to(rt.device)
        aux = objective.auxiliary()
        if aux is not None:
            aux.to(rt.device)
        ema = EMA(model)
        stages = objective.stages(cfg)
        offsets = [sum(s.steps for s in stages[:i]) for i in range(len(stages))]

        start_stage, start_step, loaded = 0, 0, None
        elapsed: dict[str, float] = {}
        if latest is not None:
            loaded = ckpt.read_checkpoint(latest, rt.rank)
            model.load_state_dict(loaded["model"])
            ema.model.load_state_dict(loaded["ema"])
            if aux is not None and loaded.get("aux") is not None:
                aux.load_state_dict(loaded["aux"])
            start_stage, start_step = loaded["state"]["stage_index"], loaded["state"]["step"]
            elapsed = dict(loaded["state"].get("elapsed", {}))
            self._say(f"resuming from {latest} (stage {start_stage}, step {start_step})")
        else:
            self._say(f"training {cfg.family} on {data.name} ({len(data)} images, {data.image_size}px) -> {self.out}"
                      f" [{rt.name}, {rt.world_size} process(es), {rt.device}]")

        preview_idx = torch.randperm(len(data), generator=torch.Generator().manual_seed(cfg.seed))[:8]
        preview_batch = {"images": data.images[preview_idx]}

        for si, stage in enumerate(stages):
            if si < start_stage or stage.steps <= 0:
                continue
            resuming = loaded is not None and si == start_stage and start_step > 0
            first = 0
            if not resuming:
                if si > 0:
                    model.load_state_dict(ema.state_dict())
                torch.manual_seed(stage_seed(cfg.seed, si, rt.rank))
            else:
                first = start_step
            t_stage = time.time()
            stage_data = objective.stage_data(stage, model, data, rt.device)
            if not resuming:
                ema.model.load_state_dict(model.state_dict())
            groups = objective.trainable_parameters(stage, model)
            if groups and not isinstance(groups[0], dict):
                groups = [{"params": list(groups), "lr_scale": 1.0}]
            params = [p for g in groups for p in g["params"]]
            model.requires_grad_(False)
            for p in params:
                p.requires_grad_(True)
            names = {n for n, p in model.named_parameters() if p.requires_grad}
            model.train()
            optimizer = torch.optim.AdamW(
                [{"params": g["params"], "lr": stage.lr * g.get("lr_scale", 1.0), "lr_scale": g.get("lr_scale", 1.0)}
                 for g in groups], lr=stage.lr, betas=stage.betas, weight_decay=stage.weight_decay)
            if resuming and loaded.get("optimizer") is not None:
                optimizer.load_state_dict(loaded["optimizer"])
            wrapped, opt = rt.prepare(objective.loss_module(stage, model), optimizer)
            raw_opt = rt.raw_optimizer(opt)
            if resuming:
                rt.load_scaler_state(loaded["state"].get("scaler"))
                if loaded["rng"] is not None:
                    ckpt.set_rng_state(loaded["rng"], rt.device)
                else:
                    warnings.warn(f"no RNG state for rank {rt.rank} in the checkpoint; the resumed run is not "
                                  "bit-identical to an uninterrupted one", stacklevel=2)
                    torch.manual_seed(stage_seed(cfg.seed, si, rt.rank) + start_step)
            sampler = BatchSampler(len(next(iter(stage_data.values()))), stage.batch_size, cfg.seed, si,
                                   rt.rank, rt.world_size)
            self._say(f"stage {si + 1}/{len(stages)} '{stage.name}': steps {first}..{stage.steps}, batch "
                      f"{stage.batch_size}, lr {stage.lr:g}")
            bar = None
            if self._progress():
                from tqdm.auto import tqdm

                bar = tqdm(total=stage.steps, initial=first, desc=stage.name, dynamic_ncols=True)
            running = None
            t_log, n_log = time.time(), 0
            for step in range(first, stage.steps):
                lr = stage.lr * min(1.0, (step + 1) / stage.warmup_steps) if stage.warmup_steps else stage.lr
                for group in raw_opt.param_groups:
                    group["lr"] = lr * group.get("lr_scale", 1.0)
                idx = sampler.indices(step)
                batch = {k: v[idx].to(rt.device, non_blocking=True) for k, v in stage_data.items()}
                with rt.autocast():
                    loss, logs = wrapped(**batch)
                if not torch.isfinite(loss):
                    raise FloatingPointError(f"{stage.name} loss is {loss.item()} at step {step}; lower the "
                                             "learning rate or use --mixed-precision no")
                rt.backward(loss)
                grad_norm = None
                if stage.grad_clip:
                    grad_norm = float(rt.clip_grad_norm(params, stage.grad_clip, opt))
                rt.step(opt)
                opt.zero_grad(set_to_none=True)
                ema.update(model, names, ema_decay_at(stage.ema_decay, step))
                done = step + 1
                value = float(loss.detach())
                running = value if running is None else 0.95 * running + 0.05 * value
                n_log += 1
                if bar is not None:
                    bar.update(1)
                    bar.set_postfix(loss=f"{running:.4f}", lr=f"{lr:.2g}")
                if done % cfg.log_every == 0 or done == stage.steps:
                    now = time.time()
                    record = {"stage": stage.name, "step": done, "global_step": offsets[si] + done,
                              "loss": rt.mean(value), "loss_avg": running, "lr": lr,
                              "steps_per_s": n_log / max(now - t_log, 1e-9)}
                    record.update({k: rt.mean(float(v)) for k, v in logs.items() if k != "loss"})
                    if grad_norm is not None:
                        record["grad_norm"] = grad_norm
                    self._log(record)
                    if bar is None:
                        self._say(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                                           for k, v in record.items()))
                    t_log, n_log = now, 0
                if done == stage.steps:
                    elapsed[stage.name] = elapsed.get(stage.name, 0.0) + time.time() - t_stage
                    t_stage = time.time()
                    self._checkpoint(cfg, offsets[si] + done, si + 1, 0, model, ema, None, elapsed, aux)
                elif done % cfg.ckpt_every == 0:
                    elapsed[stage.name] = elapsed.get(stage.name, 0.0) + time.time() - t_stage
                    t_stage = time.time()
                    self._checkpoint(cfg, offsets[si] + done, si, done, model, ema, raw_opt, elapsed, aux)
                if cfg.sample_every and done % cfg.sample_every == 0 and done != stage.steps:
                    self._preview(objective, stage, ema.model, preview_batch, cfg, done)
            if bar is not None:
                bar.close()
            self._preview(objective, stage, ema.model, preview_batch, cfg, stage.steps)
            loaded = None
            del wrapped, opt, raw_opt, optimizer

        final = ema.model
        final.requires_grad_(False)
        folder = self.out / MODEL_DIRNAME
        if rt.is_main:
            self._export(final, folder, cfg, data, elapsed, objective)
            self._say(f"wrote {folder}  (stage wall times: "
                      + ", ".join(f"{k} {v / 60:.1f} min" for k, v in elapsed.items()) + ")")
        if cfg.dump_rank_hashes:
            hashes = self.out / "rank-hashes"
            hashes.mkdir(parents=True, exist_ok=True)
            text = json.dumps({"rank": rt.rank, "world_size": rt.world_size, "ema": weights_hash(final),
                               "model": weights_hash(model)})
            (hashes / f"rank{rt.rank}.json").write_text(text + "\n")
        rt.barrier()
        return folder

    # ------------------------------------------------------------------------------------------
    def _checkpoint(self, cfg, global_step, stage_index, step, model, ema, optimizer, elapsed, aux=None) -> None:
        rt = self.runtime
        tmp = ckpt.tmp_checkpoint_path(self.out, global_step)
        if rt.is_main:
            ckpt.begin_checkpoint(self.out, global_step)
        rt.barrier()
        ckpt.write_rank_rng(tmp, rt.rank, rt.device)
        rt.barrier()
        if rt.is_main:
            state = {"stage_index": stage_index, "step": step, "config": cfg.to_dict(), "elapsed": elapsed,
                     "world_size": rt.world_size, "scaler": rt.scaler_state(), "time": time.time()}
            ckpt.commit_checkpoint(self.out, tmp, global_step, model=model.state_dict(), ema=ema.state_dict(),
                                   optimizer=optimizer.state_dict() if optimizer is not None else None,
                                   state=state, keep=cfg.keep_checkpoints,
                                   aux=aux.state_dict() if aux is not None else None)
        rt.barrier()

    def _preview(self, objective, stage: Stage, model, batch, cfg: TrainConfig, step: int) -> None:
        if not self.runtime.is_main:
            return
        try:
            rows = objective.preview(stage, model, batch, torch.Generator().manual_seed(cfg.seed),
                                     steps=cfg.preview_steps)
        finally:
            model.eval()
        if not rows:
            return
        from semdiff.training.grids import save_labelled_grid

        path = self.out / "samples" / f"{stage.name}-{step:07d}.png"
        save_labelled_grid(rows, path)

    def _export(self, model, folder: Path, cfg: TrainConfig, data: TrainData, elapsed: dict[str, float],
                objective: TrainingObjective | None = None) -> None:
        from semdiff.io import save_model_folder
        from semdiff.training.card import render_model_card

        model.config["training"] = training_record(cfg, data, elapsed, objective)
        save_model_folder(model, folder)
        config = json.loads((folder / "config.json").read_text())
        (folder / "README.md").write_text(render_model_card(config, name=folder.name))


def training_record(cfg: TrainConfig, data: TrainData, elapsed: dict[str, float],
                    objective: TrainingObjective | None = None) -> dict[str, Any]:
    """What goes into the model's ``config.json`` under ``training``: the recipe, the data and its licence."""
    objective = objective or get_objective(cfg.family)
    return {
        "data": cfg.data,
        "data_items": len(data),
        "data_license": data.license,
        "holdout": cfg.holdout,
        "split": "held out: SHA-256 of the item key < holdout (emoji key: codepoints without skin-tone modifiers)",
        "image_size": cfg.image_size,
        "preset": cfg.preset,
        "seed": cfg.seed,
        "stages": objective.stage_record(cfg),
        "optimizer": "AdamW", "weight_decay": cfg.weight_decay, "grad_clip": cfg.grad_clip,
        "mixed_precision": cfg.mixed_precision,
        "wall_time_s": {k: round(v, 1) for k, v in elapsed.items()},
    }


def train(config: TrainConfig, *, data: TrainData | None = None) -> Path:
    """Run (or with ``config.resume`` continue) a training run; returns the exported model folder."""
    if isinstance(config, dict):
        config = TrainConfig.from_dict(config)
    return Trainer(config, data=data).run()
