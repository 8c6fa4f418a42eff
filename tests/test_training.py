"""The training loop: learning, seeded reproducibility, kill -9 + resume, two ranks through accelerate."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from semdiff.io import load_model_folder
from semdiff.training import TrainConfig, train
from semdiff.training import checkpointing as ckpt
from semdiff.training.data import TrainData, attribute_targets, emoji_split_key, holdout_mask, load_data
from semdiff.training.objectives import diffae_autoencoder_loss, get_objective
from semdiff.training.trainer import BatchSampler, weights_hash

ROOT = Path(__file__).resolve().parents[1]


pytestmark = pytest.mark.usefixtures("one_thread")


def tiny(out, **kw) -> TrainConfig:
    base = dict(out=str(out), progress=False, num_threads=1, steps=24, prior_steps=10, classifier_steps=10,
                ckpt_every=8, data_limit=96)
    base.update(kw)
    return TrainConfig.from_preset("tiny", **base)


def _env():
    env = dict(os.environ, SEMDIFF_PROGRESS="0", OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
    env.pop("WORLD_SIZE", None)
    return env


# ------------------------------------------------------------------------------------------------


def test_timestep_weights():
    from semdiff.sampling import DiffusionSchedule
    from semdiff.training.objectives import timestep_weights

    sched = DiffusionSchedule.from_name("linear", 1000)
    assert timestep_weights(sched, "uniform") is None
    for spec in ("snr-trunc:20", "x0-mix:1000"):
        w = timestep_weights(sched, spec)
        assert w.shape == (1000,) and abs(float(w.mean()) - 1) < 1e-5
        assert w[900] > w[100]  # noisier steps weigh more
    assert float(timestep_weights(sched, "x0-mix:1000").min()) >= 0.5 - 1e-6  # every t keeps half its weight
    with pytest.raises(ValueError):
        timestep_weights(sched, "cubic")


def test_loss_decreases_on_a_fixed_batch():
    cfg = tiny("unused", classifier_steps=0)
    data = load_data("shapes", 16, limit=8, holdout=0.0, split="all")
    torch.manual_seed(0)
    model = get_objective("diffae").build_model(cfg, data)
    opt = torch.optim.AdamW([*model.encoder.parameters(), *model.unet.parameters()], lr=2e-3)

    def fixed_loss():
        state = torch.get_rng_state()
        torch.manual_seed(123)  # the same t and noise every time
        with torch.no_grad():
            loss = diffae_autoencoder_loss(model, data.images)[0].item()
        torch.set_rng_state(state)
        return loss

    before = fixed_loss()
    for _ in range(60):
        loss, _ = diffae_autoencoder_loss(model, data.images)
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = fixed_loss()
    assert after < 0.6 * before, (before, after)


def test_seeded_runs_are_bitwise_identical_and_seed_matters(tmp_path):
    a = train(tiny(tmp_path / "a"))
    b = train(tiny(tmp_path / "b"))
    c = train(tiny(tmp_path / "c", seed=1))
    ha, hb, hc = (weights_hash(load_model_folder(p)) for p in (a, b, c))
    assert ha == hb
    assert ha != hc
    # the exported folder is a complete model with prior and classifier
    model = load_model_folder(a)
    assert model.has_prior and model.attribute_names
    assert model.config["training"]["stages"]["autoencoder"]["steps"] == 24
    assert (tmp_path / "a" / "samples").is_dir() and any((tmp_path / "a" / "samples").glob("*.png"))
    log = [json.loads(line) for line in (tmp_path / "a" / "train_log.jsonl").read_text().splitlines()]
    assert {r["stage"] for r in log} == {"autoencoder", "prior", "classifier"}


def test_checkpoints_are_safetensors_and_json_only(tmp_path):
    train(tiny(tmp_path / "run", keep_checkpoints=10))
    found = ckpt.list_checkpoints(tmp_path / "run")
    assert len(found) >= 3
    for folder in found:
        suffixes = {p.suffix for p in folder.iterdir()}
        assert suffixes <= {".safetensors", ".json"}, suffixes
    # a mid-stage checkpoint carries the optimizer; its state round-trips
    mid = ckpt.read_checkpoint(found[0])
    assert mid["optimizer"] is not None and mid["state"]["step"] == 8
    assert mid["rng"]["torch_cpu"].dtype == torch.uint8


def test_incomplete_checkpoints_are_ignored(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, steps=8, prior_steps=0, classifier_steps=0))
    good = ckpt.latest_checkpoint(out)
    # a temp folder left by a kill during a save, and a folder without state.json, are not checkpoints
    (ckpt.checkpoint_dir(out) / ".tmp-ckpt-000000099").mkdir()
    broken = ckpt.checkpoint_dir(out) / "ckpt-000000100"
    broken.mkdir()
    (broken / "model.safetensors").write_bytes(b"partial")
    assert ckpt.latest_checkpoint(out) == good


def test_refuses_to_overwrite_a_run_without_resume(tmp_path):
    train(tiny(tmp_path / "run", steps=8, prior_steps=0, classifier_steps=0))
    with pytest.raises(FileExistsError, match="--resume"):
        train(tiny(tmp_path / "run", steps=8, prior_steps=0, classifier_steps=0))


def test_sigkill_then_resume_matches_an_uninterrupted_run(tmp_path):
    # the auxiliary decoder and the loss weighting are on, so their state is covered by the resume too
    args = ["--preset", "tiny", "--steps", "100", "--prior-steps", "20", "--classifier-steps", "10",
            "--ckpt-every", "10", "--data-limit", "96", "--num-threads", "1", "--no-progress",
            "--aux-decoder-weight", "0.5", "--loss-weighting", "x0-mix:100"]
    full = train(TrainConfig.from_preset("tiny", out=str(tmp_path / "full"), steps=100, prior_steps=20,
                                         classifier_steps=10, ckpt_every=10, data_limit=96, num_threads=1,
                                         progress=False, aux_decoder_weight=0.5, loss_weighting="x0-mix:100"))
    out = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "semdiff", "train", *args, "--out", str(out)], env=_env(),
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    try:
        while time.time() < deadline:
            found = ckpt.list_checkpoints(out)
            try:
                step = json.loads((found[-1] / ckpt.STATE_NAME).read_text())["step"] if found else 0
            except (OSError, ValueError):  # pruned or being replaced right now
                step = 0
            if step >= 20:
                break
            if proc.poll() is not None:
                pytest.fail("the training process ended before it could be killed")
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert not (out / "model").exists(), "the run finished before the kill"
    last = ckpt.read_checkpoint(ckpt.latest_checkpoint(out))
    assert last["state"]["stage_index"] == 0 and last["state"]["step"] < 100
    assert last["aux"] is not None
    # resume through the CLI: the saved config is used
    from semdiff.cli import main

    assert main(["train", "--resume", "--out", str(out), "--num-threads", "1", "--no-progress"]) == 0
    assert weights_hash(load_model_folder(out / "model")) == weights_hash(load_model_folder(full))


def test_resume_can_extend_a_stage(tmp_path):
    out = tmp_path / "run"
    train(tiny(out, steps=16, prior_steps=0, classifier_steps=0))
    from semdiff.cli import main

    assert main(["train", "--resume", "--out", str(out), "--steps", "24", "--no-progress"]) == 0
    assert json.loads((out / "model" / "config.json").read_text())["training"]["stages"]["autoencoder"]["steps"] == 24


def test_two_ranks_through_accelerate_end_with_identical_weights(tmp_path):
    pytest.importorskip("accelerate", reason="accelerate is not installed (pip install 'semdiff[train]')")
    accelerate = shutil.which("accelerate", path=str(Path(sys.executable).parent)) or shutil.which("accelerate")
    if accelerate is None:
        pytest.skip("the accelerate command is not on PATH")
    out = tmp_path / "ddp"
    # CPU processes through torch.distributed (gloo); `--cpu` alone would need MPI for several processes
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1", "--mixed_precision",
           "no", "--dynamo_backend", "no", "--main_process_port", "29517", "-m", "semdiff", "train", "--preset", "tiny",
           "--steps", "4", "--prior-steps", "3", "--classifier-steps", "2", "--data-limit", "64", "--out", str(out),
           "--device", "cpu", "--num-threads", "1", "--no-progress", "--dump-rank-hashes"]
    env = _env()
    env["CUDA_VISIBLE_DEVICES"] = ""
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=240)
    assert res.returncode == 0, res.stderr[-3000:]
    ranks = [json.loads((out / "rank-hashes" / f"rank{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 for r in ranks)
    assert ranks[0]["ema"] == ranks[1]["ema"] and ranks[0]["model"] == ranks[1]["model"]
    assert weights_hash(load_model_folder(out / "model")) == ranks[0]["ema"]


# ------------------------------------------------------------------------------------------------
# pieces


def test_batch_sampler_shards_the_global_batch():
    full = BatchSampler(50, 8, seed=3, stage_index=0)
    r0 = BatchSampler(50, 8, seed=3, stage_index=0, rank=0, world_size=2)
    r1 = BatchSampler(50, 8, seed=3, stage_index=0, rank=1, world_size=2)
    for step in (0, 5, 6, 7, 30):  # 6 and 7 straddle an epoch boundary
        assert torch.equal(torch.cat([r0.indices(step), r1.indices(step)]), full.indices(step))
    seen = torch.cat([full.indices(s) for s in range(6)])[:48]
    assert len(torch.unique(seen)) == 48  # within an epoch no item repeats
    with pytest.raises(ValueError):
        BatchSampler(50, 7, seed=0, stage_index=0, world_size=2)


def test_optimizer_state_round_trip():
    p = torch.nn.Parameter(torch.randn(4, 3))
    opt = torch.optim.AdamW([p], lr=0.1)
    p.grad = torch.randn(4, 3)
    opt.step()
    tensors, meta = ckpt.flatten_optimizer_state(opt.state_dict())
    json.dumps(meta)
    state = ckpt.unflatten_optimizer_state(tensors, json.loads(json.dumps(meta)))
    opt2 = torch.optim.AdamW([torch.nn.Parameter(p.detach().clone())], lr=0.1)
    opt2.load_state_dict(state)
    for k, v in opt.state_dict()["state"][0].items():
        assert torch.equal(v, opt2.state_dict()["state"][0][k])


def test_holdout_split_keeps_skin_tone_variants_together():
    assert emoji_split_key("1F44B 1F3FD") == emoji_split_key("1F44B") == "1F44B"
    keys = ["1F44B", "1F44B 1F3FB", "1F44B 1F3FF", "1F600"]
    mask = holdout_mask([emoji_split_key(k) for k in keys], 0.5)
    assert mask[0] == mask[1] == mask[2]
    # deterministic and about the requested fraction
    many = holdout_mask([str(i) for i in range(4000)], 0.1)
    assert 0.08 < many.float().mean() < 0.12
    assert torch.equal(many, holdout_mask([str(i) for i in range(4000)], 0.1))


def test_attribute_targets_one_hot_and_groups():
    data = TrainData(torch.zeros(60, 3, 4, 4), {"tone": torch.tensor([0, 1, 2] * 20), "flag": torch.arange(60) % 2 == 0},
                     {"tone": ["none", "light", "dark"]})
    groups = {}
    names, targets = attribute_targets(data, ["tone", "flag"], groups=groups)
    assert names == ["tone_light", "tone_dark", "flag"]
    assert targets.shape == (60, 3) and targets[:3].tolist() == [[0, 0, 1], [1, 0, 0], [0, 1, 1]]
    assert groups == {"tone": ["tone_light", "tone_dark"], "flag": ["flag"]}


def test_cli_builds_config_from_preset_and_arguments():
    from semdiff.cli import build_parser
    from semdiff.cli.train import _config_from_args

    args = build_parser().parse_args(["train", "--data", "emoji", "--steps", "7", "--model-config",
                                      '{"network": {"z_dim": 64}}', "--out", "x"])
    cfg = _config_from_args(args)
    assert cfg.preset == "emoji32" and cfg.steps == 7 and cfg.prior_steps == 6000
    assert cfg.resolved_model()["network"]["z_dim"] == 64
    assert cfg.resolved_model()["network"]["model_channels"] == 32


def test_training_record_uses_the_family_stage_record():
    from semdiff.training.trainer import training_record

    cfg = TrainConfig.from_preset("tiny", out="unused", loss_weighting="x0-mix:100")
    data = TrainData(name="shapes", images=torch.zeros(4, 3, 16, 16), labels={}, label_names={}, license="procedural")
    rec = training_record(cfg, data, {"autoencoder": 1.0})
    assert list(rec["stages"]) == ["autoencoder", "prior", "classifier"]
    assert rec["stages"]["autoencoder"]["steps"] == cfg.steps
    assert rec["stages"]["autoencoder"]["loss"] == "eps MSE, timestep weights x0-mix:100"
    lrdm = TrainConfig.from_preset("lrdm-tiny", out="unused")
    rec = training_record(lrdm, data, {})
    assert "autoencoder" not in rec["stages"] and rec["stages"], rec["stages"]
    assert all(v["steps"] >= 0 for v in rec["stages"].values())
