"""The CSV pipeline: clear errors, bad samples counted, an epoch order that is rebuilt exactly and
matches open_clip_train's, and augmentation that does not depend on workers."""

import pytest
import torch
from torch.utils.data import DataLoader

from acc_clip.data import check_bad_fraction
from acc_clip.data.common import collate_skipping_bad
from acc_clip.data.csv import CsvDataset, EpochBatchSampler, build_train_loader, epoch_permutation
from acc_clip.errors import AccClipError
from helpers import TINY_RN


@pytest.fixture(scope="module")
def bundle():
    import open_clip

    _, preprocess_train, _ = open_clip.create_model_and_transforms(TINY_RN)
    return preprocess_train, open_clip.get_tokenizer(TINY_RN)


def dataset(path, bundle, **kwargs):
    preprocess, tokenizer = bundle
    return CsvDataset(str(path), transform=preprocess, tokenizer=tokenizer, sep=",", **kwargs)


def test_missing_columns_lists_the_columns_found(tmp_path, bundle):
    path = tmp_path / "x.csv"
    path.write_text("image,caption\na.jpg,a cat\n")
    with pytest.raises(AccClipError, match=r"x\.csv: no column 'filepath', 'title'.*columns found: 'image', 'caption'"):
        dataset(path, bundle)


def test_empty_csv_is_an_error(tmp_path, bundle):
    empty, header_only = tmp_path / "empty.csv", tmp_path / "header.csv"
    empty.write_text("")
    header_only.write_text("filepath,title\n")
    with pytest.raises(AccClipError, match=r"empty.csv: the CSV is empty"):
        dataset(empty, bundle)
    with pytest.raises(AccClipError, match=r"header.csv: the CSV has a header but no rows"):
        dataset(header_only, bundle)


@pytest.mark.parametrize(
    "body, row, line, fields",
    [
        # an unquoted comma in the first caption: pandas took column 1 as the index, shifting every value
        ("a.jpg,a cat, sitting\nb.jpg,a dog\n", 1, 2, 3),
        ("a.jpg,a cat\nb.jpg\n", 2, 3, 1),  # a cut line
        ('a.jpg,"a cat, quoted"\n\nb.jpg,a dog\nc.jpg,x,y\n', 3, 5, 3),  # quotes and blank lines counted right
    ],
)
def test_a_row_with_another_field_count_than_the_header_names_file_row_and_line(tmp_path, body, row, line, fields):
    """One reader serves the trainer, the converter and evaluation (acc_clip/data/csv_file.py)."""
    from acc_clip.data.csv_file import read_csv_columns

    path = tmp_path / "shifted.csv"
    path.write_text("filepath,title\n" + body)
    with pytest.raises(
        AccClipError,
        match=rf"shifted\.csv: row {row} \(line {line}\) has {fields} fields, the "
        r"header 2",
    ) as error:
        read_csv_columns(str(path), img_key="filepath", caption_key="title", sep=",")
    assert "\n" not in str(error.value)


def test_the_converter_refuses_a_shifted_csv_instead_of_writing_no_samples(tmp_path, capsys):
    from acc_clip import cli
    from acc_clip.errors import DataError

    path = tmp_path / "shifted.csv"
    path.write_text("filepath,title\na.jpg,a cat, sitting\nb.jpg,a dog\n")
    status = cli.main(["shards", "--csv", str(path), "--csv-separator", ",", "--out", str(tmp_path / "out")])
    assert status == DataError.exit_status == 3  # a data error (was the one usage status 2 before error kinds)
    assert "shifted.csv: row 1 (line 2) has 3 fields" in capsys.readouterr().err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_quoted_fields_and_a_bom_read_as_pandas_reads_them(tmp_path):
    import pandas as pd

    from acc_clip.data.csv_file import read_csv_columns

    path = tmp_path / "ok.csv"
    path.write_bytes('\ufefffilepath,title\n"a,b.jpg","say ""hi"", twice"\nc.jpg,\n'.encode("utf-8"))
    frame = pd.read_csv(path, sep=",", dtype=str, keep_default_na=False)
    ours = read_csv_columns(str(path), img_key="filepath", caption_key="title", sep=",")
    assert (
        ours == (frame["filepath"].tolist(), frame["title"].tolist()) == (["a,b.jpg", "c.jpg"], ['say "hi", twice', ""])
    )


def test_missing_corrupt_and_empty_rows_are_skipped_and_counted(tmp_path, train_csv, bundle):
    good = train_csv.read_text().splitlines()[1]
    corrupt = tmp_path / "corrupt.jpg"
    corrupt.write_bytes(b"\xff\xd8\xff\xe0 not really a jpeg")
    path = tmp_path / "mixed.csv"
    path.write_text(
        "\n".join(
            ["filepath,title", good, f"{tmp_path}/missing.jpg,a cat", f"{corrupt},a dog", f"{good.split(',')[0]},  "]
        )
        + "\n"
    )
    data = dataset(path, bundle)
    loader = DataLoader(data, batch_size=4, collate_fn=collate_skipping_bad)
    batch = next(iter(loader))
    assert batch.num_bad == 3 and batch.indices.tolist() == [0] and batch.images.shape[0] == 1


def test_skip_bad_rows_skips_counts_and_names_them_in_the_trainer_converter_and_eval(tmp_path, bundle, caplog):
    from acc_clip.data.csv_file import read_csv_columns

    path = tmp_path / "shifted.csv"
    path.write_text("filepath,title\na.jpg,a cat, sitting\nb.jpg,a dog\nc.jpg\nd.jpg,a bird\n")
    with pytest.raises(AccClipError, match=r"or pass --skip-bad-rows to skip such rows$"):
        read_csv_columns(str(path), img_key="filepath", caption_key="title", sep=",")
    with caplog.at_level("WARNING"):
        paths, captions = read_csv_columns(
            str(path), img_key="filepath", caption_key="title", sep=",", skip_bad_rows=True
        )
    assert (paths, captions) == (["b.jpg", "d.jpg"], ["a dog", "a bird"])  # nothing shifted
    assert (
        "shifted.csv: skipped 2 row(s) whose field count differs from the header's 2 (--skip-bad-rows): "
        "row 1 (line 2) has 3 fields; row 3 (line 4) has 1 fields"
    ) in caplog.text
    assert dataset(path, bundle, skip_bad_rows=True).filepaths == ["b.jpg", "d.jpg"]  # the trainer's reader


def test_an_image_path_that_is_a_fifo_or_too_large_is_skipped_and_counted_not_read(tmp_path, train_csv, bundle, caplog):
    import os

    good_path, caption = train_csv.read_text().splitlines()[1].split(",", 1)
    fifo = tmp_path / "pipe.jpg"
    os.mkfifo(fifo)  # opening it for reading would block until a writer came
    path = tmp_path / "bounded.csv"
    path.write_text(
        "\n".join(
            ["filepath,title", f"{good_path},{caption}", f"{fifo},a pipe", "/dev/zero,endless", f"{good_path},again"]
        )
        + "\n"
    )
    size = os.path.getsize(good_path)
    with caplog.at_level("WARNING"):
        batch = collate_skipping_bad([dataset(path, bundle, max_image_bytes=size)[i] for i in range(4)])
        assert batch.num_bad == 2 and batch.indices.tolist() == [0, 3]
        assert collate_skipping_bad([dataset(path, bundle, max_image_bytes=size - 1)[0]]).num_bad == 1
    assert f"{fifo}: not a regular file" in caplog.text and "/dev/zero: not a regular file" in caplog.text
    assert f"{size} bytes, above the limit of {size - 1} (--max-image-bytes)" in caplog.text


def test_reading_a_folder_as_an_image_leaves_no_file_open(tmp_path):
    import os

    from acc_clip.io.files import ImageFileError, read_image_file

    before = len(os.listdir("/proc/self/fd"))
    for _ in range(50):
        with pytest.raises(ImageFileError, match="not a regular file"):
            read_image_file(str(tmp_path))
    assert len(os.listdir("/proc/self/fd")) == before


def test_a_csv_path_that_is_not_a_regular_file_is_one_line(tmp_path):
    import os

    from acc_clip.data.csv_file import read_csv_columns

    fifo = tmp_path / "rows.csv"
    os.mkfifo(fifo)
    for path in (str(fifo), "/dev/zero"):
        with pytest.raises(AccClipError, match=rf"^{path}: not a regular file$"):
            read_csv_columns(path, img_key="filepath", caption_key="title", sep=",")


def test_bad_fraction_threshold():
    assert check_bad_fraction(bad=1, read=200, max_fraction=0.01) is None
    assert "3 of 200 samples" in check_bad_fraction(bad=3, read=200, max_fraction=0.01)
    assert check_bad_fraction(bad=50, read=60, max_fraction=0.01) is None  # too few read to judge yet


def test_epoch_order_matches_open_clip_single_process_loader():
    # open_clip_train: torch.manual_seed(seed), then a DataLoader(shuffle=True, drop_last=True, workers>0) per epoch.
    torch.manual_seed(7)
    loader = DataLoader(list(range(50)), batch_size=8, shuffle=True, drop_last=True, num_workers=1)
    for epoch in range(3):
        theirs = torch.cat(list(loader)).tolist()
        assert epoch_permutation(50, 7, epoch).tolist()[: len(theirs)] == theirs


def test_rank_slices_make_up_the_single_process_batches():
    one = EpochBatchSampler(100, batch_size=8, seed=3)
    two = [EpochBatchSampler(100, batch_size=4, seed=3, rank=r, world_size=2) for r in range(2)]
    for sampler in [one, *two]:
        sampler.set_epoch(1)
    for big, small0, small1 in zip(one, *two):
        assert big == small0 + small1
    assert len(one) == len(two[0]) == 12


def test_start_batch_continues_with_the_next_unseen_batch():
    sampler = EpochBatchSampler(100, batch_size=8, seed=3)
    sampler.set_epoch(2)
    full = list(sampler)
    sampler.set_epoch(2, start_batch=5)
    assert list(sampler) == full[5:]
    sampler.set_epoch(3)
    assert list(sampler) != full


def test_too_few_samples_for_one_global_batch():
    with pytest.raises(AccClipError, match="10 samples cannot fill one global batch of 16"):
        EpochBatchSampler(10, batch_size=8, seed=0, world_size=2)


def test_augmentation_is_the_same_with_and_without_workers(train_csv, bundle):
    data = dataset(train_csv, bundle, seed=5)
    batches = {}
    for workers in (0, 2):
        loader = build_train_loader(data, batch_size=8, workers=workers, seed=5, rank=0, world_size=1, pin_memory=False)
        loader.batch_sampler.set_epoch(1)
        batches[workers] = [b for _, b in zip(range(3), loader)]
    for a, b in zip(batches[0], batches[2]):
        assert torch.equal(a.indices, b.indices) and torch.equal(a.images, b.images) and torch.equal(a.texts, b.texts)
    # ...and the draws do change with the epoch (RandomResizedCrop is active).
    assert not torch.equal(data[(1, 0)].image, data[(2, 0)].image)
