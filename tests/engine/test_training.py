"""The trainers: loss goes down, checkpoints load, --resume is exact, DDP on gloo (small)."""

from __future__ import annotations

import csv
import json
import os
import socket
import time

import numpy as np
import pytest
import torch

from napari_berdiff.data.dataset import SegDataset, SegItem
from napari_berdiff.data.phantoms import make_phantom
from napari_berdiff.diffusion import DiffusionConfig
from napari_berdiff.networks import tiny_config
from napari_berdiff.training import TrainConfig, log_path_for, state_path_for, train
from napari_berdiff.training.trainer import load_state

SIZE = 16


def _dataset(n=8, size=SIZE) -> SegDataset:
    items = []
    for s in range(n):
        p = make_phantom(s, size=size)
        items.append(SegItem(p.image, p.masks, f"c{s}", "0", info=p.info))
    return SegDataset(items, {"layout": "phantoms", "description": "test phantoms"})


def _config(kind="bernoulli", **kw) -> TrainConfig:
    net = tiny_config(model_channels=8, norm_groups=4, attention_resolutions=(),
                      output_activation="none" if kind == "gaussian" else "sigmoid")
    if kind == "gaussian":
        diff = DiffusionConfig(kind="gaussian", timesteps=50, schedule="cosine", default_steps=4)
    else:
        diff = DiffusionConfig(kind="bernoulli", timesteps=50, schedule="cosine",
                               prediction="x0", default_steps=4)
    base = dict(kind=kind, network=net.to_dict(), diffusion=diff.to_dict(), steps=30,
                batch_size=4, lr=3e-3, warmup=0, checkpoint_every=10, threads=1, seed=3)
    base.update(kw)
    return TrainConfig(**base)


def _csv_losses(path):
    with open(path, newline="") as f:
        rows = list(csv.DictReader(f))
    return [int(r["step"]) for r in rows], [float(r["loss"]) for r in rows]


@pytest.fixture(scope="module")
def data():
    return _dataset()


@pytest.mark.parametrize("kind", ["bernoulli", "deterministic", "gaussian"])
def test_few_steps_lower_the_loss_and_write_a_loadable_checkpoint(tmp_path, data, kind):
    from napari_berdiff.checkpoints.loading import load_model

    out = tmp_path / f"{kind}.safetensors"
    res = train(_config(kind, steps=40 if kind == "gaussian" else 30), data, out,
                progress=False)
    assert res.step == len(res.losses)
    first, last = np.mean(res.losses[:5]), np.mean(res.losses[-5:])
    assert last < first, (kind, first, last)
    assert out.exists() and state_path_for(out).exists() and log_path_for(out).exists()
    steps, _ = _csv_losses(log_path_for(out))
    assert steps == list(range(1, res.step + 1))

    m = load_model(out)
    assert m.kind == ("segmentor" if kind == "deterministic" else kind)
    meta = m.metadata
    assert meta["training"]["steps_done"] == res.step
    assert meta["training"]["recipe"]["kind"] == kind
    assert meta["data"]["dataset"]["description"] == "test phantoms"
    assert meta["data"]["normalisation"] == {"mode": "minmax"}
    # the exported weights are the EMA weights
    st = load_state(state_path_for(out))
    for k, v in m.net.state_dict().items():
        torch.testing.assert_close(v, st["ema"][k])
    if kind != "deterministic":
        r = m.sample_all(data[0].image, n=2, steps=2, seed=0)
        assert r.masks.shape == (2, SIZE, SIZE)


def test_resume_continues_exactly(tmp_path, data):
    cfg = _config(steps=12, checkpoint_every=4)
    full = train(cfg, data, tmp_path / "full.safetensors", progress=False)
    part = tmp_path / "part.safetensors"
    first = train(cfg, data, part, progress=False, stop_after=6)
    assert first.step == 6 and load_state(state_path_for(part))["step"] == 6
    second = train(cfg, data, part, progress=False, resume=True)
    assert second.step == 12 and len(second.losses) == 6
    np.testing.assert_allclose(first.losses + second.losses, full.losses, rtol=0, atol=1e-6)
    steps, losses = _csv_losses(log_path_for(part))
    assert steps == list(range(1, 13))
    np.testing.assert_allclose(losses, _csv_losses(log_path_for(tmp_path / "full.safetensors"))[1],
                               atol=1e-5)
    a = load_state(state_path_for(part))["ema"]
    b = load_state(state_path_for(tmp_path / "full.safetensors"))["ema"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_resume_without_state_is_a_clear_error(tmp_path, data):
    with pytest.raises(ValueError, match="cannot resume"):
        train(_config(steps=2), data, tmp_path / "x.safetensors", resume=True, progress=False)


def test_condition_once_network_trains_and_reloads_as_itself(tmp_path, data):
    from napari_berdiff.checkpoints.loading import load_model
    from napari_berdiff.networks import CondOnceConfig, ConditionOnceNet, network_description

    net = CondOnceConfig(image_size=SIZE, model_channels=8, channel_mult=(1, 2),
                         encoder_channels=8, norm_groups=4)
    out = tmp_path / "co.safetensors"
    res = train(_config(network=network_description(net), steps=30), data, out, progress=False)
    assert np.mean(res.losses[-5:]) < np.mean(res.losses[:5])
    m = load_model(out)
    assert isinstance(m.net, ConditionOnceNet)
    assert m.metadata["network"]["type"] == "condition_once"
    assert m.metadata["training"]["recipe"]["network"]["type"] == "condition_once"
    r = m.sample_all(data[0].image, n=2, steps=2, seed=0)
    assert r.masks.shape == (2, SIZE, SIZE)


def test_config_rejects_bad_settings():
    with pytest.raises(ValueError, match="unknown network type"):
        TrainConfig(network={"type": "transformer"})
    with pytest.raises(ValueError, match="unknown kind"):
        TrainConfig(kind="magic")
    with pytest.raises(ValueError, match="output_activation"):
        _config("gaussian", network=tiny_config(norm_groups=4).to_dict())
    with pytest.raises(ValueError, match="unknown training settings"):
        TrainConfig.from_dict({"kind": "bernoulli", "speed": 3})


def test_cli_train_and_resume(tmp_path):
    from napari_berdiff.cli import main
    from napari_berdiff.checkpoints.loading import load_model

    d = tmp_path / "data"
    assert main(["data", "phantoms", "--out", str(d), "--cases", "6", "--size", "16"]) == 0
    out = tmp_path / "m.safetensors"
    common = ["train", "--data", str(d), "--kind", "bernoulli", "-o", str(out),
              "--base-channels", "8", "--channel-mult", "1,2", "--res-blocks", "1",
              "--attention", "", "--norm-groups", "4", "--batch-size", "2",
              "--timesteps", "20", "--sampling-steps", "4", "--checkpoint-every", "2",
              "--threads", "1", "--quiet"]
    assert main(common + ["--steps", "3"]) == 0
    assert load_model(out).metadata["training"]["steps_done"] == 3
    assert main(common + ["--steps", "3"]) == 2  # exists: needs --resume or --force
    assert main(common + ["--steps", "5", "--resume"]) == 0
    assert load_state(state_path_for(out))["step"] == 5
    steps, _ = _csv_losses(log_path_for(out))
    assert steps == [1, 2, 3, 4, 5]
    meta = load_model(out).metadata
    assert meta["training"]["steps_done"] == 5
    assert meta["data"]["dataset"]["split"] == "train"
    # phantoms of 16 px are a 64 mm field of view: 4 mm pixels, recorded with the input stats
    assert meta["data"]["spacing"] == [4.0, 4.0]
    stats = meta["data"]["intensity_stats"]
    assert stats["n_images"] == meta["data"]["dataset"]["items"] > 0
    assert len(stats["mean"]) == len(stats["features"])
    missing = ["train", "--data", str(tmp_path / "none"), "-o", str(tmp_path / "y.safetensors")]
    assert main(missing) == 2


def test_cli_trains_a_self_conditioned_condition_once_model(tmp_path, capsys):
    from napari_berdiff.cli import main
    from napari_berdiff.checkpoints.loading import load_model
    from napari_berdiff.networks import ConditionOnceNet

    d = tmp_path / "data"
    assert main(["data", "phantoms", "--out", str(d), "--cases", "6", "--size", "16"]) == 0
    out = tmp_path / "co.safetensors"
    common = ["train", "--data", str(d), "-o", str(out),  # condition-once by default
              "--base-channels", "8", "--channel-mult", "1,2", "--res-blocks", "1",
              "--norm-groups", "4", "--batch-size", "2", "--timesteps", "20",
              "--sampling-steps", "4", "--threads", "1", "--quiet", "--steps", "2"]
    assert main(common + ["--self-condition"]) == 0
    m = load_model(out)
    assert isinstance(m.net, ConditionOnceNet) and m.net.self_conditioned
    assert m.net.config.model_channels == 8 and m.net.config.encoder_channels == 32
    assert main(common + ["--force", "--unroll-prob", "0.5"]) == 0
    assert load_model(out).metadata["training"]["recipe"]["unroll_prob"] == 0.5
    assert main(common + ["--force", "--presence-head"]) == 0
    assert load_model(out).net.has_presence_head
    assert main(common + ["--force", "--readers", "4", "--kind", "gaussian"]) == 0
    assert load_model(out).net.n_readers == 4
    assert main(common + ["--force", "--network", "unet", "--attention", ""]) == 0
    assert not isinstance(load_model(out).net, ConditionOnceNet)
    capsys.readouterr()
    for extra, message in [
        (["--kind", "deterministic", "--network", "condition-once"],
         "--network condition-once is for --kind bernoulli or"),
        (["--kind", "gaussian", "--self-condition"], "--self-condition needs --kind bernoulli"),
        (["--network", "unet", "--self-condition"], "--self-condition needs --kind bernoulli"),
        (["--kind", "gaussian", "--presence-head"], "--presence-head needs --kind bernoulli"),
        (["--attention", "4", "--network", "condition-once"],
         "--attention applies to the UNet only"),
        (["--network", "unet", "--readers", "4"], "--readers needs the condition-once network"),
        (["--readers", "-1"], "--readers must be >= 0, got -1"),
        (["--readers", "3"], "conditioned on 3 readers, but some items have 4 annotations"),
        (["--kind", "gaussian", "--unroll-prob", "0.5"],
         "implemented for kind 'bernoulli' without self-conditioning"),
    ]:
        assert main(common + ["--force"] + extra) == 2
        assert message in capsys.readouterr().err


# ---------------------------------------------------------------------------- DDP
def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _ddp_worker(rank: int, world: int, port: int, out: str, cfg_json: str):
    os.environ.update({"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
                       "WORLD_SIZE": str(world), "RANK": str(rank), "LOCAL_RANK": str(rank),
                       "BERDIFF_DDP_BACKEND": "gloo"})
    cfg = TrainConfig.from_dict(json.loads(cfg_json))
    res = train(cfg, _dataset(), out, progress=False)
    with open(f"{out}.losses{rank}.json", "w") as f:
        json.dump(res.losses, f)


@pytest.mark.skipif(not torch.distributed.is_available(), reason="torch.distributed unavailable")
def test_ddp_two_processes_on_gloo_match_one_process(tmp_path):
    import torch.multiprocessing as mp

    if not torch.distributed.is_gloo_available():
        pytest.skip("this torch build has no gloo backend")
    cfg = _config(steps=3, batch_size=2, checkpoint_every=3)
    out = tmp_path / "ddp.safetensors"
    # fork: the children need not re-import torch (they run with one thread each)
    method = "fork" if "fork" in mp.get_all_start_methods() else "spawn"
    ctx = mp.start_processes(_ddp_worker, args=(2, _free_port(), str(out), cfg.to_json()),
                             nprocs=2, join=False, start_method=method)
    deadline = time.monotonic() + 120
    while not ctx.join(timeout=1):
        if time.monotonic() > deadline:
            for p in ctx.processes:
                p.kill()
            pytest.fail("the 2-process DDP run did not finish within 120 s")
    assert out.exists()
    ret = [json.loads(open(f"{out}.losses{r}.json").read()) for r in range(2)]
    ddp_losses = ret[0]
    assert len(ddp_losses) == 3
    assert ret[1] == ddp_losses  # every rank logs the all-reduced loss
    # One process with the global batch (2 x 2) computes the same steps.
    single = train(cfg.replace(batch_size=4), _dataset(), tmp_path / "one.safetensors",
                   progress=False)
    np.testing.assert_allclose(ddp_losses, single.losses, rtol=1e-4, atol=1e-5)
    a = load_state(state_path_for(out))["net"]
    b = load_state(state_path_for(tmp_path / "one.safetensors"))["net"]
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-3, atol=1e-5)


def _trains_and_resumes_exactly(cfg: TrainConfig, data, tmp_path):
    """Train ``cfg`` in one go and in two parts (stop after step 5, resume): the loss falls,
    and the resumed run logs exactly the uninterrupted run's losses. Returns the part run."""
    full = train(cfg, data, tmp_path / "full.safetensors", progress=False)
    assert np.mean(full.losses[-4:]) < np.mean(full.losses[:4])
    part = tmp_path / "part.safetensors"
    first = train(cfg, data, part, progress=False, stop_after=5)
    second = train(cfg, data, part, progress=False, resume=True)
    np.testing.assert_allclose(first.losses + second.losses, full.losses, rtol=0, atol=1e-6)
    return part


def _self_conditioned_network() -> dict:
    from napari_berdiff.networks import CondOnceConfig, network_description

    return network_description(CondOnceConfig(image_size=SIZE, model_channels=8,
                                              channel_mult=(1, 2), encoder_channels=8,
                                              norm_groups=4, self_condition=True))


@pytest.mark.parametrize("gap", [0, 10])
def test_self_conditioned_network_trains_resumes_exactly_and_samples(tmp_path, data, gap):
    from napari_berdiff.checkpoints.loading import load_model

    cfg = _config(network=_self_conditioned_network(), steps=12, checkpoint_every=4,
                  self_condition_gap=gap)
    part = _trains_and_resumes_exactly(cfg, data, tmp_path)
    m = load_model(part)
    assert m.net.self_conditioned
    r = m.sample_all(data[0].image, n=2, steps=3, seed=0)
    assert r.masks.shape == (2, SIZE, SIZE)


def test_self_condition_gap_must_not_be_negative():
    with pytest.raises(ValueError, match="self_condition_gap must be >= 0"):
        _config(self_condition_gap=-1)


def _prior_head_network(kind: str = "bernoulli") -> dict:
    from napari_berdiff.networks import CondOnceConfig, network_description

    return network_description(CondOnceConfig(
        image_size=SIZE, model_channels=8, channel_mult=(1, 2), encoder_channels=8,
        norm_groups=4, prior_head=True,
        output_activation="none" if kind == "gaussian" else "sigmoid"))


@pytest.mark.parametrize("kind", ["bernoulli", "gaussian"])
def test_prior_head_network_trains_resumes_exactly_and_its_head_learns(tmp_path, data, kind):
    """The head's loss is part of the logged loss, and training makes it a segmentor."""
    from napari_berdiff.checkpoints.loading import load_model
    from napari_berdiff.training.trainer import segmentor_loss_parts

    cfg = _config(kind, network=_prior_head_network(kind), steps=12, checkpoint_every=4,
                  unroll_prob=0.5 if kind == "bernoulli" else 0.0)
    part = _trains_and_resumes_exactly(cfg, data, tmp_path)
    without = train(cfg.replace(prior_weight=0.0), data, tmp_path / "w.safetensors",
                    progress=False)
    trained, untrained = load_model(part).net, load_model(tmp_path / "w.safetensors").net
    img = torch.stack([torch.as_tensor(it.image) for it in data]).float()[:, None]
    lo, hi = img.amin((1, 2, 3), keepdim=True), img.amax((1, 2, 3), keepdim=True)
    img = (img - lo) / (hi - lo)  # the recipe's min-max normalisation
    target = torch.stack([torch.as_tensor(it.masks[:1]) for it in data]).float()

    def head_loss(net):
        with torch.no_grad():
            return sum(segmentor_loss_parts(net.encode(img)[-1], target))

    assert head_loss(trained) < head_loss(untrained)
    r = load_model(part).sample_all(data[0].image, n=2, steps=3, seed=0)
    assert r.masks.shape == (2, SIZE, SIZE)


def test_prior_head_config_errors():
    with pytest.raises(ValueError, match="prior_weight must be >= 0"):
        _config(prior_weight=-1.0)
    with pytest.raises(ValueError, match="prior head .* not 'deterministic'"):
        _config("deterministic", network=_prior_head_network())


def _presence_head_network() -> dict:
    from napari_berdiff.networks import CondOnceConfig, network_description

    return network_description(CondOnceConfig(
        image_size=SIZE, model_channels=8, channel_mult=(1, 2), encoder_channels=8,
        norm_groups=4, presence_head=True))


def test_draws_for_a_presence_head_use_non_empty_annotations_only():
    from napari_berdiff.training.loop import TrainingArrays, draw_batch

    masks = torch.zeros(3, 4, 2, 2, dtype=torch.uint8)
    masks[0, 1, 0, 0] = masks[0, 3, 1, 1] = 1  # item 0: annotators 1 and 3 marked
    masks[1, 0, 0, 1] = 1  # item 1: only annotator 0 (of 2) marked; slots 2, 3 unused
    masks[1, 2, 0, 0] = 1  # a stray slot beyond item 1's annotator count
    data = TrainingArrays(torch.zeros(3, 1, 2, 2), masks, torch.tensor([4, 2, 4]), {})
    torch.testing.assert_close(data.presence_fraction(torch.tensor([0, 1, 2])),
                               torch.tensor([0.5, 0.5, 0.0]))
    gen = torch.Generator().manual_seed(0)
    idx, _, x0, _, _ = draw_batch(gen, data, 600, augment=False, nonempty_only=True)
    seen = {i: {tuple(m.flatten().tolist()) for m in x0[idx == i]} for i in range(3)}
    assert seen[0] == {(1, 0, 0, 0), (0, 0, 0, 1)}  # both marked ones, never an empty one
    assert seen[1] == {(0, 1, 0, 0)}
    assert seen[2] == {(0, 0, 0, 0)}  # nothing marked: its (empty) annotations as before
    share = (x0[idx == 0].flatten(1)[:, 0] == 1).float().mean()
    assert 0.4 < share < 0.6  # uniform between the two marked annotators
    idx, _, x0, _, _ = draw_batch(torch.Generator().manual_seed(0), data, 600, augment=False)
    assert (x0[idx == 0].flatten(1).sum(1) == 0).any()  # without the option empties are drawn


def test_presence_head_network_trains_resumes_exactly_and_its_head_learns(tmp_path):
    """The head learns the fraction of non-empty annotations (some annotators miss)."""
    from napari_berdiff.checkpoints.loading import load_model
    from napari_berdiff.training.loop import training_arrays

    items = []
    for s in range(8):
        p = make_phantom(s, size=SIZE)
        masks = p.masks.copy()
        masks[: s % 4] = 0  # items with 0..3 of their 4 annotators missing the lesion
        items.append(SegItem(p.image, masks, f"c{s}", "0"))
    data = SegDataset(items, {"layout": "phantoms", "description": "test phantoms"})
    cfg = _config(network=_presence_head_network(), steps=60, checkpoint_every=20,
                  unroll_prob=0.5, lr=2e-2)
    part = _trains_and_resumes_exactly(cfg, data, tmp_path)
    without = train(cfg.replace(presence_weight=0.0), data, tmp_path / "w.safetensors",
                    progress=False)
    arrays = training_arrays(cfg, data, 1, 2)
    target = arrays.presence_fraction(torch.arange(8))
    brute = [np.mean([m.any() for m in it.masks]) for it in items]
    torch.testing.assert_close(target, torch.tensor(brute, dtype=torch.float32))
    assert len(set(brute)) >= 3

    def head_loss(path):
        net = load_model(path).net
        with torch.no_grad():
            logit = net.presence(net.encode(arrays.images.float()))
        return float(torch.nn.functional.binary_cross_entropy_with_logits(logit, target))

    assert head_loss(part) < head_loss(tmp_path / "w.safetensors")
    r = load_model(part).sample_all(data[0].image, n=4, steps=3, seed=0)
    assert r.masks.shape == (4, SIZE, SIZE) and 0 < r.presence < 1


def test_presence_head_config_errors():
    with pytest.raises(ValueError, match="presence_weight must be >= 0"):
        _config(presence_weight=-1.0)
    net = _presence_head_network()
    net["output_activation"] = "none"
    with pytest.raises(ValueError, match="presence head .* 'bernoulli' only, not 'gaussian'"):
        _config("gaussian", network=net)


def _reader_network(readers: int = 4, **kw) -> dict:
    from napari_berdiff.networks import CondOnceConfig, network_description

    return network_description(CondOnceConfig(
        image_size=SIZE, model_channels=8, channel_mult=(1, 2), encoder_channels=8,
        norm_groups=4, readers=readers, **kw))


@pytest.mark.parametrize("augment", [False, True])
def test_each_drawn_mask_is_the_drawn_annotators(data, augment):
    from napari_berdiff.training.loop import augment_batch, training_arrays

    arrays = training_arrays(_config(), data, 1, 2)
    batch = draw_batch_for_test(arrays, augment)
    want = arrays.masks[batch.idx, batch.annotator].unsqueeze(1).float()
    if augment:
        want = augment_batch(want, batch.codes)
    torch.testing.assert_close(batch.mask, want)
    assert set(batch.annotator.tolist()) == {0, 1, 2, 3}


def draw_batch_for_test(arrays, augment):
    from napari_berdiff.training.loop import draw_batch

    return draw_batch(torch.Generator().manual_seed(1), arrays, 64, augment)


def test_a_reader_conditioned_network_is_given_each_items_annotator(tmp_path, data,
                                                                    monkeypatch):
    """Every forward pass of training (the loss's, and the unrolled step's) gets the reader
    index of the annotation it is trained on; training resumes exactly."""
    from napari_berdiff.checkpoints.loading import load_model
    from napari_berdiff.networks import ConditionOnceNet
    from napari_berdiff.training import trainer

    steps: list[tuple[torch.Tensor, list[torch.Tensor]]] = []
    real_draw, real_forward = trainer.draw_batch, ConditionOnceNet.forward

    def spy_draw(*a, **kw):
        batch = real_draw(*a, **kw)
        steps.append((batch.annotator.clone(), []))
        return batch

    def spy_forward(self, x_t, t, image, *a, reader=None, **kw):
        steps[-1][1].append(reader.clone())
        return real_forward(self, x_t, t, image, *a, reader=reader, **kw)

    monkeypatch.setattr(trainer, "draw_batch", spy_draw)
    monkeypatch.setattr(ConditionOnceNet, "forward", spy_forward)
    cfg = _config(network=_reader_network(), steps=3, batch_size=8, unroll_prob=1.0)
    train(cfg, data, tmp_path / "spy.safetensors", progress=False)
    assert len(steps) == 3
    for annotator, passes in steps:
        assert len(passes) == 2  # the unrolled step (its chosen items), then the loss's pass
        assert torch.equal(passes[1], annotator)
        left = iter(annotator.tolist())  # the unrolled items' readers, in batch order
        assert 0 < len(passes[0]) and all(r in left for r in passes[0].tolist())
    monkeypatch.undo()
    part = _trains_and_resumes_exactly(
        cfg.replace(steps=12, checkpoint_every=4, unroll_prob=0.5), data, tmp_path)
    net = load_model(part).net
    assert net.n_readers == 4 and net.reader_embed.weight.abs().sum(1).gt(0).all()


def test_a_reader_conditioned_network_learns_each_readers_style(tmp_path):
    """Four readers who threshold the same soft blob at their own level: after training,
    the network's x̂0 for reader k is closest, in area, to reader k's masks (with 80 steps
    here: areas 134, 63, 34, 10 pixels against the masks' 129, 59, 28, 8)."""
    from napari_berdiff.checkpoints.loading import load_model

    yy, xx = np.mgrid[:SIZE, :SIZE]
    items = []
    for s in range(6):
        rng = np.random.default_rng(s)
        cy, cx = rng.uniform(6, 10, 2)
        soft = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 18.0).astype(np.float32)
        masks = np.stack([soft > lv for lv in (0.1, 0.35, 0.6, 0.85)]).astype(np.uint8)
        items.append(SegItem(soft, masks, f"c{s}", "0"))
    ds = SegDataset(items, {"layout": "test", "description": "readers at 4 levels"})
    cfg = _config(network=_reader_network(), steps=80, batch_size=8, lr=1e-2,
                  checkpoint_every=80)
    train(cfg, ds, tmp_path / "r.safetensors", progress=False)
    net = load_model(tmp_path / "r.safetensors").net
    img = torch.from_numpy(items[0].image)[None, None]
    with torch.no_grad():
        cond = net.encode(img)
        x_t = torch.full((4, 1, SIZE, SIZE), 0.5).bernoulli(generator=torch.Generator()
                                                             .manual_seed(0))
        x0 = net.predict(x_t, torch.full((4,), 49), cond, reader=torch.arange(4))
    areas = x0.sum((1, 2, 3)).numpy()
    truth = items[0].masks.reshape(4, -1).sum(1)
    assert np.all(np.diff(areas) < 0), (areas, truth)  # looser readers mark more
    nearest = np.abs(areas[:, None] - truth[None, :]).argmin(1)
    assert (nearest == np.arange(4)).sum() >= 3, (areas, truth)


def test_reader_conditioning_errors(data, tmp_path):
    with pytest.raises(ValueError, match="readers must be a whole number >= 0"):
        _reader_network(readers=-1)
    cfg = _config(network=_reader_network(readers=2), steps=2)
    with pytest.raises(ValueError, match="conditioned on 2 readers, but some items have 4"):
        train(cfg, data, tmp_path / "x.safetensors", progress=False)


@pytest.mark.parametrize("kind", ["gaussian", "deterministic"])
def test_self_conditioning_is_refused_for_other_kinds(kind):
    net = _self_conditioned_network()
    net["output_activation"] = "none" if kind == "gaussian" else "sigmoid"
    with pytest.raises(ValueError, match="for kind 'bernoulli' only, not '" + kind):
        _config(kind, network=net)


def test_step_unrolled_training_lowers_the_loss_and_resumes_exactly(tmp_path, data):
    _trains_and_resumes_exactly(_config(steps=12, checkpoint_every=4, unroll_prob=0.5), data,
                                tmp_path)


def test_unrolled_states_are_one_sampler_step_of_the_network(data):
    """Every chosen item's x_t is the step from its x_{t'} with the network's own x̂0, drawn
    with the stored uniforms; the others keep the forward-process draw."""
    from napari_berdiff.diffusion import make_kernel
    from napari_berdiff.training.trainer import _Unroll, unroll_gap_for

    cfg = _config(unroll_prob=0.5)
    kernel = make_kernel(cfg.diffusion_config())
    assert unroll_gap_for(cfg) == round(49 / 3)  # 4 visited steps of T = 50: 0, 16, 33, 49
    assert unroll_gap_for(cfg.replace(unroll_gap=7)) == 7
    gen = torch.Generator().manual_seed(0)
    x0 = torch.from_numpy(np.stack([it.masks[0] for it in data])[:, None]).float()
    img = torch.rand(x0.shape, generator=gen)
    t = torch.tensor([0, 5, 20, 40, 45, 49, 10, 30])
    x_t = kernel.q_sample(x0, t, generator=gen)
    u = _Unroll.draw(kernel, gen, x_t, t, 0.5, 16)
    assert not u.chosen[t + 16 > 49].any()  # nowhere noisier to start from: never unrolled
    assert u.chosen.any() and not u.chosen.all()
    torch.manual_seed(0)
    net = cfg.build_network().eval()
    out = u.apply(net, kernel, x_t, t, img)
    for i in range(len(t)):
        if not u.chosen[i]:
            assert torch.equal(out[i], x_t[i])
            continue
        s, tp = int(t[i]), int(u.t_prev[i])
        with torch.no_grad():
            x0_hat = net(u.x_prev[i:i + 1], u.t_prev[i:i + 1], img[i:i + 1])
        sigma = (1 - kernel.schedule.alpha_bar(s)) / (1 - kernel.schedule.alpha_bar(tp))
        mean = (sigma * u.x_prev[i] + (kernel.schedule.alpha_bar(s)
                                      - sigma * kernel.schedule.alpha_bar(tp)) * x0_hat[0])
        torch.testing.assert_close(out[i], (u.uniforms[i] < mean).float())


def test_unrolled_training_settings_are_checked():
    with pytest.raises(ValueError, match="unroll_prob must lie in"):
        _config(unroll_prob=1.5)
    with pytest.raises(ValueError, match="unroll_gap must be >= 0"):
        _config(unroll_gap=-1)
    with pytest.raises(ValueError, match="implemented for kind 'bernoulli' without"):
        _config("gaussian", unroll_prob=0.5)
    with pytest.raises(ValueError, match="implemented for kind 'bernoulli' without"):
        _config(network=_self_conditioned_network(), unroll_prob=0.5)
