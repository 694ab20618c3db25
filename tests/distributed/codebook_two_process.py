"""Run by tests/test_distributed.py, once plainly and once under `accelerate launch --num_processes 2`.

Part 1: every rank quantizes its shard of one fixed batch for a few EMA steps; the all-reduced
codebook metrics and the codebook itself must equal one process on the whole batch.
Part 2: a tiny VQ-VAE trains for a few steps through tokgen's loop (gloo under two processes,
with dead-code restarts on); every rank must end with the same codebook.
Part 3: a tiny audio codec trains its decoder alone (`train_decoder_only`: the encoder takes no
gradient, which DDP must be told); every rank must end with the same decoder, the encoder untouched.
"""

import json
import sys
from pathlib import Path

import torch
from accelerate import PartialState

from pipelines.loop import TrainConfig, release_process_group, train
from tokenizers_vq.audio import AudioVQVAE, AudioVQVAEConfig
from tokenizers_vq.quantizers import ResidualVQConfig
from tokenizers_vq.quantizers.vq import VectorQuantizer, VQConfig
from tokenizers_vq.vqvae import VQVAE, VQVAEConfig


class FixedImages(torch.utils.data.Dataset):
    def __init__(self):
        self.images = torch.rand(64, 1, 8, 8, generator=torch.Generator().manual_seed(3)) * 2 - 1

    def __len__(self):
        return len(self.images)

    def __getitem__(self, index):
        return {"pixel_values": self.images[index]}


class FixedClips(torch.utils.data.Dataset):
    def __init__(self):
        self.clips = 0.5 * torch.randn(16, 1, 320, generator=torch.Generator().manual_seed(4))

    def __len__(self):
        return len(self.clips)

    def __getitem__(self, index):
        return {"waveform": self.clips[index]}


def quantizer_metrics(state: PartialState) -> dict:
    data = torch.randn(8, 32, 4, generator=torch.Generator().manual_seed(0))
    shard = data.chunk(state.num_processes)[state.process_index]
    quantizer = VectorQuantizer(VQConfig(codebook_size=16, ema=True, decay=0.9, dead_code_threshold=0.0), dim=4)
    quantizer.train()
    for _ in range(3):
        output = quantizer(shard)
    return {
        "metrics": {key: float(value) for key, value in output.metrics.items()},
        "codebook": quantizer.codebook.tolist(),
    }


def training_codebooks(state: PartialState, out_dir: Path) -> list:
    torch.manual_seed(0)
    config = VQVAEConfig(hidden_channels=4, channel_multipliers=(1,), embedding_dim=4,
                         quantizer=VQConfig(codebook_size=16, dead_code_threshold=0.5))
    model = VQVAE(config)
    train(model, FixedImages(), TrainConfig(max_steps=4, batch_size=8, warmup_steps=1, checkpoint_every=0,
                                            log_every=1), out_dir)
    codebook = model.quantizer.codebook.detach().clone()
    gathered = [torch.zeros_like(codebook) for _ in range(state.num_processes)]
    if state.num_processes > 1:
        torch.distributed.all_gather(gathered, codebook)
    else:
        gathered = [codebook]
    return [g.tolist() for g in gathered]


def decoder_only_training(state: PartialState, out_dir: Path) -> dict:
    torch.manual_seed(0)
    config = AudioVQVAEConfig(hidden_channels=4, strides=(2, 4), embedding_dim=8, stft_fft_sizes=(32, 64),
                              mel_weight=0.0, train_decoder_only=True,
                              quantizer=ResidualVQConfig(num_quantizers=2, quantizer=VQConfig(codebook_size=16, seed=1)))
    model = AudioVQVAE(config)
    encoder_before = torch.cat([p.detach().flatten().clone() for p in model.encoder.parameters()])
    train(model, FixedClips(), TrainConfig(max_steps=3, batch_size=4, warmup_steps=1, checkpoint_every=0,
                                           log_every=1), out_dir)
    decoder = torch.cat([p.detach().flatten() for p in model.decoder.parameters()])
    gathered = [torch.zeros_like(decoder) for _ in range(state.num_processes)]
    if state.num_processes > 1:
        torch.distributed.all_gather(gathered, decoder)
    else:
        gathered = [decoder]
    encoder_after = torch.cat([p.detach().flatten() for p in model.encoder.parameters()])
    return {"decoders": [g.tolist() for g in gathered], "encoder_kept": bool(torch.equal(encoder_before, encoder_after))}


def main() -> None:
    out_dir = Path(sys.argv[1])
    state = PartialState(cpu=not torch.cuda.is_available())
    result = quantizer_metrics(state)
    result["training_codebooks"] = training_codebooks(state, out_dir / f"train_{state.num_processes}")
    result["decoder_only"] = decoder_only_training(state, out_dir / f"decoder_{state.num_processes}")
    result["num_processes"] = state.num_processes
    if state.is_main_process:
        (out_dir / f"result_{state.num_processes}.json").write_text(json.dumps(result))
    release_process_group()


if __name__ == "__main__":
    main()
