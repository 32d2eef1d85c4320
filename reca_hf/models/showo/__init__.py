"""Show-o (Phi-1.5 over MAGVIT-v2 codes, masked-token image generation; VQ and CLIP variants)."""

from transformers import AutoConfig, AutoModel

from .configuration_showo import MagvitV2Config, ShowoConfig
from .magvit import MagvitV2
from .modeling_showo import ShowoModel

# So a saved folder's `model_type` ("showo", "showo_magvitv2") resolves through the Auto classes once imported.
for _config, _model in ((ShowoConfig, ShowoModel), (MagvitV2Config, MagvitV2)):
    AutoConfig.register(_config.model_type, _config, exist_ok=True)
    AutoModel.register(_config, _model, exist_ok=True)

__all__ = ["MagvitV2", "MagvitV2Config", "ShowoConfig", "ShowoModel"]
