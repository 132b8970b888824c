"""Contrastive-exact accumulation (acc_clip.train.step): k micro-batches of b make the same update as one
batch of k*b, at the function level with a real Accelerator on the CPU, a real open_clip model and
the real CSV pipeline (its EpochBatchSampler gives both runs the same samples); train_step's
gradient clipping and logit-scale clamp against references computed here. (That the trainer counts
optimizer steps, not micro-batches, is tests/integration/test_train_accumulation.py.)"""

from __future__ import annotations

import copy
import math

import pytest
import torch
from accelerate.state import AcceleratorState

from acc_clip.loss import create_objective, model_overrides, total_loss
from acc_clip.model.build import LOGIT_SCALE_MAX, create_model
from acc_clip.runtime import parallel
from acc_clip.train.step import train_step
from dist_worker import accelerator_for_cpu, run_steps, tiny_config, without_key_bias
from helpers import TINY_COCA, TINY_RN, TINY_VIT, max_difference, tiny_train_args


@pytest.fixture
def accelerator():
    AcceleratorState._reset_state(reset_partial_state=True)  # other test files may want other settings
    yield accelerator_for_cpu()
    AcceleratorState._reset_state(reset_partial_state=True)


@pytest.mark.parametrize("optimizer_name, accum_freq", [("adamw", 4), ("sgd", 2), ("sgd", 4)])
def test_accumulation_equals_one_big_batch(train_csv, accelerator, optimizer_name, accum_freq):
    """AdamW is what the trainer uses; SGD with lr 1 applies the raw gradient, so a gradient counted
    k times (as open_clip does for logit_scale) or missing would show where AdamW would hide it.
    Measured: SGD, every weight within 4e-7 (gradients ~1); AdamW, within 3e-7 but for the key biases."""
    big_losses, big, _ = run_steps(
        tiny_config(train_csv, "--batch-size", "32"), accelerator, 1, optimizer_name=optimizer_name
    )
    acc_losses, accumulated, _ = run_steps(
        tiny_config(train_csv, "--batch-size", str(32 // accum_freq), "--accum-freq", str(accum_freq)),
        accelerator,
        1,
        optimizer_name=optimizer_name,
    )
    initial = run_steps(tiny_config(train_csv, "--batch-size", "32"), accelerator, 0)[1]
    assert max_difference(big, initial) > 1e-4  # the update moved the weights: the comparison means something
    assert abs(acc_losses[0] - big_losses[0]) <= 1e-5
    if optimizer_name == "sgd":
        assert max_difference(accumulated, big) <= 1e-5
        key_bias_gradients = {k: v.chunk(3)[1] for k, v in big.items() if k.endswith("attn.in_proj_bias")}
        assert key_bias_gradients
        assert max_difference(key_bias_gradients, {k: initial[k].chunk(3)[1] for k in key_bias_gradients}) < 1e-6
    else:
        assert max_difference(without_key_bias(accumulated), without_key_bias(big)) <= 1e-5


def sgd_big_and_accumulated(train_csv, accelerator, big_batch: int, accum_freq: int, *flags: str, model=TINY_VIT):
    """Plain SGD (lr 1) from the seeded weights: (initial weights, (loss, weights) after one step of one
    batch of `big_batch`, the same after one step of `accum_freq` micro-batches of big_batch / accum_freq)."""

    def one_step(batch: int, *extra: str, steps: int = 1):
        return run_steps(
            tiny_config(train_csv, *flags, "--batch-size", str(batch), *extra, model=model),
            accelerator,
            steps,
            optimizer_name="sgd",
        )

    initial = one_step(big_batch, steps=0)[1]
    big_losses, big, _ = one_step(big_batch)
    acc_losses, accumulated, _ = one_step(big_batch // accum_freq, "--accum-freq", str(accum_freq))
    return initial, (big_losses[0], big), (acc_losses[0], accumulated)


@pytest.mark.parametrize("accum_freq", [2, 4])
def test_siglip_accumulation_equals_one_big_batch_and_trains_the_bias(train_csv, accelerator, accum_freq):
    """SigLIP (--siglip) with plain SGD, lr 1: k micro-batches of 32/k make the update of one batch of
    32, the logit bias included (its gradient comes once, from the last micro-batch); the model starts
    as open_clip_train starts it (logit scale ln 10, bias -10) and the bias does train. Measured:
    weights within 1.4e-6 of the big batch's for an update of up to 5.6 (the bias moves by 1.0)."""
    initial, (big_loss, big), (acc_loss, accumulated) = sgd_big_and_accumulated(
        train_csv, accelerator, 32, accum_freq, "--siglip"
    )
    assert initial["logit_bias"].item() == -10 and initial["logit_scale"].item() == pytest.approx(math.log(10))
    assert abs(big["logit_bias"].item() - initial["logit_bias"].item()) > 0.1  # the bias received its gradient
    assert abs(acc_loss - big_loss) <= 1e-5
    assert max_difference(accumulated, big) <= 1e-5


@pytest.mark.parametrize("objective, accum_freq", [(o, k) for o in ("coca", "distill") for k in (2, 4)])
def test_coca_and_distillation_accumulation_equal_one_big_batch(
    train_csv, tiny_teacher, accelerator, objective, accum_freq
):
    """With plain SGD, lr 1, k micro-batches make the update of one batch k times larger:
    - CoCa (a model whose name holds coca; batch 16): the caption loss's per-sample token sums are
      re-assembled across micro-batches like the features. Measured: equal losses, weights within 7.2e-7
      for an update of up to 6.7.
    - distillation (open_clip_train refuses it with --accum-freq; batch 32): the teacher's features are
      computed once per micro-batch and assembled like the student's. Measured: equal losses, weights
      within 9.6e-7 for an update of up to 4.3."""
    if objective == "coca":
        setting = dict(big_batch=16, flags=(), model=TINY_COCA)
    else:
        setting = dict(big_batch=32, flags=("--distill-model", tiny_teacher), model=TINY_VIT)
    initial, (big_loss, big), (acc_loss, accumulated) = sgd_big_and_accumulated(
        train_csv, accelerator, setting["big_batch"], accum_freq, *setting["flags"], model=setting["model"]
    )
    assert max_difference(big, initial) > 1e-3
    assert abs(acc_loss - big_loss) <= 1e-5
    assert max_difference(accumulated, big) <= 1e-5


def test_resnet_accumulation_is_not_exact_with_batch_norm(train_csv, accelerator):
    """Batch norm breaks exactness: each micro-batch is normalised with its own 8-sample statistics
    instead of the 32-sample ones, and the cached no-grad pass updates the running statistics too
    (as in open_clip: two forwards per micro-batch). Measured on TINY_RN, one step, accum 4 x 8
    against 32: loss 4.140 vs 4.035; gradients differ by up to 0.62 of the largest gradient; running
    means by 0.33; after one AdamW step (lr 1e-3, measured once, not run here to save time) weights
    differ by up to 2e-3, i.e. some update signs flip. So accumulation with a BN tower is an
    approximation, as in open_clip; TINY_VIT (layer norm) is exact."""

    def one_step(*flags, steps=1):
        return run_steps(tiny_config(train_csv, *flags, model=TINY_RN), accelerator, steps, optimizer_name="sgd")

    initial = one_step("--batch-size", "32", steps=0)[1]
    big_losses, big, _ = one_step("--batch-size", "32")
    acc_losses, accumulated, _ = one_step("--batch-size", "8", "--accum-freq", "4")
    parameters = [k for k in big if big[k].is_floating_point() and "running_" not in k]
    gradient_big = {k: initial[k] - big[k] for k in parameters}  # SGD at lr 1: the update is the gradient
    gradient_acc = {k: initial[k] - accumulated[k] for k in parameters}
    largest = max(float(v.abs().max()) for v in gradient_big.values())
    relative = max_difference(gradient_acc, gradient_big) / largest
    means = [k for k in big if k.endswith("running_mean")]
    running = max_difference({k: accumulated[k] for k in means}, {k: big[k] for k in means})
    print(
        f"TINY_RN accum 4x8 vs 32, one step: loss {acc_losses[0]:.4f} vs {big_losses[0]:.4f}; gradient "
        f"difference {relative:.3g} of the largest gradient; running means {running:.3g}"
    )
    assert relative > 1e-3 and running > 1e-3 and abs(acc_losses[0] - big_losses[0]) > 1e-5
    tracked = [k for k in big if k.endswith("num_batches_tracked")]
    assert tracked and all(int(accumulated[k]) == 8 and int(big[k]) == 1 for k in tracked)  # 4 cached + 4 live


def _model_and_batch(batch_size: int = 8):
    """TINY_VIT (no batch norm, no dropout: two forwards of a batch give the same gradient) at its
    seeded initial weights, its objective, and one batch of random images with distinct captions."""
    config = tiny_config("unused.csv", "--dataset-type", "synthetic", "--batch-size", str(batch_size))
    bundle = create_model(
        config.model, precision=config.runtime.precision, seed=config.runtime.seed, **model_overrides(config)
    )
    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch_size, 3, 32, 32, generator=generator)
    texts = bundle.tokenizer([f"a photo of thing number {i}" for i in range(batch_size)])
    return bundle.model.train(), create_objective(config, 0, 1), images, texts


def _gradients(model, objective, images, texts, clip_norm=None) -> tuple[dict[str, torch.Tensor], float]:
    """The gradient of the whole batch's loss, computed on a copy without acc_clip's step, clipped
    by torch.nn.utils.clip_grad_norm_ when `clip_norm` is given; and its norm before clipping."""
    reference = copy.deepcopy(model)
    total_loss(objective(reference(images, texts))).backward()
    norm = torch.nn.utils.clip_grad_norm_(reference.parameters(), clip_norm if clip_norm else math.inf)
    return {name: p.grad.detach().clone() for name, p in reference.named_parameters() if p.grad is not None}, float(
        norm
    )


@pytest.mark.parametrize("micro_batches", [1, 2])
def test_grad_clip_norm_scales_the_global_gradient_to_that_norm(accelerator, micro_batches):
    """SGD at lr 1 applies the gradient itself, so the update must be the whole batch's gradient
    clipped to --grad-clip-norm by torch.nn.utils.clip_grad_norm_ (computed here on a copy); with
    accumulation the clip applies once, to the accumulated gradient. Measured: update norm 0.04999999,
    every weight within 1.1e-7 of the reference (fp32 rounding of weights ~1); unclipped, 11.39."""
    model, objective, images, texts = _model_and_batch()
    clip = 0.05
    expected, norm = _gradients(model, objective, images, texts, clip)
    assert norm > 20 * clip  # the clip is far from a no-op here

    initial = {name: p.detach().clone() for name, p in model.named_parameters()}
    optimizer = torch.optim.SGD(model.parameters(), lr=1.0)
    model, optimizer = parallel.prepare(accelerator, model, optimizer, sync_batch_norm=False, compile_model=False)
    size = len(images) // micro_batches
    batches = [(images[i : i + size], texts[i : i + size]) for i in range(0, len(images), size)]
    train_step(model, batches, objective, accelerator, optimizer, grad_clip_norm=clip)
    update = {name: initial[name] - p.detach() for name, p in parallel.unwrap(model).named_parameters()}
    assert update.keys() == expected.keys()
    update_norm = math.sqrt(sum(float(u.double().pow(2).sum()) for u in update.values()))
    assert update_norm == pytest.approx(clip, rel=1e-4)
    print(
        f"update norm {update_norm:.7g} (clip {clip}, gradient norm {norm:.4g}); largest difference from the "
        f"clipped reference gradient {max_difference(update, expected):.3g}"
    )
    assert max_difference(update, expected) <= 1e-4 * clip


def _step_pushing_logit_scale(accelerator, push: float) -> tuple[float, torch.Tensor]:
    """One train_step whose optimizer moves logit_scale alone, by `push` (a huge learning rate on
    its gradient, the direction chosen with SGD's `maximize`); returns (the value the update would
    give without a clamp, logit_scale after the step)."""
    model, objective, images, texts = _model_and_batch()
    gradient = float(_gradients(model, objective, images, texts)[0]["logit_scale"])
    assert abs(gradient) > 1e-4
    lr = abs(push / gradient)
    optimizer = torch.optim.SGD([model.logit_scale], lr=lr, maximize=(gradient > 0) == (push > 0))
    unclamped = float(model.logit_scale.detach()) + push
    train_step(model, [(images, texts)], objective, accelerator, optimizer)
    return unclamped, model.logit_scale.detach()


def test_logit_scale_pushed_above_ln_100_is_clamped_to_ln_100_exactly(accelerator):
    unclamped, logit_scale = _step_pushing_logit_scale(accelerator, 50.0)
    assert unclamped > LOGIT_SCALE_MAX + 40
    assert math.log(100) == LOGIT_SCALE_MAX
    assert torch.equal(logit_scale, torch.tensor(math.log(100), dtype=torch.float32))


def test_logit_scale_pushed_below_0_is_clamped_to_0(accelerator):
    unclamped, logit_scale = _step_pushing_logit_scale(accelerator, -50.0)
    assert unclamped < -40
    assert torch.equal(logit_scale, torch.tensor(0.0))


def test_accum_freq_zero_is_refused(capsys):
    from acc_clip.cli import main

    assert main(["train", "--train-data", "x.csv", "--accum-freq", "0"]) == 2
    assert capsys.readouterr().err.strip() == "error: --accum-freq 0: must be at least 1"


def test_more_micro_batches_than_the_data_holds_fails_with_one_line(train_csv, tmp_path, train_in_process):
    """320 rows make 5 micro-batches of 64: not enough for one step of 6."""
    status, errors = train_in_process(
        tiny_train_args(train_csv, tmp_path, "bad", "--model", TINY_VIT, "--batch-size", "64", "--accum-freq", "6")
    )
    assert status == 2
    assert errors == ["error: 5 micro-batches per epoch cannot make one step of --accum-freq 6"]
