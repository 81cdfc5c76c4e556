"""Captions for training images: the WD1.4 tagger (ONNX), BLIP captions, and tag tools."""
