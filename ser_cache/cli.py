"""The `ser-cache` command line: one click group, thin commands.

Each command's docstring is its help. The work lives in the modules named after each stage;
a command only turns options into a call. Failures become messages in one place (`Commands`):
the project's errors for bad input (errors.UserError) and the system's (OSError: a disk, a
permission) print as one line with exit status 1; Ctrl-C says what was kept; anything else is
a bug and keeps its traceback.
"""
from __future__ import annotations

import hashlib
import json
import signal
from contextlib import nullcontext
from concurrent.futures.process import BrokenProcessPool
from pathlib import Path

import click

from .audio import LONG_AUDIO_POLICIES
from .cache import COMPUTE_DTYPES, DTYPES, SHARD_DIR, ShardClaims, open_cache, shard_name
from .storage import STORES
from .corpora import CORPORA, prepare, single_speaker_warnings, source_text
from .device import pick_device
from .encoder import FAMILY_LABELS, MODES
from .errors import UserError
from .records import Utterance
from .storage import describe_estimate


def limit_records(records: list[Utterance], limit: int | None) -> list[Utterance]:
    """A fixed pseudo-random subset of `limit` records (by a hash of the id), or all of them."""
    if not limit or limit >= len(records):
        return records
    return sorted(records, key=lambda r: hashlib.sha1(r.id.encode()).hexdigest())[:limit]


USER_ERRORS = (UserError, OSError)
# Extra passes an extract job makes over shards of its part that a job that died after its last
# look left unwritten; more would mean jobs dying over and over, which a re-run is for.
TAKEOVER_ROUNDS = 3
# What a command keeps when Ctrl-C stops it (commands that resume when re-run).
KEPT_ON_INTERRUPT = {"extract": "every shard written so far is complete",
                     "train": "every finished fold is saved", "sweep": "every finished fold is saved"}


class Commands(click.Group):
    """The group that turns the commands' failures into messages (see the module docstring)."""

    def invoke(self, ctx):
        # A scheduler's time limit or `kill` sends SIGTERM: stop as Ctrl-C does, so that the
        # commands that resume keep what is finished and stop their workers.
        signal.signal(signal.SIGTERM, _interrupt)
        try:
            return super().invoke(ctx)
        except USER_ERRORS as e:
            raise click.ClickException(str(e)) from None
        except BrokenProcessPool as e:
            raise click.ClickException(f"a worker process died ({e}), e.g. out of memory: re-run with fewer "
                                       "--jobs to resume") from None
        except KeyboardInterrupt:
            kept = KEPT_ON_INTERRUPT.get(ctx.invoked_subcommand)
            if kept is None:
                raise
            raise click.ClickException(f"interrupted; {kept}. Re-run the same command to resume") from None


def _interrupt(signum, frame):
    raise KeyboardInterrupt


@click.group(cls=Commands, context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.version_option(package_name="ser-cache")
def main():
    """Speech emotion recognition on cached speech-encoder layers (Whisper, WavLM, HuBERT, wav2vec2, data2vec).

    Extract every encoder layer once (`extract`), then train and compare pooling heads on
    any layer as often as you like (`train`, `sweep`, `report`).
    """


def options(*declared):
    """One decorator for several click options, shown by --help in the order given: options
    that several commands share are declared once, with one help text true for each."""
    def apply(command):
        for option in reversed(declared):
            command = option(command)
        return command
    return apply


# --- stage 1: corpus -> cache -------------------------------------------------------------


def corpus_options(required: bool):
    """The options that say how to read DATA_DIR (extract, check-corpus); --corpus `required`."""
    return options(
        click.option("--corpus", type=click.Choice(sorted(CORPORA)), required=required, help="How DATA_DIR is laid out and labelled."),
        click.option("--label-map", default=None, help="Named label map (iemocap4, shemo4, ...) or none; default: the corpus's own."),
        click.option("--csv", "csv_path", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="With --corpus csv: the manifest, a CSV (path,label,speaker[,id][,group][,targets]) or JSON Lines when it ends in .jsonl; default DATA_DIR itself when it is a file, else DATA_DIR/utterances.csv."),
        click.option("--audio-root", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="With --corpus csv or emobox: the folder the manifest's relative paths start from (csv: ids are paths under it; emobox: where EmoBox's wav paths such as downloads/... start). After moving the corpus, point it at the new place to resume the cache. Default: the manifest's folder."),
        click.option("--columns", default=None, help="With --corpus csv or hf: the manifest's (or dataset's) columns for the fields path (hf: the audio column, default the one of feature Audio), label, speaker, id, group, e.g. path=file,label=emotion,speaker=spk_id; a field not named is read from the column of its own name."),
        click.option("--speaker-pattern", default=None, help="With --corpus emobox: a regular expression with one group that captures the speaker from each file name (without extension), e.g. '^([A-Za-z]+\\d+)_'. Default: the dataset's own rule (ravdess, emodb, shemo, iemocap, urdu)."),
    )


def refuse_data_file(data_dir: Path, corpus: str, csv_path: Path | None) -> None:
    """BadParameter for a DATA_DIR that is a file where --corpus reads a folder, or is the CSV
    while --csv names one too."""
    if data_dir.is_file() and corpus not in ("csv", "emobox", "hf"):
        raise click.BadParameter(f"{data_dir} is a file, but --corpus {corpus} reads a corpus folder: pass the "
                                 "folder, or --corpus csv if the file is a CSV or JSONL manifest of the corpus", param_hint="DATA_DIR")
    if data_dir.is_file() and csv_path is not None:
        raise click.BadParameter(f"DATA_DIR {data_dir} is already the CSV: drop --csv {csv_path}, or pass the "
                                 "corpus folder as DATA_DIR", param_hint="DATA_DIR")


@main.command()
@click.argument("data_dir", type=click.Path(path_type=Path))
@corpus_options(required=True)
@click.option("--model", "model", required=True, help="Whisper model name (tiny, base, small, ...) or checkpoint path; or a transformers model (Whisper, WavLM, HuBERT, wav2vec2, data2vec-audio): a folder with config.json and weights, a hub id such as microsoft/wavlm-large, or a short name such as wavlm-large (docs/encoders.md).")
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="Cache folder (created, or resumed if it holds a cache with the same settings).")
@click.option("--mode", type=click.Choice(MODES), default=None, help="Whisper: padded: 30 s window, 1500 frames kept; trim: 30 s window, speech frames kept; short: only speech frames encoded (fastest). Default: trim for Whisper; short, the only mode, for waveform encoders (WavLM, HuBERT, wav2vec2, data2vec-audio).")
@click.option("--layers", default="all", help="States to keep: all, 6, 0,3,6 or 2-5 (0 = input embedding, last = after ln_post).")
@click.option("--dtype", type=click.Choice(DTYPES), default="float16", help="Storage precision of the states.")
@click.option("--compute-dtype", type=click.Choice(COMPUTE_DTYPES), default="float32", help="Encoder arithmetic; bfloat16 is faster on CPUs with AMX/AVX512-BF16 and on GPUs, and changes the states slightly.")
@click.option("--batch-size", type=click.IntRange(1), default=8, help="Utterances per encoder forward.")
@click.option("--shard", "shard_spec", default=None, help="I/N: extract only the I-th of N disjoint parts (I from 0). Default: in a SLURM array task, the task's part (SLURM_ARRAY_TASK_ID of SLURM_ARRAY_TASK_COUNT), else everything.")
@click.option("--limit", type=click.IntRange(1), default=None, help="Use only N utterances (a fixed pseudo-random subset, for quick trials).")
@click.option("--long-audio", type=click.Choice(LONG_AUDIO_POLICIES), default="refuse", help="Utterances over 30 s: refuse (skip, recorded), truncate to 30 s, or encode as consecutive 30 s windows.")
@click.option("--strict", is_flag=True, help="Fail on the first file that cannot be used, instead of skipping and recording it.")
@click.option("--repair", is_flag=True, help="Check every existing shard byte for byte first and re-create the damaged ones.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
@click.option("--workers", type=click.IntRange(1), default=2, help="Threads that read and prepare audio while the encoder runs.")
@click.option("--shard-mb", type=click.FloatRange(0, 2**20, min_open=True), default=256.0, help="Advanced: target shard size in MiB of a frames cache (pooled and statistics caches plan the same utterances per shard, in smaller files). Smaller shards lose less work to a crash and make --repair cheaper, at the cost of more files; part of the cache settings, so a resume must pass the same value.")
@click.option("--frame-pool", type=click.IntRange(1), default=1, show_default=True, help="Store the mean of every K consecutive 20 ms frames (a last, partial group: the mean of what it holds): a cache K times smaller. Train may pool further by multiples of K.")
@click.option("--store", type=click.Choice(STORES), default="frames", show_default=True, help="frames: every (pooled) frame; stats: per utterance and state only the mean and std of every value (float32), what the linear probe reads, about 1/50 of a frames cache.")
@click.option("--augment", multiple=True, help="Also store augmented views of every utterance, each a record of its own tied to its source (same speaker, label, folds): speed=F[,F...] (speed perturbation by resampling, tempo and pitch together; e.g. speed=0.9,1.1) or noise=SNR_DB[,SNR_DB...] (white Gaussian noise at that SNR, seeded per utterance and view). Repeat for both. Part of the cache settings.")
@click.option("--augment-seed", type=int, default=0, help="Seed of the noise views (with the utterance and view); part of the cache settings.")
@click.option("--dry-run", is_flag=True, help="Print how many bytes the cache will take, then stop before encoding.")
def extract(data_dir, corpus, model, out, mode, layers, dtype, compute_dtype, batch_size, shard_spec, limit, label_map, csv_path,
            audio_root, columns, speaker_pattern, long_audio, strict, repair, device, workers, shard_mb, frame_pool, store, augment,
            augment_seed, dry_run):
    """Encode a corpus with Whisper (or another speech encoder) once and cache every kept encoder state.

    DATA_DIR is the corpus folder, or with --corpus csv also the manifest itself (a CSV or
    .jsonl file; its relative audio paths start from --audio-root, default its folder; see
    docs/corpora.md); with --corpus emobox EmoBox's data/<dataset> folder or its
    <dataset>.jsonl; with --corpus hf a Hugging Face audio dataset: a save_to_disk folder, a
    .parquet or .arrow file or a folder of them, or a hub id. Re-running the same command
    resumes an interrupted extraction.
    """
    from .augment import parse_augment, with_views
    from .encoder import load_encoder
    from .extract import ExtractOptions, extract as run_extract, final_state, parse_layers, parse_shard, summary_text

    refuse_data_file(data_dir, corpus, csv_path)
    shard = parse_shard(shard_spec)
    views = parse_augment(augment)
    prepared = prepare(corpus, data_dir, label_map=label_map, csv_path=csv_path, audio_root=audio_root, columns=columns,
                       speaker_pattern=speaker_pattern)
    records = limit_records(prepared.records, limit)
    click.echo(prepared.summary())
    if limit:
        click.echo(f"--limit {limit}: using {len(records)} of {len(prepared.records)} utterances")
        shown = set(single_speaker_warnings(prepared.records))  # the summary's, for the whole corpus
        for line in single_speaker_warnings(records):
            if line not in shown:  # labels that the subset left with one speaker
                click.echo(line)
    dev = pick_device(device)
    enc = load_encoder(model, device=dev)
    mode = mode or ("short" if enc.waveform else "trim")
    opts = ExtractOptions(mode=mode, layers=parse_layers(layers, enc.n_states), dtype=dtype, compute_dtype=compute_dtype, batch_size=batch_size,
                          shard=shard, long_audio=long_audio, strict=strict, repair=repair, workers=workers,
                          shard_bytes=int(shard_mb * 2**20), frame_pool=frame_pool, store=store, augment=views,
                          augment_seed=augment_seed)
    click.echo(f"model {enc.name} ({enc.family}, sha256 {enc.sha256[:12]}, {enc.n_states} states of width {enc.dim}) on {dev}")
    planned = with_views(records, views)
    estimate = describe_estimate(len(opts.layers), enc.dim, seconds=sum(r.duration for r in planned),
                                 utterances=len(planned), store=store, frame_pool=frame_pool, dtype=dtype, mode=mode)
    if views:
        click.echo(f"augmented views: {', '.join(views)} of every utterance ({len(planned) - len(records)} views)")
    click.echo(f"cache size: {estimate}")
    if dry_run:
        return
    summary = run_extract(records, out, corpus, enc, opts, device=dev, source=prepared.source)
    click.echo(summary_text(summary))
    if summary.shards_this_job == 0:  # more parts than shards: this job had nothing to do
        click.echo(f"part {shard[0]}/{shard[1]} holds none of the {summary.shards_planned} planned shards: for "
                   "N parts, pick a --shard-mb that plans at least N shards")
    cache = open_cache(out)
    # Other jobs may share this folder: the state is read now, claims included, and the exit
    # status is 0 only if this job's own part is complete or in the hands of a live job.
    state, own_part_done = final_state(cache, shard)
    for _ in range(TAKEOVER_ROUNDS):
        if own_part_done:
            break
        # A job that held shards of this part died after this job's last look (its claims went
        # with it), leaving them unwritten: take them over, as a pass does with those it sees.
        click.echo(f"cache {out}: {state}: a job that held them has ended; taking them over")
        click.echo(summary_text(run_extract(records, out, corpus, enc, opts, device=dev, source=prepared.source)))
        cache = open_cache(out)
        state, own_part_done = final_state(cache, shard)
    skipped = len(cache.skipped())  # this run's and earlier runs' (a resumed run shows only its own above)
    line = f"cache {out}: {state}; {skipped} skipped" + (f" (`ser-cache inspect {out}` lists them)" if skipped else "")
    if not own_part_done:
        raise click.ClickException(line)
    click.echo(line)


@main.command()
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
def inspect(cache_dir, as_json):
    """Show what a cache holds: model, mode, layers, counts, where the corpus came from (its
    folder, manifest or dataset, audio root, --columns), skipped utterances."""
    info = open_cache(cache_dir).summary()
    if as_json:
        click.echo(json.dumps(info, indent=1, ensure_ascii=False))
        return
    click.echo(f"cache {info['path']}  ({'complete' if info['complete'] else 'INCOMPLETE'})")
    click.echo(f"  corpus {info['corpus']}, model {info['model']} ({info['family']}, sha256 {info['model_sha256'][:12]}), width {info['dim']}")
    click.echo(f"  mode {info['mode']}, dtype {info['dtype']}, layers {info['layers']}")
    rows = "frames" if info["frame_pool"] == 1 else f"frames pooled by {info['frame_pool']} ({20 * info['frame_pool']} ms)"
    if info["store"] == "stats":
        rows = "statistics (mean, std per utterance, float32) of " + rows
    click.echo(f"  stores {rows}")
    click.echo(f"  utterances {info['utterances']} of {info['records']} records, {info['frames']} rows, {info['bytes'] / 2**20:.1f} MiB")
    if info.get("augment"):
        views = sum(info["views"].values())
        click.echo(f"  of them {views} augmented views (seed {info['augment_seed']}): "
                   + ", ".join(f"{name} {n}" for name, n in info["views"].items()))
    click.echo("  classes " + ", ".join(f"{c} {n}" for c, n in info["class_counts"].items())
               + (f"; targets {', '.join(info['targets'])} (train --targets)" if info["targets"] else ""))
    # A partial cache may be filling now (an array job): say how many missing shards are claimed.
    claims = ShardClaims(Path(cache_dir) / SHARD_DIR)
    writing = sum(claims.held_elsewhere(k) for k in info["missing_shards"])
    click.echo(f"  shards {info['shards']} of {info['shards_planned']}"
               + (f", missing {info['missing_shards'][:10]}" if info["missing_shards"] else "")
               + (f" ({writing} being written by running jobs)" if writing else ""))
    for line in source_text(info["provenance"].get("corpus_source", {})):
        click.echo(f"  {line}")
    click.echo(f"  skipped {len(info['skipped'])}")
    for s in info["skipped"]:
        click.echo(f"    {s['id']}: {s['reason']}  [{s['path']}]")
    if info["notes"]:
        click.echo(f"  notes {len(info['notes'])}")
        for n in info["notes"][:20]:
            click.echo(f"    {n['id']}: {n['note']}")


@main.command()
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), required=True, help="The new cache's folder (created, or finished if an earlier derive into it stopped).")
@click.option("--frame-pool", type=click.IntRange(1), default=None, help="Frames of the new cache: the mean of every K encoder frames, K a multiple of the source's. Default: the source's.")
@click.option("--stats", is_flag=True, help="Keep only each utterance's mean and std of every value (float32), over its frames pooled by --frame-pool.")
def derive(cache_dir, out, frame_pool, stats):
    """Make a pooled or statistics cache from a frames cache, without the encoder.

    The new cache keeps the source's records, skipped utterances and notes, and records the
    source in its provenance. Re-running the same command finishes an interrupted derive.
    """
    from .derive import derive as run_derive

    new, written = run_derive(cache_dir, out, frame_pool=frame_pool, stats=stats)
    info, before = new.summary(), open_cache(cache_dir).summary()
    click.echo(f"cache {out}: {written} shards written, {info['shards']} of {info['shards_planned']} complete; "
               f"{info['bytes'] / 2**20:.1f} MiB, {before['bytes'] / max(info['bytes'], 1):.1f}x smaller than {cache_dir}")


@main.command()
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def verify(cache_dir):
    """Check every shard against the SHA-256 recorded when it was written, plus structure and counts.

    Exits non-zero and names every damaged or missing shard.
    """
    cache = open_cache(cache_dir)
    problems = cache.verify()
    for k, why in problems.items():
        click.echo(f"{shard_name(k)}: {why}")
    if problems:
        raise click.ClickException(
            f"{len(problems)} of {len(cache.plan)} shards damaged or missing; re-create them with the same "
            "`ser-cache extract ... --repair` command"
        )
    click.echo(f"all {len(cache.plan)} shards verified ({cache.summary()['utterances']} utterances)")


# --- stage 2: cache -> heads, metrics ------------------------------------------------------

from . import config as _config  # noqa: E402
from . import training as _training  # noqa: E402
from .folds import PROTOCOLS as _FOLD_PROTOCOLS  # noqa: E402
from .heads import HEADS as _HEADS  # noqa: E402
from .tasks import LOSSES as _LOSSES, TASKS as _TASKS  # noqa: E402

_TRAIN = _config.TrainConfig()  # the defaults shown in --help

# The options of `train` and `sweep` alike, in three groups; each command adds its own.
FOLD_OPTIONS = options(  # which utterances train, validate and test
    click.option("--protocol", type=click.Choice(_FOLD_PROTOCOLS), default=None, help="Folds: loso (one per group), kfold (speaker-independent, stratified), file, or split (the official train/development/test groups); default: file with --fold-file or --folds-from, split when the groups are split names, loso when the corpus has other groups, else kfold."),
    click.option("--folds", "n_folds", type=click.IntRange(2), default=None, help="Number of kfold folds; default per corpus (RAVDESS 6, ShEMO 10, EmoDB and others 5)."),
    click.option("--fold-file", type=click.Path(exists=True, dir_okay=False, path_type=Path), default=None, help="CSV id,fold (0-based) with your own folds (protocol file); every utterance listed once."),
    click.option("--folds-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="EmoBox's data/<dataset> folder: its fold_K/<dataset>_{train,test}_fold_K.jsonl are the folds (fold_K is fold K-1; validation still carved from each fold's training speakers). Every cache must be extracted with --corpus emobox (ids = keys)."),
    click.option("--compat-speaker-overlap", is_flag=True, help="FLAWED (speaker-dependent), to compare with results published on such folds only: run fold files (--fold-file, --folds-from) that test speakers they also train on, refused otherwise. The results say FLAWED (a sweep's report, plots and results.csv too), and compare never pairs them with honest results."),
    click.option("--label-map", default=None, help="Rename the classes of every cache, --test-cache's too, with a named label map (e.g. ravdess-emodb6) before the folds are made; utterances of classes it does not list are dropped and counted."),
    click.option("--test-cache", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="Cross-corpus: also test every fold's chosen head once on all of this cache (another corpus, same checkpoint, mode and layers); its metrics go beside the in-corpus ones (train: printed and saved in cross_corpus.json; sweep: in the report)."),
)
TRAINING_OPTIONS = options(  # what the heads learn and how long
    click.option("--task", type=click.Choice(_TASKS), default=None, help="What the head learns: the class labels, or continuous targets (regression; implied by --targets). Default: classification."),
    click.option("--targets", default=None, help="Regression: the numeric targets to learn, comma-separated (e.g. arousal,valence). Default with --task regression: every target the cache's records carry (a sweep: the first cache's)."),
    click.option("--loss", type=click.Choice(_LOSSES), default=_TRAIN.loss, help="Regression loss: ccc (1 - CCC, mean over targets) or mse (on standardised targets). The epoch (or C, or a sweep's grid setting) is always chosen on validation mean CCC."),
    click.option("--epochs", type=click.IntRange(1), default=_TRAIN.epochs, help="Epochs per fold; the epoch kept is the one with the best validation score (UA; regression: mean CCC)."),
    click.option("--patience", type=click.IntRange(0), default=_TRAIN.patience, help="Stop a fold after this many epochs without a better validation score (the lr schedule stays --epochs long); 0 trains every epoch."),
    click.option("--compute-dtype", "compute_dtype", type=click.Choice(_config.COMPUTE_DTYPES), default=_TRAIN.compute_dtype, help="Arithmetic of the training steps: bfloat16 (float32 master weights and loss), float32 (exact comparisons), or auto: the faster of the two, measured on this machine at start-up."),
    click.option("--time-mask", type=click.FloatRange(0, 1, max_open=True), default=_TRAIN.time_mask, help="Training only: drop about this fraction of each utterance's frames, in 200 ms spans at random places (0: off). A sweep can choose it on validation instead: --grid time_mask=0,0.1,0.2."),
    click.option("--frame-pool", type=click.IntRange(1), default=None, help="Average every K consecutive 20 ms frames before the head reads them (K a multiple of the cache's own; a last, partial group is the mean of what it holds). A sweep can choose it on validation instead: --grid frame_pool=1,2,4. Default: the frames as the cache stores them."),
    click.option("--refit", is_flag=True, help="After the epoch (or C, and a sweep's grid setting) is chosen on the validation speakers, retrain on training + validation speakers with that choice and the same seed; that head is tested."),
    click.option("--linear-c", "linear_c", default=",".join(f"{c:g}" for c in _TRAIN.linear_c), help="The linear head's C grid (inverse regularisation; ridge alpha = 1/(2C) for regression), comma-separated, chosen on validation."),
    click.option("--ensemble", type=click.IntRange(1), default=_TRAIN.ensemble, help="Heads per fold, each with its own seed and epoch chosen on validation; the fold's probabilities are their mean (a sweep compares its grid settings by the ensemble's validation score); a train run saves every member, and export keeps them all."),
    click.option("--stack-members", type=click.Choice(_config.STACK_MODES), default=_TRAIN.stack_members, help="Train the ensemble's members together as one stacked model (mean, attentive, qkv; each member as it trains alone, with its own dropout draws): on, off, or auto (on CUDA only; on a CPU it was measured slower)."),
    click.option("--mix", type=click.Choice(_config.MIX_MODES), default=_TRAIN.mix, help="Several states (mean, attentive, qkv, cta): learn a softmax weight per state, or keep equal weights (the ablation). No effect on one state, or on the linear, stats and fusion heads. A sweep can choose it on validation: --grid mix=learned,equal."),
    click.option("--fusion-weights", type=click.Choice(_config.FUSION_WEIGHTS), default=_TRAIN.fusion_weights, help="The fusion head's weights over its per-state probes: equal, or validation (those that best predict the validation speakers' labels; they overfit a fold's few validation speakers, docs/findings.md). A sweep can choose it on validation: --grid fusion_weights=equal,validation."),
    click.option("--mix-lr", type=click.FloatRange(0, min_open=True), default=None, help="Peak learning rate of a learned mix's weights (their softmax logits; no weight decay), on the schedule of --lr. A sweep can choose it on validation: --grid mix_lr=none,0.01,0.1. Default: --lr, with the head's weight decay (the weights then stay close to equal)."),
    click.option("--views", type=click.Choice(_config.VIEWS_MODES), default=_TRAIN.views, help="With a cache extracted with --augment: on also trains on the augmented views of each fold's training utterances (validation and test hold originals only); off ignores them. A sweep can choose it on validation: --grid views=off,on."),
)
MACHINE_OPTIONS = options(  # where it runs, not what it computes
    click.option("--device", default=_TRAIN.device, help="auto, cpu, cuda or cuda:N."),
    click.option("--memory-budget", default=None, help="Memory the layer may take, e.g. 2G or 500M (powers of 1024; a sweep: its layers and batches, all workers together, each an equal share); a layer that does not fit is streamed from the cache's shards, a few at a time, in a batch order drawn per block of shards. Default: half of the memory available."),
)


@main.command("train")
@click.argument("cache_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--layer", required=True, help="Encoder state to train on: 4 (0 = input embedding, last = after ln_post; see `ser-cache inspect`), or several for one multi-layer head that learns a softmax weight per state: all, a range 2-5, a list 2,4,6 or 2+4+6.")
@click.option("--head", type=click.Choice(sorted(_HEADS)), required=True, help="Pooling head: linear (mean+std, logistic regression), mean, attentive, qkv, cta (channel and frame gates, BiLSTM, attentive pooling), stats (the probe's mean+std and attentive means, one trained linear layer), or fusion (one probe per state, their probabilities weighed on validation).")
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Run folder: config.json, metrics.json, predictions.csv, folds.csv and one head file per fold.")
@FOLD_OPTIONS
@TRAINING_OPTIONS
@click.option("--seed", type=int, default=_TRAIN.seed, help="Fixes the folds' validation split, initialisation, batch order and dropout.")
@click.option("--batch-size", type=click.IntRange(1), default=_TRAIN.batch_size, help="Training batch size.")
@click.option("--lr", type=click.FloatRange(0, min_open=True), default=_TRAIN.lr, help="Peak AdamW learning rate (warm-up, then cosine decay).")
@click.option("--dropout", type=click.FloatRange(0, 1, max_open=True), default=_TRAIN.dropout, help="Dropout of the attention projections (attentive, qkv).")
@click.option("--attn-heads", "n_heads", type=click.IntRange(0), default=_TRAIN.n_heads, help="Attention heads (attentive, qkv, cta, stats); 0, for stats only, leaves the probe's mean and std.")
@click.option("--heads", "old_heads", type=click.IntRange(0), default=None, hidden=True, help="The old spelling of --attn-heads, kept for a release.")
@click.option("--head-dim", type=click.IntRange(1), default=_TRAIN.head_dim, help="Size of each attention head: d_a (attentive) or d_k (qkv).")
@click.option("--class-weights/--no-class-weights", default=_TRAIN.class_weights, help="Weight the cross-entropy by inverse class frequency of each fold's training split.")
@click.option("--standardize/--no-standardize", default=_TRAIN.standardize, help="Standardise input frames with the training speakers' per-dimension mean and std (same heads, better conditioned; --no-standardize trains on raw states as the reference code does).")
@click.option("--compat-select-on-test", is_flag=True, help="FLAWED, to compare with the reference code only: no validation split, the epoch (or C) is chosen on the test fold.")
@click.option("--compat-eval-dropout", is_flag=True, help="FLAWED, to compare with the reference code only: dropout stays on at evaluation.")
@MACHINE_OPTIONS
@click.option("--overwrite", is_flag=True, help="Start --out afresh, replacing a finished run or an unfinished one with other settings (an unfinished one with the same settings resumes without it).")
def train_cmd(cache_dir, layer, head, out, protocol, n_folds, fold_file, folds_from, compat_speaker_overlap, label_map,
              test_cache, task, targets, loss, epochs, patience, compute_dtype, time_mask, frame_pool, refit, linear_c,
              ensemble, stack_members, mix, mix_lr, fusion_weights, views, seed, batch_size, lr, dropout, n_heads, old_heads, head_dim, class_weights,
              standardize, compat_select_on_test, compat_eval_dropout, device, memory_budget, overwrite):
    """Train a pooling head on one cached layer (or several), across speaker-independent folds.

    For each fold the epoch is chosen on validation speakers carved from the training
    speakers, then the test speakers are evaluated once. Prints a table per fold with the
    mean and std of UA, WA and F1, and writes everything into --out. On several layers, the
    pooling heads mix the states with learned softmax weights (printed per fold) and the
    linear head reads the statistics of every state. With --task regression (or --targets),
    the head learns continuous targets, the epoch is chosen on validation mean CCC, and the
    table gives CCC, Pearson r and MAE per target.

    Cross-corpus: --test-cache B scores each fold's head once on all of B (nothing is chosen
    on B) and prints B's metrics beside the in-corpus ones; --label-map brings both caches to
    the classes they share.
    """
    import logging

    logging.basicConfig(level=logging.INFO, format="%(message)s")
    n_heads = _attn_heads(n_heads, old_heads)
    task, targets = _task_options(task, targets)
    config = _config.TrainConfig.from_dict(dict(
        task=task, targets=targets, loss=loss,
        epochs=epochs, patience=patience, compute_dtype=compute_dtype, seed=seed, batch_size=batch_size, lr=lr,
        dropout=dropout, n_heads=n_heads,
        head_dim=head_dim, class_weights=class_weights, standardize=standardize, time_mask=time_mask,
        frame_pool=frame_pool or 0, refit=refit, ensemble=ensemble, stack_members=stack_members, linear_c=_c_grid(linear_c),
        mix=mix, mix_lr=mix_lr, fusion_weights=fusion_weights, views=views, device=device,
        compat_select_on_test=compat_select_on_test, compat_eval_dropout=compat_eval_dropout,
        compat_speaker_overlap=compat_speaker_overlap))
    from .streaming import parse_size

    budget = None if memory_budget is None else parse_size(memory_budget)
    result = _training.train_from_cache(cache_dir, layer, head, out, config, protocol=protocol,
                                        n_folds=n_folds, fold_file=fold_file, folds_from=folds_from, overwrite=overwrite,
                                        test_cache=test_cache, label_map=label_map, memory_budget=budget)
    click.echo(result.table())
    if result.cross_corpus is not None:
        click.echo(result.cross_corpus.table())
    click.echo(f"run saved in {out}")


def _attn_heads(n_heads: int, old_heads: int | None) -> int:
    """The attention-head count from --attn-heads or from --heads, its spelling before the
    rename, hidden and kept for a release (sweep's --heads is the list of heads); both given
    must agree."""
    if old_heads is None:
        return n_heads
    given = click.get_current_context().get_parameter_source("n_heads") != click.core.ParameterSource.DEFAULT
    if given and old_heads != n_heads:
        raise click.BadParameter(f"--heads {old_heads} and --attn-heads {n_heads} disagree: --heads is the old "
                                 "spelling of --attn-heads, give only --attn-heads", param_hint="--attn-heads")
    click.echo("note: train's --heads is now spelt --attn-heads; --heads will go in a later release", err=True)
    return old_heads


def _c_grid(text: str) -> tuple[float, ...]:
    """--linear-c '0.001,0.01,0.1' -> (0.001, 0.01, 0.1); positive numbers only."""
    try:
        grid = tuple(float(c) for c in text.split(",") if c.strip())
    except ValueError:
        grid = ()
    if not grid or min(grid) <= 0:
        raise click.BadParameter(f"{text!r}: give positive numbers separated by commas, e.g. 0.001,0.01,0.1,1",
                                 param_hint="--linear-c")
    return grid


def _task_options(task: str | None, targets: str | None) -> tuple[str, list[str]]:
    """(task, target names) from --task and --targets: targets imply regression."""
    names = [t.strip() for t in (targets or "").split(",") if t.strip()]
    if targets is not None and not names:
        raise click.BadParameter("give target names, e.g. --targets arousal,valence", param_hint="--targets")
    if names and task == "classification":
        raise click.BadParameter("targets are learned by regression: use --task regression, or drop --targets",
                                 param_hint="--targets")
    return ("regression" if names else task or "classification"), names


# --- layer-wise comparisons ----------------------------------------------------------------

@main.command("sweep")
@click.argument("caches", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="Sweep folder: results, table and plots (created, or resumed if it holds the same sweep).")
@click.option("--layers", default="all", help="Cells to compare in every cache, separated by commas: all (every state, each its own cell), 6, a range of single cells 2-5, or a multi-layer cell whose head learns a weight per state: 2+3+4, 0-3+6 or [2-5] (quote brackets). E.g. all,2+3+4+5.")
@click.option("--heads", default="linear,mean,attentive,qkv", help="Heads to compare, comma-separated.")
@click.option("--seeds", default="0", help="Seeds, comma-separated (e.g. 0,1,2); each seed builds its own folds and initialisations.")
@click.option("--grid", multiple=True, help="Hyperparameters searched on the validation speakers, e.g. 'attn_heads=4,8,12 head_dim=4,16,64' (quote it, or repeat --grid per key).")
@FOLD_OPTIONS
@TRAINING_OPTIONS
@MACHINE_OPTIONS
@click.option("--jobs", type=click.IntRange(1), default=None, help="Worker processes, each with cores/jobs torch threads; default: one per core (up to 8) on a CPU, measured faster than threads for these small heads; 1 on a GPU.")
@click.option("--part", "part_spec", default=None, help="I/N: run only the I-th of N parts of the folds to train (I from 0). Default: in a SLURM array task, the task's part, else every fold no other live process is running.")
def sweep_cmd(caches, out, layers, heads, seeds, grid, protocol, n_folds, fold_file, folds_from, compat_speaker_overlap,
              label_map, test_cache, task, targets, loss, epochs, patience, compute_dtype, time_mask, frame_pool, refit,
              linear_c, ensemble, stack_members, mix, mix_lr, fusion_weights, views, device, memory_budget, jobs, part_spec):
    """Compare heads on every layer of one or more caches, over the same folds.

    Each cell (cache, layer, head, seed) is trained and tested on every fold; grid settings are
    chosen on the validation speakers only. A multi-layer cell (--layers all,2+3+4) sits in the
    same table, and its learned layer weights go to layer_weights.png. Writes results.csv,
    summary.md and plots into --out. Re-running the same command resumes an interrupted sweep.
    Several processes (SLURM array tasks, --part I/N) may share one --out: each fold is run once.
    """
    from .slurm import resolve_part
    from .sweeping import SweepSpec, parse_grid, parse_heads, parse_seeds, run_sweep

    for c in caches:
        if not c.is_dir():
            hint = (" (a grid key? give each one its own --grid, or quote them together)"
                    if "=" in c.name else "")
            raise click.BadParameter(f"cache folder {c} not found{hint}", param_hint="CACHES")
    task, targets = _task_options(task, targets)
    spec = SweepSpec(caches=list(caches), layers=layers, heads=parse_heads(heads), seeds=parse_seeds(seeds),
                     grid=parse_grid(grid), train=_config.TrainConfig(epochs=epochs, patience=patience, compute_dtype=compute_dtype,
                                                                     time_mask=time_mask, frame_pool=frame_pool or 0,
                                                                     refit=refit, ensemble=ensemble,
                                                                     task=task, targets=targets, loss=loss,
                                                                     stack_members=stack_members, linear_c=_c_grid(linear_c),
                                                                     mix=mix, mix_lr=mix_lr, fusion_weights=fusion_weights, views=views,
                                                                     compat_speaker_overlap=compat_speaker_overlap),
                     protocol=protocol,
                     n_folds=n_folds, fold_file=fold_file, folds_from=folds_from, test_cache=test_cache, label_map=label_map)
    part = resolve_part(part_spec, "--part")
    from .streaming import parse_size

    budget = None if memory_budget is None else parse_size(memory_budget)
    outcome = run_sweep(spec, out, jobs=jobs, device=device, part=part, memory_budget=budget)
    t, state = outcome.timing, outcome.state
    if outcome.folds_done_before == outcome.folds_total:
        click.echo(f"all {outcome.folds_total} folds were already done; report rebuilt")
    else:
        click.echo(f"{outcome.folds_run} folds run, {outcome.folds_done_before} done before, of {outcome.folds_total} "
                   f"({t.jobs} job(s) x {t.threads_per_job} thread(s) on {t.device})"
                   + (f", part {part[0]}/{part[1]}" if part[1] > 1 else ""))
        click.echo(f"wall {t.wall_seconds:.0f} s: reading layers {t.read_seconds:.1f} s, training "
                   f"{t.train_seconds:.0f} s, evaluation {t.eval_seconds:.1f} s (training and evaluation summed over jobs)")
    if outcome.report:
        _echo_report(outcome.report)
    if compat_speaker_overlap:
        click.echo("FLAWED (speaker-dependent): --compat-speaker-overlap, the folds test speakers they also train on; "
                   "not an honest estimate")
    from .layers import label

    for cell, why in outcome.failures:
        click.echo(f"FAILED {cell.cache} layer {label(cell.layer)} {cell.head} seed {cell.seed} "
                   f"fold {cell.fold}: {why}", err=True)
    # Other processes may share this folder: the state is read after this process's last
    # cell fold, claims included; the exit status is 0 only if this process's part is done or in
    # the hands of a live process, and nothing failed.
    line = f"sweep {out}: {state.text()}"
    if outcome.failures:
        raise click.ClickException(f"{line}; {len(outcome.failures)} folds failed (listed above): re-run the same "
                                   "command to retry them")
    if not state.own_part_done:
        raise click.ClickException(line)
    click.echo(line)


@main.command("report")
@click.argument("sweeps", nargs=-1, required=True, type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None, help="Folder for the table and plots; default: the sweep folder itself (required with several sweeps).")
def report_cmd(sweeps, out):
    """Rebuild results.csv, summary.md and the plots from saved sweep results.

    With several sweeps (e.g. tiny.en vs base, or padded vs trim vs short), puts them side by
    side: one panel per sweep and cache.
    """
    from .report import load_sweep, progress_text, write_report
    from .results import SweepFolder

    if out is None:
        if len(sweeps) > 1:
            raise click.BadParameter("several sweeps need --out, the folder for the joint table and plots", param_hint="--out")
        out = sweeps[0]
    # A sweep may still be running: its processes write the report under the folder's lock.
    with SweepFolder(out).lock() if out.resolve() in [s.resolve() for s in sweeps] else nullcontext():
        paths = write_report(list(sweeps), out)
    _echo_report(paths)
    for s in sweeps:
        click.echo(progress_text(load_sweep(s)))


@main.command("compare")
@click.argument("results", nargs=-1, required=True)
@click.option("--metric", default="ua", help="The fold metric to pair: ua, wa, macro_f1; for regression results ccc (mean over targets) or ccc_TARGET (e.g. ccc_valence).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list instead of text.")
def compare_cmd(results, metric, as_json):
    """Paired differences of RESULTS[1:] against RESULTS[0] over the same folds.

    Each result is a run folder or a sweep cell SWEEP:LAYER:HEAD (SWEEP:LAYER:HEAD:CACHE when
    the sweep holds several caches), e.g. `ser-cache compare sweeps/mix:3:linear
    sweeps/mix:0-6:linear sweeps/mix:0-6:qkv`. Prints the mean, std and range of the per-fold
    differences, the folds improved and an exact sign-flip p-value. Results tested on other
    folds are refused.
    """
    from .compare import compare, table

    rows = compare(list(results), metric)
    click.echo(json.dumps(rows, indent=1) if as_json else table(rows))


def _echo_report(paths: dict) -> None:
    plots = ", ".join(str(paths[k]) for k in ("layers", "depth", "confusion", "weights", "ccc") if k in paths)
    click.echo(f"table: {paths['summary']}\nresults: {paths['results']}\nplots: {plots}")


# --- on a cluster ---------------------------------------------------------------------------


@main.command("slurm", context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--tasks", type=click.IntRange(1), required=True, help="Array tasks N (--array 0-(N-1)); task I does part I/N. extract splits by shards: pass it a --shard-mb that plans at least N.")
@click.option("--partition", default=None, help="sbatch --partition (default: the cluster's).")
@click.option("--time", "time_limit", default=None, help="sbatch --time per task, e.g. 2:00:00 (a task cut short resumes when re-submitted).")
@click.option("--cpus-per-task", type=click.IntRange(1), default=None, help="sbatch --cpus-per-task.")
@click.option("--mem", default=None, help="sbatch --mem per task, e.g. 16G.")
@click.option("--sbatch", "extra", multiple=True, help="Any other sbatch option for every job, e.g. --sbatch=--gres=gpu:1 --sbatch=--account=X (repeat).")
@click.option("--after", "after", default=None, help="A job id: start the array only once that job has ended well (e.g. the sweep after its cache's extract array).")
@click.option("--job-name", default=None, help="Default: ser-cache-COMMAND-<name of --out>.")
@click.option("--log-dir", type=click.Path(file_okay=False, path_type=Path), default=Path("slurm"), help="Folder for the scripts and the jobs' output.")
@click.option("--dry-run", is_flag=True, help="Print the scripts; submit nothing.")
@click.argument("command", type=click.Choice(["extract", "sweep"]))
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def slurm_cmd(tasks, partition, time_limit, cpus_per_task, mem, extra, after, job_name, log_dir, dry_run, command, args):
    """Run `ser-cache COMMAND ARGS` as a SLURM array job of --tasks tasks.

    E.g. `ser-cache slurm --tasks 8 --time 4:00:00 extract DATA --corpus ravdess --model base
    --out cache/x`. Each task does its part into the one --out folder (extract: shards, sweep:
    folds); a sweep also gets a job that writes the report once every task has ended well
    (--dependency=afterok). The options go to sbatch; COMMAND's own options follow it. The
    scripts are written to --log-dir and submitted with sbatch (--dry-run: only printed).
    """
    from .slurm import PART_OPTION, JobOptions, plan_submission, submit

    args = list(args)
    part_option = PART_OPTION[command]
    if any(a == part_option or a.startswith(part_option + "=") for a in args):
        raise click.BadParameter(f"the array splits the work: drop {part_option} (task I of --tasks N does part I/N)",
                                 param_hint="ARGS")
    # Check the command line now, not in N jobs after they have waited in the queue.
    ctx = main.commands[command].make_context(command, list(args))
    out = ctx.params["out"]
    opts = JobOptions(tasks=tasks, job_name=job_name or f"ser-cache-{command}-{out.resolve().name}",
                      log_dir=log_dir.resolve(), partition=partition, time=time_limit, cpus_per_task=cpus_per_task,
                      mem=mem, extra=tuple(extra))
    sub = plan_submission(command, args, out, opts, Path.cwd(), after)
    if dry_run:
        click.echo(f"# {sub.array_path}\n{sub.array}")
        if sub.report:
            click.echo(f"# {sub.report_path} (sbatch --dependency=afterok:<array job id>)\n{sub.report}")
        return
    submit(sub)
    click.echo(f"submitted array job {sub.array_id} ({tasks} tasks): {sub.array_path}")
    if sub.report_id:
        click.echo(f"submitted report job {sub.report_id} after it: {sub.report_path}")
    progress = f"ser-cache report {out}" if command == "sweep" else f"ser-cache inspect {out}"
    click.echo(f"output in {opts.log_dir}; follow with `squeue -j {sub.array_id}`, progress with `{progress}`")


# --- corpora: download and check -----------------------------------------------------------

# DOWNLOADABLE and the download options live in download.py (the releases in the corpus recipes,
# corpora/); imported here so that the choices show in --help.
from . import download as _dl  # noqa: E402


@main.command("download")
@click.argument("corpus", type=click.Choice(_dl.DOWNLOADABLE))
@click.option("--to", "to", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="Folder to download and unpack the corpus into (created if needed).")
@click.option("--base-url", default=None, envvar=_dl.ENV_BASE, show_envvar=True,
              help="Fetch the archives by name from this URL (a mirror) instead of their sources.")
def download_cmd(corpus, to, base_url):
    """Download CORPUS, unpack it into --to and verify every file against its SHA-256 list.

    Resumes an interrupted download; running it again after success only re-verifies.
    """
    report = _dl.download(corpus, to, base_url=base_url)
    click.echo(report.summary())
    click.echo(f"archives kept in {to / _dl.ARCHIVE_DIR}; delete them if you need the space")
    click.echo(f"pass this folder to `ser-cache extract`: {report.corpus_dir}")


@main.command("check-corpus")
@click.argument("data_dir", type=click.Path(path_type=Path))
@corpus_options(required=True)
@click.option("--long-audio", type=click.Choice(LONG_AUDIO_POLICIES), default="refuse", help="As extract's: under refuse, a file over 30 s is a problem.")
@click.option("--labels", default=None, help="The classes you expect after the label map, comma-separated (e.g. angry,happy,neutral,sad); every other label is a problem.")
@click.option("--protocol", type=click.Choice(_FOLD_PROTOCOLS), default=None, help="The fold protocol to check, as train's --protocol (default: train's default for the corpus).")
@click.option("--folds", "n_folds", type=click.IntRange(2), default=None, help="The number of kfold folds to check, as train's --folds.")
@click.option("--folds-from", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="EmoBox's data/<dataset> folder: check its fold_K files as train --folds-from reads them.")
@click.option("--compat-speaker-overlap", is_flag=True, help="As train's: accept fold files that test speakers they also train on (FLAWED).")
def check_corpus_cmd(data_dir, corpus, label_map, csv_path, audio_root, columns, speaker_pattern, long_audio, labels,
                     protocol, n_folds, folds_from, compat_speaker_overlap):
    """Check a corpus before extracting it: `check-corpus DATA_DIR --corpus NAME [options]`.

    Reads DATA_DIR as `extract` does (the same corpus options), decodes every file, and prints
    one line per problem: missing files, unreadable audio, labels outside --labels or spelt two
    ways, classes of one speaker or tested in only some folds, folds that train could not
    build (too few speakers...); then their count. Exits non-zero when there is any.

    For ravdess and emodb it also verifies every file against the release's published
    SHA-256 list (a copy converted to another format is said to be one, not failed).
    """
    from .corpuscheck import check_corpus

    refuse_data_file(data_dir, corpus, csv_path)
    expected = [c.strip() for c in labels.split(",") if c.strip()] if labels else None
    report = check_corpus(corpus, data_dir, label_map=label_map, csv_path=csv_path, audio_root=audio_root, columns=columns,
                          speaker_pattern=speaker_pattern, long_audio=long_audio, labels=expected, protocol=protocol,
                          n_folds=n_folds, folds_from=folds_from, speaker_overlap=compat_speaker_overlap)
    click.echo(report.text())
    if report.problems:
        raise click.ClickException(f"{report.count()} in {data_dir} (listed above): fix them, then extract")
    click.echo(f"{report.count()}: ready to extract")


# --- using a trained head --------------------------------------------------------------------


@main.command("export")
@click.argument("run_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(dir_okay=False, path_type=Path), help="The file to write (e.g. model.pt).")
@click.option("--fold", type=click.IntRange(0), default=None, help="Export fold K's saved head as is, instead of training on all speakers.")
@click.option("--epochs", type=click.IntRange(1), default=None, help="Torch heads on all speakers: train a full N-epoch schedule. Default: the run's schedule stopped at the median epoch chosen on validation.")
@click.option("--cache", "cache_path", type=click.Path(exists=True, file_okay=False, path_type=Path), default=None, help="The run's cache, if it moved (default: the path recorded in the run).")
@click.option("--device", default=None, help="Where to train: auto, cpu, cuda[:N] (default: the run's setting).")
@click.option("--overwrite", is_flag=True, help="Replace --out if it exists.")
def export(run_dir, out, fold, epochs, cache_path, device, overwrite):
    """Turn a `ser-cache train` run into one file that `predict` uses on new audio.

    By default the head is trained again on every speaker of the run's layer with the run's
    settings (its cross-validated metrics remain the estimate of how well it does); --fold K
    takes fold K's head instead. The file records the labels, layer (or layers), input mode and
    the encoder (family, name, SHA-256, path at extraction) the head needs.
    """
    from .layers import label
    from .exporting import export_run

    saved = export_run(run_dir, out, fold=fold, epochs=epochs, cache_path=cache_path, device=device, overwrite=overwrite)
    p, w = saved["provenance"], saved["encoder"]
    detail = f"{p['epochs']} epochs" if "epochs" in p else ", ".join(f"{k} {v:g}" for k, v in p.get("choice", {}).items())
    what = f"ensemble of {saved['members']} {saved['head']} heads" if "members" in saved else f"{saved['head']} head"
    click.echo(f"{what} on layer {label(saved['layer'])}, trained on {p['trained_on']}"
               + (f" ({p.get('n_utterances')} utterances, {detail})" if p["trained_on"] == "all speakers" else ""))
    kind = "targets" if saved["task"] == "regression" else "labels"
    click.echo(f"{kind}: {', '.join(saved['labels'])}")
    click.echo(f"needs {FAMILY_LABELS[w['family']]} {w['name']} (sha256 {w['sha256'][:12]}...), input mode {saved['mode']}")
    click.echo(f"wrote {out}; use it with: ser-cache predict {out} AUDIO...")


@main.command("predict")
@click.argument("model_file", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.argument("audio", nargs=-1, required=True, type=click.Path(path_type=Path))
@click.option("--model", "whisper_model", default=None, help="Whisper name or checkpoint path, or a transformers model folder or hub id (default: the checkpoint file or model folder recorded in MODEL_FILE if it still has the same SHA-256, else the recorded name).")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON list instead of a table.")
@click.option("--allow-other-model", is_flag=True, help="Use a model whose SHA-256 differs from the one the head was trained on (same family and shape), e.g. a Whisper checkpoint converted with convert-whisper.")
@click.option("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
def predict(model_file, audio, whisper_model, as_json, allow_other_model, device):
    """Predict the emotion of each AUDIO file with a head written by `ser-cache export`.

    Prints the predicted emotion and every class probability (a regression head: the value of
    each target, e.g. arousal and valence, on the scale it was trained on). Files over 30 s are cut into
    30 s windows, each shown with its own probabilities; the file's are their mean weighted
    by window duration. The encoder runs only up to the head's (highest) layer. Files that
    cannot be read are reported and the others still processed (the exit status is then 1).
    """
    from .heads import n_members
    from .layers import label, states_of
    from .predict import format_table, load_predictor, predictions_json

    predictor = load_predictor(model_file, whisper_model, allow_other_model, device=pick_device(device))
    ex, enc = predictor.exported, predictor.enc
    what = f"ensemble of {n_members(ex.model)} {ex.head} heads" if n_members(ex.model) else f"{ex.head} head"
    click.echo(f"{what} on layer {label(ex.layer)} of {FAMILY_LABELS[enc.family]} {enc.name} (sha256 {enc.sha256[:12]}..., "
               f"{enc.n_states - 1} blocks, {max(states_of(ex.layer))} run), mode {ex.mode}", err=True)
    if enc.sha256 != ex.encoder["sha256"]:
        click.echo(f"warning: the head was trained on {FAMILY_LABELS[ex.encoder['family']]} {ex.encoder['name']} (sha256 "
                   f"{ex.encoder['sha256'][:12]}...), not this one (--allow-other-model)", err=True)
    results = [predictor.predict_file(path) for path in audio]
    regression = ex.regression
    click.echo(predictions_json(results, predictor.labels, regression) if as_json
               else format_table(results, predictor.labels, regression))
    failed = [r for r in results if r.error]
    if failed:
        raise click.ClickException(f"{len(failed)} of {len(results)} files could not be used: "
                                   + "; ".join(f"{r.path}: {r.error}" for r in failed))


@main.command("convert-whisper")
@click.argument("checkpoint", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--out", required=True, type=click.Path(file_okay=False, path_type=Path), help="The transformers model folder to write (config.json, model.safetensors).")
def convert_whisper_cmd(checkpoint, out):
    """Write an openai-whisper CHECKPOINT as a transformers WhisperModel folder, the same weights.

    `extract --model FOLDER` then runs transformers' Whisper: the same states as the
    checkpoint's in every mode, under another SHA-256 (docs/encoders.md).
    """
    from .whisper_to_hf import convert_whisper

    if out.exists() and any(out.iterdir()):
        raise click.BadParameter(f"{out} exists and is not empty: pass a new folder", param_hint="--out")
    click.echo(f"wrote {convert_whisper(checkpoint, out)}")


if __name__ == "__main__":
    main()
