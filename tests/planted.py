"""Planted near-duplicates: a folder data set of real images plus altered copies of a known subset, and
the precision / recall of found duplicate groups against the planted ones (tests and the benchmark)."""

from __future__ import annotations

import io
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

SEPARATOR = "__"  # copy file names: STEM__KIND.EXT


def _resized(image: Image.Image, side: int) -> Image.Image:
    return image.resize((side, side), Image.Resampling.BICUBIC)


def _crop(image: Image.Image, box: tuple[float, float, float, float]) -> Image.Image:
    w, h = image.size
    left, top, right, bottom = box
    return image.crop((round(left * w), round(top * h), round(right * w), round(bottom * h))).resize(
        image.size, Image.Resampling.BICUBIC
    )


# kind -> (how the copy is made, file suffix, JPEG quality or None for PNG)
COPIES = {
    "jpeg50": (lambda im: im, ".jpg", 50),
    "jpeg95": (lambda im: im, ".jpg", 95),
    "down-up": (lambda im: _resized(_resized(im, im.width * 5 // 8), im.width), ".jpg", 90),
    "up2x": (lambda im: _resized(im, im.width * 2), ".png", None),
    "crop-centre": (lambda im: _crop(im, (0.1, 0.1, 0.9, 0.9)), ".jpg", 90),
    "crop-corner": (lambda im: _crop(im, (0.0, 0.0, 0.875, 0.875)), ".jpg", 90),
}


def plant(images: Sequence[Path], root: Path, chosen: Sequence[int], kinds: Sequence[str]) -> Path:
    """Copy ``images`` into ``root/CLASS/`` (CLASS: the image's parent folder name) and add one copy of
    each kind in ``kinds`` for the images at positions ``chosen``; returns ``root`` (a ``folder:`` root)."""
    for source in images:
        folder = root / source.parent.name
        folder.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, folder / source.name)
    for position in chosen:
        source = images[position]
        folder = root / source.parent.name
        with Image.open(source) as opened:
            image = opened.convert("RGB")
        for kind in kinds:
            make, suffix, quality = COPIES[kind]
            buffer = io.BytesIO()
            copy = make(image)
            copy.save(buffer, format="PNG") if quality is None else copy.save(buffer, "JPEG", quality=quality)
            (folder / f"{source.stem}{SEPARATOR}{kind}{suffix}").write_bytes(buffer.getvalue())
    return root


def families(paths: Sequence[str]) -> np.ndarray:
    """A family id per bank row: rows sharing an original (the file stem before ``__``) share one."""
    stems = [f"{Path(p).parent.name}/{Path(p).name.split(SEPARATOR)[0].rsplit('.', 1)[0]}" for p in paths]
    _, family = np.unique(np.array(stems), return_inverse=True)
    return family.astype(np.int64)


def _pairs(counts: np.ndarray) -> int:
    return int((counts * (counts - 1) // 2).sum())


def score_groups(group: np.ndarray, kept: np.ndarray, representative: np.ndarray, family: np.ndarray) -> dict:
    """Found groups against planted families (families of two or more rows).

    - pair precision / recall: pairs of rows put in one group that share a family, over all pairs put
      in one group / over all planted pairs;
    - drop precision / recall: dropped rows whose kept row is of their family, over all dropped rows /
      over the copies there are to drop (family size − 1 per family);
    - exact groups: planted families found as a group of exactly their rows.
    """
    family_sizes = np.bincount(family)
    planted_pairs = _pairs(family_sizes)
    inside = group >= 0
    group_sizes = np.bincount(group[inside]) if inside.any() else np.zeros(0, int)
    cells = np.unique(np.stack([group[inside], family[inside]], 1), axis=0, return_counts=True)[1]
    found_pairs, true_pairs = _pairs(group_sizes), _pairs(cells)
    dropped = ~kept
    right = dropped & (family[representative] == family)
    to_drop = int((family_sizes[family_sizes >= 2] - 1).sum())
    exact = 0
    for g in range(len(group_sizes)):
        members = family[group == g]
        exact += bool((members == members[0]).all() and family_sizes[members[0]] == len(members))
    return {
        "pair_precision": true_pairs / found_pairs if found_pairs else 1.0,
        "pair_recall": true_pairs / planted_pairs if planted_pairs else 1.0,
        "drop_precision": int(right.sum()) / int(dropped.sum()) if dropped.any() else 1.0,
        "drop_recall": int(right.sum()) / to_drop if to_drop else 1.0,
        "groups_found": len(group_sizes),
        "families_planted": int((family_sizes >= 2).sum()),
        "exact_groups": exact,
        "dropped": int(dropped.sum()),
        "to_drop": to_drop,
    }
