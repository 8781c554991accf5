"""CLIP token ids used by Arc2Face / FaceCrafter, held as constants so no tokenizer is needed at run time.

Arc2Face conditions Stable Diffusion 1.5 on identity only, through the fixed prompt
``"photo of a id person"`` whose ``id`` token embedding is replaced by the ArcFace vector (see
:meth:`facecrafter_jax.models.clip_text.CLIPTextModel.encode_id`); the classifier-free-guidance
negative is the empty prompt. Both prompts are tokenised once, here, with the SD1.5 CLIP tokenizer
conventions:

* 77 ids: ``<|startoftext|>`` (49406), the BPE tokens, ``<|endoftext|>`` (49407);
* padded to 77 with the **end-of-text id** 49407 (SD1.5's ``tokenizer/special_tokens_map.json`` sets
  ``pad_token`` to ``<|endoftext|>``; OpenAI CLIP and open_clip pad with 0 instead).

Every constant is checked in ``tests/test_tokens.py`` against the real CLIP BPE vocabulary shipped
with ``open_clip_torch`` and against a transformers ``CLIPTokenizer`` built from it.
"""

from __future__ import annotations

from typing import Sequence

import numpy as np

__all__ = [
    "BOS_TOKEN_ID",
    "EOS_TOKEN_ID",
    "PAD_TOKEN_ID",
    "MAX_LENGTH",
    "VOCAB_SIZE",
    "ARC2FACE_PROMPT",
    "ARC2FACE_PROMPT_TOKENS",
    "ID_TOKEN_ID",
    "ID_TOKEN_POSITION",
    "ARC2FACE_PROMPT_IDS",
    "EMPTY_PROMPT_IDS",
    "pad_token_ids",
]

BOS_TOKEN_ID = 49406  # <|startoftext|>
EOS_TOKEN_ID = 49407  # <|endoftext|>
PAD_TOKEN_ID = EOS_TOKEN_ID  # SD1.5 pads with <|endoftext|>
MAX_LENGTH = 77  # CLIP text context length (tokenizer.model_max_length)
VOCAB_SIZE = 49408  # CLIP BPE vocabulary incl. the two special tokens

ARC2FACE_PROMPT = "photo of a id person"
# BPE ids of "photo", "of", "a", "id", "person" (no special tokens).
ARC2FACE_PROMPT_TOKENS: tuple[int, ...] = (1125, 539, 320, 1014, 2533)
ID_TOKEN_ID = 1014  # the token "id</w>", whose embedding Arc2Face replaces by the ArcFace vector
ID_TOKEN_POSITION = 4  # its index in the padded 77-id array (BOS is at 0)


def pad_token_ids(
    tokens: Sequence[int],
    max_length: int = MAX_LENGTH,
    *,
    bos_token_id: int = BOS_TOKEN_ID,
    eos_token_id: int = EOS_TOKEN_ID,
    pad_token_id: int = PAD_TOKEN_ID,
) -> np.ndarray:
    """Build the fixed-length id array ``[BOS, *tokens, EOS, PAD, ...]`` (int32, shape ``[max_length]``).

    ``tokens`` are BPE ids without special tokens. Raises ``ValueError`` if they do not fit
    (``len(tokens) + 2 > max_length``) instead of silently truncating.
    """
    tokens = [int(t) for t in tokens]
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2 (room for BOS and EOS), got {max_length}")
    if len(tokens) + 2 > max_length:
        raise ValueError(f"{len(tokens)} tokens + BOS/EOS do not fit in max_length={max_length}")
    ids = [bos_token_id, *tokens, eos_token_id]
    ids += [pad_token_id] * (max_length - len(ids))
    return np.asarray(ids, dtype=np.int32)


def _frozen(a: np.ndarray) -> np.ndarray:
    a.setflags(write=False)
    return a


# [77] int32, read-only. Batch them with np.broadcast_to(ids, (batch, 77)).
ARC2FACE_PROMPT_IDS: np.ndarray = _frozen(pad_token_ids(ARC2FACE_PROMPT_TOKENS))
EMPTY_PROMPT_IDS: np.ndarray = _frozen(pad_token_ids(()))
