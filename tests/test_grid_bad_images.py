"""The reconstruction grid's and the probe's images go through the bad-image handling, as training rows do."""

import io

import datasets
import pytest
from PIL import Image

from reca_hf import RecATrainer
from reca_hf.images import BadImageError
from reca_hf.testing import tiny_umm


def _eval_set(bad_first: bool):
    values = []
    for i in range(6):
        buffer = io.BytesIO()
        Image.new("RGB", (32, 32), (40 * i, 90, 200 - 30 * i)).save(buffer, "JPEG")
        data = buffer.getvalue()
        values.append({"bytes": data[:200] if (bad_first and i == 0) else data, "path": f"img{i}.jpg"})
    features = datasets.Features({"image": datasets.Image()})
    return datasets.Dataset.from_dict({"image": values}, features=features)


def test_a_bad_grid_image_is_named_at_set_up(make_args, shapes):
    model, processor = tiny_umm("janus")
    args = make_args(num_reconstruction_images=3, collapse_action="off")
    with pytest.raises(BadImageError, match=r"^eval dataset row 0: column 'image' \(file img0.jpg\) could not be"):
        RecATrainer(model, args=args, train_dataset=shapes, eval_dataset=_eval_set(True), processing_class=processor)


def test_under_skip_the_grid_and_the_probe_take_the_next_good_images(make_args, shapes, caplog):
    model, processor = tiny_umm("janus")
    args = make_args(num_reconstruction_images=3, bad_image_policy="skip", collapse_probe_images=4, max_steps=1,
                     eval_strategy="no")  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=shapes, eval_dataset=_eval_set(True),
                          processing_class=processor)  # fmt: skip
    grid = next(c for c in trainer.callback_handler.callbacks if type(c).__name__ == "ReconstructionGridCallback")
    assert len(grid.images) == 3 and all(isinstance(image, Image.Image) for image in grid.images)
    assert trainer.collapse_detector is not None  # its 4 probe images decoded (built from the good rows)
    assert "eval dataset row 0" in caplog.text and "img0.jpg" in caplog.text
    trainer.train()  # the grid at step 0 and at the end, without the bad file


def test_the_probe_alone_names_a_bad_image_too(make_args, shapes):
    model, processor = tiny_umm("janus")
    args = make_args(num_reconstruction_images=0, collapse_probe_images=4)
    with pytest.raises(BadImageError, match=r"^eval dataset row 0: .*img0.jpg.*set bad_image_policy: skip"):
        RecATrainer(model, args=args, train_dataset=shapes, eval_dataset=_eval_set(True), processing_class=processor)
