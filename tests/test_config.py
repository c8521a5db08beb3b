"""The "ggspeed" ds_config section: loading, defaults and every error path of the loader."""

import json

import pytest

from ggspeed.config import ConfigError, GGSpeedConfig, from_ds_config, load_ds_config


def test_missing_section_disables_everything():
    cfg = from_ds_config({"train_batch_size": 8})
    assert isinstance(cfg, GGSpeedConfig)
    assert not (cfg.gg_init.enabled or cfg.act.enabled or cfg.gct.enabled)
    assert not cfg.any_enabled
    assert from_ds_config({"ggspeed": None}) == cfg


def test_reads_file_and_leaves_deepspeed_keys_alone(tmp_path):
    path = tmp_path / "ds.json"
    ds = {"train_batch_size": 8, "zero_optimization": {"not_a_deepspeed_key": 1}}
    ds["ggspeed"] = {"log_interval": 3, "gct": {"enabled": True}}
    path.write_text(json.dumps(ds))
    cfg = from_ds_config(path)
    assert cfg.log_interval == 3 and cfg.gct.enabled and not cfg.act.enabled
    assert from_ds_config(str(path)) == cfg
    assert load_ds_config(path) == ds


def test_unknown_key_names_full_path_and_closest_key():
    with pytest.raises(
        ConfigError, match=r"ggspeed\.gct\.enabeld: unknown key; did you mean 'enabled'"
    ):
        from_ds_config({"ggspeed": {"gct": {"enabeld": True}}})
    with pytest.raises(
        ConfigError, match=r"ggspeed\.log_intervall: unknown key; did you mean 'log_interval'"
    ):
        from_ds_config({"ggspeed": {"log_intervall": 3}})
    with pytest.raises(ConfigError, match=r"ggspeed\.zzz: unknown key \(allowed keys: act, gct"):
        from_ds_config({"ggspeed": {"zzz": 3}})


def test_bad_value_names_key_value_and_what_is_allowed():
    with pytest.raises(
        ConfigError, match=r"ggspeed\.log_interval: got 0; .*greater than or equal to 1"
    ):
        from_ds_config({"ggspeed": {"log_interval": 0}})
    with pytest.raises(ConfigError, match=r"ggspeed\.act\.enabled: got 'maybe'; .*boolean"):
        from_ds_config({"ggspeed": {"act": {"enabled": "maybe"}}})
    with pytest.raises(ConfigError, match=r"ggspeed\.gg_init: got 5; .*"):
        from_ds_config({"ggspeed": {"gg_init": 5}})
    with pytest.raises(ConfigError, match=r"ggspeed: got \[\]; must be a JSON object"):
        from_ds_config({"ggspeed": []})


def test_several_errors_are_reported_together():
    with pytest.raises(ConfigError) as info:
        from_ds_config({"ggspeed": {"log_interval": -1, "gct": {"enabeld": True}}})
    msg = str(info.value)
    assert "ggspeed.log_interval" in msg and "ggspeed.gct.enabeld" in msg


def test_malformed_json_names_file_and_line(tmp_path):
    path = tmp_path / "broken.json"
    path.write_text('{\n  "train_batch_size": 8,\n  "ggspeed": {"gct": {"enabled": tru}}\n}\n')
    with pytest.raises(ConfigError, match=r"broken\.json: invalid JSON at line 3, column"):
        from_ds_config(path)


def test_duplicate_keys_and_missing_file(tmp_path):
    path = tmp_path / "dup.json"
    path.write_text('{"ggspeed": {"log_interval": 1, "log_interval": 2}}')
    with pytest.raises(ConfigError, match=r"dup\.json: duplicate key 'log_interval'"):
        from_ds_config(path)
    with pytest.raises(ConfigError, match=r"cannot read ds_config file .*nope\.json"):
        from_ds_config(tmp_path / "nope.json")
    top = tmp_path / "list.json"
    top.write_text("[1, 2]")
    with pytest.raises(ConfigError, match=r"list\.json: a ds_config must be a JSON object"):
        from_ds_config(top)


def test_config_round_trips_through_json():
    cfg = from_ds_config({"ggspeed": {"log_interval": 7, "act": {"enabled": True}}})
    again = from_ds_config({"ggspeed": json.loads(cfg.model_dump_json())})
    assert again == cfg
