"""The "Slides" dock widget: open an H&E source and its IHC, step through BCI folders."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import napari
from qtpy.QtCore import QSettings, Qt
from qtpy.QtWidgets import (
    QComboBox,
    QDoubleSpinBox,
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
from ._layers import rgb_layers
from ._worker import Jobs

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
        self._jobs = Jobs(self)
        self.settings = QSettings("napari-bci", "napari-bci")
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
        self.info = QLabel("")
        self.info.setWordWrap(True)
        self.info.setTextInteractionFlags(Qt.TextSelectableByMouse)

        # pixel size for images that carry none (PNG/JPEG patches): every widget reads the
        # layer's metadata["mpp"], which this sets together with the physical scale
        self.mpp_layer = QComboBox()
        self.mpp_layer.setToolTip("An image layer whose pixel size is unknown (or to correct)")
        self.mpp_spin = QDoubleSpinBox()
        self.mpp_spin.setDecimals(4)
        self.mpp_spin.setRange(0.05, 50.0)
        self.mpp_spin.setSingleStep(0.05)
        self.mpp_spin.setSuffix(" µm/px")
        self.mpp_spin.setValue(float(self.settings.value("mpp", 0.5)))
        self.mpp_spin.setToolTip("Microns per pixel: 0.25 at 40x, 0.5 at 20x (BCI), 1.0 at 10x")
        self.mpp_button = QPushButton("Set pixel size")
        self.mpp_button.setToolTip("Write the pixel size into the layer (metadata and scale), for every widget")
        self.mpp_button.clicked.connect(lambda: self.set_mpp(self.mpp_layer.currentText(), self.mpp_spin.value()))
        self.mpp_box = QGroupBox("Pixel size")
        ml = QFormLayout(self.mpp_box)
        ml.addRow("Layer", self.mpp_layer)
        ml.addRow(_row(self.mpp_spin, self.mpp_button))

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
        lay.addWidget(self.mpp_box)
        lay.addWidget(self.bci_box)
        lay.addStretch(1)

        self.he_edit.setToolTip("The H&E: a slide (SVS, NDPI, OME-TIFF, ...), a patch (PNG/JPEG) or a BCI folder")
        self.ihc_edit.setToolTip("Its IHC section (optional): a slide or patch of the consecutive section")
        self.open_button.setToolTip("Open in a worker: the layers appear with their physical scale")
        he_file.setToolTip("Choose a slide or image file")
        he_dir.setToolTip("Choose a BCI dataset folder (HE/ and IHC/)")
        ihc_file.setToolTip("Choose the IHC slide or image")
        self.her2_combo.setToolTip("Show only BCI pairs of this HER2 level")
        self.split_combo.setToolTip("Show only the train or the test split")
        viewer.layers.events.inserted.connect(self._describe_layers)
        viewer.layers.events.removed.connect(self._describe_layers)
        self._describe_layers()

    # ------------------------------------------------------------------ user actions

    def _start_dir(self, edit: QLineEdit) -> str:
        return edit.text() or str(self.settings.value("last_dir", ""))

    def _remember(self, path: str) -> None:
        p = Path(path)
        self.settings.setValue("last_dir", str(p if p.is_dir() else p.parent))

    def _browse(self, edit: QLineEdit) -> None:
        path, _ = QFileDialog.getOpenFileName(self, "Open slide or image", self._start_dir(edit), _FILTER)
        if path:
            edit.setText(path)
            self._remember(path)

    def _browse_folder(self) -> None:
        path = QFileDialog.getExistingDirectory(self, "Open BCI dataset folder", self._start_dir(self.he_edit))
        if path:
            self.he_edit.setText(path)
            self._remember(path)

    # ------------------------------------------------------------------ what is open

    def _describe_layers(self, *_) -> None:
        """The info line lists every RGB image open (however it was opened) and the pixel-size
        chooser offers them, those without a pixel size first."""
        try:
            layers = rgb_layers(self.viewer)
            if not layers:
                self.info.setText("Nothing open yet: choose an H&E above, drop files here, or use File > Open.")
            else:
                self.info.setText("\n".join(f"{ly.name}: {describe(ly.metadata or {})}" for ly in layers))
            current = self.mpp_layer.currentText()
            names = [ly.name for ly in sorted(layers, key=lambda ly: bool((ly.metadata or {}).get("mpp")))]
            self.mpp_layer.clear()
            self.mpp_layer.addItems(names)
            if current in names:
                self.mpp_layer.setCurrentText(current)
            self.mpp_box.setEnabled(bool(names))
            unknown = [ly.name for ly in layers if not (ly.metadata or {}).get("mpp")]
            self.mpp_box.setTitle(f"Pixel size: unknown for {', '.join(unknown)}" if unknown else "Pixel size")
        except RuntimeError:  # the widget is being deleted
            pass

    def set_mpp(self, name: str, mpp: float) -> None:
        """Give layer ``name`` a pixel size: ``metadata["mpp"]``, a physical scale and units."""
        from napari.utils.notifications import show_info

        if name not in self.viewer.layers or not mpp > 0:
            self._error("choose an image layer and a positive pixel size")
            return
        layer = self.viewer.layers[name]
        meta = dict(layer.metadata or {})
        meta["mpp"] = float(mpp)
        meta["mpp_source"] = "set by the user"
        layer.metadata = meta
        layer.scale = (float(mpp), float(mpp)) if layer.ndim == 2 else (*layer.scale[:-2], float(mpp), float(mpp))
        layer.units = ("µm",) * layer.ndim
        self.settings.setValue("mpp", float(mpp))
        self._describe_layers()
        self.viewer.reset_view()
        show_info(f"Slides: {name} is now {mpp:g} µm/px")

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
        self._remember(he)
        self.info.setText(f"Opening {Path(he).name}…")
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
        """Run ``func(*args)`` in a worker; a newer request makes older results stale."""
        self._jobs.start(func, *args, on_done=on_done, on_error=self._error)

    @property
    def worker(self):
        return self._jobs.worker

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
        self._describe_layers()
        if added:
            self.viewer.reset_view()

    def _error(self, e: Exception | str) -> None:
        from napari.utils.notifications import show_error

        msg = str(e)
        self.info.setText(f"Error: {msg}")
        show_error(msg)

    def hideEvent(self, event) -> None:  # noqa: N802 (Qt)
        self._jobs.drop()  # drop results still in flight
        super().hideEvent(event)


def _row(*widgets) -> QWidget:
    w = QWidget()
    h = QHBoxLayout(w)
    h.setContentsMargins(0, 0, 0, 0)
    for x in widgets:
        h.addWidget(x)
    return w


# ---------------------------------------------------------------------- worker bodies (no Qt)


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
