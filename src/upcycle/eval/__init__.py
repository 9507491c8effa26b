"""Evaluation: perplexity, function preservation and expert load (`perplexity`), encoder, ViT and T5
comparisons (`encoders`), and the figures (`plots`)."""
