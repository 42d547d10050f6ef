"""The run setup every trainer shares (SFT, GRPO, preference optimization): model type and tokenizer, the model,
the distributed optimizer and its zero stage, resume, checkpoints, the learning-rate schedule and metrics.

A trainer calls ``TrainingRun.prepare`` first (cheap: flags, tokenizer, save directory, which checkpoint to
resume), reads its data, then ``run.load_model()``; per step it calls ``run.set_lr``, does its forward/backward
with ``run.optimizer.start_micro_batch`` before each backward, ``run.optimizer.step``, ``run.metrics.write``,
``run.save`` and ``run.stop_if_requested`` (a stop signal on any rank: save, exit non-zero).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import torch

from ..models.families import config_folder, detect_model_type, get_family
from ..models.pretrained import create_from_config, load_pretrained
from ..parallel.cpu_allocator import keep_freed_memory
from ..runtime import Stopped, UsageError, log
from ..tokenizer import load_tokenizer, tokenizer_source
from .checkpointing import (SAVE_DTYPES, check_save_dir, export_config_source, load_training_state,
                            resume_checkpoint, save_checkpoint)
from .distributed_optimizer import DistributedAdamW
from .lora_run import LoRARequest, export_lora, load_lora_model, lora_request
from .loss_scale import DynamicLossScaler
from .metrics import MetricsLog, local_memory_mb, parse_report_to
from .preemption import StopRequests, stop_message
from .lr_schedule import lr_at


def resolve_model_type(args, ps) -> str:
    if args.model_type:
        get_family(args.model_type)
        return args.model_type
    source = config_folder(args.ckpt_dir, args.config_file)
    model_type = detect_model_type(source)
    log(f"detected --model_type {model_type} from {source}", ps)
    return model_type


def resolve_zero_stage(stage: int | None, ps) -> int:
    """--zero_stage as given, or 1 (partitioned optimizer) whenever DP x SP > 1, else 0."""
    if stage is None:
        return 1 if ps.dp_size * ps.sp_size > 1 else 0
    return stage


def parameter_dtype(stage: int, compute_dtype: torch.dtype) -> torch.dtype:
    """Stage 1 holds parameters in a 16-bit compute dtype (fp32 masters in the optimizer); otherwise fp32."""
    return compute_dtype if stage == 1 and compute_dtype.itemsize == 2 else torch.float32


def loss_scaler(args, compute_dtype: torch.dtype) -> DynamicLossScaler | None:
    """fp16 compute gets dynamic loss scaling (--initial_loss_scale, --loss_scale_window); bf16 and fp32 none."""
    if compute_dtype != torch.float16:
        return None
    scale, window = float(getattr(args, "initial_loss_scale", 2.0 ** 16)), int(getattr(args, "loss_scale_window", 1000))
    if not (scale >= 1 and window >= 1):
        raise UsageError(f"--initial_loss_scale ({scale}) and --loss_scale_window ({window}) must be >= 1")
    return DynamicLossScaler(scale=scale, growth_interval=window)


@dataclass
class TrainingRun:
    args: object
    ps: object
    compute_dtype: torch.dtype
    model_type: str
    tok: object
    tokenizer_dir: str
    resume_from: str | None
    log_dir: str
    model: object = None
    optimizer: DistributedAdamW | None = None
    trainer_state: dict = field(default_factory=dict)  # trainer.json of the resumed checkpoint
    metrics: MetricsLog | None = None
    lora: LoRARequest | None = None  # adapters on a frozen base (training/lora_run.py); None: full fine-tuning
    stop: StopRequests = field(default_factory=StopRequests)
    last_saved: tuple = (None, None)  # (step, path) of the newest checkpoint this run wrote
    report_to: tuple = ("jsonl",)

    @classmethod
    def prepare(cls, args, ps, compute_dtype: torch.dtype) -> "TrainingRun":
        """Everything that can fail on a user's input before a model is loaded."""
        report_to = parse_report_to(getattr(args, "report_to", None))
        model_type = resolve_model_type(args, ps)
        tokenizer_dir = tokenizer_source(args.tokenizer_file, args.ckpt_dir)
        if not tokenizer_dir:
            raise UsageError("--tokenizer_file is required with --from_scratch (no --ckpt_dir to take it from)")
        tok = load_tokenizer(tokenizer_dir, model_type=model_type)
        lora = lora_request(args) if hasattr(args, "lora_rank") else None
        check_save_dir(args.save_dir, args.resume)
        resume_from = resume_checkpoint(args.save_dir, ps) if args.resume else None
        if args.resume and resume_from is None:
            log(f"--resume: no checkpoint in {args.save_dir} yet, starting a new run", ps)
        run = cls(args, ps, compute_dtype, model_type, tok, tokenizer_dir, resume_from, args.log_dir or args.save_dir,
                  lora=lora, report_to=report_to)
        run.stop.install()
        return run

    @property
    def start_step(self) -> int:
        return int(self.trainer_state.get("step", 0))

    def load_model(self):
        """The model (resumed, pretrained, or new), the optimizer at its zero stage, and the resumed state."""
        args, ps = self.args, self.ps
        memory_before_model = local_memory_mb(ps.device)
        if self.lora:
            model = load_lora_model(self.lora, args, ps, self.model_type, self.compute_dtype, self.resume_from)
        elif self.resume_from:
            model = load_pretrained(self.resume_from, self.model_type, ps)
        elif getattr(args, "from_scratch", False):
            if not args.config_file:
                raise UsageError("--from_scratch needs --config_file (the architecture of the new model)")
            model = create_from_config(args.config_file, self.model_type, ps, args.seed)
        else:
            if not args.ckpt_dir:
                raise UsageError("--ckpt_dir is required (or --from_scratch with --config_file)")
            model = load_pretrained(args.ckpt_dir, self.model_type, ps, args.config_file)
        model.activation_checkpointing = getattr(args, "activation_checkpointing", False)
        model.train()
        stage = resolve_zero_stage(args.zero_stage, ps)
        self.model = model
        self.optimizer = DistributedAdamW(
            model, ps, stage=stage, lr=args.lr, weight_decay=args.weight_decay,
            betas=(getattr(args, "adam_beta1", 0.9), getattr(args, "adam_beta2", 0.999)),
            param_dtype=torch.float32 if self.lora else parameter_dtype(stage, self.compute_dtype),
            loss_scaler=loss_scaler(args, self.compute_dtype))
        keep_freed_memory(ps.device)  # after the load: steps reuse freed memory instead of page-faulting it
        if self.resume_from:
            self.trainer_state = load_training_state(self.resume_from, model, self.optimizer, ps)
            log(f"resumed from {self.resume_from} at step {self.start_step}", ps)
        if ps.rank == 0:
            os.makedirs(args.save_dir, exist_ok=True)
        config = {k: v for k, v in vars(args).items() if isinstance(v, (str, int, float, bool, type(None)))}
        self.metrics = MetricsLog(self.log_dir, ps, memory_before_model, self.report_to, config)
        self.metrics.drop_after(self.start_step)
        return model

    def describe(self) -> str:
        opt = self.optimizer
        held = str(opt.param_dtype).replace("torch.", "")
        return (f"layout MP={self.ps.mp_size} SP={self.ps.sp_size} DP={self.ps.dp_size} | zero stage {opt.stage}, "
                f"parameters in {held}, compute {str(self.compute_dtype).replace('torch.', '')}")

    def set_lr(self, step: int, total_steps: int) -> float:
        args = self.args
        lr = lr_at(step, args.lr, total_steps, args.warmup_steps, args.lr_scheduler)
        self.optimizer.set_lr(lr)
        return lr

    def save(self, step: int, trainer_state: dict) -> str:
        args = self.args
        export = None
        if self.lora:
            export = lambda out: export_lora(  # noqa: E731
                self.model, self.ps, out, base_dir=args.ckpt_dir, source_config=export_config_source(args, None),
                tokenizer_dir=self.tokenizer_dir, save_dtype=SAVE_DTYPES[args.save_dtype], merge=self.lora.merge)
        path = save_checkpoint(args.save_dir, step, self.model, self.optimizer,
                               {**trainer_state, "model_type": self.model_type}, self.ps,
                               source_config=export_config_source(args, self.resume_from),
                               tokenizer_dir=self.tokenizer_dir, save_dtype=SAVE_DTYPES[args.save_dtype],
                               keep=args.save_total_limit, export=export)
        log(f"saved {path}", self.ps)
        self.last_saved = (step, path)
        return path

    def end_of_step(self, step: int, last_step: int, save) -> None:
        """After optimizer step ``step``, on every rank: the --save_steps checkpoint (``save(step)``; the last step's
        is the trainer's final save), then the stop agreement."""
        if self.args.save_steps and step % self.args.save_steps == 0 and step != last_step:
            save(step)
        self.stop_if_requested(step, last_step, save)

    def stop_if_requested(self, step: int, last_step: int, save) -> None:
        """After optimizer step ``step``, on every rank: when any rank got a stop signal, every rank saves
        checkpoint-``step`` (``save(step)``, unless just saved) and raises ``Stopped``. The last step just ends."""
        if step >= last_step:
            return
        signum = self.stop.agreed(self.ps)
        if signum:
            path = self.last_saved[1] if self.last_saved[0] == step else save(step)
            raise Stopped(stop_message(signum, step, last_step, path), 128 + signum)
