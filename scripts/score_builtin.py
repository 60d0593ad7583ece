#!/usr/bin/env python
"""HER2 level of the built-in model's generated IHC, scored by the rule-based scorer, per level.

Uses the model card's held-out set (16 synthetic pairs of 1024x1024 px, seeds 900000-900015, 4
per level, the H&E aligned to the IHC frame with the known warp), generates the virtual IHC with
``builtin`` through the tile engine, scores it with ``napari_bci.her2.score`` and scores the real
(synthetic ground-truth) IHC the same way. Prints a Markdown table for docs/model_card.md.

Run from the repository root: ``python scripts/score_builtin.py`` (a few minutes on 2 cores).
"""

from __future__ import annotations

import sys
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from napari_bci.generate.tiles import generate_image  # noqa: E402
from napari_bci.models.registry import load_generator  # noqa: E402
from napari_bci.train.loop import HER2_CLASSES, synthetic_pairs  # noqa: E402
from napari_bci.her2 import score  # noqa: E402

HELDOUT = {"n": 16, "size": 1024, "seed": 900_000}


def main() -> int:
    gen = load_generator("builtin", device="cpu")
    rows = []
    for p in synthetic_pairs(HELDOUT["n"], HELDOUT["size"], seed=HELDOUT["seed"], progress=True):
        truth = HER2_CLASSES[p.level]
        fake, _ = generate_image(gen, p.he)
        mask = p.valid
        s_gen = score(fake, mpp=0.5, mask=mask)
        s_real = score(p.ihc, mpp=0.5, mask=mask)
        head = HER2_CLASSES[int(gen.predict_her2(p.he[None]).argmax())]
        rows.append((truth, s_gen.her2, s_real.her2, head))
        print(f"{p.name}: truth {truth}  scored generated {s_gen.her2}  scored real {s_real.her2}  head {head}",
              file=sys.stderr)
    print("| HER2 | scored generated IHC | correct | scored real IHC | correct | level head | correct |")
    print("|---|---|---|---|---|---|---|")
    for lv in HER2_CLASSES:
        r = [x for x in rows if x[0] == lv]
        cells = []
        for k in (1, 2, 3):
            c = Counter(x[k] for x in r)
            cells += [", ".join(f"{n}x {v}" for v, n in sorted(c.items())), f"{sum(x[k] == lv for x in r)}/{len(r)}"]
        print(f"| {lv} | " + " | ".join(cells) + " |")
    for k, what in ((1, "generated"), (2, "real"), (3, "head")):
        print(f"accuracy {what}: {sum(x[k] == x[0] for x in rows)}/{len(rows)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
