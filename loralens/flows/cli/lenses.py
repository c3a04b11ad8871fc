"""`loralens export-lenses`: a home's lenses as a portable folder (`loralens.Lenses.from_pretrained` reads it)."""

from __future__ import annotations

import argparse

from loralens.flows.cli.output import home_of


def cmd_export_lenses(args: argparse.Namespace) -> int:
    """Write a train version's lenses (config.json + safetensors, hub-compatible) to OUT_DIR."""
    from loralens.api.pretrained import export_lenses

    out = export_lenses(args.out_dir, home=home_of(args), version=args.version)
    files = sorted(p.name for p in out.iterdir() if p.is_file())
    print(f"wrote {len(files)} files to {out}: {', '.join(files)}")
    print(f"load them with: loralens.Lenses.from_pretrained({str(out)!r}, model)")
    return 0
