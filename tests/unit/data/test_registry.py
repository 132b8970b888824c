"""The registry of data sources (acc_clip/data/__init__.py): which source reads a path (--dataset-type, or
the first in SOURCES' order that detects it), an unknown --dataset-type, and the flags of a source other
than the one read: announced as having no effect, or refused where the source says so (refuse_elsewhere)."""

from __future__ import annotations

import pytest

from acc_clip import data
from acc_clip.config.parsing import Config
from acc_clip.data import SOURCES, DataOptions, eval_source, source_for
from acc_clip.data.source import Source
from acc_clip.errors import UsageError
from acc_clip.train.config import parse_train_config

SHARDS = "shards/{00000..00003}.tar"


def test_the_sources_and_their_detection_order():
    assert list(SOURCES) == ["csv", "parquet", "webdataset", "synthetic"]
    assert all(source.name == name for name, source in SOURCES.items())


@pytest.mark.parametrize(
    "path, name",
    [
        ("train.csv", "csv"),
        ("a/b/train.tsv", "csv"),
        (SHARDS, "webdataset"),
        ("a/0.tar", "webdataset"),
        ("a/{0..3}.tar::b/{0..1}.tar", "webdataset"),
        ("train.parquet", "parquet"),
        ("a/part-*.parquet", "parquet"),
    ],
)
def test_auto_detects_the_source_from_the_path(path, name):
    assert source_for(path, "auto").name == name


def test_a_folder_is_shards_unless_an_earlier_source_claims_it(tmp_path):
    (tmp_path / "shards").mkdir()
    (tmp_path / "odd.csv").mkdir()  # a folder named like a CSV: csv comes first in SOURCES
    assert source_for(str(tmp_path / "shards"), "auto").name == "webdataset"
    assert source_for(str(tmp_path / "odd.csv"), "auto").name == "csv"
    assert source_for(str(tmp_path / "odd.csv"), "webdataset").name == "webdataset"  # the flag wins


def test_the_first_source_that_detects_a_path_reads_it(monkeypatch):
    class Everything(Source):
        name = "everything"

        def detect(self, path: str) -> bool:
            return True

    monkeypatch.setattr(data, "SOURCES", {**SOURCES, "everything": Everything()})
    assert source_for("train.csv", "auto").name == "csv"
    assert source_for("train.orc", "auto").name == "everything"
    monkeypatch.setattr(data, "SOURCES", {"everything": Everything(), **SOURCES})
    assert source_for("train.csv", "auto").name == "everything"


def test_a_path_no_source_detects_asks_for_the_dataset_type():
    with pytest.raises(UsageError) as error:
        source_for("train.orc", "auto")
    assert str(error.value) == (
        "train.orc: cannot tell the dataset type from the name; pass --dataset-type csv or parquet or webdataset"
    )  # synthetic is never detected, so never suggested


def test_an_unknown_dataset_type_is_one_line_naming_the_sources():
    with pytest.raises(UsageError, match=r"^--dataset-type 'orc': expected auto, csv, parquet, webdataset, synthetic$"):
        source_for("x", "orc")
    with pytest.raises(
        UsageError,
        match=r"^--dataset-type 'orc': must be auto or a source: csv, parquet, webdataset, "
        r"synthetic$",
    ):
        parse_train_config(["--train-data", "x.csv", "--dataset-type", "orc"])
    assert source_for(None, "synthetic").name == "synthetic"


@pytest.mark.parametrize("name", sorted(SOURCES))
def test_every_registered_source_can_be_named_on_the_command_line(name):
    """The flag's domain knows every source, subclasses of other sources too (parquet is the CSV source's)."""
    config, _ = parse_train_config(["--train-data", "data/train-part", "--dataset-type", name])
    assert config[DataOptions].dataset_type == name


def test_train_data_is_required_except_for_synthetic_data():
    with pytest.raises(
        UsageError, match=r"^--train-data is required \(a CSV file, parquet or datasets files, or webdataset shards\)$"
    ):
        parse_train_config([])
    config, _ = parse_train_config(["--dataset-type", "synthetic"])
    assert config.data.train_data is None


def test_csv_flags_on_shards_are_announced_as_having_no_effect():
    _, notices = parse_train_config(["--train-data", SHARDS, "--csv-separator", ";", "--skip-bad-rows"])
    assert f"--csv-separator has no effect: --train-data {SHARDS} is webdataset data" in notices
    assert f"--skip-bad-rows has no effect: --train-data {SHARDS} is webdataset data" in notices
    # Given at its default (the vendor's command passes --csv-img-key filepath whatever the data): no notice.
    _, notices = parse_train_config(["--train-data", SHARDS, "--csv-img-key", "filepath"])
    assert not [n for n in notices if "--csv-img-key" in n]


@pytest.mark.parametrize(
    "argv, what",
    [
        (["--train-data", "train.csv"], "--train-data train.csv is csv data"),
        (["--dataset-type", "synthetic"], "--dataset-type synthetic is synthetic data"),
    ],
)
def test_shard_flags_on_other_data_are_refused(argv, what):
    with pytest.raises(UsageError) as error:
        parse_train_config([*argv, "--dataset-resampled"])
    assert str(error.value) == f"--dataset-resampled applies to webdataset data; {what}"


def test_refuse_elsewhere_decides_between_a_notice_and_a_refusal(monkeypatch):
    csv_source, shard_source = type(SOURCES["csv"]), type(SOURCES["webdataset"])
    monkeypatch.setattr(csv_source, "refuse_elsewhere", True)
    monkeypatch.setattr(shard_source, "refuse_elsewhere", False)
    with pytest.raises(
        UsageError,
        match=rf"^--csv-separator applies to csv data; --train-data {SHARDS} is "
        "webdataset data$",
    ):
        parse_train_config(["--train-data", SHARDS, "--csv-separator", ";"])
    _, notices = parse_train_config(["--train-data", "train.csv", "--dataset-resampled"])
    assert "--dataset-resampled has no effect: --train-data train.csv is csv data" in notices


def test_parquet_reads_the_csv_column_flags_and_announces_the_csv_only_ones(tmp_path):
    """--csv-img-key / --csv-caption-key name parquet columns too: no notice; the separator is CSV's alone."""
    (tmp_path / "part.parquet").touch()
    folder = str(tmp_path)
    assert source_for(folder, "auto").name == "parquet"  # a folder of parquet files, not a shard folder
    _, notices = parse_train_config(["--train-data", folder, "--csv-img-key", "image", "--csv-caption-key", "text"])
    assert not [n for n in notices if "--csv-" in n]
    _, notices = parse_train_config(["--train-data", folder, "--csv-separator", ";"])
    assert "--csv-separator has no effect on parquet data (it applies to CSV files)" in notices


def test_the_chosen_source_s_own_check_gives_its_notices():
    _, notices = parse_train_config(["--train-data", "train.csv", "--train-num-samples", "100"])
    assert any(n.startswith("--train-num-samples 100 has no effect on CSV data") for n in notices)


def test_synthetic_training_reads_its_validation_set_by_its_path():
    """Synthetic data cannot validate: with --dataset-type synthetic the validation set's own path says its source."""
    assert eval_source("val.csv", "synthetic").name == "csv"
    assert eval_source("shards/{0..3}.tar", "synthetic").name == "webdataset"
    with pytest.raises(UsageError, match=r"^x: synthetic data cannot be a validation set; give a CSV or shards$"):
        SOURCES["synthetic"].eval_loader(
            Config([DataOptions()]), "x", None, None, rank=0, world_size=1, expected_samples=None
        )
