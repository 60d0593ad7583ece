"""The "HER2" dock widget: ASCO/CAP scoring of an IHC layer (visible region, drawn regions or
the whole image), a per-tile score map, per-cell overlay, and the learned level from H&E."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import Qt
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..her2.scoring import CLASSES, LEVELS, HER2Result
from ..her2.tiles import LEGEND, LEVEL_COLOURS
from ..io import layers as L
from ._layers import levels, rgb_layers

SCOPES = ("Visible region", "Drawn regions", "Whole image")
CELLS_LAYER = "HER2 cells"
LEARNED_LAYER = "HER2 (learned from H&E)"
#: Points colours per membrane class (none, faint, weak-moderate, intense).
CLASS_COLOURS = (
    (0.35, 0.55, 0.95, 1.0), (1.0, 0.95, 0.3, 1.0), (1.0, 0.55, 0.1, 1.0), (0.85, 0.05, 0.05, 1.0)
)
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
        #: generator whose HER2 head gives the learned level (registry name or checkpoint path)
        self.model_name = "builtin"
        self._worker = None

        self.ihc_combo = QComboBox()
        self.he_combo = QComboBox()
        self.scope_combo = QComboBox()
        self.scope_combo.addItems(SCOPES)
        self.learned_check = QCheckBox("learned level from H&&E (built-in model)")
        self.learned_check.setChecked(True)
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

        form = QFormLayout()
        form.addRow("IHC layer", self.ihc_combo)
        form.addRow("H&&E layer", self.he_combo)
        form.addRow("Score", self.scope_combo)
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
        for name, rgba in zip(CLASSES, CLASS_COLOURS):
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
        lay.addLayout(legend)
        lay.addLayout(cells_legend)
        lay.addStretch()

        self.score_btn.clicked.connect(self.run)
        self.cancel_btn.clicked.connect(self.cancel)
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
        cam = self.viewer.scene.camera
        cy, cx = cam.center[-2:]
        h, w = self.viewer.canvas.size
        hy, hx = h / 2 / cam.zoom, w / 2 / cam.zoom
        pts = []
        for wy, wx in ((cy - hy, cx - hx), (cy - hy, cx + hx), (cy + hy, cx + hx), (cy + hy, cx - hx)):
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
        from napari.qt.threading import thread_worker
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

        @thread_worker(progress=True)
        def work():
            return (yield from _compute(lv, mpp, regions, he_levels, he_mpp, model_name, **kw))

        w = work()
        w.yielded.connect(self._on_progress)
        w.returned.connect(lambda res: self._on_done(res, layer, scope))
        w.errored.connect(lambda e: show_error(f"HER2: {type(e).__name__}: {e}"))
        w.finished.connect(self._on_finished)
        self._worker = w
        self.score_btn.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setVisible(True)
        self.progress.setValue(0)
        self.explanation.setText(f"Scoring ({scope.lower()}) ...")
        w.start()
        return w

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
        if out is None:
            return
        self.result = out["overall"]
        self.region_results = out["regions"]
        self.learned = out.get("compare")
        lines = [self.result.explanation]
        if scope == "Drawn regions":
            lines = [f"{name}: {r.explanation}" for name, r in self.region_results.items()]
        cmp = out.get("compare")
        if cmp:
            lines.append(cmp["text"])
        if self.result.warning:
            from napari.utils.notifications import show_warning

            show_warning(f"HER2: {self.result.warning}")
            lines.append(f"Warning: {self.result.warning}")
        self.explanation.setText("\n".join(lines))
        fr = self.result.fractions
        self.details.setText(
            f"{self.result.cells} tumour cells of {len(self.result.centroid)} detected; "
            + ", ".join(f"{k.replace('_', '-')} {fr[k]:.0%}" for k in CLASSES)
            + f"; complete {fr['complete']:.0%} (at {self.result.mpp:.2g} um/px)"
        )
        if out.get("map") is not None:
            self._show_map(out["map"].labels, out["map"].tile, layer, L.HER2, her2=self.result.her2)
        if out.get("learned_map") is not None:
            lm = out["learned_map"]
            self._show_map(lm.labels, lm.tile, layer, LEARNED_LAYER, visible=False)
        self._show_cells(self.result, layer)

    # -- layers --------------------------------------------------------------------------------
    def _show_map(self, labels, tile, layer, name, visible=True, her2=None):
        s = np.asarray(layer.scale[-2:], float)
        t = np.asarray(layer.translate[-2:], float)
        scale = s * tile
        translate = t + (tile / 2 - 0.5) * s
        if name in self.viewer.layers:
            ly = self.viewer.layers[name]
            ly.data = labels
            ly.scale, ly.translate = scale, translate
            ly.metadata["her2"] = her2
        else:
            self.viewer.add_labels(labels, name=name, scale=scale, translate=translate, opacity=MAP_OPACITY,
                                   units=tuple(layer.units[-2:]),
                                   colormap=_label_colormap(), visible=visible,
                                   metadata={"role": "her2", "tile": int(tile), "levels": list(LEVELS),
                                             "her2": her2})

    def _show_cells(self, res: HER2Result, layer):
        keep = res.tumour
        pts = res.centroid[keep][:, ::-1] if len(res.centroid) else np.zeros((0, 2))
        colours = np.asarray([CLASS_COLOURS[c] for c in res.cell_class[keep]]).reshape(-1, 4)
        size = max(3.5 / max(_mpp(layer), 1e-3), 3.0)  # ~3.5 um, smaller than a nucleus
        feats = {"class": [CLASSES[c] for c in res.cell_class[keep]],
                 "completeness": np.round(res.completeness[keep], 2)}
        if CELLS_LAYER in self.viewer.layers:
            self.viewer.layers.remove(CELLS_LAYER)
        self.viewer.add_points(pts, name=CELLS_LAYER, face_color=colours if len(pts) else "white",
                               border_width=0, size=size, scale=layer.scale[-2:],
                               translate=layer.translate[-2:],
                               units=tuple(layer.units[-2:]),
                               features=feats, opacity=0.75)
        self._cells_px = 1.0
        self._update_cell_visibility()

    def _update_cell_visibility(self, event=None):
        if CELLS_LAYER not in self.viewer.layers:
            return
        ly = self.viewer.layers[CELLS_LAYER]
        px_per_screen = 1.0 / max(self.viewer.scene.camera.zoom * float(ly.scale[-1]), 1e-9)
        ly.visible = zoomed_in = px_per_screen <= MAX_PX_PER_SCREEN_PX
        if L.HER2 in self.viewer.layers:  # the tile map recedes while cells are shown
            self.viewer.layers[L.HER2].opacity = MAP_OPACITY_ZOOMED_IN if zoomed_in else MAP_OPACITY

    def hideEvent(self, event):  # stop work when the dock is hidden or closed
        self.cancel()
        super().hideEvent(event)


def _compute(levels, mpp, regions, he_levels=None, he_mpp=None, model_name="builtin", **kw):
    """Worker body (generator: yields (done, total)). Returns a dict with ``overall``
    (HER2Result), ``regions`` {name: HER2Result}, ``map`` (ScoreMap or None), ``learned_map``
    (LevelMap or None) and ``compare`` (rule vs learned, or None). ``kw`` goes to the scorer."""
    from ..her2.learned import compare, disagreement, iter_predict_map, level_model, predict_polygon
    from ..her2.tiles import choose_level, iter_score_map, score_polygon

    out = {"regions": {}, "map": None, "learned_map": None, "compare": None}
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
                r = score_polygon(levels, p, mpp, **kw)
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
                both = (out["map"].labels > 0) & (lm.labels > 0)
                dis = int(disagreement(out["map"].labels, lm.labels).sum())
                out["compare"]["tiles_disagree"] = dis
                out["compare"]["text"] += f"; tiles: {dis} of {int(both.sum())} differ"
        else:
            out["compare"] = compare(out["overall"], None)
    return out
