"""Encode a fixed collection to an embedding store with a tiny random BART, on as many processes as
it is launched with (python / torchrun); the store checks in tests/test_store.py run it.

    python store_check.py STORE [--slow SECONDS]

``--slow`` sleeps before encoding each chunk, so a test can kill the run mid-encode. A
:class:`petune.store.StoreError` prints ``rank R: error: ...`` and exits 2, as the recipes do.
"""

import functools
import logging
import sys
import time

import torch

import petune  # noqa: E402
from conftest import tiny  # noqa: E402
from test_embed import CharTokenizer  # noqa: E402

TEXTS = [f"passage {i}: " + "lorem ipsum dolor "[: (7 * i) % 18] + "x" * (i % 11) for i in range(120)]
CHUNK = 8


def main(argv):
    logging.basicConfig(level=logging.INFO, format="%(name)s %(message)s")
    torch.set_num_threads(1)  # the same arithmetic in every process and in the test's reference
    if "--slow" in argv:  # each chunk's encode waits first
        seconds, encode = float(argv[argv.index("--slow") + 1]), petune.embed.encode
        petune.embed.encode = functools.wraps(encode)(lambda *a, **kw: time.sleep(seconds) or encode(*a, **kw))
    try:
        petune.encode_to_store(tiny("bart"), CharTokenizer(), iter(TEXTS), argv[0], chunk_size=CHUNK, progress=False)
    except petune.store.StoreError as e:
        print(f"rank {petune.dist.process_state().process_index}: error: {e}", file=sys.stderr, flush=True)
        sys.exit(2)


if __name__ == "__main__":
    main(sys.argv[1:])
