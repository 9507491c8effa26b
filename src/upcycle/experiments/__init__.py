"""The studies that write results/: sparse upcycling vs its baselines (`sparse`, with `recipe`,
`sparse_report`), BAM vs BTX (`bam`, `bam_recipe`, `bam_report`), upcycling a ViT (`vit`, `vit_report`),
and what they share (`common`). They use the library through its public functions only; nothing in
the library imports them. Their extra dependencies are the `experiments` extra (scikit-learn).
"""
