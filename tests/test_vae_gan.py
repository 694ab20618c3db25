"""The VAE and GAN comparison priors: the VAE's bound and estimate against an exact marginal, and the
GAN's two alternating phases under the real training loop.

The exact log marginal log p(x) = log integral p(x | z) N(z; 0, 1) dz of a VAE with a 1-D latent is
computed on a fine grid, and the exact ELBO by Gauss-Hermite quadrature over q(z | x), so the
inequalities are checked without Monte-Carlo noise.
"""

import itertools
import json
import math

import numpy as np
import pytest
import torch

from pipelines.loop import TrainConfig, train
from priors.baselines.gan import GAN, GANConfig
from priors.baselines.vae import VAE, VAEConfig
from priors.sampling import SamplingOptions
from helpers.optimize import adam_steps


def all_sequences(vocab_size: int, seq_len: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=seq_len)))


def randomised(model, seed: int, scale: float = 1.0):
    """Random (not freshly initialised, often zero) weights, so the latent matters to the decoder."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(scale * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def small_vae(vocab_size=2, seq_len=3, num_classes=0, latent_dim=1, seed=0, **extra) -> VAE:
    config = VAEConfig(vocab_size=vocab_size, seq_len=seq_len, num_classes=num_classes, latent_dim=latent_dim,
                       hidden_sizes=(8,), importance_chunk_size=256, **extra)
    return randomised(VAE(config), seed, scale=0.3)


@torch.no_grad()
def exact_log_marginal(model: VAE, sequences: torch.Tensor, class_index: int) -> torch.Tensor:
    """(n L) -> (n,) log p(x | c) by the rectangle rule over a 1-D latent on [-10, 10]."""
    z = torch.linspace(-10.0, 10.0, 4001).unsqueeze(-1)
    classes = torch.full((len(z),), class_index)
    log_prior = -0.5 * z[:, 0].double() ** 2 - 0.5 * math.log(2 * math.pi)
    rows = [model.reconstruction_log_prob(x.expand(len(z), -1), z, classes).double() + log_prior for x in sequences]
    return torch.logsumexp(torch.stack(rows), dim=1) + math.log(20.0 / 4000)


@torch.no_grad()
def exact_elbo(model: VAE, sequences: torch.Tensor, class_index: int) -> torch.Tensor:
    """(n L) -> (n,) ELBO with E_q log p(x | z) by 60-node Gauss-Hermite quadrature (1-D latent)."""
    nodes, weights = np.polynomial.hermite_e.hermegauss(60)
    nodes, weights = torch.tensor(nodes).float(), torch.tensor(weights).double() / math.sqrt(2 * math.pi)
    classes = torch.full((len(sequences),), class_index)
    mean, log_variance = model.posterior(sequences, classes)
    expected = torch.zeros(len(sequences), dtype=torch.float64)
    for node, weight in zip(nodes, weights):
        z = mean + torch.exp(0.5 * log_variance) * node
        expected += weight * model.reconstruction_log_prob(sequences, z, classes).double()
    return expected - model.kl_to_prior(mean, log_variance).double()


# ---- VAE ----------------------------------------------------------------------------------


@pytest.mark.parametrize("gated", [False, True])
@pytest.mark.parametrize("num_classes", [0, 2])
def test_elbo_never_exceeds_the_exact_marginal(num_classes, gated):
    model = small_vae(num_classes=num_classes, gated=gated)
    sequences = all_sequences(2, 3)
    for class_index in range(num_classes + 1):  # the last index is the null class
        marginal = exact_log_marginal(model, sequences, class_index)
        assert marginal.exp().sum().item() == pytest.approx(1.0, abs=1e-3)  # the reference itself is right
        bound = exact_elbo(model, sequences, class_index)
        assert (bound <= marginal + 1e-4).all()
        assert bound.exp().sum().item() <= 1.0
        assert (marginal - bound).max() > 0.05  # the latent matters: the check is not vacuous
    label = None if num_classes == 0 else torch.zeros(len(sequences), dtype=torch.long)
    estimate = model.elbo(sequences, label, num_samples=4000, generator=torch.Generator().manual_seed(0))
    assert torch.allclose(estimate.double(), exact_elbo(model, sequences, 0), atol=0.05)


def test_importance_estimate_approaches_the_exact_marginal():
    model = small_vae()
    sequences = all_sequences(2, 3)
    marginal = exact_log_marginal(model, sequences, 0)
    generator = torch.Generator().manual_seed(0)
    # k = 1 is an unbiased estimate of the ELBO: average a few draws to compare the means.
    error_one = torch.stack([model.log_prob(sequences, num_samples=1, generator=generator) for _ in range(20)])
    error_one = (error_one.double().mean(0) - marginal).abs().mean()
    error_many = (model.log_prob(sequences, num_samples=1000, generator=generator).double() - marginal).abs().mean()
    assert error_many < error_one / 3
    assert error_many < 0.03
    assert model.log_prob_is_bound is True and model.has_density is True


def test_a_few_steps_raise_the_elbo():
    torch.manual_seed(0)
    model = VAE(VAEConfig(vocab_size=3, seq_len=6, latent_dim=2, hidden_sizes=(32,), label_dropout=0.0))
    data = torch.randint(3, (16, 6), generator=torch.Generator().manual_seed(1))
    data[:8, :3] = 0  # some structure to learn

    def mean_elbo():
        return model.elbo(data, num_samples=200, generator=torch.Generator().manual_seed(2)).mean().item()

    before = mean_elbo()
    _, metrics = adam_steps(model.train(), {"input_ids": data}, steps=30, lr=1e-2)
    assert set(metrics) == {"elbo", "kl", "reconstruction", "bits_per_token_bound"}
    assert mean_elbo() > before + 0.5


def test_kl_warmup_weights_only_the_training_loss():
    model = small_vae(vocab_size=3, seq_len=4, latent_dim=2, kl_warmup_steps=100, gated=True).train()
    data = all_sequences(3, 4)[::5]
    classes = model.class_index(None, len(data))
    for step, weight in [(0, 0.0), (25, 0.25), (100, 1.0), (500, 1.0)]:
        torch.manual_seed(step)
        loss, metrics = model.loss({"input_ids": data}, "main", step)
        torch.manual_seed(step)  # the same latent draw
        reconstruction, kl = model.elbo_terms(data, classes)
        torch.testing.assert_close(loss, -(reconstruction - weight * kl).mean() / 4)
        torch.testing.assert_close(metrics["elbo"], (reconstruction - kl).mean())  # the true ELBO, always
        assert kl.mean() > 0.01  # so the weight is visible
    model.eval()  # validation scores the true -ELBO, even during the warm-up
    torch.manual_seed(0)
    loss, _ = model.loss({"input_ids": data}, "main", 0)
    torch.manual_seed(0)
    reconstruction, kl = model.elbo_terms(data, classes)
    torch.testing.assert_close(loss, -(reconstruction - kl).mean() / 4)
    with pytest.raises(ValueError, match="kl_warmup_steps"):
        VAEConfig(vocab_size=2, seq_len=3, kl_warmup_steps=-1)


def test_vae_categorical_conditional_sampling_and_refusals():
    model = small_vae(vocab_size=4, seq_len=5, num_classes=3, latent_dim=2)
    generator = torch.Generator().manual_seed(0)
    tokens = model.sample(7, label=torch.tensor([0, 1, 2, 0, 1, 2, 0]), generator=generator)
    assert tokens.shape == (7, 5) and tokens.dtype == torch.long and 0 <= tokens.min() and tokens.max() < 4
    again = model.sample(7, label=torch.tensor([0, 1, 2, 0, 1, 2, 0]), generator=torch.Generator().manual_seed(0))
    assert torch.equal(tokens, again)
    # top_k=1 picks each position's mode of p(x | z): sampling with the same z twice agrees
    greedy = [model.sample(3, label=1, options=SamplingOptions(top_k=1), generator=torch.Generator().manual_seed(5))
              for _ in range(2)]
    assert torch.equal(*greedy)
    assert model.log_prob(tokens, torch.zeros(7, dtype=torch.long), num_samples=30).shape == (7,)
    with pytest.raises(NotImplementedError, match="prefix"):
        model.sample(2, prefix=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(NotImplementedError, match="guidance"):
        model.sample(2, label=0, options=SamplingOptions(guidance_scale=2.0))
    with pytest.raises(ValueError):
        model.log_prob(torch.full((1, 5), 4))


def test_vae_save_load_round_trip(tmp_path):
    model = small_vae(vocab_size=3, seq_len=4, num_classes=2, latent_dim=2)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "tokgen.json").read_text())
    assert record["kind"] == "vae" and record["config"]["hidden_sizes"] == [8]
    loaded = VAE.from_pretrained(tmp_path)
    assert loaded.config == model.config and not loaded.training
    tokens = all_sequences(3, 4)[::7]
    first = model.log_prob(tokens, 1, num_samples=50, generator=torch.Generator().manual_seed(3))
    second = loaded.log_prob(tokens, 1, num_samples=50, generator=torch.Generator().manual_seed(3))
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="unknown"):
        VAEConfig.from_dict({**record["config"], "beta": 2.0})
    with pytest.raises(ValueError, match="kind"):
        GAN.from_pretrained(tmp_path)


# ---- GAN ----------------------------------------------------------------------------------


def small_gan(num_classes=0, **overrides) -> GAN:
    torch.manual_seed(0)
    config = GANConfig(vocab_size=3, seq_len=6, num_classes=num_classes, latent_dim=4, generator_hidden_sizes=(16,),
                       discriminator_hidden_sizes=(16,), class_embedding_dim=4, **overrides)
    return GAN(config)


class TokenDataset(torch.utils.data.Dataset):
    def __init__(self, count=32, num_classes=2):
        generator = torch.Generator().manual_seed(0)
        self.tokens = torch.randint(3, (count, 6), generator=generator)
        self.labels = torch.randint(num_classes, (count,), generator=generator)

    def __len__(self):
        return len(self.tokens)

    def __getitem__(self, index):
        return {"input_ids": self.tokens[index], "label": self.labels[index]}


class DiscriminatorOnlyGAN(GAN):
    def phases(self, step):
        return ["discriminator"]


def snapshot(parameters):
    return [p.detach().clone() for p in parameters]


def changed(before, parameters):
    return any(not torch.equal(a, p.detach()) for a, p in zip(before, parameters))


def test_gan_groups_and_each_phase_only_reaches_its_own_group():
    model = small_gan(num_classes=2).train()
    groups = model.param_groups()
    assert list(groups) == ["discriminator", "generator"] and model.phases(0) == ["discriminator", "generator"]
    assert {id(p) for p in groups["discriminator"]}.isdisjoint(id(p) for p in groups["generator"])
    assert len(groups["discriminator"]) + len(groups["generator"]) == len(list(model.parameters()))
    batch = {"input_ids": torch.randint(3, (8, 6)), "label": torch.randint(2, (8,))}
    for phase, other in (("discriminator", "generator"), ("generator", "discriminator")):
        model.zero_grad(set_to_none=True)
        loss, metrics = model.loss(batch, phase, step=0)
        loss.backward()
        assert torch.isfinite(loss) and "d_fake" in metrics
        assert all(p.grad is None for p in groups[other])
        assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in groups[phase])
    with pytest.raises(ValueError, match="phases"):
        model.loss(batch, "main", step=0)


@pytest.mark.parametrize("relaxation", ["gumbel", "softmax"])
def test_gan_trains_both_groups_with_the_loop(tmp_path, relaxation):
    model = small_gan(num_classes=2, relaxation=relaxation)
    groups = model.param_groups()
    before = {name: snapshot(params) for name, params in groups.items()}
    config = TrainConfig(max_steps=4, batch_size=8, warmup_steps=0, learning_rate=1e-2, checkpoint_every=0,
                         log_every=1)
    result = train(model, TokenDataset(), config, tmp_path)
    assert all(changed(before[name], groups[name]) for name in groups)
    assert {"discriminator/loss", "generator/loss", "discriminator/d_real"} <= set(result.final_metrics)


def test_gan_discriminator_phase_leaves_the_generator_alone(tmp_path):
    model = DiscriminatorOnlyGAN(small_gan(num_classes=2).config)
    groups = model.param_groups()
    before = {name: snapshot(params) for name, params in groups.items()}
    config = TrainConfig(max_steps=3, batch_size=8, warmup_steps=0, learning_rate=1e-2, checkpoint_every=0)
    train(model, TokenDataset(), config, tmp_path)
    assert changed(before["discriminator"], groups["discriminator"])
    assert not changed(before["generator"], groups["generator"])


def test_gan_has_no_likelihood_and_samples(tmp_path):
    model = small_gan(num_classes=2)
    assert model.has_density is False
    with pytest.raises(NotImplementedError, match="no likelihood"):
        model.log_prob(torch.zeros(2, 6, dtype=torch.long))
    tokens = model.sample(5, label=torch.tensor([0, 1, 0, 1, 1]), generator=torch.Generator().manual_seed(0))
    assert tokens.shape == (5, 6) and tokens.dtype == torch.long and tokens.max() < 3
    unconditional = model.sample(4, generator=torch.Generator().manual_seed(0))
    assert unconditional.shape == (4, 6)
    with pytest.raises(NotImplementedError, match="prefix"):
        model.sample(2, prefix=torch.zeros(2, 1, dtype=torch.long))
    with pytest.raises(ValueError, match="unconditional"):
        small_gan().sample(2, label=0)
    # save / load: the same weights give the same samples from the same generator
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "tokgen.json").read_text())["kind"] == "gan"
    loaded = GAN.from_pretrained(tmp_path)
    options = SamplingOptions(temperature=0.7, top_k=2)
    first = model.sample(6, label=1, options=options, generator=torch.Generator().manual_seed(4))
    second = loaded.sample(6, label=1, options=options, generator=torch.Generator().manual_seed(4))
    assert torch.equal(first, second)
    with pytest.raises(ValueError, match="unknown"):
        GANConfig.from_dict({"vocab_size": 3, "seq_len": 6, "gradient_penalty": 1.0})
