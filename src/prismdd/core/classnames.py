"""Readable class names for prompts (the CLIP prior, text-to-image generators).

ImageNet-style folders are WordNet synset ids (``n01440764``), which mean nothing to a text encoder. They are mapped to
torchvision's ImageNet-1K category names: ImageNet's class index is the position of the synset in the sorted list of
its 1000 synsets (``imagenet_wnids.txt``, the dataset's label list), and torchvision's ``_IMAGENET_CATEGORIES`` names
the classes in that order. Any other name is used as the folder spells it, underscores read as spaces.
"""
from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path

SYNSET = re.compile(r"^n\d{8}$")


@lru_cache(maxsize=1)
def imagenet_names() -> dict[str, str]:
    """synset id -> torchvision's ImageNet-1K category name."""
    from torchvision.models._meta import _IMAGENET_CATEGORIES  # the names torchvision's ImageNet weights carry

    wnids = (Path(__file__).with_name("imagenet_wnids.txt")).read_text().split()
    return dict(zip(wnids, _IMAGENET_CATEGORIES))


def readable_names(class_names: list[str]) -> list[str]:
    """Names a text encoder can read: synset ids -> WordNet names (ImageNet-1K's), underscores -> spaces."""
    table = imagenet_names() if any(SYNSET.match(n) for n in class_names) else {}
    return [table.get(n, n).replace("_", " ") for n in class_names]
