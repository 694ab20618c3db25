"""MADE's connectivity-agnostic training (Germain et al. 2015, section 4.2): K masks, one set of weights.

The density is the uniform mixture of the K masks' autoregressive models; these tests check it is
normalised, that each mask is autoregressive in its own ordering, that training cycles the masks by
step, and that sampling draws from the mixture (also after a prefix).
"""

import itertools

import pytest
import torch

from priors.baselines import MADE, MADEConfig
from priors.sampling import SamplingOptions
from helpers.optimize import adam_steps


def ensemble(vocab_size=2, seq_len=3, num_classes=0, num_masks=3, order_agnostic=True, seed=0, **extra) -> MADE:
    """A K-mask MADE with random weights (fresh ones leave the direct term and class biases at zero)."""
    config = MADEConfig(vocab_size=vocab_size, seq_len=seq_len, num_classes=num_classes, hidden_sizes=(16,),
                        num_masks=num_masks, order_agnostic=order_agnostic, direct_connections=True, **extra)
    model = MADE(config)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    return model.eval()


def all_sequences(vocab_size, seq_len):
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=seq_len)))


@pytest.mark.parametrize("order_agnostic", [False, True])
@pytest.mark.parametrize("vocab_size,seq_len", [(2, 4), (3, 3)])
def test_the_mixture_and_every_component_are_normalised(order_agnostic, vocab_size, seq_len):
    model = ensemble(vocab_size, seq_len, num_classes=2, num_masks=4, order_agnostic=order_agnostic)
    sequences = all_sequences(vocab_size, seq_len)
    for label in (None, torch.full((len(sequences),), 1)):
        components = model.component_log_probs(sequences, label).double().exp()
        torch.testing.assert_close(components.sum(dim=0), torch.ones(4, dtype=torch.float64), atol=1e-5, rtol=0)
        assert model.log_prob(sequences, label).double().exp().sum().item() == pytest.approx(1.0, abs=1e-5)
    # the components differ, or the mixture would be one model
    assert not torch.allclose(components[:, 0], components[:, 1])


def test_each_mask_is_autoregressive_in_its_own_ordering():
    model = ensemble(vocab_size=3, seq_len=5, num_masks=4, order_agnostic=True)
    orderings = [model.ordering(index) for index in range(4)]
    assert torch.equal(orderings[0], torch.arange(5))
    assert any(not torch.equal(ordering, torch.arange(5)) for ordering in orderings[1:])
    tokens = torch.randint(3, (6, 5), generator=torch.Generator().manual_seed(1))
    classes = torch.zeros(6, dtype=torch.long)
    for index, ordering in enumerate(orderings):
        model.use_mask(index)
        reference = model.token_logits(tokens, classes)
        for rank in range(5):
            later = ordering[rank:]  # the positions generated at this rank or after
            changed = tokens.clone()
            changed[:, later] = (changed[:, later] + 1) % 3
            logits = model.token_logits(changed, classes)
            earlier_or_now = ordering[: rank + 1]
            torch.testing.assert_close(logits[:, earlier_or_now], reference[:, earlier_or_now])
            if rank == 0:
                assert not torch.allclose(logits[:, ordering[1:]], reference[:, ordering[1:]])


def test_training_cycles_the_masks_by_step_and_lowers_the_mixture_nll():
    torch.manual_seed(0)
    model = MADE(MADEConfig(vocab_size=2, seq_len=6, hidden_sizes=(32,), num_masks=3, order_agnostic=True))
    data = (torch.rand(64, 6) < torch.linspace(0.1, 0.9, 6)).long()
    data[:, 3] = data[:, 0]  # a dependency for the hidden layer to find
    for step in range(5):
        model.loss({"input_ids": data}, "main", step)
        assert model.mask_index == step % 3
    # in training, the loss of step s is the mean NLL per token under mask s mod 3 alone
    loss, _ = model.loss({"input_ids": data}, "main", 4)
    component = model.component_log_probs(data)[:, 1]
    torch.testing.assert_close(loss, -component.mean() / 6)
    # in eval mode (validation), it is the mixture's, whatever the step
    model.eval()
    for step in (0, 4):
        loss, _ = model.loss({"input_ids": data}, "main", step)
        torch.testing.assert_close(loss, -model.log_prob(data).mean() / 6)
    before = -model.log_prob(data).mean()
    adam_steps(model.train(), {"input_ids": data}, steps=60, lr=1e-2)
    assert -model.eval().log_prob(data).mean() < before - 0.5


def frequencies(samples: torch.Tensor, vocab_size: int) -> torch.Tensor:
    seq_len = samples.shape[1]
    codes = (samples * vocab_size ** torch.arange(seq_len - 1, -1, -1)).sum(dim=1)
    return torch.bincount(codes, minlength=vocab_size**seq_len).double() / len(samples)


@pytest.mark.parametrize("order_agnostic", [False, True])
def test_samples_follow_the_mixture_density(order_agnostic):
    model = ensemble(vocab_size=2, seq_len=3, num_masks=3, order_agnostic=order_agnostic)
    expected = model.log_prob(all_sequences(2, 3)).double().exp()  # product order matches `frequencies`
    samples = model.sample(20000, generator=torch.Generator().manual_seed(0))
    assert (frequencies(samples, 2) - expected).abs().sum() / 2 < 0.02  # total variation
    # mask 0 alone is a different distribution, so the test can tell a wrong mixture apart
    model.use_mask(0)
    alone = model.token_log_probs(all_sequences(2, 3)).sum(dim=1).double().exp()
    assert (alone - expected).abs().sum() / 2 > 0.05


def test_samples_after_a_prefix_follow_the_mixture_conditional():
    model = ensemble(vocab_size=2, seq_len=3, num_classes=2, num_masks=3, order_agnostic=False)
    sequences = all_sequences(2, 3)
    joint = model.log_prob(sequences, torch.full((8,), 1)).double().exp()
    conditional = torch.where(sequences[:, 0] == 1, joint, torch.zeros_like(joint))
    conditional = conditional / conditional.sum()
    samples = model.sample(20000, label=1, prefix=torch.tensor([1]), generator=torch.Generator().manual_seed(0))
    assert bool((samples[:, 0] == 1).all())
    assert (frequencies(samples, 2) - conditional).abs().sum() / 2 < 0.02


def test_ensemble_sampling_takes_labels_guidance_and_options():
    model = ensemble(vocab_size=4, seq_len=5, num_classes=3, num_masks=3, order_agnostic=False)
    prefix = torch.tensor([[1, 2], [3, 0], [0, 0]])
    options = SamplingOptions(temperature=0.8, top_k=3, top_p=0.9, guidance_scale=2.0)
    samples = model.sample(3, label=torch.tensor([0, 2, 1]), prefix=prefix, options=options,
                           generator=torch.Generator().manual_seed(0))
    again = model.sample(3, label=torch.tensor([0, 2, 1]), prefix=prefix, options=options,
                         generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 5) and torch.equal(samples[:, :2], prefix) and torch.equal(samples, again)
    assert model.mask_index == 0  # sampling leaves the mask in use as it found it


@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_one_pass_with_per_row_components_draws_what_each_mask_alone_draws(guidance_scale):
    """A natural-order ensemble with one hidden layer samples all rows in one pass over the positions, each
    row with its component's hidden degrees; rows all given component k draw what mask k's sampler draws."""
    model = ensemble(vocab_size=3, seq_len=5, num_classes=2, num_masks=4, order_agnostic=False)
    options = SamplingOptions(temperature=1.2, guidance_scale=guidance_scale)
    label, prefix = torch.tensor([0, 1, 1]), torch.tensor([[1], [2], [0]])
    for k in range(4):
        tokens, classes, prefix_len, guided = model.prepare_sampling(3, label, prefix, options)
        alone = tokens.clone()
        with torch.no_grad():
            components = torch.full((len(tokens),), k)
            model.decode_in_ordering(tokens, classes, prefix_len, guided, options, torch.Generator().manual_seed(7),
                                     components)
            model.use_mask(k)
            model.decode_in_ordering(alone, classes, prefix_len, guided, options, torch.Generator().manual_seed(7))
            model.use_mask(0)
        assert torch.equal(tokens, alone)
        assert torch.equal(tokens[:3, :1], prefix)


def test_an_order_agnostic_ensemble_refuses_a_prefix_and_bad_configs_are_refused():
    model = ensemble(vocab_size=2, seq_len=4, num_masks=2, order_agnostic=True)
    with pytest.raises(ValueError, match="prefix"):
        model.sample(2, prefix=torch.tensor([1]))
    with pytest.raises(ValueError, match="num_masks"):
        MADEConfig(vocab_size=2, seq_len=4, num_masks=0)
    with pytest.raises(ValueError, match="order_agnostic"):
        MADEConfig(vocab_size=2, seq_len=4, order_agnostic=True)


def test_save_and_load_rebuild_the_same_masks(tmp_path):
    model = ensemble(vocab_size=3, seq_len=4, num_masks=3, order_agnostic=True, mask_seed=7)
    model.use_mask(2)
    model.save_pretrained(tmp_path)
    loaded = MADE.from_pretrained(tmp_path)
    sequences = all_sequences(3, 4)
    torch.testing.assert_close(loaded.log_prob(sequences), model.log_prob(sequences))
    other_seed = ensemble(vocab_size=3, seq_len=4, num_masks=3, order_agnostic=True, mask_seed=8)
    assert not torch.allclose(other_seed.log_prob(sequences), model.log_prob(sequences))
