import dataclasses
import re

import pytest
from transformers import TrainingArguments

from reca_hf import RecAConfig

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
    assert (args.condition_bottleneck, args.cond_dropout_prob, args.image_column) == ("resize", 0.1, "image")


def test_values_are_normalised(tmp_path):
    args = RecAConfig(output_dir=str(tmp_path), condition_resolution="224", freeze="model.vision_model, model.vqmodel",
                      reconstruction_kwargs='{"guidance_scale": 2}')  # fmt: skip
    assert args.condition_resolution == 224
    assert args.freeze == ["model.vision_model", "model.vqmodel"]
    assert args.reconstruction_kwargs == {"guidance_scale": 2}


def test_every_error_is_reported_at_once_and_names_its_field(tmp_path):
    with pytest.raises(ValueError) as error:
        RecAConfig(output_dir=str(tmp_path), condition_resolution="big", condition_bottleneck="crop",
                   cond_dropout_prob=1.5, blur_factor=1, prompt_templates="nope.txt", freeze=["("])  # fmt: skip
    message = str(error.value)
    for field in ("condition_resolution='big'", "condition_bottleneck='crop'", "cond_dropout_prob=1.5",
                  "blur_factor=1", "prompt_templates='nope.txt'", "freeze pattern '('"):  # fmt: skip
        assert field in message


def test_bf16_without_an_accelerator_runs_on_the_cpu(tmp_path):
    args = RecAConfig(output_dir=str(tmp_path), bf16=True)
    assert args.bf16 and args.use_cpu
