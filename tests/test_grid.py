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
