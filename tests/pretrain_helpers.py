"""Run ``python -m lub_fast.pretrain`` in this process and interrupt it at an exact point, for
``test_pretrain.py``'s resume tests (a signal sent from outside could arrive after the run ended).

    python tests/pretrain_helpers.py --kill-after-step K -- PRETRAIN_ARGS...
        SIGKILL this process as soon as optimizer step K is done (before its log record).
    python tests/pretrain_helpers.py --term-at-micro-step M -- PRETRAIN_ARGS...
        SIGTERM this process just before micro-batch M (0-based) runs: the loop saves after it.
"""

import argparse
import os
import signal
import sys

import torch

from lub_fast import pretrain
from lub_fast.train import _Loop


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--kill-after-step", type=int)
    parser.add_argument("--term-at-micro-step", type=int)
    parser.add_argument("--threads", type=int, default=1)
    args, rest = parser.parse_known_args()
    torch.set_num_threads(args.threads)
    optimizer_step, micro_step = _Loop._optimizer_step, _Loop._micro_step

    def kill_after(self, stop_requested):
        values = optimizer_step(self, stop_requested)
        if self.pos.step == args.kill_after_step:
            os.kill(os.getpid(), signal.SIGKILL)
        return values

    def term_at(self, batch):
        if self.pos.micro_step == args.term_at_micro_step:
            os.kill(os.getpid(), signal.SIGTERM)
        micro_step(self, batch)

    if args.kill_after_step is not None:
        _Loop._optimizer_step = kill_after
    if args.term_at_micro_step is not None:
        _Loop._micro_step = term_at
    return pretrain.main([a for a in rest if a != "--"])


if __name__ == "__main__":
    sys.exit(main())
