"""The train command's config (acc_clip/train/config.py): open_clip_train's flags keep their names and meaning;
unknown keys are errors naming the closest key. The generic parsing is tested in tests/unit/config/."""

import re
import shlex

import pytest

from acc_clip.data.csv import CsvOptions
from acc_clip.errors import AccClipError
from acc_clip.train.config import parse_train_config as parse_config
from acc_clip.train.config import train_config
from helpers import REPO, SEED_COMMAND


def test_seed_default_command_parses_with_open_clip_meanings():
    config, notices = parse_config(shlex.split(SEED_COMMAND))
    assert config.data.train_data == "/../COCO/train_data.csv"
    csv = config[CsvOptions]
    assert csv.csv_separator == "," and csv.csv_img_key == "filepath" and csv.csv_caption_key == "title"
    assert (config.data.batch_size, config.training.epochs, config.data.workers, config.optimizer.warmup) == (
        64,
        32,
        4,
        10000,
    )
    optimizer = config.optimizer
    assert (optimizer.lr, optimizer.wd, optimizer.beta1, optimizer.beta2, optimizer.eps) == (
        5e-4,
        0.2,
        0.9,
        0.999,
        1e-8,
    )
    assert config.runtime.precision == "amp" and config.model.model == "RN50" and config.model.pretrained == ""
    assert (
        config.runtime.device == "sdaa"
        and config.logging.report_to == ""
        and config.logging.wandb_project_name == "open-clip"
    )
    # Flags without effect here are announced, not silently dropped.
    assert any("--coca-caption-loss-weight" in n for n in notices)


def test_seed_command_with_explicit_empty_strings_parses_too():
    config, _ = parse_config(["--train-data", "x.csv", "--pretrained", "", "--report-to", "", "--wandb-notes", ""])
    assert config.model.pretrained == "" and config.logging.report_to == ""


def test_unknown_flag_names_closest(capsys):
    with pytest.raises(AccClipError, match=r"unknown option '--batch-szie'; did you mean '--batch-size'"):
        parse_config(["--train-data", "x.csv", "--batch-szie", "8"])


def test_yaml_then_cli_later_wins(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_data: a.csv\nbatch-size: 8\nlr: 1\n")
    config, _ = parse_config(["--config", str(path), "--batch-size", "4"])
    assert config.data.train_data == "a.csv" and config.data.batch_size == 4 and config.optimizer.lr == 1.0


def test_unknown_yaml_key_names_file_and_closest(tmp_path):
    path = tmp_path / "c.yaml"
    path.write_text("train_data: a.csv\nwarmpu: 5\n")
    with pytest.raises(AccClipError, match=r"c\.yaml: unknown key 'warmpu'; did you mean 'warmup'"):
        parse_config(["--config", str(path)])


def test_bad_values_are_errors():
    with pytest.raises(AccClipError, match="--accum-freq 0: must be at least 1"):
        parse_config(["--train-data", "x.csv", "--accum-freq", "0"])
    with pytest.raises(AccClipError, match="--local-loss needs --gather-with-grad"):
        parse_config(["--train-data", "x.csv", "--local-loss"])


@pytest.mark.parametrize("name", ["rn50_coco.yaml", "demo.yaml"])
def test_shipped_configs_parse(name):
    config, _ = parse_config(["--config", str(REPO / "configs" / name), "--train-data", "x.csv"])
    assert config.data.train_data == "x.csv"


def test_rn50_config_holds_the_seed_defaults():
    config, _ = parse_config(["--config", str(REPO / "configs" / "rn50_coco.yaml"), "--train-data", "x.csv"])
    assert (
        config.model.model,
        config.data.batch_size,
        config.training.epochs,
        config.optimizer.lr,
        config.optimizer.wd,
        config.optimizer.warmup,
        config.runtime.precision,
    ) == ("RN50", 64, 32, 5e-4, 0.2, 10000, "amp")


def test_fast_path_switches_default_on_and_turn_off():
    """The GPU fast paths a benchmark measures on and off (benchmarks/gpu_seed_config.sh --input-paths,
    --fast-paths): cuDNN autotuning on unless --no-cudnn-benchmark; pinning left to the device unless said."""
    default, _ = parse_config(["--train-data", "x.csv"])
    assert (
        default.runtime.cudnn_benchmark is True
        and default.data.pin_memory is None
        and default.data.decode_on_device is False
    )
    off, _ = parse_config(["--train-data", "x.csv", "--no-cudnn-benchmark", "--no-pin-memory", "--decode-on-device"])
    assert off.runtime.cudnn_benchmark is False and off.data.pin_memory is False and off.data.decode_on_device is True
    assert parse_config(["--train-data", "x.csv", "--pin-memory"])[0].data.pin_memory is True


def test_upsampling_factors_val_num_samples_and_imagenet_v2_parse_as_open_clip_train_parses_them():
    from open_clip_train.params import parse_args

    flags = [
        "--train-data",
        "a/{0..1}.tar::b/{0..1}.tar",
        "--dataset-resampled",
        "--train-data-upsampling-factors",
        "1::0.5",
        "--val-num-samples",
        "1000",
        "--imagenet-v2",
        "/data/imagenetv2",
    ]
    theirs, (ours, _) = vars(parse_args(flags)), parse_config(flags)
    keys = ["train_data_upsampling_factors", "val_num_samples", "imagenet_v2"]
    assert (
        {k: ours.value(k) for k in keys}
        == {k: theirs[k] for k in keys}
        == {"train_data_upsampling_factors": "1::0.5", "val_num_samples": 1000, "imagenet_v2": "/data/imagenetv2"}
    )
    defaults = vars(parse_args([]))
    ours_by_default = train_config(dataset_type="synthetic")
    assert {k: ours_by_default.value(k) for k in keys} == {k: defaults[k] for k in keys} == dict.fromkeys(keys)


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--aug-cfg", "foo"], "--aug-cfg foo: expected key=value pairs"),
        (["--image-mean", "0.5", "0.5"], "--image-mean 0.5 0.5: one value, or one per channel"),
        (["--image-std", "0", "1", "1"], "--image-std 0.0 1.0 1.0: must be a finite number above 0"),
        (["--force-image-size", "0"], "--force-image-size 0: must be at least 1"),
        (
            ["--force-image-size", "224", "224", "3"],
            "--force-image-size 224 224 3: one positive size, or height and width",
        ),
        (["--force-context-length", "1"], "--force-context-length 1: must be at least 2 tokens"),
        (["--opt", "sgd"], "--opt sgd: expected adamw or a timm optimizer as timm/NAME"),
        (["--opt", "timm/sgd"], "--opt timm/sgd needs --lr"),
        (["--dist-url", "tcp://10.0.0.1:23456"], "--dist-url tcp://10.0.0.1:23456: acc_clip's processes take their"),
        (
            ["--torchcompile", "--torchcompile-strategy", "step", "--accum-freq", "2"],
            "--torchcompile-strategy step needs --accum-freq 1 (given 2): it compiles the step of one batch; "
            "use --torchcompile-strategy task",
        ),
        (["--torchcompile-backend", "inductr"], "--torchcompile-backend 'inductr': must be a torch.compile backend"),
        (["--torchcompile-mode", "fast"], "--torchcompile-mode 'fast': must be an inductor mode"),
    ],
)
def test_open_clip_flags_with_values_that_cannot_work_are_one_line_errors(flags, message):
    """open_clip_train accepts these and fails later with a traceback (or, for --dist-url, starts differently)."""
    with pytest.raises(AccClipError, match=re.escape(message)) as error:
        parse_config(["--train-data", "x.csv", *flags])
    assert "\n" not in str(error.value)


def test_an_augmentation_option_open_clip_does_not_know_is_one_line_at_model_creation():
    from acc_clip.loss import model_overrides
    from acc_clip.model.build import create_model

    config, _ = parse_config(
        ["--train-data", "x.csv", "--model", f"local-dir:{REPO}/configs/models/tiny-vit", "--aug-cfg", "bogus=1"]
    )
    with pytest.raises(AccClipError, match="unexpected keyword argument 'bogus'") as error:
        create_model(
            config.model, precision=config.runtime.precision, seed=config.runtime.seed, **model_overrides(config)
        )
    assert "\n" not in str(error.value)
