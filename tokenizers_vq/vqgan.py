"""VQ-GAN image tokenizer: a VQ-VAE trained with an added patch-discriminator loss.

Implements Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis": the
autoencoder and quantizer are a `VQVAE` (whatever quantizer its config names), trained on its
reconstruction (+ optional LPIPS perceptual) loss and quantizer loss, plus, from
`discriminator_start` on, `discriminator_weight * lambda * L_G`, where L_G is a PatchGAN's hinge or
non-saturating generator loss and lambda the adaptive weight that matches the gradient norms of
the two terms at the decoder's last layer. The discriminator trains in its own phase (its own
optimizer in the loop) on real images against reconstructions, optionally with LeCAM
regularisation (Tseng et al. 2021). For stage two it is a tokenizer like any other: `encode`,
`decode`, `vocab_size`, `token_grid`, and a self-describing folder (`config.json` with kind
"vqgan" + `model.safetensors`, discriminator included, loaded strictly).
"""

from __future__ import annotations

import dataclasses
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import ClassVar

import torch
from torch import Tensor, nn
from torch.func import functional_call

from tokenizers_vq.losses import (
    GAN_LOSSES,
    LeCAMRegularizer,
    PerceptualLoss,
    adaptive_generator_weight,
    discriminator_loss,
    generator_loss,
    reconstruction_loss,
)
from tokenizers_vq.nets.discriminators import DiscriminatorConfig, build_discriminator
from tokenizers_vq.quantizers.base import config_from_dict
from tokenizers_vq.checkpoint import PretrainedTokenizer
from tokenizers_vq.vqvae import VQVAE, TokenizerOutput, VQVAEConfig

logger = logging.getLogger(__name__)

PHASES = ("generator", "discriminator")


@dataclass(frozen=True)
class VQGANConfig:
    """The autoencoder's config (nested), the discriminator's, and how the two losses combine."""

    kind: ClassVar[str] = "vqgan"

    autoencoder: VQVAEConfig = field(default_factory=VQVAEConfig)
    discriminator: DiscriminatorConfig = field(default_factory=DiscriminatorConfig)
    gan_loss: str = "hinge"  # "hinge" | "non_saturating"
    discriminator_weight: float = 0.1  # scales the (adaptive-weighted) generator loss
    discriminator_start: int = 500  # optimizer step from which the GAN terms train
    adaptive_weight: bool = True
    lecam_weight: float = 0.0  # 0 disables LeCAM
    lecam_decay: float = 0.99  # EMA decay of LeCAM's logit anchors
    perceptual_weight: float = 0.0  # 0 disables the perceptual loss
    perceptual_weights_path: str = ""  # local safetensors file (see losses.PerceptualLoss); never downloaded

    def __post_init__(self):
        if not isinstance(self.autoencoder, VQVAEConfig):
            raise ValueError(f"autoencoder must be a VQVAEConfig, got {type(self.autoencoder).__name__}")
        if not isinstance(self.discriminator, DiscriminatorConfig):
            raise ValueError(f"discriminator must be a DiscriminatorConfig, got {type(self.discriminator).__name__}")
        if self.gan_loss not in GAN_LOSSES:
            raise ValueError(f"gan_loss must be one of {GAN_LOSSES}, got {self.gan_loss!r}")
        for name in ("discriminator_weight", "discriminator_start", "lecam_weight", "perceptual_weight"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if not 0.0 <= self.lecam_decay < 1.0:
            raise ValueError(f"lecam_decay must lie in [0, 1), got {self.lecam_decay}")
        if self.perceptual_weight > 0 and not self.perceptual_weights_path:
            raise ValueError(
                "perceptual_weight > 0 needs perceptual_weights_path, a local safetensors file of LPIPS-style "
                "weights (nothing is downloaded)"
            )

    @classmethod
    def from_dict(cls, data: dict) -> "VQGANConfig":
        return config_from_dict(cls, data)


def last_conv_layer(module: nn.Module) -> nn.Conv2d:
    """The last `nn.Conv2d` registered under `module`: for `Decoder2d`, its output convolution."""
    convs = [layer for layer in module.modules() if isinstance(layer, nn.Conv2d)]
    if not convs:
        raise ValueError(f"{type(module).__name__} has no Conv2d layer to take the adaptive weight at")
    return convs[-1]


class VQGAN(PretrainedTokenizer, nn.Module):
    """Image tokenizer and two-group `Trainable` ("generator", "discriminator") around a `VQVAE`.

    Submodules: `vqvae` (the tokenizer proper), `discriminator`, `lecam` (EMA buffers only).
    The perceptual network, when enabled, is deliberately kept out of the module tree: its frozen
    weights come from their own file, so they must not be copied into every tokenizer checkpoint,
    and as module buffers DDP would broadcast them at every forward. `_apply` still moves it with
    the model (`.to`, `.cuda`, `.half`).
    """

    config_class: ClassVar[type[VQGANConfig]] = VQGANConfig

    def __init__(self, config: VQGANConfig):
        super().__init__()
        self.config = config
        self.vqvae = VQVAE(config.autoencoder)
        self.discriminator = build_discriminator(config.discriminator, config.autoencoder.in_channels)
        self.lecam = LeCAMRegularizer(config.lecam_decay)
        perceptual = PerceptualLoss.from_file(config.perceptual_weights_path) if config.perceptual_weight > 0 else None
        object.__setattr__(self, "perceptual", perceptual)  # bypasses nn.Module registration, see above

    def _apply(self, fn, recurse=True):
        super()._apply(fn, recurse)
        if self.perceptual is not None:
            self.perceptual._apply(fn, recurse)
        return self

    # --- the tokenizer API, delegated -----------------------------------------------------------

    @property
    def vocab_size(self) -> int:
        return self.vqvae.vocab_size

    @property
    def num_codebooks(self) -> int:
        """Indices per grid cell (1 unless the inner VQ-VAE has a residual quantizer)."""
        return self.vqvae.num_codebooks

    @property
    def downsampling_factor(self) -> int:
        return self.vqvae.downsampling_factor

    def token_grid(self, input_shape: tuple[int, int, int]) -> tuple[int, int]:
        return self.vqvae.token_grid(input_shape)

    def encode(self, x: Tensor) -> Tensor:
        """(b c h w) in [-1, 1] -> (b h' w') int64 tokens."""
        return self.vqvae.encode(x)

    def decode(self, tokens: Tensor) -> Tensor:
        """(b h' w') int64 tokens -> (b c h w) images clamped to [-1, 1]."""
        return self.vqvae.decode(tokens)

    def forward(self, x: Tensor) -> TokenizerOutput:
        return self.vqvae(x)

    def last_decoder_layer(self) -> nn.Conv2d:
        """The decoder's output convolution, where the adaptive weight compares gradients."""
        return last_conv_layer(self.vqvae.decoder)

    # --- Trainable ------------------------------------------------------------------------------

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "generator": [p for p in self.vqvae.parameters() if p.requires_grad],
            "discriminator": [p for p in self.discriminator.parameters() if p.requires_grad],
        }

    def phases(self, step: int) -> list[str]:
        return ["generator"] if step < self.config.discriminator_start else list(PHASES)

    def loss(self, batch: dict, phase: str, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        images = batch["pixel_values"]
        if phase == "generator":
            return self._generator_loss(images, step)
        if phase == "discriminator":
            return self._discriminator_loss(images)
        raise ValueError(f"VQGAN phases are {PHASES}; got {phase!r}")

    def _frozen_discriminator(self, images: Tensor) -> Tensor:
        """Discriminator logits whose gradient reaches `images` but not the discriminator's weights.

        So the generator phase leaves the discriminator's parameters out of the graph: nothing to
        compute, nothing for DDP to all-reduce, and the discriminator's optimizer state untouched.
        """
        detached = {name: parameter.detach() for name, parameter in self.discriminator.named_parameters()}
        return functional_call(self.discriminator, detached, (images,))

    def _generator_loss(self, images: Tensor, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        output = self.vqvae(images)
        reconstruction = output.reconstruction
        rec_loss = reconstruction_loss(reconstruction, images, self.config.autoencoder.reconstruction_loss)
        nll_loss = rec_loss  # taming's "nll": everything that asks the decoder to reproduce the input
        metrics = {"reconstruction_loss": rec_loss.detach()}
        if self.perceptual is not None:
            perceptual_loss = self.perceptual(reconstruction, images)
            nll_loss = nll_loss + self.config.perceptual_weight * perceptual_loss
            metrics["perceptual_loss"] = perceptual_loss.detach()
        total = nll_loss + output.aux_loss
        # Before the start the GAN terms are absent, but logged as 0 so every step has the same keys.
        g_loss = adaptive = torch.zeros((), device=images.device)
        if step >= self.config.discriminator_start:
            g_loss = generator_loss(self._frozen_discriminator(reconstruction), self.config.gan_loss)
            if self.config.adaptive_weight:
                adaptive = adaptive_generator_weight(nll_loss, g_loss, self.last_decoder_layer().weight)
            else:
                adaptive = torch.ones((), device=images.device)
            total = total + self.config.discriminator_weight * adaptive * g_loss
        metrics.update(
            quantizer_loss=output.aux_loss.detach(),
            g_loss=g_loss.detach(),
            adaptive_weight=adaptive,
            **{name: value.detach() for name, value in output.metrics.items()},
        )
        return total, metrics

    @torch.no_grad()
    def _reconstruct_without_updates(self, images: Tensor) -> Tensor:
        """The autoencoder's output in eval mode: the quantizer then neither updates its codebook
        statistics (the generator phase of this step already did) nor runs collectives."""
        was_training = self.vqvae.training
        self.vqvae.eval()
        try:
            return self.vqvae(images).reconstruction
        finally:
            self.vqvae.train(was_training)

    def _discriminator_loss(self, images: Tensor) -> tuple[Tensor, dict[str, Tensor]]:
        fakes = self._reconstruct_without_updates(images).to(images.dtype)
        # One pass over real and fake together; GroupNorm is per sample, so they do not interact.
        logits = self.discriminator(torch.cat([images, fakes]))
        logits_real, logits_fake = logits.split(images.shape[0])
        d_loss = discriminator_loss(logits_real, logits_fake, self.config.gan_loss)
        total = d_loss
        lecam_loss = torch.zeros((), device=images.device)
        if self.config.lecam_weight > 0:
            lecam_loss = self.lecam(logits_real, logits_fake)
            total = total + self.config.lecam_weight * lecam_loss
        metrics = {
            "d_loss": d_loss.detach(),
            "lecam_loss": lecam_loss.detach(),
            "logits_real": logits_real.detach().float().mean(),
            "logits_fake": logits_fake.detach().float().mean(),
        }
        return total, metrics

    # --- checkpoints ----------------------------------------------------------------------------

    @classmethod
    def prepare_loaded_config(cls, config: VQGANConfig, directory: Path) -> VQGANConfig:
        """The perceptual weights are a training-time file outside the folder: when the config names
        one that is not there, the tokenizer still loads (for encoding and decoding), with the
        perceptual loss switched off in its config and a warning."""
        if config.perceptual_weight > 0 and not Path(config.perceptual_weights_path).is_file():
            logger.warning("perceptual weights %s not found; loading %s without the perceptual loss",
                           config.perceptual_weights_path, directory)
            config = dataclasses.replace(config, perceptual_weight=0.0, perceptual_weights_path="")
        return config
