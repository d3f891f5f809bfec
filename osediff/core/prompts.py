"""The text that conditions the UNet (spec §1.4): DAPE tags plus the user's prompt.

A prompt extractor is any callable `images (B,3,H,W) float [0,1] -> list[str]` returning, per image, its tags
joined with ", " (empty when none) — `osediff.dape.RAMTagger` is one; None means no tags.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

PromptExtractor = Callable[[torch.Tensor], list[str]]


def format_prompt(tags: str, user_prompt: str = "") -> str:
    """`f"{tags}, {user_prompt},"` exactly as the reference builds it: tags "building, sky" and no user prompt
    give "building, sky, ,"; no tags and no user prompt give ", ,"."""
    return f"{tags}, {user_prompt},"


def build_prompts(images: torch.Tensor, extractor: PromptExtractor | None, user_prompt: str = "") -> list[str]:
    """One prompt per image of the (B,3,H,W) [0,1] batch."""
    tags = extractor(images) if extractor is not None else [""] * images.shape[0]
    if len(tags) != images.shape[0]:
        raise ValueError(f"prompt extractor returned {len(tags)} tag strings for {images.shape[0]} images")
    return [format_prompt(t, user_prompt) for t in tags]


class FixedTags:
    """A prompt extractor that gives every image the same `tags` (a user's tags instead of DAPE's)."""

    def __init__(self, tags: str):
        self.tags = tags

    def __call__(self, images: torch.Tensor) -> list[str]:
        return [self.tags] * images.shape[0]


class TagRecorder:
    """Wraps an extractor (None: no tags) and keeps, in `seen`, every tag string it returned, in order: how a
    front-end learns which tags the UNet was conditioned on."""

    def __init__(self, extractor: PromptExtractor | None):
        self.extractor, self.seen = extractor, []

    def __call__(self, images: torch.Tensor) -> list[str]:
        tags = self.extractor(images) if self.extractor is not None else [""] * images.shape[0]
        self.seen.extend(tags)
        return tags
