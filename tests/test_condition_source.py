"""Where a condition comes from: the source image through PIL, or the target view's tensor by a named interpolation.

The view setting (``condition_source``, ``condition_interpolation``; ``auto`` is the adapter's class attribute), the
views it makes, every adapter's ``prepare`` on them, and what knows which was used: the collator, the grid, the probe,
the frozen-feature cache key, the run record, ``reca validate``.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reca_hf import RecACollator, RecATrainer
from reca_hf.adapters import LossNoise, UMMAdapter, get_adapter, registered_adapters, tiny_builders
from reca_hf.callbacks import ReconstructionGridCallback, condition_swap_loss
from reca_hf.cli import validate
from reca_hf.frozen_cache import cache_components, cache_key
from reca_hf.images import INTERPOLATIONS, ViewSpec, resolve_views, to_tensor, view_image, view_size
from reca_hf.testing import tiny_umm


def _picture(width: int = 40, height: int = 30, seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (height, width, 3), dtype=np.uint8))


def _unit(image: Image.Image) -> torch.Tensor:
    return to_tensor([image], (0.0,) * 3, (1.0,) * 3)


def test_a_target_condition_is_the_target_tensor_bilinear_without_antialias_in_float():
    views = ViewSpec(16, 32, condition_source="target")
    assert views.condition_interpolation == "bilinear"
    condition, target = views.views(_picture())
    assert target.size == (32, 32) and condition.shape == (3, 16, 16) and condition.dtype == torch.float32
    expected = F.interpolate(_unit(target), size=(16, 16), mode="bilinear", align_corners=False, antialias=False)[0]
    assert torch.equal(condition, expected)
    assert not torch.equal(condition, (condition * 255).round() / 255)  # not re-quantised to 8 bit
    # Resizing commutes with the per-channel normalisation: the authors' order (normalise, then resize) agrees.
    authors = F.interpolate(_unit(target) * 2 - 1, size=(16, 16), mode="bilinear")[0]
    torch.testing.assert_close(to_tensor([condition], (0.5,) * 3, (0.5,) * 3)[0], authors, rtol=0, atol=1e-6)
    # The source image through PIL (the default source) is a different picture.
    pil_condition, pil_target = ViewSpec(16, 32).views(_picture())
    assert pil_target.tobytes() == target.tobytes() and isinstance(pil_condition, Image.Image)
    assert (_unit(pil_condition)[0] - condition).abs().max() > 0.05


@pytest.mark.parametrize("interpolation", INTERPOLATIONS)
def test_each_interpolation_is_torchs(interpolation):
    condition, target = ViewSpec(12, 32, condition_source="target", condition_interpolation=interpolation).views(
        _picture(seed=1)
    )
    mode, _, antialias = interpolation.partition("_")
    corners = {"align_corners": False} if mode in ("bilinear", "bicubic") else {}
    expected = F.interpolate(_unit(target), size=(12, 12), mode=mode, antialias=bool(antialias), **corners)[0]
    assert torch.equal(condition, expected)


def test_at_the_generation_resolution_the_condition_is_the_target_and_blur_goes_down_and_up_from_it():
    """Harmon's condition is the target tensor itself; Show-o's blur is 512 -> 64 -> 512 of the target tensor."""
    condition, target = ViewSpec(32, 32, "none", condition_source="target").views(_picture())
    assert torch.equal(condition, _unit(target)[0])
    blurred, target = ViewSpec(32, 32, "blur", blur_factor=8, condition_source="target").views(_picture())
    small = F.interpolate(_unit(target), size=(4, 4), mode="bilinear", align_corners=False)
    assert torch.equal(blurred, F.interpolate(small, size=(32, 32), mode="bilinear", align_corners=False)[0])
    assert isinstance(ViewSpec(32, 32, "blur", blur_factor=8).condition_view(_picture()), Image.Image)


def test_views_refuse_what_they_cannot_do():
    with pytest.raises(ValueError, match="condition_source='copy': choose one of image, target"):
        ViewSpec(16, 32, condition_source="copy")
    with pytest.raises(ValueError, match="condition_interpolation='lanczos': choose one of bilinear"):
        ViewSpec(16, 32, condition_source="target", condition_interpolation="lanczos")
    with pytest.raises(
        ValueError, match="condition_interpolation='bicubic' resamples a condition made from the target"
    ):
        ViewSpec(16, 32, condition_interpolation="bicubic")


def test_auto_is_the_adapters_class_attribute_and_a_user_can_override_it():
    classes = registered_adapters()
    assert (classes["openuni"].condition_source, classes["openuni"].condition_interpolation) == ("target", "bilinear")
    assert classes["janus"].condition_source == classes["emu3"].condition_source == "image"
    janus = get_adapter(*tiny_umm("janus"))
    assert (janus.default_views().condition_source, janus.default_views().condition_interpolation) == ("image", None)
    views = resolve_views(janus, condition_source="target", condition_interpolation="area")
    assert (views.condition_source, views.condition_interpolation) == ("target", "area")
    assert resolve_views(janus, condition_source="target").condition_interpolation == "bilinear"
    with pytest.raises(ValueError, match="condition_interpolation='area' resamples"):
        resolve_views(janus, condition_interpolation="area")  # auto: Janus' 'image'
    with pytest.raises(TypeError, match="condition_source must be one of image, target"):
        type("Bad", (type(janus),), {"condition_source": "pixels"})
    with pytest.raises(TypeError, match="condition_interpolation must be one of bilinear"):
        type("Bad", (type(janus),), {"condition_interpolation": "linear"})


@pytest.mark.parametrize("arch", sorted(tiny_builders()))
def test_every_adapter_prepares_a_target_condition(arch, shapes):
    """Whatever an adapter defaults to, its prepare() takes the views of either source, and its loss runs."""
    model, processor = tiny_umm(arch)
    adapter = get_adapter(model, processor)
    rows = [shapes[i] for i in range(2)]
    for source in ("image", "target"):
        collator = RecACollator(adapter, condition_source=source, cond_dropout_prob=0.0)
        batch = {k: v for k, v in collator(rows).items() if k != "instructions"}  # tensors, and lists of views
        with torch.no_grad():
            assert torch.isfinite(adapter.loss(model, batch, noise=LossNoise(seed=0, timesteps=(0.5,))))
        condition = collator.views.condition_view(shapes[0]["image"])
        assert view_size(condition) == (collator.views.condition_resolution,) * 2
        assert isinstance(condition, torch.Tensor) == (source == "target")


def test_the_grid_the_probe_the_cache_key_and_the_run_record_know_the_source(make_args, shapes):
    model, processor = tiny_umm("flow")
    adapter = get_adapter(model, processor)
    images = [shapes[i]["image"] for i in range(3)]
    by_source = {s: resolve_views(adapter, 16, condition_source=s) for s in ("image", "target")}
    # the grid shows the condition the model reads, as a picture
    grid = ReconstructionGridCallback(adapter, by_source["target"], images[:2])
    column = grid._columns(model)["condition"]
    assert all(isinstance(image, Image.Image) and image.size == (16, 16) for image in column)
    assert view_image(by_source["target"].condition_view(images[0])).tobytes() == column[0].tobytes()
    # the probe reads the conditions of its views
    noise = LossNoise(seed=0, timesteps=(0.5,))
    probes = {s: condition_swap_loss(adapter, model, images, views, noise) for s, views in by_source.items()}
    assert probes["image"]["swap_own_loss"] != probes["target"]["swap_own_loss"]
    # a cached feature of one source is never read for the other
    openuni, openuni_processor = tiny_umm("openuni")
    cached = get_adapter(openuni, openuni_processor)
    keys = {
        source: cache_key(
            cache_components(cached, openuni, resolve_views(cached, condition_source=source), shapes,
                             ["condition_features"], image_column="image", precision="fp32", max_image_pixels=1)
        )
        for source in ("image", "target")
    }  # fmt: skip
    assert keys["image"] != keys["target"]
    # the run record and the card's settings
    trainer = RecATrainer(
        model, args=make_args(max_steps=1, condition_source="target", condition_interpolation="bicubic"),
        train_dataset=shapes, processing_class=processor,
    )  # fmt: skip
    record = trainer.run_record()
    assert (record["reca"]["condition_source"], record["reca"]["condition_interpolation"]) == ("target", "bicubic")
    assert record["settings"]["condition source"] == "the target tensor, bicubic without antialias"
    assert trainer.data_collator.views.condition_interpolation == "bicubic"


def test_the_config_and_reca_validate_name_the_fields(make_args):
    with pytest.raises(ValueError, match="condition_source='pixels'"):
        make_args(condition_source="pixels")
    with pytest.raises(ValueError, match="condition_interpolation='linear'"):
        make_args(condition_interpolation="linear")
    with pytest.raises(
        ValueError, match="condition_interpolation='bicubic' resamples a condition made from the target"
    ):
        make_args(condition_source="image", condition_interpolation="bicubic")
    recipe = "recipes/janus/tiny_demo.yaml"
    assert validate(recipe, overrides=["--condition_source", "target", "--condition_interpolation", "area"]) == []
    errors = validate(recipe, overrides=["--condition_interpolation", "area"])
    assert len(errors) == 1 and "condition_source 'auto' is the janus adapter's 'image'" in errors[0]


def test_the_base_class_default_is_the_image():
    assert (UMMAdapter.condition_source, UMMAdapter.condition_interpolation) == ("image", "bilinear")
