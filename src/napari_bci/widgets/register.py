"""The "Register" dock widget: align an H&E (moving) layer onto an IHC (fixed) layer from paired
landmarks, automatically, or deformably; show the warped H&E, the quality figures, and a
checkerboard / difference view to judge the alignment."""

from __future__ import annotations

import numpy as np
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFileDialog,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QProgressBar,
    QPushButton,
    QVBoxLayout,
    QWidget,
)

from ..io import layers as L
from ._layers import levels, rgb_layers

WARPED = L.HE_REGISTERED
CHECK = "Registration check"
VIEWS = ("Overlay", "Checkerboard", "Difference")
#: Landmark colours by pair number (cycled), the same in both Points layers.
PALETTE = np.array([
    (0.90, 0.10, 0.10, 1), (0.10, 0.60, 0.95, 1), (0.10, 0.80, 0.20, 1), (1.00, 0.60, 0.00, 1),
    (0.70, 0.20, 0.90, 1), (0.00, 0.80, 0.80, 1), (1.00, 0.90, 0.10, 1), (0.95, 0.35, 0.70, 1),
])
CHECK_SIDE = 1024  # the check views are computed at a level with longer side <= this


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
        self._check_images: dict = {}
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
        lay.addLayout(io)
        lay.addStretch()

        self.landmark_btn.clicked.connect(self.add_landmark_layers)
        self.landmarks_run.clicked.connect(lambda: self.run("landmarks"))
        self.auto_run.clicked.connect(lambda: self.run("auto"))
        self.deform_run.clicked.connect(lambda: self.run("deformable"))
        self.cancel_btn.clicked.connect(self.cancel)
        self.view_combo.currentTextChanged.connect(self.show_view)
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
    def _to_image_xy(points, image) -> np.ndarray:
        d = np.asarray(points.data, float).reshape(-1, points.ndim)
        out = []
        for p in d:
            w = points.data_to_world(p)
            q = np.asarray(image.world_to_data(np.r_[[0] * (image.ndim - 2), np.asarray(w)[-2:]]))[-2:]
            out.append(q[::-1])
        return np.asarray(out, float).reshape(-1, 2)

    # -- running -------------------------------------------------------------------------------
    def run(self, method: str):
        """Start ``method`` (landmarks / auto / deformable) in a worker; returns the worker."""
        from napari.qt.threading import thread_worker
        from napari.utils.notifications import show_error, show_warning

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

        @thread_worker
        def work():
            # errors are returned, not raised: napari 0.9's own handler of a worker's `errored`
            # signal fails with a TypeError when a viewer is current
            try:
                return _work()
            except Exception as e:  # noqa: BLE001 - reported to the user in _on_done
                return _Failed(e)  # (superqt re-raises a returned exception instance)

        def _work():
            from ..registration.api import register
            from ..registration.warp import warp_levels

            res = register(f_levels, m_levels, progress=lambda msg, f: relay.progress.emit(msg, f),
                           cancelled=lambda: self._cancel, **kw)
            relay.progress.emit("warping the H&E", 0.98)
            shapes = [tuple(int(s) for s in lv.shape[:2]) for lv in f_levels]
            warped = warp_levels(m_levels, res.transform, shapes, chunk=512)
            # levels small enough are computed here, not while napari slices; finer whole-slide
            # levels stay lazy (each chunk reads only the moving region it needs)
            warped = [np.asarray(w) if max(w.shape[:2]) <= 2048 else w for w in warped]
            checks = _check_images(f_levels, m_levels, res.transform)
            return res, warped, checks

        w = work()
        w.returned.connect(lambda out: self._on_done(out, fixed, method))
        w.errored.connect(self._on_error)
        w.finished.connect(self._on_finished)
        self._worker = w
        for b in (self.landmarks_run, self.auto_run, self.deform_run):
            b.setEnabled(False)
        self.cancel_btn.setEnabled(True)
        self.progress.setVisible(True)
        self.progress.setValue(0)
        self.status.setText(f"Registering ({method}) ...")
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
        res, warped, checks = out
        self.transform, self.report = res.transform, res.report
        self._check_images = checks
        data = warped if len(warped) > 1 else warped[0]
        meta = {"role": "he", "registered_to": fixed.name, "transform": res.transform.to_dict(),
                "mpp": (fixed.metadata or {}).get("mpp"), "levels": [list(w.shape[:2]) for w in warped]}
        if WARPED in self.viewer.layers:
            self.viewer.layers.remove(WARPED)
        self.viewer.add_image(data, name=WARPED, rgb=True, multiscale=len(warped) > 1, scale=fixed.scale[-2:],
                              translate=fixed.translate[-2:], opacity=0.5, metadata=meta,
                              units=tuple(fixed.units)[-2:])
        self.quality.setText(format_quality(res.report))
        self.status.setText(f"Done ({method}). '{WARPED}' is aligned to '{fixed.name}'.")
        self.show_view(self.view_combo.currentText())

    # -- check views ---------------------------------------------------------------------------
    def show_view(self, view: str | None = None):
        """Overlay (the warped H&E at half opacity), Checkerboard or Difference (hematoxylin)."""
        view = view or self.view_combo.currentText()
        if CHECK in self.viewer.layers:
            self.viewer.layers.remove(CHECK)
        if WARPED in self.viewer.layers:
            self.viewer.layers[WARPED].visible = view == "Overlay"
        fixed = self.fixed_layer()
        if view == "Overlay" or not self._check_images or fixed is None:
            return
        img, ds = self._check_images[view]
        s = np.asarray(fixed.scale[-2:], float)
        translate = np.asarray(fixed.translate[-2:], float) + (ds - 1) / 2 * s
        units = tuple(fixed.units)[-2:]
        if view == "Checkerboard":
            self.viewer.add_image(img, name=CHECK, rgb=True, scale=s * ds, translate=translate, units=units)
        else:
            self.viewer.add_image(img, name=CHECK, colormap="magma", scale=s * ds, translate=translate,
                                  contrast_limits=(0, 1), units=units)

    # -- files ---------------------------------------------------------------------------------
    def save_transform(self, path):
        if self.transform is None:
            return self._error("nothing to save yet; register first")
        return self.transform.save(path)

    def load_transform(self, path):
        """Load a transform file and show the H&E warped by it (no registration run)."""
        from ..errors import BCIError
        from ..registration.warp import warp_levels
        from ..transform import Transform

        try:
            t = Transform.load(path)
        except BCIError as e:
            return self._error(str(e))
        fixed, moving = self.fixed_layer(), self.moving_layer()
        if fixed is None or moving is None:
            return self._error("choose the IHC and H&E layers first")
        f_levels, m_levels = levels(fixed), levels(moving)
        shapes = [tuple(int(s) for s in lv.shape[:2]) for lv in f_levels]
        warped = warp_levels(m_levels, t, shapes, chunk=512)
        from ..registration.api import RegistrationResult
        from ..registration.quality import quality_report

        res = RegistrationResult(t, quality_report(f_levels, m_levels, t))
        self._on_done((res, warped, _check_images(f_levels, m_levels, t)), fixed, "loaded")
        return t

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


def _check_images(f_levels, m_levels, transform, tile: int = 32) -> dict:
    """Low-resolution checkerboard (RGB) and hematoxylin difference images in the fixed frame."""
    from ..registration.images import as_pyramid, od_channel
    from ..registration.warp import warp_region

    pf, pm = as_pyramid(f_levels), as_pyramid(m_levels)
    fimg, dsf = pf.image_at(CHECK_SIDE)
    mv, dsm = pm.image_near(dsf, CHECK_SIDE)
    warped = warp_region(mv, transform, (0, 0), fimg.shape[:2], dsf, dsm, fill="constant")
    yy, xx = np.mgrid[0:fimg.shape[0], 0:fimg.shape[1]]
    board = ((yy // tile + xx // tile) % 2).astype(bool)
    check = np.where(board[..., None], fimg[..., :3], warped[..., :3])
    diff = np.abs(od_channel(fimg) - od_channel(warped)).clip(0, 1)
    return {"Checkerboard": (check, dsf), "Difference": (diff, dsf)}


def format_quality(r: dict) -> str:
    lines = []
    if r.get("auto_score") is not None:
        lines.append(f"Automatic start: {r.get('auto_start')}, score {r['auto_score']:.2f}")
    if "ncc_before" in r:
        lines.append(f"NCC (ranked hematoxylin): {r['ncc_before']:.3f} -> {r['ncc_after']:.3f}")
        lines.append(f"Mutual information: {r['mi_before']:.3f} -> {r['mi_after']:.3f}")
        if "tissue_overlap_after" in r:
            lines.append(f"Tissue overlap (Dice): {r['tissue_overlap_before']:.2f} -> "
                         f"{r['tissue_overlap_after']:.2f}")
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
