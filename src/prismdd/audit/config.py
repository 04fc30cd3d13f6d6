"""The audit's settings. ``--quick`` is a preset (``presets/audit/quick.yaml``) like the main job's; the
one setting resolved at run time is the shadow count left unset, which depends on the device."""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import ClassVar

from ..core.config import CommonConfig, comma_list, opt
from ..core.errors import PrismError
from ..core.presets import PROTOCOLS
from ..core.runtime import resolve_device
from .attacks import ATTACKS

TARGETS = ("teacher", "prism", "sre2l", "frepo", "random-real")
DISTILLED = ("prism", "sre2l", "frepo")  # targets whose student learns from a recover output
SHADOWS = {"cpu": 4, "cuda": 16}  # shadow pipelines when unset: LiRA gets much sharper with more, GPUs afford them


@dataclass
class AuditConfig(CommonConfig):
    PRESET_FAMILY: ClassVar[str] = "audit"
    PRESET_FIELD: ClassVar[str] = "quick"

    out: str = opt("runs/audit", "output folder: audit.json, audit_roc.png, models/", hashed=False)
    quick: bool = opt(False, "tiny everything (digits: about 2 minutes on 2 CPU cores); settings you give still win")
    targets: str = opt("teacher,prism,sre2l,random-real", "comma list of attacked models", choices=TARGETS, many=True)
    attacks: str = opt("threshold,lira-offline,lira-online", "comma list; LiRA needs shadow models (online: >= 2)",
                       choices=ATTACKS, many=True)
    pool_size: int = opt(2000, "audit pool drawn from the train split (capped at the split)", minimum=4)
    background: int = opt(0, "extra train images outside the pool that every model trains on (not scored; realism)",
                          minimum=0)
    shadow_models: int | None = opt(None, "shadow pipelines on random halves of the pool; None: 4 on CPU, 16 on GPU; "
                                          "0: threshold attack only", minimum=0)
    canaries: int = opt(0, "pool examples turned into canaries: each takes a wrong class (audited separately as "
                           "examples=canaries)", minimum=0)
    teacher_arch: str = opt("convnet", "the teacher target, and the primary (logit) teacher of PRISM and SRe2L")
    bn_pool: str = opt("convnet,resnet18,mobilenet_v2", "PRISM's BN-teacher pool")
    width: float = opt(0.5, "width multiplier of every teacher", minimum=0.01)
    teacher_epochs: int = opt(20, "teachers see only half the pool, so more epochs than usual", minimum=1)
    teacher_batch_size: int = opt(128, "squeeze batch size; smaller gives more steps per epoch on a small member set",
                                  minimum=1)
    ipc: int = opt(10, "images per class of the distilled sets and of the random real subset", minimum=1)
    iterations: int = opt(300, "recovery iterations per image", minimum=1)
    frepo_width: float = opt(0.5, "frepo target: width of its pool networks (CPU-sized; the preset's 1.0 on a GPU)",
                             minimum=0.01)
    frepo_real_batch: int = opt(256, "frepo target: real images per step (CPU-sized; the preset's 1024 on a GPU)",
                                minimum=1)
    student: str = opt("convnet", "student architecture (one)")
    student_width: float = opt(0.5, "width multiplier of the students", minimum=0.01)
    student_epochs: int = opt(300, "student training epochs", minimum=1)
    student_protocol: str = opt("prism", "one validate protocol for every student, so only the training images differ",
                                choices=PROTOCOLS.names())
    query_flip: bool = opt(True, "LiRA: average phi over the image and its horizontal flip (both seen in training)")
    bootstrap: int = opt(200, "bootstrap resamples for the confidence intervals (0: no intervals)", minimum=0)
    force: bool = opt(False, "retrain every model of the audit", hashed=False)

    def check(self):
        if "," in self.student:
            raise PrismError(f"--student {self.student!r}: the audit trains one student architecture")

    @property
    def target_list(self) -> list[str]:
        return comma_list(self.targets)

    @property
    def attack_list(self) -> list[str]:
        return comma_list(self.attacks)


def resolve_config(cfg: AuditConfig) -> AuditConfig:
    """Fix the shadow count when it was left unset (it depends on the device); the manifest records the result."""
    if cfg.shadow_models is not None:
        return cfg
    return dataclasses.replace(cfg, shadow_models=SHADOWS.get(resolve_device(cfg.device).type, SHADOWS["cpu"]))
