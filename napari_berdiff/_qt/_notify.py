"""Notifications: the only way the plugin reports problems (never a modal dialog).

Every message goes through napari's notification manager, so it shows as a toast in the
viewer and in its notification list, and tests can observe it there.
"""

from __future__ import annotations


def error(message: str) -> None:
    from napari.utils.notifications import show_error

    show_error(message)


def warning(message: str) -> None:
    from napari.utils.notifications import show_warning

    show_warning(message)


def info(message: str) -> None:
    from napari.utils.notifications import show_info

    show_info(message)
