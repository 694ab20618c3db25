"""GAN over token sequences: an implicit generator of discrete tokens, trained adversarially, with no density.

Goodfellow et al. 2014, "Generative Adversarial Nets", with the training recipe of DCGAN (Radford
et al. 2016, "Unsupervised Representation Learning with Deep Convolutional Generative Adversarial
Networks": normalised generator layers, LeakyReLU(0.2) in the discriminator, the non-saturating
generator loss). The nets are MLPs, because a prior sees only a flat sequence of `seq_len` tokens,
not the grid it came from. Tokens are discrete, so the generator's output is a continuous
relaxation: per-position logits (b L V), turned into a one-hot sample by the straight-through
Gumbel-softmax (Jang et al. 2017, "Categorical Reparameterization with Gumbel-Softmax"; Maddison et
al. 2017) whose forward pass is an exact draw from softmax(logits) and whose gradient is that of
the tempered softmax; real data reach the discriminator as one-hot maps, so it never sees a soft
input it could tell apart from data by its softness (`relaxation = "softmax"` feeds the
probabilities instead). Sampling draws z ~ N(0, I) and then each position from the same softmax,
i.e. exactly the distribution the discriminator was trained against (temperature / top-k / top-p
reshape it). A class embedding is concatenated to z and to the discriminator's input; the null
class `C` (label dropout) gives unconditional samples. A GAN defines no likelihood: `log_prob`
raises, `has_density = False`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import Tensor, nn
from torch.func import functional_call

from priors.baselines.common import BaselinePrior, check_sizes, config_from_dict
from priors.sampling import SamplingOptions, draw, filter_logits

PHASES = ("discriminator", "generator")
RELAXATIONS = ("gumbel", "softmax")


@dataclass(frozen=True)
class GANConfig:
    vocab_size: int
    seq_len: int
    num_classes: int = 0
    latent_dim: int = 64
    generator_hidden_sizes: tuple[int, ...] = (256, 512)
    discriminator_hidden_sizes: tuple[int, ...] = (512, 256)
    class_embedding_dim: int = 16  # concatenated to z and to the discriminator's input
    relaxation: str = "gumbel"  # "gumbel": straight-through one-hot draws; "softmax": probabilities
    gumbel_temperature: float = 1.0  # temperature of the relaxed gradient (forward draws are exact)
    label_dropout: float = 0.1

    def __post_init__(self):
        for name in ("generator_hidden_sizes", "discriminator_hidden_sizes"):
            if isinstance(getattr(self, name), list):  # JSON/TOML lists
                object.__setattr__(self, name, tuple(getattr(self, name)))
        check_sizes(self.vocab_size, self.seq_len, self.num_classes)
        sizes = (*self.generator_hidden_sizes, *self.discriminator_hidden_sizes)
        if self.latent_dim < 1 or self.class_embedding_dim < 1 or not self.generator_hidden_sizes \
                or not self.discriminator_hidden_sizes or min(sizes) < 1:
            raise ValueError("latent_dim, class_embedding_dim and every hidden size must be positive")
        if self.relaxation not in RELAXATIONS:
            raise ValueError(f"relaxation must be one of {RELAXATIONS}, got {self.relaxation!r}")
        if not self.gumbel_temperature > 0:
            raise ValueError(f"gumbel_temperature must be > 0, got {self.gumbel_temperature}")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1], got {self.label_dropout}")

    @classmethod
    def from_dict(cls, data: dict) -> "GANConfig":
        return config_from_dict(cls, data)


def mlp(sizes: tuple[int, ...], hidden_layer) -> nn.Sequential:
    """Linear layers of `sizes`, each hidden one followed by `hidden_layer(width)` modules."""
    layers = []
    for index, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(a, b))
        if index < len(sizes) - 2:
            layers.extend(hidden_layer(b))
    return nn.Sequential(*layers)


class Generator(nn.Module):
    """z (b d) and class index (b,) -> logits (b L V); LayerNorm + ReLU hidden layers (DCGAN's
    normalised generator, with a per-example norm so that a batch's examples stay independent)."""

    def __init__(self, config: GANConfig):
        super().__init__()
        self.config = config
        self.class_embedding = nn.Embedding(config.num_classes + 1, config.class_embedding_dim)
        sizes = (config.latent_dim + config.class_embedding_dim, *config.generator_hidden_sizes,
                 config.seq_len * config.vocab_size)
        self.net = mlp(sizes, lambda width: [nn.LayerNorm(width), nn.ReLU()])

    def forward(self, z: Tensor, class_index: Tensor) -> Tensor:
        logits = self.net(torch.cat([z, self.class_embedding(class_index)], dim=-1))
        return rearrange(logits, "b (l v) -> b l v", v=self.config.vocab_size)


class Discriminator(nn.Module):
    """Token maps (b L V) (one-hot or relaxed) and class index (b,) -> (b,) real-vs-fake logits."""

    def __init__(self, config: GANConfig):
        super().__init__()
        self.class_embedding = nn.Embedding(config.num_classes + 1, config.class_embedding_dim)
        sizes = (config.seq_len * config.vocab_size + config.class_embedding_dim,
                 *config.discriminator_hidden_sizes, 1)
        self.net = mlp(sizes, lambda width: [nn.LeakyReLU(0.2)])

    def forward(self, token_maps: Tensor, class_index: Tensor) -> Tensor:
        features = torch.cat([rearrange(token_maps, "b l v -> b (l v)"), self.class_embedding(class_index)], dim=-1)
        return rearrange(self.net(features), "b 1 -> b")


class GAN(BaselinePrior):
    """Two-group `Trainable` ("discriminator", "generator") and a `Prior` that samples but has no density."""

    kind: ClassVar[str] = "gan"
    config_class: ClassVar[type] = GANConfig
    has_density: ClassVar[bool] = False
    log_prob_is_bound: ClassVar[bool] = False
    fit_by_counting: ClassVar[bool] = False
    supports_prefix: ClassVar[bool] = False
    supports_guidance: ClassVar[bool] = False


    def __init__(self, config: GANConfig):
        super().__init__(config)
        self.generator = Generator(config)
        self.discriminator = Discriminator(config)

    def log_prob(self, input_ids: Tensor, label: Tensor | int | None = None) -> Tensor:
        raise NotImplementedError("a GAN defines no likelihood (has_density = False): it has no log_prob; "
                                  "compare it by sample quality instead")

    # ---- the two players -----------------------------------------------------------------
    def latents(self, n: int, generator: torch.Generator | None = None) -> Tensor:
        noise_device = generator.device if generator is not None else self.device
        return torch.randn(n, self.config.latent_dim, generator=generator, device=noise_device).to(self.device)

    def fake_token_maps(self, class_index: Tensor) -> Tensor:
        """(b,) class indices -> (b L V) generated token maps, differentiable w.r.t. the generator.

        Uses torch's global RNG, which the training loop re-seeds every step.
        """
        logits = self.generator(self.latents(class_index.shape[0]), class_index).float()
        if self.config.relaxation == "softmax":
            return logits.softmax(dim=-1)
        return F.gumbel_softmax(logits, tau=self.config.gumbel_temperature, hard=True, dim=-1)

    def frozen_discriminator(self, token_maps: Tensor, class_index: Tensor) -> Tensor:
        """Discriminator logits whose gradient reaches the inputs but not the discriminator's weights,
        so the generator phase leaves the discriminator's gradients (and DDP buckets) untouched."""
        detached = {name: parameter.detach() for name, parameter in self.discriminator.named_parameters()}
        return functional_call(self.discriminator, detached, (token_maps, class_index))

    # ---- training (`Trainable`) ----------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {
            "discriminator": [p for p in self.discriminator.parameters() if p.requires_grad],
            "generator": [p for p in self.generator.parameters() if p.requires_grad],
        }

    def phases(self, step: int) -> list[str]:
        return list(PHASES)

    def loss(self, batch: dict, phase: str, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Non-saturating GAN losses: D minimises softplus(-D(real)) + softplus(D(fake)), G softplus(-D(fake))."""
        input_ids = self.check_tokens(batch["input_ids"].to(self.device))
        label = batch.get("label") if self.config.num_classes > 0 else None
        classes = self.drop_labels(label, input_ids.shape[0])
        if phase == "discriminator":
            with torch.no_grad():  # the generator is a fixed opponent in this phase
                fake = self.fake_token_maps(classes)
            real = F.one_hot(input_ids, self.config.vocab_size).float()
            real_logits = self.discriminator(real, classes).float()
            fake_logits = self.discriminator(fake, classes).float()
            loss = F.softplus(-real_logits).mean() + F.softplus(fake_logits).mean()
            metrics = {
                "d_real": torch.sigmoid(real_logits).mean().detach(),  # D's belief that data is real
                "d_fake": torch.sigmoid(fake_logits).mean().detach(),
            }
            return loss, metrics
        if phase == "generator":
            fake_logits = self.frozen_discriminator(self.fake_token_maps(classes), classes).float()
            loss = F.softplus(-fake_logits).mean()
            return loss, {"d_fake": torch.sigmoid(fake_logits).mean().detach()}
        raise ValueError(f"GAN phases are {PHASES}; got {phase!r}")

    # ---- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, label: Tensor | int | None = None, prefix: Tensor | None = None,
               options: SamplingOptions = SamplingOptions(), generator: torch.Generator | None = None) -> Tensor:
        """z ~ N(0, I), then each position from softmax(logits) reshaped by `options` -> (n L) int64.

        `SamplingOptions(top_k=1)` takes the argmax token of each position. A prefix and guidance are refused.
        """
        if prefix is not None:
            raise NotImplementedError("a GAN cannot condition on a prefix (it has no tractable conditional); "
                                      "sample without a prefix")
        if label is not None and options.guidance_scale != 1.0:
            raise NotImplementedError("classifier-free guidance is not supported by the GAN; use guidance_scale=1")
        classes = self.class_index(label, n)
        was_training = self.training
        self.eval()
        try:
            logits = self.generator(self.latents(n, generator), classes).float()
            tokens = draw(filter_logits(rearrange(logits, "n l v -> (n l) v"), options), generator)
        finally:
            self.train(was_training)
        return rearrange(tokens, "(n l) -> n l", n=n)
