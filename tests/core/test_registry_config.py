"""Registry (duplicate / unknown names) and config layering, coercion and error messages."""
from __future__ import annotations

import pytest

from prismdd.core.config import CommonConfig, build_config, load_yaml, parse_sets
from prismdd.stages.recover import RecoverConfig, recover_config
from prismdd.core.registry import Registry
from prismdd.core.errors import UnknownNameError
from prismdd.stages.squeeze import SqueezeConfig
from prismdd.core.errors import PrismError


# ----------------------------------------------------------------------------- registry
def test_registry_refuses_duplicates_case_insensitively():
    reg = Registry("widget")
    reg.register("Alpha", 1)
    with pytest.raises(ValueError, match="already registered"):
        reg.register("alpha", 2)
    assert reg.get("ALPHA") == 1  # the first registration survives


def test_registry_decorator_and_listing():
    reg = Registry("widget")

    @reg.register("b")
    def b():
        return "b"

    reg.register("a", "A")
    assert reg.names() == ["a", "b"]
    assert list(reg) == ["a", "b"]
    assert "B" in reg and "c" not in reg
    assert reg.get("b") is b
    assert reg.items() == [("a", "A"), ("b", b)]


def test_registry_unknown_name_lists_valid_names():
    reg = Registry("widget")
    for n in ("zeta", "alpha", "mid"):
        reg.register(n, n)
    with pytest.raises(UnknownNameError) as ei:
        reg.get("nope")
    msg = str(ei.value)
    assert "'nope'" in msg and "widget" in msg
    assert "alpha, mid, zeta" in msg  # sorted, comma separated
    assert "\n" not in msg and not msg.startswith('"')  # one line, not KeyError's quoted repr
    assert isinstance(ei.value, KeyError)


# ----------------------------------------------------------------------------- layering
def test_build_config_defaults_and_later_layers_win():
    cfg = build_config(SqueezeConfig)
    assert (cfg.epochs, cfg.lr, cfg.dataset) == (2, 0.002, "fashion-mnist")
    cfg = build_config(SqueezeConfig, {"epochs": 3, "lr": 0.1}, {"epochs": 5}, None, {"seed": 7})
    assert (cfg.epochs, cfg.lr, cfg.seed) == (5, 0.1, 7)


def test_build_config_accepts_dashed_keys():
    assert build_config(SqueezeConfig, {"batch-size": 64}).batch_size == 64


def test_unknown_key_lists_valid_keys():
    with pytest.raises(PrismError) as ei:
        build_config(SqueezeConfig, {"epochs": 1}, {"epoch": 3})
    msg = str(ei.value)
    assert "'epoch'" in msg and "SqueezeConfig" in msg
    for key in ("epochs", "batch_size", "lr", "dataset", "seed", "min_scale"):
        assert key in msg
    assert "\n" not in msg


def test_recover_preset_layering():
    # defaults < preset < overrides
    sre2l = recover_config("sre2l")
    assert (sre2l.selection, sre2l.init, sre2l.lr, sre2l.method) == ("single", "noise", 0.25, "sre2l")
    cda = recover_config("cda", lr=0.1)
    assert (cda.crop_schedule, cda.lr) == ("cosine", 0.1)
    assert recover_config("prism").selection == "intra"


# ----------------------------------------------------------------------------- --set values
def test_parse_sets_keeps_text_and_build_config_types_it():
    got = parse_sets(["epochs=3", "lr=0.5", "flip=false", "arch=a,b", "min-scale=1", "resolution="])
    # values stay text until the field's type is known (so str fields are never reinterpreted) ...
    assert got == {"epochs": "3", "lr": "0.5", "flip": "false", "arch": "a,b", "min_scale": "1", "resolution": None}
    # ... and build_config parses them for the typed fields
    cfg = build_config(SqueezeConfig, got)
    assert (cfg.epochs, cfg.lr, cfg.flip, cfg.arch, cfg.min_scale, cfg.resolution) == (3, 0.5, False, "a,b", 1.0, None)
    assert parse_sets(["k=a=b"]) == {"k": "a=b"}  # split at the first '=' only
    assert parse_sets(None) == {}


def test_parse_sets_requires_equals():
    with pytest.raises(PrismError, match="expected key=value"):
        parse_sets(["epochs=1", "epochs3"])


@pytest.mark.parametrize("raw, key, expected", [
    ("epochs=7", "epochs", 7),
    ("epochs=4.0", "epochs", 4),
    ("lr=1e-3", "lr", 1e-3),  # YAML 1.1 reads this as a string; the float field still gets a float
    ("lr=2", "lr", 2.0),
    ("flip=false", "flip", False),
    ("flip=no", "flip", False),
    ("flip=On", "flip", True),
    ("flip=1", "flip", True),
    ("channels_last=true", "channels_last", True),
    ("resolution=", "resolution", None),
    ("resolution=null", "resolution", None),
    ("resolution=16", "resolution", 16),
    ("small_stem=", "small_stem", None),
    ("data_root=/some/where", "data_root", "/some/where"),
])
def test_set_coercion_squeeze(raw, key, expected):
    cfg = build_config(SqueezeConfig, parse_sets([raw]))
    value = getattr(cfg, key)
    assert value == expected and type(value) is type(expected)


def test_set_coercion_tuples():
    cfg = build_config(RecoverConfig, {"method": "prism"}, parse_sets(["crop_scale=0.2,1.0", "betas=0.9, 0.99"]))
    assert cfg.crop_scale == (0.2, 1.0) and isinstance(cfg.crop_scale, tuple)
    assert all(isinstance(v, float) for v in cfg.crop_scale)
    assert cfg.betas == (0.9, 0.99)
    # a YAML list (from a --config file) works too
    assert build_config(RecoverConfig, {"crop_scale": [0.5, 1]}).crop_scale == (0.5, 1.0)
    assert build_config(RecoverConfig, {"bn_pool": None}).bn_pool is None


@pytest.mark.parametrize("cls, raw, key", [
    (SqueezeConfig, "epochs=abc", "epochs"),
    (SqueezeConfig, "epochs=2.5", "epochs"),
    (SqueezeConfig, "lr=fast", "lr"),
    (SqueezeConfig, "flip=maybe", "flip"),
    (SqueezeConfig, "seed=", "seed"),  # not Optional: may not be empty
    (RecoverConfig, "crop_scale=0.2", "crop_scale"),  # tuple of two
    (RecoverConfig, "crop_scale=0.1,0.5,1.0", "crop_scale"),
    (RecoverConfig, "crop_scale=a,b", "crop_scale"),
])
def test_bad_values_give_one_line_error_naming_the_key(cls, raw, key):
    with pytest.raises(PrismError) as ei:
        build_config(cls, parse_sets([raw]))
    msg = str(ei.value)
    assert msg.startswith(key) and "\n" not in msg


def test_validate_runs_after_coercion():
    with pytest.raises(PrismError, match="crop.scale"):
        build_config(RecoverConfig, parse_sets(["crop_scale=0.9,0.5"]))
    with pytest.raises(PrismError, match="selection"):
        recover_config("prism", selection="sometimes")
    with pytest.raises(PrismError, match="min.scale"):
        build_config(SqueezeConfig, {"min_scale": 0})


def test_bool_is_not_accepted_as_a_number():
    with pytest.raises(PrismError, match="epochs"):
        build_config(SqueezeConfig, parse_sets(["epochs=true"]))


def test_str_fields_keep_the_text_as_typed():
    cfg = build_config(SqueezeConfig, parse_sets(["out=1.10", "arch=on"]))
    assert cfg.out == "1.10"
    assert cfg.arch == "on"


# ----------------------------------------------------------------------------- YAML files
def test_load_yaml(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("epochs: 4\nlr: 0.01\n")
    assert load_yaml(p) == {"epochs": 4, "lr": 0.01}
    empty = tmp_path / "empty.yaml"
    empty.write_text("")
    assert load_yaml(empty) == {}


def test_load_yaml_errors(tmp_path):
    with pytest.raises(PrismError, match="file not found") as ei:
        load_yaml(tmp_path / "missing.yaml")
    assert "missing.yaml" in str(ei.value)
    lst = tmp_path / "list.yaml"
    lst.write_text("- a\n- b\n")
    with pytest.raises(PrismError, match="mapping") as ei:
        load_yaml(lst)
    assert "list.yaml" in str(ei.value)
    bad = tmp_path / "bad.yaml"
    bad.write_text("a: [1, 2\n")
    with pytest.raises(PrismError, match="not valid YAML") as ei:
        load_yaml(bad)
    assert "\n" not in str(ei.value)


def test_common_config_fields_shared():
    # every stage config carries the common options (the CLI flags come from these fields)
    for cls in (SqueezeConfig, RecoverConfig):
        cfg = build_config(cls, {"dataset": "digits", "subset": "idx.npy", "resolution": 16})
        assert isinstance(cfg, CommonConfig)
        assert (cfg.dataset, cfg.subset, cfg.resolution) == ("digits", "idx.npy", 16)


def test_every_hashed_field_is_hashed_at_every_value():
    """A hashed field shapes the hash at its default too: adding an option changes every hash once (finished
    outputs are recomputed, never reused under settings they were not made with); only ``hashed=False`` skips it."""
    import dataclasses as dc

    from prismdd.core.config import config_hash, opt

    @dc.dataclass
    class Old:
        a: int = opt(1, "a")

    @dc.dataclass
    class New:
        a: int = opt(1, "a")
        b: str = opt("none", "b")

    @dc.dataclass
    class Unhashed:
        a: int = opt(1, "a")
        b: str = opt("none", "b", hashed=False)

    assert config_hash(New()) != config_hash(Old())
    assert config_hash(New(b="x")) not in (config_hash(Old()), config_hash(New()))
    assert config_hash(Unhashed()) == config_hash(Unhashed(b="x")) == config_hash(Old())


def test_input_folders_hash_by_where_they_are_not_how_they_are_spelled(tmp_path, monkeypatch):
    """``--teachers runs/zoo`` from the folder above and ``--teachers /abs/runs/zoo`` name the same input: a
    resumed or cached stage must not look stale because the path was written the other way."""
    from prismdd.core.config import config_hash
    from prismdd.stages.metrics import MetricsConfig
    from prismdd.stages.validate import ValidateConfig
    monkeypatch.chdir(tmp_path)
    rel = build_config(RecoverConfig, {"teachers": "runs/zoo", "data_root": "data"})
    ab = build_config(RecoverConfig, {"teachers": str(tmp_path / "runs" / "zoo"), "data_root": str(tmp_path / "data")})
    assert config_hash(rel) == config_hash(ab)
    assert config_hash(rel) == config_hash(build_config(RecoverConfig, {"teachers": "./runs/../runs/zoo",
                                                                        "data_root": "data/"}))
    # another folder is another input
    assert config_hash(rel) != config_hash(build_config(RecoverConfig, {"teachers": "runs/zoo2", "data_root": "data"}))
    v = {"distilled": "runs/prism", "labels": "runs/prism/labels"}
    assert config_hash(build_config(ValidateConfig, v)) == config_hash(build_config(
        ValidateConfig, {k: str(tmp_path / p) for k, p in v.items()}))
    # a comma list of folders: each item on its own
    m1 = build_config(MetricsConfig, {"distilled": "a, b", "observer": "obs"})
    m2 = build_config(MetricsConfig, {"distilled": f"{tmp_path / 'a'},{tmp_path / 'b'}", "observer": str(tmp_path / "obs")})
    assert config_hash(m1) == config_hash(m2)
    # a value given as a change (relabel hashes the distilled set's own hash there) is taken as it is
    assert config_hash(rel, teachers="x") != config_hash(rel, teachers=str(tmp_path / "x"))
