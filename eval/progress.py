"""One progress bar style for every long eval loop (tqdm on stderr, silent when NHA_EVAL_QUIET=1)."""
import os

from tqdm import tqdm


def progress(iterable, **kwargs):
    return tqdm(iterable, disable=os.environ.get("NHA_EVAL_QUIET") == "1", leave=False, **kwargs)
