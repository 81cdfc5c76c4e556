"""Captions for training images: the WD1.4 tagger (ONNX, v2 and v3), BLIP captions, tag tools, and the manifest that
tells the captions lycolab wrote from the ones a person edited."""
