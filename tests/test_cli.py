"""The command line: its one mapping of failures to messages (cli.Commands), and the options
that train and sweep share, declared once."""
import re

import click
import pytest
from click.testing import CliRunner

import ser_cache.training as T
from ser_cache.cli import main
from ser_cache.errors import UserError
from ser_cache.sweeping import parse_grid


def train(tmp_path, monkeypatch, failure):
    def fail(*args, **kwargs):
        raise failure

    monkeypatch.setattr(T, "train_from_cache", fail)
    return CliRunner().invoke(main, ["train", str(tmp_path), "--layer", "1", "--head", "mean", "--out",
                                     str(tmp_path / "run")])


@pytest.mark.parametrize("failure", [T.ConfigError("lr must be > 0"), T.NonFiniteLossError("lower the lr"),
                                     OSError(28, "No space left on device")])
def test_the_projects_errors_and_the_systems_are_one_line(tmp_path, monkeypatch, failure):
    result = train(tmp_path, monkeypatch, failure)
    assert result.exit_code == 1 and result.output.strip() == f"Error: {failure}"
    assert isinstance(failure, (UserError, OSError))


def test_a_bug_keeps_its_traceback(tmp_path, monkeypatch):
    """A KeyError or ValueError from inside is a bug: not dressed up as a user's mistake."""
    for bug in (KeyError("labels"), ValueError("shapes differ")):
        result = train(tmp_path, monkeypatch, bug)
        assert result.exception is bug and "Error:" not in result.output


def test_ctrl_c_says_what_was_kept(tmp_path, monkeypatch):
    result = train(tmp_path, monkeypatch, KeyboardInterrupt())
    assert result.exit_code == 1
    assert "interrupted; every finished fold is saved. Re-run the same command to resume" in result.output


def test_a_bad_device_is_named(tmp_path):
    result = CliRunner().invoke(main, ["predict", __file__, __file__, "--device", "tpu"])
    assert result.exit_code == 1 and "--device 'tpu': use auto, cpu, cuda, cuda:N or mps" in result.output


def test_the_linear_c_grid_reaches_the_config_and_a_bad_one_is_named(tmp_path, monkeypatch):
    seen = {}

    def record(cache, layer, head, out, config, **kwargs):
        seen["grid"] = config.linear_c
        raise T.ConfigError("stop here")

    monkeypatch.setattr(T, "train_from_cache", record)
    args = ["train", str(tmp_path), "--layer", "1", "--head", "linear", "--out", str(tmp_path / "run")]
    CliRunner().invoke(main, [*args, "--linear-c", "0.001,0.01"])
    assert seen["grid"] == (0.001, 0.01)
    for bad in ("0,1", "a,b", ""):
        result = CliRunner().invoke(main, [*args, "--linear-c", bad])
        assert result.exit_code == 2 and "positive numbers separated by commas" in result.output, result.output


def test_inspect_names_the_classes_and_targets(tmp_path):
    from test_cache import synthetic_cache

    cache = synthetic_cache(tmp_path / "c", targets=True)
    result = CliRunner().invoke(main, ["inspect", str(cache.root)])
    assert result.exit_code == 0, result.output
    assert "classes a 24, b 24; targets arousal (train --targets)" in result.output


# --- the options train and sweep share -------------------------------------------------------

# Options of train and sweep that are spelt alike but say something of each command's own.
OWN_MEANING = {"--out"}  # train: the run folder; sweep: the sweep folder


def visible_options(name: str) -> dict[str, dict]:
    """{'--epochs': click's description of the option, help included} of command `name`."""
    command = main.commands[name]
    return {"/".join(p.opts + p.secondary_opts): p.to_info_dict() for p in command.params
            if isinstance(p, click.Option) and not p.hidden}


def test_train_and_sweep_share_each_common_option_as_one_declaration():
    train, sweep = visible_options("train"), visible_options("sweep")
    shared = (train.keys() & sweep.keys()) - OWN_MEANING
    assert len(shared) >= 20, sorted(shared)
    for name in sorted(shared):
        assert train[name] == sweep[name], f"{name}: train and sweep differ"
        assert train[name]["help"], f"{name} has no help"
    # one name, one meaning: the count of attention heads is not spelt like sweep's list of heads
    assert "--attn-heads" in train and "--heads" not in train and "--heads" in sweep


def train_config(tmp_path, monkeypatch, *options):
    """The TrainConfig that `train ... *options` hands to training, or the failed result."""
    seen = {}

    def record(cache, layer, head, out, config, **kwargs):
        seen["config"] = config
        raise T.ConfigError("stop here")

    monkeypatch.setattr(T, "train_from_cache", record)
    result = CliRunner().invoke(main, ["train", str(tmp_path), "--layer", "1", "--head", "qkv", "--out",
                                       str(tmp_path / "run"), *options])
    return seen.get("config", result)


def test_heads_on_train_is_the_hidden_old_spelling_of_attn_heads(tmp_path, monkeypatch):
    new = train_config(tmp_path, monkeypatch, "--attn-heads", "2")
    assert new.n_heads == 2
    assert train_config(tmp_path, monkeypatch, "--heads", "2") == new
    assert train_config(tmp_path, monkeypatch, "--heads", "2", "--attn-heads", "2") == new
    clash = train_config(tmp_path, monkeypatch, "--heads", "2", "--attn-heads", "4")
    assert clash.exit_code == 2 and "--heads is the old spelling of --attn-heads" in clash.output, clash.output

    shown = CliRunner().invoke(main, ["train", "--help"]).output
    assert "--attn-heads" in shown and not re.search(r"(?<![\w-])--heads\b", shown), shown


def test_the_grid_spells_the_attention_heads_as_the_options_do():
    assert parse_grid(["attn_heads=2,4"]) == parse_grid(["heads=2,4"]) == {"n_heads": [2, 4]}
