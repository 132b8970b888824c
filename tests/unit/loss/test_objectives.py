"""The objectives (acc_clip.loss): which one a config selects, as open_clip_train's create_loss
selects its loss; each one's value against open_clip's own loss class on the same inputs; and the
properties the trainer relies on: CoCa's caption loss is exact over unequal micro-batches and
processes, the distillation teacher is frozen and outside the model, a SigLIP bias is trained."""

from __future__ import annotations

import pytest
import torch
from open_clip.loss import ClipLoss, CoCaLoss, DistillClipLoss, SigLipLoss

from acc_clip.errors import AccClipError
from acc_clip.loss import OBJECTIVES, chosen_objective, create_objective, model_overrides, total_loss
from acc_clip.loss.coca import CoCaObjective
from acc_clip.loss.distill import DistillObjective
from acc_clip.train.config import parse_train_config as parse_config
from helpers import TINY_COCA, TINY_RN, TINY_VIT


def config_of(*flags: str):
    return parse_config(["--train-data", "x.csv", *flags])[0]


def objective_name(config) -> str:
    return chosen_objective(config).name


@pytest.mark.parametrize(
    "flags, name",
    [
        ([], "clip"),
        (["--siglip"], "siglip"),
        (["--model", "coca_ViT-B-32"], "coca"),
        (["--model", "coca_ViT-B-32", "--siglip"], "coca"),  # open_clip_train: CoCa before SigLIP
        (["--distill-model", "RN50", "--distill-pretrained", "openai"], "distill"),  # and distillation first of all
    ],
)
def test_the_config_selects_open_clip_train_s_loss(flags, name):
    assert objective_name(config_of(*flags)) == name


def test_every_table_entry_is_selected_by_some_config():
    selected = {
        objective_name(config_of(*flags))
        for flags in ([], ["--siglip"], ["--model", "coca_ViT-B-32"], ["--distill-model", "RN50"])
    }
    assert selected == {objective.name for objective in OBJECTIVES}


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--distill-pretrained", "teacher.pt"], "--distill-pretrained needs --distill-model"),
        (["--distill-model", "RN50", "--siglip"], "cannot be combined with --siglip"),
        (["--distill-model", "RN50", "--model", "coca_ViT-B-32"], "cannot be combined with a CoCa model"),
    ],
)
def test_distillation_flags_that_cannot_work_are_refused_in_one_line(flags, message):
    with pytest.raises(AccClipError, match=message) as error:
        config_of(*flags)
    assert "\n" not in str(error.value)


def features(batch: int, dim: int = 16, seed: int = 0, grad: bool = False) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    values = torch.nn.functional.normalize(torch.randn(batch, dim, generator=generator), dim=-1)
    return values.requires_grad_(grad)


def test_clip_and_siglip_objectives_are_open_clip_s_losses():
    image, text, scale, bias = features(8, seed=0), features(8, seed=1), torch.tensor(14.0), torch.tensor(-3.0)
    rows = {"image_features": image, "text_features": text, "logit_scale": scale, "logit_bias": bias}
    clip = create_objective(config_of(), 0, 1)(rows)
    assert clip["contrastive_loss"] == ClipLoss()(image, text, scale, logit_bias=bias)
    siglip = create_objective(config_of("--siglip"), 0, 1)(rows)
    assert siglip["contrastive_loss"] == SigLipLoss()(image, text, scale, bias)


def coca_outputs(batch: int, lengths: list[int], vocab: int = 11, seed: int = 0) -> dict:
    """CoCa model outputs with captions of the given token lengths (the rest is padding, 0)."""
    generator = torch.Generator().manual_seed(seed)
    context = max(lengths) + 2
    labels = torch.zeros(batch, context, dtype=torch.long)
    for row, length in enumerate(lengths):
        labels[row, :length] = torch.randint(1, vocab, (length,), generator=generator)
    return {
        "image_features": features(batch, seed=seed),
        "text_features": features(batch, seed=seed + 1),
        "logits": torch.randn(batch, context, vocab, generator=generator).requires_grad_(),
        "labels": labels,
        "logit_scale": torch.tensor(10.0),
    }


def test_coca_objective_is_open_clip_s_coca_loss_on_one_process():
    outputs = coca_outputs(6, [3, 9, 1, 5, 7, 2])
    ours = CoCaObjective(config_of("--model", "coca_ViT-B-32", "--coca-caption-loss-weight", "1.5"), 0, 1)
    losses = ours(ours.rows(outputs))
    reference = CoCaLoss(caption_loss_weight=1.5, clip_loss_weight=1.0)(
        outputs["image_features"],
        outputs["text_features"],
        outputs["logits"],
        outputs["labels"],
        outputs["logit_scale"],
        output_dict=True,
    )
    for name in ("contrastive_loss", "caption_loss"):
        assert losses[name].item() == pytest.approx(reference[name].item(), rel=1e-6), name
    (ours_grad,) = torch.autograd.grad(total_loss(losses), outputs["logits"])
    (reference_grad,) = torch.autograd.grad(sum(reference.values()), outputs["logits"])
    assert torch.allclose(ours_grad, reference_grad, atol=1e-7)


def test_coca_caption_loss_of_two_halves_is_the_whole_batch_s_where_open_clip_s_is_not():
    """Two micro-batches (or processes) with captions of unequal length: the mean of open_clip's two
    per-half token means is not the whole batch's token mean; the objective's rows, concatenated as
    accumulation concatenates them, give the whole batch's loss exactly."""
    outputs = coca_outputs(6, [2, 2, 2, 12, 12, 12])
    objective = CoCaObjective(config_of("--model", "coca_ViT-B-32"), 0, 1)
    halves = [
        {k: v[:3] if v.ndim else v for k, v in outputs.items()},
        {k: v[3:] if v.ndim else v for k, v in outputs.items()},
    ]
    whole = objective(objective.rows(outputs))["caption_loss"]
    rows = [objective.rows(half) for half in halves]
    joined = {k: torch.cat([r[k] for r in rows]) if rows[0][k].ndim else rows[0][k] for k in rows[0]}
    assert objective(joined)["caption_loss"].item() == pytest.approx(whole.item(), rel=1e-6)
    caption = CoCaLoss(caption_loss_weight=2.0, clip_loss_weight=1.0).caption_loss
    per_half = sum(caption(h["logits"].permute(0, 2, 1), h["labels"]) for h in halves) / 2 * 2.0
    assert abs(per_half.item() - whole.item()) > 1e-3


def test_a_zero_weight_keeps_every_parameter_in_the_graph():
    """open_clip's CoCaLoss drops the contrastive loss at weight 0, leaving logit_scale unused, which
    DDP (find_unused_parameters off) fails on; here it is multiplied by 0 and gets a zero gradient."""
    outputs = coca_outputs(4, [3, 4, 5, 6])
    scale = torch.tensor(10.0, requires_grad=True)
    outputs["logit_scale"] = scale
    objective = CoCaObjective(config_of("--model", "coca_ViT-B-32", "--coca-contrastive-loss-weight", "0"), 0, 1)
    total_loss(objective(objective.rows(outputs))).backward()
    assert scale.grad is not None and scale.grad.item() == 0.0


def test_distillation_is_open_clip_s_distill_loss_with_a_frozen_teacher(tiny_teacher):
    import open_clip

    config = config_of("--model", TINY_RN, "--distill-model", tiny_teacher)
    objective = create_objective(config, 0, 1)
    assert isinstance(objective, DistillObjective)
    teacher = objective.teacher
    assert not teacher.training and not any(p.requires_grad for p in teacher.parameters())
    # the teacher's weights are the folder's, not a fresh draw
    expected = open_clip.create_model(tiny_teacher).state_dict()
    assert all(torch.equal(teacher.state_dict()[k], expected[k]) for k in expected)

    images, texts = torch.randn(4, 3, 32, 32), open_clip.get_tokenizer(TINY_VIT)(["a", "b c", "d e f", "g"])
    targets = objective.targets(images, texts)
    with torch.no_grad():
        out = teacher(images, texts)
    assert torch.equal(targets["dist_image_features"], out["image_features"])
    rows = {
        "image_features": features(4, dim=32, seed=3),
        "text_features": features(4, dim=32, seed=4),
        "logit_scale": torch.tensor(12.0),
        **targets,
    }
    losses = objective(rows)
    reference = DistillClipLoss()(
        rows["image_features"],
        rows["text_features"],
        rows["logit_scale"],
        out["image_features"],
        out["text_features"],
        out["logit_scale"],
        output_dict=True,
    )
    assert set(losses) == {"contrastive_loss", "distill_loss"}
    for name in losses:
        assert losses[name].item() == pytest.approx(reference[name].item(), rel=1e-6)
    assert objective.on_one_process().teacher is teacher  # validation shares it, does not load another


def test_a_teacher_without_weights_is_refused(tmp_path):
    with pytest.raises(AccClipError, match=r"--distill-model .* the teacher has no weights"):
        create_objective(config_of("--distill-model", TINY_VIT), 0, 1)
    with pytest.raises(AccClipError, match=r"--distill-pretrained .*missing.pt: no such file"):
        create_objective(
            config_of("--distill-model", TINY_VIT, "--distill-pretrained", str(tmp_path / "missing.pt")), 0, 1
        )


def test_a_local_weights_file_is_loaded_for_the_teacher(tiny_teacher, tmp_path):
    """--distill-pretrained FILE with a local-dir: architecture: open_clip would ignore the file; here
    its weights are loaded."""
    import open_clip

    source = open_clip.create_model(tiny_teacher)
    path = tmp_path / "teacher.pt"
    torch.save({"state_dict": source.state_dict()}, path)
    objective = create_objective(
        config_of("--model", TINY_RN, "--distill-model", TINY_VIT, "--distill-pretrained", str(path)), 0, 1
    )
    teacher = objective.teacher.state_dict()
    assert all(torch.equal(teacher[k], v) for k, v in source.state_dict().items())


def test_distilling_into_a_model_with_a_logit_bias_is_refused(tiny_teacher):
    """open_clip's distillation loss has no bias term: a student's bias would never train (and DDP would
    fail on the unused parameter), so it is said in one line."""
    objective = create_objective(config_of("--model", TINY_VIT, "--distill-model", tiny_teacher), 0, 1)
    rows = {
        "image_features": features(2, dim=32),
        "text_features": features(2, dim=32, seed=1),
        "logit_scale": torch.tensor(10.0),
        "logit_bias": torch.tensor(-10.0),
        **objective.targets(torch.randn(2, 3, 32, 32), torch.zeros(2, 32, dtype=torch.long)),
    }
    with pytest.raises(AccClipError, match=r"has a logit_bias .* distil into a model without one"):
        objective(rows)


def test_the_coca_loss_goes_with_coca_models_only(tmp_path_factory):
    """open_clip_train's rule picks the CoCa loss by the model's name. A CLIP model in a folder whose path
    holds 'coca' would fail deep in the loss, and a CoCa model exported to a folder named otherwise would
    silently train without its caption loss: both are one line at model creation."""
    import shutil

    from acc_clip.model.build import create_model as create_model_from_options

    def create_model(config):
        return create_model_from_options(
            config.model, precision=config.runtime.precision, seed=config.runtime.seed, **model_overrides(config)
        )

    tmp_path = tmp_path_factory.mktemp("models")  # this test's own tmp_path would hold 'coca' (its name)
    clip_in_coca_folder = tmp_path / "coca-experiments" / "tiny-vit"
    shutil.copytree(TINY_VIT[len("local-dir:") :], clip_in_coca_folder)
    with pytest.raises(AccClipError, match="has no caption decoder"):
        create_model(config_of("--model", f"local-dir:{clip_in_coca_folder}"))
    coca_elsewhere = tmp_path / "exported"
    shutil.copytree(TINY_COCA[len("local-dir:") :], coca_elsewhere)
    with pytest.raises(AccClipError, match="a CoCa model whose name lacks 'coca'"):
        create_model(config_of("--model", f"local-dir:{coca_elsewhere}"))
    with pytest.raises(AccClipError, match="--precision bf16 with a CoCa model"):
        create_model(config_of("--model", TINY_COCA, "--precision", "bf16"))


def test_the_teacher_is_built_in_the_run_s_precision_and_its_folder_must_exist(tiny_teacher, tmp_path):
    """open_clip_train creates the teacher with --precision: under bf16 it reads the student's bf16 images."""
    objective = create_objective(
        config_of("--model", TINY_VIT, "--distill-model", tiny_teacher, "--precision", "pure_bf16"), 0, 1
    )
    assert {p.dtype for p in objective.teacher.parameters()} == {torch.bfloat16}
    with pytest.raises(AccClipError, match=r"--distill-model local-dir:.*nowhere: no such folder"):
        create_objective(config_of("--distill-model", f"local-dir:{tmp_path / 'nowhere'}"), 0, 1)
