import io

import numpy as np
import pytest
import torch
from PIL import Image

from reca_hf import RecACollator
from reca_hf.adapters import get_adapter
from reca_hf.images import ViewSpec, blur, load_image


@pytest.fixture
def adapter(tiny_janus):
    model, processor = tiny_janus
    return get_adapter(model, processor)


def _modes():
    rgb = Image.new("RGB", (20, 12), (200, 30, 40))
    images = {mode: rgb.convert(mode) for mode in ("L", "LA", "P", "RGBA", "CMYK", "RGB")}
    images["RGBA-transparent"] = Image.new("RGBA", (10, 10), (0, 0, 0, 0))
    images["I;16"] = Image.fromarray(np.full((8, 8), 65535, dtype=np.uint16))
    return images


@pytest.mark.parametrize("mode", list(_modes()))
def test_every_pil_mode_becomes_rgb(mode):
    image = load_image(_modes()[mode])
    assert image.mode == "RGB"
    if mode == "RGBA-transparent":
        assert image.getpixel((0, 0)) == (255, 255, 255)  # composited on white
    if mode == "I;16":
        assert image.getpixel((0, 0)) == (255, 255, 255)  # 16-bit white stays white


def test_exif_orientation_is_applied():
    image = Image.new("RGB", (30, 10), (255, 0, 0))
    exif = image.getexif()
    exif[0x0112] = 6  # rotate 90 degrees clockwise when displayed
    buffer = io.BytesIO()
    image.save(buffer, format="JPEG", exif=exif)
    assert load_image({"bytes": buffer.getvalue(), "path": None}).size == (10, 30)


def test_paths_and_dataset_dicts(tmp_path):
    path = tmp_path / "a.png"
    Image.new("RGB", (8, 8), (1, 2, 3)).save(path)
    assert load_image(str(path)).getpixel((0, 0)) == (1, 2, 3)
    assert load_image({"bytes": None, "path": str(path)}).getpixel((0, 0)) == (1, 2, 3)


def test_views_keep_aspect_and_blur_keeps_token_count():
    views = ViewSpec(16, 32, "blur", 4, (0, 0, 0), target_fit="pad")
    wide = Image.new("RGB", (64, 32), (255, 255, 255))
    target = views.target_view(wide)
    assert target.size == (32, 32)
    assert target.getpixel((0, 0)) == (0, 0, 0) and target.getpixel((16, 16)) == (255, 255, 255)
    condition = views.condition_view(wide)
    assert condition.size == (16, 16)
    checker = Image.fromarray((np.indices((16, 16)).sum(0) % 2 * 255).astype(np.uint8)).convert("RGB")
    assert np.asarray(blur(checker, 4)).std() < np.asarray(checker).std() / 4


def test_batch_shapes_and_slots(adapter, shapes):
    collator = RecACollator(adapter, cond_dropout_prob=0.0)
    batch = collator([shapes[i] for i in range(3)])
    assert batch["condition_pixel_values"].shape == (3, 3, 32, 32)
    assert batch["target_pixel_values"].shape == (3, 3, 32, 32)
    assert batch["target_pixel_values"].min() >= -1 and batch["target_pixel_values"].max() <= 1
    assert (batch["condition_mask"].sum(-1) == 16).all()
    assert batch["input_ids"].shape == batch["attention_mask"].shape
    low = RecACollator(adapter, condition_resolution=16)([shapes[0]])
    assert low["condition_pixel_values"].shape[-1] == 16 and int(low["condition_mask"].sum()) == 4


def test_determinism_and_resume_by_index(adapter, shapes):
    rows = [{**shapes[i], "__reca_index__": i} for i in range(8)]
    first = RecACollator(adapter, seed=5)(rows)
    again = RecACollator(adapter, seed=5)(rows[4:])
    assert first["instructions"][4:] == again["instructions"]
    assert torch.equal(
        first["input_ids"][4:][:, -again["input_ids"].shape[1] :], again["input_ids"][:, -again["input_ids"].shape[1] :]
    )
    other = RecACollator(adapter, seed=6)(rows)
    assert other["instructions"] != first["instructions"]


def test_dropout_rate_over_many_draws(adapter):
    collator = RecACollator(adapter, cond_dropout_prob=0.25)
    draws = [collator.sampler.draw(i) for i in range(4000)]
    rate = np.mean([dropped for _, dropped in draws])
    assert 0.22 < rate < 0.28
    assert all(instruction == adapter.null_prompt for instruction, dropped in draws if dropped)


def test_undecodable_image_names_the_row(adapter):
    collator = RecACollator(adapter)
    rows = [
        {"image": Image.new("RGB", (8, 8)), "__reca_index__": 0},
        {"image": {"bytes": b"not an image", "path": None}, "__reca_index__": 41},
    ]
    with pytest.raises(ValueError, match=r"dataset row 41: column 'image'"):
        collator(rows)


def test_missing_column_names_the_column(adapter):
    with pytest.raises(KeyError, match="picture"):
        RecACollator(adapter, image_column="picture")([{"image": Image.new("RGB", (8, 8))}])


def test_cond_dropout_auto_is_the_architecture_adapters_rate_and_the_record_says_which(make_args, shapes):
    from reca_hf import RecATrainer
    from reca_hf.cli import parse_recipe
    from reca_hf.testing import tiny_umm

    janus, flow = (get_adapter(*tiny_umm(arch)) for arch in ("janus", "flow"))
    assert RecACollator(janus).sampler.dropout_prob == 0.1  # reca_hf's choice: the authors have no Janus code
    assert RecACollator(flow).sampler.dropout_prob == 0.0  # as OpenUni: no dropout in reconstruction
    assert RecACollator(flow, cond_dropout_prob=0.3).sampler.dropout_prob == 0.3
    model, processor = tiny_umm("flow")
    trainer = RecATrainer(model, args=make_args(max_steps=1), train_dataset=shapes, processing_class=processor)
    assert trainer.run_record()["reca"]["cond_dropout_prob"] == 0.0
    assert trainer.run_settings()["prompt dropout"] == 0.0
    assert parse_recipe("recipes/janus/tiny_demo.yaml", ["--cond_dropout_prob", "0.25"]).cond_dropout_prob == 0.25
    with pytest.raises(ValueError, match="cond_dropout_prob='often'"):
        make_args(cond_dropout_prob="often")


def _two_to_one() -> Image.Image:
    """A 2:1 image, red | green | blue | white in vertical quarters."""
    image = Image.new("RGB", (64, 32), (255, 0, 0))
    for i, colour in enumerate(((0, 255, 0), (0, 0, 255), (255, 255, 255))):
        image.paste(Image.new("RGB", (16, 32), colour), (16 * (i + 1), 0))
    return image


def test_a_center_cropped_2_to_1_image_has_no_padding_in_its_target(adapter):
    """The default target fit is center_crop: the target holds the centre square only, no background bars."""
    background = adapter.background_color
    collator = RecACollator(adapter, cond_dropout_prob=0.0)
    assert (collator.views.target_fit, collator.views.condition_fit) == ("center_crop", "pad")
    condition, target = collator.views.views(_two_to_one())
    for view in (condition, target):
        colours = {colour for _, colour in view.getcolors()}
        assert background not in colours and colours <= {(0, 255, 0), (0, 0, 255)}, colours
    batch = collator([{"image": _two_to_one()}])
    pixels = ((batch["target_pixel_values"][0] + 1) * 127.5).round()  # the VQ's [-1, 1] back to levels
    assert not (pixels == torch.tensor(background, dtype=pixels.dtype).view(3, 1, 1)).all(0).any()


def test_stretch_pad_and_a_condition_fit_of_their_own(adapter):
    """Under pad and stretch targets the condition takes its own fit; a random-crop condition uses the row's draw."""
    image = _two_to_one()
    stretched = ViewSpec(16, 32, target_fit="stretch").target_view(image)
    assert stretched.getpixel((2, 16)) == (255, 0, 0) and stretched.getpixel((30, 16)) == (255, 255, 255)
    padded = ViewSpec(16, 32, background=(7, 7, 7), target_fit="pad", condition_fit="stretch")
    condition, target = padded.views(image)
    assert target.getpixel((0, 0)) == (7, 7, 7) and condition.getpixel((0, 0)) == (255, 0, 0)
    collator = RecACollator(adapter, target_fit="pad", condition_fit="random_crop", seed=1)
    positions = [collator.crop_position(row) for row in range(8)]
    assert None not in positions and len(set(positions)) == 8
    condition, target = collator.views.views(image, 0.0)  # the condition: the left square, red | green
    colours = {colour for _, colour in condition.getcolors()}
    assert (255, 0, 0) in colours and not colours & {(0, 0, 255), (255, 255, 255)}
    assert adapter.background_color in {colour for _, colour in target.getcolors()}  # the whole image, padded
    with pytest.raises(ValueError, match="condition_fit='letterbox'"):
        ViewSpec(16, 32, condition_fit="letterbox")


def test_fit_fields_resolve_auto_from_the_adapter_and_reach_the_record(make_args, tiny_janus, shapes):
    from reca_hf import RecAConfig, RecATrainer

    assert RecAConfig(output_dir="x").target_fit == "auto"
    with pytest.raises(ValueError, match="target_fit='crop'"):
        RecAConfig(output_dir="x", target_fit="crop")
    model, processor = tiny_janus
    trainer = RecATrainer(model, args=make_args(target_fit="stretch"), train_dataset=shapes, processing_class=processor)
    assert (trainer.views.target_fit, trainer.views.condition_fit) == ("stretch", "pad")
    record = trainer.run_record()
    assert (record["reca"]["target_fit"], record["reca"]["condition_fit"]) == ("stretch", "pad")
    assert record["settings"]["view fits"] == "target stretch, condition pad"


def test_a_null_prompt_of_none_leaves_the_instruction_out_and_prepare_learns_the_dropped_rows(
    make_args, shapes, monkeypatch
):
    """null_prompt=None (BAGEL): a dropped row's prompt has no instruction segment, not an empty one."""
    from reca_hf import RecATrainer
    from reca_hf.adapters import FlowAdapter, registry
    from reca_hf.testing import tiny_umm

    seen = []

    class NoInstructionFlow(FlowAdapter):
        name = "no_instruction_flow"
        null_prompt = None

        def prepare(self, condition_images, target_images, instructions, *, dropped=None):
            seen.append((list(instructions), dropped))
            return super().prepare(condition_images, target_images, instructions, dropped=dropped)

    model, processor = tiny_umm("flow")
    adapter = NoInstructionFlow(model.config, processor)
    collator = RecACollator(adapter, cond_dropout_prob=0.5, seed=0)
    batch = collator([{"image": shapes[i]["image"], "__reca_index__": i} for i in range(8)])
    instructions, dropped = seen[-1]
    assert dropped == batch["prompt_dropped"].tolist() and 0 < sum(dropped) < 8
    assert all((text is None) == drop for text, drop in zip(instructions, dropped))
    tokenizer = processor.tokenizer if hasattr(processor, "tokenizer") else processor
    slots = adapter.num_condition_tokens(collator.views.condition_resolution)
    row = dropped.index(True)
    text = tokenizer.decode(batch["input_ids"][row][batch["attention_mask"][row].bool()])
    assert text.endswith(tokenizer.decode(tokenizer(adapter.format_prompt(None, slots))["input_ids"]))
    assert adapter.format_prompt(None, slots) != adapter.format_prompt("", slots)  # left out, not emptied
    assert torch.isfinite(adapter.loss(model, batch))

    monkeypatch.setattr(registry, "_REGISTRY", {"no_instruction_flow": NoInstructionFlow, **registry._REGISTRY})
    args = make_args(max_steps=1, cond_dropout_prob=0.5, collapse_action="off")
    trainer = RecATrainer(model, args=args, train_dataset=shapes, processing_class=processor)
    record = trainer.run_record()
    assert record["reca"]["null_prompt"] is None and record["reca"]["cond_dropout_prob"] == 0.5
    assert record["settings"]["null prompt"].startswith("none: a dropped prompt leaves the instruction out")


def test_an_adapter_written_before_dropped_still_prepares(adapter, shapes):
    """prepare(...) without a dropped= parameter gets the inputs alone."""
    calls = []

    class Before(type(adapter)):
        name = "janus_before_dropped"

        def prepare(self, condition_images, target_images, instructions):
            calls.append(len(instructions))
            return super().prepare(condition_images, target_images, instructions)

    old = Before(adapter.config, adapter.processor)
    batch = RecACollator(old, cond_dropout_prob=0.5)([shapes[i] for i in range(3)])
    assert calls == [3] and batch["input_ids"].shape[0] == 3
