"""Score-based SDEs in continuous time (Song et al. 2021): the forward processes, exact diffused Gaussian mixtures and
solvers over any score function: the test bed of discriminator guidance and of every guidance or reward gradient
(issue W2 6/8; the boosting thesis, ../shared/papers/004)."""
