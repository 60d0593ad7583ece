"""The "Register" dock widget: align an H&E (moving) layer onto an IHC (fixed) layer from paired
landmarks, automatically, or deformably; show the warped H&E and the quality figures; judge the
alignment with a blend, a swipe, a checkerboard (squares in micrometres) or a hematoxylin
difference computed for the view; carry drawn regions between the two sections."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from qtpy.QtCore import QObject, Qt, QTimer, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QDoubleSpinBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QSlider,
    QVBoxLayout,
    QWidget,
)

from ..io import layers as L
from ..metrics.compare import CHECK_VIEWS, CheckResult, compute_check
from ._layers import layer_geom, levels, rgb_layers, update_layer, view_window
from ._worker import Jobs

WARPED = L.HE_REGISTERED
CHECK = "Registration check"
VIEWS = ("Overlay",) + CHECK_VIEWS
#: the check views are computed for the visible region, at most this many px a side
CHECK_MAX_SIDE = 2048
DEBOUNCE_MS = 200
#: Landmark colours by pair number (cycled), the same in both Points layers.
PALETTE = np.array([
    (0.90, 0.10, 0.10, 1), (0.10, 0.60, 0.95, 1), (0.10, 0.80, 0.20, 1), (1.00, 0.60, 0.00, 1),
    (0.70, 0.20, 0.90, 1), (0.00, 0.80, 0.80, 1), (1.00, 0.90, 0.10, 1), (0.95, 0.35, 0.70, 1),
])


def _rgb_layers(viewer):
    return [ly for ly in rgb_layers(viewer) if ly.name not in (WARPED, CHECK)]


class _Failed:
    def __init__(self, error: BaseException):
        self.error = error


class _Relay(QObject):
    """Carries progress from the worker thread to the main thread (queued signal)."""

    progress = Signal(str, float)


class RegisterWidget(QWidget):
    """Register the moving (H&E) layer onto the fixed (IHC) layer; the result is in
    :attr:`transform` (moving -> fixed, level-0 px) and :attr:`report`."""

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.transform = None
        self.report: dict = {}
        self._worker = None
        self._cancel = False
        self._checks = Jobs(self)
        self._check_pending = False
        self.check_result: CheckResult | None = None
        self._watched: set[int] = set()
        self._relay = _Relay()
        self._relay.progress.connect(self._on_progress)

        self.fixed_combo = QComboBox()
        self.moving_combo = QComboBox()
        self.model_combo = QComboBox()
        self.model_combo.addItems(["projective", "affine", "similarity", "rigid"])
        self.ransac_check = QCheckBox("RANSAC (drop outlier pairs)")
        self.engine_combo = QComboBox()
        self.engine_combo.addItems(["flow"])
        from ..registration.deformable import elastix_available

        if elastix_available():
            self.engine_combo.addItem("elastix")
        self.view_combo = QComboBox()
        self.view_combo.addItems(VIEWS)
        self.view_combo.setToolTip("Overlay: the registered H&E over the IHC; Swipe: H&E left of the cut, IHC "
                                   "right; Checkerboard: alternating squares; Difference: hematoxylin difference "
                                   "(dark = agree). Computed for the view.")
        self.mix_slider = QSlider(Qt.Horizontal)
        self.mix_slider.setRange(0, 100)
        self.mix_slider.setValue(50)
        self.mix_slider.setToolTip("Overlay: opacity of the registered H&E; Swipe: where the cut is (% of the view)")
        self.cell_spin = QDoubleSpinBox()
        self.cell_spin.setRange(1.0, 10000.0)
        self.cell_spin.setDecimals(0)
        self.cell_spin.setValue(100.0)
        self.cell_spin.setSuffix(" µm")
        self.cell_spin.setToolTip("Side of a checkerboard square in micrometres (level-0 pixels when the IHC's "
                                  "pixel size is unknown)")
        self.transfer_combo = QComboBox()
        self.transfer_combo.setToolTip("A Shapes layer to carry through the transform")
        self.to_ihc_btn = QPushButton("H&&E → IHC")
        self.to_ihc_btn.setToolTip("Copy the chosen shapes, drawn on the unregistered H&E, onto the IHC")
        self.to_he_btn = QPushButton("IHC → H&&E")
        self.to_he_btn.setToolTip("Copy the chosen shapes, drawn on the IHC (or the registered H&E), onto the "
                                  "unregistered H&E")
        self.landmark_btn = QPushButton("Add landmark layers")
        self.landmarks_run = QPushButton("Landmarks")
        self.auto_run = QPushButton("Automatic")
        self.deform_run = QPushButton("Deformable")
        self.cancel_btn = QPushButton("Cancel")
        self.cancel_btn.setEnabled(False)
        self.save_btn = QPushButton("Save transform...")
        self.load_btn = QPushButton("Load transform...")
        self.progress = QProgressBar()
        self.progress.setMaximum(100)
        self.progress.setVisible(False)
        self.status = QLabel(
            "Pick the IHC (fixed) and H&E (moving) layers. Place landmarks in pairs (same number in both "
            "layers), or press Automatic.")
        self.status.setWordWrap(True)
        self.quality = QLabel("")
        self.quality.setWordWrap(True)
        self.quality.setTextInteractionFlags(Qt.TextSelectableByMouse)

        form = QFormLayout()
        form.addRow("Fixed (IHC)", self.fixed_combo)
        form.addRow("Moving (H&&E)", self.moving_combo)  # "&&": a literal &, not a mnemonic
        form.addRow("Landmark model", self.model_combo)
        form.addRow("", self.ransac_check)
        form.addRow("Deformable engine", self.engine_combo)
        form.addRow("Check view", self.view_combo)
        form.addRow("Blend / swipe", self.mix_slider)
        form.addRow("Checker square", self.cell_spin)
        form.addRow("Transfer shapes", self.transfer_combo)
        run = QHBoxLayout()
        for b in (self.landmarks_run, self.auto_run, self.deform_run):
            run.addWidget(b)
        io = QHBoxLayout()
        io.addWidget(self.save_btn)
        io.addWidget(self.load_btn)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addWidget(self.landmark_btn)
        lay.addLayout(run)
        lay.addWidget(self.cancel_btn)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addWidget(self.quality)
        transfer = QHBoxLayout()
        transfer.addWidget(self.to_ihc_btn)
        transfer.addWidget(self.to_he_btn)
        lay.addLayout(transfer)
        lay.addLayout(io)
        lay.addStretch()

        self.landmark_btn.clicked.connect(self.add_landmark_layers)
        self.landmarks_run.clicked.connect(lambda: self.run("landmarks"))
        self.auto_run.clicked.connect(lambda: self.run("auto"))
        self.deform_run.clicked.connect(lambda: self.run("deformable"))
        self.cancel_btn.clicked.connect(self.cancel)
        self.view_combo.currentTextChanged.connect(self.show_view)
        self.mix_slider.valueChanged.connect(self._on_mix)
        self.cell_spin.valueChanged.connect(self.schedule_check)
        self.to_ihc_btn.clicked.connect(lambda: self.transfer_shapes(to_ihc=True))
        self.to_he_btn.clicked.connect(lambda: self.transfer_shapes(to_ihc=False))
        self._timer = QTimer(self)
        self._timer.setSingleShot(True)
        self._timer.setInterval(DEBOUNCE_MS)
        self._timer.timeout.connect(self.update_check)
        cam = viewer.scene.camera
        cam.events.center.connect(self.schedule_check)
        cam.events.zoom.connect(self.schedule_check)
        viewer.canvas.events.size.connect(self.schedule_check)
        self.destroyed.connect(self._disconnect)
        self.save_btn.clicked.connect(self._save_dialog)
        self.load_btn.clicked.connect(self._load_dialog)
        viewer.layers.events.inserted.connect(self._refresh_layers)
        viewer.layers.events.removed.connect(self._refresh_layers)
        self._refresh_layers()

    # -- layers --------------------------------------------------------------------------------
    def _refresh_layers(self, event=None):
        names = [ly.name for ly in _rgb_layers(self.viewer)]
        for combo, prefer in ((self.fixed_combo, (L.IHC_TRUTH, "IHC")), (self.moving_combo, (L.HE, "H&E"))):
            cur = combo.currentText()
            combo.blockSignals(True)
            combo.clear()
            combo.addItems(names)
            pick = cur if cur in names else next((n for n in names if n == prefer[0]), None) or next(
                (n for n in names if prefer[1] in n and not n.startswith("IHC (generated")), None)
            if pick:
                combo.setCurrentText(pick)
            combo.blockSignals(False)
        from napari.layers import Shapes

        shapes = [ly.name for ly in self.viewer.layers if isinstance(ly, Shapes)]
        cur = self.transfer_combo.currentText()
        self.transfer_combo.blockSignals(True)
        self.transfer_combo.clear()
        self.transfer_combo.addItems(shapes)
        if cur in shapes:
            self.transfer_combo.setCurrentText(cur)
        self.transfer_combo.blockSignals(False)
        if event is not None and getattr(event, "type", "") == "inserted":
            self._watch_landmarks()

    def _layer(self, name):
        return self.viewer.layers[name] if name and name in self.viewer.layers else None

    def fixed_layer(self):
        return self._layer(self.fixed_combo.currentText())

    def moving_layer(self):
        return self._layer(self.moving_combo.currentText())

    def add_landmark_layers(self):
        """Create (or keep) the Points layers ``Landmarks H&E`` / ``Landmarks IHC`` on the moving and
        fixed images; pairs are matched by order and share a colour and a number."""
        from napari.utils.notifications import show_warning

        fixed, moving = self.fixed_layer(), self.moving_layer()
        if fixed is None or moving is None:
            show_warning("Register: choose the IHC and H&E layers first")
            return
        for name, img in ((L.LANDMARKS_HE, moving), (L.LANDMARKS_IHC, fixed)):
            if name not in self.viewer.layers:
                size = 0.01 * max(levels(img)[0].shape[:2])
                self.viewer.add_points(
                    np.zeros((0, 2)), name=name, scale=img.scale[-2:], translate=img.translate[-2:],
                    units=tuple(img.units)[-2:],
                    size=max(size, 8), face_color="red", border_color="white", border_width=0.1,
                    features={"n": np.zeros(0, int)},
                    text={"string": "{n}", "size": 12, "color": "white", "anchor": "upper_left"},
                )
        self._watch_landmarks()
        self.viewer.layers.selection.active = self.viewer.layers[L.LANDMARKS_HE]
        self.viewer.layers[L.LANDMARKS_HE].mode = "add"
        self.status.setText("Click a point in the H&E, then the same place in the IHC (switch layer), "
                            "and so on; "
                            "at least 4 pairs.")

    def _watch_landmarks(self):
        for name in (L.LANDMARKS_HE, L.LANDMARKS_IHC):
            ly = self._layer(name)
            if ly is not None and id(ly) not in self._watched:
                ly.events.data.connect(lambda e, ly=ly: self._recolour(ly))
                self._watched.add(id(ly))
                self._recolour(ly)

    @staticmethod
    def _recolour(ly):
        n = len(ly.data)
        if n == 0:
            return
        ly.features = {"n": np.arange(1, n + 1)}
        ly.face_color = PALETTE[np.arange(n) % len(PALETTE)]
        if hasattr(ly, "refresh_text"):
            ly.refresh_text()

    def landmark_pairs(self):
        """(moving (N, 2), fixed (N, 2)) level-0 ``(x, y)`` pairs from the two Points layers, or
        None when either layer is missing; unequal counts keep the first pairs."""
        he, ihc = self._layer(L.LANDMARKS_HE), self._layer(L.LANDMARKS_IHC)
        fixed, moving = self.fixed_layer(), self.moving_layer()
        if he is None or ihc is None or fixed is None or moving is None:
            return None
        m = self._to_image_xy(he, moving)
        f = self._to_image_xy(ihc, fixed)
        n = min(len(m), len(f))
        return m[:n], f[:n]

    @staticmethod
    def _to_image_xy(layer, image, data=None) -> np.ndarray:
        """Level-0 ``(x, y)`` of ``image`` at the vertices ``data`` of ``layer`` (default: all
        of a Points layer's)."""
        d = np.asarray(layer.data if data is None else data, float).reshape(-1, layer.ndim)
        out = []
        for p in d:
            w = layer.data_to_world(p)
            q = np.asarray(image.world_to_data(np.r_[[0] * (image.ndim - 2), np.asarray(w)[-2:]]))[-2:]
            out.append(q[::-1])
        return np.asarray(out, float).reshape(-1, 2)

    @staticmethod
    def _from_image_xy(image, xy: np.ndarray) -> np.ndarray:
        """World ``(y, x)`` of ``image``'s level-0 ``(x, y)`` points."""
        return np.asarray([image.data_to_world(np.r_[[0] * (image.ndim - 2), p]) for p in xy[:, ::-1]])[:, -2:]

    # -- running -------------------------------------------------------------------------------
    def run(self, method: str):
        """Start ``method`` (landmarks / auto / deformable) in a worker; returns the worker."""
        from napari.utils.notifications import show_warning

        if self._worker is not None:
            show_warning("Register: already running")
            return None
        fixed, moving = self.fixed_layer(), self.moving_layer()
        if fixed is None or moving is None or fixed is moving:
            return self._error("choose two different RGB layers: the IHC (fixed) and the H&E (moving)")
        pairs = self.landmark_pairs()
        if pairs is not None and len(pairs[0]) == 0:
            pairs = None
        if method == "landmarks" and (pairs is None or len(pairs[0]) < 4):
            n = 0 if pairs is None else len(pairs[0])
            return self._error(f"{n} landmark pairs; place at least 4 pairs (press 'Add landmark layers')")
        if pairs is not None and len(pairs[0]) < 4:
            pairs = None  # too few for a fit; automatic initialisation instead
        f_levels, m_levels = levels(fixed), levels(moving)
        kw = dict(method=method, landmarks=pairs, model=self.model_combo.currentText(),
                  ransac=self.ransac_check.isChecked(), engine=self.engine_combo.currentText())
        self._cancel = False
        relay = self._relay

        def work():
            from ..registration.api import register

            res = register(f_levels, m_levels, progress=lambda msg, f: relay.progress.emit(msg, f),
                           cancelled=lambda: self._cancel, **kw)
            relay.progress.emit("warping the H&E", 0.98)
            return res, _warped_levels(f_levels, m_levels, res.transform)

        return self._start(work, fixed, method, f"Registering ({method}) ...")

    def _start(self, work, fixed, method: str, status: str):
        """Run ``work() -> (RegistrationResult, warped levels)`` in a worker; its result goes to
        :meth:`_on_done`. Returns the (started) worker."""
        from napari.qt.threading import thread_worker

        @thread_worker
        def job():
            # errors are returned, not raised: napari 0.9's own handler of a worker's `errored`
            # signal fails with a TypeError when a viewer is current
            try:
                return work()
            except Exception as e:  # noqa: BLE001 - reported to the user in _on_done
                return _Failed(e)  # (superqt re-raises a returned exception instance)

        w = job()
        w.returned.connect(lambda out: self._on_done(out, fixed, method))
        w.errored.connect(self._on_error)
        w.finished.connect(self._on_finished)
        self._worker = w
        for b in (self.landmarks_run, self.auto_run, self.deform_run):
            b.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setVisible(True)
        self.progress.setValue(0)
        self.status.setText(status)
        w.start()
        return w

    def _error(self, msg: str):
        from napari.utils.notifications import show_error

        self.status.setText(f"Error: {msg}")
        show_error(f"Register: {msg}")
        return None

    def _on_error(self, e):
        from napari.utils.notifications import show_info

        from ..errors import Cancelled

        if isinstance(e, Cancelled):
            self.status.setText("Cancelled.")
            show_info("Register: cancelled")
            return
        self._error(f"{e}" if hasattr(e, "exit_code") else f"{type(e).__name__}: {e}")
        from ..registration import RegistrationFailed

        if isinstance(e, RegistrationFailed) and e.rule != "tissue":
            # the automatic step found nothing trustworthy: the user's landmarks are the way on
            have = self._layer(L.LANDMARKS_HE) is not None and self._layer(L.LANDMARKS_IHC) is not None
            self.status.setText(
                self.status.text() + "\nNext: " + ("" if have else "press 'Add landmark layers', then ")
                + "click at least 4 structures you can find in both images (the same order in "
                f"'{L.LANDMARKS_IHC}' and '{L.LANDMARKS_HE}') and press 'Landmarks'; 'Deformable' then "
                "refines from them.")
            (self.landmarks_run if have else self.landmark_btn).setFocus()

    def cancel(self):
        if self._worker is not None:
            self._cancel = True
            self.status.setText("Cancelling ...")

    def is_idle(self) -> bool:
        return self._worker is None

    def _on_progress(self, msg: str, frac: float):
        self.progress.setValue(int(round(100 * frac)))
        self.progress.setFormat(f"{msg} %p%")

    def _on_finished(self):
        self._worker = None
        for b in (self.landmarks_run, self.auto_run, self.deform_run):
            b.setEnabled(True)
        self.cancel_btn.setEnabled(False)
        self.progress.setVisible(False)

    def _on_done(self, out, fixed, method):
        if isinstance(out, _Failed):
            return self._on_error(out.error)
        res, warped = out
        self.transform, self.report = res.transform, res.report
        data = warped if len(warped) > 1 else warped[0]
        meta = {"role": "he", "registered_to": fixed.name, "transform": res.transform.to_dict(),
                "mpp": (fixed.metadata or {}).get("mpp"), "levels": [list(w.shape[:2]) for w in warped]}
        if WARPED in self.viewer.layers:
            self.viewer.layers.remove(WARPED)
        self.viewer.add_image(data, name=WARPED, rgb=True, multiscale=len(warped) > 1, scale=fixed.scale[-2:],
                              translate=fixed.translate[-2:], opacity=self.mix_slider.value() / 100, metadata=meta,
                              units=tuple(fixed.units)[-2:])
        self.quality.setText(format_quality(res.report))
        self.status.setText(f"Done ({method}). '{WARPED}' is aligned to '{fixed.name}'.")
        self.show_view(self.view_combo.currentText())

    # -- check views ---------------------------------------------------------------------------
    def show_view(self, view: str | None = None):
        """Overlay (the registered H&E over the IHC, opacity from the slider) or one of
        :data:`CHECK_VIEWS`, computed for the visible region in a worker."""
        view = view or self.view_combo.currentText()
        if WARPED in self.viewer.layers:
            self.viewer.layers[WARPED].visible = view == "Overlay"
        if view == "Overlay":
            self._checks.drop()
            self.check_result = None
            if CHECK in self.viewer.layers:
                self.viewer.layers.remove(CHECK)
            return
        self.update_check(force=True)

    def _on_mix(self, value: int):
        if self.view_combo.currentText() == "Overlay":
            if WARPED in self.viewer.layers:
                self.viewer.layers[WARPED].opacity = value / 100
        else:
            self.schedule_check()

    def schedule_check(self, *_):
        """(Re)start the debounce timer; the check view follows once the camera rests."""
        if self.view_combo.currentText() in CHECK_VIEWS and WARPED in self.viewer.layers:
            self._timer.start()

    def _check_request(self):
        fixed = self.fixed_layer()
        if fixed is None or WARPED not in self.viewer.layers:
            return None
        f, m = layer_geom(fixed), layer_geom(self.viewer.layers[WARPED])
        win, box = view_window(self.viewer, f, CHECK_MAX_SIDE)
        split = box[2] + (box[3] - box[2]) * self.mix_slider.value() / 100
        return f, m, win, split

    def update_check(self, force: bool = False):
        """Start computing the chosen check view of the visible region (one job at a time;
        ``force``: replace the running one, whose result is then dropped)."""
        view = self.view_combo.currentText()
        if view not in CHECK_VIEWS:
            return
        if self._checks.busy and not force:
            self._check_pending = True
            return
        req = self._check_request()
        if req is None:
            return
        f, m, win, split = req
        if win.empty or min(win.shape) < 2:
            return
        self._checks.start(compute_check, f, m, win, view, cell_um=self.cell_spin.value(), split_x=split,
                           on_done=self._on_check, on_error=lambda e: self._error(f"check view: {e}"),
                           on_finished=self._on_check_finished)

    def _on_check_finished(self):
        if self._check_pending:
            self._check_pending = False
            self.schedule_check()

    def _on_check(self, res: CheckResult):
        view = self.view_combo.currentText()
        if view not in CHECK_VIEWS:
            return
        self.check_result = res
        fixed = self.fixed_layer()
        units = tuple(fixed.units)[-2:] if fixed is not None else None
        if CHECK in self.viewer.layers and self.viewer.layers[CHECK].rgb == res.rgb:
            ly = self.viewer.layers[CHECK]
            update_layer(ly, scale=res.scale, translate=res.translate)
            ly.data = res.image
        else:
            if CHECK in self.viewer.layers:
                self.viewer.layers.remove(CHECK)
            kw = {} if res.rgb else dict(colormap="magma", contrast_limits=(0, 1))
            self.viewer.add_image(res.image, name=CHECK, rgb=res.rgb, scale=res.scale, translate=res.translate,
                                  units=units, **kw)
            self._below_annotations(CHECK)
            if fixed is not None:
                self.viewer.layers.selection.active = fixed  # the camera's subject stays the IHC
        if res.cell_px is not None:
            mpp = (fixed.metadata or {}).get("mpp") if fixed is not None else None
            size = f"{self.cell_spin.value():.0f} µm" if mpp else f"{res.cell_px:.0f} px (pixel size unknown)"
            text = f"Checkerboard: squares of {size}; IHC and registered H&E alternate."
            if self.status.text() != text:  # a new text re-lays the dock out
                self.status.setText(text)

    def _below_annotations(self, name: str) -> None:
        """Move layer ``name`` just above the top image layer: it covers the images it replaces
        but not the shapes, points and labels drawn over them."""
        from napari.layers import Image

        layers = self.viewer.layers
        i = layers.index(name)
        images = [j for j, ly in enumerate(layers) if isinstance(ly, Image) and j != i]
        dest = images[-1] + 1 if images else 0
        if dest < i:
            layers.move(i, dest)

    # -- annotation transfer ---------------------------------------------------------------------
    def transfer_shapes(self, to_ihc: bool = True):
        """Copy the chosen Shapes layer through the transform: drawn on the unregistered H&E onto
        the IHC (``to_ihc``), or drawn on the IHC / registered H&E onto the unregistered H&E.
        Returns the new layer (named "<name> → IHC" / "<name> → H&E"), or None."""
        from napari.layers import Shapes

        name = self.transfer_combo.currentText()
        src = self._layer(name)
        if not isinstance(src, Shapes):
            return self._error("choose a Shapes layer to transfer (draw regions first)")
        if self.transform is None:
            return self._error("register (or load a transform) first")
        fixed, moving = self.fixed_layer(), self.moving_layer()
        if fixed is None or moving is None:
            return self._error("choose the IHC and H&E layers first")
        frm, to = (moving, fixed) if to_ihc else (fixed, moving)
        data, types = [], []
        for verts, kind in zip(src.data, src.shape_type):
            xy = self._to_image_xy(src, frm, verts)
            if kind == "ellipse":
                xy, kind = _ellipse_outline(xy), "polygon"
            closed = kind not in ("line", "path")
            mapped = self.transform.map_path(xy, inverse=not to_ihc, closed=closed)
            data.append(self._from_image_xy(to, mapped))
            types.append("polygon" if kind in ("rectangle", "polygon") else kind)
        target = "IHC" if to_ihc else "H&E"
        new = f"{name} → {target}"
        if new in self.viewer.layers:
            self.viewer.layers.remove(new)
        kw = {}
        if "name" in src.features:
            kw["text"] = {"string": "{name}", "color": "yellow", "size": 10, "anchor": "upper_left"}
        ly = self.viewer.add_shapes(data, shape_type=types, name=new, features=src.features.copy(),
                                    edge_color=src.edge_color if len(data) else "yellow",
                                    face_color=src.face_color if len(data) else "transparent",
                                    edge_width=src.edge_width if len(data) else 2, units=tuple(to.units)[-2:],
                                    metadata={"transferred_from": name, "to": target}, **kw)
        self.status.setText(f"'{name}': {len(data)} shape(s) carried onto the {target} as '{new}'.")
        return ly

    # -- files ---------------------------------------------------------------------------------
    def save_transform(self, path):
        if self.transform is None:
            return self._error("nothing to save yet; register first")
        return self.transform.save(path)

    def load_transform(self, path):
        """Load a transform file and show the H&E warped by it (no registration run): the file is
        read at once (errors are a message), the warp and the quality figures in a worker.
        Returns the worker, or None."""
        from napari.utils.notifications import show_warning

        from ..errors import BCIError
        from ..transform import Transform

        if self._worker is not None:
            show_warning("Register: already running")
            return None
        try:
            t = Transform.load(path)
        except BCIError as e:
            return self._error(str(e))
        fixed, moving = self.fixed_layer(), self.moving_layer()
        if fixed is None or moving is None:
            return self._error("choose the IHC and H&E layers first")
        f_levels, m_levels = levels(fixed), levels(moving)

        def work():
            from ..registration.api import RegistrationResult
            from ..registration.quality import quality_report

            return RegistrationResult(t, quality_report(f_levels, m_levels, t)), _warped_levels(f_levels, m_levels, t)

        return self._start(work, fixed, "loaded", f"Loading {Path(str(path)).name} ...")

    def _save_dialog(self):
        path, _ = QFileDialog.getSaveFileName(self, "Save transform", "transform.json", "JSON (*.json)")
        if path:
            self.save_transform(path)

    def _load_dialog(self):
        path, _ = QFileDialog.getOpenFileName(self, "Load transform", "", "JSON (*.json)")
        if path:
            self.load_transform(path)

    def hideEvent(self, event):  # stop work when the dock is hidden or closed
        self.cancel()
        super().hideEvent(event)

    def _disconnect(self, *_):
        self._checks.stop()
        try:
            cam = self.viewer.scene.camera
            cam.events.center.disconnect(self.schedule_check)
            cam.events.zoom.disconnect(self.schedule_check)
            self.viewer.canvas.events.size.disconnect(self.schedule_check)
        except (RuntimeError, TypeError, ValueError):
            pass


def _warped_levels(f_levels, m_levels, transform) -> list:
    """The H&E levels warped onto the IHC's; levels small enough are computed here (in the
    worker), not while napari slices; finer whole-slide levels stay lazy (each chunk reads only
    the moving region it needs)."""
    from ..registration.warp import warp_levels

    shapes = [tuple(int(s) for s in lv.shape[:2]) for lv in f_levels]
    warped = warp_levels(m_levels, transform, shapes, chunk=512)
    return [np.asarray(w) if max(w.shape[:2]) <= 2048 else w for w in warped]


def _ellipse_outline(corners_xy: np.ndarray, n: int = 64) -> np.ndarray:
    """A polygon of ``n`` vertices on the ellipse inscribed in napari's 4 corner points."""
    c = corners_xy.mean(axis=0)
    a, b = (corners_xy[1] - corners_xy[0]) / 2, (corners_xy[3] - corners_xy[0]) / 2
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)[:, None]
    return c + np.cos(t) * a + np.sin(t) * b


def format_quality(r: dict) -> str:
    lines = []
    if r.get("auto_score") is not None:
        lines.append(f"Automatic start: {r.get('auto_start')}, score {r['auto_score']:.2f}"
                     + (f" + orientation {r['auto_orientation']:.2f}" if r.get("auto_orientation") is not None
                        else ""))
    if r.get("structure_polish_px") is not None:
        lines.append(f"Pose fitted to the tissue structure: moved {r['structure_polish_px']:.1f} px")
    if r.get("local_shift_px") is not None:
        lines.append(f"Local agreement: the best matches of {r['local_blocks']} tissue blocks lie a median "
                     f"{r['local_shift_px']:.0f} px from the alignment")
    if "deformable_kept" in r:
        follows = f" (follows {r['deformable_follows']})" if r.get("deformable_follows") else ""
        lines.append(f"Dense field kept{follows}" if r["deformable_kept"]
                     else f"Dense field dropped, projective kept: {r.get('deformable_rejected', '')}")
    if "ncc_before" in r:
        lines.append(f"NCC (ranked hematoxylin): {r['ncc_before']:.3f} -> {r['ncc_after']:.3f}")
        lines.append(f"Mutual information: {r['mi_before']:.3f} -> {r['mi_after']:.3f}")
        if "tissue_overlap_after" in r:
            lines.append(f"Tissue overlap (Dice): {r['tissue_overlap_before']:.2f} -> "
                         f"{r['tissue_overlap_after']:.2f}")
        if "orientation_after" in r:
            lines.append(f"Tissue orientation agreement: {r['orientation_before']:.2f} -> "
                         f"{r['orientation_after']:.2f}")
        lines.append(f"Folded pixels: {100 * r['folded_fraction']:.2f}%")
    if r.get("tre_after") and r["tre_after"].get("n"):
        b, a = r["tre_before"], r["tre_after"]
        lines.append(f"Landmark TRE (median, {a['n']} pairs): {b['median']:.1f} px -> {a['median']:.1f} px")
    if r.get("landmark_residuals"):
        res = ", ".join(f"{i + 1}: {v:.1f}" for i, v in enumerate(r["landmark_residuals"]))
        lines.append(f"Landmark residuals (px): {res}")
    if "flipped" in r:
        flip = "; H&E flipped" if r["flipped"] else ""
        if r.get("auto_start") == "features":
            lines.append(f"Features: {r.get('feature_inliers', 0)} inliers{flip}")
        elif flip:
            lines.append(flip[2:])
    return "\n".join(lines)
