"""A Slurm job of `rlrt train`: its resources, submit-time validation and the rendered sbatch.

`SlurmJob` holds what `rlrt slurm submit` was asked for. `validate()` catches the mistakes that
would otherwise surface minutes (or hours, in a queue) later on the cluster: rollout nodes that
leave no node to train on, a GPU count that does not fit the recipe's TP x PP layout, a checkpoint
directory missing from the shared storage. `render()` turns the job into the batch script: the
`#SBATCH` header comes from a nemo-run `SlurmExecutor` built from the job (so the same executor
later submits it through its tunnel), the body is `slurm/rlrt.sbatch` below its header marker,
with the job's `RLRT_*` settings exported in between. The file you can `sbatch` by hand and the
one `rlrt slurm submit` sends are therefore the same job.

This module imports nemo_run only inside `executor()`, so `--help` works without the extra, and
`render()` writes the same header from the job's own fields when nemo-run is not installed (a
`--dry-run` only writes text).
"""

from __future__ import annotations

import importlib.util
import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
SBATCH_TEMPLATE = REPO_ROOT / "slurm" / "rlrt.sbatch"
HEADER_END = "# ---- end of #SBATCH header"
# Directories that exist separately on every node: a checkpoint there is lost on requeue.
NODE_LOCAL_PREFIXES = ("/tmp/", "/dev/shm/", "/run/", "/var/tmp/", "/scratch/local/", "/local/")


class SlurmJobError(ValueError):
    """The job cannot run as asked; the message says which flag or key and what to do."""


@dataclass
class SlurmJob:
    """Resources and settings of one `rlrt train` job on Slurm (one field per CLI flag)."""

    recipe: str
    overrides: list[str] = field(default_factory=list)
    nodes: int = 1
    gpus_per_node: int = 0  # 0 = CPU: one gloo rank per node
    rollout_nodes: int = 0  # the last K nodes run SGLang servers; 0 = colocated
    partition: str | None = None
    account: str | None = None
    time: str | None = None  # e.g. "04:00:00"; requeue continues where the limit stopped it
    job_name: str = "rlrt"
    container_image: str | None = None  # pyxis; None = the venv at <home>/.venv
    container_mounts: list[str] = field(default_factory=list)
    home: str = str(REPO_ROOT)  # the repo checkout as the cluster's nodes see it
    venv: str | None = None  # default <home>/.venv
    log_dir: str | None = None  # default <home>/runs/slurm-logs
    preempt_signal_s: int = 120  # USR1 this many seconds before the time limit
    exclusive: bool = False
    sbatch_args: dict[str, Any] = field(default_factory=dict)  # extra `#SBATCH --k=v`
    env: dict[str, str] = field(default_factory=dict)  # extra exported settings

    @property
    def training_nodes(self) -> int:
        return self.nodes - self.rollout_nodes

    @property
    def tasks_per_node(self) -> int:
        return self.gpus_per_node if self.gpus_per_node > 0 else 1

    @property
    def world_size(self) -> int:
        return self.training_nodes * self.tasks_per_node

    def resolve(self, path: str) -> str:
        """A path from the recipe as the job sees it (relative = relative to `home`)."""
        return path if path.startswith("/") else str(Path(self.home) / path)

    # ---- the recipe ------------------------------------------------------------------------
    def config(self):  # noqa: ANN201 - TrainConfig, imported lazily (pulls torch)
        from recipes import get_recipe
        from rlrt_megatron.config import ConfigError

        try:
            return get_recipe(self.recipe, list(self.overrides))
        except ConfigError as e:
            raise SlurmJobError(str(e)) from e

    def settings(self, cfg: Any | None = None) -> dict[str, str]:
        """The RLRT_* variables `slurm/rlrt.sbatch` reads."""
        s = {
            "RLRT_HOME": self.home,
            "RLRT_GPUS_PER_NODE": str(self.gpus_per_node),
            "RLRT_ROLLOUT_NODES": str(self.rollout_nodes),
            "RLRT_VENV": self.venv or str(Path(self.home) / ".venv"),
            "RLRT_LOG_DIR": self.log_dir or str(Path(self.home) / "runs" / "slurm-logs"),
        }
        if self.container_image:
            s["RLRT_CONTAINER_IMAGE"] = self.container_image
        mounts = list(self.container_mounts)
        if self.container_image and cfg is not None:
            mounts += self.auto_mounts(cfg, s["RLRT_LOG_DIR"])
        if mounts:
            s["RLRT_CONTAINER_MOUNTS"] = ",".join(mounts)
        if cfg is not None and self.rollout_nodes > 0:
            s["RLRT_ROLLOUT_MODEL"] = self.resolve(cfg.model.hf_path)
            per_node = max(1, self.gpus_per_node // max(1, cfg.rollout.sglang_tp))
            s["RLRT_ROLLOUT_SERVERS_PER_NODE"] = str(per_node)
        s.update(self.env)
        return s

    def warnings(self) -> list[str]:
        """Settings that may work on a test setup but rarely on a real cluster (logged)."""
        out = []
        for flag, path in (("--home", self.home), ("--log-dir", self.settings()["RLRT_LOG_DIR"])):
            if self.nodes > 1 and f"{path.rstrip('/')}/".startswith(NODE_LOCAL_PREFIXES):
                out.append(
                    f"{flag} {path} is under node-local storage: every node must see the same "
                    "checkout and logs; use a path on the cluster's shared file system"
                )
        return out

    def auto_mounts(self, cfg: Any, log_dir: str) -> list[str]:
        """Container mounts for every path the config names outside the checkout, the log dir
        and the user's mounts (`launch/paths.py`): without them a model, data set or checkpoint
        there would be invisible inside the container."""
        from rlrt_megatron.launch.paths import container_mounts, named_paths

        covered = [self.home, log_dir] + [m.split(":")[1] if ":" in m else m
                                          for m in self.container_mounts]  # fmt: skip
        return container_mounts(named_paths(cfg, self.resolve), covered)

    def describe(self, cfg: Any) -> str:
        """One line: nodes, ranks and the parallel layout (printed by `rlrt slurm submit`)."""
        tp, pp = cfg.parallel.tp, cfg.parallel.pp
        s = (
            f"{self.nodes} node(s): {self.training_nodes} training x {self.tasks_per_node} "
            f"rank(s) = {self.world_size} ranks (tp {tp} x pp {pp} x dp "
            f"{self.world_size // (tp * pp)})"
        )
        if cfg.parallel.ep > 1:  # MoE: experts over ep ranks
            s += f", experts ep {cfg.parallel.ep} x etp {cfg.parallel.etp or tp}"
        if self.rollout_nodes:
            per_node = self.settings(cfg).get("RLRT_ROLLOUT_SERVERS_PER_NODE", "1")
            s += (
                f", {self.rollout_nodes} rollout node(s) x {per_node} SGLang server(s) "
                f"(tp {cfg.rollout.sglang_tp})"
            )
        else:
            s += f", rollouts colocated ({cfg.rollout.engine})"
        return s

    # ---- nemo-run ----------------------------------------------------------------------------
    def executor(self, tunnel: Any | None = None):  # noqa: ANN201 - nemo_run.SlurmExecutor
        """The nemo-run `SlurmExecutor` for this job (resources, signal, requeue, tunnel)."""
        try:
            import nemo_run as run
        except ImportError as e:  # pragma: no cover - depends on the install
            raise SlurmJobError(
                f"`rlrt slurm` needs nemo-run ({e}): pip install -e '.[slurm]'"
            ) from e
        extra: dict[str, Any] = {"requeue": True, "open_mode": "append"}
        extra.update(self.sbatch_args)
        kw: dict[str, Any] = dict(
            account=self.account or "",
            partition=self.partition,
            nodes=self.nodes,
            ntasks_per_node=self.tasks_per_node,
            gpus_per_node=self.gpus_per_node or None,
            signal=f"B:USR1@{self.preempt_signal_s}",
            exclusive=True if self.exclusive else None,
            additional_parameters=extra,
            env_vars=self.settings(),
        )
        if self.time:
            kw["time"] = self.time
        if tunnel is not None:
            kw["tunnel"] = tunnel
        ex = run.SlurmExecutor(**kw)
        if not self.time:
            ex.time = None  # no limit asked: the partition's default applies
        return ex

    def resources(self) -> dict[str, Any]:
        """The `#SBATCH` resource flags of this job (the fields `executor()` gives nemo-run)."""
        params = {
            "account": self.account,
            "partition": self.partition,
            "nodes": self.nodes,
            "ntasks_per_node": self.tasks_per_node,
            "gpus_per_node": self.gpus_per_node or None,
            "signal": f"B:USR1@{self.preempt_signal_s}",
            "exclusive": True if self.exclusive else None,
            "time": self.time,
        }
        return {k: v for k, v in params.items() if v not in (None, "", False)}

    def sbatch_header(self, executor: Any | None = None) -> list[str]:
        """`#SBATCH` lines from the executor's fields, as nemo-run's own template writes them;
        without an executor (nemo-run not installed: `--dry-run` only writes text) from the
        job's own `resources()`, the same lines (`tests/slurm`: both renderings are equal)."""
        if executor is not None:
            from nemo_run.core.execution.slurm import SlurmExecutor

            params = {
                k: getattr(executor, k)
                for k in SlurmExecutor.SBATCH_FLAGS
                if hasattr(executor, k) and getattr(executor, k) not in (None, "", False)
            }
            extra = dict(executor.additional_parameters or {})
        else:
            params = self.resources()
            extra = {"requeue": True, "open_mode": "append", **self.sbatch_args}
        params["job_name"] = self.job_name
        log_dir = self.settings()["RLRT_LOG_DIR"]
        params["output"] = f"{log_dir}/{self.job_name}-%j.out"
        params.update(extra)
        lines = []
        for k in sorted(params):
            v = params[k]
            flag = k.replace("_", "-")
            lines.append(f"#SBATCH --{flag}" if v is True else f"#SBATCH --{flag}={v}")
        return lines

    # ---- validation --------------------------------------------------------------------------
    def _trainer_errors(self, cfg: Any, limit_gib: float | None) -> list[str]:
        """`TrainConfig.validate(world_size=...)` at this job's world size (`launch/layout.py`),
        with the nearest layouts it accepts (that fit in `limit_gib` GiB per GPU, if given)."""
        from rlrt_megatron.launch.layout import check_world

        fits = None
        if limit_gib is not None and self.gpus_per_node > 0:
            from rlrt_megatron.launch.plan import plan_config

            def fits(c: Any, n: int, k: int) -> bool:
                g = self.gpus_per_node
                plan = plan_config(c, nodes=n, gpus_per_node=g, limit_gib=limit_gib,
                                   rollout_nodes=k, check=False)  # fmt: skip
                return plan.fits

        errs, near = check_world(cfg, nodes=self.nodes, gpus_per_node=self.gpus_per_node,
                                 rollout_nodes=self.rollout_nodes, fits=fits)  # fmt: skip
        if not errs:
            return []
        hint = ("valid layouts near it: " + "; ".join(near)) if near else "change the layout"
        return [f"the trainer refuses {self.world_size} ranks: {e}" for e in errs] + [hint]

    def validate(
        self,
        cfg: Any | None = None,
        path_exists=None,  # noqa: ANN001
        limit_gib: float | None = None,
    ) -> Any:
        """Check the job against its recipe; raise `SlurmJobError` listing every problem.

        The trainer's own config validation runs at the job's world size (suggesting valid
        layouts, fitting `limit_gib` GiB per GPU when given). `path_exists(path) -> bool` checks
        a path on the cluster (through the tunnel); None skips the storage check. Returns the
        recipe's TrainConfig.
        """
        errors: list[str] = []
        if self.nodes < 1:
            errors.append(f"--nodes {self.nodes}: must be >= 1")
        if self.gpus_per_node < 0:
            errors.append(f"--gpus-per-node {self.gpus_per_node}: must be >= 0 (0 = CPU)")
        if self.rollout_nodes < 0:
            errors.append(f"--rollout-nodes {self.rollout_nodes}: must be >= 0")
        elif self.rollout_nodes >= self.nodes:
            errors.append(
                f"--rollout-nodes {self.rollout_nodes} >= --nodes {self.nodes}: the last K nodes "
                "serve rollouts and the rest train, so at least one node must be left to train; "
                f"use --nodes {self.rollout_nodes + 1} or more, or fewer rollout nodes"
            )
        if errors:
            raise SlurmJobError("invalid Slurm job:\n  " + "\n  ".join(errors))

        cfg = cfg if cfg is not None else self.config()
        tp, pp = cfg.parallel.tp, cfg.parallel.pp
        g, world = self.gpus_per_node, self.world_size
        where = f"{self.training_nodes} training node(s) x {self.tasks_per_node} rank(s)"
        if world % (tp * pp):
            errors.append(
                f"--gpus-per-node {g}: {where} = {world} ranks is not divisible by "
                f"parallel.tp * parallel.pp = {tp} * {pp} = {tp * pp} (the recipe's layout); "
                f"use a node/GPU count whose product is a multiple of {tp * pp}, or change "
                "parallel.tp / parallel.pp"
            )
        expert_mp = pp * cfg.parallel.ep * (cfg.parallel.etp or tp)
        if world % expert_mp:
            errors.append(
                f"{where} = {world} ranks is not divisible by parallel.pp * parallel.ep * "
                f"parallel.etp = {expert_mp} (the experts' layout); change parallel.ep / etp"
            )
        if g > 0 and tp > g:
            errors.append(
                f"--gpus-per-node {g}: parallel.tp={tp} does not fit in one node; a TP group "
                f"talks every layer and must stay inside a node: use parallel.tp <= {g} "
                "(move the rest to parallel.pp)"
            )
        elif g > 0 and g % tp:
            errors.append(
                f"--gpus-per-node {g}: not a multiple of parallel.tp={tp}, so a TP group would "
                "straddle two nodes; use parallel.tp dividing the GPUs per node"
            )
        if self.rollout_nodes > 0:
            if cfg.rollout.engine != "sglang":
                errors.append(
                    f"--rollout-nodes {self.rollout_nodes}: the recipe samples with "
                    f"rollout.engine={cfg.rollout.engine} on the trainer; separate rollout nodes "
                    "need rollout.engine=sglang (or drop --rollout-nodes)"
                )
            if not hasattr(cfg.rollout, "sglang_urls"):
                errors.append(
                    f"--rollout-nodes {self.rollout_nodes}: this trainer's config has no "
                    "rollout.sglang_urls, so it cannot connect to servers on other nodes; "
                    "drop --rollout-nodes (colocated SGLang)"
                )
            if g == 0 and "RLRT_ROLLOUT_CMD" not in self.env:
                errors.append(
                    f"--rollout-nodes {self.rollout_nodes}: SGLang servers need GPUs; "
                    "set --gpus-per-node"
                )
            if g > 0 and g % max(1, cfg.rollout.sglang_tp):
                errors.append(
                    f"--gpus-per-node {g}: not a multiple of rollout.sglang_tp="
                    f"{cfg.rollout.sglang_tp} (GPUs of one SGLang server)"
                )
        if not errors:  # the trainer's own validation at this world size, as it will run it
            errors += self._trainer_errors(cfg, limit_gib)
        ckpt = self.resolve(cfg.checkpoint_dir)
        if self.nodes > 1 and ckpt.startswith(NODE_LOCAL_PREFIXES):
            errors.append(
                f"checkpoint.dir={ckpt} is node-local storage: every node must read the same "
                "checkpoint after a requeue; set checkpoint.dir=<path on shared storage>"
            )
        elif path_exists is not None and not path_exists(ckpt):
            errors.append(
                f"checkpoint.dir={ckpt} does not exist on the cluster's shared storage; the "
                "requeued job resumes from <checkpoint.dir>/latest, so it must be shared and "
                f"exist before submitting: mkdir -p {ckpt} there (or pass --mkdir), or set "
                "checkpoint.dir=<path on shared storage>"
            )
        if path_exists is not None:  # data, model, eval sets: they must be there already
            from rlrt_megatron.launch.paths import missing_inputs, named_paths

            errors += missing_inputs(named_paths(cfg, self.resolve), path_exists)
        if errors:
            raise SlurmJobError("invalid Slurm job:\n  " + "\n  ".join(errors))
        return cfg

    # ---- rendering ---------------------------------------------------------------------------
    def render(self, cfg: Any | None = None, executor: Any | None = None) -> str:
        """The complete batch script (header from the executor + settings + rlrt.sbatch body)."""
        template = SBATCH_TEMPLATE.read_text()
        head, sep, body = template.partition(HEADER_END)
        if not sep:
            raise SlurmJobError(f"{SBATCH_TEMPLATE}: header marker {HEADER_END!r} not found")
        body = body.split("\n", 1)[1]
        if executor is None and importlib.util.find_spec("nemo_run") is not None:
            executor = self.executor()
        args = ["--recipe", self.recipe, *self.overrides]
        lines = [
            "#!/bin/bash",
            f"# Rendered by `rlrt slurm submit` from {SBATCH_TEMPLATE.name}; resubmit with sbatch.",
            *self.sbatch_header(executor),
            f"{HEADER_END}: rendered ----",
            "",
            "# Job settings (rlrt slurm submit)",
            *(f"export {k}={shlex.quote(v)}" for k, v in self.settings(cfg).items()),
            "# `rlrt train` arguments: the recipe and its overrides",
            f"set -- {shlex.join(args)}",
        ]
        return "\n".join(lines) + "\n" + body
