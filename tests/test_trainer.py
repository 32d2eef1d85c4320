import json
import logging

import pytest
import torch
from transformers import TrainingArguments

from reca_hf import RecACollator, RecATrainer
from reca_hf.testing import tiny_umm


def _losses(trainer):
    return [log["reconstruction_loss"] for log in trainer.state.log_history if "reconstruction_loss" in log]


def test_reconstruction_loss_falls_clearly(make_args, tiny_janus, shapes, tmp_path):
    model, processor = tiny_janus
    args = make_args(max_steps=110, per_device_train_batch_size=8, logging_steps=10, cond_dropout_prob=0.0)
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    trainer.train()
    losses = _losses(trainer)
    assert losses[-1] < losses[0] - 0.8, losses


def test_training_changes_only_what_the_freeze_policy_leaves_trainable(make_args, tiny_janus, shapes, tmp_path):
    model, processor = tiny_janus
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = RecATrainer(model, args=make_args(), train_dataset=shapes, processing_class=processor)
    trainer.train()
    for name, parameter in model.named_parameters():
        frozen = name.startswith(
            ("model.vision_model", "model.aligner", "model.vqmodel", "model.language_model.embed_tokens")
        )
        assert parameter.requires_grad is not frozen, name
        if frozen:
            assert torch.equal(parameter, before[name]), name
    assert not torch.equal(
        model.model.generation_head.vision_head.weight, before["model.generation_head.vision_head.weight"]
    )


def test_resume_continues_the_same_losses_and_prompt_draws(make_args, shapes, tmp_path):
    def run(max_steps, resume=None):
        model, processor = tiny_umm("janus")
        args = make_args(max_steps=max_steps, save_strategy="steps", save_steps=3, learning_rate=1e-3,
                         lr_scheduler_type="constant")  # fmt: skip
        trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
        drawn = []
        trainer.data_collator = _Recorder(trainer.data_collator, drawn)
        trainer.train(resume_from_checkpoint=resume)
        return _losses(trainer), drawn

    straight_losses, straight_draws = run(6)
    half_losses, half_draws = run(3)
    resumed_losses, resumed_draws = run(6, resume=str(tmp_path / "run" / "checkpoint-3"))
    # The resumed run's history holds the first half (loaded from the checkpoint) and its own steps.
    assert half_losses == pytest.approx(straight_losses[:3], abs=1e-5)
    assert resumed_losses == pytest.approx(straight_losses, abs=1e-5)
    # accelerate's dataloader fetches one batch ahead, so a run may record one batch past its last step.
    assert half_draws[:3] == straight_draws[:3]
    assert resumed_draws[:3] == straight_draws[3:6]
    assert len(set(map(tuple, straight_draws[:6]))) == 6  # a new epoch draws anew


class _Recorder:
    """Wraps a collator and records the instructions of every batch it builds."""

    def __init__(self, collator, drawn):
        self.collator, self.drawn = collator, drawn

    def __call__(self, rows):
        batch = self.collator(rows)
        self.drawn.append(batch["instructions"])
        return batch


def test_image_column_survives_column_filtering(make_args, tiny_janus, shapes, tmp_path):
    model, processor = tiny_janus
    renamed = shapes.rename_column("image", "picture")
    args = make_args(remove_unused_columns=True, image_column="picture", max_steps=2)
    trainer = RecATrainer(model, args=args, train_dataset=renamed, processing_class=processor)
    trainer.train()
    assert len(_losses(trainer)) == 2


def test_missing_image_column_is_named(make_args, tiny_janus, shapes, tmp_path):
    model, processor = tiny_janus
    with pytest.raises(ValueError, match=r"image_column='photo'.*\['image', 'caption'\]"):
        RecATrainer(model, args=make_args(image_column="photo"), train_dataset=shapes, processing_class=processor)


def test_defaults_collator_warning_and_table(tiny_janus, shapes, tmp_path, caplog, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    model, processor = tiny_janus
    with caplog.at_level(logging.INFO, logger="reca_hf"):
        trainer = RecATrainer(model, train_dataset=shapes, processing_class=processor)
    assert isinstance(trainer.data_collator, RecACollator)
    assert trainer.args.remove_unused_columns is False
    assert "image-to-text" in caplog.text
    table = [r.getMessage() for r in caplog.records if r.name == "reca_hf.trainer" and r.levelno == logging.INFO]
    assert any("tokenizers" in message and "generation" in message for message in table)  # logged, not printed
    assert "tokenizers" not in capsys.readouterr().out
    converted = RecATrainer(model, args=TrainingArguments(output_dir=str(tmp_path / "o"), hub_token="secret"),
                            train_dataset=shapes, processing_class=processor)  # fmt: skip
    assert converted.args.hub_token == "secret" and converted.args.condition_resolution == "auto"


def test_model_from_a_local_folder_and_run_outputs(make_args, tiny_janus, shapes, tmp_path):
    model, processor = tiny_janus
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    args = make_args(num_reconstruction_images=2, reconstruction_kwargs={"guidance_scale": 1.0})
    trainer = RecATrainer(str(tmp_path / "base"), args=args, train_dataset=shapes)
    trainer.train()
    trainer.save_model()
    trainer.create_model_card()
    out = tmp_path / "run"
    for name in ("model.safetensors", "config.json", "processor_config.json", "README.md", "reconstructions.png"):
        assert (out / name).is_file(), name
    table = json.loads((out / "reca_parameters.json").read_text())
    assert table["tokenizers"]["trainable"] == 0 and table["generation"]["trainable"] > 0
    card = (out / "README.md").read_text()
    assert "condition resolution | 32" in card and "reca" in card


def test_gradient_accumulation_averages(make_args, shapes, tmp_path):
    def grad_norm(**overrides):
        model, processor = tiny_umm("janus")
        args = make_args(max_steps=1, learning_rate=0.0, cond_dropout_prob=0.0, **overrides)
        trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
        trainer.train()
        return trainer.state.log_history[0]["grad_norm"]

    single = grad_norm(per_device_train_batch_size=8)
    accumulated = grad_norm(per_device_train_batch_size=4, gradient_accumulation_steps=2)
    assert accumulated == pytest.approx(single, rel=0.05)


def test_evaluation_logs_the_reconstruction_loss(make_args, tiny_janus, shapes, tmp_path):
    model, processor = tiny_janus
    trainer = RecATrainer(model, args=make_args(), train_dataset=shapes, eval_dataset=shapes.select(range(4)),
                          processing_class=processor)  # fmt: skip
    metrics = trainer.evaluate()
    # The eval images have captions, so they are evaluated on image-to-text too (4 + 4 samples, one batch).
    expected = (metrics["eval_reconstruction_loss"] + metrics["eval_image_to_text_loss"]) / 2
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-4)
    images_only = shapes.select(range(4)).remove_columns("caption")
    metrics = trainer.evaluate(eval_dataset=images_only)
    assert metrics["eval_reconstruction_loss"] == pytest.approx(metrics["eval_loss"], rel=1e-4)
    assert "eval_image_to_text_loss" not in metrics


def test_task_weights_scale_each_task_in_the_loss(make_args, tiny_janus, shapes):
    """The loss is the per-sample weighted mean: each task's samples count times its weight."""
    model, processor = tiny_janus
    evaluation = shapes.select(range(4))  # captioned: 4 reconstruction + 4 image-to-text samples, one batch
    weights = {"reconstruction": 2.0, "image_to_text": 0.5}
    trainer = RecATrainer(model, args=make_args(task_weights=weights), train_dataset=shapes, eval_dataset=evaluation,
                          processing_class=processor)  # fmt: skip
    metrics = trainer.evaluate()
    expected = (2.0 * metrics["eval_reconstruction_loss"] + 0.5 * metrics["eval_image_to_text_loss"]) / 2
    assert metrics["eval_loss"] == pytest.approx(expected, rel=1e-4)
    # A weight of 0 takes the task out of the gradient: nothing trains, while its loss is still logged.
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    zero = RecATrainer(model, args=make_args(max_steps=1, task_weights={"reconstruction": 0}), train_dataset=shapes,
                       processing_class=processor)  # fmt: skip
    zero.train()
    assert all(torch.equal(p, before[name]) for name, p in model.named_parameters())
    assert len(_losses(zero)) == 1 and _losses(zero)[0] > 0


def test_dataloader_workers_give_the_same_losses_and_prompts(make_args, shapes):
    """Rows, prompt draws (across an epoch boundary) and losses do not depend on where the collator runs."""

    def run(workers):
        model, processor = tiny_umm("janus")
        args = make_args(max_steps=3, dataloader_num_workers=workers, collapse_action="off")  # 2 steps an epoch
        trainer = RecATrainer(model, args=args, train_dataset=shapes.select(range(8)), processing_class=processor)
        trainer.train()
        return _losses(trainer)

    in_process = run(0)
    assert len(in_process) == 3
    assert run(2) == pytest.approx(in_process, abs=1e-6)


def test_log_level_reaches_reca_hf_and_a_missing_processor_is_an_error_at_construction(make_args, tiny_janus, shapes,
                                                                                         tmp_path):  # fmt: skip
    from transformers.utils import logging as hf_logging

    model, processor = tiny_janus
    before = hf_logging.get_verbosity()
    try:
        RecATrainer(model, args=make_args(log_level="info"), train_dataset=shapes, processing_class=processor)
        library = logging.getLogger("reca_hf")
        assert library.getEffectiveLevel() == logging.INFO
        (own,) = [handler for handler in library.handlers if handler.get_name() == "reca_hf"]  # its own name
        assert own.formatter._fmt.startswith("[reca_hf]")
    finally:
        hf_logging.set_verbosity(before)
    with pytest.raises(ValueError, match=r"processing_class=None: .*Pass the model's processor"):
        RecATrainer(model, args=make_args(), train_dataset=shapes)  # built in code: nothing to load
    model.save_pretrained(tmp_path / "base")
    processor.save_pretrained(tmp_path / "base")
    loaded = type(model).from_pretrained(tmp_path / "base")
    trainer = RecATrainer(loaded, args=make_args(), train_dataset=shapes)  # the processor comes from the folder
    assert trainer.processing_class is not None and trainer.adapter.processor is trainer.processing_class


def test_prepare_may_return_lists_and_ragged_entries_and_the_adapter_counts_the_batch(
    make_args, tiny_janus, shapes, monkeypatch
):
    """Non-tensor and variable-size entries of prepare() reach the loss; adapter.batch_size counts the samples."""
    from reca_hf.adapters import JanusAdapter, registry

    seen = []

    class RaggedJanus(JanusAdapter):
        name = "ragged_janus"

        def prepare(self, condition_images, target_images, instructions):
            batch = super().prepare(condition_images, target_images, instructions)
            return {"ragged": [torch.zeros(i + 1) for i in range(len(instructions))], **batch}

        def loss(self, model, batch, **kwargs):
            seen.append(([len(t) for t in batch["ragged"]], len(batch["instructions"]), self.batch_size(batch)))
            return super().loss(model, batch, **kwargs)

    monkeypatch.setattr(registry, "_REGISTRY", {"ragged_janus": RaggedJanus, **registry._REGISTRY})
    model, processor = tiny_janus
    args = make_args(max_steps=1, per_device_train_batch_size=3, collapse_action="off")
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    trainer.train()
    assert type(trainer.adapter) is RaggedJanus and seen == [([1, 2, 3], 3, 3)]
    assert trainer.task_counts["reconstruction"] == 3
    with pytest.raises(ValueError, match="cannot tell the batch size"):
        trainer.adapter.batch_size({"scale": torch.tensor(1.0)})
