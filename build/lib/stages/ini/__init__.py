"""Isolation and Induction (InI; Guo et al., ACM MM 2023, arXiv 2308.00958), the defense `train-ini` trains; the
method in equations is docs/method.md. Its parts, each importing only those above it:

- `objective.py`: the five loss terms, PCGrad and its reductions, clipping, BatchNorm on OOD batches;
- `ood.py`: the OOD batches (mixtures, heavy augmentation, derived and synthetic outliers) and the default sets;
- `reference.py`: the readable training step, the definition;
- `fast.py`: the LeNet-5 step, the same maths by hand-written Jacobian products, tested equal to the reference;
- `surrogates.py`: building, seeding and refreshing the frozen surrogates;
- `diagnose.py`: held-out measures of induction and isolation for any victim.
"""
