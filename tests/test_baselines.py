"""Contract tests of the comparison priors in priors/baselines: histogram (independent, joint), FVSBN, NADE, MADE.

Exact normalisation over every sequence of a tiny space, autoregressive masks, hand-counted
histograms, save/load, sampling shapes and prefixes, and a few optimizer steps lowering the NLL.
"""

import dataclasses
import itertools
import json

import pytest
import torch
from einops import rearrange

from priors.baselines import (
    FVSBN,
    MADE,
    NADE,
    AutoregressiveDensityModel,
    FVSBNConfig,
    HistogramConfig,
    HistogramPrior,
    MADEConfig,
    NADEConfig,
)
from priors.baselines import nade_fused
from priors.sampling import SamplingOptions
from helpers.optimize import adam_steps

def banked_fvsbn(vocab_size: int, seq_len: int, num_classes: int) -> FVSBN:
    """An FVSBN with three L1 banks whose positions use different banks."""
    model = FVSBN(FVSBNConfig(vocab_size=vocab_size, seq_len=seq_len, num_classes=num_classes,
                              l1_penalty=[0.0, 0.01, 0.1]))
    model.position_bank.copy_(torch.arange(seq_len) % 3)
    return model


NEURAL = {
    "fvsbn": lambda v, l, c: FVSBN(FVSBNConfig(vocab_size=v, seq_len=l, num_classes=c)),
    "fvsbn_banks": banked_fvsbn,
    "nade": lambda v, l, c: NADE(NADEConfig(vocab_size=v, seq_len=l, num_classes=c, hidden_size=8)),
    "made": lambda v, l, c: MADE(MADEConfig(vocab_size=v, seq_len=l, num_classes=c, hidden_sizes=(12,))),
    "made2": lambda v, l, c: MADE(MADEConfig(vocab_size=v, seq_len=l, num_classes=c, hidden_sizes=(12, 10))),
    "made_direct": lambda v, l, c: MADE(
        MADEConfig(vocab_size=v, seq_len=l, num_classes=c, hidden_sizes=(12,), direct_connections=True)
    ),
}
HISTOGRAMS = {
    "independent": lambda v, l, c: HistogramPrior(HistogramConfig(vocab_size=v, seq_len=l, num_classes=c)),
    "joint": lambda v, l, c: HistogramPrior(HistogramConfig(vocab_size=v, seq_len=l, num_classes=c, mode="joint")),
}
ALL = {**NEURAL, **HISTOGRAMS}


def all_sequences(vocab_size: int, seq_len: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=seq_len)))


def build(name: str, vocab_size: int, seq_len: int, num_classes: int, seed: int = 0) -> AutoregressiveDensityModel:
    """A model with random (not freshly initialised, often zero) weights, or random counts."""
    torch.manual_seed(seed)
    model = ALL[name](vocab_size, seq_len, num_classes)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    if model.fit_by_counting:
        data = torch.randint(vocab_size, (30, seq_len), generator=generator)
        labels = torch.randint(num_classes, (30,), generator=generator) if num_classes else None
        model.fit(data, labels)
    return model.eval()


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("vocab_size,seq_len", [(3, 3), (2, 4)])
@pytest.mark.parametrize("num_classes", [0, 3])
def test_probabilities_of_all_sequences_sum_to_one(name, vocab_size, seq_len, num_classes):
    model = build(name, vocab_size, seq_len, num_classes)
    sequences = all_sequences(vocab_size, seq_len)
    labels = [None] + [torch.full((len(sequences),), c) for c in range(num_classes)]
    for label in labels:
        total = model.log_prob(sequences, label).double().exp().sum().item()
        assert total == pytest.approx(1.0, abs=1e-5)
    assert model.log_prob_is_bound is False


@pytest.mark.parametrize("name", sorted(ALL))
def test_output_t_never_depends_on_inputs_from_t_on(name):
    vocab_size, seq_len = 4, 5
    model = build(name, vocab_size, seq_len, num_classes=2)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(vocab_size, (6, seq_len), generator=generator)
    classes = torch.tensor([0, 1, 2, 0, 1, 2])
    reference = model.token_logits(tokens, classes)
    for position in range(seq_len):
        changed = tokens.clone()
        changed[:, position:] = (changed[:, position:] + 1 + torch.arange(seq_len - position)) % vocab_size
        logits = model.token_logits(changed, classes)
        torch.testing.assert_close(logits[:, : position + 1], reference[:, : position + 1])
        # the change must be visible later on, or the test would pass for a model that ignores its inputs
        if position == 0 and name in NEURAL:
            assert not torch.allclose(logits[:, position + 1 :], reference[:, position + 1 :])


@pytest.mark.parametrize("name", sorted(ALL))
@pytest.mark.parametrize("vocab_size", [2, 4])
def test_next_token_logits_equal_the_full_pass(name, vocab_size):
    model = build(name, vocab_size, 4, num_classes=2)
    tokens = torch.randint(vocab_size, (5, 4), generator=torch.Generator().manual_seed(2))
    classes = torch.tensor([0, 1, 2, 2, 0])
    full = torch.log_softmax(model.token_logits(tokens, classes).double(), dim=-1)
    for position in range(4):
        step = torch.log_softmax(model.next_token_logits(tokens, position, classes).double(), dim=-1)
        torch.testing.assert_close(step, full[:, position])


def test_independent_histogram_matches_hand_counts():
    model = HistogramPrior(HistogramConfig(vocab_size=3, seq_len=2, num_classes=2, smoothing=1.0))
    data = torch.tensor([[0, 1], [0, 2], [1, 1], [2, 2]])
    model.fit(data, torch.tensor([0, 0, 0, 1]))
    # class 0: position 0 counts (2, 1, 0), position 1 counts (0, 2, 1), three sequences, +1 smoothing
    expected = torch.log(torch.tensor((2 + 1) / (3 + 3) * (2 + 1) / (3 + 3)))
    torch.testing.assert_close(model.log_prob(torch.tensor([[0, 1]]), torch.tensor([0])), expected.reshape(1))
    # no label: the pooled counts of all four sequences, position 0 (2, 1, 1), position 1 (0, 2, 2)
    pooled = torch.log(torch.tensor((1 + 1) / (4 + 3) * (2 + 1) / (4 + 3)))
    torch.testing.assert_close(model.log_prob(torch.tensor([[2, 1]])), pooled.reshape(1))


def test_joint_histogram_matches_hand_counts_and_smooths_unseen_sequences():
    model = HistogramPrior(HistogramConfig(vocab_size=3, seq_len=2, smoothing=0.5, mode="joint"))
    model.fit(torch.tensor([[0, 1], [0, 1], [2, 0]]))
    log_probs = model.log_prob(torch.tensor([[0, 1], [2, 0], [1, 1]]))
    # (n(x) + s) / (N + s V^L) with N = 3, V^L = 9
    expected = torch.log(torch.tensor([2.5, 1.5, 0.5]) / (3 + 0.5 * 9))
    torch.testing.assert_close(log_probs, expected)
    tokens = torch.tensor([[0, 1]])
    token_log_probs = model.token_log_probs(tokens)[0]
    # p(x_0 = 0) = (2 + s V) / (N + s V^2), p(x_1 = 1 | x_0 = 0) = (2 + s) / (2 + s V)
    torch.testing.assert_close(token_log_probs, torch.log(torch.tensor([3.5 / 7.5, 2.5 / 3.5])))


def test_joint_histogram_refuses_a_space_larger_than_2_to_the_20():
    HistogramConfig(vocab_size=2, seq_len=20, mode="joint")
    with pytest.raises(ValueError, match="too large"):
        HistogramConfig(vocab_size=2, seq_len=21, mode="joint")
    with pytest.raises(ValueError, match="too large"):
        HistogramConfig(vocab_size=256, seq_len=49, mode="joint")


def test_histogram_is_fitted_by_counting_not_by_gradients():
    model = HistogramPrior(HistogramConfig(vocab_size=3, seq_len=2, num_classes=2))
    assert model.fit_by_counting and model.param_groups() == {} and model.phases(0) == []
    with pytest.raises(RuntimeError, match="fit"):
        model.loss({"input_ids": torch.zeros(1, 2, dtype=torch.long)}, "main", 0)
    with pytest.raises(ValueError, match="labels"):
        model.fit(torch.zeros(1, 2, dtype=torch.long))


@pytest.mark.parametrize("name", sorted(ALL))
def test_save_load_round_trip_is_exact_and_strict(name, tmp_path):
    model = build(name, 3, 4, num_classes=2)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "tokgen.json").read_text())
    assert record["kind"] == model.kind and record["config"]["vocab_size"] == 3
    loaded = type(model).from_pretrained(tmp_path)
    tokens = all_sequences(3, 4)[::7]
    torch.testing.assert_close(loaded.log_prob(tokens), model.log_prob(tokens))
    assert loaded.config == model.config
    # a folder whose weights do not fit the config is refused, naming the mismatch
    record["config"]["seq_len"] = 5
    (tmp_path / "tokgen.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="wrong shapes|missing|unexpected"):
        type(model).from_pretrained(tmp_path)


@pytest.mark.parametrize("config_cls", [FVSBNConfig, NADEConfig, MADEConfig, HistogramConfig])
def test_configs_reject_unknown_keys_listing_the_valid_ones(config_cls):
    with pytest.raises(ValueError, match="valid keys.*vocab_size"):
        config_cls.from_dict({"vocab_size": 3, "seq_len": 2, "hiden_size": 4})
    assert config_cls.from_dict({"vocab_size": 3, "seq_len": 2}).vocab_size == 3


@pytest.mark.parametrize("name", sorted(ALL))
def test_sampling_respects_prefix_label_and_options(name):
    model = build(name, 4, 5, num_classes=3)
    prefix = torch.tensor([[1, 2], [3, 0], [0, 0]])
    label = torch.tensor([0, 2, 1])
    options = SamplingOptions(temperature=0.8, top_k=3, top_p=0.9, guidance_scale=2.0)
    samples = model.sample(3, label=label, prefix=prefix, options=options, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (3, 5) and samples.dtype == torch.int64
    assert torch.equal(samples[:, :2], prefix) and samples.min() >= 0 and samples.max() < 4
    again = model.sample(3, label=label, prefix=prefix, options=options, generator=torch.Generator().manual_seed(0))
    assert torch.equal(samples, again)
    assert model.sample(4).shape == (4, 5)
    # an int label and a (P,) prefix apply to every row; sampling leaves the training mode as it was
    model.train()
    shared = model.sample(2, label=1, prefix=torch.tensor([3, 1]))
    assert model.training and torch.equal(shared[:, :2], torch.tensor([[3, 1], [3, 1]]))
    model.eval()
    # top_k = 1 is greedy: every token has the largest logit of its conditional (ties may go either way)
    greedy = model.sample(3, label=label, options=SamplingOptions(top_k=1))
    logits = model.token_logits(greedy, label)
    torch.testing.assert_close(logits.gather(-1, greedy.unsqueeze(-1)).squeeze(-1), logits.max(dim=-1).values)
    with pytest.raises(ValueError, match="label"):
        model.sample(3, label=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="prefix"):
        model.sample(3, prefix=torch.zeros(3, 6, dtype=torch.long))


@pytest.mark.parametrize("name", ["fvsbn", "nade", "made"])
@pytest.mark.parametrize("vocab_size", [2, 3])
def test_a_few_optimizer_steps_reduce_the_nll(name, vocab_size):
    torch.manual_seed(0)
    model = ALL[name](vocab_size, 6, 2).train()
    generator = torch.Generator().manual_seed(0)
    # a learnable pattern: each token repeats the previous one with probability 0.9, first token set by the class
    label = torch.randint(2, (64,), generator=generator)
    tokens = [label % vocab_size]
    for _ in range(5):
        keep = torch.rand(64, generator=generator) < 0.9
        tokens.append(torch.where(keep, tokens[-1], torch.randint(vocab_size, (64,), generator=generator)))
    batch = {"input_ids": torch.stack(tokens, dim=1), "label": label}
    assert model.phases(0) == ["main"]
    first, metrics = model.loss(batch, "main", 0)
    assert set(metrics) == {"nll_per_token", "bits_per_token"}
    adam_steps(model, batch, steps=20, lr=0.05)
    model.eval()
    final = -model.log_prob(batch["input_ids"], batch["label"]).mean() / 6
    assert final < 0.8 * first.detach()


@pytest.mark.parametrize("hidden_sizes", [(500,), (500, 300)])
def test_made_output_of_the_last_pixel_reads_every_earlier_pixel(hidden_sizes):
    """With fewer hidden units than pixels, the degrees must still span [1, L-1]: every input but
    the last reaches the last output through the masks (the paths are products of the masks)."""
    from priors.baselines.made_masks import connectivity_masks, mask_degrees

    masks, _ = connectivity_masks(mask_degrees(784, hidden_sizes, 1, False, 0)[0], block=1)
    paths = masks[0].float()
    for mask in masks[1:]:
        paths = mask.float() @ paths  # (out, in): number of masked paths from input to output
    assert bool((paths[-1, :-1] > 0).all()) and paths[-1, -1] == 0
    assert bool((paths.triu() == 0).all())  # and still autoregressive: output t never reads inputs >= t


@pytest.mark.parametrize("vocab_size", [2, 3])
def test_made_direct_connections_are_an_fvsbn_inside_the_made(vocab_size):
    """With the hidden path silenced, a MADE with direct connections computes exactly the FVSBN
    that has the same regression weights and biases."""
    made = build("made_direct", vocab_size, 5, num_classes=0)
    fvsbn = build("fvsbn", vocab_size, 5, num_classes=0)
    with torch.no_grad():
        made.output_layer.weight.zero_()
        fvsbn.regression.weight.copy_(made.direct.weight)
        fvsbn.regression.bias.copy_(made.output_layer.bias)
        fvsbn.class_bias.weight.zero_()
    tokens = torch.randint(vocab_size, (7, 5), generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(made.log_prob(tokens), fvsbn.log_prob(tokens))
    # and the term is real: its weights change the likelihood
    with torch.no_grad():
        made.direct.weight.mul_(2.0)
    assert not torch.allclose(made.log_prob(tokens), fvsbn.log_prob(tokens))


@pytest.mark.parametrize("vocab_size", [2, 4])
@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
def test_nade_running_sum_sampler_draws_what_the_full_recomputation_draws(vocab_size, guidance_scale):
    """NADE's O(L H) sampler carries a_t forward; the generic sampler recomputes each conditional
    from the tokens. Same generator, same draws."""
    model = build("nade", vocab_size, 6, num_classes=2)
    options = SamplingOptions(temperature=1.3, guidance_scale=guidance_scale)
    label, prefix = torch.tensor([0, 1, 1, 0]), torch.randint(vocab_size, (4, 2), generator=torch.Generator().manual_seed(4))
    fast = model.sample(4, label=label, prefix=prefix, options=options, generator=torch.Generator().manual_seed(5))
    tokens, classes, prefix_len, guided = model.prepare_sampling(4, label, prefix, options)
    with torch.no_grad():
        AutoregressiveDensityModel.decode(model, tokens, classes, prefix_len, guided, options, torch.Generator().manual_seed(5))
    torch.testing.assert_close(fast, tokens[:4])
    assert bool((fast[:, :2] == prefix).all())


@pytest.mark.parametrize("seq_len", [1, 2, 7, 9, 10, 17])
def test_nade_blocked_pre_activations_are_the_running_sums_with_their_gradients(seq_len):
    """Binary NADE computes a_t = c + sum_{s<t} W[:, s] x_s by blocked matmuls (blocks of ceil(sqrt(L)),
    the last one padded when L is not a multiple): values and weight gradients equal a plain loop."""
    model = build("nade", 2, seq_len, num_classes=0)
    with torch.no_grad():
        model.input_weight.copy_(torch.randn(model.input_weight.shape, generator=torch.Generator().manual_seed(0)))
    tokens = torch.randint(2, (5, seq_len), generator=torch.Generator().manual_seed(1))
    bias = torch.randn(5, model.config.hidden_size, generator=torch.Generator().manual_seed(3))
    blocked = rearrange(model.binary_pre_activations(tokens, bias), "l b h -> b l h")
    weight = model.input_weight[:, 0]
    looped = torch.stack([bias + (tokens[:, :t, None] * weight[:t]).sum(dim=1) for t in range(seq_len)], dim=1)
    torch.testing.assert_close(blocked, looped)
    cotangent = torch.randn(blocked.shape, generator=torch.Generator().manual_seed(2))
    (blocked_grad,) = torch.autograd.grad((blocked * cotangent).sum(), model.input_weight)
    (looped_grad,) = torch.autograd.grad((looped * cotangent).sum(), model.input_weight)
    torch.testing.assert_close(blocked_grad, looped_grad)
    cumsum = model.running_pre_activations(tokens) + rearrange(bias, "b h -> b 1 h")  # the categorical path
    torch.testing.assert_close(blocked, cumsum)


@pytest.mark.parametrize("seq_len", [1, 7, 8, 9, 17])
@pytest.mark.parametrize("num_classes,masked", [(0, False), (3, True)])
def test_nade_fused_cpu_loss_has_the_autograd_loss_and_gradients(seq_len, num_classes, masked, monkeypatch):
    """Binary NADE's CPU loss computes its gradients inside one blocked pass (`BinaryNADENLL`, blocks
    of 8 positions): loss and every parameter gradient equal autograd through the base class's loss,
    with and without class labels and a padding mask, for lengths inside one block and across blocks."""
    monkeypatch.setattr(nade_fused, "MIN_ELEMENTS", 0)  # the fused pass even at this tiny size
    original_apply, calls = nade_fused.BinaryNADENLL.apply, []

    def counting_apply(*args):
        calls.append(args)
        return original_apply(*args)

    monkeypatch.setattr(nade_fused.BinaryNADENLL, "apply", counting_apply)
    model = NADE(NADEConfig(vocab_size=2, seq_len=seq_len, num_classes=num_classes, hidden_size=6, label_dropout=0.0))
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    batch = {"input_ids": torch.randint(2, (5, seq_len), generator=generator)}
    if num_classes:
        batch["label"] = torch.randint(num_classes, (5,), generator=generator)
    if masked:
        batch["loss_mask"] = torch.rand(5, seq_len, generator=generator) < 0.7
    fused, _ = model.loss(batch, "main", 0)
    fused_grads = torch.autograd.grad(fused, list(model.parameters()))
    reference, _ = AutoregressiveDensityModel.loss(model, batch, "main", 0)
    reference_grads = torch.autograd.grad(reference, list(model.parameters()))
    torch.testing.assert_close(fused, reference)
    for name, got, expected in zip(dict(model.named_parameters()), fused_grads, reference_grads):
        torch.testing.assert_close(got, expected, msg=lambda m, name=name: f"{name}: {m}")
    with torch.no_grad():  # no gradient wanted: the same loss, none computed
        torch.testing.assert_close(model.loss(batch, "main", 0)[0], reference.detach())
    assert len(calls) == 2  # the loss above did take the fused pass


@pytest.mark.parametrize("vocab_size", [2, 4])
@pytest.mark.parametrize("guidance_scale", [1.0, 2.0])
@pytest.mark.parametrize("hidden_sizes", [(16,), (16, 12)])
def test_made_incremental_sampler_draws_what_the_full_recomputation_draws(vocab_size, guidance_scale, hidden_sizes):
    """MADE's sampler carries the first layer's pre-activation forward and reads one position's output
    rows; the generic sampler recomputes the whole network from the tokens. Same generator, same draws."""
    config = MADEConfig(vocab_size=vocab_size, seq_len=6, num_classes=2, hidden_sizes=hidden_sizes,
                        direct_connections=True)
    model = MADE(config)
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # random weights everywhere, including the direct term and class biases (zero at init)
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=generator))
    options = SamplingOptions(temperature=1.3, guidance_scale=guidance_scale)
    label, prefix = torch.tensor([0, 1, 1, 0]), torch.randint(vocab_size, (4, 2), generator=torch.Generator().manual_seed(4))
    for prefix_or_none in (prefix, None):
        fast = model.sample(4, label=label, prefix=prefix_or_none, options=options, generator=torch.Generator().manual_seed(5))
        tokens, classes, prefix_len, guided = model.prepare_sampling(4, label, prefix_or_none, options)
        with torch.no_grad():
            AutoregressiveDensityModel.decode(model.eval(), tokens, classes, prefix_len, guided, options,
                                              torch.Generator().manual_seed(5))
        torch.testing.assert_close(fast, tokens[:4])
        if prefix_or_none is not None:
            assert bool((fast[:, :2] == prefix).all())


def test_fvsbn_l1_penalty_counts_in_training_only_and_sparsifies_the_weights():
    tokens = torch.randint(2, (32, 6), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": tokens}
    model = FVSBN(FVSBNConfig(vocab_size=2, seq_len=6, l1_penalty=0.01))
    with torch.no_grad():
        model.regression.weight.copy_(torch.randn(model.regression.weight.shape, generator=torch.Generator().manual_seed(1)))
    nll = -model.log_prob(tokens).mean() / 6
    masked_abs_sum = (model.regression.weight * model.regression.mask).abs().sum()
    model.train()
    loss, metrics = model.loss(batch, "prior", 0)
    # label dropout is the only randomness and this model has no classes, so the NLL is deterministic
    torch.testing.assert_close(loss, nll + 0.01 * masked_abs_sum)
    torch.testing.assert_close(metrics["l1_penalty"], 0.01 * masked_abs_sum)
    model.eval()
    torch.testing.assert_close(model.loss(batch, "prior", 0)[0], nll)  # validation scores the likelihood alone

    def trained_weights(l1_penalty):
        model = FVSBN(FVSBNConfig(vocab_size=2, seq_len=6, l1_penalty=l1_penalty))
        adam_steps(model, batch, steps=300, lr=0.05)
        return (model.regression.weight * model.regression.mask)[model.regression.mask.bool()]

    free, penalised = trained_weights(0.0), trained_weights(0.02)
    assert penalised.abs().sum() < 0.5 * free.abs().sum()
    assert (penalised.abs() < 0.01).sum() > (free.abs() < 0.01).sum()


def single_bank(banked: FVSBN, bank: int) -> FVSBN:
    """The one-bank FVSBN with bank `bank`'s weights and penalty."""
    config = banked.config
    single = FVSBN(FVSBNConfig(vocab_size=config.vocab_size, seq_len=config.seq_len, num_classes=config.num_classes,
                               l1_penalty=config.penalties[bank]))
    rows = slice(bank * single.regression.weight.shape[0], (bank + 1) * single.regression.weight.shape[0])
    with torch.no_grad():
        single.regression.weight.copy_(banked.regression.weight[rows])
        single.regression.bias.copy_(banked.regression.bias[rows])
        single.class_bias.weight.copy_(banked.class_bias.weight[:, rows])
    return single


@pytest.mark.parametrize("vocab_size", [2, 3])
def test_fvsbn_banks_train_as_separate_models(vocab_size):
    """Each bank's gradient is the gradient its own one-value FVSBN would get (penalty included)."""
    banked = build("fvsbn_banks", vocab_size, 5, num_classes=0).train()
    singles = [single_bank(banked, bank).train() for bank in range(3)]
    batch = {"input_ids": torch.randint(vocab_size, (16, 5), generator=torch.Generator().manual_seed(4))}
    banked.loss(batch, "prior", 0)[0].backward()
    rows = singles[0].regression.weight.shape[0]
    for bank, single in enumerate(singles):
        single.loss(batch, "prior", 0)[0].backward()
        part = slice(bank * rows, (bank + 1) * rows)
        torch.testing.assert_close(banked.regression.weight.grad[part], single.regression.weight.grad)
        torch.testing.assert_close(banked.regression.bias.grad[part], single.regression.bias.grad)
    # the table counts the chosen model's numbers, one bank's worth
    from pipelines.compare import count_parameters
    assert count_parameters(banked) == count_parameters(singles[0]) == sum(p.numel() for p in singles[0].parameters())
    # evaluation scores the banks' mean likelihood, without penalties
    banked.eval()
    expected = torch.stack([single.eval().loss(batch, "prior", 0)[0] for single in singles]).mean()
    torch.testing.assert_close(banked.loss(batch, "prior", 0)[0], expected)


@pytest.mark.parametrize("vocab_size,num_classes", [(2, 0), (3, 2)])
def test_fvsbn_chooses_per_position_the_bank_best_on_validation(vocab_size, num_classes):
    banked = build("fvsbn_banks", vocab_size, 6, num_classes=num_classes)
    singles = [single_bank(banked, bank).eval() for bank in range(3)]
    generator = torch.Generator().manual_seed(5)
    tokens = torch.randint(vocab_size, (40, 6), generator=generator)
    labels = torch.randint(max(num_classes, 1), (40,), generator=generator)
    items = [{"input_ids": t, **({"label": y} if num_classes else {})} for t, y in zip(tokens, labels)]
    chosen = banked.choose_on_validation(items, batch_size=16)
    label = labels if num_classes else None
    per_bank = torch.stack([-s.token_log_probs(tokens, label).sum(dim=0) for s in singles])  # (K L)
    assert banked.position_bank.tolist() == per_bank.argmin(dim=0).tolist()
    assert chosen["positions_per_l1_penalty"] == dict(zip(["0.0", "0.01", "0.1"],
                                                        torch.bincount(per_bank.argmin(dim=0), minlength=3).tolist()))
    # the chosen model is the per-position pick of the single models, and scores no worse than any bank
    expected = torch.stack([s.token_log_probs(tokens, label) for s in singles])  # (K b L)
    picked = expected.gather(0, banked.position_bank.expand(1, 40, 6))[0]
    torch.testing.assert_close(banked.token_log_probs(tokens, label), picked)
    assert chosen["chosen_val_nll_per_item"] <= min(chosen["bank_val_nll_per_item"]) + 1e-9


def test_fvsbn_bank_choice_needs_a_validation_split():
    from types import SimpleNamespace

    from pipelines.stages import check_can_choose_per_position
    banked = build("fvsbn_banks", 2, 4, num_classes=0)
    with pytest.raises(ValueError, match="validation split"):
        check_can_choose_per_position(banked, SimpleNamespace(splits={"train": [1]}))
    check_can_choose_per_position(banked, SimpleNamespace(splits={"train": [1], "val": [1]}))
    check_can_choose_per_position(build("fvsbn", 2, 4, num_classes=0), SimpleNamespace(splits={"train": [1]}))
    with pytest.raises(ValueError, match="distinct"):
        FVSBNConfig(vocab_size=2, seq_len=4, l1_penalty=[0.1, 0.1])
    with pytest.raises(ValueError, match=">= 0"):
        FVSBNConfig(vocab_size=2, seq_len=4, l1_penalty=[0.1, -0.1])


def test_made_direct_l1_penalty_counts_in_training_only():
    model = build("made_direct", 2, 6, num_classes=0)
    model = MADE(dataclasses.replace(model.config, direct_l1_penalty=0.01))
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.copy_(torch.randn(parameter.shape, generator=torch.Generator().manual_seed(2)))
    batch = {"input_ids": torch.randint(2, (16, 6), generator=torch.Generator().manual_seed(0))}
    nll = -model.log_prob(batch["input_ids"]).mean() / 6
    model.train()
    loss, metrics = model.loss(batch, "prior", 0)
    penalty = 0.01 * model.direct.masked_weight().abs().sum()
    torch.testing.assert_close(loss, nll + penalty)
    torch.testing.assert_close(metrics["direct_l1_penalty"], penalty)
    model.eval()
    torch.testing.assert_close(model.loss(batch, "prior", 0)[0], nll)
    with pytest.raises(ValueError, match="direct_connections"):
        MADEConfig(vocab_size=2, seq_len=6, direct_l1_penalty=0.01)


def test_made_dropout_acts_in_training_only_and_keeps_the_masks():
    """Dropout makes training passes stochastic, leaves eval passes (log_prob, validation) equal to the
    same weights without dropout, and never lets output t read inputs >= t."""
    reference = build("made_direct", 2, 6, num_classes=0)
    model = MADE(dataclasses.replace(reference.config, dropout=0.5))
    model.load_state_dict(reference.state_dict())
    tokens = torch.randint(2, (16, 6), generator=torch.Generator().manual_seed(0))
    model.eval()
    torch.testing.assert_close(model.log_prob(tokens), reference.log_prob(tokens))
    model.train()
    torch.manual_seed(0)
    first, second = model.loss({"input_ids": tokens}, "prior", 0)[0], model.loss({"input_ids": tokens}, "prior", 0)[0]
    assert not torch.equal(first, second)
    classes = torch.full((16,), model.null_class)
    for position in range(6):  # flipping inputs >= t, under the same dropout draw, moves no output <= t
        flipped = tokens.clone()
        flipped[:, position:] = 1 - flipped[:, position:]
        torch.manual_seed(position)
        logits = model.token_logits(tokens, classes)
        torch.manual_seed(position)
        torch.testing.assert_close(model.token_logits(flipped, classes)[:, : position + 1], logits[:, : position + 1])
    with pytest.raises(ValueError, match="dropout"):
        MADEConfig(vocab_size=2, seq_len=6, dropout=1.0)


def test_fvsbn_bank_choice_leaves_padding_out():
    """Padding (loss_mask False) scores nothing: a padded last position keeps bank 0, the others choose
    as they would unpadded (no earlier position reads the last one)."""
    banked = build("fvsbn_banks", 2, 6, num_classes=0)
    tokens = torch.randint(2, (30, 6), generator=torch.Generator().manual_seed(7))
    banked.choose_on_validation([{"input_ids": t} for t in tokens], batch_size=8)
    unpadded = banked.position_bank.clone()
    mask = torch.ones(6, dtype=torch.bool)
    mask[-1] = False
    chosen = banked.choose_on_validation([{"input_ids": t, "loss_mask": mask} for t in tokens], batch_size=8)
    assert banked.position_bank[-1] == 0 and banked.position_bank[:-1].tolist() == unpadded[:-1].tolist()
    assert unpadded[-1] != 0  # the padding changed a choice, so the test can fail
    assert sum(chosen["positions_per_l1_penalty"].values()) == 6
