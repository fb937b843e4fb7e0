"""Run by test_dp_training under 1 or 2 processes: train a few DP steps, draw the noise or report the DP seeds."""

import os
import sys

import torch

from common.dp.training import DPTrainer, sequence_classification_losses
from common.stage import close_process_group
from tests.tiny_task import collate, parse_dp_args, tiny_dataset, tiny_model


def main():
    mode, result_path, *dp_argv = sys.argv[1:]
    # a second process starts from other weights: the trainer must take the main process's
    rank = int(os.environ.get("RANK", "0"))
    trainer = DPTrainer(tiny_model(seed=rank), tiny_dataset(), collate, sequence_classification_losses,
                        parse_dp_args(dp_argv), stage="worker", private_data="tiny")
    if mode == "train":
        trainer.train()
        result = torch.cat([p.detach().flatten() for p in trainer.model.parameters()])
    elif mode == "seeds":  # (sampling seed, noise seed) of every process
        result = [None] * trainer.accelerator.num_processes
        torch.distributed.all_gather_object(result, (trainer.sampling_seed, trainer.noise_seed))
    else:  # the privatised gradient of all-zero clipped sums is the noise / logical batch
        result = torch.stack([_noise(trainer, step) for step in range(20)])
    if trainer.accelerator.is_main_process:
        torch.save(result, result_path)
    close_process_group()


def _noise(trainer, step):
    trainer.optimizer.zero_grad(set_to_none=True)
    trainer.privatise_gradients(step)
    return torch.cat([p.grad.flatten() for p in trainer.params]) * trainer.logical_batch


if __name__ == "__main__":
    main()
