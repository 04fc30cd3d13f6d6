"""RDED plug-in (methods/rded.py) against literal re-statements of LINs-lab/RDED @ 3f6453d
(synthesize/utils.py: MultiRandomCrop 54-74, pad 16-31, cross_entropy 97-99, selector 102-136, mix_images 139-166),
and end to end on digits with the session zoo."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F
import torchvision.transforms as T
import torchvision.transforms.functional as TF

from conftest import png_array, png_files
from prismdd.core.data import class_indices, denormalize, load_dataset, normalize
from prismdd.core.errors import PrismError
from prismdd.core.io import read_json
from prismdd.methods.rded import crop_losses, crop_resize, sample_box, select_crops, slots, stitch
from prismdd.stages.recover import recover, recover_config


# ----------------------------------------------------------------------------- the reference, re-stated
def ref_pad(t, target):  # utils.py:16-31
    v, h = target - t.size(2), target - t.size(3)
    return F.pad(t, (h // 2, h - h // 2, v // 2, v - v // 2))


def ref_selector(n, model, images, labels, size, m):  # utils.py:102-136 (batched_forward with batch = mipc)
    s = images.shape
    images = images.permute(1, 0, 2, 3, 4).reshape(s[0] * s[1], s[2], s[3], s[4])
    labels = labels.repeat(m)
    padded = ref_pad(images, size)
    preds = torch.cat([model(padded[i:i + s[0]]) for i in range(0, len(padded), s[0])])
    dist = (-torch.log(F.softmax(preds, dim=1).gather(1, labels.view(-1, 1))))[:, 0]  # utils.py:97-99
    dist = dist.reshape(m, s[0])
    index = torch.argmin(dist, 0)
    dist = dist[index, torch.arange(s[0])]
    sa = images.shape
    images = images.reshape(m, s[0], sa[1], sa[2], sa[3])[index, torch.arange(s[0])]
    return images[torch.argsort(dist, descending=False)[:n]]


def ref_mix_images(input_img, out_size, factor, n):  # utils.py:139-166
    s, remained = out_size // factor, out_size % factor
    k, mixed = 0, torch.zeros((n, input_img.shape[1], out_size, out_size))
    h_loc = 0
    for i in range(factor):
        h_r = s + 1 if i < remained else s
        w_loc = 0
        for j in range(factor):
            w_r = s + 1 if j < remained else s
            mixed[0:n, :, h_loc:h_loc + h_r, w_loc:w_loc + w_r] = F.interpolate(input_img[k * n:(k + 1) * n],
                                                                             size=(h_r, w_r))
            w_loc += w_r
            k += 1
        h_loc += h_r
    return mixed


class Lookup(nn.Module):
    """Fixed logits per crop: the crop's id is its (constant) pixel value; the centre pixel of the padded input
    holds it. Also checks the padding: zeros outside the centred s x s window."""

    def __init__(self, table: torch.Tensor, side: int):
        super().__init__()
        self.table, self.side = table, side

    def forward(self, x):
        size = x.shape[-1]
        top = (size - self.side) // 2
        mask = torch.ones(size, size, dtype=torch.bool)
        mask[top:top + self.side, top:top + self.side] = False
        assert x.shape[-2:] == (size, size) and (x[:, :, mask] == 0).all()
        return self.table[x[:, 0, size // 2, size // 2].round().long()]


# ----------------------------------------------------------------------------- scoring and selection
def test_selection_on_hand_made_logits():
    # 4 real images x 2 crops, 2 classes, label 0: CE = log(1 + exp(-a)) falls with a
    a = torch.tensor([[1.0, 3.0], [2.0, 0.5], [5.0, -1.0], [0.0, 0.2]])
    logits = torch.stack([a, torch.zeros_like(a)], -1)
    ce = -F.log_softmax(logits, -1)[..., 0]
    order, crop = select_crops(ce, 3)
    # best crop per image: 1, 0, 0, 1 (a = 3, 2, 5, 0.2); ranked by a descending: images 2, 0, 1
    assert order.tolist() == [2, 0, 1] and crop.tolist() == [0, 1, 0]
    with pytest.raises(PrismError, match="4 real images"):
        select_crops(ce, 5)


@pytest.mark.parametrize("seed", range(3))
def test_scoring_and_selection_match_the_reference_selector(seed):
    mipc, m, side, size, classes, n = 12, 3, 4, 9, 5, 6
    g = torch.Generator().manual_seed(seed)
    table = torch.randn(mipc * m, classes, generator=g) * 3
    ids = torch.randperm(mipc * m, generator=g).view(mipc, m)  # crop (i, j) -> its logits row
    patches = ids.float()[:, :, None, None, None].expand(mipc, m, 1, side, side).contiguous()
    label = 2
    model = Lookup(table, side)
    expected = ref_selector(n, model, patches, torch.full((mipc,), label), size, m)
    ce = crop_losses(model, patches, label, size)
    torch.testing.assert_close(ce, -F.log_softmax(table[ids], -1)[..., label])
    order, crop = select_crops(ce, n)
    assert torch.equal(patches[order, crop], expected)


# ----------------------------------------------------------------------------- crops
@pytest.mark.parametrize("hw,ratio", [((8, 8), (1.0, 1.0)), ((6, 11), (1.0, 1.0)), ((40, 30), (3 / 4, 4 / 3))])
def test_crop_box_is_torchvisions_random_resized_crop(hw, ratio):
    # MultiRandomCrop (utils.py:62-66): RandomResizedCrop(size // factor, ratio=(1, 1)), default scale
    img = torch.zeros(1, *hw)
    for seed in range(40):
        torch.manual_seed(seed)
        want = T.RandomResizedCrop.get_params(img, [0.08, 1.0], list(ratio))
        assert sample_box(torch.Generator().manual_seed(seed), *hw, (0.08, 1.0), ratio) == want
    # 6 x 11 with ratio 1: some draws must fall back to torchvision's centre crop
    torch.manual_seed(0)
    x = torch.rand(3, 23, 17)
    for box in [(0, 0, 23, 17), (3, 2, 9, 9), (10, 5, 4, 4)]:
        torch.testing.assert_close(crop_resize(x, box, 7), TF.resized_crop(x, *box, [7, 7], antialias=True))


# ----------------------------------------------------------------------------- stitching
def test_stitch_layout_on_a_fixed_tensor():
    # 9 px, f = 2: slots 5 + 4 (the remainder goes first); ipc 2 -> 8 patches of side 4, patch p = value p
    assert slots(9, 2) == [(0, 5), (5, 4)] and slots(8, 3) == [(0, 3), (3, 3), (6, 2)]
    patches = torch.arange(8.0)[:, None, None, None].expand(8, 1, 4, 4).contiguous()
    out = stitch(patches, 9, 2)
    assert out.shape == (2, 1, 9, 9)
    for m in range(2):
        for r in range(9):
            for c in range(9):
                k = (0 if r < 5 else 1) * 2 + (0 if c < 5 else 1)  # row-major slot
                assert out[m, 0, r, c] == k * 2 + m  # slot k of image m: ranked patch k * ipc + m
    # nearest resize 4 -> 5 repeats source column 0 (dst d takes src floor(d * 4 / 5))
    ramp = torch.arange(4.0).expand(4, 4)[None, None].repeat(4, 1, 1, 1)
    assert stitch(ramp, 9, 2)[0, 0, 0].tolist() == [0, 0, 1, 2, 3, 0, 1, 2, 3]


@pytest.mark.parametrize("size,f,ipc", [(9, 2, 2), (8, 2, 3), (10, 3, 1), (7, 1, 2)])
def test_stitch_matches_mix_images(size, f, ipc):
    patches = torch.randn(ipc * f * f, 3, size // f, size // f, generator=torch.Generator().manual_seed(size))
    assert torch.equal(stitch(patches, size, f), ref_mix_images(patches, size, f, ipc))


# ----------------------------------------------------------------------------- end to end (digits, session zoo)
def _rded(zoo, out, **kw):
    settings = dict(dataset="digits", ipc=2, batch_size=8, device="cpu", seed=0, teachers=str(zoo), out=str(out),
                    rded_mipc=20, rded_num_crop=3)
    settings.update(kw)
    return recover(recover_config("rded", **settings))


@pytest.fixture(scope="module")
def rded_run(zoo, tmp_path_factory):
    return _rded(zoo, tmp_path_factory.mktemp("rded"))


def test_rded_run_and_its_provenance(rded_run, zoo):
    out = rded_run
    m = read_json(out / "manifest.json")
    assert m["config"]["plugin"] == "rded" and m["inputs"]["plugin"]["factor"] == 2
    assert len(png_files(out)) == 20
    train, _, info = load_dataset("digits")
    members = class_indices(train.targets, 10)
    for e in m["outputs"]["images"].values():  # the manifest (and so the privacy audit) knows the real images used
        assert len(e["start_indices"]) == 4 and set(e["start_indices"]) <= set(members[e["class"]].tolist())
    patches = {}
    for p in sorted((out / "records").glob("batch_*.json")):
        r = read_json(p)
        assert r["iterations"] == 0 and r["bn_set"] == []
        for (c, k), prov in zip(r["units"], r["rded_patches"]):
            patches[c, k] = prov
    for c in range(10):
        # slot k of image m holds the (k * ipc + m)-th lowest CE
        ranked = [patches[c, mm][k]["ce"] for k in range(4) for mm in range(2)]
        assert ranked == sorted(ranked)
        for k in range(2):  # the PNG is exactly the recorded crops, resized and stitched
            crops = torch.stack([crop_resize(train.get_images([p["index"]])[0].float() / 255.0, p["box"], 4)
                                 for p in patches[c, k]])
            img = torch.zeros(1, 8, 8)
            for i, x in enumerate(crops):  # slot i = (row i // 2, column i % 2), 4 x 4 each
                img[:, (i // 2) * 4:(i // 2) * 4 + 4, (i % 2) * 4:(i % 2) * 4 + 4] = x
            want = (denormalize(normalize(img[None] * 255.0, info), info)[0, 0].clamp(0, 1) * 255).round().numpy()
            assert np.array_equal(png_array(out / f"images/{c:03d}/{c:03d}_{k:03d}.png"), want.astype(np.uint8))


def test_rded_images_depend_on_seed_and_class_only(rded_run, zoo, tmp_path):
    other = _rded(zoo, tmp_path / "b3", batch_size=3, pack="ipc")  # other batches, other order
    a, b = png_files(rded_run), png_files(other)
    assert sorted(a) == sorted(b)
    for name in a:
        assert np.array_equal(png_array(a[name]), png_array(b[name])), name
    ma, mb = (read_json(o / "manifest.json")["outputs"]["images"] for o in (rded_run, other))
    assert {k: e["start_indices"] for k, e in ma.items()} == {k: e["start_indices"] for k, e in mb.items()}
    seed1 = _rded(zoo, tmp_path / "s1", seed=1)
    assert read_json(seed1 / "manifest.json")["outputs"]["images"]["0_0"]["start_indices"] != ma["0_0"]["start_indices"]


def test_rded_refuses_real_init_and_oversized_requests(zoo, tmp_path):
    with pytest.raises(PrismError, match="--init real"):
        _rded(zoo, tmp_path / "r", init="real")
    with pytest.raises(PrismError, match="--rded-mipc 3"):
        _rded(zoo, tmp_path / "m", rded_mipc=3)  # 2 images x 2^2 crops > 3 real images
    with pytest.raises(PrismError, match="--rded-crop-scale"):
        recover_config("rded", rded_crop_scale=(0.5, 0.1))
