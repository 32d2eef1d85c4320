"""Convert the authors' Show-o and MAGVIT-v2 releases into a `ShowoModel` (or a `MagvitV2`) folder.

The released folders (Hub ``showlab/show-o``, ``show-o-512x512``, ``show-o-w-clip-vit``,
``show-o-w-clip-vit-512x512``, the RecA releases ``sanaka87/Show-o-RecA`` and ``Show-o-512x512-RecA``, and RecA's
``checkpoint-*/unwrapped_model``) are the authors' diffusers-style ``ModelMixin`` saves: ``config.json`` (``w_clip_vit``,
``llm_vocab_size``, ``codebook_size``, ``num_vq_tokens``, ...) and ``pytorch_model.safetensors`` or
``pytorch_model.bin`` (possibly sharded with an ``.index.json``). The tokenizer ``showlab/magvitv2`` is published
apart in the same format. The Phi and CLIP configurations are not in the folders (the authors read them from
``microsoft/phi-1_5`` and ``openai/clip-vit-large-patch14-336``).

Key maps (every other key is refused by name, with every missing and mis-shaped one, in one error):

=====================================  ===========================  ===========================================
checkpoint key                         ShowoModel key               source
=====================================  ===========================  ===========================================
``showo.model.*``, ``showo.lm_head.*``  the same (transformers'     the Show-o folder (Phi with per-head
                                       ``PhiForCausalLM`` names)    ``q_layernorm`` / ``k_layernorm``)
``mm_projector.{0,2}.*``               the same                     the Show-o folder (CLIP variant only)
``encoder.*``, ``decoder.*``,          ``vq_model.`` + the same     ``--magvit`` (``showlab/magvitv2``)
``quantize.{embedding,power_vals}``
(transformers' CLIP layout)            ``vision_tower.*``           ``--clip`` (CLIP variant only)
=====================================  ===========================  ===========================================

Phi's depth, widths and head count are read off the checkpoint (Show-o's Phi normalises queries and keys per head,
so ``q_layernorm`` is one head wide); the rest (rotary share, positions) is Phi-1.5's unless ``--llm-config`` names
a Phi ``config.json`` (or folder).
"""

from __future__ import annotations

import argparse
import json
import re
from pathlib import Path

import torch

from ...conversion import KeyMap, KeyRule, MappedCheckpoint, check_checkpoint, listing
from .configuration_showo import MagvitV2Config, ShowoConfig
from .magvit import MagvitV2
from .modeling_showo import ShowoModel

SHOWO_KEY_MAP = KeyMap(
    "showo",
    [
        KeyRule(r"showo\.(model|lm_head)\..+", r"\g<0>"),
        KeyRule(r"mm_projector\.[02]\.(weight|bias)", r"\g<0>"),
    ],
)
MAGVIT_KEY_MAP = KeyMap("magvitv2", [KeyRule(r"(encoder|decoder|quantize)\..+", r"\g<0>")])
PHI_BOS_EOS = 50256  # Phi-1.5's <|endoftext|>, its tokenizer's bos and eos (its config.json leaves them null)
_WEIGHT_FILES = (
    "pytorch_model.safetensors",
    "pytorch_model.bin",
    "model.safetensors",
    "diffusion_pytorch_model.safetensors",
    "diffusion_pytorch_model.bin",
)
_LAYER = re.compile(r"showo\.model\.layers\.(\d+)\.")


def _load_file(path: Path) -> dict[str, torch.Tensor]:
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"convert showo: {path} holds a {type(state).__name__}, not a state dict.")
    return state


def load_release(path: str | Path) -> tuple[dict, dict[str, torch.Tensor]]:
    """``(config.json as a dict or {}, state dict)`` of an authors' folder, or of a single weights file."""
    path = Path(path)
    if path.is_file():
        return {}, _load_file(path)
    if not path.is_dir():
        raise FileNotFoundError(f"convert showo: {path} is neither a folder nor a weights file.")
    config = json.loads((path / "config.json").read_text()) if (path / "config.json").is_file() else {}
    for name in _WEIGHT_FILES:
        index = path / f"{name}.index.json"
        if index.is_file():
            shards = sorted(set(json.loads(index.read_text())["weight_map"].values()))
            state = {}
            for shard in shards:
                state.update(_load_file(path / shard))
            return config, state
        if (path / name).is_file():
            return config, _load_file(path / name)
    raise FileNotFoundError(
        f"convert showo: {path} has none of {', '.join(_WEIGHT_FILES)} (nor a sharded .index.json); pass the "
        "folder the authors' save_pretrained wrote, or the weights file itself."
    )


def llm_config_from_checkpoint(state: dict[str, torch.Tensor], llm_config: str | Path | None = None) -> dict:
    """Phi's settings: ``llm_config`` (a ``config.json`` or a folder holding one) if given, else Phi-1.5's with the
    depth, widths and head count read off the checkpoint's tensors (the per-head ``q_layernorm`` is one head wide).
    bos / eos are Phi's ``<|endoftext|>``."""
    from transformers import PhiConfig

    if llm_config is not None:
        source = Path(llm_config)
        source = source / "config.json" if source.is_dir() else source
        settings = {k: v for k, v in json.loads(source.read_text()).items() if not k.startswith("_")}
    else:
        embed = state.get("showo.model.embed_tokens.weight")
        fc1 = state.get("showo.model.layers.0.mlp.fc1.weight")
        q_norm = state.get("showo.model.layers.0.self_attn.q_layernorm.weight")
        layers = {int(m.group(1)) for key in state if (m := _LAYER.match(key))}
        if embed is None or fc1 is None or q_norm is None or not layers:
            raise ValueError(
                "convert showo: the checkpoint lacks showo.model.embed_tokens.weight, layers.0.mlp.fc1.weight or "
                "layers.0.self_attn.q_layernorm.weight, so Phi's shape is unknown; is it a Show-o state dict? It holds "
                f"{listing(sorted(state), limit=8)}."
            )
        hidden = int(embed.shape[1])
        heads = hidden // int(q_norm.shape[0])  # Show-o's Phi normalises each head: the norm is one head wide
        settings = PhiConfig().to_dict()
        settings.update(
            hidden_size=hidden,
            intermediate_size=int(fc1.shape[0]),
            num_hidden_layers=max(layers) + 1,
            num_attention_heads=heads,
            num_key_value_heads=heads,
            bos_token_id=PHI_BOS_EOS,
            eos_token_id=PHI_BOS_EOS,
        )
    settings["bos_token_id"] = settings.get("bos_token_id") or PHI_BOS_EOS
    settings["eos_token_id"] = settings.get("eos_token_id") or PHI_BOS_EOS
    settings.pop("vocab_size", None)  # Show-o's own (text + special tokens + codes + mask)
    settings["model_type"] = "phi"
    return settings


def magvit_config_from_checkpoint(state: dict[str, torch.Tensor]) -> MagvitV2Config:
    """MAGVIT-v2's sizes read off its tensors (the authors' config.json holds none): the first width, each level's
    width and block count on both sides, the latent channels, and which levels have attention blocks."""
    if "encoder.conv_in.weight" not in state or "encoder.conv_out.weight" not in state:
        raise ValueError(
            "convert showo: the MAGVIT-v2 checkpoint has no encoder.conv_in.weight / encoder.conv_out.weight; is it "
            f"showlab/magvitv2? It holds {listing(sorted(state), limit=8)}."
        )
    ch = int(state["encoder.conv_in.weight"].shape[0])

    def levels(side: str, group: str) -> tuple[list[int], list[int], set[int]]:
        blocks: dict[int, set[int]] = {}
        attention = set()
        for key in state:
            if m := re.match(rf"{side}\.{group}\.(\d+)\.(block|attn)\.(\d+)\.", key):
                if m.group(2) == "block":
                    blocks.setdefault(int(m.group(1)), set()).add(int(m.group(3)))
                else:
                    attention.add(int(m.group(1)))
        count = max(blocks) + 1 if blocks else 0
        widths = [int(state[f"{side}.{group}.{i}.block.0.conv1.weight"].shape[0]) // ch for i in range(count)]
        return widths, [len(blocks.get(i, ())) for i in range(count)], attention

    enc_mult, enc_blocks, enc_attn = levels("encoder", "down")
    dec_mult, dec_blocks, dec_attn = levels("decoder", "up")
    resolution = 256
    attention = sorted({resolution >> level for level in enc_attn | dec_attn}) or [5]
    return MagvitV2Config(
        ch=ch,
        encoder_ch_mult=enc_mult,
        encoder_num_res_blocks=enc_blocks,
        decoder_ch_mult=dec_mult,
        decoder_num_res_blocks=dec_blocks,
        attn_resolutions=attention,
        resolution=resolution,
        z_channels=int(state["encoder.conv_out.weight"].shape[0]),
    )


def _merge(*parts: tuple[str, MappedCheckpoint]) -> MappedCheckpoint:
    """One `MappedCheckpoint` of several sources, each checkpoint key named with its source."""
    merged = MappedCheckpoint()
    for label, mapped in parts:
        merged.tensors.update(mapped.tensors)
        merged.sources.update({key: f"{label}:{source}" for key, source in mapped.sources.items()})
        merged.skipped += [f"{label}:{key}" for key in mapped.skipped]
        merged.unknown += [f"{label}:{key}" for key in mapped.unknown]
        merged.duplicates.update({key: [f"{label}:{s}" for s in keys] for key, keys in mapped.duplicates.items()})
    return merged


_HINT = (
    "A Show-o folder holds showo.model.* and showo.lm_head.* (plus mm_projector.0/2.* for the CLIP variant); "
    "--magvit holds encoder.*, decoder.* and quantize.embedding / quantize.power_vals (showlab/magvitv2). Check that "
    "--magvit is the tokenizer, that the config.json beside the weights is the checkpoint's (num_vq_tokens, "
    "codebook_size, llm_vocab_size) and --llm-config Phi's."
)


def showo_config_from_release(
    release: dict,
    state: dict[str, torch.Tensor],
    vq_config: MagvitV2Config,
    *,
    llm_config: str | Path | None = None,
    vision_config: dict | None = None,
    num_vq_tokens: int | None = None,
    max_seq_length: int | None = None,
) -> ShowoConfig:
    """A `ShowoConfig` from the authors' ``config.json`` (``release``), the checkpoint and the options."""
    w_clip_vit = bool(release.get("w_clip_vit", any(key.startswith("mm_projector.") for key in state)))
    if w_clip_vit and vision_config is None:
        raise ValueError(
            "convert showo: this is the CLIP variant (w_clip_vit in its config.json, or mm_projector.* weights); pass "
            "--clip with CLIP ViT-L/14-336 in transformers' layout (openai/clip-vit-large-patch14-336)."
        )
    if not w_clip_vit and vision_config is not None:
        raise ValueError("convert showo: --clip was given but the checkpoint is the VQ variant (no mm_projector.*).")
    tokens = num_vq_tokens or release.get("num_vq_tokens")
    if tokens is None:
        raise ValueError(
            "convert showo: no config.json gives num_vq_tokens; pass --num-vq-tokens (256 for the 256-px models, "
            "1024 for the 512x512 ones)."
        )
    extra = {"max_seq_length": max_seq_length} if max_seq_length is not None else {}
    return ShowoConfig(
        llm_config=llm_config_from_checkpoint(state, llm_config),
        vq_config=vq_config,
        vision_config=vision_config,
        w_clip_vit=w_clip_vit,
        llm_vocab_size=int(release.get("llm_vocab_size", 50295)),
        codebook_size=int(release.get("codebook_size", 8192)),
        num_vq_tokens=int(tokens),
        **extra,
    )


def convert_showo_checkpoint(
    checkpoint: str | Path,
    magvit: str | Path,
    output_dir: str | Path,
    *,
    clip: str | None = None,
    llm_config: str | Path | None = None,
    num_vq_tokens: int | None = None,
    max_seq_length: int | None = None,
    dtype: torch.dtype = torch.float32,
) -> ShowoModel:
    """Build a `ShowoModel` from the authors' Show-o folder, their MAGVIT-v2 folder and (CLIP variant) a CLIP tower;
    save it to ``output_dir``. Every problem is named in one `CheckpointMismatchError` before anything is written."""
    release, state = load_release(checkpoint)
    _, magvit_state = load_release(magvit)
    vision = None
    if clip is not None:
        from transformers import CLIPVisionModel

        vision = CLIPVisionModel.from_pretrained(clip, dtype=dtype)
    config = showo_config_from_release(
        release,
        state,
        magvit_config_from_checkpoint(magvit_state),
        llm_config=llm_config,
        vision_config=vision.config.to_dict() if vision is not None else None,
        num_vq_tokens=num_vq_tokens,
        max_seq_length=max_seq_length,
    )
    model = ShowoModel(config).to(dtype)
    model_state = model.state_dict()
    mapped = _merge(
        (str(checkpoint), SHOWO_KEY_MAP.map(state)), (str(magvit), MAGVIT_KEY_MAP.map(magvit_state, prefix="vq_model."))
    )
    expected = {key: value for key, value in model_state.items() if not key.startswith("vision_tower.")}
    check_checkpoint(mapped, expected, architecture="showo", hint=_HINT)
    weights = dict(mapped.tensors)
    if vision is not None:
        weights |= {f"vision_tower.{key}": value for key, value in vision.state_dict().items()}
    model.load_state_dict(weights, strict=True)
    model.save_pretrained(output_dir)
    return model


def convert_magvit_checkpoint(checkpoint: str | Path, output_dir: str | Path) -> MagvitV2:
    """The authors' ``showlab/magvitv2`` folder (or weights file) as a `MagvitV2` folder (sizes from its tensors)."""
    _, state = load_release(checkpoint)
    model = MagvitV2(magvit_config_from_checkpoint(state))
    mapped = MAGVIT_KEY_MAP.map(state)
    check_checkpoint(mapped, model.state_dict(), architecture="magvitv2", hint=_HINT)
    model.load_state_dict(mapped.tensors, strict=True)
    model.save_pretrained(output_dir)
    return model


_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    """The ``reca convert showo`` arguments (on ``parser`` when the CLI passes its subparser)."""
    parser = parser or argparse.ArgumentParser(
        prog="reca convert showo", description="Convert the authors' Show-o (or MAGVIT-v2) release."
    )
    parser.add_argument(
        "checkpoint", help="the authors' Show-o folder (or weights file); with --magvit-only, MAGVIT-v2's"
    )
    parser.add_argument("output_dir", help="where the ShowoModel (or MagvitV2) folder is written")
    parser.add_argument("--magvit", help="the authors' MAGVIT-v2 folder, e.g. a download of showlab/magvitv2")
    parser.add_argument(
        "--magvit-only", action="store_true", help="convert the checkpoint as a MAGVIT-v2 tokenizer on its own"
    )
    parser.add_argument("--clip", help="CLIP variant: CLIP ViT-L/14-336 (openai/clip-vit-large-patch14-336)")
    parser.add_argument(
        "--llm-config", help="Phi's config.json or folder (default: Phi-1.5's, shapes from the checkpoint)"
    )
    parser.add_argument("--num-vq-tokens", type=int, help="codes per image when the folder has no config.json")
    parser.add_argument(
        "--max-seq-length", type=int, help="the text budget of the sequences (default 128; the authors' RecA: 381)"
    )
    parser.add_argument("--dtype", choices=sorted(_DTYPES), default="float32", help="weight dtype of the folder")
    return parser


def run(args: argparse.Namespace) -> int:
    """Convert with the parsed arguments of :func:`build_parser`."""
    if args.magvit_only:
        convert_magvit_checkpoint(args.checkpoint, args.output_dir)
        print(f"wrote a MagvitV2 to {args.output_dir}")
        return 0
    if not args.magvit:
        raise SystemExit(
            "reca convert showo: --magvit is required (the authors' MAGVIT-v2 folder, showlab/magvitv2), or "
            "--magvit-only to convert a tokenizer alone."
        )
    convert_showo_checkpoint(
        args.checkpoint,
        args.magvit,
        args.output_dir,
        clip=args.clip,
        llm_config=args.llm_config,
        num_vq_tokens=args.num_vq_tokens,
        max_seq_length=args.max_seq_length,
        dtype=_DTYPES[args.dtype],
    )
    print(f"wrote a ShowoModel to {args.output_dir}")
    return 0


def main(argv: list[str] | None = None) -> int:
    """``reca convert showo SHOWO_DIR OUTPUT_DIR --magvit MAGVIT_DIR [--clip CLIP]``."""
    return run(build_parser().parse_args(argv))
