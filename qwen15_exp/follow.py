"""A node script's progress line: `python -m qwen15_exp.follow <steps log> --total N --pid P`.

launch_node<R>.sh sends msrun's own output (MindFormers' INFO lines, hundreds per run) to a file and runs this
beside it: one live line of step / total, loss and tokens/s, read from the first local rank's step log until
msrun (pid P) ends. A resumed run's log already holds the earlier steps: the line starts at their count.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path


def steps_in(log: Path) -> int:
    from qwen15_exp.lifecycle import read_steps
    return len(read_steps(log))


def main(argv=None) -> int:
    from qwen15_exp.console import Progress, StepsFollower
    from qwen15_exp.lifecycle import pid_alive
    ap = argparse.ArgumentParser(prog="python -m qwen15_exp.follow", description=__doc__.splitlines()[0])
    ap.add_argument("steps_log")
    ap.add_argument("--total", type=int, default=None)
    ap.add_argument("--tokens-per-step", type=int, default=0)
    ap.add_argument("--pid", type=int, required=True, help="follow until this process ends")
    ap.add_argument("--label", default="loss")
    args = ap.parse_args(argv)
    log = Path(args.steps_log)
    follower = StepsFollower(log, Progress(args.total, args.tokens_per_step, steps_in(log), args.label))
    try:
        while pid_alive(args.pid):
            follower.poll()
            time.sleep(0.5)
    except KeyboardInterrupt:
        pass
    follower.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
