"""The reconstruction grid and validation samples while training: in TensorBoard (read back from its event
file) and in output_dir/samples/step-N.png, at the start, every reconstruction_steps, at evaluations and at the
end, with the prompts' samples before and after training at the end; the dispatcher to the other trackers."""

import struct
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from reca_hf import RecATrainer
from reca_hf.callbacks import log_images
from reca_hf.data import synthetic_shapes

pytest.importorskip("tensorboardX")


def read_images(log_dir: Path) -> dict[str, dict[int, Image.Image]]:
    """Every image summary of the TensorBoard event files under ``log_dir``: tag -> step -> image.

    Event files are TFRecords (length, its CRC, an ``Event`` protobuf, its CRC); tensorboardX ships the protobuf.
    """
    import io

    from tensorboardX.proto import event_pb2

    images: dict[str, dict[int, Image.Image]] = {}
    for path in sorted(log_dir.rglob("events.out.tfevents.*")):
        data = path.read_bytes()
        offset = 0
        while offset < len(data):
            (length,) = struct.unpack("<Q", data[offset : offset + 8])
            event = event_pb2.Event.FromString(data[offset + 12 : offset + 12 + length])
            offset += 12 + length + 4
            for value in event.summary.value:
                if value.HasField("image"):
                    images.setdefault(value.tag, {})[event.step] = Image.open(
                        io.BytesIO(value.image.encoded_image_string)
                    )
    return images


def test_tensorboard_gets_the_grid_and_samples_at_every_expected_step(make_args, tiny_janus, shapes, tmp_path):
    model, processor = tiny_janus
    eval_set = synthetic_shapes(3, size=32, seed=11)
    args = make_args(
        max_steps=6,
        report_to="tensorboard",
        num_reconstruction_images=3,
        reconstruction_steps=4,
        eval_strategy="steps",
        eval_steps=5,
        per_device_eval_batch_size=3,
        validation_prompts=["a red circle", "a blue square"],
        reconstruction_kwargs={"guidance_scale": 1.0, "do_sample": False},
        collapse_action="off",
    )
    trainer = RecATrainer(model, args=args, train_dataset=shapes, eval_dataset=eval_set, processing_class=processor)
    trainer.train()
    run = Path(args.output_dir)
    expected = [0, 4, 5, 6]  # the start, reconstruction_steps, the evaluation at step 5, the last step
    images = read_images(run)
    assert sorted(images) == ["reca/reconstructions", "reca/text_to_image", "reca/text_to_image_before_after"]
    assert sorted(images["reca/reconstructions"]) == expected
    assert sorted(images["reca/text_to_image"]) == expected
    assert sorted(images["reca/text_to_image_before_after"]) == [6]  # the last step: the prompts at step 0 and 6
    assert Image.open(run / "text_to_image_before_after.png").size == images["reca/text_to_image_before_after"][6].size
    grid = images["reca/reconstructions"][4]
    assert grid.size == (4 * 96, 14 + 3 * 96)  # input | condition | tokenizer | step 4, one row per eval image
    input_cell = np.asarray(grid.crop((0, 14, 96, 110)).resize((32, 32), Image.Resampling.NEAREST))
    assert np.array_equal(input_cell, np.asarray(eval_set[0]["image"].convert("RGB")))  # held-out images, not training
    assert images["reca/text_to_image"][0].size == (2 * 96, 14 + 96)  # one column per prompt
    files = sorted(p.name for p in (run / "samples").iterdir())
    assert files == [f"step-{step}.png" for step in expected]
    samples = images["reca/text_to_image"][4]  # 14 + 96 high, and a caption's lines when one image came for both
    assert Image.open(run / "samples" / "step-4.png").height == grid.height + samples.height
    assert (run / "reconstructions.png").is_file()


class TensorBoardCallback:  # a stand-in tracker of the same class name with a recording writer
    def __init__(self):
        self.tb_writer = self
        self.calls = []

    def add_image(self, tag, array, step, dataformats):
        self.calls.append((tag, array.shape, step, dataformats))

    def flush(self):
        pass


class WandbCallback:
    class _Module:
        def __init__(self):
            self.logged = []

        def Image(self, image):  # noqa: N802 - wandb's name
            return ("wandb.Image", image.size)

        def log(self, payload):
            self.logged.append(payload)

    def __init__(self, started=True):
        self._wandb = self._Module()
        self._initialized = started


class CodeCarbonCallback:
    pass


CodeCarbonCallback.__module__ = "transformers.integrations.integration_utils"


def test_log_images_reaches_each_tracker_that_takes_images():
    board, wandb, idle, carbon = (
        TensorBoardCallback(),
        WandbCallback(),
        WandbCallback(started=False),
        CodeCarbonCallback(),
    )
    image = Image.new("RGB", (8, 6))
    reached = log_images([board, wandb, idle, carbon, object()], {"reca/reconstructions": image}, step=3)
    assert reached == ["TensorBoardCallback", "WandbCallback"]
    assert board.calls == [("reca/reconstructions", (6, 8, 3), 3, "HWC")]
    assert wandb._wandb.logged == [{"reca/reconstructions": ("wandb.Image", (8, 6)), "train/global_step": 3}]
    assert idle._wandb.logged == []  # not started: skipped, not an error
