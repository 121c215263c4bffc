"""thinkgate.ids: random ids from a buffer of OS random bytes, never repeated, not even by a forked child."""

import os

from thinkgate.ids import random_hex


def test_ids_are_hex_of_the_asked_length_and_never_repeat_across_refills():
    ids = [random_hex() for _ in range(2000)]  # ~8 refills of the 4 KiB buffer
    assert all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert len(set(ids)) == len(ids)
    assert len(random_hex(3)) == 6 and len(random_hex(5000)) == 10000


def test_a_forked_child_does_not_hand_out_its_parents_bytes():
    random_hex()  # the buffer is filled, bytes remain in it
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its next id, to the parent
        os.write(w, random_hex().encode())
        os._exit(0)
    os.waitpid(pid, 0)
    child = os.read(r, 64).decode()
    assert len(child) == 32 and child != random_hex()
