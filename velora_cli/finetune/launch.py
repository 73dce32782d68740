"""`velora finetune RECIPE --nproc-per-node N [--nnodes M --node-rank R --rdzv-endpoint HOST:PORT]`: this process
becomes torchrun's agent (torch.distributed.run, as torchtune's `tune run` does) and starts N workers running
`python -m velora_cli finetune RECIPE ...` with the same options minus the launcher's.

What the launcher adds to torchrun: the recipe is checked before any worker starts; more processes than devices,
a node that never joins and a crashed rank are one `error:` line and a non-zero exit instead of torchrun's report
(checkpoints are written whole or not at all, so the same command resumes). Each rank's output goes to its own log
under RUN_DIR/logs (torchrun's --log-dir/--redirects): the console shows local rank 0's progress and errors, a
worker's traceback goes to its log only (cli.main, RANK_LOGS), and a crash's line names the logs, so the surviving
ranks' tracebacks from the broken connection do not bury it.
"""

from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from velora_cli.common.bounds import clip
from velora_cli.common.device import cpu_cores
from velora_cli.common.errors import UsageError, VeloraError
from velora_cli.config.load import load_recipe
from velora_cli.finetune.preflight import check_trainable
from velora_cli.rundir import ownership

# Set for the workers: where their logs are (cli.main then writes an unexpected traceback to stdout, the log only).
RANK_LOGS = "VELORA_RANK_LOGS"


@dataclass(frozen=True)
class Launch:
    nproc_per_node: int
    nnodes: int = 1
    node_rank: int = 0
    rdzv_endpoint: str | None = None

    def check(self) -> None:
        """The launcher flags agree with each other (before the recipe is read or anything starts)."""
        if self.nnodes > 1 and not self.rdzv_endpoint:
            raise UsageError("--nnodes > 1 needs --rdzv-endpoint HOST:PORT (the same on every node)")
        if not 0 <= self.node_rank < self.nnodes:
            raise UsageError(f"--node-rank {self.node_rank} is outside 0..{self.nnodes - 1} (--nnodes {self.nnodes})")
        if self.rdzv_endpoint is not None:
            host, _, port = self.rdzv_endpoint.rpartition(":")
            if not host or not port.isdigit() or not 1 <= int(port) <= 65535:
                raise UsageError(f"--rdzv-endpoint {clip(self.rdzv_endpoint)}: expected HOST:PORT (node 0's address "
                                 "and a free port 1-65535, the same on every node)")  # fmt: skip


def child_arguments(recipe: Path, overrides: list[str], output_dir: Path | None, max_steps: int | None,
                    resume: bool, stages: str | None, verbose: bool, force: bool = False) -> list[str]:  # fmt: skip
    """The worker's `velora finetune` arguments: the user's, without the launcher flags."""
    args = [str(recipe)]
    for text in overrides:
        args += ["--set", text]
    if output_dir is not None:
        args += ["--output-dir", str(output_dir)]
    if max_steps is not None:
        args += ["--max-steps", str(max_steps)]
    if not resume:
        args.append("--no-resume")
    if stages is not None:
        args += ["--stages", stages]
    if verbose:
        args.append("--verbose")
    if force:  # every rank makes the same ownership check (rundir.ownership)
        args.append("--force")
    return args


def _check_devices(nproc: int) -> None:
    if torch.cuda.is_available() and os.environ.get("VELORA_DEVICE", "") != "cpu":
        have, what = torch.cuda.device_count(), "GPUs"
    else:
        have, what = os.cpu_count() or 1, "CPU cores"
    if nproc > have:
        raise UsageError(f"--nproc-per-node {nproc} is more processes than this machine's {have} {what}")


def torchrun_arguments(launch: Launch, rdzv_timeout: int, child: list[str], log_dir: Path) -> list[str]:
    """The command line torch.distributed.run parses (after `torchrun`). Every stream goes to the rank's log file in
    `log_dir` except local rank 0's stderr, which is also the console: velora's display and error lines."""
    streams = ",".join(f"{rank}:{1 if rank == 0 else 3}" for rank in range(launch.nproc_per_node))  # 1 out, 3 both
    args = ["--nproc-per-node", str(launch.nproc_per_node), "--max-restarts", "0", "--log-dir", str(log_dir),
            "--redirects", streams]  # fmt: skip
    if launch.nnodes == 1 and launch.rdzv_endpoint is None:
        args.append("--standalone")  # a free port on this machine: two single-node runs never clash
    else:
        args += ["--nnodes", str(launch.nnodes), "--node-rank", str(launch.node_rank), "--rdzv-backend", "c10d",
                 "--rdzv-endpoint", launch.rdzv_endpoint or "", "--rdzv-id", "velora",
                 "--rdzv-conf", f"join_timeout={rdzv_timeout}"]  # fmt: skip
    return [*args, "-m", "velora_cli", "finetune", *child]


def attempt_logs(log_dir: Path) -> Path:
    """Where torchrun put this launch's per-rank logs (log_dir/<run id>_<random>/attempt_0/<local rank>/)."""
    attempts = sorted(log_dir.glob("*/attempt_*"))
    return attempts[0] if len(attempts) == 1 else log_dir


def launch_finetune(launch: Launch, recipe: Path, overrides: list[str], output_dir: Path | None, child: list[str],
                    verbose: bool, force: bool = False) -> None:  # fmt: skip
    """Run the workers under torchrun's agent in this process (`launch` checked by the caller: Launch.check);
    raise one-line errors for what can go wrong."""
    _check_devices(launch.nproc_per_node)
    # A bad recipe, or one this machine cannot train, fails here, once, before any worker starts or a folder is made.
    settled = load_recipe(recipe, overrides, {"output.dir": str(output_dir)} if output_dir is not None else None)
    check_trainable(settled)
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.elastic.rendezvous.api import RendezvousError
    from torch.distributed.run import get_args_parser, run

    if not verbose:  # the agent's own warnings and failure report; the error line below says what matters
        logging.getLogger("torch.distributed.elastic").setLevel(logging.CRITICAL)
    run_dir = settled.run_dir()
    # The logs live in the run dir, so it is claimed first, as the workers would (refused when someone else's).
    ownership.refuse_foreign(run_dir, ownership.RUN_MARKER, "output.dir", force=force)
    ownership.claim(run_dir, ownership.RUN_MARKER)
    log_dir = run_dir / "logs" / f"node{launch.node_rank}-{time.strftime('%Y%m%d-%H%M%S')}"
    args = get_args_parser().parse_args(torchrun_arguments(launch, settled.distributed.rdzv_timeout, child, log_dir))
    os.environ[RANK_LOGS] = str(log_dir)
    # torchrun gives every worker 1 CPU thread unless told; give each its share of this machine's cores instead.
    threads = "OMP_NUM_THREADS" not in os.environ
    if threads:
        os.environ["OMP_NUM_THREADS"] = str(max(1, cpu_cores() // launch.nproc_per_node))
    try:
        run(args)
    except ChildFailedError as exc:
        rank, failure = exc.get_first_failure()
        code = failure.exitcode
        if code == 2:  # a usage/recipe error: rank 0 printed it already
            raise SystemExit(2) from None
        how = f"was killed by signal {-code}" if code < 0 else f"exited with code {code}"
        raise VeloraError(f"rank {rank} {how} on {socket.gethostname()}; the other ranks were stopped and the "
                          f"complete checkpoints in {run_dir} are kept: run the same command to resume "
                          f"(each rank's output: {attempt_logs(log_dir)})") from None
    except RendezvousError as exc:
        raise VeloraError(f"the nodes did not all join at {launch.rdzv_endpoint} within "
                          f"{settled.distributed.rdzv_timeout} s (distributed.rdzv_timeout): "
                          f"{str(exc).splitlines()[0] if str(exc) else type(exc).__name__}") from None
    finally:
        os.environ.pop(RANK_LOGS, None)  # the workers' settings, not this process's
        if threads:
            os.environ.pop("OMP_NUM_THREADS", None)
