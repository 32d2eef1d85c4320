"""Parameter counts of BAGEL-7B-MoT, built on the meta device from `BagelConfig()`'s defaults (no weights, no Hub).

Where the defaults come from (`reca_hf/models/bagel/configuration_bagel.py`; the Hub is not reachable, nothing was
read from a downloaded config):

- LLM: Qwen2.5-7B (3584 wide, 28 layers, 28 heads, 4 KV heads, 18944 MLP, vocabulary 152,064, untied head), each
  layer twice (understanding and generation experts, q/k norms), as BAGEL-7B-MoT's ``llm_config.json`` describes it.
- ViT: SigLIP so400m-patch14-980 (1152 wide, 16 heads, 4304 MLP, a 70 x 70 position table) with 26 of its 27 layers,
  as the authors run it (``vit_select_layer=-2``).
- VAE: the FLUX autoencoder (128/256/512/512 channels, 2 blocks per level, 16 latent channels).
- The sin-cos tables (70 x 70 and 64 x 64, RecA's ``--max_latent_size 64``) are buffers, counted apart.

    python benchmarks/bagel_params.py                                   # the table on stdout
    python benchmarks/bagel_params.py --output benchmarks/results/bagel_params.md
"""

from __future__ import annotations

import argparse

import torch

from reca_hf.models.bagel import BagelConfig, BagelModel

TRAINED_BY_RECA = ("vae2llm", "llm2vae", "time_embedder")  # plus every *_moe_gen tensor (freeze_und, freeze_vit/vae)


def module_counts(model: BagelModel) -> dict[str, int]:
    """Parameters per part: the LLM split into its understanding and generation sides."""
    counts: dict[str, int] = {}

    def add(row: str, n: int) -> None:
        counts[row] = counts.get(row, 0) + n

    for name, parameter in model.named_parameters():
        n = parameter.numel()
        if name.startswith("language_model."):
            if "moe_gen" in name:
                add("language_model: generation experts (*_moe_gen, norm_moe_gen)", n)
            elif ".embed_tokens." in name:
                add("language_model.model.embed_tokens", n)
            elif name.startswith("language_model.lm_head"):
                add("language_model.lm_head", n)
            else:
                add("language_model: understanding experts and final norm", n)
        else:
            add({"vit_model": "vit_model (SigLIP NaViT, 26 layers)", "vae": "vae (FLUX AutoencoderKL)"}.get(
                name.split(".")[0], name.split(".")[0]), n)  # fmt: skip
    total = sum(p.numel() for p in model.parameters())
    counts["total"] = total
    counts["total without the VAE"] = total - counts["vae (FLUX AutoencoderKL)"]
    counts["active per token (total without the VAE and one expert side)"] = (
        counts["total without the VAE"] - counts["language_model: generation experts (*_moe_gen, norm_moe_gen)"]
    )
    counts["trained by RecA (generation experts, vae2llm, llm2vae, time_embedder)"] = sum(
        p.numel() for n, p in model.named_parameters() if "moe_gen" in n or n.split(".")[0] in TRAINED_BY_RECA
    )
    counts["buffers: sin-cos tables (frozen)"] = sum(b.numel() for n, b in model.named_buffers() if "pos_embed" in n)
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="also write the Markdown table to this file")
    args = parser.parse_args()
    with torch.device("meta"):
        counts = module_counts(BagelModel(BagelConfig()))
    lines = ["| part | parameters |", "|---|---:|"]
    lines += [f"| {row} | {n:,} ({n / 1e9:.3f}B) |" for row, n in counts.items()]
    text = (
        "# BAGEL-7B-MoT parameter counts (meta device, `python benchmarks/bagel_params.py`)\n\n"
        "`BagelConfig()`'s defaults (sources in the script's docstring). Not checked against downloaded configs or "
        "weights.\n\n" + "\n".join(lines) + "\n"
    )
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
