"""Shape of an S3-DiT: one dataclass describes the 6B model and the tiny test models."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class ZImageConfig:
    dim: int = 3840
    n_layers: int = 30  # main layers over the unified caption + image sequence
    n_refiner_layers: int = 2  # noise refiner (image) and context refiner (caption) each
    n_heads: int = 30
    ffn_hidden: int = 10240  # int(dim / 3 * 8) for the released models
    in_channels: int = 16  # FLUX VAE latent channels
    patch_size: int = 2
    cap_feat_dim: int = 2560  # Qwen3-4B hidden size
    t_embed_dim: int = 256  # adaLN conditioning width
    t_embed_mid: int = 1024
    norm_eps: float = 1e-5
    rope_theta: float = 256.0
    rope_axes: tuple[int, int, int] = (32, 48, 48)  # (sequence, row, column) slices of the head dim
    t_scale: float = 1000.0
    seq_multiple: int = 32  # each stream is padded to a multiple of this with a learned pad token
    # Omni-Base and Edit: width of the SigLIP2 image features their reference images bring (1152 in the
    # released models); None for Turbo and Base, which have no SigLIP embedder and take no references
    siglip_feat_dim: int | None = None
    # positions per RoPE axis the released models were trained on (diffusers' axes_lens): Omni inputs that
    # would need larger ones are refused
    rope_lengths: tuple[int, int, int] = (1536, 512, 512)

    def __post_init__(self):
        if self.dim % self.n_heads:
            raise ValueError(f"dim {self.dim} is not divisible by n_heads {self.n_heads}")
        if sum(self.rope_axes) != self.head_dim or any(a % 2 for a in self.rope_axes):
            raise ValueError(f"rope_axes {self.rope_axes} must be even and sum to head_dim {self.head_dim}")

    @property
    def head_dim(self) -> int:
        return self.dim // self.n_heads

    @property
    def patch_dim(self) -> int:
        return self.patch_size * self.patch_size * self.in_channels

    @property
    def block_stacks(self) -> dict[str, int]:
        """The model's stacks of transformer blocks, by their names in the weights, and each one's depth: the
        one list that loading, FP8, compile, streaming and the hosts' weight handling go through."""
        stacks = {"noise_refiner": self.n_refiner_layers, "context_refiner": self.n_refiner_layers,
                  "layers": self.n_layers}
        if self.siglip_feat_dim is not None:
            stacks["siglip_refiner"] = self.n_refiner_layers
        return stacks

    @staticmethod
    def rope_axes_for(head_dim: int) -> tuple[int, int, int]:
        """The released split (32, 48, 48) of a 128 head, kept in proportion for smaller heads."""
        first = head_dim // 4
        rest = (head_dim - first) // 2
        return (first, rest, rest)

    @classmethod
    def tiny(cls, **overrides) -> "ZImageConfig":
        """A few-hundred-kilobyte model for tests: every code path, none of the size.
        tiny(siglip_feat_dim=24) is a tiny Omni model."""
        # ffn_hidden and the adaLN width follow the released rules (int(dim / 3 * 8), min(dim, 256)) so
        # that the same weights also load into the reference implementations.
        base = dict(dim=64, n_layers=2, n_refiner_layers=1, n_heads=4, ffn_hidden=170, cap_feat_dim=32,
                    t_embed_dim=64, rope_axes=(4, 6, 6))
        base.update(overrides)
        return cls(**base)
