"""The LSTM/GRU prior: exact normalisation, causality, stateful sampling equal to recomputation,
guidance, prefixes, save/load and a few training steps."""

import itertools
import json

import pytest
import torch

from priors.baselines.common import AutoregressiveDensityModel
from priors.rnn import RNNPrior, RNNPriorConfig
from priors.sampling import SamplingOptions
from helpers.optimize import adam_steps


def tiny(cell: str = "lstm", vocab_size: int = 3, seq_len: int = 3, num_classes: int = 2, **overrides) -> RNNPrior:
    torch.manual_seed(0)
    sizes = dict(embedding_dim=8, hidden_size=16, num_layers=2, dropout=0.1, label_dropout=0.1) | overrides
    config = RNNPriorConfig(vocab_size=vocab_size, seq_len=seq_len, num_classes=num_classes, cell=cell, **sizes)
    return RNNPrior(config).eval()


def all_sequences(vocab_size: int, seq_len: int) -> torch.Tensor:
    return torch.tensor(list(itertools.product(range(vocab_size), repeat=seq_len)))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("vocab_size,seq_len", [(3, 3), (2, 4)])
@pytest.mark.parametrize("num_classes", [0, 2])
def test_probabilities_of_all_sequences_sum_to_one(cell, vocab_size, seq_len, num_classes):
    model = tiny(cell, vocab_size, seq_len, num_classes)
    sequences = all_sequences(vocab_size, seq_len)
    for label in [None] + [torch.full((len(sequences),), c) for c in range(num_classes)]:
        total = model.log_prob(sequences, label).double().exp().sum().item()
        assert total == pytest.approx(1.0, abs=1e-5)
    token_log_probs = model.token_log_probs(sequences)
    assert token_log_probs.shape == sequences.shape
    torch.testing.assert_close(token_log_probs.sum(dim=1), model.log_prob(sequences))


def test_changing_token_t_never_changes_earlier_outputs():
    model = tiny(vocab_size=5, seq_len=6)
    tokens = torch.randint(5, (4, 6), generator=torch.Generator().manual_seed(0))
    classes = torch.tensor([0, 1, 2, 1])  # 2 is the null class
    reference = model.token_logits(tokens, classes)
    for position in range(6):
        changed = tokens.clone()
        changed[:, position] = (changed[:, position] + 1) % 5
        logits = model.token_logits(changed, classes)
        torch.testing.assert_close(logits[:, : position + 1], reference[:, : position + 1])
        if position < 5:
            assert not torch.allclose(logits[:, position + 1], reference[:, position + 1])


def test_the_start_token_carries_the_class():
    model = tiny(vocab_size=4, seq_len=3, num_classes=3)
    tokens = torch.zeros(3, 3, dtype=torch.long)
    log_probs = model.log_prob(tokens, torch.tensor([0, 1, 2]))
    assert len(set(log_probs.tolist())) == 3  # each class sees a different start token
    unconditional = model.log_prob(tokens[:1])
    assert unconditional.item() not in log_probs.tolist()
    with pytest.raises(ValueError, match="labels"):
        model.log_prob(tokens, torch.tensor([0, 1, 3]))
    with pytest.raises(ValueError, match="unconditional"):
        tiny(num_classes=0).log_prob(tokens, torch.tensor([0, 0, 0]))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
@pytest.mark.parametrize("guidance_scale", [1.0, 3.0])
def test_stateful_sampling_equals_recomputing_every_step(cell, guidance_scale):
    model = tiny(cell, vocab_size=6, seq_len=7, num_classes=3)
    options = SamplingOptions(temperature=0.9, top_p=0.95, guidance_scale=guidance_scale)
    label = torch.tensor([0, 1, 2, 1, 0])
    prefix = torch.randint(6, (5, 2), generator=torch.Generator().manual_seed(3))
    stateful = model.sample(5, label, prefix, options, generator=torch.Generator().manual_seed(7))
    # the base class decodes by recomputing the whole sequence at every position (O(L^2))
    tokens, classes, prefix_len, guided = model.prepare_sampling(5, label, prefix, options)
    generator = torch.Generator().manual_seed(7)
    AutoregressiveDensityModel.decode(model, tokens, classes, prefix_len, guided, options, generator)
    assert torch.equal(stateful, tokens[:5])
    assert stateful.shape == (5, 7) and torch.equal(stateful[:, :2], prefix)


def test_guidance_scale_one_equals_conditional_and_zero_equals_unconditional_sampling():
    model = tiny(vocab_size=6, seq_len=8, num_classes=3)
    with torch.no_grad():  # an untrained model barely listens to its class token: make it listen
        model.embedding.weight[6:] *= 20
    label = torch.tensor([0, 1, 2, 2])

    def draw(scale, with_label=True):
        options = SamplingOptions(guidance_scale=scale)
        return model.sample(4, label=label if with_label else None, options=options,
                            generator=torch.Generator().manual_seed(11))

    conditional, unconditional = draw(1.0), draw(1.0, with_label=False)
    assert not torch.equal(conditional, unconditional)
    # just off 1, the doubled cond/null batch runs, and must give the conditional model's draws
    assert torch.equal(draw(1.0 + 1e-7), conditional)
    assert torch.equal(draw(0.0), unconditional)
    assert not torch.equal(draw(4.0), conditional)


def test_sampling_shapes_and_prefixes():
    model = tiny(vocab_size=4, seq_len=5, num_classes=2)
    assert model.sample(3).shape == (3, 5)
    full = torch.randint(4, (2, 5), generator=torch.Generator().manual_seed(0))
    assert torch.equal(model.sample(2, prefix=full), full)
    greedy = model.sample(2, label=torch.tensor([0, 1]), prefix=full[:, :1], options=SamplingOptions(top_k=1))
    expected = model.token_logits(greedy, torch.tensor([0, 1])).argmax(dim=-1)
    assert torch.equal(greedy[:, 1:], expected[:, 1:])
    with pytest.raises(ValueError, match="label"):
        model.sample(3, label=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="prefix"):
        model.sample(3, prefix=torch.zeros(2, 2, dtype=torch.long))


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_save_load_round_trip(cell, tmp_path):
    model = tiny(cell, vocab_size=5, seq_len=4, num_classes=2)
    model.save_pretrained(tmp_path)
    record = json.loads((tmp_path / "tokgen.json").read_text())
    assert record["kind"] == "rnn" and record["config"]["cell"] == cell
    loaded = RNNPrior.from_pretrained(tmp_path)
    assert loaded.config == model.config and not loaded.training
    tokens = torch.randint(5, (6, 4), generator=torch.Generator().manual_seed(0))
    label = torch.tensor([0, 1] * 3)
    torch.testing.assert_close(loaded.log_prob(tokens, label), model.log_prob(tokens, label))
    record["config"]["hidden_size"] = 17
    (tmp_path / "tokgen.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="wrong shapes"):
        RNNPrior.from_pretrained(tmp_path)
    record["kind"] = "nade"
    (tmp_path / "tokgen.json").write_text(json.dumps(record))
    with pytest.raises(ValueError, match="kind"):
        RNNPrior.from_pretrained(tmp_path)


def test_config_validation():
    with pytest.raises(ValueError, match="valid keys.*hidden_size"):
        RNNPriorConfig.from_dict({"vocab_size": 4, "seq_len": 3, "hiden_size": 8})
    with pytest.raises(ValueError, match="cell"):
        RNNPriorConfig(vocab_size=4, seq_len=3, cell="rnn")


def test_label_dropout_and_a_few_steps_reduce_the_nll():
    model = tiny("gru", vocab_size=4, seq_len=6, num_classes=2, num_layers=1, label_dropout=0.5, dropout=0.0).train()
    generator = torch.Generator().manual_seed(0)
    label = torch.randint(2, (32,), generator=generator)
    # class c: tokens count up from c modulo 4, a sequence the RNN can learn in a few steps
    tokens = (label[:, None] + torch.arange(6)) % 4
    batch = {"input_ids": tokens, "label": label}
    torch.manual_seed(1)
    dropped = model.drop_labels(label, 32)
    assert 0 < (dropped == 2).sum() < 32 and torch.equal(dropped[dropped != 2], label[dropped != 2])
    assert torch.equal(model.eval().drop_labels(label, 32), label)  # no dropout at evaluation
    model.train()
    assert model.phases(0) == ["main"] and len(model.param_groups()["main"]) == len(list(model.parameters()))
    first, metrics = model.loss(batch, "main", 0)
    assert metrics["bits_per_token"] == pytest.approx(metrics["nll_per_token"].item() / 0.6931471805599453)
    adam_steps(model, batch, steps=20, lr=0.03)
    final = -model.eval().log_prob(tokens, label).mean() / 6
    assert final < 0.5 * first.detach()
