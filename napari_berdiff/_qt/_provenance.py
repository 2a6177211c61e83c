"""Provenance of accepted masks, between the widget and :mod:`napari_berdiff.provenance`.

No Qt here: only napari layer objects and the panels' values are read.
"""

from __future__ import annotations

from typing import Any

from ._inputs import MODE_SLICE, MODE_VOLUME


def run_provenance(model: Any, seed: int, steps: int, step_spec: Any,
                   temperature: float | None) -> dict[str, Any]:
    """What a run records at its start, for the masks accepted from it (the model file's
    sha256 is computed in a background thread, and read when a mask is accepted)."""
    from ..provenance import model_record, warm_checksum

    record = model_record(model, checksum=False)
    warm_checksum(record["file"])
    if temperature is None and getattr(model.diffusion, "kind", "") == "bernoulli":
        temperature = getattr(model.diffusion, "temperature", None)
    return {"model": record, "seed": int(seed), "steps": int(steps),
            "step_spec": step_spec if step_spec is not None else model.diffusion.default_steps,
            "temperature": temperature}


def record_accept(target: Any, run: Any, choice: dict[str, Any], label: int) -> None:
    """Append the accept's record to ``target.metadata`` (with the data's new checksum)."""
    from ..provenance import accept_record, with_accept

    prov = run.provenance
    if not prov:
        return
    p = run.placement
    region: dict[str, Any] = {"mode": p.mode, "roi": list(p.roi)}
    if p.mode == MODE_SLICE:
        region["slice"] = p.z
    elif p.mode == MODE_VOLUME:
        region["slices"] = [0, p.spatial_shape[0] - 1]
        region["seeds"] = "seed + slice index"
    record = accept_record(model=prov["model"], seed=prov["seed"], steps=prov["steps"],
                           step_spec=prov["step_spec"], temperature=prov["temperature"],
                           choice=choice, region=region, spacing=p.scale or None,
                           label=label, n_samples=run.n)
    target.metadata = with_accept(target.metadata, record, target.data)
