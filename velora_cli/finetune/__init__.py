"""`velora finetune`: the pipeline of stages, the pre-flight checks, the training session, its callbacks and its live
display."""
