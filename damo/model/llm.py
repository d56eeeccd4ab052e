"""The frozen LLM side: chat prompts with a `<video>` placeholder, the soft-prompt splice, LoRA.

A conversation is a list of {"role": "user" | "assistant", "content": str}. The first user turn
carries the `<video>` placeholder (added in front of its text when absent, or after it with
`placement="after"`). The prompt builder renders it with the tokenizer's chat template,
expands the placeholder to K copies of the `<video>` token (K = soft prompt length), and masks
everything but the assistant turns out of the labels.
`splice_video` then overwrites those K embeddings with the soft prompt in one masked_scatter.
"""

from __future__ import annotations

import warnings

import peft
import torch
from torch import Tensor, nn

from damo.config.model import LoraConfig

IGNORE_INDEX = -100  # what HF's cross entropy skips


def splice_video(
    inputs_embeds: Tensor, input_ids: Tensor, video_token_id: int, soft_prompt: Tensor
) -> Tensor:
    """Put each sample's soft prompt where its `<video>` tokens are; text stays untouched.

    inputs_embeds (B, S, H), input_ids (B, S), soft_prompt (B, K, H); every row holds exactly K
    video tokens. masked_scatter fills masked positions in row-major order, which is sample 0's
    K tokens, then sample 1's, ...: exactly the flattened soft prompt.
    """
    video_positions = input_ids == video_token_id  # (B, S)
    if video_positions.device.type != "meta":
        counts = video_positions.sum(dim=1)  # (B,)
        if not bool((counts == soft_prompt.shape[1]).all()):
            raise ValueError(
                f"each sample needs exactly {soft_prompt.shape[1]} <video> tokens "
                f"(the soft prompt length), found {counts.tolist()}"
            )
    mask = video_positions[..., None].expand_as(inputs_embeds)  # (B, S, H)
    return inputs_embeds.masked_scatter(mask, soft_prompt.to(inputs_embeds.dtype))


def position_ids_from_mask(attention_mask: Tensor) -> Tensor:
    """Positions that skip left padding, so a sample reads the same whichever side is padded."""
    return (attention_mask.long().cumsum(dim=-1) - 1).clamp(min=0)  # (B, S)


def add_lora(llm: nn.Module, cfg: LoraConfig) -> peft.PeftModel:
    """Wrap the frozen LLM with a LoRA adapter (peft). Only the adapter can ever train."""
    llm.requires_grad_(False)
    lora = peft.LoraConfig(
        r=cfg.r,
        lora_alpha=cfg.alpha,
        lora_dropout=cfg.dropout,
        target_modules=list(cfg.target_modules),
        task_type="CAUSAL_LM",
    )
    with warnings.catch_warnings():  # peft calls a transformers API deprecated in v5
        warnings.filterwarnings("ignore", category=FutureWarning)
        return peft.get_peft_model(llm, lora)


class PromptBuilder:
    """Chat conversations -> input_ids / attention_mask / labels for the DaMO LLM."""

    def __init__(
        self, tokenizer, video_token: str, num_video_tokens: int, placement: str = "before"
    ):
        if placement not in ("before", "after"):
            raise ValueError(f"placement must be 'before' or 'after', got {placement!r}")
        self.tokenizer = tokenizer
        self.video_token = video_token
        self.num_video_tokens = num_video_tokens
        self.placement = placement
        self.video_token_id = tokenizer.convert_tokens_to_ids(video_token)
        pad = tokenizer.pad_token_id
        self.pad_token_id = pad if pad is not None else tokenizer.eos_token_id

    def _with_placeholder(self, conversation: list[dict]) -> list[dict]:
        if any(self.video_token in turn["content"] for turn in conversation):
            return conversation
        first_user = next(i for i, turn in enumerate(conversation) if turn["role"] == "user")
        turn = conversation[first_user]
        text, video = turn["content"], self.video_token
        placed = {
            **turn,
            "content": f"{text}\n{video}" if self.placement == "after" else f"{video}\n{text}",
        }
        return [*conversation[:first_user], placed, *conversation[first_user + 1 :]]

    def _render(self, conversation: list[dict], add_generation_prompt: bool) -> str:
        text = self.tokenizer.apply_chat_template(
            conversation, tokenize=False, add_generation_prompt=add_generation_prompt
        )
        return text.replace(self.video_token, self.video_token * self.num_video_tokens)

    def _encode_one(self, conversation: list[dict], add_generation_prompt: bool):
        conversation = self._with_placeholder(conversation)
        text = self._render(conversation, add_generation_prompt)
        # Character spans of the assistant turns: what the model should learn to say. The
        # template renders prefixes of a conversation as prefixes of its text, so a turn spans
        # from "everything before it + the generation prompt" to "everything up to it".
        spans = []
        for index, turn in enumerate(conversation):
            if turn["role"] == "assistant":
                start = len(self._render(conversation[:index], add_generation_prompt=True))
                end = len(self._render(conversation[: index + 1], add_generation_prompt=False))
                spans.append((start, end))
        encoded = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        ids = encoded["input_ids"]
        # A token is an answer token when its characters overlap an assistant span (a token
        # like " green" may start on the space the template puts before the answer).
        labels = [
            token if any(begin < end and finish > start for start, end in spans) else IGNORE_INDEX
            for token, (begin, finish) in zip(ids, encoded["offset_mapping"], strict=True)
        ]
        return ids, labels

    def __call__(
        self,
        conversations: list[list[dict]],
        add_generation_prompt: bool = False,
        padding_side: str = "right",
    ) -> dict[str, Tensor]:
        encoded = [self._encode_one(c, add_generation_prompt) for c in conversations]
        length = max(len(ids) for ids, _ in encoded)
        input_ids = torch.full((len(encoded), length), self.pad_token_id, dtype=torch.long)
        labels = torch.full((len(encoded), length), IGNORE_INDEX, dtype=torch.long)
        attention_mask = torch.zeros((len(encoded), length), dtype=torch.long)
        for row, (ids, row_labels) in enumerate(encoded):
            span = slice(length - len(ids), length) if padding_side == "left" else slice(len(ids))
            input_ids[row, span] = torch.tensor(ids)
            labels[row, span] = torch.tensor(row_labels)
            attention_mask[row, span] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}

    def prompts(self, prompts: list[str]) -> dict[str, Tensor]:
        """Single-turn questions, left-padded and ending in the generation prompt."""
        conversations = [[{"role": "user", "content": prompt}] for prompt in prompts]
        return self(conversations, add_generation_prompt=True, padding_side="left")
