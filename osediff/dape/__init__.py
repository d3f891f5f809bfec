"""DAPE, OSEDiff's degradation-aware prompt extractor: the RAM Swin-L tagger plus SeeSR's LoRA (spec §1.4, App. B).

`RAMTagger.from_files(ram_path, dape_path)` gives a callable `images (B, 3, H, W) in [0, 1] -> list[str]`, the
prompt extractor the pipeline takes; with `dape_path=None` it is plain RAM, which training uses (spec §4.4).
Importing this package imports torch and nothing heavier.
"""

from osediff.dape.swin import SwinTransformer
from osediff.dape.tagger import RAMConfig, RAMTagger, preprocess, tags_from_logits

__all__ = ["RAMConfig", "RAMTagger", "SwinTransformer", "preprocess", "tags_from_logits"]
