"""Where did the captioner look? Caption an image with a ViT + GPT-2 model and map every word.

    import captioner
    cap = captioner.load()                       # the default model for this machine
    res = cap.caption(image)                     # res.text, res.words, res.word_maps, res.cls_map
    res = cap.caption(image, num_beams=1)        # any GenerationSettings field, or settings=GenerationSettings(...)
    res = cap.explain(image, "a dog on a bed")   # the same for a caption you give
    check = captioner.check_word(cap, res, 1)    # can I trust word 1's map? check.verdict, check.sentence
"""
from .check import Check, check_word
from .decoding import GenerationSettings
from .loading import (BUNDLED_MODEL, HUB_MODEL, available_models, default_model, listed_models, load,
                      model_label)
from .pipeline import DEFAULT_METHOD, METHODS, CaptionResult, Captioner

__all__ = ["load", "available_models", "listed_models", "model_label", "default_model", "Captioner", "CaptionResult",
           "GenerationSettings", "METHODS", "DEFAULT_METHOD", "BUNDLED_MODEL", "HUB_MODEL",
           "check_word", "Check"]
