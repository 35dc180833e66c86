"""``helm template`` for the getting-started test on a machine without the helm binary: renders
the chart with the Helm library itself (helm-python-sdk, the same Go code as the binary).

Understands what docs/getting-started.md uses: ``template NAME CHART [--namespace NS] [-f FILE]...
[--set-file a.b=PATH]...``. Prints the documents like the binary (``---`` + ``# Source:``).
"""

from __future__ import annotations

import argparse
import sys
from typing import Any

import yaml


def main(argv: list[str]) -> int:
    if not argv or argv[0] != "template":
        print(f"helm (test stand-in): only `helm template` is available here, not {argv[:1]}", file=sys.stderr)
        return 2
    parser = argparse.ArgumentParser(prog="helm template")
    parser.add_argument("name")
    parser.add_argument("chart")
    parser.add_argument("--namespace", "-n", default="default")
    parser.add_argument("--values", "-f", action="append", default=[])
    parser.add_argument("--set-file", action="append", default=[])
    args = parser.parse_args(argv[1:])
    values: dict[str, Any] = {}
    for path in args.values:
        with open(path, encoding="utf-8") as handle:
            values.update(yaml.safe_load(handle) or {})
    for item in args.set_file:
        dotted, _, path = item.partition("=")
        *parents, leaf = dotted.split(".")
        node = values
        for part in parents:
            node = node.setdefault(part, {})
        with open(path, encoding="utf-8") as handle:
            node[leaf] = handle.read()
    import helm_python

    with helm_python.Chart.load(args.chart) as chart:
        rendered = chart.render(values, name=args.name, namespace=args.namespace, is_install=True)
    for path, text in sorted(rendered.items()):
        if path.endswith("NOTES.txt") or not text.strip():
            continue
        print(f"---\n# Source: {path}\n{text.strip()}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
