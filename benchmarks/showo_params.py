"""Parameter counts of the real Show-o configurations, built on the meta device (no weights, no Hub).

    show-o, show-o-512x512                        Phi-1.5 + MAGVIT-v2 (VQ variant; 256 or 1024 codes per image)
    show-o-w-clip-vit, show-o-w-clip-vit-512x512  the same + CLIP ViT-L/14-336 + mm_projector

Where each number comes from (nothing was read from a downloaded config; the Hub is not reachable):

- Phi-1.5: `transformers.PhiConfig`'s defaults (2048 wide, 24 layers, 32 heads, 8192 MLP, rotary on half of each
  head), which are microsoft/phi-1_5's architecture; Show-o's vocabulary of 58,498 (50,295 text + 10 special +
  8,192 codes + 1 mask, the released ``config.json``) and per-head ``q_layernorm`` / ``k_layernorm`` (Show-o's Phi
  always builds them). The LM head is untied, with a bias, as Phi's.
- MAGVIT-v2: the authors' `Show-o/models/modeling_magvitv2.py` defaults (`MAGVITv2()` takes no arguments): ch 128,
  encoder ``[1, 2, 2, 4, 4]`` x ``[4, 3, 4, 3, 4]`` blocks, decoder ``[1, 1, 2, 2, 4]`` x ``[4, 4, 3, 4, 3]``, 13 bits.
- CLIP ViT-L/14-336: openai/clip-vit-large-patch14-336's architecture (1024 wide, 24 layers, 16 heads, 4096 MLP,
  336 px, patch 14); the projector Linear(1024, 2048)-GELU-Linear(2048, 2048), as the authors'.

The 256- and 512-px models have the same parameters (positions are rotary). Only the LLM and the projector train in
RecA (MAGVIT-v2 and CLIP are frozen).

    python benchmarks/showo_params.py                                    # the table on stdout
    python benchmarks/showo_params.py --output benchmarks/results/showo_params.md
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from param_table import table  # noqa: E402

from reca_hf.models.showo import ShowoConfig, ShowoModel  # noqa: E402

CONFIGS = {
    "show-o (VQ, 256 / 512 px)": ShowoConfig(),
    "show-o-w-clip-vit (256 / 512 px)": ShowoConfig(w_clip_vit=True),
}


def module_counts(model: ShowoModel) -> dict[str, int]:
    """Parameters per module; the trainable share is what RecA updates (Phi and the projector)."""
    phi = model.showo
    parts = {
        "showo.model.embed_tokens": phi.model.embed_tokens,
        "showo.model (layers and final norm)": torch.nn.ModuleList([*phi.model.layers, phi.model.final_layernorm]),
        "showo.lm_head": phi.lm_head,
        "vq_model (MAGVIT-v2)": model.vq_model,
        "vision_tower (CLIP ViT-L/14-336)": getattr(model, "vision_tower", torch.nn.Module()),
        "mm_projector": getattr(model, "mm_projector", torch.nn.Module()),
    }
    counts = {name: sum(p.numel() for p in module.parameters()) for name, module in parts.items()}
    counts["total"] = sum(p.numel() for p in model.parameters())
    counts["trained in RecA (Phi + projector)"] = sum(p.numel() for p in phi.parameters()) + counts["mm_projector"]
    return counts


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", help="also write the Markdown table to this file")
    args = parser.parse_args()
    all_counts = {}
    for name, config in CONFIGS.items():
        with torch.device("meta"):
            all_counts[name] = module_counts(ShowoModel(config))
    text = (
        "# Show-o parameter counts (meta device, `python benchmarks/showo_params.py`)\n\n"
        "Configs in `benchmarks/showo_params.py` (sources in its docstring). Not checked against downloaded configs "
        "or weights.\n\n" + table(all_counts) + "\n"
    )
    print(text)
    if args.output:
        with open(args.output, "w") as handle:
            handle.write(text)


if __name__ == "__main__":
    main()
