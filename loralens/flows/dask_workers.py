"""Dask worker processes for the stages' work units, through prefect-dask's DaskTaskRunner.

`WorkerPool(workers, address, cfg)` starts a local cluster of `workers` single-threaded worker processes when first
used, each with a `memory_limit` from `cfg`'s memory plan (`tasks.memory.worker_memory_limit`), or connects to an
existing scheduler at `address` at once (a scheduler that does not answer is a one-line ConfigError within
CONNECT_TIMEOUT_S). `free_models` has every worker drop its held model (before a stage that runs in the flow
process, such as train); `resolve_auto` asks every worker what `model.dtype: auto` means there. Every worker
gets the `LoraLensWorker` plugin, which marks its process a work-unit worker: models are kept between units and
the DuckDB warehouse is never written there (the flow process registers).
"""

from __future__ import annotations

import logging
import os
from contextlib import ExitStack

from distributed.diagnostics.plugin import WorkerPlugin
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_dask import DaskTaskRunner

from loralens.config import ConfigError, PipelineConfig
from loralens.tasks.memory import worker_memory_limit

CONNECT_TIMEOUT_S = 5
log = logging.getLogger("loralens.dask")


class LoraLensWorker(WorkerPlugin):
    """Set up a Dask worker process for Lora Lens work units (and pin it to one GPU where there are several)."""

    name = "loralens-worker"

    def setup(self, worker) -> None:  # noqa: ANN001 - distributed.Worker
        from loralens.tasks.workers.worker_process import mark_worker_process

        mark_worker_process()
        if isinstance(worker.name, int):
            import torch

            n_gpus = torch.cuda.device_count()  # NVML: does not initialise CUDA in this process
            pinned = worker_gpu(worker.name, os.environ.get("CUDA_VISIBLE_DEVICES"), n_gpus)
            if pinned is not None:
                os.environ["CUDA_VISIBLE_DEVICES"] = pinned


def worker_gpu(name: int, visible: str | None, n_gpus: int) -> str | None:
    """Return the `CUDA_VISIBLE_DEVICES` value that gives local worker `name` one GPU of its own, or None to keep
    the environment: GPU `name % n` of the `n` this process sees, named as the inherited list names it (a
    scheduler such as SLURM may have set `0,1` or UUIDs: workers inheriting it unpinned would all use its first)."""
    if n_gpus <= 1:
        return None
    from loralens.lens.runtime.devices import visible_gpus

    names = visible_gpus(visible, n_gpus)
    return names[name % min(n_gpus, len(names))]


def _api_url() -> str:
    """Return the Prefect API this flow process talks to (an ephemeral server's too), for the workers to share."""
    with get_client(sync_client=True) as client:
        return str(client.api_url)


class WorkerPool:
    """The Dask task runner a run maps its work units on: started on first use, closed with `close()`.

    `workers` local single-threaded worker processes, or the scheduler at `address` (connected at once, so a
    scheduler that does not answer fails the run before anything is written, within CONNECT_TIMEOUT_S). With
    `cfg`, each local worker's `memory_limit` comes from its memory plan (`worker_memory_limit`), else Dask's default.
    """

    def __init__(self, workers: int, address: str | None, cfg: PipelineConfig | None = None) -> None:
        self.workers, self.address, self.cfg = workers, address, cfg
        self._stack = ExitStack()
        self._runner: DaskTaskRunner | None = None
        self.api_url: str | None = None
        if address:
            self.runner()

    def runner(self) -> DaskTaskRunner:
        """Return the started runner (starting the local cluster or connecting now if not yet)."""
        if self._runner is not None:
            return self._runner
        if self.address:
            runner = DaskTaskRunner(address=self.address, client_kwargs={"timeout": f"{CONNECT_TIMEOUT_S}s"})
        else:
            limit = {"memory_limit": worker_memory_limit(self.cfg, self.workers)} if self.cfg is not None else {}
            runner = DaskTaskRunner(cluster_kwargs={"n_workers": self.workers, "threads_per_worker": 1,
                                                    "processes": True, "dashboard_address": ":0",
                                                    "silence_logs": logging.ERROR, **limit})
        self._stack.enter_context(runner)
        try:
            client = runner.client
        except (OSError, TimeoutError, ValueError) as err:
            self.close()
            if not self.address:
                raise
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"run.dask_address: no Dask scheduler answers at {self.address} ({reason})") from None
        client.register_plugin(LoraLensWorker(), name=LoraLensWorker.name)
        log.info("work units run on Dask: %s (%d workers)", self.address or "a local cluster",
                 len(client.scheduler_info(n_workers=-1)["workers"]))
        # Task runs on the workers report to this flow's Prefect API; without it in the settings each submitted
        # task carries, every worker would start an ephemeral Prefect server of its own.
        self.api_url = _api_url()
        self._runner = runner
        return runner

    def submit_settings(self):  # noqa: ANN201 - a Prefect settings context
        """Return the settings context to submit tasks in (it names this flow's Prefect API)."""
        return temporary_settings(updates={PREFECT_API_URL: self.api_url})

    def free_models(self) -> dict[str, bool]:
        """Have every worker drop the model it holds (`worker_process.free_held_model`): its host and GPU memory go
        back before a stage that runs in the flow process. Return {worker address: whether it held one}; nothing
        when no cluster is started yet."""
        if self._runner is None:
            return {}
        from loralens.tasks.workers.worker_process import free_held_model

        return self._runner.client.run(free_held_model)

    def resolve_auto(self, device: str, dtype: str) -> dict[str, dict]:
        """Return what `device` / `dtype` (`auto`) mean on every worker: {worker address: `devices.auto_here`'s
        answer}, each computed in that worker's process (a CPU head node's torch never decides for GPU workers)."""
        from loralens.lens.runtime.devices import auto_here

        return self.runner().client.run(auto_here, device, dtype)

    def close(self) -> None:
        """Shut the local cluster down (or disconnect); idempotent."""
        self._runner = None
        self._stack.close()
