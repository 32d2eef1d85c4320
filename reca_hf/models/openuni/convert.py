"""Convert the authors' released OpenUni state dicts into an `OpenUniModel` folder.

The released ``.pth`` files (Hub ``wusize/openuni``, and the RecA releases) are xtuner/mmengine state dicts
that the authors load with ``strict=False`` on top of a model that already holds the public InternVL3 and
SANA weights. So the folder is built from three public sources plus the checkpoint:

- ``--internvl``: an InternVL3 checkpoint in transformers' layout (``OpenGVLab/InternVL3-1B-hf`` / ``-2B-hf``);
- ``--sana``: a diffusers SANA pipeline folder (its ``transformer/`` and ``scheduler/``);
- ``--dc-ae``: the DC-AE autoencoder (the authors': ``mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers``);
- the checkpoint, whose keys map as follows (every other key is refused, by name):

  ============================  =========================================  =========================
  checkpoint key                OpenUniModel key                           required
  ============================  =========================================  =========================
  ``meta_queries``              ``meta_queries.weight``                    yes
  ``connector.layers.N.*``      ``connector.layers.N.*`` (same names)      yes, every layer's keys
  ``projector.{weight,bias}``   ``projector.{weight,bias}``                yes
  ``transformer.*``             ``transformer.*`` (diffusers names)        all or none (none: SANA's)
  ``vae.*``                     ``vae.*`` (diffusers names)                all or none (none: DC-AE's)
  ``lmm.*``                     skipped: InternVL is frozen in every       no
                                stage of the authors' training, so these
                                are the ``--internvl`` weights in the
                                remote-code layout
  ============================  =========================================  =========================

The connector's shape comes from the checkpoint; its head count cannot (the authors' configs use 64-wide
heads: 14 for OpenUni-B, 24 for OpenUni-L), so it defaults to ``hidden_size // 64``.
"""

from __future__ import annotations

import argparse
import logging
import re
from pathlib import Path

import torch

from .configuration_openuni import OpenUniConfig
from .modeling_openuni import OpenUniModel

DEFAULT_DC_AE = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
_CONNECTOR_KEY = re.compile(
    r"connector\.layers\.(\d+)\."
    r"(layer_norm[12]\.(weight|bias)|self_attn\.(q|k|v|out)_proj\.(weight|bias)|mlp\.fc[12]\.(weight|bias))"
)
_CONNECTOR_HEAD_DIM = 64
logger = logging.getLogger(__name__)


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a released ``.pth`` (a bare state dict, or mmengine's ``{"state_dict": ...}``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"convert openuni: {path} holds a {type(state).__name__}, not a state dict.")
    return state


def map_checkpoint_keys(
    checkpoint: dict[str, torch.Tensor], model_keys: set[str]
) -> tuple[dict[str, torch.Tensor], list[str]]:
    """Apply the key map; return the OpenUniModel-named tensors and the skipped ``lmm.*`` keys.

    Raises ``ValueError`` naming every unrecognised checkpoint key and every required key it leaves missing.
    """
    mapped, skipped, unknown = {}, [], []
    for key, tensor in checkpoint.items():
        if key == "meta_queries":
            mapped["meta_queries.weight"] = tensor
        elif key.startswith("lmm."):
            skipped.append(key)
        elif key in ("projector.weight", "projector.bias") or _CONNECTOR_KEY.fullmatch(key):
            mapped[key] = tensor
        elif key.split(".", 1)[0] in ("transformer", "vae") and key in model_keys:
            mapped[key] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(
            f"convert openuni: {len(unknown)} checkpoint keys are not in the OpenUni key map: "
            f"{_listing(unknown)}. Known: meta_queries, connector.layers.N.*, projector.*, transformer.* and "
            "vae.* (diffusers names), lmm.*."
        )
    required = {k for k in model_keys if k.split(".", 1)[0] in ("meta_queries", "connector", "projector")}
    for part in ("transformer", "vae"):
        if any(k.startswith(f"{part}.") for k in mapped):
            required |= {k for k in model_keys if k.startswith(f"{part}.")}
    missing = sorted(required - mapped.keys())
    if missing:
        raise ValueError(
            f"convert openuni: the checkpoint lacks {len(missing)} keys the model needs: {_listing(missing)}. "
            "A checkpoint must hold meta_queries, every connector layer and the projector, and either all "
            "or none of transformer.* / vae.*."
        )
    return mapped, skipped


def _listing(keys: list[str], limit: int = 10) -> str:
    shown = ", ".join(repr(k) for k in keys[:limit])
    return shown + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def connector_config_from_checkpoint(checkpoint: dict[str, torch.Tensor], num_attention_heads: int | None) -> dict:
    """The connector's SigLIP encoder settings, read off the checkpoint's tensor shapes."""
    layers = {int(m.group(1)) for k in checkpoint if (m := _CONNECTOR_KEY.fullmatch(k))}
    if not layers:
        raise ValueError("convert openuni: the checkpoint has no connector.layers.N.* keys; is it an OpenUni one?")
    if (fc1 := checkpoint.get("connector.layers.0.mlp.fc1.weight")) is None:
        raise ValueError(
            "convert openuni: the checkpoint lacks 'connector.layers.0.mlp.fc1.weight', which gives the "
            "connector's widths; is it a complete OpenUni state dict?"
        )
    hidden_size = fc1.shape[1]
    return {
        "hidden_size": hidden_size,
        "intermediate_size": fc1.shape[0],
        "num_hidden_layers": max(layers) + 1,
        "num_attention_heads": num_attention_heads or hidden_size // _CONNECTOR_HEAD_DIM,
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    }


def _diffusers_config(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def convert_openuni_checkpoint(
    checkpoint: str | Path | dict[str, torch.Tensor],
    internvl: str,
    sana: str,
    output_dir: str | Path,
    *,
    dc_ae: str = DEFAULT_DC_AE,
    connector_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> OpenUniModel:
    """Build an `OpenUniModel` from the public parts and the authors' ``checkpoint``; save it to ``output_dir``.

    ``internvl``, ``sana`` and ``dc_ae`` are Hub ids or local folders (see the module docstring). The
    InternVL tokenizer is saved alongside, so the folder is self-contained for prompts. Returns the model.
    """
    from diffusers import AutoencoderDC, DPMSolverMultistepScheduler, SanaTransformer2DModel
    from transformers import AutoTokenizer, InternVLForConditionalGeneration

    state = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else dict(checkpoint)
    lmm = InternVLForConditionalGeneration.from_pretrained(internvl, dtype=dtype)
    transformer = SanaTransformer2DModel.from_pretrained(sana, subfolder="transformer", torch_dtype=dtype)
    scheduler_config = DPMSolverMultistepScheduler.load_config(sana, subfolder="scheduler")
    vae = AutoencoderDC.from_pretrained(dc_ae, torch_dtype=dtype)
    vae_factor = 2 ** (len(vae.config.encoder_block_out_channels) - 1)
    config = OpenUniConfig(
        internvl_config=lmm.config.to_dict(),
        connector_config=connector_config_from_checkpoint(state, connector_heads),
        num_queries=state["meta_queries"].shape[0] if "meta_queries" in state else 256,
        transformer_config=_diffusers_config(transformer.config),
        vae_config=_diffusers_config(vae.config),
        scheduler_config=_diffusers_config(scheduler_config),
        vit_input_size=lmm.config.vision_config.image_size[0],
        image_size=transformer.config.sample_size * vae_factor,
    )
    model = OpenUniModel(config).to(dtype)
    public = {f"lmm.{k}": v for k, v in lmm.state_dict().items()}
    public |= {f"transformer.{k}": v for k, v in transformer.state_dict().items()}
    public |= {f"vae.{k}": v for k, v in vae.state_dict().items()}
    mapped, skipped = map_checkpoint_keys(state, set(model.state_dict()))
    if skipped:
        logger.info("convert openuni: skipped %d lmm.* keys; InternVL comes from %s", len(skipped), internvl)
    model.load_state_dict(public | mapped, strict=True)
    model.save_pretrained(output_dir)
    AutoTokenizer.from_pretrained(internvl).save_pretrained(output_dir)
    return model


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``reca convert openuni`` arguments (on ``parser`` when the CLI passes its subparser)."""
    parser = parser or argparse.ArgumentParser(
        prog="reca convert openuni", description="Convert a released OpenUni .pth into an OpenUniModel folder."
    )
    parser.add_argument("checkpoint", help="the authors' .pth state dict")
    parser.add_argument("output_dir", help="where the OpenUniModel folder is written")
    parser.add_argument(
        "--internvl", required=True, help="InternVL3 in transformers' layout, e.g. OpenGVLab/InternVL3-1B-hf"
    )
    parser.add_argument(
        "--sana", required=True, help="SANA diffusers pipeline, e.g. Efficient-Large-Model/Sana_600M_512px_diffusers"
    )
    parser.add_argument("--dc-ae", default=DEFAULT_DC_AE, help=f"the DC-AE autoencoder (default: {DEFAULT_DC_AE})")
    parser.add_argument(
        "--connector-heads", type=int, default=None, help="connector attention heads (default: hidden_size // 64)"
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="weight dtype of the folder")
    return parser


def main(argv: list[str] | None = None) -> int:
    """``reca convert openuni CHECKPOINT.pth --internvl ID --sana ID OUTPUT_DIR``."""
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Convert with the parsed arguments of :func:`build_parser`."""
    convert_openuni_checkpoint(
        args.checkpoint,
        args.internvl,
        args.sana,
        args.output_dir,
        dc_ae=args.dc_ae,
        connector_heads=args.connector_heads,
        dtype=_DTYPES[args.dtype],
    )
    print(f"wrote an OpenUniModel to {args.output_dir}")
    return 0
