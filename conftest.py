# The test models are tiny: one thread runs them faster than two threads fighting over small
# kernels, and keeps the suite's time stable on a busy machine.
import torch

torch.set_num_threads(1)
