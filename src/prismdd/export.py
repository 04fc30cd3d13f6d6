"""``prismdd export --format ddranking DIR``: a distilled folder written so that DD-Ranking scores it unedited.

DD-Ranking (NUS-HPC-AI-Lab/DD-Ranking, PyPI ``ddranking`` 0.2.0) reads a distilled set as an ImageFolder
(``image_path``), its teachers from ``teacher_dir/<dataset>/<model>/ckpt_best.pt`` (a state dict of ITS network
classes) and everything else from a YAML ``Config``. What that version accepts, read from its code:

- datasets: CIFAR10 and CIFAR100 (torchvision's own files under ``real_data_path``), TinyImageNet, ImageNette /
  ImageWoof / ImageMeow / ImageSquawk / ImageFruit / ImageYellow and ImageNet1K (``train/`` and ``val/`` folders);
  every network is built for 3 input channels. Fashion-MNIST, MNIST and the digits are none of these (and have
  one channel), so a set distilled from them cannot be scored there.
- networks: ``ConvNet-3-BN`` (its DC-style ConvNet, 128 channels, a biased conv before each BatchNorm) and
  ``ResNet-18-BN`` through torchvision (with a 3x3 stride-1 stem and no max-pool at 32 and 64 px). A prismdd
  ConvNet at width 1 and a ResNet-18 at width 1 whose stem matches convert; anything else is refused here.
- soft labels: mode 'M' (the teachers label each augmented batch) is the one that reads an image folder; mode
  'S' needs a tensor of stored labels and refers to an attribute 0.2.0 never sets. prismdd's protocol labels
  online, which is mode 'M'. Random real as tensors calls ``get_random_data_tensors`` without its ``class_map``
  argument (``metrics/soft_label.py:461``), so the export asks for random real as images.
- LRS needs full-data accuracy: cached for (ImageNet1K | TinyImageNet, ResNet-18-BN), trained by it for the
  pairs it has a recipe for (``REAL_DATA_TRAINING_CONFIG``), refused otherwise.

The folder holds images/, teachers/, ddranking.yaml, score_with_ddranking.py and a README.md with the command.
"""
from __future__ import annotations

import os
import secrets
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import torch
import torch.nn as nn
import torchvision.models as tvm

from .artifacts import MANIFEST, load_distilled, load_model
from .core.config import opt
from .core.errors import PrismError
from .core.io import torch_save, write_json
from .core.presets import PROTOCOLS, preset_file
from .core.log import get_logger
from .methods import LABEL_SOURCES

logger = get_logger("export")

# DD-Ranking 0.2.0's dataset names with their class counts (utils/data.py get_dataset)
DDR_DATASETS = {"CIFAR10": 10, "CIFAR100": 100, "TinyImageNet": 200, "ImageNette": 10, "ImageWoof": 10,
                "ImageMeow": 10, "ImageSquawk": 10, "ImageFruit": 10, "ImageYellow": 10, "ImageNet1K": 1000}
OURS_TO_DDR = {"cifar10": "CIFAR10", "cifar100": "CIFAR100"}  # an imagefolder says which with --as-dataset
DDR_MODELS = {"convnet": "ConvNet-3-BN", "resnet18": "ResNet-18-BN"}
# utils/train_and_eval.py: full-data accuracy cached (LRS runs with eval_full_data false) / a recipe to train it
FULL_CACHED = {("ImageNet1K", "ResNet-18-BN"), ("TinyImageNet", "ResNet-18-BN")}
FULL_RECIPE = FULL_CACHED | {("TinyImageNet", "ConvNet-4-BN"), ("CIFAR10", "ConvNet-3"), ("CIFAR10", "ConvNet-3-BN"),
                             ("CIFAR100", "ConvNet-3"), ("CIFAR100", "ConvNet-3-BN")}
LOSSES = {"mse+ce": "mse_gt", "kl": "kl"}  # prismdd loss -> DD-Ranking soft_label_criterion


@dataclass
class ExportConfig:
    PRESET_FAMILY: ClassVar[str | None] = None
    POSITIONAL: ClassVar[str] = "distilled"

    distilled: str | None = opt(None, "a recover output folder (also as the first bare argument)", path=True)
    format: str = opt("ddranking", "ddranking: images, teachers and a config DD-Ranking 0.2.0 scores unedited",
                      choices=("ddranking",))
    out: str | None = opt(None, "output folder (default: <distilled>-ddranking)", hashed=False)
    teachers: str | None = opt(None, "a squeeze folder (default: the one the distilled set was recovered from)",
                               path=True)
    label_teachers: str | None = opt(None, "comma list of teacher archs that label the students (DD-Ranking's "
                                           "teacher_model_names; default: the recover run's primary)")
    student: str = opt("convnet", "the student DD-Ranking trains: convnet (ConvNet-3-BN) | resnet18 (ResNet-18-BN)",
                       choices=tuple(DDR_MODELS))
    protocol: str = opt("prism", "the prismdd student protocol whose settings the config carries",
                        choices=PROTOCOLS.names())
    as_dataset: str | None = opt(None, "DD-Ranking's name for the dataset of an imagefolder set: "
                                       + ", ".join(DDR_DATASETS), choices=tuple(DDR_DATASETS))
    real_data: str | None = opt(None, "DD-Ranking's real_data_path (default: the set's --data-root)")
    num_eval: int = opt(5, "DD-Ranking's repeats per score", minimum=1)
    epochs: int | None = opt(None, "DD-Ranking's num_epochs (default: the protocol's)", minimum=1)
    device: str = opt("cuda", "DD-Ranking's device (its default; cpu works)")
    force: bool = opt(False, "overwrite an existing export folder", hashed=False)

    def check(self):
        if not self.distilled:
            raise PrismError("export: give the distilled folder, e.g. prismdd export runs/main/stages/recover-prism-...")


def ddr_dataset(info_name: str, num_classes: int, channels: int, as_dataset: str | None) -> str:
    """DD-Ranking's name for the set's dataset, or a one-line refusal saying why it cannot take it."""
    name = as_dataset or OURS_TO_DDR.get(info_name)
    if name is None:
        if info_name == "imagefolder":
            raise PrismError(f"export: an imagefolder set needs --as-dataset NAME, DD-Ranking's name for it "
                             f"({', '.join(DDR_DATASETS)})")
        raise PrismError(f"export: DD-Ranking 0.2.0 cannot score a {info_name} set: it knows only "
                         f"{', '.join(DDR_DATASETS)} (its get_dataset), and builds every network for 3-channel images")
    if channels != 3:
        raise PrismError(f"export: the set has {channels} channel(s); DD-Ranking builds every network for 3")
    if DDR_DATASETS[name] != num_classes:
        raise PrismError(f"export: --as-dataset {name} has {DDR_DATASETS[name]} classes in DD-Ranking, the set "
                         f"{num_classes}")
    return name


def _ddr_convnet(sd: dict) -> dict:
    """prismdd ConvNet (BN, bias-free convs) -> DD-Ranking's ConvNet-3-BN state dict: same module indices
    (conv, norm, relu, pool per block), plus the zero biases its convs carry."""
    out = dict(sd)
    convs = sorted({k.rsplit(".", 1)[0] for k, v in sd.items() if k.startswith("features.") and v.ndim == 4})
    for c in convs:
        out[f"{c}.bias"] = torch.zeros(sd[f"{c}.weight"].shape[0])
    return out


def ddr_reference_model(model_name: str, num_classes: int, resolution: int) -> nn.Module:
    """DD-Ranking's network as a plain torch module with its parameter names and shapes, to check a converted
    state dict loads strictly before it is written (ResNet-18-BN: torchvision's, small stem at 32/64 px)."""
    if model_name == "ResNet-18-BN":
        m = tvm.resnet18(num_classes=num_classes)
        if resolution in (32, 64):
            m.conv1 = nn.Conv2d(3, 64, 3, 1, 1, bias=False)
            m.maxpool = nn.Identity()
        return m
    layers, r = [], resolution if resolution != 28 else 32
    for d in range(3):
        layers += [nn.Conv2d(3 if d == 0 else 128, 128, 3, padding=1), nn.BatchNorm2d(128), nn.ReLU(), nn.AvgPool2d(2)]
        r //= 2
    net = nn.Module()
    net.features = nn.Sequential(*layers)
    net.classifier = nn.Linear(128 * r * r, num_classes)
    return net


def convert_teacher(folder: Path, arch: str, num_classes: int, resolution: int) -> tuple[str, dict]:
    """A prismdd teacher as (DD-Ranking model name, state dict), checked against that network."""
    if arch not in DDR_MODELS:
        raise PrismError(f"export: teacher {arch}: DD-Ranking 0.2.0 builds {', '.join(DDR_MODELS.values())}; "
                         f"export a convnet or resnet18 teacher (--label-teachers)")
    model, card = load_model(folder / arch)
    spec = model.prismdd_spec
    if spec.get("width", 1.0) != 1.0:
        raise PrismError(f"export: teacher {arch} has width {spec['width']}; DD-Ranking's {DDR_MODELS[arch]} is the "
                         f"width-1 network (train one with prismdd squeeze --width 1)")
    sd = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    name = DDR_MODELS[arch]
    if arch == "convnet":
        sd = _ddr_convnet(sd)
    ref = ddr_reference_model(name, num_classes, resolution)
    try:
        ref.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        raise PrismError(f"export: teacher {arch} does not fit DD-Ranking's {name} at {resolution} px "
                         f"({str(e).splitlines()[1].strip()[:120] if len(str(e).splitlines()) > 1 else e}); "
                         f"its stem or depth differ") from None
    return name, sd


def ddr_config(cfg: ExportConfig, dataset: str, info, ipc: int, teacher_names: list[str], protocol: dict) -> dict:
    """DD-Ranking's YAML config (LabelRobustScoreSoft and AugmentationRobustScore read the keys they need) with
    prismdd's protocol in its terms; what it cannot express is listed in the README."""
    student = DDR_MODELS[cfg.student]
    norm = {"mean": list(info.mean) * (3 // len(info.mean)), "std": list(info.std) * (3 // len(info.std))}
    mix = protocol.get("mix", "cutmix")
    loss = LOSSES.get(protocol.get("loss", "mse+ce"), "mse_gt")
    return {
        "dataset": dataset, "real_data_path": cfg.real_data, "ipc": ipc, "im_size": [info.resolution] * 2,
        "model_name": student, "stu_use_torchvision": student == "ResNet-18-BN", "tea_use_torchvision": True,
        "teacher_dir": "./teachers", "teacher_model_names": teacher_names,
        "data_aug_func": mix if mix in ("cutmix", "mixup") else None, "aug_params": {"beta": 1.0}, "use_zca": False,
        # prismdd's crop and flip, and its normalisation, on the synthetic images; the test images as prismdd tests
        "custom_train_trans": [{"name": "RandomResizedCrop", "args": {"size": info.resolution,
                                                                     "scale": [protocol.get("min_scale", 0.25), 1.0]}},
                               {"name": "RandomHorizontalFlip", "args": {"p": 0.5}},
                               {"name": "ToTensor"}, {"name": "Normalize", "args": norm}],
        "custom_val_trans": [{"name": "ToTensor"}, {"name": "Normalize", "args": dict(norm)}],
        "use_aug_for_hard": False, "label_type": "soft", "soft_label_mode": "M", "soft_label_criterion": loss,
        "loss_fn_kwargs": ({"mse_weight": 1.0, "ce_weight": protocol.get("gamma", 0.1)} if loss == "mse_gt" else
                           {"temperature": protocol.get("temperature", 4.0), "scale_loss": False}),
        "optimizer": protocol.get("optimizer", "adamw"), "lr_scheduler": "cosine", "step_size": None,
        "weight_decay": protocol.get("weight_decay", 0.01), "momentum": 0.9, "num_eval": cfg.num_eval,
        "num_epochs": cfg.epochs or protocol.get("epochs", 300), "num_workers": 0,
        "syn_batch_size": protocol.get("batch_size") or (50 if ipc <= 10 else 100),  # validate's seed rule
        "real_batch_size": 256, "batch_size": 256,
        "eval_full_data": (dataset, student) not in FULL_CACHED,
        "random_data_format": "image", "random_data_path": "./random_data",
        "device": cfg.device, "dist": False, "save_path": "./ddranking_scores.csv",
    }


SCRIPT = '''"""Score this set with DD-Ranking's own evaluators (written by prismdd export; run from this folder)."""
import sys

from ddranking.config import Config
from ddranking.metrics import AugmentationRobustScore, LabelRobustScoreSoft

LR = {lr!r}  # the student learning rate of prismdd's protocol (DD-Ranking sweeps 5 without it)
which = sys.argv[1:] or ["lrs", "ars"]
if "lrs" in which:
    print("LRS", LabelRobustScoreSoft(Config.from_file("ddranking.yaml")).compute_metrics(image_path="images",
                                                                                           syn_lr=LR))
if "ars" in which:
    print("ARS", AugmentationRobustScore(Config.from_file("ddranking.yaml")).compute_metrics(image_path="images",
                                                                                              syn_lr=LR))
'''


def export(cfg: ExportConfig) -> Path:
    """Write the export folder; returns it. The images are checked against recover's digests on the way."""
    src = Path(cfg.distilled)
    ds = load_distilled(src)  # refuses edited or missing images
    man = ds.manifest
    info = ds.info
    dataset = ddr_dataset(info.name, len(info.class_names), info.channels, cfg.as_dataset)
    out = Path(cfg.out or f"{src.as_posix().rstrip('/')}-ddranking")
    check_out(out, src)
    if out.exists() and any(out.iterdir()) and not cfg.force:
        raise PrismError(f"export: {out} exists and is not empty; pass --force to overwrite it or another --out")
    teachers_dir = Path(cfg.teachers or man["config"].get("teachers") or "")
    if not (teachers_dir / MANIFEST).exists():
        raise PrismError(f"export: no teacher folder at {teachers_dir!s}; pass --teachers DIR (a squeeze folder)")
    primary = man["config"].get("primary")
    archs = [a for a in (cfg.label_teachers or primary or "").split(",") if a]
    converted = [convert_teacher(teachers_dir, a, len(info.class_names), info.resolution) for a in archs]
    protocol = preset_file("validate", cfg.protocol)
    ipc = int(man["config"]["ipc"])
    for _, source in LABEL_SOURCES.items():  # DD-Ranking labels with teachers (mode 'M'): a method's own label
        # vectors (FRePo's learned labels) cannot go along
        if source.made(man):
            logger.info(f"[export] note: {src} is a {source.method} set; its {source.what} ({source.file}) are not "
                        f"exported: DD-Ranking labels the images with the exported teachers")
    # everything is written into a new hidden folder beside --out first; --out changes only once it is complete
    # (a plain mkdir, so the folder gets the umask's mode; a name of its own, never a user's folder)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.{os.getpid()}.{secrets.token_hex(4)}.export-tmp"
    tmp.mkdir()
    try:
        n_images, lrs_note = _write_export(cfg, tmp, out, src, man, info, dataset, ipc, archs, converted, protocol)
        _replace_export(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    logger.info(f"[export] {n_images} images, teachers {', '.join(n for n, _ in converted)} -> {out}")
    logger.info(f"[export] score it: cd {out} && python score_with_ddranking.py   ({lrs_note})")
    return out


EXPORT_FILES = ("images", "teachers", "ddranking.yaml", "score_with_ddranking.py", "README.md", "export.json")


def check_out(out: Path, src: Path) -> None:
    """Refuse an --out that is the distilled folder, inside it or holds it: replacing it would delete the set."""
    o, s = out.resolve(), src.resolve()
    if o == s or s in o.parents or o in s.parents:
        where = "is" if o == s else "is inside" if s in o.parents else "contains"
        raise PrismError(f"--out {out}: {where} the distilled folder {src}; pass an --out outside it (default: "
                         f"{src.as_posix().rstrip('/')}-ddranking)")


def _replace_export(tmp: Path, out: Path) -> None:
    """Move a finished export into ``out``. An existing ``out`` (--force) loses only what an export writes
    (``EXPORT_FILES``); any other file in it stays."""
    if not out.exists():
        tmp.rename(out)
        return
    for name in EXPORT_FILES:
        old = out / name
        if old.is_dir() and not old.is_symlink():
            shutil.rmtree(old)
        elif old.exists() or old.is_symlink():
            old.unlink()
        if (tmp / name).exists():
            (tmp / name).rename(old)


def _write_export(cfg, tmp, out, src, man, info, dataset, ipc, archs, converted, protocol) -> tuple[int, str]:
    """The export's files, written into ``tmp``."""
    import yaml

    (tmp / "images").mkdir(parents=True)
    # class folders sort in class order (ImageFolder numbers them that way), named as DD-Ranking names its own
    counts = {}
    for e in sorted(man["outputs"]["images"].values(), key=lambda e: (e["class"], e["ipc_index"])):
        d = tmp / "images" / f"{e['class']:05d}"
        d.mkdir(exist_ok=True)
        shutil.copyfile(src / e["file"], d / f"{e['ipc_index']:05d}.png")
        counts[e["class"]] = counts.get(e["class"], 0) + 1
    if sorted(set(counts.values())) != [ipc] or len(counts) != len(info.class_names):
        raise PrismError(f"export: {src} does not hold {ipc} images for each of {len(info.class_names)} classes, which "
                         f"DD-Ranking assumes (its hard labels are ipc per class in order)")
    names = []
    for name, sd in converted:
        p = tmp / "teachers" / dataset / name / "ckpt_best.pt"
        p.parent.mkdir(parents=True, exist_ok=True)
        torch_save(sd, p)
        names.append(name)
    config = ddr_config(cfg, dataset, info, ipc, names, protocol)
    if config["real_data_path"] is None:
        config["real_data_path"] = man["config"].get("data_root") or "./dataset"
    # plain writes: the folder's files appear in --out only once all are written (``_replace_export``)
    (tmp / "ddranking.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    (tmp / "score_with_ddranking.py").write_text(SCRIPT.format(lr=float(protocol.get("lr", 0.001))))
    full = (dataset, config["model_name"])
    lrs_note = ("LRS uses DD-Ranking's cached full-data accuracy" if full in FULL_CACHED else
                "LRS trains the full-data student with DD-Ranking's recipe" if full in FULL_RECIPE else
                f"LRS will refuse: DD-Ranking 0.2.0 has neither a cached full-data accuracy nor a recipe for "
                f"{full[0]}-{full[1]} (ARS runs)")
    (tmp / "README.md").write_text(f"""# {src.name} for DD-Ranking

Written by `prismdd export --format ddranking` from `{src}`: {ipc} images per class of {dataset}
({len(info.class_names)} classes, {info.resolution} px), teachers {', '.join(names)} (converted from prismdd's
{', '.join(archs)}), and a config with prismdd's `{cfg.protocol}` student protocol in DD-Ranking's terms.

Score it (needs `pip install ddranking==0.2.0` and the real {dataset} data at `real_data_path` in ddranking.yaml):

    cd {out.name} && python score_with_ddranking.py          # both scores; `lrs` or `ars` for one

{lrs_note}. Not expressible in DD-Ranking's config, so different from prismdd's own students: its cosine schedule
(prismdd: {protocol.get('schedule', 'decayed_cosine')}), its best-of-evaluations accuracy (prismdd: the final
epoch), its LR sweep for the hard-label and random-real students, and one teacher-averaged label per batch
(prismdd's ensemble: {protocol.get('ensemble', 'mean')}).
""")
    write_json(tmp / "export.json", {"format": "ddranking", "ddranking_version": "0.2.0", "source": str(src),
                                     "dataset": dataset, "teachers": dict(zip(names, archs)),
                                     "config": config, "protocol": cfg.protocol})
    return sum(counts.values()), lrs_note
