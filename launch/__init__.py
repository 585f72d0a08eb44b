"""Entry points for training runs (torchrun, deepspeed, mpirun) and environment set-up."""
