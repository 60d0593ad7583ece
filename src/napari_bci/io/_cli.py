"""Subcommands of this package (see napari_bci.cli)."""


def register(sub) -> None:
    """Add this package's subcommands to the ``napari-bci`` parser."""
