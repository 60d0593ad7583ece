"""Cell detection on the hematoxylin channel and membrane measurement on the DAB channel.

All sizes are in micrometres and converted with the image's microns-per-pixel (mpp).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi


@dataclass(frozen=True)
class CellParams:
    """Detection and measurement parameters (micrometres / OD units)."""

    #: Gaussian smoothing of the hematoxylin channel before thresholding.
    smooth_um: float = 0.8
    #: Lowest hematoxylin OD accepted as nucleus, whatever Otsu says.
    min_h_od: float = 0.08
    #: Neighbourhood (Gaussian sigma) of the local hematoxylin background, and the ratio over it.
    background_um: float = 8.0
    contrast: float = 1.1
    #: Nucleus area range kept (um^2).
    min_area_um2: float = 10.0
    max_area_um2: float = 300.0
    #: Gaussian sigma of the seed (one maximum per nucleus) image.
    seed_sigma_um: float = 1.5
    #: Weight of the distance transform (capped at 3 um) against the blurred hematoxylin in the
    #: seed image: flat, saturated nuclei that touch are split by their distance maxima.
    seed_distance_weight: float = 0.3
    #: Minimum distance between two nucleus seeds (split touching nuclei).
    seed_distance_um: float = 3.0
    #: Cytoplasm: nucleus labels expanded by this distance (touching cells meet half-way).
    expand_um: float = 5.5
    #: The membrane ring excludes the nucleus dilated by this distance.
    ring_inner_um: float = 1.0
    #: Angular sectors per ring (completeness resolution).
    sectors: int = 16
    #: DAB smoothing before taking each sector's maximum.
    dab_smooth_um: float = 0.25
    #: Half-width of the maximum filter applied to DAB before sampling the ring.
    membrane_reach_um: float = 0.5
    #: Stain-pattern compartments: the membrane band is the cell's outer rim of this width;
    #: the cytoplasm lies between it and the dilated nucleus.
    band_um: float = 1.5
    #: Nucleus-like DAB blobs (see :func:`dab_nuclei`): OD, opening radius, largest area.
    blob_od: float = 0.15
    blob_radius_um: float = 2.0
    blob_max_area_um2: float = 150.0


@dataclass
class Cells:
    """Detected cells: label images and per-cell measurements (index i = label i + 1)."""

    nuclei: np.ndarray  # int32 label image
    cells: np.ndarray  # int32 label image (nuclei expanded)
    centroid: np.ndarray  # (N, 2) float, (x, y) pixels
    area_um2: np.ndarray  # (N,) nucleus area
    minor_um: np.ndarray  # (N,) nucleus minor axis (from second moments)
    major_um: np.ndarray  # (N,) nucleus major axis
    h_mean: np.ndarray  # (N,) mean hematoxylin OD in the nucleus
    sector_dab: np.ndarray  # (N, sectors) max DAB OD per ring sector (nan: empty sector)
    #: (N, 3) mean DAB OD in the nucleus, the cytoplasm and the membrane band (the stain pattern)
    compartments: np.ndarray | None = None

    def __len__(self) -> int:
        return len(self.centroid)


def detect_nuclei(h: np.ndarray, mpp: float, params: CellParams = CellParams(), mask=None) -> np.ndarray:
    """Nucleus label image from hematoxylin OD: a local-contrast threshold (floored at
    ``min_h_od``), seeds at maxima of the blurred hematoxylin plus the distance transform,
    and a marker watershed to split touching nuclei. Small and huge objects are dropped."""
    from skimage.feature import peak_local_max
    from skimage.segmentation import watershed

    px_area = mpp * mpp
    hs = ndi.gaussian_filter(h.astype(np.float32), params.smooth_um / mpp, truncate=3.0)
    # local contrast: a nucleus is darker in hematoxylin than its neighbourhood, which copes with
    # the uneven counterstain under heavy DAB better than one global threshold
    bg = _smooth_coarse(hs, params.background_um / mpp)
    thr = params.min_h_od
    fg = (hs > thr) & (hs > params.contrast * bg)
    if mask is not None:
        fg &= mask
    fg = ndi.binary_opening(fg, iterations=1)
    fg = ndi.binary_fill_holes(fg)
    if not fg.any():
        return np.zeros(h.shape, np.int32)
    # seeds: maxima of the hematoxylin blurred at about a nucleus radius (one blob per nucleus)
    # plus a little distance transform, which favours the middle of flat, saturated nuclei
    dist = ndi.distance_transform_cdt(fg, metric="taxicab").astype(np.float32)
    extra = np.sqrt(max((params.seed_sigma_um / mpp) ** 2 - (params.smooth_um / mpp) ** 2, 0.0))
    blob = ndi.gaussian_filter(hs, extra, truncate=3.0) if extra > 0.3 else hs
    w = params.seed_distance_weight
    score = (1 - w) * blob / max(float(blob[fg].mean()), 1e-6) + w * np.minimum(dist * mpp, 3.0) / 3.0
    score[~fg] = 0
    md = max(int(round(params.seed_distance_um / mpp)), 1)
    peaks = peak_local_max(score, min_distance=md, threshold_abs=1e-6, exclude_border=False)
    markers = np.zeros(h.shape, np.int32)
    markers[peaks[:, 0], peaks[:, 1]] = np.arange(1, len(peaks) + 1, dtype=np.int32)
    labels = watershed(-score, markers, mask=fg).astype(np.int32)
    # size filter
    areas = np.bincount(labels.ravel()) * px_area
    bad = (areas < params.min_area_um2) | (areas > params.max_area_um2)
    bad[0] = True
    keep = np.flatnonzero(~bad)
    lut = np.zeros(len(areas), np.int32)
    lut[keep] = np.arange(1, len(keep) + 1, dtype=np.int32)
    return lut[labels]


def add_dab_nuclei(nuclei: np.ndarray, dab: np.ndarray, mpp: float,
                   params: CellParams = CellParams()) -> np.ndarray:
    """``nuclei`` plus nucleus-like DAB blobs it missed (a nuclear stain such as Ki67, ER or
    PR: brown nuclei with little counterstain). A blob is DAB >= ``blob_od`` that survives an
    opening of radius ``blob_radius_um`` (membranes are thinner and vanish), of nucleus size,
    without a hole (a stained cell's cytoplasm rings its blue nucleus) and touching no detected
    nucleus. Without it a brown nucleus would be read as its neighbours' membrane."""
    from skimage.morphology import disk

    m = dab >= params.blob_od
    if not m.any():
        return nuclei
    r = max(int(round(params.blob_radius_um / mpp)), 1)
    m = ndi.binary_opening(m, structure=disk(r))
    lab, n = ndi.label(m)
    if n == 0:
        return nuclei
    idx = np.arange(1, n + 1)
    area = ndi.sum_labels(np.ones_like(lab), lab, idx) * mpp * mpp
    filled = np.asarray([ndi.binary_fill_holes(lab[sl] == i + 1).sum()
                         for i, sl in enumerate(ndi.find_objects(lab))])
    near = ndi.binary_dilation(nuclei > 0, iterations=max(int(round(1.0 / mpp)), 1))
    touches = ndi.maximum(near, lab, idx).astype(bool)
    ok = ((area >= params.min_area_um2) & (area <= params.blob_max_area_um2) & ~touches
          & (filled * mpp * mpp <= 1.1 * area))
    if not ok.any():
        return nuclei
    lut = np.zeros(n + 1, np.int32)
    lut[1:][ok] = int(nuclei.max()) + np.arange(1, int(ok.sum()) + 1, dtype=np.int32)
    extra = lut[lab]
    return np.where(extra > 0, extra, nuclei).astype(np.int32)


def _smooth_coarse(a: np.ndarray, sigma: float) -> np.ndarray:
    """Gaussian blur with a large ``sigma`` computed on a block-averaged copy (fast)."""
    f = int(max(sigma // 4, 1))
    if f == 1:
        return ndi.gaussian_filter(a, sigma)
    h, w = a.shape
    H, W = -(-h // f) * f, -(-w // f) * f
    p = np.pad(a, ((0, H - h), (0, W - w)), mode="edge")
    small = p.reshape(H // f, f, W // f, f).mean(axis=(1, 3))
    small = ndi.gaussian_filter(small, sigma / f)
    return ndi.zoom(small, f, order=1, grid_mode=True, mode="nearest")[:h, :w]


def _moments(labels: np.ndarray, n: int):
    """Per-label pixel count, centroid (x, y), minor and major axis lengths (pixels)."""
    yy, xx = np.nonzero(labels)
    lab = labels[yy, xx]
    cnt = np.bincount(lab, minlength=n + 1)[1:].astype(np.float64)
    cnt_safe = np.maximum(cnt, 1)
    sx = np.bincount(lab, xx, minlength=n + 1)[1:] / cnt_safe
    sy = np.bincount(lab, yy, minlength=n + 1)[1:] / cnt_safe
    dx = xx - sx[lab - 1]
    dy = yy - sy[lab - 1]
    cxx = np.bincount(lab, dx * dx, minlength=n + 1)[1:] / cnt_safe + 1 / 12
    cyy = np.bincount(lab, dy * dy, minlength=n + 1)[1:] / cnt_safe + 1 / 12
    cxy = np.bincount(lab, dx * dy, minlength=n + 1)[1:] / cnt_safe
    tr, det = cxx + cyy, cxx * cyy - cxy * cxy
    disc = np.sqrt(np.maximum(tr * tr / 4 - det, 0))
    minor = 4 * np.sqrt(np.maximum(tr / 2 - disc, 0))
    major = 4 * np.sqrt(np.maximum(tr / 2 + disc, 0))
    return cnt, np.stack([sx, sy], axis=1), minor, major


def cell_rings(nuclei: np.ndarray, mpp: float, params: CellParams = CellParams()):
    """(cells, inner): each nucleus expanded by ``expand_um`` (nearest nucleus, as skimage's
    expand_labels) and the nuclei dilated by ``ring_inner_um``; a cell's ring is cell minus inner."""
    # one Euclidean distance transform gives both
    dist, (iy, ix) = ndi.distance_transform_edt(nuclei == 0, return_indices=True)
    cells = np.where(dist <= params.expand_um / mpp, nuclei[iy, ix], 0).astype(np.int32)
    return cells, dist <= params.ring_inner_um / mpp


def ring_sectors(cells: np.ndarray, inner: np.ndarray, centroid: np.ndarray, sectors: int):
    """Ring pixels ``(yy, xx)`` and their sector key ``(label - 1) * sectors + angular sector``
    around the cell's nucleus centroid ``(x, y)``."""
    yy, xx = np.nonzero((cells > 0) & ~inner)
    lab = cells[yy, xx]
    ang = np.arctan2(yy - centroid[lab - 1, 1], xx - centroid[lab - 1, 0])
    sec = ((ang + np.pi) / (2 * np.pi) * sectors).astype(np.int64) % sectors
    return yy, xx, (lab.astype(np.int64) - 1) * sectors + sec


def measure_cells(
    nuclei: np.ndarray, h: np.ndarray, dab: np.ndarray, mpp: float, params: CellParams = CellParams(),
    pattern_dab: np.ndarray | None = None,
) -> Cells:
    """Expand nuclei into cells and measure the membrane DAB in ``params.sectors`` angular
    sectors of each cell's ring (cell minus the slightly dilated nucleus), and the mean DAB per
    compartment (of ``pattern_dab`` when given, e.g. DAB from other stain vectors)."""
    n = int(nuclei.max())
    s = params.sectors
    if n == 0:
        z = np.zeros((0,))
        return Cells(nuclei, nuclei.copy(), np.zeros((0, 2)), z, z, z, z, np.zeros((0, s)), np.zeros((0, 3)))
    cells, inner = cell_rings(nuclei, mpp, params)
    cnt, cen, minor, major = _moments(nuclei, n)
    h_mean = np.bincount(nuclei.ravel(), h.ravel(), minlength=n + 1)[1:] / np.maximum(cnt, 1)
    ds = dab.astype(np.float32)
    if params.dab_smooth_um:
        ds = ndi.gaussian_filter(ds, params.dab_smooth_um / mpp, truncate=3.0)
    pd = ds
    if pattern_dab is not None:
        pd = pattern_dab.astype(np.float32)
        if params.dab_smooth_um:
            pd = ndi.gaussian_filter(pd, params.dab_smooth_um / mpp, truncate=3.0)
    comp = _compartment_means(nuclei, cells, inner, pd, n, params.band_um / mpp)
    if params.membrane_reach_um:
        # a membrane within this distance of the ring still counts (cell borders from expanded
        # nuclei are only approximately where the membranes are)
        k = 2 * int(round(params.membrane_reach_um / mpp)) + 1
        ds = ndi.maximum_filter(ds, size=k)
    yy, xx, key = ring_sectors(cells, inner, cen, s)
    out = np.full(n * s, -np.inf, np.float32)
    np.maximum.at(out, key, ds[yy, xx])
    out[~np.isfinite(out)] = np.nan
    return Cells(
        nuclei=nuclei,
        cells=cells,
        centroid=cen,
        area_um2=cnt * mpp * mpp,
        minor_um=minor * mpp,
        major_um=major * mpp,
        h_mean=h_mean,
        sector_dab=out.reshape(n, s),
        compartments=comp,
    )


def _compartment_means(nuclei, cells, inner, dab, n: int, band_px: float) -> np.ndarray:
    """(n, 3) mean DAB per cell in the nucleus, the cytoplasm (between the dilated nucleus and
    the membrane band) and the membrane band (within ``band_px`` of the cell's border with a
    neighbour or the outside). A compartment without pixels reads 0."""
    from skimage.segmentation import find_boundaries

    border = find_boundaries(cells, mode="inner") & (cells > 0)
    band = (ndi.distance_transform_edt(~border) <= max(band_px, 1.0)) & (cells > 0) & ~inner
    cyto = (cells > 0) & ~inner & ~band
    out = np.zeros((n, 3), np.float32)
    for j, (lab, m) in enumerate(((nuclei, nuclei > 0), (cells, cyto), (cells, band))):
        idx = lab[m]
        cnt = np.bincount(idx, minlength=n + 1)[1:]
        tot = np.bincount(idx, dab[m], minlength=n + 1)[1:]
        out[:, j] = np.where(cnt > 0, tot / np.maximum(cnt, 1), 0.0)
    return out
