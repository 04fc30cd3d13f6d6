"""How sure the teachers are of a distilled set: mean logit norm and mean top softmax probability per teacher.

A diagnostic for BENCHMARKS.md section 8: soft labels are the teachers' outputs on the images, so a set the
teachers are unsure of hands the student flat targets. Random real images of the same seed are the reference row.

    python benchmarks/teacher_confidence.py --teachers benchmarks/out/fashion-mnist/stages/teachers-<hash> \\
        --archs convnet,resnet18,mobilenet_v2 benchmarks/out/fashion-mnist/stages/recover-edc-<hash> ...
"""
from __future__ import annotations

import argparse

import torch

from prismdd.artifacts import find_teachers, load_distilled, load_model
from prismdd.core.config import comma_list
from prismdd.core.data import load_dataset, normalize, random_real_indices


def confidence(model: torch.nn.Module, images: torch.Tensor, info) -> tuple[float, float]:
    with torch.no_grad():
        logits = model(normalize(images, info))
    return float(logits.norm(dim=1).mean()), float(logits.softmax(1).max(1).values.mean())


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("distilled", nargs="+", help="recover output folders")
    p.add_argument("--teachers", required=True, help="a squeeze output folder")
    p.add_argument("--archs", default="convnet,resnet18,mobilenet_v2")
    p.add_argument("--dataset", default="fashion-mnist")
    p.add_argument("--ipc", type=int, default=10, help="of the random-real reference row")
    p.add_argument("--seed", type=int, default=0, help="of the random-real reference row")
    a = p.parse_args()
    train, _, info = load_dataset(a.dataset)
    found = find_teachers(a.teachers)
    models = {arch: load_model(found[arch])[0].eval() for arch in comma_list(a.archs)}
    sets = {"random real": train.get_images(random_real_indices(train, info.num_classes, a.ipc, a.seed))}
    sets.update({d.rstrip("/").rsplit("/", 1)[-1]: load_distilled(d).images for d in a.distilled})
    rows = []
    for name, images in sets.items():
        row = {"set": name}
        for arch, model in models.items():
            norm, top = confidence(model, images, info)
            row[f"{arch}: logit norm"], row[f"{arch}: top p"] = f"{norm:.1f}", f"{top:.3f}"
        rows.append(row)
    cols = list(rows[0])
    print("| " + " | ".join(cols) + " |\n|" + "---|" * len(cols))
    for r in rows:
        print("| " + " | ".join(r[c] for c in cols) + " |")


if __name__ == "__main__":
    main()
