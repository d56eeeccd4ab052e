"""Search spaces (`tune_spaces/*.yaml`): loading, validation against the config, Tune domains."""

from __future__ import annotations

import random
import textwrap

import pytest
import torch
from ray import tune
from ray.tune.search.sample import Categorical, Float, Integer, LogUniform, Quantized
from ray.tune.search.variant_generator import generate_variants

from damo.config import load_config
from damo.model.backbones import vision_geometry
from damo.model.damo import random_video
from damo.model.video import VideoPathway
from damo.tune.space import SPACES_DIR, SpaceError, available_spaces, load_space, trial_overrides

TINY_PATCH_GRID = 4 * 4  # 32 px frames, 8 px patches


def _space_file(tmp_path, text: str):
    path = tmp_path / "x.yaml"
    path.write_text(textwrap.dedent(text))
    return path


def _samples(domain, count: int, seed: int = 0) -> list:
    rng = random.Random(seed)
    return [domain.sample(random_state=rng.randrange(2**31)) for _ in range(count)]


# ---- the shipped spaces ----------------------------------------------------------------------


def test_shipped_spaces_load_against_the_tiny_config():
    assert {"fuseformer", "fuseformer_grid"} <= set(available_spaces())
    space = load_space(SPACES_DIR / "fuseformer.yaml")
    assert not space.grid and space.grid_size() is None and space.description
    paths = {p.path for p in space.parameters}
    assert {
        "model.fuseformer.depth",
        "model.residual.visual_compression",
        "model.residual.audio_compression",
        "model.fuseformer.visual_queries",
        "model.fuseformer.audio_queries",
        "train.stages.stage3.optimizer.lr",
    } <= paths
    by_path = {p.path: p for p in space.parameters}
    # tiny pins the pooled grid, which would make the searched compression a no-op
    assert by_path["model.residual.visual_grid"].candidates() == [None]
    assert by_path["model.fuseformer.depth"].candidates() == [1, 2, 3, 4]
    lr = space.param_space()["train.stages.stage3.optimizer.lr"]
    assert isinstance(lr, Float) and isinstance(lr.get_sampler(), LogUniform)


def test_grid_space_is_depth_by_visual_compression():
    space = load_space("fuseformer_grid")
    assert space.grid and space.grid_size() == 8
    params = space.param_space()
    assert params["model.fuseformer.depth"] == tune.grid_search([1, 2, 3, 4])
    # Tune expands the flat, dotted keys into every combination
    variants = [config for _, config in generate_variants(params)]
    assert len(variants) == 8
    combos = {
        (v["model.fuseformer.depth"], v["model.residual.visual_compression"]) for v in variants
    }
    assert len(combos) == 8


def _trial_points(space) -> list[dict]:
    """The space's first candidates, then each parameter moved to each of its extremes, then
    every parameter at its last extreme."""

    def extremes(p):
        values = p.candidates()
        if values is None:
            return [p.low, p.high]
        return values if p.values is not None else [values[0], values[-1]]

    first = {p.path: extremes(p)[0] for p in space.parameters}
    points = [first, {p.path: extremes(p)[-1] for p in space.parameters}]
    for p in space.parameters:
        points += [{**first, p.path: value} for value in extremes(p)[1:]]
    return points


@pytest.mark.usefixtures("one_torch_thread")
@pytest.mark.parametrize("name", ["fuseformer", "fuseformer_grid"])
def test_every_extreme_builds_a_tiny_video_pathway(name):
    """Validation against the schema is not enough: the pooled grid must fit the patch grid,
    and the compression must actually change the token counts."""
    space = load_space(name)
    for point in _trial_points(space):
        full = load_config("tiny", trial_overrides(point))
        cfg = full.model
        for path, value in point.items():
            section, field = path.rsplit(".", 1)
            node = full
            for part in section.split("."):
                node = getattr(node, part)
            assert getattr(node, field) == (tuple(value) if isinstance(value, list) else value)
        visual_dim, patches = vision_geometry(cfg.vision)
        assert patches == TINY_PATCH_GRID
        audio_tokens = cfg.audio.tokens_per_segment
        pathway = VideoPathway(
            visual_dim,
            int(cfg.audio.arch["d_model"]),
            patches,
            audio_tokens,
            int(cfg.llm.arch["hidden_size"]),
            cfg.residual,
            cfg.temporal,
            cfg.fuseformer,
            cfg.bridge,
            text_dim=int(cfg.text_encoder.arch["hidden_size"]),  # the bridge reads the question
        )
        video = random_video(cfg, batch=1, generator=torch.Generator().manual_seed(0))
        with torch.no_grad():
            visual = pathway.visual_residual(video.visual[:, :, 1:], video.visual[:, :, 0])
            audio = pathway.audio_residual(video.audio, video.audio.mean(2))
            fusion = pathway.fusion_tokens(video)
        compression = cfg.residual.visual_compression
        assert visual.shape[2] == patches // compression, point  # (B, T, L'v, D)
        assert audio.shape[2] == audio_tokens // cfg.residual.audio_compression, point
        assert audio_tokens % cfg.residual.audio_compression == 0, point
        assert fusion.shape == (1, cfg.fuseformer.fusion_tokens, cfg.fuseformer.width)
        assert len(pathway.fuseformer.layers) == cfg.fuseformer.depth
        assert torch.isfinite(fusion).all()


# ---- domains -------------------------------------------------------------------------------

ALL_KINDS = """
parameters:
  model.fuseformer.depth: {values: [1, 3]}
  model.fuseformer.dropout: {distribution: uniform, min: 0.0, max: 0.25}
  train.stages.stage3.optimizer.lr: {distribution: log_uniform_values, min: 1.0e-5, max: 1.0e-2}
  model.fuseformer.visual_queries: {distribution: int_uniform, min: 2, max: 4}
  model.fuseformer.audio_queries: {distribution: q_uniform, min: 4, max: 12, q: 4}
  model.heads.vtc_weight: {distribution: q_uniform, min: 0.5, max: 1.5, q: 0.25}
  model.temporal.kernel: {distribution: q_uniform, min: 1, max: 3, q: 1}
"""


def test_each_distribution_maps_to_its_tune_domain(tmp_path):
    params = load_space(_space_file(tmp_path, ALL_KINDS)).param_space()
    depth = params["model.fuseformer.depth"]
    assert isinstance(depth, Categorical) and depth.categories == [1, 3]
    assert set(_samples(depth, 40)) == {1, 3}

    dropout = _samples(params["model.fuseformer.dropout"], 200)
    assert isinstance(params["model.fuseformer.dropout"], Float)
    assert all(isinstance(v, float) and 0.0 <= v <= 0.25 for v in dropout)

    lr = params["train.stages.stage3.optimizer.lr"]
    assert isinstance(lr, Float) and isinstance(lr.get_sampler(), LogUniform)
    lrs = _samples(lr, 300)
    assert all(1e-5 <= v <= 1e-2 for v in lrs)
    # log-uniform: about a third of the draws in each decade, not 90% in the top one
    assert 0.2 < sum(v < 1e-4 for v in lrs) / len(lrs) < 0.5

    queries = params["model.fuseformer.visual_queries"]
    assert isinstance(queries, Integer)
    drawn = _samples(queries, 100)
    assert all(type(v) is int for v in drawn) and set(drawn) == {2, 3, 4}  # max included

    audio = params["model.fuseformer.audio_queries"]  # an int field: qrandint, not quniform
    assert isinstance(audio, Integer) and isinstance(audio.get_sampler(), Quantized)
    drawn = _samples(audio, 100)
    assert all(type(v) is int for v in drawn) and set(drawn) == {4, 8, 12}

    weight = params["model.heads.vtc_weight"]  # a float field: quniform
    assert isinstance(weight, Float) and isinstance(weight.get_sampler(), Quantized)
    drawn = _samples(weight, 200)
    assert all(isinstance(v, float) for v in drawn)
    assert {round(v, 9) for v in drawn} == {0.5, 0.75, 1.0, 1.25, 1.5}

    kernel = _samples(params["model.temporal.kernel"], 100)  # q = 1 keeps max inclusive
    assert set(kernel) == {1, 2, 3} and all(type(v) is int for v in kernel)


def test_candidates_list_the_discrete_values(tmp_path):
    space = load_space(_space_file(tmp_path, ALL_KINDS))
    by_path = {p.path: p for p in space.parameters}
    assert by_path["model.fuseformer.depth"].candidates() == [1, 3]
    assert by_path["model.fuseformer.visual_queries"].candidates() == [2, 3, 4]
    assert by_path["model.fuseformer.audio_queries"].candidates() == [4, 8, 12]
    assert by_path["model.heads.vtc_weight"].candidates() == [0.5, 0.75, 1.0, 1.25, 1.5]
    assert by_path["model.fuseformer.dropout"].candidates() is None


def test_grid_values_become_grid_search(tmp_path):
    path = _space_file(
        tmp_path,
        """
        grid: true
        parameters:
          model.fuseformer.depth: {values: [1, 2, 3]}
          model.residual.visual_grid: {values: [[1, 1], [2, 2]]}
          model.llm.dtype: {values: [float32, bfloat16]}
        """,
    )
    space = load_space(path)
    assert space.grid_size() == 12
    assert space.param_space()["model.residual.visual_grid"] == {"grid_search": [[1, 1], [2, 2]]}
    assert len(list(generate_variants(space.param_space()))) == 12


# ---- overrides -----------------------------------------------------------------------------


def test_trial_overrides_round_trip_through_load_config(tmp_path):
    trial = {
        "train.stages.stage3.optimizer.lr": 1e-4,
        "train.stages.stage1.optimizer.lr": 3.7e-21,
        "train.stages.stage2.optimizer.lr": 0.00046413828479755,
        "model.fuseformer.depth": 3,
        "model.fuseformer.dropout": 0.1,
        "model.residual.visual_grid": None,
        "model.llm.dtype": "float16",
    }
    overrides = trial_overrides(trial)
    assert overrides[0] == "train.stages.stage3.optimizer.lr=0.0001"
    assert "model.residual.visual_grid=null" in overrides
    cfg = load_config("tiny", overrides)
    stages = cfg.train.stages
    assert stages.stage3.optimizer.lr == 1e-4
    assert stages.stage1.optimizer.lr == 3.7e-21
    assert stages.stage2.optimizer.lr == 0.00046413828479755
    assert cfg.model.fuseformer.depth == 3 and cfg.model.fuseformer.dropout == 0.1
    assert cfg.model.residual.visual_grid is None and cfg.model.llm.dtype == "float16"
    assert trial_overrides({"model.residual.visual_grid": [1, 2]}) == [
        "model.residual.visual_grid=[1, 2]"
    ]
    # a searcher may hand back numpy scalars
    import numpy as np

    assert trial_overrides({"a.b": np.int64(4), "a.c": np.float64(2.5e-4)}) == [
        "a.b=4",
        "a.c=0.00025",
    ]


def test_sampled_trials_load_as_configs():
    space = load_space("fuseformer")
    rng = random.Random(1)
    for _ in range(20):
        trial = {
            path: domain.sample(random_state=rng.randrange(2**31))
            for path, domain in space.param_space().items()
        }
        cfg = load_config("tiny", trial_overrides(trial))
        assert cfg.train.stages.stage3.optimizer.lr == trial["train.stages.stage3.optimizer.lr"]
        assert cfg.model.fuseformer.audio_queries == trial["model.fuseformer.audio_queries"]
        assert type(trial["model.fuseformer.visual_queries"]) is int


# ---- errors --------------------------------------------------------------------------------

DEPTH = "model.fuseformer.depth"
LR = "train.stages.stage3.optimizer.lr"


def _params(line: str) -> str:
    return f"parameters:\n  {line}\n"


ERRORS = [
    # (file text, parameter named in the message or None, fragments of the message)
    (
        "paramters: {}\n",
        None,
        ["unknown key 'paramters'", "allowed: description, grid, parameters"],
    ),
    ("parameters: {}\n", None, ["'parameters' must be a non-empty mapping"]),
    ("- 1\n", None, ["top level must be a mapping"]),
    ("grid: 2\n" + _params(f"{DEPTH}: {{values: [1]}}"), None, ["'grid' must be true or false"]),
    (
        _params(f"{DEPTH}: {{values: [0, 2]}}"),
        DEPTH,
        ["value 0 is not allowed (allowed: int >= 1)"],
    ),
    (_params(f"{DEPTH}: {{values: [deep]}}"), DEPTH, ["value 'deep'", "allowed: int >= 1"]),
    (_params(f"{DEPTH}: {{values: 3}}"), DEPTH, ["'values' must be a non-empty list, got 3"]),
    (_params(f"{DEPTH}: {{values: []}}"), DEPTH, ["'values' must be a non-empty list"]),
    (_params(f"{DEPTH}: {{values: [2, 2]}}"), DEPTH, ["value 2 is listed twice"]),
    (_params(f"{DEPTH}: 3"), DEPTH, ["must be a mapping with 'values' or 'distribution'"]),
    (
        _params(f"{DEPTH}: {{values: [1], step: 2}}"),
        DEPTH,
        ["unknown key 'step'", "allowed: values, distribution, min, max, q"],
    ),
    (
        _params(f"{DEPTH}: {{values: [1], distribution: int_uniform, min: 1, max: 2}}"),
        DEPTH,
        ["exactly one of 'values' or 'distribution'"],
    ),
    (_params(f"{DEPTH}: {{values: [1], min: 1}}"), DEPTH, ["'min' belongs to a distribution"]),
    (
        _params("model.fuseformer.dept: {values: [1]}"),
        "model.fuseformer.dept",
        ["'dept' is not a field of model.fuseformer", "allowed fields: width, depth, heads"],
    ),
    (
        _params("modle.fuseformer.depth: {values: [1]}"),
        "modle.fuseformer.depth",
        ["'modle' is not a field of the top level", "allowed fields:", "model", "train"],
    ),
    (
        _params("model.fuseformer: {values: [1]}"),
        "model.fuseformer",
        ["is a section, not a field", "model.fuseformer.depth"],
    ),
    (
        _params("model.vision.arch.hidden_size: {values: [16]}"),
        "model.vision.arch.hidden_size",
        ["'model.vision.arch' is a value, not a section"],
    ),
    (
        _params(f"{DEPTH}: {{distribution: normal, min: 1, max: 2}}"),
        DEPTH,
        ["unknown distribution 'normal'", "uniform", "log_uniform_values", "int_uniform"],
    ),
    (
        _params(f"{DEPTH}: {{distribution: uniform, min: 1, max: 4}}"),
        DEPTH,
        ["the field is an int", "allowed: values, int_uniform, q_uniform"],
    ),
    (
        _params("model.llm.dtype: {distribution: uniform, min: 1, max: 4}"),
        "model.llm.dtype",
        ["needs a number field", "allowed values: 'float32'"],
    ),
    (
        _params(f"{DEPTH}: {{distribution: int_uniform, min: 0, max: 4}}"),
        DEPTH,
        ["value 0 is not allowed (allowed: int >= 1)"],
    ),
    (
        _params(f"{DEPTH}: {{distribution: int_uniform, min: 3, max: 3}}"),
        DEPTH,
        ["min 3 must be below max 3"],
    ),
    (
        _params(f"{LR}: {{distribution: uniform, min: 3.0e-3, max: 1.0e-4}}"),
        LR,
        ["min 0.003 must be below max 0.0001"],
    ),
    (
        _params(f"{LR}: {{distribution: log_uniform_values, min: 0.0, max: 1.0e-3}}"),
        LR,
        ["log_uniform_values needs min > 0"],
    ),
    (
        _params(f"{LR}: {{distribution: uniform, min: -1.0, max: 1.0e-3}}"),
        LR,
        ["value -1.0 is not allowed (allowed: float > 0"],
    ),
    (
        _params(f"{LR}: {{distribution: log_uniform_values, min: 1e-4, max: 1.0e-3}}"),
        LR,
        ["min '1e-4' is text", "1.0e-4"],
    ),
    (
        _params(f"{LR}: {{distribution: uniform, min: low, max: 1.0e-3}}"),
        LR,
        ["min must be a finite number, got 'low'"],
    ),
    (_params(f"{LR}: {{distribution: uniform, min: 1.0e-4}}"), LR, ["needs 'max'"]),
    (
        _params(f"{LR}: {{distribution: uniform, min: 1.0e-4, max: 1.0e-3, q: 1.0e-4}}"),
        LR,
        ["'q' belongs to q_uniform only"],
    ),
    (
        _params(f"{DEPTH}: {{distribution: q_uniform, min: 2, max: 8, q: 0}}"),
        DEPTH,
        ["q must be > 0"],
    ),
    (
        _params(f"{DEPTH}: {{distribution: q_uniform, min: 2, max: 8, q: 1.5}}"),
        DEPTH,
        ["q must be an integer"],
    ),
    (
        _params(f"{DEPTH}: {{distribution: q_uniform, min: 3, max: 8, q: 2}}"),
        DEPTH,
        ["min 3 is not a multiple of q 2"],
    ),
    (
        _params("model.fuseformer.dropout: {distribution: int_uniform, min: 0.5, max: 2}"),
        "model.fuseformer.dropout",
        ["int_uniform needs integer min and max"],
    ),
    (
        "grid: true\n" + _params(f"{DEPTH}: {{distribution: int_uniform, min: 1, max: 4}}"),
        DEPTH,
        ["a grid file ('grid: true') needs 'values'", "'int_uniform'"],
    ),
    (
        # a check across fields: the model's frames must equal the decoded frames
        _params("model.frames: {values: [8]}"),
        "model.frames",
        ["value 8 makes the config invalid", "must equal data.decode.num_frames"],
    ),
]


@pytest.mark.parametrize(
    ("text", "parameter", "fragments"), ERRORS, ids=[case[2][0][:40] for case in ERRORS]
)
def test_a_bad_space_names_the_file_the_parameter_and_what_is_allowed(
    tmp_path, text, parameter, fragments
):
    path = _space_file(tmp_path, text)
    with pytest.raises(SpaceError) as caught:
        load_space(path)
    message = str(caught.value)
    assert message.startswith(f"{path}: ")
    if parameter is not None:
        assert f"parameter '{parameter}'" in message
    for fragment in fragments:
        assert fragment in message


def test_the_message_shape(tmp_path):
    path = tmp_path / "x.yaml"
    path.write_text(_params(f"{DEPTH}: {{values: [0]}}"))
    with pytest.raises(SpaceError) as caught:
        load_space(path)
    assert str(caught.value) == (
        f"{path}: parameter 'model.fuseformer.depth': value 0 is not allowed (allowed: int >= 1)"
    )


def test_candidates_are_validated_against_the_given_base(tmp_path):
    path = _space_file(tmp_path, _params("model.frames: {values: [8, 16]}"))
    with pytest.raises(SpaceError, match="makes the config invalid"):
        load_space(path)  # tiny decodes 16 frames
    base = load_config("tiny", ["data.decode.num_frames=8", "model.frames=8"])
    with pytest.raises(SpaceError, match="value 16 makes the config invalid"):
        load_space(path, base=base)
    agreeing = _space_file(tmp_path, _params("model.frames: {values: [16]}"))
    assert load_space(agreeing).parameters[0].candidates() == [16]


def test_unknown_space_names_the_shipped_ones(tmp_path):
    with pytest.raises(SpaceError, match="fuseformer, fuseformer_grid"):
        load_space("fuseformr")
    with pytest.raises(SpaceError, match="does not exist"):
        load_space(tmp_path / "missing.yaml")
    bad = tmp_path / "bad.yaml"
    bad.write_text("parameters: [unclosed\n")
    with pytest.raises(SpaceError, match="not valid YAML"):
        load_space(bad)
