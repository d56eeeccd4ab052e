"""Checkpoints: bit-identical round trips, PEFT-format adapters, atomic writes, clear errors."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from damo.config import load_config
from damo.model import checkpoint as ckpt
from damo.model.checkpoint import CheckpointError, load_checkpoint, load_weights, save_checkpoint
from damo.model.damo import DamoModel, random_video

CONVERSATIONS = [
    [{"role": "user", "content": "what colour is it?"}, {"role": "assistant", "content": "red."}],
    [{"role": "user", "content": "when?"}, {"role": "assistant", "content": "from 1.0 to 2.5."}],
]


pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tiny_cfg(tiny_backbones):
    return load_config("tiny").model.with_backbones_at(str(tiny_backbones))


@pytest.fixture(scope="module")
def trained(tiny_cfg):
    """A tiny model whose DaMO weights and adapter differ from a fresh one's."""
    torch.manual_seed(0)
    model = DamoModel.from_config(tiny_cfg)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.startswith(("pathway.", "heads.")) or "lora_" in name:
                param.add_(torch.randn_like(param) * 0.05)
    return model.eval()


@pytest.fixture(scope="module")
def saved(trained, tmp_path_factory) -> Path:
    return save_checkpoint(trained, tmp_path_factory.mktemp("ckpt") / "stage3", stage=3)


def outputs(model: DamoModel) -> dict[str, torch.Tensor]:
    video = random_video(model.cfg, 2, generator=torch.Generator().manual_seed(7))
    batch = video.as_batch()
    batch.update(model.conversation_inputs(CONVERSATIONS))
    batch.update(model.tokenize_text(["a red square.", "a low tone."]))
    with torch.no_grad():
        return {
            "soft_prompt": model.soft_prompt(video),
            "lm": model(batch, 3)["loss"],
            "video_emb": model.embed_video(video),
            "vtg": model.heads.vtg.loss(
                model.pathway.query_states(video),
                batch["text_input_ids"],
                batch["text_attention_mask"],
            ),
        }


def test_checkpoint_layout_is_safetensors_json_and_peft(saved):
    names = {p.relative_to(saved).as_posix() for p in saved.rglob("*") if p.is_file()}
    assert {"config.json", "damo.safetensors", "adapter/adapter_config.json"} <= names
    assert "adapter/adapter_model.safetensors" in names
    assert not any(n.endswith((".bin", ".pt", ".pth", ".pkl")) for n in names)
    header = json.loads((saved / "config.json").read_text())
    assert header["stage"] == 3 and header["model"]["fuseformer"]["depth"] == 2
    weights = load_file(saved / "damo.safetensors")
    assert weights and all(k.startswith(("pathway.", "heads.")) for k in weights)
    assert not any(k.startswith(("llm.", "text_encoder.")) for k in weights)  # by reference only
    assert not list(saved.parent.glob(".*tmp*"))


def test_save_load_round_trip_is_bit_identical(trained, saved):
    loaded = load_checkpoint(saved).eval()
    before, after = outputs(trained), outputs(loaded)
    for key in before:
        assert torch.equal(before[key], after[key]), key
    video = random_video(trained.cfg, 2, generator=torch.Generator().manual_seed(3))
    prompts = ["what colour is the square?", "when?"]
    assert trained.generate(video, prompts, 8) == loaded.generate(video, prompts, 8)


def test_lora_adapter_loads_through_peft(trained, saved, tiny_cfg):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base = AutoModelForCausalLM.from_pretrained(tiny_cfg.llm.path)
    peft_model = PeftModel.from_pretrained(base, saved / "adapter").eval()
    ids = torch.randint(0, 200, (2, 12))
    with torch.no_grad():
        expected = trained.llm(input_ids=ids).logits
        got = peft_model(input_ids=ids).logits
    torch.testing.assert_close(got, expected, rtol=0, atol=0)
    with torch.no_grad(), peft_model.disable_adapter():
        without = peft_model(input_ids=ids).logits
    assert not torch.allclose(without, expected)  # the adapter is really in there


def test_saving_over_a_checkpoint_is_atomic(trained, saved, monkeypatch, tmp_path):
    target = tmp_path / "ck"
    save_checkpoint(trained, target, stage=1)
    before = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}

    def explode(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ckpt, "save_file", explode)
    with pytest.raises(OSError, match="disk full"):
        save_checkpoint(trained, target, stage=2)
    after = {p.name: p.read_bytes() for p in target.rglob("*") if p.is_file()}
    assert after == before  # the old checkpoint is untouched
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]  # no staging leftovers


def copy_checkpoint(src: Path, dst: Path) -> Path:
    import shutil

    return Path(shutil.copytree(src, dst))


def test_missing_files_raise_one_clear_error(trained, saved, tmp_path):
    for relative in ("damo.safetensors", "config.json", "adapter/adapter_model.safetensors"):
        broken = copy_checkpoint(saved, tmp_path / relative.replace("/", "_"))
        (broken / relative).unlink()
        with pytest.raises(CheckpointError, match=re.escape(str(broken / relative))):
            load_weights(trained, broken)


def test_corrupt_files_raise_one_clear_error(trained, saved, tmp_path):
    for relative in ("damo.safetensors", "adapter/adapter_model.safetensors"):
        broken = copy_checkpoint(saved, tmp_path / relative.replace("/", "_"))
        data = (broken / relative).read_bytes()
        (broken / relative).write_bytes(data[: len(data) // 2])  # truncated upload
        with pytest.raises(CheckpointError, match="corrupt") as info:
            load_weights(trained, broken)
        assert str(broken / relative) in str(info.value)
    garbage = copy_checkpoint(saved, tmp_path / "garbage")
    (garbage / "damo.safetensors").write_bytes(b"\x00\x01not a safetensors file at all")
    with pytest.raises(CheckpointError, match="corrupt"):
        load_weights(trained, garbage)
    bad_json = copy_checkpoint(saved, tmp_path / "json")
    (bad_json / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json"):
        load_checkpoint(bad_json)


def test_shape_mismatch_names_the_file_and_the_tensor(saved, tiny_cfg, tmp_path):
    other = tiny_cfg.model_copy(
        update={"bridge": tiny_cfg.bridge.model_copy(update={"queries": 4})}
    )
    model = DamoModel.from_config(other)
    with pytest.raises(CheckpointError) as info:
        load_weights(model, saved)
    message = str(info.value)
    assert str(saved / "damo.safetensors") in message
    assert "pathway.bridge.queries" in message and "(8, 64)" in message and "(4, 64)" in message
    # a LoRA rank that does not match the adapter
    lora = tiny_cfg.llm.lora.model_copy(update={"r": 4})
    model = DamoModel.from_config(
        tiny_cfg.model_copy(update={"llm": tiny_cfg.llm.model_copy(update={"lora": lora})})
    )
    with pytest.raises(CheckpointError, match="adapter_model.safetensors.*lora_A"):
        load_weights(model, saved)
    # a tensor missing from the file
    broken = copy_checkpoint(saved, tmp_path / "missing_tensor")
    weights = load_file(broken / "damo.safetensors")
    weights.pop("pathway.fuseformer.fusion_tokens")
    save_file(weights, broken / "damo.safetensors")
    with pytest.raises(CheckpointError, match="missing 1 tensors.*fusion_tokens"):
        load_weights(DamoModel.from_config(tiny_cfg), broken)


def test_no_pickle_in_the_model_package():
    root = Path(__file__).resolve().parents[1] / "damo" / "model"
    for path in root.rglob("*.py"):
        text = path.read_text()
        assert "import pickle" not in text, path
        for call in re.findall(r"torch\.load\([^)]*\)", text):
            assert "weights_only=True" in call, f"{path}: {call}"
