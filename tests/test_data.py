"""`load_image_dataset`: every source it reads (synthetic, save_to_disk, a DatasetDict, an image folder, a local
dataset repo through `load_dataset`) and every error it names."""

import datasets
import pytest
from PIL import Image

from reca_hf.data import SYNTHETIC, load_image_dataset, synthetic_shapes


def _pixels(dataset):
    return [dataset[i]["image"].convert("RGB").getpixel((16, 16)) for i in range(len(dataset))]


def test_synthetic_shapes_count_seed_and_size():
    dataset = load_image_dataset(SYNTHETIC, max_samples=5, seed=3)
    assert len(dataset) == 5 and dataset.column_names == ["image", "caption"]
    assert _pixels(dataset) == _pixels(load_image_dataset(SYNTHETIC, max_samples=5, seed=3))
    assert _pixels(dataset) != _pixels(load_image_dataset(SYNTHETIC, max_samples=5, seed=4))


def test_save_to_disk_folder_and_dataset_dict_split(tmp_path):
    shapes = synthetic_shapes(6, size=32, seed=1)
    shapes.save_to_disk(str(tmp_path / "flat"))
    loaded = load_image_dataset(str(tmp_path / "flat"), max_samples=4)
    assert len(loaded) == 4 and _pixels(loaded) == _pixels(shapes)[:4]
    datasets.DatasetDict({"train": shapes, "test": shapes.select([5])}).save_to_disk(str(tmp_path / "dict"))
    test_split = load_image_dataset(str(tmp_path / "dict"), split="test")
    assert len(test_split) == 1 and _pixels(test_split) == _pixels(shapes)[5:]


def test_a_folder_of_image_files(tmp_path):
    for i, colour in enumerate([(250, 0, 0), (0, 250, 0), (0, 0, 250)]):
        Image.new("RGB", (32, 32), colour).save(tmp_path / f"{i}.png")
    loaded = load_image_dataset(str(tmp_path))
    assert len(loaded) == 3 and sorted(_pixels(loaded)) == sorted([(250, 0, 0), (0, 250, 0), (0, 0, 250)])


def test_a_dataset_repository_goes_through_load_dataset(tmp_path):
    """A folder with a README (a dataset repo, as a hub id downloads it) is read by `datasets.load_dataset`."""
    repo = tmp_path / "repo"
    repo.mkdir()
    (repo / "README.md").write_text("# shapes\n")
    synthetic_shapes(3, size=32, seed=2).to_parquet(str(repo / "train.parquet"))
    loaded = load_image_dataset(str(repo), text_column="caption")
    assert len(loaded) == 3 and loaded.column_names == ["image", "caption"]
    assert _pixels(loaded) == _pixels(synthetic_shapes(3, size=32, seed=2))


def test_missing_columns_are_named(tmp_path):
    synthetic_shapes(2, size=32).save_to_disk(str(tmp_path / "d"))
    with pytest.raises(ValueError, match=r"image_column='photo'.*\['image', 'caption'\]"):
        load_image_dataset(str(tmp_path / "d"), image_column="photo")
    with pytest.raises(ValueError, match=r"caption_column='text'.*set caption_column"):
        load_image_dataset(str(tmp_path / "d"), text_column="text")
