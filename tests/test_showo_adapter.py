"""The Show-o adapters (VQ and CLIP variants): the authors' RecA step through prepare + loss, views, guard, probes."""

import pytest
import torch
import torch.nn.functional as F
from PIL import Image

from reca_hf.adapters import LossNoise, get_adapter
from reca_hf.images import resolve_views
from reca_hf.models.showo import prompting as P
from reca_hf.models.showo.adapter import ShowoAdapter, ShowoClipAdapter
from reca_hf.testing import tiny_umm


def _images(n=2, size=80):
    colours = ["red", "blue", "green", "yellow"]
    images = []
    for i in range(n):
        image = Image.new("RGB", (size, size), colours[i % 4])
        image.paste(colours[(i + 1) % 4], (size // 4, size // 4, size // 2 + 8 * i, size // 2))
        images.append(image)
    return images


def _prepared(adapter, images, instructions):
    views = adapter.default_views()
    conditions = [views.condition_view(image) for image in images]
    targets = [views.target_view(image) for image in images]
    return adapter.prepare(conditions, targets, instructions)


@pytest.fixture(scope="module")
def vq():
    model, tokenizer = tiny_umm("showo")
    return model, tokenizer, get_adapter(model, tokenizer)


def test_detection_dispatches_on_the_variant():
    model, tokenizer = tiny_umm("showo_clip")
    assert type(get_adapter(model, tokenizer)) is ShowoClipAdapter
    assert type(get_adapter(tiny_umm("showo")[0])) is ShowoAdapter
    with pytest.raises(ValueError, match="w_clip_vit"):
        ShowoClipAdapter(tiny_umm("showo")[0].config)


def test_default_views_are_the_authors(vq):
    """Half-side condition made from the target tensor (bilinear), stretched square target, no prompt dropout."""
    _, _, adapter = vq
    views = adapter.default_views()
    assert (views.condition_resolution, views.generation_resolution) == (32, 64)  # the tiny 512 -> 256
    assert (views.condition_source, views.condition_interpolation) == ("target", "bilinear")
    assert adapter.default_cond_dropout_prob == 0.0 and adapter.target_fit == "stretch"
    clip = get_adapter(*tiny_umm("showo_clip")).default_views()
    assert (clip.condition_resolution, clip.condition_source) == (336, "target")


def test_the_guard_refuses_a_same_resolution_unblurred_condition(vq):
    _, _, adapter = vq
    with pytest.raises(ValueError, match="copy"):
        resolve_views(adapter, 64, 64, "resize")
    resolve_views(adapter, 64, 64, "blur", blur_factor=8)  # the authors' blur8 fallback: 512 -> 64 -> 512
    clip = get_adapter(*tiny_umm("showo_clip"))
    resolve_views(clip, "auto", 64)  # separate spaces: nothing to refuse


def test_loss_is_the_authors_recon_step(vq):
    """prepare + loss equals the prompting pieces driven by hand: codes of the bilinear condition, one
    instruction for the batch, the authors' masking draws (t, then noise) and their token-mean CE."""
    model, tokenizer, adapter = vq
    images = _images(2)
    batch = _prepared(adapter, images, ["describe it", "a red circle"])
    config = model.config
    pixels = batch["target_pixel_values"]
    condition = model.image_ids(F.interpolate(pixels, size=(32, 32), mode="bilinear", align_corners=False))
    assert torch.equal(condition, model.image_ids(batch["condition_pixel_values"]))
    generator = torch.Generator().manual_seed(7)
    ids, labels, _ = P.mask_image_tokens(model.image_ids(pixels), config.mask_token_id, generator=generator)
    text = tokenizer("USER: \n describe it ASSISTANT:", add_special_tokens=False)["input_ids"]
    input_ids, labels = P.recon_inputs(config, [text] * 2, condition, ids, labels)
    logits = model(input_ids, P.recon_attention_mask(config, input_ids)).logits
    expected = P.recon_loss(logits, labels, config.num_vq_tokens)
    loss = adapter.loss(model, batch, noise=LossNoise(7))
    torch.testing.assert_close(loss, expected, rtol=1e-6, atol=0)


def test_one_instruction_per_batch_is_configurable(vq):
    _, _, adapter = vq
    images = _images(2)
    texts = ["describe it", "a red circle"]
    same = _prepared(adapter, images, texts)
    assert torch.equal(same["input_ids"][0], same["input_ids"][1])
    per_row = ShowoAdapter(adapter.config, adapter.processor)
    per_row.one_instruction_per_batch = False
    differ = _prepared(per_row, images, texts)
    assert not torch.equal(differ["text_lengths"], same["text_lengths"]) or not torch.equal(
        differ["input_ids"][0], differ["input_ids"][1]
    )
    model = adapter.model
    assert torch.isfinite(per_row.loss(model, differ))  # rows of two lengths share one sequence length


def test_fixed_mask_ratio_masks_every_row_alike_and_rows_average_to_the_mean(vq):
    model, _, adapter = vq
    batch = _prepared(adapter, _images(3), ["describe it"] * 3)
    noise = LossNoise(1, mask_ratio=0.5)
    rows = adapter.loss(model, batch, reduction="none", noise=noise)
    torch.testing.assert_close(rows.mean(), adapter.loss(model, batch, noise=noise), rtol=1e-6, atol=0)
    drawn = LossNoise(2)
    rows = adapter.loss(model, batch, reduction="none", noise=drawn)
    torch.testing.assert_close(rows.mean(), adapter.loss(model, batch, noise=drawn), rtol=1e-6, atol=0)


def test_token_probe_reads_an_all_masked_target(vq):
    model, _, adapter = vq
    batch = _prepared(adapter, _images(2), ["describe it"] * 2)
    logits, codes = adapter.target_logits(model, batch)
    assert logits.shape == (2, model.config.num_vq_tokens, model.config.codebook_size)
    assert torch.equal(codes + model.config.code_offset, model.image_ids(batch["target_pixel_values"]))
    # The target's own codes are hidden: changing them does not change the logits.
    other = dict(batch, cached_target_codes=torch.zeros_like(codes))
    torch.testing.assert_close(adapter.target_logits(model, other)[0], logits)


def test_image_to_text_is_the_authors_mmu_rows(vq):
    model, tokenizer, adapter = vq
    image = _images(1, 64)
    batch = adapter.prepare_image_to_text(image, ["what is it"], ["a red square"])
    text = tokenizer("USER: what is it ASSISTANT: a red square", add_special_tokens=False)["input_ids"] + [0]
    assert batch["input_ids"][0].tolist() == text
    ids, labels = P.mmu_inputs(
        model.config, model.image_ids(batch["condition_pixel_values"]), batch["input_ids"], batch["labels"]
    )
    expected = P.mmu_loss(model(ids, P.mmu_attention_mask(model.config, ids)).logits, labels)
    torch.testing.assert_close(adapter.image_to_text_loss(model, batch), expected)


def test_clip_recon_trains_neither_projector_nor_embeddings_by_default():
    model, tokenizer = tiny_umm("showo_clip")
    adapter = get_adapter(model, tokenizer)
    batch = _prepared(adapter, _images(2), ["describe it", "a red circle"])
    model.train()
    adapter.loss(model, batch).backward()
    assert model.mm_projector[0].weight.grad is None
    assert model.showo.model.embed_tokens.weight.grad is None
    assert model.showo.lm_head.weight.grad is not None
    model.zero_grad(set_to_none=True)
    adapter.recon_trains_embeddings = True
    adapter.loss(model, batch).backward()
    assert model.mm_projector[0].weight.grad is not None
    adapter.clip_condition_scaling = "clip"
    assert not torch.equal(adapter.condition_pixels([torch.full((3, 336, 336), 0.5)]), torch.zeros(1, 3, 336, 336))


def test_reconstruct_and_text_to_image_are_seeded(vq):
    model, _, adapter = vq
    first = adapter.reconstruct(_images(2), seed=3)
    again = adapter.reconstruct(_images(2), seed=3)
    assert [im.tobytes() for im in first] == [im.tobytes() for im in again]
    assert first[0].size == (64, 64)
    guided = adapter.reconstruct(_images(2), seed=3, guidance_scale=3.0)
    assert len(guided) == 2


@pytest.mark.parametrize("arch", ["showo", "showo_clip"])
def test_cached_frozen_features_give_the_same_loss_without_running_the_towers(arch):
    model, tokenizer = tiny_umm(arch)
    adapter = get_adapter(model, tokenizer)
    batch = _prepared(adapter, _images(2), ["describe it"] * 2)
    noise = LossNoise(5)
    with torch.no_grad():
        features = adapter.frozen_features(model, batch)
        assert sorted(features) == sorted(adapter.frozen_feature_sources)
        cached = {**batch, **{f"cached_{name}": value for name, value in features.items()}}
        calls = []
        hooks = [
            module.register_forward_hook(lambda *_: calls.append(1))
            for module in (model.vq_model.encoder, getattr(model, "vision_tower", model.vq_model.encoder))
        ]
        with_cache = adapter.loss(model, cached, reduction="none", noise=noise)
        assert not calls
        for hook in hooks:
            hook.remove()
        torch.testing.assert_close(with_cache, adapter.loss(model, batch, reduction="none", noise=noise))


def _parity_images():
    """The two raw images of the adapter golden (/work/parity/showo/adapter_export.py makes the same)."""
    import numpy as np

    rng = np.random.default_rng(21)
    images = []
    for w, h in [(90, 70), (70, 110)]:
        base = rng.integers(0, 256, size=(h // 10 + 1, w // 10 + 1, 3), dtype=np.uint8)
        image = Image.fromarray(base).resize((w, h), Image.Resampling.NEAREST)
        noisy = np.asarray(image).astype(int) + rng.integers(-20, 21, size=(h, w, 3))
        images.append(Image.fromarray(np.clip(noisy, 0, 255).astype(np.uint8)))
    return images


@pytest.mark.parametrize("arch, golden_file", [("showo", "showo_adapter_step.json"),
                                                ("showo_clip", "showo_clip_adapter_step.json")])
def test_raw_images_to_loss_match_the_authors_data_path(arch, golden_file):
    """Raw images -> RecACollator -> the adapter's loss against the authors' data path and RecA step: the VQ variant's
    MidjourneyDataset + train_recon.py (tests/golden/showo_adapter_step.json), the CLIP variant's + the CLIP tower at
    336 px of train_recon_w_clip_vit.py (tests/golden/showo_clip_adapter_step.json)."""
    import hashlib
    import json
    from pathlib import Path

    import numpy as np

    from reca_hf import RecACollator

    golden = json.loads((Path(__file__).parent / "golden" / golden_file).read_text())
    images = _parity_images()
    assert hashlib.sha256(b"".join(np.asarray(i).tobytes() for i in images)).hexdigest() == golden["pixels_sha256"]
    model, tokenizer = tiny_umm(arch)
    adapter = get_adapter(model, tokenizer)
    batch = RecACollator(adapter, prompts=[golden["instruction"]])([{"image": image} for image in images])
    offset = model.config.code_offset
    assert (model.image_ids(batch["target_pixel_values"]) - offset).tolist() == golden["target_codes"]
    if "condition_codes" in golden:  # the VQ variant's condition is codes too
        assert (model.image_ids(batch["condition_pixel_values"]) - offset).tolist() == golden["condition_codes"]
    model.train()
    noise = LossNoise(golden["seed"])
    with torch.no_grad():
        assert adapter.loss(model, batch, noise=noise).item() == pytest.approx(golden["loss_recon"], rel=1e-5)
        rows = adapter.loss(model, batch, reduction="none", noise=noise).double()
    model.eval()
    counts = torch.tensor(golden["masked_counts"], dtype=torch.float64)
    row_means = rows * counts.sum() / (len(counts) * counts)  # "none": each row's sum over the mean count
    assert row_means.tolist() == pytest.approx(golden["loss_recon_per_row"], rel=1e-5)


def test_load_adds_the_special_tokens_to_a_converted_folder_without_tokenizer(tmp_path, monkeypatch):
    from reca_hf.models.showo.tiny import tiny_showo_text_tokenizer

    model, tokenizer = tiny_umm("showo")
    model.save_pretrained(tmp_path / "converted")  # what `reca convert showo` writes: no tokenizer
    tiny_showo_text_tokenizer().save_pretrained(tmp_path / "phi")
    monkeypatch.setattr(ShowoAdapter, "text_tokenizer_source", str(tmp_path / "phi"))
    loaded, loaded_tokenizer = ShowoAdapter.load(str(tmp_path / "converted"))
    assert loaded_tokenizer.get_vocab() == tokenizer.get_vocab()
    tokenizer.save_pretrained(tmp_path / "converted")  # a folder reca_hf saved has its own
    monkeypatch.setattr(ShowoAdapter, "text_tokenizer_source", str(tmp_path / "missing"))
    assert len(ShowoAdapter.load(str(tmp_path / "converted"))[1]) == len(tokenizer)
    model.save_pretrained(tmp_path / "short")
    tiny_showo_text_tokenizer().save_pretrained(tmp_path / "short")  # without Show-o's special tokens
    with pytest.raises(ValueError, match="llm_vocab_size"):
        ShowoAdapter.load(str(tmp_path / "short"))


def test_gpu_step_builds_the_released_shapes_and_runs_the_tiny_show_o(tmp_path):
    import importlib.util
    from pathlib import Path

    script = Path(__file__).parents[1] / "benchmarks" / "gpu_step.py"
    spec = importlib.util.spec_from_file_location("gpu_step", script)
    gpu_step = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(gpu_step)
    (result,) = gpu_step.main(["--tiny", "--tiny-arch", "showo", "--steps", "2", "--warmup", "1", "--out", ""])
    assert result["parameters"] == sum(p.numel() for p in tiny_umm("showo")[0].parameters())
    for size, parameters in (("showo_vq_512", 1_543_563_774), ("showo_clip_512", 1_853_366_782)):
        model, tokenizer = gpu_step.showo_shape(size, device="meta")
        assert sum(p.numel() for p in model.parameters()) == parameters  # benchmarks/results/showo_params.md
        assert len(tokenizer) == 50_305 and get_adapter(model, tokenizer).native_generation_resolution == 512
