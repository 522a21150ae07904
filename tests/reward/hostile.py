"""Graders for the pool tests that misbehave on purpose (importable by the spawned workers)."""

import os
import time


def hang(response, truth):
    if response == "hang":
        time.sleep(3600)
    return 1.0, "correct"


def crash(response, truth):
    if response == "crash":
        os._exit(3)
    return 1.0, "correct"


def hog(response, truth):
    if response == "hog":
        _ = bytearray(8 << 30)
    return 1.0, "correct"


def crash_always(response, truth):
    os._exit(3)
