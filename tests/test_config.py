import pytest

from fedguard.cli import main
from fedguard.config import ConfigError, build_config, load_config


def test_defaults_match_the_safe_fedllm_lora_setting():
    cfg = build_config({})
    assert (cfg.lora.r, cfg.lora.alpha, cfg.lora.target_modules) == (8, 16.0, ["q_proj", "v_proj"])


def test_unknown_key_is_refused_with_its_dotted_name():
    with pytest.raises(ConfigError, match=r"train\.learning_rate: unknown field"):
        build_config({"train": {"learning_rate": 0.1}})


def test_bad_value_names_the_field():
    with pytest.raises(ConfigError, match=r"lora\.r: .*greater than or equal to 1"):
        build_config({"lora": {"r": 0}})
    with pytest.raises(ConfigError, match=r"model\.precision"):
        build_config({"model": {"precision": "fp8"}})


def test_cross_field_checks():
    with pytest.raises(ConfigError, match="clients_per_round"):
        build_config({"federation": {"num_clients": 2, "clients_per_round": 3}})
    with pytest.raises(ConfigError, match="needs a non-empty 'clients' list"):
        build_config({"data": {"partition": {"method": "explicit"}}})
    with pytest.raises(ConfigError, match="lists 1 clients"):
        build_config({"federation": {"num_clients": 2, "clients_per_round": 1},
                      "data": {"partition": {"method": "explicit", "clients": [{"source": "builtin:benign"}]}}})


def test_overrides_parse_yaml_values(tmp_path):
    p = tmp_path / "c.yaml"
    p.write_text("name: x\ntrain: {lr: 0.1}\n")
    cfg = load_config(p, ["train.lr=0.002", "lora.target_modules=[q_proj,k_proj]", "federation.rounds=7"])
    assert cfg.train.lr == 0.002 and cfg.lora.target_modules == ["q_proj", "k_proj"] and cfg.federation.rounds == 7
    with pytest.raises(ConfigError, match="must look like"):
        load_config(p, ["train.lr"])
    with pytest.raises(ConfigError, match=r"federation\.rounds"):
        load_config(p, ["federation.rounds=many"])


def test_example_configs_are_valid():
    from pathlib import Path

    for path in sorted((Path(__file__).parents[1] / "configs").glob("*.yaml")):
        load_config(path)


def test_cli_reports_config_errors_with_exit_code_2(tmp_path, capsys):
    p = tmp_path / "bad.yaml"
    p.write_text("federation: {rounds: 0}\n")
    assert main(["run", str(p)]) == 2
    assert "federation.rounds" in capsys.readouterr().err
    assert main(["show-config", "--set", "lora.r=16"]) == 0
    assert "r: 16" in capsys.readouterr().out


def test_help_lists_every_command(capsys):
    with pytest.raises(SystemExit):
        main(["--help"])
    out = capsys.readouterr().out
    for cmd in ("run", "resume", "report", "show-config", "prepare-model", "sweep", "probe"):
        assert cmd in out
