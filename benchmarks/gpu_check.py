"""GPU check: the paper preset at full size with random weights, on one large GPU, in <= 10 min.

The model is `DamoModel.from_config(paper, pretrained=False, device=...)`: every backbone built
from its `arch` fields alone, so nothing is downloaded. It is held as the stage-3 training loop
(damo/train/loop.py) holds it: the frozen LLM in bfloat16 (`model.llm.dtype`), the video
pathway, heads, text encoder and LoRA adapter in float32, compute under bf16 autocast. LoRA is
on (r=32) and so is the LLM's gradient checkpointing. Inputs are random encoder features of the
paper's shapes (24 frames x 257 EVA tokens x 1024, 8 audio segments x 1500 Whisper tokens x
768) and a grounded-QA-sized token sequence (`<video>` x 32, a prompt, an answer).

With CUDA it runs `--steps` stage-3 optimiser steps (after one warm-up step), then one batched
greedy generation of exactly `--new-tokens` tokens per prompt, and reports the peak memory
(torch.cuda.max_memory_allocated), the median step time and the generated tokens per second.
A hard time cap (`--time-cap-s`, default 600) stops it, writing what was measured so far.

`--dry-run` builds the same model on the meta device (no memory, no GPU) and covers:
  - parameter counts (total, stage-3 trainable) and the weight bytes, as built and all-bf16;
  - the stage-3 forward and backward at the planned batch shapes, checking that every
    trainable parameter and nothing else gets a gradient of its shape. It is the model's own
    `forward(batch, 3)`, run on fake tensors (on meta): transformers reads the attention mask's
    values to decide whether it may skip it, which a plain meta tensor cannot answer, and skips
    those checks for fake tensors. Meta tensors run without autocast, so the pathway's
    activations are counted in float32 where the GPU keeps bf16;
  - an activation estimate: the bytes autograd saves for backward (parameters excluded) plus
    the inputs each checkpointed LLM layer keeps for its recomputation. It leaves out the
    transient peak of one layer's recomputation and backward, temporary buffers and allocator
    overhead, so the real peak is higher;
  - generation: HF `generate` reads token values to decide when to stop, so it cannot run on
    meta. The dry run runs the prefill forward and one cached decode step instead, and sizes
    the KV cache from the cache's own tensors.

Run on a GPU machine:   python benchmarks/gpu_check.py --out benchmarks/results_gpu_check.json
Shape and count check:  python benchmarks/gpu_check.py --dry-run
"""

from __future__ import annotations

import argparse
import json
import signal
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from damo.config import load_config
from damo.model.damo import DamoModel, random_video
from damo.model.llm import IGNORE_INDEX

STAGE = 3
# What makes this a stage-3 run at paper scale: LoRA is in the paper preset; checkpointing is
# what a 7B LLM with a batch of 8 needs.
OVERRIDES = ("model.llm.gradient_checkpointing=true",)
NO_CUDA_EXIT = 2
TIME_CAP_EXIT = 124


@dataclass(frozen=True)
class Plan:
    """The shapes of the check. Sequence = prefix + <video> x K + prompt rest + answer."""

    batch: int
    prompt_tokens: int  # text tokens of the prompt around the <video> tokens
    answer_tokens: int  # tokens the LM loss is taken on
    steps: int
    generation_batch: int
    new_tokens: int
    video_tokens: int  # K, the soft prompt length
    prefix_tokens: int = 4  # text before <video> (the chat template's opening)

    @property
    def train_sequence(self) -> int:
        return self.video_tokens + self.prompt_tokens + self.answer_tokens

    @property
    def generation_prompt(self) -> int:
        return self.video_tokens + self.prompt_tokens


class TimeCapExceeded(Exception):
    pass


def token_ids(model: DamoModel, plan: Plan, rows: int, answer: int, device) -> torch.Tensor:
    """(rows, K + prompt + answer) random ids, the K `<video>` tokens after a short prefix."""
    video_id = model.video_token_id  # the last id of a model built without a tokenizer
    length = plan.video_tokens + plan.prompt_tokens + answer
    ids = torch.randint(0, video_id, (rows, length), device=device)  # never `<video>` itself
    ids[:, plan.prefix_tokens : plan.prefix_tokens + plan.video_tokens] = video_id
    return ids


def stage3_batch(model: DamoModel, cfg, plan: Plan, device) -> dict[str, torch.Tensor]:
    """Random encoder features and a full-length, unpadded grounded-QA token sequence."""
    batch = random_video(cfg, plan.batch, device=device).as_batch()
    ids = token_ids(model, plan, plan.batch, plan.answer_tokens, device)  # (B, S)
    labels = torch.full_like(ids, IGNORE_INDEX)
    labels[:, -plan.answer_tokens :] = ids[:, -plan.answer_tokens :]  # loss on the answer only
    batch.update(input_ids=ids, attention_mask=torch.ones_like(ids), labels=labels)
    return batch


def shapes(batch: dict[str, torch.Tensor]) -> dict[str, list[int]]:
    return {name: list(tensor.shape) for name, tensor in batch.items()}


def parameter_report(model: DamoModel) -> dict[str, int]:
    """Counts and bytes of the model as built, after `set_stage(STAGE)`."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    total = sum(p.numel() for p in params)
    return {
        "total": total,
        "trainable": sum(p.numel() for p in trainable),
        "trainable_tensors": len(trainable),
        "weight_bytes_as_built": sum(p.numel() * p.element_size() for p in params),
        "weight_bytes_all_bf16": total * torch.finfo(torch.bfloat16).bits // 8,
        # AdamW keeps two moments per trainable parameter, in its dtype, and one gradient
        "grad_and_adam_bytes": 3 * sum(p.numel() * p.element_size() for p in trainable),
    }


class SavedForBackward(torch.autograd.graph.saved_tensors_hooks):
    """Bytes of the tensors autograd keeps for backward, parameters and their views excluded.

    Inside a checkpointed layer the checkpoint's own hooks take over, so what it does not keep
    is not seen here, as it is not kept on the GPU.
    """

    def __init__(self, model: torch.nn.Module, fake: FakeTensorMode):
        # inside fake mode an op sees the (memoised) fake twin of each meta parameter
        self.parameter_ids = {id(p) for p in model.parameters()} | {
            id(fake.from_tensor(p)) for p in model.parameters()
        }
        self.kept: dict[int, int] = {}  # id of the storage-owning tensor -> bytes

        def pack(tensor):
            base = tensor if tensor._base is None else tensor._base
            if id(base) not in self.parameter_ids:
                self.kept[id(base)] = base.numel() * base.element_size()
            return tensor  # held by the graph: ids stay unique until backward

        super().__init__(pack, lambda tensor: tensor)

    @property
    def bytes(self) -> int:
        return sum(self.kept.values())


def checkpointed_layers(model: DamoModel) -> list[torch.nn.Module]:
    llm = model.llm.get_base_model()
    # transformers 5 renamed the flag; the older name warns
    on = getattr(llm, "is_activation_checkpointing", None)
    on = llm.is_gradient_checkpointing if on is None else on
    return list(llm.model.layers) if on else []


def checkpoint_input_bytes(model: DamoModel, run) -> tuple[int, object]:
    """Bytes of the tensors each checkpointed LLM layer is called with (what non-reentrant
    checkpointing keeps to recompute it; shared ones, like the rotary tables, once)."""
    parameter_ids = {id(p) for p in model.parameters()}
    kept: dict[int, int] = {}

    def record(_module, args, kwargs):
        for value in [*args, *kwargs.values()]:
            for tensor in value if isinstance(value, tuple) else (value,):
                if isinstance(tensor, torch.Tensor) and id(tensor) not in parameter_ids:
                    kept[id(tensor)] = tensor.numel() * tensor.element_size()

    handles = [
        layer.register_forward_pre_hook(record, with_kwargs=True)
        for layer in checkpointed_layers(model)
    ]
    try:
        result = run()
    finally:
        for handle in handles:
            handle.remove()
    return sum(kept.values()), result


def dry_run(model: DamoModel, cfg, plan: Plan) -> dict:
    """Everything the meta device allows; see the module docstring for what that is."""
    # Fake tensors (on meta) tell transformers it is being traced, so it skips the checks that
    # read values (is the mask all ones? are sequences packed?): the stage-3 step below is the
    # model's own forward with the attention mask, as on the GPU.
    fake = FakeTensorMode(allow_non_fake_inputs=True)
    model.train()
    with fake:
        batch = stage3_batch(model, cfg, plan, "meta")

        def forward():
            saved = SavedForBackward(model, fake)
            with saved:
                loss = model(batch, STAGE)["loss"]
            return saved, loss

        checkpoint_bytes, (saved, loss) = checkpoint_input_bytes(model, forward)
        loss.backward()
    trainable = {n: p for n, p in model.named_parameters() if p.requires_grad}
    with_grad = [n for n, p in trainable.items() if p.grad is not None and p.grad.shape == p.shape]
    frozen_with_grad = [
        n for n, p in model.named_parameters() if not p.requires_grad and p.grad is not None
    ]
    model.zero_grad(set_to_none=True)

    # HF `generate` decides when to stop from token values, which no meta tensor has: run its
    # two kinds of forward instead, the prefill and one cached decode step.
    model.eval()
    with fake, torch.no_grad():
        prompt = token_ids(model, plan, plan.generation_batch, 0, "meta")  # (Bg, K + prompt)
        mask = torch.ones_like(prompt)
        video = random_video(cfg, plan.generation_batch, device="meta")
        prefill = model.llm(
            inputs_embeds=model.llm_inputs(video, prompt), attention_mask=mask, use_cache=True
        )
        cache = prefill.cache
        cache_bytes = sum(
            t.numel() * t.element_size()
            for layer in cache.layers
            for t in (layer.keys, layer.values)
        )
        next_token = prefill.logits[:, -1].argmax(dim=-1, keepdim=True)  # (Bg, 1)
        step = model.llm(
            input_ids=next_token,
            attention_mask=torch.cat([mask, torch.ones_like(next_token)], dim=1),
            cache=cache,
            use_cache=True,
        )
    per_token = cache_bytes // (plan.generation_batch * prompt.shape[1])
    return {
        "stage3": {
            "loss_shape": list(loss.shape),
            "trainable_tensors_with_grad": len(with_grad),
            "frozen_tensors_with_grad": len(frozen_with_grad),
            "saved_for_backward_bytes": saved.bytes,
            "checkpointed_layers": len(checkpointed_layers(model)),
            "checkpoint_input_bytes": checkpoint_bytes,
            "activation_estimate_bytes": saved.bytes + checkpoint_bytes,
        },
        "generation": {
            "prefill_logits_shape": list(prefill.logits.shape),
            "decode_step_logits_shape": list(step.logits.shape),
            "kv_cache_bytes_per_token_per_sequence": per_token,
            "kv_cache_bytes_at_full_length": per_token
            * plan.generation_batch
            * (plan.generation_prompt + plan.new_tokens),
        },
    }


def synchronized_seconds(fn) -> tuple[float, object]:
    torch.cuda.synchronize()
    started = time.perf_counter()
    result = fn()
    torch.cuda.synchronize()
    return time.perf_counter() - started, result


def train_steps(model: DamoModel, cfg, train_cfg, plan: Plan, results: dict) -> None:
    """Stage-3 steps as the training loop takes them (AdamW on the stage's parameter groups,
    bf16 autocast). The optimiser and batch are freed on return, before generation."""
    recipe = train_cfg.stages.stage3.optimizer
    optimizer = torch.optim.AdamW(
        model.parameter_groups(STAGE, recipe.lr, recipe.lr_scale),
        lr=recipe.lr,
        weight_decay=recipe.weight_decay,
        betas=recipe.betas,
    )
    batch = stage3_batch(model, cfg, plan, "cuda")
    model.train()

    def step():
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(batch, STAGE)["loss"]
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()

    train = results["stage3"] = {"step_s": [], "losses": []}
    for index in range(plan.steps + 1):  # the first one warms up (allocator, kernels)
        seconds, loss = synchronized_seconds(step)
        if index > 0:
            train["step_s"].append(seconds)
            train["losses"].append(loss)
            train["median_step_s"] = statistics.median(train["step_s"])
            train["train_tokens_per_s"] = plan.batch * plan.train_sequence / train["median_step_s"]
        train["peak_memory_bytes"] = torch.cuda.max_memory_allocated()


def gpu_run(model: DamoModel, cfg, train_cfg, plan: Plan, results: dict) -> None:
    """Stage-3 steps, then one batched greedy generation. Fills `results` as it goes, so a
    time cap leaves what was measured."""
    train_steps(model, cfg, train_cfg, plan, results)
    torch.cuda.empty_cache()
    model.eval()
    torch.cuda.reset_peak_memory_stats()
    video = random_video(cfg, plan.generation_batch, device="cuda")
    prompt = token_ids(model, plan, plan.generation_batch, 0, "cuda")  # (Bg, K + prompt)
    seconds, output = synchronized_seconds(
        lambda: model.generate_ids(
            video,
            prompt,
            torch.ones_like(prompt),
            max_new_tokens=plan.new_tokens,
            min_new_tokens=plan.new_tokens,  # random weights may say EOS at once: no early stop
            pad_token_id=0,
        )
    )
    generated = output.shape[0] * output.shape[1]
    results["generation"] = {
        "output_shape": list(output.shape),
        "seconds": seconds,
        "generated_tokens_per_s": generated / seconds,
        "peak_memory_bytes": torch.cuda.max_memory_allocated(),
    }


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description="The paper preset at full size with random weights: stage-3 steps (LoRA, "
        "gradient checkpointing) and a batched greedy generation on one GPU; --dry-run on the "
        "meta device.",
        epilog=__doc__.split("\n\n", 1)[1],
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dry-run", action="store_true", help="meta device: shapes and counts")
    parser.add_argument("--config", default="paper", help="named config or YAML (default paper)")
    parser.add_argument("--batch", type=int, help="stage-3 batch (default: the preset's)")
    parser.add_argument("--prompt-tokens", type=int, default=96, help="text tokens of a prompt")
    parser.add_argument("--answer-tokens", type=int, default=32, help="answer tokens (LM loss)")
    parser.add_argument("--steps", type=int, default=5, help="timed steps after one warm-up")
    parser.add_argument("--generation-batch", type=int, default=16)
    parser.add_argument("--new-tokens", type=int, default=64, help="generated per prompt")
    parser.add_argument("--time-cap-s", type=float, default=600.0, help="hard stop (seconds)")
    parser.add_argument(
        "--out", help="JSON results (the GPU run defaults to benchmarks/results_gpu_check.json)"
    )
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if not args.dry_run and not torch.cuda.is_available():
        print(
            "gpu_check: no CUDA device here; this check needs one large GPU (the paper preset's "
            "7B LLM). Use --dry-run for the meta-device shape and count check.",
            file=sys.stderr,
        )
        return NO_CUDA_EXIT
    started = time.perf_counter()
    full = load_config(args.config, overrides=list(OVERRIDES))
    cfg = full.model
    plan = Plan(
        batch=args.batch or full.train.stages.stage3.batch_size,
        prompt_tokens=args.prompt_tokens,
        answer_tokens=args.answer_tokens,
        steps=args.steps,
        generation_batch=args.generation_batch,
        new_tokens=args.new_tokens,
        video_tokens=cfg.bridge.queries,
    )
    device = "meta" if args.dry_run else "cuda"
    results: dict = {
        "mode": "dry-run (meta device)" if args.dry_run else "gpu",
        "config": args.config,
        "plan": asdict(plan),
        "device": torch.cuda.get_device_name() if device == "cuda" else "meta",
    }
    out = args.out or (None if args.dry_run else "benchmarks/results_gpu_check.json")

    def write() -> None:
        results["wall_s"] = time.perf_counter() - started
        text = json.dumps(results, indent=2)
        print(text)
        if out:
            Path(out).write_text(text + "\n")

    def over_time(_signum, _frame):
        raise TimeCapExceeded(f"stopped at the {args.time_cap_s:.0f} s time cap")

    signal.signal(signal.SIGALRM, over_time)
    signal.setitimer(signal.ITIMER_REAL, args.time_cap_s)
    try:
        torch.manual_seed(0)
        model = DamoModel.from_config(cfg, pretrained=False, device=device)
        model.set_stage(STAGE)
        results["build_s"] = time.perf_counter() - started
        results["parameters"] = parameter_report(model)
        results["planned_shapes"] = {
            "stage3_batch": shapes(stage3_batch(model, cfg, plan, "meta")),
            "generation_prompt_ids": [plan.generation_batch, plan.generation_prompt],
        }
        if args.dry_run:
            results.update(dry_run(model, cfg, plan))
        else:
            results["weights_memory_bytes"] = torch.cuda.memory_allocated()
            gpu_run(model, cfg, full.train, plan, results)
    except TimeCapExceeded as stop:
        results["stopped"] = str(stop)
        write()
        return TIME_CAP_EXIT
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    write()
    return 0


if __name__ == "__main__":
    sys.exit(main())
