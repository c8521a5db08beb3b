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


def test_wire_param_gather_switch_and_bad_values_name_the_key():
    from ggspeed.runtime import validate_ds_config
    from ggspeed.wire import ParamGatherSettings

    zero1 = {"zero_optimization": {"stage": 1}}
    cfg = from_ds_config({"ggspeed": {"wire": {"param_gather": {"enabled": True}}}})
    assert cfg.wire.param_gather.enabled and cfg.any_enabled
    assert cfg.wire.param_gather == ParamGatherSettings(enabled=True)  # one model, one default
    assert not from_ds_config({}).wire.param_gather.enabled
    for bad, key in [
        ({"quant_step": 0}, "quant_step"),
        ({"quant_step": float("inf")}, "quant_step"),
        ({"quant_step": True}, "quant_step"),
        ({"block_size": 0}, "block_size"),
        ({"block_size": 4096.0}, "block_size"),
        ({"eg_order": 16}, "eg_order"),
        ({"eg_order": True}, "eg_order"),
        ({"eg_order": "best"}, "eg_order"),
        ({"zero_runs": 1}, "zero_runs"),
        ({"capacity_slack": -0.1}, "capacity_slack"),
        ({"capacity_slack": 11}, "capacity_slack"),
        ({"enabled": "yes"}, "enabled"),
        ({"quant_stp": 1.0}, "quant_stp"),
    ]:
        section = {"wire": {"param_gather": {"enabled": True, **bad}}}
        with pytest.raises(ConfigError, match=rf"^ggspeed\.wire\.param_gather\.{key}: "):
            validate_ds_config({**zero1, "ggspeed": section})
    good = {
        "quant_step": 0.5,
        "block_size": 1,
        "eg_order": 15,
        "capacity_slack": 0,
        "enabled": True,
    }
    assert validate_ds_config({**zero1, "ggspeed": {"wire": {"param_gather": good}}})
    with pytest.raises(ConfigError, match=r"ggspeed\.wire\.param_gatherr: unknown key"):
        from_ds_config({"ggspeed": {"wire": {"param_gatherr": {}}}})


def test_wire_param_gather_refuses_deepspeed_settings_naming_the_key():
    from ggspeed.runtime import validate_ds_config

    on = {"ggspeed": {"wire": {"param_gather": {"enabled": True}}}}
    # bf16 with fp32 gradient accumulation: ZeRO-1 makes DeepSpeed use BF16_Optimizer (a gather
    # of its own), ZeRO-2 keeps DeepSpeedZeroOptimizer.
    bf16_fp32 = {"bf16": {"enabled": True}, "data_types": {"grad_accum_dtype": "fp32"}}
    for ds, key in [
        ({"zero_optimization": {"stage": 3}}, r"zero_optimization\.stage: got 3"),
        ({"zero_optimization": {"stage": 0}}, r"zero_optimization\.stage: got 0"),
        ({}, r"zero_optimization\.stage: got 0"),  # DeepSpeed's default: nothing to gather
        (
            {"zero_optimization": {"stage": 2, "offload_optimizer": {"device": "cpu"}}},
            r"zero_optimization\.offload_optimizer",
        ),
        (
            {"zero_optimization": {"stage": 1}, **bf16_fp32},
            r"data_types\.grad_accum_dtype: got 'fp32'",
        ),
    ]:
        with pytest.raises(ConfigError, match=key) as info:
            validate_ds_config({**ds, **on})
        assert "ggspeed.wire.param_gather.enabled" in str(info.value)
    assert validate_ds_config({"zero_optimization": {"stage": 2}, **bf16_fp32, **on}).any_enabled
    # Off, the same DeepSpeed settings pass: the check belongs to the switch.
    assert not validate_ds_config({"zero_optimization": {"stage": 3}}).any_enabled
