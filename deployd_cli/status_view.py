"""How `deployd status` shows the daemon's Status: status_report turns the answer into the plain
dict that --json prints, status_text draws that dict as tables for people."""

from __future__ import annotations

from typing import Any


def status_report(status: Any) -> dict[str, Any]:
    """The Status answer (deployd.v1.StatusResponse) as plain data: what --json prints."""
    return {
        "workers": [
            {
                "index": worker.index,
                "pid": worker.pid,
                "state": worker.state,
                "calls": worker.calls_served,
                "restarts": worker.restarts,
                "rss_bytes": worker.rss_bytes,
                "pss_bytes": worker.pss_bytes,
                "shared_bytes": worker.shared_bytes,
                "private_bytes": worker.private_bytes,
                "last_failure": worker.last_failure,
                **_gpu_report(worker),
            }
            for worker in status.workers
        ],
        "models": [
            {
                "name": model.name,
                "serving_version": model.serving_version,
                "versions": [_version_report(version) for version in model.versions],
                **_placement_report(model),
            }
            for model in status.models
        ],
        "packages": [
            {"package_id": package.package_id, "size_bytes": package.size_bytes} for package in status.packages
        ],
        "objects": [
            {
                "object_id": obj.object_id,
                "package_id": obj.package_id,
                "module": obj.module,
                "file": obj.file,
                **_placement_report(obj),
                **({"device": obj.device} if obj.device not in ("", "cpu") else {}),
            }
            for obj in status.objects
        ],
        "modules": list(status.modules),
        "queued_calls": status.queued_calls,
        "sessions": [
            {
                "session_id": session.session_id,
                "worker": session.worker,
                "objects": session.objects,
                "idle_seconds": round(session.idle_seconds, 3),
                "steps_running": session.steps_running,
            }
            for session in status.sessions
        ],
    }


def _gpu_report(worker: Any) -> dict[str, Any]:
    """gpu (and NVML's readings, when it has them) for a worker bound to a GPU only (pool.gpus)."""
    if not worker.HasField("gpu"):
        return {}
    report: dict[str, Any] = {"gpu": worker.gpu}
    for field in ("gpu_memory_bytes", "gpu_utilization_percent"):
        if worker.HasField(field):
            report[field] = getattr(worker, field)
    return report


def _placement_report(placed: Any) -> dict[str, Any]:
    """worker_slots for a placed model or object only: absent, it is on every worker (as
    batching is absent for a version that does not batch)."""
    return {"worker_slots": list(placed.worker_slots)} if placed.worker_slots else {}


def _version_report(version: Any) -> dict[str, Any]:
    report = {
        "version": version.version,
        "state": version.state,
        "object_id": version.object_id,
        "calls_in_flight": version.calls_in_flight,
        "package_id": version.package_id,
        "module": version.module,
        "file": version.file,
    }
    if version.HasField("batching"):  # only for versions that batch: the key is absent otherwise
        report["batching"] = {
            "max_batch_size": version.batching.max_batch_size,
            "max_queue_delay_ms": version.batching.max_queue_delay_ms,
            "preferred_batch_sizes": list(version.batching.preferred_batch_sizes),
        }
    return report


def status_text(report: dict[str, Any]) -> str:
    def mib(size: int) -> str:
        return f"{size / 2**20:.1f}"

    header = ["WORKER", "PID", "STATE", "CALLS", "RESTARTS", "RSS MiB", "PSS MiB", "SHARED MiB", "PRIVATE MiB"]
    rows = [
        [
            str(w["index"]),
            str(w["pid"]),
            w["state"],
            str(w["calls"]),
            str(w["restarts"]),
            mib(w["rss_bytes"]),
            mib(w["pss_bytes"]),
            mib(w["shared_bytes"]),
            mib(w["private_bytes"]),
        ]
        for w in report["workers"]
    ]
    lines = _table(header, rows)
    lines += [
        f"worker {w['index']} cannot be replaced: {w['last_failure']}" for w in report["workers"] if w["last_failure"]
    ]
    lines.append(f"queued calls: {report['queued_calls']}")
    lines.append(f"models: {len(report['models'])}")
    for model in report["models"]:
        lines.append(
            f"  {model['name']}  serving version {model['serving_version'] or 'none'}"
            + _placed_on(model.get("worker_slots", []))
        )
        header = ["VERSION", "STATE", "OBJECT", "CALLS", "MODULE:FILE", "PACKAGE"]
        rows = [
            [
                str(v["version"]),
                v["state"],
                v["object_id"],
                str(v["calls_in_flight"]),
                f"{v['module']}:{v['file']}",
                v["package_id"],
            ]
            for v in model["versions"]
        ]
        lines += [f"    {line}" for line in _table(header, rows)]
        for v in model["versions"]:
            if "batching" in v:
                batching = v["batching"]
                preferred = ", ".join(map(str, batching["preferred_batch_sizes"]))
                lines.append(
                    f"    version {v['version']} batches calls: up to {batching['max_batch_size']} rows,"
                    f" first call waits up to {batching['max_queue_delay_ms']:g} ms"
                    + (f", preferred {preferred}" if preferred else "")
                )
    lines.append(f"packages: {len(report['packages'])}")
    lines += [f"  {p['package_id']}  {mib(p['size_bytes'])} MiB" for p in report["packages"]]
    lines.append(f"objects: {len(report['objects'])}")
    lines += [
        f"  {o['object_id']}  {o['module']}:{o['file']}  package {o['package_id']}"
        + _placed_on(o.get("worker_slots", []))
        + (f"  on {o['device']}" if "device" in o else "")
        for o in report["objects"]
    ]
    lines.append(f"modules: {len(report['modules'])}")
    lines += [f"  {name}" for name in report["modules"]]
    lines.append(f"sessions: {len(report['sessions'])}")
    if report["sessions"]:
        header = ["SESSION", "WORKER", "OBJECTS", "IDLE s", "STEPS RUNNING"]
        rows = [
            [s["session_id"], str(s["worker"]), str(s["objects"]), f"{s['idle_seconds']:.1f}", str(s["steps_running"])]
            for s in report["sessions"]
        ]
        lines += [f"  {line}" for line in _table(header, rows)]
    return "\n".join(lines)


def _placed_on(slots: list[int]) -> str:
    """Where a placed model or object is loaded; nothing for one on every worker."""
    return f"  on workers {', '.join(map(str, slots))}" if slots else ""


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    widths = [max(len(cell) for cell in column) for column in zip(header, *rows, strict=False)]
    return [
        "  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
