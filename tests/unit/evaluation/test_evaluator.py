"""Retrieval metrics against open_clip's, the COCO protocol, and `acc-clip eval` in this process. (1 vs 2
processes under torchrun: tests/integration/test_eval_processes.py.)"""

from __future__ import annotations

import json

import open_clip
import pytest
import torch
from open_clip_train.train import get_clip_metrics

from acc_clip import cli
from acc_clip.data.csv import CsvDataset, build_eval_loader
from acc_clip.errors import AccClipError, CheckpointError, DataError
from acc_clip.evaluation.evaluator import evaluate_retrieval
from acc_clip.evaluation.gather import gather_rows_by_index
from acc_clip.evaluation.retrieval import coco_retrieval_metrics, retrieval_metrics
from acc_clip.model.weights import load_weights
from acc_clip.train.config import train_config
from helpers import eval_loader, write_image, write_model_dir


def normalized(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True)


# --- metrics on features -------------------------------------------------------------------------


def assert_same_as_open_clip(image_features, text_features, logit_scale):
    ours = retrieval_metrics(image_features, text_features, logit_scale)
    theirs = get_clip_metrics(image_features, text_features, logit_scale)
    assert ours.keys() == theirs.keys()
    for key in theirs:
        assert ours[key] == float(theirs[key]), key


@pytest.mark.parametrize("num_rows,seed", [(1, 0), (2, 1), (7, 2), (64, 3), (123, 4)])
def test_retrieval_metrics_equal_open_clip_on_random_features(num_rows, seed):
    generator = torch.Generator().manual_seed(seed)
    images = normalized(torch.randn(num_rows, 16, generator=generator))
    texts = normalized(torch.randn(num_rows, 16, generator=generator))
    assert_same_as_open_clip(images, texts, torch.tensor(100.0))


@pytest.mark.parametrize("num_rows,noise", [(100, 0.5), (151, 1.0), (40, 0.1)])
def test_retrieval_metrics_equal_open_clip_on_paired_features(num_rows, noise):
    # Captions close to their images: low ranks, the shape real validation metrics have.
    generator = torch.Generator().manual_seed(num_rows)
    images = normalized(torch.randn(num_rows, 32, generator=generator))
    texts = normalized(images + noise * torch.randn(num_rows, 32, generator=generator) / 32**0.5)
    metrics = retrieval_metrics(images, texts, torch.tensor(14.3))
    assert metrics["image_to_text_R@1"] > 0 and metrics["image_to_text_R@10"] <= 1
    assert_same_as_open_clip(images, texts, torch.tensor(14.3))


def test_identical_features_tie_in_the_rows_favour():
    # Rows 0 and 1 show the same image with two captions that it scores equally. Each caption ties
    # between images 0 and 1, each image between captions 0 and 1: no tie may count against the
    # pair (argsort would break half of them the wrong way).
    images = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0]])
    texts = normalized(torch.tensor([[1.0, 0.1], [1.0, -0.1], [0.0, 1.0]]))
    metrics = retrieval_metrics(images, texts, 10.0)
    for direction in ("image_to_text", "text_to_image"):
        assert metrics[f"{direction}_R@1"] == 1.0 and metrics[f"{direction}_mean_rank"] == 1.0


def test_coco_metrics_count_any_caption_of_an_image_and_rank_unique_images():
    image_a, image_b = [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]
    # rows: (image, caption); image A has two captions, its SECOND one is its best.
    image_rows = torch.tensor([image_a, image_a, image_b])
    captions = torch.tensor([[0.1, 0.0, 1.0], [1.0, 0.0, 0.0], [0.9, 0.5, 0.0]])
    keys = ["a.jpg", "a.jpg", "b.jpg"]
    # A scores captions (0.1, 1.0, 0.9): its 2nd caption is top-1 -> hit. B scores (0, 0, 0.5) -> hit.
    # Caption 3 (of B) scores A 0.9 > B 0.5: its image is 2nd -> miss at 1, hit at 5.
    metrics = coco_retrieval_metrics(image_rows, captions, keys)
    assert metrics["coco_num_images"] == 2
    assert metrics["coco_image_to_text_R@1"] == 1.0
    assert metrics["coco_text_to_image_R@1"] == pytest.approx(2 / 3)
    assert metrics["coco_text_to_image_R@5"] == 1.0
    # Row-level pairs see it differently: row 0's own caption is only 3rd for its image.
    assert retrieval_metrics(image_rows, captions, 1.0)["image_to_text_R@1"] < 1.0


def test_coco_image_to_text_misses_when_no_caption_is_in_top_k():
    # One image with two captions, both beaten by 10 captions of other images.
    generator = torch.Generator().manual_seed(0)
    target = torch.tensor([[1.0] + [0.0] * 15])
    others = torch.randn(10, 16, generator=generator).abs() + 0.1
    others[:, -1] = 0  # the target's captions point along the last axis: others score them 0
    others = normalized(others)
    image_rows = torch.cat([target, target, others])
    captions = torch.cat([torch.tensor([[0.0] * 15 + [1.0]] * 2), target.repeat(10, 1) + others * 0.01])
    metrics = coco_retrieval_metrics(image_rows, captions, ["t", "t"] + [f"o{i}" for i in range(10)])
    # The target image ranks its captions 11th and 12th: no hit even at 10; each other image's own caption is its 1st.
    scores = image_rows[0] @ captions.t()
    assert (scores[2:] > scores[:2].max()).all()
    assert metrics["coco_image_to_text_R@10"] == metrics["coco_image_to_text_R@1"] == 10 / 11


# --- evaluation over a loader --------------------------------------------------------------------


def test_evaluate_retrieval_matches_features_encoded_by_hand(odd_val_csv, tiny, accelerator):
    _, model, preprocess, tokenizer = tiny
    model.train()
    metrics = evaluate_retrieval(model, eval_loader(odd_val_csv, tiny, accelerator, batch_size=3), accelerator)
    assert model.training, "the train loop's model must come back in train mode"
    assert metrics["num_samples"] == 10 and metrics["num_bad"] == 1
    assert metrics["coco_num_images"] == 8

    dataset = CsvDataset(odd_val_csv, transform=preprocess, tokenizer=tokenizer, augment_seeded=False)
    good = [s for s in (dataset[i] for i in range(len(dataset))) if s is not None]
    files = [dataset.filepaths[s.index] for s in good]
    model.eval()
    with torch.no_grad():
        images = model.encode_image(torch.stack([s.image for s in good]), normalize=True)
        texts = model.encode_text(torch.stack([s.text for s in good]), normalize=True)
        scale = model.logit_scale.exp()
    # a shared image gets the features of its first row, bit for bit
    images = images[[files.index(f) for f in files]]
    logits = scale * images @ texts.t()
    labels = torch.arange(len(good))
    loss = (
        torch.nn.functional.cross_entropy(logits, labels) + torch.nn.functional.cross_entropy(logits.t(), labels)
    ) / 2
    assert metrics["val_loss"] == pytest.approx(loss.item(), abs=1e-5)
    expected = {**retrieval_metrics(images, texts, scale), **coco_retrieval_metrics(images, texts, files)}
    for key, value in expected.items():
        assert metrics[key] == pytest.approx(value, abs=1e-9), key


def good_rows(odd_val_csv, preprocess, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    dataset = CsvDataset(odd_val_csv, transform=preprocess, tokenizer=tokenizer, augment_seeded=False)
    good = [s for s in (dataset[i] for i in range(len(dataset))) if s is not None]
    return torch.stack([s.image for s in good]), torch.stack([s.text for s in good])


def test_siglip_validation_loss_is_the_sigmoid_loss_of_the_whole_set(odd_val_csv, tiny, accelerator):
    """With the SigLIP objective the validation loss is open_clip's SigLipLoss over the whole set as
    one batch (logit bias included), not the softmax CLIP loss."""
    from open_clip.loss import SigLipLoss

    from acc_clip.loss import create_objective

    name, model, preprocess, tokenizer = tiny
    model.logit_bias = torch.nn.Parameter(torch.tensor(-4.0))  # as open_clip builds a SigLIP model
    try:
        objective = create_objective(train_config(train_data="x.csv", model=name, siglip=True), 0, 1)
        metrics = evaluate_retrieval(model, eval_loader(odd_val_csv, tiny, accelerator, 4), accelerator, objective)
        images, texts = good_rows(odd_val_csv, preprocess, tokenizer)
        with torch.no_grad():
            out = model(images, texts)
            loss = SigLipLoss()(out["image_features"], out["text_features"], out["logit_scale"], out["logit_bias"])
    finally:
        model.logit_bias = None
    # the shared image's rows get its first row's features before scoring (same_key_same_features):
    # a difference of float noise at most
    assert metrics["val_loss"] == pytest.approx(loss.item(), abs=1e-4)
    assert (
        abs(
            metrics["val_loss"]
            - evaluate_retrieval(model, eval_loader(odd_val_csv, tiny, accelerator, 4), accelerator)["val_loss"]
        )
        > 0.1
    )


def test_coca_validation_has_the_caption_loss_of_every_token(odd_val_csv, accelerator):
    """A CoCa model's validation: the caption loss over all the set's tokens (open_clip's CoCaLoss on
    the whole set as one batch, batches of 4 here), logged beside the contrastive loss."""
    from open_clip.loss import CoCaLoss

    from acc_clip.loss import create_objective
    from helpers import TINY_COCA

    torch.manual_seed(0)
    model, _, preprocess = open_clip.create_model_and_transforms(TINY_COCA, output_dict=True)
    tokenizer = open_clip.get_tokenizer(TINY_COCA)
    model.text_decoder.text_projection.data.normal_(std=0.1)  # open_clip leaves it uninitialised
    objective = create_objective(train_config(train_data="x.csv", model=TINY_COCA), 0, 1)
    dataset = CsvDataset(odd_val_csv, transform=preprocess, tokenizer=tokenizer, augment_seeded=False)
    loader = build_eval_loader(dataset, batch_size=4, workers=0, rank=0, world_size=1)
    metrics = evaluate_retrieval(model.eval(), loader, accelerator, objective)
    images, texts = good_rows(odd_val_csv, preprocess, tokenizer)
    with torch.no_grad():
        reference = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0)(**model(images, texts), output_dict=True)
    assert metrics["val_caption_loss"] == pytest.approx(reference["caption_loss"].item(), rel=1e-5)
    assert metrics["val_contrastive_loss"] == pytest.approx(reference["contrastive_loss"].item(), abs=1e-4)
    assert metrics["val_loss"] == pytest.approx(metrics["val_caption_loss"] + metrics["val_contrastive_loss"])


def test_gathered_rows_come_sorted_by_index_each_once(accelerator):
    # e.g. a loader that repeats a sample to even out processes: the repeat must not count twice
    indices = torch.tensor([3, 1, 3, 0])
    features = torch.tensor([[30.0], [10.0], [31.0], [0.0]])
    kept_indices, kept_features = gather_rows_by_index(accelerator, indices, features)
    assert kept_indices.tolist() == [0, 1, 3]
    assert kept_features.flatten().tolist() == [0.0, 10.0, 30.0]


# --- checkpoints and the command -----------------------------------------------------------------
# `acc-clip eval` runs fp32 as it always did before it took training's --precision (default amp); the
# module's Accelerator is fp32 too.


def test_load_weights_accepts_plain_state_dict_and_rejects_unknown_formats(tiny, tmp_path):
    name, model, _, _ = tiny
    fresh, _, _ = open_clip.create_model_and_transforms(name, pretrained=None)
    assert not torch.equal(fresh.visual.conv1.weight, model.visual.conv1.weight)
    torch.save(model.state_dict(), tmp_path / "plain.pt")
    load_weights(fresh, str(tmp_path / "plain.pt"), "--checkpoint")
    assert torch.equal(fresh.visual.conv1.weight, model.visual.conv1.weight)

    torch.save([1, 2, 3], tmp_path / "list.pt")
    (tmp_path / "text.pt").write_text("not a checkpoint")
    for path in (tmp_path / "list.pt", tmp_path / "text.pt"):
        with pytest.raises(AccClipError, match="not an open_clip checkpoint"):
            load_weights(fresh, str(path), "--checkpoint")
    # A folder is read as an acc_clip step checkpoint, and refused without its completion manifest.
    with pytest.raises(AccClipError, match=r"--checkpoint .*: not an acc_clip checkpoint"):
        load_weights(fresh, str(tmp_path), "--checkpoint")


def test_acc_clip_eval_prints_metrics_for_an_open_clip_checkpoint(odd_val_csv, tiny, tmp_path, capsys):
    name, model, _, _ = tiny
    torch.save({"epoch": 1, "name": "x", "state_dict": model.state_dict()}, tmp_path / "epoch_1.pt")
    out = tmp_path / "out.json"
    status = cli.main(
        [
            "eval",
            "--model",
            name,
            "--checkpoint",
            str(tmp_path / "epoch_1.pt"),
            "--val-data",
            odd_val_csv,
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--out",
            str(out),
        ]
    )
    assert status == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [line["eval"] for line in printed] == ["retrieval"]
    assert printed[0]["num_samples"] == 10 and 0 <= printed[0]["image_to_text_R@1"] <= 1
    assert json.loads(out.read_text())["retrieval"]["val_loss"] == pytest.approx(printed[0]["val_loss"])


def test_acc_clip_eval_rejects_a_checkpoint_of_another_architecture(odd_val_csv, tiny, tmp_path, capsys):
    name, model, _, _ = tiny
    other, _, _ = open_clip.create_model_and_transforms(write_model_dir(tmp_path / "other", embed_dim=24))
    torch.save({"epoch": 1, "name": "x", "state_dict": other.state_dict()}, tmp_path / "epoch_1.pt")
    status = cli.main(
        [
            "eval",
            "--model",
            name,
            "--checkpoint",
            str(tmp_path / "epoch_1.pt"),
            "--val-data",
            odd_val_csv,
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--workers",
            "0",
        ]
    )
    assert status == CheckpointError.exit_status == 4  # a checkpoint of another model (was the one status 2)
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: ")
    first_mismatch = next(
        key for key, value in model.state_dict().items() if value.shape != other.state_dict()[key].shape
    )
    assert f"'{first_mismatch}'" in lines[0]


# --- --val-num-samples: validation shards without sizes.json ---------------------------------------

VAL_SHARD_ROWS = 9


@pytest.fixture(scope="module")
def val_shards(tmp_path_factory) -> dict[str, str]:
    """9 image,caption rows as 3 shards (4, 4 and 1 samples): the folder with its sizes.json, and a copy
    of the shards without it."""
    import shutil

    from acc_clip.prep.shards.convert import convert_csv_to_shards

    root = tmp_path_factory.mktemp("val_shards")
    rows = [(write_image(root / f"img{i}.png", seed=100 + i), f"a picture of item {i}") for i in range(VAL_SHARD_ROWS)]
    (root / "val.csv").write_text("filepath,title\n" + "".join(f"{f},{c}\n" for f, c in rows))
    convert_csv_to_shards(str(root / "val.csv"), str(root / "sized"), samples_per_shard=4, workers=1, progress=False)
    (root / "bare").mkdir()
    for shard in sorted((root / "sized").glob("*.tar")):
        shutil.copy(shard, root / "bare" / shard.name)
    assert len(list((root / "bare").glob("*.tar"))) == 3
    return {"sized": str(root / "sized"), "bare": str(root / "bare")}


def val_evaluator(tiny, accelerator, val_data: str, val_num_samples=None):
    from acc_clip.config.parsing import Config
    from acc_clip.data import DataOptions
    from acc_clip.data.csv import CsvOptions
    from acc_clip.data.wds import ShardOptions
    from acc_clip.evaluation.evaluator import EvaluationOptions, Evaluator

    _, _, preprocess, tokenizer = tiny
    settings = Config(
        [
            EvaluationOptions(val_data=[val_data], val_num_samples=val_num_samples),
            DataOptions(batch_size=4, workers=0),
            CsvOptions(),
            ShardOptions(),
        ]
    )
    return Evaluator(settings, preprocess, tokenizer, accelerator)


def test_val_shards_without_sizes_json_need_val_num_samples(val_shards, tiny, accelerator):
    with pytest.raises(AccClipError) as error:
        val_evaluator(tiny, accelerator, val_shards["bare"])
    expected = "no sample count for every shard (sizes.json, img2dataset _stats.json, the count cache); give the "
    assert expected + "number of samples (--val-num-samples)" in str(error.value)
    assert "--train-num-samples" not in str(error.value) and "\n" not in str(error.value)


def test_a_wrong_val_num_samples_changes_nothing_but_a_warning(val_shards, tiny, accelerator, caplog):
    """Evaluation reads every sample once whatever --val-num-samples says: the same metrics with the
    right count, a smaller or a larger one, or sizes.json; a count that is off is said, once."""
    model = tiny[1]
    reference = val_evaluator(tiny, accelerator, val_shards["sized"]).evaluate(model)["retrieval"]
    assert reference["num_samples"] == VAL_SHARD_ROWS and reference["num_bad"] == 0
    for count in (VAL_SHARD_ROWS, 5, 20):
        caplog.clear()
        evaluator = val_evaluator(tiny, accelerator, val_shards["bare"], count)
        assert evaluator.evaluate(model)["retrieval"] == reference
        assert evaluator.evaluate(model)["retrieval"] == reference  # a second pass: the same, not warned again
        warnings = [r.getMessage() for r in caplog.records if "validation set holds" in r.getMessage()]
        if count == VAL_SHARD_ROWS:
            assert warnings == []
        else:
            assert warnings == [
                f"--val-num-samples says the validation set holds {count} samples but 9 were read "
                f"(0 unreadable); the metrics are over every sample read, once each"
            ]
    # With sizes.json too, the flag is the count expected (as in open_clip_train, it wins over sizes.json).
    caplog.clear()
    assert val_evaluator(tiny, accelerator, val_shards["sized"], 7).evaluate(model)["retrieval"] == reference
    assert "--val-num-samples says the validation set holds 7 samples but 9 were read" in caplog.text


def test_a_sizes_json_that_overstates_the_set_is_said(val_shards, tiny, accelerator, caplog, tmp_path):
    import shutil

    folder = tmp_path / "overstated"
    shutil.copytree(val_shards["sized"], folder)
    sizes = json.loads((folder / "sizes.json").read_text())
    (folder / "sizes.json").write_text(json.dumps({**sizes, "00002.tar": sizes["00002.tar"] + 3}))
    metrics = val_evaluator(tiny, accelerator, str(folder)).evaluate(tiny[1])["retrieval"]
    assert metrics["num_samples"] == VAL_SHARD_ROWS
    assert (
        "sizes.json says the validation set holds 12 samples but 9 were read (0 unreadable); the metrics are "
        "over every sample read, once each (a shard missing or cut short?)" in caplog.text
    )


def test_acc_clip_eval_takes_val_num_samples(val_shards, tiny, tmp_path, capsys):
    name, model, _, _ = tiny
    torch.save({"epoch": 1, "name": "x", "state_dict": model.state_dict()}, tmp_path / "epoch_1.pt")
    status = cli.main(
        [
            "eval",
            "--model",
            name,
            "--checkpoint",
            str(tmp_path / "epoch_1.pt"),
            "--val-data",
            val_shards["bare"],
            "--val-num-samples",
            str(VAL_SHARD_ROWS),
            "--batch-size",
            "4",
            "--workers",
            "0",
            "--device",
            "cpu",
            "--precision",
            "fp32",
        ]
    )
    assert status == 0
    printed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert printed[0]["eval"] == "retrieval" and printed[0]["num_samples"] == VAL_SHARD_ROWS


def test_val_num_samples_must_be_positive():
    from acc_clip.train.config import parse_train_config as parse_config

    with pytest.raises(AccClipError, match="--val-num-samples 0: must be at least 1"):
        parse_config(["--train-data", "x.csv", "--val-num-samples", "0"])


def test_acc_clip_eval_takes_imagenet_v2(tiny, tmp_path, capsys):
    name, model, _, _ = tiny
    torch.save({"epoch": 1, "name": "x", "state_dict": model.state_dict()}, tmp_path / "epoch_1.pt")
    status = cli.main(
        [
            "eval",
            "--model",
            name,
            "--checkpoint",
            str(tmp_path / "epoch_1.pt"),
            "--imagenet-v2",
            str(tmp_path / "nowhere"),
            "--device",
            "cpu",
            "--precision",
            "fp32",
            "--workers",
            "0",
        ]
    )
    # the flag is taken (no 'nothing to evaluate') and its folder checked before evaluating: a data error
    assert status == DataError.exit_status == 3
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert errors == [f"error: --imagenet-v2 {tmp_path / 'nowhere'}: folder not found"]
