"""The registry of objectives (acc_clip/loss/__init__.py): open_clip_train's selection order (distillation,
then CoCa by the model's name, then SigLIP, else CLIP), what a checkpoint records of the objective (the
same dict older manifests hold, so their resumes still match), and what the objectives change in the model."""

from __future__ import annotations

import itertools
import math

import pytest

from acc_clip import loss
from acc_clip.config.parsing import from_values
from acc_clip.loss import OBJECTIVES, check_objective, chosen_objective, model_overrides, objective_identity
from acc_clip.loss.clip import ClipObjective
from acc_clip.train.config import sections

COCA_MODEL = "coca_ViT-B-32"
ORDER = ("distill", "coca", "siglip", "clip")


def config_of(distill: bool = False, coca: bool = False, siglip: bool = False, **values):
    """The train command's sections from option values, without the rules across sections (some of these
    combinations are refused there, after the objective is chosen)."""
    return from_values(
        sections(),
        {
            "train_data": "x.csv",
            "model": COCA_MODEL if coca else "RN50",
            "siglip": siglip,
            **({"distill_model": "ViT-B-32"} if distill else {}),
            **values,
        },
    )


def test_the_registry_s_order_is_open_clip_train_s():
    assert tuple(objective.name for objective in OBJECTIVES) == ORDER


@pytest.mark.parametrize("distill, coca, siglip", list(itertools.product([False, True], repeat=3)))
def test_the_first_objective_in_order_whose_rule_holds_is_chosen(distill, coca, siglip):
    selected = {"distill": distill, "coca": coca, "siglip": siglip, "clip": True}
    expected = next(name for name in ORDER if selected[name])
    assert chosen_objective(config_of(distill, coca, siglip)).name == expected


def test_the_order_is_the_registry_s(monkeypatch):
    config = config_of(siglip=True)
    assert chosen_objective(config).name == "siglip"
    monkeypatch.setattr(loss, "OBJECTIVES", (ClipObjective, *(o for o in OBJECTIVES if o is not ClipObjective)))
    assert chosen_objective(config).name == "clip"


@pytest.mark.parametrize("distill, coca, siglip", list(itertools.product([False, True], repeat=3)))
def test_objective_identity_is_the_dict_older_manifests_hold(distill, coca, siglip):
    """Before the registry a checkpoint recorded {"name": objective_name(config), "siglip": config.siglip,
    "distill_model": config.distill_model}; a resume compares that dict for equality."""
    config = config_of(distill, coca, siglip)
    assert objective_identity(config) == {
        "name": chosen_objective(config).name,
        "siglip": siglip,
        "distill_model": "ViT-B-32" if distill else None,
    }


def test_model_overrides_start_a_siglip_model_as_open_clip_train_does():
    assert model_overrides(config_of(siglip=True)) == {"init_logit_scale": math.log(10), "init_logit_bias": -10}
    assert model_overrides(config_of()) == model_overrides(config_of(coca=True)) == {}
    # --siglip's initialisation applies whichever objective trains
    assert model_overrides(config_of(coca=True, siglip=True))["init_logit_bias"] == -10


def test_flags_of_an_objective_that_does_not_train_are_announced():
    notices = check_objective(config_of(coca=True, siglip=True, loss_dist_impl="shift"))
    assert any(n.startswith("--siglip: the coca loss trains (open_clip_train's order") for n in notices)
    assert (
        "--loss-dist-impl shift has no effect: this run does not train with the SigLIP loss (as in open_clip)"
        in notices
    )
    notices = check_objective(config_of(coca_caption_loss_weight=3.0))
    assert notices == [
        "--coca-caption-loss-weight has no effect: RN50 is not a CoCa model (open_clip_train's rule: "
        "the name holds 'coca')"
    ]
    assert check_objective(config_of()) == []
