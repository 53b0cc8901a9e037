"""Architecture presets. Plain dataclasses in code (importable by tests and benchmarks), not YAML."""

from __future__ import annotations

from dataclasses import dataclass, replace


@dataclass(frozen=True, kw_only=True)
class ModelConfig:
    # vision: ViT built with timm
    image_size: int = 256
    patch_size: int = 16
    vision_width: int = 768
    vision_depth: int = 12
    vision_heads: int = 12
    vision_mlp_ratio: float = 4.0
    # text + fusion: BERT-base split at `text_layers` (ALBEF's fusion_layer = 6)
    vocab_size: int = 30522
    hidden_size: int = 768
    text_layers: int = 6
    fusion_layers: int = 6
    num_heads: int = 12
    intermediate_size: int = 3072
    max_position: int = 512
    type_vocab_size: int = 2
    hidden_dropout: float = 0.1
    attention_dropout: float = 0.1
    layer_norm_eps: float = 1e-12
    # heads
    embed_dim: int = 256
    """Width of the L2-normalised ITC features (vision_proj, text_proj)."""
    temp: float = 0.07
    """Initial contrastive temperature; learnable, clamped to [0.001, 0.5] after every step."""

    def __post_init__(self) -> None:
        if not 0.001 <= self.temp <= 0.5:
            raise ValueError(f"temp={self.temp} is outside the clamp range [0.001, 0.5]")
        if self.image_size % self.patch_size:
            raise ValueError(f"image_size={self.image_size} is not a multiple of patch_size={self.patch_size}")
        for width, heads, name in ((self.vision_width, self.vision_heads, "vision"),
                                   (self.hidden_size, self.num_heads, "text")):
            if width % heads:
                raise ValueError(f"{name} width {width} is not divisible by its {heads} heads")

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2


MODEL_PRESETS: dict[str, ModelConfig] = {
    # The paper's shapes: ViT-B/16 at 256 px, BERT-base split 6 text + 6 fusion layers.
    "albef_base": ModelConfig(),
    # Small enough to train on a 2-core CPU in minutes; keeps the real bert-base-uncased vocabulary.
    "albef_tiny": ModelConfig(
        image_size=64, patch_size=8, vision_width=128, vision_depth=4, vision_heads=4,
        hidden_size=128, text_layers=2, fusion_layers=2, num_heads=4, intermediate_size=512,
        max_position=64, embed_dim=64,
    ),
}


def get_preset(name: str, **overrides) -> ModelConfig:
    if name not in MODEL_PRESETS:
        raise ValueError(f"unknown model preset {name!r}; valid: {sorted(MODEL_PRESETS)}")
    return replace(MODEL_PRESETS[name], **overrides)
