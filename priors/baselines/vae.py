"""VAE over token sequences: a latent-variable density whose likelihood is only bounded or estimated.

Kingma & Welling 2014, "Auto-Encoding Variational Bayes": z ~ N(0, I) of `latent_dim` dimensions,
a decoder p(x | z, c) that factorises over positions (one Bernoulli per position for two tokens,
as the paper's binarized-MNIST model, otherwise a softmax per position), and an MLP encoder
q(z | x, c) = N(mu, diag sigma^2), trained by the reparameterised single-sample ELBO with the
Gaussian KL in closed form. The ELBO is a lower bound on log p(x | c), so `log_prob_is_bound =
True`; `log_prob` reports the importance-weighted estimate of Burda et al. 2016 ("Importance
Weighted Autoencoders"), log (1/k) sum_k p(x, z_k | c) / q(z_k | x, c) with z_k ~ q: a stochastic
lower bound in expectation that tightens as k grows (the protocol of the VAE and IWAE papers,
k = 5000 in Burda et al.; `importance_samples` here). Conditioning (Sohn et al. 2015, "Learning
Structured Output Representation using Deep Conditional Generative Models") adds a class
embedding to the first hidden layer of both networks; the class index follows the comparison
priors (`common.py`): classes `0..C-1` and the null class `C`, trained by label dropout.

Two options follow the VampPrior paper's VAE baseline (Tomczak & Welling 2018, 88.56 nats on this
static split): `gated` hidden layers h = (W x + b) * sigmoid(V x + c) (Dauphin et al. 2017) in
place of ReLU layers, and a KL warm-up, whose weight rises linearly from 0 to 1 over
`kl_warmup_steps` training steps (Bowman et al. 2016; Sonderby et al. 2016), so the decoder learns
to use the latent before the KL pulls the posterior to the prior. The warm-up changes only the
training loss; `elbo`, `log_prob` and the logged ELBO are always the true ones.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from priors.baselines.common import (
    BaselinePrior,
    binary_to_categorical_logits,
    check_sizes,
    config_from_dict,
)
from priors.sampling import SamplingOptions, draw, filter_logits


@dataclass(frozen=True)
class VAEConfig:
    vocab_size: int
    seq_len: int
    num_classes: int = 0
    latent_dim: int = 32
    hidden_sizes: tuple[int, ...] = (512, 256)  # encoder widths; the decoder mirrors them
    importance_samples: int = 100  # k of the importance-weighted log_prob estimate
    importance_chunk_size: int = 50  # latents evaluated at once, bounding memory to (b chunk L V)
    label_dropout: float = 0.1
    gated: bool = False  # gated linear hidden layers instead of ReLU layers
    kl_warmup_steps: int = 0  # the KL weight of the training loss rises from 0 to 1 over these steps

    def __post_init__(self):
        if isinstance(self.hidden_sizes, list):  # JSON/TOML lists
            object.__setattr__(self, "hidden_sizes", tuple(self.hidden_sizes))
        check_sizes(self.vocab_size, self.seq_len, self.num_classes)
        if self.latent_dim < 1 or not self.hidden_sizes or min(self.hidden_sizes) < 1:
            raise ValueError(f"latent_dim and hidden_sizes must be positive, "
                             f"got {self.latent_dim}, {self.hidden_sizes}")
        if self.importance_samples < 1 or self.importance_chunk_size < 1:
            raise ValueError("importance_samples and importance_chunk_size must be at least 1")
        if not 0.0 <= self.label_dropout <= 1.0:
            raise ValueError(f"label_dropout must lie in [0, 1], got {self.label_dropout}")
        if self.kl_warmup_steps < 0:
            raise ValueError(f"kl_warmup_steps must be >= 0, got {self.kl_warmup_steps}")

    @classmethod
    def from_dict(cls, data: dict) -> "VAEConfig":
        return config_from_dict(cls, data)


class ConditionalMLP(nn.Module):
    """x (b i) and class index (b,) -> (b o): an MLP whose first hidden layer adds a class embedding.

    Adding an embedding to the first pre-activation equals concatenating a one-hot class code to
    the input, without materialising it. Hidden layers are ReLU layers, or with `gated` gated
    linear layers, (W x + b) * sigmoid(V x + c).
    """

    def __init__(self, in_features: int, hidden_sizes: tuple[int, ...], out_features: int, num_class_indices: int,
                 gated: bool = False):
        super().__init__()
        sizes = (in_features, *hidden_sizes)
        self.layers = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.gates = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:])) if gated else None
        self.class_embedding = nn.Embedding(num_class_indices, hidden_sizes[0])
        nn.init.zeros_(self.class_embedding.weight)
        self.output = nn.Linear(hidden_sizes[-1], out_features)

    def forward(self, x: Tensor, class_index: Tensor) -> Tensor:
        hidden = x
        for index, layer in enumerate(self.layers):
            pre_activation = layer(hidden)
            if index == 0:
                pre_activation = pre_activation + self.class_embedding(class_index)
            if self.gates is None:
                hidden = F.relu(pre_activation)
            else:
                hidden = pre_activation * torch.sigmoid(self.gates[index](hidden))
        return self.output(hidden)


def gaussian_log_density(z: Tensor, mean: Tensor, log_variance: Tensor) -> Tensor:
    """(... d) -> (...): log N(z; mean, diag exp(log_variance)) summed over the last axis."""
    squared = (z - mean) ** 2 * torch.exp(-log_variance)
    return -0.5 * (squared + log_variance + math.log(2 * math.pi)).sum(dim=-1)


class VAE(BaselinePrior):
    """encoder: (b L K) tokens -> (b 2d) posterior mean and log-variance; decoder: (b d) -> (b L K) logits.

    K = 1 for two tokens (the token value in, one Bernoulli logit out), K = V otherwise (one-hot in,
    softmax logits out).
    """

    kind: ClassVar[str] = "vae"
    config_class: ClassVar[type] = VAEConfig
    log_prob_is_bound: ClassVar[bool] = True  # log_prob is an importance-sampled lower-bound estimate
    has_density: ClassVar[bool] = True
    fit_by_counting: ClassVar[bool] = False
    supports_prefix: ClassVar[bool] = False  # p(x_rest | x_prefix) needs the intractable posterior
    supports_guidance: ClassVar[bool] = False


    def __init__(self, config: VAEConfig):
        super().__init__(config)
        self.block = 1 if config.vocab_size == 2 else config.vocab_size
        num_class_indices = config.num_classes + 1
        features = config.seq_len * self.block
        self.encoder = ConditionalMLP(features, config.hidden_sizes, 2 * config.latent_dim, num_class_indices,
                                      config.gated)
        self.decoder = ConditionalMLP(config.latent_dim, config.hidden_sizes[::-1], features, num_class_indices,
                                      config.gated)

    # ---- the two networks ----------------------------------------------------------------
    def encoder_input(self, input_ids: Tensor) -> Tensor:
        """(b L) tokens -> (b (L K)) features."""
        if self.block == 1:
            return input_ids.float()
        return rearrange(F.one_hot(input_ids, self.block).float(), "b l k -> b (l k)")

    def posterior(self, input_ids: Tensor, class_index: Tensor) -> tuple[Tensor, Tensor]:
        """(b L) tokens -> mean and log-variance (b d) of q(z | x, c)."""
        mean, log_variance = self.encoder(self.encoder_input(input_ids), class_index).float().chunk(2, dim=-1)
        return mean, log_variance

    def decoder_logits(self, z: Tensor, class_index: Tensor) -> Tensor:
        """(b d) latents -> (b L V) categorical logits of p(x_t | z, c)."""
        logits = rearrange(self.decoder(z, class_index), "b (l k) -> b l k", k=self.block)
        if self.block == 1:
            return binary_to_categorical_logits(rearrange(logits, "b l 1 -> b l"))
        return logits

    def reconstruction_log_prob(self, input_ids: Tensor, z: Tensor, class_index: Tensor) -> Tensor:
        """(b L) tokens, (b d) latents -> (b,) log p(x | z, c) in nats."""
        log_probs = F.log_softmax(self.decoder_logits(z, class_index).float(), dim=-1)
        return log_probs.gather(-1, input_ids.unsqueeze(-1)).squeeze(-1).sum(dim=-1)

    @staticmethod
    def kl_to_prior(mean: Tensor, log_variance: Tensor) -> Tensor:
        """(b d) -> (b,) KL(N(mean, exp(log_variance)) || N(0, I)) in closed form."""
        return 0.5 * (mean**2 + log_variance.exp() - 1.0 - log_variance).sum(dim=-1)

    def standard_normal(self, shape: tuple[int, ...], generator: torch.Generator | None) -> Tensor:
        noise_device = generator.device if generator is not None else self.device
        return torch.randn(shape, generator=generator, device=noise_device).to(self.device)

    # ---- bounds and estimates ------------------------------------------------------------
    def elbo_terms(self, input_ids: Tensor, class_index: Tensor, num_samples: int = 1,
                   generator: torch.Generator | None = None) -> tuple[Tensor, Tensor]:
        """(b,) reconstruction E_q log p(x | z, c) (a `num_samples` Monte-Carlo mean) and (b,) exact KL."""
        mean, log_variance = self.posterior(input_ids, class_index)
        noise = self.standard_normal((num_samples, *mean.shape), generator)
        z = mean + torch.exp(0.5 * log_variance) * noise  # reparameterised: gradients reach the encoder
        repeated_ids = repeat(input_ids, "b l -> (s b) l", s=num_samples)
        repeated_classes = repeat(class_index, "b -> (s b)", s=num_samples)
        reconstruction = self.reconstruction_log_prob(repeated_ids, rearrange(z, "s b d -> (s b) d"), repeated_classes)
        reconstruction = rearrange(reconstruction, "(s b) -> s b", s=num_samples).mean(dim=0)
        return reconstruction, self.kl_to_prior(mean, log_variance)

    @torch.no_grad()
    def elbo(self, input_ids: Tensor, label: Tensor | int | None = None, num_samples: int = 1,
             generator: torch.Generator | None = None) -> Tensor:
        """(b L) -> (b,) ELBO in nats; its reconstruction term is a `num_samples`-sample estimate."""
        input_ids = self.check_tokens(input_ids.to(self.device))
        reconstruction, kl = self.elbo_terms(input_ids, self.class_index(label, input_ids.shape[0]), num_samples,
                                             generator)
        return reconstruction - kl

    @torch.no_grad()
    def log_prob(self, input_ids: Tensor, label: Tensor | int | None = None, num_samples: int | None = None,
                 generator: torch.Generator | None = None) -> Tensor:
        """(b L) -> (b,) importance-weighted estimate of log p(x | c) in nats (see the module docstring).

        Not exact: with k = `num_samples` (default `config.importance_samples`) proposals from q its
        expectation lies below log p(x | c) and rises to it as k grows. Latents are drawn in chunks
        of `config.importance_chunk_size`.
        """
        input_ids = self.check_tokens(input_ids.to(self.device))
        classes = self.class_index(label, input_ids.shape[0])
        samples = num_samples or self.config.importance_samples
        mean, log_variance = self.posterior(input_ids, classes)
        log_weights = []
        for start in range(0, samples, self.config.importance_chunk_size):
            chunk = min(self.config.importance_chunk_size, samples - start)
            z = mean + torch.exp(0.5 * log_variance) * self.standard_normal((chunk, *mean.shape), generator)
            flat_z = rearrange(z, "s b d -> (s b) d")
            reconstruction = self.reconstruction_log_prob(
                repeat(input_ids, "b l -> (s b) l", s=chunk), flat_z, repeat(classes, "b -> (s b)", s=chunk)
            )
            log_prior = gaussian_log_density(z, torch.zeros_like(z), torch.zeros_like(z))
            log_proposal = gaussian_log_density(z, mean, log_variance)
            log_weights.append(rearrange(reconstruction, "(s b) -> s b", s=chunk) + log_prior - log_proposal)
        return torch.logsumexp(torch.cat(log_weights), dim=0) - math.log(samples)

    # ---- training (`Trainable`) ----------------------------------------------------------
    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": [p for p in self.parameters() if p.requires_grad]}

    def phases(self, step: int) -> list[str]:
        return ["main"]

    def kl_weight(self, step: int) -> float:
        """The KL term's weight in the training loss at `step`: step / kl_warmup_steps, at most 1."""
        warmup = self.config.kl_warmup_steps
        return 1.0 if warmup == 0 else min(1.0, step / warmup)

    def loss(self, batch: dict, phase: str, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Negative ELBO per token (nats), one reparameterised latent per sequence (KL weighted during warm-up,
        in training mode only)."""
        input_ids = self.check_tokens(batch["input_ids"].to(self.device))
        label = batch.get("label") if self.config.num_classes > 0 else None
        reconstruction, kl = self.elbo_terms(input_ids, self.drop_labels(label, input_ids.shape[0]))
        elbo = (reconstruction - kl).mean()
        # warm-up is a training device: in eval mode (validation, early stopping) the loss is the true -ELBO
        kl_weight = self.kl_weight(step) if self.training else 1.0
        loss = -(reconstruction - kl_weight * kl).mean() / self.config.seq_len
        metrics = {
            "elbo": elbo.detach(),  # nats per sequence
            "kl": kl.mean().detach(),
            "reconstruction": -reconstruction.mean().detach(),  # nats per sequence
            "bits_per_token_bound": -elbo.detach() / self.config.seq_len / math.log(2.0),
        }
        return loss, metrics

    # ---- sampling -------------------------------------------------------------------------
    @torch.no_grad()
    def sample(self, n: int, label: Tensor | int | None = None, prefix: Tensor | None = None,
               options: SamplingOptions = SamplingOptions(), generator: torch.Generator | None = None) -> Tensor:
        """z ~ N(0, I), then every position of x ~ p(x | z, c) independently -> (n L) int64.

        Temperature, top-k and top-p reshape each position's softmax. A prefix and classifier-free
        guidance are refused: completing a prefix exactly needs the intractable p(z | x_prefix).
        """
        if prefix is not None:
            raise NotImplementedError("a VAE cannot condition on a prefix exactly (p(z | prefix) is intractable); "
                                      "sample without a prefix")
        if label is not None and options.guidance_scale != 1.0:
            raise NotImplementedError("classifier-free guidance is not supported by the VAE; use guidance_scale=1")
        classes = self.class_index(label, n)
        was_training = self.training
        self.eval()
        try:
            z = self.standard_normal((n, self.config.latent_dim), generator)
            logits = rearrange(self.decoder_logits(z, classes), "n l v -> (n l) v")
            tokens = draw(filter_logits(logits, options), generator)
        finally:
            self.train(was_training)
        return rearrange(tokens, "(n l) -> n l", n=n)
