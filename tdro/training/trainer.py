"""The scheduled trainer: config → data + model → training loop → run records."""
from __future__ import annotations

import math
import platform
import random
import resource
import sys
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Callable, TextIO

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from tdro.algorithms import ALGORITHMS, Algorithm, BatchLosses, Grouper
from tdro.algorithms.stages import finished_stage_runs
from tdro.config import NON_RESULT_KEYS, Config, ConfigError
from tdro.data import GroupedDataset, GroupStratifiedBatches, build_dataset
from tdro.data.augment import TrainInputs
from tdro.data.batching import prefetched
from tdro.data.base import batch_to_device, take
from tdro.models.multigroup import MultiGroupModel, build_model
from tdro.objectives.anchor_losses import AnchorLoss
from tdro.objectives.groupdro import group_mean_losses
from tdro.runs import (append_jsonl, lock_run_directory, read_jsonl, read_summary, write_json_atomic,
                       write_jsonl_atomic)
from tdro.training.checkpoint import capture_rng_states, load_checkpoint, restore_rng_states, save_checkpoint
from tdro.training.diagnostics import active_warmups, alignment, group_weight, summarize
from tdro.training.distributed import Distributed
from tdro.training.evaluation import collect_latents, evaluate
from tdro.training.host_memory import keep_freed_memory
from tdro.training.optim import create_optimizer
from tdro.training.schedules import EpochSchedule


class NonFiniteLossError(FloatingPointError):
    """Too many non-finite steps in a row; the last good checkpoint is left as it was."""


# Raised by a training step whose numbers broke down (e.g. eigvalsh on NaN latents): a non-finite step.
NUMERICAL_ERRORS = (torch.linalg.LinAlgError, ArithmeticError)


@dataclass
class RunResult:
    run_dir: Path
    summary: dict


@dataclass
class RunParts:
    """What a run trains: built from a Config by ``build_parts``, or handed to the Trainer (e.g. by a test)."""

    dataset: GroupedDataset
    grouper: Grouper
    model: MultiGroupModel
    algorithm: Algorithm
    optimizer: torch.optim.Optimizer
    stage_runs: dict[str, Path] = field(default_factory=dict)


def build_parts(config: Config, device: torch.device, dataset: GroupedDataset | None = None) -> RunParts:
    """The one place a run's parts are built from its Config (after ``seed_everything``).

    Stage runs of two-stage algorithms are trained (or reused) here, before anything of this run is
    written, and leave the global random state as they found it.
    """
    dataset = dataset if dataset is not None else build_dataset(config)
    grouper = Grouper(dataset, config.groupdro_cells)
    algorithm = ALGORITHMS.get(config.algorithm)(config, grouper)
    algorithm.check_dataset(dataset)
    stage_runs = finished_stage_runs(config)
    model = build_model(config, dataset).to(device)
    prepared = algorithm.prepare(stage_runs, dataset, model, device)
    if prepared is not dataset:  # e.g. DFR trains on part of validation: number its samples afresh
        dataset = prepared
        grouper = algorithm.grouper = Grouper(dataset, config.groupdro_cells)
    optimizer = create_optimizer(config, model.parameter_groups())
    return RunParts(dataset, grouper, model, algorithm, optimizer, stage_runs)


def resolve_device(name: str) -> torch.device:
    """auto = CUDA, then MPS, then CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    device = torch.device(name)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"key 'device' is {name!r} but CUDA is not available here; use device: auto or cpu")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ConfigError(f"key 'device' is {name!r} but MPS is not available here; use device: auto or cpu")
    return device


def seed_everything(seed: int, deterministic: bool) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)
    if deterministic != torch.are_deterministic_algorithms_enabled():
        torch.use_deterministic_algorithms(deterministic)  # the call itself imports torch._dynamo (~2 s)


def new_run_dir(config: Config) -> Path:
    if config.run_name:
        return Path(config.output_dir) / config.run_name
    stamp = datetime.now(timezone.utc).strftime("%Y%m%d-%H%M%S-%f")
    return Path(config.output_dir) / f"{config.dataset}-{stamp}-{config.result_hash()[:6]}"


def peak_memory_mb(device: torch.device) -> float:
    """Max allocated on CUDA/MPS; the process's peak resident set on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    if device.type == "mps":
        return torch.mps.driver_allocated_memory() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def run_memory_mb(device: torch.device, rss_baseline_mb: float) -> float:
    """The run's own memory, comparable between arms: the allocator's peak on CUDA/MPS; on CPU the peak RSS
    above ``rss_baseline_mb`` (the process's peak when the run started, after imports: ``import torch``
    alone is ~500 MB of CUDA libraries, which made raw RSS ratios read ≈ 1.0)."""
    if device.type != "cpu":
        return peak_memory_mb(device)
    return max(0.0, peak_memory_mb(device) - rss_baseline_mb)


def monitor_parts(monitor: str) -> tuple[str, str, bool]:
    """'val_worst_group_acc' → ('val', 'worst_group_acc', higher_is_better)."""
    split, metric = monitor.split("_", 1)
    return split, metric, not metric.endswith("loss")


class Trainer:
    """Owns one run: trains its parts (built from the Config unless given), evaluates, records, resumes."""

    def __init__(self, config: Config, run_dir: Path | None = None,
                 on_epoch: Callable[[dict], None] | None = None, parts: RunParts | None = None,
                 distributed: Distributed | None = None) -> None:
        keep_freed_memory()  # before the first step's tensors: see tdro.training.host_memory
        self.config = config
        self.on_epoch = on_epoch
        self.distributed = distributed
        self.writer = distributed is None or distributed.is_writer  # rank 0 alone writes records and checkpoints
        self.device = resolve_device(config.device) if distributed is None else distributed.device
        if distributed is not None:
            distributed.check_batch_size(config.batch_size)
        if config.bf16 and self.device.type != "cuda":
            raise ConfigError(f"key 'bf16' is true but the device is {self.device}; bf16 autocast runs on CUDA only")
        if config.threads:
            torch.set_num_threads(config.threads)
        self.rss_baseline_mb = peak_memory_mb(torch.device("cpu"))  # before data and model: see run_memory_mb
        seed_everything(config.seed, config.deterministic)
        parts = parts if parts is not None else build_parts(config, self.device)
        self.dataset, self.grouper, self.model = parts.dataset, parts.grouper, parts.model
        self.algorithm, self.optimizer, self.stage_runs = parts.algorithm, parts.optimizer, parts.stage_runs
        if distributed is not None and self.algorithm.distributed != "exact":
            raise ConfigError(f"algorithm {config.algorithm!r} cannot run over several processes "
                              f"({self.algorithm.distributed}); run it in one process")
        if distributed is not None and any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
                                           for m in self.model.modules()):
            if self.device.type == "cuda":  # batch statistics over the global batch, as in one process
                self.model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(self.model)
            else:
                warnings.warn("BatchNorm layers under a distributed CPU run normalise with each rank's share of the "
                              "batch (torch's SyncBatchNorm needs CUDA), so this run only approximates the "
                              "single-process one", stacklevel=2)
        self.group_names = list(self.dataset.groups)
        self.schedule = EpochSchedule(config)
        self.anchor_loss = AnchorLoss(config.lambda_fit, config.lambda_sep, config.sep_method,
                                      config.sep_samples_per_class, config.sep_margin, config.per_group_fit)
        self.data_generator = torch.Generator().manual_seed(config.seed)
        self.batches = prefetched(GroupStratifiedBatches(self.dataset, "train", config.batch_size,
                                                         self.algorithm.batching or config.batching,
                                                         self.data_generator, with_index=True),
                                  config.num_workers, config.pin_memory, self.device)
        self.train_inputs = TrainInputs.from_config(self.dataset, config)  # uint8 images, augmentation: on the device
        self.selection_split, self.monitor_metric, self.higher_is_better = monitor_parts(config.monitor)
        self.run_dir = run_dir or new_run_dir(config)
        if distributed is not None:
            self.run_dir = Path(distributed.broadcast_text(str(self.run_dir)))
        self.checkpoints = self.run_dir / "checkpoints"
        self.epoch = 0  # epochs completed; records number epochs from 1 (epoch e = after e passes)
        self.step = 0
        self.initial_q = self._q_dict()  # q₀, before any step or resume: the diagnostics measure q against it
        self.bar: tqdm | None = None
        self.best_value: float | None = None
        self.best_epoch: int | None = None
        self.epochs_without_improvement = 0
        self.nonfinite_in_a_row = 0
        self.lock = None
        self.started = time.time()
        self.wall_seconds_before = 0.0
        self.autocast = (torch.autocast("cuda", dtype=torch.bfloat16) if config.bf16 else nullcontext())
        self.tensorboard = self._open_tensorboard() if config.tensorboard and self.writer else None

    # --- set-up and resume ---
    def _open_tensorboard(self):
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as err:
            raise ConfigError("key 'tensorboard' is true but the tensorboard package is not installed; "
                              "pip install tensorboard, or set tensorboard: false") from err
        return SummaryWriter(str(self.run_dir / "tensorboard"))

    def start(self) -> None:
        """Create and lock the run directory for a new run; refuse to overwrite an existing one.

        A directory left by the same config failing before its first checkpoint (e.g. an unreadable
        image in epoch 1) holds nothing a resume would keep, so the run starts there again.
        """
        if not self.writer:
            return
        self.lock = lock_run_directory(self.run_dir)
        if (self.run_dir / "config.yaml").exists():
            if not self._failed_before_first_checkpoint():
                self.close()
                raise FileExistsError(f"run directory {self.run_dir} already holds a run; resume it with "
                                      f"`python -m tdro train --resume {self.run_dir}` or choose another run_name")
            for name in ("history.jsonl", "steps.jsonl"):
                (self.run_dir / name).unlink(missing_ok=True)
        self.config.save(self.run_dir / "config.yaml")

    def _failed_before_first_checkpoint(self) -> bool:
        """Whether the run directory holds this config and no checkpoint or summary yet."""
        if (self.checkpoints / "last.pt").exists() or (self.run_dir / "summary.json").exists():
            return False
        try:
            return Config.load([self.run_dir / "config.yaml"]).result_hash() == self.config.result_hash()
        except ConfigError:
            return False

    def close(self) -> None:
        """Release the run directory's lock (process death releases it too); end a bar an error left open."""
        self._close_bar(finished=False)
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def resume(self, state: dict | None = None) -> None:
        """Lock the run, continue after the last checkpoint (``state``: last.pt, loaded and checked) or from scratch.

        Records after the checkpointed epoch are dropped and redone.
        """
        if self.writer:
            self.lock = lock_run_directory(self.run_dir)
        last = self.checkpoints / "last.pt"
        if state is None and last.exists():
            state = load_checkpoint(last, self.device)
            check_same_config(self.config, state, self.run_dir)
        if state is not None:
            self.model.load_state_dict(state["model"])
            self.optimizer.load_state_dict(state["optimizer"])
            self.schedule.load_state_dict(state["schedule"])
            self.algorithm.load_state_dict(state["algorithm"])
            restore_rng_states(state["rng"], self.data_generator)
            self.batches.load_state_dict(state["batches"])
            self.epoch = state["epoch"] + 1
            self.step = state["step"]
            self.best_value, self.best_epoch = state["best_value"], state["best_epoch"]
            self.epochs_without_improvement = state["epochs_without_improvement"]
            self.wall_seconds_before = state["wall_seconds"]
        for name in ("history.jsonl", "steps.jsonl") if self.writer else ():
            path = self.run_dir / name
            if path.exists():
                write_jsonl_atomic(path, [r for r in read_jsonl(path) if r["epoch"] <= self.epoch])

    # --- the loop ---
    def fit(self) -> RunResult:
        config = self.config
        self.bar = self._open_bar()
        while self.epoch < config.epochs and not self._stopped_early():
            record = self.train_epoch()
            metrics = {"val": evaluate(self.model, self.dataset, "val", self.device, config.eval_batch_size,
                                       distributed=self.distributed)}
            if self.selection_split == "test":
                metrics["test"] = evaluate(self.model, self.dataset, "test", self.device, config.eval_batch_size,
                                           distributed=self.distributed)
            value = metrics[self.selection_split][self.monitor_metric]
            improved = self._is_improvement(value)
            if improved:
                self.best_value, self.best_epoch, self.epochs_without_improvement = value, self.epoch, 0
            else:
                self.epochs_without_improvement += 1
            self.schedule.observe(value, self.higher_is_better)
            record.update(metrics, monitor={"name": config.monitor, "value": value, "improved": improved},
                          alignment=self._alignment())
            if self.writer:
                append_jsonl(self.run_dir / "history.jsonl", record)
                self._log_tensorboard(record)
                if config.progress:
                    self._print_epoch(record)
                if config.latent_samples_per_group:
                    self._record_latents()
                self._save_checkpoints(improved)
            self.epoch += 1
            if self.on_epoch is not None:
                self.on_epoch(record)
        self._close_bar(finished=True)
        return RunResult(self.run_dir, self.finish())

    def _open_bar(self) -> tqdm | None:
        """One bar over the run's steps, only with ``progress`` on a live terminal or notebook (logs get lines)."""
        if not (self.config.progress and self.writer and live_output(sys.stdout)):
            return None
        per_epoch = len(self.batches)
        return tqdm(total=self.config.epochs * per_epoch, initial=self.epoch * per_epoch, unit="step",
                    file=sys.stdout, mininterval=0.5, dynamic_ncols=True)

    def _close_bar(self, finished: bool) -> None:
        """End the bar: full when training finished (early stopping included), as far as it got otherwise."""
        if self.bar is None:
            return
        if finished:
            self.bar.total = self.bar.n
        self.bar.close()
        self.bar = None

    def _print_epoch(self, record: dict) -> None:
        """The epoch's line on stdout (above the bar): val worst-group and mean accuracy, the worst group's q."""
        val = record["val"]
        worst = val["worst_group"]
        q = group_weight(record["q"], worst)
        line = (f"epoch {record['epoch']}/{self.config.epochs}: val worst-group acc {_fmt(val['worst_group_acc'])} "
                f"({worst}), mean acc {_fmt(val['acc'])}{'' if q is None else f', q[{worst}] {q:.3f}'}, "
                f"train loss {_fmt(record['train']['loss'])}, {record['epoch_seconds']:.1f}s"
                f"{' (best so far)' if record['monitor']['improved'] else ''}")
        if self.bar is not None:
            self.bar.write(line, file=sys.stdout)
        else:
            print(line, flush=True)

    def _alignment(self) -> dict:
        """W₂ alignment of the validation latents to the anchors and between groups (``diagnostics.alignment``)."""
        collected = collect_latents(self.model, self.dataset, "val", self.device, self.config.eval_batch_size)
        return alignment(collected["latents"], collected["labels"], collected["group"], self.model.anchors,
                         self.group_names, list(self.dataset.class_names))

    def _stopped_early(self) -> bool:
        """Early stopping's decision, from checkpointed state: a resumed run that had stopped stays stopped."""
        patience = self.config.early_stopping_patience
        return bool(patience) and self.epochs_without_improvement >= patience

    def _is_improvement(self, value: float | None) -> bool:
        if value is None or (isinstance(value, float) and math.isnan(value)):
            return False
        if self.best_value is None:
            return True
        return value > self.best_value if self.higher_is_better else value < self.best_value

    def _set_learning_rates(self) -> dict[str, float]:
        factor = self.schedule.factor(self.epoch)
        for group in self.optimizer.param_groups:
            group["lr"] = group["base_lr"] * factor
        return {group["name"]: group["lr"] for group in self.optimizer.param_groups}

    def _set_backbone_frozen(self) -> None:
        """Hold pretrained backbones during the first freeze_backbone_epochs (other freezing is the algorithm's)."""
        if not self.config.freeze_backbone_epochs:
            return
        frozen = self.epoch < self.config.freeze_backbone_epochs
        for parameter in self.model.parameter_groups()["backbone"]:
            parameter.requires_grad_(not frozen)

    def train_epoch(self) -> dict:
        config = self.config
        self.model.train()
        learning_rates = self._set_learning_rates()
        self._set_backbone_frozen()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        totals = torch.zeros(5, device=self.device)  # loss, cls, fit, sep, correct
        group_loss_sum = torch.zeros(len(self.group_names), device=self.device)
        group_batches = torch.zeros(len(self.group_names), device=self.device)
        samples = steps = nonfinite = 0
        started = time.time()
        if self.bar is not None:
            self.bar.set_description(f"epoch {self.epoch + 1}/{config.epochs}", refresh=False)
        for batch in self.batches:
            parts = self.train_step(batch)
            if self.bar is not None:
                self.bar.update()
            if parts is None:
                nonfinite += 1
                continue
            steps += 1
            samples += parts["samples"]
            totals += torch.stack([parts["loss"], parts["cls"], parts["fit"], parts["sep"], parts["correct"]])
            group_loss_sum += torch.where(parts["present"], parts["group_losses"], 0.0)
            group_batches += parts["present"].float()
            if (self.step - 1) % config.log_interval == 0:
                self._log_step(parts)
            if self.bar is not None and steps % 10 == 1:
                self.bar.set_postfix(loss=f"{parts['loss'].item():.3f}", q=self._q_text(), refresh=False)
        seconds = time.time() - started
        means = (totals / max(steps, 1)).tolist()
        group_loss = (group_loss_sum / group_batches.clamp(min=1)).tolist()
        return {
            "epoch": self.epoch + 1,
            "train": {"loss": means[0], "cls": means[1], "fit": means[2], "sep": means[3],
                      "acc": totals[4].item() / max(samples, 1),
                      "group_loss": {name: group_loss[i] for i, name in enumerate(self.group_names)}},
            "q": self._q_dict(),
            "lr": learning_rates,
            "epoch_seconds": seconds,
            "samples_per_second": samples / seconds if seconds > 0 else None,
            "peak_memory_mb": peak_memory_mb(self.device),
            "run_memory_mb": run_memory_mb(self.device, self.rss_baseline_mb),
            "steps": steps,
            "nonfinite_steps": nonfinite,
        }

    def train_step(self, batch: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> dict | None:
        """One optimisation step; returns detached loss parts, or None for a non-finite step (nothing applied).

        A step is non-finite when its loss or gradient norm is not finite, or when its numbers broke
        down (``NUMERICAL_ERRORS``); the algorithm's state (e.g. GroupDRO's q) is then restored too.
        """
        algorithm_state = self.algorithm.state_dict()
        self.optimizer.zero_grad(set_to_none=True)
        try:
            parts, loss, losses = self._losses(batch)
            if not torch.isfinite(loss):
                return self._skip_step("the loss is not finite", parts, algorithm_state)
            loss.backward()
            if self.distributed is not None:
                self.distributed.average_gradients([p for p in self.model.parameters() if p.requires_grad])
        except NUMERICAL_ERRORS as error:
            reason = f"{type(error).__name__.lstrip('_')}: {str(error).splitlines()[0]}"
            return self._skip_step(reason, {}, algorithm_state)
        parameters = [p for p in self.model.parameters() if p.grad is not None]
        grad_norm = torch.nn.utils.get_total_norm([p.grad for p in parameters])
        if not torch.isfinite(grad_norm):
            return self._skip_step("the gradient is not finite", parts, algorithm_state)
        if self.config.grad_clip > 0:
            torch.nn.utils.clip_grads_with_norm_(parameters, self.config.grad_clip, grad_norm)
        self.optimizer.step()
        self.nonfinite_in_a_row = 0
        self.algorithm.after_step(losses)
        self.step += 1
        return parts

    def _losses(self, batch: dict[str, tuple[torch.Tensor, ...]]) -> tuple[dict, torch.Tensor, BatchLosses]:
        """Forward pass → per-sample losses → the algorithm's loss + the anchor regulariser.

        Returns the detached parts to record, the loss to minimise, and what the algorithm saw.
        """
        labels = torch.cat([y for _, y, _ in batch.values()]).to(self.device, non_blocking=True)
        index = torch.cat([i for _, _, i in batch.values()]).to(self.device, non_blocking=True)
        group_ids = torch.cat([torch.full((len(y),), self.group_names.index(name), dtype=torch.long)
                               for name, (_, y, _) in batch.items()]).to(self.device, non_blocking=True)
        with self.autocast:
            latents = self._latents(batch)
            logits = self.model.head(latents)
        latents, logits = latents.float(), logits.float()
        per_sample = F.cross_entropy(logits, labels, reduction="none")
        group_losses, present = group_mean_losses(per_sample, group_ids, len(self.group_names))
        losses = BatchLosses(per_sample, logits, latents, labels, group_ids, self.grouper.unit_ids(group_ids, labels),
                             self.grouper.sample_ids(group_ids, index), self.epoch)
        cls_loss = self.algorithm.loss(losses)
        anchor_parts = self.anchor_loss(latents, labels, group_ids, self.model.anchors, self.model.head)
        loss = cls_loss + anchor_parts["total"]
        zero = loss.new_zeros(())
        parts = {"loss": loss.detach(), "cls": cls_loss.detach(), "fit": anchor_parts.get("fit", zero).detach(),
                 "sep": anchor_parts.get("sep", zero).detach(), "group_losses": group_losses.detach(),
                 "present": present, "samples": len(labels), "correct": (logits.argmax(1) == labels).sum().float()}
        return parts, loss, losses

    def _latents(self, batch: dict[str, tuple[torch.Tensor, ...]]) -> torch.Tensor:
        """The batch's latents in batch order; distributed, this rank encodes its share of each group and
        the shares are gathered (with gradients), so what follows sees the global batch on every rank."""
        if self.distributed is None:
            inputs = self.train_inputs({name: batch_to_device(x, self.device) for name, (x, *_) in batch.items()},
                                       self.step)
            return torch.cat(list(self.model.encode(inputs).values()))
        shares = {name: self.distributed.shard(len(y)) for name, (_, y, _) in batch.items()}
        inputs = self.train_inputs({name: batch_to_device(take(x, shares[name]), self.device)
                                    for name, (x, *_) in batch.items() if len(shares[name])},
                                   self.step, {name: (shares[name], len(y)) for name, (_, y, _) in batch.items()})
        with self.distributed.own_rng(self.step):
            local = torch.cat(list(self.model.encode(inputs).values()))
        return self.distributed.gather_rows(local, [len(y) for _, y, _ in batch.values()])

    def _skip_step(self, reason: str, parts: dict, algorithm_state: dict) -> None:
        """Apply nothing, restore the algorithm's state, count the step; too many in a row stop the run."""
        self.optimizer.zero_grad(set_to_none=True)
        self.algorithm.load_state_dict(algorithm_state)
        self.nonfinite_in_a_row += 1
        if self.nonfinite_in_a_row < self.config.max_nonfinite_steps:
            return None
        described = ", ".join(f"{k}={parts[k].item():.4g}" for k in ("loss", "cls", "fit", "sep") if k in parts)
        last = self.checkpoints / "last.pt"
        if last.exists():
            kept = f"the last good checkpoint is {last} (epoch {self.epoch})"
        else:
            kept = (f"no checkpoint was written: the run stopped in its first epoch, before {last} existed; "
                    f"start it again with other settings (e.g. a lower lr, grad_clip > 0)")
        raise NonFiniteLossError(
            f"{self.nonfinite_in_a_row} non-finite steps in a row (max_nonfinite_steps="
            f"{self.config.max_nonfinite_steps}) at epoch {self.epoch + 1}, step {self.step}: {reason}"
            f"{' (' + described + ')' if described else ''}; {kept}")

    # --- records ---
    def _q_dict(self) -> dict[str, float] | None:
        return self.algorithm.weights()

    def _q_text(self) -> str:
        q = self._q_dict()
        return "-" if q is None else " ".join(f"{v:.2f}" for v in q.values())

    def _log_step(self, parts: dict) -> None:
        if not self.writer:
            return
        record = {"step": self.step, "epoch": self.epoch + 1,
                  **{k: parts[k].item() for k in ("loss", "cls", "fit", "sep")}, "q": self._q_dict()}
        append_jsonl(self.run_dir / "steps.jsonl", record)
        if self.tensorboard is not None:
            for tag, k in (("loss", "loss"), ("ce", "cls"), ("l_fit", "fit"), ("l_sep", "sep")):
                self.tensorboard.add_scalar(f"train/{tag}", record[k], self.step)
            for name, value in (record["q"] or {}).items():
                self.tensorboard.add_scalar(f"train/group_{name}_weight", value, self.step)

    def _log_tensorboard(self, record: dict) -> None:
        if self.tensorboard is None:
            return
        for split in ("val", "test"):
            metrics = record.get(split)
            if metrics is None:
                continue
            for name in ("acc", "worst_group_acc", "balanced_acc", "macro_f1"):
                self.tensorboard.add_scalar(f"{split}/{name}", metrics[name], record["epoch"])
            for group, value in metrics["group_acc"].items():
                self.tensorboard.add_scalar(f"{split}/acc_group_{group}", value, record["epoch"])
            for group, value in metrics["group_loss"].items():
                self.tensorboard.add_scalar(f"{split}/loss_group_{group}", value, record["epoch"])
            for cls, value in metrics["class_acc"].items():
                self.tensorboard.add_scalar(f"{split}/acc_class_{cls}", value, record["epoch"])
        self.tensorboard.flush()

    def _record_latents(self) -> None:
        """Validation latents and anchors projected on their first two principal axes, for the latent view."""
        collected = collect_latents(self.model, self.dataset, "val", self.device, self.config.eval_batch_size,
                                    max_per_group=self.config.latent_samples_per_group)
        latents = torch.as_tensor(collected["latents"], dtype=torch.float64)
        center = latents.mean(0)
        _, singular_values, right = torch.linalg.svd(latents - center, full_matrices=False)
        axes = right[:2].T
        with torch.no_grad():
            means = self.model.anchors.means.detach().double().cpu()
            covariances = self.model.anchors.covariance().detach().double().cpu()
        variance = singular_values**2
        path = self.run_dir / "latents" / f"epoch_{self.epoch + 1:03d}.npz"
        path.parent.mkdir(exist_ok=True)
        np.savez_compressed(
            path, points=((latents - center) @ axes).numpy(), labels=collected["labels"], groups=collected["group"],
            means=((means - center) @ axes).numpy(), covariances=(axes.T @ covariances @ axes).numpy(),
            group_names=np.array(self.group_names), class_names=np.array(list(self.dataset.class_names)),
            explained_variance=(variance[:2] / variance.sum()).numpy())

    def _checkpoint_payload(self) -> dict:
        return {
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "schedule": self.schedule.state_dict(),
            "algorithm": self.algorithm.state_dict(),
            "rng": capture_rng_states(self.data_generator),
            "batches": self.batches.state_dict(),
            "epoch": self.epoch,
            "step": self.step,
            "best_value": self.best_value,
            "best_epoch": self.best_epoch,
            "epochs_without_improvement": self.epochs_without_improvement,
            "wall_seconds": self.wall_seconds_before + time.time() - self.started,
            "config": self.config.to_dict(),
            "config_hash": self.config.result_hash(),
        }

    def _save_checkpoints(self, improved: bool) -> None:
        """best.pt (when improved), then last.pt; weights that are no longer finite are never saved."""
        if not bool(torch.stack([p.isfinite().all() for p in self.model.parameters()]).all()):  # one read-back
            raise NonFiniteLossError(f"the weights are no longer finite after epoch {self.epoch + 1}; not saved, so "
                                     f"{self.checkpoints / 'last.pt'} stays the last good checkpoint (if any); "
                                     f"lower lr or set grad_clip > 0")
        best, last = self.checkpoints / "best.pt", self.checkpoints / "last.pt"
        save_checkpoint([best, last] if improved else [last], self._checkpoint_payload())

    def _diagnostics(self, selected_epoch: int) -> dict:
        """The run's flat diagnostics (``diagnostics.summarize``) from its records, resumed parts included."""
        steps = self.run_dir / "steps.jsonl"
        has_backbone = bool(self.model.parameter_groups()["backbone"])
        return summarize(read_jsonl(self.run_dir / "history.jsonl"), read_jsonl(steps) if steps.exists() else [],
                         selected_epoch, self.initial_q, active_warmups(self.config, has_backbone))

    def finish(self) -> dict:
        """Evaluate the selected checkpoint once on val and test; write summary.json."""
        if self.distributed is not None:
            self.distributed.barrier()  # rank 0 has written the checkpoints every rank reads here
        best_path = self.checkpoints / "best.pt"
        selected = best_path if best_path.exists() else self.checkpoints / "last.pt"
        state = load_checkpoint(selected, self.device)
        self.model.load_state_dict(state["model"])
        batch_size = self.config.eval_batch_size
        selected_epoch = state["epoch"] + 1  # checkpoints keep the 0-based loop counter; records count from 1
        summary = {
            "run_id": self.run_dir.name,
            "selected_epoch": selected_epoch,
            "selected_checkpoint": selected.name,
            "monitor": self.config.monitor,
            "monitor_value": self.best_value,
            "selection_split": self.selection_split,
            "test_selection": self.selection_split == "test",
            "epochs_run": self.epoch,
            "val": evaluate(self.model, self.dataset, "val", self.device, batch_size, distributed=self.distributed),
            "test": evaluate(self.model, self.dataset, "test", self.device, batch_size, distributed=self.distributed),
            "wall_seconds": self.wall_seconds_before + time.time() - self.started,
            "peak_memory_mb": peak_memory_mb(self.device),
            "run_memory_mb": run_memory_mb(self.device, self.rss_baseline_mb),
            "parameter_count": self.model.parameter_count(),
            "groups": self.group_names,
            "classes": list(self.dataset.class_names),
            "group_sizes": {name: {split: len(getattr(group, split).y) for split in ("train", "val", "test")}
                            for name, group in self.dataset.groups.items()},
            "final_q": self._q_dict(),
            "initial_q": self.initial_q,
            "diagnostics": self._diagnostics(selected_epoch),
            "algorithm": self.config.algorithm,
            "algorithm_records": self.algorithm.summary(),
            "stage_runs": {name: {"run_dir": str(path), "wall_seconds": read_summary(path / "summary.json")["wall_seconds"]}
                           for name, path in self.stage_runs.items()},
            "device": str(self.device),
            "processes": 1 if self.distributed is None else self.distributed.world,
            "versions": {"python": platform.python_version(), "torch": torch.__version__,
                         "numpy": np.__version__, "tdro": sys.modules["tdro"].__version__},
            "config_hash": self.config.result_hash(),
            "config_warnings": self.config.inactive_key_warnings(),
        }
        if self.writer:
            write_json_atomic(self.run_dir / "summary.json", summary)
        if self.tensorboard is not None:
            self.tensorboard.close()
        return summary


def live_output(stream: TextIO) -> bool:
    """Whether someone watches ``stream`` live: a terminal, or a Jupyter kernel's output (a notebook)."""
    if type(stream).__module__.startswith("ipykernel"):
        return True
    isatty = getattr(stream, "isatty", None)
    return bool(isatty and isatty())


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4f}"


def train(config: Config, run_dir: Path | None = None, on_epoch: Callable[[dict], None] | None = None,
          distributed: Distributed | None = None) -> RunResult:
    """Train a new run from a Config; on_epoch sees each epoch's record after it is saved (e.g. for pruning)."""
    trainer = Trainer(config, run_dir, on_epoch, distributed=distributed)
    try:
        trainer.start()
        return trainer.fit()
    finally:
        trainer.close()


def check_same_config(config: Config, state: dict, run_dir: Path) -> None:
    """Refuse to resume a checkpoint trained under another config (an edited or cut config.yaml), naming the keys."""
    saved = state.get("config_hash")
    if saved is None or saved == config.result_hash():
        return
    current, trained = config.to_dict(), state["config"]
    differing = sorted(k for k in set(current) | set(trained) if k not in NON_RESULT_KEYS
                       and current.get(k, "<absent>") != trained.get(k, "<absent>"))
    changes = ", ".join(f"{k}: {trained.get(k, '<absent>')!r} → {current.get(k, '<absent>')!r}" for k in differing)
    raise ConfigError(f"{run_dir / 'config.yaml'} differs from the config {run_dir / 'checkpoints' / 'last.pt'} "
                      f"was trained with ({changes or 'hash ' + saved[:12] + ' → ' + config.result_hash()[:12]}); "
                      f"a resumed run must keep its config: restore those keys, or start a new run")


def resume(run_dir: str | Path, on_epoch: Callable[[dict], None] | None = None,
           distributed: Distributed | None = None) -> RunResult:
    """Resume a run from its directory (config.yaml and checkpoints/last.pt).

    The config is checked against the checkpoint's before anything is built from it.
    """
    run_dir = Path(run_dir)
    config = Config.load([run_dir / "config.yaml"])
    last = run_dir / "checkpoints" / "last.pt"
    state = load_checkpoint(last) if last.exists() else None
    if state is not None:
        check_same_config(config, state, run_dir)
    trainer = Trainer(config, run_dir, on_epoch, distributed=distributed)
    try:
        trainer.resume(state)
        return trainer.fit()
    finally:
        trainer.close()
