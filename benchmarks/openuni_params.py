"""Parameter counts of the two real OpenUni configurations, built on the meta device (no weights, no Hub).

    OpenUni-B-512   InternVL3-1B (InternViT-300M + Qwen2.5-0.5B) + SANA-0.6B 512 px + DC-AE f32c32
    OpenUni-L-512   InternVL3-2B (InternViT-300M + Qwen2.5-1.5B) + SANA-1.6B 512 px + DC-AE f32c32

Where each number comes from (nothing here was read from a downloaded config; the Hub is not reachable):

- InternViT-300M-448px: `transformers.InternVLVisionConfig`'s defaults, which transformers documents as the
  OpenGVLab/InternVL3-1B-hf configuration (1024 wide, 24 layers, 16 heads, 4096 MLP, 448 px, patch 14), plus
  ``attention_bias=True`` (InternViT's ``qkv_bias``, which transformers' `convert_internvl_weights_to_hf.py`
  maps to ``attention_bias``). Both InternVL3-1B and -2B use this vision tower.
- The LLMs: transformers' conversion script copies the original ``llm_config``, i.e. Qwen2.5-0.5B (896 wide, 24
  layers, 14 heads, 2 KV heads, 4864 MLP) and Qwen2.5-1.5B (1536, 28, 12, 2, 8960), with InternVL3's vocabulary
  of 151,674 (the added `<img>`/`</img>`/`<IMG_CONTEXT>` tokens; `<IMG_CONTEXT>` is 151,667). The LM head is
  built untied and reported on its own row, because whether InternVL3's checkpoints tie it was not checked.
- Connector and queries: the authors' `configs/models/openuni_{b,l}_*_512_hf.py` (6 layers, 896/1536 wide,
  3072/8960 MLP, 14/24 heads, 256 queries).
- SANA: diffusers' `scripts/convert_sana_to_diffusers.py` (`SanaMS_600M_P1_D28`: 36 x 32 heads, 28 layers,
  16 x 72 cross heads, cross dim 1152; `SanaMS_1600M_P1_D20`: 70 x 32, 20 layers, 20 x 112, 2240; both 32
  latent channels, caption 2304, MLP ratio 2.5, sample size 512 / 32 = 16).
- DC-AE f32c32-sana: diffusers' `scripts/convert_dcae_to_diffusers.py` entry for ``dc-ae-f32c32-sana-1.0``
  (the authors load ``-sana-1.1``, assumed here to share the 1.0 architecture).

    python benchmarks/openuni_params.py                                   # the table on stdout
    python benchmarks/openuni_params.py --output benchmarks/results/openuni_params.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from param_table import table  # noqa: E402

from reca_hf.models.openuni import OpenUniConfig, OpenUniModel  # noqa: E402

_VISION = {"attention_bias": True}  # InternVLVisionConfig defaults are InternViT-300M-448px's
_VOCAB = 151_674
_DC_AE = {
    "latent_channels": 32,
    "encoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "decoder_block_types": ["ResBlock"] * 3 + ["EfficientViTBlock"] * 3,
    "encoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "decoder_block_out_channels": [128, 256, 512, 512, 1024, 1024],
    "encoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "decoder_qkv_multiscales": [[], [], [], [5], [5], [5]],
    "encoder_layers_per_block": [2, 2, 2, 3, 3, 3],
    "decoder_layers_per_block": [3, 3, 3, 3, 3, 3],
    "downsample_block_type": "conv",
    "upsample_block_type": "interpolate",
    "scaling_factor": 0.41407,
}
_SANA_COMMON = {"in_channels": 32, "out_channels": 32, "caption_channels": 2304, "mlp_ratio": 2.5, "sample_size": 16}
_SCHEDULER = {
    "num_train_timesteps": 1000,
    "prediction_type": "flow_prediction",
    "use_flow_sigmas": True,
    "flow_shift": 3.0,
}

CONFIGS = {
    "OpenUni-B-512": {
        "llm": {"hidden_size": 896, "intermediate_size": 4864, "num_hidden_layers": 24, "num_attention_heads": 14},
        "connector": {"hidden_size": 896, "intermediate_size": 3072, "num_hidden_layers": 6, "num_attention_heads": 14},
        "sana": {
            "num_attention_heads": 36,
            "attention_head_dim": 32,
            "num_layers": 28,
            "num_cross_attention_heads": 16,
            "cross_attention_head_dim": 72,
            "cross_attention_dim": 1152,
        },
    },
    "OpenUni-L-512": {
        "llm": {"hidden_size": 1536, "intermediate_size": 8960, "num_hidden_layers": 28, "num_attention_heads": 12},
        "connector": {
            "hidden_size": 1536,
            "intermediate_size": 8960,
            "num_hidden_layers": 6,
            "num_attention_heads": 24,
        },
        "sana": {
            "num_attention_heads": 70,
            "attention_head_dim": 32,
            "num_layers": 20,
            "num_cross_attention_heads": 20,
            "cross_attention_head_dim": 112,
            "cross_attention_dim": 2240,
        },
    },
}


def build_config(spec: dict) -> OpenUniConfig:
    text = {"model_type": "qwen2", "vocab_size": _VOCAB, "num_key_value_heads": 2, "tie_word_embeddings": False}
    return OpenUniConfig(
        internvl_config={"text_config": text | spec["llm"], "vision_config": _VISION, "tie_word_embeddings": False},
        connector_config=spec["connector"],
        num_queries=256,
        transformer_config=_SANA_COMMON | spec["sana"],
        vae_config=_DC_AE,
        scheduler_config=_SCHEDULER,
    )


def module_counts(model: OpenUniModel) -> dict[str, int]:
    """Parameters per module, the understanding model split into its vision tower, projector, LLM and head."""
    lmm = model.lmm
    parts = {
        "lmm.model.vision_tower (InternViT)": lmm.model.vision_tower,
        "lmm.model.multi_modal_projector (mlp1)": lmm.model.multi_modal_projector,
        "lmm.model.language_model (Qwen2.5)": lmm.model.language_model,
        "lmm.lm_head": lmm.lm_head,
        "meta_queries": model.meta_queries,
        "connector (SiglipEncoder)": model.connector,
        "projector": model.projector,
        "transformer (SANA)": model.transformer,
        "vae (DC-AE)": model.vae,
    }
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    # The RecA model zoo's totals (1.6B / 3.6B) leave the autoencoder out.
    counts["total without the DC-AE"] = counts["total"] - counts["vae (DC-AE)"]
    counts["total without the DC-AE, LM head tied"] = counts["total without the DC-AE"] - counts["lmm.lm_head"]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="also write the Markdown table to this file")
    args = parser.parse_args()
    all_counts = {}
    for name, spec in CONFIGS.items():
        with torch.device("meta"):
            all_counts[name] = module_counts(OpenUniModel(build_config(spec)))
    text = (
        "# OpenUni parameter counts (meta device, `python benchmarks/openuni_params.py`)\n\n"
        "Configs written out in `benchmarks/openuni_params.py` (sources in its docstring); the LM head is counted "
        "untied. Not checked against downloaded configs or weights.\n\n" + table(all_counts) + "\n"
    )
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
