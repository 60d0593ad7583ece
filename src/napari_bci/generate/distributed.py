"""Whole-slide generation on dask.distributed: tiles are tasks, the model loads once per worker.

:class:`DaskTiles` starts a ``LocalCluster`` (``workers=N``: N processes, one thread each) or
joins an existing scheduler (``scheduler="tcp://host:8786"``, e.g. one started with
dask-jobqueue on SLURM or dask-kubernetes). A :class:`GeneratorPlugin` (a ``WorkerPlugin``)
loads the generator once on every worker, on its own GPU when GPUs exist. Each task computes a
few consecutive tiles with the same tile engine as a single-process run
(:func:`napari_bci.generate.tiles.compute_tiles`), so the output is identical. Results come
back with ``as_completed`` and are put back into row-major order by a reorder buffer: at most
``window`` tasks are submitted or waiting to be written at any time, which bounds memory.

A worker that dies mid-task (killed, out of memory, node lost) is replaced by its nanny and the
scheduler reruns its tasks elsewhere (up to dask's ``distributed.scheduler.allowed-failures``).
Workers need the slide and the model at the same path (shared file system).
"""

from __future__ import annotations

import logging
import os
import re
import sys
import uuid
from typing import Any, Iterator, Sequence

from ..errors import BCIError, InputError

try:  # distributed is not a declared dependency (only dask[array]): this module imports without it
    from distributed import WorkerPlugin
except ImportError:
    WorkerPlugin = object  # type: ignore[misc,assignment]


def worker_index(name: Any) -> int:
    """A small integer identifying a worker: LocalCluster names workers 0..N-1; dask-jobqueue and
    other deployments name them ``<prefix>-<n>[-<m>]``; otherwise 0."""
    if isinstance(name, int):
        return name
    m = re.search(r"(\d+)(?!.*\d)", str(name))
    return int(m.group(1)) if m else 0


def pick_device(device: str | None, name: Any) -> str | None:
    """The device of a worker: ``device`` when given; else ``cuda:<worker index mod #GPUs>`` when
    this worker sees GPUs (a job scheduler that sets ``CUDA_VISIBLE_DEVICES`` to one GPU per
    worker makes that ``cuda:0``); else CPU."""
    if device not in (None, "", "auto"):
        return device
    if os.environ.get("NAPARI_BCI_DEVICE"):
        return os.environ["NAPARI_BCI_DEVICE"]
    import torch

    n = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if n:
        i = worker_index(name) % n
        return "cuda" if i == 0 else f"cuda:{i}"
    return None  # the device policy's choice (MPS or CPU)


class GeneratorPlugin(WorkerPlugin):
    """Loads the generator once per worker (``setup``) and keeps one tile engine per slide."""

    def __init__(self, model: Any, device: str | None = None, threads: int = 1, name: str | None = None):
        self.model = model
        self.device = device
        self.threads = max(1, int(threads))
        self.name = name or f"napari-bci-generator-{uuid.uuid4().hex[:8]}"
        self.generator = None
        self._engines: dict = {}  # spec key -> (engine, slide), most recent last

    def setup(self, worker=None) -> None:
        from ..models.registry import load_generator

        from . import engine, tiles  # noqa: F401  (import once at start-up, not in the first task)
        from ..io import slide  # noqa: F401

        wname = getattr(worker, "name", 0) if worker is not None else 0
        if self.device not in (None, "", "auto"):
            self.generator = load_generator(self.model, device=self.device)
        else:  # load on the CPU, then move torch models to this worker's GPU (numpy ones never import torch)
            self.generator = load_generator(self.model, device="cpu")
            if "torch" in sys.modules:
                dev = pick_device(None, wname)
                if dev is not None and dev != "cpu":
                    self.generator.to(dev)
                elif dev is None:
                    self.generator.to(None)
        if "torch" in sys.modules:
            import torch

            torch.set_num_threads(self.threads)

    #: slides kept open per worker (a cohort streams through, one slide after the other)
    max_open = 4

    def teardown(self, worker=None) -> None:
        while self._engines:
            self._drop_oldest()
        self.generator = None

    def _drop_oldest(self) -> None:
        key = next(iter(self._engines))
        _, slide = self._engines.pop(key)
        try:
            slide.close()
        except Exception:
            pass

    def engine(self, spec: dict):
        """The tile engine for ``spec`` (slide path, level, tile, halo, batch size), built once."""
        from ..io.slide import open_slide
        from .cache import TileCache
        from .engine import TileEngine

        key = tuple(sorted(spec.items()))
        hit = self._engines.pop(key, None)
        if hit is None:
            while len(self._engines) >= self.max_open:
                self._drop_oldest()
            slide = open_slide(spec["source"])
            eng = TileEngine(self.generator, slide.levels, mpp=spec.get("mpp", slide.mpp), level=spec["level"],
                             tile=spec["tile"], halo=spec["halo"], batch_size=spec["batch_size"],
                             cache=TileCache(0), image_id=spec["source"])
            hit = (eng, slide)
        self._engines[key] = hit  # re-inserted: most recently used last
        return hit[0]


def _plugin(name: str) -> GeneratorPlugin:
    from distributed import get_worker

    w = get_worker()
    p = w.plugins.get(name)
    if p is None:
        raise BCIError(f"worker {w.name}: the napari-bci generator plugin '{name}' is not installed")
    return p


def tiles_task(indices: Sequence[tuple[int, int]], plugin_name: str, spec: dict) -> list:
    """A dask task: the tiles ``indices`` of ``spec``'s slide, computed on this worker with its
    plugin's generator. Returns ``[(index, tile | None, TileFailure | None), ...]``."""
    import dask

    from .tiles import compute_tiles

    with dask.config.set(scheduler="synchronous"):  # slide reads stay in this worker
        eng = _plugin(plugin_name).engine(spec)
        return list(compute_tiles(eng, [tuple(i) for i in indices]))


def patch_task(path: str, plugin_name: str, tile: int | None, batch_size: int | None):
    """A dask task: :func:`~.tiles.patch_image` of one patch file (the virtual IHC and the
    out-of-domain warning, or the :class:`InputError` reading it)."""
    from pathlib import Path

    import dask

    from .tiles import patch_image

    with dask.config.set(scheduler="synchronous"):
        return patch_image(_plugin(plugin_name).generator, Path(path), tile=tile, batch_size=batch_size)


def restore_environ(snapshot: dict) -> None:
    """Put ``os.environ`` back to ``snapshot``: a LocalCluster's nannies set thread limits
    (OMP/MKL/OpenBLAS_NUM_THREADS = 1, ...) in this process's environment for their workers to
    inherit, and they would otherwise reach every later child process (a napari-bci command run
    from the same session got single-threaded BLAS, and the demo ran at half speed)."""
    for k in set(os.environ) - set(snapshot):
        del os.environ[k]
    os.environ.update(snapshot)


class Cluster:
    """A dask client with the generator plugin installed on every worker.

    ``workers=N`` starts a ``LocalCluster`` of N processes with one thread each (torch threads per
    worker: cores / N); ``scheduler=ADDRESS`` joins an existing one; ``client`` uses a given client.
    """

    def __init__(self, model: Any, *, workers: int | None = None, scheduler: str | None = None,
                 device: str | None = None, window: int | None = None, resources: dict | None = None,
                 client=None):
        if workers is not None and int(workers) < 1:
            raise InputError(None, f"--workers {workers}: must be at least 1")
        self.model = str(model) if isinstance(model, os.PathLike) else model
        self.workers = None if workers is None else int(workers)
        self.scheduler = scheduler
        self.device = device
        self.window = window
        self.resources = resources
        self.client = client
        self._own_client = client is None
        self.cluster = None
        self.plugin: GeneratorPlugin | None = None
        self._environ: dict | None = None

    def start(self) -> "Cluster":
        from distributed import Client, LocalCluster

        if self.client is None:
            if self.scheduler:
                try:
                    self.client = Client(self.scheduler, timeout="30s", set_as_default=False)
                except OSError as e:
                    raise InputError(None, f"--scheduler {self.scheduler}: cannot connect ({e})") from None
            else:
                self._environ = dict(os.environ)
                self.cluster = LocalCluster(n_workers=self.workers or 1, threads_per_worker=1, processes=True,
                                            dashboard_address=None, silence_logs=logging.ERROR)
                self.client = Client(self.cluster, set_as_default=False)
        n = len(self.client.scheduler_info(n_workers=-1).get("workers", {})) or (self.workers or 1)
        threads = max(1, (os.cpu_count() or 1) // n) if self.cluster is not None else 1
        self.plugin = GeneratorPlugin(self.model, device=self.device, threads=threads)
        try:
            self.client.register_plugin(self.plugin, name=self.plugin.name)
        except Exception as e:
            raise BCIError(f"workers could not load the model {self.model!r}: {type(e).__name__}: {e}") from e
        if self.window is None:
            self.window = max(4, 4 * n)
        return self

    def ordered(self, func, items: Sequence, *args: Any) -> Iterator[tuple[Any, Any]]:
        """``(item, func(item, *args))`` in the order of ``items``, computed as tasks: at most
        ``window`` tasks are submitted or waiting to be consumed (the reorder buffer); results
        are taken with ``as_completed`` and released in order."""
        from distributed import as_completed

        ac = as_completed(loop=self.client.loop)
        key_of: dict[str, int] = {}
        futures: dict[int, Any] = {}
        ready: dict[int, Any] = {}
        nxt_submit = nxt_yield = 0
        opts = {"resources": self.resources} if self.resources else {}
        try:
            while nxt_yield < len(items):
                while nxt_submit < len(items) and nxt_submit - nxt_yield < self.window:
                    fut = self.client.submit(func, items[nxt_submit], self.plugin.name, *args, pure=False,
                                             key=f"napari-bci-{func.__name__}-{uuid.uuid4().hex}", **opts)
                    key_of[fut.key] = nxt_submit
                    futures[nxt_submit] = fut
                    ac.add(fut)
                    nxt_submit += 1
                while nxt_yield not in ready:
                    fut = next(ac)
                    i = key_of.pop(fut.key)
                    ready[i] = self._result(fut, items[i])
                    futures.pop(i, None)
                    fut.release()
                yield items[nxt_yield], ready.pop(nxt_yield)
                nxt_yield += 1
        finally:
            for f in futures.values():
                f.cancel()

    @staticmethod
    def _result(fut, item) -> Any:
        from distributed import KilledWorker

        try:
            return fut.result()
        except KilledWorker as e:
            raise BCIError(f"{item}: workers kept dying while computing it ({e}); "
                           f"finished work is kept, run again to resume") from None

    def info(self) -> dict:
        if self.client is None:
            return {}
        ws = self.client.scheduler_info(n_workers=-1).get("workers", {})
        try:
            devices = sorted(set(self.client.run(_worker_device, self.plugin.name).values()))
        except Exception:
            devices = []
        return {"scheduler": self.client.scheduler.address, "workers": len(ws), "devices": devices,
                "window": self.window, "local": self.cluster is not None}

    def close(self) -> None:
        if self.client is not None and self.plugin is not None and self.cluster is None:
            try:
                self.client.unregister_worker_plugin(self.plugin.name)
            except Exception:
                pass
        if self._own_client and self.client is not None:
            self.client.close()
            self.client = None
        if self.cluster is not None:
            self.cluster.close()
        if self._environ is not None:
            restore_environ(self._environ)
            self._environ = None
            self.cluster = None

    def __enter__(self) -> "Cluster":
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()


class DaskTiles(Cluster):
    """The dask tile producer of one slide run: ``start()``, ``results(todo)``, ``info()``, ``close()``."""

    def __init__(self, plan, model: Any, *, tiles_per_task: int = 1, **kw: Any):
        if plan.source is None:
            raise InputError(None, "distributed generation needs a slide file (workers open it by path)")
        super().__init__(model, **kw)
        self.plan = plan
        self.tiles_per_task = max(1, int(tiles_per_task))
        eng = plan.engine
        self.spec = {"source": str(plan.source), "level": int(eng.level), "tile": int(eng.grid.tile),
                     "halo": int(eng.grid.halo),
                     "batch_size": plan.extra.get("batch_size"),  # None: each worker's device default
                     "mpp": None if plan.mpp is None else float(plan.mpp)}

    def start(self) -> "DaskTiles":
        super().start()
        try:  # open the slide on every worker now, not inside the first task
            self.client.run(_warm_engine, self.plugin.name, self.spec)
        except Exception:
            pass  # a worker that cannot open it reports the error with its first task
        return self

    def results(self, todo: Sequence[tuple[int, int]]) -> Iterator:
        """Results for ``todo`` in its order (see :meth:`Cluster.ordered`)."""
        k = self.tiles_per_task
        chunks = [tuple(todo[i:i + k]) for i in range(0, len(todo), k)]
        for _, res in self.ordered(tiles_task, chunks, self.spec):
            yield from res

    def info(self) -> dict:
        d = super().info()
        d["tiles_per_task"] = self.tiles_per_task
        return d


def patch_results(files: Sequence, model: Any, *, device=None, tile=None, batch_size=None, workers=None,
                  scheduler=None, window=None) -> Iterator[tuple[Any, Any]]:
    """``(file, (image, out-of-domain warning) | InputError)`` for patch files, in order, computed
    on dask workers."""
    with Cluster(model, workers=workers, scheduler=scheduler, device=device, window=window) as cl:
        for f, res in cl.ordered(patch_task, [str(f) for f in files], tile, batch_size):
            yield type(files[0])(f) if files and not isinstance(files[0], str) else f, res


def _warm_engine(plugin_name: str, spec: dict, dask_worker=None) -> None:
    import dask

    p = dask_worker.plugins.get(plugin_name)
    if p is not None:
        with dask.config.set(scheduler="synchronous"):
            p.engine(spec)


def _worker_device(plugin_name: str, dask_worker=None) -> str:
    from distributed import get_worker

    w = dask_worker or get_worker()
    p = w.plugins.get(plugin_name)
    return getattr(getattr(p, "generator", None), "device", "?")
