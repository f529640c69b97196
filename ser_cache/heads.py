"""Heads: frame states (B, T, L * d) of L >= 1 layers and mask (B, T) -> logits (B, n_classes),
or, for continuous targets, values (B, n_targets).

Every head is a torch module with the same interface (`Head`), so training, sweeps, export and
prediction treat them alike and never ask which head they hold:

    options(config, dim, n_classes, n_states)
                                      constructor arguments taken from a TrainConfig; dim is
                                      the width of one state, n_states the states per frame
    selects                           what fitting chooses on validation speakers: "epoch" or "C"
    prepare(data, index, config)      fix input statistics from the training utterances
    forward(x, mask)                  logits; padding never changes them
                                      = outputs(logits(inputs(x), mask)), where `inputs` is the
                                      fixed part (no parameters) that a fitter may apply once
                                      per fold instead of at every step, and `outputs` the
                                      fixed map back to the targets' scale (identity for classes)

Continuous targets (tasks.Regression): a head built with regression=True has one linear output
per target (`n_classes` is then the number of targets), learns standardised values, and holds
the training split's target mean and std as buffers (`standardize_outputs`), so that its
forward gives values on the targets' own scale: exported heads predict real values.

How a head is fitted (a gradient loop with the epoch chosen on validation, or a scikit-learn
fit with C chosen on validation) is fitting.py's business, chosen by `selects`.

The three pooling heads share the paper's front and back and differ only in how they pool
over time:

    mix     softmax-weighted sum of the L states (only when L > 1)   (B, T, L * d) -> (B, T, d)
    front   Linear(d -> d_model), LayerNorm(d_model)                 per frame
    pool    mean | attentive | qkv                                   (B, T, d_model) -> (B, p)
    back    Linear(p -> d_model), LayerNorm(d_model), Linear(d_model -> n_classes)

`cta` (CTAHead) keeps that front, pooling (attentive) and back, and adds between them what
the CTA-RNN of Chen and Zhang (Interspeech 2022) adds: a channel gate before the front, a
temporal gate after it, and a bidirectional LSTM before the pooling (see its docstring).

`stats` (StatisticsHead) is not the paper's: it has no front, mix or back. It reads what the
linear probe reads, the standardised mean and std of every value of every state, adds
attentive means of the standardised frames, and maps them to the classes with one trained
Linear (see its docstring for why: the measured losses of the pooling heads).

The back has no activation between its layers: the paper lists none, and we follow it (the
LayerNorm is the only non-linearity there). Dropout sits where the paper puts it, on the
attention projections; the mean head has none.

Several layers (L > 1, features.LayerData with a tuple of states): each state is standardised
with its own training statistics (`prepare`, `inputs`: per value of the row, so per state),
then `StateMix` sums the states with learned softmax weights, initialised equal, as the
SUPERB recipes of s3prl weigh upstream layers; `layer_weights()` reads them. They say where
emotion lives only if they left equal weights (report.uniformity): at the head's lr they did not,
measured; config.mix_lr gives them their own lr, config.mix "equal" fixes them. With one state
there is no mix at all, no parameter and no operation, so a single-layer head is exactly the
one it was before (mix and mix_lr change nothing there).

Padding never changes the output: padded frames are zeroed right after the front (so even
NaN padding cannot leak through a product with a zero weight), and excluded from every time
average or softmax with the mask (-inf scores, masked sums). Every row needs >= 1 real frame.

`linear` is the strong, fast baseline: logistic regression on the standardised mean and
standard deviation of the raw frames (with several states, of every state, concatenated: the
baseline a multi-layer head is reported against). It is a module like the others (its
statistics, standardisation and weights are float64 buffers), fitted by scikit-learn.

Several heads of one kind trained with different seeds act as one through `Ensemble`, whose
class probabilities are the mean of its members' (see its docstring for what its logits are).

Every head is saved as its registry name, constructor options and state dict
(`save_head` / `load_head`), which loads with `weights_only=True`: no pickled code. An
ensemble is saved the same way, plus its number of members.

Default sizes: 12 heads of 4 dimensions for both attentive and QKV pooling. 12 x 4 is the
paper's QKV setting and the attentive setting of its one IEMOCAP number that could be read
(Shendabadi et al. 2026); using the same size for both keeps the two pooling methods comparable.
"""
from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import torch
import torch.nn as nn

from .errors import OptionError

D_MODEL = 256  # width of the front and back (paper)
N_HEADS = 12
HEAD_DIM = 4
DROPOUT = 0.3
RNN_HIDDEN = 32  # cta: LSTM units per direction
GATE_REDUCTION = 8  # cta: the channel gate's squeeze, dim -> dim / 8 -> dim
TEMPORAL_HIDDEN = 64  # cta: width of the temporal gate's scoring layer
STATS_SCORE_HIDDEN = 64  # stats: width of the attention's scoring layer


class Head(nn.Module):
    """What every head offers (see the module docstring). Subclasses set `selects` and
    implement `options`, `prepare` and `forward`."""

    selects: str = "epoch"  # the choice fitting makes on validation speakers: "epoch" or "C"
    fitted_by: str = ""  # the fitter (fitting.FITTERS) when not the one of `selects`
    reads: str = "frames"  # or "statistics": a head that needs only features.utterance_statistics
    regression: bool = False  # outputs are target values (with output_mean, output_scale buffers)
    # Whether several states are mixed by a StateMix (`mix`), whose logits config.mix and
    # config.mix_lr govern (fitting.param_groups); the stats head and the probe read them side by side.
    mixes_states: bool = False
    # Whether `logits` runs under torch.func.vmap with stacked parameters, so that an
    # ensemble's members can train as one model (ensembles.py).
    stackable: bool = False

    @classmethod
    def options(cls, config, dim: int, n_classes: int, n_states: int = 1) -> dict:
        """Constructor arguments of this head from a TrainConfig (`config`) for frames of
        n_states states of width dim: what save_head records and what rebuilds the head."""
        if n_states != 1:
            raise OptionError(f"the {cls.__name__} head reads one state per frame: train it on one layer")
        return {"dim": dim, "n_classes": n_classes, **task_option(config)}

    def output_scaling(self, n_outputs: int, regression: bool) -> None:
        """With regression, the buffers that map standardised outputs to the targets' scale
        (identity until `standardize_outputs`); float64, the linear probe's precision. A
        classification head has none, so its state dict is what it always was."""
        self.regression = regression
        if regression:
            self.register_buffer("output_mean", torch.zeros(n_outputs, dtype=torch.float64))
            self.register_buffer("output_scale", torch.ones(n_outputs, dtype=torch.float64))

    def standardize_outputs(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Fix the targets' training mean and std, (n_targets,) each (a constant target keeps scale 1)."""
        std = np.where(np.asarray(std) > 0, std, 1.0)
        self.output_mean.copy_(torch.as_tensor(mean, dtype=torch.float64))
        self.output_scale.copy_(torch.as_tensor(std, dtype=torch.float64))

    def outputs(self, raw: torch.Tensor) -> torch.Tensor:
        """The trained part's outputs (B, n_outputs) on the targets' scale (regression), as
        they are otherwise (logits), in raw's dtype."""
        if not self.regression:
            return raw
        return (raw * self.output_scale + self.output_mean).to(raw.dtype)

    @classmethod
    def reading(cls, config) -> str:
        """What a head of this class built from TrainConfig `config` reads: "frames", or
        "statistics" (only each utterance's mean and std, as a statistics cache holds them)."""
        return cls.reads

    def layer_weights(self) -> list[float] | None:
        """The learned weight of each state, in order (sum 1), or None for a head that does
        not weigh states (one state, or the linear probe)."""
        return None

    def prepare(self, data, index: np.ndarray, config) -> None:
        """Fix what the head learns from its training utterances `index` of a LayerData
        before fitting (input statistics). Default: nothing."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x: (B, T, n_states * dim) float, mask: (B, T) bool True on real frames -> logits
        (B, n_classes), or target values (B, n_targets) for a regression head."""
        return self.outputs(self.logits(self.inputs(x), mask))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        """The fixed transform of the frames (B, T, width) that the trained part sees; it has no
        parameters, so it may be applied once to fixed data. Default: none."""
        return x

    def logits(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The trained part: inputs(x) (B, T, width) and mask (B, T) -> logits (B, n_classes)."""
        raise NotImplementedError


class StateMix(nn.Module):
    """Softmax-weighted sum of the states of each frame: (B, T, n_states * dim) -> (B, T, dim).

    The weights are softmax(logits) over states, with logits starting at zero (equal weights,
    as s3prl's SUPERB featurizer starts). By default they train in the head's one AdamW group,
    whose weight decay pulls them, mildly, towards equal weights again; measured, at the head's
    lr they hardly leave equal weights. config.mix_lr gives them their own lr and no decay;
    config.mix "equal" keeps them at zero (fitting.param_groups). report.uniformity says how
    far weights are from equal.
    """

    def __init__(self, n_states: int, dim: int):
        super().__init__()
        self.n_states, self.dim = n_states, dim
        self.logits = nn.Parameter(torch.zeros(n_states))

    def weights(self) -> torch.Tensor:
        """(n_states,) non-negative, summing to 1."""
        return self.logits.softmax(dim=0)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        B, T, width = z.shape
        assert width == self.n_states * self.dim, f"rows of width {width}, expected {self.n_states} x {self.dim}"
        states = z.reshape(B, T, self.n_states, self.dim)
        return torch.einsum("btld,l->btd", states, self.weights().to(z.dtype))


class StandardizedHead(Head):
    """A gradient-trained head whose frames are standardised per value of the row before its
    trained part sees them, with the training speakers' statistics (`prepare`): identity until
    `standardize_inputs`. With several states, per value of the stacked row, so each state by
    its own statistics. It is a reparametrisation of the first linear map that reads the frames,
    so a head keeps its function class; it only conditions the optimisation: raw Whisper states
    carry per-dimension offsets and scales that, measured on RAVDESS base layer 2, held the mean
    head at 27% UA after 5 epochs against 70% with standardised inputs."""

    def __init__(self, width: int):
        super().__init__()
        self.register_buffer("input_mean", torch.zeros(width))
        self.register_buffer("input_scale", torch.ones(width))

    def prepare(self, data, index: np.ndarray, config) -> None:
        if config.standardize:
            self.standardize_inputs(*data.moments(index))

    def inputs(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.input_mean) * self.input_scale

    def standardize_inputs(self, mean: np.ndarray, std: np.ndarray) -> None:
        """Fix the input standardisation: mean and std are (n_states * dim,) over training frames."""
        self.input_mean.copy_(torch.as_tensor(mean, dtype=torch.float32))
        self.input_scale.copy_(1.0 / torch.as_tensor(std, dtype=torch.float32).clamp(min=1e-5))


class PoolingHead(StandardizedHead):
    """Shared front and back; subclasses define `pool`, which returns (B, pooled_dim)."""

    stackable = True
    mixes_states = True

    def __init__(self, dim: int, n_classes: int, d_model: int, pooled_dim: int, n_states: int = 1,
                 regression: bool = False):
        super().__init__(n_states * dim)
        self.pooled_dim = pooled_dim
        self.output_scaling(n_classes, regression)
        # One state: no mix (no parameter, no operation), so single-layer heads stay as they were.
        self.mix = StateMix(n_states, dim) if n_states > 1 else None
        self.front = nn.Sequential(nn.Linear(dim, d_model), nn.LayerNorm(d_model))
        self.back = nn.Sequential(
            nn.Linear(pooled_dim, d_model), nn.LayerNorm(d_model), nn.Linear(d_model, n_classes)
        )

    @classmethod
    def options(cls, config, dim: int, n_classes: int, n_states: int = 1) -> dict:
        # n_states only when several, so that single-layer options (and files) stay as they were
        several = {"n_states": n_states} if n_states > 1 else {}
        return {"dim": dim, "n_classes": n_classes, "d_model": config.d_model, **several, **task_option(config)}

    def layer_weights(self) -> list[float] | None:
        return None if self.mix is None else self.mix.weights().tolist()

    def logits(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert z.shape[:2] == mask.shape, f"z {tuple(z.shape)} vs mask {tuple(mask.shape)}"
        if self.mix is not None:
            z = self.mix(z)  # (B, T, dim); NaN padding stays in padded frames, zeroed next
        h = self.front(z).masked_fill(~mask[..., None], 0.0)  # (B, T, d_model), padding = 0
        return self.back(self.pool(h, mask))

    def pool(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Time average over real frames: h (B, T, D) with padding zeroed, mask (B, T) -> (B, D)."""
    return h.sum(dim=1) / mask.sum(dim=1, keepdim=True).clamp(min=1).to(h.dtype)


def masked_softmax(scores: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Softmax over time (dim 1) of scores (B, T, H), padded frames weighted exactly 0."""
    return scores.masked_fill(~mask[..., None], float("-inf")).softmax(dim=1)


class MeanPoolHead(PoolingHead):
    """Baseline: the time average of the front's frames."""

    def __init__(self, dim: int, n_classes: int, d_model: int = D_MODEL, n_states: int = 1,
                 regression: bool = False):
        super().__init__(dim, n_classes, d_model, pooled_dim=d_model, n_states=n_states, regression=regression)

    def pool(self, h, mask):
        return masked_mean(h, mask)


class AttentivePoolHead(PoolingHead):
    """Multi-head attentive average pooling.

    scores = W_s tanh(dropout(W_a h)) (optionally / sqrt(head_dim)), softmax over time per head;
    values = dropout(W_v h) split into n_heads of head_dim; output the concatenated weighted
    sums, (B, n_heads * head_dim). W_s has no bias: a per-head constant cancels in the softmax.
    """

    def __init__(self, dim: int, n_classes: int, d_model: int = D_MODEL, n_heads: int = N_HEADS,
                 head_dim: int = HEAD_DIM, dropout: float = DROPOUT, scale: bool = True,
                 pool_input: int | None = None, n_states: int = 1, regression: bool = False):
        super().__init__(dim, n_classes, d_model, pooled_dim=n_heads * head_dim, n_states=n_states,
                         regression=regression)
        self.n_heads, self.head_dim, self.scale = n_heads, head_dim, scale
        width = pool_input or d_model  # of the frames pooled: the front's, or a subclass's (CTAHead)
        self.w_a = nn.Linear(width, n_heads * head_dim)
        self.w_s = nn.Linear(n_heads * head_dim, n_heads, bias=False)
        self.w_v = nn.Linear(width, n_heads * head_dim)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def options(cls, config, dim, n_classes, n_states=1):
        return {**super().options(config, dim, n_classes, n_states), "n_heads": attention_heads(cls, config),
                "head_dim": config.head_dim, "dropout": config.dropout, "scale": config.attention_scale}

    def pool(self, h, mask):
        B, T, _ = h.shape
        scores = self.w_s(torch.tanh(self.dropout(self.w_a(h))))  # (B, T, H)
        if self.scale:
            scores = scores / math.sqrt(self.head_dim)
        weights = masked_softmax(scores, mask)  # (B, T, H)
        values = self.dropout(self.w_v(h)).view(B, T, self.n_heads, self.head_dim)
        return torch.einsum("bth,bthd->bhd", weights, values).reshape(B, self.pooled_dim)


class QKVPoolHead(PoolingHead):
    """Multi-head QKV pooling with the time average of the frames as query.

    q = dropout(W_q mean_t h), k = dropout(W_k h), v = dropout(W_v h), each n_heads x head_dim;
    score = tanh(q . k / sqrt(head_dim)), softmax over time per head; output the concatenated
    weighted sums of v, (B, n_heads * head_dim).
    """

    def __init__(self, dim: int, n_classes: int, d_model: int = D_MODEL, n_heads: int = N_HEADS,
                 head_dim: int = HEAD_DIM, dropout: float = DROPOUT, n_states: int = 1,
                 regression: bool = False):
        super().__init__(dim, n_classes, d_model, pooled_dim=n_heads * head_dim, n_states=n_states,
                         regression=regression)
        self.n_heads, self.head_dim = n_heads, head_dim
        self.w_q = nn.Linear(d_model, n_heads * head_dim)
        self.w_k = nn.Linear(d_model, n_heads * head_dim)
        self.w_v = nn.Linear(d_model, n_heads * head_dim)
        self.dropout = nn.Dropout(dropout)

    @classmethod
    def options(cls, config, dim, n_classes, n_states=1):
        return {**super().options(config, dim, n_classes, n_states), "n_heads": attention_heads(cls, config),
                "head_dim": config.head_dim, "dropout": config.dropout}

    def pool(self, h, mask):
        B, T, _ = h.shape
        H, D = self.n_heads, self.head_dim
        q = self.dropout(self.w_q(masked_mean(h, mask))).view(B, H, D)
        k = self.dropout(self.w_k(h)).view(B, T, H, D)
        v = self.dropout(self.w_v(h)).view(B, T, H, D)
        scores = torch.tanh(torch.einsum("bhd,bthd->bth", q, k) / math.sqrt(D))  # (B, T, H)
        weights = masked_softmax(scores, mask)
        return torch.einsum("bth,bthd->bhd", weights, v).reshape(B, self.pooled_dim)


class ChannelGate(nn.Module):
    """Channel-wise attention: a squeeze-and-excitation gate over the channels of the frames.

    g = sigmoid(W_2 relu(W_1 mean_t x)) in (0, 1)^C, one weight per channel from the time
    average of the utterance's real frames; out = x * g. x (B, T, C) with padding zeroed,
    mask (B, T) -> (B, T, C). C is every number a frame carries: d for one encoder state, and
    L * d when frames hold L stacked states, so the same gate then weighs the dimensions of
    every layer against each other (what CTA-RNN's channel attention over layers does).
    """

    def __init__(self, channels: int, reduction: int = GATE_REDUCTION):
        super().__init__()
        self.squeeze = nn.Linear(channels, max(1, channels // reduction))
        self.excite = nn.Linear(max(1, channels // reduction), channels)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        gate = torch.sigmoid(self.excite(torch.relu(self.squeeze(masked_mean(x, mask)))))  # (B, C)
        return x * gate[:, None, :]


class CTAHead(AttentivePoolHead):
    """CTA-RNN-style head (Chen and Zhang, "CTA-RNN: Channel and Temporal-wise Attention RNN
    Leveraging Pre-trained ASR Embeddings for Speech Emotion Recognition", Interspeech 2022,
    arXiv 2203.17023), on the frames of one cached state:

        channel gate   x * g, g = sigmoid(W_2 relu(W_1 mean_t x)), per utterance   (B, T, d)
        front          Linear(d -> d_model), LayerNorm, as every pooling head      (B, T, d_model)
        temporal gate  h_t * sigmoid(w . tanh(W h_t)), one weight per frame        (B, T, d_model)
        BiLSTM         rnn_hidden units per direction, over real frames only       (B, T, 2 rnn_hidden)
        pool           multi-head attentive pooling (AttentivePoolHead.pool)       (B, n_heads head_dim)
        back           as every pooling head                                       (B, n_classes)

    The paper stacks the states of several encoder layers and attends over them channel-wise;
    so does this head on a multi-layer selection: the channel gate weighs all L * d values of
    a frame (which layers and which dimensions), then the states are summed with learned
    softmax weights (StateMix, as every pooling head) before the front. On one state it weighs
    that state's d dimensions. Our choices where the paper is not specific, or where we did not
    follow it closely: a squeeze-and-excitation gate (reduction 8) for channel attention; a
    sigmoid gate per frame for temporal attention (a softmax over time would shrink every frame
    of a long utterance, and the pooling that follows already normalises over time); a
    bidirectional LSTM of 32 units per direction; the front, attentive pooling, back, dropout
    and input standardisation shared with the other heads, so that only the added parts
    differ in a comparison.

    Cost. A recurrence is sequential over frames, so the RNN is what decides the time of a
    step. Measured on one CPU thread (batch 16, 95 frames, 64-wide frames in and 64 units
    out, forward and backward pass): a bidirectional GRU on a packed sequence took 51-93 ms a
    step, a packed bidirectional LSTM 64 ms, two unidirectional LSTMs on padded tensors 13 ms
    (torch has a fused CPU kernel for the LSTM, not for the GRU). Hence an LSTM run as two
    directions, each over real frames only: the forward one left to right (padding comes
    after every real frame), the backward one over each row's real frames reversed, its
    outputs put back in order. At Whisper base sizes (512-wide states, 150 frames) a training
    step then took about 3x qkv's with 64 units per direction and about 2x with 32 (a shared
    machine: rough figures), and 32 units learned the needle task as well as 64, so 32.

    Padding never changes the output: it is zeroed before the channel gate (whose average
    counts real frames only), neither LSTM direction passes through padding before a real
    frame, and the LSTM's outputs on padding are zeroed before the (masked) pooling. Every row
    needs >= 1 real frame, and its real frames first (a prefix mask).
    """

    stackable = False  # its LSTMs do not run under vmap: an ensemble trains one member after another

    def __init__(self, dim: int, n_classes: int, d_model: int = D_MODEL, n_heads: int = N_HEADS,
                 head_dim: int = HEAD_DIM, dropout: float = DROPOUT, scale: bool = True,
                 rnn_hidden: int = RNN_HIDDEN, reduction: int = GATE_REDUCTION,
                 temporal_hidden: int = TEMPORAL_HIDDEN, n_states: int = 1, regression: bool = False):
        super().__init__(dim, n_classes, d_model, n_heads, head_dim, dropout, scale, pool_input=2 * rnn_hidden,
                         n_states=n_states, regression=regression)
        self.channel_gate = ChannelGate(n_states * dim, reduction)  # over every state's channels
        self.temporal_gate = nn.Sequential(nn.Linear(d_model, temporal_hidden), nn.Tanh(),
                                           nn.Linear(temporal_hidden, 1), nn.Sigmoid())
        self.rnn_forward = nn.LSTM(d_model, rnn_hidden, batch_first=True)
        self.rnn_backward = nn.LSTM(d_model, rnn_hidden, batch_first=True)

    @classmethod
    def options(cls, config, dim, n_classes, n_states=1):
        return {**super().options(config, dim, n_classes, n_states), "rnn_hidden": RNN_HIDDEN,
                "reduction": GATE_REDUCTION, "temporal_hidden": TEMPORAL_HIDDEN}

    def logits(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert z.shape[:2] == mask.shape, f"z {tuple(z.shape)} vs mask {tuple(mask.shape)}"
        pad = ~mask[..., None]
        z = self.channel_gate(z.masked_fill(pad, 0.0), mask)  # (B, T, n_states * dim)
        if self.mix is not None:
            z = self.mix(z)  # the gated states' softmax-weighted sum, (B, T, dim)
        h = self.front(z).masked_fill(pad, 0.0)  # (B, T, d_model)
        h = h * self.temporal_gate(h)
        return self.back(self.pool(self.recur(h, mask), mask))

    def recur(self, h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """The BiLSTM over each row's real frames: (B, T, d_model) -> (B, T, 2 rnn_hidden),
        forward then backward outputs, padding 0. In float32 even under autocast (recurrent
        kernels are not all offered in bfloat16)."""
        t = torch.arange(h.shape[1], device=h.device)[None, :]
        # Each row's real frames in reverse order, padding left in place (its own inverse).
        flip = torch.where(mask, mask.sum(dim=1, keepdim=True) - 1 - t, t)[..., None]
        with torch.autocast(h.device.type, enabled=False):
            h = h.float()
            forward, _ = self.rnn_forward(h)
            backward, _ = self.rnn_backward(h.gather(1, flip.expand_as(h)))
        backward = backward.gather(1, flip.expand_as(backward))
        return torch.cat([forward, backward], dim=-1).masked_fill(~mask[..., None], 0.0)


class LinearProbe(Head):
    """Logistic regression on the standardised mean and std of the raw frames (regression=True:
    ridge regression of the standardised targets on them, in the same buffers).

    Its `dim` is the width of a whole frame row: with several states it reads them all, so its
    features are the mean and std of every state, concatenated (2 * n_states * d values).

    forward: x (B, T, dim), mask (B, T) -> logits (B, n_classes), computed in float64 so that
    its probabilities are those of the scikit-learn pipeline it was fitted as (StandardScaler,
    LogisticRegression) to rounding. A class absent from the training split has logit -inf
    (probability 0). Fitted by fitting.py (`selects` C on validation), loaded with
    `from_fitted`.
    """

    selects = "C"
    reads = "statistics"

    def __init__(self, dim: int, n_classes: int, regression: bool = False):
        super().__init__()
        self.output_scaling(n_classes, regression)
        f64 = dict(dtype=torch.float64)  # float64 whatever the frames' dtype: sklearn's numbers
        self.register_buffer("feature_mean", torch.zeros(2 * dim, **f64))
        self.register_buffer("feature_scale", torch.ones(2 * dim, **f64))
        self.register_buffer("weight", torch.zeros(n_classes, 2 * dim, **f64))
        self.register_buffer("bias", torch.zeros(n_classes, **f64))

    @classmethod
    def options(cls, config, dim: int, n_classes: int, n_states: int = 1) -> dict:
        return {"dim": n_states * dim, "n_classes": n_classes, **task_option(config)}

    def logits(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.statistics_logits(masked_statistics(z.double(), mask))

    def statistics_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes) of the raw statistics (B, 2 dim) float64 (features.StatsLayer)."""
        return ((features - self.feature_mean) / self.feature_scale) @ self.weight.T + self.bias

    def from_statistics(self, features: torch.Tensor) -> torch.Tensor:
        """forward() for an utterance's statistics (B, 2 dim) instead of its frames."""
        return self.outputs(self.statistics_logits(features.double()))

    def from_fitted(self, mean: np.ndarray, scale: np.ndarray, coef: np.ndarray, intercept: np.ndarray,
                    classes: np.ndarray) -> "LinearProbe":
        """Take a fitted StandardScaler's mean_ and scale_ ((2 dim,)) and LogisticRegression's
        coef_ ((k, 2 dim), k = 1 for two classes), intercept_ and classes_ (the class numbers
        seen in training). A regression probe: Ridge's coef_ (n_targets, 2 dim) and intercept_,
        with classes None."""
        coef, intercept = np.atleast_2d(coef), np.atleast_1d(intercept)
        if classes is None:
            assert self.regression and coef.shape == tuple(self.weight.shape), f"coef {coef.shape} for {tuple(self.weight.shape)}"
            classes = np.arange(len(coef))
        elif len(classes) == 2 and len(coef) == 1:  # binary: p(class 1) = sigmoid(w.x + b)
            coef, intercept = np.stack([np.zeros_like(coef[0]), coef[0]]), np.array([0.0, intercept[0]])
        weight = np.zeros(tuple(self.weight.shape))
        bias = np.full(len(self.bias), -np.inf)
        weight[classes], bias[classes] = coef, intercept
        for name, value in (("feature_mean", mean), ("feature_scale", scale), ("weight", weight), ("bias", bias)):
            getattr(self, name).copy_(torch.from_numpy(np.asarray(value, dtype=np.float64)))
        return self


class FusionProbe(Head):
    """Late fusion of states: one linear probe per state, their outputs averaged with weights,
    equal or chosen on validation speakers.

        probe s    LinearProbe on state s's mean and std (B, 2 d) -> probabilities (B, n_classes)
        fused      sum_s w_s p_s (a linear pool of the states' probabilities), w on the simplex;
                   a regression: sum_s w_s v_s of the probes' target values

    Fitted by fitting.fit_fusion: every probe shares one C, chosen by the fused validation
    score. The weights are 1/L (config.fusion_weights "equal", the default), or for each C
    those that maximise the validation likelihood of the fused probabilities ("validation";
    for a regression the validation CCC's stand-in, the mean squared error per target
    variance). What it is compared with: `linear` on the same states concatenates their
    statistics into one probe (early fusion), a pooling head mixes the frames (StateMix).

    Why a linear pool: each state's probe is calibrated on its own, and a convex combination
    of calibrated probabilities stays a probability, with weights that read as how much each
    state's probe is trusted on unseen speakers (`layer_weights`). Why equal by default: a
    fold's validation speakers are few (34 to 174 utterances on URDU), and weights fitted to
    them scored below equal ones on test speakers (docs/findings.md, "Fusion of states").

    forward: x (B, T, n_states * dim), mask (B, T) -> log of the fused probabilities (B,
    n_classes), so softmax gives them back (a class no probe saw has -inf); regression: the
    fused values (B, n_targets). Reads statistics only, as the probe does.
    """

    selects = "C"
    fitted_by = "fusion"  # C and the states' weights
    reads = "statistics"

    def __init__(self, dim: int, n_classes: int, n_states: int = 1, regression: bool = False):
        super().__init__()
        self.regression, self.dim = regression, dim
        self.probes = nn.ModuleList(LinearProbe(dim, n_classes, regression) for _ in range(n_states))
        self.register_buffer("weights", torch.full((n_states,), 1.0 / n_states, dtype=torch.float64))

    @classmethod
    def options(cls, config, dim: int, n_classes: int, n_states: int = 1) -> dict:
        several = {"n_states": n_states} if n_states > 1 else {}
        return {"dim": dim, "n_classes": n_classes, **several, **task_option(config)}

    def state_statistics(self, features: torch.Tensor, s: int) -> torch.Tensor:
        """State s's mean and std (B, 2 d) of a row's statistics (B, 2 W), `state_columns`."""
        columns = torch.from_numpy(state_columns(features.shape[1] // 2, self.dim, s)).to(features.device)
        return features[:, columns]

    def from_statistics(self, features: torch.Tensor) -> torch.Tensor:
        """forward() for utterances' statistics (B, 2 W) instead of their frames."""
        outputs = torch.stack([probe.from_statistics(self.state_statistics(features, s))
                               for s, probe in enumerate(self.probes)])  # (L, B, n_outputs)
        return fuse(outputs, self.weights, self.regression)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.from_statistics(masked_statistics(x.double(), mask))

    def set_weights(self, weights) -> "FusionProbe":
        """Fix the states' weights (L,), non-negative, summing to 1."""
        self.weights.copy_(torch.as_tensor(np.asarray(weights, dtype=np.float64)))
        return self

    def layer_weights(self) -> list[float] | None:
        return self.weights.tolist() if len(self.probes) > 1 else None


def state_columns(width: int, dim: int, s: int) -> np.ndarray:
    """(2 dim,) int64: the columns of state s's mean and std in a statistics row (2 width,) of
    states of width dim side by side (features.LayerData.statistics): the means of all width =
    n_states * dim values come first, then their stds, each state by state."""
    return np.r_[s * dim:(s + 1) * dim, width + s * dim:width + (s + 1) * dim].astype(np.int64)


def fuse(outputs: torch.Tensor, weights: torch.Tensor, regression: bool) -> torch.Tensor:
    """The weighted states' outputs (L, B, n_outputs) -> (B, n_outputs): for classes, the log
    of sum_s w_s softmax(outputs_s) (a state of weight 0 adds nothing, even -inf logits); for
    values, sum_s w_s outputs_s."""
    w = weights.to(outputs.dtype)[:, None, None]
    if regression:
        return (w * outputs).sum(dim=0)
    return (outputs.log_softmax(dim=-1) + w.log()).logsumexp(dim=0)


class StatisticsHead(StandardizedHead):
    """The linear probe's features and attentive means, one trained linear layer: a trained
    head that reads what the probe reads, every value of every state, and adds what pooling adds.

        features   mean and std over real frames of every value of the standardised row,
                   standardised again with the training utterances' statistics   (B, 2 W)
        attention  n_heads softmax weightings over time, scores = w_s tanh(W_a z_t), each the
                   weighted mean of the standardised row                         (B, n_heads W)
        out        Linear(dropout(features, attention) -> n_classes)

    W = n_states * dim: the states are read side by side, not mixed, as the probe reads them.
    Why this shape. On RAVDESS tiny.en, all five states, the same 6 folds (docs/findings.md, "Several
    layers at once"), the linear probe (75.1 UA) beat every pooling head (68-72); a logistic
    regression on the time means alone still scored 73.5 with the states side by side and 71.2
    on their equal-weight mix, so the pooling heads lose information in their mix (about 2
    points) and in having no standard deviation (about 1.6), and overfit in their per-frame
    front. This head keeps the probe's inputs and linear map, trained by gradient descent with
    the epoch chosen on validation, and adds attentive means of the frames (the scoring layer is
    the only non-linearity). With n_heads 0 it is the probe fitted by AdamW instead of L-BFGS.

    With n_heads 0 it reads statistics only (`reads`), as the probe does: it trains and predicts
    from each utterance's raw mean and std (`statistics_logits`), on a frames cache as on a
    statistics cache, with the same numbers. The input standardisation is then left at the
    identity: standardising the frames by value maps each feature affinely (mean -> (m - mu) s,
    std -> std s), which the feature standardisation undoes, so it would change nothing but
    rounding and would need a pass over every frame.

    No learned layer weights: like the probe, it weighs every value of every state on its own.
    Padding never changes the output (masked statistics and softmax; padded rows zeroed first).
    """

    def __init__(self, dim: int, n_classes: int, n_heads: int = N_HEADS, dropout: float = DROPOUT,
                 n_states: int = 1, regression: bool = False):
        width = n_states * dim
        super().__init__(width)
        self.output_scaling(n_classes, regression)
        self.n_heads = n_heads
        self.reads = "frames" if n_heads else "statistics"
        self.register_buffer("feature_mean", torch.zeros(2 * width))
        self.register_buffer("feature_scale", torch.ones(2 * width))
        if n_heads:
            self.w_a = nn.Linear(width, STATS_SCORE_HIDDEN)
            self.w_s = nn.Linear(STATS_SCORE_HIDDEN, n_heads, bias=False)  # a per-head constant cancels
        self.dropout = nn.Dropout(dropout)
        self.out = nn.Linear((2 + n_heads) * width, n_classes)

    @classmethod
    def options(cls, config, dim: int, n_classes: int, n_states: int = 1) -> dict:
        several = {"n_states": n_states} if n_states > 1 else {}
        return {"dim": dim, "n_classes": n_classes, "n_heads": config.n_heads, "dropout": config.dropout,
                **several, **task_option(config)}

    @classmethod
    def reading(cls, config) -> str:
        return "frames" if config.n_heads else "statistics"

    def prepare(self, data, index: np.ndarray, config) -> None:
        stats = torch.as_tensor(data.statistics[np.asarray(index)], dtype=torch.float64)
        if self.reads == "statistics":  # the features as statistics_logits reads them (float32)
            stats = stats.float().double()
        else:
            super().prepare(data, index, config)
            # The statistics of standardised frames follow from the raw ones: mean -> (m - mu) s,
            # std -> std s (s > 0), so the probe's cached statistics serve, with no pass over frames.
            width = stats.shape[1] // 2
            mu, s = self.input_mean.double(), self.input_scale.double()
            stats = torch.cat([(stats[:, :width] - mu) * s, stats[:, width:] * s], dim=1)
        self.feature_mean.copy_(stats.mean(dim=0))
        self.feature_scale.copy_(1.0 / stats.std(dim=0, correction=0).clamp(min=1e-5))  # as StandardScaler

    def logits(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        assert z.shape[:2] == mask.shape, f"z {tuple(z.shape)} vs mask {tuple(mask.shape)}"
        z = z.masked_fill(~mask[..., None], 0.0)  # (B, T, W): NaN padding cannot reach a product
        features = [(masked_statistics(z, mask) - self.feature_mean) * self.feature_scale]  # (B, 2 W)
        if self.n_heads:
            weights = masked_softmax(self.w_s(torch.tanh(self.w_a(z))), mask)  # (B, T, n_heads)
            features.append(torch.einsum("bth,btw->bhw", weights, z).flatten(1))  # (B, n_heads W)
        return self.out(self.dropout(torch.cat(features, dim=1)))

    def statistics_logits(self, features: torch.Tensor) -> torch.Tensor:
        """Logits (B, n_classes) of the raw statistics (B, 2 W) (features.StatsLayer's rows, as
        float32): the head with n_heads 0, which reads nothing else."""
        assert self.reads == "statistics", "a head with attention heads reads frames"
        return self.out(self.dropout((features.float() - self.feature_mean) * self.feature_scale))

    def from_statistics(self, features: torch.Tensor) -> torch.Tensor:
        """forward() for utterances' raw statistics (B, 2 W) instead of their frames."""
        return self.outputs(self.statistics_logits(features))


def masked_statistics(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """(B, 2 dim): mean and (population) std over each row's real frames of x (B, T, dim);
    two passes, like numpy's std, and padding of any value ignored."""
    pad = ~mask[..., None]
    n = mask.sum(dim=1, keepdim=True).clamp(min=1).to(x.dtype)
    mean = x.masked_fill(pad, 0.0).sum(dim=1) / n
    var = (x - mean[:, None]).masked_fill(pad, 0.0).square().sum(dim=1) / n
    return torch.cat([mean, var.sqrt()], dim=1)


class Ensemble(Head):
    """Members: heads of one kind and options, trained with different seeds, used as one.

    Its probabilities are the mean of the members' class probabilities. Heads return logits,
    so the ensemble returns the log of that mean,

        logits = log(1/M sum_m softmax(l_m)) = logsumexp_m(log_softmax(l_m)) - log M,

    which softmax maps back to the mean probabilities (they already sum to 1), so everything
    that takes softmax(logits) (evaluation, prediction) uses the averaged probabilities, and
    argmax picks the class of highest mean probability. These are not the mean of the members'
    logits: that would be a normalised geometric mean of their probabilities. A class that
    every member gives probability 0 (the linear probe's unseen classes) keeps logit -inf.
    Regression members: the ensemble's output is the mean of their values (on the targets' scale).
    """

    def __init__(self, members: list[Head]):
        super().__init__()
        assert len(members) >= 1 and len({type(m) for m in members}) == 1, "members: heads of one kind"
        self.members = nn.ModuleList(members)
        self.selects = members[0].selects
        self.reads = members[0].reads
        self.regression = members[0].regression  # then the mean of the members' values

    def layer_weights(self) -> list[float] | None:
        """The members' mean weight per state (None when they weigh no states)."""
        weights = [m.layer_weights() for m in self.members]
        return None if weights[0] is None else np.mean(weights, axis=0).tolist()

    def outputs(self, raw: torch.Tensor) -> torch.Tensor:
        return raw  # each member has put its own outputs on the targets' scale

    def logits(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        # inputs() is the identity here: each member applies its own fixed transform.
        return self.combine([m(z, mask) for m in self.members])

    def from_statistics(self, features: torch.Tensor) -> torch.Tensor:
        """forward() on statistics, for members that read them (LinearProbe.from_statistics)."""
        return self.combine([m.from_statistics(features) for m in self.members])

    def combine(self, outputs: list[torch.Tensor]) -> torch.Tensor:
        """The members' outputs -> the ensemble's (the mean of their values, or of their probabilities)."""
        if self.regression:
            return torch.stack(outputs).mean(dim=0)  # (B, n_targets)
        log_probs = torch.stack([o.log_softmax(dim=-1) for o in outputs])  # (M, B, n_classes)
        return log_probs.logsumexp(dim=0) - math.log(len(self.members))


HEADS: dict[str, type[Head]] = {
    "linear": LinearProbe,
    "mean": MeanPoolHead,
    "attentive": AttentivePoolHead,
    "qkv": QKVPoolHead,
    "cta": CTAHead,
    "stats": StatisticsHead,
    "fusion": FusionProbe,
}


def task_option(config) -> dict:
    """{"regression": True} for a TrainConfig of task regression, else nothing (so that
    classification heads' options, and files, stay as they were)."""
    return {"regression": True} if config.task == "regression" else {}


def head_class(name: str) -> type[Head]:
    """The registered class of head `name`."""
    if name not in HEADS:
        raise OptionError(f"head {name!r} not found; available heads = {sorted(HEADS)}")
    return HEADS[name]


def attention_heads(cls: type[Head], config) -> int:
    """config.n_heads for a head that pools by attention, which needs at least one; 0 (no
    attention) is the stats head's alone, so a grid or setting that gives it to another is
    refused here, when the head's options are first read (a sweep: at planning)."""
    if config.n_heads < 1:
        name = next((n for n, c in HEADS.items() if c is cls), cls.__name__)
        raise OptionError(f"the {name} head pools with attention heads: give it --attn-heads 1 or more "
                          f"(grid key attn_heads); attn_heads=0 (no attention) is for --head stats only, swept on its own")
    return config.n_heads


def options_for(cls: type[Head], config, dim: int, n_classes: int, n_states: int = 1) -> dict:
    """cls.options for frames of n_states states of width dim. One state is asked with the
    three arguments every head takes, so a head written for one state needs nothing more."""
    if n_states == 1:
        return cls.options(config, dim, n_classes)
    return cls.options(config, dim, n_classes, n_states)


def build_head(name: str, dim: int, n_classes: int, **options) -> Head:
    """A fresh head from its registry name; options are that head's own constructor arguments."""
    return head_class(name)(dim, n_classes, **options)


def one_head(models: list[Head]) -> Head:
    """The single head of a list of one, or the Ensemble of several (members' seeds differ)."""
    return models[0] if len(models) == 1 else Ensemble(models)


def rebuild_head(name: str, options: dict, members: int | None = None) -> Head:
    """A fresh head to load a saved state into: head `name` with its constructor `options`,
    or an Ensemble of `members` such heads."""
    if members is None:
        return build_head(name, **options)
    return Ensemble([build_head(name, **options) for _ in range(members)])


def n_members(head: Head) -> int | None:
    """The number of members of an Ensemble, None for a single head (what rebuild_head takes)."""
    return len(head.members) if isinstance(head, Ensemble) else None


def save_head(path: Path, head: Head, name: str, options: dict, labels: list[str], layer,
              **extra) -> None:
    """Save a trained head with what rebuilds it, atomically: a torch.save dict of the registry
    name, constructor options (with dim and n_classes), label names, layer (an int, or a list
    of the states it mixes), for an Ensemble its number of "members" (of that name and
    options), `extra` (plain values) and the state dict (with the learned layer weights'
    logits, `mix.logits`, of a multi-layer head). Loads with weights_only=True."""
    from .files import save_torch_atomic
    from .layers import to_json

    state = {k: v.detach().cpu() for k, v in head.state_dict().items()}
    info = {"head": name, "kwargs": dict(options), "labels": list(labels), "layer": to_json(layer), **extra}
    if isinstance(head, Ensemble):
        info["members"] = n_members(head)
    save_torch_atomic(path, {**info, "state_dict": state})


def load_head(path: Path) -> tuple[Head, dict]:
    """(head in eval mode, its info dict) from a file written by `save_head`."""
    info = torch.load(path, map_location="cpu", weights_only=True)
    head = rebuild_head(info["head"], info["kwargs"], info.get("members"))
    head.load_state_dict(info.pop("state_dict"))
    return head.eval(), info
