"""Diffusion settings shared by the kernels, the sampler, presets and checkpoints."""

from __future__ import annotations

from dataclasses import dataclass

from .._config import ConfigMixin

KINDS = ("bernoulli", "gaussian", "cdal")
SCHEDULES = ("cosine", "linear", "alpha_bar_linear", "vp")
#: How presence-head decisions are drawn (``DiffusionConfig.presence_draw``).
PRESENCE_DRAWS = ("independent", "stratified")
#: How a latent-conditioned network's z are drawn (``DiffusionConfig.latent_draw``).
LATENT_DRAWS = ("independent", "stratified")


@dataclass(frozen=True)
class DiffusionConfig(ConfigMixin):
    """How a model diffuses its mask.

    Parameters
    ----------
    kind
        ``"bernoulli"`` (BerDiff / HiDiff), ``"gaussian"`` (Wolleb et al.) or ``"cdal"``
        (cDAL: a T = 2..4 Gaussian chain on masks in [-1, 1], x0 prediction, a latent z).
    timesteps
        Length T of the training chain.
    schedule
        ``"cosine"``, ``"linear"`` or ``"alpha_bar_linear"``; cDAL uses ``"vp"`` (the
        variance-preserving SDE schedule of DESIGN §3.5, β_min = 0.1, β_max = 20).
    prediction
        What the network predicts: ``"eps"`` (flip probability for Bernoulli, noise for
        Gaussian) or ``"x0"`` (Bernoulli only).
    learn_sigma
        Gaussian only: the network has a second output channel ``v`` that interpolates the
        log-variance (improved DDPM's learned range).
    default_steps
        The visited steps used when the caller does not say: a count (evenly spaced) or a
        spec such as ``"ddimuni10"`` (see :func:`timestep_subsequence`).
    sampler
        Gaussian only: ``"ddim"`` or ``"ddpm"``. Bernoulli always uses its accelerated step.
    draw_correlation
        Bernoulli only, in [0, 1]: correlation ρ of the fresh draws of each reverse step
        within one sample. 0 (the default) draws every pixel independently, as BerDiff does;
        ρ > 0 draws them through a Gaussian copula with one shared factor per sample and step,
        so a step's newly drawn pixels form a near level set of x̂0 while every pixel keeps
        its Bernoulli probability (see :meth:`BernoulliKernel.denoise`).
    temperature
        Bernoulli only, > 0: each reverse step draws from ``x̂0`` sharpened to
        ``sigmoid(logit(x̂0) / temperature)``. 1 (the default) is BerDiff's step; below 1
        each sample moves towards its most likely mask. The returned ``x̂0`` (probabilities,
        uncertainty maps) and the final masks (``x̂0 > 0.5``) are not sharpened. It suits a
        reader-conditioned network, whose readers keep the samples diverse; for other
        networks it mainly makes the samples more alike.
    presence_draw
        For networks with a presence head, how the N samples' empty/non-empty decisions are
        drawn: ``"independent"`` (the default: each sample is non-empty with the head's
        probability p) or ``"stratified"`` (systematic sampling with a random offset, in a
        random order: each sample is still non-empty with probability p, but the number of
        non-empty ones is ⌊pN⌋ or ⌈pN⌉, so a run's share of empty masks does not scatter
        around 1 − p).
    presence_temperature
        For networks with a presence head, > 0: the head's logit is divided by it before the
        sigmoid (above 1 the head is less sure, below 1 surer). 1 is the head as trained.
    latent_draw
        cDAL only: how the N samples' latents z are drawn at each step: ``"independent"``
        (the default) or ``"stratified"`` (a Latin hypercube over the N samples: in every
        dimension each sample takes one of N equiprobable strata of N(0, 1), in a random
        order, at a uniform place inside it). Each sample's z is still exactly N(0, I); only
        the N samples are spread more evenly, as ``presence_draw`` does for a presence head.
    inverted_masks
        cDAL only: the chain stores foreground as −1 (the official lung data does; the
        hippocampus' one-hot background channel reads the same way), so a sample's mask is
        ``x̂0 < 0`` instead of ``x̂0 > 0``.
    """

    _what = "diffusion"
    kind: str = "bernoulli"
    timesteps: int = 1000
    schedule: str = "cosine"
    prediction: str = "eps"
    learn_sigma: bool = False
    default_steps: int | str = 10
    sampler: str = "ddim"
    draw_correlation: float = 0.0
    temperature: float = 1.0
    inverted_masks: bool = False
    presence_draw: str = "independent"
    presence_temperature: float = 1.0
    latent_draw: str = "independent"

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"unknown diffusion kind {self.kind!r}; expected one of {KINDS}")
        if self.schedule not in SCHEDULES:
            raise ValueError(f"unknown schedule {self.schedule!r}; expected one of {SCHEDULES}")
        if self.timesteps < 1:
            raise ValueError(f"timesteps must be >= 1, got {self.timesteps}")
        if self.prediction not in ("eps", "x0"):
            raise ValueError(f"prediction must be 'eps' or 'x0', got {self.prediction!r}")
        if (self.kind == "cdal") != (self.schedule == "vp"):
            raise ValueError("the 'vp' schedule and the cdal kind go together")
        if self.kind == "cdal" and self.prediction != "x0":
            raise ValueError("the cDAL kernel supports only prediction='x0'")
        if self.kind != "cdal" and self.inverted_masks:
            raise ValueError("inverted_masks applies to the cDAL kernel only")
        if self.kind == "cdal" and self.default_steps not in (self.timesteps, str(self.timesteps)):
            raise ValueError(f"a cDAL model takes all of its T={self.timesteps} steps; "
                             f"default_steps must be {self.timesteps}")
        if self.kind == "gaussian" and self.prediction != "eps":
            raise ValueError("the Gaussian kernel supports only prediction='eps'")
        if self.kind == "bernoulli" and self.learn_sigma:
            raise ValueError("learn_sigma applies to the Gaussian kernel only")
        if self.sampler not in ("ddim", "ddpm"):
            raise ValueError(f"sampler must be 'ddim' or 'ddpm', got {self.sampler!r}")
        if not 0.0 <= self.draw_correlation <= 1.0:
            raise ValueError(f"draw_correlation must lie in [0, 1], got {self.draw_correlation}")
        if self.kind != "bernoulli" and self.draw_correlation:
            raise ValueError("draw_correlation applies to the Bernoulli kernel only")
        if not 0.0 < self.temperature < float("inf"):
            raise ValueError(f"temperature must be a positive number, got {self.temperature}")
        if self.kind != "bernoulli" and self.temperature != 1.0:
            raise ValueError("temperature applies to the Bernoulli kernel only")
        if self.presence_draw not in PRESENCE_DRAWS:
            raise ValueError(f"presence_draw must be one of {PRESENCE_DRAWS}, got "
                             f"{self.presence_draw!r}")
        if self.latent_draw not in LATENT_DRAWS:
            raise ValueError(f"latent_draw must be one of {LATENT_DRAWS}, got "
                             f"{self.latent_draw!r}")
        if self.kind != "cdal" and self.latent_draw != "independent":
            raise ValueError("latent_draw applies to the cDAL kernel only")
        if not 0.0 < self.presence_temperature < float("inf"):
            raise ValueError(f"presence_temperature must be a positive number, got "
                             f"{self.presence_temperature}")
        if isinstance(self.default_steps, str):
            from .schedules import timestep_subsequence

            timestep_subsequence(self.default_steps, self.timesteps)  # raises if malformed
        elif not 1 <= self.default_steps <= self.timesteps:
            raise ValueError(
                f"default_steps must lie in 1..{self.timesteps}, got {self.default_steps}"
            )

    @property
    def default_step_count(self) -> int:
        """How many steps :attr:`default_steps` visits."""
        from .schedules import timestep_subsequence

        return len(timestep_subsequence(self.default_steps, self.timesteps))


