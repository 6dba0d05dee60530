"""The Accelerate training loop: round-robin over tasks, only the tuned parameters trained."""

from __future__ import annotations

import importlib.util
import json
import logging
import math
import os
import shutil
import time
from pathlib import Path

import torch
from torch import nn

from ..io import load as load_tuned
from ..atomic import replace_dir
from ..io import save as save_tuned
from ..tuned import TunedModel
from ..dist import cpu_only, process_state
from .roundrobin import MultiTaskLoader
from .tasks import Task

log = logging.getLogger(__name__)
STATE_NAME = "trainer_state.json"


class Trainer:
    """Train the parameters of a :class:`petune.TunedModel` on several tasks, round-robin.

    Accelerate places the model and data, shards the loaders across processes (``accelerate
    launch`` / ``torchrun``), runs mixed precision (``"bf16"``, ``"fp16"`` on GPU), seeds each
    epoch's shuffles (``seed + epoch``) and saves optimizer, scheduler and RNG states. The model
    is not wrapped in DDP: losses may call the encoder directly (pooling, prompt-aware states),
    which DDP would not see; instead the tuned parameters' gradients are averaged across
    processes with one ``accelerator.reduce`` per optimizer step. All processes run the same task
    at each step, so a task's module gets gradient exactly from its own batches. :meth:`fit` leaves
    the process group as it found it (it does not call Accelerate's ``end_training()``, which
    destroys it), so a script can go on to sharded evaluation and barriers after training.

    Args:
        model: the tuned model (all tasks' modules are optimised together).
        tasks: :class:`petune.train.Task` list; names must be tasks of ``model`` when it has
            one module per task.
        epochs: passes over the round-robin schedule.
        lr, weight_decay: AdamW over the tuned parameters of every task (+ loss parameters).
        warmup_ratio: linear warmup over this fraction of the optimizer steps, then linear decay.
        max_grad_norm: gradient clipping (``None`` disables).
        gradient_accumulation_steps: batches per optimizer step.
        sampling: ``"proportional"``, ``"cycle"`` or ``"balanced"`` (see :func:`task_order`).
        seed: seeds dropout, shuffles and the task order.
        output_dir: where checkpoints (``checkpoints/step-N``) and logs go.
        checkpoint_every: optimizer steps between checkpoints (one is always written at the end
            when ``output_dir`` is set). ``keep_checkpoints`` newest ones are kept.
        eval_fn, eval_every: ``eval_fn(trainer) -> dict`` called every ``eval_every`` steps and at
            the end; results are logged.
        log_with: Accelerate tracker; ``"auto"`` = TensorBoard when installed, else none.
        max_steps: stop after this many optimizer steps in total (a checkpoint is written).
        mixed_precision: ``"no"``, ``"bf16"`` or ``"fp16"``.
        progress: show a progress bar on the main process.
        param_groups: optimiser options per group of parameters, e.g. ``{"visual": {"lr": 1e-3,
            "weight_decay": 0.01}}``; groups: ``"method"`` (the method's parameters), each part's
            kind (``"visual"`` for the visual embedding) and ``"loss"`` (the losses' own, e.g. a
            temperature). A group not named uses ``lr`` and ``weight_decay``; the schedule scales all.
        first_stage_steps, first_stage_train: for the first ``first_stage_steps`` optimizer steps
            only the groups in ``first_stage_train`` are updated (default: the visual embedding
            and the losses' parameters — aligning the image tokens before the method trains, as
            LLaVA's stage 1); the others keep their values (their gradients are dropped, so AdamW
            neither moves nor decays them). ``0`` (default): one stage.
        on_epoch_start: callables ``fn(trainer, epoch)`` run by every process before each epoch's
            first batch, and before the resumed epoch on resume (e.g.
            :class:`petune.train.mining.NegativeMiner`, which changes the training examples).

    Raises:
        ValueError: no tasks, duplicate task names, a task the model has no module for, bad
            numbers, a parameter group the model does not have; at :meth:`fit`, a checkpoint from
            another method, model, task list, seed, stage schedule or parameter groups.
        FloatingPointError: the loss is NaN/inf at the very first step (later ones are skipped
            and counted in ``history["skipped_steps"]``).
    """

    def __init__(self, model: TunedModel, tasks: list[Task], *, epochs: int = 1, lr: float = 1e-3,
                 weight_decay: float = 0.0, warmup_ratio: float = 0.1, max_grad_norm: float | None = 1.0,
                 gradient_accumulation_steps: int = 1, sampling: str = "proportional",
                 batches_per_task: int | None = None, seed: int = 0, output_dir: str | None = None,
                 checkpoint_every: int | None = None, keep_checkpoints: int = 2, eval_fn=None,
                 eval_every: int | None = None, log_with: str | None = "auto", max_steps: int | None = None,
                 mixed_precision: str = "no", progress: bool = True, num_workers: int = 0,
                 param_groups: dict[str, dict] | None = None, first_stage_steps: int = 0,
                 first_stage_train: tuple[str, ...] = ("visual", "loss"), on_epoch_start=()):
        from accelerate import Accelerator
        from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration
        from torch.utils.data import DataLoader

        if not isinstance(model, TunedModel):
            raise TypeError("Trainer trains the TunedModel returned by petune.attach")
        if not tasks:
            raise ValueError("no tasks to train on")
        names = [t.name for t in tasks]
        if len(set(names)) != len(names):
            raise ValueError(f"task names must be unique, got {names}")
        for name in names:
            if model.tasks is not None and name not in model.tasks:
                raise ValueError(f"task {name!r} has no module in the tuned model (its tasks: {model.tasks}); "
                                 f"attach with tasks={names}")
        for key, value in (("epochs", epochs), ("gradient_accumulation_steps", gradient_accumulation_steps)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{key} must be a positive integer, got {value!r}")
        if not lr > 0:
            raise ValueError(f"lr must be positive, got {lr!r}")
        self.model, self.tasks = model, {t.name: t for t in tasks}
        self.epochs, self.seed, self.max_steps = epochs, seed, max_steps
        self.max_grad_norm, self.accumulation = max_grad_norm, gradient_accumulation_steps
        self.checkpoint_every, self.keep_checkpoints = checkpoint_every, keep_checkpoints
        self.eval_fn, self.eval_every, self.progress = eval_fn, eval_every, progress
        self.on_epoch_start = list(on_epoch_start)
        self.output_dir = Path(output_dir) if output_dir else None
        if log_with == "auto":
            log_with = "tensorboard" if importlib.util.find_spec("tensorboard") and self.output_dir else None
        process_state()  # on CPU-only machines, multi-process runs need Accelerate's cpu mode
        self.accelerator = Accelerator(
            cpu=cpu_only(), mixed_precision=mixed_precision, log_with=log_with,
            project_config=ProjectConfiguration(project_dir=str(self.output_dir or "."), logging_dir=str(
                (self.output_dir or Path(".")) / "logs")),
            dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=seed))
        acc = self.accelerator
        model.to(acc.device)
        self.losses = nn.ModuleDict({t.name: t.loss for t in tasks if isinstance(t.loss, nn.Module)}).to(acc.device)
        loaders = {}
        for t in tasks:
            dl = DataLoader(t.dataset, batch_size=t.batch_size, shuffle=True, collate_fn=t.collate,
                            drop_last=t.drop_last, num_workers=num_workers)
            loaders[t.name] = acc.prepare(dl)
        self.loader = MultiTaskLoader(loaders, sampling, seed, batches_per_task, {t.name: t.repeat for t in tasks})

        self.groups = self._parameter_groups()
        self.params = [p for params in self.groups.values() for p in params]
        if not self.params:
            raise ValueError(f"nothing to train: method {model.method.name!r} adds no parameters and no task loss "
                             "has any (add a visual embedding, a classification head, or pick another method)")
        for p in self.losses.parameters():
            p.requires_grad_(True)
        self._broadcast_parameters()
        steps_per_epoch = math.ceil(len(self.loader) / self.accumulation)
        self.total_steps = steps_per_epoch * epochs if max_steps is None else min(max_steps, steps_per_epoch * epochs)
        self.param_groups, self.first_stage_steps = dict(param_groups or {}), first_stage_steps
        self.first_stage_train = tuple(first_stage_train)
        for name in [*self.param_groups, *(self.first_stage_train if first_stage_steps else ())]:
            if name not in self.groups:
                raise ValueError(f"no parameter group {name!r}: this model and its losses have {list(self.groups)}")
        if not isinstance(first_stage_steps, int) or first_stage_steps < 0:
            raise ValueError(f"first_stage_steps must be a non-negative integer, got {first_stage_steps!r}")
        if self.param_groups:  # one optimiser group per named group, the rest together
            rest = [p for g, params in self.groups.items() if g not in self.param_groups for p in params]
            options = [{"params": rest}] if rest else []
            options += [{"params": self.groups[g], **o} for g, o in self.param_groups.items() if self.groups[g]]
        else:
            options = self.params
        optimizer = torch.optim.AdamW(options, lr=lr, weight_decay=weight_decay)
        self.optimizer = acc.prepare(optimizer)
        from transformers import get_linear_schedule_with_warmup

        self.total_schedule = steps_per_epoch * epochs  # the schedule does not depend on max_steps
        self.scheduler = get_linear_schedule_with_warmup(
            optimizer, int(warmup_ratio * self.total_schedule), self.total_schedule)
        acc.register_for_checkpointing(self.scheduler, self.losses)
        self.state = {"epoch": 0, "batch_in_epoch": 0, "global_step": 0, "skipped_steps": 0}
        self.history: dict = {"loss": [], "eval": [], "skipped_steps": 0, "step_seconds": []}

    # -- helpers -------------------------------------------------------------------------------
    def _parameter_groups(self) -> dict[str, list]:
        """``{"method": [...], <part kind>: [...], "loss": [...]}``: the trained parameters by owner."""
        kinds = list(self.model.extra_parts)
        groups: dict[str, list] = {"method": [], **{k: [] for k in kinds}, "loss": []}
        for name, p in self.model.tuned_parameters().items():
            owner = next((k for k in kinds if name.startswith(f"petune_{k}.")), "method")
            groups[owner].append(p)
        groups["loss"] = list(self.losses.parameters())
        return groups

    def _broadcast_parameters(self):
        """Start every process from rank 0's parameters (random inits may differ per process)."""
        if self.accelerator.num_processes > 1:
            from accelerate.utils import broadcast

            with torch.no_grad():
                for p in self.params:
                    p.copy_(broadcast(p.detach().clone()))

    def _all_true(self, flag: bool) -> bool:
        if self.accelerator.num_processes == 1:
            return flag
        t = torch.tensor([0.0 if flag else 1.0], device=self.accelerator.device)
        return self.accelerator.reduce(t, reduction="sum").item() == 0

    def _sync_gradients(self):
        """Average the gradients of the parameters that have one (the same set on every process:
        all processes ran the same task) in one collective."""
        if self.accelerator.num_processes == 1:
            return
        with_grad = [p for p in self.params if p.grad is not None]
        if not with_grad:
            return
        flat = torch.cat([p.grad.reshape(-1) for p in with_grad])
        flat = self.accelerator.reduce(flat, reduction="mean")
        offset = 0
        for p in with_grad:
            p.grad.copy_(flat[offset:offset + p.numel()].view_as(p.grad))
            offset += p.numel()

    def _module_task(self, task: str):
        return task if self.model.tasks is not None else None

    # -- checkpoints ----------------------------------------------------------------------------
    @property
    def checkpoint_root(self) -> Path | None:
        return self.output_dir / "checkpoints" if self.output_dir else None

    def _fingerprint(self) -> dict:
        fingerprint = {"method": self.model.method.name, "tasks": list(self.tasks), "seed": self.seed,
                       "sampling": self.loader.mode, "num_processes": self.accelerator.num_processes,
                       "batch_sizes": {n: t.batch_size for n, t in self.tasks.items()}}
        repeats = {n: t.repeat for n, t in self.tasks.items() if t.repeat != 1}
        if repeats:  # older checkpoints have none of these keys
            fingerprint["repeats"] = repeats
        if self.first_stage_steps:
            fingerprint["first_stage"] = [self.first_stage_steps, list(self.first_stage_train)]
        if self.param_groups:  # the optimizer's state has one entry per group
            fingerprint["param_groups"] = json.loads(json.dumps(self.param_groups))
        return fingerprint

    def save_checkpoint(self) -> Path:
        """Write tuned parameters, optimizer, scheduler, loss parameters, RNG states and the
        loop position to ``output_dir/checkpoints/step-N`` (built in a temp dir, then renamed)."""
        acc = self.accelerator
        name = f"step-{self.state['global_step']:08d}"
        final, tmp = self.checkpoint_root / name, self.checkpoint_root / f".tmp-{name}"
        if acc.is_main_process and tmp.exists():
            shutil.rmtree(tmp)
        acc.wait_for_everyone()
        tmp.mkdir(parents=True, exist_ok=True)
        acc.save_state(str(tmp))
        acc.wait_for_everyone()
        if acc.is_main_process:
            save_tuned(self.model, tmp / "tuned")
            (tmp / STATE_NAME).write_text(json.dumps({**self.state, "fingerprint": self._fingerprint(),
                                                      "history": self.history}, indent=1))
            replace_dir(tmp, final)
            kept = sorted(p for p in self.checkpoint_root.glob("step-*"))
            for old in kept[:-self.keep_checkpoints] if self.keep_checkpoints else []:
                shutil.rmtree(old)
        acc.wait_for_everyone()
        return final

    def latest_checkpoint(self) -> Path | None:
        if not self.checkpoint_root or not self.checkpoint_root.exists():
            return None
        found = sorted(self.checkpoint_root.glob("step-*"))
        return found[-1] if found else None

    def load_checkpoint(self, path) -> None:
        """Restore a checkpoint written by :meth:`save_checkpoint`.

        Raises:
            FileNotFoundError: not a checkpoint.
            ValueError: it was written for another method, model, task list, seed, sampling or
                number of processes (resuming would not reproduce the run).
        """
        path = Path(path)
        if not (path / STATE_NAME).exists():
            raise FileNotFoundError(f"{path} is not a petune checkpoint (no {STATE_NAME})")
        saved = json.loads((path / STATE_NAME).read_text())
        now = self._fingerprint()
        if saved["fingerprint"] != now:
            diff = {k: (v, now.get(k)) for k, v in saved["fingerprint"].items() if now.get(k) != v}
            raise ValueError(f"checkpoint {path} is for another run: (saved, now) = {diff}")
        load_tuned(self.model, path / "tuned")  # raises on another method / model / shapes
        self.accelerator.load_state(str(path))
        self.state = {k: saved[k] for k in self.state}
        self.history = saved["history"]

    # -- the loop -------------------------------------------------------------------------------
    def fit(self, resume_from: str | os.PathLike | None = None) -> dict:
        """Train; ``resume_from`` a checkpoint dir, or ``"latest"`` (in ``output_dir``; starts
        fresh when there is none). Returns the history: per-step losses (``[step, task, loss]``),
        evaluations, skipped steps and the wall time of each optimizer step (``step_seconds``: from the
        end of the previous step, so fetching and collating its batches count; evaluations and
        checkpoints do not)."""
        from accelerate.utils import set_seed
        from tqdm.auto import tqdm

        acc = self.accelerator
        set_seed(self.seed)
        if resume_from == "latest":
            resume_from = self.latest_checkpoint()
        if resume_from is not None:
            self.load_checkpoint(resume_from)
            log.info("resumed from %s at step %d", resume_from, self.state["global_step"])
        if acc.trackers == [] and acc.log_with:
            acc.init_trackers("petune")
        bar = tqdm(total=self.total_steps, initial=self.state["global_step"], desc="train", unit="step",
                   disable=not (self.progress and acc.is_local_main_process))
        self.model.train()
        micro, done = 0, False
        window_start = time.perf_counter()  # a step's window runs from the end of the previous one
        for epoch in range(self.state["epoch"], self.epochs):
            for hook in self.on_epoch_start:
                hook(self, epoch)
                self.model.train()
            self.loader.set_epoch(epoch)
            n_batches = len(self.loader)
            for index, task, batch in self.loader.iterate(start=self.state["batch_in_epoch"]):
                self.model.use_task(self._module_task(task))
                with acc.autocast():
                    loss = self.tasks[task].loss(self.model, batch)
                if not self._all_true(bool(torch.isfinite(loss.detach()))):
                    if self.state["global_step"] == 0 and micro == 0 and self.history["skipped_steps"] == 0:
                        raise FloatingPointError(
                            f"loss of task {task!r} is NaN/inf at the first step: check the learning rate, "
                            "the data (empty texts, labels out of range) and the loss")
                    self._skip()
                    micro = 0
                    window_start = time.perf_counter()
                else:
                    acc.backward(loss / self.accumulation)
                    micro += 1
                    self.history["loss"].append([self.state["global_step"], task, float(loss.detach())])
                last = index + 1 == n_batches
                self.state["batch_in_epoch"] = index + 1
                if micro and (micro == self.accumulation or last):
                    micro = 0
                    if self._optimizer_step():
                        self.history["step_seconds"].append(time.perf_counter() - window_start)
                        bar.update(1)
                        bar.set_postfix(task=task, loss=f"{float(loss.detach()):.4f}")
                        done = self._after_step(last_batch=last, epoch=epoch)
                        window_start = time.perf_counter()
                if done:
                    break
            if done:
                break
            self.state["epoch"], self.state["batch_in_epoch"] = epoch + 1, 0
        bar.close()
        if self.eval_fn is not None and not (self.history["eval"] and
                                             self.history["eval"][-1]["step"] == self.state["global_step"]):
            self._evaluate()
        if self.checkpoint_root is not None and self.latest_checkpoint() != self.checkpoint_root / \
                f"step-{self.state['global_step']:08d}":
            self.save_checkpoint()
        self.model.eval()
        for tracker in acc.trackers:  # not acc.end_training(): it destroys the process group the caller may need
            tracker.finish()
        self.history["skipped_steps"] = self.state["skipped_steps"]
        return self.history

    def _skip(self):
        self.optimizer.zero_grad()
        self.state["skipped_steps"] += 1
        self.history["skipped_steps"] = self.state["skipped_steps"]
        log.warning("skipped a step with a NaN/inf loss or gradient (%d so far)", self.state["skipped_steps"])

    def _optimizer_step(self) -> bool:
        if self.state["global_step"] < self.first_stage_steps:  # first stage: only its groups move
            for g, params in self.groups.items():
                if g not in self.first_stage_train:
                    for p in params:
                        p.grad = None
        self._sync_gradients()
        if self.max_grad_norm is not None:
            norm = self.accelerator.clip_grad_norm_([p for p in self.params if p.grad is not None],
                                                    self.max_grad_norm)
            finite = bool(torch.isfinite(norm))
        else:
            finite = all(bool(torch.isfinite(p.grad).all()) for p in self.params if p.grad is not None)
        if not finite:
            self._skip()
            return False
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad()
        self.state["global_step"] += 1
        return True

    def _after_step(self, last_batch: bool, epoch: int) -> bool:
        step = self.state["global_step"]
        if last_batch:  # a checkpoint taken here resumes at the next epoch
            self.state["epoch"], self.state["batch_in_epoch"] = epoch + 1, 0
        if self.history["loss"]:
            self.accelerator.log({"loss": self.history["loss"][-1][2], "lr": self.scheduler.get_last_lr()[0]},
                                 step=step)
        if self.eval_fn is not None and self.eval_every and step % self.eval_every == 0:
            self._evaluate()
        stop = self.max_steps is not None and step >= self.max_steps
        if self.checkpoint_root is not None and (
                stop or (self.checkpoint_every and step % self.checkpoint_every == 0)):
            self.save_checkpoint()
        return stop

    def _evaluate(self):
        was_training = self.model.training
        self.model.eval()
        result = dict(self.eval_fn(self))
        self.model.train(was_training)
        self.history["eval"].append({"step": self.state["global_step"], **result})
        self.accelerator.log({f"eval/{k}": v for k, v in result.items() if isinstance(v, (int, float))},
                             step=self.state["global_step"])


def train(model: TunedModel, tasks: list[Task], resume_from=None, **options) -> dict:
    """``Trainer(model, tasks, **options).fit(resume_from)``; returns the history."""
    return Trainer(model, tasks, **options).fit(resume_from)
