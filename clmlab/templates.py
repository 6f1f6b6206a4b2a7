"""Prompt templates: how a conversation is laid out as text, written twice.

Once in Python, as segments of text each trained or not (what run_sft.py tokenizes), and once as the Jinja
chat template saved with the tokenizer (what `apply_chat_template`, `run_infer.py --chat` and
`transformers.pipeline` render). tests/test_sft.py holds the two to each other for every format.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Sequence

END_OF_TURN = "<|end|>"
CHAT_TOKENS = ("<|system|>", "<|user|>", "<|assistant|>", END_OF_TURN)


@dataclass(frozen=True)
class Segment:
    text: str
    trained: bool


ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.\n\n")
ALPACA_PREAMBLE_WITH_INPUT = ("Below is an instruction that describes a task, paired with an input that provides "
                              "further context. Write a response that appropriately completes the request.\n\n")


def _alpaca_prompt(message: dict) -> str:
    if message.get("input"):
        return (f"{ALPACA_PREAMBLE_WITH_INPUT}### Instruction:\n{message['content']}\n\n"
                f"### Input:\n{message['input']}\n\n### Response:\n")
    return f"{ALPACA_PREAMBLE}### Instruction:\n{message['content']}\n\n### Response:\n"


def _chat_prompt(message: dict) -> str:
    return f"<|{message['role']}|>\n{message['content']}{END_OF_TURN}\n"


def _qa_prompt(message: dict) -> str:
    references = message.get("references") or []
    listed = "".join(f"[{i}] {reference}\n" for i, reference in enumerate(references, 1))
    return (f"References:\n{listed}\n" if references else "") + f"Question: {message['content']}\nAnswer:"


def _plain_prompt(message: dict) -> str:
    return message["content"]


def _jinja(text: str) -> str:
    return json.dumps(text)  # a JSON string is a valid Jinja string literal


# The Jinja twins of the Python renderers above, saved as the tokenizer's chat template.
ALPACA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ message['content'] + eos_token }}"
    "{%- elif message.get('input') -%}{{ " + _jinja(ALPACA_PREAMBLE_WITH_INPUT + "### Instruction:\n")
    + " + message['content'] + " + _jinja("\n\n### Input:\n") + " + message['input'] + " + _jinja("\n\n### Response:\n") + " }}"
    "{%- else -%}{{ " + _jinja(ALPACA_PREAMBLE + "### Instruction:\n") + " + message['content'] + "
    + _jinja("\n\n### Response:\n") + " }}"
    "{%- endif -%}{%- endfor -%}"
)
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{{ '<|' + message['role'] + '|>\\n' + message['content'] + '<|end|>\\n' }}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<|assistant|>\\n' }}{%- endif -%}"
)
QA_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'assistant' -%}{{ ' ' + message['content'] + eos_token }}"
    "{%- else -%}"
    "{%- if message.get('references') -%}{{ 'References:\\n' }}"
    "{%- for reference in message['references'] -%}{{ '[' + loop.index|string + '] ' + reference + '\\n' }}{%- endfor -%}"
    "{{ '\\n' }}{%- endif -%}"
    "{{ 'Question: ' + message['content'] + '\\nAnswer:' }}"
    "{%- endif -%}{%- endfor -%}"
)
PLAIN_TEMPLATE = (
    "{%- for message in messages -%}{{ message['content'] }}"
    "{%- if message['role'] == 'assistant' -%}{{ eos_token }}{%- endif -%}{%- endfor -%}"
)


@dataclass(frozen=True)
class PromptStyle:
    """How a conversation is laid out in text: the prompt of each non-assistant turn, what opens and closes an
    assistant's response, and the same layout as a Jinja chat template."""

    name: str
    render_prompt: Callable[[dict], str]
    template: str
    generation_prompt: str = ""  # untrained text before each response (the template's add_generation_prompt)
    response_prefix: str = ""  # trained text before each response, e.g. the space after "Answer:"
    end_of_turn: str | None = None  # trained after each response; None: the tokenizer's EOS
    after_turn: str = ""  # untrained text after the end token
    special_tokens: tuple[str, ...] = ()  # added to the tokenizer (and the embeddings) when missing

    def end_token(self, tokenizer) -> str:
        return self.end_of_turn or tokenizer.eos_token

    def segments(self, messages: Sequence[dict], end_token: str) -> list[Segment]:
        pieces: list[Segment] = []
        for message in messages:
            if message["role"] == "assistant":
                pieces += [Segment(self.generation_prompt, False), Segment(self.response_prefix + message["content"], True),
                           Segment(end_token, True), Segment(self.after_turn, False)]
            else:
                pieces.append(Segment(self.render_prompt(message), False))
        return _merge([p for p in pieces if p.text])

    def prompt_text(self, messages: Sequence[dict], end_token: str) -> str:
        """The text a model is given to write the next response: what the template renders with
        add_generation_prompt."""
        return "".join(s.text for s in self.segments(messages, end_token)) + self.generation_prompt


def _merge(segments: list[Segment]) -> list[Segment]:
    """Join neighbours of the same kind, so a prompt that spans several turns is tokenized as one string, as
    it is when the template renders it at inference."""
    merged: list[Segment] = []
    for segment in segments:
        if merged and merged[-1].trained == segment.trained:
            merged[-1] = Segment(merged[-1].text + segment.text, segment.trained)
        else:
            merged.append(segment)
    return merged


STYLES = {
    "alpaca": PromptStyle("alpaca", _alpaca_prompt, ALPACA_TEMPLATE),
    "chat": PromptStyle("chat", _chat_prompt, CHAT_TEMPLATE, generation_prompt="<|assistant|>\n", end_of_turn=END_OF_TURN,
                        after_turn="\n", special_tokens=CHAT_TOKENS),
    "qa": PromptStyle("qa", _qa_prompt, QA_TEMPLATE, response_prefix=" "),
    "plain": PromptStyle("plain", _plain_prompt, PLAIN_TEMPLATE),
}
