"""Procedural tissue scene shared by the patch generator and the lazy whole-slide pyramid.

The scene is a deterministic function of (seed, position): low-frequency fields (tissue, tumour
nests, fat, lymphocyte density, collagen fibres) are hashed value noise evaluated at physical
positions (micrometres, H&E frame), and cells sit on jittered lattices whose sites are hashed
too. Any window of either section (H&E, or the IHC through the known transform) at any pyramid
level can therefore be rendered on its own, and neighbouring windows agree exactly.
"""

from __future__ import annotations

import io
from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from scipy import ndimage as ndi

from .. import stain
from ..levels import HER2_LEVELS
from ..transform import Transform


_NEUTRAL = np.full(3, 1 / np.sqrt(3), np.float32)
#: Eosin OD direction measured on pink stroma of the reference H&E scans (tests/data).
_EOSIN_SCANNED = np.array([0.15, 0.85, 0.50]) / np.linalg.norm([0.15, 0.85, 0.50])

# membrane classes (ASCO/CAP vocabulary)
M_NONE, M_FAINT, M_WEAK, M_INTENSE = 0, 1, 2, 3
# cell kinds
K_TUMOUR, K_FIBRO, K_LYMPH, K_ENDO = 0, 1, 2, 3

_M1 = np.uint64(0x9E3779B97F4A7C15)
_M2 = np.uint64(0xC2B2AE3D27D4EB4F)
_M3 = np.uint64(0xFF51AFD7ED558CCD)
_M4 = np.uint64(0xC4CEB9FE1A85EC53)
_S33 = np.uint64(33)
_S11 = np.uint64(11)


def _hash_u64(ix, iy, salt: int) -> np.ndarray:
    ix = np.asarray(ix, dtype=np.int64).astype(np.uint64)
    iy = np.asarray(iy, dtype=np.int64).astype(np.uint64)
    with np.errstate(over="ignore"):
        h = ix * _M1 ^ (iy + np.uint64(salt & 0xFFFFFFFFFFFF) * _M3) * _M2
        h ^= h >> _S33
        h *= _M3
        h ^= h >> _S33
        h *= _M4
        h ^= h >> _S33
    return h


def hash01(ix, iy, salt: int) -> np.ndarray:
    """Uniform [0, 1) float64 per integer lattice site."""
    return (_hash_u64(ix, iy, salt) >> _S11).astype(np.float64) * (1.0 / 9007199254740992.0)


def vnoise(x, y, salt: int) -> np.ndarray:
    """Value noise in [-1, 1] with quintic interpolation; lattice spacing 1."""
    x = np.asarray(x, dtype=np.float64)
    y = np.asarray(y, dtype=np.float64)
    ixf = np.floor(x)
    iyf = np.floor(y)
    fx = x - ixf
    fy = y - iyf
    fx = fx * fx * fx * (fx * (fx * 6 - 15) + 10)
    fy = fy * fy * fy * (fy * (fy * 6 - 15) + 10)
    ix = ixf.astype(np.int64)
    iy = iyf.astype(np.int64)
    if ix.size > 64:
        # hash the few lattice sites once, then gather (same values as hashing per point)
        x0, y0 = int(ix.min()), int(iy.min())
        nx, ny = int(ix.max()) - x0 + 2, int(iy.max()) - y0 + 2
        if nx * ny <= 4 * ix.size:
            gy, gx = np.mgrid[y0 : y0 + ny, x0 : x0 + nx]
            table = hash01(gx, gy, salt).ravel()
            k = (iy - y0) * nx + (ix - x0)
            v00, v10 = table[k], table[k + 1]
            v01, v11 = table[k + nx], table[k + nx + 1]
            a = v00 + (v10 - v00) * fx
            b = v01 + (v11 - v01) * fx
            return 2.0 * (a + (b - a) * fy) - 1.0
    v00 = hash01(ix, iy, salt)
    v10 = hash01(ix + 1, iy, salt)
    v01 = hash01(ix, iy + 1, salt)
    v11 = hash01(ix + 1, iy + 1, salt)
    a = v00 + (v10 - v00) * fx
    b = v01 + (v11 - v01) * fx
    return 2.0 * (a + (b - a) * fy) - 1.0


_ROT = [(np.cos(a), np.sin(a)) for a in (0.0, 0.61, 1.27, 2.03, 2.71, 0.37)]


def fbm(x, y, scale: float, salt: int, octaves: int = 3, gain: float = 0.5) -> np.ndarray:
    """Fractal value noise (std about 0.3) with feature size ``scale`` (same units as x, y);
    each octave's lattice is rotated so no axis-aligned grain shows."""
    out = 0.0
    amp = 1.0
    norm = 0.0
    f = 1.0 / scale
    for o in range(octaves):
        c, s = _ROT[o % len(_ROT)]
        xr = (x * c - y * s) * f
        yr = (x * s + y * c) * f
        out = out + amp * vnoise(xr + 17.3 * o, yr - 9.1 * o, salt * 131 + o)
        norm += amp
        amp *= gain
        f *= 2.03
    return out / norm


def smoothstep(e0, e1, x):
    t = np.clip((x - e0) / (e1 - e0), 0.0, 1.0)
    return t * t * (3 - 2 * t)


@lru_cache(maxsize=8)
def _noise_tile(salt: int, sigma: float, period: int = 509) -> np.ndarray:
    """A periodic band-limited noise tile (zero mean, unit std), float32."""
    yy, xx = np.mgrid[0:period, 0:period]
    n = hash01(xx, yy, salt).astype(np.float32) - 0.5
    if sigma > 0:
        n = ndi.gaussian_filter(n, sigma, mode="wrap")
    n -= n.mean()
    n /= n.std() + 1e-9
    return n.astype(np.float32)


def noise_window(salt: int, sigma: float, y0: int, x0: int, h: int, w: int) -> np.ndarray:
    """The periodic noise tile looked up at global pixel indices (seamless across windows)."""
    t = _noise_tile(salt, sigma)
    p = t.shape[0]
    ys = np.arange(y0, y0 + h) % p
    xs = np.arange(x0, x0 + w) % p
    return t[ys[:, None], xs[None, :]]


# ------------------------------------------------------------------------------------------
# HER2 level parameters


@dataclass(frozen=True)
class LevelParams:
    # probabilities of membrane classes among tumour cells (none, faint, weak-moderate, intense)
    mclass_p: tuple
    nuc_scale: float  # tumour nucleus size factor (H&E cue)
    pleo: float  # relative sd of nucleus size (pleomorphism)
    nuc_od: float  # hematoxylin OD of tumour nuclei (hyperchromasia)
    nest_bias: float  # more/denser tumour at higher levels
    cyto_e: float  # cytoplasm eosin
    cyto_dab: float  # faint cytoplasmic DAB in stained cells
    spacing: float  # tumour cell spacing, um


LEVELS = {
    "0": LevelParams((0.95, 0.05, 0.0, 0.0), 1.00, 0.10, 0.50, -0.04, 0.20, 0.00, 15.5),
    "1+": LevelParams((0.38, 0.58, 0.04, 0.0), 1.05, 0.13, 0.54, 0.00, 0.22, 0.01, 15.5),
    "2+": LevelParams((0.14, 0.24, 0.57, 0.05), 1.12, 0.16, 0.60, 0.04, 0.25, 0.02, 15.5),
    "3+": LevelParams((0.03, 0.05, 0.14, 0.78), 1.20, 0.20, 0.66, 0.08, 0.28, 0.04, 15.5),
}


def check_level(her2) -> str:
    s = str(her2).strip()
    if s in ("1", "2", "3"):
        s += "+"
    if s not in HER2_LEVELS:
        raise ValueError(f"her2 must be one of {HER2_LEVELS}, got {her2!r}")
    return s


# ------------------------------------------------------------------------------------------


class Scene:
    """The procedural tissue of one (seed, HER2 level) case.

    ``kind="patch"``: tissue almost everywhere (a BCI-style field of view);
    ``kind="slide"``: tissue pieces on glass within ``extent_um`` (w, h), with tumour, stroma
    and fat regions and regional HER2 heterogeneity.
    """

    def __init__(self, seed: int, her2: str, mpp: float, kind: str = "patch", extent_um=None):
        self.seed = int(seed)
        self.her2 = check_level(her2)
        self.mpp = float(mpp)
        self.kind = kind
        self.extent_um = extent_um
        rng = np.random.default_rng([self.seed, 7711, HER2_LEVELS.index(self.her2)])
        p = LEVELS[self.her2]
        self.p = p
        # imperfect H&E cue: per-case jitter of the level-related morphology
        self.nuc_scale = p.nuc_scale * rng.uniform(0.94, 1.06)
        self.nuc_od = p.nuc_od * rng.uniform(0.93, 1.07)
        self.pleo = p.pleo * rng.uniform(0.8, 1.2)
        self.nest_bias = p.nest_bias + rng.uniform(-0.05, 0.05)
        self.cyto_e = p.cyto_e * rng.uniform(0.9, 1.1)
        self.spacing = p.spacing * rng.uniform(0.95, 1.05)
        self.fat_bias = rng.uniform(-0.12, 0.0) if kind == "patch" else 0.0
        # stain appearance of this case (H&E and IHC stained separately)
        m = self._perturbed_matrix(rng, 0.06)
        self.he_matrix = np.stack([m[0], m[1], _NEUTRAL])  # H, E, neutral (scanner desaturation)
        m = self._perturbed_matrix(rng, 0.05)
        self.ihc_matrix = np.stack([m[0], _NEUTRAL, m[2]])  # H, neutral, DAB
        self.neutral = rng.uniform(0.15, 0.3)
        self.he_gain = rng.uniform(0.92, 1.08, size=2)  # H, E intensity
        self.ihc_gain = rng.uniform(0.9, 1.1, size=2)  # H, DAB
        self.bg_od = rng.uniform(0.008, 0.025)
        # slide-scale features shrink with a small slide so it still shows several regions
        self.macro = float(np.clip(min(extent_um) / 8192.0, 0.3, 2.0)) if extent_um else 1.0
        self.salt = (self.seed * 1000003) & 0xFFFFFFFF

    @staticmethod
    def _perturbed_matrix(rng, amount: float) -> np.ndarray:
        """Ruifrok H, E, DAB vectors, each jittered per case; the eosin vector is moved part of
        the way toward the eosin measured on the reference scans (which absorbs more blue)."""
        e = np.asarray(stain.EOSIN) / np.linalg.norm(stain.EOSIN)
        e = e + rng.uniform(0.45, 0.85) * (_EOSIN_SCANNED - e)
        rows = []
        for v in (stain.HEMATOXYLIN, e, stain.DAB):
            v = np.asarray(v) / np.linalg.norm(v) * (1.0 + rng.uniform(-amount, amount, 3))
            v = np.clip(v, 0.01, None)
            rows.append(v / np.linalg.norm(v))
        return np.stack(rows).astype(np.float32)

    # -- fields (positions in um, H&E frame) -----------------------------------------------
    def fields(self, x: np.ndarray, y: np.ndarray, keys=None) -> dict:
        """Scene fields at H&E positions (um); ``keys`` limits which are computed."""
        s = self.salt
        want = set(keys) if keys is not None else {
            "tissue", "nest", "fat", "lumen", "lymph", "het", "stainvar", "fib_a", "fib_b", "fib_w", "crack"}
        f = {}
        slide = self.kind == "slide"
        if slide:
            w, h = self.extent_um
        need_region = slide and want & {"nest", "fat", "lumen", "lymph"}
        M = self.macro
        region = fbm(x, y, 1800.0 * M, s + 3, 3) if need_region else 0.0
        if "tissue" in want:
            if slide:
                r = np.maximum(np.abs(x - w / 2) / (0.42 * w), np.abs(y - h / 2) / (0.42 * h))
                t = fbm(x, y, 1400.0 * M, s + 1, 4) + 0.3 - 2.7 * np.maximum(r - 0.55, 0) ** 1.5
                t = t + 0.04 * fbm(x, y, 60.0, s + 2, 2)  # ragged edges
            else:
                t = fbm(x, y, 220.0, s + 1, 3) + 0.45 + 0.03 * fbm(x, y, 15.0, s + 2, 2)
            f["tissue"] = smoothstep(0.0, 0.001 if slide else 0.004, t)
        nest = None
        if want & {"nest", "lumen", "lymph"}:
            nest = fbm(x, y, 140.0, s + 7, 3) + self.nest_bias
            if slide:
                nest = nest + np.minimum(0.0, (region - 0.14) * 2.5)
            f["nest"] = nest
        if "fat" in want:
            if slide:
                f["fat"] = fbm(x, y, 900.0 * M, s + 4, 3) - 0.12 - 0.6 * np.maximum(region + 0.05, 0)
            else:
                f["fat"] = fbm(x, y, 260.0, s + 4, 2) - 0.22 + self.fat_bias
        if "het" in want:
            # regional HER2 heterogeneity (scales the fraction of stained cells)
            if slide:
                f["het"] = np.clip(1.0 + 0.9 * fbm(x, y, 1200.0 * M, s + 5, 2), 0.3, 1.4)
            else:
                f["het"] = np.clip(1.0 + 0.25 * fbm(x, y, 400.0, s + 5, 2), 0.7, 1.3)
        if "stainvar" in want:
            amp = 0.25 if slide else 0.08
            f["stainvar"] = 1.0 + amp * fbm(x, y, 2500.0 * M if slide else 600.0, s + 6, 2)
        if "lumen" in want:
            f["lumen"] = fbm(x, y, 35.0, s + 8, 2) - 0.45 + 1.6 * np.minimum(nest - 0.05, 0)
        if "lymph" in want:
            f["lymph"] = fbm(x, y, 160.0, s + 9, 2) + 0.2 * smoothstep(-0.15, 0.0, nest) - 0.17
        if want & {"fib_a", "fib_b", "fib_w", "crack"}:
            # collagen: two families of wavy parallel fibres (phase = distance across the
            # fibres / spacing + a smooth wobble, so iso-lines never close into loops), mixed by
            # a slowly varying weight; cracks open between bundles
            for key, ang, k in (("fib_a", 0.45, 0), ("fib_b", 2.0, 1)):
                c, sn = np.cos(ang), np.sin(ang)
                u = x * c + y * sn
                v = -x * sn + y * c
                if key in want or "crack" in want:
                    ph = u / 7.0 + 5.0 * fbm(u * 0.3, v, 40.0, s + 11 + 3 * k, 2) \
                        + 6.0 * fbm(x, y, 220.0, s + 12 + 3 * k, 1)
                    f[key] = ph
            if "fib_w" in want or "crack" in want:
                f["fib_w"] = smoothstep(-0.12, 0.12, fbm(x, y, 350.0, s + 20, 2))
            if "crack" in want:
                f["crack"] = 0.6 * vnoise(x / 30.0, y / 30.0, s + 13)
        return f

    # -- cells -----------------------------------------------------------------------------
    def _lattice(self, box, spacing: float, salt: int, jitter: float):
        x0, y0, x1, y1 = box
        jx = np.arange(int(np.floor(x0 / spacing)) - 1, int(np.ceil(x1 / spacing)) + 1)
        jy = np.arange(int(np.floor(y0 / spacing)) - 1, int(np.ceil(y1 / spacing)) + 1)
        JX, JY = np.meshgrid(jx, jy)
        JX = JX.ravel()
        JY = JY.ravel()
        px = (JX + 0.5 + jitter * (hash01(JX, JY, salt) - 0.5)) * spacing
        py = (JY + 0.5 + jitter * (hash01(JX, JY, salt + 1) - 0.5)) * spacing
        keep = (px >= x0) & (px < x1) & (py >= y0) & (py < y1)
        return JX[keep], JY[keep], px[keep], py[keep]

    def cells(self, box) -> dict:
        """All cells whose centre lies in ``box`` = (x0, y0, x1, y1) um, H&E frame; lengths in um."""
        s = self.salt
        out = []
        # tumour cells (membranes form a Voronoi tessellation)
        sp = self.spacing
        JX, JY, px, py = self._lattice(box, sp, s + 100, 0.85)
        f = self.fields(px, py, ("nest", "lumen", "tissue", "het"))
        keep = (f["nest"] > 0) & (f["lumen"] < 0) & (f["tissue"] > 0.5)
        JX, JY, px, py = JX[keep], JY[keep], px[keep], py[keep]
        het = f["het"][keep]
        n = len(px)
        h = lambda k: hash01(JX, JY, s + 200 + k)  # noqa: E731
        size = self.nuc_scale * 5.6 * np.exp(1.3 * self.pleo * _gauss(h(0), h(1)))
        aspect = 0.6 + 0.38 * h(2)
        a = size / np.sqrt(aspect)
        b = size * np.sqrt(aspect)
        od = self.nuc_od * np.exp(0.12 * _gauss(h(3), h(4)))
        # membrane class, stained fraction modulated by regional heterogeneity
        pm = np.asarray(self.p.mclass_p, dtype=np.float64)
        u = h(5)
        stained_p = np.clip((1.0 - pm[0]) * het, 0.0, 1.0)
        cls = np.zeros(n, dtype=np.int8)
        # split the stained part in proportion to the level's faint/weak/intense shares
        rel = pm[1:] / max(pm[1:].sum(), 1e-9)
        q = (u - (1.0 - stained_p)) / np.maximum(stained_p, 1e-9)
        st = u >= (1.0 - stained_p)
        c1 = st & (q < rel[0])
        c2 = st & (q >= rel[0]) & (q < rel[0] + rel[1])
        c3 = st & (q >= rel[0] + rel[1])
        cls[c1], cls[c2], cls[c3] = M_FAINT, M_WEAK, M_INTENSE
        v = h(6)
        comp = np.zeros(n)
        comp[c1] = 0.25 + 0.5 * v[c1]
        comp[c2] = 0.9 + 0.1 * v[c2]
        comp[c3] = 0.97 + 0.03 * v[c3]
        mod = np.zeros(n)
        w = h(7)
        mod[c1] = 0.10 + 0.10 * w[c1]
        mod[c2] = 0.28 + 0.22 * w[c2]
        mod[c3] = 0.9 + 0.5 * w[c3]
        out.append(
            dict(
                x=px, y=py, kind=np.full(n, K_TUMOUR, np.int8), a=a, b=b, theta=np.pi * h(8), od=od,
                tex=np.full(n, 0.45), nucleoli=(h(9) < 0.3 + 0.5 * (self.nuc_scale - 1) * 4).astype(np.int8),
                mclass=cls, comp=comp, mod=mod, arc0=2 * np.pi * h(10), cyto=0.7 + 0.55 * h(14),
                in_he=h(11) > 0.03, in_ihc=h(12) > 0.03, ihc_scale=0.88 + 0.2 * h(13),
                site=_site(JX, JY, 0),
            )
        )
        # stromal fibroblasts: elongated along the fibres
        JX, JY, px, py = self._lattice(box, 11.0, s + 300, 1.0)
        f = self.fields(px, py, ("nest", "fat", "tissue", "fib_a", "fib_b", "fib_w"))
        stroma = (f["nest"] < -0.02) & (f["fat"] < -0.03) & (f["tissue"] > 0.5)
        h = lambda k: hash01(JX, JY, s + 400 + k)  # noqa: E731
        keep = stroma & (h(0) < 0.32)
        # orientation: along the dominant fibre family's iso-lines
        e = 0.5
        key = np.where(f["fib_w"] > 0.5, "fib_a", "fib_b")
        fx = {k: self.fields(px + e, py, (k,))[k] - f[k] for k in ("fib_a", "fib_b")}
        fy = {k: self.fields(px, py + e, (k,))[k] - f[k] for k in ("fib_a", "fib_b")}
        gx = np.where(key == "fib_a", fx["fib_a"], fx["fib_b"])
        gy = np.where(key == "fib_a", fy["fib_a"], fy["fib_b"])
        theta = np.arctan2(gy, gx) + np.pi / 2 + 0.3 * (h(1) - 0.5)
        k = keep
        n = int(k.sum())
        out.append(
            dict(
                x=px[k], y=py[k], kind=np.full(n, K_FIBRO, np.int8), a=(4.5 + 3.0 * h(2))[k],
                b=(1.1 + 0.6 * h(3))[k], theta=theta[k], od=(0.62 + 0.2 * h(4))[k], tex=np.full(n, 0.2),
                nucleoli=np.zeros(n, np.int8), mclass=np.zeros(n, np.int8), comp=np.zeros(n), mod=np.zeros(n),
                arc0=np.zeros(n), cyto=np.ones(n), in_he=h(5)[k] > 0.03, in_ihc=h(6)[k] > 0.03,
                ihc_scale=(0.88 + 0.2 * h(7))[k],
                site=_site(JX[k], JY[k], 1),
            )
        )
        # lymphocytes: small, round, dark, in clusters
        JX, JY, px, py = self._lattice(box, 7.0, s + 500, 0.9)
        f = self.fields(px, py, ("nest", "fat", "tissue", "lymph"))
        stroma = (f["nest"] < -0.01) & (f["fat"] < 0.0) & (f["tissue"] > 0.5)
        h = lambda k: hash01(JX, JY, s + 600 + k)  # noqa: E731
        k = stroma & (h(0) < np.clip(f["lymph"] * 2.5, 0.01, 0.85))
        n = int(k.sum())
        r = (3.0 + 0.6 * h(1))[k]
        asp = (0.85 + 0.15 * h(2))[k]
        out.append(
            dict(
                x=px[k], y=py[k], kind=np.full(n, K_LYMPH, np.int8), a=r / np.sqrt(asp), b=r * np.sqrt(asp),
                theta=(np.pi * h(3))[k], od=(0.85 + 0.2 * h(4))[k], tex=np.full(n, 0.15),
                nucleoli=np.zeros(n, np.int8), mclass=np.zeros(n, np.int8), comp=np.zeros(n), mod=np.zeros(n),
                arc0=np.zeros(n), cyto=np.ones(n), in_he=h(5)[k] > 0.03, in_ihc=h(6)[k] > 0.03,
                ihc_scale=(0.9 + 0.15 * h(7))[k],
                site=_site(JX[k], JY[k], 2),
            )
        )
        V = self.vessels(box)
        if len(V["x"]):
            # no stromal cells inside vessels (lumen + wall)
            for o in out[1:]:
                o_keep = ~_inside_vessels(V, o["x"], o["y"], 1.0)
                for key in o:
                    o[key] = o[key][o_keep]
            # flat endothelial nuclei along each lumen
            ex, ey, eth, vid, eix = [], [], [], [], []
            for i in range(len(V["x"])):
                m = int(np.clip(2 * np.pi * np.sqrt(V["a"][i] * V["b"][i]) / 14.0, 3, 12))
                t = 2 * np.pi * (np.arange(m) + hash01(np.full(m, V["site"][i]), np.arange(m), s + 810)) / m
                ct, st = np.cos(V["theta"][i]), np.sin(V["theta"][i])
                lx, ly = (V["a"][i] + 1.0) * np.cos(t), (V["b"][i] + 1.0) * np.sin(t)
                ex.append(V["x"][i] + ct * lx - st * ly)
                ey.append(V["y"][i] + st * lx + ct * ly)
                # tangent direction of the ellipse at t
                tx, ty = -V["a"][i] * np.sin(t), V["b"][i] * np.cos(t)
                eth.append(np.arctan2(st * tx + ct * ty, ct * tx - st * ty))
                vid.append(np.full(m, V["site"][i]))
                eix.append(np.arange(m))
            ex, ey, eth, vid, eix = map(np.concatenate, (ex, ey, eth, vid, eix))
            n = len(ex)
            hh = lambda k: hash01(vid, eix, s + 820 + k)  # noqa: E731
            out.append(dict(
                x=ex, y=ey, kind=np.full(n, K_ENDO, np.int8), a=4.0 + 2.0 * hh(0), b=0.9 + 0.4 * hh(1), theta=eth,
                od=0.6 + 0.2 * hh(2), tex=np.full(n, 0.15), nucleoli=np.zeros(n, np.int8),
                mclass=np.zeros(n, np.int8), comp=np.zeros(n), mod=np.zeros(n), arc0=np.zeros(n), cyto=np.ones(n),
                in_he=hh(3) > 0.03, in_ihc=hh(4) > 0.03, ihc_scale=0.9 + 0.15 * hh(5), site=vid * 64 + eix,
            ))
        keep_box = [(o["x"] >= box[0]) & (o["x"] < box[2]) & (o["y"] >= box[1]) & (o["y"] < box[3]) for o in out]
        return {key: np.concatenate([o[key][kb] for o, kb in zip(out, keep_box)]) for key in out[0]}

    def vessels(self, box) -> dict:
        """Small vessels (capillaries, venules) in the stroma; lengths in um (lumen half-axes a, b)."""
        pad = 40.0
        b2 = (box[0] - pad, box[1] - pad, box[2] + pad, box[3] + pad)
        JX, JY, px, py = self._lattice(b2, 95.0, self.salt + 800, 0.8)
        f = self.fields(px, py, ("nest", "fat", "tissue"))
        h = lambda k: hash01(JX, JY, self.salt + 900 + k)  # noqa: E731
        keep = (f["nest"] < -0.1) & (f["fat"] < -0.05) & (f["tissue"] > 0.5) & (h(0) < 0.7)
        a = 4.0 + 20.0 * h(1) ** 2
        return dict(x=px[keep], y=py[keep], a=a[keep], b=(a * (0.35 + 0.6 * h(2)))[keep],
                    theta=(np.pi * h(3))[keep], wall=(1.5 + 0.25 * a)[keep], rbc=h(4)[keep],
                    site=_site(JX[keep], JY[keep], 3))

    def adipocytes(self, box) -> tuple[np.ndarray, np.ndarray]:
        JX, JY, px, py = self._lattice(box, 48.0, self.salt + 700, 0.8)
        f = self.fields(px, py, ("fat", "nest", "tissue"))
        keep = (f["fat"] > 0) & (f["nest"] < -0.05) & (f["tissue"] > 0.5)
        return px[keep], py[keep]


def _inside_vessels(V, x, y, margin_um: float) -> np.ndarray:
    """Which points (um) lie inside a vessel (lumen + wall + margin)."""
    inside = np.zeros(len(x), bool)
    for i in range(len(V["x"])):
        c, s = np.cos(V["theta"][i]), np.sin(V["theta"][i])
        dx, dy = x - V["x"][i], y - V["y"][i]
        u = (c * dx + s * dy) / (V["a"][i] + V["wall"][i] + margin_um)
        v = (-s * dx + c * dy) / (V["b"][i] + V["wall"][i] + margin_um)
        inside |= u * u + v * v < 1.0
    return inside


def _gauss(u1, u2):
    """Box-Muller standard normal from two uniforms."""
    return np.sqrt(-2.0 * np.log(np.maximum(u1, 1e-12))) * np.cos(2 * np.pi * u2)


def _site(jx, jy, lattice):
    return (np.asarray(jx, np.int64) * 1000003 + np.asarray(jy, np.int64)) * 4 + lattice


# ------------------------------------------------------------------------------------------
# rendering


def jpeg_roundtrip(rgb: np.ndarray, quality: int = 88) -> np.ndarray:
    """JPEG-compress (4:4:4, so 8x8 blocks are independent) and decode."""
    from PIL import Image

    buf = io.BytesIO()
    Image.fromarray(rgb).save(buf, format="JPEG", quality=quality, subsampling=0)
    buf.seek(0)
    return np.asarray(Image.open(buf).convert("RGB"))


def _upsample(nodes: np.ndarray, g: int, oy: int, ox: int, h: int, w: int) -> np.ndarray:
    """Bilinear upsampling of node values (node (j, i) at pixel (j*g, i*g) relative to the
    node origin) onto pixels ``oy..oy+h, ox..ox+w`` relative to the same origin."""
    if g == 1:
        return nodes[oy : oy + h, ox : ox + w]
    ys = np.arange(oy, oy + h)
    xs = np.arange(ox, ox + w)
    jy = ys // g
    ty = ((ys - jy * g) / g).astype(np.float32)
    jx = xs // g
    tx = ((xs - jx * g) / g).astype(np.float32)
    a = nodes[:, jx] * (1 - tx) + nodes[:, jx + 1] * tx
    return a[jy] * (1 - ty)[:, None] + a[jy + 1] * ty[:, None]


class Frame:
    """Where a window is rendered: the H&E section (identity) or the IHC section (through
    ``transform``, which maps H&E -> IHC level-0 pixels)."""

    def __init__(self, transform: Transform | None):
        self.t = transform

    def to_he(self, pts: np.ndarray) -> np.ndarray:  # frame level-0 px -> H&E level-0 px
        return pts if self.t is None else self.t.backward(pts)

    def from_he(self, pts: np.ndarray) -> np.ndarray:
        return pts if self.t is None else self.t.forward(pts)

    def jacobian(self, pts_he: np.ndarray, eps: float = 2.0) -> np.ndarray:
        """Local 2x2 Jacobian of H&E -> frame at H&E points, (N, 2, 2)."""
        n = len(pts_he)
        if self.t is None:
            return np.broadcast_to(np.eye(2), (n, 2, 2))
        p0 = self.from_he(pts_he)
        px = self.from_he(pts_he + [eps, 0])
        py = self.from_he(pts_he + [0, eps])
        return np.stack([(px - p0) / eps, (py - p0) / eps], axis=2)


def _field_nodes(scene, frame, wy0, wx0, wh, ww, d, keys, g=None):
    """Scene fields at nodes every ``g`` pixels of the window, upsampled to the window."""
    g = g or max(1, 4 // d)
    ny0, nx0 = wy0 // g, wx0 // g
    ny1 = -(-(wy0 + wh) // g) + 1
    nx1 = -(-(wx0 + ww) // g) + 1
    NY, NX = np.mgrid[ny0:ny1, nx0:nx1]
    pts = np.stack([(NX * g + 0.5) * d - 0.5, (NY * g + 0.5) * d - 0.5], -1).reshape(-1, 2).astype(np.float64)
    pts_he = frame.to_he(pts) * scene.mpp
    F = scene.fields(pts_he[:, 0], pts_he[:, 1], keys)
    oy, ox = wy0 - ny0 * g, wx0 - nx0 * g
    return {k: _upsample(np.asarray(v, np.float32).reshape(NY.shape), g, oy, ox, wh, ww) for k, v in F.items()}


def _voronoi_stamp(cx, cy, r, d1, d2, id1, i, wh, ww, offset=0.0, wiggle=None):
    """Update nearest/second-nearest distances (and the nearest id) with one site; ``offset``
    enlarges its cell (power-diagram-like), ``wiggle`` (an array over the window, px) bends
    its borders."""
    ya, yb = max(int(cy) - r, 0), min(int(cy) + r + 2, wh)
    xa, xb = max(int(cx) - r, 0), min(int(cx) + r + 2, ww)
    if ya >= yb or xa >= xb:
        return
    dy = np.arange(ya, yb, dtype=np.float32) - np.float32(cy)
    dx = np.arange(xa, xb, dtype=np.float32) - np.float32(cx)
    dist = np.sqrt(dy[:, None] ** 2 + dx[None, :] ** 2)
    if offset:
        dist -= np.float32(offset)
    if wiggle is not None:
        dist += wiggle[ya:yb, xa:xb]
    s1 = d1[ya:yb, xa:xb]
    s2 = d2[ya:yb, xa:xb]
    closer = dist < s1
    np.minimum(s2, dist, out=s2)
    np.copyto(s2, s1, where=closer)
    np.copyto(s1, dist, where=closer)
    if id1 is not None:
        id1[ya:yb, xa:xb][closer] = i


def _stamp_nuclei(idx, C, cxw, cyw, inv, det, sc, chrom, cytotex, id1, nucH, nuc_gain, tex_gain, is_ihc,
                  batch: int = 256):
    """Draw the nuclei ``idx`` into ``nucH`` (max-composited), vectorised over cells of similar size:
    each is an ellipse (inverse map ``inv``) with a vesicular profile, clipped to its own cell."""
    if not len(idx):
        return
    wh, ww = nucH.shape
    r = np.ceil(np.maximum(C["a"][idx], C["b"][idx]) * sc[idx] * 1.1).astype(int) + 2
    rb = (r + 3) // 4 * 4  # size buckets: little wasted work, few passes
    for R in np.unique(rb):
        grp = idx[rb == R]
        off = np.arange(-R, R + 2)
        for k0 in range(0, len(grp), batch):
            g = grp[k0 : k0 + batch]
            iy = np.floor(cyw[g]).astype(int)
            ix = np.floor(cxw[g]).astype(int)
            yy = iy[:, None, None] + off[None, :, None]
            xx = ix[:, None, None] + off[None, None, :]
            valid = (yy >= 0) & (yy < wh) & (xx >= 0) & (xx < ww)
            yc, xc = np.broadcast_arrays(np.clip(yy, 0, wh - 1), np.clip(xx, 0, ww - 1))
            dy = (yy - cyw[g][:, None, None]).astype(np.float32)
            dx = (xx - cxw[g][:, None, None]).astype(np.float32)
            q = inv[g].astype(np.float32)[:, :, None, None]
            u = q[:, 0] * dx + q[:, 1] * dy
            v = q[:, 2] * dx + q[:, 3] * dy
            ch = chrom[yc, xc]
            rho = np.sqrt(u * u + v * v) + 0.04 * ch + 0.05 * cytotex[yc, xc]
            aa = np.sqrt(np.abs(det[g])).astype(np.float32)[:, None, None]
            edge = np.clip((1.0 - rho) * (0.5 * aa + 0.5), 0.0, 1.0)
            # vesicular nucleus: paler interior with chromatin granules, dark nuclear membrane, nucleolus
            tx = (C["tex"][g] * tex_gain).astype(np.float32)[:, None, None]
            val = (0.45 - 0.3 * tx) + tx * (0.25 * ch + 0.35 * np.maximum(ch, 0.0)) \
                + (0.2 + 0.7 * tx) * np.exp(-(((rho - 0.9) * 9.0) ** 2))
            if not is_ihc:
                nl = (C["nucleoli"][g] > 0).astype(np.float32)[:, None, None]
                val = val + 0.6 * nl * np.exp(-((u - 0.25) ** 2 + (v + 0.1) ** 2) * 30.0)
            val = np.maximum(val, 0.0) * edge * (C["od"][g] * nuc_gain).astype(np.float32)[:, None, None]
            tum = (C["kind"][g] == K_TUMOUR)[:, None, None]
            keep = valid & (edge > 0) & (~tum | (id1[yc, xc] == g[:, None, None]))  # inside its own cell
            np.maximum.at(nucH, (yc[keep], xc[keep]), val[keep])


def render_window(scene: Scene, section: str, frame: Frame, y0: int, x0: int, h: int, w: int,
                  d: int = 1, margin: int = 24, with_truth: bool = False, jpeg: bool = True):
    """Render ``section`` ("he" or "ihc") pixels [y0:y0+h, x0:x0+w] of the pyramid level with
    downsample ``d`` of ``frame``; returns RGB uint8 (and, when asked, a truth dict)."""
    if d >= 4:
        return _render_meanfield(scene, section, frame, y0, x0, h, w, d, margin, jpeg)
    mpp0 = scene.mpp
    is_ihc = section == "ihc"
    m = margin  # a multiple of 8, so JPEG blocks align across windows
    wy0, wx0 = y0 - m, x0 - m
    wh, ww = h + 2 * m, w + 2 * m
    up = _field_nodes(scene, frame, wy0, wx0, wh, ww, d,
                      ("tissue", "nest", "lumen", "fib_a", "fib_b", "fib_w", "crack", "stainvar"))
    # H&E-frame bounding box (um) of the window, for the cells
    corners = np.array([[wx0, wy0], [wx0 + ww, wy0], [wx0, wy0 + wh], [wx0 + ww, wy0 + wh]], float) * d
    bb = frame.to_he(corners) * mpp0
    pad = 40.0 + 4 * d * mpp0
    box = (bb[:, 0].min() - pad, bb[:, 1].min() - pad, bb[:, 0].max() + pad, bb[:, 1].max() + pad)
    C = scene.cells(box)
    n = len(C["x"])
    present = C["in_ihc"] if is_ihc else C["in_he"]
    he_px = np.stack([C["x"], C["y"]], 1) / mpp0
    fr_px = frame.from_he(he_px) if n else he_px
    cxw = (fr_px[:, 0] + 0.5) / d - 0.5 - wx0
    cyw = (fr_px[:, 1] + 0.5) / d - 0.5 - wy0
    scale_px = 1.0 / (mpp0 * d)  # um -> level px
    # nucleus ellipses: unit circle -> frame ellipse = J R diag(a, b); keep its inverse
    sc = (C["ihc_scale"] if is_ihc else np.ones(n)) * scale_px
    ct, st = np.cos(C["theta"]), np.sin(C["theta"])
    E0 = np.empty((n, 2, 2))
    E0[:, 0, 0], E0[:, 0, 1] = ct * C["a"] * sc, -st * C["b"] * sc
    E0[:, 1, 0], E0[:, 1, 1] = st * C["a"] * sc, ct * C["b"] * sc
    if frame.t is not None and n:
        E0 = frame.jacobian(he_px) @ E0
    det = E0[:, 0, 0] * E0[:, 1, 1] - E0[:, 0, 1] * E0[:, 1, 0]
    inv = np.stack([E0[:, 1, 1], -E0[:, 0, 1], -E0[:, 1, 0], E0[:, 0, 0]], 1) / det[:, None] if n else \
        np.zeros((0, 4))

    salt = scene.salt + (11 if is_ihc else 0)
    chrom = noise_window(salt + 1, 1.3, wy0, wx0, wh, ww)
    grain = noise_window(salt + 2, 0.0, wy0, wx0, wh, ww)
    cytotex = noise_window(salt + 3, 2.5, wy0, wx0, wh, ww)

    nucH = np.zeros((wh, ww), np.float32)
    d1 = np.full((wh, ww), 1e6, np.float32)
    d2 = np.full((wh, ww), 1e6, np.float32)
    id1 = np.zeros((wh, ww), np.int32)
    rmax = 0.95 * scene.spacing * scale_px  # no tumour cell reaches beyond this from its centre
    rstamp = int(np.ceil(rmax + 3.6 * scale_px)) + 2
    kind = C["kind"]
    nuc_gain = 0.5 if is_ihc else 1.0
    tex_gain = 0.6 if is_ihc else 1.0
    # cells of unequal size (bigger ones have more cytoplasm) with slightly curved borders
    size_off = np.clip((C["cyto"] - 0.975) / 0.275, -1, 1) * 1.5 * scale_px
    wig_pos = (0.7 * scale_px) * cytotex
    wig_neg = -wig_pos
    for i in np.nonzero(kind == K_TUMOUR)[0]:
        _voronoi_stamp(cxw[i], cyw[i], rstamp, d1, d2, id1, i, wh, ww, offset=size_off[i],
                       wiggle=wig_pos if C["site"][i] % 2 else wig_neg)
    _stamp_nuclei(np.nonzero(present)[0], C, cxw, cyw, inv, det, sc, chrom, cytotex, id1, nucH,
                  nuc_gain, tex_gain, is_ihc)

    tumour = (d1 < rmax) & (up["nest"] > -0.03)
    tid = np.where(tumour, id1, 0)
    mem_w = 1.0 * scale_px + 0.4  # half-width of a membrane, px
    gap = np.minimum(d2 - d1, 2.0 * np.abs(rmax - d1))
    mem = np.clip(1.0 - gap / (2 * mem_w), 0.0, 1.0)
    mem *= tumour
    # adipocytes (few, large): their own Voronoi
    fat = np.zeros((wh, ww), bool)
    fat_mem = np.zeros((wh, ww), np.float32)
    ax, ay = scene.adipocytes(box)
    if len(ax):
        ap = frame.from_he(np.stack([ax, ay], 1) / mpp0)
        apx = (ap[:, 0] + 0.5) / d - 0.5 - wx0
        apy = (ap[:, 1] + 0.5) / d - 0.5 - wy0
        a1 = np.full((wh, ww), 1e6, np.float32)
        a2 = np.full((wh, ww), 1e6, np.float32)
        ra = 32.0 * scale_px
        for cx, cy in zip(apx, apy):
            _voronoi_stamp(cx, cy, int(ra * 1.4) + 2, a1, a2, None, 0, wh, ww)
        fat = (a1 < ra) & ~tumour
        agap = np.minimum(a2 - a1, 2.0 * np.abs(ra - a1)) + 0.4 * cytotex
        fat_mem = np.clip(1.0 - agap / (1.0 * scale_px + 0.8), 0.0, 1.0) * ((a1 < ra + 2) & ~tumour)
    # vessels: lumen (with red cells) and a pink wall
    vlum = np.zeros((wh, ww), np.float32)
    vwall = np.zeros((wh, ww), np.float32)
    rbc = np.zeros((wh, ww), np.float32)
    V = scene.vessels(box)
    if len(V["x"]):
        vp = frame.from_he(np.stack([V["x"], V["y"]], 1) / mpp0)
        vx = (vp[:, 0] + 0.5) / d - 0.5 - wx0
        vy = (vp[:, 1] + 0.5) / d - 0.5 - wy0
        rbc_tex = noise_window(salt + 4, 2.2 * scale_px / 2.0 + 0.5, wy0, wx0, wh, ww)
        for i in range(len(vx)):
            r = int((V["a"][i] + V["wall"][i]) * scale_px) + 3
            ya, yb = max(int(vy[i]) - r, 0), min(int(vy[i]) + r + 2, wh)
            xa, xb = max(int(vx[i]) - r, 0), min(int(vx[i]) + r + 2, ww)
            if ya >= yb or xa >= xb:
                continue
            dy = (np.arange(ya, yb, dtype=np.float32) - np.float32(vy[i]))[:, None]
            dx = (np.arange(xa, xb, dtype=np.float32) - np.float32(vx[i]))[None, :]
            c, sn = np.cos(V["theta"][i]), np.sin(V["theta"][i])
            u = (c * dx + sn * dy) / (V["a"][i] * scale_px)
            v = (-sn * dx + c * dy) / (V["b"][i] * scale_px)
            rl = np.sqrt(u * u + v * v) + 0.04 * cytotex[ya:yb, xa:xb]
            wl = V["wall"][i] / max(np.sqrt(V["a"][i] * V["b"][i]), 1e-6)
            lum = np.clip((1.0 - rl) * 6.0, 0.0, 1.0)
            wal = np.clip((1.0 + wl - rl) * 6.0, 0.0, 1.0) - lum
            np.maximum(vlum[ya:yb, xa:xb], lum, out=vlum[ya:yb, xa:xb])
            np.maximum(vwall[ya:yb, xa:xb], wal, out=vwall[ya:yb, xa:xb])
            thr = 1.6 - 1.5 * V["rbc"][i]  # how full of red cells the lumen is
            cells = smoothstep(thr - 0.15, thr + 0.15, rbc_tex[ya:yb, xa:xb]) * lum
            np.maximum(rbc[ya:yb, xa:xb], cells, out=rbc[ya:yb, xa:xb])
        vlum *= ~(tumour | fat)
        vwall *= ~(tumour | fat)
        rbc *= vlum
    tissue = up["tissue"]
    nest = up["nest"]
    other = ~(tumour | fat)
    lumen = other & (nest > 0) & (up["lumen"] > -0.12)  # gland-like spaces inside nests
    # shrinkage gaps around nests: intermittent, of varying width
    gapw = (0.5 + 4.0 * np.clip(up["crack"] + 0.1, 0.0, 1.0)) * scale_px
    retraction = other & ~lumen & (d1 < rmax + gapw) & (nest > -0.06) & (up["crack"] > -0.12)
    stroma = (other & ~lumen & ~retraction).astype(np.float32) * (1.0 - vlum)
    fw = up["fib_w"]
    vis = smoothstep(-0.05, 0.15, up["crack"] + 0.1)  # fibres gather in bundles
    fa, fb = 6.2832 * up["fib_a"], 6.2832 * up["fib_b"]
    fib = fw * (0.5 + 0.5 * np.cos(fa)) ** 2 + (1 - fw) * (0.5 + 0.5 * np.cos(fb)) ** 2
    fib = 0.25 + vis * (fib - 0.25)
    fib2 = 0.5 + vis * 0.5 * (fw * np.cos(2.7 * fa + 1.3) + (1 - fw) * np.cos(2.7 * fb + 1.3))
    crack = smoothstep(0.3, 0.4, up["crack"]) * (fib < 0.06)
    sv = up["stainvar"]
    cyto = tumour * (1.0 + 0.1 * cytotex)
    if n:
        cyto = cyto * C["cyto"][tid].astype(np.float32)
    tumf = tumour.astype(np.float32)
    if not is_ihc:
        gH, gE = scene.he_gain
        E = stroma * (0.22 + (0.08 * fib + 0.04 * fib2) * (1 + 0.5 * cytotex)) * (1 - 0.9 * crack)
        E += cyto * (scene.cyto_e * 0.9) + 0.05 * mem + 0.3 * fat_mem + 0.05 * lumen
        E += 0.12 * nucH + 0.08 * vwall + 0.7 * rbc
        H = stroma * (0.045 + 0.015 * fib) + (0.045 * cyto + 0.015 * cytotex * tumf) + 0.02 * mem + 0.04 * fat_mem
        H += nucH
        H *= tissue * (gH * sv)
        E *= tissue * (gE * sv)
        chans = [H, E, scene.neutral * (H + E)]
        matrix = scene.he_matrix
    else:
        gH, gD = scene.ihc_gain
        H = stroma * (0.025 + 0.012 * fib + 0.008 * cytotex) + 0.065 * cyto + 0.03 * fat_mem + 0.01 * lumen
        H += nucH + 0.015 * vwall + 0.02 * rbc
        H *= tissue * (gH * sv)
        D = np.zeros((wh, ww), np.float32)
        sel = mem > 0
        if sel.any():
            cid = tid[sel]
            yy, xx = np.nonzero(sel)
            ang = np.arctan2(yy - cyw[cid], xx - cxw[cid])
            rel = np.mod(ang - C["arc0"][cid], 2 * np.pi)
            on = rel < 2 * np.pi * C["comp"][cid]
            gr = np.clip(0.8 + 0.25 * cytotex[sel] + 0.25 * grain[sel], 0.2, 2.0)
            D[sel] = mem[sel] * C["mod"][cid] * on * gr
        if n:
            D += (cyto * scene.p.cyto_dab) * (C["mclass"][tid] > 0)
        D += 0.01 * stroma * fib + 0.06 * rbc  # red cells: endogenous peroxidase, a faint brown
        D *= tissue * (gD * sv)
        chans = [H, 0.015 * tissue + 0.5 * scene.neutral * H, D]
        matrix = scene.ihc_matrix
    sig = 0.85 if d == 1 else 0.6  # optical blur
    chans = [ndi.gaussian_filter(c.astype(np.float32, copy=False), sig, truncate=2.5) for c in chans]
    chans[0] += scene.bg_od * 0.3 + 0.006 * grain
    chans[1] += scene.bg_od * 0.15
    conc = np.stack(chans, -1)
    rgb = stain.render(conc, matrix)
    if jpeg:
        rgb = jpeg_roundtrip(rgb)
    rgb = np.ascontiguousarray(rgb[m : m + h, m : m + w])
    if not with_truth:
        return rgb
    truth = dict(cells=C, tumour_mask=tumour[m : m + h, m : m + w].copy(),
                 centres=np.stack([(cxw + wx0 + 0.5) * d - 0.5, (cyw + wy0 + 0.5) * d - 0.5], 1))
    return rgb, truth


#: mean hematoxylin of a rendered nucleus relative to its OD (texture and rim averaged over the disc)
_NUC_MEAN = 0.4


def _splat(img, x, y, mass):
    """Add ``mass`` at fractional pixel positions by bilinear splatting."""
    hh, ww = img.shape
    x0 = np.floor(x).astype(np.int64)
    y0 = np.floor(y).astype(np.int64)
    fx = x - x0
    fy = y - y0
    flat = np.zeros(hh * ww, np.float64)
    for oy, ox, wgt in ((0, 0, (1 - fx) * (1 - fy)), (0, 1, fx * (1 - fy)), (1, 0, (1 - fx) * fy), (1, 1, fx * fy)):
        yy, xx = y0 + oy, x0 + ox
        ok = (yy >= 0) & (yy < hh) & (xx >= 0) & (xx < ww)
        flat += np.bincount(yy[ok] * ww + xx[ok], weights=(mass * wgt)[ok], minlength=hh * ww)
    img += flat.reshape(hh, ww).astype(np.float32)


def _render_meanfield(scene, section, frame, y0, x0, h, w, d, margin, jpeg):
    """Coarse pyramid levels (downsample ``d`` >= 4), rendered at their own resolution: the
    continuous tissue fields plus cells splatted as blurred dots (``d`` <= 8) or, coarser, the
    expected cell density of each region."""
    is_ihc = section == "ihc"
    mpp0 = scene.mpp
    m = 8
    wy0, wx0 = y0 - m, x0 - m
    wh, ww = h + 2 * m, w + 2 * m
    up = _field_nodes(scene, frame, wy0, wx0, wh, ww, d,
                      ("tissue", "nest", "fat", "lumen", "lymph", "het", "stainvar", "fib_a", "fib_b", "fib_w",
                       "crack"),
                      g=4 if d <= 8 else 2)
    scale_px = 1.0 / (mpp0 * d)
    tissue = up["tissue"]
    nest = up["nest"]
    tumour = ((nest > 0) & (up["lumen"] < 0)).astype(np.float32)
    fat = ((up["fat"] > 0) & (nest < -0.05)).astype(np.float32) * (1 - tumour)
    other = 1 - np.maximum(tumour, fat)
    retraction = other * ((nest > -0.03) & (nest <= 0))
    lumen = other * (nest > 0)
    stroma = other - retraction - lumen
    att = float(np.exp(-((d / 4.0) ** 2)))  # fibres fade out when they are below a pixel
    fw = up["fib_w"]
    fib = fw * (0.5 + 0.5 * np.cos(6.2832 * up["fib_a"])) ** 2 \
        + (1 - fw) * (0.5 + 0.5 * np.cos(6.2832 * up["fib_b"])) ** 2
    fib = 0.25 + att * (fib - 0.25)
    crack = smoothstep(0.18, 0.3, up["crack"]) * (0.3 + 0.7 * att)
    sv = up["stainvar"]
    salt = scene.salt + (11 if is_ihc else 0) + 97 * d
    grain = noise_window(salt + 2, 0.0, wy0, wx0, wh, ww)
    tex = noise_window(salt + 5, 0.7, wy0, wx0, wh, ww)
    nucH = np.zeros((wh, ww), np.float32)
    memD = np.zeros((wh, ww), np.float32)
    sp = scene.spacing
    nuc_gain = 0.5 if is_ihc else 1.0
    pm = np.asarray(scene.p.mclass_p)
    # expected membrane DAB per tumour-cell area: ring band fraction x class-weighted OD x completeness
    ring = 2 * np.pi * 0.45 * sp * 1.6 / (sp * sp)
    exp_mod = pm[1] * 0.15 * 0.5 + pm[2] * 0.39 * 0.95 + pm[3] * 0.97 * 1.0
    if d <= 4:
        corners = np.array([[wx0, wy0], [wx0 + ww, wy0], [wx0, wy0 + wh], [wx0 + ww, wy0 + wh]], float) * d
        bb = frame.to_he(corners) * mpp0
        box = (bb[:, 0].min() - 20, bb[:, 1].min() - 20, bb[:, 0].max() + 20, bb[:, 1].max() + 20)
        C = scene.cells(box)
        present = C["in_ihc"] if is_ihc else C["in_he"]
        he_px = np.stack([C["x"], C["y"]], 1) / mpp0
        if frame.t is not None and len(he_px):
            fr = apply_forward(frame.t, he_px)
        else:
            fr = he_px
        cx = (fr[:, 0] + 0.5) / d - 0.5 - wx0
        cy = (fr[:, 1] + 0.5) / d - 0.5 - wy0
        area = np.pi * C["a"] * C["b"] * scale_px ** 2
        mass = C["od"] * nuc_gain * area * _NUC_MEAN * present
        for sel, sig in ((C["kind"] == K_TUMOUR, 6.0), (C["kind"] != K_TUMOUR, 3.0)):
            tmp = np.zeros((wh, ww), np.float32)
            _splat(tmp, cx[sel], cy[sel], mass[sel])
            nucH += ndi.gaussian_filter(tmp, max(0.6, 0.75 * sig * scale_px))
        if is_ihc:
            tsel = C["kind"] == K_TUMOUR
            dmass = C["mod"] * C["comp"] * ring * (sp * scale_px) ** 2
            tmp = np.zeros((wh, ww), np.float32)
            _splat(tmp, cx[tsel], cy[tsel], dmass[tsel])
            memD = ndi.gaussian_filter(tmp, max(0.6, 0.4 * sp * scale_px))
        nucH *= 1.0 + 0.15 * tex
    else:
        tum_nuc = np.pi * 5.6 ** 2 * scene.nuc_scale ** 2 / sp ** 2 * scene.nuc_od * _NUC_MEAN * nuc_gain
        lym = np.clip(up["lymph"] * 2.5, 0.01, 0.85) * np.pi * 3.3 ** 2 / 49.0 * 0.95 * _NUC_MEAN * nuc_gain
        fibro = 0.32 * np.pi * 6.0 * 1.4 / 121.0 * 0.7 * _NUC_MEAN * nuc_gain
        nucH = (tumour * tum_nuc + stroma * (lym + fibro)) * (1.0 + 0.25 * tex)
        if is_ihc:
            memD = tumour * np.clip((1 - pm[0]) * up["het"], 0, 1) / max(1 - pm[0], 1e-9) * exp_mod * ring
            memD = memD * (1.0 + 0.2 * tex)
    if not is_ihc:
        gH, gE = scene.he_gain
        E = stroma * (0.22 + 0.08 * fib + 0.03) * (1 - 0.9 * crack) + tumour * (scene.cyto_e * 0.9)
        E += 0.03 * fat + 0.05 * lumen + 0.10 * nucH
        H = stroma * (0.045 + 0.015 * fib) + tumour * 0.05 + 0.004 * fat + nucH
        H = H * tissue * (gH * sv)
        E = E * tissue * (gE * sv)
        conc = np.stack([H, E, scene.neutral * (H + E)], -1)
        matrix = scene.he_matrix
    else:
        gH, gD = scene.ihc_gain
        H = stroma * (0.02 + 0.02 * fib) + tumour * 0.04 + 0.003 * fat + 0.01 * lumen + nucH
        D = memD + tumour * scene.p.cyto_dab * (1 - pm[0]) + 0.01 * stroma * fib
        H = H * tissue * (gH * sv)
        conc = np.stack([H, 0.015 * tissue + 0.5 * scene.neutral * H, D * tissue * (gD * sv)], -1)
        matrix = scene.ihc_matrix
    conc[..., 0] += scene.bg_od * 0.3 + 0.006 * grain
    conc[..., 1] += scene.bg_od * 0.15
    rgb = stain.render(conc, matrix)
    if jpeg:
        rgb = jpeg_roundtrip(rgb)
    return np.ascontiguousarray(rgb[m : m + h, m : m + w])


def apply_forward(t: Transform, pts: np.ndarray) -> np.ndarray:
    """H&E -> IHC points with a few fixed-point iterations (enough for a smooth few-px field)."""
    return t.forward(pts, iterations=6)
