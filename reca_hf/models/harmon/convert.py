"""Convert the authors' released Harmon weights into a `HarmonModel` folder.

The authors publish two files per model (Hub ``wusize/harmon``; the RecA releases use the same ``.pth`` layout):

- ``harmon_0.5b.pth`` / ``harmon_1.5b.pth``: the state dict of their ``Harmon`` module without ``vae.*``, keys
  ``llm.model.*``, ``llm.lm_head.weight``, ``mar.*``, ``proj_in.*``, ``proj_out.*``. reca_hf keeps the authors'
  module names, so these keys map by identity (:data:`HARMON_KEY_MAP`);
- ``kl16.ckpt``: ``{"model": <LDM KL-VAE state dict>}``, mapped to `diffusers.AutoencoderKL` by
  :data:`KL16_KEY_MAP`. diffusers' own converter (``convert_ldm_vae_checkpoint``) files the attention of the
  encoder's last level (``encoder.down.4.attn.{0,1}``) as resnets; here it goes to ``attentions.{0,1}`` with the
  1x1 convolutions reshaped to linear weights. The LDM training loss's keys (``loss.*``), if present, are skipped.

The configuration comes from the checkpoint's shapes (MAR widths, depths, buffer and table sizes, the diffusion
head, the VAE's levels); what shapes cannot tell comes from the authors' configs: the MAR head count (12 for a
768-wide MAR-B, 16 for MAR-H's 1280; ``--mar-heads`` otherwise), 100 sampling steps, ``diffusion_batch_mul`` 4.
The LLM's config comes from ``--llm`` (a Qwen2.5-*-Instruct folder or Hub id; its tokenizer is saved alongside,
with the authors' ``<image>`` token added) or, without it, from the Qwen2.5-0.5B/1.5B-Instruct presets picked by
the checkpoint's LLM width. Every unknown, missing and mis-shaped key of both files is named in one error
(:mod:`reca_hf.conversion`) before anything is written.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

import torch

from ...conversion import KeyMap, KeyRule, MappedCheckpoint, check_checkpoint
from .configuration_harmon import QWEN25_0_5B, QWEN25_1_5B, QWEN25_IMAGE_TOKEN_ID, HarmonConfig
from .modeling_harmon import HarmonModel

_MAR_HEADS = {768: 12, 1024: 16, 1280: 16}  # mar_base, mar_large, mar_huge
_QWEN_PRESETS = {896: QWEN25_0_5B, 1536: QWEN25_1_5B}
_HINT = (
    "Pass the authors' harmon_*.pth (or a RecA release in that format) and the MAR kl16.ckpt; "
    "see `reca convert harmon --help`."
)

# (LDM name, diffusers name) of every VAE tensor family; {i}/{j} are block indices, {p} weight or bias, and the
# third field marks 1x1 convolutions that diffusers holds as linear layers. {up} is filled per decoder level.
_RESNET = ("norm1", "conv1", "norm2", "conv2")
_ATTENTION = (("norm", "group_norm", False), ("q", "to_q", True), ("k", "to_k", True), ("v", "to_v", True))
_ATTENTION += (("proj_out", "to_out.0", True),)


def _vae_pairs(levels: int) -> list[tuple[str, str, bool]]:
    pairs = [(f"{name}.{{p}}", f"{name}.{{p}}", False) for name in ("quant_conv", "post_quant_conv")]
    for part in ("encoder", "decoder"):
        pairs += [(f"{part}.conv_in.{{p}}", f"{part}.conv_in.{{p}}", False)]
        pairs += [(f"{part}.norm_out.{{p}}", f"{part}.conv_norm_out.{{p}}", False)]
        pairs += [(f"{part}.conv_out.{{p}}", f"{part}.conv_out.{{p}}", False)]
        for ldm, index in (("block_1", 0), ("block_2", 1)):
            pairs += [
                (f"{part}.mid.{ldm}.{n}.{{p}}", f"{part}.mid_block.resnets.{index}.{n}.{{p}}", False) for n in _RESNET
            ]
        pairs += [
            (f"{part}.mid.attn_1.{a}.{{p}}", f"{part}.mid_block.attentions.0.{b}.{{p}}", c) for a, b, c in _ATTENTION
        ]
    down, enc = "encoder.down.{i}", "encoder.down_blocks.{i}"
    pairs += [(f"{down}.block.{{j}}.{n}.{{p}}", f"{enc}.resnets.{{j}}.{n}.{{p}}", False) for n in _RESNET]
    pairs += [(f"{down}.block.{{j}}.nin_shortcut.{{p}}", f"{enc}.resnets.{{j}}.conv_shortcut.{{p}}", False)]
    pairs += [(f"{down}.attn.{{j}}.{a}.{{p}}", f"{enc}.attentions.{{j}}.{b}.{{p}}", c) for a, b, c in _ATTENTION]
    pairs += [(f"{down}.downsample.conv.{{p}}", f"{enc}.downsamplers.0.conv.{{p}}", False)]
    for level in range(levels):  # the LDM decoder counts levels from the finest, diffusers from the coarsest
        up, dec = f"decoder.up.{level}", f"decoder.up_blocks.{levels - 1 - level}"
        pairs += [(f"{up}.block.{{j}}.{n}.{{p}}", f"{dec}.resnets.{{j}}.{n}.{{p}}", False) for n in _RESNET]
        pairs += [(f"{up}.block.{{j}}.nin_shortcut.{{p}}", f"{dec}.resnets.{{j}}.conv_shortcut.{{p}}", False)]
        pairs += [(f"{up}.upsample.conv.{{p}}", f"{dec}.upsamplers.0.conv.{{p}}", False)]
    return pairs


_FIELDS = {"i": r"(\d+)", "j": r"(\d+)", "p": r"(weight|bias)"}


def _pattern(name: str) -> str:
    escaped = re.escape(name).replace(r"\{", "{").replace(r"\}", "}")
    return escaped.format(**_FIELDS)


def _template(name: str) -> str:
    fields = re.findall(r"{(\w)}", name)
    return name.format(**{field: f"\\{n + 1}" for n, field in enumerate(fields)})


def _to_linear(tensor: torch.Tensor) -> torch.Tensor:
    """A 1x1 convolution's ``(out, in, 1, 1)`` weight as a linear ``(out, in)`` one (biases pass unchanged)."""
    return tensor.reshape(tensor.shape[0], -1) if tensor.ndim == 4 else tensor


def _to_conv(tensor: torch.Tensor) -> torch.Tensor:
    return tensor[:, :, None, None] if tensor.ndim == 2 else tensor


def kl16_key_map(levels: int = 5, source_prefix: str = "", target_prefix: str = "") -> KeyMap:
    """LDM KL-VAE keys (``encoder.down.N...``) -> `diffusers.AutoencoderKL` keys, for ``levels`` resolutions."""
    rules = [
        KeyRule(
            re.escape(source_prefix) + _pattern(ldm),
            target_prefix + _template(hf),
            _to_linear if conv1x1 else None,
        )
        for ldm, hf, conv1x1 in _vae_pairs(levels)
    ]
    rules.append(
        KeyRule(re.escape(source_prefix) + r"loss\..+", None, why="the LDM training loss, not the autoencoder")
    )
    return KeyMap("harmon", rules)


KL16_KEY_MAP = kl16_key_map(5, target_prefix="vae.")
HARMON_KEY_MAP = KeyMap(
    "harmon",
    [
        KeyRule(r"(llm\.(?:model\..+|lm_head\.weight))", r"\1"),
        KeyRule(r"(mar\..+)", r"\1"),
        KeyRule(r"(proj_(?:in|out)\.[02]\.(?:weight|bias))", r"\1"),
    ],
)


def ldm_vae_state_dict(vae) -> dict[str, torch.Tensor]:
    """A `diffusers.AutoencoderKL`'s weights under the LDM names of ``kl16.ckpt`` (the inverse of the VAE map)."""
    inverse = KeyMap(
        "harmon",
        [
            KeyRule(_pattern(hf), _template(ldm), _to_conv if conv1x1 else None)
            for ldm, hf, conv1x1 in _vae_pairs(len(vae.config.block_out_channels))
        ],
    )
    mapped = inverse.map(vae.state_dict())
    if mapped.unknown:
        raise ValueError(f"ldm_vae_state_dict: no LDM name for {mapped.unknown}")
    return mapped.tensors


def authors_state_dicts(model: HarmonModel) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """``model``'s weights in the authors' two layouts: the ``.pth`` state dict (no ``vae.*``) and the LDM
    state dict of ``kl16.ckpt`` (without its ``{"model": ...}`` wrapper). The inverse of the two key maps."""
    pth = {k: v for k, v in model.state_dict().items() if not k.startswith("vae.")}
    return pth, ldm_vae_state_dict(model.vae)


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """A state dict from a ``.pth`` / ``.ckpt`` file, unwrapped from ``{"model": ...}`` or ``{"state_dict": ...}``."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    for wrapper in ("model", "state_dict", "module"):
        if isinstance(state, dict) and isinstance(state.get(wrapper), dict):
            state = state[wrapper]
    return state


def _count(state: dict, pattern: str) -> int:
    return len({m.group(1) for key in state if (m := re.fullmatch(pattern, key))})


def _need(state: dict, key: str, source: str) -> torch.Tensor:
    if key not in state:
        raise ValueError(f"convert harmon: {source} has no {key!r}, so its configuration cannot be read; {_HINT}")
    return state[key]


def vae_config_from_checkpoint(vae: dict[str, torch.Tensor]) -> dict:
    """The `diffusers.AutoencoderKL` config of an LDM KL-VAE state dict (levels, widths, resnets, attention)."""
    levels = _count(vae, r"encoder\.down\.(\d+)\..+")
    widths = [int(_need(vae, f"encoder.down.{i}.block.0.conv1.weight", "kl16.ckpt").shape[0]) for i in range(levels)]
    attention = {int(m.group(1)) for key in vae if (m := re.fullmatch(r"encoder\.down\.(\d+)\.attn\..+", key))}
    latent = int(_need(vae, "post_quant_conv.weight", "kl16.ckpt").shape[0])
    return {
        "in_channels": int(_need(vae, "encoder.conv_in.weight", "kl16.ckpt").shape[1]),
        "out_channels": int(_need(vae, "decoder.conv_out.weight", "kl16.ckpt").shape[0]),
        "latent_channels": latent,
        "block_out_channels": widths,
        "layers_per_block": _count(vae, r"encoder\.down\.0\.block\.(\d+)\..+"),
        "down_block_types": [
            "AttnDownEncoderBlock2D" if i in attention else "DownEncoderBlock2D" for i in range(levels)
        ],
        "up_block_types": ["UpDecoderBlock2D"] * levels,
        "norm_num_groups": 32,
        "scaling_factor": 0.2325,
        "force_upcast": False,
    }


def harmon_config_from_checkpoint(
    state: dict[str, torch.Tensor], vae_config: dict, *, llm_config: dict | None = None, mar_heads: int | None = None
) -> HarmonConfig:
    """A `HarmonConfig` read off the ``.pth``'s shapes (see the module docstring for what is not in them)."""
    source = "the checkpoint"
    embed = _need(state, "llm.model.embed_tokens.weight", source)
    if llm_config is None:
        width = int(embed.shape[1])
        if width not in _QWEN_PRESETS:
            raise ValueError(
                f"convert harmon: the checkpoint's LLM is {width} wide, not Qwen2.5-0.5B's 896 or 1.5B's 1536; pass "
                "--llm with the Qwen2 it was trained from."
            )
        llm_config = dict(_QWEN_PRESETS[width])
    enc = int(_need(state, "mar.z_proj.weight", source).shape[0])
    dec = int(_need(state, "mar.decoder_embed.weight", source).shape[0])
    heads = mar_heads or _MAR_HEADS.get(enc)
    if heads is None:
        raise ValueError(
            f"convert harmon: a {enc}-wide MAR is none of the authors' (768, 1024, 1280), so its head count is "
            "unknown; pass --mar-heads."
        )
    seq_len = int(_need(state, "mar.diffusion_pos_embed_learned", source).shape[1])
    side = round(seq_len**0.5)
    stride = 16
    return HarmonConfig(
        llm_config=llm_config,
        vae_config=vae_config,
        img_size=side * stride,
        vae_stride=stride,
        vae_embed_dim=vae_config["latent_channels"],
        encoder_embed_dim=enc,
        encoder_depth=_count(state, r"mar\.encoder_blocks\.(\d+)\..+"),
        encoder_num_heads=heads,
        decoder_embed_dim=dec,
        decoder_depth=_count(state, r"mar\.decoder_blocks\.(\d+)\..+"),
        decoder_num_heads=mar_heads or _MAR_HEADS.get(dec, heads),
        mlp_ratio=int(_need(state, "mar.encoder_blocks.0.mlp.fc1.weight", source).shape[0]) / enc,
        buffer_size=int(_need(state, "mar.encoder_pos_embed_learned", source).shape[1]) - seq_len,
        class_num=int(_need(state, "mar.class_emb.weight", source).shape[0]),
        diffloss_d=_count(state, r"mar\.diffloss\.net\.res_blocks\.(\d+)\..+"),
        diffloss_w=int(_need(state, "mar.diffloss.net.input_proj.weight", source).shape[0]),
    )


def map_checkpoints(
    state: dict[str, torch.Tensor], vae: dict[str, torch.Tensor] | None, levels: int
) -> MappedCheckpoint:
    """Both files through their key maps, as one mapping (a tensor both provide counts as doubly mapped)."""
    mapped = KeyMap("harmon", [*HARMON_KEY_MAP.rules, *kl16_key_map(levels, "vae.", "vae.").rules]).map(state)
    if vae is not None:
        extra = kl16_key_map(levels, target_prefix="vae.").map(vae)
        for key in extra.tensors.keys() & mapped.tensors.keys():
            mapped.duplicates[key] = [mapped.sources[key], f"kl16.ckpt:{extra.sources[key]}"]
        mapped.tensors |= extra.tensors
        mapped.sources |= {k: f"kl16.ckpt:{v}" for k, v in extra.sources.items()}
        mapped.skipped += extra.skipped
        mapped.unknown += [f"kl16.ckpt:{key}" for key in extra.unknown]
    return mapped


def convert_harmon_checkpoint(
    checkpoint: str | Path | dict[str, torch.Tensor],
    vae: str | Path | dict[str, torch.Tensor] | None,
    output_dir: str | Path,
    *,
    llm: str | None = None,
    mar_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> HarmonModel:
    """Build a `HarmonModel` from the authors' ``checkpoint`` (``.pth``) and ``vae`` (``kl16.ckpt``), check every
    key, save it to ``output_dir`` and return it. ``vae`` may be None when the ``.pth`` holds ``vae.*`` itself."""
    state = load_checkpoint(checkpoint) if isinstance(checkpoint, (str, Path)) else dict(checkpoint)
    vae_state = load_checkpoint(vae) if isinstance(vae, (str, Path)) else vae
    embedded_vae = {k[len("vae.") :]: v for k, v in state.items() if k.startswith("vae.")}
    if vae_state is None and not embedded_vae:
        raise ValueError(
            f"convert harmon: the checkpoint holds no vae.* weights, so --vae kl16.ckpt is needed. {_HINT}"
        )
    vae_config = vae_config_from_checkpoint(vae_state if vae_state is not None else embedded_vae)
    llm_config = None
    if llm is not None:
        from transformers import AutoConfig

        llm_config = AutoConfig.from_pretrained(llm).to_dict()
    config = harmon_config_from_checkpoint(state, vae_config, llm_config=llm_config, mar_heads=mar_heads)
    tokenizer = None
    if llm is not None:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(llm)
        tokenizer.add_special_tokens({"additional_special_tokens": ["<image>"]})
        config.image_token_id = tokenizer.convert_tokens_to_ids("<image>")
    else:
        config.image_token_id = QWEN25_IMAGE_TOKEN_ID
    model = HarmonModel(config).to(dtype)
    model_state = model.state_dict()
    mapped = map_checkpoints(state, vae_state, len(vae_config["block_out_channels"]))
    tied = config.llm_config.tie_word_embeddings
    head, embed = "llm.lm_head.weight", "llm.model.embed_tokens.weight"
    differing = []
    if tied and head in mapped.tensors and embed in mapped.tensors:
        a, b = mapped.tensors[head].float(), mapped.tensors[embed].float()
        if a.shape == b.shape and not torch.equal(a, b):
            differing.append((head, mapped.sources[head], float((a - b).abs().max())))
    check_checkpoint(
        mapped,
        model_state,
        architecture="harmon",
        required=lambda key: not (tied and key == head),
        hint=_HINT
        + (
            f" The LLM ties {head} to {embed} (tie_word_embeddings), but the checkpoint's differ: pass --llm with "
            "tie_word_embeddings false in its config if the release trained them apart."
            if differing
            else ""
        ),
        differing=differing,
    )
    model.load_state_dict(mapped.tensors, strict=not tied or head in mapped.tensors)
    model.save_pretrained(output_dir)
    if tokenizer is not None:
        tokenizer.save_pretrained(output_dir)
    return model


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``reca convert harmon`` arguments (on ``parser`` when the CLI passes its subparser)."""
    parser = parser or argparse.ArgumentParser(
        prog="reca convert harmon",
        description="Convert a released Harmon .pth and kl16.ckpt into a HarmonModel folder.",
    )
    parser.add_argument("checkpoint", help="the authors' harmon_0.5b.pth / harmon_1.5b.pth (or a RecA release)")
    parser.add_argument("output_dir", help="where the HarmonModel folder is written")
    parser.add_argument("--vae", help="the MAR kl16.ckpt (needed unless the .pth holds vae.* weights)")
    parser.add_argument(
        "--llm",
        help="the Qwen2.5-*-Instruct the model starts from (config and tokenizer; default: the built-in "
        "Qwen2.5-0.5B/1.5B config picked by width, and no tokenizer saved)",
    )
    parser.add_argument(
        "--mar-heads", type=int, help="MAR attention heads (default: the authors' 12 for 768 wide, 16 for 1280)"
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="weight dtype of the folder")
    return parser


def run(args: argparse.Namespace) -> int:
    """Convert with the parsed arguments of :func:`build_parser`."""
    model = convert_harmon_checkpoint(
        args.checkpoint, args.vae, args.output_dir, llm=args.llm, mar_heads=args.mar_heads, dtype=_DTYPES[args.dtype]
    )
    counts = Counter()
    for name, parameter in model.named_parameters():
        counts[name.split(".")[0]] += parameter.numel()
    sizes = ", ".join(f"{part} {count / 1e6:.1f}M" for part, count in counts.items())
    print(f"wrote a HarmonModel to {args.output_dir} ({sizes} parameters)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``reca convert harmon HARMON.pth OUTPUT_DIR --vae kl16.ckpt``."""
    return run(build_parser().parse_args(argv))
