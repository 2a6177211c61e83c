"""Images, regions, seeds and memory (issue 21, items 3 and 5): only the region of a huge
file is read, every stage's memory is planned before sampling, and bad input gets a message
that names the file and says what is wrong."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
import torch

from napari_berdiff.checkpoints import load_model, save_model
from napari_berdiff.cli import DEFAULT_BUDGET_MB, main
from napari_berdiff.diffusion.sampler import (DEFAULT_MEMORY_BUDGET_MB, MemoryBudgetError,
                                              check_seed, plan_memory)
from napari_berdiff.imageio import open_image, read_image
from napari_berdiff.model import normalise_image
from napari_berdiff.networks import CondOnceConfig, ConditionOnceNet, build_network, tiny_config

from .ckpt_helpers import one_torch_thread, tiny_model  # noqa: F401 (autouse fixture)

GiB = 2**30


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return save_model(tiny_model(), tmp_path_factory.mktemp("limits") / "tiny.safetensors")


def _run(capsys, *argv) -> tuple[int, str]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err


def _sample(capsys, tiny, image, out, *extra) -> tuple[int, str]:
    return _run(capsys, "sample", "--model", tiny, "--image", image, "--n", "2", "--steps", "1",
                "--out", out, "--device", "cpu", "--quiet", *extra)


def _traced_peak(fn):
    """(fn(), the peak of Python/numpy allocations while it ran, in bytes)."""
    tracemalloc.start()
    try:
        result = fn()
        return result, tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


# ---------------------------------------------------------------------------- regions
def test_a_region_of_a_huge_npy_is_read_alone(capsys, tiny, tmp_path):
    """A 30000² float32 .npy (3.4 GiB, sparse on disk) sampled with --roi reads 32² pixels."""
    big = tmp_path / "huge.npy"
    arr = np.lib.format.open_memmap(big, mode="w+", dtype=np.float32, shape=(30000, 30000))
    arr[100:132, 200:232] = np.random.default_rng(0).random((32, 32))
    del arr
    # Import what the run imports lazily first: tracemalloc makes imports slow.
    import PIL.Image  # noqa: F401
    import safetensors.torch  # noqa: F401
    import tifffile  # noqa: F401
    import tqdm  # noqa: F401

    import napari_berdiff.cli_refine  # noqa: F401
    import napari_berdiff.uncertainty  # noqa: F401

    (code, err), peak = _traced_peak(
        lambda: _sample(capsys, tiny, big, tmp_path / "o", "--roi", "100,200,132,232"))
    assert code == 0, err
    assert peak < 64 * 2**20, f"{peak / 2**20:.0f} MiB traced: the image was read whole"
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["roi"] == [100, 200, 132, 232] and run["image_shape"] == [30000, 30000]
    assert run["sampled_shape"] == [1, 30000, 30000]
    assert np.load(tmp_path / "o" / "probabilities.npy").shape == (2, 32, 32)


def test_huge_nifti_and_tiff_regions_are_read_alone(tmp_path):
    import nibabel as nib
    import tifffile

    nii = tmp_path / "huge.nii"  # 20000 × 20000 × 1 float32: 1.5 GiB, sparse on disk
    header = nib.Nifti1Image(np.zeros((1, 1, 1), np.float32), np.eye(4)).header
    header.set_data_shape((20000, 20000, 1))
    header["vox_offset"] = 352
    with open(nii, "wb") as f:
        f.write(header.binaryblock + b"\0" * 4)
        f.truncate(352 + 20000 * 20000 * 4)
    tif = tmp_path / "huge.tif"  # 30000² uint8, uncompressed: memory-mapped
    mm = tifffile.memmap(tif, shape=(30000, 30000), dtype=np.uint8)
    mm[5000:5010, 7000:7010] = 9
    mm.flush()
    del mm
    for path, key, expected in ((nii, (slice(0, 64), slice(0, 64)), 0.0),
                                (tif, (slice(5000, 5010), slice(7000, 7010)), 9)):
        src = open_image(path)
        part, peak = _traced_peak(lambda: src.read(key))
        assert part.shape == tuple(len(range(*k.indices(10**5))) for k in key)
        assert (part == expected).all()
        assert peak < 16 * 2**20, f"{path.name}: {peak / 2**20:.0f} MiB traced"


@pytest.mark.parametrize("name", ["a.npy", "rgb.npy", "a.tif", "z.tif", "v.nii", "v.nii.gz"])
def test_region_reads_match_the_whole_image(tmp_path, name):
    import nibabel as nib
    import tifffile

    rng = np.random.default_rng(1)
    path = tmp_path / name
    if name == "rgb.npy":
        np.save(path, rng.integers(0, 256, (20, 24, 3), dtype=np.uint8))
    elif name.endswith(".npy"):
        np.save(path, rng.random((3, 20, 24)).astype(np.float32))
    elif name == "a.tif":
        tifffile.imwrite(path, rng.random((3, 20, 24)).astype(np.float32),
                         photometric="minisblack")
    elif name == "z.tif":
        tifffile.imwrite(path, rng.integers(0, 999, (3, 20, 24), dtype=np.uint16),
                         compression="zlib", photometric="minisblack")
    else:
        nib.save(nib.Nifti1Image(rng.random((24, 20, 3)).astype(np.float32), np.eye(4)),
                 str(path))
    whole, info = read_image(path)
    src = open_image(path)
    assert src.shape == whole.shape == info["shape"]
    keys = [(slice(2, 9), slice(5, 17))] if whole.ndim == 2 else \
        [(1, slice(2, 9), slice(5, 17)), (slice(None), slice(0, 4), slice(20, 24))]
    for key in keys:
        np.testing.assert_array_equal(src.read(key), whole[key])


def test_sampling_a_cropped_region_equals_sampling_the_region(capsys, tiny, tmp_path):
    """The CLI reads only the box and samples it as a whole image: the same result as
    sampling the full image with the region of interest."""
    img = np.random.default_rng(2).integers(0, 4000, (40, 36)).astype(np.uint16)
    np.save(tmp_path / "img.npy", img)
    code, err = _run(capsys, "sample", "--model", tiny, "--image", tmp_path / "img.npy",
                     "--n", "3", "--steps", "2", "--seed", "5", "--roi", "8,4,24,36",
                     "--out", tmp_path / "o", "--device", "cpu", "--quiet")
    assert code == 0, err
    ref = load_model(tiny).sample_all(img, n=3, steps=2, seed=5, roi=(8, 4, 24, 36))
    np.testing.assert_array_equal(np.load(tmp_path / "o" / "probabilities.npy"), ref.probs)


# ---------------------------------------------------------------------------- memory
def test_the_cli_default_budget_is_the_samplers():
    assert DEFAULT_BUDGET_MB == DEFAULT_MEMORY_BUDGET_MB


def test_many_samples_are_refused_with_the_estimate_and_how_many_fit():
    net = build_network(tiny_config())
    with pytest.raises(MemoryBudgetError) as err:
        plan_memory(net, 100_000, 1, 64, 64, None, DEFAULT_MEMORY_BUDGET_MB, available=64 * GiB)
    message = str(err.value)
    assert "100000 sample(s) of a 64×64 region needs about" in message
    assert "100000 samples' state" in message and "more than the memory budget" in message
    fits = int(message.split("--n; at most ")[1].split()[0])
    assert plan_memory(net, fits, 1, 64, 64, None, DEFAULT_MEMORY_BUDGET_MB,
                       available=64 * GiB).total <= DEFAULT_MEMORY_BUDGET_MB * 2**20
    with pytest.raises(MemoryBudgetError):
        plan_memory(net, fits + 1, 1, 64, 64, None, DEFAULT_MEMORY_BUDGET_MB,
                    available=64 * GiB)


def test_the_batch_is_chunked_into_the_budget():
    net = build_network(tiny_config())
    whole = plan_memory(net, 64, 1, 128, 128, None, None, available=64 * GiB)
    budget_mb = whole.total / 2**20 / 2
    plan = plan_memory(net, 64, 1, 128, 128, None, budget_mb, available=64 * GiB)
    assert 1 <= plan.chunk < 64 and plan.total <= budget_mb * 2**20


def test_the_image_encoder_is_counted():
    """A condition-once network's encoder runs on the whole image: at 8192² it alone is
    over the budget, whatever the chunk."""
    with torch.device("meta"):
        net = ConditionOnceNet(CondOnceConfig(model_channels=8, encoder_channels=32,
                                              channel_mult=(1, 2), norm_groups=4))
    plan = plan_memory(net, 1, 1, 1024, 1024, None, None, available=64 * GiB)
    assert plan.encoder > plan.network
    with pytest.raises(MemoryBudgetError, match=r"image encoder \d+\.\d+ GiB"):
        plan_memory(net, 1, 1, 8192, 8192, None, DEFAULT_MEMORY_BUDGET_MB, available=64 * GiB)


def test_no_budget_goes_beyond_what_the_machine_has_free():
    net = build_network(tiny_config())
    for budget in (None, 10**9):
        with pytest.raises(MemoryBudgetError, match="more than what this machine has free"):
            plan_memory(net, 1000, 1, 256, 256, None, budget, available=256 * 2**20)


def test_the_cli_refuses_before_reading_and_allow_large_stays_within_memory(capsys, tiny,
                                                                            tmp_path):
    big = tmp_path / "big.npy"  # 20000² float32, sparse on disk
    np.lib.format.open_memmap(big, mode="w+", dtype=np.float32, shape=(20000, 20000))
    (code, err), peak = _traced_peak(
        lambda: _sample(capsys, tiny, big, tmp_path / "o", "--allow-large"))
    assert code == 2 and "sampling 2 sample(s) of a 20000×20000 region needs about" in err
    assert "--roi" in err and "Nothing was sampled" in err
    assert peak < 64 * 2**20  # refused before the pixels were read
    code, err = _sample(capsys, tiny, big, tmp_path / "o", "--allow-large",
                        "--memory-budget", "1e12")
    assert code == 2 and "what this machine has free" in err

    small = tmp_path / "small.npy"
    np.save(small, np.zeros((64, 64), np.float32))
    code, err = _run(capsys, "sample", "--model", tiny, "--image", small, "--n", "100000",
                     "--allow-large", "--out", tmp_path / "o", "--device", "cpu", "--quiet")
    assert code == 2 and "100000 samples' state" in err and "--n; at most" in err
    code, err = _sample(capsys, tiny, small, tmp_path / "o", "--memory-budget", "0")
    assert code == 2 and "--memory-budget must be a positive number" in err
    assert not (tmp_path / "o").exists()


# ---------------------------------------------------------------------------- bad input
def test_complex_images_are_refused_before_any_conversion(capsys, tiny, tmp_path):
    z = (np.ones((16, 16)) * (1 + 2j)).astype(np.complex64)
    np.save(tmp_path / "c.npy", z)
    code, err = _sample(capsys, tiny, tmp_path / "c.npy", tmp_path / "o")
    assert code == 2 and "c.npy holds complex numbers" in err
    with pytest.raises(ValueError, match="complex numbers"):
        load_model(tiny).sample_all(z, n=1, steps=1)


@pytest.mark.parametrize("seed", ["-1", str(2**64), str(2**70)])
def test_seeds_outside_the_generators_range_are_refused(capsys, tiny, tmp_path, seed):
    np.save(tmp_path / "i.npy", np.zeros((16, 16), np.float32))
    code, err = _sample(capsys, tiny, tmp_path / "i.npy", tmp_path / "o", "--seed", seed)
    assert code == 2
    assert f"--seed: the seed must lie in 0..18446744073709551615 (2**64 - 1), got {seed}" in err


def test_the_largest_seed_is_used_and_recorded(capsys, tiny, tmp_path):
    np.save(tmp_path / "i.npy", np.random.default_rng(0).random((16, 16)).astype(np.float32))
    code, err = _sample(capsys, tiny, tmp_path / "i.npy", tmp_path / "o",
                        "--seed", str(2**64 - 1))
    assert code == 0, err
    assert json.loads((tmp_path / "o" / "run.json").read_text())["seed"] == 2**64 - 1
    assert check_seed(np.uint64(2**64 - 1)) == 2**64 - 1
    with pytest.raises(ValueError, match="whole number"):
        check_seed(1.5)
    with pytest.raises(ValueError, match="must lie in"):
        load_model(tiny).sample_all(np.zeros((16, 16)), n=1, steps=1, seed=-1)


def test_fixed_normalisation_with_min_equal_max_blames_the_checkpoint():
    with pytest.raises(ValueError, match="checkpoint's data.normalisation is at fault, not "
                                         "the image"):
        normalise_image(np.zeros((1, 8, 8)), {"mode": "fixed", "min": 2.0, "max": 2.0})


def test_huge_values_get_a_message_about_their_range(capsys, tiny, tmp_path):
    np.save(tmp_path / "h.npy", np.linspace(-1e300, 1e300, 256).reshape(16, 16))
    code, err = _sample(capsys, tiny, tmp_path / "h.npy", tmp_path / "o")
    assert code == 2 and "values reach 1e+300" in err and "float32 range" in err
    assert "NaN" not in err


def test_an_empty_array_gets_a_clear_message(capsys, tiny, tmp_path):
    np.save(tmp_path / "e.npy", np.zeros((0, 64), np.float32))
    code, err = _sample(capsys, tiny, tmp_path / "e.npy", tmp_path / "o")
    assert code == 2 and "e.npy holds an empty array of shape (0, 64)" in err
    with pytest.raises(ValueError, match=r"the image is empty: shape \(0, 64\)"):
        load_model(tiny).sample_all(np.zeros((0, 64)), n=1, steps=1)


def test_bad_nifti_files_say_why(tmp_path):
    import nibabel as nib

    junk = tmp_path / "junk.nii"
    junk.write_bytes(b"x" * 400)
    bomb = tmp_path / "bomb.nii"  # a header announcing 3.6 TB of voxels, and no data
    header = nib.Nifti1Image(np.zeros((1, 1, 1), np.float32), np.eye(4)).header
    header.set_data_shape((30000, 30000, 1000))
    bomb.write_bytes(header.binaryblock + b"\0" * 4)
    with pytest.raises(ValueError, match=r"cannot read junk.nii as nifti: Cannot work out "
                                         r"file type"):
        read_image(junk)
    with pytest.raises(ValueError, match=r"bomb.nii is truncated or its header is wrong: the "
                                         r"header announces 30000×30000×1000 voxels"):
        read_image(bomb)


def test_numpy_errors_name_the_file_and_never_advise_allow_pickle(tmp_path):
    np.save(tmp_path / "objects.npy", np.array([{"a": 1}], dtype=object), allow_pickle=True)
    np.save(tmp_path / "whole.npy", np.zeros((100, 100)))
    data = (tmp_path / "whole.npy").read_bytes()
    (tmp_path / "cut.npy").write_bytes(data[: len(data) // 2])
    (tmp_path / "junk.npy").write_bytes(b"not an array" * 10)
    (tmp_path / "text.npy").write_bytes(b"")
    np.save(tmp_path / "text.npy", np.array(["a", "b"]))
    cases = {"objects.npy": "holds Python objects", "cut.npy": "is truncated",
             "junk.npy": "is not a NumPy .npy file", "text.npy": "not numbers"}
    for name, what in cases.items():
        with pytest.raises(ValueError) as err:
            read_image(tmp_path / name)
        assert str(err.value).startswith(name) and what in str(err.value)
        assert "allow_pickle" not in str(err.value)


def test_a_negative_roi_parses_and_gets_a_range_error(capsys, tiny, tmp_path):
    np.save(tmp_path / "i.npy", np.zeros((32, 32), np.float32))
    code, err = _sample(capsys, tiny, tmp_path / "i.npy", tmp_path / "o",
                        "--roi", "-10,0,16,16")
    assert code == 2 and "expected one argument" not in err
    assert "region of interest (-10, 0, 16, 16) is empty or outside the 32x32 image: " \
           "y0=-10 is outside 0..32" in err
    code, err = _sample(capsys, tiny, tmp_path / "i.npy", tmp_path / "o", "--roi", "8,8,4,16")
    assert code == 2 and "y0=8 is not below y1=4" in err
