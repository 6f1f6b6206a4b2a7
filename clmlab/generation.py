"""Generation from a checkpoint: prompts that fit the context, chat templates, batched left-padded decoding."""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass

import torch
from transformers import TextStreamer, set_seed

from clmlab.cli import require
from clmlab.modeling import context_length

logger = logging.getLogger(__name__)


@dataclass
class DecodingSettings:
    max_new_tokens: int = 64
    do_sample: bool = True
    temperature: float = 1.0
    top_k: int = 50
    top_p: float = 1.0
    repetition_penalty: float = 1.0
    num_return_sequences: int = 1
    seed: int = 42
    use_cache: bool = True

    def __post_init__(self):
        require(self.max_new_tokens >= 1, "max_new_tokens", self.max_new_tokens, "must be 1 or more")
        require(self.num_return_sequences >= 1, "num_return_sequences", self.num_return_sequences, "must be 1 or more")
        require(self.do_sample or self.num_return_sequences == 1, "num_return_sequences", self.num_return_sequences,
                "greedy decoding gives one answer per prompt; pass --do_sample true for several")
        require(0 < self.temperature < float("inf"), "temperature", self.temperature, "must be positive and finite (lower is closer to greedy)")
        require(self.top_k >= 0, "top_k", self.top_k, "must be 0 (off) or more")
        require(0 < self.top_p <= 1, "top_p", self.top_p, "must be above 0 and at most 1")
        require(0 < self.repetition_penalty < float("inf"), "repetition_penalty", self.repetition_penalty, "must be positive and finite (1.0: none)")
        require(self.seed >= 0, "seed", self.seed, "must be 0 or more")

    def generate_kwargs(self) -> dict:
        kwargs = {"max_new_tokens": self.max_new_tokens, "do_sample": self.do_sample, "use_cache": self.use_cache,
                  "repetition_penalty": self.repetition_penalty, "num_return_sequences": self.num_return_sequences}
        if self.do_sample:
            kwargs.update(temperature=self.temperature, top_k=self.top_k, top_p=self.top_p)
        return kwargs

    def as_dict(self) -> dict:
        return asdict(self)


def chat_prompt(tokenizer, user_text: str) -> str:
    """The user's text in the checkpoint's chat template, ready for the assistant's answer."""
    return tokenizer.apply_chat_template([{"role": "user", "content": user_text}], tokenize=False, add_generation_prompt=True)


def chat_end_token_id(tokenizer) -> int | None:
    """The special token the template puts after an assistant's message: where a chat answer stops.
    None when the template ends a turn with plain text only; generation then stops at EOS."""
    marker = "\u2063answer\u2063"
    rendered = tokenizer.apply_chat_template(
        [{"role": "user", "content": "q"}, {"role": "assistant", "content": marker}], tokenize=False)
    after = rendered.split(marker, 1)[1] if marker in rendered else ""
    special = set(tokenizer.all_special_ids) | set(tokenizer.added_tokens_decoder)
    for token_id in tokenizer(after, add_special_tokens=False)["input_ids"]:
        if token_id in special:
            return token_id
    return None


def fit_to_context(ids: list[int], max_new_tokens: int, n_positions: int, label: str = "prompt") -> list[int]:
    """Cut a prompt from the left so that prompt plus new tokens fit the context (GPT-2 raises IndexError
    past n_positions)."""
    if max_new_tokens >= n_positions:
        raise ValueError(f"max_new_tokens={max_new_tokens} leaves no room for a prompt in a context of {n_positions}")
    room = n_positions - max_new_tokens
    if len(ids) > room:
        logger.warning(f"{label} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} the context of "
                       f"{n_positions} holds {room}: its first {len(ids) - room} tokens are cut")
        return ids[-room:]
    return ids


@torch.no_grad()
def generate(model, tokenizer, prompts: list[str], settings: DecodingSettings, batch_size: int = 8,
             stop_token_id: int | None = None, stream: bool = False) -> list[list[str]]:
    """For each prompt, `num_return_sequences` continuations (the new text only).

    Batches are left-padded, so every prompt ends where generation starts; greedy text then equals
    generating one prompt at a time. The seed is set once per call, so the same seed gives the same text.
    """
    set_seed(settings.seed)
    device = next(model.parameters()).device
    n_positions = context_length(model.config) or 1024
    eos_ids = [tokenizer.eos_token_id] + ([stop_token_id] if stop_token_id is not None else [])
    encoded = [fit_to_context(tokenizer(p, add_special_tokens=False)["input_ids"], settings.max_new_tokens, n_positions,
                              f"prompt {i + 1}") for i, p in enumerate(prompts)]
    outputs: list[list[str]] = []
    for start in range(0, len(encoded), batch_size):
        # An empty prompt starts from EOS, as GPT-2's unconditional samples do: no row may be all padding.
        batch = [ids or [tokenizer.eos_token_id] for ids in encoded[start : start + batch_size]]
        width = max(len(ids) for ids in batch)
        input_ids = torch.full((len(batch), width), tokenizer.pad_token_id, dtype=torch.long)
        attention = torch.zeros(len(batch), width, dtype=torch.long)
        for row, ids in enumerate(batch):
            input_ids[row, width - len(ids):] = torch.tensor(ids)
            attention[row, width - len(ids):] = 1
        streamer = TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True) if stream else None
        generated = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                                   eos_token_id=eos_ids, pad_token_id=tokenizer.pad_token_id, streamer=streamer,
                                   **settings.generate_kwargs())
        new_tokens = generated[:, input_ids.shape[1]:]
        texts = tokenizer.batch_decode(new_tokens, skip_special_tokens=True)
        k = settings.num_return_sequences
        outputs += [texts[i * k : (i + 1) * k] for i in range(len(batch))]
    return outputs
