"""The unified record schema and the real dataset formats."""

from __future__ import annotations

import json

import pyarrow as pa
import pytest

from damo.data.records import (
    RECORD_SCHEMA,
    RecordFormatError,
    make_record,
    parse_activitynet,
    parse_charades_sta,
    read_qvhighlights,
    read_records,
    records_to_table,
    write_qvhighlights_submission,
    write_records,
)
from damo.storage import Storage

CHARADES_STA = (
    (
        "3MSZA 24.3 30.4##person turn a light on.\n"
        "3MSZA 0 6.1##person sitting on the floor.\n"
        "  \n"  # a blank line, as files sometimes end with
    )
    + """\
AO8RW 2.5 9.8## a person is putting a book on a shelf.
Y6R7T 21.0 40.5##person opens the door.
"""
)

ACTIVITYNET = {
    "v_QOlSCBRmfWY": {
        "duration": 82.73,
        "timestamps": [[0.83, 19.86], [17.37, 60.81], [56.26, 85.0]],
        "sentences": [
            "A young woman is seen standing in a room and leads into her dancing.",
            " The girl dances around the room while the camera captures her movements.",
            " She continues dancing around the room and ends by laying on the floor.",
        ],
    },
    "v_ehGHCYKzyZ8": {
        "duration": 61.72,
        "timestamps": [[0, 12.5], [70.0, 80.0]],
        "sentences": [" Two men are standing on a court.", " They play tennis."],
    },
}


def test_qvhighlights_val_fixture(fixtures_dir):
    uri = str(fixtures_dir / "qvhighlights" / "highlight_val_release.jsonl")
    records = read_qvhighlights(uri, "val", video_uri_template="s3://qvh/{video_id}.mp4")
    assert len(records) == 1550
    assert sum(len(r["spans"]) > 1 for r in records) == 530
    assert len({r["id"] for r in records}) == 1550
    with open(uri) as f:
        first_line = json.loads(f.readline())
    first = records[0]
    assert first["query"] == first_line["query"].strip()
    assert first["video_id"] == first_line["vid"]
    assert first["video_uri"] == f"s3://qvh/{first_line['vid']}.mp4"
    assert first["spans"] == [[float(s), float(e)] for s, e in first_line["relevant_windows"]]
    extra = json.loads(first["extra"])
    assert extra["qid"] == first_line["qid"]
    assert extra["saliency_scores"] == first_line["saliency_scores"]
    for r in records:
        assert r["task"] == "grounding" and r["source"] == "qvhighlights"
        assert all(0 <= s < e <= r["duration"] for s, e in r["spans"])
        assert r["answer"].count("from ") == len(r["spans"])
    table = records_to_table(records)
    assert table.schema.equals(RECORD_SCHEMA) and table.num_rows == 1550


def test_charades_sta_format_and_edge_cases():
    records = parse_charades_sta(
        CHARADES_STA, "test", durations={"3MSZA": 29.0, "AO8RW": 30.0}, name="sample.txt"
    )
    assert len(records) == 4  # the blank line is skipped
    light, sitting, book, door = records
    assert light["spans"] == [[24.3, 29.0]]  # past the duration: clipped
    assert light["answer"] == "from 24.3 to 29.0 seconds."
    assert json.loads(light["extra"]) == {}
    assert sitting["spans"] == [[0.0, 6.1]] and sitting["query"] == "person sitting on the floor."
    assert book["query"] == "a person is putting a book on a shelf."  # leading space stripped
    assert door["duration"] is None and door["spans"] == [[21.0, 40.5]]  # unknown duration
    assert {r["video_id"] for r in records} == {"3MSZA", "AO8RW", "Y6R7T"}
    assert records[0]["id"] == "charades_sta-test-1"
    with pytest.raises(RecordFormatError, match="sample.txt:1"):
        parse_charades_sta("3MSZA 24.3 person turn a light on.", "test", name="sample.txt")


def test_activitynet_format_and_edge_cases():
    records = parse_activitynet(json.dumps(ACTIVITYNET), "val_2")
    assert len(records) == 5
    by_query = {r["query"]: r for r in records}
    dancing = by_query["She continues dancing around the room and ends by laying on the floor."]
    assert dancing["spans"] == [[56.26, 82.73]]  # clipped to the duration
    assert all(not r["query"].startswith(" ") for r in records)
    tennis = by_query["They play tennis."]
    assert tennis["spans"] == [] and json.loads(tennis["extra"]) == {"dropped_spans": 1}
    assert {r["split"] for r in records} == {"val_2"}
    with pytest.raises(RecordFormatError):
        parse_activitynet('{"v_x": {"duration": 3}}', "val_1")


def test_records_round_trip_through_s3(s3_storage):
    records = parse_charades_sta(CHARADES_STA, "train") + [
        make_record(
            id="d1",
            video_id="v",
            task="dialogue",
            turns=[{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}],
            source="synthetic",
            split="train",
        )
    ]
    uri = "s3://damo-test/records-test/charades.parquet"
    assert write_records(records, uri, s3_storage) == 5
    table = read_records(uri, s3_storage)
    assert table.to_pylist() == records
    assert table.schema.field("spans").type == pa.list_(pa.list_(pa.float64(), 2))
    with pytest.raises(ValueError, match="unknown task"):
        make_record(id="x", video_id="v", task="nope", source="s")


def test_qvhighlights_submission_writer(tmp_path, fixtures_dir):
    preds = [
        {
            "qid": 2579,
            "query": "A girl and her mother cooked while talking with each other on facetime.",
            "vid": "NUsG9BgSes0_210.0_360.0",
            "pred_relevant_windows": [[0.0, 70.0, 0.9], [80, 90, 0.25]],
            "pred_saliency_scores": [0.1, 0.2, 0.3],
        }
    ]
    path = tmp_path / "submission.jsonl"
    write_qvhighlights_submission(preds, str(path), Storage())
    rows = [json.loads(line) for line in path.read_text().splitlines()]
    assert rows == [
        {
            "qid": 2579,
            "query": preds[0]["query"],
            "vid": "NUsG9BgSes0_210.0_360.0",
            "pred_relevant_windows": [[0.0, 70.0, 0.9], [80.0, 90.0, 0.25]],
            "pred_saliency_scores": [0.1, 0.2, 0.3],
        }
    ]
    # the same keys as the official sample submission
    sample = json.loads(
        (fixtures_dir / "qvhighlights" / "sample_val_preds.jsonl").open().readline()
    )
    assert set(rows[0]) == set(sample)
