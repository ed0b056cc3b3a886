"""Where a stage's processes run: in this process, or started by Accelerate's or torchrun's own CLI.

A :class:`Launch` is what ``fpo run|train|precompute --launcher L -- FLAGS`` asked for. The
flags go to the launcher untouched; the process count is read from them the way the launcher
itself reads them (Accelerate's argument parser, its config file and its choice of launcher;
torchrun's parser), so that the train stage can make ``train.batch_size`` the global batch
(micro_batch_size x accumulation x processes) before anything starts. The processes check
the count again when they run (the plugin compares it with ``WORLD_SIZE``).

Children are watched: a Ctrl-C here waits for the child to stop on its own signal before it
is passed on, a child ended by a signal is an interrupted stage (:class:`StageInterrupted`),
and whether a stage finished is decided by what the stage wrote (the train stage reads its
trainer state), never by an exit status alone.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import subprocess
import sys
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path

LAUNCHERS: tuple[str, ...] = ("inprocess", "python", "accelerate", "torchrun")
# Without HF_HUB_OFFLINE TRL/HF were seen to stall for minutes on machines with no network;
# these are defaults only — a value already in the environment wins.
CHILD_ENV_DEFAULTS = {"AXOLOTL_DO_NOT_TRACK": "1", "TOKENIZERS_PARALLELISM": "false"}
STOP_GRACE_SECONDS = 60  # a child that received the Ctrl-C too gets this long to save and exit


class LaunchError(ValueError):
    """A launcher or launcher flags that cannot start the stage."""


class StageInterrupted(Exception):
    """A stage's process stopped before the stage finished (a signal, or a Ctrl-C that
    reached only the child, which Axolotl answers by saving and exiting 0)."""


@dataclass(frozen=True)
class Launch:
    """``launcher`` and the ``args`` given after ``--`` (passed to it as they are)."""

    launcher: str = "inprocess"
    args: tuple[str, ...] = ()

    def __post_init__(self):
        if self.launcher not in LAUNCHERS:
            raise LaunchError(f"--launcher: {self.launcher!r} is not one of {', '.join(LAUNCHERS)}")
        if self.launcher in ("inprocess", "python") and self.args:
            raise LaunchError(f"--launcher {self.launcher} runs one process and takes no launcher flags "
                              f"(got {' '.join(self.args)}; hint: --launcher accelerate or torchrun)")

    @property
    def subprocess(self) -> bool:
        return self.launcher != "inprocess"

    @cached_property
    def processes(self) -> int:
        """How many processes the launcher starts (all machines together)."""
        if self.launcher == "accelerate":
            return _accelerate_processes(list(self.args))
        if self.launcher == "torchrun":
            return _torchrun_processes(list(self.args))
        return 1

    def describe(self) -> str:
        n = f"{self.processes} process{'es' if self.processes != 1 else ''}"
        if not self.subprocess:
            return f"{n} (in this process)"
        said = f"{n} ({' '.join([self.launcher, *self.args])})"
        if self.launcher == "accelerate" and self.processes == 1 and _asked_processes(self.args) > 1:
            said += ("; Accelerate starts one process for these flags: it starts several with --multi_gpu, "
                     "by itself only where it sees more than one GPU")
        return said

    def module_command(self, module: str, *argv: str) -> list[str]:
        """``python -m module argv`` started by this launcher (this interpreter throughout)."""
        if self.launcher == "accelerate":
            return [sys.executable, "-m", "accelerate.commands.launch", *self.args, "-m", module, *argv]
        if self.launcher == "torchrun":
            return [sys.executable, "-m", "torch.distributed.run", *self.args, "-m", module, *argv]
        return [sys.executable, "-m", module, *argv]


@contextlib.contextmanager
def _quiet(logger_name: str):
    """Parsing the flags repeats warnings the real launch prints again: keep them for that."""
    logger = logging.getLogger(logger_name)
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with contextlib.redirect_stderr(io.StringIO()) as err:
            yield err
    finally:
        logger.setLevel(level)


def _parse(parser, args: list[str], launcher: str):
    with _quiet(launcher) as err:
        try:
            return parser.parse_args([*args, "fpo-stage"])  # the launched module's place
        except SystemExit:
            said = [line for line in err.getvalue().splitlines() if line.strip()]
            raise LaunchError(f"--launcher {launcher}: {said[-1] if said else 'invalid flags'} "
                              f"(flags after --: {' '.join(args) or 'none'})") from None


def _accelerate_processes(args: list[str]) -> int:
    """What ``accelerate launch ARGS`` starts: its parser and config-file defaults
    (``_validate_launch_command``, as ``launch_command`` runs it), then the launcher it picks."""
    from accelerate.commands.launch import _validate_launch_command, launch_command_parser

    ns = _parse(launch_command_parser(), args, "accelerate")
    try:
        with _quiet("accelerate"):
            ns, _, _ = _validate_launch_command(ns)
    except (ValueError, OSError) as exc:
        raise LaunchError(f"--launcher accelerate: {exc}") from None
    several = not ns.cpu and (ns.multi_gpu or ns.use_deepspeed or ns.use_fsdp or ns.use_megatron_lm)
    if several or getattr(ns, "mpirun_hostfile", None):
        return int(ns.num_processes)
    # Accelerate's simple launcher: one process, whatever --num_processes says (on a machine
    # without GPUs several processes need --multi_gpu, or a config file that says MULTI_GPU)
    return 1


def _asked_processes(args: tuple[str, ...]) -> int:
    for i, arg in enumerate(args):
        for flag in ("--num_processes", "--num-processes"):
            value = arg.removeprefix(flag + "=") if arg.startswith(flag + "=") else (args[i + 1] if arg == flag and i + 1 < len(args) else None)
            if value is not None and value.isdigit():
                return int(value)
    return 0


def _torchrun_processes(args: list[str]) -> int:
    """nnodes x nproc_per_node, as torchrun's own parser reads them."""
    from torch.distributed.run import determine_local_world_size, get_args_parser, parse_min_max_nnodes

    ns = _parse(get_args_parser(), args, "torchrun")
    try:
        low, high = parse_min_max_nnodes(ns.nnodes)
        per_node = determine_local_world_size(ns.nproc_per_node)
    except (ValueError, RuntimeError) as exc:
        raise LaunchError(f"--launcher torchrun: {exc}") from None
    if low != high:
        raise LaunchError(f"--launcher torchrun: --nnodes {ns.nnodes} lets the number of machines change during "
                          "training, so train.batch_size cannot be split before the launch (hint: give a fixed --nnodes N)")
    return high * per_node


# --- children --------------------------------------------------------------------------------
def child_env() -> dict[str, str]:
    """This environment, with the defaults above and this interpreter's bin folder first on
    PATH (Axolotl starts ``accelerate`` / ``torchrun`` by name)."""
    from fpo_recipes.ownership import LOCKS_HELD_ENV

    env = {**CHILD_ENV_DEFAULTS, **os.environ, LOCKS_HELD_ENV: str(os.getpid())}
    bin_dir = str(Path(sys.executable).parent)
    if bin_dir not in env.get("PATH", "").split(os.pathsep):
        env["PATH"] = os.pathsep.join(filter(None, [bin_dir, env.get("PATH")]))
    return env


def run_child(cmd: list[str], what: str) -> None:
    """Run ``cmd``; raise StageInterrupted if a signal ended it, RuntimeError on a failure.

    A Ctrl-C in a terminal reaches the child's processes too: the child then gets
    STOP_GRACE_SECONDS to stop by itself (Axolotl saves the model) before it is terminated,
    and the KeyboardInterrupt is passed on."""
    proc = subprocess.Popen(cmd, env=child_env())  # noqa: S603 - our own interpreter and arguments
    try:
        rc = proc.wait()
    except KeyboardInterrupt:
        try:
            proc.wait(timeout=STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            proc.terminate()
            try:
                proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        raise
    if rc < 0 or rc in (130, 137, 143):  # ended by a signal (negative: as Popen reports it; 128+n: a shell's)
        raise StageInterrupted(f"{what} was stopped by a signal (exit status {rc})")
    if rc != 0:
        raise RuntimeError(f"{what} failed with exit status {rc} (its own messages are above)")


def main_process() -> bool:
    """Whether this is rank 0 of a launched group (or not launched at all)."""
    return os.environ.get("RANK", "0") == "0"
