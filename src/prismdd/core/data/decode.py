"""Image decoding: one file to uint8 (C, R, R) (``load_image``: EXIF orientation, bit depth, transparency, resize
and centre crop), the lazily decoded ImageFolder split (``FolderImages``) and the eval crop (``crop_ratio``,
``centre_crop`` for in-memory images)."""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor

import numpy as np
import torch
from torch.utils.data import Dataset

from ..errors import PrismError


IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".webp", ".tif", ".tiff", ".ppm", ".pgm")
GREY_MODES = ("1", "L", "LA", "I", "I;16", "I;16B", "I;16L", "I;16N", "F")
SIXTEEN_BIT_MODES = ("I;16", "I;16B", "I;16L", "I;16N", "I")
IMAGENET_CROP = 224 / 256  # "Resize 256 + CenterCrop 224": the crop keeps 87.5 % of the shorter side
EVAL_CROPS = ("auto", "none", "imagenet")
EXIF_ORIENTATION = 0x0112  # the EXIF tag saying how the camera was held (1 = upright; phones store 6 or 8 sideways)
# Transparent pixels are composited on white before use. The RGB under a fully transparent pixel is whatever the
# writer left there (often black, sometimes garbage); dropping alpha, as a plain convert("RGB") does, shows it.
# White is how viewers and web pages show cut-outs (logos, product shots), so the network sees what a person sees.
ALPHA_BACKGROUND = 255
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
PALETTE_MODES = ("P", "PA")


class FolderImages(Dataset):
    """Lazily decoded image files (ImageFolder layout), resized and centre-cropped to ``resolution``
    (``crop`` < 1: the shorter side goes to ``resolution / crop`` first, ImageNet's eval preprocessing).
    Used to fill the decoded cache, and directly when the cache is off (``PRISMDD_CACHE=off``)."""

    def __init__(self, samples: list[tuple[str, int]], resolution: int, channels: int = 3, crop: float = 1.0,
                 workers: int = 0):
        self.samples = samples
        self.targets = torch.tensor([s[1] for s in samples], dtype=torch.long)
        self.resolution = resolution
        self.channels = channels
        self.crop = crop
        self.workers = workers  # get_images decodes a batch with this many threads (PIL releases the GIL)

    def __len__(self):
        return len(self.samples)

    def load(self, i) -> torch.Tensor:
        return load_image(self.samples[i][0], self.resolution, self.channels, self.crop)

    def __getitem__(self, i):
        return self.load(i), self.targets[i]

    def get_images(self, idx) -> torch.Tensor:
        idx = [int(i) for i in torch.as_tensor(idx).reshape(-1)]
        if self.workers > 1 and len(idx) > 1:
            with ThreadPoolExecutor(self.workers) as pool:
                return torch.stack(list(pool.map(self.load, idx)))
        return torch.stack([self.load(i) for i in idx])


def crop_ratio(eval_crop: str, resolution: int) -> float:
    """The test split's centre-crop ratio: 1.0 (shorter side resized to ``resolution``, centre crop) or
    224/256 (shorter side to ``resolution * 256 / 224``, then the centre crop: ImageNet's eval preprocessing).
    ``auto`` = imagenet at 224 px and above (ImageNet-sized images), none below (small images keep their edges)."""
    if eval_crop == "imagenet" or (eval_crop == "auto" and resolution >= 224):
        return IMAGENET_CROP
    return 1.0


def to_8bit(im):
    """A PIL image in any mode -> an 8-bit one ("L" or a colour mode), scaling deeper pixels correctly.

    16-bit images (modes I;16*, and I, which is how PIL opens some 16-bit files) span 0..65535 and are divided
    by 257 (65535 -> 255); float images (mode F) in [0, 1] are multiplied by 255, other float ranges are
    clipped to [0, 255]. A plain ``convert("L")`` clips instead, which turns a 16-bit image all white.
    """
    from PIL import Image

    if im.mode in SIXTEEN_BIT_MODES:
        arr = np.asarray(im).astype(np.float64)
        return Image.fromarray(np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8), "L")
    if im.mode == "F":
        arr = np.nan_to_num(np.asarray(im).astype(np.float64))
        if arr.size and arr.min() >= 0 and arr.max() <= 1:
            arr = arr * 255.0
        return Image.fromarray(np.clip(np.round(arr), 0, 255).astype(np.uint8), "L")
    return im


def exif_orientation(im) -> int:
    """The EXIF orientation of an opened image (1 when it has none, or an unreadable EXIF block)."""
    try:
        return int(im.getexif().get(EXIF_ORIENTATION, 1) or 1)
    except Exception:  # noqa: BLE001 - a damaged EXIF block: the pixels are still usable as stored
        return 1


def has_alpha(im) -> bool:
    return im.mode in ALPHA_MODES or "transparency" in im.info


def upright(im):
    """The image as a viewer shows it: turned by its EXIF orientation (a phone photo is stored sideways with a tag
    saying so; fed as stored, the network sees it on its side)."""
    from PIL import ImageOps

    return ImageOps.exif_transpose(im) if 2 <= exif_orientation(im) <= 8 else im  # 1 or unknown: as stored


def flatten_alpha(im):
    """An image with transparency composited on ``ALPHA_BACKGROUND`` (RGB); other images unchanged."""
    from PIL import Image

    if not has_alpha(im):
        return im
    rgba = im.convert("RGBA")
    return Image.alpha_composite(Image.new("RGBA", rgba.size, (ALPHA_BACKGROUND,) * 3 + (255,)), rgba).convert("RGB")


def load_image(path, resolution: int, channels: int = 3, crop: float = 1.0) -> torch.Tensor:
    """Decode one image file to uint8 (C, R, R): turned upright by its EXIF orientation (``upright``), 8-bit
    conversion (``to_8bit``), transparency composited on white (``flatten_alpha``), the shorter side resized to
    ``resolution / crop``, then the centre R x R crop. The cache, per-batch decoding and check-data all decode
    here, so they agree. A clear error names an unreadable file."""
    from PIL import Image
    from torchvision.transforms import functional as TF

    try:
        with Image.open(path) as im:
            im = flatten_alpha(to_8bit(upright(im))).convert("RGB" if channels == 3 else "L")
            side = resolution if crop >= 1.0 else int(round(resolution / crop))
            if min(im.size) != side:
                im = TF.resize(im, side)
            im = TF.center_crop(im, resolution)
            arr = np.asarray(im, dtype=np.uint8)
    except Exception as e:  # PIL raises many types for broken files
        raise PrismError(f"{path}: cannot decode image ({type(e).__name__}: {e}); remove or replace the file "
                         f"(`prismdd check-data` lists all bad files)") from None
    t = torch.from_numpy(arr.copy())
    return t.unsqueeze(0) if t.ndim == 2 else t.permute(2, 0, 1).contiguous()


def centre_crop(images: torch.Tensor, crop: float) -> torch.Tensor:
    """uint8 (N, C, S, S) images resized to ``S / crop`` and their centre ``S`` kept: the in-memory twin of
    ``load_image``'s crop (crop 224/256 = ImageNet's "Resize 256 + CenterCrop 224" on an S = 224 image)."""
    side = images.shape[-1]
    big = int(round(side / crop))
    x = torch.nn.functional.interpolate(images.float(), size=big, mode="bilinear", antialias=True)
    o = (big - side) // 2
    return x[..., o: o + side, o: o + side].round().clamp(0, 255).to(torch.uint8)
