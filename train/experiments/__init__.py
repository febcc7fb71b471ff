"""Grids of runs in one process: the runner they share, the pretrained-vs-supervised comparison over
label fractions (the paper's Table 1) and the pretext-method table.
"""
