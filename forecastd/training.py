"""Training: truncated BPTT in the manner of PyTorch's word_language_model example.

Series (long ones cut into parallel segments) form the rows of a batch; each row is read in consecutive
chunks of `bptt` steps; the hidden state is carried from chunk to chunk and detached at each chunk
start, so gradients stop at the chunk boundary while the state still remembers; gradients are clipped.
The tail of every series is held out for validation and early stopping; the best weights are kept.
Validation, early stopping and the saved model use an exponential moving average of the weights
(Polyak averaging): the raw weights of a small recurrent model jump between optimiser steps enough to
move the validation loss by half from one epoch to the next, and the average does not.

The loss trains the mean by squared error (what forecasts are judged by) and the scale by Gaussian
negative log-likelihood against the detached mean, so the spread is calibrated without the NLL's
variance term pulling the mean toward easy points.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pandas as pd
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from forecastd.config import DataConfig, ModelConfig, TrainingConfig
from forecastd.errors import DataError, ModelError
from forecastd.frames import Grid
from forecastd.models import Forecaster, State, detach_state
from forecastd.windowing import Track, encode, series_steps, split_at_gaps, targets, training_rows

__all__ = ["Prepared", "TrainResult", "AdamW", "prepare", "fit", "train_rows", "evaluate", "resolve_device"]

log = logging.getLogger(__name__)

Progress = Callable[[int, int, float, float], None]


def resolve_device(name: str, key: str = "[training] device") -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise ModelError(f'{key} = "cuda" but no CUDA device is visible; use "auto" or "cpu"')
    return torch.device(name)


@dataclass
class Prepared:
    """Model-ready arrays, per series segment: (x [T, F], y [T, K], train mask [T, K], val mask [T, K]),
    with each segment's unit in `scales` and the series left out, with the reason, in `left_out`."""

    segments: list[tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]]
    series_ids: list[str]
    scales: list[float] = field(default_factory=list)
    left_out: dict[str, str] = field(default_factory=dict)

    @property
    def train(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray]]:
        return [(x, y, mt) for x, y, mt, _ in self.segments if mt.any()]

    @property
    def val(self) -> list[tuple[np.ndarray, np.ndarray, np.ndarray, float]]:
        """(x, y, val mask, unit): the unit lets `evaluate` fall back to errors in the data's own units."""
        scales = self.scales or [1.0] * len(self.segments)
        return [(x, y, mv, s) for (x, y, _, mv), s in zip(self.segments, scales) if mv.any()]


def prepare(
    frame: pd.DataFrame,
    grid: Grid,
    scales: dict[str, float],
    model: ModelConfig,
    data: DataConfig,
    validation_fraction: float,
    *,
    val_start: pd.Timestamp | None = None,
) -> Prepared:
    """Encode every series of a validated long frame into training arrays.

    Validation origins are the last `validation_fraction` of each series' span (or every origin at or
    after `val_start` when given); no training target reaches into them. A series whose unit is not a
    positive finite number, or whose features are not finite, is left out (logged, named in
    `Prepared.left_out`): in a batch it would turn every series' loss into NaN.
    """
    segments, scale_of, left_out = [], [], {}
    series = series_steps(frame, grid)
    val_step = None if val_start is None else int(grid.index(pd.DatetimeIndex([val_start]))[0])
    for sid, (steps, values) in series.items():
        scale = float(scales[sid])
        if not np.isfinite(values).any():  # else it passed as a series "shorter than its horizon"
            left_out[sid] = "every value is missing (NaN or not a number)"
            continue
        if not (math.isfinite(scale) and scale > 0):
            left_out[sid] = f"its unit of change is {scale!r}, not a positive finite number"
            continue
        first, last = int(steps[0]), int(steps[-1])
        own = []
        cut = val_step if val_step is not None else last - int(round((last - first) * validation_fraction))
        for start, dense in split_at_gaps(steps, values, data.max_gap):
            T = dense.shape[0]
            step_ids = start + np.arange(T)
            x, origin, _ = encode(
                dense[None], grid.wall_ns(step_ids)[None], Track.fresh(1, len(model.level_alphas)),
                np.array([scale]), model.level_alphas, model.input_clip,
            )
            limit = int(np.clip(cut - start, 0, T))
            _, m_train = targets(dense, origin[0], scale, model.horizon, limit=limit)
            y, m_all = targets(dense, origin[0], scale, model.horizon)
            m_val = m_all.copy()
            m_val[:limit] = False
            # Very large scaled changes are data errors or regime breaks; they would dominate a squared loss.
            y = np.clip(y, -50.0, 50.0)
            own.append((x[0], y, m_train, m_val))
        if not all(np.isfinite(x).all() for x, *_ in own):
            left_out[sid] = "its features are not finite"
            continue
        segments += own
        scale_of += [scale] * len(own)
    for sid, reason in left_out.items():
        log.warning("series %r is left out of training: %s; check its values in the source", sid, reason)
    if not segments:
        if left_out:
            raise DataError(f"no series can be trained on: {len(left_out)} left out ({_named(left_out)}); "
                            "check their values in the source")
        raise DataError("no series has data to train on; check [source] and that the table or files have rows")
    return Prepared(segments, [s for s in series if s not in left_out], scale_of, left_out)


def _named(reasons: dict[str, str], most: int = 5) -> str:
    names = ", ".join(repr(s) for s in list(reasons)[:most])
    return names + (f" and {len(reasons) - most} more" if len(reasons) > most else "")


@dataclass
class TrainResult:
    model: Forecaster
    history: list[dict] = field(default_factory=list)
    metrics: dict = field(default_factory=dict)


def _loss(mean: torch.Tensor, scale: torch.Tensor, y: torch.Tensor, m: torch.Tensor) -> tuple[torch.Tensor, ...]:
    m = m.to(mean.dtype)
    n = m.sum().clamp_min(1.0)
    mse = (((mean - y) ** 2) * m).sum() / n
    nll = ((0.5 * ((y - mean.detach()) / scale) ** 2 + torch.log(scale)) * m).sum() / n
    return mse, nll, n


def evaluate(
    model: Forecaster,
    sequences: list[tuple],
    device: torch.device,
    *,
    batch: int = 256,
    chunk: int = 1024,
) -> dict[str, float]:
    """Validation figures over whole sequences (x, y, mask[, unit]), the state carried throughout.

    `loss` (what early stopping, the choice of learning rate and retraining compare) is the mean over
    sequences of each one's MSE relative to persistence (a zero change): 1.0 is as good as repeating the
    last value. Averaging ratios gives every series one vote, so a series with a regime break in its
    validation tail cannot outvote all the others. A sequence whose every target is no change (a stuck
    sensor, a count at zero) has no such ratio; when no sequence has one, `loss` is the MSE in the data's
    own units (each sequence's errors times its unit) instead, `relative` is 0, and lower is still
    better: whether a sequence has a ratio depends on the data alone, so two models judged on the same
    data are judged alike. `mse`, `nll` and `persistence_mse` are pooled over every target.
    """
    model.eval()
    per_seq = np.zeros((len(sequences), 4))  # sum sq. error, sum nll, sum persistence sq. error, n
    units = np.array([s[3] if len(s) > 3 else 1.0 for s in sequences], dtype=np.float64)
    order = sorted(range(len(sequences)), key=lambda i: sequences[i][0].shape[0])
    with torch.no_grad():
        for lo in range(0, len(order), batch):
            idx = order[lo : lo + batch]
            group = [sequences[i] for i in idx]
            T = max(s[0].shape[0] for s in group)
            x = np.zeros((len(group), T, group[0][0].shape[1]), dtype=np.float32)
            y = np.zeros((len(group), T, group[0][1].shape[1]), dtype=np.float32)
            m = np.zeros((len(group), T, group[0][2].shape[1]), dtype=bool)
            for i, (xs, ys, ms, *_) in enumerate(group):
                x[i, : xs.shape[0]], y[i, : ys.shape[0]], m[i, : ms.shape[0]] = xs, ys, ms
            hidden = model.initial_state(len(group))
            for c in range(0, T, chunk):
                xb = torch.from_numpy(x[:, c : c + chunk]).to(device)
                yb = torch.from_numpy(y[:, c : c + chunk]).to(device)  # B, t, K
                mb = torch.from_numpy(m[:, c : c + chunk]).to(device).float()
                mean, scale, hidden = model(xb, hidden)
                mean, scale = mean.float(), scale.float()
                sums = torch.stack([
                    (((mean - yb) ** 2) * mb).sum((1, 2)),
                    ((0.5 * ((yb - mean) / scale) ** 2 + torch.log(scale)) * mb).sum((1, 2)),
                    ((yb**2) * mb).sum((1, 2)),
                    mb.sum((1, 2)),
                ], dim=1)  # B, 4
                per_seq[idx] += sums.double().cpu().numpy()
    n = per_seq[:, 3].sum()
    if n == 0:
        return {"mse": math.nan, "nll": math.nan, "persistence_mse": math.nan, "loss": math.nan, "relative": 0}
    scored = (per_seq[:, 3] > 0) & (per_seq[:, 2] > 0)
    if scored.any():
        loss = float((per_seq[scored, 0] / per_seq[scored, 2]).mean())
    else:
        # Units, not scaled errors: a live model and a challenger scale the same series differently.
        # Squared per sequence after dividing by the largest unit, so a unit near the largest double
        # does not overflow where the loss itself is finite.
        top = float(units.max())
        loss = float((per_seq[:, 0] * (units / top) ** 2).sum() / n) * top * top
    return {
        "mse": per_seq[:, 0].sum() / n,
        "nll": per_seq[:, 1].sum() / n,
        "persistence_mse": per_seq[:, 2].sum() / n,
        "loss": loss,
        "relative": int(scored.sum()),
    }


class AdamW:
    """torch.optim.AdamW with its defaults, in the multi-tensor form torch runs on a GPU, which on the
    CPU gives the same floats as its per-tensor form: the same weights as torch's, step for step, on
    either device. Not torch.optim because its Optimizer imports torch._dynamo when first used, 1.3-1.7 s
    of every `forecastd train` and every retrain child, for a few lines of update.
    The two verbs train_rows needs: zero_grad, step; `lr` is set between epochs."""

    def __init__(self, params, lr: float, weight_decay: float = 1e-2,
                 betas: tuple[float, float] = (0.9, 0.999), eps: float = 1e-8) -> None:
        self.params = [p for p in params if p.requires_grad]
        self.lr, self.weight_decay, self.betas, self.eps = lr, weight_decay, betas, eps
        self.state: dict[torch.Tensor, list] = {}  # param -> [steps, first moment, second moment]

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            if set_to_none:
                p.grad = None
            elif p.grad is not None:
                p.grad.zero_()

    @torch.no_grad()
    def step(self) -> None:
        # As torch does, a parameter without a gradient this step is left alone, its step count too.
        params = [p for p in self.params if p.grad is not None]
        if not params:
            return
        beta1, beta2 = self.betas
        for p in params:
            if p not in self.state:
                self.state[p] = [0, torch.zeros_like(p), torch.zeros_like(p)]
            self.state[p][0] += 1
        steps, avgs, sqs = zip(*(self.state[p] for p in params))
        grads = [p.grad for p in params]
        if self.weight_decay:
            torch._foreach_mul_(params, 1 - self.lr * self.weight_decay)
        torch._foreach_lerp_(avgs, grads, 1 - beta1)
        torch._foreach_mul_(sqs, beta2)
        torch._foreach_addcmul_(sqs, grads, grads, 1 - beta2)
        denom = torch._foreach_sqrt(sqs)
        torch._foreach_div_(denom, [(1 - beta2**n) ** 0.5 for n in steps])
        torch._foreach_add_(denom, self.eps)
        torch._foreach_addcdiv_(params, avgs, denom, [(self.lr / (1 - beta1**n)) * -1 for n in steps])


def _cosine(lr: float, epoch: int, epochs: int, floor: float) -> float:
    """The learning rate for `epoch` from the one before it, cosine-annealed to `floor` at `epochs`:
    torch's CosineAnnealingLR in the recursive form it steps by, so the same floats as before."""
    return ((1 + math.cos(math.pi * epoch / epochs)) / (1 + math.cos(math.pi * (epoch - 1) / epochs))
            * (lr - floor) + floor)


def train_rows(
    model: Forecaster,
    opt: AdamW | torch.optim.Optimizer,
    x: torch.Tensor,
    y: torch.Tensor,
    m: torch.Tensor,
    bptt: int,
    clip: float,
    autocast: torch.autocast,
    window: torch.Tensor | None = None,
    average: AveragedModel | None = None,
) -> tuple[float, float]:
    """One batch of rows through truncated BPTT: chunk, detach at each chunk start, clip, step.

    x [B, S, F], y [B, S, K], m [B, S, K], window [B, W] the changes before each row (zeros if None).
    `average`, if given, is updated after every optimiser step. Returns (loss summed over targets,
    number of targets).
    """
    total, count = 0.0, 0.0
    hidden = model.initial_state(x.shape[0])
    if window is not None:
        hidden = State(hidden.rnn, window)
    for c in range(0, x.shape[1], bptt):
        hidden = detach_state(hidden)  # the state carries on; its gradient history stops here
        mc = m[:, c : c + bptt]
        if not mc.any():  # all burn-in or padding: advance the state, nothing to learn
            with torch.no_grad(), autocast:
                _, _, hidden = model(x[:, c : c + bptt], hidden)
            continue
        with autocast:
            mean, scale, hidden = model(x[:, c : c + bptt], hidden)  # B, bptt, K
        mse, nll, n = _loss(mean.float(), scale.float(), y[:, c : c + bptt], mc)
        loss = mse + nll
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), clip)
        opt.step()
        if average is not None:
            average.update_parameters(model)
        total += loss.item() * n.item()
        count += n.item()
    return total, count


def fit(
    model: Forecaster,
    prepared: Prepared,
    config: TrainingConfig,
    *,
    device: torch.device | None = None,
    progress: Progress | None = None,
) -> TrainResult:
    """Train `model` in place (warm starts welcome) and return it with the best validation weights.

    With `config.learning_rates`, each further rate trains again from the weights `model` came with;
    the run with the lowest validation loss is kept (its rate in `metrics["learning_rate"]`, every
    run's loss in `metrics["learning_rate_losses"]`). Without validation targets only the first rate runs:
    nothing could judge between them.
    """
    rates = tuple(dict.fromkeys((config.learning_rate, *config.learning_rates)))  # a rate listed twice trains once
    if len(rates) == 1 or not prepared.val:
        return _fit_one(model, prepared, config, device, progress)
    start = copy.deepcopy(model.state_dict())
    best, losses = None, {}
    for k, lr in enumerate(rates):
        model.load_state_dict(start)
        # One bar for every run: run k's epochs follow the full budget of the runs before it.
        report = None if progress is None else (
            lambda epoch, epochs, tl, vl, k=k: progress(k * epochs + epoch, len(rates) * epochs, tl, vl))
        # max_seconds bounds the whole training (a retrain's timeout is set by it): each run gets its share.
        one = dataclasses.replace(config, learning_rate=lr, learning_rates=(),
                                  max_seconds=config.max_seconds / len(rates))
        run = _fit_one(model, prepared, one, device, report)
        losses[lr] = run.metrics["val_loss"]
        log.info("learning rate %g: validation loss %.4f", lr, losses[lr])
        judged = losses[lr] if math.isfinite(losses[lr]) else math.inf
        if best is None or judged < best[2]:
            best = (run, copy.deepcopy(model.state_dict()), judged)
    run, weights, _ = best
    model.load_state_dict(weights)
    # Keys as text and NaN as None: the metrics go into the version's JSON manifest.
    run.metrics["learning_rate_losses"] = {f"{lr:g}": v if math.isfinite(v) else None for lr, v in losses.items()}
    return run


def _fit_one(model: Forecaster, prepared: Prepared, config: TrainingConfig, device: torch.device | None,
             progress: Progress | None) -> TrainResult:
    """One training at `config.learning_rate` (`fit`'s body)."""
    device = device or resolve_device(config.device)
    torch.manual_seed(config.seed)
    rng = np.random.default_rng(config.seed)
    model.to(device)
    opt = AdamW(model.parameters(), lr=config.learning_rate, weight_decay=config.weight_decay)
    autocast = torch.autocast("cuda", dtype=torch.bfloat16, enabled=device.type == "cuda")
    train, val = prepared.train, prepared.val
    if not train:
        raise DataError("no training targets: every series is shorter than its horizon; use a smaller "
                        "[model] horizon or more history")

    result = TrainResult(model)
    average = None
    if config.weight_average:
        average = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(config.weight_average), use_buffers=True)
    judged = model if average is None else average.module  # the weights validated, kept and saved
    judged.rnn.flatten_parameters()  # the copy's weights must be one cuDNN block again (a no-op on the CPU)
    # The starting weights are no candidate: validation judges the mean only, and an untrained model's
    # persistence mean would win on a short noisy tail with a spread that was never fitted. (A retrain
    # is judged against the live model by retrain.decide.)
    best = (math.inf, copy.deepcopy(model.state_dict()), 0)
    started = time.monotonic()
    bad_epochs = 0
    for epoch in range(1, config.epochs + 1):
        model.train()
        total, count, steps, first = 0.0, 0.0, 0, epoch == 1
        # Small datasets repeat passes, each with new row boundaries, until the epoch has had
        # min_epoch_steps optimiser steps; large ones make one pass.
        while first or steps < config.min_epoch_steps:
            offset = 0 if first and epoch == 1 else int(rng.integers(config.segment_length))
            first = False
            x, y, m, w = training_rows(train, config.segment_length, config.burn_in, offset,
                                       model.lookback)  # R, S, * and R, W
            perm = rng.permutation(x.shape[0])
            for lo in range(0, len(perm), config.batch_size):
                rows = perm[lo : lo + config.batch_size]
                xb = torch.from_numpy(x[rows]).to(device)  # B, S, F
                yb = torch.from_numpy(y[rows]).to(device)  # B, S, K
                mb = torch.from_numpy(m[rows]).to(device)  # B, S, K
                wb = torch.from_numpy(w[rows]).to(device)  # B, W
                t, n = train_rows(model, opt, xb, yb, mb, config.bptt, config.clip, autocast, wb, average)
                total, count = total + t, count + n
                steps += -(-x.shape[1] // config.bptt)
        opt.lr = _cosine(opt.lr, epoch, config.epochs, config.learning_rate / 10)
        train_loss = total / max(count, 1.0)
        if not math.isfinite(train_loss):
            raise ModelError(f"training diverged at epoch {epoch} (loss {train_loss}); lower [training] "
                             "learning_rate or check the data for extreme values")
        val_metrics = evaluate(judged, val, device) if val else {"loss": train_loss}
        val_loss = val_metrics["loss"]
        result.history.append({"epoch": epoch, "train_loss": train_loss, "val_loss": val_loss})
        log.info("epoch %d/%d train loss %.4f val loss %.4f", epoch, config.epochs, train_loss, val_loss)
        if progress:
            progress(epoch, config.epochs, train_loss, val_loss)
        # The loss of flat validation tails is in the data's units, whatever their size: a relative margin
        # there; the ratio to persistence keeps the margin it always had, and with it every trained model.
        margin = 1e-6 if val_metrics.get("relative", 1) or not math.isfinite(best[0]) else 1e-6 * abs(best[0])
        if val_loss < best[0] - margin:
            best = (val_loss, copy.deepcopy(judged.state_dict()), epoch)
            bad_epochs = 0
        else:
            bad_epochs += 1
            if bad_epochs >= config.patience:
                log.info("early stop after epoch %d; best epoch %d", epoch, best[2])
                break
        if config.max_seconds and time.monotonic() - started > config.max_seconds:
            log.info("stopping after %.0f s ([training] max_seconds)", time.monotonic() - started)
            break

    if not best[2]:
        # Saving the start weights would put an untrained model live under a trained one's name.
        raise ModelError(f"validation loss was {val_loss} at every epoch, so no trained weights can be chosen; "
                         "check the data for extreme values or lower [training] learning_rate")
    model.load_state_dict(best[1])
    final = evaluate(model, val, device) if val else {}
    if val and not final["relative"]:
        log.warning("no validation target of any series changes (flat tails: a stuck sensor, a count at zero); "
                    "the validation loss is the MSE in the data's units, not relative to persistence")
    result.metrics = {
        "best_epoch": best[2],
        "epochs_run": len(result.history),
        "seconds": round(time.monotonic() - started, 3),
        "train_loss": result.history[best[2] - 1]["train_loss"],
        "val_loss": final.get("loss", math.nan),
        # "mse" where no validation target changes and val_loss is the MSE in the data's units (`evaluate`).
        "val_loss_basis": "mse" if val and not final["relative"] else "persistence",
        "val_mse": final.get("mse", math.nan),
        "val_persistence_mse": final.get("persistence_mse", math.nan),
        "device": device.type,
        "learning_rate": config.learning_rate,
    }
    if prepared.left_out:
        result.metrics["series_left_out"] = dict(prepared.left_out)
    return result
