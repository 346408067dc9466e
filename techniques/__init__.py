"""The techniques, each written once and run by sampling (nodes/) and by the trainer (training/)
alike: Masked Shared Attention (msa), weighted-merge routing (routing) and the phrase-relevance
maps that routing, MSA's batch mode and the trainer's data selection read (relevance). They work
on one attention layer's q, k, v and never name a model's blocks; the math is in kernels/, and
what a model family provides is in families/ (docs/ARCHITECTURE.md)."""
