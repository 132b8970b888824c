"""The objective table (acc_clip.loss): which objective a config selects, as open_clip_train's
create_loss selects its loss, and that every entry builds."""

from __future__ import annotations

import pytest
from open_clip.loss import ClipLoss, CoCaLoss, SigLipLoss

from acc_clip.config import parse_config
from acc_clip.loss import OBJECTIVES, create_objective, objective_name


@pytest.mark.parametrize("flags, name, loss_type", [
    ([], "clip", ClipLoss),
    (["--siglip"], "siglip", SigLipLoss),
    (["--model", "coca_ViT-B-32"], "coca", CoCaLoss),
    (["--model", "coca_ViT-B-32", "--siglip"], "coca", CoCaLoss),  # open_clip_train: CoCa before SigLIP
])
def test_the_config_selects_open_clip_train_s_loss(flags, name, loss_type):
    config, _ = parse_config(["--train-data", "x.csv", *flags])
    assert objective_name(config) == name
    objective = create_objective(config, rank=0, world_size=1)
    assert type(objective.loss) is loss_type and objective.mean_over_processes is False


def test_every_table_entry_is_selected_by_some_config():
    selected = {objective_name(parse_config(["--train-data", "x.csv", *flags])[0])
                for flags in ([], ["--siglip"], ["--model", "coca_ViT-B-32"])}
    assert selected == set(OBJECTIVES)
