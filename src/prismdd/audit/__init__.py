"""audit: membership-inference audit of PRISM's privacy claim (METHOD.md section 6, seed Appendix A).

``config`` (settings), ``plan`` (pool, halves, canaries), ``attacks`` (threshold, LiRA, ROC metrics) and
``job`` (train the target and shadow pipelines with the main job's stage runner, score, attack, write).
"""
from .attacks import (ATTACKS, FPR_POINTS, attack_scores, bootstrap_ci, fit_gaussians, lira_scores, roc_metrics,
                      tpr_at_fpr)
from .config import DISTILLED, TARGETS, AuditConfig, resolve_config
from .job import NOTE, audit, audit_table, direct_members, model_seed, roc_figure, train_pipeline
from .plan import canary_dataset, make_plan, shadow_masks

__all__ = ["ATTACKS", "AuditConfig", "DISTILLED", "FPR_POINTS", "NOTE", "TARGETS", "attack_scores",
           "audit", "audit_table", "bootstrap_ci", "canary_dataset", "direct_members", "fit_gaussians",
           "lira_scores", "make_plan", "model_seed", "resolve_config", "roc_figure", "roc_metrics", "shadow_masks",
           "tpr_at_fpr", "train_pipeline"]
