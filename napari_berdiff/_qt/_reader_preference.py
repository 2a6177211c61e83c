"""Make napari open the files our readers claim (NIfTI, …) with them, without asking.

napari's own "builtins" reader claims ``*.nii`` and ``*.nii.gz`` as well, and napari 0.9 has
no reader priority: with two compatible readers, ``viewer.open(path)`` raises
``MultipleReaderError`` and ``File ▸ Open`` shows the modal "Choose reader" dialog, unless
``settings.plugins.extension2reader`` names a preferred reader for the pattern (what that
dialog's "remember my choice" box writes). We write that preference for each pattern our
manifest claims, never over a choice the user has made.

It runs when napari activates the plugin (manifest ``on_activate``: any of our commands,
widgets or sample data) and when either dock widget opens.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

PLUGIN = "napari-berdiff"


def our_patterns() -> list[str]:
    """The filename patterns of our manifest's readers."""
    from npe2 import PluginManager, PluginManifest

    try:
        manifest = PluginManager.instance().get_manifest(PLUGIN)
    except KeyError:  # not discovered yet: read the manifest we ship
        manifest = PluginManifest.from_file(Path(__file__).parents[1] / "napari.yaml")
    return [p for reader in manifest.contributions.readers or []
            for p in reader.filename_patterns]


def prefer_our_readers() -> list[str]:
    """Make ``napari-berdiff`` the preferred reader of its patterns where no reader is
    preferred yet; returns the patterns it set."""
    from napari.settings import get_settings

    plugins = get_settings().plugins
    current = dict(plugins.extension2reader)
    added = [p for p in our_patterns() if p not in current]
    if added:
        plugins.extension2reader = {**current, **dict.fromkeys(added, PLUGIN)}
    return added


def activate(context: Any = None) -> None:
    """npe2 ``on_activate`` hook."""
    prefer_our_readers()
