"""The trusted weights readings kept in the data folder (appliance/weights.py): a reading outlives
the manager that took it, and a file that cannot be used is measured around, never a failed load."""

from __future__ import annotations

from pathlib import Path

from appliance.weights import FILE, WeightsRecords, weights_key


def test_a_reading_is_read_back_by_the_next_process_and_tied_to_artefacts_backend_and_settings(
    tmp_path: Path,
) -> None:
    key = weights_key("digest", "onnxruntime-cpu", {"engine.intra_op_threads": 2})
    WeightsRecords(tmp_path / "data").put(key, "minilm", 121 << 20)
    assert WeightsRecords(tmp_path / "data").get(key) == 121 << 20
    for other in (
        weights_key("rebuilt", "onnxruntime-cpu", {"engine.intra_op_threads": 2}),
        weights_key("digest", "onnxruntime-cuda", {"engine.intra_op_threads": 2}),
        weights_key("digest", "onnxruntime-cpu", {"engine.intra_op_threads": 4}),
    ):
        assert WeightsRecords(tmp_path / "data").get(other) is None


def test_a_broken_file_is_measured_again_and_replaced(tmp_path: Path) -> None:
    (tmp_path / FILE).write_text("{not json")
    records = WeightsRecords(tmp_path)
    assert records.get("k") is None
    records.put("k", "minilm", 5)
    assert WeightsRecords(tmp_path).get("k") == 5


def test_a_data_folder_that_cannot_be_written_keeps_the_reading_in_memory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("")
    records = WeightsRecords(blocker / "data")  # under a file: never writable
    records.put("k", "minilm", 7)
    assert records.get("k") == 7
