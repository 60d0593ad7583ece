"""The "Compare" dock widget: a generated IHC layer vs the real IHC, side by side or blended, a
live local-SSIM heatmap of the visible region, and per-region scores (table, CSV, QuPath
GeoJSON). The computing is headless, in :mod:`napari_bci.metrics.compare`.

It compares only what can be compared: it stays idle, saying why, until a generated layer and a
real IHC are open; it never takes an H&E layer for either side; and it changes the opacity,
blending and visibility only of the layers it shows, restoring them when it stops.
"""

from __future__ import annotations

import math
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtCore import Qt, QTimer
from qtpy.QtGui import QColor, QImage, QPixmap
from qtpy.QtWidgets import (
    QAbstractItemView,
    QButtonGroup,
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QHeaderView,
    QLabel,
    QProgressBar,
    QPushButton,
    QRadioButton,
    QSlider,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..io import layers as L
from ..metrics.compare import (
    MAX_REGION_PIXELS,
    MAX_VIEW_SIDE,
    HeatmapResult,
    RegionScore,
    compute_heatmap,
    export_csv,
    export_geojson,
    measure_region,
)
from ._layers import layer_geom, levels, rgb_layers, update_layer, view_window
from ._worker import Jobs

DEBOUNCE_MS = 300
#: after the generated layer's pixels change (tiles arriving), the heatmap waits this long for
#: the stream of tiles to pause before it is recomputed
DATA_SETTLE_MS = 1200
HEATMAP_COLORMAP = "viridis"

TABLE_COLUMNS = (
    ("region", "Region"),
    ("her2_pred", "HER2 pred"),
    ("her2_truth", "HER2 truth"),
    ("ssim", "SSIM"),
    ("ssim_local", "Local SSIM"),
    ("psnr", "PSNR"),
    ("dab_mae", "DAB |Δ|"),
    ("dab_corr", "DAB r"),
    ("delta_e", "ΔE00"),
    ("area", "Area"),
    ("level", "Level"),
)


def _role(layer) -> str | None:
    return (layer.metadata or {}).get("role")


def is_generated(layer) -> bool:
    return _role(layer) == "generated" or layer.name.startswith("IHC (generated")


def is_real_ihc(layer) -> bool:
    return _role(layer) == "ihc" or layer.name == L.IHC_TRUTH


def is_he(layer) -> bool:
    return _role(layer) == "he" or layer.name in (L.HE, L.HE_REGISTERED)


def _colorbar_pixmap(name: str, width: int = 160, height: int = 12) -> QPixmap:
    from napari.utils.colormaps import ensure_colormap

    cm = ensure_colormap(name)
    rgba = (np.asarray(cm.map(np.linspace(0, 1, width))) * 255).astype(np.uint8)
    img = np.ascontiguousarray(np.repeat(rgba[None, :, :], height, axis=0))
    qimg = QImage(img.data, width, height, 4 * width, QImage.Format_RGBA8888)
    return QPixmap.fromImage(qimg.copy())


def _fmt(v) -> str:
    if v is None:
        return ""
    if isinstance(v, float):
        if not math.isfinite(v):
            return "inf" if v > 0 else ("nan" if v != v else "-inf")
        return f"{v:.4g}"
    return str(v)


class CompareWidget(QWidget):
    """Compare a generated IHC layer with the real IHC (see the module docstring)."""

    NONE = "–"

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.scores: list[RegionScore] = []
        self.heatmap_mean: float | None = None
        self.heatmap_count = 0  # heatmaps shown so far
        self.heatmap_read_at = 0.0
        self._heat = Jobs(self)
        self._heat_pending = False
        self._regions = Jobs(self)
        self._import = Jobs(self)  # its own slot: an import never drops a measurement running
        self._saved: dict[str, dict] = {}  # layer name -> the display state we changed
        self._active = True
        self._user_chose: set = set()
        self._closed = False

        self.status = QLabel("")
        self.status.setWordWrap(True)
        self.gen_combo = QComboBox()
        self.gen_combo.setToolTip("The virtual IHC layer (made by the Virtual IHC widget)")
        self.truth_combo = QComboBox()
        self.truth_combo.setToolTip("The real IHC of the same tissue (registered to the H&E, or the H&E registered to it)")
        self.side_radio = QRadioButton("Side by side")
        self.side_radio.setToolTip("One panel per layer on a shared camera: H&&E, generated, real IHC, SSIM")
        self.blend_radio = QRadioButton("Overlay")
        self.blend_radio.setToolTip("The generated layer blended over the real IHC")
        self.blend_radio.setChecked(True)
        mode = QButtonGroup(self)
        mode.addButton(self.side_radio)
        mode.addButton(self.blend_radio)
        self.opacity = QSlider(Qt.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(50)
        self.opacity.setToolTip("Opacity of the generated layer over the real IHC (overlay view)")
        self.heat_check = QCheckBox("Local SSIM heatmap of the visible region")
        self.heat_check.setToolTip("Computed for the view once the camera rests; shown as its own panel "
                                   "side by side (in the overlay view only its mean is shown)")
        self.heat_check.setChecked(True)
        self.window_combo = QComboBox()
        self.window_combo.addItem("7x7 uniform (BCI)", "uniform")
        self.window_combo.addItem("11x11 Gaussian σ 1.5", "gaussian")
        self.window_combo.setToolTip("SSIM window: the BCI challenge's 7x7 uniform, or Wang et al.'s Gaussian")
        self.mean_label = QLabel("Mean local SSIM: –")
        bar = QLabel()
        bar.setPixmap(_colorbar_pixmap(HEATMAP_COLORMAP))
        legend = QHBoxLayout()
        legend.addWidget(QLabel("SSIM 0"))
        legend.addWidget(bar)
        legend.addWidget(QLabel("1"))
        legend.addStretch(1)

        form = QFormLayout()
        form.addRow("Generated", self.gen_combo)
        form.addRow("Real IHC", self.truth_combo)
        modes = QHBoxLayout()
        modes.addWidget(self.blend_radio)
        modes.addWidget(self.side_radio)
        form.addRow("View", modes)
        form.addRow("Opacity", self.opacity)
        form.addRow("SSIM window", self.window_combo)

        self.add_regions_btn = QPushButton("Add Regions layer")
        self.add_regions_btn.setToolTip("A Shapes layer on the real IHC's grid: draw rectangles or polygons")
        self.import_btn = QPushButton("Import GeoJSON…")
        self.import_btn.setToolTip("Regions from a QuPath GeoJSON export (read in the background)")
        self.measure_btn = QPushButton("Measure regions")
        self.measure_btn.setToolTip("PSNR, SSIM, tolerant metrics and the HER2 level of every region")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.csv_btn = QPushButton("Export CSV…")
        self.geojson_btn = QPushButton("Export GeoJSON…")
        self.geojson_btn.setToolTip("QuPath GeoJSON: the HER2 level as classification, metrics as measurements")
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels([c[1] for c in TABLE_COLUMNS])
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.setHorizontalScrollMode(QAbstractItemView.ScrollPerPixel)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table.setToolTip("Click a row to centre the view on its region")
        self.table_note = QLabel("")
        self.table_note.setWordWrap(True)

        lay = QVBoxLayout(self)
        lay.addWidget(self.status)
        lay.addLayout(form)
        lay.addWidget(self.heat_check)
        lay.addLayout(legend)
        lay.addWidget(self.mean_label)
        r1 = QHBoxLayout()
        r1.addWidget(self.add_regions_btn)
        r1.addWidget(self.import_btn)
        lay.addLayout(r1)
        r2 = QHBoxLayout()
        r2.addWidget(self.measure_btn)
        r2.addWidget(self.cancel_btn)
        lay.addLayout(r2)
        lay.addWidget(self.progress)
        lay.addWidget(self.table, 1)
        lay.addWidget(self.table_note)
        r3 = QHBoxLayout()
        r3.addWidget(self.csv_btn)
        r3.addWidget(self.geojson_btn)
        lay.addLayout(r3)

        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self.update_heatmap)
        self._data_timer = QTimer(self)
        self._data_timer.setSingleShot(True)
        self._data_timer.setInterval(DATA_SETTLE_MS)
        self._data_timer.timeout.connect(self.schedule_heatmap)
        self._watched_gen = None

        self.gen_combo.activated.connect(lambda *_: self._user_chose.add(self.gen_combo))
        self.truth_combo.activated.connect(lambda *_: self._user_chose.add(self.truth_combo))
        self.gen_combo.currentIndexChanged.connect(self._on_layers_chosen)
        self.truth_combo.currentIndexChanged.connect(self._on_layers_chosen)
        self.side_radio.toggled.connect(self._apply_mode)
        self.opacity.valueChanged.connect(self._apply_opacity)
        self.heat_check.toggled.connect(self._on_heat_toggled)
        self.window_combo.currentIndexChanged.connect(self.schedule_heatmap)
        self.add_regions_btn.clicked.connect(self.regions_layer)
        self.import_btn.clicked.connect(self._import_dialog)
        self.measure_btn.clicked.connect(self.measure_regions)
        self.cancel_btn.clicked.connect(self.cancel)
        self.csv_btn.clicked.connect(self._csv_dialog)
        self.geojson_btn.clicked.connect(self._geojson_dialog)
        self.table.cellClicked.connect(self.centre_on_row)

        cam = viewer.scene.camera
        cam.events.center.connect(self.schedule_heatmap)
        cam.events.zoom.connect(self.schedule_heatmap)
        viewer.canvas.events.size.connect(self.schedule_heatmap)
        viewer.layers.events.inserted.connect(self._refresh_layers)
        viewer.layers.events.removed.connect(self._refresh_layers)
        viewer.layers.events.moved.connect(self._refresh_layers)
        self.destroyed.connect(self._stop_all)
        self._refresh_layers()

    # ---------------------------------------------------------- layer choice

    def _candidates(self) -> list:
        """RGB layers either side may be: never an H&E, never our heatmap."""
        return [ly for ly in rgb_layers(self.viewer) if not is_he(ly) and ly.name != L.SSIM]

    def _refresh_layers(self, event=None) -> None:
        cands = self._candidates()
        names = [ly.name for ly in cands]
        before = (self.gen_combo.currentText(), self.truth_combo.currentText())
        defaults = {self.gen_combo: next((ly.name for ly in cands if is_generated(ly)), None),
                    self.truth_combo: next((ly.name for ly in cands if is_real_ihc(ly)), None)}
        for combo, default in defaults.items():
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems([self.NONE, *names])
            # keep what the user picked; otherwise follow the defaults (a generated layer that
            # appears later is taken up)
            if current in names and combo in self._user_chose:
                combo.setCurrentText(current)
            else:
                combo.setCurrentText(default if default is not None else self.NONE)
            combo.blockSignals(False)
        if (self.gen_combo.currentText(), self.truth_combo.currentText()) != before:
            self._on_layers_chosen()
        else:
            self._show_status()

    def _layer(self, combo):
        n = combo.currentText()
        return self.viewer.layers[n] if n != self.NONE and n in self.viewer.layers else None

    @property
    def gen_layer(self):
        return self._layer(self.gen_combo)

    @property
    def truth_layer(self):
        return self._layer(self.truth_combo)

    def set_layers(self, generated: str, truth: str) -> None:
        """Choose the layers (as a user would: later layer changes keep this choice)."""
        self._user_chose.update((self.gen_combo, self.truth_combo))
        self.gen_combo.setCurrentText(generated)
        self.truth_combo.setCurrentText(truth)

    def idle_reason(self) -> str | None:
        """Why there is nothing to compare, or None."""
        g, t = self.gen_layer, self.truth_layer
        if g is None and t is None:
            return ("Waiting for a generated IHC layer (Virtual IHC widget) and a real IHC "
                    "(open it in the Slides widget).")
        if g is None:
            return "Waiting for a generated IHC layer: generate one in the Virtual IHC widget."
        if t is None:
            return "Waiting for a real IHC layer to compare with: open it in the Slides widget."
        if g is t:
            return "Choose two different layers: the generated IHC and the real IHC."
        return None

    def _pair(self):
        return None if self.idle_reason() else (self.gen_layer, self.truth_layer)

    def _show_status(self) -> None:
        reason = self.idle_reason()
        self.status.setText(reason or "")
        self.status.setVisible(bool(reason))
        for wdg in (self.measure_btn, self.side_radio, self.blend_radio, self.opacity, self.heat_check):
            wdg.setEnabled(reason is None)

    def _on_layers_chosen(self, *_):
        self._restore()
        self._show_status()
        self._watch_generated()
        self._apply_mode()

    def _watch_generated(self) -> None:
        """Recompute the heatmap when the generated layer's pixels change (tiles arrive)."""
        g = self.gen_layer
        if g is self._watched_gen:
            return
        self._watch_generated_none()
        self._watched_gen = g
        if g is not None:
            g.events.set_data.connect(self._on_gen_data)

    def _watch_generated_none(self) -> None:
        if self._watched_gen is not None:
            try:
                self._watched_gen.events.set_data.disconnect(self._on_gen_data)
            except (TypeError, ValueError, RuntimeError):
                pass
        self._watched_gen = None

    def _on_gen_data(self, *_):
        g = self._watched_gen
        if self._closed or g is None or (g.metadata or {}).get("generating"):
            return  # the Virtual IHC is still writing tiles: measure once it is done
        self._data_timer.start()

    # ---------------------------------------------------------- side by side / overlay

    def _touch(self, layer, **changes) -> None:
        """Change ``layer``'s display, remembering its state before our first change."""
        saved = self._saved.setdefault(layer.name, {})
        for k, v in changes.items():
            saved.setdefault(k, getattr(layer, k))
            setattr(layer, k, v)

    def _restore(self) -> None:
        """Give every layer we changed its display state back (and the canvas its single view)."""
        saved, self._saved = self._saved, {}
        try:
            for name, state in saved.items():
                if name in self.viewer.layers:
                    ly = self.viewer.layers[name]
                    for k, v in state.items():
                        setattr(ly, k, v)
            if self.viewer.canvas.grid.enabled and saved:
                self.viewer.canvas.grid.enabled = False
        except RuntimeError:
            # Viewer.close() shuts the slicer down, then removes the layers one by one: a
            # visibility change then cannot be sliced, and nothing is left to show anyway.
            pass

    def _apply_opacity(self, *_):
        g = self.gen_layer
        if g is not None and self._pair() is not None and self.blend_radio.isChecked():
            self._touch(g, opacity=self.opacity.value() / 100.0)

    def _apply_mode(self, *_):
        pair = self._pair()
        if pair is None:
            self.schedule_heatmap()
            return
        g, t = pair
        grid = self.viewer.canvas.grid
        try:
            if self.side_radio.isChecked():
                keep = {g.name, t.name, L.SSIM, L.REGIONS}
                for ly in rgb_layers(self.viewer):  # the H&E source stays, as the first panel
                    if ly.name not in keep and ly.visible and not is_he(ly):
                        self._touch(ly, visible=False)
                self._touch(g, opacity=1.0, visible=True)
                self._touch(t, visible=True)
                if L.SSIM in self.viewer.layers:
                    self.viewer.layers[L.SSIM].visible = self.heat_check.isChecked()
                grid.shape = (-1, -1)
                grid.enabled = True  # one viewbox per visible layer, all on the shared camera
            else:
                if grid.enabled:
                    grid.enabled = False
                for name in [n for n, st in self._saved.items() if "visible" in st and n not in (g.name, t.name)]:
                    if name in self.viewer.layers:
                        self.viewer.layers[name].visible = self._saved[name].pop("visible")
                self._touch(g, visible=True, blending="translucent", opacity=self.opacity.value() / 100.0)
                self._touch(t, visible=True)
                # the generated layer blends over the truth: keep it above
                gi, ti = self.viewer.layers.index(g), self.viewer.layers.index(t)
                if gi < ti:
                    self.viewer.layers.move(gi, ti)
                if L.SSIM in self.viewer.layers:  # the map would cover the blend
                    self.viewer.layers[L.SSIM].visible = False
        except RuntimeError:
            pass
        self.opacity.setEnabled(self.blend_radio.isChecked())
        self.schedule_heatmap()

    # ---------------------------------------------------------- heatmap

    def _on_heat_toggled(self, on: bool) -> None:
        if on:
            self.schedule_heatmap()
        else:
            self._timer.stop()
            self._heat.drop()  # drop results in flight
            if L.SSIM in self.viewer.layers:
                self.viewer.layers[L.SSIM].visible = False

    def schedule_heatmap(self, *_):
        """(Re)start the debounce timer; the heatmap follows once the camera rests."""
        if not self._closed and self._active and self.heat_check.isChecked() and self.viewer.dims.ndisplay == 2:
            self._timer.start()

    def heatmap_window(self):
        """``(window, generated geometry, truth geometry)`` of the visible region at the displayed
        level (or coarser to stay within :data:`MAX_VIEW_SIDE`), or None."""
        pair = self._pair()
        if pair is None:
            return None
        g, t = pair
        gen, truth = layer_geom(g), layer_geom(t)
        win, _ = view_window(self.viewer, truth, MAX_VIEW_SIDE)
        return win, gen, truth

    def update_heatmap(self) -> None:
        """Start computing the heatmap of the current view in a worker (one at a time)."""
        if self._closed or not (self._active and self.heat_check.isChecked()):
            return
        if self._heat.busy:
            self._heat_pending = True  # recompute once the running one returns
            return
        got = self.heatmap_window()
        if got is None:
            return
        win, gen, truth = got
        if win.empty or min(win.shape) < 11:
            self.mean_label.setText("Mean local SSIM: – (no overlap with the real IHC in view)")
            return
        started = time.monotonic()
        self._heat.start(compute_heatmap, gen, truth, win, self.window_combo.currentData(),
                         on_done=lambda res: self._on_heatmap(res, started), on_error=self._on_heat_error,
                         on_finished=self._on_heat_finished)

    def _on_heat_finished(self):
        if self._heat_pending and not self._closed:
            self._heat_pending = False
            self.schedule_heatmap()

    def _on_heat_error(self, e):
        from napari.utils.notifications import show_warning

        show_warning(f"SSIM heatmap: {e}")

    def _on_heatmap(self, res: HeatmapResult, started: float = 0.0) -> None:
        if not self.heat_check.isChecked() or self._pair() is None:
            return
        self.heatmap_mean = res.mean
        self.heatmap_count += 1
        self.heatmap_read_at = started  # when its pixels were read (time.monotonic())
        shown = self.side_radio.isChecked()
        if L.SSIM in self.viewer.layers:
            ly = self.viewer.layers[L.SSIM]
            ly.data = res.smap
            update_layer(ly, scale=res.scale, translate=res.translate, visible=shown)
        else:
            kw = dict(scale=res.scale, translate=res.translate)
            t = self.truth_layer
            if t is not None and (t.metadata or {}).get("mpp"):
                kw["units"] = ("µm", "µm")
            ly = self.viewer.add_image(
                res.smap, name=L.SSIM, colormap=HEATMAP_COLORMAP, contrast_limits=(0.0, 1.0),
                opacity=0.8, blending="translucent", metadata={"role": "ssim"}, visible=shown, **kw,
            )
            ly.colorbar.visible = True  # the legend on the canvas, beside its panel
            # the heatmap must not become the camera's or the combos' subject
            self.viewer.layers.selection.active = self.truth_layer
        lvl = res.window.level if res.window.step == 1 else f"{res.window.level}, every {res.window.step}th px"
        where = "" if shown else " (the map is shown side by side)"
        self.mean_label.setText(f"Mean local SSIM (visible, level {lvl}): {res.mean:.3f}{where}")

    # ---------------------------------------------------------- regions

    def regions_layer(self, *_):
        """The ``Regions`` Shapes layer (created on the truth layer's grid when missing), its
        shapes labelled with their names on the canvas."""
        from napari.layers import Shapes

        if L.REGIONS in self.viewer.layers and isinstance(self.viewer.layers[L.REGIONS], Shapes):
            return self.viewer.layers[L.REGIONS]
        t = self.truth_layer
        kw = {}
        if t is not None:
            kw = dict(scale=tuple(t.scale[-2:]), translate=tuple(t.translate[-2:]))
            if (t.metadata or {}).get("mpp"):
                kw["units"] = ("µm", "µm")
        ly = self.viewer.add_shapes(
            name=L.REGIONS, ndim=2, edge_color="yellow", face_color=[1, 1, 0, 0.08], edge_width=3,
            features={"region_id": np.array([], dtype=object), "name": np.array([], dtype=object),
                      "classification": np.array([], dtype=object)},
            text={"string": "{name}", "color": "yellow", "size": 10, "anchor": "upper_left"}, **kw,
        )
        ly.mode = "add_rectangle"
        ly.events.data.connect(lambda e: self._name_new_shapes(ly))
        return ly

    @staticmethod
    def _name_new_shapes(ly) -> None:
        """Shapes drawn by hand get a name ("Region N") so the canvas label and the table agree."""
        feats = ly.features
        if "name" not in feats or not len(feats):
            return
        names = feats["name"].astype(object)
        missing = [i for i, v in enumerate(names) if not isinstance(v, str) or not v]
        if not missing:
            return
        for i in missing:
            names.iloc[i] = f"Region {i + 1}"
        feats = feats.copy()
        feats["name"] = names
        ly.features = feats
        # napari gives the next shape the current feature values: it must start unnamed, not
        # as another "Region 1"
        defaults = ly.feature_defaults.copy()
        defaults["name"] = ""
        if "region_id" in defaults:
            defaults["region_id"] = ""
        ly.feature_defaults = defaults
        ly.refresh_text()

    def _regions_from_layer(self) -> list:
        from ..regions import shapes_to_regions

        if L.REGIONS not in self.viewer.layers:
            return []
        sl = self.viewer.layers[L.REGIONS]
        t = self.truth_layer
        data = []
        for d in sl.data:
            yx = np.asarray(d, dtype=np.float64)[:, -2:]
            if t is not None:  # Regions data -> world -> truth level-0 data coordinates
                world = yx * np.asarray(sl.scale[-2:]) + np.asarray(sl.translate[-2:])
                yx = (world - np.asarray(t.translate[-2:])) / np.asarray(t.scale[-2:])
            data.append(yx)
        regions = shapes_to_regions(data, list(sl.shape_type), sl.features if len(sl.features) else None)
        for i, r in enumerate(regions):
            if not r.name:
                r.name = f"Region {i + 1}"
        return regions

    def add_regions(self, regions) -> int:
        """Add regions (read from a GeoJSON) to the ``Regions`` layer; returns how many."""
        from ..regions import regions_to_shapes

        if not regions:
            return 0
        ly = self.regions_layer()
        data, types, feats = regions_to_shapes(regions)
        colors = [(np.r_[np.asarray(r.color) / 255.0, 1.0] if r.color is not None else np.array([1.0, 1.0, 0.0, 1.0]))
                  for r in regions for _ in r.parts]
        n0 = len(ly.data)
        ly.add(data, shape_type=types, edge_color=colors)
        table = ly.features.copy()
        for k, vals in feats.items():
            if k not in table:
                table[k] = [""] * len(table)
            table[k] = table[k].astype(object)
            table.loc[n0:, k] = vals
        ly.features = table
        ly.refresh_text()
        return len(regions)

    def import_geojson(self, path, *, on_done=None):
        """Read a QuPath GeoJSON file in a worker and add its regions to the ``Regions`` layer;
        returns the worker. ``on_done(n)`` is called with the number added."""
        from napari.utils.notifications import show_error, show_info

        from ..regions import read_geojson

        def done(regions):
            n = self.add_regions(regions)
            show_info(f"Imported {n} region(s) from {Path(path).name}")
            if on_done is not None:
                on_done(n)

        self.import_btn.setEnabled(False)
        return self._import.start(read_geojson, path, on_done=done,
                                   on_error=lambda e: show_error(f"Compare: {e}"),
                                   on_finished=lambda: self.import_btn.setEnabled(True))

    def measure_regions(self, *_):
        """Score every region in a worker; fills :attr:`scores` and the table."""
        from napari.utils.notifications import show_error, show_warning

        reason = self.idle_reason()
        if reason:
            show_error(f"Compare: {reason}")
            return None
        pair = self._pair()
        regions = self._regions_from_layer()
        if not regions:
            show_warning("Compare: draw rectangles or polygons on the 'Regions' layer, or import a GeoJSON")
            return None
        if self._regions.busy:
            return self._regions.worker
        gen, truth = layer_geom(pair[0]), layer_geom(pair[1])

        def work(cancel):
            for i, r in enumerate(regions):
                if cancel.is_set():
                    return
                yield i, measure_region(r, gen, truth)

        self.scores = []
        self.table.setRowCount(0)
        self.progress.setRange(0, len(regions))
        self.progress.setValue(0)
        self.progress.setVisible(True)
        self.measure_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        return self._regions.start(work, pass_cancel=True, on_item=self._on_region,
                                   on_error=lambda e: show_error(f"Compare: measuring regions failed: {e}"),
                                   on_finished=self._on_regions_done)

    def cancel(self, *_):
        self._regions.cancel.set()

    def _on_region(self, item):
        i, sc = item
        self.scores.append(sc)
        self._add_row(sc)
        self.progress.setValue(i + 1)

    def _on_regions_done(self):
        self.progress.setVisible(False)
        self.measure_btn.setEnabled(self._pair() is not None)
        self.cancel_btn.setEnabled(False)
        if not self.scores:
            return
        t = self.truth_layer
        unit = "µm²" if t is not None and (t.metadata or {}).get("mpp") else "px²"
        used = sorted({s.level for s in self.scores})
        self.table_note.setText(
            f"Area in {unit}. Level = pyramid level measured (0 = full resolution), chosen so a region "
            f"reads at most {MAX_REGION_PIXELS:,} px; levels used: {used}. PSNR/SSIM: BCI definition on "
            "the bounding box; local SSIM, DAB and ΔE00: inside the shape. HER2 pred: the rule-based "
            "level of the generated IHC in the region, or why it is not assessable.")
        errs = [s for s in self.scores if s.error]
        if errs:
            from napari.utils.notifications import show_warning

            show_warning(f"Compare: {len(errs)} region(s) not measured: {errs[0].error}")

    def _add_row(self, sc: RegionScore) -> None:
        r = self.table.rowCount()
        self.table.insertRow(r)
        row = sc.row()
        for c, (key, _) in enumerate(TABLE_COLUMNS):
            if sc.error and key not in ("region", "level", "area", "her2_truth"):
                text = sc.error if key == "her2_pred" else "–"
            else:
                text = _fmt(row.get(key))
            item = QTableWidgetItem(text)
            item.setToolTip(text)
            if key in ("ssim", "ssim_local") and isinstance(row.get(key), float) and math.isfinite(row[key]):
                from napari.utils.colormaps import ensure_colormap

                rgba = ensure_colormap(HEATMAP_COLORMAP).map(np.array([min(max(row[key], 0), 1)]))[0]
                item.setBackground(QColor.fromRgbF(*[float(v) for v in rgba[:3]], 0.45))
            self.table.setItem(r, c, item)

    def centre_on_row(self, row: int, *_):
        """Centre (and fit) the view on the region of a table row."""
        if not (0 <= row < len(self.scores)):
            return
        t = self.truth_layer
        geom = layer_geom(t) if t is not None else None
        x0, y0, x1, y1 = self.scores[row].region.bounds
        if geom is not None:
            (wy0, wx0), (wy1, wx1) = geom.level_to_world(0, [(y0 - 0.5, x0 - 0.5), (y1 - 0.5, x1 - 0.5)])
        else:
            wy0, wx0, wy1, wx1 = y0, x0, y1, x1
        cam = self.viewer.scene.camera
        cam.center = ((wy0 + wy1) / 2, (wx0 + wx1) / 2)
        vb = self.viewer.canvas.viewbox_size(self.viewer.layers)
        span_y, span_x = max(wy1 - wy0, 1e-9), max(wx1 - wx0, 1e-9)
        cam.zoom = 0.8 * min(vb[0] / span_y, vb[1] / span_x)

    # ---------------------------------------------------------- export

    def export_csv(self, path) -> None:
        """One row per measured region (:func:`napari_bci.metrics.compare.export_csv`)."""
        export_csv(self.scores, path)

    def export_geojson(self, path) -> None:
        """The measured regions as QuPath GeoJSON (:func:`napari_bci.metrics.compare.export_geojson`)."""
        export_geojson(self.scores, path)

    def _import_dialog(self, *_):
        path, _ = QFileDialog.getOpenFileName(self, "Import QuPath GeoJSON", "", "GeoJSON (*.geojson *.json)")
        if path:
            self.import_geojson(path)

    def _csv_dialog(self, *_):
        self._save_dialog("CSV (*.csv)", ".csv", self.export_csv)

    def _geojson_dialog(self, *_):
        self._save_dialog("GeoJSON (*.geojson)", ".geojson", self.export_geojson)

    def _save_dialog(self, filt: str, ext: str, fn):
        from napari.utils.notifications import show_error, show_info

        if not self.scores:
            show_error("Compare: measure regions first")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export", f"regions{ext}", filt)
        if path:
            try:
                fn(path)
                show_info(f"Compare: wrote {Path(path).name}")
            except Exception as e:
                show_error(f"Compare: export failed: {e}")

    # ---------------------------------------------------------- lifecycle

    def hideEvent(self, event):
        self._active = False
        self._timer.stop()
        super().hideEvent(event)

    def showEvent(self, event):
        self._active = True
        super().showEvent(event)
        self.schedule_heatmap()

    def _stop_all(self, *_):
        """Stop the timer and workers, give the layers their display back, and let no late
        result touch the viewer."""
        if self._closed:
            return
        self._closed = True
        self._active = False
        try:
            self._timer.stop()
            self._data_timer.stop()
        except RuntimeError:  # already deleted with the widget
            pass
        self._watch_generated_none()
        self._heat.stop()
        self._regions.stop()
        self._import.stop()
        self._restore()
        try:
            cam = self.viewer.scene.camera
            cam.events.center.disconnect(self.schedule_heatmap)
            cam.events.zoom.disconnect(self.schedule_heatmap)
            self.viewer.canvas.events.size.disconnect(self.schedule_heatmap)
            self.viewer.layers.events.inserted.disconnect(self._refresh_layers)
            self.viewer.layers.events.removed.disconnect(self._refresh_layers)
            self.viewer.layers.events.moved.disconnect(self._refresh_layers)
        except (RuntimeError, TypeError, ValueError):
            pass

    def close(self):
        self._stop_all()
        return super().close()
