"""NIfTI files open with our reader without napari's "Choose reader" dialog or ``plugin=``."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("nibabel")

from napari_berdiff._nifti_io import write_image  # noqa: E402
from napari_berdiff._qt import _reader_preference  # noqa: E402

from .conftest import WIDGET  # noqa: E402


@pytest.fixture
def fresh_settings(monkeypatch):
    """napari settings as in a new installation, kept in memory (nothing is saved)."""
    from napari import settings
    from napari.settings import NapariSettings

    monkeypatch.setattr(settings, "_SETTINGS", NapariSettings(config_path=None))
    return settings.get_settings()


@pytest.fixture
def nifti(tmp_path):
    path = tmp_path / "ct.nii.gz"
    vol = np.random.default_rng(0).normal(0, 300, (4, 10, 8)).astype(np.float32)
    write_image(str(path), vol, {"scale": (3.0, 1.0, 1.0), "metadata": {}})
    return path, vol


def test_activating_the_plugin_prefers_our_reader(fresh_settings):
    """npe2 calls the manifest's ``on_activate`` when any of our commands first runs
    (widget, sample data, reader, writer)."""
    from pathlib import Path

    from npe2 import PluginManifest
    from npe2.manifest.utils import import_python_name

    import napari_berdiff

    mf = PluginManifest.from_file(Path(napari_berdiff.__file__).parent / "napari.yaml")
    import_python_name(mf.on_activate)(None)  # as npe2 calls it
    prefs = fresh_settings.plugins.extension2reader
    assert {p for p, plugin in prefs.items() if plugin == "napari-berdiff"} >= {
        "*.nii", "*.nii.gz", "*.NII", "*.NII.GZ"}


def test_opening_the_widget_lets_viewer_open_read_nifti(make_napari_viewer, fresh_settings,
                                                        nifti):
    from napari.errors import MultipleReaderError

    path, vol = nifti
    viewer = make_napari_viewer()
    # a new installation: napari's builtins claim NIfTI too, so napari would ask
    assert "*.nii.gz" not in fresh_settings.plugins.extension2reader
    with pytest.raises(MultipleReaderError):
        viewer._open_or_raise_error([str(path)])
    viewer.window.add_plugin_dock_widget(*WIDGET)  # what a user does first
    assert fresh_settings.plugins.extension2reader["*.nii.gz"] == "napari-berdiff"
    # napari 0.9's viewer.open defaults to plugin='napari' (its builtins, imageio), which
    # skips reader preferences; plugin=None lets napari choose, as File ▸ Open does
    [layer] = viewer.open(str(path), plugin=None)
    assert "nifti" in layer.metadata  # read by our reader, with its geometry
    np.testing.assert_allclose(layer.scale, (3.0, 1.0, 1.0))
    np.testing.assert_array_equal(layer.data, vol)
    # File ▸ Open takes the same path: it no longer needs a choice (no dialog)
    [again] = viewer._open_or_raise_error([str(path)])
    assert "nifti" in again.metadata


def test_a_users_own_choice_is_kept(fresh_settings):
    fresh_settings.plugins.extension2reader = {"*.nii": "napari"}
    added = _reader_preference.prefer_our_readers()
    prefs = fresh_settings.plugins.extension2reader
    assert prefs["*.nii"] == "napari" and "*.nii" not in added
    assert prefs["*.nii.gz"] == "napari-berdiff" and "*.nii.gz" in added
    assert _reader_preference.prefer_our_readers() == []  # once set, nothing changes
