"""Our sampler against the papers' own sampling loop, with a berdiff-lidc-128 network.

Both sides run the same network (the ``berdiff-lidc-128`` preset, random weights: speed does
not depend on them), the same visited steps (``ddimuni10``: t = 900, 800, …, 0) and the same
sample count N, interleaved run by run in one process; figures are medians over runs.

What the official loop does (github.com/takimailto/BerDiff, read at commit d0978f1)
-------------------------------------------------------------------------------------
``codes/test.py`` draws the N samples of a test batch in ``sample_n``: a Python loop over
the N samples, each calling ``diffusion.ddim_sample_loop`` once, with the *images* as the
batch dimension (90 test images per DataLoader batch; for one image the batch is 1). So the
N samples of one image run one after another, each a full 10-step chain of batch size 1.
Each finished sample is moved to the host (``.detach().cpu().numpy()``) and the N are
stacked with numpy afterwards; nothing is streamed.

Per chain (``codes/diffusion/binomial_diffusion.py``, ``ddim_sample_loop_progressive``):
``x_T`` is drawn with ``torch.distributions.Binomial(1, ones/2)`` on the host and moved to
the device. Per step, under ``torch.no_grad()`` (not inference mode):

* a timestep tensor is built from a Python list; the respacing wrapper
  (``codes/diffusion/respace.py``, ``_WrappedModel.__call__``) builds a tensor of the kept
  timesteps from a Python list on every call and indexes it to get the original timestep;
* the network's forward (``codes/model/unet.py``, the conditional UNet's ``forward``)
  concatenates ``[x_t, img]`` along channels and runs the UNet (float32, NCHW layout);
* ``p_mean`` turns the ε output into ``x̂_0 = |x_t − ε̂|`` and always evaluates the full
  posterior ``q_posterior_mean`` (two products of sums, with four coefficient look-ups
  each; each look-up ``_extract_into_tensor`` converts the whole float64 NumPy schedule to a
  tensor, moves it to the device, indexes it, casts to float32 and broadcasts), then a
  ``torch.where`` on ``t == 0``, although DDIM uses that posterior only at the last step;
* ``ddim_sample`` tests ``t[0] != 0`` (a device-to-host synchronisation on a GPU), looks up
  ᾱ_t and ᾱ_s the same way, forms the accelerated mean
  ``σ x_t + (ᾱ_s − σ ᾱ_t) x̂_0`` with ``σ = (1 − ᾱ_s)/(1 − ᾱ_t)`` and draws
  ``Binomial(1, mean).sample()``; at the last step it returns the posterior mean, which
  equals ``x̂_0`` there.

:func:`official_style_loop` below re-implements that structure and per-step work (our own
code, not theirs): the same forward passes, one chain per sample of batch 1, the same
look-ups, the posterior computed every step, ``Binomial`` draws, the per-step host check,
``no_grad`` and a contiguous (NCHW) copy of the network, and a host copy per finished sample.

What differs in ours (``model.sample_all``, napari_berdiff/diffusion/sampler.py)
------------------------------------------------------------------------------------
The N samples run as one batch (chunked only to fit the memory budget), in
``torch.inference_mode()``, with ``channels_last`` weights on the CPU; step coefficients are
Python floats; the uniforms of a step are drawn for the whole batch at once; no posterior is
computed for DDIM steps; and a frame is yielded every step (host copies only on access).
Total work per step is the same N forward passes of the same network, so a gain comes only
from batching, overhead and memory layout.

    python benchmarks/bench_official_loop.py --n 2 --repeats 3
"""

from __future__ import annotations

import copy
import time
from typing import Any

import numpy as np
import torch
from _common import (base_parser, describe, load_bench_model, machine, median, print_table,
                     set_threads, test_image, write_json)

STEPS = "ddimuni10"
COLUMNS = [("method", "method", ""), ("n", "N", "d"), ("seconds", "run s", ".2f"),
           ("ms_per_sample_step", "ms/smp/step", ".1f")]


class SpacedSchedule:
    """The respaced schedule of the official code: ᾱ and α at the kept timesteps only."""

    def __init__(self, alpha_bar_full: np.ndarray, kept: list[int]):
        self.kept = list(kept)
        self.alphas_cumprod = np.asarray(alpha_bar_full, dtype=np.float64)[self.kept]
        prev = np.concatenate([[1.0], self.alphas_cumprod[:-1]])
        self.alphas = self.alphas_cumprod / prev


def lookup(table: np.ndarray, t: torch.Tensor, shape: torch.Size) -> torch.Tensor:
    """A per-call table look-up as the official ``_extract_into_tensor`` does it."""
    v = torch.from_numpy(table).to(device=t.device)[t].float()
    return v.reshape(-1, *([1] * (len(shape) - 1))).expand(shape)


def posterior_mean(sch: SpacedSchedule, x0: torch.Tensor, x_t: torch.Tensor,
                   t: torch.Tensor) -> torch.Tensor:
    """``P(x_{t−1} = 1 | x_t, x̂_0)`` with prior 1/2, evaluated as the official loop does:
    four table look-ups for each of the two products."""

    def theta(xt_term: torch.Tensor, x0_term: torch.Tensor) -> torch.Tensor:
        a_xt = lookup(sch.alphas, t, x_t.shape) * xt_term
        a_half = (1 - lookup(sch.alphas, t, x_t.shape)) / 2
        ab_x0 = lookup(sch.alphas_cumprod, t - 1, x_t.shape) * x0_term
        ab_half = (1 - lookup(sch.alphas_cumprod, t - 1, x_t.shape)) / 2
        return (a_xt + a_half) * (ab_x0 + ab_half)

    theta1, theta2 = theta(1 - x_t, 1 - x0), theta(x_t, x0)
    return theta2 / (theta1 + theta2)


def official_step(net: Any, sch: SpacedSchedule, x: torch.Tensor, i: int,
                  image: torch.Tensor) -> torch.Tensor:
    """One DDIM step of the official loop for a batch ``x`` at respaced index ``i``."""
    t = torch.tensor([i] * x.shape[0], device=x.device)
    original_t = torch.tensor(sch.kept, device=t.device, dtype=t.dtype)[t]
    eps = net(x, original_t, image)
    x0 = (x - eps).abs().to(device=t.device).float()
    mean = posterior_mean(sch, x0, x, t)
    mean = torch.where((t == 0)[:, None, None, None], x0, mean)
    if bool(t[0] != 0):
        ab_s = lookup(sch.alphas_cumprod, t - 1, x.shape)
        ab_t = lookup(sch.alphas_cumprod, t, x.shape)
        sigma = (1 - ab_s) / (1 - ab_t)
        ddim_mean = sigma * x + (ab_s - sigma * ab_t) * x0
        return torch.distributions.Binomial(1, ddim_mean).sample()
    return mean


def official_style_loop(net: Any, sch: SpacedSchedule, image: np.ndarray, n: int
                        ) -> np.ndarray:
    """N samples the official way: N chains of batch 1, one after another."""
    dev = next(net.parameters()).device
    img = torch.from_numpy(image)[None, None].to(dev)
    out = []
    for _ in range(n):
        x = torch.distributions.Binomial(1, torch.ones(1, 1, *image.shape) / 2).sample().to(dev)
        for i in reversed(range(len(sch.kept))):
            with torch.no_grad():
                x = official_step(net, sch, x, i, img)
        out.append(x[:, 0].detach().cpu().numpy())
    return np.stack(out)


def check_step_formula(model: Any, sch: SpacedSchedule) -> float:
    """Largest difference between the baseline's DDIM mean and our kernel's step mean."""
    g = torch.Generator().manual_seed(0)
    x_t = (torch.rand(2, 1, 8, 8, generator=g) < 0.5).float()
    x0 = torch.rand(2, 1, 8, 8, generator=g)
    worst = 0.0
    for i in range(1, len(sch.kept)):
        t = torch.tensor([i, i])
        ab_s, ab_t = lookup(sch.alphas_cumprod, t - 1, x_t.shape), lookup(sch.alphas_cumprod, t,
                                                                         x_t.shape)
        sigma = (1 - ab_s) / (1 - ab_t)
        theirs = sigma * x_t + (ab_s - sigma * ab_t) * x0
        ours = model.kernel.step_probs(x_t, x0, sch.kept[i], sch.kept[i - 1])
        worst = max(worst, float((theirs - ours).abs().max()))
    return worst


def main() -> None:
    ap = base_parser(__doc__, "bench_official_loop")
    ap.add_argument("--n", type=int, default=2)
    ap.add_argument("--size", type=int, default=128)
    args = ap.parse_args()
    set_threads(args.threads)

    from napari_berdiff.diffusion.schedules import timestep_subsequence

    ours = load_bench_model("lidc")  # channels_last on the CPU, as the plugin runs it
    theirs = copy.deepcopy(ours.net).to(memory_format=torch.contiguous_format).eval()
    T = ours.diffusion.timesteps
    abar = np.array([ours.kernel.schedule.alpha_bar(i) for i in range(T)])
    sch = SpacedSchedule(abar, timestep_subsequence(STEPS, T))
    diff = check_step_formula(ours, sch)
    print(f"baseline DDIM mean vs our kernel's step_probs: max |diff| = {diff:.2e}")
    image = test_image(args.size)
    info = machine()
    print(describe(info))

    methods = {
        "official loop": lambda n=args.n: official_style_loop(theirs, sch, image, n),
        "ours (sample_all)": lambda n=args.n: ours.sample_all(image, n=n, steps=STEPS, seed=0),
    }
    for fn in methods.values():  # warm-up, one sample each
        fn(1)
    times: dict[str, list[float]] = {k: [] for k in methods}
    for r in range(args.repeats):
        for name, fn in (methods.items() if r % 2 == 0 else reversed(methods.items())):
            tic = time.perf_counter()
            fn()
            times[name].append(time.perf_counter() - tic)
            print(f"run {r}: {name}: {times[name][-1]:.2f} s", flush=True)
    steps = len(sch.kept)
    rows = [{"method": k, "n": args.n, "seconds": median(v), "runs": v,
             "ms_per_sample_step": 1000 * median(v) / (args.n * steps)} for k, v in times.items()]
    ratio = rows[0]["seconds"] / rows[1]["seconds"]
    print_table(rows, COLUMNS)
    print(f"official loop / ours = {ratio:.3f} (median of {args.repeats} interleaved runs, "
          f"N = {args.n}, {steps} steps, {args.size}², {ours.num_parameters():,} parameters)")
    write_json(args.name, {"steps": STEPS, "size": args.size, "results": rows,
                                       "ratio_official_over_ours": ratio,
                                       "step_formula_max_diff": diff}, info)


if __name__ == "__main__":
    main()
