"""Shared or decoupled: the freeze policy, the task mix (image-to-text, text-to-image) and its guard rails."""

import json
import logging

import pytest
import torch

from reca_hf import RecACollator, RecATrainer
from reca_hf.adapters import JanusAdapter, get_adapter
from reca_hf.freeze import apply_freeze, auto_freeze
from reca_hf.tasks import IMAGE_TO_TEXT, RECONSTRUCTION, TASK_KEY, TEXT_TO_IMAGE, MixedTaskDataset
from reca_hf.testing import tiny_umm

FROZEN = ("model.vision_model", "model.aligner", "model.vqmodel", "lm_head", "model.language_model.embed_tokens")


def _task_history(trainer, name):
    return [log[name] for log in trainer.state.log_history if name in log]


def test_mixed_dataset_gives_each_task_its_share_in_any_stretch(shapes):
    mixed = MixedTaskDataset({RECONSTRUCTION: shapes, IMAGE_TO_TEXT: shapes.select(range(5))},
                             {RECONSTRUCTION: 2.0, IMAGE_TO_TEXT: 1.0, TEXT_TO_IMAGE: 0.0})  # fmt: skip
    tasks = [mixed.task_of(i) for i in range(len(mixed))]
    assert len(mixed) == 24 and tasks.count(RECONSTRUCTION) == 16 and tasks.count(IMAGE_TO_TEXT) == 8
    assert all(tasks[i : i + 3].count(IMAGE_TO_TEXT) == 1 for i in range(0, 24, 3))
    # Every reconstruction image once per epoch; the 5 captioned rows cycled through, not cut short.
    assert sorted(mixed.row_of(i) for i in range(24) if tasks[i] == RECONSTRUCTION) == list(range(16))
    seen = [mixed.row_of(i) for i in range(24) if tasks[i] == IMAGE_TO_TEXT]
    mixed.set_epoch(1)
    seen += [mixed.row_of(i) for i in range(24) if tasks[i] == IMAGE_TO_TEXT]
    assert sorted(seen[:15]) == sorted(list(range(5)) * 3)
    assert mixed[1][TASK_KEY] in (RECONSTRUCTION, IMAGE_TO_TEXT)


def test_training_respects_the_task_shares_and_logs_every_task_loss(make_args, tiny_janus, shapes):
    model, processor = tiny_janus
    args = make_args(max_steps=24, per_device_train_batch_size=4, logging_steps=4,
                     task_ratios={"reconstruction": 2, "image_to_text": 1, "text_to_image": 1})  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=shapes, i2t_dataset=shapes, t2i_dataset=shapes,
                          processing_class=processor)  # fmt: skip
    trainer.train()
    counts = trainer.task_counts
    assert sum(counts.values()) == 96  # 24 steps x 4 samples (3 epochs of the 32-slot mix)
    assert counts == {RECONSTRUCTION: 48, IMAGE_TO_TEXT: 24, TEXT_TO_IMAGE: 24}
    for name in ("reconstruction_loss", "image_to_text_loss", "text_to_image_loss"):
        values = _task_history(trainer, name)
        assert len(values) == 6 and all(torch.isfinite(torch.tensor(values))), name


def test_image_to_text_loss_reaches_the_shared_llm_and_nothing_frozen(tiny_janus, shapes):
    model, processor = tiny_janus
    adapter = get_adapter(model, processor)
    apply_freeze(model, adapter, "auto")
    rows = [{**shapes[i], TASK_KEY: IMAGE_TO_TEXT} for i in range(4)]
    batch = RecACollator(adapter)(rows)[IMAGE_TO_TEXT]
    assert (batch["labels"] != -100).sum() > 4 * 8  # every caption is supervised
    loss = adapter.image_to_text_loss(model, batch)
    loss.backward()
    grads = {name: p.grad for name, p in model.named_parameters()}
    llm = [g for name, g in grads.items() if name.startswith("model.language_model.layers")]
    assert llm and all(g is not None for g in llm) and sum(g.abs().sum() for g in llm) > 0
    assert all(grads[name] is None for name in grads if name.startswith(FROZEN))
    assert all(g is None for name, g in grads.items() if name.startswith("model.generation"))


def test_text_to_image_gives_a_finite_loss_and_trains_generation_modules(make_args, tiny_janus, shapes):
    model, processor = tiny_janus
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    args = make_args(max_steps=3, task_ratios={"text_to_image": 1})
    trainer = RecATrainer(model, args=args, train_dataset=shapes, t2i_dataset=shapes, processing_class=processor)
    trainer.train()
    assert trainer.task_counts[TEXT_TO_IMAGE] == 12 and trainer.task_counts[RECONSTRUCTION] == 0
    assert all(torch.isfinite(torch.tensor(_task_history(trainer, "text_to_image_loss"))))
    head = "model.generation_head.vision_head.weight"
    assert not torch.equal(model.get_parameter(head), before[head])
    for name, parameter in model.named_parameters():
        if name.startswith(FROZEN):
            assert torch.equal(parameter, before[name]), name


def test_mixed_run_leaves_frozen_groups_bitwise_unchanged_and_saves_the_table(make_args, tiny_janus, shapes, tmp_path):
    model, processor = tiny_janus
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    trainer = RecATrainer(model, args=make_args(max_steps=4), train_dataset=shapes, i2t_dataset=shapes,
                          processing_class=processor)  # fmt: skip
    assert trainer.task_ratios == {RECONSTRUCTION: 1.0, IMAGE_TO_TEXT: 1.0, TEXT_TO_IMAGE: 0.0}
    trainer.train()
    trainer.save_model()
    changed = {name for name, p in model.named_parameters() if not torch.equal(p, before[name])}
    assert not {name for name in changed if name.startswith(FROZEN)}
    assert any(name.startswith("model.language_model.layers") for name in changed)
    table = json.loads((tmp_path / "run" / "reca_parameters.json").read_text())
    assert table["understanding"]["trainable"] == 0 and table["tokenizers"]["trainable"] == 0
    assert table["shared"]["trainable"] > 0 and table["generation"]["trainable"] > 0


def test_shared_model_without_understanding_data_warns_or_refuses(make_args, tiny_janus, shapes, caplog):
    model, processor = tiny_janus
    with caplog.at_level(logging.WARNING, logger="reca_hf.trainer"):
        RecATrainer(model, args=make_args(), train_dataset=shapes, processing_class=processor)
    assert "no image-to-text data" in caplog.text and "i2t_dataset" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="reca_hf.trainer"):
        RecATrainer(model, args=make_args(), train_dataset=shapes, i2t_dataset=shapes, processing_class=processor)
    assert "no image-to-text data" not in caplog.text
    with pytest.raises(ValueError, match="require_understanding_data=True"):
        RecATrainer(model, args=make_args(require_understanding_data=True), train_dataset=shapes,
                    processing_class=processor)  # fmt: skip
    with pytest.raises(ValueError, match="i2t_dataset"):
        RecATrainer(model, args=make_args(task_ratios={"reconstruction": 1, "image_to_text": 1}),
                    train_dataset=shapes, processing_class=processor)  # fmt: skip
    with pytest.raises(ValueError, match="caption_column='caption'"):
        RecATrainer(model, args=make_args(), train_dataset=shapes, i2t_dataset=shapes.remove_columns("caption"),
                    processing_class=processor)  # fmt: skip


def test_image_to_text_eval_is_logged_before_and_after_training(make_args, tiny_janus, shapes):
    model, processor = tiny_janus
    args = make_args(max_steps=4, eval_strategy="steps", eval_steps=4)
    trainer = RecATrainer(model, args=args, train_dataset=shapes, i2t_dataset=shapes,
                          eval_dataset=shapes.select(range(4)), processing_class=processor)  # fmt: skip
    trainer.train()
    evals = [(log["step"], log["eval_image_to_text_loss"]) for log in trainer.state.log_history
             if "eval_image_to_text_loss" in log]  # fmt: skip
    assert [step for step, _ in evals] == [0, 4]
    assert all("eval_reconstruction_loss" in log for log in trainer.state.log_history if "eval_loss" in log)


def test_chat_messages_and_bad_captions(tiny_janus, shapes):
    model, processor = tiny_janus
    adapter = get_adapter(model, processor)
    collator = RecACollator(adapter, caption_column="messages")
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what shape is this"}]},
                {"role": "assistant", "content": "a red circle"}]  # fmt: skip
    row = {"image": shapes[0]["image"], "messages": messages, TASK_KEY: IMAGE_TO_TEXT}
    batch = collator([row])[IMAGE_TO_TEXT]
    tokenizer = processor.tokenizer
    answer = batch["labels"][batch["labels"] != -100]
    assert tokenizer.decode(answer[:-1]) == "a red circle" and int(answer[-1]) == tokenizer.eos_token_id
    assert "what shape is this" in tokenizer.decode(batch["input_ids"][0])
    with pytest.raises(ValueError, match="row 7: column 'messages'"):
        collator([{"image": shapes[0]["image"], "messages": "", "__reca_index__": 7, TASK_KEY: IMAGE_TO_TEXT}])
    with pytest.raises(KeyError, match="has no column 'messages'"):
        collator([{"image": shapes[0]["image"], TASK_KEY: TEXT_TO_IMAGE}])


def test_decoupled_models_freeze_the_whole_understanding_path(tiny_janus):
    class DecoupledJanus(JanusAdapter):  # the same model, declared decoupled (not registered)
        name = "janus_decoupled_example"
        parameter_sharing = "decoupled"

    model, processor = tiny_janus
    patterns = auto_freeze(DecoupledJanus(model.config, processor))
    assert "model.language_model" in patterns and "model.vqmodel" in patterns
    frozen = set(apply_freeze(model, DecoupledJanus(model.config, processor), "auto"))
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert all(name.startswith("model.generation") for name in trainable)
    assert any(name.startswith("model.language_model.layers") for name in frozen)
    shared_auto = set(auto_freeze(get_adapter(model, processor)))
    assert "model.language_model" not in shared_auto and "model.vision_model" in shared_auto


def test_task_dicts_are_validated(make_args):
    with pytest.raises(ValueError, match="unknown task 'captioning'"):
        make_args(task_ratios={"captioning": 1})
    with pytest.raises(ValueError, match=r"task_weights\['image_to_text'\]=-1"):
        make_args(task_weights={"image_to_text": -1})
    assert make_args(task_ratios='{"reconstruction": 1, "image_to_text": 1}').task_ratios == {
        "reconstruction": 1.0, "image_to_text": 1.0}  # fmt: skip


@pytest.mark.parametrize("arch", ["janus", "emu3"])
def test_every_task_gives_a_finite_loss_with_gradients_where_expected(arch, shapes):
    model, processor = tiny_umm(arch)
    adapter = get_adapter(model, processor)
    frozen = set(apply_freeze(model, adapter, "auto"))
    collator = RecACollator(adapter, cond_dropout_prob=0.0)
    rows = [{**shapes[i], TASK_KEY: task} for i, task in enumerate([RECONSTRUCTION, IMAGE_TO_TEXT, TEXT_TO_IMAGE] * 2)]
    batch = collator(rows)
    losses = {
        RECONSTRUCTION: adapter.loss(model, {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}),
        IMAGE_TO_TEXT: adapter.image_to_text_loss(model, batch[IMAGE_TO_TEXT]),
        TEXT_TO_IMAGE: adapter.text_to_image_loss(model, batch[TEXT_TO_IMAGE]),
    }
    for task, loss in losses.items():
        model.zero_grad(set_to_none=True)
        assert loss.dim() == 0 and torch.isfinite(loss), task
        loss.backward()
        grads = {name: p.grad for name, p in model.named_parameters()}
        assert all(grads[name] is None for name in frozen), task
        layers = [g for name, g in grads.items() if ".layers." in name and "vision" not in name and "vq" not in name]
        assert layers and sum(g.abs().sum() for g in layers if g is not None) > 0, task


def test_captions_are_also_read_from_a_text_column(make_args, tiny_janus, shapes):
    model, processor = tiny_janus
    texts = shapes.rename_column("caption", "text")
    trainer = RecATrainer(model, args=make_args(max_steps=2), train_dataset=shapes, i2t_dataset=texts,
                          processing_class=processor)  # fmt: skip
    trainer.train()
    assert trainer.task_counts[IMAGE_TO_TEXT] > 0 and _task_history(trainer, "image_to_text_loss")


@pytest.mark.parametrize("reduction", ["sample_mean", "task_mean", "sum"])
def test_task_loss_reduction_combines_the_task_losses_as_documented(reduction, make_args, tiny_janus, shapes):
    """A batch of 3 with both tasks holds 2 rows of one and 1 of the other: the three rules differ."""
    model, processor = tiny_janus
    args = make_args(max_steps=6, per_device_train_batch_size=3, task_loss_reduction=reduction)
    trainer = RecATrainer(model, args=args, train_dataset=shapes, i2t_dataset=shapes, processing_class=processor)
    trainer.train()
    logs = [log for log in trainer.state.log_history if "reconstruction_loss" in log and "image_to_text_loss" in log]
    assert logs
    for log in logs:
        reconstruction, captions = log["reconstruction_loss"], log["image_to_text_loss"]
        if reduction == "sample_mean":  # 1/3 or 2/3 of the rows are reconstructions
            assert any(
                log["loss"] == pytest.approx(share * reconstruction + (1 - share) * captions, rel=1e-3)
                for share in (1 / 3, 2 / 3)
            )
        elif reduction == "task_mean":  # each task's mean times its share of the 1:1 ratios
            assert log["loss"] == pytest.approx(0.5 * reconstruction + 0.5 * captions, rel=1e-3)
        else:
            assert log["loss"] == pytest.approx(reconstruction + captions, rel=1e-3)


def test_task_loss_reduction_is_checked(make_args):
    with pytest.raises(ValueError, match="task_loss_reduction='mean'"):
        make_args(task_loss_reduction="mean")


def test_a_parameter_the_model_creates_frozen_stays_frozen(tiny_janus):
    model, processor = tiny_janus
    model.model.register_parameter("fixed_table", torch.nn.Parameter(torch.zeros(4), requires_grad=False))
    adapter = get_adapter(model, processor)
    for policy in ("none", "auto", "none"):
        frozen = apply_freeze(model, adapter, policy)
        assert "model.fixed_table" in frozen and not model.model.fixed_table.requires_grad
    # what a policy froze, a later policy may train again (a resume re-applies the freeze policy)
    apply_freeze(model, adapter, "auto")
    assert not model.model.vision_model.embeddings.patch_embedding.weight.requires_grad
    apply_freeze(model, adapter, "none")
    assert model.model.vision_model.embeddings.patch_embedding.weight.requires_grad


def test_each_dataset_reads_its_own_image_column_and_errors_name_its_field(make_args, tiny_janus, shapes, tmp_path):
    """Issue 12: one image_column used to apply to every dataset, and the error advised image_column."""
    model, processor = tiny_janus
    pictures = shapes.rename_column("image", "picture")
    mixed = {"task_ratios": {"reconstruction": 1, "image_to_text": 1, "text_to_image": 1}, "collapse_action": "off"}
    with pytest.raises(ValueError, match=r"i2t_dataset has no column i2t_image_column='image'.*set i2t_image_column"):
        RecATrainer(model, args=make_args(**mixed), train_dataset=shapes, i2t_dataset=pictures, t2i_dataset=shapes,
                    processing_class=processor)  # fmt: skip
    args = make_args(image_column="picture", i2t_image_column="image", t2i_image_column="image", max_steps=3, **mixed)
    trainer = RecATrainer(model, args=args, train_dataset=pictures, i2t_dataset=shapes, t2i_dataset=shapes,
                          processing_class=processor)  # fmt: skip
    trainer.train()
    assert all(count > 0 for count in trainer.task_counts.values())
    eval_args = make_args(eval_image_column="picture", collapse_action="off", require_understanding_data=False)
    trainer = RecATrainer(
        model, args=eval_args, train_dataset=shapes, eval_dataset=pictures, processing_class=processor
    )
    metrics = trainer.evaluate()
    assert metrics["eval_reconstruction_loss"] > 0 and metrics["eval_image_to_text_loss"] > 0
    with pytest.raises(ValueError, match=r"eval_dataset has no column eval_image_column='image'"):
        RecATrainer(model, args=make_args(require_understanding_data=False), train_dataset=shapes,
                    eval_dataset=pictures, processing_class=processor)  # fmt: skip


def test_reca_train_names_the_dataset_and_field_of_a_missing_image_column(tmp_path):
    from reca_hf.cli import main

    folder = tmp_path / "parquet"
    folder.mkdir()
    from reca_hf.data import synthetic_shapes

    synthetic_shapes(4, size=32).rename_column("image", "picture").to_parquet(str(folder / "train.parquet"))
    flags = ["train", "--model_name_or_path", "tiny:janus", "--dataset_name", str(folder), "--image_column", "picture",
             "--i2t_dataset_name", "synthetic_shapes", "--report_to", "none", "--max_steps", "1"]  # fmt: skip
    with pytest.raises(SystemExit, match=r"i2t_image_column='picture' is not a column of dataset i2t_dataset_name="
                       r"'synthetic_shapes'.*set i2t_image_column"):  # fmt: skip
        main(flags)
