"""The generator choice shared by the widgets: a combo of registry names ending in a
"Checkpoint file…" item; a chosen file becomes an item "file: <name>" that carries its path."""

from __future__ import annotations

from pathlib import Path

CHECKPOINT_ITEM = "Checkpoint file…"
CHECKPOINT_FILTER = "Checkpoints (*.pth *.pt *.safetensors *.json);;All files (*)"


def is_checkpoint_item(text: str) -> bool:
    """Whether a combo text is a chosen file or the item that chooses one (nothing to remember)."""
    return text == CHECKPOINT_ITEM or text.startswith("file: ")


def select_checkpoint(combo, path) -> None:
    """Select the checkpoint ``path`` in ``combo`` (added before the last item when new)."""
    path = str(path)
    i = combo.findData(path)
    if i < 0:
        i = combo.count() - 1
        combo.insertItem(i, f"file: {Path(path).name}", path)
    combo.setCurrentIndex(i)


def ask_checkpoint(parent, combo, title: str) -> bool:
    """When ``combo`` shows :data:`CHECKPOINT_ITEM`: a file dialog; the chosen file is selected.
    Returns whether a file was chosen."""
    from qtpy.QtWidgets import QFileDialog

    if combo.currentText() != CHECKPOINT_ITEM:
        return False
    path, _ = QFileDialog.getOpenFileName(parent, title, "", CHECKPOINT_FILTER)
    if path:
        select_checkpoint(combo, path)
    return bool(path)


def model_spec(combo) -> str:
    """What ``load_generator`` takes for the current item: a checkpoint path or a registry name."""
    data = combo.currentData()
    return str(data) if data else combo.currentText()
