"""Commands on a home's artifacts: `status`, `verify`, `gc` and `rebuild` (the warehouse from the manifests)."""

from __future__ import annotations

import argparse

from loralens.flows.cli.output import format_table, home_of, human_bytes, version_dirs
from loralens.warehouse.constants import STAGES


def cmd_status(args: argparse.Namespace) -> int:
    """`loralens status`: list every version folder with its state, rows, size and creation time."""
    from loralens.warehouse.db import list_artifacts, warehouse_path

    home = home_of(args)
    registered = {a["version"]: a for a in list_artifacts(warehouse_path(home))}
    rows = []
    for adir in version_dirs(home):
        reg = registered.get(adir.version, {})
        state = "complete" if adir.is_complete() else f"incomplete ({len(adir.done_shards())} shards done)"
        rows.append({"stage": adir.stage, "version": adir.version, "state": state,
                     "rows": reg.get("rows") or "-", "size": human_bytes(adir.size_bytes()),
                     "created": str(reg.get("created_at", "-"))[:19]})
    if not rows:
        print(f"no artifacts under {home}")
        return 0
    print(format_table(rows, ["stage", "version", "state", "rows", "size", "created"]))
    return 0


def cmd_verify(args: argparse.Namespace) -> int:
    """`loralens verify [STAGE]`: re-hash complete versions against their manifests; exit 1 if any failed."""
    from loralens.config import ConfigError
    from loralens.tasks.stage_versions import reopen_changed

    if args.stage is not None and args.stage not in STAGES:
        raise ConfigError(f"unknown stage '{args.stage}'; stages: {', '.join(STAGES)}")
    home = home_of(args)
    rows, bad_total = [], 0
    for adir in version_dirs(home, args.stage):
        manifest = adir.manifest()
        if manifest is None:
            continue  # incomplete: its shards are checked when the stage resumes it
        bad = reopen_changed(adir, full=True)  # a bad version is reopened as a run would reopen it
        bad_total += len(bad)
        rows.append({"stage": adir.stage, "version": adir.version, "files": len(manifest["files"]),
                     "bytes": human_bytes(manifest["total_bytes"]),
                     "result": "ok" if not bad else f"{len(bad)} bad file{'s' * (len(bad) > 1)}: "
                               + ", ".join(f["path"] for f in bad[:3]) + (", ..." if len(bad) > 3 else "")})
    if not rows:
        print(f"no complete {args.stage or 'artifact'} versions under {home}")
        return 0
    print(format_table(rows, ["stage", "version", "files", "bytes", "result"]))
    if bad_total:
        print(f"{bad_total} file(s) failed their sha256; their versions were reopened: the next `loralens run` "
              "redoes the bad shards (train, attribute, select: the whole version)")
        return 1
    return 0


def cmd_gc(args: argparse.Namespace) -> int:
    """`loralens gc`: list (or with --yes remove) the versions nothing kept depends on."""
    from loralens.warehouse.gc import collect_garbage, find_garbage

    home = home_of(args)
    garbage = find_garbage(home, keep_latest=args.keep_latest, include_incomplete=args.include_incomplete,
                           wait_s=args.wait)
    if not garbage:
        print(f"nothing to remove under {home}")
        return 0
    rows = [{"stage": g.stage, "version": g.version, "size": human_bytes(g.bytes), "reason": g.reason}
            for g in garbage]
    print(format_table(rows, ["stage", "version", "size", "reason"]))
    total = human_bytes(sum(g.bytes for g in garbage))
    if not args.yes:
        print(f"would remove {len(garbage)} item(s), {total} (dry run; pass --yes to delete)")
        return 0
    result = collect_garbage(home, garbage, wait_s=args.wait)
    print(f"removed {len(result.removed)} item(s), {total}; {sum(result.rows.values())} warehouse rows deleted")
    return 0


def cmd_rebuild(args: argparse.Namespace) -> int:
    """`loralens rebuild`: recreate the warehouse from the manifests and files of every complete version."""
    from loralens.tasks.warehouse_index import rebuild
    from loralens.warehouse.db import warehouse_path

    home = home_of(args)
    versions = rebuild(home)
    if versions:
        print(format_table([{"stage": a.stage, "version": a.version} for a in versions], ["stage", "version"]))
    print(f"warehouse {warehouse_path(home)} rebuilt from {len(versions)} complete version(s)")
    return 0
