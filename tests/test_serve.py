"""The Serve application, end to end on 127.0.0.1: HTTP, the OpenAI client, abuse, a fuzzer,
autoscaling and a real browser. One Serve instance for the whole module (starting one takes a
minute on 2 cores); it is shut down at the end of the module so that later tests get the CPUs.
"""

from __future__ import annotations

import base64
import concurrent.futures
import os
import time
from pathlib import Path

import numpy as np
import pytest
import requests
from conftest import tiny_config

TOKEN = "serve-test-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
TIMEOUT = 60


# ---- fixtures -----------------------------------------------------------------------------------
def train_grounding_checkpoint(cfg, world: Path, out: Path, steps: int = 40) -> Path:
    """A tiny DaMO fine-tuned for a few steps on the world's grounding answers, so that it
    answers in the "from X to Y seconds." format the service parses (a random model does not)."""
    import torch

    from damo.data.records import read_records
    from damo.data.training import conversation, video_tensors
    from damo.model.checkpoint import save_checkpoint
    from damo.model.damo import DamoModel
    from damo.serve.featurizer import Featurizer
    from damo.serve.sources import VideoSource
    from damo.storage import Storage

    torch.manual_seed(0)
    records = [
        r
        for r in read_records(str(world / "records" / "train.parquet"), Storage()).to_pylist()
        if r["task"] == "grounding"
    ]
    featurizer = Featurizer(cfg)
    features = {
        uri: featurizer.features(VideoSource(uri=uri)).columns
        for uri in {r["video_uri"] for r in records}
    }
    model = DamoModel.from_config(cfg.model)
    optimizer = torch.optim.AdamW(model.set_stage(3), lr=3e-3)
    model.train()
    for step in range(steps):
        chosen = [records[(step * 8 + i) % len(records)] for i in range(8)]
        columns = {
            name: np.stack([features[r["video_uri"]][name] for r in chosen])
            for name in features[chosen[0]["video_uri"]]
        }
        batch = {
            **video_tensors(columns),
            **model.conversation_inputs([conversation(r) for r in chosen]),
        }
        loss = model(batch, stage=3)["loss"]
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return save_checkpoint(model.eval(), out, stage=3)


@pytest.fixture(scope="module")
def media_root(tmp_path_factory) -> Path:
    """A second allowed root with hostile and over-limit files (the world stays clean)."""
    from damo.media.encode import encode_mp4

    root = tmp_path_factory.mktemp("serve-media")
    (root / "escape.mp4").symlink_to("/etc/hostname")
    (root / "notes.mp4").write_text("this is not a video")
    frames = np.zeros((4, 120, 160, 3), np.uint8)
    (root / "wide.mp4").write_bytes(encode_mp4(frames, fps=2))  # 160 px > max_width 128
    long_frames = np.zeros((50, 16, 16, 3), np.uint8)
    (root / "long.mp4").write_bytes(encode_mp4(long_frames, fps=2))  # 25 s > 20 s
    return root


@pytest.fixture(scope="module")
def serve_cfg(tiny_backbones, tiny_world, media_root):
    return tiny_config(
        tiny_backbones,
        (
            f"storage.allowed_prefixes=[{tiny_world / 'videos'}, {media_root}]",
            "serve.port=0",
            "serve.ingress.num_cpus=0.1",
            "serve.featurizer.num_cpus=0.25",
            "serve.model.num_cpus=0.25",
            "serve.model.max_ongoing_requests=4",
            "serve.model.max_queued_requests=4",
            "serve.model.autoscaling.target_ongoing_requests=1",
            "serve.model.autoscaling.upscale_delay_s=1",
            "serve.model.autoscaling.downscale_delay_s=3",
            "serve.model.autoscaling.look_back_period_s=11",
            "serve.batching.max_batch_size=4",
            "serve.limits.max_upload_mb=1",
            "serve.limits.max_duration_s=20",
            "serve.limits.max_width=128",
            "serve.limits.max_height=128",
            "serve.limits.max_new_tokens=32",
            "serve.limits.max_query_chars=300",
        ),
    )


@pytest.fixture(scope="module")
def grounding_checkpoint(serve_cfg, tiny_world, tmp_path_factory, one_torch_thread) -> Path:
    return train_grounding_checkpoint(
        serve_cfg, tiny_world, tmp_path_factory.mktemp("serve-ckpt") / "model"
    )


@pytest.fixture(scope="module")
def service(ray_cluster, serve_cfg, grounding_checkpoint):
    """The running app's base URL (bearer token TOKEN)."""
    from pydantic import SecretStr
    from ray import serve

    from damo.serve.local import start

    url = start(serve_cfg, str(grounding_checkpoint), SecretStr(TOKEN))
    try:
        yield url
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def clips(tiny_world) -> list[dict]:
    """(video, grounding query, duration) of the world's clips, from its records."""
    from damo.data.records import read_records
    from damo.storage import Storage

    rows = read_records(str(tiny_world / "records" / "train.parquet"), Storage()).to_pylist()
    return [r for r in rows if r["task"] == "grounding"]


def post(url: str, path: str, body, headers=AUTH, **kwargs) -> requests.Response:
    return requests.post(url + path, json=body, headers=headers, timeout=TIMEOUT, **kwargs)


def assert_error(response: requests.Response, status: int, code: str | None = None) -> dict:
    assert response.status_code == status, response.text
    assert response.headers["content-type"].startswith("application/json")
    error = response.json()["error"]
    assert error["message"] and "Traceback" not in error["message"]
    if code is not None:
        assert error["code"] == code, error
    return error


def data_url(path: Path) -> str:
    return "data:video/mp4;base64," + base64.b64encode(path.read_bytes()).decode()


# ---- the endpoints ------------------------------------------------------------------------------
def test_ground_twice_second_from_cache(service, clips):
    clip = clips[0]
    first = post(service, "v1/ground", {"video": clip["video_uri"], "query": clip["query"]})
    assert first.status_code == 200, first.text
    answer = first.json()
    assert answer["found"], answer
    assert 0 <= answer["start"] <= answer["end"] <= answer["duration"]
    assert answer["duration"] == pytest.approx(clip["duration"], abs=0.2)
    second = post(service, "v1/ground", {"video": clip["video_uri"], "query": clip["query"]})
    assert second.json()["timings"]["cached_features"] is True
    assert first.json()["timings"]["cached_features"] is False
    assert second.json()["answer"] == answer["answer"]  # greedy: same video, same question


def test_qa_with_an_upload(service, clips):
    path = Path(clips[1]["video_uri"])
    response = post(service, "v1/qa", {"video": data_url(path), "question": clips[1]["query"]})
    assert response.status_code == 200, response.text
    body = response.json()
    assert body["answer"]
    for span in body["spans"]:
        assert 0 <= span["start"] <= span["end"] <= body["duration"]


def test_models_health_docs_and_page(service):
    models = requests.get(service + "v1/models", headers=AUTH, timeout=TIMEOUT).json()
    assert [m["id"] for m in models["data"]] == ["damo"]
    assert requests.get(service + "healthz", timeout=TIMEOUT).json()["status"] == "ok"
    spec = requests.get(service + "openapi.json", timeout=TIMEOUT).json()
    assert {"/v1/ground", "/v1/qa", "/v1/chat/completions", "/v1/models", "/healthz"} <= set(
        spec["paths"]
    )
    assert "swagger" in requests.get(service + "docs", timeout=TIMEOUT).text.lower()
    page = requests.get(service, timeout=TIMEOUT)
    assert page.status_code == 200 and '<video id="player"' in page.text


# ---- security and bad input ---------------------------------------------------------------------
def test_bearer_token(service):
    assert_error(requests.get(service + "v1/models", timeout=TIMEOUT), 401, "unauthorized")
    wrong = {"Authorization": "Bearer not-the-token"}
    assert_error(requests.get(service + "v1/models", headers=wrong, timeout=TIMEOUT), 401)
    response = post(service, "v1/ground", {"video": "/x", "query": "q"}, headers={})
    assert_error(response, 401)
    assert response.headers["www-authenticate"] == "Bearer"


@pytest.mark.parametrize(
    ("video", "status", "code"),
    [
        ("/etc/passwd", 403, "video_uri_not_allowed"),
        ("file:///etc/passwd", 403, "video_uri_not_allowed"),
        ("{videos}/../../../etc/passwd", 403, "video_uri_not_allowed"),
        ("{videos}/%2e%2e/%2e%2e/x.mp4", 403, "video_uri_not_allowed"),  # encoded ..
        ("{media}/escape.mp4", 403, "video_uri_not_allowed"),  # symlink out of the root
        ("s3://another-bucket/video.mp4", 403, "video_uri_not_allowed"),
        ("http://169.254.169.254/latest/meta-data", 403, "video_uri_not_allowed"),
        ("https://example.com/video.mp4", 403, "video_uri_not_allowed"),
        ("gopher://example.com/x", 400, "bad_video_uri"),
        ("data:video/mp4;base64,@@@not-base64@@@", 400, "bad_data_url"),
        ("data:video/mp4;base64,", 400, "empty_video"),
        ("{videos}/missing.mp4", 404, "video_not_found"),
        ("{media}/notes.mp4", 422, "video_not_media"),
        ("{media}/wide.mp4", 413, "video_resolution_too_high"),
        ("{media}/long.mp4", 413, "video_too_long"),
    ],
)
def test_refused_videos(service, tiny_world, media_root, video, status, code):
    video = video.format(videos=tiny_world / "videos", media=media_root)
    assert_error(post(service, "v1/ground", {"video": video, "query": "when?"}), status, code)


def test_upload_limit(service):
    big = "data:video/mp4;base64," + base64.b64encode(b"\0" * (2 * 2**20)).decode()
    assert_error(post(service, "v1/qa", {"video": big, "question": "what?"}), 413)


@pytest.mark.parametrize(
    ("path", "body", "status"),
    [
        ("v1/ground", "{not json", 422),
        ("v1/ground", [], 422),
        ("v1/ground", {"video": "/v.mp4"}, 422),
        ("v1/ground", {"video": 3, "query": "q"}, 422),
        ("v1/ground", {"video": "/v.mp4", "query": "q", "extra": 1}, 422),
        ("v1/qa", {"video": "/v.mp4", "question": "q" * 301}, 422),
        ("v1/qa", {"video": "/v.mp4", "question": "q", "max_new_tokens": 33}, 422),
        ("v1/qa", {"video": "/v.mp4", "question": "   "}, 422),
        ("v1/chat/completions", {"model": "damo", "messages": []}, 422),
        ("v1/chat/completions", {"model": "gpt-4", "messages": [{"role": "user"}]}, 404),
        (
            "v1/chat/completions",
            {"model": "damo", "messages": [{"role": "user", "content": "hi"}]},
            422,
        ),
        ("v1/nothing-here", {}, 404),
    ],
)
def test_malformed_requests_get_4xx_json(service, path, body, status):
    if isinstance(body, str):
        response = requests.post(
            service + path,
            data=body,
            headers={**AUTH, "Content-Type": "application/json"},
            timeout=TIMEOUT,
        )
    else:
        response = post(service, path, body)
    assert_error(response, status)


def test_wrong_method(service):
    assert_error(requests.get(service + "v1/ground", headers=AUTH, timeout=TIMEOUT), 405)


# ---- the OpenAI client --------------------------------------------------------------------------
def test_openai_client(service, clips):
    from openai import OpenAI

    client = OpenAI(base_url=service + "v1", api_key=TOKEN, max_retries=0)
    clip = clips[2]
    messages = [
        {
            "role": "user",
            "content": [
                {"type": "video_url", "video_url": {"url": clip["video_uri"]}},
                {"type": "text", "text": clip["query"]},
            ],
        }
    ]
    completion = client.chat.completions.create(model="damo", messages=messages, max_tokens=24)
    text = completion.choices[0].message.content
    assert text and completion.choices[0].finish_reason in ("stop", "length")
    assert completion.usage.total_tokens == (
        completion.usage.prompt_tokens + completion.usage.completion_tokens
    )
    stream = client.chat.completions.create(
        model="damo", messages=messages, max_tokens=24, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == text
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    # max_tokens is a ceiling: above the service's limit (32 here) it is clamped, not refused
    capped = client.chat.completions.create(model="damo", messages=messages, max_tokens=4096)
    assert capped.usage.completion_tokens <= 32
    with pytest.raises(Exception) as refused:
        OpenAI(base_url=service + "v1", api_key="wrong", max_retries=0).models.list()
    assert getattr(refused.value, "status_code", None) == 401


# ---- a fuzzer against the OpenAPI spec -----------------------------------------------------------
def test_fuzzing_the_openapi_spec_finds_no_5xx(service):
    import schemathesis
    from hypothesis import HealthCheck, Phase, given, settings

    schema = schemathesis.openapi.from_url(service + "openapi.json")
    failures: list[str] = []
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 5

    for operation in operations:

        @settings(
            max_examples=15,
            deadline=None,
            phases=[Phase.explicit, Phase.generate],
            suppress_health_check=list(HealthCheck),
            database=None,
        )
        @given(case=operation.as_strategy())
        def check(case):
            response = case.call(base_url=service.rstrip("/"), headers=AUTH, timeout=TIMEOUT)
            if response.status_code >= 500:
                failures.append(f"{case.method} {case.path} -> {response.status_code}")
            elif response.status_code >= 400:
                assert "error" in response.json(), response.text

        check()
    assert not failures, failures


# ---- load: overload and autoscaling --------------------------------------------------------------
def _model_replicas() -> int:
    from ray import serve

    deployment = serve.status().applications["damo"].deployments["model"]
    return deployment.replica_states.get("RUNNING", 0)


def _wait_for(predicate, timeout_s: float, poll_s: float = 0.5) -> bool:
    end = time.monotonic() + timeout_s
    while time.monotonic() < end:
        if predicate():
            return True
        time.sleep(poll_s)
    return predicate()


def test_autoscaling_up_under_load_and_back(service, clips):
    assert _wait_for(lambda: _model_replicas() == 1, 60), "did not start from one replica"
    body = {"video": clips[0]["video_uri"], "question": clips[0]["query"]}
    grown = False
    deadline = time.monotonic() + 60
    with concurrent.futures.ThreadPoolExecutor(8) as pool:
        while time.monotonic() < deadline and not grown:
            futures = [pool.submit(post, service, "v1/qa", body) for _ in range(16)]
            statuses = [f.result().status_code for f in futures]
            assert set(statuses) <= {200, 503}, statuses
            grown = _model_replicas() >= 2
    assert grown, "the model deployment did not grow to 2 replicas under load"
    assert _wait_for(lambda: _model_replicas() == 1, 60), "did not shrink back to one replica"


def test_overload_answers_503_with_retry_after(service, clips):
    body = {"video": clips[0]["video_uri"], "question": clips[0]["query"]}
    with concurrent.futures.ThreadPoolExecutor(48) as pool:
        responses = list(pool.map(lambda _: post(service, "v1/qa", body), range(48)))
    statuses = [r.status_code for r in responses]
    assert set(statuses) <= {200, 503}, statuses
    rejected = [r for r in responses if r.status_code == 503]
    assert rejected, "48 requests at once never filled the queues"
    assert all(int(r.headers["retry-after"]) >= 1 for r in rejected)
    assert_error(rejected[0], 503, "overloaded")
    assert statuses.count(200) >= 4


# ---- a real browser -----------------------------------------------------------------------------
CHROMIUM = "/usr/bin/chromium"


def test_web_page_in_chromium(service, clips, tmp_path):
    """Load the page, upload a clip, ask when something happens, check the answer and the span
    on the timeline, click it and check the video seeks there. Under CI it must run."""
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if os.environ.get("CI") == "true":
            raise
        pytest.skip("playwright is not installed")
    if not Path(CHROMIUM).exists():
        if os.environ.get("CI") == "true":
            pytest.fail(f"{CHROMIUM} is missing (apt-get install -y chromium)")
        pytest.skip(f"{CHROMIUM} is missing")
    clip = clips[0]
    args = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
    ]
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=args)
        try:
            page = browser.new_page(viewport={"width": 900, "height": 820})
            page.goto(service, wait_until="load")
            page.fill("#token", TOKEN)
            page.set_input_files("#file", clip["video_uri"])
            page.wait_for_function("document.getElementById('player').readyState >= 1")
            page.fill("#question", clip["query"])
            page.click("#submit")
            page.wait_for_function(
                "document.getElementById('answer').textContent.length > 0"
                " || document.getElementById('error').textContent.length > 0",
                timeout=TIMEOUT * 1000,
            )
            assert page.text_content("#error") == ""
            answer = page.text_content("#answer")
            assert "seconds" in answer, answer
            span = page.locator("#span")
            assert span.is_visible()
            start = float(span.get_attribute("data-start"))
            end = float(span.get_attribute("data-end"))
            assert 0 <= start <= end <= clip["duration"] + 0.2
            span.click(position={"x": 1, "y": 5})
            page.wait_for_function(
                f"Math.abs(document.getElementById('player').currentTime - {start}) < 0.3"
            )
            shot = Path(os.environ.get("DAMO_SERVE_SCREENSHOT", tmp_path / "page.png"))
            page.screenshot(path=str(shot), full_page=True)
            assert shot.stat().st_size > 0
            # readable errors: one from the page itself, one from the service
            page.reload(wait_until="load")
            page.fill("#question", "when?")
            page.click("#submit")
            assert "Choose a video" in page.text_content("#error")
            page.fill("#token", TOKEN)
            page.fill("#uri", "/etc/passwd")
            page.click("#submit")
            page.wait_for_function("document.getElementById('error').textContent.length > 0")
            error = page.text_content("#error")
            assert error.startswith("Error 403") and "allowed prefixes" in error, error
        finally:
            browser.close()
