"""The model's token order in raylight's gathered sequences (``raylight.model_order``), against
a re-enactment of raylight's split: pad to the ranks, chunk, all-to-all gathers rank after rank."""

from __future__ import annotations

import pytest
import torch

from ditfastattn_core.comfy_bridge.raylight import (
    TEXT_IMAGE_PER_RANK,
    WHOLE,
    SequenceMismatch,
    SequenceSplit,
    model_order,
)

PER_RANK = SequenceSplit("m.{index}", TEXT_IMAGE_PER_RANK)


def gathered_per_rank(text: torch.Tensor, image: torch.Tensor, ranks: int) -> torch.Tensor:
    """Flux's double blocks under raylight USP: text and image chunked apart, each rank
    cat((its text, its image)), and Ulysses' all-to-all concatenates the ranks in order."""
    return torch.cat([torch.cat([t, i]) for t, i in zip(text.chunk(ranks), image.chunk(ranks), strict=True)])


@pytest.mark.parametrize("text,image,ranks", [(8, 96, 2), (12, 48, 4), (0, 64, 8), (256, 4096, 8)])
def test_per_rank_order_puts_back_the_models_order(text, image, ranks):
    model = torch.arange(text + image)  # the model's order: text then image
    gathered = gathered_per_rank(model[:text], model[text:], ranks)
    order = model_order(PER_RANK, text + image, text, image, ranks)
    assert torch.equal(gathered[order], model)
    assert torch.equal(torch.sort(order).values, torch.arange(text + image))


def test_whole_split_is_the_models_order():
    assert model_order(SequenceSplit("m", WHOLE), 104, 8, 96, 2) is None
    assert model_order(SequenceSplit("m", WHOLE, text=False), 72, 8, 72, 2) is None


@pytest.mark.parametrize("seq,text,image,ranks", [
    (106, 8, 97, 2),   # padding: raylight pads 97 image tokens to 98
    (104, 7, 97, 2),   # text and image that do not divide by the ranks
    (110, 8, 96, 2),   # extra tokens (a reference image)
])
def test_a_padded_or_foreign_split_is_refused(seq, text, image, ranks):
    with pytest.raises(SequenceMismatch):
        model_order(PER_RANK, seq, text, image, ranks)
