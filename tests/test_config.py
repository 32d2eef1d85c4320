import dataclasses
import re

import pytest
from transformers import TrainingArguments

import reca_hf.config
from reca_hf import RecAConfig
from reca_hf.checks import file_errors
from reca_hf.cli import parse_recipe

OWN_FIELDS = [
    f for f in dataclasses.fields(RecAConfig) if f.name not in {g.name for g in dataclasses.fields(TrainingArguments)}
]


def _squash(text):
    return " ".join(text.split())


def test_docstring_and_help_agree_for_every_own_field():
    doc = _squash(RecAConfig.__doc__)
    documented = set(re.findall(r"^\s{8}(\w+) \(`", RecAConfig.__doc__, flags=re.M))
    assert documented == {f.name for f in OWN_FIELDS}
    for f in OWN_FIELDS:
        assert f.metadata.get("help"), f.name
        assert _squash(f.metadata["help"]) in doc, f.name


def test_defaults_that_differ_from_training_arguments(tmp_path):
    args = RecAConfig(output_dir=str(tmp_path))
    assert args.remove_unused_columns is False
    assert (args.learning_rate, args.adam_beta2) == (1e-5, 0.95)
    assert (args.condition_resolution, args.generation_resolution, args.freeze) == ("auto", "auto", "auto")
    assert (args.condition_bottleneck, args.cond_dropout_prob, args.image_column) == ("resize", "auto", "image")


def test_values_are_normalised(tmp_path):
    args = RecAConfig(output_dir=str(tmp_path), condition_resolution="224", freeze="model.vision_model, model.vqmodel",
                      reconstruction_kwargs='{"guidance_scale": 2}')  # fmt: skip
    assert args.condition_resolution == 224
    assert args.freeze == ["model.vision_model", "model.vqmodel"]
    assert args.reconstruction_kwargs == {"guidance_scale": 2}


def test_every_error_is_reported_at_once_and_names_its_field(tmp_path):
    with pytest.raises(ValueError) as error:
        RecAConfig(output_dir=str(tmp_path), condition_resolution="big", condition_bottleneck="crop",
                   cond_dropout_prob=1.5, blur_factor=1, model_dtype="int4", freeze=["("])  # fmt: skip
    message = str(error.value)
    for field in ("condition_resolution='big'", "condition_bottleneck='crop'", "cond_dropout_prob=1.5",
                  "blur_factor=1", "model_dtype='int4'", "freeze pattern '('"):  # fmt: skip
        assert field in message


def test_the_config_reads_no_file_and_the_checks_name_what_files_lack(tmp_path, monkeypatch):
    """A missing prompt file, a base_model_id that is a local folder, a model folder whose config says Emu3 with a
    copyable condition: the config accepts all (it only describes); the checks of reca validate and the trainer
    name each."""
    folder = tmp_path / "org" / "model"
    folder.mkdir(parents=True)
    (folder / "config.json").write_text('{"model_type": "emu3"}')
    config = RecAConfig(output_dir=str(tmp_path), prompt_templates="nope.txt", model_name_or_path=str(folder),
                        condition_resolution=32, generation_resolution=32, condition_bottleneck="none",
                        base_model_id="org/model")  # fmt: skip
    assert config.prompt_templates == "nope.txt"
    monkeypatch.chdir(tmp_path)  # "org/model" is now a local folder, not a Hub id
    errors = file_errors(config)
    assert any(e.startswith("prompt_templates='nope.txt': no such file") for e in errors)
    assert any(e.startswith("base_model_id='org/model'") for e in errors)
    (tmp_path / "prompts.txt").write_text("Describe it.\n")
    assert file_errors(RecAConfig(output_dir=str(tmp_path), prompt_templates=str(tmp_path / "prompts.txt"))) == []


def test_command_line_strings_become_the_typed_values(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model_name_or_path: tiny:janus\ndataset_name: synthetic_shapes\nfreeze: 'a.b, c'\n")
    config = parse_recipe(str(recipe), ["--condition_resolution", "16", "--generation_resolution", "auto"])
    assert (config.condition_resolution, config.generation_resolution, config.freeze) == (16, "auto", ["a.b", "c"])
    assert parse_recipe(str(recipe), ["--freeze", "none", "--lora_target_modules", "generation+llm"]).freeze == "none"
    assert parse_recipe(str(recipe), ["--lora_target_modules", "generation+llm"]).lora_target_modules == (
        "generation+llm")  # fmt: skip


@pytest.mark.parametrize("accelerator", [False, True])
def test_bf16_runs_on_the_cpu_only_without_a_bf16_accelerator(tmp_path, monkeypatch, accelerator):
    """Both branches, whatever this machine has: the accelerator check is pinned either way."""
    import transformers.training_args

    for module in (reca_hf.config, transformers.training_args):
        monkeypatch.setattr(module, "is_torch_bf16_gpu_available", lambda: accelerator)
    args = RecAConfig(output_dir=str(tmp_path), bf16=True, report_to="none")
    assert args.bf16 and args.use_cpu is not accelerator
    assert RecAConfig(output_dir=str(tmp_path), report_to="none").use_cpu is False  # no bf16: nothing changes


def test_bf16_without_an_accelerator_validates_but_refuses_to_train(tmp_path, monkeypatch, capsys, tiny_janus, shapes):
    from reca_hf import RecATrainer
    from reca_hf import config as config_module
    from reca_hf.cli import main

    monkeypatch.setattr(config_module, "_bf16_accelerator_available", lambda: False)
    model, processor = tiny_janus
    args = RecAConfig(output_dir=str(tmp_path), bf16=True, report_to="none", max_steps=1, save_strategy="no")
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    with pytest.raises(ValueError, match=r"bf16=True, but no bf16-capable accelerator.*use_cpu: true"):
        trainer.train()
    on_purpose = RecAConfig(output_dir=str(tmp_path), bf16=True, use_cpu=True, report_to="none", max_steps=1,
                            save_strategy="no", num_reconstruction_images=0)  # fmt: skip
    RecATrainer(model, args=on_purpose, train_dataset=shapes, processing_class=processor).train()
    recipe = tmp_path / "bf16.yaml"
    recipe.write_text(open("recipes/janus/tiny_demo.yaml").read() + "\nbf16: true\n")
    main(["validate", str(recipe)])  # a bf16 recipe still validates on a laptop, with a note
    out = capsys.readouterr().out
    assert "OK" in out and "note: bf16=True" in out
