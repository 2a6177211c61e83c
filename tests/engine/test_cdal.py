"""cDAL: the schedule, the posterior, the NCSN++ generator's key layout, official files,
sampling through the streaming sampler and ``berdiff train --kind cdal``."""

from __future__ import annotations

import argparse
import json
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_berdiff.checkpoints import describe, load_model, recognise_preset
from napari_berdiff.cli import main
from napari_berdiff.diffusion import CDALKernel, DiffusionConfig
from napari_berdiff.diffusion.cdal import cdal_betas
from napari_berdiff.model import DiffusionModel
from napari_berdiff.networks import NCSNppConfig, NCSNppGenerator, build_network

from .ckpt_helpers import one_torch_thread  # noqa: F401 (an autouse fixture)

REFERENCE = Path(__file__).parent / "reference"
CDAL_PRESETS = ("cdal-lung-256", "cdal-monu-256", "cdal-hippo-32")


def _config(T: int = 2, inverted: bool = False) -> DiffusionConfig:
    return DiffusionConfig(kind="cdal", timesteps=T, schedule="vp", prediction="x0",
                           default_steps=T, inverted_masks=inverted)


def _tiny_net(seed: int = 0) -> NCSNppGenerator:
    torch.manual_seed(seed)
    cfg = NCSNppConfig(image_size=16, nf=32, ch_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(8,), nz=8, z_emb_dim=16, n_mlp=1,
                       cond_enc_layers=1, cond_enc_num_res_blocks=1)
    return NCSNppGenerator(cfg)


# ---------------------------------------------------------------------------- maths
@pytest.mark.parametrize("T", [2, 4])
def test_schedule_equals_the_formula(T):
    betas = cdal_betas(T)
    assert betas.shape == (T + 1,) and betas[0] == pytest.approx(1e-8)
    for i in range(1, T + 1):
        t, t_prev = (i / T) * (1 - 1e-3) + 1e-3, ((i - 1) / T) * (1 - 1e-3) + 1e-3
        var = lambda s: 1 - np.exp(-0.5 * s**2 * (20.0 - 0.1) - s * 0.1)  # noqa: E731
        assert betas[i] == pytest.approx(1 - (1 - var(t)) / (1 - var(t_prev)), rel=1e-12)
    kernel = CDALKernel(_config(T))
    assert np.allclose(kernel.alpha_bars, np.cumprod(1 - betas))
    assert kernel.alpha_bars[-1] < 1e-3  # the chain ends in (almost) pure noise


@pytest.mark.parametrize("T", [2, 4])
def test_posterior_equals_the_gaussian_closed_form(T):
    """Condition x_k on x_{k+1} by precision weighting of the two Gaussians that meet at
    x_k: q(x_k | x0) = N(√A_k x0, 1 − A_k) and q(x_{k+1} | x_k) = N(√(1−β) x_k, β)."""
    kernel = CDALKernel(_config(T))
    b = kernel.betas[1:]
    for k in range(T):
        A = float(np.prod(1 - b[:k]))  # ᾱ of x_k on the posterior's chain
        beta = float(b[k])
        x0, xn = 0.7, -0.3
        if k == 0:
            got = kernel.posterior(torch.tensor([[[[x0]]]]), torch.tensor([[[[xn]]]]), 0,
                                   torch.ones(1, 1, 1, 1))
            assert float(got) == pytest.approx(x0, abs=1e-6)  # no noise, the mean is x̂0
            continue
        var = 1 / (1 / (1 - A) + (1 - beta) / beta)
        mean = var * (np.sqrt(A) * x0 / (1 - A) + np.sqrt(1 - beta) * xn / beta)
        assert kernel.post_var[k] == pytest.approx(var, rel=1e-9)
        assert kernel.post_c0[k] * x0 + kernel.post_ct[k] * xn == pytest.approx(mean, rel=1e-9)
        noise = torch.full((1, 1, 1, 1), 2.0)
        got = kernel.posterior(torch.tensor([[[[x0]]]]).double(),
                               torch.tensor([[[[xn]]]]).double(), k, noise.double())
        assert float(got) == pytest.approx(mean + 2 * np.sqrt(var), rel=1e-7)


def test_inverted_masks_read_foreground_as_negative():
    plain, inverted = CDALKernel(_config()), CDALKernel(_config(inverted=True))
    x0 = torch.tensor([-0.8, 0.6]).reshape(2, 1, 1, 1)
    assert plain.binary(x0).flatten().tolist() == [False, True]
    assert inverted.binary(x0).flatten().tolist() == [True, False]
    assert torch.allclose(inverted.probabilities(x0).flatten(), torch.tensor([0.9, 0.2]))
    m = torch.tensor([0.0, 1.0]).reshape(2, 1, 1, 1)
    assert inverted.to_chain(m).flatten().tolist() == [1.0, -1.0]


def test_config_refuses_other_settings():
    with pytest.raises(ValueError, match="all of its T=2"):
        DiffusionConfig(kind="cdal", timesteps=2, schedule="vp", prediction="x0",
                        default_steps=1)
    with pytest.raises(ValueError, match="x0"):
        DiffusionConfig(kind="cdal", timesteps=2, schedule="vp", prediction="eps",
                        default_steps=2)


# ---------------------------------------------------------------------------- network
@pytest.mark.parametrize("preset", CDAL_PRESETS)
def test_preset_key_layout_equals_the_official_reference(preset):
    ref = json.loads((REFERENCE / f"{preset}.keys.json").read_text())
    with torch.device("meta"):
        net = build_network(preset)
    got = [[k, list(v.shape)] for k, v in net.state_dict().items()]
    assert got == ref["keys"]
    assert sum(v.numel() for v in net.state_dict().values()) == ref["parameters"]
    if preset == "cdal-lung-256":
        assert (ref["tensors"], ref["parameters"]) == (456, 8_843_777)


def test_network_refuses_other_sizes_clearly():
    net = _tiny_net()
    with pytest.raises(ValueError, match="takes 16x16 images only"):
        net.encode(torch.zeros(1, 1, 32, 32))


def test_encode_once_equals_the_official_call():
    net = _tiny_net().eval()
    x, img = torch.randn(3, 1, 16, 16), torch.randn(1, 1, 16, 16)
    z, t = torch.randn(3, 8), torch.tensor([0, 1, 1])
    with torch.no_grad():
        once = net.predict(x, t, net.encode(img), z)
        full = net(x, t, img.expand(3, -1, -1, -1), z)
    assert torch.allclose(once, full, atol=1e-6)
    assert not torch.allclose(once[1], net.predict(x, t, net.encode(img), -z)[1])  # z matters


# ---------------------------------------------------------------------------- sampling
def _model(T: int = 2) -> DiffusionModel:
    return DiffusionModel(_tiny_net(), _config(T), {"kind": "cdal", "name": "tiny-cdal"})


def _record_latents(model: DiffusionModel) -> list[torch.Tensor]:
    """Wrap the model's network so that each call's z is appended to the returned list."""
    seen: list[torch.Tensor] = []
    predict = model.net.predict

    def spy(x, t, cond, z=None):
        seen.append(z.clone())
        return predict(x, t, cond, z)

    model.net.predict = spy
    return seen


def test_streams_one_frame_per_step_and_same_seed_same_samples():
    model = _model(T=4)
    seen_z = _record_latents(model)
    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    stream = model.sample(img, n=3, seed=5)
    frames = list(stream)
    assert [f.t for f in frames] == [3, 2, 1, 0] and frames[-1].final
    assert frames[0].maps["frequency"].shape == (16, 16)
    first = stream.result
    z_first = list(seen_z)
    seen_z.clear()
    again = model.sample_all(img, n=3, seed=5)
    assert np.array_equal(first.probs, again.probs) and np.array_equal(first.masks, again.masks)
    assert all(torch.equal(a, b) for a, b in zip(z_first, seen_z))  # z comes from the seed
    assert not torch.equal(z_first[0], z_first[1])  # a fresh z at every step
    assert z_first[0].shape == (3, 8)
    other = model.sample_all(img, n=3, seed=6)
    assert not np.array_equal(first.probs, other.probs)
    assert np.array_equal(first.masks, (first.probs > 0.5).astype(np.uint8))


def test_stratified_latents_cover_every_stratum_once_and_stay_standard_normal():
    """A Latin hypercube: per dimension, Φ(z)·n falls once in each of the n strata; over
    seeds each row is N(0, 1) (Kolmogorov-Smirnov against the normal, fixed seeds)."""
    from scipy import stats

    from napari_berdiff.diffusion.sampler import draw_latents

    z = draw_latents(16, 50, torch.Generator().manual_seed(0), "stratified")
    cells = np.floor(stats.norm.cdf(z.numpy()) * 16).astype(int)
    assert all(sorted(cells[:, j]) == list(range(16)) for j in range(50))
    rows = np.concatenate([draw_latents(8, 4, torch.Generator().manual_seed(s), "stratified")
                           [3].numpy() for s in range(500)])
    assert stats.kstest(rows, "norm").pvalue > 0.01
    independent = draw_latents(16, 50, torch.Generator().manual_seed(0))
    assert not all(sorted(np.floor(stats.norm.cdf(independent[:, j].numpy()) * 16)
                          .astype(int)) == list(range(16)) for j in range(50))


def test_a_stratified_run_draws_its_latents_so_and_repeats_with_its_seed():
    model = DiffusionModel(_tiny_net(), _config(2).replace(latent_draw="stratified"),
                           {"kind": "cdal", "name": "tiny-cdal"})
    seen_z = _record_latents(model)
    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    first = model.sample_all(img, n=8, seed=3)
    from scipy import stats
    cells = np.floor(stats.norm.cdf(seen_z[0].numpy()) * 8).astype(int)
    assert all(sorted(cells[:, j]) == list(range(8)) for j in range(cells.shape[1]))
    assert np.array_equal(first.masks, model.sample_all(img, n=8, seed=3).masks)
    with pytest.raises(ValueError, match="cDAL kernel only"):
        DiffusionConfig(kind="bernoulli", latent_draw="stratified")


def test_cancel_stops_at_the_next_step():
    model = _model(T=4)
    cancel = threading.Event()
    stream = model.sample(np.zeros((16, 16), np.float32), n=2, seed=0, cancel=cancel)
    next(stream)
    cancel.set()
    assert list(stream) == []
    assert stream.result.cancelled and stream.result.steps_done == 1


def test_sub_sequences_and_other_sizes_are_refused():
    model = _model(T=4)
    with pytest.raises(ValueError, match="all of its T=4 steps"):
        model.sample(np.zeros((16, 16), np.float32), steps=2)
    with pytest.raises(ValueError, match="16x16 images only"):
        model.sample(np.zeros((20, 20), np.float32))


# ---------------------------------------------------------------------------- checkpoints
@pytest.fixture(scope="module")
def hippo_file(tmp_path_factory):
    torch.manual_seed(0)
    net = build_network("cdal-hippo-32")
    sd = {"module." + k: v for k, v in net.state_dict().items()}
    path = tmp_path_factory.mktemp("cdal") / "netG_5_mIoU_0.8_F1_0.9.pth"
    torch.save(sd, path)
    return path, sd


def test_official_generator_file_is_recognised_and_loads(hippo_file, capsys):
    path, sd = hippo_file
    model = load_model(path)
    assert model.name == "cdal-hippo-32" and model.kind == "cdal"
    assert model.diffusion.timesteps == 4 and model.diffusion.inverted_masks
    stripped = {k[len("module."):]: v for k, v in sd.items()}
    assert all(torch.equal(v, stripped[k]) for k, v in model.net.state_dict().items())
    res = model.sample_all(np.random.default_rng(0).random((32, 32)), n=2, seed=0)
    assert res.masks.shape == (2, 32, 32) and res.steps_done == 4
    info = describe(path, checksum=False)
    assert info["preset"] == "cdal-hippo-32" and info["architecture"]["type"] == "ncsnpp_adagn"
    assert main(["info", str(path)]) == 0
    assert "cdal-hippo-32" in capsys.readouterr().out


def test_content_pth_loads_its_generator(hippo_file, tmp_path):
    _, sd = hippo_file
    content = {"epoch": 3, "global_step": 12, "args": argparse.Namespace(nz=50, lr_g=1e-4),
               "netG_dict": sd, "netD_dict": {"module.start_conv.weight": torch.zeros(4, 6, 1, 1)},
               "optimizerG": {"state": {}, "param_groups": [{"lr": 1e-4, "params": [0]}]}}
    path = tmp_path / "content.pth"
    torch.save(content, path)
    assert load_model(path).name == "cdal-hippo-32"


def test_a_file_fitting_no_preset_is_named_for_what_it_looks_like(hippo_file):
    _, sd = hippo_file
    cut = {k: v for k, v in sd.items() if not k.startswith("module.all_modules.20.")}
    with pytest.raises(ValueError) as err:
        recognise_preset({k[len("module."):]: v for k, v in cut.items()}, "cut.pth")
    msg = str(err.value)
    assert "NCSN++ generator" in msg and "nz=50" in msg and "'cdal-lung-256'" in msg
    disc = {"t_embed.main.0.weight": torch.zeros(4, 4), "start_conv.weight": torch.zeros(2)}
    with pytest.raises(ValueError, match="discriminator, not a generator"):
        recognise_preset(disc, "netD.pth")


# ---------------------------------------------------------------------------- training
def test_train_kind_cdal_lowers_the_loss_and_writes_a_loadable_model(tmp_path, capsys):
    data, out = tmp_path / "ph", tmp_path / "c.safetensors"
    assert main(["data", "phantoms", "--out", str(data), "--cases", "8", "--size", "16"]) == 0
    code = main(["train", "--data", str(data), "--kind", "cdal", "-o", str(out), "--steps",
                 "8", "--batch-size", "2", "--warmup", "2", "--lr", "1e-3", "--quiet",
                 "--base-channels", "32", "--channel-mult", "1,2", "--split", "all"])
    assert code == 0
    rows = np.genfromtxt(tmp_path / "c.log.csv", delimiter=",", names=True)
    assert len(rows) == 8 and np.isfinite(rows["loss_d"]).all()
    assert rows["mse"][-2:].mean() < rows["mse"][:2].mean()
    model = load_model(out)
    assert model.kind == "cdal" and model.net.config.image_size == 16
    res = model.sample_all(np.random.default_rng(1).random((16, 16)), n=2, seed=0)
    assert res.masks.shape == (2, 16, 16) and res.steps_done == 2


def test_cdal_training_resumes_exactly(tmp_path):
    from napari_berdiff.training import train

    whole, a_file = _tiny_cdal_run(tmp_path, "a")
    cfg, ds = _tiny_cdal_setup()
    train(cfg, ds, tmp_path / "b.safetensors", progress=False, stop_after=1)
    rest = train(cfg, ds, tmp_path / "b.safetensors", progress=False, resume=True)
    assert rest.step == 3 and rest.losses == pytest.approx(whole.losses[1:], rel=1e-5)
    a = load_model(a_file).net.state_dict()
    b = load_model(tmp_path / "b.safetensors").net.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_a_foreign_safetensors_generator_is_named_for_what_it_looks_like(tmp_path):
    from safetensors.torch import save_file

    path = tmp_path / "generator.safetensors"
    save_file({k: v.contiguous() for k, v in _tiny_net().state_dict().items()}, str(path))
    with pytest.raises(ValueError) as err:
        load_model(path)
    msg = str(err.value)
    assert "not written by napari-berdiff" in msg and "NCSN++ generator" in msg
    assert "nz=8" in msg


def _tiny_cdal_setup(**changes):
    """A 3-step cDAL recipe on six 16×16 phantoms (changed as given), and that data."""
    from napari_berdiff.data.dataset import SegDataset, SegItem
    from napari_berdiff.data.phantoms import make_phantom
    from napari_berdiff.networks import network_description
    from napari_berdiff.training import TrainConfig, default_diffusion

    items = [SegItem(p.image.astype(np.float32), p.masks, f"c{s}", "000")
             for s, p in ((s, make_phantom(s, 16)) for s in range(6))]
    ds = SegDataset(items, {"description": "tiny phantoms"})
    net = NCSNppConfig(image_size=16, nf=32, ch_mult=(1, 2), num_res_blocks=1,
                       attn_resolutions=(), nz=4, z_emb_dim=16, n_mlp=1, cond_enc_layers=1,
                       cond_enc_num_res_blocks=1)
    settings = dict(kind="cdal", network=network_description(net),
                    diffusion=default_diffusion("cdal").to_dict(), steps=3, batch_size=2,
                    lr=1e-3, betas=(0.5, 0.9), warmup=1, checkpoint_every=10, threads=1)
    return TrainConfig(**{**settings, **changes}), ds


def _tiny_cdal_run(tmp_path, name: str, **changes):
    from napari_berdiff.training import train

    cfg, ds = _tiny_cdal_setup(**changes)
    out = tmp_path / f"{name}.safetensors"
    return train(cfg, ds, out, progress=False), out


def test_energy_loss_trains_on_samples_of_several_latents(tmp_path):
    res, out = _tiny_cdal_run(tmp_path, "e", gen_loss="energy", gen_samples=3)
    rows = np.genfromtxt(tmp_path / "e.log.csv", delimiter=",", names=True)
    assert len(rows) == 3 and np.isfinite(rows["energy"]).all()
    # The logged loss is the energy score (no adversarial term here), not the MSE.
    np.testing.assert_allclose(rows["loss"], rows["energy"], rtol=1e-5)
    assert not np.allclose(rows["loss"], rows["mse"])
    model = load_model(out)
    assert model.sample_all(np.zeros((16, 16)), n=2, seed=0).masks.shape == (2, 16, 16)


def test_init_from_starts_the_generator_from_a_cdal_file(tmp_path):
    _, first = _tiny_cdal_run(tmp_path, "first")
    _, second = _tiny_cdal_run(tmp_path, "second", steps=1, lr=1e-12, seed=5,
                               init_from=str(first))
    a, b = load_model(first).net.state_dict(), load_model(second).net.state_dict()
    assert all(torch.allclose(a[k], b[k], atol=1e-6) for k in a)


def test_init_from_refuses_another_layout_and_a_single_energy_sample(tmp_path):
    from napari_berdiff.networks import network_description
    from napari_berdiff.training import TrainConfig

    _, first = _tiny_cdal_run(tmp_path, "first")
    other = NCSNppConfig(image_size=16, nf=32, ch_mult=(1, 2), num_res_blocks=2,
                         attn_resolutions=(), nz=4, z_emb_dim=16, n_mlp=1, cond_enc_layers=1,
                         cond_enc_num_res_blocks=1)
    with pytest.raises(ValueError, match="another layout"):
        _tiny_cdal_run(tmp_path, "bad", network=network_description(other),
                       init_from=str(first))
    with pytest.raises(ValueError, match="gen_samples must be >= 2"):
        TrainConfig(kind="cdal", network=network_description(other), gen_loss="energy",
                    gen_samples=1)
