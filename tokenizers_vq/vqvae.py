"""VQ-VAE image tokenizer: conv encoder, vector quantizer, conv decoder, trained end to end.

Implements van den Oord et al. 2017, "Neural Discrete Representation Learning": an image
`(b c h w)` in [-1, 1] is encoded to a grid of `embedding_dim`-vectors, each replaced by its
nearest codebook entry (straight-through gradient), and decoded back; the loss is the
reconstruction error plus the quantizer's codebook/commitment terms. The token grid
`(b h' w')` of code indices is what stage two models. A trained tokenizer is a self-describing
folder, `config.json` (`{"kind": "vqvae", "config": ...}`) plus `model.safetensors`, loaded
strictly: a folder whose tensors do not match the config exactly is refused with the names of
the missing, unexpected or mis-shaped tensors. The quantizer is pluggable (any `QUANTIZERS`
kind); a residual quantizer adds a trailing codebook axis to the tokens, `(b h' w' q)`. The
`"lfq"` tokenizer is the same model with a lookup-free quantizer by default (MAGVIT-v2's
quantiser in a VQ-VAE). With `reconstruction_loss = "bernoulli"` the decoder outputs one logit
per pixel of a binary image (ink where x > 0), trained by binary cross-entropy as the Bernoulli
decoders of the binarized-MNIST density literature (e.g. Kingma & Welling 2014); the decoder then
defines a likelihood log p(x | z), so a two-stage model's negative ELBO with the deterministic
posterior z = encode(x), -log p(x | z) - log p_prior(z), bounds its NLL on binary images.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from typing import ClassVar, NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn

from tokenizers_vq.checkpoint import PretrainedTokenizer
from tokenizers_vq.nets.conv2d import Decoder2d, Encoder2d, downsampled_size
from tokenizers_vq.quantizers import QUANTIZERS, LFQConfig, QuantizerConfig, VQConfig, build_quantizer
from tokenizers_vq.quantizers.base import config_from_dict

logger = logging.getLogger(__name__)

# "bernoulli": the decoder outputs per-pixel logits of binary images (x > 0 is ink); see the docstring
RECONSTRUCTION_LOSSES = ("mse", "l1", "bernoulli")


@dataclass(frozen=True)
class VQVAEConfig:
    """Sizes of the VQ-VAE; the defaults fit 28x28 MNIST on a CPU (7x7 grid of 256 codes)."""

    kind: ClassVar[str] = "vqvae"

    in_channels: int = 1
    hidden_channels: int = 64
    channel_multipliers: tuple[int, ...] = (1, 2)  # one stride-2 downsampling per entry
    num_res_blocks: int = 1
    embedding_dim: int = 32
    quantizer: QuantizerConfig = field(default_factory=VQConfig)  # any QUANTIZERS kind
    reconstruction_loss: str = "mse"

    def __post_init__(self):
        if isinstance(self.channel_multipliers, list):  # tolerate JSON/TOML lists in direct construction
            object.__setattr__(self, "channel_multipliers", tuple(self.channel_multipliers))
        if self.in_channels < 1 or self.embedding_dim < 1:
            raise ValueError("in_channels and embedding_dim must be positive")
        if self.reconstruction_loss not in RECONSTRUCTION_LOSSES:
            raise ValueError(f"reconstruction_loss must be one of {RECONSTRUCTION_LOSSES}, got {self.reconstruction_loss!r}")
        configs = tuple(config_cls for config_cls, _ in QUANTIZERS.values())
        if not isinstance(self.quantizer, configs):
            raise ValueError(f"quantizer must be one of {[c.__name__ for c in configs]}, "
                             f"got {type(self.quantizer).__name__}")

    @classmethod
    def from_dict(cls, data: dict) -> "VQVAEConfig":
        return config_from_dict(cls, data)


@dataclass(frozen=True)
class LFQVAEConfig(VQVAEConfig):
    """A VQ-VAE with a lookup-free quantizer: 2^10 codes, 10-dimensional latents (no projection)."""

    kind: ClassVar[str] = "lfq"

    embedding_dim: int = 10
    quantizer: QuantizerConfig = field(default_factory=lambda: LFQConfig(bits=10))


class TokenizerOutput(NamedTuple):
    """reconstruction (b c h w) unclamped decoder output (for a Bernoulli decoder, the mean image
    2 sigmoid(logits) - 1); indices (b h' w') int64, or (b h' w' q) with a residual quantizer;
    aux_loss scalar; metrics 0-d tensors from the quantizer."""

    reconstruction: Tensor
    indices: Tensor
    aux_loss: Tensor
    metrics: dict[str, Tensor]


class VQVAE(PretrainedTokenizer, nn.Module):
    """Image tokenizer and `Trainable`: encode/decode tokens, forward for training, save/load.

    Tokens are `(b h' w')` in [0, vocab_size), or `(b h' w' q)` when the quantizer has
    `num_codebooks = q > 1` (residual VQ; vocab_size is then the size of each level's codebook).
    """

    config_class: ClassVar[type[VQVAEConfig]] = VQVAEConfig

    def __init__(self, config: VQVAEConfig):
        super().__init__()
        self.config = config
        net_sizes = dict(
            hidden_channels=config.hidden_channels,
            channel_multipliers=config.channel_multipliers,
            num_res_blocks=config.num_res_blocks,
        )
        self.encoder = Encoder2d(in_channels=config.in_channels, out_channels=config.embedding_dim, **net_sizes)
        self.quantizer = build_quantizer(config.quantizer, config.embedding_dim)
        self.decoder = Decoder2d(in_channels=config.embedding_dim, out_channels=config.in_channels, **net_sizes)
        self.downsampling_factor = self.encoder.downsampling_factor

    @property
    def vocab_size(self) -> int:
        return self.quantizer.codebook_size

    @property
    def num_codebooks(self) -> int:
        """Indices per grid cell: 1 gives `(b h' w')` tokens, q > 1 gives `(b h' w' q)`."""
        return self.quantizer.num_codebooks

    def token_grid(self, input_shape: tuple[int, int, int]) -> tuple[int, int]:
        """(c, h, w) of one image -> (h', w') of its token grid."""
        channels, height, width = input_shape
        if channels != self.config.in_channels:
            raise ValueError(f"the tokenizer takes {self.config.in_channels}-channel images, got {channels} channel(s)")
        return downsampled_size(height, self.downsampling_factor), downsampled_size(width, self.downsampling_factor)

    # --- the three directions -------------------------------------------------------------------

    def _latents(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        """(b c h w) -> (b (h' w') d) encoder outputs and the grid (h', w')."""
        if x.ndim != 4:
            raise ValueError(f"expected images (b c h w), got shape {tuple(x.shape)}")
        grid = self.token_grid(tuple(x.shape[1:]))
        return rearrange(self.encoder(x), "b d h w -> b (h w) d"), grid

    def _decode_codes(self, codes: Tensor, grid: tuple[int, int]) -> Tensor:
        height, width = grid
        return self.decoder(rearrange(codes, "b (h w) d -> b d h w", h=height, w=width))

    @torch.no_grad()
    def encode(self, x: Tensor) -> Tensor:
        """(b c h w) in [-1, 1] -> (b h' w') int64 tokens, or (b h' w' q) with q codebooks; never
        updates codebook statistics."""
        latents, (height, width) = self._latents(x)
        return rearrange(self.quantizer.to_indices(latents), "b (h w) ... -> b h w ...", h=height, w=width)

    @property
    def has_decoder_likelihood(self) -> bool:
        """True when the decoder defines log p(x | z) (`reconstruction_loss = "bernoulli"`)."""
        return self.config.reconstruction_loss == "bernoulli"

    def _decoder_output_from_tokens(self, tokens: Tensor) -> Tensor:
        """(b h' w') or (b h' w' q) tokens, validated -> (b c h w) raw decoder output."""
        expected_ndim = 3 if self.num_codebooks == 1 else 4
        if tokens.ndim != expected_ndim or (expected_ndim == 4 and tokens.shape[-1] != self.num_codebooks):
            expected = "(b h w)" if expected_ndim == 3 else f"(b h w q) with q={self.num_codebooks}"
            raise ValueError(f"expected a token grid {expected}, got shape {tuple(tokens.shape)}")
        if tokens.numel() and (tokens.min() < 0 or tokens.max() >= self.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.vocab_size}), got [{int(tokens.min())}, {int(tokens.max())}]")
        grid = tuple(tokens.shape[1:3])
        codes = self.quantizer.lookup(rearrange(tokens.long(), "b h w ... -> b (h w) ..."))
        return self._decode_codes(codes, grid)

    def output_image(self, decoder_output: Tensor) -> Tensor:
        """Raw decoder output -> image in [-1, 1]: the Bernoulli mean 2 sigmoid(l) - 1 = tanh(l / 2) for
        logits, the clamped output otherwise."""
        if self.has_decoder_likelihood:
            return torch.tanh(decoder_output.float() / 2.0).to(decoder_output.dtype)
        return decoder_output.clamp(-1.0, 1.0)

    @torch.no_grad()
    def decode(self, tokens: Tensor) -> Tensor:
        """(b h' w') int64 tokens, or (b h' w' q) with q codebooks -> (b c h w) images in [-1, 1]
        (for a Bernoulli decoder, the mean image: each pixel 2 p(ink) - 1)."""
        return self.output_image(self._decoder_output_from_tokens(tokens))

    @torch.no_grad()
    def decoder_log_likelihood(self, x: Tensor, tokens: Tensor) -> Tensor:
        """(b c h w) images in [-1, 1] and their (b h' w') tokens -> (b,) log p(x | z) in nats, float32.

        The images are binarised as the training target was (x > 0 is 1); the likelihood is the
        product of independent Bernoullis with the decoder's logits, so its sum over pixels is
        minus the summed binary cross-entropy. Only defined for `reconstruction_loss = "bernoulli"`.
        """
        if not self.has_decoder_likelihood:
            raise ValueError(f"decoder_log_likelihood needs reconstruction_loss='bernoulli'; this tokenizer's "
                             f"decoder was trained with {self.config.reconstruction_loss!r} and defines no likelihood")
        logits = self._decoder_output_from_tokens(tokens).float()
        if logits.shape != x.shape:
            raise ValueError(f"images {tuple(x.shape)} do not match the decoded shape {tuple(logits.shape)}")
        target = (x > 0).float()
        bce = F.binary_cross_entropy_with_logits(logits, target, reduction="none")
        return -bce.sum(dim=(1, 2, 3))

    def forward(self, x: Tensor) -> TokenizerOutput:
        output = self._forward_raw(x)
        if self.has_decoder_likelihood:  # logits stay internal: the output is an image like every tokenizer's
            output = output._replace(reconstruction=self.output_image(output.reconstruction))
        return output

    def _forward_raw(self, x: Tensor) -> TokenizerOutput:
        latents, grid = self._latents(x)
        quantized = self.quantizer(latents)
        reconstruction = self._decode_codes(quantized.quantized, grid)
        indices = rearrange(quantized.indices, "b (h w) ... -> b h w ...", h=grid[0], w=grid[1])
        return TokenizerOutput(reconstruction, indices, quantized.aux_loss, quantized.metrics)

    # --- Trainable ------------------------------------------------------------------------------

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": [parameter for parameter in self.parameters() if parameter.requires_grad]}

    def phases(self, step: int) -> list[str]:
        return ["main"]

    def loss(self, batch: dict, phase: str, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        if phase != "main":
            raise ValueError(f"VQVAE has one phase, 'main'; got {phase!r}")
        images = batch["pixel_values"]
        output = self._forward_raw(images)
        # The loss is taken in float32 even when the decoder ran under bf16 autocast.
        reconstruction, target = output.reconstruction.float(), images.float()
        extra = {}
        if self.config.reconstruction_loss == "mse":
            reconstruction_loss = F.mse_loss(reconstruction, target)
        elif self.config.reconstruction_loss == "l1":
            reconstruction_loss = F.l1_loss(reconstruction, target)
        else:  # Bernoulli logits against binary targets; mean per pixel keeps the scale of the other losses
            reconstruction_loss = F.binary_cross_entropy_with_logits(reconstruction, (target > 0).float())
            extra["reconstruction_nats_per_image"] = reconstruction_loss.detach() * target[0].numel()
        total = reconstruction_loss + output.aux_loss
        metrics = {
            "reconstruction_loss": reconstruction_loss.detach(),
            "quantizer_loss": output.aux_loss.detach(),
            **extra,
            **{name: value.detach() for name, value in output.metrics.items()},
        }
        return total, metrics


class LFQVAE(VQVAE):
    """The VQ-VAE with `LFQVAEConfig` (tokenizer kind "lfq"): same networks, lookup-free codes."""

    config_class: ClassVar[type[VQVAEConfig]] = LFQVAEConfig
