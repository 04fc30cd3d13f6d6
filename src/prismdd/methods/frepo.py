"""FRePo (Zhou, Nezhadarya & Ba, NeurIPS 2022): dataset distillation by neural feature regression.

Unlike the SRe2L family, FRePo needs no pretrained teacher: it learns the synthetic images AND their labels so that
kernel ridge regression on the features of networks trained on the synthetic set predicts real data well
(yongchao97/FRePo @ 9b98c65, ``lib/datadistillation/frepo.py``; FIDELITY.md has the element-by-element table).

Each outer step ``s`` (every random draw from ``make_generator(seed, "frepo", s)``, so a resumed run and an
uninterrupted one take the same draws):

1. one network of a pool of ``frepo_pool`` (each trained online on the CURRENT synthetic set for
   ``frepo_online_steps`` steps, then re-initialised; their ages are staggered at the start) gives features
   f (the input of its last Linear layer) of the synthetic images S and of a real batch T, BatchNorm on its
   running statistics, no gradient into the network;
2. kernel ridge regression from S to T in closed form, ``pred_T = K_TS (K_SS + lambda I)^-1 Y_S`` with
   ``K = f f^T`` and ``lambda = frepo_reg * trace(K_SS) / |S|``;
3. loss = 0.5 * squared error summed over classes, mean over T, against centred one-hot targets, plus the label
   margin term; LAMB steps (per-tensor trust ratio) on the pixels of S and on the labels Y_S;
4. one Adam step of that pool network on (S, Y_S), MSE on the learned labels, its gradient by ``torch.func.grad``
   over the network's parameter dict (``functional_call``); a network past its step limit is re-initialised
   instead.

The whole set is optimised jointly (``whole_set``: recover plans ONE batch of every (class, IPC index) unit). The
whole state (images, labels, their LAMB moments, every pool network with its buffers and Adam moments, ages) is
written atomically every ``frepo_checkpoint_every`` steps to ``frepo_state.safetensors``; a killed run continues
from it bit-identically. The learned labels go to ``learned_labels.safetensors`` (``LEARNED_LABELS``), a label source of the registry
(``methods/labels.py``, ``LearnedLabels`` below owns its reader): ``validate --labels <this folder> --loss mse`` trains
with them without knowing FRePo.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
import torch.nn as nn
from torch.func import functional_call, grad

from ..artifacts import SEALED_FILES, DistilledSet, centred_onehot, check_sealed_file, read_manifest
from ..core.config import config_hash, opt
from ..core.data import normalize, pixel_bounds
from ..core.errors import PrismError
from ..core.io import JsonlLog, load_tensors, save_tensors, tensors_metadata
from ..core.models import create_model
from ..core.runtime import Heartbeat, derive_seed, make_generator, progress
from ..core.training import half_sse
from .base import Options, PLUGINS, Plugin, options
from .labels import LABEL_SOURCES, LabelSource
from ..core.log import get_logger

logger = get_logger("recover.frepo")

STATE_FILE = "frepo_state.safetensors"
LEARNED_LABELS = "learned_labels.safetensors"  # in a recover folder: one label vector per image, learned with it
# the reference's Flax BatchNorm keeps 0.9 of the CURRENT batch in its running statistics (momentum 0.1 in Flax's
# sense); torch's momentum is the weight of the new batch, so the same rule is 0.9 here
FLAX_BN_MOMENTUM = 0.9


# ----------------------------------------------------------------------------- the pieces (tested one by one)
def krr_predict(fs: torch.Tensor, ft: torch.Tensor, ys: torch.Tensor, reg: float) -> torch.Tensor:
    """Kernel ridge regression with the linear kernel on features: (|T|, C) predictions.

    fs: (|S|, D) support features, ft: (|T|, D) target features, ys: (|S|, C) support labels. lambda is ``reg``
    times the mean diagonal of K_SS (frepo.py:110), so the same ``reg`` fits any feature scale."""
    kss = fs @ fs.T  # (S, S)
    kts = ft @ fs.T  # (T, S)
    lam = abs(reg) * torch.trace(kss) / kss.shape[0]
    eye = torch.eye(kss.shape[0], dtype=kss.dtype, device=kss.device)
    return kts @ torch.linalg.solve(kss + lam * eye, ys)


def label_margin(labels: torch.Tensor) -> torch.Tensor:
    """frepo.py:152-157: mean over images of -min(top1 - top2, 1/C): pushes each learned label's largest entry at
    least 1/C above its second, and no further."""
    top2 = labels.topk(2, dim=1).values
    return -torch.clamp(top2[:, 0] - top2[:, 1], max=1.0 / labels.shape[1]).mean()


def lamb_update(p: torch.Tensor, g: torch.Tensor, m: torch.Tensor, v: torch.Tensor, t: int, lr: float,
                betas=(0.9, 0.999), eps: float = 1e-6) -> None:
    """One LAMB step in place, as optax.lamb without weight decay: the Adam direction (bias-corrected), scaled by
    the trust ratio ||p|| / ||direction|| of the whole tensor (1 when either is 0). ``t`` counts from 1."""
    b1, b2 = betas
    m.mul_(b1).add_(g, alpha=1 - b1)
    v.mul_(b2).addcmul_(g, g, value=1 - b2)
    u = (m / (1 - b1 ** t)) / ((v / (1 - b2 ** t)).sqrt() + eps)
    pn, un = p.norm(), u.norm()
    ratio = torch.where((pn > 0) & (un > 0), pn / un, torch.ones_like(pn))
    p.sub_(lr * ratio * u)


def adam_update(params: dict, grads: dict, m: dict, v: dict, t: int, lr: float, betas=(0.9, 0.999),
                eps: float = 1e-8) -> None:
    """One Adam step in place on dicts of tensors (the pool's online training; ``t`` counts from 1)."""
    b1, b2 = betas
    for k, g in grads.items():
        m[k].mul_(b1).add_(g, alpha=1 - b1)
        v[k].mul_(b2).addcmul_(g, g, value=1 - b2)
        params[k].sub_(lr * (m[k] / (1 - b1 ** t)) / ((v[k] / (1 - b2 ** t)).sqrt() + eps))


def cosine_to(step: int, total: int, floor: float) -> float:
    """optax.cosine_decay_schedule's factor: 1 -> ``floor`` over ``total`` steps (frepo.py:399-400, alpha 0.1)."""
    return (1 - floor) * 0.5 * (1 + math.cos(math.pi * min(step, total) / total)) + floor


class FeatureNet:
    """One architecture of the registry, used functionally: a pool network is a dict of parameters and buffers,
    ``functional_call`` runs the shared module with it; features are the input of the last Linear layer."""

    def __init__(self, arch: str, width: float, info, device):
        self.arch, self.width, self.info, self.device = arch, width, info, device
        self.module = self._build().to(device)
        self.param_names = [n for n, _ in self.module.named_parameters()]
        head = [m for m in self.module.modules() if isinstance(m, nn.Linear)][-1]
        self._store: dict[str, torch.Tensor] = {}
        head.register_forward_pre_hook(lambda m, inp: self._store.__setitem__("f", inp[0].flatten(1)))

    def _build(self) -> nn.Module:
        model = create_model(self.arch, self.info.num_classes, self.info.channels, self.info.resolution, self.width)
        for m in model.modules():
            if isinstance(m, nn.modules.batchnorm._BatchNorm):
                m.momentum = FLAX_BN_MOMENTUM
        return model

    def init_state(self, seed: int) -> dict[str, torch.Tensor]:
        """Fresh parameters and buffers drawn from ``seed`` (the global random state is left untouched)."""
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fresh = self._build()
        return {k: v.detach().to(self.device).clone() for k, v in fresh.state_dict().items()}

    def features(self, state: dict, x: torch.Tensor, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """(features, logits) of ``x`` under ``state``; ``train``: batch statistics, updating the running ones in
        ``state`` (the online step), else the running statistics (the meta step, frepo.py:115-126)."""
        self.module.train(train)
        logits = functional_call(self.module, state, (x,))
        return self._store.pop("f"), logits


# ----------------------------------------------------------------------------- the plug-in
@options("frepo", kind="plugin")
class FRePoOptions(Options):
    """FRePo's settings (``--method frepo``): the online pool, the regression and LAMB."""

    frepo_pool: int = opt(10, "frepo: networks in the online pool (distill.py --num_nn_state 10)", minimum=1)
    frepo_online_steps: int = opt(100, "frepo: online training steps of a pool network on the synthetic set before it "
                                       "is re-initialised (--max_online_updates 100)", minimum=1)
    frepo_online_lr: float = opt(3e-4, "frepo: Adam learning rate of the pool networks' online training (3e-4)",
                                 minimum=0.0)
    frepo_arch: str = opt("convnet", "frepo: the pool networks' architecture, any of `prismdd models` (the reference "
                                     "distils with a BatchNorm ConvNet-D3)")
    frepo_width: float = opt(1.0, "frepo: width multiplier of the pool networks (1.0: 128 channels)", minimum=0.01)
    frepo_real_batch: int = opt(1024, "frepo: real images T per step (--batch_size 1024)", minimum=1)
    frepo_lr: float = opt(3e-4, "frepo: LAMB learning rate of the pixels (3e-4; LAMB scales it by each tensor's norm)",
                          minimum=0.0)
    frepo_label_lr: float = opt(3e-4, "frepo: LAMB learning rate of the learned labels (3e-4, the same optimiser); "
                                      "0 = labels stay centred one-hot", minimum=0.0)
    frepo_lr_floor: float = opt(0.1, "frepo: both learning rates follow a cosine from 1 to this factor (alpha 0.1)",
                                minimum=0.0)
    frepo_reg: float = opt(1e-6, "frepo: kernel ridge lambda as a multiple of K_SS's mean diagonal (1e-6)",
                           minimum=0.0)
    frepo_margin: float = opt(1.0, "frepo: weight of the label-margin term -min(top1 - top2, 1/C) on the learned "
                                   "labels (the reference adds it with weight 1)", minimum=0.0)
    frepo_flip: bool = opt(False, "frepo: S and its mirror image both support the regression (the reference: on for "
                                  "RGB sets, off for MNIST / Fashion-MNIST)")
    frepo_checkpoint_every: int = opt(100, "frepo: steps between checkpoints of the whole state (kill -9 resumes from "
                                           "the last)", minimum=1, hashed=False)

    @staticmethod
    def check(cfg) -> None:
        if cfg.frepo_lr_floor > 1:
            raise PrismError(f"--frepo-lr-floor {cfg.frepo_lr_floor}: the factor the cosine falls to from 1; above 1 "
                             f"both learning rates would rise instead; pass 0 to 1 (FRePo: 0.1)")


@PLUGINS.register("frepo")
class FRePo(Plugin):
    name = "frepo"
    engine_optimises = False  # its own meta-learning loop
    without_engine = "optimises its pixels in its own loop, not with recover's engine that this option acts on"
    whole_set = True  # recover plans one batch of every unit: the set is learned jointly
    uses_teachers = False  # nothing pretrained: the pool networks are trained on the synthetic set itself
    owned_files = (STATE_FILE, LEARNED_LABELS, "logs/frepo.jsonl")  # recover --force removes them (any method)
    sealed_files = (LEARNED_LABELS, STATE_FILE)

    def __init__(self, cfg, info, train, teachers, pool, device):
        super().__init__(cfg, info, train, teachers, pool, device)
        try:  # checked before recover --force clears the folder
            self.net = FeatureNet(cfg.frepo_arch, cfg.frepo_width, info, device)
        except PrismError as e:
            raise PrismError(f"--frepo-arch {cfg.frepo_arch}: {e}") from None

    def outputs_present(self, out: Path) -> bool:
        return (Path(out) / LEARNED_LABELS).exists()  # deleted: the set is made again from the final state

    def prepare(self, out: Path, rank: int = 0) -> dict:
        cfg = self.cfg
        self.out = Path(out)  # a forced run finds no old state: recover --force removed it with the old images
        return {"pool_arch": cfg.frepo_arch, "pool_width": cfg.frepo_width, "pool": cfg.frepo_pool,
                "steps": cfg.iterations, "state_file": STATE_FILE, "labels_file": LEARNED_LABELS,
                "reference": "github.com/yongchao97/FRePo @ 9b98c65beac9baa851aeab7f1c8ca71ca74bb886"}

    # --------------------------------------------------------------- state
    def _fresh_slot(self, slot: int, generation: int) -> dict:
        state = self.net.init_state(derive_seed(self.cfg.seed, "frepo-init", slot, generation))
        m = {k: torch.zeros_like(state[k]) for k in self.net.param_names}
        return {"state": state, "m": m, "v": {k: torch.zeros_like(t) for k, t in m.items()}}

    def _new_state(self, x0: torch.Tensor, y: torch.Tensor) -> dict:
        cfg, n = self.cfg, self.cfg.frepo_pool
        # ages 0, K/n, 2K/n ...: the pool never re-initialises all at once (frepo.py:406-416)
        return {"step": 0, "images": x0.clone(), "labels": centred_onehot(y, self.info.num_classes, scaled=True),
                "img_m": torch.zeros_like(x0), "img_v": torch.zeros_like(x0),
                "lab_m": torch.zeros(len(y), self.info.num_classes, device=x0.device),
                "lab_v": torch.zeros(len(y), self.info.num_classes, device=x0.device),
                "slots": [self._fresh_slot(i, 0) for i in range(n)],
                "ages": torch.tensor([i * (cfg.frepo_online_steps // n) for i in range(n)]),
                "generations": torch.zeros(n, dtype=torch.long), "slot_steps": torch.zeros(n, dtype=torch.long)}

    ON_DEVICE = ("images", "labels", "img_m", "img_v", "lab_m", "lab_v")  # the rest are CPU counters
    FLAT = ON_DEVICE + ("ages", "generations", "slot_steps")

    def _save(self, st: dict, chash: str) -> None:
        tensors = {k: st[k] for k in self.FLAT}
        tensors["step"] = torch.tensor(st["step"])
        for i, s in enumerate(st["slots"]):
            for part in ("state", "m", "v"):
                tensors.update({f"slot{i}/{part}/{k}": t for k, t in s[part].items()})
        save_tensors(tensors, self.out / STATE_FILE, metadata={"config_hash": chash, "step": str(st["step"]),
                                                               "last": json.dumps(st.get("last", {}))})

    def _load(self, path: Path, chash: str, x0: torch.Tensor) -> dict:
        if tensors_metadata(path).get("config_hash") != chash:
            raise PrismError(f"{path}: a FRePo state made with other settings; use --force to start anew, or "
                             f"another --out")
        d = load_tensors(path)
        st = {k: d[k].to(self.device) if k in self.ON_DEVICE else d[k] for k in self.FLAT}
        st["step"] = int(d["step"])
        st["last"] = json.loads(tensors_metadata(path).get("last", "{}"))  # the losses of the step it was saved at
        if st["images"].shape != x0.shape:
            raise PrismError(f"{path}: holds {tuple(st['images'].shape)} images, this run makes {tuple(x0.shape)}; "
                             f"use --force to start anew")
        st["slots"] = [{part: {k.split("/", 2)[2]: t.to(self.device) for k, t in d.items()
                               if k.startswith(f"slot{i}/{part}/")} for part in ("state", "m", "v")}
                       for i in range(self.cfg.frepo_pool)]
        return st

    # --------------------------------------------------------------- one outer step
    def _meta_step(self, st: dict, s: int, lo: torch.Tensor, hi: torch.Tensor) -> dict:
        cfg, C = self.cfg, self.info.num_classes
        gen = make_generator(cfg.seed, "frepo", s)
        slot = int(torch.randint(cfg.frepo_pool, (1,), generator=gen))
        idx = torch.randint(len(self.train), (cfg.frepo_real_batch,), generator=gen)
        xt = normalize(self.train.get_images(idx), self.info).to(self.device)
        yt = centred_onehot(self.train.targets[idx].to(self.device), C)  # targets: unscaled (distill.py:203-207)
        state = st["slots"][slot]["state"]
        xs = st["images"].detach().requires_grad_(True)
        ys = st["labels"].detach().requires_grad_(cfg.frepo_label_lr > 0)
        with torch.no_grad():  # the real side carries no gradient (frepo.py:471)
            ft, _ = self.net.features(state, xt, train=False)
        support, support_y = xs, ys
        if cfg.frepo_flip:  # RGB in the reference: S and its mirror image both support the regression
            support, support_y = torch.cat([xs, xs.flip(-1)]), torch.cat([ys, ys])
        fs, _ = self.net.features(state, support, train=False)
        pred = krr_predict(fs, ft, support_y, cfg.frepo_reg)
        terms = {"krr_mse": half_sse(pred, yt)}
        if cfg.frepo_label_lr > 0 and cfg.frepo_margin > 0:
            terms["label_margin"] = cfg.frepo_margin * label_margin(ys)
        loss = sum(terms.values())
        if not torch.isfinite(loss):
            raise PrismError(f"frepo step {s}: loss became {loss.item()}; lower --frepo-lr / --frepo-label-lr "
                             f"or raise --frepo-reg")
        g_img, *g_lab = torch.autograd.grad(loss, [xs, ys] if ys.requires_grad else [xs])
        lr = cosine_to(s, cfg.iterations, cfg.frepo_lr_floor)
        t = s + 1
        with torch.no_grad():
            lamb_update(st["images"], g_img, st["img_m"], st["img_v"], t, cfg.frepo_lr * lr)
            st["images"].clamp_(lo, hi)  # stay a valid image (the PNG keeps [0, 255] anyway)
            if g_lab:
                lamb_update(st["labels"], g_lab[0], st["lab_m"], st["lab_v"], t, cfg.frepo_label_lr * lr)
        self._online_step(st, slot)
        acc = float((pred.argmax(1) == yt.argmax(1)).float().mean())
        return {**{k: float(v.detach()) for k, v in terms.items()}, "loss": float(loss.detach()), "krr_acc": acc,
                "slot": slot}

    def _online_step(self, st: dict, slot: int) -> None:
        """Pool network ``slot`` past its step limit is re-initialised (and not trained this step, frepo.py:511-517);
        otherwise one Adam step on the synthetic set just updated (MSE on the learned labels, no augmentation)."""
        cfg = self.cfg
        st["ages"][slot] += 1
        if st["ages"][slot] > cfg.frepo_online_steps:
            st["generations"][slot] += 1
            st["slots"][slot] = self._fresh_slot(slot, int(st["generations"][slot]))
            st["ages"][slot] = 0
            st["slot_steps"][slot] = 0
            return
        s = st["slots"][slot]
        xs, ys = st["images"].detach(), st["labels"].detach()
        params = {k: s["state"][k] for k in self.net.param_names}
        buffers = {k: t for k, t in s["state"].items() if k not in params}  # BN running statistics, updated in place

        def loss_fn(p, bufs):  # the buffers are an input (not captured): BatchNorm updates them in place
            _, logits = self.net.features({**bufs, **p}, xs, train=True)
            return half_sse(logits, ys)

        g = grad(loss_fn)(params, buffers)
        st["slot_steps"][slot] += 1
        with torch.no_grad():
            adam_update(params, g, s["m"], s["v"], int(st["slot_steps"][slot]), cfg.frepo_online_lr)

    # --------------------------------------------------------------- the run
    def synthesize(self, b: int, units: list[tuple[int, int]], x0: torch.Tensor):
        cfg = self.cfg
        chash = config_hash(cfg)
        y = torch.tensor([c for c, _ in units], device=self.device)
        x0 = x0.to(self.device)
        path = self.out / STATE_FILE
        st = self._load(path, chash, x0) if path.exists() else self._new_state(x0, y)
        lo, hi = pixel_bounds(self.info, self.device)
        log = JsonlLog(self.out / "logs" / "frepo.jsonl")
        if st["step"]:
            logger.info(f"[recover] frepo: resuming at step {st['step']} of {cfg.iterations} from {path}")
        bar = progress(total=cfg.iterations, initial=st["step"], desc="recover frepo")
        beat = Heartbeat("recover frepo", cfg.iterations, done=st["step"])  # a line a minute without a terminal
        last: dict = st.get("last", {})  # a finished state re-read (its labels file was deleted): its last losses
        while st["step"] < cfg.iterations:
            s = st["step"]
            last = st["last"] = self._meta_step(st, s, lo, hi)
            st["step"] = s + 1
            if s % cfg.log_every == 0 or st["step"] == cfg.iterations:
                log.write(step=s, **{k: round(v, 6) if isinstance(v, float) else v for k, v in last.items()})
            if st["step"] % cfg.frepo_checkpoint_every == 0 or st["step"] == cfg.iterations:
                self._save(st, chash)
            bar.update(1)
            bar.set_postfix(loss=f"{last['loss']:.4f}", krr_acc=f"{last['krr_acc']:.2f}")
            beat.step(loss=last["loss"])
        bar.close()
        labels = st["labels"].detach().cpu()
        save_tensors({"labels": labels, "class": y.cpu(), "ipc_index": torch.tensor([k for _, k in units])},
                     self.out / LEARNED_LABELS, metadata={"config_hash": chash, "method": "frepo"})
        return st["images"].detach(), {
            "final_losses": {k: round(v, 6) for k, v in last.items() if k != "slot"}, "iterations": cfg.iterations,
            "learned_labels": LEARNED_LABELS,
            "label_argmax_agrees": round(float((labels.argmax(1) == y.cpu()).float().mean()), 4)}


# ----------------------------------------------------------------------------- the learned labels, for validate
class LearnedLabels(LabelSource):
    """FRePo's learned labels as a label source: ``validate --loss mse`` (``--protocol frepo``) regresses them."""

    file = LEARNED_LABELS
    method = "FRePo"
    writer = "recover --method frepo"
    loss = "mse"
    protocol = "frepo"

    def made(self, manifest: dict) -> bool:
        return (manifest.get("config") or {}).get("plugin") == FRePo.name

    def read(self, folder, ds: DistilledSet) -> torch.Tensor:
        """The (N, C) learned labels of a recover folder, in ``ds``'s image order (class, then IPC index), checked
        against the digest its manifest sealed and against the images it holds."""
        path = Path(folder) / LEARNED_LABELS
        if not path.exists():
            raise PrismError(f"{path}: missing; re-run the recover command that made {folder} to make it again")
        sealed = (read_manifest(folder).get("outputs") or {}).get(SEALED_FILES) or {}
        check_sealed_file(folder, LEARNED_LABELS, sealed.get(LEARNED_LABELS))
        d = load_tensors(path)
        labels, cls, k = d["labels"].float(), d["class"].long(), d["ipc_index"].long()
        order = sorted(range(len(cls)), key=lambda i: (int(cls[i]), int(k[i])))
        labels, cls = labels[order], cls[order]
        if len(cls) != len(ds) or not torch.equal(cls, ds.targets.long()) or labels.shape[1] != ds.info.num_classes:
            raise PrismError(f"{path}: labels for {len(cls)} images do not match the {len(ds)} images of {folder}; "
                             f"re-run recover with --force")
        if not torch.isfinite(labels).all():
            raise PrismError(f"{path}: the learned labels are not finite; re-run recover with --force")
        return labels


LEARNED = LABEL_SOURCES.register("frepo", LearnedLabels())
