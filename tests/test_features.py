"""LayerData: ragged frames, batches and moments."""
import numpy as np

from ser_cache.features import LayerData


def make(lengths, dim=3, seed=0):
    rng = np.random.default_rng(seed)
    offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    n = len(lengths)
    return LayerData(frames=rng.normal(2, 3, (offsets[-1], dim)).astype(np.float32), offsets=offsets,
                     ids=np.array([f"u{i}" for i in range(n)]), labels=np.array(["a", "b"] * (n // 2) + ["a"] * (n % 2)),
                     speakers=np.array([f"s{i}" for i in range(n)]), groups=np.array([""] * n), layer=1)


def test_moments_equal_numpy_over_the_chosen_utterances():
    data = make([4, 7, 1, 5])
    mean, std = data.moments([1, 3])
    frames = np.concatenate([data.utterance(1), data.utterance(3)]).astype(np.float64)
    np.testing.assert_allclose(mean, frames.mean(0), rtol=1e-10)
    np.testing.assert_allclose(std, frames.std(0), rtol=1e-8)


def test_batch_pads_with_zeros_and_masks():
    data = make([2, 5])
    x, mask = data.batch([0, 1])
    assert x.shape == (2, 5, 3) and mask.tolist() == [[True, True, False, False, False], [True] * 5]
    assert (x[0, 2:] == 0).all()
    np.testing.assert_array_equal(x[1].numpy(), data.utterance(1))
