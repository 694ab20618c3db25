"""Contract tests of the transformer prior and the shared sampling helpers: exact normalisation,
causality, KV-cache decoding equal to recomputation, guidance, prefixes, greedy top-k, save/load."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import transformers

from priors import PRIORS, SamplingOptions, TransformerPrior, TransformerPriorConfig, load_prior
from priors.decode import DecodeRequest, decode_cached, decode_recompute
from priors.sampling import apply_guidance, draw, filter_logits

ARCHITECTURES = ("llama", "gpt2")


def tiny_prior(architecture="llama", vocab_size=5, seq_len=6, num_classes=3, seed=0, **fields) -> TransformerPrior:
    torch.manual_seed(seed)
    config = TransformerPriorConfig(vocab_size=vocab_size, seq_len=seq_len, num_classes=num_classes,
                                    architecture=architecture, hidden_size=16, num_layers=2, num_heads=2, **fields)
    prior = TransformerPrior(config).eval()
    # Larger weights than the default init, so next-token distributions are far from uniform and
    # a wrong position or a stale cache entry visibly changes the samples.
    with torch.no_grad():
        for parameter in prior.parameters():
            parameter.mul_(8.0 if parameter.dim() > 1 else 1.0)
    return prior


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("label", [2, None])
def test_probabilities_of_all_sequences_sum_to_one(architecture, label):
    prior = tiny_prior(architecture, vocab_size=3, seq_len=3)
    sequences = torch.tensor(list(itertools.product(range(3), repeat=3)))
    labels = None if label is None else torch.full((len(sequences),), label)
    with torch.no_grad():
        total = prior.log_prob(sequences, labels).double().exp().sum()
    assert total.item() == pytest.approx(1.0, abs=1e-5)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_changing_a_token_never_changes_earlier_log_probs(architecture):
    prior = tiny_prior(architecture)
    generator = torch.Generator().manual_seed(1)
    tokens = torch.randint(0, 5, (2, 6), generator=generator)
    with torch.no_grad():
        before = prior.token_log_probs(tokens, torch.tensor([0, 1]))
        for t in range(6):
            changed = tokens.clone()
            changed[:, t] = (changed[:, t] + 1) % 5
            after = prior.token_log_probs(changed, torch.tensor([0, 1]))
            torch.testing.assert_close(after[:, :t], before[:, :t], rtol=0, atol=1e-6)
            # Position t itself must depend on x_t, or the test could not fail.
            assert not torch.allclose(after[:, t], before[:, t])


@pytest.mark.parametrize("architecture", ARCHITECTURES)
@pytest.mark.parametrize("options", [SamplingOptions(), SamplingOptions(temperature=0.7, top_k=3, top_p=0.9),
                                     SamplingOptions(guidance_scale=3.0)])
def test_cached_sampling_equals_full_recomputation(architecture, options):
    prior = tiny_prior(architecture, seq_len=8)
    labels = torch.tensor([0, 1, 2, 1])
    prefix = torch.tensor([[4, 0], [1, 1], [2, 3], [0, 0]])
    for kwargs in ({"label": labels}, {"label": labels, "prefix": prefix}, {"label": None}):
        cached = prior.sample(4, options=options, generator=torch.Generator().manual_seed(7), **kwargs)
        reference = prior.sample(4, options=options, generator=torch.Generator().manual_seed(7), _use_cache=False,
                                 **kwargs)
        assert torch.equal(cached, reference)
    # Different seeds must give different samples, or the equality above says nothing.
    other = prior.sample(4, label=labels, options=options, generator=torch.Generator().manual_seed(8))
    assert not torch.equal(other, cached) or options.top_k == 1


def test_guidance_scale_one_is_the_conditional_model():
    prior = tiny_prior(seq_len=8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2])
    cond = prior.condition_tokens(labels, 6, "cpu")
    prefix = torch.empty((6, 0), dtype=torch.long)

    def decode(guided: bool) -> torch.Tensor:
        # The doubled (class rows + null rows) batch at scale 1 must reproduce the plain conditional draw.
        return prior._decode(cond, prefix, torch.empty((6, 8), dtype=torch.long), guided, SamplingOptions(),
                             torch.Generator().manual_seed(3), compile=False, use_cache=True)

    assert torch.equal(decode(guided=True), decode(guided=False))
    plain = prior.sample(6, label=labels, generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain, decode(guided=False))


def test_guidance_changes_samples_and_matches_the_formula():
    cond = torch.randn(4, 7).log_softmax(-1)
    uncond = torch.randn(4, 7).log_softmax(-1)
    torch.testing.assert_close(apply_guidance(cond, uncond, 1.0), cond)
    torch.testing.assert_close(apply_guidance(cond, uncond, 0.0), uncond)
    torch.testing.assert_close(apply_guidance(cond, uncond, 2.5), uncond + 2.5 * (cond - uncond))
    prior = tiny_prior(seq_len=8)
    labels = torch.tensor([0, 1, 2, 0, 1, 2, 0, 1])
    plain = prior.sample(8, label=labels, generator=torch.Generator().manual_seed(5))
    guided = prior.sample(8, label=labels, options=SamplingOptions(guidance_scale=4.0),
                          generator=torch.Generator().manual_seed(5))
    assert not torch.equal(plain, guided)


def test_prefix_is_kept_verbatim_and_sampling_shapes():
    prior = tiny_prior(seq_len=6)
    prefix = torch.tensor([3, 1, 4])
    samples = prior.sample(5, label=1, prefix=prefix, generator=torch.Generator().manual_seed(0))
    assert samples.shape == (5, 6) and samples.dtype == torch.int64
    assert torch.equal(samples[:, :3], prefix.expand(5, 3))
    assert samples.min() >= 0 and samples.max() < 5  # never a class or null token
    full = torch.randint(0, 5, (2, 6))
    assert torch.equal(prior.sample(2, prefix=full), full)


def test_top_k_one_is_greedy():
    prior = tiny_prior(seq_len=6)
    options = SamplingOptions(top_k=1)
    first = prior.sample(3, label=torch.tensor([0, 1, 2]), options=options, generator=torch.Generator().manual_seed(0))
    second = prior.sample(3, label=torch.tensor([0, 1, 2]), options=options, generator=torch.Generator().manual_seed(9))
    assert torch.equal(first, second)
    # Greedy means each token is the argmax of the model's own next-token distribution.
    with torch.no_grad():
        log_probs = prior.image_logits(first, prior.condition_tokens(torch.tensor([0, 1, 2]), 3, "cpu"))
    assert torch.equal(log_probs.argmax(-1), first)


def test_filter_logits_and_draw():
    logits = torch.tensor([[0.0, 1.0, 2.0, 3.0]]).log_softmax(-1)
    kept = filter_logits(logits, SamplingOptions(top_k=2)).isfinite()
    assert kept.tolist() == [[False, False, True, True]]
    # Probabilities ~[.03 .09 .24 .64]: top_p=0.7 keeps the two most likely tokens (mass .64 < .7 before the 2nd).
    kept = filter_logits(logits, SamplingOptions(top_p=0.7)).isfinite()
    assert kept.tolist() == [[False, False, True, True]]
    kept = filter_logits(logits, SamplingOptions(top_p=0.5)).isfinite()
    assert kept.tolist() == [[False, False, False, True]]
    generator = torch.Generator().manual_seed(0)
    counts = torch.bincount(draw(logits.expand(20000, 4), generator), minlength=4).double() / 20000
    torch.testing.assert_close(counts, logits.exp()[0].double(), atol=0.015, rtol=0)


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_save_load_round_trip(tmp_path, architecture):
    prior = tiny_prior(architecture, num_classes=2)
    prior.save_pretrained(tmp_path)
    loaded = load_prior(tmp_path)
    assert isinstance(loaded, TransformerPrior) and loaded.config == prior.config
    tokens = torch.randint(0, 5, (3, 6))
    with torch.no_grad():
        torch.testing.assert_close(loaded.log_prob(tokens, torch.tensor([0, 1, 0])),
                                   prior.log_prob(tokens, torch.tensor([0, 1, 0])), rtol=0, atol=0)
    hf_model = transformers.AutoModelForCausalLM.from_pretrained(tmp_path)
    assert hf_model.config.vocab_size == 5 + 2 + 1


@pytest.mark.parametrize("architecture", ARCHITECTURES)
def test_loss_gradients_flow_and_label_dropout(architecture):
    prior = tiny_prior(architecture, label_dropout=0.5).train()
    batch = {"input_ids": torch.randint(0, 5, (4, 6)), "label": torch.tensor([0, 1, 2, 0])}
    torch.manual_seed(0)
    loss, metrics = prior.loss(batch, "main", step=0)
    loss.backward()
    assert prior.phases(0) == ["main"] and set(prior.param_groups()) == {"main"}
    grads = [p.grad for p in prior.param_groups()["main"]]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert any(g.abs().sum() > 0 for g in grads)
    assert metrics["bits_per_token"].item() == pytest.approx(metrics["nll_per_token"].item() / math.log(2))
    # In eval mode the loss is exactly the mean per-token NLL of log_prob.
    prior.eval()
    with torch.no_grad():
        eval_loss, _ = prior.loss(batch, "main", step=0)
        expected = -prior.log_prob(batch["input_ids"], batch["label"]).mean() / 6
    assert eval_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    # With a loss mask only the kept tokens count: the masked log_prob over the number kept.
    mask = torch.tensor([[1, 1, 1, 1, 0, 0]] * 2 + [[1, 1, 1, 1, 1, 1]] * 2, dtype=torch.bool)
    with torch.no_grad():
        masked_loss, _ = prior.loss({**batch, "loss_mask": mask}, "main", step=0)
        expected = -prior.log_prob(batch["input_ids"], batch["label"], mask).sum() / mask.sum()
    assert masked_loss.item() == pytest.approx(expected.item(), rel=1e-5)
    assert masked_loss.item() != pytest.approx(eval_loss.item(), rel=1e-3)


def test_config_errors_and_registry():
    with pytest.raises(ValueError, match="valid keys: .*hidden_size"):
        TransformerPriorConfig.from_dict({"vocab_size": 4, "seq_len": 4, "hiden_size": 8})
    with pytest.raises(ValueError, match="architecture"):
        TransformerPriorConfig(vocab_size=4, seq_len=4, architecture="mamba")
    assert PRIORS["transformer"] == (TransformerPriorConfig, TransformerPrior)
    with pytest.raises(ValueError, match="unconditional"):
        tiny_prior(num_classes=0).log_prob(torch.zeros(1, 6, dtype=torch.long), torch.tensor([0]))


def test_decode_loops_directly_agree_under_guidance():
    prior = tiny_prior(seq_len=7)
    cond = prior.condition_tokens(torch.tensor([0, 2]), 2, "cpu")
    start = torch.cat([torch.cat([cond, torch.full_like(cond, prior.config.null_token)])[:, None],
                       torch.tensor([[1], [2], [1], [2]])], dim=1)

    def request(seed):
        output = torch.empty((2, 7), dtype=torch.long)
        output[:, :1] = torch.tensor([[1], [2]])
        return DecodeRequest(start, output, 1, True, SamplingOptions(guidance_scale=2.0),
                             torch.Generator().manual_seed(seed))

    with torch.no_grad():
        cached = decode_cached(prior._next_log_probs, transformers.DynamicCache(), request(4))
        reference = decode_recompute(prior._next_log_probs, request(4))
    assert torch.equal(cached, reference)
