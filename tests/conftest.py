"""Shared test settings: this machine (and CI) has 2 cores shared by several jobs."""

import torch

torch.set_num_threads(min(2, torch.get_num_threads()))
