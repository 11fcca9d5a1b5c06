"""In-memory sites for tests."""

import torch


def make_site(num_samples: int, *, seed: int, invert: bool = False, size: int = 64, labels: int = 1) -> list:
    """A small in-memory site: squares on noise; ``invert`` gives the site its own appearance."""
    generator = torch.Generator().manual_seed(seed)
    samples = []
    for _ in range(num_samples):
        mask = torch.zeros(labels, size, size)
        side = int(torch.randint(size // 4, size // 2, (1,), generator=generator))
        top, left = (int(v) for v in torch.randint(0, size - side, (2,), generator=generator))
        mask[0, top : top + side, left : left + side] = 1
        if labels > 1:  # a second label inside the first, as a cup inside a disc
            quarter = side // 4
            mask[1, top + quarter : top + side - quarter, left + quarter : left + side - quarter] = 1
        image = 0.2 + 0.15 * torch.rand(1, size, size, generator=generator) + 0.5 * mask[:1]
        samples.append(((1 - image if invert else image).clamp(0, 1), mask))
    return samples

