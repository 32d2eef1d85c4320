"""Aspect-ratio buckets: sizes from the headers, every row once per epoch, batches of similar shape, and a BAGEL run
on images of many shapes through `group_by_aspect`."""

import io

import datasets
import numpy as np
import pytest
from PIL import Image

from reca_hf import RecATrainer
from reca_hf.buckets import AspectGroupedSampler, aspect_ratios, image_aspect
from reca_hf.testing import tiny_umm

SIZES = [(96, 32), (32, 96), (64, 64), (80, 40), (40, 80), (90, 30), (30, 90), (50, 50)] * 4


def _png(size) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", size, (200, 30, 30)).save(buffer, "PNG")
    return buffer.getvalue()


def test_aspects_come_from_the_header_with_the_exif_orientation(tmp_path):
    assert image_aspect({"bytes": _png((60, 20)), "path": None}) == 3.0
    path = tmp_path / "rotated.jpg"
    exif = Image.Exif()
    exif[0x0112] = 6  # rotated by 90 degrees: shown as 20 x 60
    Image.new("RGB", (60, 20)).save(path, exif=exif)
    assert image_aspect(str(path)) == pytest.approx(1 / 3)
    assert image_aspect(Image.new("RGB", (10, 40))) == 0.25
    assert image_aspect({"bytes": b"not an image", "path": None}) == 1.0  # the collator names it later
    rows = [{"image": Image.new("RGB", (20, 10))}, {"picture": Image.new("RGB", (10, 20)), "__reca_source__": "i2t"}]
    assert aspect_ratios(rows, {"i2t": "picture"}, "image") == [2.0, 0.5]


def _spread(aspects, batches) -> float:
    """The mean over batches of the largest aspect ratio over the smallest."""
    return float(np.mean([max(aspects[i] for i in b) / min(aspects[i] for i in b) for b in batches]))


def test_every_row_once_per_epoch_in_batches_of_similar_shape():
    rng = np.random.default_rng(0)
    aspects = list(np.exp(rng.uniform(-1.5, 1.5, 203)))
    sampler = AspectGroupedSampler(aspects, batch_size=4, seed=3, group_batches=10)
    first = list(sampler)
    assert sorted(first) == list(range(203)) and len(sampler) == 203
    assert list(sampler) == first  # a function of (seed, epoch)
    sampler.set_epoch(1)
    assert sorted(list(sampler)) == list(range(203)) and list(sampler) != first
    batches = sampler.batches()
    assert [len(b) for b in batches] == [4] * 50 + [3]  # the one short batch comes last
    shuffled = [rng.permutation(203)[i : i + 4].tolist() for i in range(0, 200, 4)]
    # measured: 1.53 in groups of 10 batches, 1.14 in the default 50, 7.8 for shuffled rows
    assert _spread(aspects, batches) < 2 < 5 < _spread(aspects, shuffled)
    assert _spread(aspects, AspectGroupedSampler(aspects, batch_size=4, seed=3).batches()) < 1.2


def test_a_bagel_run_on_images_of_many_shapes_groups_them_by_aspect(make_args):
    model, processor = tiny_umm("bagel")
    images = [Image.new("RGB", size, (30 * (i % 8), 90, 160)) for i, size in enumerate(SIZES)]
    dataset = datasets.Dataset.from_dict({"image": images})
    args = make_args(max_steps=2, per_device_train_batch_size=4, group_by_aspect=True, collapse_action="off")
    trainer = RecATrainer(model, args=args, train_dataset=dataset, processing_class=processor)
    loader = trainer.get_train_dataloader()
    batch = next(iter(loader))
    shapes = {tuple(view.shape[-2:]) for view in batch["target_pixel_values"]}
    assert len(shapes) == 1  # 8 shapes, 4 of each: a batch of 4 is one shape
    trainer.train()
    assert trainer.state.global_step == 2
    assert all(
        np.isfinite(log["reconstruction_loss"]) for log in trainer.state.log_history if "reconstruction_loss" in log
    )


def test_group_by_aspect_refuses_a_stream_by_name(make_args):
    with pytest.raises(ValueError, match=r"group_by_aspect=True: .*\(dataset_streaming: true\)"):
        make_args(group_by_aspect=True, dataset_streaming=True)
