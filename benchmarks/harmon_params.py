"""Parameter counts of the two real Harmon configurations, built on the meta device (no weights, no Hub).

    Harmon-0.5B   Qwen2.5-0.5B-Instruct + MAR-B (768 wide, 12 + 12 layers, diffusion head 6 x 1024) + kl16 VAE
    Harmon-1.5B   Qwen2.5-1.5B-Instruct + MAR-H (1280 wide, 20 + 20 layers, diffusion head 12 x 1536) + kl16 VAE

Where each number comes from (nothing here was read from a downloaded config): the MAR sizes, buffer (64), table
size (img_size 256 / stride 16) and diffusion heads are the authors' `configs/models/qwen2_5_{0_5b_kl16_mar_b,
1_5b_kl16_mar_h}.py`; the LLMs are Qwen2.5-0.5B/1.5B-Instruct's published configs (`HarmonConfig.harmon_0_5b` /
`harmon_1_5b`, vocabulary 151,936, embeddings tied, so the LM head adds no parameters); the VAE is MAR's kl16
(`AutoencoderKL(embed_dim=16, ch_mult=(1, 1, 2, 2, 4))`, ch 128) as `KL16_VAE_CONFIG`.

    python benchmarks/harmon_params.py                                   # the table on stdout
    python benchmarks/harmon_params.py --output benchmarks/results/harmon_params.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from param_table import table  # noqa: E402

from reca_hf.models.harmon import HarmonConfig, HarmonModel  # noqa: E402

CONFIGS = {"Harmon-0.5B": HarmonConfig.harmon_0_5b, "Harmon-1.5B": HarmonConfig.harmon_1_5b}


def module_counts(model: HarmonModel) -> dict[str, int]:
    """Parameters per part; the MAR split into encoder (shared), decoder and diffusion head."""
    mar = model.mar

    def count(*modules) -> int:
        return sum(p.numel() for m in modules for p in (m.parameters() if hasattr(m, "parameters") else [m]))

    counts = {
        "llm (Qwen2.5, LM head tied)": count(model.llm),
        "mar encoder (z_proj, buffers/fake latent, position table, blocks, norm)": count(
            mar.z_proj, mar.z_proj_ln, mar.fake_latent, mar.encoder_pos_embed_learned, mar.encoder_blocks,
            mar.encoder_norm,
        ),
        "mar decoder (embed, mask token, position tables, blocks, norm)": count(
            mar.decoder_embed, mar.mask_token, mar.decoder_pos_embed_learned, mar.decoder_blocks, mar.decoder_norm,
            mar.diffusion_pos_embed_learned,
        ),
        "mar.diffloss (AdaLN MLP)": count(mar.diffloss),
        "mar.class_emb (unused by Harmon)": count(mar.class_emb),
        "proj_in": count(model.proj_in),
        "proj_out": count(model.proj_out),
        "vae (kl16, frozen)": count(model.vae),
    }  # fmt: skip
    counts["total"] = sum(p.numel() for p in model.parameters())
    counts["trainable in RecA (all but the VAE)"] = counts["total"] - counts["vae (kl16, frozen)"]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="also write the Markdown table to this file")
    args = parser.parse_args()
    all_counts = {}
    for name, make in CONFIGS.items():
        with torch.device("meta"):
            model = HarmonModel(make())
        all_counts[name] = module_counts(model)
    text = (
        "# Harmon parameter counts (meta device, `python benchmarks/harmon_params.py`)\n\n"
        "Configs from the authors' model configs and Qwen2.5's published ones (sources in the script's docstring). "
        "Not checked against downloaded weights.\n\n" + table(all_counts, "part") + "\n"
    )
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
