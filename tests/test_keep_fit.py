"""The ``keep`` fit: each image keeps its aspect ratio inside its view's bounds (BAGEL's sizes), the views of one
batch differ in size, and adapters that stack their views refuse it."""

import json
from pathlib import Path

import pytest
import torch
from PIL import Image

from reca_hf.adapters import get_adapter
from reca_hf.callbacks import image_grid
from reca_hf.collator import RecACollator
from reca_hf.images import KeepBounds, ViewSpec, keep_size
from reca_hf.testing import tiny_umm

# BAGEL's authors' transforms (data/configs/example.yaml, data/transforms.py): the VAE target at long side <= 1024,
# short side >= 512, multiples of 16; the ViT condition at max = min = 224, multiples of 14; both at most
# 14 * 14 * 9 * 1024 pixels.
AUTHORS_PIXELS = 14 * 14 * 9 * 1024
TARGET = KeepBounds(multiple=16, min_short=0.5, max_pixels=AUTHORS_PIXELS)
CONDITION = KeepBounds(multiple=14, min_short=1.0, max_pixels=AUTHORS_PIXELS)

# Worked by hand from their rule (scale = max(min(max / long, 1), min / short); round each side, then to the stride
# with Python's round; the pixel cap; the long-side cap), e.g. 3000x1000: scale max(0.341, 0.512) -> 1536x512 ->
# over 1024: x 2/3 -> 1024 x 341.3 -> 1024 x 336.
TARGET_SIZES = [
    ((800, 600), (800, 608)),  # no scaling; 600 / 16 = 37.5 rounds to 38
    ((4000, 3000), (1024, 768)),  # the long side to 1024
    ((3000, 1000), (1024, 336)),  # the short side to 512 first, then the long side back to 1024
    ((300, 200), (768, 512)),  # small: up until the short side is 512
    ((7000, 1000), (1024, 144)),  # 3584x512 is over the pixel cap: x 63/64 -> 3520x512, then to 1024 x 148.9 -> 144
    ((1024, 1024), (1024, 1024)),
]
CONDITION_SIZES = [
    ((800, 600), (224, 168)),  # short side to 224 (299x224 -> 294x224), then the long side to 224: 224 x 171 -> 168
    ((600, 900), (154, 224)),
    ((500, 500), (224, 224)),
    ((96, 64), (224, 154)),  # up: 336x224, then 224 x 149.3 -> 154
]


@pytest.mark.parametrize(("source", "expected"), TARGET_SIZES)
def test_target_sizes_are_the_authors(source, expected):
    assert keep_size(*source, 1024, TARGET) == expected


@pytest.mark.parametrize(("source", "expected"), CONDITION_SIZES)
def test_condition_sizes_are_the_authors(source, expected):
    assert keep_size(*source, 224, CONDITION) == expected


def test_the_documented_small_example_of_the_vit_rule():
    # architectures.md 3.6: at a 56-px setting a 96x64 image becomes 56x42
    assert keep_size(96, 64, 56, KeepBounds(multiple=14, min_short=1.0)) == (56, 42)


def _views(**fields) -> ViewSpec:
    values = dict(condition_resolution=56, generation_resolution=64, target_fit="keep", condition_fit="keep",
                  target_keep=KeepBounds(16, 0.5), condition_keep=KeepBounds(14, 1.0))  # fmt: skip
    return ViewSpec(**(values | fields))


def test_views_keep_the_aspect_and_are_resized_once_from_the_source():
    image = Image.effect_noise((150, 100), 60).convert("RGB")
    condition, target = _views().views(image)
    assert target.size == keep_size(150, 100, 64, KeepBounds(16, 0.5)) == (64, 48)
    assert condition.size == (56, 42)
    assert condition.tobytes() == image.resize((56, 42), Image.Resampling.BICUBIC).tobytes()
    blurred, _ = _views(bottleneck="blur").views(image)
    assert blurred.size == (56, 42)
    assert _views().square(image, 64).size == (64, 48)


def test_a_keep_condition_from_the_target_tensor_keeps_its_aspect():
    image = Image.effect_noise((150, 100), 60).convert("RGB")
    condition, target = _views(condition_source="target", condition_interpolation="bilinear").views(image)
    assert isinstance(condition, torch.Tensor) and condition.shape == (3, 42, 56) and target.size == (64, 48)


def test_a_keep_target_with_a_square_condition_and_the_other_way():
    image = Image.effect_noise((150, 100), 60).convert("RGB")
    condition, target = _views(condition_fit="pad").views(image)
    assert condition.size == (56, 56) and target.size == (64, 48)
    condition, target = _views(target_fit="stretch").views(image)
    assert condition.size == (56, 42) and target.size == (64, 64)
    condition, target = _views(target_fit="center_crop").views(image)  # a cropping target cuts both from its square
    assert condition.size == (56, 56) and target.size == (64, 64)


@pytest.mark.parametrize("field", ["target_fit", "condition_fit"])
def test_an_adapter_that_stacks_its_views_refuses_keep_naming_the_field(field):
    model, processor = tiny_umm("janus")
    with pytest.raises(ValueError, match=f"{field}='keep': the janus architecture adapter batches views of one size"):
        RecACollator(get_adapter(model, processor), **{field: "keep"})


def test_the_grid_letterboxes_images_that_are_not_square():
    wide = Image.new("RGB", (40, 20), (255, 0, 0))
    grid = image_grid({"a": [wide]}, cell=20)
    assert grid.size == (20, 34)
    assert grid.getpixel((10, 14 + 2)) == (255, 255, 255)  # above the letterboxed image: the white background
    assert grid.getpixel((10, 14 + 10)) == (255, 0, 0)


KEEP_GOLDEN = json.loads((Path(__file__).parent / "golden" / "bagel_keep_sizes.json").read_text())


def test_keep_sizes_are_the_authors_code():
    """The sizes their own transform class gives (golden note), through each BAGEL adapter's bounds: the real
    configuration's (VAE target 1024, ViT 224) and the tiny model's (32, 112)."""
    from reca_hf.models.bagel import BagelConfig
    from reca_hf.models.bagel.adapter import BagelAdapter

    real = BagelAdapter(BagelConfig())
    tiny = get_adapter(*tiny_umm("bagel"))
    cases = {"vae_1024": (1024, real.target_keep), "vit_224": (224, real.condition_keep),
             "tiny_vae_32": (32, tiny.target_keep), "tiny_vit_112": (112, tiny.condition_keep)}  # fmt: skip
    for name, (resolution, bounds) in cases.items():
        for width, height, *expected in KEEP_GOLDEN[name]:
            assert keep_size(width, height, resolution, bounds) == tuple(expected), (name, width, height)


def test_reca_validate_names_a_keep_fit_the_adapter_cannot_take(tmp_path):
    from reca_hf.cli import validate

    recipe = tmp_path / "keep.yaml"
    recipe.write_text("model_name_or_path: tiny:janus\ndataset_name: synthetic_shapes\ncondition_fit: keep\n")
    assert [e for e in validate(str(recipe)) if "keep" in e] == [
        "condition_fit='keep': the janus architecture adapter batches views of one size (its prepare stacks them), "
        "and 'keep' gives every image its own size; choose 'center_crop', 'random_crop', 'pad' or 'stretch' (or leave "
        "it 'auto')."
    ]
    recipe.write_text("model_name_or_path: tiny:bagel\ndataset_name: synthetic_shapes\n")
    assert validate(str(recipe)) == []
