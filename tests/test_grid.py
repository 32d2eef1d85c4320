"""The reconstruction grid's cost is bounded (at most 16 images) and reported (seconds per grid, in the card)."""

import pytest

from reca_hf import RecAConfig, RecATrainer
from reca_hf.callbacks import ReconstructionGridCallback
from reca_hf.testing import tiny_umm


def test_the_grid_is_timed_and_the_card_says_how_long(make_args, shapes, tmp_path):
    model, processor = tiny_umm("janus")
    args = make_args(max_steps=1, num_reconstruction_images=2, collapse_action="off",
                     reconstruction_kwargs={"guidance_scale": 1.0})  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    trainer.train()
    (grid,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, ReconstructionGridCallback)]
    assert set(grid.seconds) == {0, 1} and all(s > 0 for s in grid.seconds.values())  # the start and the last step
    assert (tmp_path / "run" / "reconstructions.png").is_file()
    assert trainer.run_settings()["reconstruction grid"].startswith("2 images, 2 grids, ")


def test_the_grid_is_capped(tmp_path, tiny_janus):
    with pytest.raises(ValueError, match=r"num_reconstruction_images=17: use 0 \(no grid\) up to 16"):
        RecAConfig(output_dir=str(tmp_path), num_reconstruction_images=17)
    model, processor = tiny_janus
    from reca_hf.adapters import get_adapter

    adapter = get_adapter(model, processor)
    with pytest.raises(ValueError, match="at most 16"):
        ReconstructionGridCallback(adapter, adapter.default_views(), [None] * 17)


PROMPTS = ["a red circle", "a blue square on the left"]


def test_text_to_image_before_and_after_side_by_side_in_the_folder_and_the_card(make_args, shapes, tmp_path):
    """The prompts' samples of the base model (step 0) and of the trained one (the last step), same seed, in
    text_to_image_before_after.png, which the card shows; a tiny: model's rows say they show noise."""
    from PIL import Image

    from reca_hf.callbacks import LINE_HEIGHT, ROW_LABEL_WIDTH, TEXT_TO_IMAGE_FILE

    model, processor = tiny_umm("janus")
    args = make_args(max_steps=2, collapse_action="off", validation_prompts=PROMPTS, model_name_or_path="tiny:janus",
                     reconstruction_kwargs={"guidance_scale": 1.0, "do_sample": False})  # fmt: skip
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    (grid,) = [c for c in trainer.callback_handler.callbacks if isinstance(c, ReconstructionGridCallback)]
    assert grid.text_caption.startswith("text-to-image of tiny:janus, a tiny model whose language model started random")
    trainer.train()
    trainer.save_model()
    run = tmp_path / "run"
    image = Image.open(run / TEXT_TO_IMAGE_FILE)
    assert image.width == ROW_LABEL_WIDTH + 2 * 96  # prompts | base (step 0) | trained (step 2), one row per prompt
    assert image.height > 14 + 2 * 96 + LINE_HEIGHT  # and the caption under them
    assert [step for step, _ in (grid.start_samples, grid.latest_samples)] == [0, 2]
    # The same cells as the per-step samples of step 0 and step 2 (the same prompts, the same seed).
    for column, step in ((0, 0), (1, 2)):
        samples = Image.open(run / "samples" / f"step-{step}.png").convert("RGB")
        cell = (ROW_LABEL_WIDTH + column * 96, 14, ROW_LABEL_WIDTH + (column + 1) * 96, 14 + 96)
        assert image.convert("RGB").crop(cell).tobytes() == samples.crop((0, 14, 96, 110)).tobytes()
    card = (run / "README.md").read_text()
    assert "## Text to image, before and after" in card and f"({TEXT_TO_IMAGE_FILE})" in card


def test_before_and_after_through_the_sharded_forward_when_training_stops_early(tiny_janus, tmp_path):
    """Under FSDP and DeepSpeed every rank samples through sharded_forward, and only rank 0 writes; a run that stops
    before max_steps gets its before/after grid at on_train_end."""
    from types import SimpleNamespace

    from reca_hf.adapters import get_adapter
    from reca_hf.callbacks import TEXT_TO_IMAGE_FILE

    model, processor = tiny_janus
    adapter = get_adapter(model, processor)
    for rank_zero in (True, False):
        output = tmp_path / f"rank0-{rank_zero}"
        grid = ReconstructionGridCallback(adapter, adapter.default_views(), [], prompts=PROMPTS,
                                          sample_kwargs={"do_sample": False})  # fmt: skip
        calls = []
        grid.sharded_forward = lambda function, calls=calls: calls.append(function) or function(model)
        args = SimpleNamespace(output_dir=str(output))
        grid.on_train_begin(args, SimpleNamespace(global_step=0, max_steps=10, is_world_process_zero=rank_zero), None,
                            model=model)  # fmt: skip
        grid.on_train_end(args, SimpleNamespace(global_step=3, max_steps=10, is_world_process_zero=rank_zero), None,
                          model=model)  # fmt: skip
        assert len(calls) == 2 and grid.before_after_step == 3  # the start's samples and the end's, on every rank
        assert (output / TEXT_TO_IMAGE_FILE).is_file() == rank_zero


def test_a_model_that_cannot_sample_from_text_gets_one_info_line_and_no_before_after(make_args, shapes, caplog):
    from reca_hf.adapters import get_adapter
    from reca_hf.adapters.base import UMMAdapter

    model, processor = tiny_umm("janus")
    adapter = get_adapter(model, processor)
    adapter.__class__ = type("NoSampler", (type(adapter),), {"sample_text_codes": UMMAdapter.sample_text_codes})
    args = make_args(validation_prompts=PROMPTS, num_reconstruction_images=2)
    with caplog.at_level("INFO", logger="reca_hf"):
        grid = ReconstructionGridCallback.for_run(args, adapter, adapter.default_views(), shapes)
    lines = [r for r in caplog.records if "validation_prompts are not sampled" in r.getMessage()]
    assert len(lines) == 1 and lines[0].levelname == "INFO"
    assert "text_to_image_before_after.png" in lines[0].getMessage()
    assert grid.prompts == [] and grid.start_samples is None


def test_a_row_of_one_image_for_every_prompt_says_so():
    from PIL import Image

    from reca_hf.callbacks import SAME_FOR_EVERY_PROMPT, image_grid, same_for_every_prompt, tiny_model_caption

    grey, noisy = Image.new("RGB", (32, 32), (120, 120, 120)), Image.new("RGB", (32, 32), (122, 121, 119))
    red = Image.new("RGB", (32, 32), (200, 30, 30))
    assert same_for_every_prompt([grey, noisy]) and not same_for_every_prompt([grey, red])
    assert not same_for_every_prompt([grey])  # one prompt: nothing to compare
    assert tiny_model_caption("tiny:janus_demo") and tiny_model_caption("deepseek-community/Janus-Pro-1B") is None
    plain = image_grid({"a": [grey], "b": [noisy]})
    captioned = image_grid({"a": [grey], "b": [noisy]}, caption=SAME_FOR_EVERY_PROMPT)
    assert plain.size == (192, 14 + 96) and captioned.width == 192 and captioned.height > plain.height
    assert captioned.crop((0, plain.height, 192, captioned.height)).getextrema() != ((255, 255),) * 3  # text drawn
