"""The label-side options relabel and validate share, declared once.

``relabel`` stores teacher soft labels on replayable views and ``validate`` replays them (``--labels``) or computes
the same labels online (``--teachers``): the two must agree on who labels (``label_teachers``, ``ensemble``,
``primary_weight``) and on the views the labels are made on (epochs, batch size, crop floor, mix, PatchShuffle,
RandAugment). Both configs take these fields from this one group, so a flag has one name, one default and one
help text on both commands.
"""
from __future__ import annotations

from dataclasses import dataclass

from .augment import BATCH_RULES
from .config import opt
from .training import ENSEMBLES


@dataclass
class LabelOptions:
    """Who labels the views and how the views are made; a base of ``RelabelConfig`` and ``ValidateConfig``."""

    label_teachers: str | None = opt(None, "comma list of teacher archs, or the words primary (the recover run's "
                                               "primary) and pool (its BN pool + BN-free teachers such as AlexNet; "
                                               "every teacher for a baseline); default: primary")
    ensemble: str = opt("mean", "how several teachers' logits combine: mean | norm-matched (each teacher's logits "
                                "scaled to the mean Frobenius norm of the batch's, then averaged: the reference) | "
                                "norm-matched-sample (the same per image) | weighted (--primary-weight to the first "
                                "teacher, the rest shared equally)", choices=ENSEMBLES)
    primary_weight: float = opt(0.5, "weighted: share of the first teacher", minimum=0.0)
    epochs: int = opt(300, "epochs of student training: relabel stores one view (and one label file) per epoch, "
                           "validate trains each student this long", minimum=1)
    batch_size: int | None = opt(None, "None: from --batch-rule (seed: 50 at IPC <= 10, else 100, seed Table 1); "
                                       "relabel and validate must use the same", minimum=1)
    batch_rule: str = opt("seed", "batch size when --batch-size is None: seed (50 at IPC <= 10, else 100) | rded "
                                  "(RDED/DELT's argument.py: 10 at IPC 1, 50 to IPC 20, else 100; x2 for 100 or "
                                  "1000 classes) | frepo (FRePo's eval.py: min(images, 500))", choices=BATCH_RULES)
    min_scale: float = opt(0.25, "RandomResizedCrop floor of the views (seed Table 3)", minimum=0.0)
    mix: str = opt("cutmix", "cutmix | mixup | none", choices=("cutmix", "mixup", "none"))
    patch_shuffle: int = opt(0, "RDED's PatchShuffle before the crop: grid factor f (column strips, then row strips, "
                                "each reordered per image and epoch from the views' seed; stored with relabel's views, "
                                "so validate replays it); 0 = off", minimum=0)
    rand_augment: str = opt("", "DELT's timm RandAugment config string (DELT: rand-m6-n2-mstd1.0) on each uint8 image "
                                "before the crop, one seeded draw per image and epoch (stored with relabel's views, so "
                                "validate replays it); teachers label the augmented batch; '' = off (needs timm: pip "
                                "install 'prismdd[timm]')")
