"""The harmon adapter's per-sample loss from raw images (views + prepare + loss) against the authors' data path.

Golden values: `tests/golden/harmon_adapter_loss.json`, from the authors' MidjourneyReconstructionDataset,
collate_func_gen and HarmonDev.recon_loss with the adapter's draws injected (the harness and the command are in
its `_note`). On the authors' pixels the adapter's losses equal theirs to float32 rounding; from raw images the two
non-square ones differ by about 1.6e-5 relative, because reca_hf stretches in one bicubic resize and the authors
in two.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from reca_hf.adapters import LossNoise, get_adapter
from reca_hf.testing import tiny_umm

GOLDEN = json.loads((Path(__file__).parent / "golden" / "harmon_adapter_loss.json").read_text())


def raw_images() -> list[Image.Image]:
    """Three smooth random RGB images of different aspects (96x56, 40x72, 64x64)."""
    rng = np.random.default_rng(0)
    images = []
    for width, height in ((96, 56), (40, 72), (64, 64)):
        small = rng.integers(0, 256, (height // 8, width // 8, 3), dtype=np.uint8)
        images.append(Image.fromarray(small).resize((width, height), Image.Resampling.BILINEAR))
    return images


def test_the_adapter_loss_from_raw_images_is_the_authors():
    model, tokenizer = tiny_umm("harmon")
    model.eval()
    adapter = get_adapter(model, tokenizer)
    views = adapter.default_views()
    conditions, targets = zip(*(views.views(image) for image in raw_images()))
    instructions = ["Describe the image in detail.", "What is in the picture?", adapter.null_prompt]
    batch = adapter.prepare(list(conditions), list(targets), instructions, dropped=[False, False, True])
    slots = adapter.image_slots(64, 64)
    for row, mask, theirs in zip(batch["input_ids"], batch["attention_mask"], GOLDEN["authors_input_ids"]):
        at = theirs.index(-200)  # their one image token, where the adapter writes the slots
        assert row[mask.bool()].tolist() == theirs[:at] + [model.config.image_token_id] * slots + theirs[at + 1 :]
    with torch.no_grad():
        per_sample = adapter.loss(model, batch, reduction="none", noise=LossNoise(seed=11))
    assert torch.allclose(per_sample, torch.tensor(GOLDEN["adapter_per_sample"]), rtol=0, atol=1e-6)
    rtol = GOLDEN["tolerances"]["raw_images_rtol"]
    assert torch.allclose(per_sample, torch.tensor(GOLDEN["authors_per_sample"]), rtol=rtol, atol=0)
    # on the authors' pixels (measured by the harness) the two agree to float32 rounding
    on_theirs = torch.tensor(GOLDEN["adapter_per_sample_on_their_pixels"])
    pixels_rtol = GOLDEN["tolerances"]["on_their_pixels_rtol"]
    assert torch.allclose(on_theirs, torch.tensor(GOLDEN["authors_per_sample"]), rtol=pixels_rtol, atol=0)
