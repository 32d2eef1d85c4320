"""Convert the authors' BAGEL folder into a `BagelModel` folder.

The authors' folder (Hub ``ByteDance-Seed/BAGEL-7B-MoT``, and the RecA release ``sanaka87/BAGEL-RecA``) holds
``llm_config.json`` (Qwen2), ``vit_config.json`` (SigLIP), the model weights and ``ae.safetensors`` (the FLUX VAE),
usually with the Qwen2 tokenizer files. The weights file is ``ema.safetensors`` by default; ``--weights`` names
another (the RecA release's ``model_bf16.safetensors``, or a training checkpoint's ``model.safetensors``: the RecA
authors evaluate the raw weights, not the EMA).

The model weights map by :data:`BAGEL_KEY_MAP` (the authors' names are kept, except SigLIP's ``vision_model.``
level, the timestep embedder's ``mlp.0/2`` -> ``linear_1/2``, and the patch embedding, which the authors store as a
``Linear(3 * p * p -> hidden)`` over ``(p, q, c)``-ordered patches and the port as SigLIP's ``Conv2d``:
``W.reshape(hidden, p, p, 3).permute(0, 3, 1, 2)``). ``ae.safetensors`` maps by :func:`flux_vae_key_map` (FLUX's
names to diffusers' `AutoencoderKL`; the mid-block attention's 1x1 convolutions become linears). Every unknown,
missing and mis-shaped key of both files is named in one error (:mod:`reca_hf.conversion`) before anything is
written.

The ViT runs ``num_hidden_layers - 1`` layers of ``vit_config.json`` (the authors' ``vit_select_layer=-2``); the
position tables' sides and the VAE's widths are read off the weights; the latent patch is BAGEL's 2.
"""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

import torch

from ...conversion import KeyMap, KeyRule, MappedCheckpoint, check_checkpoint
from .configuration_bagel import FLUX_VAE_CONFIG, BagelConfig
from .modeling_bagel import BagelModel, Qwen2RotaryEmbedding

_VIT = r"vit_model\.vision_model\."


def patch_linear_to_conv(weight: torch.Tensor) -> torch.Tensor:
    """The authors' ``Linear`` patch embedding ``(hidden, p * p * 3)`` (patch pixels in ``(p, q, c)`` order) as
    SigLIP's ``Conv2d`` weight ``(hidden, 3, p, p)``; a weight of another shape is returned as is (and reported)."""
    if weight.dim() != 2 or weight.shape[1] % 3 or math.isqrt(weight.shape[1] // 3) ** 2 != weight.shape[1] // 3:
        return weight
    p = math.isqrt(weight.shape[1] // 3)
    return weight.reshape(weight.shape[0], p, p, 3).permute(0, 3, 1, 2).contiguous()


BAGEL_KEY_MAP = KeyMap(
    "bagel",
    [
        KeyRule(r"language_model\.model\.rotary_emb\.inv_freq", None, why="recomputed from the config"),
        KeyRule(r"language_model\.(model\..+|lm_head\.weight)", r"language_model.\1"),
        KeyRule(
            _VIT + r"embeddings\.patch_embedding\.weight",
            "vit_model.embeddings.patch_embedding.weight",
            patch_linear_to_conv,
        ),  # fmt: skip
        KeyRule(_VIT + r"(embeddings\.patch_embedding\.bias|embeddings\.position_embedding\.weight)", r"vit_model.\1"),
        KeyRule(_VIT + r"(encoder\.layers\.\d+\..+|post_layernorm\.(weight|bias))", r"vit_model.\1"),
        KeyRule(r"connector\.fc[12]\.(weight|bias)", r"\g<0>"),
        KeyRule(r"(vit|latent)_pos_embed\.pos_embed", r"\g<0>"),
        KeyRule(r"time_embedder\.mlp\.0\.(weight|bias)", r"time_embedder.linear_1.\1"),
        KeyRule(r"time_embedder\.mlp\.2\.(weight|bias)", r"time_embedder.linear_2.\1"),
        KeyRule(r"(vae2llm|llm2vae)\.(weight|bias)", r"\g<0>"),
    ],
)


def _conv1x1_to_linear(weight: torch.Tensor) -> torch.Tensor:
    return weight.flatten(1) if weight.dim() == 4 and weight.shape[2:] == (1, 1) else weight


def flux_vae_key_map(num_levels: int = 4) -> KeyMap:
    """FLUX's autoencoder names (``encoder.down.N.block.M``, ``decoder.up.N`` from the top resolution down, ``mid.
    attn_1`` as 1x1 convolutions) -> diffusers' `AutoencoderKL` names, for a VAE of ``num_levels`` resolutions."""
    resnet = r"(norm1|norm2|conv1|conv2)\.(weight|bias)"
    rules = [
        KeyRule(r"(encoder|decoder)\.conv_(in|out)\.(weight|bias)", r"\1.conv_\2.\3"),
        KeyRule(r"(encoder|decoder)\.norm_out\.(weight|bias)", r"\1.conv_norm_out.\2"),
        KeyRule(r"encoder\.down\.(\d+)\.block\.(\d+)\." + resnet, r"encoder.down_blocks.\1.resnets.\2.\3.\4"),
        KeyRule(
            r"encoder\.down\.(\d+)\.block\.(\d+)\.nin_shortcut\.(weight|bias)",
            r"encoder.down_blocks.\1.resnets.\2.conv_shortcut.\3",
        ),  # fmt: skip
        KeyRule(
            r"encoder\.down\.(\d+)\.downsample\.conv\.(weight|bias)", r"encoder.down_blocks.\1.downsamplers.0.conv.\2"
        ),
        KeyRule(r"(encoder|decoder)\.mid\.block_1\.(.+)", r"\1.mid_block.resnets.0.\2"),
        KeyRule(r"(encoder|decoder)\.mid\.block_2\.(.+)", r"\1.mid_block.resnets.1.\2"),
        KeyRule(r"(encoder|decoder)\.mid\.attn_1\.norm\.(weight|bias)", r"\1.mid_block.attentions.0.group_norm.\2"),
        KeyRule(
            r"(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.weight",
            r"\1.mid_block.attentions.0.to_\2.weight",
            _conv1x1_to_linear,
        ),  # fmt: skip
        KeyRule(r"(encoder|decoder)\.mid\.attn_1\.(q|k|v)\.bias", r"\1.mid_block.attentions.0.to_\2.bias"),
        KeyRule(
            r"(encoder|decoder)\.mid\.attn_1\.proj_out\.weight",
            r"\1.mid_block.attentions.0.to_out.0.weight",
            _conv1x1_to_linear,
        ),  # fmt: skip
        KeyRule(r"(encoder|decoder)\.mid\.attn_1\.proj_out\.bias", r"\1.mid_block.attentions.0.to_out.0.bias"),
    ]
    for level in range(num_levels):  # diffusers counts the decoder's blocks from the lowest resolution up
        up = f"decoder.up_blocks.{num_levels - 1 - level}."
        rules += [
            KeyRule(rf"decoder\.up\.{level}\.block\.(\d+)\." + resnet, up + r"resnets.\1.\2.\3"),
            KeyRule(
                rf"decoder\.up\.{level}\.block\.(\d+)\.nin_shortcut\.(weight|bias)", up + r"resnets.\1.conv_shortcut.\2"
            ),
            KeyRule(rf"decoder\.up\.{level}\.upsample\.conv\.(weight|bias)", up + r"upsamplers.0.conv.\1"),
        ]
    return KeyMap("bagel (ae.safetensors)", rules)


_LLM_EXTRAS = ("layer_module", "qk_norm", "freeze_und", "_attn_implementation", "architectures", "torch_dtype", "dtype")
_HINT = (
    "A BAGEL folder holds llm_config.json, vit_config.json, the model weights (language_model.*, vit_model."
    "vision_model.*, connector.*, vit_pos_embed, latent_pos_embed, time_embedder.mlp.*, vae2llm, llm2vae) and "
    "ae.safetensors (the FLUX VAE). Check that the weights file is a BAGEL MoT checkpoint (--weights) whose LLM and "
    "ViT match the two json files."
)


def _read_json(path: Path) -> dict:
    if not path.is_file():
        raise FileNotFoundError(f"convert bagel: {path} is missing; the authors' BAGEL folder has llm_config.json, "
                                "vit_config.json, ema.safetensors and ae.safetensors.")  # fmt: skip
    return json.loads(path.read_text())


def llm_config_from_json(config: dict) -> dict:
    """The Qwen2 fields of the authors' ``llm_config.json`` (a Mixture-of-Transformers config, or an error)."""
    module = config.get("layer_module", "Qwen2MoTDecoderLayer")
    if module != "Qwen2MoTDecoderLayer":
        raise ValueError(f"convert bagel: llm_config.json has layer_module={module!r}; BagelModel is the "
                         "Mixture-of-Transformers (Qwen2MoTDecoderLayer) model.")  # fmt: skip
    return {k: v for k, v in config.items() if k not in _LLM_EXTRAS}


def vit_config_from_json(config: dict, select_layer: int = -2) -> dict:
    """The SigLIP fields of ``vit_config.json``, with the layers the authors run (``num_hidden_layers + 1 +
    select_layer``: 27 -> 26 for BAGEL)."""
    config = {k: v for k, v in config.items() if k not in ("rope", "architectures", "torch_dtype", "dtype")}
    config["num_hidden_layers"] = config["num_hidden_layers"] + 1 + select_layer
    return config


def _table_side(state: dict, key: str, default: int) -> int:
    tensor = state.get(key)
    side = math.isqrt(tensor.shape[0]) if tensor is not None and tensor.dim() == 2 else 0
    return side if side and side * side == tensor.shape[0] else default


def _vae_levels(ae_state: dict) -> int:
    levels = {int(key.split(".")[2]) for key in ae_state if key.startswith("encoder.down.")}
    return max(levels) + 1 if levels else len(FLUX_VAE_CONFIG["block_out_channels"])


def vae_config_from_checkpoint(ae_state: dict) -> dict:
    """The diffusers `AutoencoderKL` config of a FLUX-style ``ae.safetensors``: widths, depth and latent channels read
    off its tensors (FLUX's where a tensor is missing, which the key check then reports); GroupNorm of 32 groups, the
    scale 0.3611 and shift 0.1159, as the authors' `load_ae` hard-codes them."""
    config = dict(FLUX_VAE_CONFIG)
    levels = _vae_levels(ae_state)
    widths = [ae_state.get(f"encoder.down.{i}.block.0.conv1.weight") for i in range(levels)]
    if all(w is not None and w.dim() == 4 for w in widths):
        config["block_out_channels"] = [int(w.shape[0]) for w in widths]
    blocks = {key.split(".")[4] for key in ae_state if key.startswith("encoder.down.0.block.")}
    config["layers_per_block"] = len(blocks) or config["layers_per_block"]
    config["down_block_types"] = ["DownEncoderBlock2D"] * levels
    config["up_block_types"] = ["UpDecoderBlock2D"] * levels
    for key, field, dim, divide in (("encoder.conv_out.weight", "latent_channels", 0, 2),
                                    ("encoder.conv_in.weight", "in_channels", 1, 1),
                                    ("decoder.conv_out.weight", "out_channels", 0, 1)):  # fmt: skip
        if (tensor := ae_state.get(key)) is not None and tensor.dim() == 4:
            config[field] = int(tensor.shape[dim]) // divide
    return config


def bagel_config_from_folder(
    folder: Path, state: dict, ae_state: dict, vae_config: dict | None = None, vit_select_layer: int = -2, **kwargs
) -> BagelConfig:
    """The `BagelConfig` of an authors' folder: its two json files, the weights' table sides and VAE widths, and
    the special-token ids of its tokenizer when it has one (else Qwen2.5's)."""
    llm = llm_config_from_json(_read_json(folder / "llm_config.json"))
    vit = vit_config_from_json(_read_json(folder / "vit_config.json"), vit_select_layer)
    vae = dict(vae_config or vae_config_from_checkpoint(ae_state))
    tokens = {}
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(folder)
        for name, token in (("im_start", "<|im_start|>"), ("im_end", "<|im_end|>"),
                            ("vision_start", "<|vision_start|>"), ("vision_end", "<|vision_end|>")):  # fmt: skip
            token_id = tokenizer.convert_tokens_to_ids(token)
            if token_id is not None and token_id != tokenizer.unk_token_id:
                tokens[f"{name}_token_id"] = token_id
    return BagelConfig(
        llm_config=llm,
        vit_config=vit,
        vae_config=vae,
        max_latent_size=_table_side(state, "latent_pos_embed.pos_embed", 64),
        vit_max_num_patch_per_side=_table_side(state, "vit_pos_embed.pos_embed", 70),
        **tokens,
        **kwargs,
    )


def map_checkpoint(state: dict, ae_state: dict) -> MappedCheckpoint:
    """Both files through their key maps into one :class:`~reca_hf.conversion.MappedCheckpoint` (the VAE's keys
    under ``vae.``, its sources named ``ae.safetensors:<key>``)."""
    mapped = BAGEL_KEY_MAP.map(state)
    vae = flux_vae_key_map(_vae_levels(ae_state)).map(ae_state, prefix="vae.")
    mapped.tensors |= vae.tensors
    mapped.sources |= {key: f"ae.safetensors:{source}" for key, source in vae.sources.items()}
    mapped.skipped += [f"ae.safetensors:{key}" for key in vae.skipped]
    mapped.unknown += [f"ae.safetensors:{key}" for key in vae.unknown]
    mapped.duplicates |= vae.duplicates
    return mapped


def convert_bagel_folder(
    folder: str | Path,
    output_dir: str | Path,
    *,
    weights: str = "ema.safetensors",
    vae_config: dict | None = None,
    dtype: torch.dtype = torch.float32,
) -> BagelModel:
    """Build a `BagelModel` from the authors' ``folder`` (see the module docstring) and save it to ``output_dir``
    (with the folder's tokenizer when it has one). ``weights`` names the model weights file in the folder (or a path);
    ``vae_config`` overrides the VAE config read off ``ae.safetensors``. Returns the model."""
    from safetensors.torch import load_file

    folder = Path(folder)
    weights_path = Path(weights) if Path(weights).is_absolute() else folder / weights
    for path in (weights_path, folder / "ae.safetensors"):
        if not path.is_file():
            raise FileNotFoundError(f"convert bagel: {path} is missing. {_HINT} (--weights names the weights file; "
                                    "the RecA release's is model_bf16.safetensors)")  # fmt: skip
    state = load_file(weights_path)
    ae_state = load_file(folder / "ae.safetensors")
    config = bagel_config_from_folder(folder, state, ae_state, vae_config)
    with torch.device("meta"):  # no random init of 14B parameters: the checkpoint's tensors are assigned
        model = BagelModel(config)
    mapped = map_checkpoint(state, ae_state)
    check_checkpoint(mapped, model.state_dict(), architecture="bagel", hint=_HINT)
    model.load_state_dict(mapped.tensors, strict=True, assign=True)
    # the RoPE frequencies are the only tensors not in a checkpoint
    model.language_model.model.rotary_emb = Qwen2RotaryEmbedding(config=config.llm_config)
    model = model.to(dtype)
    model.save_pretrained(output_dir)
    if (folder / "tokenizer_config.json").is_file() or (folder / "tokenizer.json").is_file():
        from transformers import AutoTokenizer

        AutoTokenizer.from_pretrained(folder).save_pretrained(output_dir)
    return model


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``reca convert bagel`` arguments (on ``parser`` when the CLI passes its subparser)."""
    parser = parser or argparse.ArgumentParser(
        prog="reca convert bagel", description="Convert the authors' BAGEL folder into a BagelModel folder."
    )
    parser.add_argument("folder", help="the authors' folder: llm_config.json, vit_config.json, weights, ae.safetensors")
    parser.add_argument("output_dir", help="where the BagelModel folder is written")
    parser.add_argument(
        "--weights",
        default="ema.safetensors",
        help="the model weights file in the folder (default ema.safetensors; the RecA release: model_bf16.safetensors)",
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="weight dtype of the folder")
    return parser


def run(args: argparse.Namespace) -> int:
    """Convert with the parsed arguments of :func:`build_parser`."""
    convert_bagel_folder(args.folder, args.output_dir, weights=args.weights, dtype=_DTYPES[args.dtype])
    print(f"wrote a BagelModel to {args.output_dir}")
    return 0
