"""Golden config hashes and resolved fields of recover, relabel and validate: assembling RecoverConfig from the
engine's fields and the plug-ins' own field groups must give every preset, and every option of a plug-in, these
hashes and values, so no finished run looks stale and no default drifts. A hash here changes only on purpose: a
new hash means every stage folder made before it is recomputed, not reused (0.1 changed them all once, when the
config hash began to cover every hashed field at every value). Paths are absolute so the hashes do not depend on
the cwd."""
from __future__ import annotations

import pytest

from prismdd.core.config import config_hash, config_to_dict
from prismdd.core.presets import METHODS
from prismdd.stages.recover import recover_config

BASE = dict(dataset="digits", teachers="/t", out="o")

# every field of `recover_config("prism", **BASE)`
PRISM = {'dataset': 'digits',
 'data_root': None,
 'download': False,
 'device': 'auto',
 'seed': 0,
 'out': 'o',
 'num_workers': 0,
 'resolution': None,
 'channels': None,
 'eval_crop': 'auto',
 'subset': None,
 'threads': None,
 'force': False,
 'method': 'prism',
 'teachers': '/t',
 'primary': 'convnet',
 'bn_pool': None,
 'ipc': 10,
 'iterations': 4000,
 'batch_size': 100,
 'lr': 0.05,
 'betas': [0.5, 0.9],
 'alpha_bn': 0.01,
 'first_bn_multiplier': 10.0,
 'bn_layer_reduce': 'sum',
 'bn_normalize': False,
 'selection': 'intra',
 'slots': 3,
 'slot_prob': 0.5,
 'init': 'real',
 'init_select': 'first',
 'init_candidates': 300,
 'init_tiles': 1,
 'init_from': '',
 'crop_scale': [0.08, 1.0],
 'crop_per': 'batch',
 'crop_schedule': 'uniform',
 'jitter': None,
 'jitter_mode': 'reference',
 'pack': 'ipc',
 'flip': True,
 'budget': 'early_late',
 'early_late_step': 0.125,
 'early_late_cycle': 8,
 'min_rounds': 0,
 'tv_l2': 0.0,
 'l2': 0.0,
 'param': 'pixels',
 'multires_step': 4,
 'multires_optimizer': 'engine',
 'view_noise': 0.0,
 'clip_prior': '',
 'clip_weight': 1.0,
 'clip_prompt': 'a photo of a {name}',
 'channels_last': None,
 'compile': False,
 'amp': False,
 'log_every': 50,
 'plugin': 'none',
 'select_scores': '',
 'ccs_drop_hard': 0.3,
 'ccs_strata': 50,
 'kcenter_start': 'mean',
 'bps_k': 30,
 'bps_min_cosine': 0.5,
 'bps_trials': 3,
 'bps_infomap_seed': 123,
 'bps_merge_below': 0,
 'bps_centre_ratio': 0.5,
 'bps_gmm_top': 0.1,
 'bps_crossing': 'code',
 'rded_mipc': 300,
 'rded_num_crop': 5,
 'rded_factor': 2,
 'rded_crop_scale': [0.08, 1.0],
 'gvbsm_r_loss': 0.01,
 'gvbsm_momentum': 0.4,
 'gvbsm_dd_weight': 1.0,
 'gvbsm_tau': 4.0,
 'gvbsm_dd_pool': 32,
 'gvbsm_stats_images': None,
 'dwa_rho': 0.0,
 'dwa_steps': 1,
 'dwa_var_weight': 1.0,
 'dwa_carry_grad': False,
 'edc_weight': 0.0,
 'edc_class_weight': 0.5,
 'edc_momentum': 0.8,
 'edc_stats_images': None,
 'edc_conv': False,
 'edc_swap_patch_targets': False,
 'edc_round_robin': False,
 'edc_order': None,
 'edc_gpus': 1,
 'd4m_model': 'stable-diffusion-v1-5/stable-diffusion-v1-5',
 'd4m_size': 512,
 'd4m_max_images': None,
 'd4m_km_expand': 1,
 'd4m_strength': 0.7,
 'd4m_guidance': 8.0,
 'd4m_steps': 50,
 'd4m_prompt': '{name}',
 'd4m_negative_prompt': 'cartoon, anime, painting',
 't2i_model': '',
 't2i_prompt': 'a photo of a {name}',
 't2i_negative_prompt': '',
 't2i_steps': None,
 't2i_guidance': None,
 't2i_size': None,
 't2i_batch': 4,
 'frepo_pool': 10,
 'frepo_online_steps': 100,
 'frepo_online_lr': 0.0003,
 'frepo_arch': 'convnet',
 'frepo_width': 1.0,
 'frepo_real_batch': 1024,
 'frepo_lr': 0.0003,
 'frepo_label_lr': 0.0003,
 'frepo_lr_floor': 0.1,
 'frepo_reg': 1e-06,
 'frepo_margin': 1.0,
 'frepo_flip': False,
 'frepo_checkpoint_every': 100}

# (method, overrides, config hash, the fields that differ from PRISM)
GOLDEN = [
    ('bps', {}, '0baacce2fa2dd217',
     {'method': 'bps', 'iterations': 1000, 'alpha_bn': 0.0, 'selection': 'single', 'init': 'noise', 'pack': 'class',
      'budget': 'constant', 'plugin': 'bps'}),
    # the selection methods (methods/select.py): new presets, their hashes recorded when they were added
    ('ccs', {}, '497d53b39f7d8df7',
     {'method': 'ccs', 'iterations': 1000, 'alpha_bn': 0.0, 'selection': 'single', 'init': 'noise', 'pack': 'class',
      'budget': 'constant', 'plugin': 'ccs'}),
    ('el2n', {}, '8349386cc49f8443',
     {'method': 'el2n', 'iterations': 1000, 'alpha_bn': 0.0, 'selection': 'single', 'init': 'noise', 'pack': 'class',
      'budget': 'constant', 'plugin': 'el2n'}),
    ('forgetting', {}, '09abc3a520d5a945',
     {'method': 'forgetting', 'iterations': 1000, 'alpha_bn': 0.0, 'selection': 'single', 'init': 'noise', 'pack': 'class',
      'budget': 'constant', 'plugin': 'forgetting'}),
    ('herding', {}, '845bc2b9e9b26bce',
     {'method': 'herding', 'iterations': 1000, 'alpha_bn': 0.0, 'selection': 'single', 'init': 'noise', 'pack': 'class',
      'budget': 'constant', 'plugin': 'herding'}),
    ('kcenter', {}, 'bbea02eddc48a782',
     {'method': 'kcenter', 'iterations': 1000, 'alpha_bn': 0.0, 'selection': 'single', 'init': 'noise', 'pack': 'class',
      'budget': 'constant', 'plugin': 'kcenter'}),
    ('random', {}, '37629b9e853b07c1',
     {'method': 'random', 'iterations': 1000, 'alpha_bn': 0.0, 'selection': 'single', 'init': 'noise', 'pack': 'class',
      'budget': 'constant', 'plugin': 'random'}),
    ('cda', {}, '3d3f1892e7b6f544',
     {'method': 'cda',
 'lr': 0.25,
 'selection': 'single',
 'init': 'noise',
 'crop_schedule': 'cosine',
 'budget': 'constant'}),
    ('d4m', {}, 'e67ffef64ac8888b',
     {'method': 'd4m',
 'iterations': 1000,
 'alpha_bn': 0.0,
 'selection': 'single',
 'init': 'noise',
 'pack': 'class',
 'budget': 'constant',
 'plugin': 'd4m'}),
    ('delt', {}, '2d24ff6ed188daba',
     {'method': 'delt',
 'lr': 0.25,
 'selection': 'single',
 'init_select': 'delt-medium',
 'crop_schedule': 'cosine',
 'jitter': 0,
 'pack': 'class',
 'budget': 'rounds'}),
    ('dwa', {}, '4ae709a4dc3dd9a0',
     {'method': 'dwa',
 'iterations': 2000,
 'lr': 0.25,
 'selection': 'single',
 'init_select': 'random',
 'budget': 'constant',
 'plugin': 'dwa',
 'dwa_rho': 0.015,
 'dwa_steps': 15,
 'dwa_var_weight': 2.0}),
    ('edc', {}, '4b86842fe85ded6f',
     {'method': 'edc',
 'iterations': 1000,
 'batch_size': 20,
 'alpha_bn': 0.0,
 'selection': 'all',
 'init_select': 'low-loss',
 'init_tiles': 2,
 'crop_scale': [0.5, 1.0],
 'jitter': 0,
 'pack': 'class',
 'budget': 'constant',
 'plugin': 'edc',
 'edc_weight': 0.1,
 'edc_conv': True,
 'edc_swap_patch_targets': True,
 'edc_round_robin': True,
 'edc_order': 'resnet18,mobilenet_v2,efficientnet_b0,shufflenet_v2_x0_5,alexnet',
 'edc_gpus': 4}),
    ('frepo', {}, '9ac9c56b768b7bab',
     {'method': 'frepo',
 'iterations': 2000,
 'alpha_bn': 0.0,
 'selection': 'single',
 'init_select': 'random',
 'budget': 'constant',
 'plugin': 'frepo',
 'frepo_lr': 0.003,
 'frepo_label_lr': 0.003}),
    ('gvbsm', {}, '67ab9f9a96a364c2',
     {'method': 'gvbsm',
 'batch_size': 80,
 'lr': 0.1,
 'alpha_bn': 0.0,
 'selection': 'all',
 'init': 'noise',
 'pack': 'class',
 'budget': 'constant',
 'plugin': 'gvbsm'}),
    ('prism', {}, 'a8d381054cf8c755',
     {}),
    ('prism-pre', {}, '54445f115e82475c',
     {'method': 'prism-pre', 'selection': 'pre'}),
    ('prism-strong-bn', {}, '1c1f614134c8684e',
     {'method': 'prism-strong-bn',
 'iterations': 1000,
 'alpha_bn': 1.0,
 'crop_per': 'image',
 'jitter_mode': 'symmetric',
 'pack': 'cross'}),
    ('rded', {}, '2ed82ad43a7d8057',
     {'method': 'rded',
 'iterations': 1000,
 'alpha_bn': 0.0,
 'selection': 'single',
 'init': 'noise',
 'pack': 'class',
 'budget': 'constant',
 'plugin': 'rded'}),
    ('sre2l', {}, 'c9d1d0903a499f4b',
     {'method': 'sre2l', 'lr': 0.25, 'selection': 'single', 'init': 'noise', 'budget': 'constant'}),
    ('t2i', {}, '35e4a1b9da43de8a',
     {'method': 't2i',
 'iterations': 1000,
 'batch_size': 10,
 'alpha_bn': 0.0,
 'selection': 'single',
 'init': 'noise',
 'pack': 'class',
 'budget': 'constant',
 'plugin': 't2i'}),
    ('sre2l', {'param': 'multires'}, '2ad842b904536028',
     {'method': 'sre2l', 'lr': 0.25, 'selection': 'single', 'init': 'noise', 'budget': 'constant', 'param': 'multires'}),
    ('sre2l', {'param': 'multires', 'multires_step': 2, 'multires_optimizer': 'sgd', 'view_noise': 0.2}, '84fe35f083a867cc',
     {'method': 'sre2l',
 'lr': 0.25,
 'selection': 'single',
 'init': 'noise',
 'budget': 'constant',
 'param': 'multires',
 'multires_step': 2,
 'multires_optimizer': 'sgd',
 'view_noise': 0.2}),
    ('prism', {'clip_prior': '/clip', 'clip_weight': 0.5, 'clip_prompt': 'an image of a {name}'}, '6c7269f32ac1d7c9',
     {'clip_prior': '/clip', 'clip_weight': 0.5, 'clip_prompt': 'an image of a {name}'}),
    ('frepo', {'frepo_width': 2.0, 'frepo_flip': True, 'frepo_checkpoint_every': 7}, '2fed267ad2f1c55a',
     {'method': 'frepo',
 'iterations': 2000,
 'alpha_bn': 0.0,
 'selection': 'single',
 'init_select': 'random',
 'budget': 'constant',
 'plugin': 'frepo',
 'frepo_width': 2.0,
 'frepo_lr': 0.003,
 'frepo_label_lr': 0.003,
 'frepo_flip': True,
 'frepo_checkpoint_every': 7}),
    ('edc', {'edc_conv': True, 'edc_order': 'resnet18,convnet', 'edc_gpus': 4}, '29e25b1cd4cf1597',
     {'method': 'edc',
 'iterations': 1000,
 'batch_size': 20,
 'alpha_bn': 0.0,
 'selection': 'all',
 'init_select': 'low-loss',
 'init_tiles': 2,
 'crop_scale': [0.5, 1.0],
 'jitter': 0,
 'pack': 'class',
 'budget': 'constant',
 'plugin': 'edc',
 'edc_weight': 0.1,
 'edc_conv': True,
 'edc_swap_patch_targets': True,
 'edc_round_robin': True,
 'edc_order': 'resnet18,convnet',
 'edc_gpus': 4}),
    ('d4m', {'d4m_strength': 0.5, 'd4m_prompt': 'a {name}'}, 'f0c434ef38f078b9',
     {'method': 'd4m',
 'iterations': 1000,
 'alpha_bn': 0.0,
 'selection': 'single',
 'init': 'noise',
 'pack': 'class',
 'budget': 'constant',
 'plugin': 'd4m',
 'd4m_strength': 0.5,
 'd4m_prompt': 'a {name}'}),
    ('t2i', {'t2i_model': '/m', 't2i_steps': 4, 't2i_batch': 2}, 'baa9af6b1b82754f',
     {'method': 't2i',
 'iterations': 1000,
 'batch_size': 10,
 'alpha_bn': 0.0,
 'selection': 'single',
 'init': 'noise',
 'pack': 'class',
 'budget': 'constant',
 'plugin': 't2i',
 't2i_model': '/m',
 't2i_steps': 4,
 't2i_batch': 2}),
    ('dwa', {'dwa_rho': 0.015, 'dwa_steps': 12}, '1cc992a5da15ef1f',
     {'method': 'dwa',
 'iterations': 2000,
 'lr': 0.25,
 'selection': 'single',
 'init_select': 'random',
 'budget': 'constant',
 'plugin': 'dwa',
 'dwa_rho': 0.015,
 'dwa_steps': 12,
 'dwa_var_weight': 2.0}),
    ('gvbsm', {'gvbsm_stats_images': 100}, 'e6ef49a0e014a477',
     {'method': 'gvbsm',
 'batch_size': 80,
 'lr': 0.1,
 'alpha_bn': 0.0,
 'selection': 'all',
 'init': 'noise',
 'pack': 'class',
 'budget': 'constant',
 'plugin': 'gvbsm',
 'gvbsm_stats_images': 100}),
    ('bps', {'bps_k': 10, 'bps_crossing': 'density', 'select_scores': '/s'}, 'a40e29e7c4e47223',
     {'method': 'bps', 'iterations': 1000, 'alpha_bn': 0.0, 'selection': 'single', 'init': 'noise', 'pack': 'class',
      'budget': 'constant', 'plugin': 'bps', 'select_scores': '/s', 'bps_k': 10, 'bps_crossing': 'density'}),
    ('rded', {'rded_factor': 1, 'rded_crop_scale': [0.5, 1.0]}, '4eb77afb7fd07c59',
     {'method': 'rded',
 'iterations': 1000,
 'alpha_bn': 0.0,
 'selection': 'single',
 'init': 'noise',
 'pack': 'class',
 'budget': 'constant',
 'plugin': 'rded',
 'rded_factor': 1,
 'rded_crop_scale': [0.5, 1.0]}),
]


def test_every_recover_preset_is_covered():
    assert sorted({m for m, o, _, _ in GOLDEN if not o}) == METHODS.names()


@pytest.mark.parametrize("method, overrides, chash, diff", GOLDEN,
                         ids=[m + "".join(f"-{k}" for k in o) for m, o, _, _ in GOLDEN])
def test_recover_config_hash_and_fields_unchanged(method, overrides, chash, diff):
    cfg = recover_config(method, **BASE, **overrides)
    assert config_to_dict(cfg) == {**PRISM, **diff}
    assert config_hash(cfg) == chash


# ----------------------------------------------------------------------------- each method owns its options
def _sections(helptext: str) -> dict[str, list[str]]:
    """``--help``'s argument sections: title -> the flags listed under it."""
    out, title = {}, None
    for line in helptext.splitlines():
        if line and not line.startswith(" ") and line.endswith(":"):
            title = line[:-1]
            out[title] = []
        elif title and line.startswith("  --"):
            out[title].append(line.split()[0].rstrip(","))
    return out


def _help(cli, capsys, argv) -> str:
    assert cli(argv) == 0
    return capsys.readouterr().out


def test_no_plugin_field_or_check_is_declared_in_the_stage():
    import dataclasses
    import inspect

    from prismdd.methods import option_groups
    from prismdd.stages import recover as stage

    groups = option_groups()
    assert {g.name for g in groups} >= {"frepo", "d4m", "t2i", "dwa", "edc", "gvbsm", "rded", "multires", "clip"}
    prefixes = tuple(g.name + "_" for g in groups)
    assert not [f.name for f in dataclasses.fields(stage.EngineConfig) if f.name.startswith(prefixes)]
    source = inspect.getsource(stage)
    assert not [p for p in prefixes if f"cfg.{p}" in source or f"self.{p}" in source or f"    {p}" in source]
    # every group's field is a field of RecoverConfig, with the metadata its module declared
    fields = {f.name: f for f in dataclasses.fields(stage.RecoverConfig)}
    for g in groups:
        assert g.__module__.startswith("prismdd.methods.")
        for f in dataclasses.fields(g):
            assert dict(fields[f.name].metadata) == dict(f.metadata) and fields[f.name].default == f.default


@pytest.mark.parametrize("flags, message", [
    ({"frepo_lr_floor": 1.5}, "--frepo-lr-floor 1.5: the factor"),
    ({"d4m_prompt": "x"}, "--d4m-prompt 'x': must contain {name}"),
    ({"multires_step": 2}, "--multires-step 2: only --param multires uses it"),
    ({"clip_weight": 0.5}, "--clip-weight 0.5: weighs the CLIP prior"),
    ({"edc_momentum": 1.0}, "--edc-momentum 1.0: expected 0 <= momentum < 1"),
])
def test_a_groups_checks_run_when_the_config_is_built(flags, message):
    from prismdd.core.errors import PrismError

    with pytest.raises(PrismError, match=message.replace("{", r"\{").replace("}", r"\}").replace("+", r"\+")):
        recover_config("sre2l", **BASE, **flags)


def test_help_lists_the_engine_then_one_section_per_plugin(cli, capsys):
    sections = _sections(_help(cli, capsys, ["recover", "--help"]))
    titles = [t for t in sections if t not in ("usage", "options")]
    assert titles[0] == "engine" and "--ipc" in sections["engine"] and "--frepo-width" not in sections["engine"]
    assert titles[1:] == ["parametrisation multires", "prior clip", "selection select", "plug-in bps", "plug-in ccs",
                          "plug-in d4m", "plug-in dwa", "plug-in edc", "plug-in frepo", "plug-in gvbsm", "plug-in kcenter",
                          "plug-in rded", "plug-in t2i"]
    assert "--frepo-width" in sections["plug-in frepo"] and "--clip-prior" in sections["prior clip"]


@pytest.mark.parametrize("method, own, optimises", [
    ("sre2l", None, True), ("frepo", "frepo", False), ("edc", "edc", True), ("rded", "rded", False),
    ("d4m", "d4m", False), ("t2i", "t2i", False), ("dwa", "dwa", True), ("gvbsm", "gvbsm", True),
])
def test_help_for_a_method_shows_the_engine_and_its_own_options_only(cli, capsys, method, own, optimises):
    sections = _sections(_help(cli, capsys, ["recover", "--method", method, "--help"]))
    plugins = [t for t in sections if t.startswith("plug-in ")]
    assert plugins == ([f"plug-in {own}"] if own else [])
    assert ("parametrisation multires" in sections) is optimises and ("prior clip" in sections) is optimises
    assert "--ipc" in sections["engine"]


def test_an_option_left_out_of_a_methods_help_still_parses():
    from prismdd.cli import build_parser, config_from_args

    argv = ["recover", "--method", "sre2l", "--frepo-width", "2", "--dataset", "digits"]
    assert config_from_args("recover", build_parser(argv).parse_args(argv)).frepo_width == 2.0


# ----------------------------------------------------------------------------- relabel and validate
# relabel and validate, with the label options they share (one group, core/labels.py): each protocol's values and hash
LABEL_BASE = dict(distilled="/d", teachers="/t", out="o")

RELABEL_PRISM = {'dataset': None,
 'data_root': None,
 'download': False,
 'device': 'auto',
 'seed': 0,
 'out': 'o',
 'num_workers': 0,
 'resolution': None,
 'channels': None,
 'eval_crop': 'auto',
 'subset': None,
 'threads': None,
 'force': False,
 'protocol': 'prism',
 'distilled': '/d',
 'teachers': '/t',
 'label_teachers': 'primary,pool',
 'ensemble': 'norm-matched',
 'primary_weight': 0.5,
 'epochs': 300,
 'batch_size': None,
 'batch_rule': 'seed',
 'min_scale': 0.25,
 'mix': 'cutmix',
 'patch_shuffle': 0,
 'rand_augment': '',
 'storage': 'fp16',
 'topk': 0}

VALIDATE_PRISM = {'dataset': None,
 'data_root': None,
 'download': False,
 'device': 'auto',
 'seed': 0,
 'out': 'o',
 'num_workers': 0,
 'resolution': None,
 'channels': None,
 'eval_crop': 'auto',
 'subset': None,
 'threads': None,
 'force': False,
 'protocol': 'prism',
 'distilled': '/d',
 'labels': None,
 'teachers': '/t',
 'label_teachers': 'primary,pool',
 'ensemble': 'norm-matched',
 'primary_weight': 0.5,
 'random_real': False,
 'full': False,
 'ipc': 10,
 'student': 'convnet',
 'student_width': 1.0,
 'seeds': '0',
 'epochs': 300,
 'batch_size': None,
 'batch_rule': 'seed',
 'optimizer': 'adamw',
 'nesterov': True,
 'lr': 0.001,
 'weight_decay': 0.01,
 'decay_exempt': '1d',
 'grad_accum': 2,
 'schedule': 'decayed_cosine',
 'loss': 'mse+ce',
 'gamma': 0.1,
 'lr_every': 'epoch',
 'mix_ce': 'own',
 'temperature': 4.0,
 'fixed_labels': False,
 'kl_t2': True,
 'min_scale': 0.25,
 'mix': 'cutmix',
 'patch_shuffle': 0,
 'rand_augment': '',
 'ema_eval': 0.0,
 'augment': True,
 'scores': False,
 'full_top1': None,
 'bn_double_update': False,
 'steps_per_epoch': None,
 'warmup': 0.0,
 'eval_every': 50}

# (config class, protocol, overrides, config hash, the fields that differ from that class's prism protocol)
LABEL_GOLDEN = [
    ('RelabelConfig', 'appendix-c', {}, '81de1e76f26d19ef',
     {'protocol': 'appendix-c',
      'label_teachers': None,
      'ensemble': 'mean',
      'epochs': 90,
      'batch_size': 256,
      'mix': 'none'}),
    ('RelabelConfig', 'cda', {}, 'b42145561e151990',
     {'protocol': 'cda', 'label_teachers': None, 'ensemble': 'mean', 'batch_size': 128, 'min_scale': 0.08}),
    ('RelabelConfig', 'd4m', {}, '9594086b8e04216b',
     {'protocol': 'd4m', 'label_teachers': None, 'ensemble': 'mean', 'batch_size': 1024, 'min_scale': 0.08}),
    ('RelabelConfig', 'delt', {}, 'c24caf7a8871ca2c',
     {'protocol': 'delt',
      'label_teachers': None,
      'ensemble': 'mean',
      'batch_rule': 'rded',
      'rand_augment': 'rand-m6-n2-mstd1.0'}),
    ('RelabelConfig', 'dwa', {}, 'b42145561e151990',
     {'protocol': 'dwa', 'label_teachers': None, 'ensemble': 'mean', 'batch_size': 128, 'min_scale': 0.08}),
    ('RelabelConfig', 'edc', {}, '35c63e02685d128c',
     {'protocol': 'edc',
      'label_teachers': 'resnet18,mobilenet_v2,shufflenet_v2_x0_5,alexnet',
      'ensemble': 'mean',
      'batch_size': 100,
      'min_scale': 0.5}),
    ('RelabelConfig', 'frepo', {}, '12b42ce9f03c7c41',
     {'protocol': 'frepo',
      'label_teachers': None,
      'ensemble': 'mean',
      'epochs': 2000,
      'batch_rule': 'frepo',
      'min_scale': 0.64,
      'mix': 'none'}),
    ('RelabelConfig', 'gvbsm', {}, 'd19d8c301a0c5173',
     {'protocol': 'gvbsm',
      'label_teachers': 'resnet18,mobilenet_v2,efficientnet_b0,shufflenet_v2_x0_5',
      'batch_size': 1024,
      'min_scale': 0.08}),
    ('RelabelConfig', 'hard', {}, '15886973077cab83',
     {'protocol': 'hard', 'label_teachers': None, 'ensemble': 'mean', 'batch_size': 256, 'mix': 'none'}),
    ('RelabelConfig', 'prism', {}, 'f7c4d26e833d39f6',
     {}),
    ('RelabelConfig', 'rded', {}, 'b4dfaac93a713173',
     {'protocol': 'rded',
      'label_teachers': None,
      'ensemble': 'mean',
      'batch_rule': 'rded',
      'min_scale': 0.5,
      'patch_shuffle': 2}),
    ('RelabelConfig', 'soft', {}, '15886973077cab83',
     {'protocol': 'soft', 'label_teachers': None, 'ensemble': 'mean', 'batch_size': 256, 'mix': 'none'}),
    ('RelabelConfig', 'sre2l', {}, '9594086b8e04216b',
     {'protocol': 'sre2l', 'label_teachers': None, 'ensemble': 'mean', 'batch_size': 1024, 'min_scale': 0.08}),
    ('RelabelConfig', 'prism', {'ensemble': 'norm-matched-sample', 'label_teachers': 'primary,pool', 'batch_rule': 'rded'}, '6901be956596de44',
     {'ensemble': 'norm-matched-sample', 'batch_rule': 'rded'}),
    ('RelabelConfig', 'sre2l', {'ensemble': 'weighted', 'primary_weight': 0.7, 'epochs': 5, 'batch_size': 20, 'mix': 'mixup', 'patch_shuffle': 2, 'min_scale': 0.5}, '5c1a484a0403a568',
     {'protocol': 'sre2l',
      'label_teachers': None,
      'ensemble': 'weighted',
      'primary_weight': 0.7,
      'epochs': 5,
      'batch_size': 20,
      'min_scale': 0.5,
      'mix': 'mixup',
      'patch_shuffle': 2}),
    ('ValidateConfig', 'appendix-c', {}, 'e664731ba51af6aa',
     {'protocol': 'appendix-c',
      'label_teachers': None,
      'ensemble': 'mean',
      'epochs': 90,
      'batch_size': 256,
      'optimizer': 'sgd',
      'lr': 0.1,
      'weight_decay': 0.0005,
      'decay_exempt': 'none',
      'grad_accum': 1,
      'schedule': 'linear',
      'loss': 'ce',
      'lr_every': 'step',
      'mix': 'none'}),
    ('ValidateConfig', 'cda', {}, 'e6daccc85cc86f6a',
     {'protocol': 'cda',
      'label_teachers': None,
      'ensemble': 'mean',
      'batch_size': 128,
      'schedule': 'cosine',
      'loss': 'kl',
      'temperature': 20.0,
      'kl_t2': False,
      'min_scale': 0.08}),
    ('ValidateConfig', 'd4m', {}, 'b60ffd1eaf83d6ab',
     {'protocol': 'd4m',
      'label_teachers': None,
      'ensemble': 'mean',
      'batch_size': 1024,
      'schedule': 'cosine',
      'loss': 'kl',
      'temperature': 20.0,
      'kl_t2': False,
      'min_scale': 0.08}),
    ('ValidateConfig', 'delt', {}, '8968fd99496ed255',
     {'protocol': 'delt',
      'label_teachers': None,
      'ensemble': 'mean',
      'batch_rule': 'rded',
      'grad_accum': 1,
      'schedule': 'half_cosine',
      'loss': 'kl',
      'temperature': 20.0,
      'kl_t2': False,
      'rand_augment': 'rand-m6-n2-mstd1.0',
      'bn_double_update': True}),
    ('ValidateConfig', 'dwa', {}, 'abcea998cf2f9b4b',
     {'protocol': 'dwa',
      'label_teachers': None,
      'ensemble': 'mean',
      'batch_size': 128,
      'grad_accum': 1,
      'schedule': 'cosine',
      'loss': 'kl',
      'temperature': 20.0,
      'kl_t2': False,
      'min_scale': 0.08}),
    ('ValidateConfig', 'edc', {}, 'd06783b06b1b44ca',
     {'protocol': 'edc',
      'label_teachers': 'resnet18,mobilenet_v2,shufflenet_v2_x0_5,alexnet',
      'ensemble': 'mean',
      'batch_size': 100,
      'grad_accum': 1,
      'schedule': 'half_linear',
      'gamma': 0.025,
      'min_scale': 0.5,
      'ema_eval': 0.99}),
    ('ValidateConfig', 'frepo', {}, '1bbaf1a756341cca',
     {'protocol': 'frepo',
      'label_teachers': None,
      'ensemble': 'mean',
      'epochs': 2000,
      'batch_rule': 'frepo',
      'optimizer': 'adam',
      'lr': 0.0003,
      'weight_decay': 0.0,
      'decay_exempt': 'none',
      'grad_accum': 1,
      'schedule': 'warmup_cosine',
      'loss': 'mse',
      'lr_every': 'step',
      'min_scale': 0.64,
      'mix': 'none',
      'warmup': 0.25}),
    ('ValidateConfig', 'gvbsm', {}, '9c496792f2b278e3',
     {'protocol': 'gvbsm',
      'label_teachers': 'resnet18,mobilenet_v2,efficientnet_b0,shufflenet_v2_x0_5',
      'batch_size': 1024,
      'grad_accum': 1,
      'schedule': 'cosine',
      'min_scale': 0.08}),
    ('ValidateConfig', 'hard', {}, '6c682d10ca84858e',
     {'protocol': 'hard',
      'label_teachers': None,
      'ensemble': 'mean',
      'batch_size': 256,
      'optimizer': 'sgd',
      'nesterov': False,
      'lr': 0.01,
      'weight_decay': 0.0005,
      'decay_exempt': 'none',
      'grad_accum': 1,
      'schedule': 'step_half',
      'loss': 'ce',
      'mix': 'none'}),
    ('ValidateConfig', 'prism', {}, '2d5baaf9f080ebdf',
     {}),
    ('ValidateConfig', 'rded', {}, 'c22a1070e01968d7',
     {'protocol': 'rded',
      'label_teachers': None,
      'ensemble': 'mean',
      'batch_rule': 'rded',
      'grad_accum': 1,
      'schedule': 'half_cosine',
      'loss': 'kl',
      'temperature': 20.0,
      'kl_t2': False,
      'min_scale': 0.5,
      'patch_shuffle': 2,
      'bn_double_update': True}),
    ('ValidateConfig', 'soft', {}, 'cd679e913f447507',
     {'protocol': 'soft',
      'label_teachers': None,
      'ensemble': 'mean',
      'batch_size': 256,
      'decay_exempt': 'none',
      'grad_accum': 1,
      'schedule': 'cosine',
      'loss': 'kl',
      'temperature': 20.0,
      'fixed_labels': True,
      'mix': 'none'}),
    ('ValidateConfig', 'sre2l', {}, 'fba0821a628fa146',
     {'protocol': 'sre2l',
      'label_teachers': None,
      'ensemble': 'mean',
      'batch_size': 1024,
      'schedule': 'cosine',
      'loss': 'kl',
      'temperature': 20.0,
      'kl_t2': False,
      'min_scale': 0.08}),
    ('ValidateConfig', 'prism', {'ensemble': 'norm-matched-sample', 'label_teachers': 'primary,pool', 'batch_rule': 'rded'}, '89979b4833016be5',
     {'ensemble': 'norm-matched-sample', 'batch_rule': 'rded'}),
    ('ValidateConfig', 'sre2l', {'ensemble': 'weighted', 'primary_weight': 0.7, 'epochs': 5, 'batch_size': 20, 'mix': 'mixup', 'patch_shuffle': 2, 'min_scale': 0.5}, '2357ef1754d1f20b',
     {'protocol': 'sre2l',
      'label_teachers': None,
      'ensemble': 'weighted',
      'primary_weight': 0.7,
      'epochs': 5,
      'batch_size': 20,
      'schedule': 'cosine',
      'loss': 'kl',
      'temperature': 20.0,
      'kl_t2': False,
      'min_scale': 0.5,
      'mix': 'mixup',
      'patch_shuffle': 2}),
]


def test_every_protocol_is_covered_for_relabel_and_validate():
    from prismdd.core.presets import PROTOCOLS

    for cls in ("RelabelConfig", "ValidateConfig"):
        assert sorted({p for c, p, o, _, _ in LABEL_GOLDEN if c == cls and not o}) == PROTOCOLS.names()


@pytest.mark.parametrize("cls_name, protocol, overrides, chash, diff", LABEL_GOLDEN,
                         ids=[f"{c[:-6].lower()}-{p}" + "".join(f"-{k}" for k in o) for c, p, o, _, _ in LABEL_GOLDEN])
def test_relabel_and_validate_hash_and_fields_unchanged(cls_name, protocol, overrides, chash, diff):
    from prismdd.core.config import build_config
    from prismdd.stages.relabel import RelabelConfig
    from prismdd.stages.validate import ValidateConfig

    cls, base = {"RelabelConfig": (RelabelConfig, RELABEL_PRISM), "ValidateConfig": (ValidateConfig, VALIDATE_PRISM)}[
        cls_name]
    cfg = build_config(cls, dict(LABEL_BASE, protocol=protocol, **overrides))
    assert config_to_dict(cfg) == {**base, **diff}
    assert config_hash(cfg) == chash


def test_relabel_and_validate_declare_their_label_options_once():
    import dataclasses

    from prismdd.core.labels import LabelOptions
    from prismdd.core.training import ENSEMBLES
    from prismdd.stages.relabel import RelabelConfig
    from prismdd.stages.validate import ValidateConfig

    shared = {f.name: f for f in dataclasses.fields(LabelOptions)}
    assert {"label_teachers", "ensemble", "primary_weight", "epochs", "batch_size", "batch_rule", "min_scale", "mix",
            "patch_shuffle", "rand_augment"} == set(shared)
    for cls in (RelabelConfig, ValidateConfig):
        assert issubclass(cls, LabelOptions)
        fields = {f.name: f for f in dataclasses.fields(cls)}
        for name, f in shared.items():
            assert fields[name].metadata is f.metadata or dict(fields[name].metadata) == dict(f.metadata)
    # one help text, naming every ensemble rule combine_logits knows
    assert all(f" {rule} " in shared["ensemble"].metadata["help"] + " " for rule in ENSEMBLES)
    assert shared["ensemble"].metadata["choices"] == ENSEMBLES


def test_relabel_and_validate_help_give_the_same_text_for_a_label_option(cli, capsys):
    def ensemble_help(command):
        text = _help(cli, capsys, [command, "--help"])
        return " ".join(text.split("\n  --ensemble ENSEMBLE", 1)[1].split("\n  --", 1)[0].split())

    # the same text; only the default shown differs (validate's default protocol, prism, sets norm-matched)
    assert ensemble_help("relabel").split(" [default")[0] == ensemble_help("validate").split(" [default")[0]
    assert "norm-matched-sample" in ensemble_help("validate")


def test_only_the_groups_that_take_part_shape_the_hash():
    """A method's own options shape its hash and no other method's; a shared group counts once it is switched on, so
    a method added later (or another method's settings) never invalidates a finished folder."""
    base = dict(BASE)
    prism, bps = (config_hash(recover_config(m, **base)) for m in ("prism", "bps"))
    assert config_hash(recover_config("prism", **base, bps_k=7)) == prism
    assert config_hash(recover_config("bps", **base, bps_k=7)) != bps
    assert config_hash(recover_config("bps", **base, rded_mipc=7)) == bps
    # the CLIP prior's group counts once the prior is on (its weight alone is refused as changing nothing)
    on = config_hash(recover_config("prism", **base, clip_prior="/m"))
    assert on != prism and config_hash(recover_config("prism", **base, clip_prior="/m", clip_weight=0.5)) != on
    # the multires parametrisation's settings count under --param multires
    multi = config_hash(recover_config("prism", **base, param="multires"))
    assert config_hash(recover_config("prism", **base, param="multires", multires_step=2)) != multi
