"""Real datasets: the configs in configs/ and `damo data import` on each official format."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from typer.testing import CliRunner

from damo.cli import app
from damo.config import load_config
from damo.data.records import RECORD_SCHEMA
from damo.storage import Storage

REPO_ROOT = Path(__file__).resolve().parents[1]
CONFIGS = REPO_ROOT / "configs"
DATASETS = {"charades_sta", "qvhighlights", "activitynet"}

runner = CliRunner()


def damo(*args: str):
    return runner.invoke(app, [str(a) for a in args])


def read_split(out: Path, split: str) -> list[dict]:
    table = pq.read_table(out / f"{split}.parquet")
    assert table.schema.equals(RECORD_SCHEMA, check_metadata=False)
    return table.to_pylist()


def make_videos(root: Path, names: list[str]) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    for name in names:
        (root / name).write_bytes(b"not decoded by the import")
    return root


# ---- configs ------------------------------------------------------------------------------------
def test_every_config_loads_and_points_at_its_layout(tmp_path, monkeypatch):
    assert {p.stem for p in CONFIGS.glob("*.yaml")} == DATASETS | {"paper"}
    monkeypatch.chdir(tmp_path)  # `base: paper.yaml` resolves next to the file, not the cwd
    preset = load_config("paper")
    for path in sorted(CONFIGS.glob("*.yaml")):
        cfg = load_config(path)
        assert cfg.name == path.stem
        # the paper preset's model, its backbones moved into the bucket
        for part in ("vision", "audio", "text_encoder", "llm"):
            backbone = getattr(cfg.model, part)
            assert backbone.path == f"s3://damo-data/backbones/paper/{part}"
            assert backbone.hub_id == getattr(preset.model, part).hub_id
        assert cfg.model.fuseformer == preset.model.fuseformer
        assert cfg.model.llm.lora == preset.model.llm.lora
        assert cfg.train.scaling.use_gpu
        root = f"s3://damo-data/{path.stem}"
        assert cfg.train.runs_root == f"{root}/runs"
        assert cfg.train.data.records == f"{root}/records"
        assert cfg.train.data.features == f"{root}/features"
        assert (cfg.tune.sweeps_root, cfg.tune.registry) == (f"{root}/sweeps", f"{root}/registry")
        if path.stem in DATASETS:  # grounding records only: stages 3-4 from stage 2
            assert cfg.train.stages.stage3.tasks == ["grounding"]
            assert cfg.tune.init_checkpoint == "s3://damo-data/paper/checkpoints/stage2"
            assert (cfg.train.data.train_split, cfg.train.data.val_split) == ("train", "val")


# ---- Charades-STA ------------------------------------------------------------------------------
CHARADES_VIDEOS = ["3MSZA", "AO8RW", "Y6R7T", "KRF68", "0A8CF", "1K0SU", "ZZ9ZZ", "5QGQM"]


def write_charades(annotations: Path) -> None:
    annotations.mkdir(parents=True, exist_ok=True)
    train = [
        f"{vid} {n}.0 {n + 5}.5##person number {n} does a thing."
        for n, vid in enumerate(CHARADES_VIDEOS)
    ]
    train.append("3MSZA 24.3 40.0## person turns a light on.")  # past its 30 s duration
    (annotations / "charades_sta_train.txt").write_text("\n".join(train) + "\n")
    (annotations / "charades_sta_test.txt").write_text("Y6R7T 1.0 4.0##person opens the door.\n")
    (annotations / "Charades_v1_train.csv").write_text(
        "id,subject,scene,quality,relevance,verified,script,objects,descriptions,actions,length\n"
        '3MSZA,HR43,Kitchen,6,7,Yes,"A person, then",food,"x",c092 11.90 21.20,30.00\n'
        "AO8RW,CQRE,Hallway,5,7,Yes,a,b,c,d,12.5\n"
    )


def test_import_charades_sta(tmp_path):
    annotations = tmp_path / "annotations"
    write_charades(annotations)
    present = [v for v in CHARADES_VIDEOS if v != "ZZ9ZZ"]
    videos = make_videos(tmp_path / "videos", [f"{v}.mp4" for v in present] + [".DS_Store"])
    out = tmp_path / "records"
    result = damo(
        "data", "import", "charades-sta", "--annotations", annotations, "--videos", videos,
        "--out", out, "--durations", annotations / "Charades_v1_train.csv",
        "--val-from-train", "0.5",
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert f"{len(present)} videos listed" in result.output
    train, val, test = (read_split(out, split) for split in ("train", "val", "test"))
    # the held-out videos are whole: no video is in both, none is lost
    train_videos, val_videos = {r["video_id"] for r in train}, {r["video_id"] for r in val}
    assert train_videos and val_videos and not train_videos & val_videos
    assert train_videos | val_videos == set(CHARADES_VIDEOS)
    assert len(train) + len(val) == len(CHARADES_VIDEOS) + 1
    assert {r["split"] for r in val} == {"val"} and {r["split"] for r in train} == {"train"}
    by_query = {r["query"]: r for r in train + val}
    light = by_query["person turns a light on."]
    assert light["duration"] == 30.0 and light["spans"] == [[24.3, 30.0]]  # csv length clips it
    assert by_query["person number 2 does a thing."]["duration"] is None  # not in the csv
    for record in train + val + test:
        assert record["video_uri"] == str(videos / f"{record['video_id']}.mp4")
    assert test[0]["query"] == "person opens the door." and test[0]["split"] == "test"
    report = json.loads((out / "import.json").read_text())
    missing = {s["split"]: s["missing_videos"] for s in report["splits"]}
    split_of_missing = "train" if "ZZ9ZZ" in train_videos else "val"
    assert missing == {"train": [], "val": [], "test": [], split_of_missing: ["ZZ9ZZ"]}
    assert f"{split_of_missing}: " in result.output and ": ZZ9ZZ" in result.output


def test_imported_uris_are_the_ones_extract_lists(tmp_path, monkeypatch):
    """Training joins records to feature rows on video_uri: the import must give each video
    the URI `damo extract --videos` does, however the prefix is written."""
    from damo.data.extract import video_uris

    annotations = tmp_path / "annotations"
    write_charades(annotations)
    make_videos(tmp_path / "videos", [f"{v}.mp4" for v in CHARADES_VIDEOS[:-1]])
    monkeypatch.chdir(tmp_path)
    prefixes = ["videos", f"{tmp_path}/videos/", f"file://{tmp_path}/videos"]
    for n, prefix in enumerate(prefixes):
        out = tmp_path / f"out{n}"
        result = damo(
            "data", "import", "charades-sta", "--annotations", annotations,
            "--videos", prefix, "--out", out,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        listed = {str(uri) for uri in video_uris(Storage(), prefix)}
        records = [r for split in ("train", "test") for r in read_split(out, split)]
        present = {r["video_uri"] for r in records if r["video_id"] != CHARADES_VIDEOS[-1]}
        assert present == listed
        (absent,) = {r["video_uri"] for r in records} - listed
        (listed_3msza,) = [uri for uri in listed if "3MSZA" in uri]
        assert absent == listed_3msza.replace("3MSZA", CHARADES_VIDEOS[-1])


# ---- QVHighlights ------------------------------------------------------------------------------
def qvh_rows(fixtures_dir: Path) -> list[dict]:
    path = fixtures_dir / "qvhighlights" / "highlight_val_release.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


@pytest.mark.parametrize("drop_missing", [False, True])
def test_import_qvhighlights_fixture(tmp_path, fixtures_dir, drop_missing):
    rows = qvh_rows(fixtures_dir)
    vids = sorted({row["vid"] for row in rows})
    present = vids[:5]  # ids like NUsG9BgSes0_210.0_360.0: dots of their own
    videos = make_videos(tmp_path / "videos", [f"{vid}.mp4" for vid in present])
    out = tmp_path / "records"
    gt = fixtures_dir / "qvhighlights" / "highlight_val_release.jsonl"
    args = ["data", "import", "qvhighlights", "--split", f"val={gt}", "--videos", videos]
    result = damo(*args, "--out", out, *(["--drop-missing"] if drop_missing else []))
    assert result.exit_code == 0, result.output
    assert not (out / "train.parquet").exists()  # only the splits asked for
    records = read_split(out, "val")
    kept = [row for row in rows if row["vid"] in present]
    assert len(records) == (len(kept) if drop_missing else len(rows))
    by_qid = {json.loads(r["extra"])["qid"]: r for r in records}
    for row in kept:
        assert by_qid[row["qid"]]["video_uri"] == str(videos / f"{row['vid']}.mp4")
    if not drop_missing:
        absent = next(row for row in rows if row["vid"] not in present)
        assert by_qid[absent["qid"]]["video_uri"] == str(videos / f"{absent['vid']}.mp4")
    (report,) = json.loads((out / "import.json").read_text())["splits"]
    assert report["missing_videos"] == vids[5:]
    assert report["missing_records"] == len(rows) - len(kept)
    assert report["videos"] == len(vids) and report["records"] == len(records)
    assert report["annotations"] == str(gt)


def test_import_qvhighlights_through_s3(tmp_path, fixtures_dir):
    """Annotations, videos and records all in a bucket, named by s3:// URIs."""
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        settings = [
            f"storage.s3.endpoint_url=http://{host}:{port}",
            "storage.s3.access_key_id=a",
            "storage.s3.secret_access_key=b",
        ]
        storage = Storage(load_config(None, settings).storage.s3)
        storage.ensure_bucket("s3://damo-data")
        root = "s3://damo-data/qvhighlights"
        gt = fixtures_dir / "qvhighlights" / "highlight_val_release.jsonl"
        storage.upload_file(gt, f"{root}/annotations/highlight_val_release.jsonl")
        rows = qvh_rows(fixtures_dir)
        vid = rows[0]["vid"]
        storage.write_bytes(f"{root}/videos/{vid}.mp4", b"x")
        storage.write_bytes(f"{root}/videos-old/{rows[1]['vid']}.mp4", b"x")  # another prefix
        overrides = [arg for setting in settings for arg in ("--set", setting)]
        result = damo(
            "data", "import", "qvhighlights", "--annotations", f"{root}/annotations",
            "--split", "val=highlight_val_release.jsonl", "--videos", f"{root}/videos",
            "--out", f"{root}/records", *overrides,
        )  # fmt: skip
        assert result.exit_code == 0, result.output
        local = tmp_path / "val.parquet"
        storage.download_file(f"{root}/records/val.parquet", local)
        records = pq.read_table(local).to_pylist()
        assert len(records) == len(rows)
        uris = {r["video_id"]: r["video_uri"] for r in records}
        assert uris[vid] == f"{root}/videos/{vid}.mp4"
        assert uris[rows[1]["vid"]] == f"{root}/videos/{rows[1]['vid']}.mp4"  # expected, absent
        report = json.loads(storage.read_bytes(f"{root}/records/import.json"))
        assert report["videos_listed"] == 1
        assert rows[1]["vid"] in report["splits"][0]["missing_videos"]
    finally:
        server.stop()


# ---- ActivityNet Captions ------------------------------------------------------------------------
def activitynet_entry(duration: float, *events: tuple[float, float, str]) -> dict:
    return {
        "duration": duration,
        "timestamps": [[s, e] for s, e, _ in events],
        "sentences": [f" {text}" for _, _, text in events],
    }


def test_import_activitynet(tmp_path):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    files = {
        "train.json": {
            "v_train1": activitynet_entry(50.0, (0, 10, "A man runs."), (8, 60, "He stops."))
        },
        "val_1.json": {"v_val1": activitynet_entry(30.0, (1, 5, "A dog barks."))},
        "val_2.json": {
            "v_test1": activitynet_entry(20.0, (2, 6, "A girl sings.")),
            "v_test2": activitynet_entry(40.0, (3, 9, "A boy jumps.")),
        },
    }
    for name, data in files.items():
        (annotations / name).write_text(json.dumps(data))
    videos = make_videos(tmp_path / "videos", ["v_train1.mp4", "v_val1.mp4", "v_test1.mkv"])
    out = tmp_path / "records"
    result = damo(
        "data", "import", "activitynet", "--annotations", annotations, "--videos", videos,
        "--out", out,
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    train, val, test = (read_split(out, split) for split in ("train", "val", "test"))
    assert [r["query"] for r in train] == ["A man runs.", "He stops."]
    assert train[1]["spans"] == [[8.0, 50.0]]  # clipped to the duration
    assert [r["video_id"] for r in val] == ["v_val1"]
    assert {r["video_id"]: r["video_uri"] for r in test} == {
        "v_test1": str(videos / "v_test1.mkv"),  # found whatever its extension
        "v_test2": str(videos / "v_test2.mp4"),  # not there: where it is expected
    }
    report = {s["split"]: s for s in json.loads((out / "import.json").read_text())["splits"]}
    assert report["test"]["annotations"] == str(annotations / "val_2.json")
    assert report["test"]["missing_videos"] == ["v_test2"]
    assert report["train"]["missing_videos"] == [] and report["train"]["records"] == 2


# ---- bad input: one line naming file and line, nothing written --------------------------------
BAD_INPUTS = {
    "charades-sta": ("charades_sta_test.txt", "3MSZA 1.0 2.0##ok.\n3MSZA 1.0 person\n", 2),
    "qvhighlights": (
        "highlight_val_release.jsonl",
        '{"qid": 1, "vid": "a", "query": "q", "duration": 10, "relevant_windows": [[0, 2]]}\n'
        '{"qid": 2, "vid": "b", "query": "q", "duration": 10, "relevant_windows": [[0]]}\n',
        2,
    ),
    "activitynet": (
        "val_2.json",
        '{\n "v_a": {"duration": 5, "timestamps": [[0, 1]], "sentences": [" a"]},\n'
        ' "v_b": {"duration": 5, "timestamps": [[0, 1]]}\n}\n',
        3,
    ),
}
GOOD_TRAIN = {
    "charades-sta": ("charades_sta_train.txt", "3MSZA 1.0 2.0##fine.\n"),
    "qvhighlights": ("highlight_train_release.jsonl", BAD_INPUTS["qvhighlights"][1].split("\n")[0]),
    "activitynet": ("train.json", json.dumps({"v_a": activitynet_entry(5.0, (0, 1, "a"))})),
}


@pytest.mark.parametrize("dataset", sorted(BAD_INPUTS))
def test_malformed_line_names_file_and_line_and_writes_nothing(tmp_path, dataset):
    bad_name, bad_text, line = BAD_INPUTS[dataset]
    good_name, good_text = GOOD_TRAIN[dataset]
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / good_name).write_text(good_text)
    (annotations / bad_name).write_text(bad_text)
    out = tmp_path / "records"
    out.mkdir()
    (out / "train.parquet").write_bytes(b"an older import")
    splits = ["--split", f"train={good_name}", "--split", f"test={bad_name}"]
    result = damo(
        "data", "import", dataset, "--annotations", annotations, *splits,
        "--videos", tmp_path / "videos", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"error: {annotations / bad_name}:{line}:" in result.output
    assert "Traceback" not in result.output and len(result.output.strip().splitlines()) == 1
    # the good split parsed first is not written either, nor the report
    assert sorted(p.name for p in out.iterdir()) == ["train.parquet"]
    assert (out / "train.parquet").read_bytes() == b"an older import"


def test_bad_durations_csv_names_its_line(tmp_path):
    annotations = tmp_path / "annotations"
    write_charades(annotations)
    csv = annotations / "Charades_v1_test.csv"
    csv.write_text("id,length\nY6R7T,31.2\nKRF68,long\n")
    out = tmp_path / "records"
    result = damo(
        "data", "import", "charades-sta", "--annotations", annotations, "--durations", csv,
        "--videos", tmp_path / "videos", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    assert f"{csv}:3: bad length 'long'" in result.output
    assert not out.exists()


def test_missing_annotation_file_is_one_line_and_writes_nothing(tmp_path):
    annotations = tmp_path / "annotations"
    annotations.mkdir()
    (annotations / "highlight_train_release.jsonl").write_text(GOOD_TRAIN["qvhighlights"][1])
    out = tmp_path / "records"
    result = damo(
        "data", "import", "qvhighlights", "--annotations", annotations,
        "--videos", tmp_path / "videos", "--out", out,
    )  # fmt: skip
    assert result.exit_code == 2, result.output
    # the default files are train, val and test: val is the first one that is not there
    assert f"{annotations / 'highlight_val_release.jsonl'}: not_found" in result.output
    assert not out.exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["youcook2", "--annotations", "a"], "unknown format 'youcook2' (known: charades-sta, "),
        (["activitynet", "--split", "test"], "'test' is not NAME=FILE"),
        (["activitynet", "--split", "../x=val_2.json"], "split name '../x'"),
        (["qvhighlights"], "give --annotations PREFIX, or each file with --split"),
        (["activitynet", "--annotations", "a", "--durations", "c.csv"], "are for charades-sta"),
        (["activitynet", "--annotations", "a", "--val-from-train", "0.1"], "no val split"),
    ],
)
def test_bad_options_are_one_clear_error(tmp_path, args, message):
    out = tmp_path / "records"
    result = damo("data", "import", *args, "--videos", tmp_path, "--out", out)
    assert result.exit_code == 2, result.output
    assert message in " ".join(result.output.split())
    assert not out.exists()


def test_help_names_the_formats_and_options():
    result = damo("data", "import", "--help")
    assert result.exit_code == 0, result.output
    text = " ".join(result.output.split())
    formats = ("charades-sta", "qvhighlights", "activitynet")
    options = ("--annotations", "--videos", "--out", "--split", "--durations", "--val-from-train")
    for word in (*formats, *options, "--drop-missing"):
        assert word in text
