"""Two processes and petune.dist's guards against hangs (tests/test_reliability.py runs it).

    torchrun --nproc_per_node 2 dist_check.py timeout FIRST SECOND
        two barriers; before each, process 0 works alone (sleeps) FIRST / SECOND seconds: with
        PETUNE_COLLECTIVE_TIMEOUT shorter than SECOND, the second barrier fails
    torchrun --nproc_per_node 2 dist_check.py first
        process 0 fails inside main_process_first: every process prints its error and exits 2
"""

import sys
import time

from petune.dist import collective_timeout, main_process_first, process_state


def timeout(first: float, second: float) -> None:
    state = process_state()
    print(f"rank {state.process_index}: timeout {collective_timeout():g} s", flush=True)
    for n, seconds in enumerate((first, second), 1):
        if state.is_main_process:
            time.sleep(seconds)
        state.wait_for_everyone()
        print(f"rank {state.process_index}: barrier {n} passed", flush=True)


def first() -> None:
    state = process_state()
    try:
        with main_process_first():
            if state.is_main_process:
                raise ValueError("corpus.jsonl:3: not valid JSON")
            print(f"rank {state.process_index}: read the main process's cache", flush=True)
    except ValueError as e:
        print(f"rank {state.process_index}: error: {e}", flush=True)
        sys.exit(2)


if __name__ == "__main__":
    if sys.argv[1] == "timeout":
        timeout(float(sys.argv[2]), float(sys.argv[3]))
    else:
        first()
