"""A run that cannot start says why in reca's words: an empty dataset by name, a model without an adapter before
the processor it also lacks."""

import pytest
from transformers import GPT2Config, GPT2LMHeadModel

from reca_hf import RecATrainer
from reca_hf.testing import tiny_umm


@pytest.mark.parametrize("name", ["train_dataset", "eval_dataset", "i2t_dataset"])
def test_an_empty_dataset_is_named(make_args, shapes, name):
    model, processor = tiny_umm("janus")
    datasets = {"train_dataset": shapes, name: shapes.select([])}
    with pytest.raises(ValueError, match=rf"^{name} is empty \(0 rows\): check its source"):
        RecATrainer(model, args=make_args(), processing_class=processor, **datasets)


def test_no_adapter_is_said_before_no_processor(make_args, shapes):
    model = GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2, vocab_size=100, bos_token_id=0, eos_token_id=0))
    with pytest.raises(ValueError, match="no RecA adapter handles model_type='gpt2'"):
        RecATrainer(model, args=make_args(), train_dataset=shapes)
