"""Test-wide settings: one torch thread per pytest worker (`make test` runs two workers on two cores;
tiny tensors are many times slower when the workers' threads fight over the cores)."""
import torch

torch.set_num_threads(1)
