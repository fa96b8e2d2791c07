"""The end-to-end phase, an extension: one more Lightning fit, a window that spans the whole quantized model.

Why: CBQ's windows see K blocks each; only the window that holds the last block looks at the output
distribution, so what one window's rounding does to the blocks after it is seen only through the next window's
inputs. After the windows, the rounding decisions are fixed; what is still cheap to move are the scales. This
phase trains them through every block at once against the full-precision next-token distribution, as
EfficientQAT's second phase trains step sizes after its block-wise one.

What trains: each quantized linear's scales, as ``scale * exp(g)`` per group (or channel) with ``g`` starting at 0
and the integer codes frozen; with the codes fixed a group's scale is its clipping range over its levels, so
these are the clipping thresholds trained end to end. Where activations are quantized, their clipping logits
(or static steps) train too when ``activation_clip`` asks for it (off by default: at W4A4 they made the phase
fail), and the blocks' normalisation layers when ``norms`` does. The rounding decisions stay those the windows
hardened.

Objective: ``KL(softmax(head(Y_fp)) || softmax(head(Y_q)))`` on the calibration samples, at ``tokens`` random
positions per sequence (:func:`cbq_lightning.loss.output_kl`), where ``Y_fp`` is the full-precision model's
last-block output, which the window walk has already cached (``CrossBlockState.x_fp`` after the last window):
no full-precision copy of the model is kept.

Never worse on what it measures: Lightning's validation loop measures the objective over every calibration
sample at fixed positions before training (the sanity check) and after the last epoch; the trained scales are
kept only if it fell, else the windows' scales stay. Both values, the decision and the steps go to
``report.json`` (``end_to_end``) and TensorBoard (``e2e/*``).
"""

from __future__ import annotations

import copy
import logging
import time
from typing import TYPE_CHECKING, Any

import lightning as L
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import SIGTERMException
from torch import nn
from torch.nn.utils import parametrize
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader, TensorDataset

from cbq_lightning.distributed import all_reduce_, global_mean
from cbq_lightning.errors import RunStopped
from cbq_lightning.guard import DivergenceError, check_loss
from cbq_lightning.loss import output_kl
from cbq_lightning.models.adapter import kwargs_list_to, run_block
from cbq_lightning.quant.finalized import FinalizedQuantLinear
from cbq_lightning.train_config import EndToEndConfig
from cbq_lightning.window_loop import trainer_settings

if TYPE_CHECKING:
    from cbq_lightning.config import QuantizeConfig
    from cbq_lightning.crossblock import CrossBlockState

log = logging.getLogger("cbq_lightning")


class EndToEndModule(L.LightningModule):
    """The whole quantized model as one window: its scales (and, asked, activation clipping) trained on the output KL.

    Args:
        blocks: every block of the model, finalised (their linears are :class:`FinalizedQuantLinear`).
        block_kwargs: each block's call arguments (CPU tensors), in order.
        head: the model's final norm and LM head, frozen; kept out of the module's parameters.
        config: the phase's settings.
        seed: seeds the positions drawn for the KL (training, and the fixed ones of the measurements).
        explode_factor: a step loss above this multiple of the first one is a divergence (the guard's); the
            phase then keeps the windows' scales.
    """

    def __init__(self, blocks: list[nn.Module], block_kwargs: list[dict[str, Any]], head: nn.Module,
                 config: EndToEndConfig, seed: int, explode_factor: float) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(blocks)
        self.config = config
        self.explode_factor = explode_factor
        self._head = (head,)  # a tuple keeps the (possibly tied) head out of parameters, state_dict and DDP
        self._block_kwargs_cpu = block_kwargs
        self._block_kwargs: list[dict[str, Any]] | None = None
        self._train_generator = torch.Generator().manual_seed(seed + 611953)
        self._measure_generator = torch.Generator()
        self._measure_seed = seed + 899981
        self._measure_sums = torch.zeros(2, dtype=torch.float64)
        #: the objective over every calibration sample: before training, then after the last epoch
        self.measured: list[float] = []
        self._first_loss: float | None = None
        self.requires_grad_(False)
        self.layers = [m for m in self.blocks.modules() if isinstance(m, FinalizedQuantLinear)]
        self.gains = [layer.begin_scale_training() for layer in self.layers]
        self.act_parameters = [p for layer in self.layers if layer.act_quantizer is not None and config.activation_clip
                               for p in layer.act_quantizer.trainable_parameters()]
        #: the activation clipping the windows left, put back when the phase's result is not kept
        self._act_start = [p.detach().clone() for p in self.act_parameters]
        for parameter in self.act_parameters:
            parameter.requires_grad_(True)
        #: the norm tensors trained as ``tensor + shift`` (``norms``), and their float32 shifts
        self._shifted = norm_tensors(self.blocks) if config.norms else []
        self.norm_shifts = [_attach_shift(norm, name) for norm, name in self._shifted]

    @torch.no_grad()
    def finish(self, keep: bool) -> None:
        """Fold the gains into the scales (``keep``), or drop them and put the activation clipping and the norms back
        as the windows left them; freeze everything again."""
        for layer in self.layers:
            layer.end_scale_training(keep)
        for parameter, start in zip(self.act_parameters, self._act_start, strict=True):
            if not keep:
                parameter.copy_(start)
            parameter.requires_grad_(False)
        for norm, name in self._shifted:
            parametrize.remove_parametrizations(norm, name, leave_parametrized=keep)

    def trained(self) -> list[str]:
        """What the phase trains, as ``report.json`` lists it."""
        return ["scales", *(["activation_clip"] if self.act_parameters else []),
                *(["norms"] if self.norm_shifts else [])]

    def forward(self, hidden: torch.Tensor) -> torch.Tensor:
        if self._block_kwargs is None:
            self._block_kwargs = kwargs_list_to(self._block_kwargs_cpu, hidden.device)
        recompute = self.config.checkpoint_blocks
        recompute = hidden.device.type == "cuda" if recompute is None else recompute
        for block, kwargs in zip(self.blocks, self._block_kwargs, strict=True):
            if recompute and torch.is_grad_enabled():
                hidden = checkpoint(run_block, block, hidden, kwargs, use_reentrant=False)
            else:
                hidden = run_block(block, hidden, kwargs)
        return hidden

    def _kl(self, batch: tuple[torch.Tensor, torch.Tensor], generator: torch.Generator) -> torch.Tensor:
        inputs, targets = batch
        head = self._head[0]
        if next(head.parameters()).device != inputs.device:  # a copy: the model's own head stays where it is
            head = copy.deepcopy(head).to(inputs.device).requires_grad_(False)
            self._head = (head,)
        return output_kl(head, targets, self(inputs), self.config.tokens, generator)

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss = self._kl(batch, self._train_generator)
        value = global_mean(float(loss.detach()))
        check_loss(value, self._first_loss, self.explode_factor, "the end-to-end phase", self.global_step)
        self._first_loss = value if self._first_loss is None else self._first_loss
        self.log("loss", loss, prog_bar=True, logger=False)
        lr = self.optimizers().param_groups[0]["lr"]
        self.log_dict({"e2e/output_kl": loss.detach(), "e2e/lr": lr, "step": float(self.global_step)},
                      on_step=True, on_epoch=False, logger=True)
        return loss

    def on_validation_epoch_start(self) -> None:
        self._measure_generator.manual_seed(self._measure_seed)
        self._measure_sums = torch.zeros(2, dtype=torch.float64)

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        kl = self._kl(batch, self._measure_generator)
        self._measure_sums += torch.tensor([float(kl) * batch[0].shape[0], batch[0].shape[0]], dtype=torch.float64)

    def on_validation_epoch_end(self) -> None:
        total, count = all_reduce_(self._measure_sums.to(self.device)).tolist()
        self.measured.append(total / max(count, 1.0))

    def configure_optimizers(self) -> Any:
        groups = [{"params": self.gains, "lr": self.config.lr, "name": "scales"}]
        if self.act_parameters:
            groups.append({"params": self.act_parameters, "lr": self.config.lr, "name": "activation_clip"})
        if self.norm_shifts:
            groups.append({"params": self.norm_shifts, "lr": self.config.lr, "name": "norms"})
        optimizer = torch.optim.Adam(groups)
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        schedule = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, T_max=total, eta_min=0.0)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": schedule, "interval": "step"}}


def norm_tensors(blocks: nn.Module) -> list[tuple[nn.Module, str]]:
    """``(layer, tensor name)`` of every normalisation layer's scale (and shift, where it has one) in ``blocks``.

    A layer counts as a norm by type (``nn.LayerNorm``, ``nn.RMSNorm``) or by name (the transformers families'
    ``LlamaRMSNorm``, ``Gemma3RMSNorm``, ... all end in ``Norm``), so every family's attention and MLP norms are
    found, and the per-head query/key norms where a family has them."""
    found = []
    for module in blocks.modules():
        if isinstance(module, (nn.LayerNorm, nn.RMSNorm)) or type(module).__name__.endswith("Norm"):
            found.extend((module, name) for name, _ in module.named_parameters(recurse=False))
    return found


class _Shift(nn.Module):
    """``tensor + shift`` with a float32 shift starting at 0: a bfloat16 norm scale (spacing 1/128 near 1) would
    round away the phase's small steps; the float32 shift keeps them and is folded in once, at the end."""

    def __init__(self, like: torch.Tensor) -> None:
        super().__init__()
        self.shift = nn.Parameter(torch.zeros_like(like, dtype=torch.float32))

    def forward(self, original: torch.Tensor) -> torch.Tensor:
        return (original.float() + self.shift).to(original.dtype)


def _attach_shift(norm: nn.Module, name: str) -> nn.Parameter:
    """Make ``norm.<name>`` trainable as the tensor the windows left plus a float32 shift; the shift."""
    shift = _Shift(getattr(norm, name))
    parametrize.register_parametrization(norm, name, shift)
    return shift.shift


def train_end_to_end(
    module: EndToEndModule, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int, seed: int,
    trainer_kwargs: dict[str, Any], logger: TensorBoardLogger,
) -> dict[str, Any]:
    """Fit ``module`` on the calibration samples, keep the trained scales only if the measured objective fell;
    the phase's record for ``report.json``. ``trainer_kwargs``: the recipe's Trainer settings."""
    started = time.perf_counter()
    samples = TensorDataset(inputs, targets)  # (X at block 0, the full-precision last-block output) per sample
    loader = DataLoader(samples, batch_size=batch_size, shuffle=True, generator=torch.Generator().manual_seed(seed))
    fixed = DataLoader(samples, batch_size=batch_size, shuffle=False)
    epochs = module.config.epochs
    trainer = L.Trainer(
        max_epochs=epochs, logger=logger, enable_checkpointing=False,
        enable_model_summary=False, num_sanity_val_steps=-1, check_val_every_n_epoch=epochs,
        inference_mode=False, use_distributed_sampler=False, **trainer_kwargs,
    )
    diverged = None
    try:
        trainer.fit(module, train_dataloaders=loader, val_dataloaders=fixed)
    except DivergenceError as error:
        diverged = str(error)
    except SIGTERMException:  # every window is saved: a rerun restores them and runs this phase again
        module.finish(keep=False)
        raise RunStopped("SIGTERM: stopped during the end-to-end phase; every window is saved. Rerun the same "
                         "command to resume (the phase runs again).") from None
    before = module.measured[0]
    after = module.measured[-1] if diverged is None and len(module.measured) > 1 else None
    keep = after is not None and after < before
    module.finish(keep)
    module.blocks.to("cpu")
    log.info("end-to-end phase: %d steps, output KL %.4g -> %s, %s", trainer.global_step, before,
             "diverged" if after is None else f"{after:.4g}", "kept" if keep else "the windows' scales kept")
    return {
        "steps": trainer.global_step, "epochs": epochs, "output_kl_before": before, "output_kl_after": after,
        "kept": keep, "diverged": diverged, "trained": module.trained(),
        "wall_s": time.perf_counter() - started,
    }


def run_end_to_end(config: QuantizeConfig, state: CrossBlockState, head: nn.Module, logger: TensorBoardLogger
                   ) -> dict[str, Any]:
    """The phase after the last window of a CBQ run (``config.extensions.end_to_end`` set): the model's blocks as one window,
    the block-0 inputs and the full-precision last-block outputs the window walk cached."""
    settings = config.extensions.end_to_end
    assert settings is not None
    blocks = list(state.blocks)
    module = EndToEndModule(
        blocks, state.block_kwargs.for_blocks(list(range(len(blocks)))), head, settings, config.seed,
        config.advanced.guard.explode_factor,
    )
    batch_size = settings.batch_size or config.train.batch_size
    return train_end_to_end(module, state.inputs, state.x_fp, batch_size, config.seed, trainer_settings(config),
                            logger)
