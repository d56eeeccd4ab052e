"""benchmarks/gpu_check.py: its meta-device dry run (what CI can run) and its refusal without CUDA.

The dry run builds the paper preset (7.5B parameters) on the meta device and runs the stage-3
step's forward and backward on fake tensors: about 40 s of CPU, no memory.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from damo.config import load_config
from damo.model.accounting import parameter_counts

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "gpu_check.py"


def load_script():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclass looks its module up while being defined
    spec.loader.exec_module(module)
    return module


@pytest.mark.slow
def test_dry_run_matches_the_accounting_and_trains_exactly_the_stage3_set(tmp_path):
    out = tmp_path / "dry.json"
    args = ["--dry-run", "--batch", "2", "--generation-batch", "3", "--new-tokens", "10"]
    assert load_script().main([*args, "--out", str(out)]) == 0
    report = json.loads(out.read_text())

    counts = parameter_counts(load_config("paper").model)
    frozen, components = counts["frozen"], counts["components"]
    # the DamoModel holds the text encoder and the LLM; the vision and audio encoders run at
    # extraction time and are not part of it
    total = frozen["text_encoder"] + frozen["llm"] + sum(components.values())
    params = report["parameters"]
    assert params["total"] == total
    assert params["trainable"] == counts["stages"]["stage3"]
    assert params["trainable"] == sum(components[c] for c in ("fuseformer", "bridge", "lora"))
    # as the training loop holds it: the frozen LLM in bf16, everything else in float32
    assert params["weight_bytes_as_built"] == 2 * frozen["llm"] + 4 * (total - frozen["llm"])
    assert params["weight_bytes_all_bf16"] == 2 * total
    assert params["grad_and_adam_bytes"] == 3 * 4 * params["trainable"]

    # the paper's shapes: 24 frames of CLS + 256 EVA patches, 8 segments of 30 s of Whisper
    plan, shapes = report["plan"], report["planned_shapes"]["stage3_batch"]
    assert shapes["visual"] == [2, 24, 257, 1024]
    assert shapes["audio"] == [2, 8, 1500, 768]
    sequence = plan["video_tokens"] + plan["prompt_tokens"] + plan["answer_tokens"]
    assert plan["video_tokens"] == 32
    assert shapes["input_ids"] == shapes["labels"] == [2, sequence]

    # backward reached every trainable tensor and nothing frozen
    stage3 = report["stage3"]
    assert stage3["trainable_tensors_with_grad"] == params["trainable_tensors"] > 0
    assert stage3["frozen_tensors_with_grad"] == 0
    # gradient checkpointing on: each of the 32 layers keeps at least its bf16 hidden states
    assert stage3["checkpointed_layers"] == 32
    assert stage3["checkpoint_input_bytes"] >= 32 * 2 * sequence * 4096 * 2
    # the features alone are saved for the pathway's first layers (float32 on meta)
    features = 4 * (2 * 24 * 257 * 1024 + 2 * 8 * 1500 * 768)
    assert stage3["saved_for_backward_bytes"] > features

    generation = report["generation"]
    prompt = plan["video_tokens"] + plan["prompt_tokens"]
    assert generation["prefill_logits_shape"] == [3, prompt, 32064]
    assert generation["decode_step_logits_shape"] == [3, 1, 32064]
    # Mistral-7B: keys and values, 32 layers x 8 KV heads x 128 dims, bf16
    per_token = 2 * 32 * 8 * 128 * 2
    assert generation["kv_cache_bytes_per_token_per_sequence"] == per_token
    assert generation["kv_cache_bytes_at_full_length"] == per_token * 3 * (prompt + 10)


def test_the_gpu_run_refuses_without_cuda(tmp_path):
    out = tmp_path / "results.json"
    # this checkout's damo first, whatever the environment has installed
    root = str(SCRIPT.parents[1])
    path = os.pathsep.join(filter(None, [root, os.environ.get("PYTHONPATH")]))
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": "", "HF_HUB_OFFLINE": "1", "PYTHONPATH": path}
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--out", str(out)],
        cwd=root,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2, result.stderr
    assert "no CUDA device" in result.stderr and "--dry-run" in result.stderr
    assert not out.exists()
