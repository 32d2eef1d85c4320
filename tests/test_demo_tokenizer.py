"""The demo's image tokenizer: trained on synthetic shapes (scripts/train_demo_tokenizer.py), shipped in the
package, and what ``tiny:janus_demo`` decodes with; ``tiny:janus`` (``tiny_umm("janus")``) stays random."""

from __future__ import annotations

import numpy as np
import torch

from reca_hf.adapters import get_adapter
from reca_hf.data import synthetic_shapes
from reca_hf.loading import load_model_and_processor
from reca_hf.testing import DEMO_JANUS, DEMO_VQ_WEIGHTS, tiny_demo_umm, tiny_janus_from_config, tiny_umm

# Measured: a mean absolute error of 10.3 (0-255 units) on 256 held-out shapes (benchmarks/results/
# demo_tokenizer.json) and 9.6 on this test's eight; the same VQ untrained is off by 76 and 75. The bound
# leaves a margin for other CPUs and libraries.
ROUND_TRIP_BOUND = 14.0


def _round_trip_error(model, processor, images) -> float:
    """Mean absolute pixel error (0-255) of the adapter's tokenizer round trip against the target views."""
    adapter = get_adapter(model, processor)
    views = adapter.default_views()
    targets = [views.target_view(image) for image in images]
    decoded = adapter.round_trip(images, model=model, views=views)
    return float(
        np.mean(
            [np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32)).mean() for a, b in zip(targets, decoded)]
        )
    )


def test_the_demo_tokenizer_round_trips_a_synthetic_shape_close_to_the_input():
    images = [image.convert("RGB") for image in synthetic_shapes(8, seed=2026)["image"]]  # not its training shapes
    demo = load_model_and_processor("tiny:janus_demo")
    trained = _round_trip_error(*demo, images)
    untrained = _round_trip_error(*tiny_janus_from_config(0, **DEMO_JANUS), images)
    assert trained < ROUND_TRIP_BOUND, trained
    assert trained < untrained / 3, (trained, untrained)


def test_the_weights_ship_small_and_the_tests_model_stays_random():
    assert DEMO_VQ_WEIGHTS.is_file() and DEMO_VQ_WEIGHTS.stat().st_size < 5_000_000  # a few MB
    model, _ = load_model_and_processor("tiny:janus_demo")
    assert model.config.vq_config.num_embeddings == DEMO_JANUS["num_embeddings"]
    assert model.config.vision_config.num_image_tokens == 64  # an 8x8 grid each way
    demo, _ = tiny_demo_umm("janus")
    assert torch.equal(demo.model.vqmodel.quantize.embedding.weight, model.model.vqmodel.quantize.embedding.weight)
    random_model, processor = tiny_umm("janus")
    assert random_model.config.vq_config.num_embeddings == 64 and processor.num_image_tokens == 16


def test_one_name_is_one_model_from_a_recipe_and_from_python():
    for name in ("janus", "janus_demo", "flow"):
        from_recipe, _ = load_model_and_processor(f"tiny:{name}")
        from_python, _ = tiny_umm(name)
        assert from_recipe.config.to_dict() == from_python.config.to_dict(), name
        assert all(
            torch.equal(a, b) for a, b in zip(from_recipe.state_dict().values(), from_python.state_dict().values())
        )
