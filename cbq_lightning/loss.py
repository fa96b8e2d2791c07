"""Homologous reconstruction loss of a window (docs/method.md §3).

``L = E(Y_fp, T_q(X_q)) + E(Y_h, T_q(X_q))`` with ``E(a, b) = MSE(a, b) + w_kl * KL(softmax(a) || softmax(b))``.
The *global* branch pulls the quantized window towards the full-precision model's own hidden states, the
*homologous* branch towards what the full-precision window makes of the quantized path's input (the
same input the quantized window sees), which is reachable and so gives a cleaner gradient.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from cbq_lightning.errors import ConfigError


@dataclass
class LossConfig:
    """Which parts of the reconstruction loss are on.

    Attributes:
        global_branch: match the full-precision model's hidden states ``Y_fp``.
        homologous_branch: match the full-precision window on the quantized input, ``Y_h``.
        kl_weight: weight of the KL term (softmax over the hidden dimension of each token); 0 disables it.
        normalize: divide each MSE by the mean square of its target, making the loss scale-free. Hidden
            state magnitudes differ by orders of magnitude between models and along depth; without this
            the rounding regulariser weight (lambda) would mean something different in every block.
    """

    global_branch: bool = True
    homologous_branch: bool = True
    kl_weight: float = 1.0
    normalize: bool = True

    def __post_init__(self) -> None:
        if not (self.global_branch or self.homologous_branch):
            raise ConfigError("loss: at least one of global_branch and homologous_branch must be true.")
        if self.kl_weight < 0:
            raise ConfigError(f"loss.kl_weight={self.kl_weight} must be >= 0.")


def token_kl(target: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of ``KL(softmax(target) || softmax(output))`` over the last dimension.

    The last dimension is the hidden one for the reconstruction branches, the vocabulary for logits.
    """
    log_p = F.log_softmax(target.float(), dim=-1)
    log_q = F.log_softmax(output.float(), dim=-1)
    return (log_p.exp() * (log_p - log_q)).sum(dim=-1).mean()


def reconstruction_error(
    target: torch.Tensor, output: torch.Tensor, kl_weight: float, normalize: bool = False
) -> tuple[torch.Tensor, torch.Tensor]:
    """``(MSE, KL)`` between a target and the quantized output (KL is 0 when ``kl_weight`` is 0).

    With ``normalize`` the MSE is relative: ``MSE / mean(target^2)``.
    """
    mse = F.mse_loss(output.float(), target.float())
    if normalize:
        mse = mse / target.float().pow(2).mean().clamp(min=1e-30)
    kl = token_kl(target, output) if kl_weight > 0 else mse.new_zeros(())
    return mse, kl


def homologous_loss(
    output: torch.Tensor, y_fp: torch.Tensor, y_h: torch.Tensor, config: LossConfig
) -> dict[str, torch.Tensor]:
    """The window loss and its parts: ``loss``, ``global``, ``homologous``, ``mse``, ``kl``."""
    zero = output.new_zeros((), dtype=torch.float32)
    parts = {"global": zero, "homologous": zero, "mse": zero, "kl": zero}
    for name, enabled, target in (
        ("global", config.global_branch, y_fp),
        ("homologous", config.homologous_branch, y_h),
    ):
        if not enabled:
            continue
        mse, kl = reconstruction_error(target, output, config.kl_weight, config.normalize)
        parts[name] = mse + config.kl_weight * kl
        parts["mse"] = parts["mse"] + mse
        parts["kl"] = parts["kl"] + kl
    parts["loss"] = parts["global"] + parts["homologous"]
    return parts


def output_kl(
    head: torch.nn.Module, target: torch.Tensor, output: torch.Tensor, tokens: int, generator: torch.Generator | None = None
) -> torch.Tensor:
    """``KL(softmax(head(target)) || softmax(head(output)))`` over the vocabulary, mean over sampled positions.

    ``target`` and ``output`` are ``[B, T, H]`` last-block hidden states; the same ``tokens`` positions
    (all of them when ``tokens >= T``) are taken from every sequence. The teacher side runs without grad.
    """
    length = target.shape[1]
    if tokens < length:
        positions = torch.randperm(length, generator=generator)[:tokens].to(target.device)
        target, output = target[:, positions], output[:, positions]
    with torch.no_grad():
        teacher = head(target.to(output.dtype))
    return token_kl(teacher, head(output))
