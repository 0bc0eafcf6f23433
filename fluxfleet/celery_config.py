"""The Celery configuration producer and workers share: Redis broker, JSON only, late acks.

See the worker settings' notes: Celery on Redis re-delivers any task unacknowledged after the
visibility timeout, so the timeout is set everywhere Celery reads it and must exceed the time limit.
"""

from __future__ import annotations

import ssl
from typing import Any

from celery import Celery
from kombu import Queue

from fluxfleet.keys import queue_name
from fluxfleet.settings import Settings


def celery_config(settings: Settings, queues: list[str] | None = None) -> dict[str, Any]:
    broker, worker = settings.broker, settings.worker
    transport_options: dict[str, Any] = {
        "visibility_timeout": broker.visibility_timeout_s,
        "socket_connect_timeout": broker.connect_timeout_s,
        "socket_timeout": max(broker.connect_timeout_s, 30.0),
        "unacked_restore_interval": broker.restore_interval_s,
        "unacked_restore_throttle": 1,
        "global_keyprefix": "",
    }
    config: dict[str, Any] = {
        "broker_url": broker.url_with_password(),
        "broker_transport_options": transport_options,
        "result_backend_transport_options": {"visibility_timeout": broker.visibility_timeout_s},
        "visibility_timeout": broker.visibility_timeout_s,
        "broker_connection_retry_on_startup": True,
        "broker_connection_timeout": broker.connect_timeout_s,
        "task_serializer": "json",
        "result_serializer": "json",
        "accept_content": ["json"],
        "task_ignore_result": True,
        "result_backend": None,
        "task_acks_late": True,
        # A killed pool child re-queues its task; the attempt counter in Redis stops poison loops.
        "task_reject_on_worker_lost": True,
        "worker_prefetch_multiplier": 1,
        "worker_concurrency": 1,
        "task_time_limit": worker.task_time_limit_s,
        "task_soft_time_limit": worker.task_soft_time_limit_s,
        # Loading and warming a pipeline in the pool child takes minutes, not the default 4 s.
        "worker_proc_alive_timeout": worker.load_timeout_s,
        "worker_hijack_root_logger": False,
        "task_default_queue": queue_name("default"),
        "task_create_missing_queues": True,
        "task_publish_retry": True,
        "task_publish_retry_policy": {"max_retries": 2, "interval_start": 0.2, "interval_step": 0.5},
        "worker_send_task_events": False,
        "broker_heartbeat": 0,
    }
    if worker.max_rss_bytes or worker.max_gpu_reserved_bytes:
        # Checked by the pool child after each task: over the limit, it exits and a fresh one loads.
        # The worker points this check at GPU reserved memory too (workers.service.app.watch_gpu_memory).
        config["worker_max_memory_per_child"] = (worker.max_rss_bytes // 1024) or 2**50
    if queues:
        config["task_queues"] = [Queue(q, routing_key=q) for q in queues]
    if broker.url.startswith("rediss://"):
        config["broker_use_ssl"] = {**broker.tls_options(), "ssl_cert_reqs": ssl.CERT_REQUIRED}
    return config


def make_celery(settings: Settings, presets: list[str] | None = None, name: str = "fluxfleet") -> Celery:
    queues = [queue_name(p) for p in presets] if presets else None
    app = Celery(name, set_as_current=False)
    app.conf.update(celery_config(settings, queues))
    return app
