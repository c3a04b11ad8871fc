"""Dask worker processes for the stages' work units, through prefect-dask's DaskTaskRunner.

`dask_task_runner(workers, address)` starts a local cluster of `workers` single-threaded worker processes, or
connects to an existing scheduler at `address` (a scheduler that does not answer is a one-line ConfigError within
CONNECT_TIMEOUT_S). Every worker gets the `LoraLensWorker` plugin, which marks its process a work-unit worker:
models are kept between units and the DuckDB warehouse is never written there (the flow process registers).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from distributed.diagnostics.plugin import WorkerPlugin
from prefect.client.orchestration import get_client
from prefect.settings import PREFECT_API_URL, temporary_settings
from prefect_dask import DaskTaskRunner

from loralens.config import ConfigError

CONNECT_TIMEOUT_S = 5
log = logging.getLogger("loralens.dask")


class LoraLensWorker(WorkerPlugin):
    """Set up a Dask worker process for Lora Lens work units (and pin it to one GPU where there are several)."""

    name = "loralens-worker"

    def setup(self, worker) -> None:  # noqa: ANN001 - distributed.Worker
        from loralens.tasks.worker_process import mark_worker_process

        mark_worker_process()
        if isinstance(worker.name, int) and "CUDA_VISIBLE_DEVICES" not in os.environ:
            import torch

            n_gpus = torch.cuda.device_count()  # NVML: does not initialise CUDA in this process
            if n_gpus > 1:
                os.environ["CUDA_VISIBLE_DEVICES"] = str(worker.name % n_gpus)  # local worker i: GPU i


def _api_url() -> str:
    """Return the Prefect API this flow process talks to (an ephemeral server's too), for the workers to share."""
    with get_client(sync_client=True) as client:
        return str(client.api_url)


@contextmanager
def dask_task_runner(workers: int, address: str | None) -> Iterator[DaskTaskRunner]:
    """Yield a started DaskTaskRunner: `workers` local worker processes, or the scheduler at `address`."""
    if address:
        runner = DaskTaskRunner(address=address, client_kwargs={"timeout": f"{CONNECT_TIMEOUT_S}s"})
    else:
        runner = DaskTaskRunner(cluster_kwargs={"n_workers": workers, "threads_per_worker": 1, "processes": True,
                                                "dashboard_address": ":0", "silence_logs": logging.ERROR})
    # Task runs on the workers report to this flow's Prefect API (without it each worker would start its own
    # ephemeral server): the URL rides in the settings that every submitted task carries.
    with temporary_settings(updates={PREFECT_API_URL: _api_url()}), runner:
        try:
            client = runner.client
        except (OSError, TimeoutError, ValueError) as err:
            if not address:
                raise
            reason = str(err).splitlines()[0] if str(err) else type(err).__name__
            raise ConfigError(f"run.dask_address: no Dask scheduler answers at {address} ({reason})") from None
        client.register_plugin(LoraLensWorker(), name=LoraLensWorker.name)
        log.info("work units run on Dask: %s (%d workers)", address or "local cluster",
                 len(client.scheduler_info(n_workers=-1)["workers"]))
        yield runner
