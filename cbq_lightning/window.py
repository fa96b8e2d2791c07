"""``WindowModule``: one sliding window of K quantized blocks as a LightningModule.

Its only trainable parameters are the LoRA-Rounding factors and the clipping logits of the window's
quantized linears (weights, and activations when the scheme quantizes them); ``training_step`` computes the homologous reconstruction loss against the cached
teacher targets. The window's blocks are the model's own block modules (quantized in place), so what it
learns is what the model keeps.
"""

from __future__ import annotations

import copy
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.utils.data import default_collate

from cbq_lightning.distributed import all_reduce_, global_mean
from cbq_lightning.errors import TrainingError
from cbq_lightning.guard import TrainableSnapshot, check_loss
from cbq_lightning.loss import LossConfig, homologous_loss, output_kl
from cbq_lightning.models.adapter import kwargs_list_to, run_block
from cbq_lightning.quant.continuous import ContinuousApprox, set_temperatures
from cbq_lightning.quant.convert import hard_rounding, quant_linears
from cbq_lightning.quant.rounding import LoRARounding, RoundingTuning, beta_at, logit_probes
from cbq_lightning.train_config import OptimConfig
from cbq_lightning.windows import Window

#: the name :meth:`WindowModule.validation_step` logs the hardened objective under
HARDENED_LOSS = "hardened_loss"


class WindowModule(L.LightningModule):
    """A window of blocks trained to reproduce its full-precision teacher.

    Args:
        blocks: the window's blocks (their linears are quantized by the cross-block callback at setup).
        window: which blocks these are.
        block_kwargs: keyword arguments of each of the window's block calls, in order (attention mask, rotary
            tables...; :meth:`BlockKwargs.for_blocks`).
        loss: loss branches and KL weight.
        optim: learning rates of the rounding factors and the clipping logits.
        rounding_tuning: the regulariser's weight and anneal (``advanced.rounding``); None: the paper's.
        lr_correction: learning rate of the low-rank correction factors (``extensions.lr_correction``).
        lr_schedule: ``constant`` or ``cosine`` (``extensions.lr_schedule``).
        gradient_init_batches: align the fresh factors ``A2`` with the objective's gradient over this many batches
            before training (``extensions.rounding_init: gradient``); None: keep the random start (the paper).
        step_offset: global TensorBoard step of this window's first step (windows share one run).
        lr_scale: multiplies both learning rates (the divergence guard lowers it on a retry).
        explode_factor: a loss above this multiple of the fit's first loss is a divergence.
        output_head: final norm + LM head, given to the window that holds the model's last block when
            ``output_kl_weight > 0`` (see :func:`cbq_lightning.loss.output_kl`). It is frozen and kept
            out of the module's parameters: it is the model's own head, possibly tied to the embedding.
        output_kl_weight: weight of the next-token KL term through ``output_head`` (``extensions.output_kl_weight``).
        output_kl_tokens: positions per sequence the head is applied to (``extensions.output_kl_tokens``).
        continuous: continuous approximations of rounding / clamping for the training forward, with the
            temperature annealed over the fit's steps (:mod:`cbq_lightning.quant.continuous`); None: STE and
            hard clamp.
    """

    def __init__(
        self,
        blocks: list[nn.Module],
        window: Window,
        block_kwargs: list[dict[str, Any]],
        loss: LossConfig,
        optim: OptimConfig,
        rounding_tuning: RoundingTuning | None = None,
        lr_correction: float = 1e-4,
        lr_schedule: str = "constant",
        gradient_init_batches: int | None = None,
        step_offset: int = 0,
        lr_scale: float = 1.0,
        explode_factor: float = 1000.0,
        output_head: nn.Module | None = None,
        output_kl_weight: float = 0.0,
        output_kl_tokens: int = 128,
        continuous: ContinuousApprox | None = None,
    ) -> None:
        super().__init__()
        self.continuous = continuous
        self.blocks = nn.ModuleList(blocks)
        self.window = window
        self.loss_config = loss
        self.rounding_tuning = rounding_tuning if rounding_tuning is not None else RoundingTuning()
        self.lr_correction = lr_correction
        self.lr_schedule = lr_schedule
        self.gradient_init_batches = gradient_init_batches
        self.optim_config = optim
        self.step_offset = step_offset
        self.lr_scale = lr_scale
        self.explode_factor = explode_factor
        self.output_kl_weight = output_kl_weight
        self.output_kl_tokens = output_kl_tokens
        self._first_loss: float | None = None
        self._start_state: TrainableSnapshot | None = None
        self._block_kwargs_cpu = block_kwargs
        self._block_kwargs: list[dict[str, Any]] | None = None
        #: soft (training-mode) reconstruction loss, mean over the first and over the last epoch: a single
        #: step's loss depends on which batch it drew and says little about the trend
        self.train_loss_first: float | None = None
        self.train_loss_last: float | None = None
        self._epoch_loss_sum = 0.0
        self._epoch_steps = 0
        # a tuple keeps the head out of named_parameters / state_dict / DDP; moved lazily by output_head_on
        self._output_head: tuple[nn.Module, ...] = (output_head,) if output_head is not None else ()
        self._output_head_generator = torch.Generator().manual_seed(7919 + window.index)
        #: output-KL positions of the hardened objective: drawn afresh from one seed by every validation run,
        #: so that two measurements of one fit compare the same terms
        self._validation_generator = torch.Generator()
        self.freeze_all_but_quantization_parameters()

    # --- parameters ----------------------------------------------------------------------------------
    def rounding_parameters(self) -> list[nn.Parameter]:
        return [p for _, layer in quant_linears(self.blocks) for p in layer.rounding_parameters()]

    def clip_parameters(self) -> list[nn.Parameter]:
        """Weight clipping logits and the activation quantizers' logits/steps (trained at ``lr_clip``)."""
        return [
            p for _, layer in quant_linears(self.blocks) for p in layer.clip_parameters() + layer.act_parameters()
        ]

    def correction_parameters(self) -> list[nn.Parameter]:
        """``U``, ``V`` of the low-rank corrections (``extensions.correction.rank``; empty without them)."""
        return [p for _, layer in quant_linears(self.blocks) for p in layer.correction_parameters()]

    def quantization_parameters(self) -> list[nn.Parameter]:
        """Everything the window may train: rounding, clipping and (if configured) the low-rank corrections."""
        return self.rounding_parameters() + self.clip_parameters() + self.correction_parameters()

    def freeze_all_but_quantization_parameters(self) -> None:
        """Freeze everything the window holds except rounding factors, clipping logits (and corrections).

        Called at construction (the blocks may come from an unfrozen model) and again once the callback
        has quantized the entering blocks, just before the optimizer is built.
        """
        self.requires_grad_(False)
        for parameter in self.quantization_parameters():
            parameter.requires_grad_(True)

    def check_trainable(self) -> None:
        """Assert that exactly the quantization parameters train (nothing of the model)."""
        allowed = {id(p) for p in self.quantization_parameters()}
        extra = [name for name, p in self.named_parameters() if p.requires_grad and id(p) not in allowed]
        if extra:
            raise TrainingError(f"window has unexpected trainable parameters: {extra[:5]}")

    def on_train_start(self) -> None:
        # after the callback quantized the entering blocks: this is where a retried fit must start again
        if self.gradient_init_batches is not None:
            self.align_rounding_factors()
        self._start_state = TrainableSnapshot(self)

    def align_rounding_factors(self) -> None:
        """``extensions.rounding_init: gradient``: point ``A2`` of every LoRA-Rounding whose ``A1`` is still zero (the blocks
        entering their first window) along the top singular vectors of the objective's gradient with respect
        to its logits, summed over the first ``gradient_init_batches`` batches of the calibration samples in
        order (every rank's shard, summed over the ranks, so all ranks choose the same ``A2``). The starting
        decisions do not change: ``A1 A2`` stays zero."""
        fresh = [layer.rounding for _, layer in quant_linears(self.blocks)
                 if isinstance(layer.rounding, LoRARounding) and layer.rounding.product_is_zero()]
        if not fresh:
            return
        samples = self.trainer.train_dataloader.dataset
        batch_size = self.optim_config.batch_size
        count = min(len(samples), self.gradient_init_batches * batch_size)
        generator = torch.Generator().manual_seed(15485863 + self.window.index)  # output-KL positions
        gradients = [torch.zeros_like(rounding.v0) for rounding in fresh]
        for start in range(0, count, batch_size):
            batch = default_collate([samples[i] for i in range(start, min(start + batch_size, count))])
            x_q, y_fp, y_h = (part.to(self.device) for part in batch)
            with logit_probes(fresh) as probes:
                loss = self.objective(self(x_q), y_fp, y_h, generator)["loss"]
                for total, gradient in zip(gradients, torch.autograd.grad(loss, probes), strict=True):
                    total += gradient
        for rounding, gradient in zip(fresh, gradients, strict=True):
            rounding.align_to_gradient(all_reduce_(gradient))

    def restore_start_state(self) -> None:
        """Put the trainable tensors back to where this fit started (the divergence guard's retry)."""
        if self._start_state is not None:
            self._start_state.restore(self)

    # --- forward / loss ------------------------------------------------------------------------------
    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._block_kwargs is None or self._kwargs_device != hidden.device:
            self._block_kwargs = kwargs_list_to(self._block_kwargs_cpu, hidden.device)
            self._kwargs_device = hidden.device
        for block, kwargs in zip(self.blocks, self._block_kwargs, strict=True):
            hidden = run_block(block, hidden, kwargs)
        return hidden

    @property
    def trains_on_output(self) -> bool:
        """Whether this window adds the next-token KL term (it holds the last block and the weight is > 0)."""
        return bool(self._output_head) and self.output_kl_weight > 0

    def output_head_on(self, device: torch.device) -> nn.Module:
        """The frozen output head on ``device`` (a copy when the model's head lives elsewhere, e.g. on CPU)."""
        head = self._output_head[0]
        if next(head.parameters()).device != device:
            head = copy.deepcopy(head).to(device).requires_grad_(False)
            self._output_head = (head,)
        return head

    def rounding_regularizer(self, beta: float) -> torch.Tensor:
        terms = [layer.rounding_regularizer(beta) for _, layer in quant_linears(self.blocks)]
        terms = [t for t in terms if t is not None]
        return torch.stack(terms).mean() if terms else torch.zeros((), device=self.device)

    def training_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> torch.Tensor:
        x_q, y_fp, y_h = batch
        total_steps = max(int(self.trainer.estimated_stepping_batches), 1)
        temperature = None
        if self.continuous is not None:
            temperature = self.continuous.temperature_at(self.global_step, total_steps)
            set_temperatures(self.blocks, self.continuous, temperature)
        parts = self.objective(self(x_q), y_fp, y_h, self._output_head_generator)
        beta = beta_at(self.global_step, total_steps, self.rounding_tuning)
        reg = self.rounding_regularizer(beta) if beta is not None else parts["loss"].new_zeros(())
        loss = parts["loss"] + self.rounding_tuning.reg_weight * reg
        value = global_mean(float(loss.detach()))  # DDP: every rank takes the same decision
        check_loss(value, self._first_loss, self.explode_factor, str(self.window), self.global_step)
        if self._first_loss is None:
            self._first_loss = value
        self._epoch_loss_sum += float(parts["loss"].detach())
        self._epoch_steps += 1
        self.log("loss", parts["loss"], prog_bar=True, logger=False)
        optimizer = self.optimizers()
        signals = {
            "train/loss": loss.detach(),
            "train/reconstruction": parts["loss"].detach(),
            "train/global_branch": parts["global"].detach(),
            "train/homologous_branch": parts["homologous"].detach(),
            "train/mse": parts["mse"].detach(),
            "train/kl": parts["kl"].detach(),
            **({"train/output_kl": parts["output_kl"].detach()} if "output_kl" in parts else {}),
            "train/rounding_reg": reg.detach(),
            "train/beta": 0.0 if beta is None else beta,
            **({"train/temperature": temperature} if temperature is not None else {}),
            "train/lr_rounding": optimizer.param_groups[0]["lr"],
            "train/lr_clip": optimizer.param_groups[1]["lr"],
            **({"train/lr_correction": optimizer.param_groups[2]["lr"]} if len(optimizer.param_groups) > 2 else {}),
            "train/window": float(self.window.index),
            # a logged "step" is Lightning's documented way to set the x-axis: windows share one run
            "step": float(self.step_offset + self.global_step),
        }
        self.log_dict(signals, on_step=True, on_epoch=False, prog_bar=False, logger=True)
        return loss

    def on_train_end(self) -> None:
        # the quantizers use exact rounding outside a training forward anyway; clearing makes that explicit
        set_temperatures(self.blocks, None, None)

    def on_train_epoch_end(self) -> None:
        if self._epoch_steps:
            mean = self._epoch_loss_sum / self._epoch_steps
            if self.train_loss_first is None:
                self.train_loss_first = mean
            self.train_loss_last = mean
        self._epoch_loss_sum, self._epoch_steps = 0.0, 0

    def objective(
        self, output: torch.Tensor, y_fp: torch.Tensor, y_h: torch.Tensor, generator: torch.Generator
    ) -> dict[str, torch.Tensor]:
        """The window's reconstruction objective (``loss``) and its parts: the homologous loss, plus the
        weighted next-token KL when this window holds the last block (positions drawn from ``generator``)."""
        parts = homologous_loss(output, y_fp, y_h, self.loss_config)
        if self.trains_on_output:
            head = self.output_head_on(output.device)
            parts["output_kl"] = output_kl(head, y_fp, output, self.output_kl_tokens, generator)
            parts["loss"] = parts["loss"] + self.output_kl_weight * parts["output_kl"]
        return parts

    # --- the hardened objective (Lightning's validation loop; :mod:`callbacks.hardened_objective`) ----------
    def on_validation_epoch_start(self) -> None:
        self._validation_generator.manual_seed(104729 + self.window.index)

    def validation_step(self, batch: tuple[torch.Tensor, ...], batch_idx: int) -> None:
        """The objective (without the rounding regulariser) with hardened rounding: what finalising now would
        give. Logged per sample in float64 and reduced over the ranks, so every rank reads the same mean over
        all calibration samples."""
        x_q, y_fp, y_h = batch
        with hard_rounding(self.blocks):
            loss = self.objective(self(x_q), y_fp, y_h, self._validation_generator)["loss"]
        self.log(HARDENED_LOSS, loss.double(), batch_size=x_q.shape[0], on_step=False, on_epoch=True,
                 sync_dist=True, logger=False)

    # --- optimisation --------------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        self.freeze_all_but_quantization_parameters()
        groups = [
            {"params": self.rounding_parameters(), "lr": self.optim_config.lr_rounding * self.lr_scale, "name": "rounding"},
            {"params": self.clip_parameters(), "lr": self.optim_config.lr_clip * self.lr_scale, "name": "clip"},
        ]
        corrections = self.correction_parameters()
        if corrections:
            groups.append({"params": corrections, "lr": self.lr_correction * self.lr_scale, "name": "correction"})
        optimizer = torch.optim.AdamW(groups, weight_decay=0.0)
        if self.lr_schedule == "constant":
            return optimizer
        # cosine decay to 0 over the fit's steps
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=0.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}
