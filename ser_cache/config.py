"""TrainConfig: every training setting, its default and its checks, and how stored configs
made before a setting existed are read (`as_made`).

Compatibility switches reproduce flaws of published setups, for comparison only:
`compat_select_on_test` trains on all non-test speakers and picks the epoch (or the linear
head's C) on the test fold, which is optimistic; `compat_eval_dropout` leaves dropout on at
evaluation (a no-op for the mean and linear heads, which have no dropout) (both: the reference
code); `compat_speaker_overlap` runs fold files that test speakers they also train on
(EmoBox's folds of URDU, ShEMO, EmoDB: speaker-dependent, folds.py). Results made with any of
them are marked FLAWED, naming the flaws, in config.json (`flawed_compat`, `flawed`) and in the
printed table, and `ser-cache compare` never pairs them with honest ones.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .errors import OptionError
from .tasks import LOSSES, TASKS

COMPUTE_DTYPES = ("auto", "float32", "bfloat16")
STACK_MODES = ("auto", "on", "off")  # stack_members (ensembles.py)
VIEWS_MODES = ("off", "on")  # views: train on a cache's augmented views too (augment.py)
MIX_MODES = ("learned", "equal")  # mix: a multi-state head's softmax weights over states (heads.StateMix)
FUSION_WEIGHTS = ("equal", "validation")  # fusion_weights: how the fusion head weighs its states' probes


class ConfigError(OptionError):
    """A setting that cannot be used; the message names the fix."""


@dataclass
class TrainConfig:
    """Every training setting, with its default. `TrainConfig.from_dict` refuses unknown keys."""

    epochs: int = 30  # the epoch kept is chosen on the validation speakers
    # Stop after this many epochs without a better validation UA (0: never). In 18 folds of a
    # 30-epoch RAVDESS sweep (Whisper base state 3; mean, attentive, qkv) the epoch chosen was
    # 0-15, median 8: stopping after 10 epochs without improvement would have chosen the same
    # epoch in every fold and run 64% of the epochs (docs/findings.md, "Training time, measured").
    patience: int = 10
    batch_size: int = 16
    lr: float = 1e-3
    weight_decay: float = 0.01  # AdamW's default
    warmup_fraction: float = 0.1  # of the epochs, linear warm-up before the cosine decay
    dropout: float = 0.3
    d_model: int = 256
    n_heads: int = 12  # attentive, qkv, cta and stats (stats also takes 0)
    head_dim: int = 4  # attentive (d_a) and qkv (d_k)
    attention_scale: bool = True  # attentive: divide scores by sqrt(head_dim)
    class_weights: bool = False  # inverse-frequency cross-entropy weights from the training split
    standardize: bool = True  # standardise input frames with the training split's mean and std (heads.PoolingHead)
    linear_c: tuple = (0.01, 0.1, 1.0, 10.0)  # linear head: C grid, chosen on validation
    linear_max_iter: int = 2000
    seed: int = 0
    device: str = "auto"  # "auto": cuda when available, else mps, else cpu
    compute_dtype: str = "auto"  # training arithmetic: float32, bfloat16, or auto (the faster, measured)
    refit: bool = False  # retrain on training + validation speakers with the choice made on validation, then test
    ensemble: int = 1  # heads per fold, seeds member_seed(fold seed, m), probabilities averaged (heads.Ensemble)
    stack_members: str = "auto"  # train an ensemble's members as one stacked model (ensembles.py); auto: on CUDA
    time_mask: float = 0.0  # training only: fraction of each utterance's frames dropped, in spans (drop_spans)
    # Encoder frames averaged into each frame a head reads (pooling.py), a multiple of what the
    # cache stores; 0: as the cache stores them. Applied when the layer is read, before the
    # input standardisation; a sweep grid key.
    frame_pool: int = 0
    # The state mix of a multi-state pooling head (heads.StateMix; nothing else reads these).
    # mix_lr: the peak lr of the mix's softmax logits, in an AdamW group of their own without
    # weight decay (which would pull them back to equal weights), on the same schedule; None:
    # config.lr in the head's one group, as before: there the weights stayed within 0.005 of
    # equal on URDU, and a faster mix did not score better on URDU or RAVDESS (docs/findings.md,
    # "A mix that learns, or an honest picture"). mix "equal": the logits stay 0, the ablation.
    mix: str = "learned"
    mix_lr: float | None = None
    # The fusion head's weights over its per-state probes (heads.FusionProbe): "equal", or
    # "validation": those of the highest likelihood of the validation speakers' labels. Equal
    # by default: weights fitted to a fold's few validation speakers scored 5.8 points below
    # equal ones on URDU and 0.5 below on RAVDESS (docs/findings.md, "Fusion of states").
    fusion_weights: str = "equal"
    task: str = "classification"  # or "regression": learn `targets` (tasks.py)
    targets: tuple = ()  # regression: target names; empty: every target the cache holds
    loss: str = "ccc"  # regression: "ccc" (1 - CCC, mean over targets) or "mse"; classes: cross-entropy
    compat_select_on_test: bool = False  # FLAWED (reference code): pick the epoch on the test fold
    compat_eval_dropout: bool = False  # FLAWED (reference code): dropout stays on at evaluation
    compat_speaker_overlap: bool = False  # FLAWED (speaker-dependent): fold files may test training speakers
    # "on": the training split also holds the augmented views (extract --augment) of its
    # utterances; validation and test hold originals only, whatever this says (folds.ViewRows).
    # "off" until measured otherwise (docs/findings.md); a sweep grid key.
    views: str = "off"

    def __post_init__(self):
        checks = [
            (self.epochs >= 1, "epochs must be >= 1"),
            (self.batch_size >= 1, "batch_size must be >= 1"),
            (self.lr > 0, "lr must be > 0"),
            (self.weight_decay >= 0, "weight_decay must be >= 0"),
            (0 <= self.warmup_fraction < 1, "warmup_fraction must be in [0, 1)"),
            (0 <= self.dropout < 1, "dropout must be in [0, 1)"),
            (0 <= self.time_mask < 1, "time_mask must be in [0, 1) (0: off)"),
            (self.frame_pool >= 0, "frame_pool must be >= 1 (encoder frames per frame read; 0: as the cache stores them)"),
            (min(self.d_model, self.head_dim) >= 1, "d_model and head_dim must be >= 1"),
            # 0 is the stats head without attention; the pooling heads refuse it (heads.attention_heads).
            (self.n_heads >= 0, "n_heads must be >= 0 (0: the stats head without attention)"),
            (len(self.linear_c) >= 1 and min(self.linear_c) > 0, "linear_c must be positive values"),
            (self.patience >= 0, "patience must be >= 0 (0: train every epoch)"),
            (self.ensemble >= 1, "ensemble must be >= 1 (1: one head per fold)"),
            (self.compute_dtype in COMPUTE_DTYPES, f"compute_dtype must be one of {COMPUTE_DTYPES}"),
            (self.task in TASKS, f"task must be one of {TASKS}"),
            (self.loss in LOSSES, f"loss must be one of {LOSSES} (regression; classification uses cross-entropy)"),
            (self.task == "regression" or not self.targets,
             "targets are learned by regression: add --task regression, or drop --targets"),
            (self.task == "classification" or not self.class_weights,
             "class weights weigh classes, and a regression has none: drop class_weights"),
            (self.stack_members in STACK_MODES, f"stack_members must be one of {STACK_MODES}"),
            (self.views in VIEWS_MODES, f"views must be one of {VIEWS_MODES}"),
            (self.mix in MIX_MODES, f"mix must be one of {MIX_MODES}"),
            (self.mix_lr is None or self.mix_lr > 0, "mix_lr must be > 0 (or None: the head's lr)"),
            (self.fusion_weights in FUSION_WEIGHTS, f"fusion_weights must be one of {FUSION_WEIGHTS}"),
            (not (self.refit and self.compat_select_on_test),
             "refit trains on the speakers that chose, and with compat_select_on_test those are the test "
             "speakers: drop one of the two"),
        ]
        for ok, message in checks:
            if not ok:
                raise ConfigError(message)
        self.linear_c = tuple(float(c) for c in self.linear_c)
        self.targets = tuple(str(t) for t in self.targets)

    @classmethod
    def from_dict(cls, overrides: dict) -> "TrainConfig":
        """Defaults updated with `overrides`; unknown keys and wrong types are refused."""
        defaults = cls()
        values = {}
        for key, value in overrides.items():
            if not hasattr(defaults, key):
                raise ConfigError(f"unknown setting {key!r}; settings = {[f.name for f in dataclasses.fields(cls)]}")
            values[key] = _coerce(key, value, getattr(defaults, key))
        return cls(**values)

    def to_dict(self) -> dict:
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @property
    def flawed(self) -> bool:
        return bool(self.flaws())

    def flaws(self) -> list[str]:
        """The compatibility switches on, each in words (FLAWS); empty for an honest config."""
        return [text for key, text in FLAWS.items() if getattr(self, key)]


# The compatibility switches, as results made with them are labelled.
FLAWS = {
    "compat_select_on_test": "selection on the test fold (compat_select_on_test)",
    "compat_eval_dropout": "dropout at evaluation (compat_eval_dropout)",
    "compat_speaker_overlap": "speaker-dependent: test speakers also trained on (compat_speaker_overlap)",
}


# Settings added after runs and sweeps were first saved, with the value that reproduces them: a
# stored config that lacks one was made with this value, whatever today's default is.
# (stack_members "auto": stacking was added with auto on CUDA only, where runs were never
# bit-reproducible; on a CPU, auto trains members one after another, as before.)
EARLIER_VALUES = {"frame_pool": 0, "patience": 0, "compute_dtype": "float32", "refit": False, "ensemble": 1, "time_mask": 0.0,
                  "task": "classification", "targets": [], "loss": "ccc", "stack_members": "auto",
                  "compat_speaker_overlap": False, "views": "off"}


def as_made(stored: dict) -> dict:
    """A stored TrainConfig dict with the settings it predates filled in as they were then."""
    return {**TrainConfig().to_dict(), **EARLIER_VALUES, **stored}


def _coerce(key, value, default):
    if default is None:  # an optional number (mix_lr)
        ok = value is None or (isinstance(value, (int, float)) and not isinstance(value, bool))
        value = value if value is None or not ok else float(value)
    elif isinstance(default, bool):
        ok = isinstance(value, bool)
    elif isinstance(default, float):
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        value = float(value) if ok else value
    elif isinstance(default, int):
        ok = isinstance(value, int) and not isinstance(value, bool)
    elif isinstance(default, tuple):
        ok = isinstance(value, (list, tuple))
        value = tuple(value) if ok else value
    else:
        ok = isinstance(value, type(default))
    if not ok:
        kind = "a number or None" if default is None else type(default).__name__
        raise ConfigError(f"setting {key!r} must be {kind}, got {value!r}")
    return value


FIXED_EQUAL = {"mix": "mix equal", "fusion_weights": "fusion_weights equal"}  # weighting's settings


def weighting(head: str, settings: dict) -> tuple[str, str]:
    """How head `head` weighs its states under `settings` (a TrainConfig's dict, or part of
    one): ("learned", key) when the weights are fitted (a pooling head's mix, or the fusion
    head's weights chosen on validation), ("equal", key) when they are fixed equal; key: the
    setting that decides (FIXED_EQUAL's keys), for the reports that say so."""
    if head == "fusion":
        equal = settings.get("fusion_weights", TrainConfig.fusion_weights) == "equal"
        return ("equal" if equal else "learned"), "fusion_weights"
    return ("equal" if settings.get("mix", TrainConfig.mix) == "equal" else "learned"), "mix"
