import dataclasses
import json
import os
import re
from pathlib import Path

import pytest
import yaml

from reca_hf import RecAConfig
from reca_hf.cli import main, parse_recipe, validate

RECIPES = sorted((Path(__file__).parents[1] / "recipes").rglob("*.yaml"))


def test_there_are_recipes():
    names = {p.relative_to(p.parents[1]).as_posix() for p in RECIPES}
    assert {"janus/tiny_demo.yaml", "janus/pro_1b.yaml", "janus/pro_7b.yaml", "emu3/tiny_demo.yaml"} <= names


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_recipe_loads_into_the_config(recipe):
    values = yaml.safe_load(recipe.read_text())
    values.pop("env", None)
    config = RecAConfig(**values)
    assert config.model_name_or_path and config.dataset_name
    assert recipe.read_text().startswith("#"), "recipes open with a comment header"
    parsed = parse_recipe(str(recipe), ["--max_steps", "7"])
    assert parsed.max_steps == 7 and parsed.model_name_or_path == config.model_name_or_path


# The public checkpoints' configs (the dimensions of deepseek-community/Janus-Pro-*), served by the loopback Hub
# so that reca validate runs its model checks on the hub recipes without the network.
_JANUS_PRO = {
    "1B": {"hidden_size": 2048, "intermediate_size": 5632, "num_hidden_layers": 24, "num_attention_heads": 16},
    "7B": {"hidden_size": 4096, "intermediate_size": 11008, "num_hidden_layers": 30, "num_attention_heads": 32},
}


def _serve_janus_pro_configs(hub) -> None:
    from transformers import JanusConfig

    for size, text in _JANUS_PRO.items():
        width = text["hidden_size"]
        config = JanusConfig(
            text_config={"model_type": "llama", "vocab_size": 102400, "num_key_value_heads": text["num_attention_heads"],
                         **text},
            vision_config={"hidden_size": 1024, "image_size": 384, "patch_size": 16, "projection_dim": width},
            vq_config={"projection_dim": width, "image_token_embed_dim": width},
        )  # fmt: skip
        hub.add_repo(f"deepseek-community/Janus-Pro-{size}", {"config.json": config.to_json_string().encode()})


def _user_data(root: Path) -> None:
    """The folders the real recipes name (./data/images, ./data/captioned, ./data/eval), one image each."""
    from PIL import Image

    for name in ("images", "captioned", "eval"):
        folder = root / "data" / name
        folder.mkdir(parents=True)
        Image.new("RGB", (64, 64), (200, 30, 30)).save(folder / "a.png")
    (root / "data" / "captioned" / "metadata.jsonl").write_text('{"file_name": "a.png", "caption": "a red square"}\n')


def _harmon_folders(root: Path) -> None:
    """The config.json of the folders `reca convert harmon` writes, which Harmon's recipes name."""
    from reca_hf.models.harmon import HarmonConfig

    HarmonConfig.harmon_0_5b().save_pretrained(root / "models" / "harmon-0.5b")
    HarmonConfig.harmon_1_5b().save_pretrained(root / "models" / "harmon-1.5b")


@pytest.mark.parametrize("recipe", RECIPES, ids=lambda p: p.parent.name + "/" + p.name)
def test_every_recipe_passes_reca_validate(recipe, hub, tmp_path, monkeypatch):
    """Every check runs offline: the data folders exist here, the Hub models' configs come from the loopback Hub.
    OpenUni's and Show-o's recipes name the folder `reca convert` writes (models/...), which only a conversion
    makes: its config is the one check left out for them. Harmon's folders get their configs here (no weights)."""
    _serve_janus_pro_configs(hub)
    _user_data(tmp_path)
    _harmon_folders(tmp_path)
    monkeypatch.chdir(tmp_path)
    errors = validate(str(recipe))
    model = yaml.safe_load(recipe.read_text())["model_name_or_path"]
    if model.startswith("models/") and not model.startswith("models/harmon"):
        assert len(errors) == 1 and errors[0].startswith(f"model_name_or_path={model!r}: its config could not be read")
    else:
        assert errors == []
    assert yaml.safe_load(recipe.read_text()).get("eval_dataset_name"), "every recipe names an eval set"


def test_demo_recipe_trains_two_steps(tmp_path, capsys):
    out = tmp_path / "demo"
    main(
        ["train", "recipes/janus/tiny_demo.yaml", "--max_steps", "2", "--output_dir", str(out), "--logging_steps", "1"]
    )
    for name in ("model.safetensors", "config.json", "trainer_state.json", "README.md", "reconstructions.png"):
        assert (out / name).is_file(), name
    printed = capsys.readouterr().out
    assert "reconstruction_loss:" in printed and "tokenizers" in printed  # the summary and the parameter table
    history = json.loads((out / "trainer_state.json").read_text())["log_history"]
    assert any("eval_reconstruction_loss" in log for log in history)  # the recipe's eval_dataset_name is evaluated
    assert (out / "samples" / "step-0.png").is_file() and (out / "samples" / "step-2.png").is_file()


def test_unknown_recipe_key_is_named(tmp_path):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text("model_name_or_path: tiny:janus\ndataset_name: synthetic_shapes\nlearning_rat: 0.1\n")
    with pytest.raises(SystemExit, match="learning_rat"):
        main(["train", str(recipe)])


def test_unknown_flag_is_named():
    with pytest.raises(SystemExit, match="--not_a_field"):
        main(["train", "recipes/janus/tiny_demo.yaml", "--not_a_field", "3"])


def test_validate_reports_every_error_at_once(tmp_path, capsys):
    recipe = tmp_path / "bad.yaml"
    recipe.write_text(
        "model_name_or_path: tiny:janus\ndataset_name: ./no/such/folder\ncondition_resolution: 30\n"
        "condition_bottleneck: crop\ncond_dropout_prob: 2\nsome_typo: 1\n"
    )
    errors = validate(str(recipe))
    text = "\n".join(errors)
    for expected in ("some_typo", "condition_bottleneck='crop'", "cond_dropout_prob=2"):
        assert expected in text
    with pytest.raises(SystemExit):
        main(["validate", str(recipe)])
    assert "problem(s)" in capsys.readouterr().err
    recipe.write_text("model_name_or_path: tiny:janus_demo\ndataset_name: ./no/such/folder\ncondition_resolution: 30\n")
    # tiny:janus_demo (the demo model) reads 4-px SigLIP patches
    assert any("multiple of 4" in e for e in validate(str(recipe))) and any(
        "no such folder" in e for e in validate(str(recipe))
    )
    main(["validate", "recipes/janus/tiny_demo.yaml"])
    assert "OK" in capsys.readouterr().out


def test_validate_check_images_names_every_unreadable_file(tmp_path, capsys):
    from reca_hf.data import synthetic_shapes

    folder = tmp_path / "images"
    folder.mkdir()
    for i, image in enumerate(synthetic_shapes(3, size=32)["image"]):
        image.save(folder / f"good{i}.png")
    (folder / "cut.png").write_bytes((folder / "good1.png").read_bytes()[:60])  # a truncated PNG
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: tiny:janus\ndataset_name: {folder}\n")
    main(["validate", str(recipe)])  # the cheap check: the folder exists and has images
    assert "OK" in capsys.readouterr().out
    with pytest.raises(SystemExit):
        main(["validate", str(recipe), "--check-images"])
    err = capsys.readouterr().err
    assert "1 problem(s)" in err and "cut.png" in err and "good" not in err.replace(str(folder), "")


def test_train_help_lists_every_field(capsys):
    main(["train", "--help"])
    text = capsys.readouterr().out
    missing = [f.name for f in dataclasses.fields(RecAConfig) if f.init and f"--{f.name}" not in text]
    assert not missing


def test_a_run_from_flags_alone_with_list_flags(tmp_path, capsys):
    main(["train", "--model_name_or_path", "tiny:janus", "--dataset_name", "synthetic_shapes", "--max_steps", "1",
          "--output_dir", str(tmp_path / "run"), "--report_to", "none", "--num_reconstruction_images", "0",
          "--freeze", "model.vqmodel", "model.vision_model", "--save_strategy", "no"])  # fmt: skip
    run = json.loads((tmp_path / "run" / "reca_run.json").read_text())
    assert run["settings"]["freeze"].startswith("['model.vqmodel', 'model.vision_model']")
    assert parse_recipe(None, ["--lora_target_modules", "q_proj", "v_proj"]).lora_target_modules == ["q_proj", "v_proj"]
    assert parse_recipe(None, ["--lora_target_modules", "generation"]).lora_target_modules == "generation"


def test_version_env_and_one_line_errors(capsys):
    with pytest.raises(SystemExit):
        main(["--version"])
    assert "reca_hf" in capsys.readouterr().out
    main(["env"])
    out = capsys.readouterr().out
    assert "torch:" in out and "transformers:" in out and "devices:" in out
    unknown = [
        "train",
        "--model_name_or_path",
        "tiny:nosuch",
        "--dataset_name",
        "synthetic_shapes",
        "--report_to",
        "none",
    ]
    with pytest.raises(SystemExit, match=r"^reca: ValueError: .*nosuch.*\n\(run `reca --debug"):
        main(unknown)
    with pytest.raises(ValueError, match="nosuch"):  # --debug: the exception itself, with its traceback
        main(["--debug", *unknown])


_HEAD = "model_name_or_path: tiny:janus\ndataset_name: synthetic_shapes\n"
BAD_RECIPES = {  # recipe text (after the head), overrides, the problem both commands name
    "int as a word": ("max_steps: fifty\n", [], "max_steps='fifty': not an int"),
    "zero batch": ("per_device_train_batch_size: 0\n", [], "per_device_train_batch_size=0: use a positive integer"),
    "list for an int": ("per_device_train_batch_size: [8]\n", [], "per_device_train_batch_size=[8]: not an int"),
    "bad choice": ("lr_scheduler_type: cosinee\n", [], "lr_scheduler_type='cosinee': not one of linear"),
    "unknown key": ("learning_rat: 0.1\n", [], "learning_rat: unknown key"),
    "yaml syntax": ("max_steps: [5\n", [], "YAML syntax error at line"),
    "env not a mapping": ("env: [A]\n", [], "env=['A']: not a mapping"),
    "bad override": ("", ["--max_steps", "x"], "--max_steps 'x': not an int"),
    "unknown flag": ("", ["--max_stepz", "3"], "--max_stepz: unknown flag"),
    "streaming without max_steps": ("dataset_streaming: true\n", [], "dataset_streaming needs max_steps"),
}


@pytest.mark.parametrize("case", BAD_RECIPES, ids=str)
def test_validate_and_train_name_the_same_problem(case, tmp_path, capsys):
    text, overrides, problem = BAD_RECIPES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_HEAD + text)
    assert any(problem in line for line in validate(str(recipe), overrides=overrides))
    with pytest.raises(SystemExit):
        main(["validate", str(recipe), *overrides])
    assert problem in capsys.readouterr().err
    with pytest.raises(SystemExit, match=re.escape(problem)):
        main(["train", str(recipe), *overrides])


def test_an_empty_folder_is_a_problem_for_both(tmp_path):
    (tmp_path / "empty").mkdir()
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(f"model_name_or_path: tiny:janus\ndataset_name: {tmp_path / 'empty'}\n")
    problem = f"dataset_name='{tmp_path / 'empty'}' is an empty folder"
    assert any(problem in line for line in validate(str(recipe)))
    with pytest.raises(SystemExit, match=re.escape(problem)):
        main(["train", str(recipe), "--report_to", "none"])


def test_validate_reports_every_problem_of_recipe_and_flags_at_once(tmp_path):
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_HEAD + "max_steps: fifty\nper_device_train_batch_size: [8]\ncondition_bottleneck: crop\n")
    errors = validate(str(recipe), overrides=["--learning_rate", "fast", "--logging_steps", "1"])
    expected = ["max_steps='fifty'", "per_device_train_batch_size=[8]", "condition_bottleneck='crop'",
                "--learning_rate 'fast'"]  # fmt: skip
    assert [next(e for e in errors if wanted in e) for wanted in expected] and len(errors) == 4
    with pytest.raises(SystemExit, match=r"4 problem\(s\)") as caught:
        main(["train", str(recipe), "--learning_rate", "fast", "--logging_steps", "1"])
    assert all(wanted in str(caught.value) for wanted in expected)


def test_validate_takes_overrides_and_the_env_block_as_train_does(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("RECA_TEST_VAR", "unset")  # restored (removed) after the test, whatever the recipe sets
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_HEAD + "env:\n  RECA_TEST_VAR: 7\nlearning_rate: 1e-5\nmax_steps: '5'\nbf16: false\n")
    assert (
        validate(str(recipe), overrides=["--max_steps", "3", "--freeze", "model.vqmodel", "model.vision_model"]) == []
    )
    assert os.environ["RECA_TEST_VAR"] == "7"
    main(["validate", str(recipe), "--max_steps", "3", "--learning_rate=2e-5"])
    assert "OK" in capsys.readouterr().out
    config = parse_recipe(str(recipe), ["--max_steps", "3"])
    assert (config.max_steps, config.learning_rate) == (3, 1e-5)
    with pytest.raises(SystemExit):
        main(["validate", str(recipe), "--condition_resolution", "30"])  # the model's check sees the override
    assert "condition_resolution" in capsys.readouterr().err


GOOD_RECIPES = {  # values reca train has always taken (quoted numbers are parsed by the field's type)
    "quoted int": ("lora_r: '8'\n", {"lora_r": 8}),
    "quoted steps": ("save_steps: '50'\n", {"save_steps": 50}),
    "exponent float": ("learning_rate: 1e-5\n", {"learning_rate": 1e-5}),
    "quoted bool": ("bf16: 'false'\n", {"bf16": False}),
}


@pytest.mark.parametrize("case", GOOD_RECIPES, ids=str)
def test_validate_accepts_what_train_accepts(case, tmp_path):
    text, expected = GOOD_RECIPES[case]
    recipe = tmp_path / "recipe.yaml"
    recipe.write_text(_HEAD + text)
    assert validate(str(recipe)) == []
    config = parse_recipe(str(recipe))
    assert {name: getattr(config, name) for name in expected} == expected
