"""`nemoconv upload`'s summary: the files, the commit message, the method, the commit."""

from __future__ import annotations

from rich.console import Console

from nemoconv.cli.render import human_bytes


def render_upload(plan: dict, dry_run: bool, out: Console) -> None:
    target = plan["repo_id"] + (f"@{plan['revision']}" if plan["revision"] else "")
    out.print(f"{'would upload' if dry_run else 'uploaded'} {len(plan['files'])} files "
              f"({human_bytes(sum(f['bytes'] for f in plan['files']))}) to {target}")
    for f in plan["files"]:
        out.print(f"  {f['path']}  {human_bytes(f['bytes'])}", markup=False, highlight=False)
    out.print(f"commit message: {plan['commit_message']}", markup=False, highlight=False)
    out.print(f"method: {plan['method']}", markup=False, highlight=False)
    if plan.get("commit_url"):
        out.print(plan["commit_url"])
