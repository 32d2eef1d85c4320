"""Convert the authors' released OpenUni state dicts into an `OpenUniModel` folder.

The released ``.pth`` files (Hub ``wusize/openuni``, and the RecA releases) are xtuner/mmengine state dicts
that the authors load with ``strict=False`` on top of a model that already holds the public InternVL3 and
SANA weights. So the folder is built from three public sources plus the checkpoint:

- ``--internvl``: an InternVL3 checkpoint in transformers' layout (``OpenGVLab/InternVL3-1B-hf`` / ``-2B-hf``);
- ``--sana``: a diffusers SANA pipeline folder (its ``transformer/`` and ``scheduler/``);
- ``--dc-ae``: the DC-AE autoencoder (the authors': ``mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers``);
- the checkpoint, whose keys map as follows (:data:`OPENUNI_KEY_MAP`; every other key is refused, by name):

  ============================  =========================================  =========================
  checkpoint key                OpenUniModel key                           required
  ============================  =========================================  =========================
  ``meta_queries``              ``meta_queries.weight``                    yes
  ``connector.layers.N.*``      ``connector.layers.N.*`` (same names)      yes, every layer's keys
  ``projector.{weight,bias}``   ``projector.{weight,bias}``                yes
  ``transformer.*``             ``transformer.*`` (diffusers names)        all or none (none: SANA's)
  ``vae.*``                     ``vae.*`` (diffusers names)                all or none (none: DC-AE's)
  ``lmm.*``                     ``lmm.*`` in transformers' InternVL        all or none (none: the
                                layout (transformers' InternVL             ``--internvl`` weights)
                                conversion rules: the remote-code
                                ``vision_model``/``mlp1``/
                                ``language_model`` names, ``qkv`` split)
  ============================  =========================================  =========================

Every unknown, missing and mis-shaped key is named in one error (:mod:`reca_hf.conversion`). InternVL is frozen in
every stage of the authors' training, so the checkpoint's ``lmm.*`` weights must be the ``--internvl`` ones: they
are compared, and a difference beyond a bfloat16 rounding is an error naming the largest differences (the wrong
InternVL, or a checkpoint of another model). ``--accept-lmm-mismatch`` accepts it knowingly and loads the
checkpoint's own ``lmm.*`` weights, as the authors' ``strict=False`` load does.

The connector's widths and depth come from the checkpoint's shapes; its head count cannot (a ``q_proj`` is square
whatever the heads). The authors' connectors use 64-wide heads (14 for OpenUni-B's 896, 24 for OpenUni-L's 1536),
so the default is ``hidden_size // 64`` where 64 divides the width, else the InternVL LLM's head count (the
connector runs at the LLM's width), else an error asking for ``--connector-heads``.
"""

from __future__ import annotations

import argparse
import logging
import re
from collections import Counter
from pathlib import Path

import torch

from ...conversion import (
    KeyMap,
    KeyRule,
    MappedCheckpoint,
    check_checkpoint,
    listing,
    value_differences,
)
from .configuration_openuni import OpenUniConfig
from .modeling_openuni import OpenUniModel

DEFAULT_DC_AE = "mit-han-lab/dc-ae-f32c32-sana-1.1-diffusers"
_CONNECTOR_KEY = re.compile(
    r"connector\.layers\.(\d+)\."
    r"(layer_norm[12]\.(weight|bias)|self_attn\.(q|k|v|out)_proj\.(weight|bias)|mlp\.fc[12]\.(weight|bias))"
)
_CONNECTOR_HEAD_DIM = 64  # the authors' connectors: 896 / 14 and 1536 / 24
_VIT = r"lmm\.vision_model\."
_VIT_LAYER = _VIT + r"encoder\.layers\.(\d+)\."
_HF_VIT = "lmm.model.vision_tower."
_HF_VIT_LAYER = _HF_VIT + r"encoder.layer.\1."
LMM_RTOL, LMM_ATOL = 1e-2, 1e-5  # what a bfloat16 copy of the --internvl weights passes (see value_differences)
ACCEPT_FLAG = "--accept-lmm-mismatch"
logger = logging.getLogger(__name__)


def _split_qkv(tensor: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """InternViT's fused ``qkv`` (rows q, then k, then v) as transformers' three projections."""
    return tuple(part.clone() for part in tensor.chunk(3, dim=0))


# transformers' InternVL conversion rules (convert_internvl_weights_to_hf.py: the vision regexes, the mlp1 -> projector
# rules, the qkv split; a Qwen2 LLM keeps its names), on the authors' remote-code names under ``lmm.``.
LMM_RULES = (
    KeyRule(_VIT + r"embeddings\.class_embedding", _HF_VIT + "embeddings.cls_token"),
    KeyRule(_VIT + r"embeddings\.position_embedding", _HF_VIT + "embeddings.position_embeddings"),
    KeyRule(
        _VIT + r"embeddings\.patch_embedding\.(weight|bias)", _HF_VIT + r"embeddings.patch_embeddings.projection.\1"
    ),
    KeyRule(
        _VIT_LAYER + r"attn\.qkv\.(weight|bias)",
        tuple(_HF_VIT_LAYER + f"attention.{name}_proj." + r"\2" for name in "qkv"),
        _split_qkv,
    ),
    KeyRule(_VIT_LAYER + r"attn\.proj\.(weight|bias)", _HF_VIT_LAYER + r"attention.projection_layer.\2"),
    KeyRule(_VIT_LAYER + r"attn\.(q_norm|k_norm)\.(weight|bias)", _HF_VIT_LAYER + r"attention.\2.\3"),
    KeyRule(_VIT_LAYER + r"ls([12])", _HF_VIT_LAYER + r"lambda_\2"),
    KeyRule(_VIT_LAYER + r"norm1\.(weight|bias)", _HF_VIT_LAYER + r"layernorm_before.\2"),
    KeyRule(_VIT_LAYER + r"norm2\.(weight|bias)", _HF_VIT_LAYER + r"layernorm_after.\2"),
    KeyRule(_VIT_LAYER + r"mlp\.(fc[12])\.(weight|bias)", _HF_VIT_LAYER + r"mlp.\2.\3"),
    KeyRule(r"lmm\.mlp1\.0\.(weight|bias)", r"lmm.model.multi_modal_projector.layer_norm.\1"),
    KeyRule(r"lmm\.mlp1\.1\.(weight|bias)", r"lmm.model.multi_modal_projector.linear_1.\1"),
    KeyRule(r"lmm\.mlp1\.3\.(weight|bias)", r"lmm.model.multi_modal_projector.linear_2.\1"),
    KeyRule(r"lmm\.language_model\.model\.(.+)", r"lmm.model.language_model.\1"),
    KeyRule(r"lmm\.language_model\.lm_head\.weight", "lmm.lm_head.weight"),
)
OPENUNI_KEY_MAP = KeyMap(
    "openuni",
    [
        KeyRule(r"meta_queries", "meta_queries.weight"),
        KeyRule(_CONNECTOR_KEY.pattern, r"\g<0>"),
        KeyRule(r"projector\.(weight|bias)", r"\g<0>"),
        KeyRule(r"(transformer|vae)\..+", r"\g<0>"),
        *LMM_RULES,
    ],
)
_PARTS = ("transformer", "vae", "lmm")  # parts a checkpoint holds all of, or none of (then the public weights)


def load_checkpoint(path: str | Path) -> dict[str, torch.Tensor]:
    """The state dict in a released ``.pth`` (a bare state dict, or mmengine's ``{"state_dict": ...}``)."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict):
        raise ValueError(f"convert openuni: {path} holds a {type(state).__name__}, not a state dict.")
    return state


def required_keys(mapped: MappedCheckpoint, model_state: dict[str, torch.Tensor], config: OpenUniConfig) -> set[str]:
    """The model keys the checkpoint must provide: the queries, connector and projector always; each of
    transformer, vae and lmm entirely where the checkpoint holds any of it (a tied ``lm_head`` excepted)."""
    required = {k for k in model_state if k.split(".", 1)[0] in ("meta_queries", "connector", "projector")}
    for part in _PARTS:
        if any(k.startswith(f"{part}.") for k in mapped.tensors):
            required |= {k for k in model_state if k.startswith(f"{part}.")}
    if config.internvl_config.text_config.tie_word_embeddings:
        required.discard("lmm.lm_head.weight")
    return required


_HINT = (
    "An OpenUni checkpoint holds meta_queries, every connector layer and the projector, and all or none of "
    "transformer.* / vae.* (diffusers names) and lmm.* (the authors' remote-code InternVL names). Check that "
    "--internvl, --sana and --dc-ae name the model the checkpoint was trained on (OpenUni-B: InternVL3-1B and "
    "SANA 0.6B; OpenUni-L: InternVL3-2B and SANA 1.6B)."
)


def connector_heads(hidden_size: int, internvl_config, requested: int | None = None) -> int:
    """The connector's attention heads: ``requested`` (``--connector-heads``) if given, else 64-wide heads (the
    authors'), else the InternVL LLM's head count; an error naming ``--connector-heads`` when none divides."""
    if requested is not None:
        if requested < 1 or hidden_size % requested:
            raise ValueError(
                f"convert openuni: --connector-heads {requested} cannot split the connector's width {hidden_size} "
                f"(read from the checkpoint): give a positive divisor of {hidden_size}."
            )
        return requested
    if hidden_size % _CONNECTOR_HEAD_DIM == 0:
        return hidden_size // _CONNECTOR_HEAD_DIM
    text_config = getattr(internvl_config, "text_config", None)
    llm_heads = int(getattr(text_config, "num_attention_heads", 0) or 0)
    if llm_heads and hidden_size % llm_heads == 0:
        logger.info("convert openuni: connector width %d: %d heads, as the InternVL LLM", hidden_size, llm_heads)
        return llm_heads
    raise ValueError(
        f"convert openuni: the connector's width {hidden_size} (read from the checkpoint) is not a multiple of the "
        f"authors' 64-wide heads, nor of the InternVL LLM's {llm_heads} heads: set --connector-heads to the number of "
        "attention heads it was trained with."
    )


def connector_config_from_checkpoint(
    checkpoint: dict[str, torch.Tensor], num_attention_heads: int | None, internvl_config=None
) -> dict:
    """The connector's SigLIP encoder settings: widths and depth read off any of the checkpoint's connector tensors
    (so one missing tensor is reported with the rest, not instead of them), heads from :func:`connector_heads`."""
    layers: dict[int, dict[str, torch.Tensor]] = {}
    for key, tensor in checkpoint.items():
        if match := _CONNECTOR_KEY.fullmatch(key):
            layers.setdefault(int(match.group(1)), {})[match.group(2)] = tensor
    if not layers:
        raise ValueError(
            "convert openuni: the checkpoint has no connector.layers.N.* keys, so the connector's shape is unknown; "
            f"is it an OpenUni state dict? It holds {listing(sorted(checkpoint), limit=8)}."
        )
    # (intermediate, hidden) as each layer's MLP says; the most common wins, so a mis-shaped layer is reported as such
    votes = Counter()
    for tensors in layers.values():
        for name, flip in (("mlp.fc1.weight", False), ("mlp.fc2.weight", True)):
            if name in tensors and tensors[name].dim() == 2:
                shape = tuple(tensors[name].shape)
                votes[shape[::-1] if flip else shape] += 1
    if not votes:
        raise ValueError(
            "convert openuni: the checkpoint has no connector mlp.fc1/fc2 weight, so the connector's widths are "
            "unknown; is it a complete OpenUni state dict?"
        )
    intermediate_size, hidden_size = votes.most_common(1)[0][0]
    heads = connector_heads(hidden_size, internvl_config, num_attention_heads)
    return {
        "hidden_size": int(hidden_size),
        "intermediate_size": int(intermediate_size),
        "num_hidden_layers": max(layers) + 1,
        "num_attention_heads": int(heads),
        "hidden_act": "gelu_pytorch_tanh",
        "layer_norm_eps": 1e-6,
    }


def _diffusers_config(config) -> dict:
    return {k: v for k, v in dict(config).items() if not k.startswith("_")}


def _connector_width_problem(connector: dict, internvl_config) -> str | None:
    llm_width = internvl_config.text_config.hidden_size
    if connector["hidden_size"] == llm_width:
        return None
    return (
        f"the checkpoint's connector is {connector['hidden_size']} wide but the --internvl LLM is {llm_width} wide "
        "(the queries enter the connector at the LLM's width)"
    )


def convert_openuni_checkpoint(
    checkpoint: str | Path | dict[str, torch.Tensor],
    internvl: str,
    sana: str,
    output_dir: str | Path,
    *,
    dc_ae: str = DEFAULT_DC_AE,
    connector_heads: int | None = None,
    dtype: torch.dtype = torch.float32,
    accept_lmm_mismatch: bool = False,
) -> OpenUniModel:
    """Build an `OpenUniModel` from the public parts and the authors' ``checkpoint``; save it to ``output_dir``.

    ``internvl``, ``sana`` and ``dc_ae`` are Hub ids or local folders (see the module docstring). Every problem of
    the checkpoint is named in one :class:`~reca_hf.conversion.CheckpointMismatchError` before anything is written;
    ``accept_lmm_mismatch`` loads the checkpoint's ``lmm.*`` weights where they differ from ``internvl``'s. The
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
    connector = connector_config_from_checkpoint(state, connector_heads, lmm.config)
    problem = _connector_width_problem(connector, lmm.config)
    if problem:  # the model cannot be built to check the rest against
        raise ValueError(f"convert openuni: {problem}; nothing was written. {_HINT}")
    config = OpenUniConfig(
        internvl_config=lmm.config.to_dict(),
        connector_config=connector,
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
    model_state = model.state_dict()
    mapped = OPENUNI_KEY_MAP.map(state)
    differing = value_differences(mapped, public, keys=lambda k: k.startswith("lmm."), rtol=LMM_RTOL, atol=LMM_ATOL)
    refused_lmm_hint = (
        f" InternVL is frozen in OpenUni's training, so the checkpoint's lmm.* weights should be {internvl}'s: pass the "
        f"InternVL it was trained with, or {ACCEPT_FLAG} to load the checkpoint's own lmm.* weights knowingly."
    )
    check_checkpoint(
        mapped,
        model_state,
        architecture="openuni",
        required=required_keys(mapped, model_state, config),
        hint=_HINT + (refused_lmm_hint if differing and not accept_lmm_mismatch else ""),
        differing=[] if accept_lmm_mismatch else differing,
    )
    lmm_keys = {k for k in mapped.tensors if k.startswith("lmm.")}
    if differing:  # accepted: the checkpoint's InternVL weights, as the authors' strict=False load takes them
        logger.warning(
            "convert openuni: %s: %d lmm.* tensors differ from %s (largest: %s); loading the checkpoint's own",
            ACCEPT_FLAG, len(differing), internvl, listing([f"{k} by {d:.3g}" for k, _, d in differing], 5, False),
        )  # fmt: skip
    else:
        lmm_keys.clear()  # the same weights: keep --internvl's (its dtype)
        if any(k.startswith("lmm.") for k in mapped.tensors):
            logger.info("convert openuni: the checkpoint's lmm.* weights equal %s's", internvl)
    weights = public | {k: v for k, v in mapped.tensors.items() if not k.startswith("lmm.") or k in lmm_keys}
    model.load_state_dict(weights, strict=True)
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
        "--connector-heads",
        type=int,
        default=None,
        help="connector attention heads (default: 64-wide heads, as the authors', else the InternVL LLM's heads)",
    )
    parser.add_argument(
        ACCEPT_FLAG,
        action="store_true",
        help="load the checkpoint's lmm.* weights even where they differ from --internvl's (refused by default)",
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
        accept_lmm_mismatch=args.accept_lmm_mismatch,
    )
    print(f"wrote an OpenUniModel to {args.output_dir}")
    return 0
