"""`reca validate` finds what `reca train` would fail on beyond the recipe: a tracker not installed, a Hub
dataset that does not exist or cannot be reached, a push without a token; offline, it says "not checked"."""

import pytest
from huggingface_hub import constants

from reca_hf.cli import main, validate, validate_report

DEMO = "recipes/janus/tiny_demo.yaml"


def test_a_tracker_that_is_not_installed_is_named_with_its_fix(monkeypatch):
    monkeypatch.setattr("transformers.integrations.get_available_reporting_integrations", lambda: ["tensorboard"])
    errors = validate(DEMO, overrides=["--report_to", "wandb"])
    assert errors == ["report_to='wandb': wandb is not installed; pip install wandb, or remove wandb from report_to"]
    assert validate(DEMO, overrides=["--report_to", "tensorboard"]) == []


def test_a_push_without_a_token_is_a_problem(tmp_path, monkeypatch):
    for name in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "token"))
    monkeypatch.setattr(constants, "HF_STORED_TOKENS_PATH", str(tmp_path / "stored_tokens"))
    push = ["--push_to_hub", "true", "--hub_model_id", "me/run"]
    errors = validate(DEMO, overrides=push)
    assert len(errors) == 1 and errors[0].startswith("push_to_hub=True but no Hub token was found: run `hf auth login`")
    assert validate(DEMO, overrides=[*push, "--hub_token", "hf_x"]) == []


def test_hub_datasets_are_looked_up(hub, capsys):
    hub.add_repo("me/shapes", repo_type="dataset")
    assert validate(DEMO, overrides=["--i2t_dataset_name", "me/shapes"]) == []
    errors = validate(DEMO, overrides=["--i2t_dataset_name", "me/nosuch"])
    assert len(errors) == 1 and errors[0].startswith("i2t_dataset_name='me/nosuch': no such dataset on the Hub")
    with hub.refused():
        errors, notes = validate_report(DEMO, overrides=["--i2t_dataset_name", "me/shapes"])
        assert errors == []
        assert len(notes) == 1 and notes[0].startswith("i2t_dataset_name='me/shapes': not checked: the Hub could not")
        main(["validate", DEMO, "--i2t_dataset_name", "me/shapes"])
    out = capsys.readouterr().out
    assert f"{DEMO}: OK" in out and "note: i2t_dataset_name='me/shapes': not checked" in out


def test_offline_says_not_checked_instead_of_ok_or_failing(hub, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    errors, notes = validate_report(
        DEMO, overrides=["--i2t_dataset_name", "me/shapes", "--model_name_or_path", "someone/not-cached"]
    )
    assert errors == []
    assert notes == [
        "model_name_or_path='someone/not-cached': not checked: offline (HF_HUB_OFFLINE is set) and not in the cache; "
        "the checks that need its config were skipped",
        "i2t_dataset_name='me/shapes': not checked: offline (HF_HUB_OFFLINE is set)",
    ]


@pytest.mark.parametrize("name", ["synthetic_shapes", "./data/images", "/abs/folder", "a/b/c", "~/x"])
def test_local_names_are_not_hub_ids(name):
    from reca_hf.preflight import is_hub_id

    assert not is_hub_id(name)
    assert is_hub_id("owner/name") and is_hub_id("name")
