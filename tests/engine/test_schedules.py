import numpy as np
import pytest

from napari_berdiff.diffusion import Schedule, betas_for, timestep_subsequence


def test_cosine_alpha_bar_matches_published_values():
    s = Schedule("cosine", 1000)
    expected = [0.972, 0.898, 0.786, 0.646, 0.492, 0.339, 0.202, 0.093, 0.024]
    got = s.alpha_bars[[100, 200, 300, 400, 500, 600, 700, 800, 900]]
    np.testing.assert_allclose(np.round(got, 3), expected, atol=0)
    assert round(float(s.alpha_bars[999]), 6) == 0.0


def test_cosine_betas_are_capped():
    assert betas_for("cosine", 1000).max() <= 0.999


def test_linear_schedule_is_scaled_to_chain_length():
    b = betas_for("linear", 1000)
    assert b[0] == pytest.approx(1e-4) and b[-1] == pytest.approx(0.02)
    b100 = betas_for("linear", 100)
    assert b100[0] == pytest.approx(1e-3) and b100[-1] == pytest.approx(0.2)


def test_alpha_bar_linear_reaches_zero():
    s = Schedule("alpha_bar_linear", 10)
    np.testing.assert_allclose(s.alpha_bars, 1 - np.arange(1, 11) / 10, atol=1e-12)
    assert s.alpha_bar(-1) == 1.0


def test_ddimuni_visits_official_steps():
    assert timestep_subsequence("ddimuni10", 1000) == list(range(0, 1000, 100))


def test_uniform_and_quadratic_subsequences():
    u = timestep_subsequence("uniform:10", 1000)
    assert u[0] == 0 and u[-1] == 999 and len(u) == 10
    assert timestep_subsequence(10, 1000) == u
    q = timestep_subsequence("quadratic:10", 1000)
    assert len(q) == 10 and q[0] == 0 and np.all(np.diff(q) > 0)
    assert np.all(np.diff(np.diff(q)) >= 0)  # denser near 0
    assert timestep_subsequence(1, 1000) == [999]


@pytest.mark.parametrize(
    "spec, match",
    [(0, ">= 1"), (1001, "only T=1000"), ("ddimuni7", "divisible"), ("fast", "unrecognised")],
)
def test_bad_step_specs(spec, match):
    with pytest.raises(ValueError, match=match):
        timestep_subsequence(spec, 1000)


def test_unknown_schedule():
    with pytest.raises(ValueError, match="unknown schedule 'sqrt'"):
        betas_for("sqrt", 1000)
