"""Ensembles and refit: what a fold's fitting hands to its single test (`Chosen`).

    fit_selected(name, data, y, train, select)  one head, or config.ensemble members   -> Chosen
    refit_selected(chosen, ...)                 retrained on train + select            -> Chosen

Refit (`refit`, off by default): once the epoch (or C, or in a sweep the grid setting) is
chosen on the validation speakers, the head is trained again from scratch on training +
validation speakers with that choice and the same seed, and that head is tested, once. The
test speakers still choose nothing; the validation speakers only stop being held out after
they have chosen. With as many epochs as chosen, the refit head takes more steps per epoch
(more utterances): the usual convention, and the one the all-speaker export follows.

Stacked members. The members of an ensemble trained together, as one model whose parameters have a leading
member dimension, so that one optimizer step moves every member with large batched products:

    M heads (seeds s_1..s_M) --stack_module_state--> params {name: (M, ...)}
    step: M member batches, padded to one (M, B, T, width) --vmap(functional_call)--> (M, B, C)

Each member is the head fitting.fit_by_epochs would train from its seed, with everything
drawn as there: its initialisation, its batch order and its order of batches in every epoch
(its own numpy Generator), its own epoch choice on validation and its own patience. AdamW is
elementwise, so one AdamW over the stacked tensors is M AdamWs; the losses of the members are
summed, so each member's gradient is its own. Hence, without dropout and time masking, a
member trained in a stack is the member trained alone, to float rounding (tested). Dropout
and time masking draw from one torch RNG for the whole stack (vmap's randomness="different":
each member its own masks), so with them on a stacked member is a different draw of the
same training, not the solo run's numbers.

Padding. The members' batches of one step differ in length (frames) and, for the last batch
of an epoch, in size (rows): each is zero-padded to the longest. Padded frames are masked
as every head masks them; padded rows get one masked-in zero frame (a head needs one real
frame per row) and are left out of the member's loss, so no output of a real row and no
gradient changes (tested).

A member whose patience ran out (or, with fixed choices, that reached its epoch) is taken
out of the stack, with its AdamW state: its kept state is frozen and it costs nothing more.

The loss and the validation score are passed in (`loss(logits (B, C), y (B,)) -> scalar`,
`score(y_true (n,), probs (n, C)) -> float`, higher is better), as fit_members
builds them for its task.

When. `stacks` decides: heads whose class sets `stackable` (the pooling heads; not the LSTM
head `cta`, nor the linear probe, fitted by scikit-learn), and by config.stack_members: "on",
"off", or "auto": on CUDA only. On the 2-core development CPU, one torch thread, RAVDESS base
state 3, one fold's training split, stacking 3 or 6 qkv or attentive members took 1.00-1.17x
the time per epoch of training them one after another (docs/findings.md, "Training time, measured"): a
CPU core is already kept busy by one member's products (B x T rows of 512), and under vmap a
Linear becomes a bmm plus a separate bias add and a LayerNorm three passes instead of one.
Hand-written batched products were no better: the front (Linear, LayerNorm; forward and
backward) of 3 members took 185 ms alone, 192 ms under vmap, 222 ms with baddbmm and an
unweighted layer_norm (min of 4, shared machine). Memory: every member holds its own padded
training batches (make_batches), M times one member's.
"""
from __future__ import annotations

import copy
import dataclasses
import logging
import math
import statistics
import time
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
import torch.nn as nn
from torch.func import functional_call, stack_module_state, vmap

from .batches import (
    EVAL_BATCH_SIZE,
    batch_order,
    drop_spans,
    in_order,
    make_batches,
    predict,
    predict_proba,
)
from .config import TrainConfig
from .features import LayerData
from .fitting import (
    Fit,
    NonFiniteLossError,
    fit_head,
    fork_rng,
    get_lr,
    member_seed,
    param_groups,
    resolve_compute_dtype,
    set_lr,
)
from .heads import Head, head_class, one_head, options_for
from .tasks import Classification, Task, as_task

log = logging.getLogger(__name__)


def stacks(cls: type[Head], config: TrainConfig, device: torch.device) -> bool:
    """Whether the config.ensemble members of head `cls` train as one stack on `device`."""
    if config.ensemble < 2 or not cls.stackable or config.stack_members == "off":
        return False
    return config.stack_members == "on" or device.type == "cuda"


class LogitsOf(nn.Module):
    """A head seen through its trained part: forward(z, mask) = head.logits(z, mask), what
    functional_call calls (its parameters are the head's, named "head.<name>")."""

    def __init__(self, head: Head):
        super().__init__()
        self.head = head

    @property
    def regression(self) -> bool:  # what batches.predict asks of what it runs
        return self.head.regression

    def forward(self, z: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.head.logits(z, mask)


class Member:
    """One member's own part of a stack: its head (initialised as alone, holding its input
    statistics), its training batches in its order, its Generator, and what it chose."""

    def __init__(self, cls: type[Head], options: dict, data: LayerData, y: np.ndarray, train: np.ndarray,
                 config: TrainConfig, seed: int, last: int, device: torch.device):
        self.seed, self.last = seed, last
        with fork_rng(device):
            # The draws of fit_by_epochs, in its order: batch order, then initialisation.
            torch.manual_seed(seed)
            self.rng = np.random.default_rng(seed)
            order = batch_order(data, train, config.batch_size, self.rng)
            self.model = cls(**options)
            self.model.prepare(data, train, config)
            self.model = self.model.to(device)
        self.batches, _ = make_batches(data, y, order, config.batch_size, device, transform=self.model.inputs,
                                       ordered=True)
        self.history: list[dict] = []
        self.best_ua, self.best_epoch, self.best_state, self.best_probs = None, last, None, None
        self.done = False


def pad_stack(batches: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One (x (B_m, T_m, width), mask (B_m, T_m)) per member -> x (M, B, T, width) float32 and
    mask (M, B, T), B and T the largest. Padded frames are zero and masked out; a padded row
    gets one masked-in zero frame (every head needs one real frame per row), and the caller
    leaves it out of the loss."""
    B = max(x.shape[0] for x, _ in batches)
    T = max(x.shape[1] for x, _ in batches)
    x_out = batches[0][0].new_zeros((len(batches), B, T, batches[0][0].shape[2]), dtype=torch.float32)
    mask_out = torch.zeros((len(batches), B, T), dtype=torch.bool, device=x_out.device)
    mask_out[:, :, 0] = True
    for m, (x, mask) in enumerate(batches):
        x_out[m, : x.shape[0], : x.shape[1]] = x
        mask_out[m, : x.shape[0], : x.shape[1]] = mask
    return x_out, mask_out


class Stack:
    """The live members' parameters stacked (M, ...), their AdamW, and the batched forward."""

    def __init__(self, models: list[Head], config: TrainConfig, device: torch.device, dtype: torch.dtype):
        params, _ = stack_module_state(models)  # leaves (M, ...), requires_grad
        self.params = {f"head.{k}": v for k, v in params.items()}
        # The module functional_call runs with each member's parameters: a copy of member 0
        # (copied, not built, so that no random number is drawn; only its structure and its
        # training flag matter).
        self.base = LogitsOf(copy.deepcopy(models[0]))
        self.config, self.device, self.dtype = config, device, dtype
        self.optimizer = self._adamw()

    def _adamw(self):
        """AdamW over the stacked parameters, grouped as a lone head's (fitting.param_groups)."""
        return torch.optim.AdamW(param_groups(self.params.items(), self.config), lr=self.config.lr,
                                 weight_decay=self.config.weight_decay, fused=self.device.type in ("cpu", "cuda"))

    def logits(self, z: torch.Tensor, mask: torch.Tensor, shared: bool = False) -> torch.Tensor:
        """(M, B, n_classes) float32 logits of every member: z (M, B, T, width), mask (M, B, T),
        or with shared=True one batch z (B, T, width), mask (B, T) that every member reads."""
        def one(params, z, mask):
            return functional_call(self.base, params, (z, mask))

        in_dims = (0, None, None) if shared else (0, 0, 0)
        with torch.autocast(self.device.type, dtype=self.dtype, enabled=self.dtype != torch.float32):
            return vmap(one, in_dims=in_dims, randomness="different")(self.params, z, mask).float()

    def member_state(self, i: int) -> dict:
        """Member i's parameters (a state dict without buffers), detached copies."""
        return {k.removeprefix("head."): v[i].detach().clone() for k, v in self.params.items()}

    def keep(self, rows: list[int]) -> None:
        """Keep only the members at `rows` of the stack, with their AdamW state."""
        index = torch.tensor(rows, device=self.device)
        old = list(self.params.values())
        self.params = {k: v.detach()[index].clone().requires_grad_() for k, v in self.params.items()}
        optimizer = self._adamw()
        for before, after in zip(old, self.params.values()):
            optimizer.state[after] = {
                name: (s[index].clone() if torch.is_tensor(s) and s.dim() > 0 and s.shape[0] == before.shape[0] else s)
                for name, s in self.optimizer.state.get(before, {}).items()}
        self.optimizer = optimizer


def fit_stacked(cls: type[Head], data: LayerData, y: np.ndarray, train: np.ndarray, select,
                config: TrainConfig, n_classes: int, seeds: list[int], device: torch.device,
                choices: list[dict] | None = None, *,
                loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
                score: Callable[[np.ndarray, np.ndarray], float]) -> list[Fit]:
    """One Fit per seed, as fitting.fit_by_epochs gives for that seed (see the module
    docstring), the members trained as one stack. With choices (one {"epoch": e} per seed,
    and select None), member m trains epochs 0..e_m and keeps the last. Each Fit's seconds
    is the stack's time divided by the members. Raises NonFiniteLossError like fit_by_epochs."""
    t0 = time.perf_counter()
    options = options_for(cls, config, data.dim, n_classes, data.n_states)
    lasts = [config.epochs - 1] * len(seeds) if choices is None else [int(c["epoch"]) for c in choices]
    assert all(0 <= last < config.epochs for last in lasts), f"epochs {lasts} of a {config.epochs}-epoch schedule"
    assert (select is None) == (choices is not None), "give validation utterances or fixed choices"
    dtype = resolve_compute_dtype(config.compute_dtype, device)
    members = [Member(cls, options, data, y, train, config, seed, last, device) for seed, last in zip(seeds, lasts)]
    if choices is None:
        # The inputs' transform is each member's, fixed from the same training utterances: the same.
        select_batches, select_order = make_batches(data, y, select, EVAL_BATCH_SIZE, device,
                                                    transform=members[0].model.inputs)
    stack = Stack([m.model for m in members], config, device, dtype)
    live = list(members)  # the stack's rows, in order
    with fork_rng(device):
        torch.manual_seed(seeds[0])  # dropout and time masking of the whole stack
        for epoch in range(max(lasts) + 1):
            lr = get_lr(epoch, config)
            losses = train_stack_epoch(stack, live, loss, lr, config.time_mask)
            probs = None
            if choices is None:
                probs = predict(stack.base, select_batches, config.compat_eval_dropout,
                                lambda z, mask: stack.logits(z, mask, shared=True).transpose(0, 1))  # (n, M, C)
            for i, member in enumerate(live):
                if not math.isfinite(losses[i]):
                    raise NonFiniteLossError(
                        f"epoch {epoch}, ensemble member {members.index(member)}: the training loss is {losses[i]}; "
                        f"lower the learning rate (lr {lr:g} at this epoch, --lr {config.lr:g}) or check the "
                        "cache for NaN/inf frames")
                close(member, stack, i, epoch, lr, losses[i], config,
                      None if probs is None else (score(y[select_order], probs[:, i]), probs[:, i]))
            rows = [i for i, m in enumerate(live) if not m.done]
            if len(rows) < len(live):
                log.debug("epoch %d: members %s done", epoch,
                          [members.index(m) for i, m in enumerate(live) if i not in rows])
                live = [live[i] for i in rows]
                if not live:
                    break
                stack.keep(rows)
    seconds = (time.perf_counter() - t0) / len(members)
    fits = []
    for m in members:
        m.model.load_state_dict({**m.model.state_dict(), **m.best_state})
        fits.append(Fit(m.model.eval(), options, {"epoch": m.best_epoch, "ua": m.best_ua}, m.history, seconds,
                        str(dtype).removeprefix("torch."),
                        None if m.best_probs is None else in_order(m.best_probs, select_order, select)))
    return fits


def close(member: Member, stack: Stack, i: int, epoch: int, lr: float, train_loss: float, config: TrainConfig,
          validation: tuple[float, np.ndarray] | None) -> None:
    """End member (row i of the stack)'s epoch as fit_by_epochs ends one: record it, keep its
    state if validation (score, probs) is its best so far (ties keep the earlier epoch) or,
    without validation, at its fixed last epoch; mark it done at its last epoch or when its
    patience has run out."""
    entry = {"epoch": epoch, "lr": lr, "train_loss": train_loss}
    if validation is not None:
        entry["select_ua"], probs = validation
        if member.best_ua is None or entry["select_ua"] > member.best_ua:
            member.best_ua, member.best_epoch, member.best_probs = entry["select_ua"], epoch, probs
            member.best_state = stack.member_state(i)
    elif epoch == member.last:
        member.best_state = stack.member_state(i)
    member.history.append(entry)
    stopped = validation is not None and config.patience and epoch - member.best_epoch >= config.patience
    member.done = epoch == member.last or bool(stopped)


def train_stack_epoch(stack: Stack, live: list[Member], loss, lr: float, time_mask: float) -> list[float]:
    """One epoch of every live member (row i of the stack is live[i]): at step s, member i
    trains on its batch perm_i[s], perm_i drawn from its own Generator as
    fitting.train_epoch draws it. Returns each member's mean training loss per utterance."""
    set_lr(stack.optimizer, lr)
    stack.base.train()
    perms = [m.rng.permutation(len(m.batches)) for m in live]
    totals = [0.0] * len(live)
    counts = [0] * len(live)
    for s in range(len(perms[0])):
        batches, targets = [], []
        for m, perm in zip(live, perms):
            x, mask, yb = m.batches[perm[s]]
            x = x.float()
            if time_mask:
                x, mask = drop_spans(x, mask, time_mask)
            batches.append((x, mask))
            targets.append(yb)
        z, mask = pad_stack(batches)
        logits = stack.logits(z, mask)  # (M, B, C)
        losses = [loss(logits[i, : len(yb)], yb) for i, yb in enumerate(targets)]
        stack.optimizer.zero_grad(set_to_none=True)
        torch.stack(losses).sum().backward()  # each member's gradient is its own loss's
        stack.optimizer.step()
        for i, (value, yb) in enumerate(zip(losses, targets)):
            totals[i] = value.detach() * len(yb) + totals[i]
            counts[i] += len(yb)
    return [float(t) / c for t, c in zip(totals, counts)]


@dataclass
class Chosen:
    """What fitting on one split hands to its single test: the head (a heads.Ensemble for
    config.ensemble > 1), the choice made on validation with its validation score
    (`selected`: UA "ua", or mean CCC "ccc"), each ensemble member's own (`members`: seed,
    choice, score, history; empty for one head), and, after `refit_selected`, how the head
    was retrained (`refit`: n_train, val_ua or val_ccc, seconds; empty when not refit)."""

    model: Head
    selected: dict
    history: list
    seconds: float
    compute_dtype: str = "float32"
    refit: dict = field(default_factory=dict)
    members: list = field(default_factory=list)

    @property
    def tested(self) -> str:
        """Which head is tested: "selected" (as chosen on validation) or "refit"."""
        return "refit" if self.refit else "selected"


def fit_selected(name: str, data: LayerData, y: np.ndarray, train, select, config: TrainConfig,
                 task: Task | int, seed: int, device: torch.device) -> Chosen:
    """Head `name` fitted on `train` with its epoch (or C) chosen on `select`.

    config.ensemble = N > 1: N members seeded member_seed(seed, m), each choosing its own
    epoch (or C) on `select`, as one heads.Ensemble. Its selected["ua"] (or "ccc") is the
    validation score of the members' mean probabilities (or values), what a sweep compares
    settings by, and selected[key] the median (lower middle) of their choices, for tables;
    each member's is in `members`. (The linear probe's fit does not depend on the seed: its
    members are alike.)
    """
    task = as_task(task)
    fits = fit_members(name, data, y, train, select, config, task, seed, device)
    seconds = sum(f.seconds for f in fits)
    if len(fits) == 1:
        fit = fits[0]
        return Chosen(fit.model, fit.selected, fit.history, seconds, fit.compute_dtype)
    key = head_class(name).selects
    members = [{"seed": member_seed(seed, m), **f.selected, "history": f.history} for m, f in enumerate(fits)]
    score = task.score(y[select], np.mean([f.select_probs for f in fits], axis=0))
    selected = {key: statistics.median_low(f.selected[key] for f in fits), task.score_name: score}
    return Chosen(one_head([f.model for f in fits]), selected, [], seconds, fits[0].compute_dtype, members=members)


def fit_members(name: str, data: LayerData, y: np.ndarray, train, select, config: TrainConfig,
                task: Task, seed: int, device: torch.device, fixed: list[dict] | None = None) -> list[Fit]:
    """The fits of config.ensemble members seeded member_seed(seed, m) (or of one per choice
    in `fixed`, then select is None): one after another, or as one stacked model when
    `stacks` says so (the same heads, see the module docstring; classification only for now:
    a regression ensemble trains its members one after another)."""
    fixed = fixed or [None] * config.ensemble
    seeds = [member_seed(seed, m) for m in range(len(fixed))]
    # Stacked members hold their batches in memory (make_batches): not for a streamed layer.
    if (len(seeds) > 1 and isinstance(task, Classification) and isinstance(data, LayerData)
            and stacks(head_class(name), config, device)):
        return fit_stacked(head_class(name), data, y, np.asarray(train), select, config, task.n_outputs, seeds,
                           device, None if select is not None else fixed,
                           loss=task.loss(config, y[np.asarray(train)], device), score=task.score)
    return [fit_head(name, data, y, train, select, config, task, s, device, fixed=f)
            for s, f in zip(seeds, fixed)]


def choice_of(selected: dict, task: Task) -> dict:
    """What a fit chose on validation ({"epoch": e}, {"C": c}, the fusion's {"C": c, "weights":
    [...]}) from its `selected` record or an ensemble member's: without the score it was chosen
    by, or the member's seed and history."""
    return {k: v for k, v in selected.items() if k not in (task.score_name, "seed", "history")}


def refit_selected(chosen: Chosen, name: str, data: LayerData, y: np.ndarray, train, select,
                   config: TrainConfig, task: Task | int, seed: int, device: torch.device) -> Chosen:
    """`chosen` retrained from scratch on train + select with the choice made on select and
    the same seed (an ensemble: every member with its own choice and seed). Its score on
    `select` is recorded as refit["val_ua"] (or "val_ccc"): those utterances were trained on,
    so it measures fit, not generalisation (selected["ua"] stays the honest one)."""
    task = as_task(task)
    both = np.sort(np.concatenate([np.asarray(train), np.asarray(select)]))
    choices = [choice_of(m, task) for m in chosen.members] or [choice_of(chosen.selected, task)]
    fits = fit_members(name, data, y, both, None, config, task, seed, device, choices)
    model = one_head([f.model for f in fits])
    seconds = sum(f.seconds for f in fits)
    refit = {"n_train": len(both),
             f"val_{task.score_name}": task.score(y[select], predict_proba(model, data, select, device)),
             "seconds": seconds}
    return dataclasses.replace(chosen, model=model, seconds=chosen.seconds + seconds, refit=refit)
