"""CARZero's feature extractors: the image encoder (ViT, timm parameter names) with its X-ray
preprocessing, and the text encoder (BERT through `transformers`) with CARZero's word-level
token recipe. Both produce the token tensors the aligner takes, global in row 0."""
