"""The lines that native code prints on every run, kept off the terminal unless `--verbose`.

TensorFlow's C++ runtime (oneDNN, CUDA probing, CPU features) and Beam's worker processes
write straight to file descriptor 2 before any Python logging setting can reach them
(TensorFlow 2.21 ignores TF_CPP_MIN_LOG_LEVEL, GLOG_minloglevel and ABSL_MIN_LOG_LEVEL for
these). `filtered_stderr` puts a pipe on descriptor 2 for the command's duration; a thread
copies every line to the real stderr except the fixed list below: start-up notices that are
the same on every run and say nothing about the user's job. Warnings and errors that are not
on the list, Python's included, pass through unchanged. A thread that ends the process with
`os._exit` calls `drain()` first, so that its last lines reach the terminal.

It lives in kcp.core, not in the CLI, because the stages' own hard exits (the tuning worker's
watchdog) must drain it.
"""

from __future__ import annotations

import contextlib
import os
import re
import signal
import sys
import threading

from kcp.core.errors import write_failure

# Each pattern is one known line; anything else is shown.
ROUTINE_LINES = re.compile(
    rb"All log messages before absl::InitializeLog\(\) is called are written to STDERR"
    rb"|\] oneDNN custom operations are on\."
    rb"|\] Could not find cuda drivers on your machine, GPU will not be used\."
    rb"|\] failed call to cuInit: "
    rb"|\] This TensorFlow binary is optimized to use available CPU instructions"
    rb"|^To enable the following instructions: .* rebuild TensorFlow with the appropriate compiler flags\."
    rb"|No semi_persistent_directory found"
    rb"|Discarding unparseable args: \["
    # a CPU without AVX-512 (every run that holds int64 tensors: text, language, tuning)
    rb"|\] oneDNN supports DT_INT64 only on platforms with AVX-512\. Falling back to the default Eigen"
    # TensorFlow's Python writes an attribute its own C++ MapDataset does not list (restoring a tf.data
    # iterator: a resumed search); "unknown attributes will be ignored"
    rb"|\] NodeDef mentions attribute use_unbounded_threadpool which is not in the op definition"
    # multi_worker: Keras feeds MultiWorkerMirroredStrategy through a generator dataset, which tf.data's
    # graph rewrites skip (once per worker and run; the data is read whole either way)
    rb"|dataset\.cc:\d+\] Input of GeneratorDatasetOp::Dataset will not be optimized because the dataset does not"
    # the C++ side of an input error the Python side raises and kcp answers (a 400, a dead letter)
    rb"|local_rendezvous\.cc:\d+\] Local rendezvous is aborting with status: INVALID_ARGUMENT"
    # a Beam worker process stopped by the Ctrl-C that stops the command (which says so itself),
    # logged by the driver as its one long line, at times before the driver has seen the signal
    rb"|Worker: severity: CRITICAL .*Python sdk harness failed: .*\\nKeyboardInterrupt")


# multi_worker: a peer that is gone aborts every collective in flight, and the C++ runtime logs each
# abort with the peer's gRPC status over several lines, before the Python error that kcp answers with
# one line naming the peer's failure (trainer/distribute.py `lost_peer_said`); --verbose shows them
PEER_LOST_LINES = re.compile(
    rb"base_collective_executor\.cc:\d+\] BaseCollectiveExecutor::StartAbort UNAVAILABLE: "
    rb"|ring_alg\.cc:\d+\] Aborting RingReduce with UNAVAILABLE: "
    rb"|local_rendezvous\.cc:\d+\] Local rendezvous is aborting with status: UNAVAILABLE: ")

# TensorFlow's op context under an error status ("\t [[{{function_node ...}}{{node map/while/Assert}}]]"):
# routine when it continues a routine line, kept under any other; and the lines that continue a
# peer's abort (its gRPC detail, the tasks TensorFlow names as unhealthy)
CONTINUATION = re.compile(rb"^\t \[\[")
PEER_LOST_CONTINUATION = re.compile(
    rb"^(?:\t \[\[|Additional GRPC error information from remote target |:UNKNOWN:Error received from peer "
    rb"|The error could be from a previous operation\. |/job:\w+/replica:\d+/task:\d+$"
    rb"|The tasks have crashed\. )")


def is_routine(line: bytes) -> bool:
    return ROUTINE_LINES.search(line) is not None or PEER_LOST_LINES.search(line) is not None


def shown_lines(lines: list, after_routine: bool | str = False) -> tuple[list, bool | str]:
    """The lines that are not routine, and whether the last line was (for the next call: "peer"
    within a peer's abort record)."""
    shown = []
    for line in lines:
        if PEER_LOST_LINES.search(line) or (after_routine == "peer" and PEER_LOST_CONTINUATION.match(line)):
            routine = "peer"
        else:
            routine = is_routine(line) or (bool(after_routine) and CONTINUATION.match(line) is not None)
        if not routine:
            shown.append(line)
        after_routine = routine
    return shown, after_routine


# After a Ctrl-C only kcp's own lines pass: the terminal sends SIGINT to the whole process group,
# and each of Beam's worker processes printed its KeyboardInterrupt traceback, and the driver's
# threads their "Worker subprocess exited with return code -2" (91 lines for one `kcp predict`).
OWN_LINE = re.compile(rb"^kcp [\w-]+: ")


class _Filter:
    """The active filter of this process: what `drain` writes and waits for, and whether a Ctrl-C
    came (then only `OWN_LINE`s pass)."""

    def __init__(self):
        self.sentinel = b"\x00kcp-stderr-drain-%d" % os.getpid()
        self.drained = threading.Event()
        self.interrupted = False


_active: _Filter | None = None


def drain(timeout: float = 2.0) -> None:
    """Returns once everything written to stderr before the call has been passed on (or after
    `timeout` seconds). For code about to end the process with `os._exit`, which would kill the
    forwarding thread with lines still in the pipe. Nothing to do when no filter is active."""
    active = _active
    if active is None:
        return
    sys.stderr.flush()
    active.drained.clear()
    try:
        os.write(2, active.sentinel + b"\n")  # one write under PIPE_BUF: lands after all earlier ones
    except OSError:
        return
    active.drained.wait(timeout)


class _Said:
    failed = False  # set by the caller once it has printed a write failure's one line


@contextlib.contextmanager
def write_failure_said_once():
    """Within the block, an exception in a finalizer that is a full disk or a read-only folder (h5py's
    "Exception ignored in: h5py._objects.ObjectID.__dealloc__", after its traceback, which Cython
    prints through sys.excepthook: a dozen lines each time a weights file that could not be written
    is let go) is held back; it is dropped if the command ends by naming that failure in its own
    line (the caller sets `.failed` on what the block yields; kcp.core.errors.write_failure), and
    shown as Python would have shown it otherwise. Any other goes to Python's hooks at once."""
    unraisable_hook, except_hook = sys.unraisablehook, sys.excepthook
    said, held = _Said(), []

    def on_unraisable(unraisable):
        if write_failure(unraisable.exc_value) is None:
            unraisable_hook(unraisable)
        else:
            held.append(lambda: unraisable_hook(unraisable))

    def on_exception(kind, value, trace):
        if write_failure(value) is None:
            except_hook(kind, value, trace)
        else:
            held.append(lambda: except_hook(kind, value, trace))

    sys.unraisablehook, sys.excepthook = on_unraisable, on_exception
    try:
        yield said
    finally:
        sys.unraisablehook, sys.excepthook = unraisable_hook, except_hook
        if not said.failed:
            for show in held:
                show()


def exit_at_once(_signum=None, _frame=None, code: int = 130) -> None:
    """Ends the process with `code` (130: the shell's code for SIGINT) at once, after passing on what
    is in stdout's buffer and stderr's pipe; no finalizer runs."""
    with contextlib.suppress(Exception):
        sys.stdout.flush()
        sys.stderr.flush()
    drain(0.5)
    os._exit(code)


@contextlib.contextmanager
def filtered_stderr(enabled: bool = True, hard_exit: bool = False):
    """Within the block, drops the routine lines from everything written to descriptor 2, by
    this process and by the processes it starts. With `hard_exit` (a process that ends with the
    block), a second Ctrl-C, in the block after a first or after an interrupted block, ends the
    process at once (130)."""
    try:
        original = os.dup(2)
    except OSError:  # no descriptor 2 (a detached process): nothing to filter
        enabled, original = False, None
    if not enabled:
        if original is not None:
            os.close(original)
        yield
        return
    global _active
    sys.stderr.flush()
    read_end, write_end = os.pipe()
    os.dup2(write_end, 2)
    os.close(write_end)

    active = _Filter()

    def pump() -> None:
        # Never stops reading before the pipe's end: a full pipe would block every writer.
        with os.fdopen(read_end, "rb", buffering=0) as pipe:
            pending, after_routine = b"", False
            while chunk := pipe.read(65536):
                pending += chunk
                *lines, pending = pending.split(b"\n")
                drained = active.sentinel in lines
                kept, after_routine = shown_lines([line for line in lines if line != active.sentinel], after_routine)
                if active.interrupted:
                    kept = [line for line in kept if OWN_LINE.match(line)]
                shown = b"".join(line + b"\n" for line in kept)
                with contextlib.suppress(OSError):
                    if shown:
                        os.write(original, shown)
                if drained:
                    active.drained.set()
            with contextlib.suppress(OSError):
                if pending and shown_lines([pending], after_routine)[0]:
                    os.write(original, pending)

    thread = threading.Thread(target=pump, name="kcp-stderr", daemon=True)
    thread.start()
    _active = active

    def on_interrupt(signum, frame):  # Python's own handler, after noting the Ctrl-C
        if active.interrupted and hard_exit:  # a second Ctrl-C while the first winds down: stop now, as a kill
            exit_at_once(signum, frame)        # would, not with a KeyboardInterrupt traceback out of the clean-up
        active.interrupted = True
        signal.default_int_handler(signum, frame)

    ours = threading.current_thread() is threading.main_thread() and \
        signal.getsignal(signal.SIGINT) is signal.default_int_handler
    if ours:
        signal.signal(signal.SIGINT, on_interrupt)
    try:
        yield
    finally:
        if ours and signal.getsignal(signal.SIGINT) is on_interrupt:  # Python's own again, unless the command
            # was interrupted and is ending: then a second Ctrl-C (or `timeout` passing one on) ends it at once
            signal.signal(signal.SIGINT, exit_at_once if active.interrupted and hard_exit
                          else signal.default_int_handler)
        _active = None
        sys.stderr.flush()
        os.dup2(original, 2)  # closes this process's end of the pipe
        # The pump ends when every writer has closed the pipe; a worker process that outlives
        # the command must not hold it up.
        thread.join(timeout=2.0)
        if not thread.is_alive():
            os.close(original)
