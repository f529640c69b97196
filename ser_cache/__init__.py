"""ser-cache: speech emotion recognition on cached speech-encoder layers.

The Python interface (api.py; each call runs what its command runs):

    import ser_cache
    result = ser_cache.train("cache/ravdess-base-short", layer=3, head="qkv", epochs=30)
    result.metrics["ua"]["mean"]                      # test UA over speaker-independent folds
    ser_cache.sweep("cache/ravdess-base-short", out="sweeps/base", heads=["linear", "qkv"])
    ser_cache.export("runs/l3-qkv", out="model.pt")
    predictor = ser_cache.load_predictor("model.pt")
    predictor.labels[predictor.predict_file("clip.wav").probs.argmax()]   # the clip's emotion

    open_cache, train, sweep, make_folds, export, load_predictor, TrainConfig

Data flows one way, and the modules follow it (docs/development.md lists them all):

    corpora   raw corpus folder  -> utterance records (records.py)
    audio     audio file         -> 16 kHz mono float32
    encoder   audio              -> every encoder state
    cache     states             -> HDF5 shards -> one layer of the corpus (features.py)
    folds     records            -> speaker-independent folds
    heads     one layer          -> pooled vector -> class scores
    training  heads x folds      -> predictions, metrics (fitting.py, metrics.py)
    sweeping  layers x heads     -> results table and plots (report.py)
"""

__version__ = "0.1.0"

__all__ = ["open_cache", "train", "sweep", "make_folds", "export", "load_predictor", "TrainConfig", "__version__"]


def __getattr__(name: str):
    """The interface's names, imported when first used: `import ser_cache` stays light (the
    command line imports this package before torch is needed)."""
    if name == "TrainConfig":
        from .config import TrainConfig

        return TrainConfig
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'ser_cache' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
