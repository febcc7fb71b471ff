"""The two stages as libraries: pretraining (a pretext method) and fine-tuning (the supervised task),
each parse -> set up -> fit. The entry scripts (train/pretrain.py, train/finetune.py) call them, and so
do the grids and the benchmark, so no library code imports an entry script.
"""
