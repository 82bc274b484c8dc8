from arvision.tasks.ema import EMA
from arvision.tasks.errors import NonFiniteLoss
from arvision.tasks.generator_task import GeneratorTask
from arvision.tasks.tokenizer_task import TokenizerTask

__all__ = ["EMA", "GeneratorTask", "NonFiniteLoss", "TokenizerTask"]
