"""Bring your own UMM: a small unified model defined outside reca_hf, and its RecA adapter, in one file.

The model is a plain ``torch.nn.Module`` with a dataclass config (no ``PreTrainedModel`` needed), built from
real parts: a SigLIP vision encoder reads the condition image into the image slots of a chat prompt for a small
Llama, learnable queries follow the prompt, and a per-patch MLP head predicts the flow-matching velocity of the
target image's 8x8 pixel patches from the Llama's states at the queries. ``recipe.yaml`` beside this file
names the adapter by its dotted path and trains it: ``reca train examples/custom_umm/recipe.yaml``.
See docs/adapters.md for what each attribute and method means.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import nn
from transformers import LlamaConfig, LlamaModel, SiglipVisionConfig, SiglipVisionModel

from reca_hf.adapters import GenerationTarget, LossNoise, UMMAdapter, register_adapter
from reca_hf.adapters.helpers import left_pad
from reca_hf.adapters.targets import reduce_loss
from reca_hf.images import to_pil, to_tensor, view_size
from reca_hf.testing import tiny_tokenizer

MEAN = STD = (0.5, 0.5, 0.5)  # pixels in [-1, 1]


@dataclasses.dataclass
class MyUMMConfig:
    vocab_size: int
    image_token_id: int
    condition_size: int = 16  # SigLIP input: 4-px patches, 16 condition tokens
    target_size: int = 32  # generated image: 16 patches of 8x8 pixels
    patch_size: int = 8
    hidden_size: int = 64
    model_type: str = "my_umm"  # written to config.json: how get_adapter finds MyUMMAdapter again


class MyUMM(nn.Module):
    config_class = MyUMMConfig  # what reca_hf.loading.load_module rebuilds a saved folder's config with

    def __init__(self, config: MyUMMConfig):
        super().__init__()
        self.config, h = config, config.hidden_size
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                    num_attention_heads=2, image_size=config.condition_size, patch_size=4)  # fmt: skip
        self.vision = SiglipVisionModel(vision)
        self.vision_projector = nn.Linear(vision.hidden_size, h)
        self.llm = LlamaModel(LlamaConfig(vocab_size=config.vocab_size, hidden_size=h, intermediate_size=2 * h,
                                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2))  # fmt: skip
        self.queries = nn.Parameter(torch.randn((config.target_size // config.patch_size) ** 2, h) * 0.02)
        width = 3 * config.patch_size**2
        self.head = nn.Sequential(nn.Linear(width + h + 1, 4 * h), nn.SiLU(), nn.Linear(4 * h, 4 * h), nn.SiLU(),
                                  nn.Linear(4 * h, width))  # fmt: skip

    def states(self, input_ids, attention_mask, condition_pixel_values=None) -> torch.Tensor:
        """The Llama's states at the queries, after a prompt whose image slots hold the condition features."""
        embeddings = self.llm.embed_tokens(input_ids)
        if condition_pixel_values is not None:
            features = self.vision_projector(self.vision(pixel_values=condition_pixel_values).last_hidden_state)
            slots = (input_ids == self.config.image_token_id).unsqueeze(-1)
            embeddings = embeddings.masked_scatter(slots, features.to(embeddings.dtype))
        queries = self.queries.expand(len(input_ids), -1, -1)
        mask = torch.cat([attention_mask, attention_mask.new_ones(queries.shape[:2])], dim=1)
        hidden = self.llm(inputs_embeds=torch.cat([embeddings, queries], dim=1), attention_mask=mask,
                          position_ids=(mask.cumsum(-1) - 1).clamp(min=0)).last_hidden_state  # fmt: skip
        return hidden[:, -queries.shape[1] :]

    def velocity(self, noisy: torch.Tensor, sigmas: torch.Tensor, states: torch.Tensor) -> torch.Tensor:
        sigma = sigmas.view(-1, 1, 1).expand(-1, noisy.shape[1], 1).to(noisy.dtype)
        return self.head(torch.cat([noisy, states.to(noisy.dtype), sigma], dim=-1))

    def patchify(self, pixels: torch.Tensor) -> torch.Tensor:  # (B, 3, H, W) -> (B, patches, 3 p^2)
        return nn.functional.unfold(pixels, self.config.patch_size, stride=self.config.patch_size).transpose(1, 2)

    def unpatchify(self, patches: torch.Tensor) -> torch.Tensor:
        size, p = self.config.target_size, self.config.patch_size
        return nn.functional.fold(patches.transpose(1, 2), (size, size), p, stride=p)


def build_tiny_my_umm(seed: int = 0):
    """``tiny:my_umm``: a random MyUMM (about 0.3M parameters) and its tokenizer, built in code."""
    tokenizer = tiny_tokenizer()
    torch.manual_seed(seed)
    image_token_id = tokenizer.convert_tokens_to_ids(tokenizer.image_token)
    return MyUMM(MyUMMConfig(vocab_size=len(tokenizer), image_token_id=image_token_id)), tokenizer


@register_adapter(tiny=build_tiny_my_umm)
class MyUMMAdapter(UMMAdapter):
    name = "my_umm"
    model_types = ("my_umm",)
    model_class = "my_umm.MyUMM"  # the default load() rebuilds a saved folder: config.json + model.safetensors
    condition_space = "siglip"
    generation_space = "pixels"
    condition_relation = "separate"  # SigLIP in, pixels out: nothing to copy
    generation_target = GenerationTarget("flow")
    min_condition_resolution = 16
    native_generation_resolution = 32
    parameter_sharing = "decoupled"  # the frozen Llama only reads; queries and head learn to generate
    understanding_modules = ("vision", "vision_projector")
    generation_modules = ("queries", "head")
    shared_modules = ("llm",)
    tokenizer_modules = ()  # pixels: no image tokenizer
    default_freeze = ("vision", "vision_projector", "llm")
    null_prompt = ""
    default_cond_dropout_prob = 0.1
    lora_generation_targets = (r"head\.\d+",)
    num_steps = 10  # Euler steps of reconstruct()

    def config_min_condition_resolution(self) -> int:
        return self.config.condition_size

    def config_native_generation_resolution(self) -> int:
        return self.config.target_size

    def generation_resolution_errors(self, resolution: int) -> list[str]:
        return [] if resolution == self.config.target_size else [f"this model generates {self.config.target_size} px"]

    def condition_resolution_errors(self, resolution: int) -> list[str]:
        return [] if resolution % 4 == 0 else ["must be a multiple of SigLIP's patch size 4"]

    def prepare(self, condition_images, target_images, instructions) -> dict[str, torch.Tensor]:
        tokenizer = self.text_tokenizer()
        slots = tokenizer.image_token * (view_size(condition_images[0])[0] // 4) ** 2
        prompts = [f"<|User|>: {tokenizer.boi_token}{slots}{tokenizer.eoi_token} {text}\n\n<|Assistant|>:"
                   for text in instructions]  # fmt: skip
        input_ids, attention_mask = left_pad([tokenizer(p)["input_ids"] for p in prompts], tokenizer.pad_token_id)
        batch = {"input_ids": input_ids, "attention_mask": attention_mask,
                 "condition_pixel_values": to_tensor(condition_images, MEAN, STD)}  # fmt: skip
        if target_images is not None:
            batch["target_pixel_values"] = to_tensor(target_images, MEAN, STD)
        return batch

    def loss(self, model, batch, *, reduction: str = "mean", noise: LossNoise | None = None) -> torch.Tensor:
        """Rectified flow on pixel patches: x_t = (1 - s) x0 + s eps, predict eps - x0, MSE per sample."""
        states = model.states(batch["input_ids"], batch["attention_mask"], batch["condition_pixel_values"])
        x0 = model.patchify(batch["target_pixel_values"].float())
        generator = noise.generator(x0.device) if noise is not None else None
        sigmas = noise.levels(len(x0), x0.device) if noise is not None else None
        if sigmas is None:
            sigmas = torch.rand(len(x0), device=x0.device, generator=generator)
        eps = torch.randn(x0.shape, device=x0.device, generator=generator)
        noisy = (1 - sigmas.view(-1, 1, 1)) * x0 + sigmas.view(-1, 1, 1) * eps
        error = model.velocity(noisy, sigmas, states).float() - (eps - x0)
        return reduce_loss(error.pow(2).flatten(1).mean(1), reduction)

    def sample_codes(self, model, conditions, instructions, views, guidance, do_sample, temperature, generator):
        """Euler steps from noise (sigma 1) to patches (sigma 0); no guidance in this small example."""
        batch = {k: v.to(model.queries.device) for k, v in self.prepare(conditions, None, instructions).items()}
        states = model.states(batch["input_ids"], batch["attention_mask"], batch["condition_pixel_values"])
        width = 3 * model.config.patch_size**2
        x = torch.randn((len(conditions), states.shape[1], width), device=states.device, generator=generator)
        sigmas = torch.linspace(1.0, 0.0, self.num_steps + 1, device=states.device)
        for sigma, next_sigma in zip(sigmas[:-1], sigmas[1:]):
            x = x + (next_sigma - sigma) * model.velocity(x, sigma.expand(len(x)), states)
        return x

    def decode_codes(self, model, codes: torch.Tensor):
        return to_pil(model.unpatchify(codes).clamp(-1, 1), MEAN, STD)
