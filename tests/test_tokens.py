"""Token constants checked against the real CLIP BPE vocabulary shipped in open_clip_torch (offline).

Two independent references: open_clip's ``SimpleTokenizer`` (OpenAI's original BPE code) and a
transformers ``CLIPTokenizer`` built from the same ``bpe_simple_vocab_16e6.txt.gz`` (vocab.json /
merges.txt content), configured like SD1.5's tokenizer (pad = ``<|endoftext|>``).
"""

import gzip
import importlib.util
import os

import numpy as np
import pytest

from facecrafter_jax import tokens


def _open_clip_dir() -> str:
    spec = importlib.util.find_spec("open_clip")
    if spec is None:
        pytest.fail("open_clip_torch is not installed (dev dependency): it ships the CLIP BPE vocabulary")
    return os.path.dirname(spec.origin)


@pytest.fixture(scope="module")
def oc_tokenizer():
    """open_clip/tokenizer.py loaded on its own: importing the open_clip package pulls in torchvision."""
    spec = importlib.util.spec_from_file_location("_open_clip_tokenizer", os.path.join(_open_clip_dir(), "tokenizer.py"))
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod.SimpleTokenizer()


@pytest.fixture(scope="module")
def hf_tokenizer(oc_tokenizer):
    from transformers import CLIPTokenizer

    bpe = os.path.join(_open_clip_dir(), "bpe_simple_vocab_16e6.txt.gz")
    merges = gzip.open(bpe).read().decode("utf-8").split("\n")[1:49152 - 256 - 2 + 1]
    rename = {"<start_of_text>": "<|startoftext|>", "<end_of_text>": "<|endoftext|>"}
    vocab = {rename.get(k, k): v for k, v in oc_tokenizer.encoder.items()}
    assert len(vocab) == tokens.VOCAB_SIZE
    return CLIPTokenizer(vocab=vocab, merges=[tuple(m.split()) for m in merges], pad_token="<|endoftext|>",
                         model_max_length=tokens.MAX_LENGTH)


def test_special_ids_and_prompt_tokens(oc_tokenizer):
    assert oc_tokenizer.sot_token_id == tokens.BOS_TOKEN_ID
    assert oc_tokenizer.eot_token_id == tokens.EOS_TOKEN_ID
    assert oc_tokenizer.vocab_size == tokens.VOCAB_SIZE
    assert tuple(oc_tokenizer.encode(tokens.ARC2FACE_PROMPT)) == tokens.ARC2FACE_PROMPT_TOKENS
    assert oc_tokenizer.encode("id") == [tokens.ID_TOKEN_ID]
    assert oc_tokenizer.decoder[tokens.ID_TOKEN_ID] == "id</w>"
    assert oc_tokenizer.decode(list(tokens.ARC2FACE_PROMPT_TOKENS)).strip() == tokens.ARC2FACE_PROMPT


def test_padded_arrays(oc_tokenizer):
    for text, ids in ((tokens.ARC2FACE_PROMPT, tokens.ARC2FACE_PROMPT_IDS), ("", tokens.EMPTY_PROMPT_IDS)):
        assert ids.shape == (77,) and ids.dtype == np.int32 and not ids.flags.writeable
        ref = oc_tokenizer([text], context_length=77)[0].numpy()  # open_clip pads with 0 ...
        n = len(oc_tokenizer.encode(text)) + 2
        assert ref[n:].max(initial=0) == 0
        ref[n:] = tokens.EOS_TOKEN_ID  # ... SD1.5 pads with <|endoftext|>
        np.testing.assert_array_equal(ids, ref)
    assert tokens.PAD_TOKEN_ID == tokens.EOS_TOKEN_ID
    # the id token sits exactly once, at ID_TOKEN_POSITION
    assert np.flatnonzero(tokens.ARC2FACE_PROMPT_IDS == tokens.ID_TOKEN_ID).tolist() == [tokens.ID_TOKEN_POSITION]


def test_against_transformers_clip_tokenizer(hf_tokenizer):
    enc = lambda t: np.asarray(hf_tokenizer(t, padding="max_length", max_length=77, truncation=True).input_ids)
    np.testing.assert_array_equal(enc(tokens.ARC2FACE_PROMPT), tokens.ARC2FACE_PROMPT_IDS)
    np.testing.assert_array_equal(enc(""), tokens.EMPTY_PROMPT_IDS)
    # Arc2Face's own lookup: tokenizer.encode("id", add_special_tokens=False)[0]
    assert hf_tokenizer.encode("id", add_special_tokens=False)[0] == tokens.ID_TOKEN_ID
    assert (hf_tokenizer.bos_token_id, hf_tokenizer.eos_token_id, hf_tokenizer.pad_token_id) == (
        tokens.BOS_TOKEN_ID, tokens.EOS_TOKEN_ID, tokens.PAD_TOKEN_ID)
    # pad_token_ids agrees with the tokenizer on an arbitrary prompt too
    text = "a close-up photo of a smiling person, 35mm"
    body = hf_tokenizer.encode(text, add_special_tokens=False)
    np.testing.assert_array_equal(tokens.pad_token_ids(body), enc(text))


def test_pad_token_ids_errors():
    assert tokens.pad_token_ids([5] * 75).shape == (77,)
    with pytest.raises(ValueError, match="do not fit"):
        tokens.pad_token_ids([5] * 76)
    with pytest.raises(ValueError, match="max_length"):
        tokens.pad_token_ids([], max_length=1)
    np.testing.assert_array_equal(tokens.pad_token_ids([7], 4, pad_token_id=0), [tokens.BOS_TOKEN_ID, 7, tokens.EOS_TOKEN_ID, 0])
