"""Inference backends: run a network's per-step prediction through a compiled graph.

The sampler calls ``net.encode(image)`` once and ``net.predict(x_t, t, cond, …)`` at every
step (DESIGN §4). :func:`wrap_network` returns an object with the same interface whose
``predict`` runs on a chosen backend; everything else (``encode``, ``presence``, ``config``,
the memory estimates …) is the wrapped network's own, so the sampler cannot tell them apart.

Backends
--------
``eager``
    The torch module itself (the default).
``jit``
    ``torch.jit.trace`` of the step, then ``torch.jit.freeze`` and
    ``torch.jit.optimize_for_inference`` (oneDNN prepacked convolutions on the CPU).
``onnxruntime``
    ``torch.onnx.export`` of the step (TorchScript exporter, a dynamic batch axis), run by
    ONNX Runtime's CPU execution provider with torch's current thread count.
``openvino``
    The step converted by OpenVINO's PyTorch front end and compiled for the CPU in float32
    (its CPU plugin would otherwise pick bfloat16 on CPUs that have it), one stream, torch's
    current thread count, a static graph per batch size.
``openvino-bf16``
    The same OpenVINO graph compiled with bfloat16 inference precision (its CPU plugin's own
    choice on CPUs with AMX or AVX512-BF16). Not exact, as ``bf16``, but within the stated
    tolerance below, and the fastest here: 3.6–4.8× the official loop on the official
    network with trained weights (``BENCHMARKS.md``); its graphs take seconds to a minute
    to build (once per batch size).
``bf16``
    The torch module under CPU autocast to bfloat16 (GroupNorm and the softmax stay in
    float32). Fast only on CPUs with bfloat16 matrix units (AMX, AVX512-BF16), and not exact:
    the output moves by about 1e-2, so seeded samples are not bit-identical to eager's.

The bfloat16 backends' stated tolerance: on trained weights, seeded masks differ from eager's
in at most 0.1% of pixels, and GED² against the readers moves by less than 0.005 (measured:
at most 0.02% and +0.0008; on random weights, whose x̂0 sits near 0.5, far more pixels flip).

ONNX Runtime's dynamic INT8 quantisation was measured and left out: its integer
convolutions ran 4× slower than eager float32 on this network (``BENCHMARKS.md``).

The JIT and ONNX Runtime graphs are built on first use and cached per input signature
(shapes but the batch size, dtypes, and for ONNX Runtime the thread count): one graph serves
every batch size above 1 (a presence head's varying sub-batches included), and batch 1 has
its own. Building one takes seconds for the 85.6 M-parameter BerDiff network (the first step
of a run pays it).
"""

from __future__ import annotations

import io
import time
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import nn

__all__ = ["BACKENDS", "EXACT_BACKENDS", "BackendUnavailable", "InferenceNet", "check_backend",
           "wrap_network"]

#: The backend names, the default first.
BACKENDS = ("eager", "jit", "onnxruntime", "openvino", "openvino-bf16", "bf16")
#: The OpenVINO backends and the inference precision each compiles for.
OPENVINO_PRECISION = {"openvino": "f32", "openvino-bf16": "bf16"}
#: The backends that reproduce eager float32 within 1e-4 (the bfloat16 ones do not).
EXACT_BACKENDS = ("eager", "jit", "onnxruntime", "openvino")
#: What to install for a backend whose packages are missing.
INSTALL_HINT = "pip install napari-berdiff[onnx]"
OPENVINO_HINT = "pip install napari-berdiff[openvino]"


class BackendUnavailable(ImportError):
    """A backend's package is not installed."""


def _require(modules: tuple[str, ...], what: str, hint: str) -> Any:
    """Import ``modules`` and return the last one, or raise :class:`BackendUnavailable`
    naming the missing package and what to install."""
    import importlib

    try:
        return [importlib.import_module(m) for m in modules][-1]
    except ImportError as e:
        raise BackendUnavailable(f"{what} ({e.name} is missing): {hint}, or choose the eager "
                                 f"or jit backend") from None


def _require_onnxruntime() -> Any:
    # torch.onnx.export needs onnx
    return _require(("onnx", "onnxruntime"), "the ONNX Runtime backends need the packages "
                    "onnxruntime and onnx", INSTALL_HINT)


def _require_openvino() -> Any:
    return _require(("openvino",), "the OpenVINO backend needs the package openvino",
                    OPENVINO_HINT)


def check_backend(name: str, device: torch.device | str = "cpu") -> str:
    """Validate a backend name for ``device`` and that its packages import.

    Raises
    ------
    ValueError
        For an unknown name, or an ONNX Runtime or OpenVINO backend on a device other
        than the CPU.
    BackendUnavailable
        (an ``ImportError``) when the backend's packages are missing, saying what to install.
    """
    if name not in BACKENDS:
        raise ValueError(f"unknown inference backend {name!r}; choose one of "
                         f"{', '.join(BACKENDS)}")
    if name == "onnxruntime" or name in OPENVINO_PRECISION:
        if torch.device(device).type != "cpu":
            raise ValueError(f"the {name} backend runs on the CPU only; give --device cpu "
                             f"or use the eager or jit backend on {torch.device(device).type}")
        _require_onnxruntime() if name == "onnxruntime" else _require_openvino()
    if name in ("bf16", "openvino-bf16") and torch.device(device).type == "cpu" \
            and not torch.ops.mkldnn._is_mkldnn_bf16_supported():
        raise ValueError(f"the {name} backend needs a CPU with bfloat16 support (AVX512-BF16 or "
                         "AMX); this one would run it slower than eager float32")
    return name


def wrap_network(net: Any, backend: str = "eager") -> Any:
    """``net`` for ``backend``: the network itself for ``eager``, else an
    :class:`InferenceNet` around it (built lazily; see the module docstring)."""
    device = next(net.parameters()).device
    if check_backend(backend, device) == "eager":
        return net
    return InferenceNet(net, backend)


class _Step(nn.Module):
    """``net.predict`` with every input a positional tensor, for tracing and export."""

    def __init__(self, net: nn.Module, n_cond: int | None, n_extra: int,
                 kw_names: Sequence[str]):
        super().__init__()
        self.net = net
        self.n_cond, self.n_extra, self.kw_names = n_cond, n_extra, tuple(kw_names)

    def forward(self, x_t: torch.Tensor, t: torch.Tensor, *rest: torch.Tensor) -> torch.Tensor:
        k = 1 if self.n_cond is None else self.n_cond
        cond = rest[0] if self.n_cond is None else list(rest[:k])
        extra = rest[k : k + self.n_extra]
        kw = dict(zip(self.kw_names, rest[k + self.n_extra :]))
        return self.net.predict(x_t, t, cond, *extra, **kw)


class InferenceNet:
    """A network whose ``predict`` runs on a compiled backend; other attributes are the
    wrapped network's.

    Parameters
    ----------
    net
        A network with ``encode``/``predict`` (the concatenation UNet or the condition-once
        network), in eval mode, on the CPU for the ONNX Runtime backends.
    backend
        Any of :data:`BACKENDS` but ``eager``.
    """

    def __init__(self, net: nn.Module, backend: str):
        if backend == "eager":
            raise ValueError("the eager backend is the network itself; use wrap_network")
        self.net = net.eval()
        self.backend = check_backend(backend, next(net.parameters()).device)
        self._graphs: dict[tuple, Callable[[list[torch.Tensor]], torch.Tensor]] = {}
        self.build_seconds = 0.0

    def __getattr__(self, name: str) -> Any:
        if name == "net":  # not yet set (copy, unpickling)
            raise AttributeError(name)
        return getattr(self.net, name)

    def __repr__(self) -> str:
        return f"InferenceNet({type(self.net).__name__}, backend={self.backend!r})"

    def __call__(self, x_t: torch.Tensor, t: Any, image: torch.Tensor, *extra: torch.Tensor,
                 **kw: torch.Tensor) -> torch.Tensor:
        """``predict(x_t, t, encode(image), …)``, as the wrapped network's forward."""
        return self.predict(x_t, t, self.net.encode(image), *extra, **kw)

    @property
    def graphs(self) -> int:
        """How many graphs have been built (one per input signature)."""
        return len(self._graphs)

    def predict(self, x_t: torch.Tensor, t: Any, cond: Any, *extra: torch.Tensor,
                **kw: Any) -> torch.Tensor:
        """The wrapped network's ``predict`` on this backend (same arguments, same result
        within the backend's tolerance)."""
        if self.backend == "bf16":
            return self._predict_bf16(x_t, t, cond, *extra, **kw)
        n = x_t.shape[0]
        ts = torch.as_tensor(t, device=x_t.device).reshape(-1).long()
        ts = ts.expand(n) if ts.numel() == 1 else ts
        n_cond = len(cond) if isinstance(cond, (list, tuple)) else None
        conds = list(cond) if n_cond is not None else [cond]
        names = sorted(kw)
        kws = [torch.as_tensor(kw[k], device=x_t.device) for k in names]
        kws = [v.expand(n) if v.ndim == 0 else v for v in kws]
        inputs = [x_t.contiguous(), ts.contiguous(), *(c.contiguous() for c in conds),
                  *(e.contiguous() for e in extra), *(v.contiguous() for v in kws)]
        batched = [True, True] + [False] * len(conds) + [True] * (len(extra) + len(kws))
        key = self._key(inputs, batched, n_cond, len(extra), names)
        graph = self._graphs.get(key)
        if graph is None:
            tic = time.perf_counter()
            step = _Step(self.net, n_cond, len(extra), names).eval()
            graph = self._build(step, inputs, batched)
            self._graphs[key] = graph
            self.build_seconds += time.perf_counter() - tic
        return graph(inputs)

    def _predict_bf16(self, x_t: torch.Tensor, t: Any, cond: Any, *extra: torch.Tensor,
                      **kw: Any) -> torch.Tensor:
        if _weights_channels_last(self.net):
            x_t = x_t.contiguous(memory_format=torch.channels_last)
        with torch.autocast(x_t.device.type, dtype=torch.bfloat16):
            return self.net.predict(x_t, t, cond, *extra, **kw).float()

    # ------------------------------------------------------------------ building
    def _key(self, inputs: list[torch.Tensor], batched: list[bool], n_cond: int | None,
             n_extra: int, names: list[str]) -> tuple:
        # Graphs take any batch size, but a trace at batch 1 skips the broadcast of a
        # batch-1 condition that larger batches need: batch 1 gets its own graph.
        shapes = tuple((tuple(x.shape[1:]) if b else tuple(x.shape), x.dtype)
                       for x, b in zip(inputs, batched))
        openvino = self.backend in OPENVINO_PRECISION
        threads = torch.get_num_threads() if openvino or self.backend == "onnxruntime" else 0
        # OpenVINO compiles a static graph per batch size (faster than a dynamic one)
        batch = inputs[0].shape[0] if openvino else inputs[0].shape[0] == 1
        return (shapes, batch, n_cond, n_extra, tuple(names), threads)

    def _build(self, step: _Step, inputs: list[torch.Tensor], batched: list[bool]
               ) -> Callable[[list[torch.Tensor]], torch.Tensor]:
        # Trace outside inference mode (the sampler calls predict inside it) on plain copies.
        with torch.inference_mode(False), torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            example = [x.clone() for x in inputs]
            if self.backend == "jit":
                return _build_jit(step, example)
            if self.backend in OPENVINO_PRECISION:
                return _build_openvino(step, example, OPENVINO_PRECISION[self.backend])
            return _build_onnxruntime(step, example, batched)


def _build_jit(step: _Step, example: list[torch.Tensor]
               ) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    traced = torch.jit.trace(step, tuple(example), check_trace=False)
    graph = torch.jit.optimize_for_inference(torch.jit.freeze(traced.eval()))

    def run(inputs: list[torch.Tensor]) -> torch.Tensor:
        return graph(*inputs)

    return run


def _build_openvino(step: _Step, example: list[torch.Tensor], precision: str = "f32"
                    ) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    ov = _require_openvino()
    # OpenVINO's PyTorch front end (its ONNX reader gave wrong outputs for this graph)
    model = ov.convert_model(step, example_input=tuple(example))
    compiled = ov.Core().compile_model(model, "CPU", {
        "INFERENCE_PRECISION_HINT": precision, "INFERENCE_NUM_THREADS": torch.get_num_threads(),
        "NUM_STREAMS": 1, "PERFORMANCE_HINT": "LATENCY"})
    request = compiled.create_infer_request()

    def run(inputs: list[torch.Tensor]) -> torch.Tensor:
        request.infer([x.detach().cpu().numpy() for x in inputs])
        return torch.from_numpy(request.get_output_tensor(0).data.copy())

    return run


def _build_onnxruntime(step: _Step, example: list[torch.Tensor], batched: list[bool]
                       ) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    ort = _require_onnxruntime()
    names = [f"in{i}" for i in range(len(example))]
    dynamic = {name: {0: "n"} for name, b in zip(names, batched) if b}
    dynamic["out"] = {0: "n"}
    buf = io.BytesIO()
    torch.onnx.export(step, tuple(example), buf, input_names=names, output_names=["out"],
                      dynamic_axes=dynamic, opset_version=17, dynamo=False,
                      do_constant_folding=True)
    model_bytes = buf.getvalue()
    opts = ort.SessionOptions()
    opts.intra_op_num_threads = torch.get_num_threads()
    opts.inter_op_num_threads = 1
    opts.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    # Threads that spin while waiting slow everything down on a busy machine (issue 26).
    opts.add_session_config_entry("session.intra_op.allow_spinning", "0")
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    session = ort.InferenceSession(model_bytes, opts, providers=["CPUExecutionProvider"])
    feed_names = [i.name for i in session.get_inputs()]  # unused inputs are dropped

    def run(inputs: list[torch.Tensor]) -> torch.Tensor:
        feed = {name: x.detach().cpu().numpy() for name, x in zip(names, inputs)
                if name in feed_names}
        return torch.from_numpy(session.run(None, feed)[0])

    return run


def _weights_channels_last(net: nn.Module) -> bool:
    """Whether the first spatial convolution's weight is channels_last (and not also
    contiguous, as 1×1 kernels are)."""
    for p in net.parameters():
        if p.dim() == 4 and min(p.shape[2:]) > 1:
            return p.is_contiguous(memory_format=torch.channels_last) and not p.is_contiguous()
    return False
