"""Start and end gloo process groups in test workers so that no gloo thread outlives its worker.

Why the ending matters (torch 2.13, Python 3.11): ``destroy_process_group()`` only drops
torch.distributed's own references to a group. Whatever else still holds the group keeps its
gloo backend alive, with its ``pt_gloo_runloop`` worker threads and ``gloo_tcp_loop`` thread:
DTensor's sharding-propagation caches (FSDP2's DTensor parameters leave ``DeviceMesh`` objects
there, and a mesh holds its groups in ``_pg_registry``), or reference cycles around a DDP
module (Lightning's trainer, strategy and module point at each other). Such a backend is then
destroyed inside interpreter finalization (seen in gdb: ``~ProcessGroupGloo`` called from
``finalize_modules`` through ``cleanup_thread_local_native_sharding_propagator_caches``). A C++
thread that takes the GIL while the interpreter finalizes (a tensor released from C++ takes it:
``TensorImpl::decref_pyobject``) is ended with ``pthread_exit``; that unwind crossing a
``noexcept`` frame is ``std::terminate``, "terminate called without an active exception", and
the worker dies of SIGABRT after its test had passed.

:func:`end_process_group` therefore releases everything that pins a group and waits until the
gloo threads have been joined, while Python is still fully alive. A group pinned where Python
cannot release it (DDP's C++ reducer after backward passes) is reported, or, in a spawned
worker whose results are written, the worker ends without interpreter finalization.
"""

from __future__ import annotations

import atexit
import contextlib
import datetime
import gc
import glob
import os
import socket
import sys
import time
from typing import Iterator

import torch.distributed as dist

GLOO_THREADS = ("pt_gloo_runloop", "gloo_tcp_loop")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that was free a moment ago."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def gloo_thread_count() -> int:
    """Threads of this process that belong to a gloo backend (by their names in /proc)."""
    count = 0
    for path in glob.glob("/proc/self/task/*/comm"):
        try:
            with open(path) as f:
                count += f.read().strip() in GLOO_THREADS
        except OSError:  # the thread ended meanwhile
            pass
    return count


def init_process_group(rank: int, world: int, port: int, timeout_s: float = 60.0) -> None:
    """gloo on 127.0.0.1:``port`` with a timeout that turns a hang into a failure."""
    os.environ["MASTER_ADDR"], os.environ["MASTER_PORT"] = "127.0.0.1", str(port)
    dist.init_process_group("gloo", rank=rank, world_size=world, timeout=datetime.timedelta(seconds=timeout_s))


@contextlib.contextmanager
def process_group(rank: int, world: int, port: int, timeout_s: float = 60.0) -> Iterator[None]:
    """gloo for the block, ended by :func:`end_process_group` (only destroyed when the block raises;
    a group still held after it ends the worker process, see ``exit_if_held``).
    Build models that hold the group (DDP, FSDP) in a function called from the block, so that
    they are gone when it ends."""
    init_process_group(rank, world, port, timeout_s)
    try:
        yield
    except BaseException:
        if dist.is_initialized():
            dist.destroy_process_group()
        raise
    end_process_group(wait_s=10.0, exit_if_held=True)


def end_process_group(wait_s: float = 30.0, exit_if_held: bool = False) -> None:
    """Destroy every process group and wait until their gloo threads are gone.

    Call after the last collective, once nothing of the caller needs the groups (models that
    hold a group, e.g. DDP or FSDP modules, should be out of scope). If gloo threads still run
    after ``wait_s`` seconds, something outside Python's reach holds a group (DDP's C++ reducer
    does, after training): with ``exit_if_held`` the process then ends here with exit code 0,
    without interpreter finalization (for a worker whose results are written); otherwise
    ``RuntimeError``.
    """
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()
    if gloo_thread_count() == 0:
        return
    from torch.distributed.tensor.debug import _clear_sharding_prop_cache

    _clear_sharding_prop_cache()  # DTensorSpec -> DeviceMesh -> _pg_registry -> the group
    deadline = time.monotonic() + wait_s
    while True:
        gc.collect()  # cycles around DDP/FSDP modules and trainers hold groups too
        left = gloo_thread_count()
        if left == 0:
            return
        if time.monotonic() > deadline:
            break
        time.sleep(0.05)
    if exit_if_held:
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(0)
    raise RuntimeError(
        f"{left} gloo thread(s) still run {wait_s:.0f} s after destroy_process_group(): something still "
        "holds a process group, and its backend would be destroyed during interpreter shutdown"
    )


def _end_at_exit() -> None:
    try:
        end_process_group(wait_s=5.0)
    except RuntimeError as err:  # a launcher's exit code must stay its own: report, do not exit here
        print(f"distributed_helpers: {err}", file=sys.stderr, flush=True)


def end_process_group_at_exit() -> None:
    """Run :func:`end_process_group` in an ``atexit`` hook: for workers whose launcher (Lightning's
    ddp_spawn, a torchrun script) still holds the model when the worker's own code ends. atexit
    hooks run before the interpreter starts finalizing, with every module still usable."""
    atexit.register(_end_at_exit)
