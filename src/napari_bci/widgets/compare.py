"""The "Compare" dock widget: generated vs real IHC side by side or blended, a live local-SSIM
heatmap of the visible region, and per-region scores (table, CSV, QuPath GeoJSON).

Geometry: layers map data to world coordinates by ``scale`` and ``translate`` only (rotation,
shear and affine are not supported here). The ground-truth layer defines the sampling grid; the
generated layer is read at the matching level, resampled only if its grid differs.
"""

from __future__ import annotations

import csv
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

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
from ._layers import levels, rgb_layers

#: The heatmap reads at most this many pixels per side of the visible region (else coarser).
MAX_VIEW_SIDE = 2048
#: A region is measured at the finest level where its bounding box has at most this many pixels
#: (two RGB windows plus ~15 float32 planes for SSIM: about 300 MB at the bound).
MAX_REGION_PIXELS = 2048 * 2048
#: Cells need about 1 um/px to be scored; coarser region reads report no predicted level.
MAX_HER2_MPP = 1.0
DEBOUNCE_MS = 300
HEATMAP_COLORMAP = "viridis"

TABLE_COLUMNS = (
    ("region", "Region"),
    ("level", "Level"),
    ("area", "Area"),
    ("psnr", "PSNR"),
    ("ssim", "SSIM"),
    ("ssim_local", "Local SSIM"),
    ("dab_mae", "DAB |Δ|"),
    ("dab_corr", "DAB r"),
    ("delta_e", "ΔE00"),
    ("her2_pred", "HER2 pred"),
    ("her2_truth", "HER2 truth"),
)


# ---------------------------------------------------------------- geometry (no Qt)


@dataclass
class LayerGeom:
    """What the workers need from an image layer, captured on the main thread."""

    name: str
    levels: list
    scale: tuple[float, float]
    translate: tuple[float, float]
    downsamples: list[tuple[float, float]]
    mpp: float | None = None
    her2: str | None = None

    @classmethod
    def from_layer(cls, layer) -> "LayerGeom":
        lvls = levels(layer)
        if layer.multiscale:
            ds = [tuple(float(v) for v in f[-2:]) for f in layer.downsample_factors]
        else:
            ds = [(1.0, 1.0)]
        meta = layer.metadata or {}
        mpp = meta.get("mpp")
        return cls(
            name=layer.name,
            levels=lvls,
            scale=tuple(float(v) for v in layer.scale[-2:]),
            translate=tuple(float(v) for v in layer.translate[-2:]),
            downsamples=ds,
            mpp=float(mpp) if mpp else None,
            her2=meta.get("her2"),
        )

    def shape(self, level: int) -> tuple[int, int]:
        return tuple(int(v) for v in self.levels[level].shape[:2])

    def world_to_level(self, level: int, yx_world) -> np.ndarray:
        """World (y, x) -> pixel (row, col) of ``level`` (pixel centres at integers)."""
        p = np.asarray(yx_world, dtype=np.float64)
        d = (p - np.asarray(self.translate)) / np.asarray(self.scale)
        return d / np.asarray(self.downsamples[level])

    def level_to_world(self, level: int, yx_px) -> np.ndarray:
        p = np.asarray(yx_px, dtype=np.float64) * np.asarray(self.downsamples[level])
        return p * np.asarray(self.scale) + np.asarray(self.translate)

    def pixel_world_size(self, level: int) -> float:
        return float(np.mean(np.asarray(self.scale) * np.asarray(self.downsamples[level])))

    def level_mpp(self, level: int, step: int = 1) -> float | None:
        return None if not self.mpp else self.mpp * float(np.mean(self.downsamples[level])) * step


@dataclass
class Window:
    """A sampling grid on a layer: level, pixel rows ``y0:y1:step`` and cols ``x0:x1:step``."""

    level: int
    y0: int
    y1: int
    x0: int
    x1: int
    step: int = 1

    @property
    def shape(self) -> tuple[int, int]:
        return (len(range(self.y0, self.y1, self.step)), len(range(self.x0, self.x1, self.step)))

    @property
    def empty(self) -> bool:
        return self.y1 <= self.y0 or self.x1 <= self.x0


def visible_world_box(center, zoom: float, viewbox_size) -> tuple[float, float, float, float]:
    """``(y0, y1, x0, x1)`` in world units seen by a 2-D camera (``zoom``: screen px per world
    unit) in a viewbox of ``viewbox_size`` (h, w) screen px."""
    cy, cx = float(center[-2]), float(center[-1])
    hh, hw = viewbox_size[0] / zoom / 2.0, viewbox_size[1] / zoom / 2.0
    return cy - hh, cy + hh, cx - hw, cx + hw


def window_for_box(geom: LayerGeom, box_world, level: int, max_side: int | None = None,
                   max_pixels: int | None = None) -> Window:
    """The pixels of ``level`` whose centres fall in ``box_world`` (clipped to the image); the
    ``step`` grows until the window fits ``max_side`` per side and ``max_pixels`` in all."""
    y0w, y1w, x0w, x1w = box_world
    (py0, px0), (py1, px1) = geom.world_to_level(level, [(y0w, x0w), (y1w, x1w)])
    h, w = geom.shape(level)
    y0, x0 = max(int(math.ceil(py0)), 0), max(int(math.ceil(px0)), 0)
    y1, x1 = min(int(math.floor(py1)) + 1, h), min(int(math.floor(px1)) + 1, w)
    win = Window(level, y0, max(y1, y0), x0, max(x1, x0))
    step = 1
    while not win.empty:
        sh = Window(level, y0, y1, x0, x1, step).shape
        if (max_side is None or max(sh) <= max_side) and (max_pixels is None or sh[0] * sh[1] <= max_pixels):
            break
        step += 1
    win.step = step
    return win


def choose_level(geom: LayerGeom, box_world, *, start: int = 0, max_side: int | None = None,
                 max_pixels: int | None = None) -> Window:
    """The finest level ``>= start`` whose window over ``box_world`` fits the bounds (then a
    pixel step on the coarsest level if even that is too big)."""
    last = len(geom.levels) - 1
    for lv in range(min(start, last), last + 1):
        win = window_for_box(geom, box_world, lv)
        h, w = win.shape
        if (max_side is None or max(h, w) <= max_side) and (max_pixels is None or h * w <= max_pixels):
            return win
    return window_for_box(geom, box_world, last, max_side, max_pixels)


def read_window(geom: LayerGeom, win: Window) -> np.ndarray:
    arr = geom.levels[win.level]
    out = np.asarray(arr[win.y0:win.y1:win.step, win.x0:win.x1:win.step])
    if out.ndim == 3 and out.shape[2] == 4:
        out = out[..., :3]
    return np.ascontiguousarray(out.astype(np.uint8, copy=False))


def same_grid(a: LayerGeom, b: LayerGeom) -> bool:
    return (np.allclose(a.scale, b.scale) and np.allclose(a.translate, b.translate)
            and [a.shape(i) for i in range(len(a.levels))] == [b.shape(i) for i in range(len(b.levels))])


def read_on_grid(src: LayerGeom, ref: LayerGeom, win: Window) -> np.ndarray:
    """``src`` sampled on ``ref``'s window ``win`` (direct read when the grids agree, else the
    best ``src`` level resampled bilinearly; outside ``src`` is white)."""
    if same_grid(src, ref):
        return read_window(src, win)
    from scipy import ndimage

    target = ref.pixel_world_size(win.level) * win.step
    lv = 0
    for i in range(len(src.levels)):
        if src.pixel_world_size(i) <= target * 1.01:
            lv = i
    ys = np.arange(win.y0, win.y1, win.step, dtype=np.float64)
    xs = np.arange(win.x0, win.x1, win.step, dtype=np.float64)
    corners = ref.level_to_world(win.level, [(ys[0], xs[0]), (ys[-1], xs[-1])])
    (sy0, sx0), (sy1, sx1) = src.world_to_level(lv, corners)
    h, w = src.shape(lv)
    ry0, rx0 = max(int(math.floor(min(sy0, sy1))) - 1, 0), max(int(math.floor(min(sx0, sx1))) - 1, 0)
    ry1, rx1 = min(int(math.ceil(max(sy0, sy1))) + 2, h), min(int(math.ceil(max(sx0, sx1))) + 2, w)
    out = np.full((len(ys), len(xs), 3), 255, np.uint8)
    if ry1 <= ry0 or rx1 <= rx0:
        return out
    crop = np.asarray(src.levels[lv][ry0:ry1, rx0:rx1])[..., :3].astype(np.float32)
    gy = np.linspace(sy0, sy1, len(ys)) - ry0
    gx = np.linspace(sx0, sx1, len(xs)) - rx0
    yy, xx = np.meshgrid(gy, gx, indexing="ij")
    for c in range(3):
        out[..., c] = np.clip(np.rint(ndimage.map_coordinates(crop[..., c], [yy, xx], order=1, cval=255.0)), 0, 255)
    return out


# ---------------------------------------------------------------- work done in threads


@dataclass
class HeatmapResult:
    request: int
    smap: np.ndarray
    mean: float
    window: Window
    scale: tuple[float, float]
    translate: tuple[float, float]


def compute_heatmap(request: int, gen: LayerGeom, truth: LayerGeom, win: Window, kind: str) -> HeatmapResult:
    """Local SSIM of the generated vs ground-truth pixels in ``win`` (truth's grid), and where the
    map goes in world coordinates."""
    from ..metrics.ssim import ssim_map, ssim_mean, window as ssim_window

    b = read_window(truth, win)
    a = read_on_grid(gen, truth, win)
    if min(a.shape[:2]) < ssim_window(kind).size:
        raise ValueError("visible region too small for the SSIM window")
    smap = ssim_map(a, b, kind=kind, data_range=255.0)
    ds = np.asarray(truth.downsamples[win.level]) * win.step
    scale = tuple(float(v) for v in np.asarray(truth.scale) * ds)
    translate = tuple(float(v) for v in truth.level_to_world(win.level, (win.y0, win.x0)))
    return HeatmapResult(request, smap.astype(np.float32), ssim_mean(smap, kind), win, scale, translate)


@dataclass
class RegionScore:
    region: Any  # napari_bci.regions.Region (level-0 px of the truth layer)
    level: int
    step: int
    metrics: dict = field(default_factory=dict)
    area_um2: float | None = None
    area_px: float = 0.0
    her2_pred: str | None = None
    her2_truth: str | None = None
    error: str | None = None

    def row(self) -> dict:
        d = {"region": self.region.label, "level": self.level if self.step == 1 else f"{self.level} (1/{self.step})",
             "area": self.area_um2 if self.area_um2 is not None else self.area_px,
             "her2_pred": self.her2_pred or "", "her2_truth": self.her2_truth or ""}
        d.update(self.metrics)
        return d


def _her2_level(rgb: np.ndarray, mpp: float, mask: np.ndarray) -> str:
    from ..her2 import score

    return score(rgb, mpp=mpp, mask=mask).her2


def measure_region(region, gen: LayerGeom, truth: LayerGeom, *, predict_her2: bool = True) -> RegionScore:
    """All metrics of one region at the finest level whose read fits :data:`MAX_REGION_PIXELS`."""
    from ..metrics import compare_pair

    x0, y0, x1, y1 = region.bounds
    # region coordinates are GeoJSON-style level-0 px of the truth layer; world box of the pixels
    (wy0, wx0), (wy1, wx1) = truth.level_to_world(0, [(y0 - 0.5, x0 - 0.5), (y1 - 0.5, x1 - 0.5)])
    win = choose_level(truth, (wy0, wy1, wx0, wx1), max_pixels=MAX_REGION_PIXELS)
    mpp0 = truth.mpp
    sc = RegionScore(region, win.level, win.step, area_px=region.area_px, her2_truth=truth.her2)
    if mpp0:
        sc.area_um2 = region.area_px * mpp0 * mpp0
    if win.empty or min(win.shape) < 7:
        sc.error = "outside the image or smaller than the 7x7 SSIM window"
        return sc
    # grid pixel i is level pixel y0 + i * step, centred at GeoJSON (y0 + i * step) * dl + 0.5
    dl = float(np.mean(truth.downsamples[win.level]))
    ds = dl * win.step
    off = (win.x0 * dl + 0.5 - 0.5 * ds, win.y0 * dl + 0.5 - 0.5 * ds)
    mask = region.mask(win.shape, offset_xy=off, downsample=ds)
    if not mask.any():
        sc.error = "region covers no pixel at this level"
        return sc
    b = read_window(truth, win)
    a = read_on_grid(gen, truth, win)
    lmpp = truth.level_mpp(win.level, win.step)
    sc.metrics = compare_pair(a, b, mpp=lmpp, mask=mask)
    if predict_her2:
        m = lmpp or 0.5
        if m <= MAX_HER2_MPP:
            try:
                sc.her2_pred = _her2_level(a, m, mask)
            except Exception as e:  # a scorer failure must not lose the metrics
                sc.her2_pred = f"error: {e}"
        else:
            sc.her2_pred = "n/a (too coarse)"
    return sc


# ---------------------------------------------------------------- the widget


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
    """Compare a generated IHC layer with the ground truth (see the module docstring)."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.scores: list[RegionScore] = []
        self.heatmap_mean: float | None = None
        self._request = 0
        self._heat_worker = None
        self._heat_pending = False
        self._region_worker = None
        self._cancel = threading.Event()
        self._hidden_by_us: list = []
        self._active = True
        self._user_chose: set = set()
        self._closed = False

        self.gen_combo = QComboBox()
        self.truth_combo = QComboBox()
        self.side_radio = QRadioButton("Side by side")
        self.blend_radio = QRadioButton("Overlay")
        self.blend_radio.setChecked(True)
        mode = QButtonGroup(self)
        mode.addButton(self.side_radio)
        mode.addButton(self.blend_radio)
        self.opacity = QSlider(Qt.Horizontal)
        self.opacity.setRange(0, 100)
        self.opacity.setValue(50)
        self.heat_check = QCheckBox("Local SSIM heatmap of the visible region")
        self.heat_check.setChecked(True)
        self.window_combo = QComboBox()
        self.window_combo.addItem("7x7 uniform (BCI)", "uniform")
        self.window_combo.addItem("11x11 Gaussian σ 1.5", "gaussian")
        self.mean_label = QLabel("Mean local SSIM: –")
        bar = QLabel()
        bar.setPixmap(_colorbar_pixmap(HEATMAP_COLORMAP))
        legend = QHBoxLayout()
        legend.addWidget(QLabel("0"))
        legend.addWidget(bar)
        legend.addWidget(QLabel("1"))
        legend.addStretch(1)

        form = QFormLayout()
        form.addRow("Generated", self.gen_combo)
        form.addRow("Ground truth", self.truth_combo)
        modes = QHBoxLayout()
        modes.addWidget(self.blend_radio)
        modes.addWidget(self.side_radio)
        form.addRow("View", modes)
        form.addRow("Opacity", self.opacity)
        form.addRow("SSIM window", self.window_combo)

        self.add_regions_btn = QPushButton("Add Regions layer")
        self.import_btn = QPushButton("Import GeoJSON…")
        self.measure_btn = QPushButton("Measure regions")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.csv_btn = QPushButton("Export CSV…")
        self.geojson_btn = QPushButton("Export GeoJSON…")
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.table = QTableWidget(0, len(TABLE_COLUMNS))
        self.table.setHorizontalHeaderLabels([c[1] for c in TABLE_COLUMNS])
        self.table.setEditTriggers(QAbstractItemView.NoEditTriggers)
        self.table.setSelectionBehavior(QAbstractItemView.SelectRows)
        self.table.setSelectionMode(QAbstractItemView.SingleSelection)
        self.table.horizontalHeader().setSectionResizeMode(QHeaderView.ResizeToContents)
        self.table_note = QLabel("")
        self.table_note.setWordWrap(True)

        lay = QVBoxLayout(self)
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

    def _refresh_layers(self, event=None) -> None:
        names = [ly.name for ly in rgb_layers(self.viewer)]
        before = (self.gen_combo.currentText(), self.truth_combo.currentText())
        for combo, pick in ((self.gen_combo, self._default_gen), (self.truth_combo, self._default_truth)):
            current = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            # keep what the user picked; otherwise follow the defaults (a generated layer that
            # appears later takes over from the placeholder choice)
            if current in names and combo in self._user_chose:
                combo.setCurrentText(current)
            else:
                default = pick(names)
                if default is not None:
                    combo.setCurrentText(default)
            combo.blockSignals(False)
        if (self.gen_combo.currentText(), self.truth_combo.currentText()) != before:
            self._on_layers_chosen()

    def _default_gen(self, names: Sequence[str]) -> str | None:
        for ly in rgb_layers(self.viewer):
            if (ly.metadata or {}).get("role") == "generated" or ly.name.startswith("IHC (generated"):
                return ly.name
        return names[0] if names else None

    def _default_truth(self, names: Sequence[str]) -> str | None:
        for ly in rgb_layers(self.viewer):
            if (ly.metadata or {}).get("role") == "ihc" or ly.name == L.IHC_TRUTH:
                return ly.name
        others = [n for n in names if n != self.gen_combo.currentText()]
        return others[0] if others else (names[0] if names else None)

    @property
    def gen_layer(self):
        n = self.gen_combo.currentText()
        return self.viewer.layers[n] if n in self.viewer.layers else None

    @property
    def truth_layer(self):
        n = self.truth_combo.currentText()
        return self.viewer.layers[n] if n in self.viewer.layers else None

    def set_layers(self, generated: str, truth: str) -> None:
        """Choose the layers (as a user would: later layer changes keep this choice)."""
        self._user_chose.update((self.gen_combo, self.truth_combo))
        self.gen_combo.setCurrentText(generated)
        self.truth_combo.setCurrentText(truth)

    def _pair(self):
        g, t = self.gen_layer, self.truth_layer
        if g is None or t is None or g is t:
            return None
        return g, t

    def _on_layers_chosen(self, *_):
        self._apply_mode()
        self.schedule_heatmap()

    # ---------------------------------------------------------- side by side / overlay

    def _apply_opacity(self, *_):
        g = self.gen_layer
        if g is not None and self.blend_radio.isChecked():
            g.opacity = self.opacity.value() / 100.0

    def _apply_mode(self, *_):
        pair = self._pair()
        grid = self.viewer.canvas.grid
        if self.side_radio.isChecked() and pair is not None:
            g, t = pair
            keep = {g.name, t.name, L.SSIM, L.REGIONS}
            for ly in rgb_layers(self.viewer):  # the H&E source stays, as the first panel
                if ly.name not in keep and ly.visible and (ly.metadata or {}).get("role") != "he":
                    ly.visible = False
                    self._hidden_by_us.append(ly.name)
            g.opacity = 1.0
            g.visible = t.visible = True
            grid.shape = (-1, -1)
            grid.enabled = True  # one viewbox per visible layer, all on the shared camera
        else:
            grid.enabled = False
            try:
                for n in self._hidden_by_us:
                    if n in self.viewer.layers:
                        self.viewer.layers[n].visible = True
                self._hidden_by_us = []
                if pair is not None:
                    g, t = pair
                    g.visible = t.visible = True
                    g.blending = "translucent"
                    # the generated layer blends over the truth: keep it above
                    gi, ti = self.viewer.layers.index(g), self.viewer.layers.index(t)
                    if gi < ti:
                        self.viewer.layers.move(gi, ti)
                    g.opacity = self.opacity.value() / 100.0
            except RuntimeError:
                # Viewer.close() shuts the slicer down, then removes the layers one by one: a
                # visibility change then cannot be sliced, and nothing is left to show anyway.
                self._hidden_by_us = []
        self.opacity.setEnabled(self.blend_radio.isChecked())
        self.schedule_heatmap()

    # ---------------------------------------------------------- heatmap

    def _on_heat_toggled(self, on: bool) -> None:
        if on:
            self.schedule_heatmap()
        else:
            self._timer.stop()
            self._request += 1  # drop results in flight
            if L.SSIM in self.viewer.layers:
                self.viewer.layers[L.SSIM].visible = False

    def schedule_heatmap(self, *_):
        """(Re)start the debounce timer; the heatmap follows once the camera rests."""
        if not self._closed and self._active and self.heat_check.isChecked() and self.viewer.dims.ndisplay == 2:
            self._timer.start()

    def heatmap_window(self) -> tuple[Window, LayerGeom, LayerGeom] | None:
        """The truth-layer window of the visible region at the displayed level (or coarser to stay
        within :data:`MAX_VIEW_SIDE`)."""
        pair = self._pair()
        if pair is None:
            return None
        g, t = pair
        gen, truth = LayerGeom.from_layer(g), LayerGeom.from_layer(t)
        cam = self.viewer.scene.camera
        vb = self.viewer.canvas.viewbox_size(self.viewer.layers)
        box = visible_world_box(cam.center, cam.zoom, vb)
        start = 0
        if t.multiscale:
            # napari's rule: the coarsest level whose pixels are no bigger than a screen pixel
            screen_px_world = 1.0 / cam.zoom
            for i in range(len(truth.levels)):
                if truth.pixel_world_size(i) <= screen_px_world * 1.0001:
                    start = i
        win = choose_level(truth, box, start=start, max_side=MAX_VIEW_SIDE)
        return win, gen, truth

    def update_heatmap(self) -> None:
        """Start computing the heatmap of the current view in a worker (one at a time)."""
        if self._closed or not (self._active and self.heat_check.isChecked()):
            return
        if self._heat_worker is not None:
            self._heat_pending = True  # recompute once the running one returns
            return
        got = self.heatmap_window()
        if got is None:
            return
        win, gen, truth = got
        if win.empty or min(win.shape) < 11:
            self.mean_label.setText("Mean local SSIM: – (no overlap with the ground truth in view)")
            return
        from napari.qt.threading import create_worker

        self._request += 1
        kind = self.window_combo.currentData()
        w = create_worker(compute_heatmap, self._request, gen, truth, win, kind, _start_thread=False)
        w.returned.connect(self._on_heatmap)
        w.errored.connect(self._on_heat_error)
        w.finished.connect(self._on_heat_finished)
        self._heat_worker = w
        w.start()

    def _on_heat_finished(self):
        self._heat_worker = None
        if self._heat_pending and not self._closed:
            self._heat_pending = False
            self.schedule_heatmap()

    def _on_heat_error(self, e):
        from napari.utils.notifications import show_warning

        if self._closed:
            return
        show_warning(f"SSIM heatmap: {e}")

    def _on_heatmap(self, res: HeatmapResult) -> None:
        if self._closed or res.request != self._request or not self.heat_check.isChecked():
            return  # stale: the view moved on
        self.heatmap_mean = res.mean
        kw = dict(scale=res.scale, translate=res.translate)
        if L.SSIM in self.viewer.layers:
            ly = self.viewer.layers[L.SSIM]
            ly.data = res.smap
            ly.scale = res.scale
            ly.translate = res.translate
            ly.visible = True
        else:
            t = self.truth_layer
            if t is not None and (t.metadata or {}).get("mpp"):
                kw["units"] = ("µm", "µm")
            self.viewer.add_image(
                res.smap, name=L.SSIM, colormap=HEATMAP_COLORMAP, contrast_limits=(0.0, 1.0),
                opacity=0.6, blending="translucent", metadata={"role": "ssim"}, **kw,
            )
            # the heatmap must not become the camera's or the combos' subject
            self.viewer.layers.selection.active = self.truth_layer
        lvl = res.window.level if res.window.step == 1 else f"{res.window.level}, every {res.window.step}th px"
        self.mean_label.setText(f"Mean local SSIM (visible, level {lvl}): {res.mean:.3f}")

    # ---------------------------------------------------------- regions

    def regions_layer(self, *_):
        """The ``Regions`` Shapes layer (created on the truth layer's grid when missing)."""
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
                      "classification": np.array([], dtype=object)}, **kw,
        )
        ly.mode = "add_rectangle"
        return ly

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

    def import_geojson(self, path) -> int:
        """Add the regions of a QuPath GeoJSON file to the ``Regions`` layer; returns how many."""
        from ..regions import read_geojson, regions_to_shapes

        regions = read_geojson(path)
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
        return len(regions)

    def measure_regions(self, *_):
        """Score every region in a worker; fills :attr:`scores` and the table."""
        from napari.utils.notifications import show_error, show_warning

        pair = self._pair()
        if pair is None:
            show_error("Compare: choose two different RGB layers (generated and ground truth)")
            return None
        regions = self._regions_from_layer()
        if not regions:
            show_warning("Compare: draw rectangles or polygons on the 'Regions' layer, or import a GeoJSON")
            return None
        if self._region_worker is not None:
            return self._region_worker
        gen, truth = LayerGeom.from_layer(pair[0]), LayerGeom.from_layer(pair[1])
        self._cancel.clear()
        from napari.qt.threading import create_worker

        def work():
            for i, r in enumerate(regions):
                if self._cancel.is_set():
                    return
                yield i, measure_region(r, gen, truth)

        self.scores = []
        self.table.setRowCount(0)
        self.progress.setRange(0, len(regions))
        self.progress.setValue(0)
        self.progress.setVisible(True)
        self.measure_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        w = create_worker(work, _start_thread=False)
        w.yielded.connect(self._on_region)
        w.errored.connect(lambda e: show_error(f"Compare: measuring regions failed: {e}"))
        w.finished.connect(self._on_regions_done)
        self._region_worker = w
        w.start()
        return w

    def cancel(self, *_):
        self._cancel.set()
        if self._region_worker is not None:
            self._region_worker.quit()

    def _on_region(self, item):
        if self._closed:
            return
        i, sc = item
        self.scores.append(sc)
        self._add_row(sc)
        self.progress.setValue(i + 1)

    def _on_regions_done(self):
        self._region_worker = None
        if self._closed:
            return
        self.progress.setVisible(False)
        self.measure_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        t = self.truth_layer
        unit = "µm²" if t is not None and (t.metadata or {}).get("mpp") else "px²"
        used = sorted({s.level for s in self.scores})
        self.table_note.setText(
            f"Area in {unit}. Level = pyramid level measured (0 = full resolution), chosen so a region "
            f"reads at most {MAX_REGION_PIXELS:,} px; levels used: {used}. PSNR/SSIM: BCI definition on "
            "the bounding box; local SSIM, DAB and ΔE00: inside the shape.")
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
                text = sc.error if key == "psnr" else "–"
            else:
                text = _fmt(row.get(key))
            item = QTableWidgetItem(text)
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
        geom = LayerGeom.from_layer(t) if t is not None else None
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
        """One row per measured region, written atomically."""
        from ..metrics.evaluate import write_atomic_text
        from ..metrics.pair import METRIC_KEYS

        if not self.scores:
            raise ValueError("no measured regions to export")
        cols = ["region", "id", "level", "step", "area_px", "area_um2", *METRIC_KEYS, "her2_pred", "her2_truth", "error"]

        def write(f):
            w = csv.writer(f)
            w.writerow(cols)
            for s in self.scores:
                vals = {"region": s.region.label, "id": s.region.id, "level": s.level, "step": s.step,
                        "area_px": s.area_px, "area_um2": s.area_um2, "her2_pred": s.her2_pred,
                        "her2_truth": s.her2_truth, "error": s.error, **s.metrics}
                w.writerow(["" if vals.get(c) is None else (f"{vals[c]:.6g}" if isinstance(vals[c], float)
                                                           else vals[c]) for c in cols])

        write_atomic_text(Path(path), write)

    def export_geojson(self, path) -> None:
        """The measured regions as QuPath GeoJSON with the metrics as measurements."""
        from ..her2 import LEVELS
        from ..regions import write_geojson

        if not self.scores:
            raise ValueError("no measured regions to export")
        out = []
        for s in self.scores:
            r = s.region
            m = dict(r.measurements)
            if s.area_um2 is not None:
                m["Area µm^2"] = s.area_um2
            m["Area px^2"] = s.area_px
            m["Pyramid level"] = s.level
            m.update({f"Compare: {k}": v for k, v in s.metrics.items()})
            if s.her2_pred in LEVELS:
                m["HER2 predicted (0-3)"] = LEVELS.index(s.her2_pred)
            if s.her2_truth in LEVELS:
                m["HER2 ground truth (0-3)"] = LEVELS.index(s.her2_truth)
            r.measurements = m
            out.append(r)
        write_geojson(path, out)

    def _import_dialog(self, *_):
        from napari.utils.notifications import show_error, show_info

        path, _ = QFileDialog.getOpenFileName(self, "Import QuPath GeoJSON", "", "GeoJSON (*.geojson *.json)")
        if path:
            try:
                n = self.import_geojson(path)
                show_info(f"Imported {n} region(s) from {Path(path).name}")
            except Exception as e:
                show_error(f"Compare: {e}")

    def _csv_dialog(self, *_):
        self._save_dialog("CSV (*.csv)", ".csv", self.export_csv)

    def _geojson_dialog(self, *_):
        self._save_dialog("GeoJSON (*.geojson)", ".geojson", self.export_geojson)

    def _save_dialog(self, filt: str, ext: str, fn):
        from napari.utils.notifications import show_error

        if not self.scores:
            show_error("Compare: measure regions first")
            return
        path, _ = QFileDialog.getSaveFileName(self, "Export", f"regions{ext}", filt)
        if path:
            try:
                fn(path)
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
        """Stop the timer and workers and let no late result touch the viewer."""
        self._closed = True
        self._active = False
        self._request += 1
        try:
            self._timer.stop()
        except RuntimeError:  # already deleted with the widget
            pass
        self._cancel.set()
        for w in (self._heat_worker, self._region_worker):
            if w is not None:
                w.quit()
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
