"""The streaming sampler: one generator for every kernel, yielding a frame per step.

The N samples run as one batch (chunked to stay within a memory budget). The random
draws for a step are made for the whole batch at once on the CPU from one seeded
generator, so a seed reproduces its samples exactly, whatever the chunking or device.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable, Generator
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Generic, Protocol, TypeVar

import numpy as np
import torch

from .bernoulli import BernoulliKernel
from .device import select_device
from .schedules import timestep_subsequence

DEFAULT_MEMORY_BUDGET_MB = 1536
Roi = tuple[int, int, int, int]
CancelLike = Callable[[], bool] | threading.Event | None


class Kernel(Protocol):
    """What the sampler needs from a diffusion kernel."""

    kind: str
    config: Any

    def noise(self, shape: tuple[int, ...], generator: torch.Generator) -> torch.Tensor: ...
    def init(self, noise: torch.Tensor, prior: Any = ...) -> torch.Tensor: ...
    def denoise(
        self, x_t: torch.Tensor, net_out: torch.Tensor, t: int, s: int, noise: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]: ...
    def probabilities(self, x0_hat: torch.Tensor) -> torch.Tensor: ...
    def binary(self, x: torch.Tensor) -> torch.Tensor: ...


class ConditionalNet(Protocol):
    """The condition-once network interface (DESIGN §4)."""

    def encode(self, image: torch.Tensor) -> Any: ...
    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Any) -> torch.Tensor: ...


def _maps(masks: np.ndarray, probs: np.ndarray) -> dict[str, np.ndarray]:
    from ..uncertainty import uncertainty_maps

    return uncertainty_maps(masks, probs)


class Frame:
    """The state after one reverse step. Arrays are converted to numpy on first access,
    so a consumer that displays only some frames pays the host copy only for those.

    Attributes
    ----------
    step, n_steps
        0-based position in the visited sequence, and its length.
    t
        The timestep index the network was evaluated at.
    roi
        ``(y0, x0, y1, x1)`` of the sampled region within the full image.
    """

    def __init__(
        self, step: int, n_steps: int, t: int, states: torch.Tensor, x0_hat: torch.Tensor,
        roi: Roi, elapsed: float,
    ):
        self.step, self.n_steps, self.t, self.roi, self.elapsed = step, n_steps, t, roi, elapsed
        self._states, self._x0 = states, x0_hat

    @property
    def final(self) -> bool:
        return self.step == self.n_steps - 1

    @cached_property
    def states(self) -> np.ndarray:
        """Current binary states, (N, H, W) uint8 (at the last step: the final masks)."""
        return self._states[:, 0].to("cpu", torch.uint8).numpy()

    @cached_property
    def x0_prob(self) -> np.ndarray:
        """Current ``x̂_0`` probabilities, (N, H, W) float32."""
        return self._x0[:, 0].to("cpu", torch.float32).numpy()

    @cached_property
    def masks(self) -> np.ndarray:
        """Current predicted masks ``x̂_0 > 0.5``, (N, H, W) uint8."""
        return (self.x0_prob > 0.5).astype(np.uint8)

    @cached_property
    def maps(self) -> dict[str, np.ndarray]:
        """Running uncertainty maps of the current predictions (frequency, variance, …)."""
        return _maps(self.masks, self.x0_prob)

    def __repr__(self) -> str:
        return f"Frame(step={self.step + 1}/{self.n_steps}, t={self.t})"


@dataclass
class SampleResult:
    """What a finished (or cancelled) run returns.

    ``probs``/``masks`` are (N, H, W) over the region of interest, or ``None`` when the
    run was cancelled before its first step completed. ``timings`` (seconds): ``total_s``,
    ``network_s`` (every forward pass: the image encoding and each step's prediction),
    ``encode_s`` (the encoding alone), ``overhead_s`` (total − network) and
    ``first_frame_s``. ``presence`` is the network's probability that an annotation is not
    empty (networks with a presence head; None otherwise): each sample was empty from the
    start with probability ``1 − presence``. ``readers`` (N,) is the reader each sample was
    drawn as, for a reader-conditioned network (sample i as reader ``i mod R``; None
    otherwise).
    """

    probs: np.ndarray | None
    masks: np.ndarray | None
    timesteps: list[int]
    steps_done: int
    seed: int
    device: str
    roi: Roi
    cancelled: bool = False
    timings: dict[str, float] = field(default_factory=dict)
    chunk_size: int = 0
    presence: float | None = None
    readers: np.ndarray | None = None

    @cached_property
    def maps(self) -> dict[str, np.ndarray]:
        if self.masks is None:
            return {}
        return _maps(self.masks, self.probs)


# ---------------------------------------------------------------------------- helpers
def _is_cancelled(cancel: CancelLike) -> bool:
    if cancel is None:
        return False
    if isinstance(cancel, threading.Event):
        return cancel.is_set()
    return bool(cancel())


def prepare_image(image: np.ndarray | torch.Tensor, channels: int | None = None) -> np.ndarray:
    """Validate an image and return it as float32 (C, H, W).

    Raises
    ------
    ValueError
        For a dimension other than (H, W) or (C, H, W), non-finite values, an empty image,
        or a channel count other than ``channels``.
    """
    arr = image.detach().cpu().numpy() if isinstance(image, torch.Tensor) else np.asarray(image)
    if arr.ndim == 2:
        arr = arr[None]
    if arr.ndim != 3:
        raise ValueError(
            f"the image must be 2D (H, W) or 3D (C, H, W); got shape {tuple(arr.shape)}. "
            "For a volume, sample its slices with sample_slices (several per batch)."
        )
    if min(arr.shape[1:]) < 1:
        raise ValueError(f"the image is empty: shape {tuple(arr.shape)}")
    if not np.issubdtype(arr.dtype, np.number) or np.issubdtype(arr.dtype, np.complexfloating):
        raise ValueError(f"the image must hold real numbers, got dtype {arr.dtype}")
    arr = arr.astype(np.float32, copy=False)
    bad = ~np.isfinite(arr)
    if bad.any():
        raise ValueError(
            f"the image contains {int(bad.sum())} NaN or infinite values; "
            "fill or mask them before sampling"
        )
    if channels is not None and arr.shape[0] != channels:
        raise ValueError(
            f"the model takes {channels} image channel(s) but the image has {arr.shape[0]}"
        )
    return arr


#: The seeds the sampler's torch generator takes (``manual_seed``'s unsigned 64-bit range;
#: it would wrap negative seeds onto this range, so that -1 and 2**64 - 1 draw the same).
SEED_RANGE = (0, 2**64 - 1)


def check_seed(seed: Any) -> int:
    """``seed`` as an int in :data:`SEED_RANGE`, else a ``ValueError`` saying the range."""
    lo, hi = SEED_RANGE
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)):
        raise ValueError(f"the seed must be a whole number in {lo}..{hi} (2**64 - 1), "
                         f"got {seed!r}")
    if not lo <= int(seed) <= hi:
        raise ValueError(f"the seed must lie in {lo}..{hi} (2**64 - 1), got {seed}")
    return int(seed)


def check_roi(roi: Roi | None, shape: tuple[int, int]) -> Roi:
    """Return a validated ``(y0, x0, y1, x1)`` box (the whole image when ``roi`` is None)."""
    h, w = shape
    if roi is None:
        return (0, 0, h, w)
    if len(roi) != 4:
        raise ValueError(f"a region of interest is (y0, x0, y1, x1); got {roi!r}")
    y0, x0, y1, x1 = (int(v) for v in roi)
    problems = [f"{name}={v} is outside 0..{size}"
                for name, v, size in (("y0", y0, h), ("x0", x0, w), ("y1", y1, h),
                                      ("x1", x1, w)) if not 0 <= v <= size]
    problems += [f"{a}={va} is not below {b}={vb}"
                 for a, va, b, vb in (("y0", y0, "y1", y1), ("x0", x0, "x1", x1)) if va >= vb]
    if problems:
        raise ValueError(
            f"region of interest {(y0, x0, y1, x1)} is empty or outside the {h}x{w} image: "
            f"{'; '.join(problems)}. Give y0,x0,y1,x1 with 0 <= y0 < y1 <= {h} and "
            f"0 <= x0 < x1 <= {w}"
        )
    return (y0, x0, y1, x1)


def estimate_bytes_per_sample(net: Any, h: int, w: int) -> int | None:
    """Rough float32 activation memory of one sample's forward pass, or None if unknown.

    Counts the skip activations a UNet keeps alive, a working set at full resolution and
    the attention matrices. Networks may override with an ``activation_bytes(h, w)`` method.
    """
    own = getattr(net, "activation_bytes", None)
    if callable(own):
        return int(own(h, w))
    cfg = getattr(net, "config", None)
    mc = getattr(cfg, "model_channels", None)
    mult = getattr(cfg, "channel_mult", None)
    nrb = getattr(cfg, "num_res_blocks", None)
    if mc is None or mult is None or nrb is None:
        return None
    floats = 0.0
    attn = 0.0
    att_res = set(getattr(cfg, "attention_resolutions", ()) or ())
    heads = max(int(getattr(cfg, "num_heads", 1) or 1), 1)
    for level, m in enumerate(mult):
        pix = (h / 2**level) * (w / 2**level)
        floats += (nrb + 1) * mc * m * pix
        if 2**level in att_res:
            attn += heads * pix * pix
    floats += 8 * mc * mult[0] * h * w
    return int(4 * (floats + 2 * attn))


def choose_chunk(
    net: Any, n: int, h: int, w: int, max_batch: int | None, memory_budget_mb: float | None
) -> int:
    """How many samples to push through the network at once."""
    chunk = n if max_batch is None else max(1, min(n, int(max_batch)))
    if memory_budget_mb:
        per = estimate_bytes_per_sample(net, h, w)
        if per:
            chunk = max(1, min(chunk, int(memory_budget_mb * 2**20 // per)))
    return chunk


#: float32 values per pixel and sample alive at once outside the network: x_t, the step's
#: noise, two x̂0 tensors (the frame handed out and the next), the binary states, the returned
#: probabilities, and the masks and the finiteness check rounded up to one more.
STATE_FLOATS_PER_PIXEL = 7
#: Copies of the (C, H, W) image alive while sampling: as read, normalised, padded, on device.
IMAGE_COPIES = 4
#: Memory a run takes whatever its size: the first forward pass's library buffers and the
#: allocator's slack (measured at 20-40 MiB growth for one 64² sample on the CPU).
OVERHEAD_BYTES = 64 * 2**20
#: The share of the machine's free memory a run may plan to use, whatever the budget says.
MACHINE_SHARE = 0.8


class MemoryBudgetError(ValueError):
    """A run's estimated peak memory exceeds its budget (or what the machine has free)."""


@dataclass(frozen=True)
class MemoryPlan:
    """The estimated peak memory of a run, by stage, and the chunk that keeps it in budget.

    ``image``: the image's copies; ``encoder``: the image encoder's peak (run once, batch
    1, before the steps); ``state``: the per-sample tensors of all ``n`` samples;
    ``network``: one chunk's denoiser activations. The encoder's and the steps' activations
    are not alive together, so the peak is ``image + state + max(encoder, network)``, plus
    :data:`OVERHEAD_BYTES` and, for several images in one batch (``images``), their kept
    conditions (``conditions``; the network's share then includes each row's copy of its
    image's condition). All in bytes; ``budget`` is the budget asked for (None: none but
    the machine's).
    """

    n: int
    size: tuple[int, int]
    chunk: int
    image: int
    encoder: int
    state: int
    network: int
    budget: int | None
    available: int
    images: int = 1
    conditions: int = 0

    @property
    def total(self) -> int:
        return (OVERHEAD_BYTES + self.image + self.conditions + self.state
                + max(self.encoder, self.network))

    def describe(self) -> str:
        """``"about 1.20 GiB (image …, encoder …, N samples' state …, network …)"``."""
        def g(b: int) -> str:
            return f"{b / 2**30:.2f} GiB" if b >= 2**28 else f"{b / 2**20:.0f} MiB"
        images = (f"{self.images} images {g(self.image)}, their conditions "
                  f"{g(self.conditions)}" if self.images > 1 else f"image {g(self.image)}")
        return (f"about {g(self.total)} ({images}, image encoder "
                f"{g(self.encoder)}, {self.n} samples' state {g(self.state)}, network "
                f"{g(self.network)} for {self.chunk} sample(s) at a time)")


def available_memory(device: torch.device | None = None) -> int:
    """Bytes free for a run on ``device``: the GPU's free memory for CUDA, else the host's
    available memory (psutil)."""
    if device is not None and device.type == "cuda":
        free, _ = torch.cuda.mem_get_info(device)
        return int(free)
    from ..checkpoints.schema import available_memory_bytes

    return available_memory_bytes()


def estimate_encoder_bytes(net: Any, channels: int, h: int, w: int) -> int:
    """Float32 activation memory of encoding one image (networks may say with
    ``encode_bytes(h, w)``; the concatenation UNet's encoding is the image itself)."""
    own = getattr(net, "encode_bytes", None)
    if callable(own):
        return int(own(h, w))
    return 4 * max(channels, 1) * h * w


def plan_memory(net: Any, n: int, channels: int, h: int, w: int, max_batch: int | None,
                memory_budget_mb: float | None, device: torch.device | None = None,
                available: int | None = None, images: int = 1) -> MemoryPlan:
    """Estimate every stage's peak memory for ``n`` samples of an (h, w) region and choose
    the chunk (samples per network call) that keeps the total within the budget.

    The budget covers everything the run allocates beyond the loaded model: the image's
    copies, the image encoder, the state of all ``n`` samples and one chunk's activations.
    It is never more than :data:`MACHINE_SHARE` of the memory free on the device, so no
    budget (None included) lets a run plan beyond what the machine holds.

    ``images`` > 1 plans a batch of several images (a volume's slices, ``n`` samples in
    all, see :func:`stream_images`): each image's copies and condition are kept, and each
    row of a chunk carries a copy of its image's condition (both bounded by the encoder's
    estimate).

    Raises
    ------
    MemoryBudgetError
        (a ``ValueError``) when even one sample at a time exceeds the limit, with the
        estimate and what to change.
    """
    m = _size_multiple(net)
    hp, wp = h + (-h) % m, w + (-w) % m
    pix = hp * wp
    floats = STATE_FLOATS_PER_PIXEL + (1 if getattr(net, "self_conditioned", False) else 0)
    images = max(1, int(images))
    image = images * IMAGE_COPIES * 4 * max(channels, 1) * pix
    encoder = estimate_encoder_bytes(net, channels, hp, wp)
    conditions = images * encoder if images > 1 else 0
    state = floats * 4 * n * pix
    per = estimate_bytes_per_sample(net, hp, wp) or 0
    if per and images > 1:
        per += encoder
    free = available_memory(device) if available is None else int(available)
    machine = int(MACHINE_SHARE * free)
    limit = machine if memory_budget_mb is None else min(int(memory_budget_mb * 2**20), machine)
    chunk = n if max_batch is None else max(1, min(n, int(max_batch)))
    fixed = OVERHEAD_BYTES + image + conditions + state
    if per and memory_budget_mb:
        chunk = max(1, min(chunk, (limit - fixed) // per if limit > fixed else 1))
    plan = MemoryPlan(n, (h, w), int(chunk), image, encoder, state, int(chunk * per),
                      None if memory_budget_mb is None else int(memory_budget_mb * 2**20),
                      free, images, conditions)
    if plan.total > limit:
        per_sample = floats * 4 * pix
        room = limit - OVERHEAD_BYTES - image - conditions - max(encoder, per)
        fits = int(room // per_sample) if room > 0 else 0
        which = ("the memory budget" if memory_budget_mb is not None
                 and limit < machine else "what this machine has free")
        hint = (f", fewer samples (--n; at most {fits} fit)" if fits >= 1
                else " (fewer samples will not help at this size)")
        raise MemoryBudgetError(
            f"sampling {n} sample(s) of a {h}×{w} region needs {plan.describe()}, more than "
            f"{which} ({limit / 2**30:.2f} GiB; {free / 2**30:.1f} GiB free on the "
            f"{'GPU' if device is not None and device.type == 'cuda' else 'machine'}). "
            f"Choose a smaller region of interest (--roi){hint}, or a larger "
            f"memory budget (--memory-budget MB, memory_budget_mb=) if the machine has the "
            f"memory. Nothing was sampled"
        )
    return plan


def _uses_channels_last(net: Any) -> bool:
    if not isinstance(net, torch.nn.Module):
        return False
    for p in net.parameters():
        if p.dim() == 4 and min(p.shape[2:]) > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False


def _prepare_prior(
    prior: np.ndarray | float | None, kernel: Kernel, shape: tuple[int, int], box: Roi
) -> torch.Tensor | float:
    """Validate the prior map p and crop it to the region of interest."""
    if prior is None:
        return 0.5
    if kernel.kind != "bernoulli":
        raise ValueError("a prior map applies only to the Bernoulli kernel")
    pr = np.asarray(prior, dtype=np.float32)
    if not np.isfinite(pr).all() or pr.min() < 0 or pr.max() > 1:
        raise ValueError("the prior must hold probabilities in [0, 1] with no NaN")
    if pr.ndim == 0:
        return float(pr)
    if pr.shape != tuple(shape):
        raise ValueError(
            f"the prior's shape {tuple(pr.shape)} does not match the image's {tuple(shape)}"
        )
    y0, x0, y1, x1 = box
    return torch.from_numpy(np.ascontiguousarray(pr[y0:y1, x0:x1]))[None, None]


def _prepare_constraints(
    constraints: np.ndarray | None, kernel: Kernel, shape: tuple[int, int], box: Roi
) -> torch.Tensor | None:
    """Validate a constraint map (−1 free, 0 never, 1 keep) and crop it to the region."""
    if constraints is None:
        return None
    if kernel.kind != "bernoulli":
        raise ValueError("keep/never constraints apply only to the Bernoulli kernel")
    c = np.asarray(constraints)
    if c.shape != tuple(shape):
        raise ValueError(f"the constraint map's shape {tuple(c.shape)} does not match the "
                         f"image's {tuple(shape)}")
    if not np.isin(c, (-1, 0, 1)).all():
        raise ValueError("a constraint map holds -1 (free), 0 (never) or 1 (keep) only")
    y0, x0, y1, x1 = box
    return torch.from_numpy(np.ascontiguousarray(c[y0:y1, x0:x1], dtype=np.float32))[None, None]


def apply_constraints(x: torch.Tensor, constraint_t: torch.Tensor | None) -> torch.Tensor:
    """``x`` with the constrained pixels set to their value (0 or 1); free pixels unchanged."""
    if constraint_t is None:
        return x
    return torch.where(constraint_t >= 0, constraint_t.to(x.dtype), x)


def _size_multiple(net: Any) -> int:
    return int(getattr(getattr(net, "config", None), "size_multiple", 1) or 1)


def _pad_to_multiple(
    img: np.ndarray, prior: torch.Tensor | float, m: int,
    constraint_t: torch.Tensor | None = None,
) -> tuple[np.ndarray, torch.Tensor | float, torch.Tensor | None]:
    """Pad (by edge replication, bottom and right) to sizes the network can take; the
    padding of a constraint map is free.

    Every frame and the result are cropped back, so callers never see the padding.
    """
    ph, pw = (-img.shape[1]) % m, (-img.shape[2]) % m
    if not (ph or pw):
        return img, prior, constraint_t
    img = np.pad(img, ((0, 0), (0, ph), (0, pw)), mode="edge")
    if isinstance(prior, torch.Tensor):
        prior = torch.nn.functional.pad(prior, (0, pw, 0, ph), mode="replicate")
    if constraint_t is not None:
        constraint_t = torch.nn.functional.pad(constraint_t, (0, pw, 0, ph), value=-1.0)
    return img, prior, constraint_t


# ---------------------------------------------------------------------------- the sampler
def sample_stream(
    net: ConditionalNet,
    kernel: Kernel,
    image: np.ndarray | torch.Tensor,
    *,
    n: int = 16,
    steps: int | str | None = None,
    seed: int = 0,
    prior: np.ndarray | float | None = None,
    roi: Roi | None = None,
    constraints: np.ndarray | None = None,
    device: str | torch.device | None = "auto",
    max_batch: int | None = None,
    memory_budget_mb: float | None = DEFAULT_MEMORY_BUDGET_MB,
    cancel: CancelLike = None,
    image_channels: int | None = None,
    profile: bool = False,
) -> SampleStream:
    """Validate the arguments, then return a stream that runs the reverse process for ``n`` samples, yielding a :class:`Frame` per step.

    Parameters
    ----------
    net
        A network with ``encode(image) -> cond`` and ``predict(x_t, t, cond)``; it must
        already be on ``device``.
    kernel
        A :class:`~napari_berdiff.diffusion.BernoulliKernel` or ``GaussianKernel``.
    image
        (H, W) or (C, H, W), already normalised the way the model expects.
    n, steps, seed
        Sample count, visited steps (an int or a spec such as ``"ddimuni10"``; the
        kernel's default when None) and the seed that makes the run reproducible.
    prior
        Bernoulli only: the prior probability map p (H, W) of the full image, or a scalar;
        1/2 when None.
    roi
        ``(y0, x0, y1, x1)``: sample only this box of the image (and of the prior).
    constraints
        Bernoulli only: an (H, W) map of the full image, −1 where a pixel is free, 0 where
        it must stay background and 1 where it must stay foreground. The constrained pixels
        of ``x_t`` and ``x̂_0`` are clamped at the start and after every step, so every
        sample and every frame holds them (user edits as hard constraints, HiDiff-style
        refinement). Pass a prior ``p`` that agrees with them (see ``refine``).
    device
        ``"auto"``, ``"cpu"``, ``"cuda"``, ``"mps"`` or a torch device.
    max_batch, memory_budget_mb
        Chunk the batch to at most ``max_batch`` samples and to the memory budget.
    cancel
        A ``threading.Event`` or a callable; checked before every step, so cancelling
        takes effect at the next step.
    image_channels
        The channel count the network takes, to check the image against.
    profile
        Synchronise the device around network calls so ``timings['network_s']`` is exact
        on GPUs (it always is on the CPU).

    Returns
    -------
    SampleStream
        Yields a :class:`Frame` per visited step; afterwards ``.result`` holds the
        :class:`SampleResult` (or use :func:`run_to_end`). Bad arguments raise
        ``ValueError`` here, before any work starts.
    """
    t_start = time.perf_counter()
    n, visited = check_run(net, kernel, n, steps)
    seed = check_seed(seed)
    img, box, prior_t, constraint_t = check_image(net, kernel, image, roi, prior, constraints,
                                                  image_channels)
    h, w = img.shape[1:]
    dev = select_device(device)
    chunk = plan_memory(net, n, img.shape[0], h, w, max_batch, memory_budget_mb, dev).chunk
    return SampleStream(_stream(net, kernel, img, n, visited, int(seed), prior_t, box, dev,
                                chunk, cancel, profile, t_start, constraint_t))


def check_run(net: Any, kernel: Kernel, n: Any, steps: int | str | None
              ) -> tuple[int, list[int]]:
    """The sample count as an int and the visited timesteps, checked against the network
    and the kernel (``ValueError`` otherwise)."""
    if getattr(net, "has_presence_head", False) and not isinstance(kernel, BernoulliKernel):
        raise ValueError("a network with a presence head samples with the Bernoulli kernel "
                         "only; check the checkpoint's diffusion kind")
    if int(n) != n or n < 1:
        raise ValueError(f"the number of samples must be a whole number >= 1, got {n!r}")
    T = kernel.config.timesteps
    spec = kernel.config.default_steps if steps is None else steps
    if isinstance(spec, (int, np.integer)) and spec > T:
        raise ValueError(f"steps={spec} exceeds the model's chain length T={T}")
    visited = timestep_subsequence(spec, T)
    check_visited = getattr(kernel, "check_visited", None)
    if callable(check_visited):
        check_visited(visited)
    return int(n), visited


def check_image(
    net: Any, kernel: Kernel, image: np.ndarray | torch.Tensor, roi: Roi | None,
    prior: np.ndarray | float | None, constraints: np.ndarray | None,
    image_channels: int | None,
) -> tuple[np.ndarray, Roi, torch.Tensor | float, torch.Tensor | None]:
    """One image validated and cropped to its region: ``(crop (C, h, w), box, prior,
    constraint map)`` as the sampler takes them (``ValueError`` for bad arguments)."""
    full = prepare_image(image, image_channels)
    box = check_roi(roi, full.shape[1:])
    y0, x0, y1, x1 = box
    img = np.ascontiguousarray(full[:, y0:y1, x0:x1])
    check_size = getattr(getattr(net, "config", None), "check_size", None)
    if callable(check_size):  # networks that take one size only (cDAL's)
        check_size(*img.shape[1:])
    prior_t = _prepare_prior(prior, kernel, full.shape[1:], box)
    constraint_t = _prepare_constraints(constraints, kernel, full.shape[1:], box)
    return img, box, prior_t, constraint_t


def draw_latents(n: int, dim: int, gen: torch.Generator, how: str = "independent"
                 ) -> torch.Tensor:
    """``n`` latents z ~ N(0, I_dim) for one step of one image's run: independent, or
    ``"stratified"`` (a Latin hypercube: in each dimension the n samples take the n
    equiprobable strata of N(0, 1) in a random order, each at a uniform place inside its
    stratum; every z is still exactly N(0, I))."""
    if how != "stratified":
        return torch.randn((n, dim), generator=gen)
    strata = torch.argsort(torch.rand((n, dim), generator=gen), dim=0).float()
    u = (strata + torch.rand((n, dim), generator=gen)) / n
    return torch.special.ndtri(u.clamp(1e-7, 1 - 1e-7))


def _draw_presence(net: Any, cond: Any, n: int, gen: torch.Generator, dev: torch.device,
                   config: Any = None) -> tuple[float | None, torch.Tensor | None]:
    """For a network with a presence head: its probability ``p`` that an annotation is not
    empty (its logit divided by ``config.presence_temperature``), and a (n, 1, 1, 1) 0/1
    tensor on ``dev`` of which samples are drawn non-empty (each with probability ``p``, as
    ``config.presence_draw`` says). ``(None, None)`` for other networks."""
    if not getattr(net, "has_presence_head", False):
        return None, None
    how = getattr(config, "presence_draw", "independent")
    scale = float(getattr(config, "presence_temperature", 1.0))
    p = float(torch.sigmoid(net.presence(cond).float() / scale).reshape(-1)[0])
    if not math.isfinite(p):  # NaN would draw every sample empty, silently
        raise ValueError("the network's presence head gave NaN for this image; the "
                         "checkpoint's weights look broken. Nothing was sampled")
    if how == "stratified":  # systematic: sample i kept iff (i + u) / n < p, shuffled
        u = torch.rand(1, generator=gen)
        kept = (torch.arange(n) + u) / n < p
        keep = kept[torch.randperm(n, generator=gen)].float().reshape(n, 1, 1, 1)
    else:
        keep = (torch.rand(n, generator=gen) < p).float().reshape(n, 1, 1, 1)
    return p, keep.to(dev)


def _cond_rows(cond: Any, rows: torch.Tensor, batch: int) -> Any:
    """The condition of the chunk's ``rows``: a batch-1 condition as it is (it broadcasts),
    a per-row one (several images in one batch) indexed (tensors, or lists/tuples of
    them)."""
    if isinstance(cond, torch.Tensor):
        return cond[rows] if cond.shape[0] == batch and batch > 1 else cond
    if isinstance(cond, (list, tuple)):
        return type(cond)(_cond_rows(c, rows, batch) for c in cond)
    return cond


def _predict_marked(net: Any, x: torch.Tensor, t: torch.Tensor, cond: Any,
                    extra: tuple[torch.Tensor, ...], kw: dict[str, torch.Tensor],
                    rows: torch.Tensor | None) -> torch.Tensor:
    """``net.predict`` on a chunk, run on the chunk's samples drawn marked only (``rows``,
    their indices in the chunk; None: all of them). The rows of unmarked samples, which the
    caller zeroes anyway, are zeros: the network's time is not spent on them."""
    if rows is None or rows.numel() == x.shape[0]:
        return net.predict(x, t, cond, *extra, **kw)
    out = torch.zeros_like(x)
    if rows.numel():
        part = net.predict(x[rows], t[rows], _cond_rows(cond, rows, x.shape[0]),
                           *(e[rows] for e in extra),
                           **{k: v[rows] for k, v in kw.items()})
        out[rows] = part.to(out.dtype)
    return out


def sample_readers(net: Any, n: int) -> np.ndarray | None:
    """The reader of each of ``n`` samples for a reader-conditioned network: sample i is
    drawn as reader ``i mod R``, spreading the samples evenly over the R readers. None for
    other networks."""
    r_count = int(getattr(net, "n_readers", 0))
    return np.arange(n) % r_count if r_count else None


def _stream(
    net: ConditionalNet, kernel: Kernel, img: np.ndarray, n: int, visited: list[int], seed: int,
    prior_t: torch.Tensor | float, box: Roi, dev: torch.device, chunk: int, cancel: CancelLike,
    profile: bool, t_start: float, constraint_t: torch.Tensor | None = None,
) -> Generator[Frame, None, SampleResult]:
    """The generator behind :func:`sample_stream`, which has validated every argument: the
    run of one image by :func:`stream_images`."""
    core = stream_images(net, kernel, [SliceInput(img, seed, prior_t, constraint_t)], n,
                         visited, box, dev, chunk, cancel, profile, t_start)
    try:
        while True:
            try:
                frames = next(core)
            except StopIteration as stop:
                return stop.value[0]
            yield frames[0]
    finally:
        core.close()


@dataclass(frozen=True)
class SliceInput:
    """One validated image of a batched run, cropped to the region: ``image`` (C, h, w)
    float32, its ``seed``, its prior (a (1, 1, h, w) tensor or a scalar) and its constraint
    map ((1, 1, h, w) tensor, or None)."""

    image: np.ndarray
    seed: int
    prior: torch.Tensor | float = 0.5
    constraints: torch.Tensor | None = None


def _batch_cond(conds: list[Any], a: int, b: int, n: int) -> Any:
    """The condition of rows ``a:b`` of a batch whose image ``i`` owns rows ``i*n:(i+1)*n``:
    the image's own (batch-1) condition when the rows belong to one image, else each
    image's condition repeated over its rows and concatenated (tensors, or lists/tuples of
    tensors, element by element)."""
    first, last = a // n, (b - 1) // n
    if first == last:
        return conds[first]
    counts = [min(b, (i + 1) * n) - max(a, i * n) for i in range(first, last + 1)]

    def cat(parts: list[torch.Tensor]) -> torch.Tensor:
        return torch.cat([p.expand(c, *p.shape[1:]) for p, c in zip(parts, counts)])

    sample = conds[first]
    if isinstance(sample, torch.Tensor):
        return cat(conds[first:last + 1])
    return type(sample)(cat([c[j] for c in conds[first:last + 1]]) for j in range(len(sample)))


def stream_images(
    net: ConditionalNet, kernel: Kernel, images: list[SliceInput], n: int, visited: list[int],
    box: Roi, dev: torch.device, chunk: int, cancel: CancelLike, profile: bool,
    t_start: float,
) -> Generator[list[Frame], None, list[SampleResult]]:
    """Run ``n`` samples of each of several same-size images as one batch of
    ``len(images) * n`` rows (image ``i`` owns rows ``i*n:(i+1)*n``), yielding the list of
    the images' frames after every step and returning their results.

    Each image is encoded once, by itself, and draws every random number from its own
    generator seeded with its own seed, in the order a run of that image alone draws them.
    So each image's samples are the ones :func:`sample_stream` gives for it alone, whatever
    images share the batch (up to the network's floating-point dependence on batch size,
    measured at under 1e-6). ``chunk`` rows go through the network at a time.
    """
    order = visited[::-1]
    k = len(images)
    h, w = images[0].image.shape[1:]
    m = _size_multiple(net)
    padded = [_pad_to_multiple(s.image, s.prior, m, s.constraints) for s in images]
    channels_last = _uses_channels_last(net)
    gens = [torch.Generator().manual_seed(s.seed) for s in images]
    rows = k * n
    shape = (n, int(getattr(net, "mask_channels", 1)), *padded[0][0].shape[1:])
    # A latent-conditioned network (cDAL) takes a fresh z ~ N(0, I) per sample and step,
    # drawn from the image's generator like every other draw, so the seed fixes it too.
    latent_dim = int(getattr(net, "latent_dim", 0) or 0)
    sync = profile and dev.type in ("cuda", "mps")

    def _sync() -> None:
        if sync:
            getattr(torch, dev.type).synchronize()

    def _per_image(draw: Callable[[torch.Generator], torch.Tensor]) -> torch.Tensor:
        parts = [draw(g) for g in gens]
        return parts[0] if k == 1 else torch.cat(parts)

    constraints = [None if c is None else c.to(dev) for _, _, c in padded]
    constraint_t: torch.Tensor | None = None  # one (1, ...) map, or one per row
    if any(c is not None for c in constraints):
        if k == 1:
            constraint_t = constraints[0]
        else:
            free = torch.full((1, 1, *shape[2:]), -1.0, device=dev)
            constraint_t = torch.cat([(free if c is None else c).expand(n, -1, -1, -1)
                                      for c in constraints])
    encode_seconds = 0.0
    conds, starts, presences, keeps = [], [], [], []
    with torch.inference_mode():
        for (img, prior_t, _), gen, c_t in zip(padded, gens, constraints):
            image_t = torch.from_numpy(img)[None].to(dev)
            _sync()
            tic = time.perf_counter()
            cond = net.encode(image_t)
            _sync()
            encode_seconds += time.perf_counter() - tic
            conds.append(cond)
            starts.append(apply_constraints(kernel.init(kernel.noise(shape, gen), prior_t)
                                            .to(dev), c_t))
            p, keep = _draw_presence(net, cond, n, gen, dev, kernel.config)
            presences.append(p)
            keeps.append(keep)
        x = starts[0] if k == 1 else torch.cat(starts)
        del starts
    keep = None if keeps[0] is None else (keeps[0] if k == 1 else torch.cat(keeps))
    readers = sample_readers(net, n)
    readers_t = None if readers is None else torch.from_numpy(np.tile(readers, k)).to(dev)
    # which samples of each chunk the network runs on (drawn once, like keep itself)
    marked_rows = None if keep is None else [keep[a : a + chunk].reshape(-1).nonzero().flatten()
                                             for a in range(0, rows, chunk)]
    net_seconds = encode_seconds  # the network's forward time: the encoding and every step
    first_frame = None
    x0_hat: torch.Tensor | None = None
    # A self-conditioned network also takes the previous step's x̂0 (zeros at the first step).
    x0_prev = torch.zeros_like(x) if getattr(net, "self_conditioned", False) else None
    done = 0
    n_chunks = -(-rows // chunk)
    for step, t in enumerate(order):
        if _is_cancelled(cancel):
            break
        s = order[step + 1] if step + 1 < len(order) else -1
        z = _per_image(lambda g: draw_latents(n, latent_dim, g, kernel.config.latent_draw)
                       ).to(dev) if latent_dim else None
        noise = _per_image(lambda g: kernel.noise(shape, g)).to(dev) if s >= 0 else None
        with torch.inference_mode():
            tb_all = torch.full((chunk,), t, dtype=torch.long, device=dev)
            # Several chunks write into one x̂_0 tensor per step (frames keep it, so it is
            # not reused across steps) and into x itself (a chunk's rows of x_t are not read
            # again once denoised): no torch.cat, no list of chunk outputs kept alive.
            for a in range(0, rows, chunk):
                xb = x[a : a + chunk]
                b = a + xb.shape[0]
                tb = tb_all[: xb.shape[0]]
                xin = xb.contiguous(memory_format=torch.channels_last) if channels_last else xb
                cond = _batch_cond(conds, a, b, n)
                _sync()
                tic = time.perf_counter()
                extra = () if x0_prev is None else (x0_prev[a:b],)
                kw = {} if readers_t is None else {"reader": readers_t[a:b]}
                if z is not None:
                    kw["z"] = z[a:b]
                marked = None if marked_rows is None else marked_rows[a // chunk]
                out = _predict_marked(net, xin, tb, cond, extra, kw, marked)
                _sync()
                net_seconds += time.perf_counter() - tic
                del cond
                nb = noise[a:b] if noise is not None else None
                xs, x0b = kernel.denoise(xb, out.float(), t, s, nb)
                if keep is not None:  # samples drawn "not marked" stay empty
                    kb = keep[a:b]
                    xs, x0b = xs * kb, x0b * kb
                cb = constraint_t if constraint_t is None or k == 1 else constraint_t[a:b]
                xs, x0b = apply_constraints(xs, cb), apply_constraints(x0b, cb)
                if x0_prev is not None:
                    x0_prev[a:b] = x0b
                if n_chunks == 1:
                    x, x0_hat = xs, kernel.probabilities(x0b)
                else:
                    pb = kernel.probabilities(x0b)
                    if a == 0:
                        x0_hat = pb.new_empty((rows, *pb.shape[1:]))
                    x0_hat[a:b] = pb
                    x[a:b] = xs
                del out, xs, x0b
            states = kernel.binary(x)
        done = step + 1
        elapsed = time.perf_counter() - t_start
        if first_frame is None:
            first_frame = elapsed
        yield [Frame(step, len(order), t, states[i * n:(i + 1) * n, ..., :h, :w],
                     x0_hat[i * n:(i + 1) * n, ..., :h, :w], box, elapsed) for i in range(k)]

    total = time.perf_counter() - t_start
    timings = {
        "total_s": total,
        "network_s": net_seconds,
        "encode_s": encode_seconds,
        "overhead_s": total - net_seconds,
        "first_frame_s": first_frame if first_frame is not None else float("nan"),
    }
    all_probs = None
    if x0_hat is not None:
        all_probs = x0_hat[:, 0, :h, :w].to("cpu", torch.float32).numpy()
    results = []
    for i, (img, p) in enumerate(zip(images, presences)):
        probs = masks = None
        if all_probs is not None:
            probs = all_probs[i * n:(i + 1) * n]
            masks = (probs > 0.5).astype(np.uint8)
        results.append(SampleResult(
            probs=probs, masks=masks, timesteps=visited, steps_done=done, seed=img.seed,
            device=str(dev), roi=box, cancelled=done < len(order), timings=dict(timings),
            chunk_size=chunk, presence=p, readers=readers,
        ))
    return results


_Item = TypeVar("_Item")
_Return = TypeVar("_Return")


class KeptReturnStream(Generic[_Item, _Return]):
    """An iterator over a generator that keeps what the generator returns (``returned``,
    None until it ends); ``next`` raises ``StopIteration(value)`` at the end, as the
    generator does, and :meth:`close` stops it early."""

    def __init__(self, gen: Generator[_Item, None, _Return]):
        self._gen = gen
        self.returned: _Return | None = None

    def __iter__(self) -> "KeptReturnStream[_Item, _Return]":
        return self

    def __next__(self) -> _Item:
        try:
            return next(self._gen)
        except StopIteration as stop:
            self.returned = stop.value
            raise

    def close(self) -> None:
        """Stop early; no further network calls are made."""
        self._gen.close()


class SampleStream(KeptReturnStream[Frame, SampleResult]):
    """An iterator of :class:`Frame` that keeps the run's :class:`SampleResult`.

    ``for frame in stream: ...`` then ``stream.result``; ``next(stream)`` raises
    ``StopIteration(result)`` at the end, as the underlying generator does.
    """

    @property
    def result(self) -> SampleResult | None:
        """The run's result (None until the stream ends)."""
        return self.returned


def run_to_end(stream: SampleStream | Generator[Frame, None, SampleResult]) -> SampleResult:
    """Drain a sampler stream and return its :class:`SampleResult`."""
    stream = stream if isinstance(stream, SampleStream) else SampleStream(stream)
    for _ in stream:
        pass
    return stream.result
