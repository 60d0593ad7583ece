"""The "Virtual IHC" dock widget: generate HER2 IHC from the H&E for what is on screen.

Thin Qt layer over :class:`napari_bci.generate.engine.TileEngine`: the engine runs in one
``thread_worker`` at a time; tiles arrive through ``yielded`` on the main thread, where they are
written into an :class:`~napari_bci.generate.engine.OutputPyramid` behind the output layer,
which is then refreshed (throttled). Camera changes are debounced; a new view cancels the
running job (checked between batches) and results of an outdated job are dropped. Inference
never runs inside an array napari reads.
"""

from __future__ import annotations

import itertools
import os
import threading
import time
from pathlib import Path

from qtpy.QtCore import QSettings, QTimer
from qtpy.QtWidgets import (
    QCheckBox,
    QComboBox,
    QFormLayout,
    QHBoxLayout,
    QLabel,
    QPushButton,
    QSpinBox,
    QVBoxLayout,
    QWidget,
)

from ..io import layers as L
from ._layers import levels, rgb_layers, visible_box
from ._models import CHECKPOINT_ITEM, ask_checkpoint, is_checkpoint_item, model_spec, select_checkpoint

FOLLOW = "Follow the view"
THIS_VIEW = "This view only"


def _rgb_layers(viewer, exclude=()):
    return [ly for ly in rgb_layers(viewer) if (ly.metadata or {}).get("role") != "generated" and ly not in exclude]


def _layer_id(layer) -> str:
    """A layer's stable identity: napari's ``unique_id`` (``id()`` of the object a plugin gets is
    that of a proxy, new on every access)."""
    uid = getattr(layer, "unique_id", None)
    return str(uid) if uid is not None else f"id-{id(layer)}"


def _lower_thread_priority(nice: int = 10) -> None:
    """Lower the calling thread's scheduling priority (Linux; a no-op elsewhere)."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), nice)
    except (AttributeError, OSError):
        pass


def coarse_to_fine(tiles: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """``tiles`` reordered so that any prefix is spread over them: those on a lattice of every
    8th row and column first, then every 4th, 2nd and the rest; centre first within each."""
    rank = {}
    for t in tiles:
        r, c = t
        k = 0
        for step in (8, 4, 2):
            if r % step == 0 and c % step == 0:
                break
            k += 1
        rank[t] = k
    order = {t: i for i, t in enumerate(tiles)}  # the input is centre first
    return sorted(tiles, key=lambda t: (rank[t], order[t]))


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{max(1, round(seconds))} s"
    if seconds < 5400:
        return f"{round(seconds / 60)} min"
    return f"{seconds / 3600:.1f} h"


class VirtualIHCWidget(QWidget):
    """Pick the H&E layer, a generator, device and tile size; generate for the view."""

    #: camera debounce (ms) and output refresh throttle (ms)
    debounce_ms = 150
    refresh_ms = 80
    #: output levels above this many bytes are block-sparse; all blocks share ``output_max_bytes``
    output_memory_bytes = 4 * 2**20
    output_max_bytes = 1024 * 2**20

    def __init__(self, viewer: napari.viewer.Viewer):
        super().__init__()
        self.viewer = viewer
        self.engine = None
        self.output = None  # OutputPyramid
        self.output_layer = None
        self.generator = None
        self.written: set[tuple[int, int]] = set()
        self.max_tiles = 64
        self._gen_key = None
        self._engine_key = None
        self._worker = None
        self._cancel: threading.Event | None = None
        self._job = 0
        self._jobs = itertools.count(1)
        self._pending: list | None = None
        self._following = False
        self._dropped = 0
        self._error: Exception | None = None
        self._job_done = self._job_total = 0
        self.jobs_started = 0
        self.main_thread_max_ms = 0.0
        self._alive = True
        self.last_tile_at = 0.0  # time.monotonic() of the last tile written
        self._tile_seconds: float | None = None  # running mean of seconds per tile
        self._job_t0 = 0.0

        self.he_combo = QComboBox()
        self.model_combo = QComboBox()
        self.device_combo = QComboBox()
        self.tile_spin = QSpinBox()
        self.tile_spin.setRange(0, 4096)
        self.tile_spin.setSingleStep(64)
        self.tile_spin.setSpecialValueText("model default")
        self.mode_combo = QComboBox()
        self.mode_combo.addItems([FOLLOW, THIS_VIEW])
        self.tta_check = QCheckBox("test-time augmentation (7 flips/rotations, 7x slower)")
        #: the generator's own HER2 level on the viewed region (BCIStainer's head), when it has one
        self.her2_label = QLabel("")
        self.her2_label.setWordWrap(True)
        self.her2_probs = None
        #: persistent note when the H&E is outside the generator's training domain
        self.domain_label = QLabel("")
        self.domain_label.setWordWrap(True)
        self.domain_label.setStyleSheet("color: #e8a33d")
        self.domain_warning: str | None = None
        self.start_btn = QPushButton("Generate")
        self.cancel_btn = QPushButton("Stop")
        self.cancel_btn.setEnabled(False)
        # progress as text: QProgressBar.setValue repaints the whole window synchronously
        # (GL canvas included), which would stall the GUI on every tile
        self.progress = QLabel("")
        self.status = QLabel("Pick the H&E layer and a generator, then press Generate.")
        self.status.setWordWrap(True)
        #: what stays true while the view does not change (the view is larger than one job, ...)
        self.note = QLabel("")
        self.note.setWordWrap(True)

        form = QFormLayout()
        form.addRow("H&&E layer", self.he_combo)  # "&&": a literal & in a Qt label
        form.addRow("Generator", self.model_combo)
        form.addRow("Device", self.device_combo)
        form.addRow("Tile (px)", self.tile_spin)
        form.addRow("Mode", self.mode_combo)
        form.addRow("TTA", self.tta_check)
        buttons = QHBoxLayout()
        buttons.addWidget(self.start_btn)
        buttons.addWidget(self.cancel_btn)
        lay = QVBoxLayout(self)
        lay.addLayout(form)
        lay.addLayout(buttons)
        lay.addWidget(self.progress)
        lay.addWidget(self.status)
        lay.addWidget(self.note)
        lay.addWidget(self.domain_label)
        lay.addWidget(self.her2_label)
        lay.addStretch(1)

        self._debounce = QTimer(self)
        self._debounce.setSingleShot(True)
        self._debounce.setInterval(self.debounce_ms)
        self._debounce.timeout.connect(self.update_view)
        self._refresh_timer = QTimer(self)
        self._refresh_timer.setSingleShot(True)
        self._refresh_timer.setInterval(self.refresh_ms)
        self._refresh_timer.timeout.connect(self._refresh_output)

        self._fill_models()
        self._fill_devices()
        self.refresh_layers()
        self.start_btn.clicked.connect(self.start)
        self.cancel_btn.clicked.connect(self.stop)
        self.model_combo.activated.connect(self._on_model_activated)
        self.viewer.layers.events.inserted.connect(self.refresh_layers)
        self.viewer.layers.events.removed.connect(self._on_layer_removed)
        cam = self.viewer.scene.camera
        cam.events.center.connect(self._on_camera)
        cam.events.zoom.connect(self._on_camera)
        self.viewer.canvas.events.size.connect(self._on_camera)
        self.destroyed.connect(self._teardown)
        self._set_tooltips()
        self._settings = QSettings("napari-bci", "napari-bci")
        self._restore_settings()
        for sig in (self.model_combo.currentTextChanged, self.device_combo.currentTextChanged,
                    self.mode_combo.currentTextChanged, self.tile_spin.valueChanged, self.tta_check.toggled):
            sig.connect(self._save_settings)

    def _restore_settings(self) -> None:
        """The choices of the last session (a model no longer available is skipped)."""
        st = self._settings
        for combo, key in ((self.model_combo, "vihc/model"), (self.device_combo, "vihc/device"),
                           (self.mode_combo, "vihc/mode")):
            v = st.value(key)
            if v and combo.findText(str(v)) >= 0 and not is_checkpoint_item(str(v)):
                combo.setCurrentText(str(v))
        try:
            self.tile_spin.setValue(int(st.value("vihc/tile", 0)))
        except (TypeError, ValueError):
            pass
        self.tta_check.setChecked(str(st.value("vihc/tta", "false")).lower() == "true")

    def _save_settings(self, *_) -> None:
        st = self._settings
        if not is_checkpoint_item(self.model_combo.currentText()):
            st.setValue("vihc/model", self.model_combo.currentText())
        st.setValue("vihc/device", self.device_combo.currentText())
        st.setValue("vihc/mode", self.mode_combo.currentText())
        st.setValue("vihc/tile", self.tile_spin.value())
        st.setValue("vihc/tta", self.tta_check.isChecked())

    def _set_tooltips(self) -> None:
        self.he_combo.setToolTip("The H&E layer to stain virtually (use 'H&E (registered)' to compare with a real IHC)")
        self.model_combo.setToolTip("The generator: the built-in demonstration model (synthetic tissue only), "
                                    "or a checkpoint file (BCIStainer, ASP/CUT, pix2pix, napari-bci)")
        self.device_combo.setToolTip("Where the model runs: auto picks a GPU when there is one")
        self.tile_spin.setToolTip("Tile size in pixels at the generation level (model default: its native window)")
        self.mode_combo.setToolTip("Follow the view: generate what becomes visible as you pan and zoom")
        self.tta_check.setToolTip("Average the output over 7 flips/rotations (as BCIStainer's test-time augmentation)")
        self.start_btn.setToolTip("Generate the visible tiles (finished tiles are kept and reused)")
        self.cancel_btn.setToolTip("Stop generating; finished tiles stay")

    def _say(self, text: str, *, note: bool = False) -> None:
        """Set the status (or the persistent note) text, unless the widget is gone."""
        if not self._alive:
            return
        try:
            (self.note if note else self.status).setText(text)
        except RuntimeError:  # the Qt object was deleted with the window
            self._alive = False

    def _teardown(self, *_) -> None:
        """The widget is going away: stop the work, and let nothing reach its labels."""
        self._alive = False
        self._following = False
        self._pending = None
        self._cancel_job()

    # -- choices --------------------------------------------------------------------------------
    def _fill_models(self) -> None:
        from ..models.registry import available, default_generator_name

        self.model_combo.clear()
        for m in available():
            if m.get("available", True):
                self.model_combo.addItem(m["name"])
        self.model_combo.addItem(CHECKPOINT_ITEM)
        i = self.model_combo.findText(default_generator_name())
        self.model_combo.setCurrentIndex(max(i, 0))

    def _fill_devices(self) -> None:
        from ..models.device import available_devices

        self.device_combo.clear()
        self.device_combo.addItems(["auto", *available_devices()])

    def refresh_layers(self, *_) -> None:
        current = self.he_combo.currentText()
        self.he_combo.clear()
        names = [ly.name for ly in _rgb_layers(self.viewer)]
        self.he_combo.addItems(names)
        if current in names:
            self.he_combo.setCurrentText(current)
        elif L.HE in names:
            self.he_combo.setCurrentText(L.HE)

    def _on_model_activated(self, *_) -> None:
        ask_checkpoint(self, self.model_combo, "Generator checkpoint")

    def set_checkpoint(self, path: str) -> None:
        """Use a checkpoint file as the generator (listed by its file name)."""
        select_checkpoint(self.model_combo, path)

    def set_model(self, model: str) -> None:
        """Select a generator by registry name or checkpoint path."""
        if self.model_combo.findText(str(model)) >= 0 and not is_checkpoint_item(str(model)):
            self.model_combo.setCurrentText(str(model))
        elif Path(str(model)).expanduser().exists():
            self.set_checkpoint(str(Path(str(model)).expanduser()))
        else:
            from napari.utils.notifications import show_error

            show_error(f"Virtual IHC: unknown model '{model}'")

    def _model_spec(self) -> str:
        return model_spec(self.model_combo)

    # -- engine and output ---------------------------------------------------------------------
    def _he_layer(self):
        name = self.he_combo.currentText()
        return self.viewer.layers[name] if name in self.viewer.layers else None

    def _ensure_engine(self) -> bool:
        """(Re)build generator, engine and output layer for the current choices; False on error."""
        from napari.utils.notifications import show_error

        from ..errors import BCIError
        from ..generate.display import OutputPyramid
        from ..generate.engine import TileEngine
        from ..models.registry import load_generator

        he = self._he_layer()
        if he is None:
            show_error("Virtual IHC: no RGB H&E layer to generate from")
            return False
        spec, device = self._model_spec(), self.device_combo.currentText()
        if spec == CHECKPOINT_ITEM:
            show_error("Virtual IHC: choose a checkpoint file first")
            return False
        try:
            if self._gen_key != (spec, device):
                self.generator = load_generator(spec, device=device)
                self._gen_key = (spec, device)
                if self.generator.device == "cpu" and (os.cpu_count() or 1) > 1:
                    from ..models.device import set_cpu_threads

                    set_cpu_threads((os.cpu_count() or 2) - 1)  # leave a core to the GUI thread
            tile = self.tile_spin.value() or None
            tta = self.tta_check.isChecked()
            key = (_layer_id(he), spec, device, tile, tta)
            if self._engine_key != key or self.output_layer is None or self.output_layer not in self.viewer.layers:
                lvls = levels(he)
                meta = he.metadata or {}
                self.engine = TileEngine(
                    self.generator, lvls, mpp=meta.get("mpp"), tile=tile,
                    image_id=meta.get("path") or f"layer-{_layer_id(he)}",
                    scale=tuple(he.scale[-2:]), translate=tuple(he.translate[-2:]),
                    on_warning=self._warn, tta=tta)
                self.her2_probs = None
                self.her2_label.setText("")
                self._check_domain(lvls[self.engine.level])
                self._new_output(he)
                self._engine_key = key
        except (BCIError, OSError, ValueError) as e:
            show_error(f"Virtual IHC: {e}")
            return False
        except Exception as e:  # noqa: BLE001 - a checkpoint that breaks the loader in its own way
            show_error(f"Virtual IHC: cannot load {Path(spec).name if Path(spec).exists() else spec}: "
                       f"{type(e).__name__}: {e}")
            return False
        return True

    def _check_domain(self, image) -> None:
        """Notify, and keep a note in the widget, when the H&E is outside the generator's
        training domain (:mod:`napari_bci.models.domain`)."""
        from napari.utils.notifications import show_warning

        from ..models.domain import check_generator_domain

        self.domain_warning = check_generator_domain(self.generator, image)
        self.domain_label.setText(f"\u26a0 {self.domain_warning}" if self.domain_warning else "")
        if self.domain_warning:
            show_warning(f"Virtual IHC: {self.domain_warning}")

    def _new_output(self, he) -> None:
        """A new output layer for the current engine; an earlier one (another model, tile size or
        source) is kept as it is, under its own name."""
        from ..generate.display import OutputPyramid

        self._detach_output()
        eng = self.engine
        self.written = set()  # a new set per output layer; its metadata refers to it
        self.output = OutputPyramid(eng.shape, eng.grid.tile, memory_bytes=self.output_memory_bytes,
                                    max_bytes=self.output_max_bytes, on_evict=self._on_evict, transparent=True)
        lv_mpp = None if eng.mpp is None else eng.mpp * eng.downsample[0]
        data, attrs, _ = L.image_layer(
            self.output.levels, L.generated_name(self.generator.name), mpp=lv_mpp, role="generated",
            her2=None, extra_metadata={
                # what the OME-TIFF writer needs to complete the layer (generate/batch.py)
                "model": self._model_spec(), "source_path": (he.metadata or {}).get("path"),
                "source_layer": he.name, "generation_level": eng.level, "tile": eng.grid.tile,
                "halo": eng.grid.halo, "tiles_done": self.written,
                # carried to the HER2 widget's caveat when this layer is scored
                "out_of_domain": self.domain_warning},
            scale=eng.out_scale, translate=eng.out_translate)
        base, k = attrs["name"], 2
        while attrs["name"] in self.viewer.layers:
            attrs["name"] = f"{base} #{k}"
            k += 1
        self.output_layer = self.viewer.add_image(data, **attrs)

    def _detach_output(self) -> None:
        """Stop writing into the current output layer, leaving it in the viewer as it is."""
        if self.output is not None:
            self.output.on_evict = None
        self.output_layer = None
        self.output = None

    # -- control ---------------------------------------------------------------------------------
    def start(self) -> None:
        """Generate for the current view (and keep following it in follow mode)."""
        if not self._ensure_engine():
            return
        self._following = self.mode_combo.currentText() == FOLLOW
        self.cancel_btn.setEnabled(True)
        self.update_view()

    def stop(self) -> None:
        """Stop following and cancel running work."""
        running = self._worker is not None or self._following
        self._following = False
        self._pending = None
        self._cancel_job()
        if not self._alive:
            return
        try:
            self._debounce.stop()
            self.cancel_btn.setEnabled(False)
        except RuntimeError:
            self._alive = False
            return
        if running:
            self._say(f"Stopped: {len(self.written)} tiles kept." if self.written else "Stopped.")

    def start_following(self) -> None:
        """Switch to "follow the view" and start."""
        self.mode_combo.setCurrentText(FOLLOW)
        self.start()

    def is_running(self) -> bool:
        return self._worker is not None

    def is_idle(self) -> bool:
        """No work running or queued (nothing debouncing)."""
        return self._worker is None and not self._pending and not self._debounce.isActive()

    def _on_camera(self, *_) -> None:
        if self._following and self._alive:
            try:
                self._debounce.start()
            except RuntimeError:  # the Qt object is already gone
                pass

    def visible_tiles(self) -> list[tuple[int, int]]:
        """Tiles of the generation level seen by the camera, centre first."""
        return self.engine.tiles_in_world_box(visible_box(self.viewer))

    def update_view(self) -> None:
        """Queue the visible tiles not yet generated (cancelling outdated work)."""
        if self.engine is None or self.output_layer is None or self.output_layer not in self.viewer.layers:
            return
        tiles = self.visible_tiles()
        todo = [t for t in tiles if t not in self.written]
        if len(todo) > self.max_tiles:
            # more than one job: spread over the view coarse to fine (every 8th tile, then every
            # 4th, ...), so the overview fills evenly, then the next job goes on where it stopped
            left = len(todo)
            todo = coarse_to_fine(todo)[: self.max_tiles]
            eta = f", about {_duration(left * self._tile_seconds)}" if self._tile_seconds else ""
            self._say(f"{len(tiles)} tiles in view, {left} to generate{eta}: {self.max_tiles} per job, "
                      "spread over the view; zoom in to see them sooner.", note=True)
        else:
            self._say("", note=True)
        if not todo:
            if self._worker is not None:
                self._cancel_job()
            self._set_idle(f"View complete ({len(tiles)} tiles).")
            return
        self._pending = todo
        if self._worker is not None:
            self._cancel_job()  # the finished handler starts the pending job
        else:
            self._start_pending()

    def _cancel_job(self) -> None:
        self._job = 0  # results still in flight are dropped
        if self._cancel is not None:
            self._cancel.set()
        if self._worker is not None:
            self._worker.quit()

    def _start_pending(self) -> None:
        from napari.qt.threading import thread_worker

        todo, self._pending = self._pending, None
        if not todo:
            return
        job = next(self._jobs)
        self._job = job
        self._error = None
        self.jobs_started += 1
        cancel = self._cancel = threading.Event()
        engine = self.engine
        n_levels = len(self.output.levels)
        cores = [engine.grid.core(i) for i in todo]
        centre = ((min(c[0] for c in cores) + max(c[1] for c in cores)) / 2,
                  (min(c[2] for c in cores) + max(c[3] for c in cores)) / 2)

        def run():
            from ..generate.display import tile_pyramid

            _lower_thread_priority()  # the GUI (and its renderer) first when cores are scarce

            # errors travel as payloads: a raising worker trips napari's task-status relay
            try:
                for idx, tile in engine.generate(todo, cancel=cancel):
                    yield job, idx, tile_pyramid(tile, n_levels)  # reductions off the GUI thread
                if not cancel.is_set() and getattr(engine.generator, "predicts_her2", False):
                    yield job, "her2", engine.predict_her2(centre)
            except Exception as e:  # noqa: BLE001 (reported to the user on the main thread)
                yield job, None, e

        worker = thread_worker(run, start_thread=False)()
        worker.yielded.connect(self._on_tile)
        worker.finished.connect(lambda w=worker: self._on_finished(w))
        self._worker = worker
        self._job_total, self._job_done = len(todo), 0
        self._job_t0 = time.perf_counter()
        self._mark_generating(True)
        self.progress.setText(f"0 / {len(todo)} tiles")
        self.status.setText(f"Generating {len(todo)} tiles with {self.generator.name} on {self.generator.device}…")
        worker.start()

    def _on_tile(self, payload) -> None:
        if not self._alive:
            return
        t0 = time.perf_counter()
        job, idx, tile = payload
        if idx is None:
            self._on_error(tile)
            return
        if isinstance(idx, str):
            if job == self._job:
                self._show_her2(tile)
            return
        if job != self._job or self.output is None or self.engine is None:
            self._dropped += 1
            return
        y0, _, x0, _ = self.engine.grid.core(idx)
        self.written.add(idx)
        self.output.write_pyramid(y0, x0, tile)
        self.last_tile_at = time.monotonic()
        self._job_done += 1
        per = (t0 - self._job_t0) / self._job_done
        self._tile_seconds = per if self._tile_seconds is None else 0.7 * self._tile_seconds + 0.3 * per
        if not self._refresh_timer.isActive():
            self._refresh_timer.start()
        self._note_main_thread(t0)

    def _show_her2(self, probs) -> None:
        """Show the generator's HER2 level for the viewed region; the output layer keeps it."""
        from ..models.base import HER2_CLASSES

        if probs is None:
            return
        self.her2_probs = [float(p) for p in probs]
        k = int(max(range(len(probs)), key=lambda i: probs[i]))
        text = ", ".join(f"{c}: {p:.2f}" for c, p in zip(HER2_CLASSES, probs))
        self.her2_label.setText(f"Model's HER2 level (viewed region): {HER2_CLASSES[k]}  ({text})")
        if self.output_layer is not None:
            self.output_layer.metadata["her2_model_level"] = {"level": HER2_CLASSES[k],
                                                               "probabilities": self.her2_probs}

    def _on_evict(self, idx) -> None:
        self.written.discard(tuple(idx))

    def _refresh_output(self, thumbnail: bool = False) -> None:
        if not self._alive:
            return
        t0 = time.perf_counter()
        if self._worker is not None:
            left = self._job_total - self._job_done
            eta = f", about {_duration(left * self._tile_seconds)} left" if self._tile_seconds and left else ""
            self.progress.setText(f"{self._job_done} / {self._job_total} tiles{eta}")
        if self.output_layer is not None and self.output_layer in self.viewer.layers:
            self.output_layer.refresh(thumbnail=thumbnail, highlight=False, extent=False)
        self._note_main_thread(t0)

    def _note_main_thread(self, t0: float) -> None:
        """Track the longest main-thread handler (benchmarks/bench_generate.py reports it)."""
        self.main_thread_max_ms = max(self.main_thread_max_ms, (time.perf_counter() - t0) * 1000)

    def _on_error(self, exc) -> None:
        from napari.utils.notifications import show_error

        self._following = False
        self._error = exc
        show_error(f"Virtual IHC: {exc}")
        self.status.setText(f"Error: {exc}")

    def _on_finished(self, worker) -> None:
        if worker is not self._worker:
            return
        self._worker = None
        self._cancel = None
        if not self._alive:
            return
        if not (self._pending or (self._following and self._error is None)):
            self._mark_generating(False)
        self._refresh_output(thumbnail=not self._pending)
        if self._error is not None:
            self._pending = None
            self.progress.setText("")
            self.cancel_btn.setEnabled(False)
        elif self._pending:
            self._start_pending()
        elif self._following and self._error is None:
            self.update_view()  # the rest of a view larger than one job, or what moved into view
        else:
            self._set_idle(f"Done: {len(self.written)} tiles generated "
                           f"({self.engine.stats()['cache']['hits']} cache hits)." if self.engine else "Done.")

    def _mark_generating(self, on: bool) -> None:
        """``metadata["generating"]`` of the output layer: other widgets (Compare) wait for the
        stream of tiles to end before measuring it."""
        layer = self.output_layer
        if layer is not None and layer in self.viewer.layers:
            layer.metadata["generating"] = bool(on)
            if not on:
                layer.events.set_data()

    def _set_idle(self, text: str) -> None:
        self._mark_generating(False)
        if not self._alive:
            return
        self._say(text)
        try:
            self.progress.setText(f"{self._job_done} / {self._job_total} tiles" if self._job_total else "")
            self.cancel_btn.setEnabled(self._following)
        except RuntimeError:
            self._alive = False

    def _warn(self, msg: str) -> None:
        from napari.utils.notifications import show_warning

        # called from the worker thread; napari's notification manager is thread-safe
        show_warning(f"Virtual IHC: {msg}")

    def _on_layer_removed(self, event) -> None:
        layer = event.value
        if layer is self.output_layer:
            self.stop()
            self.output_layer = None
            if self.output is not None:
                self.output.close()
                self.output = None
            self._engine_key = None
        elif layer is self._he_layer() or (self.engine is not None and self._engine_key
                                           and self._engine_key[0] == _layer_id(layer)):
            self.stop()
            self._engine_key = None
            if self.output_layer is not None and self.output_layer in self.viewer.layers:
                # re-registration replaces the H&E: the generated layer stays, marked as from before
                self.output_layer.metadata["source_removed"] = True
                self._say(f"'{layer.name}' was removed: '{self.output_layer.name}' was made from it and is "
                          "kept; press Generate for a new virtual IHC from the current H&E.", note=True)
            self._detach_output()
        self.refresh_layers()

    # -- lifetime ----------------------------------------------------------------------------------
    def hideEvent(self, event) -> None:  # noqa: N802 (Qt)
        self.stop()
        super().hideEvent(event)

    def closeEvent(self, event) -> None:  # noqa: N802 (Qt)
        self.stop()
        super().closeEvent(event)
