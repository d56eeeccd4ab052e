"""LLaVA's language model as a standard causal-LM directory.

The paper's LLM is the Mistral-7B inside LLaVA-v1.6-Mistral-7B. The hub holds it only as a
`LlavaNextForConditionalGeneration` checkpoint (`llava-hf/llava-v1.6-mistral-7b-hf`), which
`AutoModelForCausalLM` does not load. `extract_language_model` writes its language model as a
directory that `AutoModelForCausalLM.from_pretrained` does load (config.json of the text model,
safetensors shards, generation config, tokenizer with a chat template) and drops what DaMO does
not use: LLaVA's CLIP vision tower, its multimodal projector and its `image_newline` vector.

Tensors are streamed shard by shard from the memory-mapped safetensors files and renamed,
never building the 7B model: at most one input shard's language-model tensors are in memory.
Both key layouts are read: the hub's original one (`language_model.model.*`,
`language_model.lm_head.*`) and the one transformers >= 4.52 saves (`model.language_model.*`,
`lm_head.*`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

# (prefix in the LlavaNext checkpoint, prefix in the causal LM)
LANGUAGE_MODEL_PREFIXES = (
    ("model.language_model.", "model."),
    ("language_model.model.", "model."),
    ("language_model.lm_head.", "lm_head."),
    ("lm_head.", "lm_head."),
)
# What DaMO does not need, by the name the report gives it.
DROPPED_PREFIXES = {
    "vision_tower": ("model.vision_tower.", "vision_tower."),
    "multi_modal_projector": ("model.multi_modal_projector.", "multi_modal_projector."),
    "image_newline": ("model.image_newline", "image_newline"),
}
SOURCE_MODEL_TYPES = ("llava_next", "llava")
# LLaVA-v1.6-Mistral's conversation format (LLaVA's `mistral_instruct`, Mistral-Instruct's own):
# "[INST] question [/INST] answer</s>". The llava-hf checkpoint's template lives with its
# processor and reads list-of-parts messages; DaMO's prompts are plain strings.
LLAVA_MISTRAL_CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{ message['content'] + '\n\n' }}"
    "{%- elif message['role'] == 'user' -%}{{ '[INST] ' + message['content'] + ' [/INST]' }}"
    "{%- else -%}{{ ' ' + message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
)
SHARD_PATTERN = "model-{index:05d}-of-{total:05d}.safetensors"
INDEX_FILE = "model.safetensors.index.json"


class LlavaConversionError(ValueError):
    """The source is not a LlavaNext checkpoint this converter can read."""


@dataclass
class ExtractionReport:
    """What `extract_language_model` wrote and what it left out."""

    out_dir: Path
    model_type: str
    kept_tensors: int = 0
    kept_parameters: int = 0
    dropped_parameters: dict[str, int] = field(default_factory=dict)
    chat_template: str = ""  # "tokenizer" (its own) or "llava-mistral" (written here)
    files: list[str] = field(default_factory=list)


def rename_key(key: str) -> str | None:
    """The causal-LM name of a LlavaNext tensor, None when it is dropped; raises if unknown."""
    for source, target in LANGUAGE_MODEL_PREFIXES:
        if key.startswith(source):
            return target + key[len(source) :]
    for prefixes in DROPPED_PREFIXES.values():
        if key.startswith(prefixes):
            return None
    raise LlavaConversionError(f"unexpected tensor {key!r}: neither language model nor vision")


def dropped_group(key: str) -> str:
    return next(name for name, prefixes in DROPPED_PREFIXES.items() if key.startswith(prefixes))


def _weight_files(source: Path) -> list[Path]:
    index = source / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        return [source / name for name in sorted(set(weight_map.values()))]
    single = source / "model.safetensors"
    if single.is_file():
        return [single]
    raise LlavaConversionError(
        f"{source}: no model.safetensors or {INDEX_FILE} (only safetensors checkpoints are read)"
    )


def _text_config(source: Path):
    from transformers import AutoConfig
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    config_path = source / "config.json"
    if not config_path.is_file():
        raise LlavaConversionError(f"{source}: no config.json (is it a LlavaNext checkpoint?)")
    model_type = json.loads(config_path.read_text()).get("model_type")
    if model_type not in SOURCE_MODEL_TYPES:
        raise LlavaConversionError(
            f"{source}: model_type {model_type!r}; expected one of {SOURCE_MODEL_TYPES}"
        )
    config = AutoConfig.from_pretrained(source)
    text_config = config.text_config
    text_config.architectures = [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text_config.model_type]]
    if getattr(text_config, "dtype", None) is None:
        text_config.dtype = getattr(config, "dtype", None)
    return model_type, text_config


def renders_plain_messages(tokenizer) -> bool:
    """Whether the tokenizer's chat template renders DaMO's string-content conversations."""
    if not tokenizer.chat_template:
        return False
    conversation = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
    ]
    try:
        text = tokenizer.apply_chat_template(conversation, tokenize=False)
    except Exception:  # templates raise freely (jinja errors, raise_exception)
        return False
    return "hello" in text and "hi" in text


def _check_names(text_config, written: set[str]) -> None:
    """The written tensors are exactly the causal LM's parameters (tied heads may be absent)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        expected = set(AutoModelForCausalLM.from_config(text_config).state_dict())
    missing = expected - written
    if text_config.tie_word_embeddings:
        missing.discard("lm_head.weight")
    unexpected = written - expected
    if missing or unexpected:
        raise LlavaConversionError(
            f"extracted tensors do not fit {text_config.architectures[0]}: "
            f"missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]}"
        )


def extract_language_model(source: str | Path, out_dir: str | Path) -> ExtractionReport:
    """Write the language model of the LlavaNext checkpoint `source` into `out_dir`."""
    from transformers import AutoTokenizer, GenerationConfig

    source, out = Path(source), Path(out_dir)
    model_type, text_config = _text_config(source)
    files = _weight_files(source)
    out.mkdir(parents=True, exist_ok=True)
    report = ExtractionReport(out_dir=out, model_type=model_type)

    # first pass, names and shapes only: what is kept, where, and what is dropped
    kept_keys: dict[Path, list[str]] = {}
    for path in files:
        with safe_open(path, framework="pt") as reader:
            for key in reader.keys():  # noqa: SIM118 (a safetensors reader, not a dict)
                if rename_key(key) is not None:
                    kept_keys.setdefault(path, []).append(key)
                    continue
                group = dropped_group(key)
                count = torch.Size(reader.get_slice(key).get_shape()).numel()
                report.dropped_parameters[group] = report.dropped_parameters.get(group, 0) + count
    # second pass: one output shard per input shard that holds language-model tensors
    weight_map: dict[str, str] = {}
    total_bytes = 0
    for index, (path, keys) in enumerate(kept_keys.items(), start=1):
        name = (
            "model.safetensors"
            if len(kept_keys) == 1
            else SHARD_PATTERN.format(index=index, total=len(kept_keys))
        )
        with safe_open(path, framework="pt") as reader:
            tensors = {rename_key(key): reader.get_tensor(key) for key in keys}
        save_file(tensors, out / name, metadata={"format": "pt"})
        for target, tensor in tensors.items():
            weight_map[target] = name
            report.kept_tensors += 1
            report.kept_parameters += tensor.numel()
            total_bytes += tensor.numel() * tensor.element_size()
        report.files.append(name)
        del tensors
    _check_names(text_config, set(weight_map))
    if len(kept_keys) > 1:
        weights = dict(sorted(weight_map.items()))
        index = {"metadata": {"total_size": total_bytes}, "weight_map": weights}
        (out / INDEX_FILE).write_text(json.dumps(index, indent=2))
        report.files.append(INDEX_FILE)

    text_config.save_pretrained(out)
    try:
        generation = GenerationConfig.from_pretrained(source)
    except OSError:
        generation = GenerationConfig.from_model_config(text_config)
    generation.save_pretrained(out)

    tokenizer = AutoTokenizer.from_pretrained(source)
    if renders_plain_messages(tokenizer):
        report.chat_template = "tokenizer"
    else:
        tokenizer.chat_template = LLAVA_MISTRAL_CHAT_TEMPLATE
        report.chat_template = "llava-mistral"
    tokenizer.save_pretrained(out)
    report.files.extend(["config.json", "generation_config.json", "tokenizer"])
    return report
