"""DiffuseVAE against the official code: every tensor of the shared fixture, to the fixture's tolerances.

The fixture (tests/fixtures/diffusevae/parity_tiny.*) was produced by the official modules with
random weights; its JSON gives each output's meaning and tolerance (10x its float32-vs-float64
spread). Single passes and first steps are held tight; DDIM finals are chaotic and looser.
"""

from __future__ import annotations

import pytest
import torch

from diffusevae_helpers import fixture_json, load_fixture, official_state
from semdiff.families.diffusevae import DiffuseVAE, VAEConfig
from semdiff.families.diffusevae.sampling import RespacedTables, diffusevae_timesteps

pytestmark = pytest.mark.usefixtures("one_thread_per_module")

J = fixture_json()
TOL = J["tolerances"]


def _config(form: str, unet: str = "unet") -> dict:
    vc = J["vae_config"]
    uc = J["unet_config" if unet == "unet" else "unet_z_config"]
    return {
        "vae": {"input_res": vc["input_res"], "enc_block_str": vc["enc_block_config"],
                "enc_channel_str": vc["enc_channel_config"], "dec_block_str": vc["dec_block_config"],
                "dec_channel_str": vc["dec_channel_config"]},
        "unet": {"model_channels": uc["model_channels"], "channel_mult": uc["channel_mult"],
                 "num_res_blocks": uc["num_res_blocks"], "attention_ds": uc["attention_resolutions"],
                 "num_heads": uc["num_heads"], "use_z": uc["use_z"], "z_dim": uc.get("z_dim"),
                 "use_scale_shift_norm": uc["use_scale_shift_norm"]},
        "form": form,
    }


_MODELS: dict[tuple[str, str], DiffuseVAE] = {}


def family(form: str = "form1", unet: str = "unet") -> DiffuseVAE:
    if (form, unet) not in _MODELS:
        model = DiffuseVAE(_config(form, unet))
        state = {"vae." + k: v for k, v in official_state("vae").items()}
        state.update({"unet." + k: v for k, v in official_state(unet).items()})
        model.load_state_dict(state, strict=True)
        _MODELS[(form, unet)] = model.eval().requires_grad_(False)
    return _MODELS[(form, unet)]


def close(got: torch.Tensor, name: str, *, d=None) -> float:
    want = (d or load_fixture())[name]
    diff = (got.reshape(want.shape).float() - want).abs().max().item()
    assert diff <= TOL[name], f"{name}: max abs diff {diff:.3g} > tolerance {TOL[name]:.3g}"
    return diff


# ---------------------------------------------------------------------------------------------
# The VAE


def test_vae_moments_latent_and_reconstructions():
    d, m = load_fixture(), family()
    x = d["in.x01"] * 2 - 1  # the family sees [-1, 1] and hands [0, 1] to the VAE
    mu, logvar = m.posterior(x)
    close(mu, "out.vae.mu")
    close(logvar, "out.vae.logvar")
    assert torch.equal(m.encode(x), mu)
    z = m.vae.reparameterize(mu, logvar, d["in.vae.eps"].flatten(1))
    close(z, "out.vae.z")
    close(m.vae.decode(d["out.vae.z"].flatten(1)), "out.vae.recon01")
    close(m.vae.decode(mu), "out.vae.recon01_from_mu")
    close(m.vae.decode(d["in.z_prior"].flatten(1)), "out.vae.decode_prior01")
    close(m.vae_reconstruction(d["out.vae.z"].flatten(1)), "out.cond")


def test_vae_config_round_trip():
    vae = family().vae_config
    assert VAEConfig(**vae.to_dict()) == vae
    assert vae.z_dim == J["vae_config"]["z_dim"]


# ---------------------------------------------------------------------------------------------
# The conditional UNet


def test_unet_with_and_without_condition():
    d, m = load_fixture(), family()
    x, t, cond = d["in.unet.x_t"], d["in.unet.t"], d["out.cond"]
    close(m.unet(x, t, cond), "out.unet.eps")
    close(m.unet(x, t, torch.zeros_like(cond)), "out.unet.eps_zero_cond")


def test_unet_with_z_projection_and_scale_shift_norm():
    d, m = load_fixture(), family("form1", "unet_z")
    x, t, cond, z = d["in.unet.x_t"], d["in.unet.t"], d["out.cond"], d["out.vae.z"].flatten(1)
    close(m.unet(x, t, cond, z), "out.unet_z.eps")
    # the z embedding precomputed once per chain gives the same numbers
    assert torch.equal(m.unet(x, t, cond, z_emb=m.unet.z_embedding(z)), m.unet(x, t, cond, z))


def test_unet_resizes_the_condition_nearest():
    d, m = load_fixture(), family()
    x, t, cond = d["in.unet.x_t"], d["in.unet.t"], d["out.cond"]
    small = cond[:, :, ::2, ::2]
    want = m.unet(x, t, torch.nn.functional.interpolate(small, (32, 32), mode="nearest"))
    assert torch.equal(m.unet(x, t, small), want)


# ---------------------------------------------------------------------------------------------
# Forward process


def test_forward_process_of_both_forms():
    d = load_fixture()
    x0 = d["in.x01"] * 2 - 1
    close(x0, "out.x0")
    z = d["out.vae.z"].flatten(1)
    close(family("form1").q_sample(x0, d["in.unet.t"], d["in.q_noise"]), "out.form1.q_sample")
    close(family("form2").q_sample(x0, d["in.unet.t"], d["in.q_noise"], z), "out.form2.q_sample")


# ---------------------------------------------------------------------------------------------
# Samplers


def test_step_spacings_match_the_fixture_and_the_official_rule():
    for run in J["runs"].values():
        assert diffusevae_timesteps(1000, run["steps"], run["skip"]) == run["timesteps"]
    assert diffusevae_timesteps(1000, 8, "uniform") == list(range(0, 1000, 125))
    assert diffusevae_timesteps(1000, 30, "uniform") == list(range(0, 1000, 34))  # first stride giving 30
    with pytest.raises(ValueError, match="cannot create exactly 60 steps with an integer stride"):
        diffusevae_timesteps(1000, 60, "uniform")
    with pytest.raises(ValueError, match="spacing"):
        diffusevae_timesteps(1000, 10, "linear")


def test_respaced_tables_are_the_official_buffers():
    tables = RespacedTables.build(family().schedule, list(range(0, 1000, 100)))
    # the respaced alpha-bar telescopes back to the base process
    base = torch.cumprod(1 - family().schedule.betas, 0)[list(range(0, 1000, 100))]
    assert torch.allclose(tables.alpha_bar, base, rtol=1e-12, atol=0)
    assert torch.allclose(tables.coef_x0[0], torch.tensor(1.0, dtype=torch.float64))
    assert tables.log_var["fixedlarge"][0] == tables.log_var["fixedsmall"][0]


def _run_starts(name: str, run: dict, m: DiffuseVAE) -> torch.Tensor:
    d = load_fixture()
    cond = d["out.cond"]
    if "recons" in name:  # eval_mode="recons": x_T = q(x_999 | x0) (+ x̂ in Form-2)
        x0 = d["in.x01"] * 2 - 1
        t = torch.full((2,), 999)
        return m.q_sample(x0, t, d["in.xT_noise"], d["out.vae.z"].flatten(1) if run["form"] == 2 else None)
    return m.start_state(d["out.vae.z"].flatten(1), d["in.xT_noise"], temperature=run["temp"], cond=cond)


@pytest.mark.parametrize("name", list(J["runs"]))
def test_sampler_run_with_intermediate_states(name):
    run = J["runs"][name]
    d = load_fixture()
    m = family(f"form{run['form']}", run["network"])
    close(_run_starts(name, run, m), f"out.{name}.x_T")
    states: dict[int, torch.Tensor] = {}
    options = dict(sampler=run["method"], spacing=run["skip"], guidance_weight=run["guidance_weight"],
                   temperature=run["temp"], variance=run["variance"])
    if run["method"] == "ddpm":
        options["ddpm_noise"] = d["in.ddpm_latents"]
    sample = m.decode(d["out.vae.z"].flatten(1), d[f"out.{name}.x_T"], steps=run["steps"],
                      callback=lambda k, x: states.__setitem__(k, x.clone()), **options)
    assert sorted(states) == list(range(1, run["steps"] + 1))
    close(states[1], f"out.{name}.after_step_1")
    close(states[5], f"out.{name}.after_step_5")
    close(sample, f"out.{name}.sample")
    assert torch.equal(states[run["steps"]], sample)
