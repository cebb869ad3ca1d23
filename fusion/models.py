"""The model layer: build or load a causal LM, prefill to a ``KVCache``, continue, score, generate.

Real checkpoints load from a ``.gguf`` file (converted once, ``fusion.checkpoints``) or a local Hugging Face
directory; tiny random models of real architectures are built from named configs for tests. A model answers
in one of two styles: ``letter`` (the toy zoo and tiny models: ``fusion.prompts``' lettered format) or ``text``
(pretrained checkpoints: its own frame, ``fusion.formats``, answers as text, options scored by likelihood).
transformers 5.x cache API only (``cache=``, ``DynamicCache.layers``).
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    DynamicCache,
    LlamaConfig,
    PreTrainedModel,
    PreTrainedTokenizerFast,
    Qwen2Config,
    Qwen3Config,
)
from transformers.utils import logging as hf_logging

from bus.errors import ModelError
from fusion.checkpoints import resolve_checkpoint
from fusion.formats import Framed, PromptFormat
from fusion.kvcache import KVCache
from fusion.live import as_model_cache
from fusion.tokenizer import byte_level_tokenizer

log = logging.getLogger(__name__)
hf_logging.disable_progress_bar()  # a bar per loaded or saved small model is noise in agents, benches and the demo

CONFIGS = {"qwen3": Qwen3Config, "llama": LlamaConfig, "qwen2": Qwen2Config}  # architectures we build and test
SUPPORTED_ARCHS = (*CONFIGS, "gemma3_text", "mistral")  # architectures a checkpoint may have (standard KV caches)
STYLE_FILE = "fedrefine-model.json"  # in a saved directory: {"style": "letter"} for zoo models
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}  # --dtype choices
DEFAULT_MAX_POSITIONS = 512  # tokens; toy prompts are far shorter
MAX_WORD_MEMO = 256  # fixed texts whose ids a model remembers (word_ids)
DEFAULT_PREFILL_BATCH = 16  # prompts per batch in prefill_many
# Bookkeeping that saving/loading changes without changing the model.
_VOLATILE_CONFIG_KEYS = frozenset({"transformers_version", "_name_or_path", "architectures", "dtype", "torch_dtype"})


@dataclass(frozen=True)
class ModelSpec:
    """Shape of a small decoder-only model."""

    hidden_size: int = 64  # residual width
    num_layers: int = 2  # decoder blocks
    num_heads: int = 4  # query heads
    num_kv_heads: int = 2  # key/value heads (GQA when < num_heads)
    head_dim: int = 16  # per-head width
    intermediate_size: int = 128  # MLP width
    max_positions: int = DEFAULT_MAX_POSITIONS  # longest sequence


TINY_MODELS: dict[str, tuple[str, ModelSpec]] = {
    "tiny-qwen3": ("qwen3", ModelSpec(64, 2, 4, 2, 16, 128)),
    "tiny-llama": ("llama", ModelSpec(48, 3, 4, 2, 12, 96)),
    "tiny-qwen2": ("qwen2", ModelSpec(64, 2, 4, 1, 16, 128)),
}


@dataclass(frozen=True)
class Encoded:
    """Token ids of a text and the character span ``(start, end)`` of each token."""

    ids: list[int]
    offsets: list[tuple[int, int]]


@dataclass
class Prefill:
    """A prompt run through a model: its cache, tokens, offsets and next-token logits."""

    cache: KVCache
    ids: list[int]
    offsets: list[tuple[int, int]]
    logits: torch.Tensor  # (vocab,) at the last prompt position


def make_config(arch: str, spec: ModelSpec, tokenizer: PreTrainedTokenizerFast):
    """A transformers config of ``arch`` with ``spec``'s shape and the tokenizer's vocabulary."""
    if arch not in CONFIGS:
        raise ModelError(f"unknown architecture {arch!r}; choose one of {sorted(CONFIGS)}", arch=arch)
    return CONFIGS[arch](
        vocab_size=len(tokenizer),
        hidden_size=spec.hidden_size,
        intermediate_size=spec.intermediate_size,
        num_hidden_layers=spec.num_layers,
        num_attention_heads=spec.num_heads,
        num_key_value_heads=spec.num_kv_heads,
        head_dim=spec.head_dim,
        max_position_embeddings=spec.max_positions,
        tie_word_embeddings=True,
        bos_token_id=tokenizer.eos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )


def default_device() -> torch.device:
    """CUDA when present, else CPU."""
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _dtype(dtype: str | torch.dtype | None) -> torch.dtype:
    if dtype is None:
        return torch.float32
    if isinstance(dtype, torch.dtype):
        return dtype
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {sorted(DTYPES)}", dtype=dtype)
    return DTYPES[dtype]


def _device(device: torch.device | str | None) -> torch.device:
    if device is None:
        return default_device()
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ModelError(f"unknown device {device!r}; e.g. cpu, cuda, cuda:1, mps", device=str(device)) from exc
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device {device!r} asked for, but this machine has no CUDA device", device=str(device))
    return dev


def _saved_style(path: Path) -> str:
    """The answer style saved with a directory (zoo models: letter); a checkpoint without one answers in text."""
    try:
        return json.loads((path / STYLE_FILE).read_text()).get("style", "text")
    except FileNotFoundError:
        return "text"
    except ValueError as exc:
        raise ModelError(f"{path / STYLE_FILE} is not valid JSON: {exc}", path=str(path)) from exc


class LanguageModel:
    """A causal LM with its tokenizer and the cache operations FedRefine needs."""

    def __init__(
        self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast, name: str, style: str = "letter"
    ) -> None:
        if style not in ("letter", "text"):
            raise ModelError(f"unknown answer style {style!r}; expected 'letter' or 'text'", style=style)
        self.model = model.eval()
        self.tokenizer = tokenizer
        self.name = name
        self.style = style  # "letter": the toy zoo's lettered format; "text": a pretrained model's own frame
        self.format = PromptFormat.for_tokenizer(tokenizer) if style == "text" else None
        self.arch: str = model.config.model_type
        self.fingerprint = fingerprint(model, tokenizer)
        self._word_ids: dict[str, tuple[int, ...]] = {}  # memo of word_ids

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def build(
        cls,
        arch: str,
        spec: ModelSpec,
        tokenizer: PreTrainedTokenizerFast | None = None,
        seed: int = 0,
        name: str | None = None,
        device: torch.device | str | None = None,
    ) -> LanguageModel:
        """A fresh randomly initialised model of ``arch`` (deterministic per seed)."""
        tokenizer = tokenizer or byte_level_tokenizer()
        config = make_config(arch, spec, tokenizer)
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        return cls(model.to(device or default_device()), tokenizer, name or f"{arch}-random")

    @classmethod
    def load(
        cls,
        name_or_path: str | Path,
        device: torch.device | str | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> LanguageModel:
        """A ``.gguf`` file, a local Hugging Face checkpoint directory, or a named tiny random model (``tiny-qwen3``).

        ``dtype`` as transformers names it (``float32``, ``bfloat16``, ``float16``; default float32), ``device``
        as torch does (``cpu``, ``cuda``, ``cuda:1``; default CUDA when present).
        """
        key = str(name_or_path)
        torch_dtype = _dtype(dtype)
        dev = _device(device)
        if key in TINY_MODELS:
            arch, spec = TINY_MODELS[key]
            lm = cls.build(arch, spec, seed=0, name=key, device=dev)
            lm.model.to(torch_dtype)
            return lm
        path = resolve_checkpoint(key)
        model_type = json.loads((path / "config.json").read_text()).get("model_type")
        if model_type not in SUPPORTED_ARCHS:
            raise ModelError(
                f"{key!r} has architecture {model_type!r}; supported: {sorted(SUPPORTED_ARCHS)}",
                path=key,
                arch=model_type,
            )
        style = _saved_style(path)
        try:
            if (path / "tokenizer.json").is_file():
                tokenizer = PreTrainedTokenizerFast.from_pretrained(path)
            else:
                tokenizer = AutoTokenizer.from_pretrained(path)
            model = AutoModelForCausalLM.from_pretrained(path, dtype=torch_dtype)
        except (OSError, ValueError) as exc:
            raise ModelError(f"cannot load the checkpoint at {key!r}: {exc}", path=key) from exc
        name = Path(key).name if Path(key).suffix.lower() == ".gguf" else path.name
        return cls(model.to(dev), tokenizer, name, style)

    def save(self, path: str | Path) -> Path:
        """Write config, weights and tokenizer so ``LanguageModel.load(path)`` reads them back."""
        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(path)
        self.tokenizer.save_pretrained(path)
        (path / STYLE_FILE).write_text(json.dumps({"style": self.style}) + "\n")
        return path

    # ---- facts --------------------------------------------------------------------------------
    @property
    def config(self):
        """The transformers config."""
        return self.model.config

    @property
    def device(self) -> torch.device:
        """Where the weights live."""
        return next(self.model.parameters()).device

    @property
    def num_layers(self) -> int:
        """Decoder layers (= cache layers)."""
        return self.config.num_hidden_layers

    @property
    def kv_heads(self) -> int:
        """Key/value heads per layer."""
        return self.config.num_key_value_heads

    @property
    def head_dim(self) -> int:
        """Per-head width of K and V."""
        return getattr(self.config, "head_dim", None) or self.config.hidden_size // self.config.num_attention_heads

    @property
    def num_params(self) -> int:
        """Parameter count."""
        return sum(p.numel() for p in self.model.parameters())

    def __repr__(self) -> str:
        return f"LanguageModel({self.name!r}, arch={self.arch}, layers={self.num_layers}, fp={self.fingerprint})"

    # ---- tokens -------------------------------------------------------------------------------
    def encode(self, text: str) -> Encoded:
        """Token ids and character offsets of ``text`` (no special tokens)."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return Encoded(list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])

    def word_ids(self, text: str) -> list[int]:
        """``encode(text).ids``, remembered: for the few fixed texts read on every question (" A" .. " none")."""
        ids = self._word_ids.get(text)
        if ids is None:
            if len(self._word_ids) >= MAX_WORD_MEMO:
                self._word_ids.clear()
            ids = self._word_ids[text] = tuple(self.encode(text).ids)
        return list(ids)

    def decode(self, ids: list[int]) -> str:
        """Text of token ids."""
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def token_id(self, text: str) -> int:
        """The id of a text that must be exactly one token (e.g. ``" A"``)."""
        ids = self.word_ids(text)
        if len(ids) != 1:
            raise ModelError(f"{text!r} is {len(ids)} tokens for {self.name}, expected one", text=text)
        return ids[0]

    def encode_framed(self, framed: Framed) -> Encoded:
        """Token ids and absolute character offsets of a whole framed prompt, with the BOS its format wants."""
        fmt = self._text_format()
        enc = self.tokenizer(framed.text, add_special_tokens=fmt.add_special_tokens, return_offsets_mapping=True)
        return Encoded(list(enc["input_ids"]), [tuple(o) for o in enc["offset_mapping"]])

    def answer_ids(self, answer: str) -> list[int]:
        """Tokens of an answer text as it follows this model's prompt (with the format's lead, e.g. a space)."""
        lead = self.format.answer_lead if self.format is not None else " "
        return self.encode(lead + " ".join(answer.split())).ids

    def answer_target(self, answer: str) -> list[int]:
        """Tokens a trained receiver should write for ``answer``: its tokens, then the format's end (end of turn
        for a chat model, a newline after ``Answer:``)."""
        fmt = self._text_format()
        end = [fmt.stop_tokens[0]] if fmt.kind == "chat" and fmt.stop_tokens else self.encode("\n").ids
        return self.answer_ids(answer) + end

    @property
    def body(self):
        """The decoder without its output layer (hidden states; a transmitter and the trainer need no full logits)."""
        return self.model.model

    def head_logits(self, hidden: torch.Tensor) -> torch.Tensor:
        """Vocabulary logits of hidden states ``(..., hidden)``, as the model's own forward makes them."""
        logits = self.model.lm_head(hidden)
        cap = getattr(self.config, "final_logit_softcapping", None)
        if cap is not None:
            logits = torch.tanh(logits / cap) * cap
        return logits

    def _text_format(self) -> PromptFormat:
        if self.format is None:
            raise ModelError(f"{self.name} answers by letter (a zoo model); it has no text prompt format")
        return self.format

    def respond(self, content: str, max_new_tokens: int = 32, stop: str | None = "\n") -> str:
        """A text-style model's greedy reply to ``content`` in its own frame (chat template or plain)."""
        return self.generate(self.encode_framed(self._text_format().frame(content)).ids, max_new_tokens, stop)

    # ---- forward passes -----------------------------------------------------------------------
    @torch.no_grad()
    def forward_ids(
        self, ids: torch.Tensor, cache: KVCache | None = None, logits_to_keep: int = 0, live: Sequence = ()
    ) -> tuple[torch.Tensor, KVCache]:
        """Logits ``(B, T, vocab)`` (only the last ``logits_to_keep`` positions when > 0) and the full cache after
        running ``ids`` ``(B, T)`` from ``cache`` (which is never modified); ``live``: ``fusion.live.LiveTerm``s
        that fuse the first of ``ids`` as it is computed."""
        dyn = as_model_cache(self.config, cache, live) if cache is not None else None
        out = self.model(input_ids=ids.to(self.device), cache=dyn, use_cache=True, logits_to_keep=logits_to_keep)
        return out.logits, KVCache.from_dynamic(out.cache)

    def _ids(self, text_or_ids: str | list[int]) -> tuple[list[int], list[tuple[int, int]]]:
        if isinstance(text_or_ids, str):
            enc = self.encode(text_or_ids)
            ids, offsets = enc.ids, enc.offsets
        else:
            ids, offsets = list(text_or_ids), []
        if not ids:
            raise ModelError("cannot run an empty prompt")
        return ids, offsets

    def prefill(self, text_or_ids: str | list[int]) -> Prefill:
        """Run a prompt: its cache ``(1, heads, T, head_dim)`` per layer and next-token logits."""
        ids, offsets = self._ids(text_or_ids)
        logits, cache = self.forward_ids(torch.tensor([ids]), logits_to_keep=1)
        return Prefill(cache, ids, offsets, logits[0, -1])

    @torch.no_grad()
    def prefill_many(self, prompts: Sequence[list[int]], batch_size: int = DEFAULT_PREFILL_BATCH) -> list[Prefill]:
        """``prefill`` of many prompts, run in right-padded batches of like length (same caches and logits as one at
        a time, up to float noise; faster on a CPU)."""
        out: list[Prefill | None] = [None] * len(prompts)
        order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        for start in range(0, len(order), batch_size):
            rows = order[start : start + batch_size]
            T = max(len(prompts[i]) for i in rows)
            ids = torch.full((len(rows), T), pad, dtype=torch.long)
            mask = torch.zeros((len(rows), T), dtype=torch.long)
            for j, i in enumerate(rows):
                if not prompts[i]:
                    raise ModelError("cannot run an empty prompt")
                ids[j, : len(prompts[i])] = torch.tensor(prompts[i])
                mask[j, : len(prompts[i])] = 1
            dyn = DynamicCache(config=self.config)
            hidden = self.body(
                input_ids=ids.to(self.device), attention_mask=mask.to(self.device), cache=dyn, use_cache=True
            )
            layers = KVCache.from_dynamic(hidden.cache).layers
            last = torch.tensor([len(prompts[i]) - 1 for i in rows])
            logits = self.head_logits(hidden.last_hidden_state[torch.arange(len(rows)), last.to(self.device)])
            for j, i in enumerate(rows):
                n = len(prompts[i])
                cache = KVCache([(k[j : j + 1, :, :n].clone(), v[j : j + 1, :, :n].clone()) for k, v in layers])
                out[i] = Prefill(cache, list(prompts[i]), [], logits[j])
        return [p for p in out if p is not None]

    def extend(self, cache: KVCache, ids: list[int], live: Sequence = ()) -> Prefill:
        """Run ``ids`` after ``cache``: the longer cache and the next-token logits (``cache`` is not modified;
        ``live`` terms fuse the first of ``ids`` as it is computed)."""
        if not ids:
            raise ModelError("cannot extend a cache by no tokens")
        logits, longer = self.forward_ids(torch.tensor([ids]), cache, logits_to_keep=1, live=live)
        return Prefill(longer, list(ids), [], logits[0, -1])

    def forward_from(self, cache: KVCache, ids: list[int], live: Sequence = ()) -> torch.Tensor:
        """Logits ``(len(ids), vocab)`` continuing from ``cache`` (which is never modified)."""
        logits, _ = self.forward_ids(torch.tensor([ids]), cache, live=live)
        return logits[0]

    def _as_prefill(self, prompt: str | Prefill) -> Prefill:
        return prompt if isinstance(prompt, Prefill) else self.prefill(prompt)

    def next_token_logprobs(self, prompt: str | Prefill) -> torch.Tensor:
        """Log-probabilities ``(vocab,)`` of the token after the prompt."""
        return torch.log_softmax(self._as_prefill(prompt).logits.float(), dim=-1)

    @torch.no_grad()
    def score_ids(self, prompt: Prefill, options: list[list[int]]) -> torch.Tensor:
        """Summed log-likelihood ``(n,)`` of each option's token ids right after ``prompt`` (one batched pass)."""
        if not options or any(not ids for ids in options):
            raise ModelError("every option needs at least one token")
        first = torch.log_softmax(prompt.logits.float(), dim=-1).cpu()  # (vocab,)
        scores = torch.stack([first[ids[0]] for ids in options])  # (n,)
        longest = max(len(ids) for ids in options)
        if longest == 1:
            return scores
        n = len(options)
        pad = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0
        # Right padding needs no mask: a real token never attends to the pad tokens after it.
        rows = torch.full((n, longest - 1), pad, dtype=torch.long)
        for i, ids in enumerate(options):
            rows[i, : len(ids) - 1] = torch.tensor(ids[:-1])
        batch = KVCache([(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1)) for k, v in prompt.cache.layers])
        logits, _ = self.forward_ids(rows, batch)  # (n, longest-1, vocab)
        logp = torch.log_softmax(logits.float(), dim=-1).cpu()
        for i, ids in enumerate(options):
            if len(ids) > 1:
                nxt = torch.tensor(ids[1:])
                scores[i] = scores[i] + logp[i, : len(ids) - 1].gather(1, nxt[:, None]).sum()
        return scores

    def score_options(self, prompt: str | Prefill, options: list[str]) -> torch.Tensor:
        """Summed log-likelihood ``(n,)`` of each option's tokens right after the prompt (no lead added)."""
        ids = []
        for option in options:
            enc = self.encode(option).ids
            if not enc:
                raise ModelError(f"option {option!r} has no tokens")
            ids.append(enc)
        return self.score_ids(self._as_prefill(prompt), ids)

    @torch.no_grad()
    def generate(self, prompt: str | list[int] | Prefill, max_new_tokens: int = 32, stop: str | None = "\n") -> str:
        """Greedy continuation of the prompt, cut at ``stop``, end of text or the format's end-of-turn token."""
        return self.generate_scored(prompt, max_new_tokens, stop)[0]

    @torch.no_grad()
    def generate_scored(
        self, prompt: str | list[int] | Prefill, max_new_tokens: int = 32, stop: str | None = "\n"
    ) -> tuple[str, list[float]]:
        """``generate``'s text and the probability of each greedy token it chose (the stop token's included when
        the model ended by itself): how sure the model was of what it wrote."""
        pre = prompt if isinstance(prompt, Prefill) else self.prefill(prompt)
        cache, logits, out_ids, probs = pre.cache, pre.logits, [], []
        stops = set(self.format.stop_tokens) if self.format is not None else set()
        if self.tokenizer.eos_token_id is not None:
            stops.add(self.tokenizer.eos_token_id)
        for _ in range(max_new_tokens):
            token = int(logits.argmax())
            probs.append(float(torch.softmax(logits.float(), -1)[token]))
            if token in stops:
                break
            out_ids.append(token)
            text = self.decode(out_ids).lstrip()  # a reply may open with a newline before its first word
            if stop and stop in text:
                return text.split(stop, 1)[0], probs
            step_logits, cache = self.forward_ids(torch.tensor([[token]]), cache, logits_to_keep=1)
            logits = step_logits[0, -1]
        return self.decode(out_ids).lstrip(), probs


def fingerprint(model: PreTrainedModel, tokenizer: PreTrainedTokenizerFast) -> str:
    """A 16-hex-digit id of config, tokenizer and weights (a sample of every tensor, so it stays fast on 1B models)."""
    h = hashlib.sha256()
    config = {k: v for k, v in model.config.to_dict().items() if k not in _VOLATILE_CONFIG_KEYS}
    h.update(json.dumps(config, sort_keys=True, default=str).encode())
    h.update(tokenizer.backend_tokenizer.to_str().encode())
    for name, tensor in sorted(model.state_dict().items()):
        flat = tensor.detach().reshape(-1)
        sample = torch.cat([flat[:64], flat[-64:]]).float().cpu().numpy().tobytes()
        h.update(name.encode() + str(tuple(tensor.shape)).encode() + sample)
    return h.hexdigest()[:16]
