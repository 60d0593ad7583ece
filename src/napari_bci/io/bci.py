"""BCI dataset folders (Liu et al., CVPR-W 2022).

Layout: ``ROOT/HE/{train,test}/NNNNN_{train,test}_{0,1+,2+,3+}.png`` with the same file
names under ``ROOT/IHC/``. The HER2 level in the name is the slide's label, not the patch's.
``open_bci_folder`` accepts ROOT, ``ROOT/HE``, ``ROOT/HE/train`` (and the IHC twins).
"""

from __future__ import annotations

import os
import re
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from ..errors import InputError
from ..levels import HER2_LEVELS
SPLITS = ("train", "test")
_NAME = re.compile(r"^(?P<id>\d+)_(?P<split>train|test)_(?P<level>0|1\+|2\+|3\+)$", re.IGNORECASE)
_EXTS = (".png", ".jpg", ".jpeg", ".tif", ".tiff")


@dataclass(frozen=True)
class BCIName:
    id: str
    split: str
    her2: str


def parse_bci_name(name: str | os.PathLike) -> BCIName | None:
    """``BCIName(id, split, her2)`` from ``00001_train_2+.png`` (or a path), else None."""
    stem = Path(name).name
    for ext in _EXTS:
        if stem.lower().endswith(ext):
            stem = stem[: -len(ext)]
            break
    m = _NAME.match(stem)
    if not m:
        return None
    return BCIName(m.group("id"), m.group("split").lower(), m.group("level"))


@dataclass(frozen=True)
class BCIPair:
    name: str  # file name, e.g. "00001_train_2+.png"
    he_path: Path
    ihc_path: Path | None
    her2: str
    split: str


def _find_child(parent: Path, name: str) -> Path | None:
    """``parent/name`` matching case-insensitively (``HE``/``he``), or None."""
    if not parent.is_dir():
        return None
    exact = parent / name
    if exact.is_dir():
        return exact
    for c in parent.iterdir():
        if c.is_dir() and c.name.lower() == name.lower():
            return c
    return None


def find_ihc_partner(he_path: str | os.PathLike) -> Path | None:
    """The IHC file with the same name in the matching ``IHC/<split>/`` folder, else None.

    Works from either side: given an IHC path it returns the H&E partner.
    """
    p = Path(he_path)
    split_dir, stain_dir = p.parent, p.parent.parent
    other = {"he": "IHC", "ihc": "HE"}.get(stain_dir.name.lower())
    if other is None:
        return None
    other_dir = _find_child(stain_dir.parent, other)
    if other_dir is None:
        return None
    split = _find_child(other_dir, split_dir.name)
    if split is None:
        return None
    cand = split / p.name
    return cand if cand.is_file() else None


def is_bci_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a BCI dataset root, one of its stain folders or a split folder."""
    p = Path(path)
    if not p.is_dir():
        return False
    try:
        _locate(p)
    except InputError:
        return False
    return True


class BCIDataset:
    """The H&E/IHC pairs of a BCI folder, sorted by split then name."""

    def __init__(self, root: Path, pairs: list[BCIPair], problems: list[str]):
        self.root = root
        self.pairs = pairs
        self.problems = problems

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, i: int) -> BCIPair:
        return self.pairs[i]

    def __iter__(self) -> Iterator[BCIPair]:
        return iter(self.pairs)

    def filter(self, her2: str | None = None, split: str | None = None) -> "BCIDataset":
        """Pairs with the given HER2 level and/or split (None: any)."""
        if her2 is not None and her2 not in HER2_LEVELS:
            raise ValueError(f"her2 must be one of {HER2_LEVELS}, not {her2!r}")
        pairs = [p for p in self.pairs if (her2 is None or p.her2 == her2) and (split is None or p.split == split)]
        return BCIDataset(self.root, pairs, self.problems)

    def counts(self) -> dict[str, int]:
        return {lv: sum(p.her2 == lv for p in self.pairs) for lv in HER2_LEVELS}

    def __repr__(self):
        return f"<BCIDataset {self.root} pairs={len(self.pairs)} {self.counts()}>"


def _images(d: Path) -> list[Path]:
    return sorted(f for f in d.iterdir() if f.is_file() and f.suffix.lower() in _EXTS and not f.name.startswith("."))


def open_bci_folder(path: str | os.PathLike, *, strict: bool = False) -> BCIDataset:
    """Index a BCI folder. Unpaired or unlabeled files are skipped with one warning naming them
    (``strict=True``: InputError instead); a folder without any usable pair is an InputError."""
    p = Path(path)
    if not p.exists():
        raise InputError(p, "no such folder")
    if not p.is_dir():
        raise InputError(p, "not a folder")
    root, splits = _locate(p)
    he_root, ihc_root = _find_child(root, "HE"), _find_child(root, "IHC")
    pairs: list[BCIPair] = []
    unlabeled: list[Path] = []
    unpaired: list[Path] = []
    for split in splits:
        he_dir = _find_child(he_root, split) if he_root else None
        ihc_dir = _find_child(ihc_root, split) if ihc_root else None
        he_files = _images(he_dir) if he_dir else []
        ihc_files = {f.name: f for f in _images(ihc_dir)} if ihc_dir else {}
        for f in he_files:
            n = parse_bci_name(f.name)
            if n is None:
                unlabeled.append(f)
                continue
            ihc = ihc_files.pop(f.name, None)
            if ihc is None:
                unpaired.append(f)
            pairs.append(BCIPair(f.name, f, ihc, n.her2, n.split))
        unpaired.extend(ihc_files.values())
    problems = []
    if unlabeled:
        problems.append(f"{len(unlabeled)} file(s) without a BCI name NNNNN_<split>_<0|1+|2+|3+>: "
                        + ", ".join(str(f) for f in unlabeled[:5]) + (" ..." if len(unlabeled) > 5 else ""))
    if unpaired:
        problems.append(f"{len(unpaired)} file(s) without a partner in the other stain folder: "
                        + ", ".join(str(f) for f in unpaired[:5]) + (" ..." if len(unpaired) > 5 else ""))
    if problems and strict:
        raise InputError(root, "; ".join(problems))
    if not pairs:
        raise InputError(root, "no BCI images found (expected HE/{train,test}/NNNNN_{train,test}_{0,1+,2+,3+}.png"
                               + (": " + "; ".join(problems) if problems else ")"))
    for msg in problems:
        warnings.warn(f"{root}: {msg}", UserWarning, stacklevel=2)
    pairs.sort(key=lambda q: (SPLITS.index(q.split) if q.split in SPLITS else 9, q.name))
    return BCIDataset(root, pairs, problems)


def _locate(p: Path) -> tuple[Path, list[str]]:
    """(dataset root, splits to scan) for a root, a stain folder or a split folder."""
    if _find_child(p, "HE") is not None or _find_child(p, "IHC") is not None:
        return p, list(SPLITS)
    if p.name.lower() in ("he", "ihc"):
        return p.parent, list(SPLITS)
    if p.name.lower() in SPLITS and p.parent.name.lower() in ("he", "ihc"):
        return p.parent.parent, [p.name.lower()]
    raise InputError(p, "not a BCI dataset folder (expected HE/ and IHC/ with train/ and test/ inside)")
