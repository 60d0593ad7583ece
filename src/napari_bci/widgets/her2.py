"""The "HER2" dock widget: ASCO/CAP scoring of an IHC layer (visible region, drawn regions or
the whole image), a per-tile score map, per-cell overlay, a per-region table with a one-page
report export, and the learned level from H&E."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QTableWidget,
    QTableWidgetItem,
    QVBoxLayout,
    QWidget,
)

from ..her2.report import TABLE, report_rows, virtual_ihc_caveat
from ..her2.scoring import CLASSES, LEVELS, HER2Result, display_text
from ..her2.tiles import LEGEND, LEVEL_COLOURS
from ..io import layers as L
from ._layers import levels, rgb_layers, update_layer, visible_box
from ._models import CHECKPOINT_ITEM, ask_checkpoint, model_spec, select_checkpoint
from ._worker import Jobs

SCOPES = ("Visible region", "Drawn regions", "Whole image")
CELLS_LAYER = "HER2 cells"
OUTLINES_LAYER = "HER2 cell outlines"
#: Largest outline image (analysis pixels) shown for drawn / visible regions.
MAX_OUTLINE_PX = 4096 * 4096
LEARNED_LAYER = "HER2 (learned from H&E)"
#: Cell colours per membrane class (none, faint, weak-moderate, intense): cyan, then DAB browns
#: from light to dark, so they never read as the level map's blue/yellow/orange/red.
CLASS_COLOURS = (
    (0.0, 0.85, 0.85, 1.0), (0.93, 0.80, 0.58, 1.0), (0.72, 0.45, 0.20, 1.0), (0.38, 0.16, 0.04, 1.0)
)
#: Detected cells not counted as tumour cells (lymphocytes, stroma, isolated cells).
REJECTED_COLOUR = (0.6, 0.6, 0.6, 0.8)
#: Longest side (px) of the image in an exported report.
REPORT_PX = 1400
#: The cell overlay shows when a screen pixel covers at most this many image pixels.
MAX_PX_PER_SCREEN_PX = 4.0
MAP_OPACITY, MAP_OPACITY_ZOOMED_IN = 0.6, 0.15


def _mpp(layer) -> float:
    m = (layer.metadata or {}).get("mpp")
    return float(m) if m else 0.5


def _label_colormap():
    from napari.utils.colormaps import DirectLabelColormap

    cd = {k: np.asarray(v, float) for k, v in LEVEL_COLOURS.items()}
    cd[None] = np.zeros(4)
    return DirectLabelColormap(color_dict=cd)


class HER2Widget(QWidget):
    """Score HER2 on an IHC layer; results in :attr:`result` / :attr:`region_results`."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.result: HER2Result | None = None
        self.region_results: dict[str, HER2Result] = {}
        #: rule-based vs learned level (``napari_bci.her2.learned.compare``), when computed
        self.learned: dict | None = None
        self.caveat: str | None = None  # set when the scored layer is a virtual IHC
        self._worker = None
        self._jobs = Jobs(self)

        self.ihc_combo = QComboBox()
        self.he_combo = QComboBox()
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(SCOPES)
        self.learned_check = QCheckBox("learned level from H&&E")
        self.learned_check.setChecked(True)
        self.learned_check.setToolTip("Also predict the level from the H&E with a generator's HER2 head, "
                                      "shown beside the rule-based score")
        self.level_combo = QComboBox()
        self.level_combo.setToolTip("The model whose HER2 head predicts the level: the built-in one (synthetic "
                                    "tissue only) or a level-aware checkpoint such as BCIStainer")
        from ..models.registry import available

        for m in available():
            if m.get("available", True) and m.get("predicts_her2"):
                self.level_combo.addItem(m["name"])
        self.level_combo.addItem(CHECKPOINT_ITEM)
        self.estimate_check = QCheckBox("estimate stain vectors per image (Macenko)")
        self.score_btn = QPushButton("Score")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.progress = QProgressBar()
        self.progress.setVisible(False)
        self.explanation = QLabel("Choose an IHC layer and press Score.")
        self.explanation.setWordWrap(True)
        self.explanation.setTextInteractionFlags(Qt.TextSelectableByMouse)
        self.details = QLabel("")
        self.details.setWordWrap(True)
        self.table = QTableWidget(0, len(TABLE))
        self.table.setHorizontalHeaderLabels([h for h, _ in TABLE])
        self.table.setEditTriggers(QTableWidget.NoEditTriggers)
        self.table.setMinimumHeight(90)
        self.export_btn = QPushButton("Export report (CSV + PNG)...")
        self.export_btn.setEnabled(False)
        self._scored = None  # (layer, scope) of the shown results

        form = QFormLayout()
        form.addRow("IHC layer", self.ihc_combo)
        form.addRow("H&&E layer", self.he_combo)
        form.addRow("Score", self.scope_combo)
        form.addRow("Level model", self.level_combo)
        buttons = QHBoxLayout()
        buttons.addWidget(self.score_btn)
        buttons.addWidget(self.cancel_btn)
        legend = QHBoxLayout()
        legend.addWidget(QLabel("Map:"))
        for name, rgba in LEGEND.items():
            sw = QLabel(f" {name} ")
            r, g, b, _ = (int(255 * c) for c in rgba)
            sw.setStyleSheet(f"background-color: rgb({r},{g},{b}); color: black; padding: 2px;")
            legend.addWidget(sw)
        legend.addStretch()
        cells_legend = QHBoxLayout()
        cells_legend.addWidget(QLabel("Cells:"))
        for name, rgba in zip(CLASSES + ("not tumour",), CLASS_COLOURS + (REJECTED_COLOUR,)):
            sw = QLabel(f" {name.replace('_', '-')} ")
            r, g, b, _ = (int(255 * c) for c in rgba)
            sw.setStyleSheet(f"background-color: rgb({r},{g},{b}); color: black; padding: 2px;")
            cells_legend.addWidget(sw)
        cells_legend.addStretch()

        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.learned_check)
        lay.addWidget(self.estimate_check)
        lay.addLayout(buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.explanation)
        lay.addWidget(self.details)
        lay.addWidget(self.table)
        lay.addWidget(self.export_btn)
        lay.addLayout(legend)
        lay.addLayout(cells_legend)
        lay.addStretch()

        self.score_btn.clicked.connect(self.run)
        self.level_combo.activated.connect(self._on_level_activated)
        self.cancel_btn.clicked.connect(self.cancel)
        self.export_btn.clicked.connect(self._export_clicked)
        viewer.layers.events.inserted.connect(self._refresh_layers)
        viewer.layers.events.removed.connect(self._refresh_layers)
        viewer.scene.camera.events.zoom.connect(self._update_cell_visibility)
        self._refresh_layers()

    # -- layer choices -------------------------------------------------------------------------
    def _refresh_layers(self, event=None):
        rgb = [ly.name for ly in rgb_layers(self.viewer)]
        for combo, prefer in ((self.ihc_combo, self._prefer_ihc), (self.he_combo, self._prefer_he)):
            cur = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            if combo is self.he_combo:
                combo.addItem("(none)")
            combo.addItems(rgb)
            pick = cur if cur in rgb else prefer(rgb)
            if pick:
                combo.setCurrentText(pick)
            combo.blockSignals(False)

    @staticmethod
    def _prefer_ihc(names):
        for n in names:
            if n.startswith("IHC (generated"):
                return n
        return L.IHC_TRUTH if L.IHC_TRUTH in names else (names[0] if names else None)

    @staticmethod
    def _prefer_he(names):
        return L.HE if L.HE in names else "(none)"

    def _layer(self, name):
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    # -- geometry ------------------------------------------------------------------------------
    def visible_polygon(self, layer) -> np.ndarray:
        """The visible area as an (x, y) level-0 polygon of ``layer``, from the camera and canvas."""
        y0, y1, x0, x1 = visible_box(self.viewer)
        pts = []
        for wy, wx in ((y0, x0), (y0, x1), (y1, x1), (y1, x0)):
            world = list(self.viewer.dims.point)
            world[-2:] = [wy, wx]
            d = np.asarray(layer.world_to_data(world))[-2:]
            pts.append((d[1], d[0]))
        poly = np.asarray(pts, float)
        H, W = levels(layer)[0].shape[:2]
        poly[:, 0] = np.clip(poly[:, 0], 0, W)
        poly[:, 1] = np.clip(poly[:, 1], 0, H)
        return poly

    def drawn_polygons(self, layer) -> list[tuple[str, np.ndarray]]:
        """Shapes of the ``Regions`` layer as (name, (x, y) level-0 polygon of ``layer``)."""
        shapes = self._layer(L.REGIONS)
        if shapes is None:
            return []
        names = None
        feats = getattr(shapes, "features", None)
        if feats is not None and "name" in getattr(feats, "columns", []):
            names = list(feats["name"])
        out = []
        for i, (verts, kind) in enumerate(zip(shapes.data, shapes.shape_type)):
            v = np.asarray(verts, float)[:, -2:]
            if kind == "ellipse":
                c, r = v.mean(0), (v.max(0) - v.min(0)) / 2
                t = np.linspace(0, 2 * np.pi, 64, endpoint=False)
                v = np.stack([c[0] + r[0] * np.sin(t), c[1] + r[1] * np.cos(t)], 1)
            if kind in ("line", "path") or len(v) < 3:
                continue
            world = [shapes.data_to_world(np.r_[[0] * (shapes.ndim - 2), p]) for p in v]
            data = np.asarray([np.asarray(layer.world_to_data(np.r_[[0] * (layer.ndim - 2), w[-2:]]))[-2:]
                               for w in world])
            name = str(names[i]) if names is not None and names[i] not in (None, "") else f"region {i + 1}"
            out.append((name, data[:, ::-1]))
        return out

    # -- running -------------------------------------------------------------------------------
    def run(self, scope: str | None = None):
        """Start scoring (``scope``: one of :data:`SCOPES`, default the combo's) in a worker."""
        from napari.utils.notifications import show_error, show_warning

        if self._worker is not None:
            show_warning("HER2: scoring already running")
            return None
        scope = scope or self.scope_combo.currentText()
        layer = self._layer(self.ihc_combo.currentText())
        if layer is None:
            show_error("HER2: no RGB IHC layer to score")
            return None
        lv, mpp = levels(layer), _mpp(layer)
        if not (layer.metadata or {}).get("mpp"):
            show_warning(f"HER2: {layer.name} has no pixel size; assuming {mpp} um/px (set it in the Slides widget)")
        he = self._layer(self.he_combo.currentText())
        he_levels = levels(he) if (he is not None and self.learned_check.isChecked()) else None
        he_mpp = _mpp(he) if he is not None else None
        model_name = self.model_name
        kw = {"estimate_stains": self.estimate_check.isChecked()}
        if scope == "Drawn regions":
            regions = self.drawn_polygons(layer)
            if not regions:
                show_warning(f"HER2: draw polygons or rectangles in a Shapes layer named '{L.REGIONS}' first")
                return None
        elif scope == "Visible region":
            regions = [("visible region", self.visible_polygon(layer))]
        else:
            regions = None

        self.score_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setVisible(True)
        self.progress.setValue(0)
        self.explanation.setText(f"Scoring ({scope.lower()}) ...")
        self._worker = self._jobs.start(
            _compute, lv, mpp, regions, he_levels, he_mpp, model_name, **kw,
            on_item=self._on_progress, on_done=lambda res: self._on_done(res, layer, scope),
            on_error=lambda e: show_error(f"HER2: {type(e).__name__}: {e}"), on_finished=self._on_finished)
        return self._worker

    def _on_level_activated(self, *_):
        if self.level_combo.currentText() == CHECKPOINT_ITEM and not ask_checkpoint(
                self, self.level_combo, "Level-aware checkpoint"):
            self.level_combo.setCurrentIndex(0)

    @property
    def model_name(self) -> str:
        """The generator whose HER2 head gives the learned level (registry name or checkpoint path)."""
        return model_spec(self.level_combo)

    @model_name.setter
    def model_name(self, spec) -> None:
        self.set_level_model(spec)

    def set_level_model(self, spec) -> None:
        """The learned level's model: a registry name or a checkpoint path (listed by file name;
        a BCIStainer checkpoint finds its training YAML beside it)."""
        spec = str(spec)
        if self.level_combo.findText(spec) >= 0 and spec != CHECKPOINT_ITEM:
            self.level_combo.setCurrentText(spec)
        else:
            select_checkpoint(self.level_combo, spec)

    def cancel(self):
        if self._worker is not None:
            self._worker.quit()
            self.explanation.setText("Cancelled.")

    def is_idle(self) -> bool:
        return self._worker is None

    def _on_progress(self, v):
        done, total = v
        self.progress.setMaximum(max(total, 1))
        self.progress.setValue(done)

    def _on_finished(self):
        self._worker = None
        self.score_btn.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        self.progress.setVisible(False)

    def _on_done(self, out, layer, scope):
        from napari.utils.notifications import show_error, show_warning

        if out is None:
            return
        if out.get("refused"):  # an H&E (or grayscale) image chosen as the IHC
            show_error(f"HER2: {layer.name}: {out['refused']}")
            self.explanation.setText(f"Refused: {layer.name}: {out['refused']}")
            return
        self.result = out["overall"]
        self.region_results = out["regions"]
        self.learned = out.get("compare")
        self._scored = (layer, scope)
        head = self.result.explanation
        if self.result.rule:
            head += f" [ASCO/CAP {self.result.rule}]"
        lines = [head]
        if scope == "Drawn regions":
            lines = [f"{name}: {r.explanation}" for name, r in self.region_results.items()]
        cmp = out.get("compare")
        if cmp:
            lines.append(cmp["text"])
        self.caveat = virtual_ihc_caveat(layer.metadata)
        if self.caveat:
            lines.append(self.caveat)
        if self.result.warnings:
            show_warning(f"HER2: {self.result.warning}")
            lines += [f"Warning: {w}" for w in self.result.warnings]
        self.explanation.setText("\n".join(lines))
        fr = self.result.fractions
        self.details.setText(
            f"{display_text(self.result)}: {self.result.cells} tumour cells of {len(self.result.centroid)} "
            "detected; " + ", ".join(f"{k.replace('_', '-')} {fr[k]:.0%}" for k in CLASSES)
            + f"; complete {fr['complete']:.0%}; H-score {self.result.h_score:.0f}; "
            f"pattern {self.result.pattern.get('pattern', 'none')} (at {self.result.mpp:.2g} um/px)"
        )
        self._fill_table()
        self.export_btn.setEnabled(True)
        if out.get("map") is not None:
            self._show_map(out["map"].labels, out["map"].tile, layer, L.HER2, her2=self.result.her2)
        if out.get("learned_map") is not None:
            lm = out["learned_map"]
            self._show_map(lm.labels, lm.tile, layer, LEARNED_LAYER, visible=False)
        self._show_cells(self.result, layer)
        self._show_outlines(out.get("outlines"), layer)

    # -- layers --------------------------------------------------------------------------------
    def _show_map(self, labels, tile, layer, name, visible=True, her2=None):
        s = np.asarray(layer.scale[-2:], float)
        t = np.asarray(layer.translate[-2:], float)
        scale = s * tile
        translate = t + (tile / 2 - 0.5) * s
        if name in self.viewer.layers:
            ly = self.viewer.layers[name]
            ly.data = labels
            update_layer(ly, scale=scale, translate=translate)
            ly.metadata["her2"] = her2
        else:
            self.viewer.add_labels(labels, name=name, scale=scale, translate=translate, opacity=MAP_OPACITY,
                                   units=tuple(layer.units[-2:]),
                                   colormap=_label_colormap(), visible=visible,
                                   metadata={"role": "her2", "tile": int(tile), "levels": list(LEVELS),
                                             "her2": her2})

    # -- table and report ----------------------------------------------------------------------
    def table_results(self) -> dict[str, HER2Result]:
        """The rows of the table: each drawn region, else the one scored area."""
        if self._scored and self._scored[1] == "Drawn regions":
            return dict(self.region_results)
        name = self._scored[1].lower() if self._scored else "image"
        return {name: self.result} if self.result is not None else {}

    def _fill_table(self):
        rows = report_rows(self.table_results())
        self.table.setRowCount(len(rows))
        for i, row in enumerate(rows):
            for j, (_, key) in enumerate(TABLE):
                v = row[key]
                self.table.setItem(i, j, QTableWidgetItem(f"{v:g}" if isinstance(v, float) else str(v)))
        self.table.resizeColumnsToContents()

    def _export_clicked(self):
        path, _ = QFileDialog.getSaveFileName(self, "Export HER2 report", "her2_report.png",
                                              "PNG report + CSV table (*.png)")
        if path:
            self.export_report(path)

    def export_report(self, path):
        """Write ``<path>.csv`` (the table) and ``<path>.png`` (overlay + table) for the shown
        results; returns both paths (None, with a notification, on failure)."""
        from napari.utils.notifications import show_error, show_info

        from ..her2.report import write_report
        from ..her2.tiles import read_rgb

        results = self.table_results()
        if not results or self._scored is None:
            show_error("HER2: nothing scored to export")
            return None
        layer, scope = self._scored
        lv = levels(layer)
        H, W = lv[0].shape[:2]
        cen = np.concatenate([r.centroid for r in results.values()])
        if scope == "Whole image" or len(cen) == 0:
            x0, y0, x1, y1 = 0, 0, W, H
        else:
            pad = 20 / _mpp(layer)
            x0, y0 = np.maximum(np.floor(cen.min(0) - pad), 0).astype(int)
            x1, y1 = np.minimum(np.ceil(cen.max(0) + pad), [W, H]).astype(int)
        li = 0
        for i, a in enumerate(lv):  # the finest level at which the box fits REPORT_PX
            if max(x1 - x0, y1 - y0) * a.shape[0] / H <= REPORT_PX:
                li = i
                break
        else:
            li = len(lv) - 1
        ds = H / lv[li].shape[0]
        rgb = read_rgb(lv[li], int(x0 / ds), int(y0 / ds), int(np.ceil(x1 / ds)), int(np.ceil(y1 / ds)))
        step = max(1, int(np.ceil(max(rgb.shape[:2]) / REPORT_PX)))
        rgb = rgb[::step, ::step]
        notes = ([self.learned["text"]] if self.learned else []) + ([self.caveat] if self.caveat else [])
        try:
            out = write_report(path, rgb, results, title=f"HER2 report: {layer.name} ({scope.lower()})",
                               offset_xy=(int(x0 / ds) * ds, int(y0 / ds) * ds), downsample=ds * step,
                               notes=notes)
        except (OSError, ValueError) as e:
            show_error(f"HER2: export failed: {e}")
            return None
        show_info(f"HER2: report written to {out[0]} and {out[1]}")
        return out

    def _show_cells(self, res: HER2Result, layer):
        pts = res.centroid[:, ::-1] if len(res.centroid) else np.zeros((0, 2))
        colours = np.asarray([CLASS_COLOURS[c] if t else REJECTED_COLOUR
                              for c, t in zip(res.cell_class, res.tumour)]).reshape(-1, 4)
        size = max(3.5 / max(_mpp(layer), 1e-3), 3.0)  # ~3.5 um, smaller than a nucleus
        feats = {"class": [CLASSES[c] if t else "not tumour" for c, t in zip(res.cell_class, res.tumour)],
                 "tumour": np.asarray(res.tumour, bool),
                 "completeness": np.round(res.completeness, 2)}
        if CELLS_LAYER in self.viewer.layers:
            self.viewer.layers.remove(CELLS_LAYER)
        self.viewer.add_points(pts, name=CELLS_LAYER, face_color=colours if len(pts) else "white",
                               border_width=0, size=size, scale=layer.scale[-2:],
                               translate=layer.translate[-2:],
                               units=tuple(layer.units[-2:]),
                               features=feats, opacity=0.75)
        self._cells_px = 1.0
        self._update_cell_visibility()

    def _show_outlines(self, outlines, layer):
        """The cell outlines :func:`outline_canvas` composed in the worker, as one Labels layer in
        contour mode (removed when there are none)."""
        from napari.utils.colormaps import DirectLabelColormap

        if OUTLINES_LAYER in self.viewer.layers:
            self.viewer.layers.remove(OUTLINES_LAYER)
        if outlines is None:
            return
        canvas, colours, ds, lo = outlines
        s = np.asarray(layer.scale[-2:], float)
        t = np.asarray(layer.translate[-2:], float)
        self.viewer.add_labels(canvas, name=OUTLINES_LAYER, scale=s * ds, translate=t + lo[::-1] * ds * s,
                               units=tuple(layer.units[-2:]), colormap=DirectLabelColormap(color_dict=colours),
                               opacity=0.9, metadata={"role": "her2-outlines"})
        self.viewer.layers[OUTLINES_LAYER].contour = 1

    def _update_cell_visibility(self, event=None):
        if CELLS_LAYER not in self.viewer.layers:
            return
        ly = self.viewer.layers[CELLS_LAYER]
        px_per_screen = 1.0 / max(self.viewer.scene.camera.zoom * float(ly.scale[-1]), 1e-9)
        zoomed_in = px_per_screen <= MAX_PX_PER_SCREEN_PX
        update_layer(ly, visible=zoomed_in)
        if L.HER2 in self.viewer.layers:  # the tile map recedes while cells are shown
            update_layer(self.viewer.layers[L.HER2], opacity=MAP_OPACITY_ZOOMED_IN if zoomed_in else MAP_OPACITY)

    def hideEvent(self, event):  # stop work when the dock is hidden or closed
        self.cancel()
        super().hideEvent(event)


def outline_canvas(results: list[HER2Result]):
    """``(labels, colours, downsample, origin)`` of the cell outlines of region results (tumour
    cells in their class colour, rejected cells grey), or None when there are none or too many
    pixels; composed in the worker, so the result's arrival only adds the layer."""
    parts = [r for r in results if r.label_image is not None and len(r.label_ids)]
    if not parts or len({r.label_downsample for r in parts}) != 1:
        return None
    ds = parts[0].label_downsample
    lo = np.min([np.asarray(r.label_origin) / ds for r in parts], 0).astype(int)
    hi = np.max([np.asarray(r.label_origin) / ds + r.label_image.shape[::-1] for r in parts], 0).astype(int)
    w, h = hi - lo
    if w * h > MAX_OUTLINE_PX:
        return None
    canvas = np.zeros((h, w), np.int32)
    colours = {None: np.zeros(4), 0: np.zeros(4)}
    base = 0
    for r in parts:
        keep = np.zeros(int(r.label_image.max()) + 1, np.int32)
        keep[r.label_ids] = base + np.arange(1, len(r.label_ids) + 1, dtype=np.int32)
        x0, y0 = (np.asarray(r.label_origin) / ds).astype(int) - lo
        sub = keep[r.label_image]
        view = canvas[y0:y0 + sub.shape[0], x0:x0 + sub.shape[1]]
        np.copyto(view, sub, where=sub > 0)
        for j, (c, t) in enumerate(zip(r.cell_class, r.tumour)):
            colours[base + j + 1] = np.asarray(CLASS_COLOURS[c] if t else REJECTED_COLOUR, float)
        base += len(r.label_ids)
    return canvas, colours, ds, lo


def _compute(levels, mpp, regions, he_levels=None, he_mpp=None, model_name="builtin", **kw):
    """Worker body (generator: yields (done, total)). Returns a dict with ``overall``
    (HER2Result), ``regions`` {name: HER2Result}, ``map`` (ScoreMap or None), ``learned_map``
    (LevelMap or None) and ``compare`` (rule vs learned, or None). ``kw`` goes to the scorer."""
    from ..her2.learned import compare, disagreement, iter_predict_map, level_model, predict_polygon
    from ..her2.tiles import choose_level, image_context, iter_score_map, score_polygon

    import pandas  # noqa: F401 - napari imports it for the cells' features (~0.9 s the first time): here, not on the GUI thread

    out = {"regions": {}, "map": None, "learned_map": None, "compare": None, "outlines": None}
    model_bg, colours = image_context(levels, estimate_stains=kw.get("estimate_stains", False))
    if colours is not None:
        return {"refused": colours["reason"]}
    kw["stain_model"] = model_bg
    yield (0, 1)
    if regions is None:
        smap = yield from iter_score_map(levels, mpp, **kw)
        out["map"] = smap
        out["overall"] = smap.overall
    else:
        _, ds, _ = choose_level(levels, mpp)
        for i, (name, poly) in enumerate(regions):
            p = np.asarray(poly, float)
            if np.ptp(p[:, 0]) * np.ptp(p[:, 1]) / ds**2 > 3072**2:
                # a large view: tile by tile over its box (no full-size window in memory)
                x0, y0 = np.floor(p.min(0)).astype(int)
                x1, y1 = np.ceil(p.max(0)).astype(int)
                r = (yield from iter_score_map(levels, mpp, bbox=(x0, y0, x1, y1), **kw)).overall
            else:
                r = score_polygon(levels, p, mpp, keep_labels=True, **kw)
                yield (i + 1, len(regions))
            out["regions"][name] = r
        out["overall"] = HER2Result.merge(list(out["regions"].values()))
    if he_levels is not None:
        model = level_model(model_name)
        if model is not None:
            if regions is None:
                lm = yield from iter_predict_map(he_levels, he_mpp or mpp, model)
                out["learned_map"] = lm
                probs = lm.region() if lm is not None else None
            else:
                ps = [predict_polygon(he_levels, poly, he_mpp or mpp, model) for _, poly in regions]
                ps = [q for q in ps if q is not None]
                probs = np.mean(ps, 0) if ps else None
            out["compare"] = compare(out["overall"], probs)
            lm = out["learned_map"]
            if lm is not None and lm.labels.shape == out["map"].labels.shape:
                both = (out["map"].labels > 0) & (out["map"].labels <= 4) & (lm.labels > 0)
                dis = int(disagreement(out["map"].labels, lm.labels).sum())
                out["compare"]["tiles_disagree"] = dis
                out["compare"]["text"] += f"; tiles: {dis} of {int(both.sum())} differ"
        else:
            out["compare"] = compare(out["overall"], None)
            out["compare"]["text"] = (f"rule-based {out['compare']['rule_display']}; no learned level: "
                                      f"{Path(str(model_name)).name} has no HER2 head or could not be loaded "
                                      "(use the built-in model or a level-aware checkpoint such as BCIStainer)")
    out["outlines"] = outline_canvas(list(out["regions"].values()))
    return out
