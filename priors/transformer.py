"""Causal transformer prior over image tokens: a `transformers` Llama (or GPT-2) built from a config
object, with class tokens for conditioning and a null token for classifier-free guidance.

Token layout: image tokens `0..V-1`, class tokens `V..V+C-1`, and the null token `V+C` (dropped
labels, unconditional sampling, and the start token when `C == 0`); the model vocabulary is
`V + C + 1`. A sequence `x_1..x_L` is read as `[cond, x_1..x_{L-1}]` and predicts `x_1..x_L`, with the
softmax taken over the `V` image-token logits only, so that the probabilities of all `V^L`
sequences sum to exactly one (tested). Labels are dropped to the null token with probability
`label_dropout` during training so that one network is both the conditional and the unconditional
model that guidance needs. The saved folder is a plain Hugging Face model folder
(`AutoModelForCausalLM.from_pretrained` loads it) plus `tokgen.json`.

Papers: Esser et al. 2021, "Taming Transformers for High-Resolution Image Synthesis" (a transformer
prior over VQ tokens); Sun et al. 2024, "Autoregressive Model Beats Diffusion: Llama for Scalable
Image Generation" (LlamaGen: Llama blocks, class token, classifier-free guidance).
"""

from __future__ import annotations

import inspect
import json
import logging
import math
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
import transformers
from einops import rearrange, repeat
from torch import Tensor, nn

from priors.baselines.common import config_from_dict
from priors.decode import DecodeRequest, decode_cached, decode_recompute
from priors.sampling import SamplingOptions
from priors.token_nll import mean_token_nll, nll_metrics

logger = logging.getLogger(__name__)

ARCHITECTURES = ("llama", "gpt2")
METADATA_FILE = "tokgen.json"


@dataclass(frozen=True)
class TransformerPriorConfig:
    vocab_size: int  # V, image tokens; from the token manifest
    seq_len: int  # L, tokens per item; from the token manifest
    num_classes: int = 0  # C; 0 = unconditional
    architecture: str = "llama"  # "llama" (RMSNorm, RoPE, SwiGLU) or "gpt2" (LayerNorm, learned positions, GELU)
    hidden_size: int = 256
    num_layers: int = 6
    num_heads: int = 8
    num_key_value_heads: int = 0  # llama only; 0 = num_heads (no grouped-query attention)
    intermediate_size: int = 0  # 0 = 4 * hidden for gpt2, the parameter-matched 8/3 * hidden (to 64) for llama
    dropout: float = 0.0  # gpt2: embedding, residual and attention dropout; llama: attention dropout only
    label_dropout: float = 0.1  # probability of training a row with the null token instead of its class
    rope_theta: float = 10000.0  # llama only
    initializer_range: float = 0.02
    compile_sampling: bool = False  # default of `sample(compile=None)`: static cache + torch.compile on CUDA

    def __post_init__(self):
        if self.architecture not in ARCHITECTURES:
            raise ValueError(f"architecture must be one of {ARCHITECTURES}, got {self.architecture!r}")
        if self.vocab_size < 1 or self.seq_len < 1 or self.num_classes < 0:
            raise ValueError(f"need vocab_size >= 1, seq_len >= 1, num_classes >= 0: {self}")
        if self.hidden_size % self.num_heads:
            raise ValueError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        if self.num_key_value_heads and self.num_heads % self.num_key_value_heads:
            raise ValueError(f"num_heads {self.num_heads} is not divisible by num_key_value_heads")
        if not 0 <= self.label_dropout < 1 or not 0 <= self.dropout < 1:
            raise ValueError("dropout and label_dropout must be in [0, 1)")

    @classmethod
    def from_dict(cls, data: dict) -> "TransformerPriorConfig":
        return config_from_dict(cls, data)

    @property
    def null_token(self) -> int:
        return self.vocab_size + self.num_classes

    @property
    def model_vocab_size(self) -> int:
        return self.vocab_size + self.num_classes + 1

    def resolved_intermediate_size(self) -> int:
        if self.intermediate_size:
            return self.intermediate_size
        if self.architecture == "gpt2":
            return 4 * self.hidden_size
        # SwiGLU has three matrices instead of two; 2/3 of 4*hidden keeps the parameter count (LLaMA paper).
        return 64 * math.ceil(8 * self.hidden_size / 3 / 64)


def build_hf_config(config: TransformerPriorConfig) -> transformers.PretrainedConfig:
    """The `transformers` config of the network; nothing is downloaded."""
    common = dict(vocab_size=config.model_vocab_size, bos_token_id=config.null_token, eos_token_id=None,
                  pad_token_id=None, initializer_range=config.initializer_range, use_cache=True)
    if config.architecture == "gpt2":
        return transformers.GPT2Config(
            n_positions=config.seq_len, n_embd=config.hidden_size, n_layer=config.num_layers, n_head=config.num_heads,
            n_inner=config.resolved_intermediate_size(), resid_pdrop=config.dropout, embd_pdrop=config.dropout,
            attn_pdrop=config.dropout, **common)
    return transformers.LlamaConfig(
        hidden_size=config.hidden_size, intermediate_size=config.resolved_intermediate_size(),
        num_hidden_layers=config.num_layers, num_attention_heads=config.num_heads,
        num_key_value_heads=config.num_key_value_heads or config.num_heads, max_position_embeddings=config.seq_len,
        rope_parameters={"rope_type": "default", "rope_theta": config.rope_theta},
        attention_dropout=config.dropout, tie_word_embeddings=False, **common)


def _build_model(hf_config) -> nn.Module:
    model_cls = transformers.GPT2LMHeadModel if hf_config.model_type == "gpt2" else transformers.LlamaForCausalLM
    return model_cls(hf_config)


class TransformerPrior(nn.Module):
    """Exact-likelihood autoregressive prior `p(x_1..x_L | class)`; see the module docstring."""

    log_prob_is_bound = False

    def __init__(self, config: TransformerPriorConfig):
        super().__init__()
        self.config = config
        self.model = _build_model(build_hf_config(config))
        # transformers 5.x renamed `past_key_values` to `cache`; pass whichever this version takes.
        parameters = inspect.signature(self.model.base_model.forward).parameters
        self._cache_keyword = "cache" if "cache" in parameters else "past_key_values"
        # Static caches and compiled decode steps, reused across `sample` calls so CUDA graphs are recorded once.
        self._compiled_decoders: dict[tuple, tuple] = {}

    # ---- token layout -------------------------------------------------------------------------

    def condition_tokens(self, label: Tensor | int | None, n: int, device) -> Tensor:
        """`(n,)` conditioning tokens: class `k` -> `V + k`, `None` -> the null token."""
        if label is None:
            return torch.full((n,), self.config.null_token, dtype=torch.long, device=device)
        if self.config.num_classes == 0:
            raise ValueError("this prior is unconditional (num_classes=0) but a label was given")
        label = torch.as_tensor(label, dtype=torch.long, device=device)
        label = label.expand(n) if label.dim() == 0 else label
        if label.shape != (n,):
            raise ValueError(f"label must be an int or have shape ({n},), got {tuple(label.shape)}")
        return label + self.config.vocab_size

    def _image_head(self) -> Tensor:
        # Only the V image-token rows: the softmax over them alone normalises sequences exactly.
        return self.model.get_output_embeddings().weight[: self.config.vocab_size]

    def _hidden_states(self, input_ids: Tensor, position_ids: Tensor | None = None, cache=None) -> Tensor:
        outputs = self.model.base_model(input_ids=input_ids, position_ids=position_ids, use_cache=cache is not None,
                                        **{self._cache_keyword: cache})
        return outputs.last_hidden_state

    def image_logits(self, input_ids: Tensor, cond_tokens: Tensor) -> Tensor:
        """`(b L)` tokens and `(b,)` conditioning tokens -> `(b L V)` logits, position i predicting `x_i`."""
        inputs = torch.cat([rearrange(cond_tokens, "b -> b 1"), input_ids[:, :-1]], dim=1)
        return F.linear(self._hidden_states(inputs), self._image_head())

    # ---- likelihood and training ------------------------------------------------------------------

    @staticmethod
    def _mask_inputs(input_ids: Tensor, mask: Tensor | None) -> Tensor:
        # A masked token (padding of a short clip) is read as token 0, so that no scored position
        # depends on it: masks need no attention mask, and may hold gaps (delayed layouts).
        return input_ids if mask is None else torch.where(mask.bool(), input_ids, torch.zeros_like(input_ids))

    def token_log_probs(self, input_ids: Tensor, label: Tensor | int | None = None,
                        mask: Tensor | None = None) -> Tensor:
        """`(b L)` -> `(b L)` log p(x_i | x_<i, class) in nats; 0 where the optional `(b L)` mask is False."""
        self._check_tokens(input_ids)
        cond = self.condition_tokens(label, input_ids.shape[0], input_ids.device)
        log_probs = self.image_logits(self._mask_inputs(input_ids, mask), cond).float().log_softmax(dim=-1)
        token_log_probs = log_probs.gather(-1, rearrange(input_ids, "b l -> b l 1")).squeeze(-1)
        return token_log_probs if mask is None else token_log_probs * mask.to(token_log_probs.dtype)

    def log_prob(self, input_ids: Tensor, label: Tensor | int | None = None, mask: Tensor | None = None) -> Tensor:
        """`(b L)` -> `(b,)` exact log-likelihood of each sequence in nats (of its unmasked tokens)."""
        return self.token_log_probs(input_ids, label, mask).sum(dim=-1)

    def param_groups(self) -> dict[str, list[nn.Parameter]]:
        return {"main": [p for p in self.parameters() if p.requires_grad]}

    def phases(self, step: int) -> list[str]:
        return ["main"]

    def loss(self, batch: dict, phase: str, step: int) -> tuple[Tensor, dict[str, Tensor]]:
        """Mean NLL per token (nats), over the tokens of `batch["loss_mask"]` when the batch has one.

        Labels drop to the null token with `label_dropout` while training.
        """
        input_ids = batch["input_ids"]
        mask = batch.get("loss_mask")
        batch_size = input_ids.shape[0]
        label = batch.get("label") if self.config.num_classes else None  # an unconditional prior ignores labels
        cond = self.condition_tokens(label, batch_size, input_ids.device)
        if label is not None and self.training and self.config.label_dropout > 0:
            # Global torch RNG on purpose: the training loop seeds it per (seed, step, process).
            dropped = torch.rand(batch_size, device=input_ids.device) < self.config.label_dropout
            cond = torch.where(dropped, torch.full_like(cond, self.config.null_token), cond)
        logits = self.image_logits(self._mask_inputs(input_ids, mask), cond)
        nll = mean_token_nll(logits, input_ids, mask)
        return nll, nll_metrics(nll)

    def _check_tokens(self, input_ids: Tensor) -> None:
        if input_ids.dim() != 2 or input_ids.shape[1] != self.config.seq_len:
            raise ValueError(f"input_ids must be (b, {self.config.seq_len}), got {tuple(input_ids.shape)}")

    # ---- sampling ---------------------------------------------------------------------------------

    def _next_log_probs(self, input_ids: Tensor, position_ids: Tensor, cache) -> Tensor:
        """`(r s)` -> `(r V)` float32 log-probabilities of the token after the last position."""
        hidden = self._hidden_states(input_ids, position_ids, cache)[:, -1]
        return F.linear(hidden, self._image_head()).float().log_softmax(dim=-1)

    def new_kv_cache(self) -> transformers.StaticCache:
        """A KV cache preallocated for one whole sequence. Eager sampling with it is 1.5-2.7x faster on the
        CPU than with a `DynamicCache`, which grows by concatenation at every step, and draws the same
        sequences from the same seed but for a draw on a rounding edge (99.9-100% of them; BENCHMARKS.md,
        "Speed on the CPU")."""
        return transformers.StaticCache(config=self.model.config, max_cache_len=self.config.seq_len)

    def _compiled_decoder(self, rows: int, device: torch.device) -> tuple:
        """(static cache, compiled one-token step) for this batch size and precision, built once."""
        autocast = torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else next(self.parameters()).dtype
        key = (rows, str(device), dtype, self.training)
        if key not in self._compiled_decoders:
            cache = self.new_kv_cache()
            # As transformers' own generate: eager prefill, CUDA-graphed fixed-shape decode step.
            step = torch.compile(self._next_log_probs, mode="reduce-overhead", fullgraph=False, dynamic=False)
            self._compiled_decoders[key] = (cache, step)
        cache, step = self._compiled_decoders[key]
        cache.reset()
        return cache, step

    @torch.no_grad()
    def sample(self, n: int, label: Tensor | int | None = None, prefix: Tensor | None = None,
               options: SamplingOptions = SamplingOptions(), generator: torch.Generator | None = None,
               compile: bool | None = None, _use_cache: bool = True) -> Tensor:
        """Draw `(n L)` int64 token sequences, keeping `prefix` `(n P)` or `(P,)` verbatim.

        `label`: an int, `(n,)` tensor, or None (the null token). Classifier-free guidance runs when
        `options.guidance_scale != 1` and a label is given (without a label it is the identity).
        `compile` (default `config.compile_sampling`): on CUDA, a static KV cache and a
        `torch.compile(mode="reduce-overhead")` decode step. `_use_cache=False` is the reference loop.
        """
        device = next(self.parameters()).device
        length = self.config.seq_len
        output = torch.empty((n, length), dtype=torch.long, device=device)
        prefix = self._prefix(prefix, n, device)
        output[:, : prefix.shape[1]] = prefix
        if prefix.shape[1] == length:
            return output
        cond = self.condition_tokens(label, n, device)
        guided = label is not None and options.guidance_scale != 1.0
        return self._decode(cond, prefix, output, guided, options, generator, compile, _use_cache)

    def _decode(self, cond: Tensor, prefix: Tensor, output: Tensor, guided: bool, options: SamplingOptions,
                generator, compile: bool | None, use_cache: bool) -> Tensor:
        """Decode into `output` `(n L)`; `guided` adds the null-token rows (tests force it at scale 1)."""
        device = output.device
        if guided:
            cond = torch.cat([cond, torch.full_like(cond, self.config.null_token)])
        start = torch.cat([rearrange(cond, "r -> r 1"), repeat(prefix, "n p -> (g n) p", g=2 if guided else 1)], dim=1)
        request = DecodeRequest(start, output, prefix.shape[1], guided, options, generator)
        was_training = self.training
        self.eval()  # no dropout while sampling
        try:
            if not use_cache:
                return decode_recompute(self._next_log_probs, request)
            compile = self.config.compile_sampling if compile is None else compile
            if compile and device.type == "cuda":
                cache, step = self._compiled_decoder(start.shape[0], device)
                return decode_cached(self._next_log_probs, cache, request, decode_step=step,
                                     mark_step=torch.compiler.cudagraph_mark_step_begin)
            if compile:
                logger.info("compile=True only applies on CUDA; sampling eagerly on %s", device)
            return decode_cached(self._next_log_probs, self.new_kv_cache(), request)
        finally:
            self.train(was_training)

    def _prefix(self, prefix: Tensor | None, n: int, device) -> Tensor:
        if prefix is None:
            return torch.empty((n, 0), dtype=torch.long, device=device)
        prefix = torch.as_tensor(prefix, dtype=torch.long, device=device)
        prefix = repeat(prefix, "p -> n p", n=n) if prefix.dim() == 1 else prefix
        if prefix.shape[0] != n or prefix.shape[1] > self.config.seq_len:
            raise ValueError(f"prefix must be (P,) or ({n}, P) with P <= {self.config.seq_len}, "
                             f"got {tuple(prefix.shape)}")
        return prefix

    # ---- checkpoints ------------------------------------------------------------------------------

    def save_pretrained(self, directory) -> None:
        """An HF model folder (config.json + model.safetensors) plus tokgen.json with this config."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory, safe_serialization=True)
        metadata = {"kind": "transformer", "config": asdict(self.config)}
        (directory / METADATA_FILE).write_text(json.dumps(metadata, indent=2))

    @classmethod
    def from_pretrained(cls, directory) -> "TransformerPrior":
        """Rebuild from tokgen.json and load the safetensors weights strictly."""
        directory = Path(directory)
        metadata = json.loads((directory / METADATA_FILE).read_text())
        if metadata.get("kind") != "transformer":
            raise ValueError(f"{directory} holds a {metadata.get('kind')!r} prior, not a transformer")
        prior = cls(TransformerPriorConfig.from_dict(metadata["config"]))
        loaded, info = type(prior.model).from_pretrained(directory, output_loading_info=True)
        problems = {k: v for k, v in info.items() if k in ("missing_keys", "unexpected_keys", "mismatched_keys") and v}
        if problems:
            raise ValueError(f"checkpoint in {directory} does not match its config: {problems}")
        prior.model.load_state_dict(loaded.state_dict(), strict=True)
        return prior
