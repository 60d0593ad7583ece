"""The "Slides" dock widget: open an H&E source and its IHC, step through BCI folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QComboBox,
    QFileDialog,
    QFormLayout,
    QGroupBox,
    QHBoxLayout,
    QLabel,
    QLineEdit,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..io.layers import HE, IHC_TRUTH

_FILTER = "Slides and images (*.svs *.ndpi *.tif *.tiff *.scn *.bif *.mrxs *.png *.jpg *.jpeg);;All files (*)"


def describe(meta: dict) -> str:
    """One line: format, levels, mpp (and HER2 level) of a layer's metadata."""
    levels = meta.get("levels") or []
    lv = " > ".join(f"{w}x{h}" for h, w in levels[:4]) + (" > ..." if len(levels) > 4 else "")
    mpp = meta.get("mpp")
    mpp_s = f"{mpp:.3f} µm/px" if mpp else "mpp unknown"
    her2 = f", HER2 {meta['her2']}" if meta.get("her2") else ""
    return f"{meta.get('format')}, {len(levels)} level(s) [{lv}], {mpp_s}{her2}"


class SlidesWidget(QWidget):
    """Pick an H&E source (slide, patch or BCI folder) and optionally its IHC; open them as the
    "H&E" and "IHC (ground truth)" layers with their physical scale; for BCI folders, step through
    the pairs filtered by HER2 level and split. Files can be dropped onto the widget."""

    def __init__(self, viewer: napari.viewer.Viewer, parent: QWidget | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.dataset = None  # the whole BCI dataset
        self.view = None  # the filtered one
        self.index = 0
        self._layers: dict[str, Any] = {}  # name -> layer this widget manages
        self._gen = 0  # newest request; older results are dropped
        self.worker = None
        self.setAcceptDrops(True)

        self.he_edit = QLineEdit()
        self.he_edit.setPlaceholderText("slide, patch or BCI folder (or drop here)")
        self.ihc_edit = QLineEdit()
        self.ihc_edit.setPlaceholderText("optional; BCI partners are found automatically")
        he_file, he_dir, ihc_file = QPushButton("File…"), QPushButton("Folder…"), QPushButton("File…")
        he_file.clicked.connect(lambda: self._browse(self.he_edit))
        he_dir.clicked.connect(self._browse_folder)
        ihc_file.clicked.connect(lambda: self._browse(self.ihc_edit))
        self.open_button = QPushButton("Open")
        self.open_button.clicked.connect(lambda: self.open(self.he_edit.text(), self.ihc_edit.text()))

        form = QFormLayout()
        form.addRow("H&&E", _row(self.he_edit, he_file, he_dir))  # "&&": a literal &, not a mnemonic
        form.addRow("IHC", _row(self.ihc_edit, ihc_file))
        self.info = QLabel("Nothing open.")
        self.info.setWordWrap(True)
        self.info.setTextInteractionFlags(Qt.TextSelectableByMouse)

        self.her2_combo = QComboBox()
        self.her2_combo.addItems(["all", "0", "1+", "2+", "3+"])
        self.split_combo = QComboBox()
        self.split_combo.addItems(["all", "train", "test"])
        self.her2_combo.currentTextChanged.connect(lambda _: self.apply_filter())
        self.split_combo.currentTextChanged.connect(lambda _: self.apply_filter())
        self.prev_button, self.next_button = QPushButton("◀ Previous"), QPushButton("Next ▶")
        self.prev_button.clicked.connect(self.previous_pair)
        self.next_button.clicked.connect(self.next_pair)
        self.pair_label = QLabel("")
        self.pair_label.setWordWrap(True)
        self.bci_box = QGroupBox("BCI dataset")
        bl = QFormLayout(self.bci_box)
        bl.addRow("HER2", self.her2_combo)
        bl.addRow("Split", self.split_combo)
        bl.addRow(_row(self.prev_button, self.next_button))
        bl.addRow(self.pair_label)
        self.bci_box.setEnabled(False)

        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.open_button)
        lay.addWidget(self.info)
        lay.addWidget(self.bci_box)
        lay.addStretch(1)

    # ------------------------------------------------------------------ user actions

    def _browse(self, edit: QLineEdit) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open slide or image", edit.text(), _FILTER)
        if path:
            edit.setText(path)

    def _browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open BCI dataset folder", self.he_edit.text())
        if path:
            self.he_edit.setText(path)

    def dragEnterEvent(self, event) -> None:  # noqa: N802 (Qt)
        if event.mimeData().hasUrls():
            event.acceptProposedAction()

    def dropEvent(self, event) -> None:  # noqa: N802 (Qt)
        paths = [u.toLocalFile() for u in event.mimeData().urls() if u.isLocalFile()]
        if paths:
            event.acceptProposedAction()
            self.open_dropped(paths)

    def open_dropped(self, paths: list[str]) -> None:
        """First dropped path is the H&E source, the second (if any) its IHC."""
        self.he_edit.setText(paths[0])
        self.ihc_edit.setText(paths[1] if len(paths) > 1 else "")
        self.open(paths[0], paths[1] if len(paths) > 1 else None)

    def open(self, he: str | Path, ihc: str | Path | None = None) -> None:
        """Open ``he`` (slide, patch or BCI folder) and ``ihc`` (optional) in a worker thread."""
        he = str(he).strip()
        ihc = str(ihc).strip() if ihc else ""
        if not he:
            self._error("choose an H&E slide, image or BCI folder first")
            return
        if Path(he).is_dir():
            self._run(_load_folder, self._folder_loaded, he)
        else:
            self._run(_load_files, self._files_loaded, he, ihc or None)

    def apply_filter(self) -> None:
        if self.dataset is None:
            return
        her2 = None if self.her2_combo.currentText() == "all" else self.her2_combo.currentText()
        split = None if self.split_combo.currentText() == "all" else self.split_combo.currentText()
        self.view = self.dataset.filter(her2=her2, split=split)
        self.index = 0
        if len(self.view):
            self.show_pair(0)
        else:
            self.pair_label.setText(f"no pairs with HER2 {her2 or 'any'} in {split or 'any split'}")

    def next_pair(self) -> None:
        if self.view is not None and len(self.view):
            self.show_pair((self.index + 1) % len(self.view))

    def previous_pair(self) -> None:
        if self.view is not None and len(self.view):
            self.show_pair((self.index - 1) % len(self.view))

    def show_pair(self, index: int) -> None:
        """Replace the H&E/IHC layers with pair ``index`` of the filtered dataset."""
        self.index = index
        pair = self.view[index]
        self.pair_label.setText(f"pair {index + 1} / {len(self.view)}: {pair.name} — HER2 {pair.her2} "
                                f"({pair.split})")
        self._run(_load_pair, self._layers_loaded, pair, index, len(self.view), str(self.dataset.root))

    # ------------------------------------------------------------------ plumbing

    def _run(self, func, on_done, *args) -> None:
        from napari.qt.threading import create_worker

        self._gen += 1
        gen = self._gen
        # Errors come back as values: napari 0.9.2's task-status hook on ``errored`` itself raises.
        worker = create_worker(_catching, func, *args, _start_thread=False, _ignore_errors=True)
        worker.returned.connect(lambda r: gen == self._gen and (self._error(r[1]) if r[0] else on_done(r[1])))
        self.worker = worker
        worker.start()

    def _folder_loaded(self, dataset) -> None:
        self.dataset = dataset
        self.bci_box.setEnabled(True)
        self.apply_filter()

    def _files_loaded(self, tuples: list[tuple]) -> None:
        self.dataset = self.view = None
        self.bci_box.setEnabled(False)
        self.pair_label.setText("")
        self._layers_loaded(tuples)

    def _layers_loaded(self, tuples: list[tuple]) -> None:
        added = False
        for data, attrs, _ in tuples:
            name = attrs["name"]
            layer = self._layers.get(name)
            if layer is not None and layer in self.viewer.layers and layer.multiscale == attrs["multiscale"]:
                layer.data = data
                layer.scale = attrs["scale"]
                layer.metadata = attrs["metadata"]
                if "units" in attrs:
                    layer.units = attrs["units"]
            else:
                if layer is not None and layer in self.viewer.layers:
                    self.viewer.layers.remove(layer)
                self._layers[name] = self.viewer.add_image(data, **attrs)
                added = True
        names = {a["name"] for _, a, _ in tuples}
        for name in [n for n in self._layers if n not in names]:  # e.g. a pair without IHC
            layer = self._layers.pop(name)
            if layer in self.viewer.layers:
                self.viewer.layers.remove(layer)
        self.info.setText("\n".join(f"{a['name']}: {describe(a['metadata'])}" for _, a, _ in tuples))
        if added:
            self.viewer.reset_view()

    def _error(self, e: Exception | str) -> None:
        from napari.utils.notifications import show_error

        msg = str(e)
        self.info.setText(f"Error: {msg}")
        show_error(msg)

    def hideEvent(self, event) -> None:  # noqa: N802 (Qt)
        self._gen += 1  # drop results still in flight
        super().hideEvent(event)


def _row(*widgets) -> QWidget:
    w = QWidget()
    h = QHBoxLayout(w)
    h.setContentsMargins(0, 0, 0, 0)
    for x in widgets:
        h.addWidget(x)
    return w


# ---------------------------------------------------------------------- worker bodies (no Qt)


def _catching(func, *args):
    """``(False, result)`` or ``(True, exception)``."""
    try:
        return False, func(*args)
    except Exception as e:  # reported to the user as a notification
        return True, e


def _load_files(he: str, ihc: str | None) -> list[tuple]:
    """H&E (+ its BCI partner, unless an IHC file is given explicitly)."""
    from .._npe2 import read_file, slide_layer
    from ..io.bci import parse_bci_name
    from ..io.slide import open_slide

    if not ihc:
        return read_file(Path(he))
    name = parse_bci_name(he)
    her2 = name.her2 if name else None
    return [slide_layer(open_slide(he), HE, "he", her2), slide_layer(open_slide(ihc), IHC_TRUTH, "ihc", her2)]


def _load_folder(path: str):
    from ..io.bci import open_bci_folder

    return open_bci_folder(path)


def _load_pair(pair, index: int, count: int, root: str) -> list[tuple]:
    from .._npe2 import slide_layer
    from ..io.slide import open_slide

    info = {"bci": {"root": root, "index": index, "count": count, "name": pair.name, "split": pair.split}}
    tuples = [slide_layer(open_slide(pair.he_path), HE, "he", pair.her2, **info)]
    if pair.ihc_path is not None:
        tuples.append(slide_layer(open_slide(pair.ihc_path), IHC_TRUTH, "ihc", pair.her2, **info))
    return tuples
