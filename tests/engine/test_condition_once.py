"""The condition-once network: encode once, predict per step, same function as forward."""

import numpy as np
import pytest
import torch

from napari_berdiff.diffusion import DiffusionConfig
from napari_berdiff.model import DiffusionModel
from napari_berdiff.networks import (
    CondOnceConfig,
    ConditionOnceNet,
    network_from_metadata,
    network_to_metadata,
)


def randomised(cfg: CondOnceConfig) -> ConditionOnceNet:
    torch.manual_seed(0)
    net = ConditionOnceNet(cfg).eval()
    with torch.no_grad():
        for p in net.parameters():  # the output conv starts at zero: make it non-trivial
            p.add_(torch.randn_like(p) * 0.05)
    return net


def small(**options) -> ConditionOnceNet:
    """A randomised base-8, two-level network with ``options``."""
    return randomised(CondOnceConfig(model_channels=8, encoder_channels=8, channel_mult=(1, 2),
                                     **options))


def inputs() -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One 16×16 image, three binary states and their timesteps."""
    return (torch.rand(1, 1, 16, 16), (torch.rand(3, 1, 16, 16) > 0.5).float(),
            torch.tensor([1, 50, 99]))


@pytest.fixture
def net():
    return small()


def test_forward_is_predict_of_encode_and_broadcasts(net):
    img, x, t = inputs()
    cond = net.encode(img)
    assert [c.shape[1] for c in cond] == [8, 16]
    with torch.no_grad():
        a = net(x, t, img)
        b = net.predict(x, t, cond)
        c = net.predict(x, t, net.encode(img.expand(3, -1, -1, -1)))
    assert a.shape == (3, 1, 16, 16) and (a > 0).all() and (a < 1).all()
    torch.testing.assert_close(a, b)
    torch.testing.assert_close(a, c)


def test_output_depends_on_image_mask_and_time(net):
    img, img2 = torch.rand(1, 1, 16, 16), torch.rand(1, 1, 16, 16)
    x = (torch.rand(2, 1, 16, 16) > 0.5).float()
    with torch.no_grad():
        base = net(x, 10, img)
        assert not torch.allclose(base, net(x, 10, img2))
        assert not torch.allclose(base, net(1 - x, 10, img))
        assert not torch.allclose(base, net(x, 90, img))


def test_size_must_fit_the_network(net):
    with pytest.raises(ValueError, match="divisible by 4"):
        net.encode(torch.rand(1, 1, 18, 16))
    with pytest.raises(ValueError, match=r"image must be \(N, 1, H, W\)"):
        net.encode(torch.rand(1, 2, 16, 16))


def test_metadata_round_trip_rebuilds_the_same_network(net):
    desc = network_to_metadata(net)
    assert desc["type"] == "condition_once"
    again = network_from_metadata(desc)
    assert type(again) is ConditionOnceNet and again.config == net.config
    assert list(again.state_dict()) == list(net.state_dict())
    with pytest.raises(ValueError, match="unknown network type 'vit'"):
        network_from_metadata({"type": "vit"})


def test_samples_through_the_model_object_at_any_size(net):
    m = DiffusionModel(net, DiffusionConfig(kind="bernoulli", timesteps=100, default_steps=3))
    assert m.metadata["network"]["type"] == "condition_once"
    img = np.random.default_rng(0).random((19, 22)).astype(np.float32)
    a = m.sample_all(img, n=5, seed=3)
    b = m.sample_all(img, n=5, seed=3, max_batch=2)
    assert a.probs.shape == (5, 19, 22)
    np.testing.assert_allclose(a.probs, b.probs, atol=1e-6)
    np.testing.assert_array_equal(a.masks, b.masks)


@pytest.fixture
def head_net():
    return small(full_res_head=8)


def test_full_res_head_adds_a_full_resolution_condition_and_matches_forward(head_net):
    img, x, t = inputs()
    cond = head_net.encode(img)
    assert [c.shape[1:] for c in cond] == [(8, 8, 8), (16, 4, 4), (8, 16, 16)]
    with torch.no_grad():
        a = head_net(x, t, img)
        torch.testing.assert_close(a, head_net.predict(x, t, cond))
        assert not torch.allclose(a, head_net(x, 90, img))
        assert not torch.allclose(a, head_net(1 - x, t, img))
        assert not torch.allclose(a, head_net(x, t, torch.rand(1, 1, 16, 16)))
    assert a.shape == (3, 1, 16, 16) and (a > 0).all() and (a < 1).all()
    again = network_from_metadata(network_to_metadata(head_net))
    assert again.config.full_res_head == 8
    assert list(again.state_dict()) == list(head_net.state_dict())


def test_full_res_head_config_errors():
    with pytest.raises(ValueError, match="full_res_head must be 0, or > 0 with unshuffle > 1"):
        CondOnceConfig(unshuffle=1, full_res_head=8)
    with pytest.raises(ValueError, match="not divisible by norm_groups=8"):
        CondOnceConfig(full_res_head=12)


@pytest.fixture(params=[0, 8], ids=["no-head", "head"])
def sc_net(request):
    return small(full_res_head=request.param, self_condition=True)


def test_self_conditioned_net_takes_the_previous_x0(sc_net, net):
    img = torch.rand(1, 1, 16, 16)
    x = (torch.rand(2, 1, 16, 16) > 0.5).float()
    prev = torch.rand(2, 1, 16, 16)
    cond = sc_net.encode(img)
    with torch.no_grad():
        zeros = sc_net.predict(x, 10, cond)
        torch.testing.assert_close(zeros, sc_net.predict(x, 10, cond, torch.zeros_like(x)))
        with_prev = sc_net.predict(x, 10, cond, prev)
        assert not torch.allclose(zeros, with_prev)
        torch.testing.assert_close(with_prev, sc_net(x, 10, img, prev))
    assert sc_net.self_conditioned and not net.self_conditioned
    with pytest.raises(ValueError, match="x0_prev must have x_t's shape"):
        sc_net.predict(x, 10, cond, prev[:1])
    with pytest.raises(ValueError, match="not self-conditioned"):
        net.predict(x, 10, net.encode(img), prev)
    again = network_from_metadata(network_to_metadata(sc_net))
    assert again.config.self_condition
    assert list(again.state_dict()) == list(sc_net.state_dict())


def test_networks_saved_before_self_conditioning_load_without_it(net):
    desc = network_to_metadata(net)
    del desc["self_condition"]
    assert not network_from_metadata(desc).config.self_condition


@pytest.fixture(params=[0, 8], ids=["no-head", "head"])
def prior_net(request):
    return small(full_res_head=request.param, prior_head=True)


def test_prior_head_encodes_a_probability_map_once_that_the_denoiser_sees(prior_net):
    img, x, t = inputs()
    cond = prior_net.encode(img)
    prior = cond[-1]
    assert prior.shape == (1, 1, 16, 16) and (prior > 0).all() and (prior < 1).all()
    with torch.no_grad():
        a = prior_net.predict(x, t, cond)
        out, p = prior_net(x, t, img, return_prior=True)
        torch.testing.assert_close(out, a)
        torch.testing.assert_close(p, prior)
        # The prior is an input of the denoiser: another map, other predictions.
        other = cond[:-1] + [1 - prior]
        assert not torch.allclose(a, prior_net.predict(x, t, other))
        # A batch-1 encoding broadcasts over the samples like an encoding per sample.
        torch.testing.assert_close(
            a, prior_net.predict(x, t, prior_net.encode(img.expand(3, -1, -1, -1))))
    assert prior_net.has_prior_head
    again = network_from_metadata(network_to_metadata(prior_net))
    assert again.config.prior_head
    assert list(again.state_dict()) == list(prior_net.state_dict())


def test_prior_head_trains_the_encoder_but_no_gradient_flows_through_the_input(prior_net):
    img = torch.rand(2, 1, 16, 16)
    x = (torch.rand(2, 1, 16, 16) > 0.5).float()
    out, prior = prior_net(x, torch.tensor([3, 7]), img, return_prior=True)
    out.sum().backward()  # the denoiser's output alone
    assert all(p.grad is None or not p.grad.any() for p in prior_net.prior_out.parameters())
    prior_net.zero_grad()
    _, prior = prior_net(x, torch.tensor([3, 7]), img, return_prior=True)
    prior.sum().backward()
    assert all(p.grad is not None and p.grad.any() for p in prior_net.prior_out.parameters())
    assert prior_net.enc_stem.weight.grad.any()


@pytest.mark.parametrize("head", ["prior", "presence"])
def test_a_network_without_a_head_refuses_to_return_it_and_old_files_load(net, head):
    assert not getattr(net, f"has_{head}_head")
    with pytest.raises(ValueError, match=f"no {head} head"):
        net(torch.zeros(1, 1, 16, 16), 3, torch.rand(1, 1, 16, 16), **{f"return_{head}": True})
    desc = network_to_metadata(net)
    del desc[f"{head}_head"]  # saved before the option existed
    assert not getattr(network_from_metadata(desc).config, f"{head}_head")


@pytest.fixture
def presence_net():
    return small(presence_head=True)


def test_presence_head_gives_one_logit_per_image_from_the_encoding(presence_net):
    img = torch.rand(3, 1, 16, 16)
    x = (torch.rand(3, 1, 16, 16) > 0.5).float()
    t = torch.tensor([1, 50, 99])
    with torch.no_grad():
        cond = presence_net.encode(img)
        logit = presence_net.presence(cond)
        out, again = presence_net(x, t, img, return_presence=True)
        torch.testing.assert_close(out, presence_net.predict(x, t, cond))
    assert logit.shape == (3,)
    torch.testing.assert_close(again, logit)
    assert not torch.allclose(logit[0], logit[1])  # it depends on the image
    out, logit = presence_net(x, t, img, return_presence=True)
    logit.sum().backward()  # the head trains the image encoder
    assert all(p.grad is not None and p.grad.any() for p in presence_net.presence_out.parameters())
    assert presence_net.enc_stem.weight.grad.any()
    assert presence_net.has_presence_head
    assert network_from_metadata(network_to_metadata(presence_net)).config.presence_head


def _with_presence(net: ConditionOnceNet, p: float) -> ConditionOnceNet:
    """``net`` with its presence head fixed at probability ``p`` for every image."""
    with torch.no_grad():
        net.presence_out.weight.zero_()
        net.presence_out.bias.fill_(float(np.log(p / (1 - p))))
    return net


def test_samples_drawn_unmarked_stay_empty_at_every_step_and_the_rest_are_sampled(presence_net):
    m = DiffusionModel(_with_presence(presence_net, 0.7),
                       DiffusionConfig(kind="bernoulli", timesteps=100, default_steps=4))
    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    stream = m.sample(img, n=200, seed=5)
    frames = list(stream)
    res = stream.result
    assert res.presence == pytest.approx(0.7, abs=1e-6)
    # A sigmoid network never predicts exactly 0: only the samples drawn unmarked are all 0.
    empty = ~res.probs.reshape(200, -1).any(1)
    assert 35 <= empty.sum() <= 85, empty.sum()  # Binomial(200, 1 − 0.7): mean 60, s.d. 6.5
    for f in frames:
        assert not f.states[empty].any() and not f.x0_prob[empty].any()
        assert f.x0_prob[~empty].reshape((~empty).sum(), -1).all(1).all()
    # The same run in chunks draws the same samples.
    np.testing.assert_array_equal(m.sample_all(img, n=200, seed=5, max_batch=64).masks,
                                  res.masks)


def test_stratified_presence_draws_floor_or_ceil_of_pn_non_empty_with_marginal_p(presence_net):
    """``presence_draw="stratified"``: per run, ⌊pN⌋ or ⌈pN⌉ non-empty samples; over seeds,
    each sample position is non-empty with probability p (brute force over 400 runs)."""
    from napari_berdiff.diffusion.sampler import _draw_presence

    stratified = DiffusionConfig(kind="bernoulli", presence_draw="stratified")
    net = _with_presence(presence_net, 0.7)
    cond = net.encode(torch.zeros(1, 1, 16, 16))
    counts, per_position = set(), np.zeros(5)
    runs = 400
    for seed in range(runs):
        gen = torch.Generator().manual_seed(seed)
        p, keep = _draw_presence(net, cond, 5, gen, torch.device("cpu"), stratified)
        kept = keep.reshape(-1).numpy()
        counts.add(int(kept.sum()))
        per_position += kept
    assert p == pytest.approx(0.7, abs=1e-6)
    assert counts == {3, 4}  # 0.7 × 5 = 3.5
    # each position: Binomial(400, 0.7) / 400, s.d. 0.023; 4 s.d. is 0.092
    assert np.abs(per_position / runs - 0.7).max() < 0.092
    # independent draws scatter much wider (0..5 at p = 0.7 over 400 runs)
    wide = {int(_draw_presence(net, cond, 5, torch.Generator().manual_seed(s),
                               torch.device("cpu"))[1].sum()) for s in range(runs)}
    assert len(wide) > 3


def test_a_stratified_model_samples_that_many_empty_masks(presence_net):
    cfg = DiffusionConfig(kind="bernoulli", timesteps=100, default_steps=2,
                          presence_draw="stratified")
    m = DiffusionModel(_with_presence(presence_net, 0.7), cfg)
    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    for seed in range(3):
        res = m.sample_all(img, n=16, seed=seed)
        empty = ~res.probs.reshape(16, -1).any(1)
        assert empty.sum() in (4, 5)  # 16 × 0.3 = 4.8
    with pytest.raises(ValueError, match="presence_draw must be one of"):
        DiffusionConfig(kind="bernoulli", presence_draw="sorted")


def test_presence_temperature_divides_the_heads_logit(presence_net):
    from napari_berdiff.diffusion.sampler import _draw_presence

    net = _with_presence(presence_net, 0.8)  # logit ln 4
    cond = net.encode(torch.zeros(1, 1, 16, 16))
    for tau in (0.5, 1.0, 2.0):
        cfg = DiffusionConfig(kind="bernoulli", presence_temperature=tau)
        p, _ = _draw_presence(net, cond, 4, torch.Generator().manual_seed(0),
                              torch.device("cpu"), cfg)
        assert p == pytest.approx(1 / (1 + 4 ** (-1 / tau)), abs=1e-6)
    with pytest.raises(ValueError, match="presence_temperature must be a positive"):
        DiffusionConfig(kind="bernoulli", presence_temperature=0)


def test_the_network_runs_on_marked_samples_only_and_draws_them_as_if_all_were(
        presence_net, monkeypatch):
    """The samples drawn unmarked cost no network time, and the marked ones are the very
    samples a run where every sample is marked (p = 1, same seed) draws."""
    cfg = DiffusionConfig(kind="bernoulli", timesteps=100, default_steps=4)
    img = np.random.default_rng(1).random((16, 16)).astype(np.float32)
    rows = []
    real = ConditionOnceNet.predict

    def spy(self, x_t, *a, **kw):
        rows.append(x_t.shape[0])
        return real(self, x_t, *a, **kw)

    monkeypatch.setattr(ConditionOnceNet, "predict", spy)
    some = DiffusionModel(_with_presence(presence_net, 0.7), cfg).sample_all(img, n=40, seed=5,
                                                                             max_batch=16)
    marked = some.probs.reshape(40, -1).any(1)
    per_chunk = [int(marked[a : a + 16].sum()) for a in (0, 16, 32)]
    assert 0 < sum(per_chunk) < 40
    assert rows == [c for c in per_chunk if c] * 4  # a chunk with no marked sample is skipped
    with torch.no_grad():
        presence_net.presence_out.bias.fill_(50.0)  # p = 1 in float32: every sample marked
    every = DiffusionModel(presence_net, cfg).sample_all(img, n=40, seed=5, max_batch=16)
    assert every.presence == 1.0 and every.probs.reshape(40, -1).any(1).all()
    np.testing.assert_allclose(some.probs[marked], every.probs[marked], atol=1e-5)
    np.testing.assert_array_equal(some.masks[marked], every.masks[marked])


def test_a_presence_head_with_the_gaussian_kernel_is_refused(presence_net):
    m = DiffusionModel(presence_net, DiffusionConfig(kind="gaussian", timesteps=100,
                                                     default_steps=3))
    with pytest.raises(ValueError, match="presence head samples with the Bernoulli kernel"):
        m.sample_all(np.zeros((16, 16), np.float32), n=2, seed=0)


@pytest.fixture
def reader_net():
    return small(readers=3)


def test_reader_conditioning_changes_the_prediction_per_sample(reader_net):
    img, x, t = inputs()
    with torch.no_grad():
        cond = reader_net.encode(img)
        mixed = reader_net.predict(x, t, cond, reader=torch.tensor([0, 2, 1]))
        per = [reader_net.predict(x, t, cond, reader=r) for r in range(3)]  # one for all
        torch.testing.assert_close(mixed, torch.stack([per[0][0], per[2][1], per[1][2]]))
        assert not torch.allclose(per[0], per[1])
        torch.testing.assert_close(reader_net(x, t, img, reader=1), per[1])
        fresh = ConditionOnceNet(reader_net.config).eval()  # the embedding starts at zero
        torch.testing.assert_close(fresh.predict(x, t, fresh.encode(img), reader=0),
                                   fresh.predict(x, t, fresh.encode(img), reader=2))
    assert reader_net.n_readers == 3
    assert network_from_metadata(network_to_metadata(reader_net)).config.readers == 3


def test_reader_arguments_are_checked(reader_net, net):
    img, x = torch.rand(1, 1, 16, 16), torch.zeros(2, 1, 16, 16)
    cond = reader_net.encode(img)
    with pytest.raises(ValueError, match=r"reader-conditioned \(readers=3\); give the reader "
                                         r"index of each sample, 0..2"):
        reader_net.predict(x, 5, cond)
    with pytest.raises(ValueError, match=r"reader indices must lie in 0..2; got \[0, 3\]"):
        reader_net.predict(x, 5, cond, reader=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"one index or one per sample \(2\); got 3"):
        reader_net.predict(x, 5, cond, reader=torch.tensor([0, 1, 2]))
    with pytest.raises(ValueError, match="not reader-conditioned"):
        net.predict(x, 5, net.encode(img), reader=0)
    with pytest.raises(ValueError, match="readers must be a whole number >= 0, got 1.5"):
        CondOnceConfig(readers=1.5)
    desc = network_to_metadata(net)
    del desc["readers"]  # saved before the option existed
    assert network_from_metadata(desc).config.readers == 0


def test_the_sampler_spreads_samples_evenly_over_the_readers(reader_net, monkeypatch):
    m = DiffusionModel(reader_net, DiffusionConfig(kind="bernoulli", timesteps=100,
                                                   default_steps=3))
    img = np.random.default_rng(0).random((16, 16)).astype(np.float32)
    seen = []
    real = ConditionOnceNet.predict

    def spy(self, x_t, t, cond, *a, reader=None):
        seen.append(reader.tolist())
        return real(self, x_t, t, cond, *a, reader=reader)

    monkeypatch.setattr(ConditionOnceNet, "predict", spy)
    res = m.sample_all(img, n=7, seed=2)
    np.testing.assert_array_equal(res.readers, [0, 1, 2, 0, 1, 2, 0])
    assert seen == [[0, 1, 2, 0, 1, 2, 0]] * 3
    seen.clear()
    chunked = m.sample_all(img, n=7, seed=2, max_batch=3)
    assert seen == [[0, 1, 2], [0, 1, 2], [0]] * 3  # sample i is reader i mod 3 in any chunk
    np.testing.assert_array_equal(chunked.masks, res.masks)
    np.testing.assert_allclose(chunked.probs, res.probs, atol=1e-6)
    assert m.sample_all(img, n=2, seed=2).readers.tolist() == [0, 1]
