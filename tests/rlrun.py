"""`mlxchat train rl` on a scripted reward, as a separate process (for kill-and-resume tests):

    python tests/rlrun.py --home H train rl --run R ...

A random model never solves an arithmetic problem, so every advantage would be 0 and RL would
change nothing; here the reward is whether the answer contains an "e", which random answers
sometimes do."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from mlxchat.conversations.base import Task  # noqa: E402


class SayE(Task):
    """One question; reward 1 when the answer contains an 'e'."""

    def num_examples(self):
        return 1

    def get_example(self, index):
        return {"messages": [{"role": "user", "content": "Say something."}, {"role": "assistant", "content": ""}]}

    def evaluate(self, conversation, completion):
        return "e" in completion


if __name__ == "__main__":
    from mlxchat import rl
    from mlxchat.cli import main

    rl.rl_tasks = lambda cfg, root=None: (SayE(), None, "scripted reward: no test set")
    sys.exit(main(sys.argv[1:]))
