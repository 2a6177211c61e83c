"""The bundled lung-nodule default beats the best single reader on a small fixed subset of the
semi-real LIDC test split (issue 20, item 4).

The subset is rendered here from the shipped readers' copy (no data folder needed): the
middle slice of each of the first ``N_NODULES`` test nodules that at least two readers marked
on that slice, at the LIDC crops' 0.5 mm (central 128×128), so the model's spacing machinery
resamples each to its 1 mm and back, as for a user's slice.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from napari_berdiff.checkpoints.info import DEFAULT_MODEL

MODELS = Path(__file__).resolve().parents[2] / "models"
MODEL = MODELS / "berdiff-lidc-semireal-64.safetensors"
UNET = MODELS / "unet-lidc-semireal-64.safetensors"

pytestmark = pytest.mark.skipif(not MODEL.exists(), reason="the lung-nodule model is not bundled")

N_NODULES = 30


def _subset():
    from napari_berdiff.data.dataset import SegDataset, SegItem
    from napari_berdiff.data.layout import center_crop
    from napari_berdiff.data.lidc import load_lidc_readers
    from napari_berdiff.data.lidc_render import render_slice

    readers = load_lidc_readers()
    items = []
    for nod in readers.nodules("test"):
        slices = list(readers.nodule_slices(nod))
        item = slices[len(slices) // 2]
        if (item.masks.reshape(4, -1).sum(1) > 0).sum() < 2:
            continue
        image = center_crop(render_slice(item, seed=0)["image"], 128)
        items.append(SegItem(image, center_crop(item.masks, 128), item.case, item.slice_id))
        if len(items) == N_NODULES:
            break
    return SegDataset(items, {"layout": "lidc", "spacing": [0.5, 0.5], "split": "test"})


def test_the_lung_model_is_the_bundled_default():
    from napari_berdiff.checkpoints import list_bundled_models, load_model

    assert DEFAULT_MODEL == MODEL.stem and list_bundled_models()[0] == MODEL
    model = load_model(MODEL)
    assert model.kind == "bernoulli" and model.net.has_presence_head
    assert tuple(model.data["spacing"]) == (1.0, 1.0)
    assert "LIDC" in model.data["description"]
    assert model.metadata["training"]["baseline"] == UNET.name and UNET.exists()


def test_the_default_beats_the_best_single_reader():
    """Measured when it was bundled (torch 2.13 CPU, N = 16): the model's GED² on the subset
    is 0.134 / 0.120 / 0.144 with seeds 0 / 1 / 2, the best single reader's (reader position
    1, repeated) 0.176; paired differences −0.042 ± 0.026, −0.056 ± 0.021, −0.032 ± 0.028
    (s.e.m.). The threshold is the issue's: below the best reader. Other seeds moved the
    model's figure by at most 0.024 (max − min), less than the smallest gap to the reader
    (0.032), so a platform whose floating point flips some Bernoulli draws (the effect of
    another seed, at most) still passes, while a model no better than one reader fails.
    It also stays below the U-Net's GED² when the U-Net is bundled."""
    from napari_berdiff.checkpoints import load_model
    from napari_berdiff.training.evaluate import evaluate

    ds = _subset()
    assert len(ds) == N_NODULES
    unet = load_model(UNET) if UNET.exists() else None
    rep = evaluate(load_model(MODEL), ds, n=16, seed=0, spacing=[0.5, 0.5], baseline=unet)
    summary = rep.summary()
    best = summary["best_annotator"]
    model = summary["model"]
    paired = np.asarray(rep.per_item["model"]["ged2"]) - np.asarray(
        rep.per_item[best["which"]]["ged2"])
    assert model["ged2"] < best["ged2"], (model["ged2"], best["ged2"], paired.mean())
    if unet is not None:
        assert model["ged2"] < summary["deterministic"]["ged2"]



CDAL = MODELS / "cdal-lidc-semireal-64.safetensors"

# Measured when it was bundled (session 17, torch 2.13 CPU, N = 16, seed i for nodule i): the
# cDAL model's GED² on the subset is 0.200, its samples' mean per-pixel spread (std over the
# 16 masks) 0.0248, and on all 30 slices some of its samples are empty and some not. The
# model it replaced (the released MSE loss, samples nearly identical) scored 0.37 and 0.0022,
# with mixed samples on 1 slice; the U-Net scores 0.203 (evaluate, seed 0), the best reader
# 0.176. Over seeds 0-4 (evaluate) the GED² moved between 0.186 and 0.200. The limits sit
# between the two models with room for another platform's floating point.
CDAL_GED2_LIMIT = 0.25
CDAL_SPREAD_MIN = 0.01


@pytest.mark.skipif(not CDAL.exists(), reason="the LIDC cDAL model is not bundled")
def test_the_lidc_cdal_model_is_described_and_its_samples_differ_as_readers_do():
    """The bundled LIDC cDAL model (issue 22): our unshuffled NCSN++ at the default's 1 mm,
    offered in the bundled list after the default; on the same 30 test nodules (0.5 mm,
    resampled) its GED² is low and its samples are not one mask repeated."""
    from napari_berdiff.checkpoints import list_bundled_models, load_model
    from napari_berdiff.spacing import sample_at_spacing
    from napari_berdiff.uncertainty import ged2

    model = load_model(CDAL)
    cfg = model.net.config
    assert model.kind == "cdal" and (cfg.unshuffle, cfg.image_size) == (4, 64)
    assert model.diffusion.latent_draw == "stratified"
    assert tuple(model.data["spacing"]) == (1.0, 1.0) and "LIDC" in model.data["description"]
    assert CDAL in list_bundled_models() and list_bundled_models()[0] == MODEL
    geds, spreads, mixed = [], [], 0
    for i, item in enumerate(_subset()):
        masks = sample_at_spacing(model, item.image, [0.5, 0.5], n=16, seed=i).masks > 0
        geds.append(ged2(masks, item.masks))
        spreads.append(masks.std(0).mean())
        mixed += 0 < masks.reshape(16, -1).any(1).sum() < 16
    assert np.mean(geds) < CDAL_GED2_LIMIT, np.mean(geds)
    assert np.mean(spreads) > CDAL_SPREAD_MIN and mixed >= len(geds) // 2, (spreads, mixed)
