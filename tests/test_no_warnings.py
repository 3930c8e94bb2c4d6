"""`import sqcompile` and one compile print nothing: no Python warning (FX, torch, transformers' FutureWarnings)
and no log record at WARNING or above (transformers' `past_key_values` deprecation is a logged warning)."""
from __future__ import annotations

import logging
import os
import subprocess
import sys
import warnings
from pathlib import Path

import torch
from transformers import StaticCache

from sqcompile.calibrate import cache_kwarg

ROOT = Path(__file__).resolve().parent.parent


def test_import_prints_nothing():
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]))
    r = subprocess.run([sys.executable, "-W", "always", "-c", "import sqcompile"], env=env, capture_output=True,
                       text=True, timeout=300)
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stderr


class _Records(logging.Handler):
    def __init__(self):
        super().__init__(logging.WARNING)
        self.records: list[logging.LogRecord] = []

    def emit(self, record):
        self.records.append(record)


def test_tiny_llama_compile_warns_nothing(tiny_llama):
    """One compile and a few steps, and our own eager entry points that take a cache (teacher forcing,
    `Optimized.generate`): the cache goes by the keyword the installed transformers takes."""
    import transformers.utils.logging as hf_logging

    import sqcompile
    from sqcompile.evaluate import teacher_forced_picks

    hf_logging.warning_once.cache_clear()  # a deprecation logged once earlier in this process must show again
    handler = _Records()
    loggers = [logging.getLogger(), logging.getLogger("transformers"), logging.getLogger("torch")]
    for logger in loggers:
        logger.addHandler(handler)
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            torch._dynamo.reset()
            step = torch.compile(tiny_llama.forward, backend="spectralquant", options={"lower": "eager"})
            kv = {cache_kwarg(tiny_llama): StaticCache(config=tiny_llama.config, max_cache_len=16)}
            with torch.no_grad():
                x = torch.randint(0, 128, (1, 5), generator=torch.Generator().manual_seed(0))
                for _ in range(3):  # prefill, then decode steps
                    x = step(input_ids=x, use_cache=True, **kv).logits[:, -1:].argmax(-1)
                ids = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(1))
                teacher_forced_picks(tiny_llama, ids, torch.ones_like(ids), ids[:, :3],
                                     StaticCache(config=tiny_llama.config, max_cache_len=16))
            other = type(tiny_llama)(tiny_llama.config).eval()  # optimize replaces its forward
            sqcompile.optimize(other, max_cache_len=16, lower="eager").generate(ids, max_new_tokens=2, do_sample=False,
                                                                               pad_token_id=0)
    finally:
        for logger in loggers:
            logger.removeHandler(handler)
    assert not caught, [f"{w.category.__name__}: {w.message}" for w in caught]
    assert not handler.records, [f"{r.name}: {r.getMessage()}" for r in handler.records]
