"""``klq train`` in this process, for the multi-process tests: the real command, plus two probes.

* every batch of prompts this process reads is appended to ``<out_dir>/rows.<process>.jsonl``
  (its dataset row indices), so a test can check that each process read only its own slice;
* with ``KLQ_TEST_PAUSE_AFTER=K``, the process writes ``<out_dir>/paused.<process>`` once the
  checkpoint of iteration K is complete and then waits forever, so a test can SIGKILL it at a
  known point (waiting on that file, not on the clock).

Usage: ``python -m tests.helpers.mp_train PRESET [--field value ...]`` (as ``klq train``).
"""

import json
import os
import sys
import time


class _RecordingPrompts:
    def __init__(self, prompts, path):
        self.prompts, self.path = prompts, path

    def __iter__(self):
        return self

    def __next__(self):
        batch = next(self.prompts)
        with open(self.path, "a") as f:
            f.write(json.dumps({"index": batch["index"].tolist()}) + "\n")
        return batch

    def state_dict(self):
        return self.prompts.state_dict()

    def load_state_dict(self, state):
        self.prompts.load_state_dict(state)


def main(argv):
    from experiments import tasks
    from experiments import train as train_cmd
    from klq_jax.train import loop

    cfg = train_cmd.parse_args(argv)
    build = tasks.build_experiment

    def recording_build(*args, **kwargs):
        import jax

        exp = build(*args, **kwargs)
        os.makedirs(cfg.out_dir, exist_ok=True)
        exp.prompts = _RecordingPrompts(
            exp.prompts, os.path.join(cfg.out_dir, f"rows.{jax.process_index()}.jsonl"))
        return exp

    tasks.build_experiment = recording_build
    pause = os.environ.get("KLQ_TEST_PAUSE_AFTER")
    if pause:
        save = loop.Checkpointer.save

        def save_then_pause(self, step, state, meta, **kw):
            # The checkpoint is complete on disk before the marker (saves are asynchronous).
            save(self, step, state, meta, **dict(kw, wait=True))
            if step == int(pause):
                import jax

                open(os.path.join(cfg.out_dir, f"paused.{jax.process_index()}"), "w").close()
                while True:
                    time.sleep(1)

        loop.Checkpointer.save = save_then_pause
    train_cmd.run(cfg)


if __name__ == "__main__":
    main(sys.argv[1:])
