"""A tree laid out like 300W-LP at any size, made cheaply from a small rendered one.

300W-LP's order is what decides how well mixed training batches are, and its size what decides
memory: 61,225 faces-views in four subsets (AFW 5,207, HELEN 37,676, IBUG 1,786, LFPW 16,556),
each source face rendered at about 16 views listed one after another, and a ``_Flip`` twin of
every image. :func:`link_300w_lp` writes that layout under 300W-LP's file names, every file a
hard link to a file of a small synthetic 300W-LP tree (``frnet synth``), so a 122,450-image tree
costs inodes, not disk. The images repeat, so such a tree measures order, memory and speed, never
accuracy.
"""

from __future__ import annotations

import os
from pathlib import Path

from preprocessing.datasets import FLIP_SUFFIX, SUBSETS_300W_LP, list_300w_lp

# Unflipped images per subset in 300W-LP (each has as many _Flip twins).
SUBSET_IMAGES_300W_LP = {"AFW": 5207, "HELEN": 37676, "IBUG": 1786, "LFPW": 16556}
VIEWS_PER_FACE_300W_LP = 16  # 61,225 images of 3,837 faces


def subset_counts(images: int) -> dict[str, int]:
    """``images`` unflipped images shared among the subsets in 300W-LP's proportions."""
    total = sum(SUBSET_IMAGES_300W_LP.values())
    counts = {name: images * SUBSET_IMAGES_300W_LP[name] // total for name in SUBSETS_300W_LP}
    counts["HELEN"] += images - sum(counts.values())  # the rounding goes to the largest subset
    return counts


def link_300w_lp(pool: Path, output: Path, images: int,
                 views_per_face: int = VIEWS_PER_FACE_300W_LP) -> dict[str, int]:
    """Write a 300W-LP tree of ``images`` images (and their ``_Flip`` twins) to ``output`` from the
    files of the synthetic 300W-LP tree ``pool``; returns the unflipped images per subset.

    ``output`` must not exist and must be on the pool's filesystem (hard links)."""
    if images < 1 or views_per_face < 1:
        raise ValueError(f"images and views_per_face must be >= 1, got {images} and {views_per_face}")
    _, refs = list_300w_lp(pool)
    twins = {ref.stem: ref for ref in refs if ref.flipped}
    sources = [(ref, twins[ref.stem]) for ref in refs if not ref.flipped and ref.stem in twins]
    if not sources:
        raise ValueError(f"{pool}: no image with its {FLIP_SUFFIX} twin to link from")
    output.mkdir(parents=True)
    counts = subset_counts(images)
    written = 0
    for subset, count in counts.items():
        for folder in (subset, subset + FLIP_SUFFIX, f"landmarks/{subset}"):
            (output / folder).mkdir(parents=True)
        for k in range(count):
            stem = f"{subset}_{k // views_per_face:06d}_1_{k % views_per_face}"
            plain, flipped = sources[written % len(sources)]
            written += 1
            os.link(plain.image_path, output / subset / f"{stem}.jpg")
            os.link(plain.mat_path, output / subset / f"{stem}.mat")
            os.link(flipped.image_path, output / (subset + FLIP_SUFFIX) / f"{stem}.jpg")
            os.link(flipped.mat_path, output / (subset + FLIP_SUFFIX) / f"{stem}.mat")
            if plain.landmarks_path and Path(plain.landmarks_path).exists():
                os.link(plain.landmarks_path, output / "landmarks" / subset / f"{stem}_pts.mat")
    return counts
