"""Loaded by Python at start-up when this folder is on PYTHONPATH (tests/test_faults.py): kills the arvision-train
process with a real signal at the point `ARVISION_TEST_KILL=<stage>:<point>:<step>:<signal>` names.

    stage  1 (tokenizer) or 2 (generator)
    point  step (entering training step <step>), write (half-way through writing the checkpoint of step <step>),
           eval (the stage's evaluation)
"""

import os
import signal

SPEC = os.environ.get("ARVISION_TEST_KILL")

if SPEC:
    stage, point, step, signame = SPEC.split(":")
    step, signum = int(step), getattr(signal, signame)

    def die() -> None:
        # SIGKILL ends the process here; SIGTERM too unless a handler is installed (Lightning's, during fit: it
        # stops the training loop at its next check, as a pre-empted SLURM job is stopped)
        os.kill(os.getpid(), signum)

    if point == "step":
        from arvision.tasks import GeneratorTask, TokenizerTask

        task = GeneratorTask if stage == "2" else TokenizerTask
        original_step = task.training_step

        def training_step(self, batch, batch_idx):
            if self.completed_steps() == step:
                die()
            return original_step(self, batch, batch_idx)

        task.training_step = training_step
    elif point == "write":
        import io

        import lightning.fabric.plugins.io.torch_io as torch_io
        import torch

        original_save = torch_io._atomic_save

        def atomic_save(checkpoint, filepath):
            if checkpoint.get("completed_steps") == step and ("generator" in str(filepath)) == (stage == "2"):
                buffer = io.BytesIO()
                torch.save(checkpoint, buffer)
                with open(f"{filepath}.partial-write", "wb") as handle:  # the bytes a kill mid-write leaves
                    handle.write(buffer.getvalue()[: len(buffer.getvalue()) // 2])
                    handle.flush()
                    die()
            return original_save(checkpoint, filepath)

        torch_io._atomic_save = atomic_save
    elif point == "eval":
        import arvision.pipeline as pipeline

        name = "evaluate_generator" if stage == "2" else "evaluate_tokenizer"
        original_eval = getattr(pipeline, name)

        def evaluate(*args, **kwargs):
            die()
            return original_eval(*args, **kwargs)

        setattr(pipeline, name, evaluate)
