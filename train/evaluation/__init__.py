"""What a run measures besides its loss, and reading trained weights back: the clean pretext metric, the
kNN monitor and its floors, batch-norm recalibration, standard errors, the verdict, pictures and curves,
the pretrained backbone fine-tuning starts from, and the backbone file export and evaluate read.
"""
