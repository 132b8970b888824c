"""Named validation and zero-shot sets (evaluation/sets.py): how NAME=PATH items are read, the keys each
set reports under, and the one-line refusals (through the train and eval parsers)."""

from __future__ import annotations

import pytest

from acc_clip.errors import UsageError
from acc_clip.evaluation import sets
from acc_clip.evaluation.command import parse_eval_config
from acc_clip.evaluation.evaluator import EvaluationOptions
from acc_clip.train.config import parse_train_config


@pytest.mark.parametrize(
    "item, expected",
    [
        ("val.csv", (None, "val.csv")),
        ("coco=/data/coco/val.csv", ("coco", "/data/coco/val.csv")),
        ("cc3m-val.v2=s3://bucket/{0..9}.tar", ("cc3m-val.v2", "s3://bucket/{0..9}.tar")),
        ("/data/a=b.csv", (None, "/data/a=b.csv")),  # '/' before the '=': a path
        ("a b=c.csv", (None, "a b=c.csv")),
        ("name=", (None, "name=")),
    ],
)
def test_an_item_is_named_only_by_a_plain_name_before_its_first_equals(item, expected):
    assert sets.split_name(item) == expected


def test_sets_keep_their_order_and_an_unnamed_set_keeps_today_s_keys():
    options = EvaluationOptions(val_data=["a=x.csv", "y.csv", "b=z.csv"])
    assert options.val_sources == [("a", "x.csv"), ("retrieval", "y.csv"), ("b", "z.csv")]
    assert sets.flat_key("retrieval", "val_loss") == "val_loss"
    assert sets.flat_key("a", "val_loss") == "a/val_loss"
    assert sets.flat_key("zeroshot", "zeroshot_top1") == "zeroshot_top1"
    assert sets.flat_key("imagenet-zeroshot", "zeroshot_top1") == "imagenet-zeroshot_top1"
    assert sets.flat_key("pets", "zeroshot_top1") == "pets/zeroshot_top1"


def test_class_names_and_templates_go_to_their_set_or_to_every_set():
    sources = sets.zeroshot_sources(["pets=P", "cars=C", "U"], ["pets=pets.txt", "all.txt"], ["t.txt"])
    assert [(s.group, s.data, s.classnames, s.templates) for s in sources] == [
        ("pets", "P", "pets.txt", "t.txt"),
        ("cars", "C", "all.txt", "t.txt"),
        ("zeroshot", "U", "all.txt", "t.txt"),
    ]


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--val-data", "a.csv", "b.csv"], "--val-data: 'a.csv' and 'b.csv' have no name; several sets need NAME=PATH"),
        (["--val-data", "x=a.csv", "x=b.csv"], "--val-data: the name 'x' is given twice"),
        (["--val-data", "x=a.csv", "--zeroshot-data", "x=zs"], "two evaluation sets are named 'x'"),
        (["--val-data", "zeroshot=a.csv"], "'zeroshot' is the name of an unnamed, few-shot or ImageNet set"),
        (
            ["--zeroshot-data", "pets=zs", "--zeroshot-classnames", "cars=c.txt"],
            "--zeroshot-classnames cars=...: no --zeroshot-data set is named 'cars' (named sets: 'pets')",
        ),
        (
            ["--val-data", "a=x", "b=y", "--val-num-samples", "10"],
            "--val-num-samples says how many samples one validation set holds",
        ),
    ],
)
def test_ambiguous_sets_are_refused_in_one_line_by_train_and_eval(flags, message):
    for parse in (
        lambda: parse_train_config(["--train-data", "t.csv", *flags]),
        lambda: parse_eval_config(["--checkpoint", "c.pt", "--model", "RN50", *flags]),
    ):
        with pytest.raises(UsageError) as error:
            parse()
        assert message in str(error.value) and "\n" not in str(error.value)


def test_a_yaml_or_resumed_single_path_is_the_one_unnamed_set(tmp_path):
    config_file = tmp_path / "c.yaml"
    config_file.write_text("train-data: t.csv\nval-data: /data/val.csv\n")
    config, _ = parse_train_config(["--config", str(config_file)])
    assert config.evaluation.val_sources == [("retrieval", "/data/val.csv")]
