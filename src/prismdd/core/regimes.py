"""The three label regimes a set is judged under (Hard Truths about Soft Labels, CVPR 2026; Qin et al., NeurIPS 2024).

- ``hard``: cross-entropy on the class label, no teacher (validate ``--protocol hard``).
- ``soft``: fixed soft labels: the labelling teacher(s) label each UN-augmented image once, every augmented view of
  it keeps that one label (validate ``--protocol soft``, i.e. ``--fixed-labels``).
- ``kd``: knowledge distillation: the teacher(s) label every augmented view (the shared ``prism`` protocol and
  every method's own protocol).

Under kd the images matter least (random real subsets match the distillation methods); under hard labels they
matter most. This module holds what every caller of the regimes shares: their names and protocols and the per-regime
comparison against random real paired by seed; it imports no torch (the report and --help read it). The one
computation of fixed soft labels is ``core.training.fixed_soft_logits``.
"""
from __future__ import annotations

import numpy as np

from .errors import PrismError

# regime -> validate protocol; None: the caller's knowledge-distillation protocol (prism unless it says otherwise)
REGIMES = {"hard": "hard", "soft": "soft", "kd": None}
REGIME_WORDS = {"hard": "hard labels (CE on the class label, no teacher)",
                "soft": "fixed soft labels (one teacher label per un-augmented image)",
                "kd": "knowledge distillation (the teachers label every augmented view)"}


def check_regimes(names: list[str], option: str = "--regimes") -> list[str]:
    bad = [r for r in names if r not in REGIMES]
    if bad or not names:
        raise PrismError(f"{option} {','.join(names)}: expected a comma list of {', '.join(REGIMES)}")
    return list(dict.fromkeys(names))


def regime_of(loss: str, fixed_labels: bool, labelled: bool) -> str:
    """The regime a validate config trains under: ``labelled`` = soft labels come from teachers (online or stored)."""
    if loss == "ce":
        return "hard"
    if fixed_labels:
        return "soft"
    return "kd" if labelled else "learned"  # learned: FRePo's label vectors (or centred one-hot), its own kind


# ----------------------------------------------------------------------------- comparing sets per regime
def per_seed(entry: dict) -> dict[int, float]:
    """seed -> final-epoch top-1 of one regime's students (the first student architecture's runs)."""
    return {int(r["seed"]): float(r["top1"]) for r in entry.get("per_seed") or []}


def paired_margin(entry: dict, reference: dict) -> dict | None:
    """A set against random real in one regime, seed s against seed s (the same student seed, so the same
    initialisation and batch order stream): mean and spread of the differences, and how many seeds it leads on."""
    a, b = per_seed(entry), per_seed(reference)
    seeds = sorted(set(a) & set(b))
    if not seeds:
        return None
    d = np.array([a[s] - b[s] for s in seeds])
    return {"margin": round(float(d.mean()), 3), "std": round(float(d.std(ddof=1)), 3) if len(d) > 1 else None,
            "seeds": seeds, "ahead_on": int((d > 0).sum())}


def regime_summary(rows: list[dict], regime: str, reference_rows=("full",)) -> dict:
    """The winner of one regime among the sets (not the full-data reference), its margin over random real paired by
    seed, whether that margin is larger than the seed spread, and the full-data ceiling of the regime."""
    entries = {r["method"]: r["regimes"][regime] for r in rows
               if (r.get("regimes") or {}).get(regime) and r["method"] not in reference_rows}
    out = {"regime": regime, "what": REGIME_WORDS[regime], "winner": None}
    full = next((r["regimes"][regime] for r in rows if r["method"] in reference_rows
                 and (r.get("regimes") or {}).get(regime)), None)
    out["full_top1"] = full["top1"] if full else None
    if not entries:
        return out
    winner = max(entries, key=lambda m: entries[m]["top1"])
    out.update(winner=winner, winner_top1=entries[winner]["top1"])
    rnd = entries.get("random-real")
    if rnd is None:
        return out
    best_set = max((m for m in entries if m != "random-real"), key=lambda m: entries[m]["top1"], default=None)
    if best_set is None:
        return out
    pm = paired_margin(entries[best_set], rnd)
    spread = max(float(entries[best_set].get("top1_std") or 0), float(rnd.get("top1_std") or 0))
    out.update(best_set=best_set, vs_random=pm, spread=round(spread, 3))
    if pm is not None:
        n = len(pm["seeds"])
        out["beats_random"] = bool(n > 1 and pm["margin"] > spread)
    return out


def summary_line(s: dict) -> str:
    """One sentence per regime for the terminal and the report's verdict."""
    head = f"{s['regime']} ({s['what']})"
    if s.get("winner") is None:
        return f"{head}: no set was trained."
    text = f"{head}: best {s['winner']} {s['winner_top1']:.1f}%"
    pm = s.get("vs_random")
    if pm is not None:
        n = len(pm["seeds"])
        text += (f"; {s['best_set']} vs random real {pm['margin']:+.1f} points paired over {n} seed(s), ahead on "
                 f"{pm['ahead_on']} of {n}")
        if n <= 1:
            text += " (one seed: no spread measured, so this cannot be told apart from noise)"
        else:
            text += (f", {'more than' if s.get('beats_random') else 'not more than'} the seed spread "
                     f"(std up to {s['spread']:.1f})")
    if s.get("full_top1") is not None:
        text += f"; full data {s['full_top1']:.1f}%"
    return text + "."
