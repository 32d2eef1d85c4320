"""The OpenUni architecture adapter on the tiny model: layout, loss, freezing, views, loading, LoRA, recipe.

tests/golden/openuni_adapter_loss.json holds the per-sample losses of the OpenUni authors' own code (f159d60) on
``tiny_openuni(seed=0)``, from raw images and prompts through their data path, with their noise injected (its
``_note`` says how they were made); the adapter must reproduce them from the same raw inputs through ``prepare``
and ``loss`` with its default views. They cannot be regenerated with this repository's code, on purpose.
"""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from reca_hf import RecACollator, RecATrainer
from reca_hf.adapters import LossNoise, OpenUniAdapter, get_adapter
from reca_hf.cli import main as reca
from reca_hf.freeze import apply_freeze, parameter_table
from reca_hf.images import ViewSpec, load_image, resolve_views, view_image
from reca_hf.loading import load_model_and_processor
from reca_hf.lora import prepare_peft_model
from reca_hf.prompts import load_prompts
from reca_hf.testing import tiny_umm

GOLDEN = Path(__file__).parent / "golden" / "openuni_adapter_loss.json"
AUTHORS_GOLDEN = Path(__file__).parent / "golden" / "openuni_flow_loss.json"
NOISE = LossNoise(seed=0, timesteps=(0.25, 0.5, 0.75, 0.9))


@pytest.fixture(scope="module")
def tiny():
    model, processor = tiny_umm("openuni", seed=0)
    return model, processor, get_adapter(model, processor)


def _collated(adapter, shapes, n: int = 4) -> dict[str, torch.Tensor]:
    batch = RecACollator(adapter, cond_dropout_prob=0.0)([shapes[i] for i in range(n)])
    return {k: v for k, v in batch.items() if isinstance(v, torch.Tensor)}


def test_the_prompt_is_the_authors_chat_layout(tiny):
    """The adapter's ids equal the InternVL processor's expansion of the authors' chat template + "<img>"."""
    _, processor, adapter = tiny
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the image"}]}]
    text = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False) + "<img>"
    expected = processor(images=[Image.new("RGB", (40, 40))], text=[text], return_tensors="pt").input_ids
    batch = adapter.prepare([Image.new("RGB", (64, 64))], None, ["describe the image"])
    assert torch.equal(batch["input_ids"], expected)
    assert adapter.default_cond_dropout_prob == 0.0 and adapter.null_prompt == "Generate an image."


def test_the_adapter_loss_is_the_authors_loss_on_the_same_inputs(tiny):
    """Condition = target tensor (the authors' pixel_values_src), their u and noise: their diff_loss value."""
    model, processor, adapter = tiny
    golden = json.loads(AUTHORS_GOLDEN.read_text())
    target = torch.rand(2, 3, 32, 32, generator=torch.Generator().manual_seed(7)) * 2 - 1
    batch = adapter.prepare([Image.new("RGB", (40, 40))] * 2, None, ["describe the image"] * 2)
    batch |= {"condition_pixel_values": target, "target_pixel_values": target}
    indices = (torch.tensor(golden["u"]) * 1000).long()
    sigmas = tuple(model.train_scheduler.sigmas[indices].tolist())
    with torch.no_grad():
        loss = adapter.loss(model, batch, noise=LossNoise(seed=golden["noise_seed"], timesteps=sigmas))
        states = model.encoder_states(
            model.query_states(batch["input_ids"], batch["attention_mask"], model.semantic_features(target))
        )
        noise = torch.randn(target.shape[0], 4, 8, 8, generator=torch.Generator().manual_seed(golden["noise_seed"]))
        own = model.flow_loss(
            model.encode_latents(target), states, noise=noise, timesteps=model.train_scheduler.timesteps[indices]
        )
    assert torch.equal(loss, own)
    assert loss.item() == pytest.approx(golden["authors_diff_loss"], rel=1e-5)


def test_noise_levels_map_onto_the_training_grid(tiny):
    model, _, adapter = tiny
    timesteps = adapter.training_timesteps(model, torch.tensor([1.0, 0.5, 0.0004, 0.9]))
    assert timesteps.tolist() == [1000.0, 500.0, 1.0, 900.0]


def test_fixed_noise_gives_bitwise_equal_losses_and_fresh_noise_does_not(tiny, shapes):
    model, _, adapter = tiny
    batch = _collated(adapter, shapes)
    with torch.no_grad():
        first = adapter.loss(model, batch, reduction="none", noise=NOISE)
        again = adapter.loss(model, batch, reduction="none", noise=NOISE)
        other_seed = adapter.loss(model, batch, reduction="none", noise=LossNoise(seed=1, timesteps=NOISE.timesteps))
        fresh = [adapter.loss(model, batch) for _ in range(2)]
        mean = adapter.loss(model, batch, noise=NOISE)
    assert first.shape == (4,) and torch.equal(first, again)
    assert not torch.equal(first, other_seed) and not torch.equal(*fresh)
    assert torch.allclose(mean, first.mean())


def _raw_image(index: int, width: int, height: int) -> Image.Image:
    """The golden's raw images (arithmetic, the same in the authors' harness)."""
    y, x = np.mgrid[0:height, 0:width].astype(np.int64)
    r = (x * x * (index + 3) + y * 7 + 31 * index) % 256
    g = (x * 5 + y * y * (index + 2) + 17) % 256
    b = ((x + 2 * y) * (index + 1) * 9 + x * y) % 256
    return Image.fromarray(np.stack([r, g, b], -1).astype(np.uint8), "RGB")


def _authors_inputs(adapter, views, golden) -> dict[str, torch.Tensor]:
    """The golden's raw images cut at the authors' crop boxes and prepared with their prompts."""
    prompts = [load_prompts()[line] for line in golden["prompt_lines"]]
    pairs = []
    for index, ((width, height), offset) in enumerate(zip(golden["sizes"], golden["crop_offsets"])):
        slack = abs(width - height)
        pairs.append(views.views(_raw_image(index, width, height), offset / slack if slack else None))
    return adapter.prepare([c for c, _ in pairs], [t for _, t in pairs], prompts)


def test_the_adapter_reproduces_the_authors_losses_from_raw_images(tiny):
    """By default the adapter makes its condition as the authors do (the target tensor, bilinear, no antialias) and
    its per-sample losses are theirs within 1e-5; the source image through PIL bicubic (the old way) is not."""
    model, _, adapter = tiny
    golden = json.loads(GOLDEN.read_text())
    noise = LossNoise(seed=golden["noise"]["seed"], timesteps=tuple(golden["noise"]["timesteps"]))
    levels = torch.tensor(noise.timesteps)
    authors_timesteps = model.train_scheduler.timesteps[(torch.tensor(golden["u"]) * 1000).long()]
    assert torch.equal(adapter.training_timesteps(model, levels), authors_timesteps)  # the same injected u
    views = adapter.default_views()
    assert (views.condition_source, views.condition_interpolation) == ("target", "bilinear")
    with torch.no_grad():
        losses = adapter.loss(model, _authors_inputs(adapter, views, golden), reduction="none", noise=noise)
        image_views = resolve_views(adapter, condition_source="image")
        old = adapter.loss(model, _authors_inputs(adapter, image_views, golden), reduction="none", noise=noise)
    expected = torch.tensor(golden["authors_losses"])
    torch.testing.assert_close(losses, expected, rtol=1e-5, atol=0)
    assert ((old - expected).abs() / expected).max() > 1e-3


def test_freeze_auto_trains_exactly_the_generation_side():
    model, processor = tiny_umm("openuni")
    adapter = get_adapter(model, processor)
    frozen = set(apply_freeze(model, adapter, "auto"))
    tops = {name.split(".")[0]: p.requires_grad for name, p in model.named_parameters()}
    trained = {name.split(".")[0] for name, p in model.named_parameters() if p.requires_grad}
    assert trained == {"meta_queries", "connector", "projector", "transformer"}
    assert all(name.startswith(("lmm.", "vae.")) for name in frozen) and not tops["lmm"] and not tops["vae"]
    table = parameter_table(model, adapter)
    assert table["understanding"]["trainable"] == table["shared"]["trainable"] == 0
    assert table["tokenizers"]["trainable"] == 0 and table["generation"]["frozen"] == 0 and "other" not in table


def test_text_to_image_uses_the_authors_prompt_and_trains_the_generation_side(shapes):
    model, processor = tiny_umm("openuni")
    adapter = get_adapter(model, processor)
    apply_freeze(model, adapter, "auto")
    images = [shapes[i]["image"] for i in range(2)]
    batch = adapter.prepare_text_to_image(["a red circle", adapter.null_prompt], images)
    tokens = [processor.tokenizer.convert_ids_to_tokens(row) for row in batch["input_ids"].tolist()]
    assert "<IMG_CONTEXT>" not in tokens[0] and "condition_pixel_values" not in batch
    text = " ".join(t for t in tokens[0] if t != "<|endoftext|>")
    assert text == "<|im_start|> user generate an image : a red circle <|im_end|> <|im_start|> assistant <img>"
    null = " ".join(t for t in tokens[1] if t != "<|endoftext|>")
    assert null == "<|im_start|> user generate an image . <|im_end|> <|im_start|> assistant <img>"
    loss = adapter.text_to_image_loss(model, batch, noise=NOISE)
    loss.backward()
    assert torch.isfinite(loss) and model.meta_queries.weight.grad.abs().sum() > 0
    assert all(p.grad is None for p in model.lmm.parameters())


def test_text_to_image_and_guided_reconstruction_sample_with_the_null_prompt(tiny, shapes):
    """CFG 4.5 against "Generate an image." (the authors' sampler); the same seed gives the same images."""
    model, _, adapter = tiny
    first = adapter.text_to_image(["a red circle", "a blue square"], seed=0, num_inference_steps=2)
    again = adapter.text_to_image(["a red circle", "a blue square"], seed=0, num_inference_steps=2)
    plain = adapter.text_to_image(["a red circle", "a blue square"], seed=0, num_inference_steps=2, guidance_scale=1)
    assert [im.size for im in first] == [(32, 32)] * 2
    assert [im.tobytes() for im in first] == [im.tobytes() for im in again]
    assert first[0].tobytes() != plain[0].tobytes()  # guidance changes the sample
    guided = adapter.reconstruct([shapes[0]["image"]], guidance_scale=3.0, seed=0)
    assert (
        guided[0].size == (32, 32)
        and guided[0].tobytes() != adapter.reconstruct([shapes[0]["image"]], seed=0)[0].tobytes()
    )


def test_views_are_cut_from_one_square_drawn_per_row_and_epoch(tiny):
    """A wide image red | green | blue: each row's crop is drawn from (seed, epoch, row), and both views come
    from that one square; the grid's and the probe's views (no row) hold the green centre only."""
    _, _, adapter = tiny
    image = Image.new("RGB", (96, 32), "red")
    image.paste(Image.new("RGB", (32, 32), (0, 255, 0)), (32, 0))
    image.paste(Image.new("RGB", (32, 32), "blue"), (64, 0))
    views = adapter.default_views()
    assert views.target_fit == "random_crop"
    for view in views.views(image):  # the condition is the target's tensor, bilinear to the InternViT tile
        assert {colour for _, colour in view_image(view).getcolors()} == {(0, 255, 0)}
    assert views.square(image, 16).getcolors() == [(256, (0, 255, 0))]
    for position, colour in ((0.0, (255, 0, 0)), (1.0, (0, 0, 255))):  # the square at either end
        condition, target = views.views(image, position)
        assert [c for _, c in view_image(condition).getcolors()] == [colour]
        assert [c for _, c in target.getcolors()] == [colour]
    collator = RecACollator(adapter, seed=3)
    positions = [collator.crop_position(row) for row in range(32)]
    assert positions == [RecACollator(adapter, seed=3).crop_position(row) for row in range(32)]  # reproducible
    assert len(set(positions)) == 32 and 0 <= min(positions) and max(positions) <= 1
    collator.epoch = 1
    assert [collator.crop_position(row) for row in range(32)] != positions  # a fresh crop each epoch
    batch = collator([{"image": image, "__reca_index__": row} for row in range(8)])
    assert batch["target_pixel_values"].shape[0] == 8
    padded = ViewSpec(64, 32, target_fit="pad")
    assert len(padded.target_view(image).getcolors()) > 1
    with pytest.raises(ValueError, match="target_fit='letterbox'"):
        ViewSpec(64, 32, target_fit="letterbox")
    assert adapter.resolve_resolutions("auto", "auto") == (64, 32)  # one InternViT tile; the DC-AE's side
    with pytest.raises(ValueError, match="generation_resolution=30: must be a multiple of 4"):
        adapter.resolve_resolutions("auto", 30)


def test_a_centre_cropped_jpeg_is_drafted_on_its_shorter_side():
    """The crop is the shorter side, so JPEG draft decoding must keep that side at the view size."""
    encoded = io.BytesIO()
    Image.new("RGB", (512, 128), "red").save(encoded, format="JPEG")
    assert load_image(encoded.getvalue(), draft=64).size == (64, 16)  # "pad": the longer side decides
    assert load_image(encoded.getvalue(), draft=64, fit="center_crop").size == (256, 64)


def test_a_saved_folder_loads_through_the_dotted_model_class(tiny, shapes, make_args, tmp_path):
    model, processor, adapter = tiny
    folder = tmp_path / "openuni"
    model.save_pretrained(folder)
    processor.tokenizer.save_pretrained(folder)  # what `reca convert openuni` writes beside the model
    trainer = RecATrainer(str(folder), args=make_args(collapse_action="off"), train_dataset=shapes)
    assert type(trainer.model).__name__ == "OpenUniModel" and trainer.adapter.name == "openuni"
    loaded, tokenizer = load_model_and_processor(str(folder))
    assert type(loaded).__name__ == "OpenUniModel" == OpenUniAdapter.model_class.rsplit(".", 1)[1]
    again = get_adapter(loaded.eval(), tokenizer)
    batch = _collated(adapter, shapes, n=2)
    assert torch.equal(_collated(again, shapes, n=2)["input_ids"], batch["input_ids"])
    with torch.no_grad():
        assert torch.equal(again.loss(loaded, batch, noise=NOISE), adapter.loss(model, batch, noise=NOISE))


def test_the_trainers_weight_decay_rule_is_the_authors_dim_rule_here():
    """The authors decay every trained tensor with 2 or more dimensions; transformers' Trainer exempts biases and
    norm weights by name and type. On OpenUni's trainable parameters the two rules pick the same tensors."""
    from transformers import Trainer

    model, processor = tiny_umm("openuni")
    apply_freeze(model, get_adapter(model, processor), "auto")
    decayed = set(Trainer.get_decay_parameter_names(None, model))
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    assert all((name in decayed) == (p.dim() >= 2) for name, p in trained)


def test_lora_targets_sana_attention_and_the_connector_and_saves_the_queries(make_args):
    model, processor = tiny_umm("openuni")
    adapter = get_adapter(model, processor)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # peft's notes on a base model it cannot look up offline
        peft_model = prepare_peft_model(model, adapter, make_args(use_peft=True, lora_target_modules="generation"))
    trainable = [name for name, p in peft_model.named_parameters() if p.requires_grad]
    assert any(".attn2.to_k.lora_A." in n for n in trainable)
    assert any(".self_attn.q_proj.lora_A." in n for n in trainable)
    assert any("meta_queries.modules_to_save" in n for n in trainable)
    assert not any(n.startswith("base_model.model.lmm.") or ".vae." in n for n in trainable)


def test_the_tiny_recipe_trains_through_the_cli(tmp_path):
    out = tmp_path / "demo"
    argv = ["train", "recipes/openuni/tiny_demo.yaml", "--max_steps", "3", "--output_dir", str(out)]
    reca(argv + ["--logging_steps", "1", "--num_reconstruction_images", "0"])
    state = json.loads((out / "trainer_state.json").read_text())
    losses = [log["reconstruction_loss"] for log in state["log_history"] if "reconstruction_loss" in log]
    assert len(losses) == 3 and all(loss > 0 for loss in losses)
    assert json.loads((out / "reca_run.json").read_text())["architecture"] == "openuni"
