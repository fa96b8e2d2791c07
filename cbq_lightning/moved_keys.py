"""Configuration keys that moved to another section: the one map of old names to new ones.

Why a map: recipes, flags and committed benchmark records written before a move still name the old keys. A recipe
or a flag under an old name gets a one-line error naming the new one (:mod:`cbq_lightning.recipe_file`,
:mod:`cbq_lightning.parse_errors`) instead of being dropped or misread, and the quality benchmark reads old runs
under today's names and fingerprints settings under the names its records were made with.

Two sections received keys: ``extensions`` (the levers beyond the CBQ paper, :mod:`cbq_lightning.extensions`) and
``advanced`` (what a recipe rarely sets, :mod:`cbq_lightning.advanced`).
"""

from __future__ import annotations

#: old dotted key (a section or a leaf) -> its name today
MOVED_KEYS = {
    "quant.clip_search": "extensions.clip_search",
    "quant.gptq": "extensions.gptq",
    "quant.continuous": "extensions.continuous",
    "quant.layer_bits": "extensions.layer_bits",
    "rounding.column_scale": "extensions.column_scale",
    "loss.output_kl_weight": "extensions.output_kl_weight",
    "loss.output_kl_tokens": "extensions.output_kl_tokens",
    "train.keep_best": "extensions.keep_best",
    "correction": "extensions.correction",
    "mixed": "extensions.mixed",
    "rotation": "extensions.rotation",
    "end_to_end": "extensions.end_to_end",
    "rounding.forward": "extensions.rounding_forward",
    "rounding.init": "extensions.rounding_init",
    "rounding.init_batches": "extensions.rounding_init_batches",
    "cfp.mlp": "extensions.cfp_mlp",
    "train.lr_schedule": "extensions.lr_schedule",
    "train.lr_correction": "extensions.lr_correction",
    "rounding.init_std": "advanced.rounding.init_std",
    "rounding.beta_start": "advanced.rounding.beta_start",
    "rounding.beta_end": "advanced.rounding.beta_end",
    "rounding.warmup": "advanced.rounding.warmup",
    "cfp.lambda1": "advanced.cfp.lambda1",
    "cfp.lambda2": "advanced.cfp.lambda2",
    "cfp.alpha": "advanced.cfp.alpha",
    "cfp.max_samples": "advanced.cfp.max_samples",
    "train.forward_batch_size": "advanced.train.forward_batch_size",
    "train.shuffle": "advanced.train.shuffle",
    "trainer.enable_progress_bar": "advanced.trainer.enable_progress_bar",
    "guard": "advanced.guard",
    "cache": "advanced.cache",
    "monitor": "advanced.monitor",
    "trainer.gradient_clip_val": "advanced.trainer.gradient_clip_val",
    "trainer.log_every_n_steps": "advanced.trainer.log_every_n_steps",
    "trainer.deterministic": "advanced.trainer.deterministic",
    "trainer.num_nodes": "advanced.trainer.num_nodes",
    "data.text_field": "advanced.data.text_field",
    "eval.split": "advanced.eval.split",
    "eval.batch_size": "advanced.eval.batch_size",
    "model.revision": "advanced.model.revision",
    "model.trust_remote_code": "advanced.model.trust_remote_code",
    "quant.clip_init": "advanced.quant.clip_init",
    "quant.act_learnable": "advanced.quant.act_learnable",
    "quant.act_clip_init": "advanced.quant.act_clip_init",
    "rounding.reg_weight": "advanced.rounding.reg_weight",
}

#: why a key under its old name is refused, by the section it moved to
_REASONS = {
    "extensions": "the research extensions have their own section, docs/configuration.md",
    "advanced": "what a recipe rarely sets has its own section, docs/configuration.md",
}


def moved_to(key: str) -> str | None:
    """The new name of ``key`` (or of a key inside a moved section), or None when it did not move."""
    for old, new in MOVED_KEYS.items():
        if key == old or key.startswith(old + "."):
            return new + key[len(old):]
    return None


def old_name(key: str) -> str:
    """``key`` (today's name) under the name it had before it moved; itself when it never moved."""
    for old, new in MOVED_KEYS.items():
        if key == new or key.startswith(new + "."):
            return old + key[len(new):]
    return key


def why_moved(new_key: str) -> str:
    """The one wording of why the old name of ``new_key`` is refused (parse errors and the recipe check)."""
    return _REASONS[new_key.split(".", 1)[0]]
