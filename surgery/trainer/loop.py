"""The epoch loop of a prepared run: each epoch opens the groups its schedule opens, trains, scores
the validation set, records metrics and checkpoints; patience stops it early; Ctrl-C or SIGTERM
ends it with the last finished epoch saved (:class:`~surgery.errors.TrainInterrupted`)."""

from __future__ import annotations

import contextlib
import signal
import threading
import time
from typing import Any, Callable, Iterable

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..adapter.freeze import apply_schedule, group_trainable
from ..errors import TrainInterrupted
from . import distributed as D
from . import phases
from .balance import balanced_sampler
from .cache import Features, IndexDataset
from .data import set_epoch
from .outputs import plot_run_curves
from .predictions import Scores, feature_batches, score
from .prepare import Run
from .resume import continue_command
from .state import BEST, CHECKPOINT_DIR, LAST, clean_state_dict, rng_state, save_checkpoint

Observer = Callable[[str, dict], None]


def phase(model: nn.Module, head_path: str) -> str:
    """What trains this epoch, as the metrics and the log name it: ``head only``, ``partial: 94%
    trains`` (of the parameters) or ``all``."""
    total = trainable = 0
    head_only = True
    for n, p in model.named_parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
            head_only = head_only and (n == head_path or n.startswith(head_path + "."))
    if trainable == total:
        return "all"
    if head_only:
        return "head only"
    return f"partial: {min(99, max(1, round(100 * trainable / max(total, 1))))}% trains"


@contextlib.contextmanager
def sigterm_as_interrupt():
    """SIGTERM raises KeyboardInterrupt while training (main thread only), like Ctrl-C."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def handler(signum, frame):  # noqa: ARG001
        raise KeyboardInterrupt

    try:
        old = signal.signal(signal.SIGTERM, handler)
    except (ValueError, OSError):  # pragma: no cover
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, old)


def checkpoint_state(run: Run, done_epochs: int) -> dict:
    """What last.pt/best.pt hold: the tensors the run can change, optimizer, schedule, scaler,
    progress, random states, the fingerprint and the arguments."""
    p = run.progress
    return {"epoch": done_epochs, "model": clean_state_dict(run.inputs.model, run.optim.moving, copy=False),
            "ema": run.objective.ema.state_dict() if run.objective.ema is not None else None,
            "optimizer": run.optim.opt.state_dict(), "scheduler": run.optim.sched.state_dict(),
            "scaler": run.optim.scaler.state_dict() if run.optim.scaler is not None else None, "best": dict(p.best),
            "bad_epochs": p.bad_epochs, "rng": rng_state({"train_loader": run.inputs.train_dl.generator}),
            "fingerprint": run.fingerprint, "history": list(p.history), "args": run.args}


def val_scores(run: Run, forward: nn.Module, feats: Features | None, keep: bool = False,
               model: nn.Module | None = None) -> Scores:
    """The validation set through ``forward`` (eval mode), or through the head of ``model`` (the
    run's by default) on cached features."""
    model = run.inputs.model if model is None else model
    model.eval()
    if feats is not None:
        dev = run.place.device
        return score(model.get_submodule(run.cache.head_path), feature_batches(*feats.val),
                     prepare=lambda x, y: (x.to(dev), y.to(dev)), autocast=run.place.autocast, keep=keep)
    return score(forward, run.inputs.val_dl, prepare=run.place.batch, autocast=run.place.autocast, keep=keep)


class _Epochs:
    """The loop's working state: the network it steps (DDP-wrapped anew whenever the set of
    trainable parameters changes) and the epoch it is in."""

    def __init__(self, run: Run, net: nn.Module, feats: Features | None, obs: Observer):
        self.run, self.net, self.feats, self.obs = run, net, feats, obs
        self.ddp_net, self.wrapped_for = net, None
        self.epoch = run.progress.start_epoch

    def begin(self, epoch: int) -> tuple[str, int, nn.Module, Iterable]:
        """Open this epoch's groups; (phase, trainable parameters, the network to step, its batches)."""
        run, model = self.run, self.run.inputs.model
        set_epoch(run.inputs.train_dl, epoch)
        model.train()
        apply_schedule(model, run.inputs.manifest, epoch)  # requires_grad and BatchNorm modes for this epoch
        phases.unfreeze(run, epoch, self.obs)
        ph = phase(model, run.cache.head_path)
        trainable = [n for n, p in model.named_parameters() if p.requires_grad]
        n_trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
        if run.dist.enabled and self.wrapped_for != tuple(trainable):
            self.ddp_net = D.wrap(self.net, run.dist, run.place.device)  # DDP syncs what trains at wrap time
            self.wrapped_for = tuple(trainable)
        history = run.progress.history
        if history and ph != history[-1]["phase"]:
            run.files.log(f"epoch {epoch + 1}: phase {ph}, {n_trainable} trainable parameters")
        self.obs("epoch_start", {"epoch": epoch + 1, "epochs": run.opts.epochs, "phase": ph,
                                 "trainable_params": n_trainable, "steps": len(run.inputs.train_dl)})
        if self.feats is None:
            return ph, n_trainable, self.ddp_net, iter(run.inputs.train_dl)
        tx, ty = self.feats.train_view(epoch)
        dl = run.inputs.train_dl
        sampler = (balanced_sampler(ty.tolist(), len(run.inputs.samples.classes), dl.generator)
                   if run.opts.balanced_sampler else None)
        batches = ((tx[idx], ty[idx]) for idx in DataLoader(IndexDataset(len(ty)), batch_size=dl.batch_size,
                                                            shuffle=sampler is None, sampler=sampler,
                                                            generator=dl.generator, drop_last=dl.drop_last))
        head = model.get_submodule(run.cache.head_path)
        head.train()
        return ph, n_trainable, head, batches

    def step(self, net: nn.Module, xb: Any, yb: Any, update: bool = True) -> tuple[Any, Any]:
        """Forward and backward one batch (mixed with --mixup/--cutmix); with ``update``, the
        optimizer step for the gradients summed since the last one (gradient scaling on fp16,
        clipping when asked), the schedule's step and the weight average's. (logits, loss)."""
        run, scaler = self.run, self.run.optim.scaler
        target = yb
        if run.objective.mixer is not None:
            xb, target = run.objective.mixer(xb, yb)
        with run.place.autocast():
            logits = net(xb)
            loss = run.objective.crit(logits.float(), target)
        scaled = loss / run.opts.accumulate if run.opts.accumulate > 1 else loss
        (scaler.scale(scaled) if scaler is not None else scaled).backward()
        if update:
            self.update()
        return logits, loss

    def update(self) -> None:
        run, scaler = self.run, self.run.optim.scaler
        if run.opts.clip_grad is not None:
            if scaler is not None:
                scaler.unscale_(run.optim.opt)
            torch.nn.utils.clip_grad_norm_([p for p in run.inputs.model.parameters() if p.grad is not None],
                                           run.opts.clip_grad)
        if scaler is not None:
            scaler.step(run.optim.opt)
            scaler.update()
        else:
            run.optim.opt.step()
        run.optim.sched.step()
        run.optim.opt.zero_grad(set_to_none=True)
        if run.objective.ema is not None:
            run.objective.ema.update(run.inputs.model)

    def train(self, epoch: int, net: nn.Module, batches: Iterable) -> tuple[list[float], list[float]]:
        """Every step of the epoch; ([loss sum, correct, images] over ranks, the lrs of its last step)."""
        run = self.run
        loss_sum, correct, seen = 0.0, 0, 0
        last_lrs: list[float] = [g["lr"] for g in run.optim.opt.param_groups]
        n, every = len(run.inputs.train_dl), run.opts.accumulate
        run.optim.opt.zero_grad(set_to_none=True)
        for i, (xb, yb) in enumerate(batches):
            xb, yb = run.place.batch(xb, yb)
            lrs = [g["lr"] for g in run.optim.opt.param_groups]
            logits, loss = self.step(net, xb, yb, update=(i + 1) % every == 0 or i + 1 >= n)
            bl = float(loss.detach())
            loss_sum += bl * len(yb)
            correct += int((logits.detach().argmax(1) == yb).sum())
            seen += len(yb)
            last_lrs = lrs
            self.obs("step", {"epoch": epoch + 1, "step": i + 1, "steps": len(run.inputs.train_dl), "loss": bl,
                              "lrs": lrs, "images": len(yb) * run.dist.world_size})
        return [loss_sum, correct, seen], last_lrs

    def note_failures(self) -> None:
        """Images that failed to decode while training (any worker or rank) go into run.log."""
        run = self.run
        if self.feats is not None or not run.dist.is_main:
            return
        fails = run.inputs.train_dl.dataset.collect_failures()
        for p in sorted(set(fails) - {p for p, _ in run.inputs.skipped}):
            run.inputs.skipped.append((p, fails[p]))
            run.files.log(f"  skipped {p}: {fails[p]} (failed while training)", write=False)

    def one(self, epoch: int) -> bool:
        """Train and score one epoch, record it; True when patience says stop."""
        run = self.run
        t0 = time.perf_counter()
        ph, n_trainable, net, batches = self.begin(epoch)  # an unfreeze's range test counts in `seconds` only
        t1 = time.perf_counter()
        totals, last_lrs = self.train(epoch, net, batches)
        train_secs = time.perf_counter() - t1
        loss_sum, correct, seen = D.all_reduce_sum(run.dist, totals, run.place.reduce_on)
        v_loss, v_correct, v_n = self.validate(self.net, None)
        self.note_failures()
        frozen_now = {g["name"]: not group_trainable(g, epoch) for g in run.inputs.manifest.groups}
        m = {"epoch": epoch + 1, "phase": ph,
             "train_loss": loss_sum / max(seen, 1), "train_acc": correct / max(seen, 1),
             "val_loss": v_loss / max(v_n, 1), "val_acc": v_correct / max(v_n, 1),
             "lr": _lr_by_group(run, last_lrs, frozen_now), "frozen": frozen_now,
             "images_per_s": seen / train_secs if train_secs > 0 else None,
             "seconds": time.perf_counter() - t0, "trainable_params": n_trainable, "cached": self.feats is not None}
        unfreeze = [u for u in run.resolved.get(phases.UNFREEZES, []) if u["epoch"] == epoch + 1]
        if unfreeze:
            m["unfreeze"] = unfreeze[0]
        if run.objective.ema is not None:
            e_loss, e_correct, e_n = self.validate(run.objective.ema.module, run.objective.ema.module)
            m.update(ema_val_loss=e_loss / max(e_n, 1), ema_val_acc=e_correct / max(e_n, 1))
        return record(run, m, self.obs)

    def validate(self, forward: nn.Module, model: nn.Module | None) -> list[float]:
        """[loss sum, correct, images] of the validation set, summed over ranks."""
        run = self.run
        v = val_scores(run, forward, self.feats, model=model)
        return D.all_reduce_sum(run.dist, [v.loss_sum, v.correct, v.n], run.place.reduce_on)


def _lr_by_group(run: Run, last_lrs: list[float], frozen_now: dict[str, bool]) -> dict[str, float]:
    """The lr each group trained at: 0 for a group frozen this epoch (the schedule's value is not
    what it saw)."""
    by_group: dict[str, float] = {}
    for g, lr in zip(run.optim.opt.param_groups, last_lrs):
        name = g.get("group", g.get("name"))
        by_group.setdefault(name, 0.0 if frozen_now.get(name) else lr)
    return by_group


def record(run: Run, m: dict, obs: Observer) -> bool:
    """Keep an epoch's metrics, its weights when best, its checkpoints and its log line; True when
    ``--patience`` epochs have passed without a better val accuracy."""
    p, epochs, out = run.progress, run.opts.epochs, run.opts.out
    event = phases.guard(run, m)  # before the best is updated: a collapsed epoch is never the best
    if event is not None:
        m["guard"] = event
    p.history.append(m)
    weights, acc, loss = _better(m)
    improved = event is None and (acc > p.best["val_acc"] or (acc == p.best["val_acc"] and loss < p.best["val_loss"]))
    if improved:
        p.best = {"epoch": m["epoch"], "val_acc": acc, "val_loss": loss, "weights": weights}
        p.bad_epochs = 0
        p.best_state = clean_state_dict(run.objective.ema.module if weights == "ema" else run.inputs.model, run.optim.moving)
    else:
        p.bad_epochs += 1
    if run.dist.is_main:
        state = checkpoint_state(run, m["epoch"])
        save_checkpoint(out / CHECKPOINT_DIR / LAST, state)
        if improved:
            save_checkpoint(out / CHECKPOINT_DIR / BEST, state)
        run.files.metrics(p.history)
        run.files.log(f"epoch {m['epoch']}/{epochs} [{m['phase']}] train loss {m['train_loss']:.4f} acc "
                      f"{m['train_acc']:.3f} | val loss {m['val_loss']:.4f} acc {m['val_acc']:.3f}"
                      + (f" | ema val loss {m['ema_val_loss']:.4f} acc {m['ema_val_acc']:.3f}" if "ema_val_acc" in m
                         else "") + f" | {m['images_per_s'] or 0:.0f} img/s {m['seconds']:.1f}s"
                      + (f" *best{' (ema)' if weights == 'ema' else ''}" if improved else ""))
        if event is not None:
            run.files.log(phases.guard_message(event))
    obs("epoch_end", dict(m, best=dict(p.best), improved=improved))
    patience = run.opts.patience
    if patience is not None and p.bad_epochs >= patience and m["epoch"] < epochs:
        p.stopped_early = True
        run.files.log(f"early stopping: no better val accuracy for {p.bad_epochs} epochs "
                      f"(best {p.best['val_acc']:.3f} at epoch {p.best['epoch']})")
        return True
    return False


def _better(m: dict) -> tuple[str, float, float]:
    """(which weights, val acc, val loss) of an epoch: the averaged ones when they score higher
    (accuracy, then loss), else the raw ones."""
    raw = (m["val_acc"], -m["val_loss"])
    if "ema_val_acc" in m and (m["ema_val_acc"], -m["ema_val_loss"]) > raw:
        return "ema", m["ema_val_acc"], m["ema_val_loss"]
    return "raw", m["val_acc"], m["val_loss"]


def plain_epochs(model: nn.Module, batches: Iterable, opt: torch.optim.Optimizer, *, epochs: int,
                 sched: Any = None, device: Any = None) -> None:
    """``epochs`` passes over ``batches`` (an iterable of ``(x, y)`` such as a DataLoader): the
    cross-entropy of each batch, one optimizer step and one ``sched`` step per batch, the batch
    first moved to ``device``. The short runs outside ``surgery train`` train with it: the scratch
    probe of ``surgery advise`` and the demo's pretraining."""
    for _ in range(epochs):
        model.train()
        for x, y in batches:
            if device is not None:
                x, y = x.to(device), y.to(device)
            opt.zero_grad()
            torch.nn.functional.cross_entropy(model(x), y).backward()
            opt.step()
            if sched is not None:
                sched.step()


def run_epochs(run: Run, net: nn.Module, feats: Features | None, obs: Observer) -> None:
    """Every epoch from the checkpoint's (or the first) to ``--epochs``; on Ctrl-C or SIGTERM,
    the run's state is logged and :class:`TrainInterrupted` raised."""
    loop = _Epochs(run, net, feats, obs)
    try:
        with sigterm_as_interrupt():
            if run.ckpt is None and run.dist.is_main:
                # a resumable state before the first epoch, in case it is interrupted
                save_checkpoint(run.opts.out / CHECKPOINT_DIR / LAST, checkpoint_state(run, 0))
            for epoch in range(run.progress.start_epoch, run.opts.epochs):
                loop.epoch = epoch
                if loop.one(epoch):
                    break
    except KeyboardInterrupt:
        interrupted(run, loop.epoch + 1)


def interrupted(run: Run, during: int) -> None:
    """Log where the run stopped and how to continue it, plot what there is, raise."""
    o, history = run.opts, run.progress.history
    last = o.out / CHECKPOINT_DIR / LAST
    done = history[-1]["epoch"] if history else 0
    again = continue_command(o.adapted, o.data, o.out, o.trust_code)
    if run.dist.is_main:
        run.files.log(f"interrupted during epoch {during}; {last} holds {done} finished epoch"
                      f"{'s' if done != 1 else ''}; continue with: {again}")
        if history:
            plot_run_curves(history, o.out, run.inputs.manifest, o.epochs)
    raise TrainInterrupted(f"interrupted; {done} of {o.epochs} epochs are saved in {last}; continue with: {again} "
                           f"(the run's other arguments come from the checkpoint)")
