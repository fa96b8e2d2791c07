"""The ``advanced`` section: what a recipe rarely sets, out of the core a user reads.

Why a section of its own: the core of a configuration (model, data, scheme, method, windows, loss, training,
trainer, evaluation, export) is what a user chooses for a run; the settings here have defaults that suit every run
measured so far - how a diverging window is retried, where the caches live, what extra measurements are logged,
the Trainer's finer switches. A recipe that needs one sets it under ``advanced:``, where a reader sees it is out
of the ordinary. Keys that lived elsewhere before are refused under their old names
(:data:`cbq_lightning.moved_keys.MOVED_KEYS`).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from cbq_lightning.cache import CacheConfig
from cbq_lightning.cfp import CFPTuning
from cbq_lightning.data.calibration import DataTuning
from cbq_lightning.evaluation.perplexity import EvalTuning
from cbq_lightning.guard import GuardConfig
from cbq_lightning.models.loading import HubAccess
from cbq_lightning.quant.config import QuantTuning
from cbq_lightning.quant.rounding import RoundingTuning
from cbq_lightning.train_config import TrainerExtras, TrainTuning


@dataclass
class MonitorConfig:
    """Observability extras.

    Attributes:
        rtn_reference: also push the calibration inputs through a round-to-nearest copy of each block,
            so the per-block error of RTN is logged next to CBQ's (costs one extra forward per block).
        hardened_loss: measure each window's loss with hardened rounding before and after its fit
            (``window/loss_first``/``loss_last``; two extra passes over the calibration set per window).
    """

    rtn_reference: bool = True
    hardened_loss: bool = True


@dataclass
class AdvancedConfig:
    """Settings a recipe rarely changes (each has a default that suits every run measured so far).

    Attributes:
        model: how a hub model is fetched: its revision, custom code (:class:`~cbq_lightning.models.loading.HubAccess`).
        quant: where the clipping starts, whether the activation clipping trains
            (:class:`~cbq_lightning.quant.config.QuantTuning`).
        rounding: LoRA-Rounding's finer settings at the paper's values: the regulariser's weight and anneal, the
            factors' starting scale (:class:`~cbq_lightning.quant.rounding.RoundingTuning`).
        cfp: CFP's finer settings at the paper's values (:class:`~cbq_lightning.cfp.CFPTuning`).
        data: how calibration text is read (:class:`~cbq_lightning.data.calibration.DataTuning`).
        train: how the calibration samples are batched (:class:`~cbq_lightning.train_config.TrainTuning`).
        trainer: the Trainer's finer switches and the nodes of a multi-node run
            (:class:`~cbq_lightning.train_config.TrainerExtras`), passed to every fit with the ``trainer`` section.
        eval: the evaluation's split and batching (:class:`~cbq_lightning.evaluation.perplexity.EvalTuning`).
        monitor: extra measurements for the logs and plots (:class:`MonitorConfig`).
        guard: what a diverging window does (:class:`~cbq_lightning.guard.GuardConfig`).
        cache: where the calibration caches live (:class:`~cbq_lightning.cache.CacheConfig`).
    """

    model: HubAccess = field(default_factory=HubAccess)
    quant: QuantTuning = field(default_factory=QuantTuning)
    rounding: RoundingTuning = field(default_factory=RoundingTuning)
    cfp: CFPTuning = field(default_factory=CFPTuning)
    data: DataTuning = field(default_factory=DataTuning)
    train: TrainTuning = field(default_factory=TrainTuning)
    trainer: TrainerExtras = field(default_factory=TrainerExtras)
    eval: EvalTuning = field(default_factory=EvalTuning)
    monitor: MonitorConfig = field(default_factory=MonitorConfig)
    guard: GuardConfig = field(default_factory=GuardConfig)
    cache: CacheConfig = field(default_factory=CacheConfig)
