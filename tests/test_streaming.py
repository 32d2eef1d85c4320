"""Streamed (iterable) training sets: alone, in the task mix, from a local folder or parquet files, with bad
images skipped, and resumed (issue 12, item 4)."""

import itertools
import json

import datasets
import pytest
import torch

from reca_hf import RecATrainer
from reca_hf.adapters import get_adapter
from reca_hf.cli import main
from reca_hf.data import load_image_dataset, synthetic_shapes
from reca_hf.tasks import IMAGE_TO_TEXT, INDEX_KEY, RECONSTRUCTION, TASK_KEY, prepare_datasets


def _stream(n: int, seed: int = 0, size: int = 32) -> datasets.IterableDataset:
    return synthetic_shapes(n, size=size, seed=seed).to_iterable_dataset()


def _spy_rows(trainer) -> dict[int, list[tuple[str, int]]]:
    """``{step: [(dataset, row), ...]}`` of the rows each training step's batch was made of."""
    seen: dict[int, list[tuple[str, int]]] = {}
    collator = trainer.data_collator
    collate = collator.__call__

    class Spy:
        def __getattr__(self, name):
            return getattr(collator, name)

        def __call__(self, rows):
            batch = collate(rows)
            batch["spy_rows"] = sorted((row["__reca_source__"], row["__reca_row__"]) for row in rows)
            return batch

    compute_loss = trainer.compute_loss

    def spying(model, inputs, *args, **kwargs):
        seen[trainer.state.global_step + 1] = inputs.pop("spy_rows")
        return compute_loss(model, inputs, *args, **kwargs)

    trainer.data_collator, trainer.compute_loss = Spy(), spying  # the dataloader, built at train(), collates
    return seen


def test_a_stream_trains_alone_and_in_the_task_mix(make_args, tiny_janus):
    model, processor = tiny_janus
    args = make_args(max_steps=4, per_device_train_batch_size=4, collapse_action="off", num_reconstruction_images=2,
                     task_ratios={"reconstruction": 1, "image_to_text": 1})  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=_stream(16), i2t_dataset=_stream(16, seed=1),
                          processing_class=processor)  # fmt: skip
    trainer.train()
    counts = trainer.task_counts
    assert counts[RECONSTRUCTION] + counts[IMAGE_TO_TEXT] == 16  # no row of a mixed batch lost
    assert counts[RECONSTRUCTION] >= 4 and counts[IMAGE_TO_TEXT] >= 4
    assert all(torch.isfinite(torch.tensor(log["loss"])) for log in trainer.state.log_history if "loss" in log)
    with pytest.raises(ValueError, match=r"max_steps=-1: a streamed \(iterable\) training set has no length"):
        RecATrainer(model, args=make_args(max_steps=-1), train_dataset=_stream(4), processing_class=processor)


def test_the_streamed_mix_keeps_the_task_shares(make_args, tiny_janus):
    adapter = get_adapter(*tiny_janus)
    args = make_args(max_steps=1, task_ratios={"reconstruction": 3, "image_to_text": 1})
    data = prepare_datasets(adapter, args, _stream(300, size=8), i2t_dataset=_stream(100, seed=1, size=8))
    tasks = [row[TASK_KEY] for row in data.train_dataset]
    assert isinstance(data.train_dataset, datasets.IterableDataset)
    assert 0.68 < tasks.count(RECONSTRUCTION) / len(tasks) < 0.82
    assert [row[INDEX_KEY] for row in itertools.islice(iter(data.train_dataset), 5)] == [0, 1, 2, 3, 4]


def test_dataset_streaming_reads_a_folder_and_parquet_files_without_listing_them(tmp_path, capsys):
    folder, parquet = tmp_path / "images", tmp_path / "parquet"
    folder.mkdir()
    parquet.mkdir()
    shapes = synthetic_shapes(6, size=32)
    for i, image in enumerate(shapes["image"]):
        image.save(folder / f"{i}.png")
    shapes.rename_column("image", "picture").to_parquet(str(parquet / "train.parquet"))
    streamed = load_image_dataset(str(folder), streaming=True)
    assert isinstance(streamed, datasets.IterableDataset) and len(list(streamed)) == 6
    out = tmp_path / "run"
    main(["train", "--model_name_or_path", "tiny:janus", "--dataset_name", str(parquet), "--image_column", "picture",
          "--dataset_streaming", "true", "--max_steps", "2", "--per_device_train_batch_size", "2", "--output_dir",
          str(out), "--report_to", "none", "--save_strategy", "no", "--num_reconstruction_images", "0",
          "--collapse_action", "off", "--logging_steps", "1", "--dataloader_pin_memory", "false"])  # fmt: skip
    state = json.loads((out / "trainer_state.json").read_text())
    assert state["global_step"] == 2
    with pytest.raises(SystemExit, match="dataset_streaming needs max_steps"):
        main(["train", "--model_name_or_path", "tiny:janus", "--dataset_name", str(folder), "--dataset_streaming",
              "true"])  # fmt: skip


def test_skipped_bad_images_of_a_stream_are_counted_summarised_and_carded(make_args, tiny_janus, caplog):
    model, processor = tiny_janus
    rows = synthetic_shapes(8, size=32).cast_column("image", datasets.Image(decode=False))
    rows = rows.map(
        lambda row, i: {"image": {"bytes": b"junk", "path": None}} if i in (1, 5) else {}, with_indices=True
    )
    stream = rows.cast_column("image", datasets.Image()).to_iterable_dataset()
    args = make_args(max_steps=2, per_device_train_batch_size=4, collapse_action="off", bad_image_policy="skip",
                     require_understanding_data=False)  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=stream, processing_class=processor)
    trainer.train()
    assert trainer.task_counts[RECONSTRUCTION] == 8  # every batch whole
    assert trainer.skipped_rows == {"train": 2}
    assert "2 bad image(s) were skipped and replaced in this run (train 2)" in caplog.text
    trainer.create_model_card()
    assert trainer.run_record()["skipped_rows"] == {"train": 2}
    assert "train 2" in (trainer.args.output_dir and open(f"{trainer.args.output_dir}/README.md").read())


def test_a_resumed_stream_trains_on_exactly_the_rows_the_run_had_left(make_args, tiny_janus, tmp_path):
    """The documented guarantee: a resumed streamed run reads each row the uninterrupted run would have, in the
    same batches, even after it has read the stream through and started it again (a 4-row mix: 2 batches a pass)."""

    def run(resume=None):
        from reca_hf.testing import tiny_umm

        model, processor = tiny_umm("janus")
        args = make_args(max_steps=5, per_device_train_batch_size=2, save_strategy="steps", save_steps=4,
                         collapse_action="off", task_ratios={"reconstruction": 1, "image_to_text": 1})  # fmt: skip
        trainer = RecATrainer(model, args=args, train_dataset=_stream(2), i2t_dataset=_stream(2, seed=1),
                              processing_class=processor)  # fmt: skip
        seen = _spy_rows(trainer)
        trainer.train(resume_from_checkpoint=resume)
        return seen, [log["loss"] for log in trainer.state.log_history if "loss" in log]

    rows, losses = run()
    assert len({tuple(r) for r in rows.values()}) < len(rows)  # the stream was read through and started again
    resumed_rows, resumed_losses = run(str(tmp_path / "run" / "checkpoint-4"))
    assert resumed_rows == {5: rows[5]}
    assert resumed_losses == losses
