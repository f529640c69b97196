"""Public corpora that this tool checks against their published SHA-256 lists but has no recipe
for: `ser-cache check-corpus` is for recipes, `download.check_corpus(name, folder)` checks these;
they are prepared through a manifest you write (--corpus csv). None can be downloaded here
(a licence click-through, or no stable URL)."""
from __future__ import annotations

from .base import Release

OTHER_RELEASES = {
    "cremad": Release(checksums="cremad.sha256", subfolder="AudioWAV"),
    "tess": Release(checksums="tess.sha256"),
    "savee": Release(checksums="savee.sha256", subfolder="AudioData"),
    "jl_corpus": Release(checksums="jl_corpus.sha256"),
}
