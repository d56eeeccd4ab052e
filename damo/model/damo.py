"""DamoModel: the trainable video pathway, the stage-1 heads, a frozen text encoder and a frozen
LLM with a LoRA adapter. It consumes cached encoder features (`VideoFeatures`); the frozen
vision/audio encoders that make them live in `FrozenEncoders`.

Batches are dicts of tensors:
  video features  visual, visual_times, visual_mask, audio, audio_times, audio_mask (VideoFeatures)
  stage 1         text_input_ids, text_attention_mask (B, S): the caption, text-encoder tokens
  stages 2-4      input_ids, attention_mask, labels (B, S): from `PromptBuilder`
"""

from __future__ import annotations

import warnings
from collections import OrderedDict
from collections.abc import Sequence
from contextlib import nullcontext
from dataclasses import replace

import torch
from torch import Tensor, nn

from damo.config.model import Component, ModelConfig
from damo.config.train import ALIGNMENT_LOSSES
from damo.model.backbones import (
    DTYPES,
    Resolve,
    arch_config,
    enable_activation_checkpointing,
    freeze,
    load_llm,
    load_text_encoder,
    locate,
    vision_geometry,
)
from damo.model.heads import AlignmentHeads
from damo.model.llm import PromptBuilder, add_lora, position_ids_from_mask, splice_video
from damo.model.video import Question, VideoFeatures, VideoPathway

# Which submodules make up each trainable component; `lora` is the LLM's adapter.
COMPONENT_MODULES: dict[str, tuple[str, ...]] = {
    "residual": ("pathway.visual_residual", "pathway.audio_residual"),
    "temporal": ("pathway.visual_temporal", "pathway.audio_temporal"),
    "fuseformer": ("pathway.fuseformer",),
    "bridge": ("pathway.bridge",),
    "heads": ("heads",),
}
# The weights DaMO owns (saved in checkpoints); the backbones are referenced by path.
OWNED_PREFIXES = ("pathway.", "heads.")


class CaptionTruncated(UserWarning):
    """Text longer than the model's text limits (captions, or the questions the bridge reads)
    loses its end."""


class DamoModel(nn.Module):
    """DaMO from cached encoder features to losses, embeddings and answers.

    pathway       residual -> temporal -> T-Fuseformer -> bridge (trainable, saved)
    heads         VTC / VTM / VTG for stage 1 (trainable, saved)
    text_encoder  frozen, for VTC/VTM (referenced by path)
    llm           frozen causal LM wrapped in a peft LoRA adapter (adapter saved); None when
                  built `with_llm=False` (stage 1 and retrieval never call it)
    """

    def __init__(
        self,
        cfg: ModelConfig,
        llm: nn.Module | None,
        text_encoder: nn.Module,
        tokenizer=None,
        text_tokenizer=None,
    ):
        super().__init__()
        self.cfg = cfg
        visual_dim, visual_patches = vision_geometry(cfg.vision)
        # without the LLM its width comes from the config, as the encoders' geometry does
        llm_dim = (
            llm.get_input_embeddings().embedding_dim
            if llm is not None
            else arch_config(cfg.llm).hidden_size
        )
        text_dim = text_encoder.config.hidden_size
        self.pathway = VideoPathway(
            visual_dim=visual_dim,
            audio_dim=int(cfg.audio.arch.get("d_model", 768)),
            visual_patches=visual_patches,
            audio_tokens=cfg.audio.tokens_per_segment,
            llm_dim=llm_dim,
            residual=cfg.residual,
            temporal=cfg.temporal,
            fuseformer=cfg.fuseformer,
            bridge=cfg.bridge,
            text_dim=text_dim,
        )
        self.heads = AlignmentHeads(
            cfg.fuseformer.width,
            text_dim,
            cfg.fuseformer.heads,
            text_encoder.config.vocab_size,
            cfg.heads,
        )
        self.text_encoder = freeze(text_encoder)
        self.text_cache: OrderedDict[bytes, Tensor] = OrderedDict()  # caption tokens -> states
        self.tokenizer = tokenizer
        self.text_tokenizer = text_tokenizer
        if llm is None:
            self.video_token_id = None
            self.prompt_builder = None
            self.llm = None
            return
        if tokenizer is not None:
            if cfg.llm.video_token not in tokenizer.get_vocab():
                tokenizer.add_special_tokens({"additional_special_tokens": [cfg.llm.video_token]})
            if len(tokenizer) > llm.get_input_embeddings().num_embeddings:
                grow_vocabulary(llm, len(tokenizer))
            self.video_token_id = tokenizer.convert_tokens_to_ids(cfg.llm.video_token)
            self.prompt_builder = PromptBuilder(
                tokenizer, cfg.llm.video_token, cfg.bridge.queries, cfg.llm.video_placement
            )
        else:
            # Built without a tokenizer (meta device): the last id stands in for <video>.
            self.video_token_id = llm.get_input_embeddings().num_embeddings - 1
            self.prompt_builder = None
        if cfg.llm.gradient_checkpointing:  # non-reentrant: the frozen LLM's inputs need no grad
            enable_activation_checkpointing(llm)
        self.llm = add_lora(llm, cfg.llm.lora)

    # ---- construction ----------------------------------------------------------------------
    @classmethod
    def from_config(
        cls,
        cfg: ModelConfig,
        pretrained: bool = True,
        resolve: Resolve | None = None,
        device: str | torch.device | None = None,
        with_llm: bool = True,
    ) -> DamoModel:
        """Load the backbones (`pretrained`) or build them from `arch` alone, without any
        download: at random on `device` ("cpu", "cuda"), or on `device="meta"` to count
        parameters and check shapes without any weights.

        `with_llm=False` leaves the LLM (and its tokenizer) unloaded: enough for the alignment
        objective and retrieval, and its checkpoints load into a full model later."""
        on_meta = device is not None and torch.device(device).type == "meta"
        if on_meta and pretrained:
            raise ValueError("the meta device holds no weights: use pretrained=False")
        if pretrained:  # every backbone present before any loads: no 7B load, then a failure
            if with_llm:
                locate("llm", cfg.llm, resolve)
            locate("text_encoder", cfg.text_encoder, resolve)
        # Pretrained weights load straight onto the target device; a random build is made
        # there (meta, cpu or cuda): a 7B LLM initialised on the CPU and then copied to the GPU
        # would spend minutes on random numbers the GPU draws in a second.
        load_on = device if pretrained else None
        build_on = device if not pretrained and device is not None else None
        with torch.device(build_on) if build_on is not None else nullcontext():
            llm = None
            if with_llm:
                llm = load_llm(cfg.llm, pretrained, resolve, DTYPES[cfg.llm.dtype], load_on)
            text_encoder = load_text_encoder(cfg.text_encoder, pretrained, resolve)
            tokenizer = text_tokenizer = None
            if pretrained:
                from transformers import AutoTokenizer

                if with_llm:
                    tokenizer = AutoTokenizer.from_pretrained(locate("llm", cfg.llm, resolve))
                text_tokenizer = AutoTokenizer.from_pretrained(
                    locate("text_encoder", cfg.text_encoder, resolve)
                )
            model = cls(cfg, llm, text_encoder, tokenizer, text_tokenizer)
        return model.to(device) if device is not None and not on_meta else model

    # ---- stages ----------------------------------------------------------------------------
    def component_parameters(self, component: Component) -> dict[str, nn.Parameter]:
        if component == "lora":
            if self.llm is None:
                return {}
            return {
                f"llm.{name}": param
                for name, param in self.llm.named_parameters()
                if "lora_" in name
            }
        prefixes = tuple(prefix + "." for prefix in COMPONENT_MODULES[component])
        return {name: param for name, param in self.named_parameters() if name.startswith(prefixes)}

    def trainable_components(self, stage: int, anchored: bool = False) -> list[Component]:
        """Stage `stage`'s trainable components; an anchored LM stage (the stage-1 losses added
        to its loss, `train.stages.stageK.anchor`) trains the stage-1 heads as well."""
        components = list(self.cfg.stages.get(stage).trainable)
        if anchored and "heads" not in components:
            components.append("heads")
        return components

    def trainable_named_parameters(
        self, stage: int, anchored: bool = False
    ) -> dict[str, nn.Parameter]:
        """The parameters stage `stage` trains (DESIGN §4, `cfg.stages`).

        Only parameters on the stage's loss path count: the bridge's projection to the LLM is
        unused by the LLM-free alignment objective, and the stage-1 heads by the LM stages
        unless they are anchored.
        """
        stage_cfg = self.cfg.stages.get(stage)
        params: dict[str, nn.Parameter] = {}
        for component in self.trainable_components(stage, anchored):
            if stage_cfg.objective == "lm" and component == "heads" and not anchored:
                continue
            params.update(self.component_parameters(component))
        if stage_cfg.objective == "alignment":  # no LLM and no question
            unused = ("pathway.bridge.to_llm", "pathway.bridge.question")
            params = {k: v for k, v in params.items() if not k.startswith(unused)}
        return params

    def trainable_parameters(self, stage: int, anchored: bool = False) -> list[nn.Parameter]:
        return list(self.trainable_named_parameters(stage, anchored).values())

    def set_stage(self, stage: int, anchored: bool = False) -> list[nn.Parameter]:
        """Freeze everything but stage `stage`'s trainable set; return that set (for the
        optimizer)."""
        trainable = self.trainable_named_parameters(stage, anchored)
        for name, param in self.named_parameters():
            param.requires_grad_(name in trainable)
        return list(trainable.values())

    def parameter_groups(
        self, stage: int, lr: float, lr_scale: dict[str, float], anchored: bool = False
    ) -> list[dict]:
        """Optimizer parameter groups for stage `stage`: one per trainable component, each at
        lr x its scale (`train.stages.stageK.optimizer.lr_scale`). Call after `set_stage`."""
        trainable = self.trainable_named_parameters(stage, anchored)
        groups = []
        for component in self.trainable_components(stage, anchored):
            names = [n for n in self.component_parameters(component) if n in trainable]
            if names:
                scale = lr_scale.get(component, 1.0)
                groups.append({"params": [trainable[n] for n in names], "lr": lr * scale})
        return groups

    def train(self, mode: bool = True) -> DamoModel:
        super().train(mode)
        self.text_encoder.eval()  # frozen: never dropout
        return self

    # ---- forward ---------------------------------------------------------------------------
    def forward(
        self,
        batch: dict[str, Tensor],
        stage: int,
        anchor: dict[str, Tensor] | None = None,
        anchor_losses: Sequence[str] = ALIGNMENT_LOSSES,
    ) -> dict[str, Tensor]:
        """The losses of stage `stage` for one batch; `loss` is what to minimise.

        `anchor`: a stage-1 caption batch for an LM stage; its alignment loss (the terms in
        `anchor_losses`) comes back as `anchor`, for the caller to weigh into `loss` (one
        forward, as DDP wants)."""
        video = self.training_video(batch)
        if self.cfg.stages.get(stage).objective == "alignment":
            return self.alignment_losses(
                video,
                batch["text_input_ids"],
                batch["text_attention_mask"],
                negatives=negative_captions(batch),
            )
        loss = self.lm_loss(
            video,
            batch["input_ids"],
            batch["attention_mask"],
            batch["labels"],
            self.batch_question(batch),
        )
        losses = {"lm": loss, "loss": loss}
        if anchor is not None:
            losses["anchor"] = self.alignment_losses(
                self.training_video(anchor),
                anchor["text_input_ids"],
                anchor["text_attention_mask"],
                anchor_losses,
                negatives=negative_captions(anchor),
            )["loss"]
        return losses

    def training_video(self, batch: dict[str, Tensor]) -> VideoFeatures:
        """A batch's video features; in training, some lose their audio (`drop_audio_prob`)."""
        video = VideoFeatures.from_batch(batch)
        if self.training and self.cfg.drop_audio_prob > 0:
            video = drop_audio(video, self.cfg.drop_audio_prob)
        return video

    def soft_prompt(self, video: VideoFeatures, question: Question | None = None) -> Tensor:
        return self.pathway(video, question)  # (B, K, H)

    @property
    def reads_question(self) -> bool:
        return self.cfg.bridge.read_question

    def batch_question(self, batch: dict[str, Tensor]) -> Question | None:
        """An LM batch's question for the bridge (StageCollator's `question_*` fields), when
        the bridge reads one."""
        if not self.reads_question:
            return None
        if "question_input_ids" not in batch:
            raise ValueError("the bridge reads the question: the batch needs question_input_ids")
        ids, mask = batch["question_input_ids"], batch["question_attention_mask"]
        return self.text_states(ids, mask), mask.bool()

    def tokenize_questions(self, prompts: list[str]) -> dict[str, Tensor]:
        """First user turns -> question_input_ids / question_attention_mask (text encoder)."""
        tokens = self.tokenize_text(
            question_texts(prompts, self.cfg.llm.video_token), what="questions"
        )
        return {
            "question_input_ids": tokens["text_input_ids"],
            "question_attention_mask": tokens["text_attention_mask"],
        }

    def conversation_inputs(
        self, conversations: list[list[dict]], padding_side: str = "right"
    ) -> dict[str, Tensor]:
        """An LM batch's text: the conversations through the chat template (input_ids,
        attention_mask, labels on the answers), and, when the bridge reads the question, each
        conversation's first user turn as `question_*`."""
        if self.prompt_builder is None:
            raise RuntimeError("no tokenizer: build the model with pretrained=True")
        inputs = self.prompt_builder(conversations, padding_side=padding_side)
        if self.reads_question:
            first_user = [next(t for t in c if t["role"] == "user") for c in conversations]
            inputs.update(self.tokenize_questions([turn["content"] for turn in first_user]))
        return inputs

    def encode_questions(self, prompts: list[str]) -> Question:
        """The questions' frozen text-encoder states (B, S, Dt) and mask (B, S)."""
        device = self.pathway.bridge.queries.device
        tokens = {k: v.to(device) for k, v in self.tokenize_questions(prompts).items()}
        return self.batch_question(tokens)

    def per_video_state(self, video: VideoFeatures) -> Tensor:
        """What a server may keep per video and reuse for every question about it: the soft
        prompt (B, K, H), or the fusion tokens (B, F, D) when the bridge reads the question
        (the bridge then runs per question: `generate`'s `video_state`)."""
        if self.reads_question:
            return self.pathway.fusion_tokens(video)
        return self.soft_prompt(video)

    def text_states(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        """(B, S, Dt) frozen text-encoder states; positions past a caption's end are zeros
        when they come from the cache (every head masks them)."""
        if not self.cfg.text_encoder.cache_size:
            return self.encode_text_tokens(input_ids, attention_mask)
        # The encoder is frozen, so a caption's states never change: stage 1 reads each
        # caption once per epoch, and the encoder was a quarter of a tiny stage-1 step.
        lengths = attention_mask.sum(dim=1).tolist()
        keys = [bytes(row[:n].cpu().numpy()) for row, n in zip(input_ids, lengths, strict=True)]
        # A caption missing from the cache is encoded alone, at its own length: in a batch its
        # states would carry float noise from the padding and the batch's shape, so a stage
        # resumed with an empty cache would not repeat one that ran on.
        for i, key in enumerate(keys):
            if key not in self.text_cache:
                self.text_cache[key] = self.encode_text_tokens(
                    input_ids[i : i + 1, : lengths[i]], attention_mask[i : i + 1, : lengths[i]]
                )[0]
        states = [self.text_cache[key] for key in keys]  # before a batch of many evicts some
        for key in keys:
            self.text_cache.move_to_end(key)
        while len(self.text_cache) > self.cfg.text_encoder.cache_size:
            self.text_cache.popitem(last=False)
        padded = nn.utils.rnn.pad_sequence(states, batch_first=True)  # (B, max len, Dt)
        return nn.functional.pad(padded, (0, 0, 0, input_ids.shape[1] - padded.shape[1]))

    def encode_text_tokens(self, input_ids: Tensor, attention_mask: Tensor) -> Tensor:
        with torch.no_grad():
            return self.text_encoder(
                input_ids=input_ids, attention_mask=attention_mask
            ).last_hidden_state  # (B, S, Dt)

    def alignment_losses(
        self,
        video: VideoFeatures,
        text_input_ids: Tensor,
        text_attention_mask: Tensor,
        which: Sequence[str] = ALIGNMENT_LOSSES,
        negatives: tuple[Tensor, Tensor, Tensor] | None = None,
    ) -> dict[str, Tensor]:
        """Stage 1: VTC + VTM (hard negatives from the VTC similarities) + VTG, or the terms
        in `which`; `loss` weighs them by `model.heads`. `negatives` (input ids (B, S'),
        attention mask (B, S'), has_one (B,)): each caption's own hard negative, which VTC
        and VTM must tell from it (`model.heads.place_negatives`, `shape_negatives`)."""
        weights = self.cfg.heads
        query_states = self.pathway.query_states(video)  # (B, K, D)
        losses = {}
        own_negatives = own_sims = None
        if "vtc" in which or "vtm" in which:
            text_states = self.text_states(text_input_ids, text_attention_mask)  # (B, S, Dt)
            video_emb = self.heads.vtc.embed_video(query_states)  # (B, E)
            text_emb = self.heads.vtc.embed_text(text_states, text_attention_mask)  # (B, E)
            sims = self.heads.vtc.similarities(video_emb, text_emb)  # (B, B)
            if negatives is not None:
                ids, mask, has_one = negatives
                states = self.text_states(ids, mask)  # (B, S', Dt)
                own_negatives = (states, mask, has_one)
                negative_emb = self.heads.vtc.embed_text(states, mask)  # (B, E)
                own_sims = self.heads.vtc.pair_similarities(video_emb, negative_emb)  # (B,)
                own_sims = own_sims.masked_fill(~has_one, float("-inf"))
        if "vtc" in which:
            losses["vtc"] = self.heads.vtc.loss(sims, own_sims)
        if "vtm" in which:
            losses["vtm"] = self.heads.vtm.loss(
                query_states, text_states, text_attention_mask, sims.detach(), own_negatives
            )
        if "vtg" in which:
            losses["vtg"] = self.heads.vtg.loss(query_states, text_input_ids, text_attention_mask)
        losses["loss"] = sum(
            getattr(weights, f"{name}_weight") * loss for name, loss in losses.items()
        )
        return losses

    def require_llm(self) -> nn.Module:
        if self.llm is None:
            raise RuntimeError("this model was built without its LLM (with_llm=False)")
        return self.llm

    def llm_inputs(
        self,
        video: VideoFeatures | None,
        input_ids: Tensor,
        soft_prompt: Tensor | None = None,
        question: Question | None = None,
    ) -> Tensor:
        """Token embeddings with the soft prompt spliced in at the `<video>` tokens.

        `soft_prompt` (B, K, H): the pathway's output for the videos, when the caller already
        has it (serving keeps it per video); `video` is then not needed. `question`: what the
        bridge reads with `read_question`."""
        self.require_llm()
        if soft_prompt is None:
            soft_prompt = self.soft_prompt(video, question)
        embeds = self.llm.get_input_embeddings()(input_ids)  # (B, S, H)
        return splice_video(embeds, input_ids, self.video_token_id, soft_prompt)

    def lm_loss(
        self,
        video: VideoFeatures,
        input_ids: Tensor,
        attention_mask: Tensor,
        labels: Tensor,
        question: Question | None = None,
    ) -> Tensor:
        """Stages 2-4: next-token loss on the answer tokens (labels mask the prompt)."""
        output = self.llm(
            inputs_embeds=self.llm_inputs(video, input_ids, question=question),
            attention_mask=attention_mask,
            position_ids=position_ids_from_mask(attention_mask),
            labels=labels,
        )
        return output.loss

    # ---- retrieval -------------------------------------------------------------------------
    def tokenize_text(self, texts: list[str], what: str = "captions") -> dict[str, Tensor]:
        """Captions (or the bridge's questions, `what`) -> text_input_ids /
        text_attention_mask for the text encoder and VTG."""
        if self.text_tokenizer is None:
            raise RuntimeError("no text tokenizer: build the model with pretrained=True")
        max_length = min(self.cfg.text_encoder.max_length, self.cfg.heads.vtg_max_length + 1)
        lengths = [len(ids) for ids in self.text_tokenizer(texts)["input_ids"]]
        if max(lengths, default=0) > max_length:
            warnings.warn(
                # one message per limit, so the warning shows once, not once per batch
                f"{what} longer than the {max_length} tokens the text encoder and VTG keep "
                "lose their ends; raise model.text_encoder.max_length and "
                "model.heads.vtg_max_length",
                CaptionTruncated,
                stacklevel=2,
            )
        encoded = self.text_tokenizer(
            texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt"
        )
        return {
            "text_input_ids": encoded["input_ids"],
            "text_attention_mask": encoded["attention_mask"],
        }

    @torch.no_grad()
    def embed_video(self, video: VideoFeatures) -> Tensor:
        """(B, E) unit vectors in the VTC space, for text-to-video retrieval."""
        return self.heads.vtc.embed_video(self.pathway.query_states(video))

    @torch.no_grad()
    def embed_text(self, texts: list[str]) -> Tensor:
        """(B, E) unit vectors in the VTC space."""
        inputs = self.tokenize_text(texts)
        ids, mask = inputs["text_input_ids"], inputs["text_attention_mask"]
        device = self.heads.vtc.log_scale.device
        ids, mask = ids.to(device), mask.to(device)
        return self.heads.vtc.embed_text(self.text_states(ids, mask), mask)

    # ---- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        video: VideoFeatures | None,
        prompts: list[str],
        max_new_tokens: int = 64,
        greedy: bool = True,
        video_state: Tensor | None = None,
        **generate_kwargs,
    ) -> list[str]:
        """Answer one prompt per video, batched (left padding); greedy decoding by default.

        `video_state` stands in for `video` when the caller kept `per_video_state(video)`
        (serving caches it per video): the soft prompt, or the fusion tokens that the bridge
        turns into one soft prompt per prompt when it reads the question."""
        self.require_llm()
        if self.prompt_builder is None:
            raise RuntimeError("no tokenizer: build the model with pretrained=True")
        if video is None and video_state is None:
            raise ValueError("generate needs the video's features or its per_video_state")
        # checked before the pathway runs, so a mismatched call costs nothing
        videos = (video.visual if video_state is None else video_state).shape[0]
        if len(prompts) != videos:
            raise ValueError(f"{len(prompts)} prompts for {videos} videos")
        device = self.pathway.bridge.queries.device
        if video_state is None:
            video_state = self.per_video_state(video.to(device))
        soft_prompt = self.soft_prompt_from_state(video_state.to(device), prompts)
        inputs = self.prompt_builder.prompts(prompts)
        output = self.generate_ids(
            None,
            inputs["input_ids"].to(device),
            inputs["attention_mask"].to(device),
            max_new_tokens=max_new_tokens,
            greedy=greedy,
            soft_prompt=soft_prompt,
            pad_token_id=self.prompt_builder.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            **generate_kwargs,
        )
        texts = self.tokenizer.batch_decode(output, skip_special_tokens=True)
        return [text.strip() for text in texts]

    def soft_prompt_from_state(self, video_state: Tensor, prompts: list[str]) -> Tensor:
        """(B, K, H) soft prompts from `per_video_state`'s output and the prompts."""
        if self.reads_question:
            expected, name = (self.cfg.fuseformer.fusion_tokens, self.cfg.fuseformer.width), (
                "the fusion tokens, as the bridge reads the question"
            )
        else:
            expected = (self.cfg.bridge.queries, self.llm.get_input_embeddings().embedding_dim)
            name = "the soft prompt"
        if tuple(video_state.shape[1:]) != expected:
            raise ValueError(
                f"the video state must be {name}: (B, {expected[0]}, {expected[1]}), not "
                f"{tuple(video_state.shape)}; take it from per_video_state"
            )
        if not self.reads_question:
            return video_state
        return self.pathway.bridge(video_state, self.encode_questions(prompts))

    @torch.no_grad()
    def generate_ids(
        self,
        video: VideoFeatures | None,
        input_ids: Tensor,
        attention_mask: Tensor,
        max_new_tokens: int = 64,
        greedy: bool = True,
        soft_prompt: Tensor | None = None,
        **generate_kwargs,
    ) -> Tensor:
        """(B, new tokens) answer ids for left-padded prompts (B, S) holding the `<video>`
        tokens; `generate` without the tokenizer, for a model built at random (benchmarks)."""
        self.require_llm()
        return self.llm.generate(
            inputs_embeds=self.llm_inputs(video, input_ids, soft_prompt),
            attention_mask=attention_mask,
            max_new_tokens=max_new_tokens,
            do_sample=not greedy,
            # `<video>` is an input placeholder, never an answer
            suppress_tokens=[self.video_token_id],
            **generate_kwargs,
        )  # (B, new tokens): with inputs_embeds only the continuation comes back


def question_texts(prompts: list[str], video_token: str) -> list[str]:
    """The question's words without the `<video>` placeholder a caller may have put in."""
    return [" ".join(prompt.replace(video_token, " ").split()) for prompt in prompts]


def negative_captions(batch: dict[str, Tensor]) -> tuple[Tensor, Tensor, Tensor] | None:
    """A caption batch's own hard negatives (StageCollator's `negative_*` fields), if it has
    them."""
    if "negative_text_input_ids" not in batch:
        return None
    return (
        batch["negative_text_input_ids"],
        batch["negative_text_attention_mask"],
        batch["has_negative"].bool(),
    )


def grow_vocabulary(llm: nn.Module, size: int) -> None:
    """Add rows for tokens the LLM lacks (the paper preset's `<video>`), the same on every load.

    A random new row would differ between loads, and the checkpoint does not store backbone
    weights: the input row is always overwritten by the soft prompt, but an untied output row
    would move every logit's softmax and could even be generated. Each new row is the mean of
    the existing ones, so two loads of a checkpoint answer bit-identically.
    """
    old = llm.get_input_embeddings().num_embeddings
    llm.resize_token_embeddings(size, mean_resizing=False)
    with torch.no_grad():
        tables = {id(t): t for t in (llm.get_input_embeddings(), llm.get_output_embeddings())}
        for table in tables.values():
            if table is not None and table.weight.device.type != "meta":
                table.weight[old:] = table.weight[:old].mean(dim=0)


def drop_audio(video: VideoFeatures, prob: float) -> VideoFeatures:
    """Mask out each sample's whole audio with probability `prob` (training only)."""
    heard = torch.rand(video.audio_mask.shape[0], device=video.audio_mask.device) >= prob  # (B,)
    return replace(video, audio_mask=video.audio_mask & heard[:, None])


def random_video(
    cfg: ModelConfig,
    batch: int,
    device: str | torch.device | None = None,
    generator: torch.Generator | None = None,
) -> VideoFeatures:
    """Random encoder features shaped as `cfg`'s encoders would produce them."""
    visual_dim, patches = vision_geometry(cfg.vision)
    return VideoFeatures.random(
        batch,
        frames=cfg.frames,
        visual_tokens=1 + patches,
        visual_dim=visual_dim,
        segments=cfg.audio_segments,
        audio_tokens=cfg.audio.tokens_per_segment,
        audio_dim=int(cfg.audio.arch.get("d_model", 768)),
        device=device,
        generator=generator,
    )
