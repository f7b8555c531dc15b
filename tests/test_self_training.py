"""Self-training's next pseudo masks: only the background and the image's tags compete."""
import numpy as np
import torch

from pipeline.methods.self_training import tagged_probabilities


def test_a_train_image_cannot_hold_a_class_it_is_not_tagged_with():
    logits = torch.zeros(1, 4, 2, 3)
    logits[0, 3] = 5.0  # the network's favourite everywhere: class 3, which the image is not tagged with
    logits[0, 1, 0, 0] = 2.0

    def forward(batch):
        return torch.cat([logits, logits.flip(-1)])[:len(batch)]

    probs = tagged_probabilities(forward, torch.zeros(3, 2, 3), np.array([1]), flip=True)
    assert probs.shape == (2, 2, 3)  # background and class 1
    np.testing.assert_allclose(probs.sum(axis=0), 1.0, rtol=1e-6)
    assert probs[1, 0, 0] > 0.8  # class 1 wins where it is above the background
    np.testing.assert_allclose(probs[:, 1, 1], [0.5, 0.5], rtol=1e-6)  # a tie without class 3
