"""The paper's backbones (EVA-CLIP ViT-L/14, the LLM of LLaVA-v1.6) on tiny random checkpoints of
the same classes: saved as the hub holds them, loaded or converted by the platform's own code."""

from __future__ import annotations

import json
import re
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import (
    AutoModelForCausalLM,
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    MistralConfig,
)
from typer.testing import CliRunner

from damo.cli import app
from damo.config import load_config
from damo.data.backbones import prepare_backbones, train_tokenizer
from damo.model.backbones import (
    FrozenEncoders,
    MissingBackboneError,
    load_vision,
    locate,
    vision_geometry,
)
from damo.model.damo import DamoModel, random_video
from damo.model.llava import LLAVA_MISTRAL_CHAT_TEMPLATE

pytestmark = pytest.mark.usefixtures("one_torch_thread")

EVA_TINY = {"img_size": 32, "patch_size": 8, "embed_dim": 32, "depth": 2, "num_heads": 2}
# deliberately not CLIP's values, so a CLIP (or default) preprocessing would show
EVA_PREPROCESSING = {"mean": (0.5, 0.5, 0.5), "std": (0.25, 0.25, 0.25), "crop_pct": 1.0}


def save_tiny_eva(directory):
    """A random EVA02-CLIP tower, with its CLIP projection head, saved as the hub's
    `timm/eva02_large_patch14_clip_224.merged2b` is (timm's save_for_hf: config.json +
    model.safetensors)."""
    import timm
    from timm.models import save_for_hf

    torch.manual_seed(0)
    model = timm.create_model(
        "eva02_large_patch14_clip_224",
        pretrained=False,
        num_classes=16,
        pretrained_cfg_overlay=EVA_PREPROCESSING,
        **EVA_TINY,
    ).eval()
    save_for_hf(model, directory, safe_serialization=True)
    return model


def eva_config(tiny_backbones, vision_dir, feature_layer=-1):
    cfg = load_config("tiny").model.with_backbones_at(str(tiny_backbones))
    vision = load_config("paper").model.vision.model_copy(
        update={"path": str(vision_dir), "arch": EVA_TINY, "feature_layer": feature_layer}
    )
    return cfg.model_copy(update={"vision": vision})


def test_eva_clip_loads_with_the_clip_feature_contract(tiny_backbones, tmp_path):
    reference = save_tiny_eva(tmp_path / "vision")
    cfg = eva_config(tiny_backbones, tmp_path / "vision")
    encoders = FrozenEncoders.from_config(cfg)  # geometry checked against arch on load
    frames = [np.full((48, 64, 3), value, dtype=np.uint8) for value in (0, 128, 255)]
    frames.append(np.full((3, 48, 64), 64, dtype=np.uint8))  # extraction hands over (3, H, W)
    pixels = encoders.preprocess_frames(frames)
    assert pixels.shape == (4, 3, 32, 32)
    # the backbone's own mean/std: (v / 255 - 0.5) / 0.25 for a flat grey frame
    expected = torch.tensor([(v / 255 - 0.5) / 0.25 for v in (0, 128, 255, 64)])
    torch.testing.assert_close(pixels.mean(dim=(1, 2, 3)), expected, atol=1e-5, rtol=0)
    features = encoders.encode_frames(pixels)
    dim, patches = vision_geometry(cfg.vision)
    assert (dim, patches) == (32, 16)
    assert features.shape == (4, 1 + patches, dim)  # CLS, then the 4x4 patches
    assert not any(p.requires_grad for p in encoders.parameters())
    # the last layer's tokens before the final norm: timm's forward_features is them, normed
    with torch.no_grad():
        torch.testing.assert_close(
            reference.norm(features), reference.forward_features(pixels), atol=1e-5, rtol=1e-5
        )
        # feature_layer=1 is the first block's output, computed here by hand
        tokens, rope = reference._pos_embed(reference.patch_embed(pixels))
        first = reference.blocks[0](reference.norm_pre(tokens), rope=rope)
    tower = load_vision(eva_config(tiny_backbones, tmp_path / "vision", 1).vision, True, None)
    with torch.no_grad():
        torch.testing.assert_close(tower(pixels), first, atol=1e-5, rtol=1e-5)
    with pytest.raises(ValueError, match="feature_layer 3"):
        load_vision(eva_config(tiny_backbones, tmp_path / "vision", 3).vision, True, None)
    # the CLIP projection head is not part of the tower DaMO loads
    assert tower.model.num_classes == 0


def test_openai_clip_stays_a_config_choice_with_its_own_feature_layer(tiny_backbones):
    cfg = load_config("tiny", ["model.vision.feature_layer=-2"]).model
    cfg = cfg.with_backbones_at(str(tiny_backbones))
    assert cfg.vision.library == "transformers"
    tower = load_vision(cfg.vision, True, None)
    pixels = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        hidden = tower.model(pixel_values=pixels, output_hidden_states=True).hidden_states
        torch.testing.assert_close(tower(pixels), hidden[-2])
        assert not torch.allclose(tower(pixels), hidden[-1])


def tiny_llava(vocab_size: int = 300) -> LlavaNextForConditionalGeneration:
    text = MistralConfig(
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=vocab_size,
        max_position_embeddings=128,
        tie_word_embeddings=False,
    )
    vision = CLIPVisionConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        image_size=28,
        patch_size=14,
        projection_dim=16,
    )
    config = LlavaNextConfig(
        text_config=text,
        vision_config=vision,
        image_token_index=vocab_size - 1,
        image_grid_pinpoints=[[28, 28]],
    )
    torch.manual_seed(0)
    return LlavaNextForConditionalGeneration(config).eval()


def to_current_layout(directory):
    """Rewrite a checkpoint's tensor names into the layout transformers >= 4.52 uses in memory
    (`model.language_model.*`); transformers saves the hub's original names."""
    renames = (
        ("language_model.model.", "model.language_model."),
        ("language_model.lm_head.", "lm_head."),
        ("vision_tower.", "model.vision_tower."),
        ("multi_modal_projector.", "model.multi_modal_projector."),
        ("image_newline", "model.image_newline"),
    )
    for path in directory.glob("*.safetensors"):
        tensors = load_file(path)
        renamed = {}
        for key, tensor in tensors.items():
            new = next((t + key[len(s) :] for s, t in renames if key.startswith(s)), key)
            renamed[new] = tensor
        save_file(renamed, path, metadata={"format": "pt"})
    index = directory / "model.safetensors.index.json"
    if index.exists():
        data = json.loads(index.read_text())
        data["weight_map"] = {
            next((t + k[len(s) :] for s, t in renames if k.startswith(s)), k): v
            for k, v in data["weight_map"].items()
        }
        index.write_text(json.dumps(data))


def save_llava_checkpoint(directory, layout: str, sharded: bool):
    llava = tiny_llava()
    llava.save_pretrained(directory, max_shard_size="40KB" if sharded else "5GB")
    if layout == "current":
        to_current_layout(directory)
    corpus = ["a red square appears from 1.0 to 2.5 seconds.", "a low tone is heard."] * 20
    tokenizer = train_tokenizer(corpus, 280, "<video>")
    tokenizer.chat_template = None  # llava-hf keeps its template with the processor
    tokenizer.save_pretrained(directory)
    return llava, tokenizer


def count(module) -> int:
    return sum(p.numel() for p in module.parameters())


@pytest.mark.parametrize(("layout", "sharded"), [("original", True), ("current", False)])
def test_prepare_extracts_the_llava_language_model(tmp_path, layout, sharded):
    llava, tokenizer = save_llava_checkpoint(tmp_path / "llava", layout, sharded)
    if sharded:
        assert len(list((tmp_path / "llava").glob("model-*.safetensors"))) > 1
    root = tmp_path / "backbones"
    result = CliRunner().invoke(
        app,
        ["backbones", "prepare", "--llava", str(tmp_path / "llava"), "--out", str(root)],
        terminal_width=200,
    )
    assert result.exit_code == 0, result.output
    dropped = {
        "vision_tower": count(llava.model.vision_tower),
        "multi_modal_projector": count(llava.model.multi_modal_projector),
    }
    for name, value in dropped.items():
        assert f"{name} ({value:,} parameters)" in result.output, result.output
    assert "chat template: llava-mistral" in result.output

    llm_dir = root / "llm"
    names = set()
    for path in llm_dir.glob("*.safetensors"):
        with safe_open(path, framework="pt") as reader:
            names.update(reader.keys())  # noqa: SIM118
    assert names and all(n.startswith(("model.", "lm_head.")) for n in names)
    assert (llm_dir / "model.safetensors.index.json").exists() == sharded
    llm = AutoModelForCausalLM.from_pretrained(llm_dir).eval()
    assert type(llm).__name__ == "MistralForCausalLM"
    assert count(llm) == count(llava.model.language_model) + count(llava.lm_head)
    input_ids = torch.randint(0, 299, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = llava(input_ids=input_ids).logits
        torch.testing.assert_close(llm(input_ids=input_ids).logits, expected, atol=1e-5, rtol=0)

    loaded = AutoTokenizer.from_pretrained(llm_dir)
    assert loaded.get_vocab() == tokenizer.get_vocab()
    text = "a red square appears from 1.0 to 2.5 seconds."
    assert loaded(text)["input_ids"] == tokenizer(text)["input_ids"]
    assert loaded.chat_template == LLAVA_MISTRAL_CHAT_TEMPLATE
    conversation = [
        {"role": "user", "content": "<video>\nwhen?"},
        {"role": "assistant", "content": "from 1.0 to 2.5 seconds."},
    ]
    rendered = loaded.apply_chat_template(conversation, tokenize=False)
    assert rendered == "<s>[INST] <video>\nwhen? [/INST] from 1.0 to 2.5 seconds.<|end|>"


def test_prepare_writes_the_backbone_layout_to_s3_and_the_model_loads_it(
    tiny_backbones, s3_storage, tmp_path
):
    llava, _ = save_llava_checkpoint(tmp_path / "llava", "original", sharded=False)
    root = "s3://damo-test/paper-backbones"
    messages = []
    reports = prepare_backbones(
        root,
        {"llm": str(tmp_path / "llava"), "text_encoder": str(tiny_backbones / "text_encoder")},
        storage=s3_storage,
        log=messages.append,
    )
    assert reports["llm"].dropped_parameters["vision_tower"] == count(llava.model.vision_tower)
    assert any("llm: written to s3://damo-test/paper-backbones/llm" in m for m in messages)
    cache = tmp_path / "cache"

    def resolve(uri):
        return s3_storage.fetch_dir(uri, cache_root=cache)

    # the tiny preset's LLM and text encoder from the S3 layout: the LLM is the extracted one
    cfg = load_config("tiny").model.with_backbones_at(root)
    model = DamoModel.from_config(cfg, resolve=resolve)
    assert type(model.llm.base_model.model).__name__ == "MistralForCausalLM"
    batch = model.prompt_builder([[{"role": "user", "content": "when?"}]])
    assert batch["input_ids"][0, 0] == model.tokenizer.bos_token_id  # the LLaVA template


def test_missing_weights_fail_early_with_the_fetch_command(tiny_backbones, tmp_path, monkeypatch):
    cfg = load_config("paper").model.with_backbones_at(str(tmp_path / "paper"))

    def must_not_load(*args, **kwargs):
        raise AssertionError("a backbone was loaded before the missing one was reported")

    monkeypatch.setattr("damo.model.damo.load_llm", must_not_load)
    with pytest.raises(MissingBackboneError) as caught:
        DamoModel.from_config(cfg)
    message = str(caught.value)
    download = ".damo/downloads/llava-v1.6-mistral-7b-hf"
    assert "model.llm (llava-hf/llava-v1.6-mistral-7b-hf)" in message
    assert str(tmp_path / "paper" / "llm") in message
    assert f"`hf download llava-hf/llava-v1.6-mistral-7b-hf --local-dir {download}`" in message
    assert f"`damo backbones prepare --llava {download} --out {tmp_path / 'paper'}`" in message
    # no chained traceback from deep inside a library
    assert caught.value.__cause__ is None
    assert caught.value.__context__ is None or caught.value.__suppress_context__

    # the LLM is there, the text encoder is not: reported before the LLM loads
    tiny = load_config("tiny").model.with_backbones_at(str(tiny_backbones))
    text_encoder = cfg.text_encoder.model_copy(update={"path": str(tmp_path / "nowhere")})
    with pytest.raises(MissingBackboneError, match="model.text_encoder") as caught:
        DamoModel.from_config(tiny.model_copy(update={"text_encoder": text_encoder}))
    expected = f"`hf download google-bert/bert-base-uncased --local-dir {tmp_path / 'nowhere'}`"
    assert expected in str(caught.value)

    # an S3 layout: download, then `damo backbones prepare` uploads
    vision = cfg.vision.model_copy(update={"path": "s3://damo-test/none/vision"})

    def not_found(uri):
        error = OSError(f"{uri}: not_found")
        error.reason = "not_found"  # what damo.storage.StorageError carries
        raise error

    with pytest.raises(MissingBackboneError) as caught:
        FrozenEncoders.from_config(cfg.model_copy(update={"vision": vision}), resolve=not_found)
    assert (
        "`hf download timm/eva02_large_patch14_clip_224.merged2b --local-dir "
        ".damo/downloads/eva02_large_patch14_clip_224.merged2b`, then put it in place with "
        "`damo backbones prepare --vision .damo/downloads/eva02_large_patch14_clip_224.merged2b "
        "--out s3://damo-test/none`" in str(caught.value)
    )

    # a hub name that is not in the offline cache
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)
    audio = cfg.audio.model_copy(update={"path": "openai/whisper-small"})
    with pytest.raises(MissingBackboneError, match="hub cache"):
        locate("audio", audio, None)


def test_extraction_checks_the_encoders_before_starting_workers(tmp_path):
    from damo.data.extract import extract_features
    from damo.storage import Storage

    cfg = load_config("paper", [f"storage.root={tmp_path}"])
    vision = cfg.model.vision.model_copy(update={"path": str(tmp_path / "vision")})
    cfg = cfg.model_copy(update={"model": cfg.model.model_copy(update={"vision": vision})})
    with pytest.raises(MissingBackboneError, match="model.vision .*hf download timm/eva02"):
        extract_features(["a.mp4"], str(tmp_path / "out"), cfg, storage=Storage())
    assert not (tmp_path / "out").exists()


def test_cli_reports_missing_weights_in_one_line(tmp_path):
    result = CliRunner().invoke(
        app, ["backbones", "prepare", "--llava", str(tmp_path / "none"), "--out", str(tmp_path)]
    )
    assert result.exit_code == 2 and "Traceback" not in result.output
    assert "not_found" in result.output
    result = CliRunner().invoke(app, ["backbones", "prepare", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "nothing to prepare" in result.output


def test_gradient_checkpointing_switches_keep_the_gradients():
    """With the switches on, every LLM and Fuseformer layer runs twice per step (forward, and
    again in the backward pass) and the gradients are those of the plain run."""

    def step(checkpointing: bool) -> tuple[dict[str, torch.Tensor], dict[str, int], DamoModel]:
        flag = str(checkpointing).lower()
        overrides = [
            f"model.llm.gradient_checkpointing={flag}",
            f"model.fuseformer.gradient_checkpointing={flag}",
            # the paper's stage-3 set: the Fuseformer trains, so the backward pass reaches it
            "model.stages.stage3.trainable=[bridge,fuseformer,lora]",
        ]
        cfg = load_config("tiny", overrides).model
        torch.manual_seed(0)
        model = DamoModel.from_config(cfg, pretrained=False).train()
        for name, param in model.llm.named_parameters():  # a non-trivial adapter
            if "lora_B" in name:
                torch.nn.init.normal_(param, std=0.05, generator=torch.Generator().manual_seed(1))
        model.set_stage(3)
        calls = {"llm": 0, "fuseformer": 0}

        def counting(part, forward):  # forward hooks do not fire on a recompute; forward does
            def wrapped(*args, **kwargs):
                calls[part] += 1
                return forward(*args, **kwargs)

            return wrapped

        for layer in model.llm.base_model.model.model.layers:  # HF checkpoints inside forward
            layer.mlp.forward = counting("llm", layer.mlp.forward)
        for layer in model.pathway.fuseformer.layers:
            layer.forward = counting("fuseformer", layer.forward)
        video = random_video(cfg, 2, generator=torch.Generator().manual_seed(0))
        k = cfg.bridge.queries
        text = torch.randint(0, 200, (2, 6), generator=torch.Generator().manual_seed(2))
        input_ids = torch.cat([torch.full((2, k), model.video_token_id), text], dim=1)
        labels = torch.cat([torch.full((2, k), -100), text], dim=1)
        batch = {**video.as_batch(), "input_ids": input_ids, "labels": labels}
        batch["attention_mask"] = torch.ones_like(input_ids)
        if model.reads_question:  # no text tokenizer without pretrained weights: any ids
            batch["question_input_ids"] = torch.randint(0, 200, (2, 5))
            batch["question_attention_mask"] = torch.ones(2, 5, dtype=torch.long)
        model(batch, stage=3)["loss"].backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
        return grads, calls, model

    tiny = load_config("tiny").model
    layers = {"llm": tiny.llm.arch["num_hidden_layers"], "fuseformer": tiny.fuseformer.depth}
    plain, plain_calls, _ = step(False)
    checkpointed, checkpointed_calls, model = step(True)
    assert plain_calls == layers
    assert checkpointed_calls == {part: 2 * count for part, count in layers.items()}
    assert model.llm.base_model.model.is_activation_checkpointing
    assert plain.keys() == checkpointed.keys() and any("lora_" in n for n in plain)
    for name in plain:
        torch.testing.assert_close(checkpointed[name], plain[name], atol=1e-6, rtol=1e-5)


MEMORY_PROBE = r"""
import json, sys, threading, time
import torch
from damo.config.model import LLMConfig
from damo.model.backbones import load_llm

def anon_kib():
    with open("/proc/self/status") as status:
        return next(int(line.split()[1]) for line in status if line.startswith("RssAnon"))

peak = [0]
done = threading.Event()

def watch():
    while not done.is_set():
        peak[0] = max(peak[0], anon_kib())
        time.sleep(0.002)

mode, path = sys.argv[1], sys.argv[2]
cfg = LLMConfig(path=path, model_type="mistral", hub_id=None, dtype="bfloat16")
base = anon_kib()
threading.Thread(target=watch, daemon=True).start()
if mode == "platform":
    model = load_llm(cfg, True, None, torch.bfloat16)
else:  # the naive way: build at full precision, then load the weights into it
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM
    model = AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(path))
    model.load_state_dict(load_file(f"{path}/model.safetensors"), strict=False)
    model = model.to(torch.bfloat16)
time.sleep(0.05)
done.set()
dtype = next(model.parameters()).dtype
print(json.dumps({"peak_mib": (max(peak[0], anon_kib()) - base) / 1024, "dtype": str(dtype)}))
"""


@pytest.mark.slow
def test_llm_loads_straight_into_bf16_without_a_second_copy(tmp_path):
    """Peak anonymous memory while loading a float32 checkpoint as bfloat16.

    The file is memory-mapped (page cache, not anonymous memory), so loading it straight into
    bfloat16 needs one bf16 copy: S/2 for a float32 file of S bytes. Any second copy (a random
    float32 init, or the state dict read into memory) adds at least another S/2. The bound,
    0.75 S, sits halfway; the naive path is measured too, to show the probe sees a copy.
    Measured on a 30M-parameter model (S = 115 MiB): 59 MiB loading the platform's way,
    130 MiB the naive way.
    """
    config = MistralConfig(
        hidden_size=512,
        intermediate_size=1536,
        num_hidden_layers=4,
        num_attention_heads=8,
        num_key_value_heads=8,
        vocab_size=16000,
        tie_word_embeddings=False,
    )
    with torch.device("meta"):
        size_mib = sum(p.numel() for p in AutoModelForCausalLM.from_config(config).parameters())
    size_mib = size_mib * 4 / 2**20  # float32 file
    torch.manual_seed(0)
    AutoModelForCausalLM.from_config(config).save_pretrained(tmp_path / "llm")
    peaks = {}
    for mode in ("platform", "naive"):
        out = subprocess.run(
            [sys.executable, "-c", MEMORY_PROBE, mode, str(tmp_path / "llm")],
            capture_output=True,
            text=True,
            check=True,
            timeout=300,
        ).stdout
        result = json.loads(re.findall(r"^\{.*\}$", out, re.MULTILINE)[-1])
        assert result["dtype"] == "torch.bfloat16"
        peaks[mode] = result["peak_mib"]
    assert peaks["platform"] < 0.75 * size_mib, (peaks, size_mib)
    assert peaks["naive"] > 0.75 * size_mib, (peaks, size_mib)
