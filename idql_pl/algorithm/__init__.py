"""The paper's algorithm in plain PyTorch, no Lightning: the value losses and implicit weights (losses), the
diffusion model's schedule, loss and sampler (diffusion), the policy extraction (extraction), one iteration of
Algorithm 1 (iteration) and its gradient steps (steps)."""
