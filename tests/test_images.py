"""The fast data path (draft decode, shared resizes, torch conversion) against the plain one, bad images,
and image-folder loading."""

import io
import json
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from reca_hf import data as data_module
from reca_hf.adapters import get_adapter
from reca_hf.collator import RecACollator
from reca_hf.data import as_source, find_bad_images, image_folder, load_image_dataset, undecoded
from reca_hf.images import BadImageError, ViewSpec, blur, center_square, load_image, pad_to_square, to_tensor
from reca_hf.tasks import IMAGE_TO_TEXT, INDEX_KEY, RECONSTRUCTION, TASK_KEY, MixedTaskDataset
from reca_hf.testing import tiny_umm

# Tolerance of the fast path against a full decode with one resize per view, in 0-255 levels per channel,
# measured on 1024-px photo-like JPEGs: JPEG draft decoding (DCT scaling) shifts pixels by <= 1 level on
# average, <= 9 at the 99.9th percentile (<= 24 at single pixels on edges); a view resized from a 2x larger
# one differs by <= 0.25 on average and <= 3 anywhere. Other formats, at one view size, are exact.
DRAFT_MEAN, DRAFT_P999 = 1.5, 12
DERIVED_MEAN, DERIVED_MAX = 0.3, 3


def _photo(size=(1024, 1024), seed=0) -> Image.Image:
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0 : size[1], 0 : size[0]] / max(size)
    base = np.stack([np.sin(x * 7), np.cos(y * 5), x * y], -1) * 100 + 120 + rng.normal(0, 12, (size[1], size[0], 3))
    return Image.fromarray(np.clip(base, 0, 255).astype(np.uint8))


def _encode(image: Image.Image, fmt: str, **kwargs) -> dict:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **kwargs)
    return {"bytes": buffer.getvalue(), "path": None}


REAL_FORMATS = {
    "jpeg": lambda p: _encode(p, "JPEG", quality=90),
    "jpeg_wide": lambda p: _encode(p.resize((1024, 600)), "JPEG", quality=90),
    "jpeg_L": lambda p: _encode(p.convert("L"), "JPEG"),
    "jpeg_cmyk": lambda p: _encode(p.convert("CMYK"), "JPEG"),
    "jpeg_small": lambda p: _encode(p.resize((300, 200)), "JPEG"),
    "png": lambda p: _encode(p, "PNG"),
    "png_P": lambda p: _encode(p.convert("P"), "PNG"),
    "png_LA": lambda p: _encode(p.convert("LA"), "PNG"),
    "png_I16": lambda p: _encode(p.convert("L").convert("I;16"), "PNG"),
    "webp": lambda p: _encode(p, "WEBP"),
    "webp_RGBA": lambda p: _encode(p.convert("RGBA"), "WEBP", lossless=True),
}


def _plain_views(views: ViewSpec, value) -> tuple[Image.Image, Image.Image]:
    """Today's path before the speed-up: full decode, one resize per view from the source."""
    image = load_image(value)
    if views.target_fit == "center_crop":
        image = center_square(image)

    def square(resolution):
        if views.target_fit == "stretch":
            return image.resize((resolution, resolution), Image.Resampling.BICUBIC)
        return pad_to_square(image, resolution, views.background)

    condition = square(views.condition_resolution)
    if views.bottleneck == "blur":
        condition = blur(condition, views.blur_factor)
    return condition, square(views.generation_resolution)


def _levels(a: Image.Image, b: Image.Image) -> np.ndarray:
    return np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16))


@pytest.fixture(scope="module")
def photo():
    return _photo()


@pytest.mark.parametrize("fmt", sorted(REAL_FORMATS))
@pytest.mark.parametrize("resolutions", [(384, 384), (384, 128), (128, 384)])
@pytest.mark.parametrize("bottleneck", ["resize", "blur"])
@pytest.mark.parametrize("fit", ["pad", "center_crop", "stretch"])
def test_fast_views_equal_the_plain_ones_within_the_tolerance(photo, fmt, resolutions, bottleneck, fit):
    views = ViewSpec(*resolutions, bottleneck, target_fit=fit, condition_fit=fit)
    value = REAL_FORMATS[fmt](photo)
    fast = views.views(load_image(value, draft=views.largest_side, fit=views.decode_fit))
    for name, plain, new in zip(("condition", "target"), _plain_views(views, value), fast):
        assert new.size == plain.size and new.mode == "RGB"
        diff = _levels(plain, new)
        derived = min(resolutions) != max(resolutions) and new.size[0] == min(resolutions)
        if fmt.startswith("jpeg") and fmt != "jpeg_small":  # draft-decoded
            assert diff.mean() <= DRAFT_MEAN and np.percentile(diff, 99.9) <= DRAFT_P999, (name, diff.mean())
        elif derived:
            assert diff.mean() <= DERIVED_MEAN and diff.max() <= DERIVED_MAX, (name, diff.mean(), diff.max())
        else:
            assert diff.max() == 0, name


def test_collator_output_equals_the_plain_path_within_the_tolerance(photo):
    """The collator's tensors, at Janus-Pro's 384/384, against the plain path's normalised as before."""
    model, processor = tiny_umm("janus")
    adapter = get_adapter(model, processor)
    collator = RecACollator(adapter, cond_dropout_prob=0.0)
    # the tiny VQ is 32 px only; "pad", the plain path's fit
    collator.views = ViewSpec(384, 384, "resize", 4, adapter.background_color, target_fit="pad")
    values = [REAL_FORMATS[fmt](photo) for fmt in sorted(REAL_FORMATS)]
    batch = collator([{"image": value, INDEX_KEY: i} for i, value in enumerate(values)])
    plain = [_plain_views(collator.views, value) for value in values]
    for key, position, (mean, std) in (
        ("condition_pixel_values", 0, adapter._pixel_stats()),
        ("target_pixel_values", 1, ([0.5] * 3, [0.5] * 3)),
    ):
        array = np.stack([np.asarray(views[position], dtype=np.float32) for views in plain]) / 255.0
        reference = torch.from_numpy((array - np.float32(mean)) / np.float32(std)).permute(0, 3, 1, 2)
        levels = ((batch[key] - reference) * torch.tensor(std).view(1, 3, 1, 1) * 255).abs()
        assert batch[key].shape == reference.shape
        assert levels.mean() <= DRAFT_MEAN and torch.quantile(levels.flatten()[::7], 0.999) <= DRAFT_P999


def test_to_tensor_matches_the_numpy_formula():
    images = [_photo((40, 40), seed) for seed in range(3)]
    mean, std = [0.48, 0.45, 0.40], [0.27, 0.26, 0.28]
    array = (np.stack([np.asarray(i, dtype=np.float32) for i in images]) / 255.0 - np.float32(mean)) / np.float32(std)
    expected = torch.from_numpy(array).permute(0, 3, 1, 2)
    result = to_tensor(images, mean, std)
    assert result.is_contiguous() and result.dtype == torch.float32
    torch.testing.assert_close(result, expected, atol=1e-5, rtol=0)


def test_jpeg_draft_decodes_at_a_reduced_scale():
    value = _encode(_photo(), "JPEG")
    assert load_image(value).size == (1024, 1024)
    assert load_image(value, draft=384).size == (512, 512)  # 1/2 is the smallest DCT scale >= 384
    assert load_image(value, draft=100).size == (128, 128)


def test_decompression_bomb_is_refused_before_decoding(tmp_path):
    bomb = tmp_path / "bomb.png"
    Image.new("1", (20000, 20000)).save(bomb)  # 400 Mpx in a few kB
    with pytest.raises(BadImageError, match=r"20000x20000 = 400000000 pixels is over max_image_pixels") as caught:
        load_image(str(bomb))
    assert caught.value.file == str(bomb)
    assert load_image(_encode(Image.new("RGB", (30, 20)), "PNG"), max_pixels=600).size == (30, 20)
    with pytest.raises(BadImageError, match="max_image_pixels=599"):
        load_image(_encode(Image.new("RGB", (30, 20)), "PNG"), max_pixels=599)


@pytest.fixture
def adapter():
    model, processor = tiny_umm("janus")
    return get_adapter(model, processor)


_COLOURS = ("red", "green", "blue", "yellow", "purple", "orange")


def _captioned(n: int, bad: dict[int, bytes] | None = None):
    """``n`` PNG rows captioned "a <colour> circle" (colour ``i`` of six); rows in ``bad`` hold those bytes instead."""
    images = [
        {"bytes": (bad or {}).get(i) or _encode(_photo((40, 40), i), "PNG")["bytes"], "path": None} for i in range(n)
    ]
    features = datasets.Features({"image": datasets.Image(decode=False), "caption": datasets.Value("string")})
    return datasets.Dataset.from_dict(
        {"image": images, "caption": [f"a {_COLOURS[i % 6]} circle" for i in range(n)]}, features
    )


def _truncated_jpeg() -> bytes:
    return _encode(_photo((64, 64)), "JPEG")["bytes"][:300]


def test_a_bad_row_in_a_task_mix_names_its_dataset_and_original_row(adapter):
    """With image-to-text mixed in, slot indices differ from rows: the error names train row 8, not the slot."""
    train = as_source(_captioned(12, bad={8: _truncated_jpeg()}), "train", "image")
    i2t = as_source(_captioned(12), "i2t", "image")
    mix = MixedTaskDataset({RECONSTRUCTION: train, IMAGE_TO_TEXT: i2t}, {RECONSTRUCTION: 1.0, IMAGE_TO_TEXT: 1.0})
    collator = RecACollator(adapter)
    slots = [i for i in range(len(mix)) if mix.task_of(i) == RECONSTRUCTION and mix.row_of(i) == 8]
    assert slots and slots[0] != 8
    with pytest.raises(BadImageError, match=r"^train dataset row 8: column 'image' could not be decoded .*OSError"):
        collator([mix[slots[0]]])


def test_a_bad_file_is_named(adapter, tmp_path):
    (tmp_path / "good.png").write_bytes(_encode(_photo((40, 40)), "PNG")["bytes"])
    (tmp_path / "broken.jpg").write_bytes(_truncated_jpeg())
    dataset = as_source(load_image_dataset(str(tmp_path)), "eval", "image")
    rows = [dataset[i] for i in range(len(dataset))]
    bad = next(i for i, row in enumerate(rows) if row["image"]["path"].endswith("broken.jpg"))
    with pytest.raises(BadImageError, match=rf"eval dataset row {bad}: column 'image' \(file .*broken.jpg\)") as caught:
        RecACollator(adapter)(rows)
    assert caught.value.file.endswith("broken.jpg")
    problems = find_bad_images(load_image_dataset(str(tmp_path)))
    assert len(problems) == 1 and problems[0].startswith(f"row {bad} (file {tmp_path / 'broken.jpg'}): OSError")


def test_skip_replaces_bad_rows_keeping_the_batch_whole_and_aligned(adapter, caplog):
    train = as_source(_captioned(6, bad={2: b"not an image", 3: _truncated_jpeg()}), "train", "image")
    i2t = as_source(_captioned(6, bad={5: b"junk"}), "i2t", "image")
    collator = RecACollator(adapter, bad_image_policy="skip", cond_dropout_prob=0.0)
    collator.add_sources({"train": train, "i2t": i2t})
    rows = [{**train[i], INDEX_KEY: 10 + i} for i in (1, 2)] + [{**i2t[5], INDEX_KEY: 20, TASK_KEY: IMAGE_TO_TEXT}]
    batch = collator(rows)
    assert batch["condition_pixel_values"].shape[0] == 2 and batch["dataset_index"].tolist() == [11, 12]
    # Slot 12 (row 2, bad) holds a good row drawn from the others, with slot 12's own instruction.
    candidates = [collator([{**train[i], INDEX_KEY: 12}]) for i in (0, 1, 4, 5)]
    matches = [c for c in candidates if torch.equal(c["condition_pixel_values"][0], batch["condition_pixel_values"][1])]
    assert len(matches) == 1 and matches[0]["instructions"] == batch["instructions"][1:]
    assert torch.equal(collator(rows)["condition_pixel_values"], batch["condition_pixel_values"])  # reproducible
    i2t_batch = batch[IMAGE_TO_TEXT]
    assert i2t_batch["condition_pixel_values"].shape[0] == 1 and i2t_batch["dataset_index"].tolist() == [20]
    answer = adapter._tokenizer().decode(i2t_batch["input_ids"][0][i2t_batch["labels"][0] != -100])
    colours = {_COLOURS[i % 6] for i in range(5)}  # i2t row 5 is bad: the replacement's own caption comes with it
    assert any(answer.startswith(f"a {colour} circle") for colour in colours)
    assert collator.skipped_rows["i2t"] == 1 and collator.skipped_rows["train"] in (1, 2)
    assert "train dataset row 2" in caplog.text and "i2t dataset row 5" in caplog.text


def test_bad_rows_are_counted_once_and_replaced_by_rows_drawn_from_all_good_ones(adapter):
    """7 bad files drawn 25 times each count as 7 bad rows; their replacements spread over the good rows instead
    of all going to the row after them (which then trained several times as often as the others)."""
    bad = {i: b"junk" for i in range(10, 17)}
    train = as_source(_captioned(40, bad=bad), "train", "image")
    collator = RecACollator(adapter, bad_image_policy="skip", cond_dropout_prob=0.0)
    collator.add_sources({"train": train})
    picked = []
    original = collator._replacement

    def recording(row, error, attempt):
        replacement = original(row, error, attempt)
        picked.append(replacement["__reca_row__"])
        return replacement

    collator._replacement = recording
    for epoch in range(25):
        collator.epoch = epoch
        collator([{**train[i], INDEX_KEY: i} for i in bad])
    assert dict(collator.skipped_rows) == {"train": 7}
    good = [row for row in picked if row not in bad]
    assert len(good) == 25 * 7 and 17 in good
    assert good.count(17) < 0.1 * len(good) and len(set(good)) > 20  # about 1/33 each, not all on row 17


def test_skip_without_a_source_says_how_to_register_one(adapter):
    collator = RecACollator(adapter, bad_image_policy="skip")
    with pytest.raises(BadImageError, match="add_sources"):
        collator([{"image": {"bytes": b"junk", "path": None}}])
    with pytest.raises(ValueError, match="bad_image_policy='drop'"):
        RecACollator(adapter, bad_image_policy="drop")


def test_undecoded_casts_image_columns_only(shapes):
    cast = undecoded(shapes, "image")
    assert cast.features["image"].decode is False and set(cast[0]["image"]) == {"bytes", "path"}
    assert load_image(cast[0]["image"]).size == (32, 32)
    strings = datasets.Dataset.from_dict({"image": ["a.png"]})
    assert undecoded(strings, "image") is strings


def test_image_folder_listing_is_cached_by_the_folders_state(tmp_path, monkeypatch):
    monkeypatch.setattr(datasets.config, "HF_DATASETS_CACHE", str(tmp_path / "cache"))
    monkeypatch.setattr(data_module, "_FOLDER_CACHE", {})
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(3):
        _photo((16, 16), i).save(folder / f"{i}.png")
    scans = []
    real = datasets.load_dataset
    monkeypatch.setattr(datasets, "load_dataset", lambda *a, **k: scans.append(a) or real(*a, **k))
    assert len(image_folder(folder)) == 3 and len(scans) == 1
    monkeypatch.setattr(data_module, "_FOLDER_CACHE", {})  # a new process: the saved listing is read back
    assert len(load_image_dataset(str(folder))) == 3 and len(scans) == 1
    _photo((16, 16), 9).save(folder / "9.png")
    assert len(image_folder(folder)) == 4 and len(scans) == 2  # the folder changed: listed again


def test_folders_are_checked_at_load(tmp_path):
    with pytest.raises(ValueError, match="empty folder"):
        load_image_dataset(str(tmp_path))
    with pytest.raises(FileNotFoundError, match="no such folder"):
        load_image_dataset(str(tmp_path / "missing"))
    (tmp_path / "notes.txt").write_text("x")
    with pytest.raises(ValueError, match="has no image files"):
        image_folder(tmp_path)


def _decoding_dataset(n: int, bad: dict[int, bytes]):
    """Like ``_captioned`` but with a decoding ``Image()`` column, as user datasets have: datasets would
    decode (and crash on) a bad row itself unless the trainer casts it to ``decode=False``."""
    return _captioned(n, bad).cast_column("image", datasets.Image())


def test_trainer_names_the_original_row_of_a_bad_image_with_image_to_text_mixed_in(make_args, tiny_janus):
    from reca_hf import RecATrainer

    model, processor = tiny_janus
    train, i2t = _decoding_dataset(12, {8: _truncated_jpeg()}), _decoding_dataset(12, {})
    args = make_args(max_steps=6, collapse_action="off")  # 6 x 4 = the whole 24-slot epoch
    trainer = RecATrainer(model, args=args, train_dataset=train, i2t_dataset=i2t, processing_class=processor)
    with pytest.raises(BadImageError, match=r"^train dataset row 8: column 'image' could not be decoded"):
        trainer.train()


def test_trainer_skips_bad_images_when_told(make_args, tiny_janus):
    from reca_hf import RecATrainer

    model, processor = tiny_janus
    train = _decoding_dataset(12, {8: _truncated_jpeg(), 3: b"junk"})
    args = make_args(max_steps=3, collapse_action="off", bad_image_policy="skip", require_understanding_data=False)
    trainer = RecATrainer(model, args=args, train_dataset=train, processing_class=processor)
    trainer.train()
    assert trainer.data_collator.skipped_rows == {"train": 2}
    assert trainer.task_counts[RECONSTRUCTION] == 12  # every batch whole


def test_skips_counted_in_dataloader_workers_reach_the_trainer_the_log_and_the_card(make_args, tiny_janus, caplog):
    from reca_hf import RecATrainer

    model, processor = tiny_janus
    train = _decoding_dataset(12, {8: _truncated_jpeg(), 3: b"junk"})
    args = make_args(max_steps=3, collapse_action="off", bad_image_policy="skip", require_understanding_data=False,
                     dataloader_num_workers=1)  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=train, processing_class=processor)
    trainer.train()
    assert trainer.data_collator.skipped_rows == {}  # the worker's copy counted them, not this one
    assert trainer.skipped_rows == {"train": 2}
    assert "2 bad image(s) were skipped and replaced in this run (train 2)" in caplog.text
    trainer.save_model()
    run = json.loads((Path(args.output_dir) / "reca_run.json").read_text())
    assert run["skipped_rows"] == {"train": 2} and run["settings"]["bad images skipped"] == "train 2"
    assert "train 2" in (Path(args.output_dir) / "README.md").read_text()
