"""Early stopping by checkpoint selection: the prior keeps the weights with the lowest validation loss."""

import json
import shutil
from pathlib import Path

import pytest
import torch

from pipelines.cli import main
from pipelines.early_stopping import BestValidationWeights
from pipelines.tokenset import load_tokenset
from priors import load_prior
from priors.baselines.fvsbn import FVSBN, FVSBNConfig

SMOKE = Path(__file__).resolve().parents[1] / "configs" / "smoke" / "tiny.toml"


class Tokens(torch.utils.data.Dataset):
    def __init__(self, input_ids):
        self.input_ids = input_ids

    def __len__(self):
        return len(self.input_ids)

    def __getitem__(self, index):
        return {"input_ids": self.input_ids[index]}


def test_validation_loss_is_the_mean_nll_per_token_over_uneven_batches():
    torch.manual_seed(0)
    model = FVSBN(FVSBNConfig(vocab_size=3, seq_len=5, num_classes=0)).eval()
    tokens = torch.randint(0, 3, (10, 5))
    selection = BestValidationWeights(Tokens(tokens), batch_size=4)  # batches of 4, 4 and 2
    with torch.no_grad():
        expected = -model.log_prob(tokens).sum() / tokens.numel()
        assert selection.validation_loss(model, step=1) == pytest.approx(float(expected), rel=1e-5)


def test_restore_brings_back_the_best_weights_not_the_last():
    torch.manual_seed(0)
    model = FVSBN(FVSBNConfig(vocab_size=2, seq_len=6, num_classes=0)).eval()
    tokens = torch.zeros(8, 6, dtype=torch.long)
    selection = BestValidationWeights(Tokens(tokens), batch_size=3)
    losses, weights = {}, {}
    with torch.no_grad():
        for step in (10, 20, 30):
            for parameter in model.parameters():
                parameter.copy_(torch.zeros_like(parameter) if step == 10 else torch.randn_like(parameter) * 3.0)
            losses[step] = selection(model, step)["val_loss"]
            weights[step] = {name: tensor.clone() for name, tensor in model.state_dict().items()}
    assert losses[10] == pytest.approx(torch.log(torch.tensor(2.0)).item(), rel=1e-5)  # uniform: log 2 per token
    best = min(losses, key=losses.get)
    assert selection.best_step == best and selection.best_loss == losses[best]
    assert selection.restore(model, final_step=30) == {"selected_step": best, "best_val_loss": losses[best]}
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, weights[best][name]), name


def test_empty_validation_split_is_refused():
    with pytest.raises(ValueError, match="validation split"):
        BestValidationWeights(Tokens(torch.zeros(0, 4, dtype=torch.long)), batch_size=2)


def test_prior_stage_saves_the_selected_weights(tmp_path):
    assert main(["train-tokenizer", str(SMOKE), f"output_dir={tmp_path}", "name=early"]) == 0
    assert main(["export-tokens", str(SMOKE), f"output_dir={tmp_path}", "name=early"]) == 0
    run = tmp_path / "early"
    assert main(["train-prior", str(SMOKE), f"output_dir={tmp_path}", "name=early",
                 "prior_training.eval_every=2"]) == 0
    record = json.loads((run / "prior" / "stage.json").read_text())["final_metrics"]
    assert record["selected_step"] in (2, 4, 6)
    # The saved prior scores the validation split exactly as well as the best evaluation did.
    tokenset = load_tokenset(run / "tokens", tokenizer_dir=run / "tokenizer")
    prior = load_prior(run / "prior").eval()
    selection = BestValidationWeights(tokenset.torch_dataset("val"), batch_size=16)
    with torch.no_grad():
        assert selection.validation_loss(prior, step=6) == pytest.approx(record["best_val_loss"], rel=1e-4)
    shutil.rmtree(run)
