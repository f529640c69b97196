"""ser-cache: speech emotion recognition on cached Whisper encoder layers.

Data flows one way, and the modules follow it:

    corpora   raw corpus folder  -> utterance records (records.py)
    audio     audio file         -> 16 kHz mono float32
    encoder   audio              -> log-mel -> every encoder state
    cache     states             -> HDF5 shards -> one layer of the corpus (features.py)
    folds     records            -> speaker-independent folds
    heads     one layer          -> pooled vector -> class scores
    training  heads x folds      -> predictions, metrics (metrics.py)
    sweep     layers x heads     -> results table and plots (report.py)
"""

__version__ = "0.1.0"
