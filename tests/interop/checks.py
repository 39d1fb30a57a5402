"""The small harness both interop scripts use: named checks that report and keep going."""

import traceback

RESULTS = []


def check(name):
    """Decorator: runs the check, prints ok/FAIL with the reason, records the outcome."""
    def wrap(fn):
        def run(*a, **k):
            try:
                fn(*a, **k)
                RESULTS.append((name, None))
                print(f"ok    {name}")
            except Exception as e:  # noqa: BLE001 - report every failure, keep going
                RESULTS.append((name, e))
                print(f"FAIL  {name}: {e}")
                traceback.print_exc()
        return run
    return wrap


def failures():
    """Number of failed checks so far, after printing the tally."""
    failed = sum(1 for _, e in RESULTS if e is not None)
    print(f"{len(RESULTS) - failed} passed, {failed} failed")
    return failed
