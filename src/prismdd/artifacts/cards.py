"""Model cards and teachers: ``model.safetensors`` + ``card.json`` (``save_model``/``load_model``), finding the
teachers of a squeeze folder, and the label-teacher policy (``label_teacher_names``, ``load_labelers``)."""
from __future__ import annotations

from pathlib import Path

import torch
import torch.nn as nn

from ..core.config import comma_list, config_to_dict, save_config
from ..core.data import DatasetInfo
from ..core.errors import PrismError
from ..core.io import load_tensors, read_json, save_tensors, tensors_metadata, write_json
from ..core.models import BN_FREE_ARCHS, model_from_spec
from ..core.training import SoftLabeler
from .manifest import CARD, WEIGHTS, file_digest
from ..core.log import get_logger

logger = get_logger("labels")


def check_finite_state(state: dict, what: str, fix: str) -> None:
    """Refuse weights or BN running statistics that hold NaN or inf, naming the first such tensor."""
    for name, t in state.items():
        if torch.is_tensor(t) and t.is_floating_point() and not torch.isfinite(t).all():
            bad = int((~torch.isfinite(t)).sum())
            raise PrismError(f"{what}: {name} holds {bad} NaN/inf values of {t.numel()}; {fix}")


# ----------------------------------------------------------------------------- model cards
def save_model(folder, model: nn.Module, info: DatasetInfo, cfg, ev: dict, wall: float, chash: str) -> None:
    """A trained network (teacher or student): weights, ``card.json`` (written last: it marks the model
    finished) and the config that made it."""
    folder = Path(folder)
    save_tensors(model.state_dict(), folder / WEIGHTS)
    card = {
        "arch": model.prismdd_spec["arch"],
        "spec": model.prismdd_spec,
        "dataset": info.name,
        "class_names": info.class_names,
        "mean": list(info.mean), "std": list(info.std),
        "epochs": getattr(cfg, "epochs", None),
        "test_top1": round(ev["top1"], 3),
        "test_top5": round(ev["top5"], 3),
        "seed": cfg.seed,
        "config": config_to_dict(cfg),
        "wall_time_s": round(wall, 2),
        "config_hash": chash,
        # the weights' sha256 as written: squeeze checks it before it counts a teacher as finished
        WEIGHTS_DIGEST: file_digest(folder / WEIGHTS),
    }
    save_config(cfg, folder / "config.yaml")
    write_json(folder / CARD, card)


WEIGHTS_DIGEST = "weights_sha256"  # in card.json: the sha256 of model.safetensors as save_model wrote it


def weights_problem(folder, card: dict) -> str | None:
    """What is wrong with a finished model folder's weights, or None: missing, unreadable, or other bytes than
    the card recorded (a card without the digest was not written by ``save_model``: its weights cannot be vouched
    for)."""
    path = Path(folder) / WEIGHTS
    if not path.exists():
        return "is missing"
    try:
        tensors_metadata(path)
        load_tensors(path)
    except PrismError:
        return "cannot be read (damaged or cut off)"
    was = card.get(WEIGHTS_DIGEST)
    if was is None:
        return f"has no {WEIGHTS_DIGEST} on its card"
    now = file_digest(path)
    if now != was:
        return f"changed since squeeze wrote it (sha256 {was[:12]} then, {now[:12]} now)"
    return None


def load_model(path, *, arch: str | None = None, dataset: str | None = None,
               class_names: list[str] | None = None, resolution: int | None = None,
               device="cpu") -> tuple[nn.Module, dict]:
    """Load a model folder (or its ``model.safetensors``) frozen in eval mode, checking what the caller expects."""
    folder = Path(path)
    if folder.name == WEIGHTS:
        folder = folder.parent
    if not (folder / CARD).exists():
        raise PrismError(f"{folder}: no card.json; not a finished teacher (train it with `prismdd squeeze`)")
    card = read_json(folder / CARD)
    if "spec" not in card or "arch" not in card:
        raise PrismError(f"{folder / CARD}: no model spec; retrain it with `prismdd squeeze --force`")
    if arch is not None and card["arch"] != arch:
        raise PrismError(f"{folder}: teacher is {card['arch']!r}, expected {arch!r}")
    if dataset is not None and card["dataset"] != dataset:
        raise PrismError(f"{folder}: teacher was trained on {card['dataset']!r}, expected {dataset!r}")
    if class_names is not None and list(card["class_names"]) != list(class_names):
        raise PrismError(f"{folder}: teacher classes differ from the dataset's ({len(card['class_names'])} vs "
                         f"{len(class_names)} classes, or another order)")
    if resolution is not None and card["spec"].get("resolution") != resolution:
        raise PrismError(f"{folder}: trained at {card['spec'].get('resolution')} px, the images are {resolution} px; "
                         f"pass --resolution {card['spec'].get('resolution')} or use teachers of this resolution")
    model = model_from_spec(card["spec"])
    state = load_tensors(folder / WEIGHTS)
    check_finite_state(state, f"{folder / WEIGHTS} ({card['arch']})",
                       "its training diverged or the file is damaged; retrain it with `prismdd squeeze --force`")
    try:
        model.load_state_dict(state)
    except RuntimeError as e:  # shapes or names differ from what card.json describes
        raise PrismError(f"{folder / WEIGHTS}: cannot load into the architecture card.json describes "
                         f"({str(e).splitlines()[0]}); retrain it with `prismdd squeeze --force`") from None
    model.eval().to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model, card


def find_teachers(folder) -> dict[str, Path]:
    """``{arch: teacher folder}`` for every finished teacher under a squeeze output folder."""
    folder = Path(folder)
    if (folder / CARD).exists():
        return {read_json(folder / CARD)["arch"]: folder}
    found = {read_json(card)["arch"]: card.parent for card in sorted(folder.glob(f"*/{CARD}"))}
    if not found:
        raise PrismError(f"--teachers {folder}: no finished teachers found (expected <arch>/card.json); "
                         f"train them with `prismdd squeeze --out {folder}`")
    return found


def find_one_teacher(path, option: str) -> Path:
    """The folder of the single teacher ``option`` points at (a teacher folder or a zoo of one)."""
    folder = Path(path)
    if not folder.exists():
        raise PrismError(f"{option} {path}: folder not found; train it with `prismdd squeeze --arch <arch> "
                         f"--out {path}`")
    found = find_teachers(folder)
    if len(found) > 1:
        raise PrismError(f"{option} {path}: holds several teachers ({', '.join(found)}); pass one of their "
                         f"folders, e.g. {option} {next(iter(found.values()))}")
    return next(iter(found.values()))


REFERENCE_LABEL_TEACHERS = 4  # PRISM's relabel_r18.sh --candidate-number 4 (generate_soft_label_r18.py:137)


def label_teacher_names(found: dict, archs: str | None, primary: str | None, pool: list[str] | None) -> list[str]:
    """The soft-label teachers a ``--label-teachers`` value names. Besides architectures it takes two words:
    ``primary`` (the distilled set's primary; the zoo's first for a baseline) and ``pool`` (the recover run's BN
    pool, plus any BN-free teacher of the folder, e.g. AlexNet, which PRISM labels with although it cannot be a BN
    teacher; for a baseline, every teacher of the folder). Nothing given: the primary alone."""
    first = primary if primary in found else next(iter(found))
    names: list[str] = []
    for a in comma_list(archs) or ["primary"]:
        if a == "primary":
            names.append(first)
        elif a == "pool":
            recorded = [t for t in pool if t in found] if pool else list(found)
            names += recorded + [t for t in found if t in BN_FREE_ARCHS]
        else:
            names.append(a)
    return list(dict.fromkeys(names))  # each teacher once, in the order named


def load_labelers(teachers_dir: str, archs: str | None, default_arch: str | None, info: DatasetInfo,
                  ensemble: str, primary_weight: float, device, pool: list[str] | None = None) -> SoftLabeler:
    """The soft-label teacher(s) of relabel and online validation (``label_teacher_names``)."""
    found = find_teachers(teachers_dir)
    names = label_teacher_names(found, archs, default_arch, pool)
    missing = [a for a in names if a not in found]
    if missing:
        raise PrismError(f"--label-teachers: no teacher {', '.join(missing)} in {teachers_dir} (found: {', '.join(found)})")
    if "pool" in comma_list(archs) and len(names) < REFERENCE_LABEL_TEACHERS:
        logger.info(f"[labels] soft labels from {len(names)} teacher(s) ({', '.join(names)}); PRISM labels with "
                    f"{REFERENCE_LABEL_TEACHERS} (its primary, mobilenet_v2, alexnet, shufflenet_v2_x0_5): train more "
                    f"into {teachers_dir} to match")
    models = [load_model(found[a], arch=a, dataset=info.name, class_names=info.class_names,
                         resolution=info.resolution, device=device)[0] for a in names]
    return SoftLabeler(models, names, ensemble, primary_weight)
