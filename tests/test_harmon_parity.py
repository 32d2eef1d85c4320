"""HarmonModel against the authors' Harmon code: golden values from their code on the same tiny weights and draws.

`tests/golden/harmon_parity.json` was made by running the authors' `Harmon/` (their modules, unchanged but for the
hard-coded slot count) on `build_tiny_harmon(seed=0)` weights written in their layout, with the inputs and random
draws of :func:`parity_inputs` injected (its `_note` says how). Each test recomputes one quantity with reca_hf's
code from the same weights and draws and compares it with theirs.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from reca_hf.models.harmon.modeling_harmon import mask_from_orders, truncated_normal_mask_ratio
from reca_hf.models.harmon.tiny import build_tiny_harmon

GOLDEN = Path(__file__).parent / "golden" / "harmon_parity.json"
AUTHORS_IMAGE_TOKEN = -200  # xtuner's IMAGE_TOKEN_INDEX, which the authors' prompts carry at index 3


def reveal_counts(num_iter: int, tokens: int) -> list[int]:
    """How many tokens each round of the authors' MAR sampler reveals (one sample, no previous reveals)."""
    masked, counts = tokens, []
    for step in range(num_iter):
        ratio = math.cos(math.pi / 2.0 * (step + 1) / num_iter)
        following = int(max(1.0, min(masked - 1, math.floor(tokens * ratio))))
        counts.append(masked if step == num_iter - 1 else masked - following)
        masked = following
    return counts


def parity_inputs(model, tokenizer) -> dict:
    """Every input and random draw of the parity run, from fixed seeds: the authors' prompts (one -200 image token
    at index 3) and reca_hf's (``image_slots`` image tokens there), pixels, MAR orders and mask ratio, the loss's
    timesteps and noise, and the sampler's orders and per-round noise."""
    config = model.config
    g = torch.Generator().manual_seed(1234)
    word = tokenizer.convert_tokens_to_ids
    start, user, end, assistant = (word(t) for t in ("<|im_start|>", "user", "<|im_end|>", "assistant"))
    pad = tokenizer.pad_token_id
    slots = model.image_slots(4, 4)

    def prompts(texts: list[str], answers: list[str] | None = None) -> dict:
        """Right-padded prompts: `<|im_start|> user <first word>` [image] `<rest> <|im_end|> <|im_start|> assistant`
        [answer <|im_end|>]; answers are the only labelled tokens."""
        rows = []
        for i, text in enumerate(texts):
            words = tokenizer(text, add_special_tokens=False).input_ids
            head, tail = [start, user, words[0]], [*words[1:], end, start, assistant]
            answer = [] if answers is None else [*tokenizer(answers[i], add_special_tokens=False).input_ids, end]
            rows.append((head, tail, answer))
        length = max(len(h) + 1 + len(t) + len(a) for h, t, a in rows)
        out = {k: [] for k in ("authors_ids", "authors_mask", "authors_labels", "ids", "mask", "labels")}
        for head, tail, answer in rows:
            body = len(head) + 1 + len(tail) + len(answer)
            padding = length - body
            authors = [*head, AUTHORS_IMAGE_TOKEN, *tail, *answer]
            labels = [-100] * (body - len(answer)) + answer
            out["authors_ids"].append(authors + [pad] * padding)
            out["authors_mask"].append([1] * body + [0] * padding)
            out["authors_labels"].append(labels + [-100] * padding)
            ours = [*head, *[config.image_token_id] * slots, *tail, *answer]
            out["ids"].append(ours + [pad] * padding)
            out["mask"].append([1] * (len(ours)) + [0] * padding)
            out["labels"].append([-100] * (len(ours) - len(answer)) + answer + [-100] * padding)
        return {k: torch.tensor(v) for k, v in out.items()}

    batch, tokens = 2, 16
    rows = config.diffusion_batch_mul * batch * tokens
    timesteps = torch.randint(0, config.num_train_timesteps, (rows,), generator=g)
    timesteps[5] = 0  # the decoder-likelihood branch of the bound
    inputs = {
        "pixels": torch.rand(batch, 3, 64, 64, generator=g) * 2 - 1,
        "recon": prompts(["a red circle on the left", "blue square"]),
        "i2t": prompts(["describe the image", "describe the image ."], ["a red circle", "two blue squares on top"]),
        "orders": torch.stack([torch.randperm(tokens, generator=g) for _ in range(batch)]),
        "mask_ratio": truncated_normal_mask_ratio(0.3, config.mask_ratio_min),
        "timesteps": timesteps,
        "noise": torch.randn(rows, config.token_embed_dim, generator=g),
    }
    inputs["num_masked"] = math.ceil(tokens * inputs["mask_ratio"])
    # Sampling: one image, CFG 3 against the null prompt, 2 rounds on the 4 x 4 grid.
    cond = tokenizer("generate an image : a red circle", add_special_tokens=False).input_ids
    null = tokenizer("generate an image .", add_special_tokens=False).input_ids
    texts = [[start, user, *t, end, start, assistant] for t in (cond, null)]
    length = max(map(len, texts))
    inputs["sample_ids"] = torch.tensor([t + [tokenizer.eos_token_id] * (length - len(t)) for t in texts])
    inputs["sample_mask"] = torch.tensor([[1] * len(t) + [0] * (length - len(t)) for t in texts])
    inputs["sample_orders"] = torch.randperm(tokens, generator=g)[None]
    steps = model.mar.diffloss.sample_schedule.num_timesteps
    inputs["sample_noise"] = [
        torch.randn(steps + 1, count, config.token_embed_dim, generator=g) for count in reveal_counts(2, tokens)
    ]
    return inputs


def port_outputs(model, inputs: dict) -> dict:
    """reca_hf's values of everything the parity run compares, from ``inputs``; gradients of both losses."""
    model.train()
    latents = model.encode_latents(inputs["pixels"])
    b, h, w, _ = latents.shape
    out = {"latents": latents.reshape(b, h * w, -1)}
    with torch.no_grad():
        out["features"] = model.visual_features(latents)[1]
    recon = inputs["recon"]
    mask = mask_from_orders(inputs["orders"], inputs["num_masked"])
    captured = {}
    hook = model.proj_out.register_forward_pre_hook(lambda module, args: captured.__setitem__("llm", args[0]))
    from reca_hf.models.harmon.modeling_harmon import scale_gradient

    _, features = model.visual_features(latents)
    embeds = model.embed_prompt(recon["ids"], scale_gradient(features, 0.1))
    states = model.generation_states(latents, mask, recon["mask"], inputs_embeds=embeds)
    hook.remove()
    z = model.mar.forward_mae_decoder(states, mask, image_shape=(h, w))
    draws = {"timesteps": inputs["timesteps"], "noise": inputs["noise"]}
    target = latents.reshape(b, h * w, -1)
    loss = model.diffusion_loss(z, target, mask, **draws)
    out["per_sample"] = model.diffusion_loss(z, target, mask, reduction="none", **draws).detach()
    model.zero_grad()
    loss.backward()
    out |= {"llm_states": captured["llm"].detach(), "decoder": z.detach(), "recon_loss": loss.detach()}
    out["recon_grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    i2t = inputs["i2t"]
    loss = model.image_to_text_loss(i2t["ids"], i2t["mask"], i2t["labels"], latents)
    loss.backward()
    out["i2t_loss"] = loss.detach()
    out["i2t_grads"] = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad()
    model.eval()
    with torch.no_grad():
        tokens = model.sample_latents(
            model.embed_prompt(inputs["sample_ids"]),
            inputs["sample_mask"],
            image_shape=(h, w),
            num_iter=2,
            cfg=3.0,
            orders=inputs["sample_orders"],
            noise=inputs["sample_noise"],
        )
        out["sample_tokens"] = tokens.reshape(1, h * w, -1)
        out["sample_pixels"] = model.decode_latents(tokens)
    return out


@pytest.fixture(scope="module")
def compared():
    model, tokenizer = build_tiny_harmon(seed=0)
    golden = json.loads(GOLDEN.read_text())
    return port_outputs(model, parity_inputs(model, tokenizer)), golden


def _values(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.detach().double().flatten()


@pytest.mark.parametrize(
    "name", ["latents", "features", "llm_states", "decoder", "per_sample", "sample_tokens", "sample_pixels"]
)
def test_tensors_match_the_authors(compared, name):
    out, golden = compared
    expected = golden["tensors"][name]
    values = _values(out[name])
    assert list(out[name].shape) == expected["shape"]
    tolerance = golden["tolerances"]["tensors"]
    torch.testing.assert_close(
        values[: len(expected["head"])], torch.tensor(expected["head"], dtype=torch.float64), **tolerance
    )
    assert values.abs().sum().item() == pytest.approx(expected["abs_sum"], rel=tolerance["rtol"])


def test_losses_match_the_authors(compared):
    out, golden = compared
    rtol = golden["tolerances"]["losses"]["rtol"]
    assert out["recon_loss"].item() == pytest.approx(golden["recon_loss"], rel=rtol)
    assert out["i2t_loss"].item() == pytest.approx(golden["i2t_loss"], rel=rtol)
    assert _values(out["per_sample"]).tolist() == pytest.approx(golden["tensors"]["per_sample"]["head"], rel=rtol)


@pytest.mark.parametrize("loss", ["recon", "i2t"])
def test_gradients_match_the_authors(compared, loss):
    out, golden = compared
    grads, expected = out[f"{loss}_grads"], golden[f"{loss}_grad_norms"]
    assert sorted(grads) == sorted(expected)  # the same parameters get a gradient
    rtol = golden["tolerances"]["gradients"]["rtol"]
    for name, norm in expected.items():
        assert grads[name].norm().item() == pytest.approx(norm, rel=rtol, abs=1e-12), name


KL16_GOLDEN = Path(__file__).parent / "golden" / "harmon_kl16_vae.json"


def kl16_parity_inputs():
    """The full-width kl16 autoencoder (`KL16_VAE_CONFIG`, random under seed 0) and two 64-px images."""
    from diffusers import AutoencoderKL

    from reca_hf.models.harmon.configuration_harmon import KL16_VAE_CONFIG

    torch.manual_seed(0)
    vae = AutoencoderKL.from_config(KL16_VAE_CONFIG).eval()
    pixels = torch.rand(2, 3, 64, 64, generator=torch.Generator().manual_seed(99)) * 2 - 1
    return vae, pixels


def kl16_port_outputs(vae, pixels) -> dict:
    """What the authors' `Harmon.encode` / `decode` compute: the scaled posterior mode, and pixels back from it."""
    with torch.no_grad():
        latents = vae.encode(pixels).latent_dist.mode() * vae.config.scaling_factor
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    return {"latents": latents, "decoded": decoded}


def test_the_kl16_autoencoder_matches_the_authors():
    golden = json.loads(KL16_GOLDEN.read_text())
    out = kl16_port_outputs(*kl16_parity_inputs())
    tolerance = golden["tolerances"]
    for name, expected in golden["tensors"].items():
        values = _values(out[name])
        assert list(out[name].shape) == expected["shape"]
        torch.testing.assert_close(
            values[: len(expected["head"])], torch.tensor(expected["head"], dtype=torch.float64), **tolerance
        )
        assert values.abs().sum().item() == pytest.approx(expected["abs_sum"], rel=tolerance["rtol"])
